"""Simulation speed: virtual seconds per wall second for an Azure-style trace over 4,000 instances on 6
emulated H200s (Clockwork §6.5's set-up: 8 hours of the Azure Functions trace, 100 ms SLO).

    python -m bench.controller_simspeed [--hours 8] [--rate 500] [--trace DIR] [--functions 20000]

The trace: the real Azure Functions 2019 files if `--trace DIR` holds them, else a synthetic day in the same
format (`workbench.workload.azure_synth`: heavy-tailed per-function rates, diurnal cycle, bursty minutes;
not real data) with `--functions` functions, ~5 per instance as in Clockwork. It is replayed with
`workbench.workload.AzureReplay` (Clockwork's function -> instance mapping, Poisson spread inside each minute),
scaled so that the mean rate over the replayed hours is `--rate` requests/s. Writes
bench/results/controller_simspeed.json and .md."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.controller_common import MIX_4000, CpuSplit, load_average
from bench.worker_common import write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=500.0, help="mean request rate over the replay (r/s)")
    ap.add_argument("--trace", default=None, help="directory with invocations_per_function_md.anon.dNN.csv")
    ap.add_argument("--functions", type=int, default=20000, help="functions in the synthetic trace")
    ap.add_argument("--start-minute", type=int, default=0)
    ap.add_argument("--policy", default="clockwork")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from workbench.controller.simulation import simulate
    from workbench.workload.azure import AzureReplay
    from workbench.workload.azure_synth import write_synthetic_trace
    from workbench.workload.azure_trace import AzureTrace

    tmp = None
    if a.trace is None:
        tmp = Path(tempfile.mkdtemp(prefix="azure-synthetic-"))
        write_synthetic_trace(tmp, n_functions=a.functions, days=1, seed=a.seed)
        trace_dir, synthetic = tmp, True
    else:
        trace_dir, synthetic = Path(a.trace), False
    try:
        trace = AzureTrace.open(trace_dir)
        minutes = int(round(a.hours * 60))
        total = float(trace.counts(a.start_minute, minutes).sum())
        scale = a.rate * minutes * 60 / total
        t_report = [time.perf_counter()]

        def progress(virtual_s: float, ctl) -> None:
            now = time.perf_counter()
            if now - t_report[0] > 30:
                t_report[0] = now
                s = ctl.stats
                print(f"  {virtual_s / 3600:5.2f} h simulated, {s.get('admitted', 0):,} requests, "
                      f"{s.get('success', 0):,} ok", file=sys.stderr, flush=True)

        split = CpuSplit()
        with split.installed():
            res = simulate(MIX_4000, num_gpus=1, workers=6, policy=a.policy, duration_s=minutes * 60, seed=a.seed,
                           workload=lambda ids: AzureReplay(trace, ids, scale=scale, slo_ms=100, seed=a.seed,
                                                            start_minute=a.start_minute, minutes=minutes),
                           on_progress=progress, progress_every_s=60)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    d = res.to_dict()
    d.update({"hours": a.hours, "target_rate": a.rate, "scale": scale, "synthetic_trace": synthetic,
              "functions": trace.num_functions, "rate": res.submitted / res.virtual_s,
              "virtual_per_cpu_s": res.virtual_s / res.cpu_s, "controller_cpu_s": split.controller_own,
              "controller_requests_per_cpu_s": res.submitted / max(split.controller_own, 1e-9),
              "load_average": load_average()})
    st = d["statuses"]
    md = ["| hours | requests | mean rate r/s | success | dropped | goodput r/s | wall s | CPU s | virtual/wall | "
          "virtual/CPU-s | controller share of CPU |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
          f"| {a.hours:g} | {res.submitted:,} | {d['rate']:,.0f} | {st['success']:,} | {st['dropped']:,} | "
          f"{res.goodput:,.0f} | {res.wall_s:,.1f} | {res.cpu_s:,.1f} | {res.speed:.1f}x | "
          f"{d['virtual_per_cpu_s']:.1f}x | {split.controller_own / res.cpu_s:.0%} |",
          "",
          f"Policy {a.policy}; 4,000 instances ({', '.join(f'{v} {k}' for k, v in MIX_4000.items())}) on 6 emulated "
          f"H200s (6 workers x 1 GPU, 21.5 GiB weights cache each); "
          + (f"synthetic Azure-format trace ({trace.num_functions:,} functions with invocations, "
             f"workbench.workload.azure_synth, seed {a.seed}; not real data)" if synthetic else f"trace {trace_dir}")
          + f", minutes {a.start_minute}..{a.start_minute + minutes} replayed at scale {scale:.3g} (mean "
          f"{d['rate']:,.0f} r/s), 100 ms SLO. Goal: virtual/wall >= 100x. One process, one thread; load average "
          f"{d['load_average']:.1f} on this 2-core machine shared with other jobs (virtual/CPU-s is the fair "
          f"figure). The controller's own CPU time: {split.controller_own:,.1f} s "
          f"({d['controller_requests_per_cpu_s']:,.0f} requests per controller CPU-second); the rest is the "
          f"emulated workers, the clock and the trace replay."]
    write("controller_simspeed", d, md)


if __name__ == "__main__":
    main()
