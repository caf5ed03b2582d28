"""Scheduling throughput of the controller in virtual time: 4,000 model instances on 6 emulated H200s.

    python -m bench.controller_throughput [--rates 1000,3000,6000] [--seconds 20] [--policy clockwork]

Each run is a Poisson open loop over the 4,000 instances with Zipf(1) popularity and a 100 ms SLO, simulated
on a VirtualClock with 6 emulated workers (1 GPU each, profile h200, Clockwork's 21.5 GiB weights cache).
Reported per total rate: requests per wall second and per CPU second of the whole simulation (controller +
emulated workers + clock + workload), and per CPU second spent inside the controller itself (`CpuSplit`:
its entry points, minus the worker submits it makes), plus mean batch size and outcomes. Writes
bench/results/controller_throughput.json and .md."""
from __future__ import annotations

import argparse

from bench.controller_common import MIX_4000, CpuSplit, load_average, zipf_rates
from bench.worker_common import write


def run(rate: float, seconds: float, policy: str, seed: int) -> dict:
    from workbench.controller.simulation import simulate
    from workbench.workload.poisson import Poisson
    split = CpuSplit()
    with split.installed():
        res = simulate(MIX_4000, num_gpus=1, workers=6, policy=policy, duration_s=seconds, seed=seed,
                       workload=lambda ids: Poisson(zipf_rates(ids, rate, 1.0, seed), slo_ms=100, seed=seed))
    s = res.summary
    batches = s.get(f"{res.policy}_batches", 0)
    d = res.to_dict()
    d.update({"rate": rate, "controller_cpu_s": split.controller_own,
              "requests_per_cpu_s": res.submitted / res.cpu_s,
              "controller_requests_per_cpu_s": res.submitted / max(split.controller_own, 1e-9),
              "mean_batch": res.submitted / batches if batches else 0.0, "load_average": load_average()})
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1000,3000,6000", help="total request rates (r/s), comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="virtual seconds of arrivals per rate")
    ap.add_argument("--policy", default="clockwork")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rows = [run(float(r), a.seconds, a.policy, a.seed) for r in a.rates.split(",")]
    md = ["| rate r/s | requests | success | dropped | mean batch | wall s | CPU s | req/s wall | req/CPU-s | "
          "controller CPU s | controller req/CPU-s | virtual/wall |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in rows:
        st = d["statuses"]
        md.append(f"| {d['rate']:,.0f} | {d['submitted']:,} | {st['success']:,} | {st['dropped']:,} | "
                  f"{d['mean_batch']:.2f} | {d['wall_s']:.2f} | {d['cpu_s']:.2f} | {d['requests_per_wall_s']:,.0f} | "
                  f"{d['requests_per_cpu_s']:,.0f} | {d['controller_cpu_s']:.2f} | "
                  f"{d['controller_requests_per_cpu_s']:,.0f} | {d['speed']:.1f}x |")
    loads = ", ".join(f"{d['load_average']:.1f}" for d in rows)
    md += ["", f"Policy {a.policy}; 4,000 instances ({', '.join(f'{v} {k}' for k, v in MIX_4000.items())}) on 6 "
           f"emulated H200s (6 workers x 1 GPU, 21.5 GiB weights cache each); Poisson arrivals, Zipf(1) popularity, "
           f"100 ms SLO, {a.seconds:g} virtual s per rate. One process, one thread. 'req/CPU-s' is the whole "
           f"simulation (controller + emulated workers + clock + workload); 'controller req/CPU-s' counts only the "
           f"CPU time inside the controller (the scheduling throughput; goal >= 50,000). Load average during the "
           f"runs: {loads} (2-core machine shared with other jobs: "
           f"wall figures are pessimistic, CPU figures are the fair ones)."]
    write("controller_throughput", {"policy": a.policy, "seconds": a.seconds, "runs": rows}, md)


if __name__ == "__main__":
    main()
