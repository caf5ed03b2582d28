"""The same action sequence on the real CUDA worker and on the emulated worker, with a profile measured in the
same run: how well does emulation reproduce the GPU?

    python -m bench.worker_emulated_vs_real [--models resnet50_cuda,mlp_cuda] [--rounds 5] [--reps 20]

1. Real: per model, `--rounds` x [LoadWeights, Infer at every compiled batch size x --reps, EvictWeights],
   one action at a time; then a pipelined burst: 60 Infers submitted at once with earliest = t0 + i * period.
2. A profile is built from those measurements (exec samples per batch size, load time, copy rates, SM clock)
   and written to bench/results/worker_profile_measured.json (the lead may copy it over data/profiles/h200.json).
3. Emulated (VirtualClock, that profile): the identical sequence. Compared: statuses (must be equal), p50/p99
   of exec, load and input copy per model and batch size, and in the burst the exec begin/end of each action
   relative to t0 (the worker's dispatch delay is what emulation does not model).
4. The shipped data/profiles/h200.json (seeded from h200-baseline.md) against the measured p50s.
Writes bench/results/worker_emulated_vs_real.json and .md."""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

from bench.worker_common import ARTIFACTS, OUT, artifact, pct, write
from workbench.clock import VirtualClock
from workbench.contract import EvictWeights, Infer, LoadModelFromDisk, LoadWeights
from workbench.worker.config import WorkerConfig
from workbench.worker.emulated import EmulatedWorker
from workbench.worker.profile import ExecDist, Profile, ProfileModel

CFG = dict(weights_cache_size="4 GiB", io_pool_size="256 MiB", workspace_pool_size="1 GiB", host_io_pool_size="256 MiB")
MS = 1_000_000


def sequence(models: dict[str, Path], arts: dict, rounds: int, reps: int) -> list:
    """(phase, action) pairs; model k has id 100*k."""
    ids = iter(range(1, 10**9))
    seq = []
    for k, (name, path) in enumerate(models.items()):
        mid = 100 * k
        seq.append(("setup", LoadModelFromDisk(id=next(ids), model_id=mid, path=str(path))))
        for _ in range(rounds):
            seq.append(("load", LoadWeights(id=next(ids), model_id=mid, gpu=0)))
            for b in arts[name].batch_sizes:
                for _ in range(reps):
                    seq.append(("infer", Infer(id=next(ids), model_id=mid, gpu=0, batch_size=b)))
            seq.append(("evict", EvictWeights(id=next(ids), model_id=mid, gpu=0)))
    return seq


def burst(mid: int, t0: int, period: int, n: int = 60, start_id: int = 10**8) -> list:
    return [Infer(id=start_id + i, model_id=mid, gpu=0, batch_size=1, earliest=t0 + i * period,
                  latest=t0 + i * period + 50 * MS) for i in range(n)]


class Sync:
    def __init__(self):
        self.cv, self.box = threading.Condition(), {}

    def __call__(self, r):
        with self.cv:
            self.box[r.id] = r
            self.cv.notify_all()

    def wait(self, ids, timeout=300):
        with self.cv:
            assert self.cv.wait_for(lambda: all(i in self.box for i in ids), timeout)
            return [self.box.pop(i) for i in ids]


def run_real(seq, burst_model: int, dry_run: bool = False):
    """Runs the sequence, then a burst paced at 1.2x the measured b1 exec of `burst_model`; returns the period.
    dry_run: an EmulatedWorker with the shipped profile in real time stands in for the GPU (checks this script)."""
    s = Sync()
    if dry_run:
        from workbench.clock import RealClock
        clock = RealClock()
        w = EmulatedWorker(clock, 1, "h200", WorkerConfig.load(None, **CFG), s, seed=1)
    else:
        from workbench.worker.cuda import CUDAWorker
        w = CUDAWorker(WorkerConfig.load(None, **CFG), s, num_gpus=1)
    try:
        out = []
        for _, a in seq:
            w.submit(a)
            out.append(s.wait([a.id])[0])
        b1 = [r.exec.duration for (ph, x), r in zip(seq, out)
              if ph == "infer" and x.model_id == burst_model and x.batch_size == 1 and r.ok]
        period = int(pct(b1, 0.5) * 1.2)
        w.submit(LoadWeights(id=10**7, model_id=burst_model, gpu=0))
        assert s.wait([10**7])[0].ok
        t0 = w.clock.now() + 20 * MS
        acts = burst(burst_model, t0, period)
        for a in acts:
            w.submit(a)
        br = s.wait([a.id for a in acts])
        return out, br, t0, period
    finally:
        w.close()
        if dry_run:
            clock.close()


