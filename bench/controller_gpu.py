"""The controller at small scale on the real H200, side by side with the same run in virtual time on the
emulated H200 timed by the same artifact's measurements: SLO attainment, goodput and prediction errors per policy.

    python -m bench.controller_gpu [--seconds 30] [--rate 400] [--copies 20] [--slo-ms 50]
                                   [--policies clockwork,triton,ray] [--model resnet50]
                                   [--modes process,inprocess] [--no-emulated] [--conditions idle,thread+pump]
    python -m bench.controller_gpu --device cpu      # a quick local check: the mlp on the CPU worker

Needs the GPU machine and the CUDA artifacts of `python -m bench.build_gpu_artifacts` (.gpu/artifacts/<model>_cuda
or $WORKBENCH_GPU_ARTIFACTS). Each policy: `--copies` instances of the model on one GPU, Poisson arrivals with
Zipf(1) popularity at `--rate` r/s for `--seconds`, SLO `--slo-ms`; on the GPU in real time (RealClock) once per
worker mode, then in virtual time with the emulated worker (same seed, same arrivals). Worker modes:
- process (default): the isolated executor process (`ProcessWorker`): the controller's Python does not share an
  interpreter lock with the worker's launch path;
- inprocess: `CUDAWorker` in this process, for comparison (its executor threads wait for the interpreter lock
  whenever the controller runs Python).
An artifact without measurements for this device is profiled first (as a Session does): the controller's
estimates start from them.
With `--conditions`, each real run is repeated with the session busy as in `bench.isolation` (thread: a
CPU-bound Python loop in a thread of this process; thread+pump: that plus a 4 Hz chart-refresh thread), so the
prediction error is measured under the load a notebook kernel puts on the controller (issue 9).
With --device cpu the worker is the CPU worker and the model the mlp compiled here (bench/worker_artifacts), no
emulated row. Writes bench/results/controller_gpu.json and .md
(controller_gpu_cpu.* with --device cpu)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.controller_common import zipf_rates
from bench.worker_common import write

ROOT = Path(__file__).resolve().parents[1]
MS = 1_000_000


CFG = {"cuda": dict(weights_cache_size="16 GiB", io_pool_size="512 MiB", workspace_pool_size="4 GiB",
                   host_io_pool_size="512 MiB"),
       "cpu": dict(weights_cache_size="256 MiB", io_pool_size="64 MiB", workspace_pool_size="64 MiB",
                   host_io_pool_size="64 MiB")}
MODES = ("process", "inprocess")


def find_artifact(name: str) -> Path:
    for d in [Path(p) for p in (os.environ.get("WORKBENCH_GPU_ARTIFACTS"),) if p] + [ROOT / ".gpu" / "artifacts"]:
        if (d / name / "manifest.json").is_file():
            return d / name
    raise SystemExit(f"artifact {name} not found: run `python -m bench.build_gpu_artifacts` on the build machine "
                     f"and carry .gpu/ here (or set WORKBENCH_GPU_ARTIFACTS)")


def summarise(rec, seconds: float) -> dict:
    import polars as pl
    reqs, acts = rec.requests(), rec.actions()
    n = reqs.height
    ok = reqs.filter(pl.col("status") == "success")
    inf = acts.filter((pl.col("type") == "INFER") & (pl.col("status") == 0))
    err = (inf["measured_duration"] - inf["predicted_duration"]).abs() / 1e6 if inf.height else None
    rel = ((inf["measured_duration"] - inf["predicted_duration"]).abs() / inf["measured_duration"]) \
        if inf.height else None
    comp = ((inf["measured_end"] - inf["planned_end"]).abs() / 1e6) if inf.height else None
    q = (lambda s, p: float(s.quantile(p)) if s is not None and len(s) else None)
    return {"requests": n, "statuses": dict(reqs.group_by("status").len().iter_rows()),
            "goodput": ok.height / seconds, "slo_attainment": ok.height / n if n else 0.0,
            "p99_latency_ms": q(ok["latency"] / 1e6, 0.99) if ok.height else None,
            "mean_batch": float(inf["batch_size"].mean()) if inf.height else 0.0,
            "exec_prediction_error_ms_p50": q(err, 0.5), "exec_prediction_error_ms_p99": q(err, 0.99),
            "exec_prediction_error_rel_p99": q(rel, 0.99),
            "completion_error_ms_p50": q(comp, 0.5), "completion_error_ms_p99": q(comp, 0.99),
            "failed_actions": int((acts["status"] != 0).sum())}


def make_worker(device: str, mode: str, cfg, cb, clock):
    """The worker for one run: the isolated executor process (mode "process") or the in-process worker."""
    if mode == "process":
        from workbench.worker.process import ProcessWorker
        return ProcessWorker(device, cfg, cb, num_gpus=1)   # child times: monotonic_ns, RealClock's clock too
    if device == "cpu":
        from workbench.worker.cpu import CPUWorker
        return CPUWorker(cfg, cb, clock=clock)
    from workbench.worker.cuda import CUDAWorker
    return CUDAWorker(cfg, cb, num_gpus=1, clock=clock)


def run_real(path: Path, device: str, mode: str, copies: int, rate: float, seconds: float, slo_ms: float,
             policy: str, seed: int, telemetry_dir: str | None = None, condition: str = "idle") -> dict:
    from bench.isolation import SessionLoad
    from workbench.clock import RealClock
    from workbench.controller import Controller
    from workbench.telemetry.recorder import Recorder
    from workbench.worker.config import WorkerConfig
    from workbench.workload import Poisson
    clock, rec = RealClock(), Recorder()
    ctl = Controller(clock, policy=policy, recorder=rec)
    try:
        cfg = WorkerConfig.load(None, **CFG[device])
        ctl.add_worker(lambda cb: make_worker(device, mode, cfg, cb, clock))
        ids = ctl.load_model(str(path), copies)
        ctl.wait_ready(600)
        wl = Poisson(zipf_rates(ids, rate, 1.0, seed), slo_ms=slo_ms, seed=seed)
        with SessionLoad(condition):
            wl.start(ctl, clock, duration_s=seconds)
            end = time.monotonic() + seconds + slo_ms / 1e3 + 5
            while time.monotonic() < end and (wl.next_arrival_pending() or wl.completed < wl.submitted):
                time.sleep(0.1)
        d = summarise(rec, seconds)
        d["unanswered"] = wl.submitted - wl.completed
        if telemetry_dir:
            rec.write(Path(telemetry_dir) / f"{policy}_{device}_{mode}" + ("" if condition == "idle" else
                                                                            f"_{condition.replace('+', '_')}"))
        return d
    finally:
        ctl.close()
        clock.close()


def run_virtual(model: str, copies: int, rate: float, seconds: float, slo_ms: float, policy: str, seed: int) -> dict:
    from workbench.controller import simulate
    from workbench.telemetry.recorder import Recorder
    from workbench.workload import Poisson
    rec = Recorder()
    simulate({model: copies}, policy=policy, duration_s=seconds, seed=seed, recorder=rec,
             workload=lambda ids: Poisson(zipf_rates(ids, rate, 1.0, seed), slo_ms=slo_ms, seed=seed))
    return summarise(rec, seconds)


def cpu_artifact(model: str) -> Path:
    """The model compiled for the CPU here (cached under .gpu/worker, as bench/worker_artifacts builds it)."""
    from bench.worker_artifacts import build
    from bench.worker_common import ARTIFACTS, artifact
    path = artifact(f"{model}_cpu", ARTIFACTS)
    return path if path is not None else build(model, "cpu", ARTIFACTS, True)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a quick local check with the CPU worker (defaults: mlp, 4 copies, 100 r/s, 5 s)")
    ap.add_argument("--model", default=None, help="default resnet50 (cuda), mlp (cpu)")
    ap.add_argument("--copies", type=int, default=None, help="default 20 (cuda), 4 (cpu)")
    ap.add_argument("--rate", type=float, default=None, help="default 400 (cuda), 100 (cpu) r/s")
    ap.add_argument("--seconds", type=float, default=None, help="default 30 (cuda), 5 (cpu)")
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--policies", default="clockwork,triton,ray")
    ap.add_argument("--modes", default="process",
                    help="worker modes, comma-separated, each run in turn: process (isolated, the default), "
                         "inprocess (for comparison); e.g. process,inprocess")
    ap.add_argument("--no-emulated", action="store_true", help="skip the virtual-time run on the emulated H200")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in this process, the session's (default: Python's 5 ms)")
    ap.add_argument("--name", default=None, help="results file name (default controller_gpu / controller_gpu_cpu)")
    ap.add_argument("--conditions", default="idle",
                    help="session load during each real run, comma-separated: idle, thread, thread+pump")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--telemetry-dir", default=None,
                    help="also write each real run's telemetry (requests/actions Parquet) under DIR/<policy>_<device>_<mode>")
    a = ap.parse_args(argv)
    cpu = a.device == "cpu"
    if a.switch_interval:
        import sys
        sys.setswitchinterval(a.switch_interval)
    a.model = a.model or ("mlp" if cpu else "resnet50")
    a.copies = a.copies or (4 if cpu else 20)
    a.rate = a.rate or (100.0 if cpu else 400.0)
    a.seconds = a.seconds or (5.0 if cpu else 30.0)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes {a.modes!r}: use a comma-separated list of {', '.join(MODES)}")
    path = cpu_artifact(a.model) if cpu else find_artifact(f"{a.model}_cuda")
    # The controller's estimates start from the artifact's measurements on this device (a Session profiles an
    # artifact that has none; so does this bench). Without them every exec is predicted to take 0 ns.
    from workbench.worker.profiling import ensure_measurements
    ensure_measurements(path, "cpu" if cpu else "cuda:0")
    real = "CPU" if cpu else "H200"
    conditions = [c for c in a.conditions.split(",") if c]
    bad = [c for c in conditions if c not in ("idle", "thread", "thread+pump")]
    if bad or not conditions:
        raise SystemExit(f"--conditions {a.conditions!r}: use a comma-separated list of idle, thread, thread+pump")
    runs = [(f"{real} {mode}" + ("" if cond == "idle" else f", session busy ({cond})"),
             (lambda mode=mode, cond=cond, policy=None: run_real(
                 path, a.device, mode, a.copies, a.rate, a.seconds, a.slo_ms, policy, a.seed, a.telemetry_dir, cond)))
            for mode in modes for cond in conditions]
    if not cpu and not a.no_emulated:
        # the same artifact emulated: its sizes, and the durations just measured here
        runs.append(("emulated", lambda policy=None: run_virtual(str(path), a.copies, a.rate, a.seconds, a.slo_ms,
                                                                 policy, a.seed)))
    rows = []
    for policy in a.policies.split(","):
        for where, fn in runs:
            d = fn(policy=policy)
            d.update({"policy": policy, "where": where})
            rows.append(d)
            print(policy, where, d["statuses"], f"goodput {d['goodput']:.1f}",
                  f"exec pred. error ms p50 {d['exec_prediction_error_ms_p50']} p99 {d['exec_prediction_error_ms_p99']}",
                  flush=True)
    f = (lambda v: "-" if v is None else f"{v:.3f}")
    pc = (lambda v: "-" if v is None else f"{v:.2%}")
    md = ["| policy | where | requests | success | goodput r/s | SLO attainment | p99 latency ms | mean batch | "
          "exec pred. error ms p50 / p99 | exec pred. error p99, of the exec | completion error ms p50 / p99 | "
          "failed actions |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in rows:
        md.append(f"| {d['policy']} | {d['where']} | {d['requests']:,} | {d['statuses'].get('success', 0):,} | "
                  f"{d['goodput']:.1f} | {d['slo_attainment']:.4f} | {f(d['p99_latency_ms'])} | {d['mean_batch']:.2f} | "
                  f"{f(d['exec_prediction_error_ms_p50'])} / {f(d['exec_prediction_error_ms_p99'])} | "
                  f"{pc(d['exec_prediction_error_rel_p99'])} | {f(d['completion_error_ms_p50'])} / "
                  f"{f(d['completion_error_ms_p99'])} | {d['failed_actions']} |")
    md += ["", f"{a.copies} copies of {a.model} on one {'CPU device' if cpu else 'GPU'}, Poisson {a.rate:g} r/s with "
           f"Zipf(1) popularity for {a.seconds:g} s, SLO {a.slo_ms:g} ms, seed {a.seed}. '{real} process' runs the "
           f"controller in real time against the isolated worker process (ProcessWorker, "
           f"{'CPU' if cpu else 'CUDA'}); '{real} inprocess' against the {'CPU' if cpu else 'CUDA'} worker in the "
           f"controller's process (sharing its interpreter lock); 'emulated' runs the same arrivals in virtual time "
           f"against the emulated worker timed by the same artifact's measurements (profiled on this device first "
           f"when it has none). Prediction error = |measured - predicted| exec duration; "
           f"completion error = |measured end - planned end| (Clockwork Fig. 10's two measures). Session load: "
           f"{a.conditions} (see the module's docstring); the session's switch interval "
           f"{(a.switch_interval or 0.005) * 1e3:g} ms."]
    write(a.name or ("controller_gpu_cpu" if cpu else "controller_gpu"), {"args": vars(a), "rows": rows}, md)


if __name__ == "__main__":
    main()
