"""The controller at small scale on the real H200, side by side with the same run in virtual time on the
emulated H200 (profile data/profiles/h200.json): SLO attainment, goodput and prediction errors per policy.

    python -m bench.controller_gpu [--seconds 30] [--rate 400] [--copies 20] [--slo-ms 50]
                                   [--policies clockwork,triton,ray] [--model resnet50]

Needs the GPU machine and the CUDA artifacts of `python -m bench.build_gpu_artifacts` (.gpu/artifacts/<model>_cuda
or $WORKBENCH_GPU_ARTIFACTS). Each policy: `--copies` instances of the model on one GPU, Poisson arrivals with
Zipf(1) popularity at `--rate` r/s for `--seconds`, SLO `--slo-ms`; first on the GPU in real time (RealClock,
CUDAWorker), then in virtual time with the emulated worker (same seed, same arrivals). Writes
bench/results/controller_gpu.json and .md."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.controller_common import zipf_rates
from bench.worker_common import write

ROOT = Path(__file__).resolve().parents[1]
MS = 1_000_000


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
    comp = ((inf["measured_end"] - inf["planned_end"]).abs() / 1e6) if inf.height else None
    q = (lambda s, p: float(s.quantile(p)) if s is not None and len(s) else None)
    return {"requests": n, "statuses": dict(reqs.group_by("status").len().iter_rows()),
            "goodput": ok.height / seconds, "slo_attainment": ok.height / n if n else 0.0,
            "p99_latency_ms": q(ok["latency"] / 1e6, 0.99) if ok.height else None,
            "mean_batch": float(inf["batch_size"].mean()) if inf.height else 0.0,
            "exec_prediction_error_ms_p50": q(err, 0.5), "exec_prediction_error_ms_p99": q(err, 0.99),
            "completion_error_ms_p50": q(comp, 0.5), "completion_error_ms_p99": q(comp, 0.99),
            "failed_actions": int((acts["status"] != 0).sum())}


def run_gpu(path: Path, copies: int, rate: float, seconds: float, slo_ms: float, policy: str, seed: int) -> dict:
    from workbench.clock import RealClock
    from workbench.controller import Controller
    from workbench.telemetry.recorder import Recorder
    from workbench.worker.config import WorkerConfig
    from workbench.worker.cuda import CUDAWorker
    from workbench.workload import Poisson
    clock, rec = RealClock(), Recorder()
    ctl = Controller(clock, policy=policy, recorder=rec)
    try:
        cfg = WorkerConfig.load(None, weights_cache_size="16 GiB", io_pool_size="512 MiB",
                                workspace_pool_size="4 GiB", host_io_pool_size="512 MiB")
        ctl.add_worker(lambda cb: CUDAWorker(cfg, cb, num_gpus=1, clock=clock))
        ids = ctl.load_model(str(path), copies)
        ctl.wait_ready(600)
        wl = Poisson(zipf_rates(ids, rate, 1.0, seed), slo_ms=slo_ms, seed=seed)
        wl.start(ctl, clock, duration_s=seconds)
        end = time.monotonic() + seconds + slo_ms / 1e3 + 5
        while time.monotonic() < end and (wl.next_arrival_pending() or wl.completed < wl.submitted):
            time.sleep(0.1)
        d = summarise(rec, seconds)
        d["unanswered"] = wl.submitted - wl.completed
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--rate", type=float, default=400.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--policies", default="clockwork,triton,ray")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    path = find_artifact(f"{a.model}_cuda")
    rows = []
    for policy in a.policies.split(","):
        for where, fn in (("H200", lambda: run_gpu(path, a.copies, a.rate, a.seconds, a.slo_ms, policy, a.seed)),
                          ("emulated", lambda: run_virtual(a.model, a.copies, a.rate, a.seconds, a.slo_ms, policy,
                                                           a.seed))):
            d = fn()
            d.update({"policy": policy, "where": where})
            rows.append(d)
            print(policy, where, d["statuses"], f"goodput {d['goodput']:.1f}", flush=True)
    f = (lambda v: "-" if v is None else f"{v:.3f}")
    md = ["| policy | where | requests | success | goodput r/s | SLO attainment | p99 latency ms | mean batch | "
          "exec pred. error ms p50 / p99 | completion error ms p50 / p99 | failed actions |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in rows:
        md.append(f"| {d['policy']} | {d['where']} | {d['requests']:,} | {d['statuses'].get('success', 0):,} | "
                  f"{d['goodput']:.1f} | {d['slo_attainment']:.4f} | {f(d['p99_latency_ms'])} | {d['mean_batch']:.2f} | "
                  f"{f(d['exec_prediction_error_ms_p50'])} / {f(d['exec_prediction_error_ms_p99'])} | "
                  f"{f(d['completion_error_ms_p50'])} / {f(d['completion_error_ms_p99'])} | {d['failed_actions']} |")
    md += ["", f"{a.copies} copies of {a.model} on one GPU, Poisson {a.rate:g} r/s with Zipf(1) popularity for "
           f"{a.seconds:g} s, SLO {a.slo_ms:g} ms, seed {a.seed}. 'H200' runs the controller in real time against the "
           f"CUDA worker; 'emulated' runs the same arrivals in virtual time against the emulated worker (profile "
           f"h200). Prediction error = |measured - predicted| exec duration; completion error = |measured end - "
           f"planned end| (Clockwork Fig. 10's two measures)."]
    write("controller_gpu", {"args": vars(a), "rows": rows}, md)


if __name__ == "__main__":
    main()
