"""Azure trace reader speed on a generated file the size of one real day (~46,000 functions x 1,440 minutes).

    python -m bench.trace_reader [--functions 46000] [--keep DIR]

Measures, on a synthetic day file in the real layout (workbench.workload.azure_synth):
- open: validate every row and column (header, field counts, non-negative integers) and total each function;
- one hour of counts (60 minute columns of every function), and the whole day's counts;
- replay generation: arrivals produced per second by AzureReplay into a `Sink` (which answers each request on the
  clock), and into a do-nothing controller (the replay's own cost per arrival: generation, one clock event and
  the submit call), next to the clock's own floor (one event per arrival and nothing else).
Writes bench/results/trace_reader.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trace_reader", description=__doc__.split("\n")[0])
    p.add_argument("--functions", type=int, default=46_000)
    p.add_argument("--keep", help="write the generated file here and keep it (default: a temp dir)")
    a = p.parse_args(argv)

    from workbench.clock import VirtualClock
    from workbench.workload import AzureReplay, AzureTrace
    from workbench.workload.azure_synth import write_synthetic_trace
    from workbench.workload.sink import Sink

    d = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="trace-bench-"))
    try:
        t = time.perf_counter()
        (path,) = write_synthetic_trace(d, n_functions=a.functions, seed=2019)
        gen_s = time.perf_counter() - t
        size = path.stat().st_size
        open_s, tr = timed(lambda: AzureTrace.open(d), repeat=2)
        rows = a.functions
        hour_s, hour = timed(lambda: tr.counts(600, 60))
        day_s, day = timed(lambda: tr.counts(0, 1440), repeat=1)
        invocations = int(day.sum())
        # replay: arrivals for 10 trace minutes, compressed to 1 s each, scale chosen for ~1 M arrivals
        per_min = float(hour.sum()) / 60
        scale = min(1.0, 100_000 / max(per_min, 1))
        clock = VirtualClock()
        sink = Sink(clock)
        w = AzureReplay(tr, 4000, scale=scale, interval_s=1.0, start_minute=600, minutes=10, seed=1)
        t = time.perf_counter()
        w.start(sink, clock)
        clock.run()
        replay_s = time.perf_counter() - t
        arrivals = len(sink.arrivals)
        null_s = min(_replay_null(tr, scale) for _ in range(2))
        floor_ns = _clock_floor_ns(arrivals)
        res = {
            "functions": rows, "kept_functions": tr.num_functions, "file_bytes": size,
            "invocations_in_day": invocations, "generate_s": gen_s,
            "open_validate_s": open_s, "open_rows_per_s": rows / open_s, "open_mb_per_s": size / 1e6 / open_s,
            "counts_one_hour_s": hour_s, "counts_full_day_s": day_s, "counts_full_day_rows_per_s": rows / day_s,
            "replay_arrivals": arrivals, "replay_s": replay_s, "replay_arrivals_per_s": arrivals / replay_s,
            "replay_note": "arrivals generated and submitted to a Sink (no controller); includes clock overhead",
            "replay_null_s": null_s, "replay_null_ns_per_arrival": null_s / arrivals * 1e9,
            "clock_floor_ns_per_event": floor_ns,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "command": "python -m bench.trace_reader" + (f" --functions {a.functions}" if a.functions != 46_000 else ""),
        }
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trace_reader.json").write_text(json.dumps(res, indent=1) + "\n")
    md = f"""# Azure trace reader speed (`{res['command']}`)

Synthetic day file in the real layout: {rows:,} functions x 1,440 minutes, {size / 1e6:.0f} MB,
{invocations:,} invocations ({res['kept_functions']:,} functions invoke at least once). Machine: {os.cpu_count()} CPUs.
Best of 2-3 runs.

| step | seconds | rate |
| --- | --- | --- |
| generate the file (numpy + polars write_csv) | {gen_s:.2f} | |
| open: validate every row/column, total per function | {open_s:.2f} | {res['open_rows_per_s']:,.0f} rows/s ({res['open_mb_per_s']:.0f} MB/s) |
| counts of one hour (60 columns, all functions) | {hour_s:.2f} | |
| counts of the whole day (1,440 columns) | {day_s:.2f} | {res['counts_full_day_rows_per_s']:,.0f} rows/s |
| replay: {arrivals:,} arrivals (10 minutes, scale {scale:.3g}) into a Sink | {replay_s:.2f} | {res['replay_arrivals_per_s']:,.0f} arrivals/s |
| the same replay into a do-nothing controller (the replay's own cost) | {null_s:.2f} | {null_s / arrivals * 1e9:,.0f} ns per arrival |

The replay's own cost includes one virtual-clock event per arrival; the clock alone costs {floor_ns:,.0f} ns per event
here (a timer that re-arms itself with nothing else to do).
"""
    (RESULTS / "trace_reader.md").write_text(md)
    print(md)
    return 0


class _NullController:
    def __init__(self) -> None:
        self.n = 0

    def submit(self, model_id, inputs=None, slo=None, slo_factor=None, callback=None) -> int:
        self.n += 1
        return self.n


def _replay_null(tr, scale: float) -> float:
    from workbench.clock import VirtualClock
    from workbench.workload import AzureReplay

    clock = VirtualClock()
    w = AzureReplay(tr, 4000, scale=scale, interval_s=1.0, start_minute=600, minutes=10, seed=1)
    t = time.perf_counter()
    w.start(_NullController(), clock)
    clock.run()
    return time.perf_counter() - t


def _clock_floor_ns(n: int) -> float:
    from workbench.clock import VirtualClock

    clock = VirtualClock()
    left = [n]

    def tick() -> None:
        left[0] -= 1
        if left[0] > 0:
            clock.call_at(clock.now() + 1000, tick)

    clock.call_at(0, tick)
    t = time.perf_counter()
    clock.run()
    return (time.perf_counter() - t) / n * 1e9


if __name__ == "__main__":
    raise SystemExit(main())
