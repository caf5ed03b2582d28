"""SLO attainment and goodput per experiment and policy: the CI-sized reproductions of Clockwork's Figs. 5, 6
and 9/10 (experiments/*_ci.toml) in virtual time on emulated H200s.

    python -m bench.experiments [--experiments fig5_ci,fig6_ci,fig9_ci] [--keep DIR] [--report]

Writes bench/results/experiments.json and .md (one row per run: experiment, run, policy, requests, SLO
attainment, goodput, throughput, latency p50/p99/p99.99, cold starts, INFER/LOAD prediction error, wall time).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__.split("\n")[0])
    p.add_argument("--experiments", default="fig5_ci,fig6_ci,fig9_ci")
    p.add_argument("--keep", help="keep each experiment's output under DIR/<name> (default: a temp dir)")
    p.add_argument("--report", action="store_true", help="also write the HTML reports (with --keep)")
    a = p.parse_args(argv)

    from workbench.experiments.runner import run

    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-experiments-"))
    rows, errors = [], {}
    try:
        for name in a.experiments.split(","):
            path = ROOT / "experiments" / f"{name}.toml"
            t = time.perf_counter()
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                summary = run(path, base / name, progress=False, report=a.report)
            wall = time.perf_counter() - t
            tracebacks = stderr.getvalue().count("Traceback (most recent call last)")
            if tracebacks:
                errors[name] = {"tracebacks_printed": tracebacks, "last": stderr.getvalue()[-1500:]}
            for r in summary["runs"]:
                s = r["summary"]
                lat = s.get("latency_ms") or {}
                acts = s.get("actions") or {}
                rows.append({
                    "experiment": name, "run": r["label"], "policy": r["policy"], "requests": s.get("requests"),
                    "slo_attainment": s.get("slo_attainment"), "goodput_rps": s.get("goodput_rps"),
                    "throughput_rps": s.get("throughput_rps"), "offered_rps": s.get("offered_rps"),
                    "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"), "p99_99_ms": lat.get("p99_99"),
                    "cold_starts": s.get("cold_starts"), "by_status": s.get("by_status"),
                    "infer_pred_err_abs_p99_ms": (acts.get("INFER", {}).get("prediction_error_ms") or {}).get("abs_p99"),
                    "load_pred_err_abs_p99_ms": (acts.get("LOAD_WEIGHTS", {}).get("prediction_error_ms") or {}).get("abs_p99"),
                    "run_wall_s": r.get("wall_s"), "simulated_s": r.get("simulated_s"),
                })
            rows[-1]["experiment_wall_s"] = wall
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    res = {"rows": rows, "errors_printed_during_runs": errors,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "command": "python -m bench.experiments"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "experiments.json").write_text(json.dumps(res, indent=1) + "\n")

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["# Experiments: SLO attainment and goodput per experiment and policy (`python -m bench.experiments`)",
             "", "CI-sized forms of experiments/*.toml, virtual time, emulated H200 profile (data/profiles/h200.json).",
             "Summary window: after each experiment's warm-up until the end of its duration.", "",
             "| experiment | run | policy | requests | SLO attainment | goodput r/s | throughput r/s | p50 ms | "
             "p99 ms | p99.99 ms | cold starts | INFER pred. err. abs p99 ms | LOAD pred. err. abs p99 ms | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['run']} | {r['policy']} | {r['requests']:,} | "
                     f"{f(r['slo_attainment'], '.4f')} | {f(r['goodput_rps'], '.1f')} | {f(r['throughput_rps'], '.1f')} | "
                     f"{f(r['p50_ms'], '.2f')} | {f(r['p99_ms'], '.2f')} | {f(r['p99_99_ms'], '.2f')} | "
                     f"{r['cold_starts']} | {f(r['infer_pred_err_abs_p99_ms'], '.3f')} | "
                     f"{f(r['load_pred_err_abs_p99_ms'], '.3f')} | {f(r['run_wall_s'], '.1f')} |")
    if errors:
        lines += ["", "Tracebacks printed during runs (caught by the controller/worker; the runs completed):"]
        for k, v in errors.items():
            lines.append(f"- {k}: {v['tracebacks_printed']} traceback(s); last lines in experiments.json")
    md = "\n".join(lines) + "\n"
    (RESULTS / "experiments.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
