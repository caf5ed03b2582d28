"""Simulation speed: virtual seconds per wall second for an Azure-style trace over 4,000 instances on 6
emulated H200s (Clockwork §6.5's set-up: 8 hours of the Azure Functions trace, 100 ms SLO).

    python -m bench.controller_simspeed [--hours 8] [--rate 500] [--trace DIR] [--functions 20000]
                                        [--breakdown-hours 0.5] [--interpreted]

The trace: the real Azure Functions 2019 files if `--trace DIR` holds them, else a synthetic day in the same
format (`workbench.workload.azure_synth`: heavy-tailed per-function rates, diurnal cycle, bursty minutes;
not real data) with `--functions` functions, ~5 per instance as in Clockwork. It is replayed with
`workbench.workload.AzureReplay` (Clockwork's function -> instance mapping, Poisson spread inside each minute),
scaled so that the mean rate over the replayed hours is `--rate` requests/s.

The main run is not instrumented (its speed is the figure). A second, shorter run over the first
`--breakdown-hours` of the same trace measures where the time goes (`Breakdown`: exclusive time of the
workload, the controller, the emulated workers and the clock), and those shares split the main run's CPU time
per request. Writes bench/results/controller_simspeed.json and .md; with `--interpreted` (the core run from its
.py sources where the compiled build is present, to compare), controller_simspeed_interpreted.json and .md."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.controller_common import MIX_4000, Breakdown, core_description, load_average, select_core
from bench.worker_common import write

GOAL = 100.0       # virtual seconds per wall second (issue 4)


def replay(trace, minutes: int, rate: float, a, on_progress=None):
    from workbench.controller.simulation import simulate
    from workbench.workload.azure import AzureReplay
    total = float(trace.counts(a.start_minute, minutes).sum())
    scale = rate * minutes * 60 / total
    res = simulate(MIX_4000, num_gpus=1, workers=6, policy=a.policy, duration_s=minutes * 60, seed=a.seed,
                   workload=lambda ids: AzureReplay(trace, ids, scale=scale, slo_ms=100, seed=a.seed,
                                                    start_minute=a.start_minute, minutes=minutes),
                   on_progress=on_progress, progress_every_s=60)
    return res, scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=500.0, help="mean request rate over the replay (r/s)")
    ap.add_argument("--trace", default=None, help="directory with invocations_per_function_md.anon.dNN.csv")
    ap.add_argument("--functions", type=int, default=20000, help="functions in the synthetic trace")
    ap.add_argument("--start-minute", type=int, default=0)
    ap.add_argument("--breakdown-hours", type=float, default=0.5,
                    help="hours of the trace replayed again, instrumented, for the per-component split (0: skip)")
    ap.add_argument("--policy", default="clockwork")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interpreted", action="store_true",
                    help="run the simulation core from its .py sources even where the compiled build is present")
    a = ap.parse_args()
    select_core(a.interpreted)

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
        t_report = [time.perf_counter()]

        def progress(virtual_s: float, ctl) -> None:
            now = time.perf_counter()
            if now - t_report[0] > 30:
                t_report[0] = now
                s = ctl.stats
                print(f"  {virtual_s / 3600:5.2f} h simulated, {s.get('admitted', 0):,} requests, "
                      f"{s.get('success', 0):,} ok", file=sys.stderr, flush=True)

        res, scale = replay(trace, minutes, a.rate, a, progress)
        split: dict = {}
        if a.breakdown_hours > 0:
            b_minutes = max(1, int(round(a.breakdown_hours * 60)))
            bd = Breakdown()
            with bd.installed():
                b_res, _ = replay(trace, b_minutes, a.rate, a)
            split = {"hours": b_minutes / 60, "requests": b_res.submitted, "shares": bd.shares(),
                     "calls_per_request": {k: v / max(b_res.submitted, 1) for k, v in bd.calls.items()},
                     "measuring_cost_us_per_call": bd.overhead * 1e6}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    d = res.to_dict()
    us_per_req = res.cpu_s / max(res.submitted, 1) * 1e6
    core = core_description()
    d.update({"hours": a.hours, "target_rate": a.rate, "core": core, "scale": scale, "synthetic_trace": synthetic,
              "functions": trace.num_functions, "rate": res.submitted / res.virtual_s,
              "virtual_per_cpu_s": res.virtual_s / res.cpu_s, "cpu_us_per_request": us_per_req,
              "events_per_request": res.events / max(res.submitted, 1), "breakdown": split,
              "load_average": load_average()})
    if split:
        d["component_us_per_request"] = {k: f * us_per_req for k, f in split["shares"].items()}
    st = d["statuses"]
    d["goal_speed"] = GOAL
    d["goal_met"] = res.speed >= GOAL
    md = ["| hours | requests | mean rate r/s | success | dropped | goodput r/s | wall s | CPU s | virtual/wall | "
          "virtual/CPU-s | CPU us/request |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
          f"| {a.hours:g} | {res.submitted:,} | {d['rate']:,.0f} | {st['success']:,} | {st['dropped']:,} | "
          f"{res.goodput:,.0f} | {res.wall_s:,.1f} | {res.cpu_s:,.1f} | {res.speed:.1f}x | "
          f"{d['virtual_per_cpu_s']:.1f}x | {us_per_req:.1f} |", "",
          f"**Goal (virtual/wall >= {GOAL:g}x): {'met' if d['goal_met'] else 'NOT met'}** ({res.speed:.1f}x wall, "
          f"{d['virtual_per_cpu_s']:.1f}x per CPU second; {GOAL:g}x at {d['rate']:,.0f} r/s needs "
          f"{1e6 / GOAL / max(d['rate'], 1e-9):.1f} us of CPU per request, this run took {us_per_req:.1f}).", ""]
    if split:
        comp = d["component_us_per_request"]
        md += ["Where the time goes (CPU us per request; shares measured over the first "
               f"{split['hours']:g} h of the same trace, replayed again with each component's entry points timed):",
               "", "| " + " | ".join(comp) + " | total |", "| " + " | ".join("---" for _ in comp) + " | --- |",
               "| " + " | ".join(f"{v:.1f} ({split['shares'][k]:.0%})" for k, v in comp.items())
               + f" | {us_per_req:.1f} |", ""]
    md += [f"Policy {a.policy}; 4,000 instances ({', '.join(f'{v} {k}' for k, v in MIX_4000.items())}) on 6 emulated "
           f"H200s (6 workers x 1 GPU, 21.5 GiB weights cache each); simulation core {core}; "
           + (f"synthetic Azure-format trace ({trace.num_functions:,} functions with invocations, "
              f"workbench.workload.azure_synth, seed {a.seed}; not real data)" if synthetic else f"trace {trace_dir}")
           + f", minutes {a.start_minute}..{a.start_minute + minutes} replayed at scale {scale:.3g} (mean "
           f"{d['rate']:,.0f} r/s), 100 ms SLO; {d['events_per_request']:.2f} clock events per request. Goal: "
           f"virtual/wall >= 100x. One process, one thread; load average {d['load_average']:.1f} on this 2-core "
           f"machine shared with other jobs (virtual/CPU-s is the fair figure). 'controller': its entry points "
           f"(scheduling, loads, bookkeeping); 'worker': the emulated workers' actions and clock events; "
           f"'workload': trace replay and completion callbacks; 'clock and driver': the event loop and heap."]
    write("controller_simspeed" + ("_interpreted" if a.interpreted else ""), d, md)


if __name__ == "__main__":
    main()