def run_emulated(seq, profile: Profile, burst_model: int, period: int):
    clock = VirtualClock()
    box = {}
    w = EmulatedWorker(clock, 1, profile, WorkerConfig.load(None, **CFG), lambda r: box.__setitem__(r.id, r), seed=0)
    out = []
    for _, a in seq:
        w.submit(a)
        clock.run()
        out.append(box.pop(a.id))
    w.submit(LoadWeights(id=10**7, model_id=burst_model, gpu=0))
    clock.run()
    t0 = clock.now() + 20 * MS
    acts = burst(burst_model, t0, period)
    for a in acts:
        w.submit(a)
    clock.run()
    return out, [box.pop(a.id) for a in acts], t0


def build_profile(seq, real, arts: dict, names: dict[int, str]) -> Profile:
    per: dict[str, dict] = {}
    clocks, rates, lat = [], [], []
    for (phase, a), r in zip(seq, real):
        if not r.ok or phase not in ("load", "infer"):
            continue
        name = names[a.model_id]
        d = per.setdefault(name, {"load": [], "exec": {}})
        if phase == "load":
            d["load"].append(r.timing.duration)
        else:
            d["exec"].setdefault(a.batch_size, []).append(r.exec.duration)
            clocks.append(r.gpu_clock)
            art = arts[name]
            nbytes = sum(s.nbytes for s in art.inputs) * a.batch_size
            lat.append((nbytes, r.copy_input.duration))
    models = {}
    for name, d in per.items():
        art = arts[name]
        from workbench.worker.base import used_bytes_per_run
        moved = sum(used_bytes_per_run(art).values())
        if d["load"]:
            rates.append(moved / pct(d["load"], 0.5) * 1e9)
        models[art.name] = ProfileModel(
            name=art.name, inputs=tuple(art.inputs), outputs=tuple(art.outputs), weights_bytes=art.weights_bytes,
            runs=list(art.runs), weights_load_ns=int(pct(d["load"], 0.5)) if d["load"] else 0,
            exec={b: ExecDist.fit(s) for b, s in d["exec"].items()},
            workspace_bytes={b: art.workspace_bytes(b) for b in art.batch_sizes},
            source=f"measured by bench.worker_emulated_vs_real from {art.path}")
    h2d = pct(rates, 0.5) if rates else 50e9
    latency = int(pct([max(0, dur - nb / h2d * 1e9) for nb, dur in lat], 0.5)) if lat else 10_000
    loads = [x for d in per.values() for x in d["load"]]
    sigma = 0.0
    if len(loads) > 2:
        import math
        sigma = math.log(pct(loads, 0.99) / pct(loads, 0.5)) / 2.326
    return Profile(device="measured by bench.worker_emulated_vs_real", source="same-run measurement",
                   sm_clock_mhz=int(pct(clocks, 0.5)) if clocks else 0, h2d_bytes_per_s=h2d, d2h_bytes_per_s=h2d,
                   copy_latency_ns=latency, page_size=next(iter(arts.values())).page_size, load_sigma=sigma,
                   models=models)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_emulated_vs_real", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50_cuda,mlp_cuda")
    p.add_argument("--artifacts", default=str(ARTIFACTS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--dry-run", action="store_true", help="no GPU: an emulated worker in real time plays the GPU")
    a = p.parse_args(argv)
    from workbench.models.artifact import Artifact
    models = {n: artifact(n, Path(a.artifacts)) for n in a.models.split(",")}
    models = {n: pth for n, pth in models.items() if pth is not None}
    if not models:
        print(f"no artifacts under {a.artifacts}: run python -m bench.worker_artifacts")
        return 2
    arts = {n: Artifact.open(pth) for n, pth in models.items()}
    names = {100 * k: n for k, n in enumerate(models)}
    seq = sequence(models, arts, a.rounds, a.reps)
    burst_model = 0
    real, real_burst, t0r, period = run_real(seq, burst_model, a.dry_run)
    prof = build_profile(seq, real, arts, names)
    out_dir = Path(a.out)
    out_name = "worker_emulated_vs_real_dry_run" if a.dry_run else "worker_emulated_vs_real"
    prof_path = out_dir / ("worker_profile_dry_run.json" if a.dry_run else "worker_profile_measured.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.save(prof_path)
    emu, emu_burst, t0e = run_emulated(seq, prof, burst_model, period)

    same_status = [x.status == y.status for x, y in zip(real, emu)]
    rows, md = [], ["| model | what | batch | real p50 / p99 (us) | emulated p50 / p99 (us) | emulated/real p50 | "
                    "shipped h200.json p50 (us) | shipped/real |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    shipped = Profile.load("h200")
    for mid, name in names.items():
        art = arts[name]
        groups = {("load", 0): lambda r: r.timing.duration}
        for b in art.batch_sizes:
            groups[("exec", b)] = lambda r: r.exec.duration
            groups[("copy_input", b)] = lambda r: r.copy_input.duration
        for (what, b), get in groups.items():
            phase = "load" if what == "load" else "infer"
            sel = [(r, e) for (ph, x), r, e in zip(seq, real, emu)
                   if ph == phase and x.model_id == mid and (b == 0 or x.batch_size == b) and r.ok and e.ok]
            rv, ev = [get(r) for r, _ in sel], [get(e) for _, e in sel]
            if not rv:
                continue
            sp = None
            if art.name in shipped.models:
                sm = shipped.models[art.name]
                sp = sm.weights_load_ns if what == "load" else (sm.exec[b].p50_ns if what == "exec" and b in sm.exec else None)
            row = {"model": name, "what": what, "batch": b, "real_p50_us": pct(rv, 0.5) / 1e3,
                   "real_p99_us": pct(rv, 0.99) / 1e3, "emu_p50_us": pct(ev, 0.5) / 1e3, "emu_p99_us": pct(ev, 0.99) / 1e3,
                   "shipped_p50_us": None if sp is None else sp / 1e3}
            rows.append(row)
            real50 = row["real_p50_us"]
            shipped_txt = "| |" if sp is None else f"| {sp / 1e3:.1f} | {sp / 1e3 / real50:.3f} |"
            md.append(f"| {name} | {what} | {b or ''} | {real50:.1f} / {row['real_p99_us']:.1f} | "
                      f"{row['emu_p50_us']:.1f} / {row['emu_p99_us']:.1f} | {row['emu_p50_us'] / real50:.3f} "
                      + shipped_txt)
    begin_err = [(r.exec.begin - t0r) - (e.exec.begin - t0e) for r, e in zip(real_burst, emu_burst) if r.ok and e.ok]
    end_err = [(r.exec.end - t0r) - (e.exec.end - t0e) for r, e in zip(real_burst, emu_burst) if r.ok and e.ok]
    burst_row = {"period_us": period / 1e3, "n": len(begin_err),
                 "real_ok": sum(r.ok for r in real_burst), "emu_ok": sum(e.ok for e in emu_burst),
                 "exec_begin_delay_real_minus_emu_us": {"p50": pct(begin_err, 0.5) / 1e3, "p99": pct(begin_err, 0.99) / 1e3},
                 "exec_end_real_minus_emu_us": {"p50": pct(end_err, 0.5) / 1e3, "p99": pct(end_err, 0.99) / 1e3}}
    md += ["", f"Statuses equal for {sum(same_status)} of {len(same_status)} actions. Measured profile: "
           f"{prof_path} (SM clock {prof.sm_clock_mhz} MHz, H2D "
           f"{prof.h2d_bytes_per_s / 1e9:.1f} GB/s, copy latency {prof.copy_latency_ns / 1e3:.1f} us).", "",
           f"Pipelined burst ({burst_row['n']} Infers b1 on {names[burst_model]}, one every {period / 1e3:.0f} us): "
           f"real minus emulated exec begin (relative to t0) p50 {burst_row['exec_begin_delay_real_minus_emu_us']['p50']:.1f} us, "
           f"p99 {burst_row['exec_begin_delay_real_minus_emu_us']['p99']:.1f} us; exec end p50 "
           f"{burst_row['exec_end_real_minus_emu_us']['p50']:.1f} us, p99 {burst_row['exec_end_real_minus_emu_us']['p99']:.1f} us."]
    write(out_name, {"rows": rows, "statuses_equal": sum(same_status), "actions": len(same_status),
                     "burst": burst_row, "args": vars(a)}, md, out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
