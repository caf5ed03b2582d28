"""Scheduling throughput of the controller in virtual time: 4,000 model instances on 6 emulated H200s.

    python -m bench.controller_throughput [--rates 1000,3000,6000] [--warmup 10] [--seconds 20] [--policy clockwork]
                                          [--interpreted]

Each run is a Poisson open loop over the 4,000 instances with Zipf(1) popularity and a 100 ms SLO, simulated
on a VirtualClock with 6 emulated workers (1 GPU each, profile h200, Clockwork's 21.5 GiB weights cache),
starting with every model cold. Reported per total rate, over the whole run (the cold start included) and over
the `--seconds` after a `--warmup` (steady state): requests per CPU second of the whole simulation
(controller + emulated workers + clock + workload) and per CPU second spent inside the controller itself
(`CpuSplit`: its entry points, minus the worker submits it makes; the scheduling throughput, goal >= 50,000),
plus mean batch size and outcomes. Writes bench/results/controller_throughput.json and .md; with
`--interpreted` (the core run from its .py sources where the compiled build is present, to compare),
controller_throughput_interpreted.json and .md."""
from __future__ import annotations

import argparse
import time

from bench.controller_common import MIX_4000, CpuSplit, core_description, load_average, select_core, zipf_rates
from bench.worker_common import write

NS = 1_000_000_000
GOAL = 50_000      # requests per controller CPU second (issue 4)


def run(rate: float, warmup: float, seconds: float, policy: str, seed: int) -> dict:
    from workbench.controller.simulation import simulate
    from workbench.workload.poisson import Poisson
    split = CpuSplit()
    mark: dict = {}

    def on_ready(ctl, clock) -> None:
        def steady() -> None:
            mark.update(admitted=ctl.stats["admitted"], cpu=time.process_time(), controller=split.controller_own,
                        batches=ctl.policy.summary().get(f"{ctl.policy.name}_batches", 0))
        clock.call_at(clock.now() + int(warmup * NS), steady)

    with split.installed():
        res = simulate(MIX_4000, num_gpus=1, workers=6, policy=policy, duration_s=warmup + seconds, seed=seed,
                       on_ready=on_ready,
                       workload=lambda ids: Poisson(zipf_rates(ids, rate, 1.0, seed), slo_ms=100, seed=seed))
        cpu_end, ctl_end = time.process_time(), split.controller_own
    s = res.summary
    batches = s.get(f"{res.policy}_batches", 0)
    d = res.to_dict()
    n_steady = res.submitted - mark["admitted"]
    ctl_steady = ctl_end - mark["controller"]
    cpu_steady = cpu_end - mark["cpu"]
    d.update({"rate": rate, "warmup_s": warmup, "measured_s": seconds, "controller_cpu_s": split.controller_own,
              "requests_per_cpu_s": res.submitted / res.cpu_s,
              "controller_requests_per_cpu_s": res.submitted / max(split.controller_own, 1e-9),
              "mean_batch": res.submitted / batches if batches else 0.0,
              "steady": {"requests": n_steady, "cpu_s": cpu_steady, "controller_cpu_s": ctl_steady,
                         "requests_per_cpu_s": n_steady / max(cpu_steady, 1e-9),
                         "controller_requests_per_cpu_s": n_steady / max(ctl_steady, 1e-9),
                         "controller_us_per_request": ctl_steady / max(n_steady, 1) * 1e6,
                         "total_us_per_request": cpu_steady / max(n_steady, 1) * 1e6,
                         "mean_batch": n_steady / max(batches - mark["batches"], 1)},
              "loads": s.get(f"{res.policy}_loads", 0), "evictions": s.get(f"{res.policy}_evictions", 0),
              "load_average": load_average()})
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1000,3000,6000", help="total request rates (r/s), comma-separated")
    ap.add_argument("--warmup", type=float, default=10.0, help="virtual seconds before the steady-state window")
    ap.add_argument("--seconds", type=float, default=20.0, help="virtual seconds measured after the warm-up")
    ap.add_argument("--policy", default="clockwork")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interpreted", action="store_true",
                    help="run the simulation core from its .py sources even where the compiled build is present")
    a = ap.parse_args()
    select_core(a.interpreted)
    rows = [run(float(r), a.warmup, a.seconds, a.policy, a.seed) for r in a.rates.split(",")]
    core = core_description()
    md = ["| rate r/s | requests | success | dropped | loads | mean batch | CPU s | req/CPU-s | controller CPU s | "
          "controller req/CPU-s | steady: total us/req | steady: controller us/req | steady: controller req/CPU-s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in rows:
        st, sd = d["statuses"], d["steady"]
        md.append(f"| {d['rate']:,.0f} | {d['submitted']:,} | {st['success']:,} | {st['dropped']:,} | {d['loads']:,} | "
                  f"{d['mean_batch']:.2f} | {d['cpu_s']:.2f} | {d['requests_per_cpu_s']:,.0f} | "
                  f"{d['controller_cpu_s']:.2f} | {d['controller_requests_per_cpu_s']:,.0f} | "
                  f"{sd['total_us_per_request']:.1f} | {sd['controller_us_per_request']:.1f} | "
                  f"{sd['controller_requests_per_cpu_s']:,.0f} |")
    loads = ", ".join(f"{d['load_average']:.1f}" for d in rows)
    best = max(d["steady"]["controller_requests_per_cpu_s"] for d in rows)
    met = best >= GOAL
    md += ["", f"**Goal (>= {GOAL:,} requests per controller CPU second, steady state): "
           f"{'met' if met else 'NOT met'}** (best {best:,.0f} req/CPU-s = "
           f"{1e6 / max(best, 1e-9):.1f} us/request; the goal needs {1e6 / GOAL:.0f} us/request).",
           "", f"Policy {a.policy}; 4,000 instances ({', '.join(f'{v} {k}' for k, v in MIX_4000.items())}) on 6 "
           f"emulated H200s (6 workers x 1 GPU, 21.5 GiB weights cache each, so models are swapped); simulation core "
           f"{core}; Poisson "
           f"arrivals, Zipf(1) popularity, 100 ms SLO, {a.warmup + a.seconds:g} virtual s per rate from a cold start "
           f"(every model unloaded). The first columns cover the whole run; 'steady' the last {a.seconds:g} s after a "
           f"{a.warmup:g} s warm-up. One process, one thread. 'req/CPU-s' is the whole simulation (controller + "
           f"emulated workers + clock + workload); 'controller req/CPU-s' counts only the CPU time inside the "
           f"controller's entry points, minus the worker submits it makes (the scheduling throughput; goal >= "
           f"50,000). Load average during the runs: {loads} (2-core machine shared with other jobs: CPU figures "
           f"vary by ~10% run to run)."]
    write("controller_throughput" + ("_interpreted" if a.interpreted else ""),
          {"policy": a.policy, "warmup_s": a.warmup, "seconds": a.seconds, "runs": rows, "core": core,
           "goal_requests_per_cpu_s": GOAL, "goal_met": met}, md)


if __name__ == "__main__":
    main()
