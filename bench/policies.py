"""SLO attainment and goodput: Clockwork vs the Triton-like and Ray-Serve-like baselines on the same workloads,
in virtual time on emulated H200s (same seeds, same arrivals for every policy).

    python -m bench.policies [--quick] [--only fig5,azure,bursty,zipf]

Workloads (Clockwork's experiments at the scale of this machine, clockwork.md §6.6):
- fig5:   15 ResNet-50 copies on 1 GPU, 16 closed-loop clients per copy (comparison_experiment2), one run per
          SLO in 10, 25, 50, 100, 250, 500 ms (Clockwork Fig. 5 compared Clipper and INFaaS the same way).
- bursty: 1 GPU, a minor model at 200 r/s plus 1,000 r/s spread over a set of major models that grows by
          10 every second (Fig. 6 "serve thousands?"), 100 ms SLO.
- azure:  4,000 instances on 6 GPUs, a synthetic Azure-format day (workbench.workload.azure_synth, 20,000
          functions, not real data), minutes 600-602 scaled to a mean of 6,000 r/s (enough to load the
          six GPUs), 100 ms SLO (Fig. 9's set-up, minutes instead of hours).
- zipf:   4,000 instances on 6 GPUs, Poisson 3,000 r/s with Zipf(1) popularity, 100 ms SLO.
Policies: clockwork (default batching "efficient"), clockwork-front (INFER4's batch bump from the front),
triton (dynamic batching, 1 ms max queue delay, LRU by bytes), ray (multiplexing, 2 ms batch wait,
max_models_per_replica = what fits in a GPU's weights cache if all were ResNet-50s, 196) and ray-default
(max_models_per_replica = 3, Ray's default). Goodput = successful requests (result by the deadline) per
second. Writes bench/results/policies.json and .md."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.controller_common import MIX_4000, zipf_rates
from bench.worker_common import OUT, write

POLICIES = {
    "clockwork": ("clockwork", {}),
    "clockwork-front": ("clockwork", {"batching": "front"}),
    "triton": ("triton", {"max_queue_delay": 1_000_000}),
    "ray": ("ray", {"max_models_per_replica": 196, "batch_wait_timeout": 2_000_000}),
    "ray-default": ("ray", {"max_models_per_replica": 3, "batch_wait_timeout": 2_000_000}),
}


def workloads(quick: bool) -> list[tuple[str, str, dict, int, int, float, object]]:
    """(workload, variant, models, workers, gpus per worker, seconds, factory(ids) -> Workload)."""
    from workbench.workload import AzureReplay, AzureTrace, Bursty, ClosedLoop, Poisson
    sec = 5.0 if quick else 20.0
    out = []
    for slo in (10, 25, 50, 100, 250, 500):
        out.append(("fig5", f"SLO {slo} ms", {"resnet50": 15}, 1, 1, sec,
                    lambda ids, slo=slo: ClosedLoop(ids, concurrency=16, slo_ms=slo, seed=1)))
    out.append(("bursty", "100 ms", {"resnet50": 601}, 1, 1, 20.0 if quick else 60.0,
                lambda ids: Bursty(ids[0], ids[1:], minor_rate=200, major_rate=1000, period_s=1.0,
                                   models_per_period=10, slo_ms=100, seed=1)))
    trace = AzureTrace.open(synthetic_trace())
    minutes = 1 if quick else 2
    scale = 6000 * minutes * 60 / float(trace.counts(600, minutes).sum())
    out.append(("azure", "100 ms", MIX_4000, 6, 1, minutes * 60.0,
                lambda ids: AzureReplay(trace, ids, scale=scale, slo_ms=100, seed=1, start_minute=600,
                                        minutes=minutes)))
    out.append(("zipf", "100 ms", MIX_4000, 6, 1, sec,
                lambda ids: Poisson(zipf_rates(ids, 3000, 1.0, 1), slo_ms=100, seed=1)))
    return out


def synthetic_trace(functions: int = 20000, seed: int = 0) -> Path:
    """A synthetic Azure-format day with `functions` functions (~5 per instance, as Clockwork), made once."""
    from workbench.workload.azure_synth import write_synthetic_trace
    d = Path(tempfile.gettempdir()) / f"workbench-azure-synthetic-{functions}-{seed}"
    if not (d / "invocations_per_function_md.anon.d01.csv").is_file():
        write_synthetic_trace(d, n_functions=functions, days=1, seed=seed)
    return d


def run_one(models, workers, gpus, seconds, factory, policy, options) -> dict:
    from workbench.controller.simulation import simulate
    from workbench.telemetry.recorder import Recorder
    rec = Recorder()
    t = time.process_time()
    res = simulate(models, num_gpus=gpus, workers=workers, policy=policy, policy_options=options,
                   workload=factory, duration_s=seconds, seed=1, recorder=rec)
    reqs = rec.requests()
    ok = reqs.filter(reqs["status"] == "success")
    acts = rec.actions()
    inf = acts.filter((acts["type"] == "INFER") & (acts["status"] == 0))
    d = {"submitted": res.submitted, **res.statuses, "goodput": res.goodput, "slo_attainment": res.slo_attainment,
         "p50_ms": float(ok["latency"].quantile(0.5)) / 1e6 if ok.height else None,
         "p99_ms": float(ok["latency"].quantile(0.99)) / 1e6 if ok.height else None,
         "mean_batch": float(inf["batch_size"].mean()) if inf.height else 0.0,
         "gpu_busy": float(inf["measured_duration"].sum()) / (seconds * 1e9 * workers * gpus),
         "loads": int((acts["type"] == "LOAD_WEIGHTS").sum()), "cpu_s": time.process_time() - t}
    rec.close()
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--only", default=None, help="comma-separated workloads (fig5,bursty,azure,zipf)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else None
    names = a.policies.split(",")
    rows = []
    for wl, variant, models, workers, gpus, seconds, factory in workloads(a.quick):
        if only and wl not in only:
            continue
        for name in names:
            policy, options = POLICIES[name]
            d = run_one(models, workers, gpus, seconds, factory, policy, options)
            d.update({"workload": wl, "variant": variant, "policy": name, "seconds": seconds})
            rows.append(d)
            print(f"{wl:7s} {variant:12s} {name:16s} goodput {d['goodput']:8.1f}/s attainment "
                  f"{d['slo_attainment']:.3f} ({d['cpu_s']:.1f} CPU s)", flush=True)
    rows = merged(rows, only)
    md = ["| workload | variant | policy | requests | success | timeout | dropped | error | goodput r/s | "
          "SLO attainment | p99 latency ms (successes) | mean batch | GPU busy | loads |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in rows:
        p99 = f"{d['p99_ms']:.1f}" if d["p99_ms"] is not None else "-"
        md.append(f"| {d['workload']} | {d['variant']} | {d['policy']} | {d['submitted']:,} | {d['success']:,} | "
                  f"{d['timeout']:,} | {d['dropped']:,} | {d['error']:,} | {d['goodput']:,.1f} | "
                  f"{d['slo_attainment']:.3f} | {p99} | {d['mean_batch']:.2f} | {d['gpu_busy']:.0%} | {d['loads']:,} |")
    md += ["", __doc__.split("\n\n", 2)[2].strip(), "",
           "All in virtual time with emulated H200s (profile data/profiles/h200.json), one seed. 'GPU busy' is "
           "the summed exec time of successful Infers over the GPUs' time; the baselines keep the GPU busy with "
           "requests whose deadline already passed (their timeouts), Clockwork drops those early instead."]
    write("policies", {"quick": a.quick, "rows": rows}, md)


def merged(rows: list[dict], only: set[str] | None) -> list[dict]:
    """With --only, keep the other workloads' rows from the previous results file."""
    if not only:
        return rows
    try:
        old = json.loads((OUT / "policies.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return rows
    keep = [r for r in old if r["workload"] not in only]
    order = {w: i for i, w in enumerate(("fig5", "bursty", "azure", "zipf"))}
    return sorted(keep + rows, key=lambda r: order.get(r["workload"], 9))


if __name__ == "__main__":
    main()
