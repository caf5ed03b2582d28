"""Physical floors and the environment check of this machine, written to bench/results/.

    python -m bench.floors [--out bench/results] [--reps 20] [--page-mib 16] [--model-mb 100]

Writes floors.json / floors.md (H2D and D2H GB/s for a 16 MiB page and a 100 MB model, pinned and pageable;
kernel-launch latency; CUDA event resolution; SM clock idle and under load; CPU memcpy and timers) and
check_report.json / check_report.md (`workbench check` on this machine, with the floors). The check runs first,
before this process creates any CUDA context, so the idle-clock and other-process checks see an idle GPU.
Runs on the H200 (cupy, nvidia-ml-py) and on a CPU-only machine (GPU parts reported as unavailable).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from workbench.env import floors as fl
from workbench.env.checks import check
from workbench.env.report import CheckReport

OUT = Path(__file__).resolve().parent / "results"
# Measured by hand on the H200 before the workbench existed (reference/h200-baseline.md), for comparison.
BASELINE = {"h2d_pinned_model": 54.9, "h2d_pageable_model": 14.6}


def headline(f: fl.Floors) -> list[str]:
    """The figures the issue asks for, one table row each."""
    rows = ["| device | figure | value | H200 baseline |", "| --- | --- | --- | --- |"]
    for g in f.gpus:
        dev = f"cuda:{g.device} {g.name}"
        for t in g.transfers:
            size = f"{t.nbytes / 2**20:.0f} MiB page" if t.label == "page" else f"{t.nbytes / 1e6:.0f} MB model"
            base = BASELINE.get(f"{t.direction}_{t.memory}_{t.label}")
            rows.append(f"| {dev} | {t.direction.upper()} {t.memory} {size} | {t.gbps:.1f} GB/s "
                        f"(p50 {t.p50_ns / 1e3:.0f} us, min {t.min_ns / 1e3:.0f} us) | "
                        f"{'' if base is None else f'{base} GB/s'} |")
        if g.launch_sync_us is not None:
            rows.append(f"| {dev} | kernel launch + synchronize (empty kernel, p50) | {g.launch_sync_us:.1f} us | |")
            rows.append(f"| {dev} | back-to-back launches: host cost / GPU time per kernel | "
                        f"{g.launch_host_us:.2f} us / {g.launch_gpu_us:.2f} us | |")
        if g.event_resolution_us is not None:
            rows.append(f"| {dev} | CUDA event resolution (smallest nonzero) | {g.event_resolution_us:.3f} us "
                        f"({g.event_zero_fraction:.0%} of back-to-back pairs read 0) | |")
        if g.event_empty_kernel_us is not None:
            rows.append(f"| {dev} | CUDA events around one empty kernel (p50) | {g.event_empty_kernel_us:.2f} us | |")
        c = g.clock
        if c.get("load_sm_mhz") is not None:
            rows.append(f"| {dev} | SM clock under load (p50 / min / first sample) | {c['load_sm_mhz']:.0f} / "
                        f"{c['load_sm_min_mhz']} / {c['load_first_sm_mhz']} MHz (max {c['max_sm_mhz']}; reasons "
                        f"{', '.join(c['load_reasons']) or 'none'}) | app clocks 1980 |")
            rows.append(f"| {dev} | SM clock idle before / {c['idle_seconds']} s after load | "
                        f"{c['idle_sm_mhz']} / {c['after_idle_sm_mhz']} MHz | |")
            rows.append(f"| {dev} | memory clock under load | {c['load_mem_mhz']:.0f} MHz (max {c['max_mem_mhz']}) "
                        f"| 3201 |")
            rows.append(f"| {dev} | PCIe under load | {c['load_pcie']} | gen5 x16 |")
        for part, why in g.errors.items():
            rows.append(f"| {dev} | {part} | not measured: {why} | |")
    if not f.gpus:
        rows.append(f"| cuda | GPU floors | not measured: {f.gpu_reason} | |")
    if f.cpu is not None:
        for t in f.cpu.transfers:
            size = f"{t.nbytes / 2**20:.0f} MiB" if t.label == "page" else f"{t.nbytes / 1e6:.0f} MB"
            rows.append(f"| cpu | memcpy {t.label} ({size}) | {t.gbps:.1f} GB/s | |")
        for name, v in f.cpu.timer.items():
            rows.append(f"| cpu | {name}: smallest step / cost per read | {v['min_step_ns']:.0f} ns / "
                        f"{v['read_ns']:.0f} ns | |")
        rows.append(f"| cpu | thread wake-up (Event.set to running, p50) | {f.cpu.thread_wakeup_us:.0f} us | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(OUT), help="directory for the results (default bench/results)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--page-mib", type=int, default=16)
    p.add_argument("--model-mb", type=float, default=100)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    pre = check(floors=False)    # before any CUDA context of ours exists (floors=False: none included yet)
    f = fl.measure(page_bytes=args.page_mib * 2**20, model_bytes=int(args.model_mb * 1e6), reps=args.reps)
    report = CheckReport(pre.checks + f.checks(), f)
    meta = {"command": " ".join(["python -m bench.floors", *(argv if argv is not None else sys.argv[1:])]),
            "python": platform.python_version(), "seconds": time.time() - t0}

    (out / "floors.json").write_text(json.dumps({**f.to_dict(), "meta": meta}, indent=1))
    (out / "floors.md").write_text(
        f"# Physical floors: {f.host}\n\n`{meta['command']}` ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(f.created))}"
        f" UTC, {f.seconds:.1f} s)\n\n" + "\n".join(headline(f)) + "\n\n" + f.to_markdown())
    (out / "check_report.json").write_text(json.dumps({**report.to_dict(), "meta": meta}, indent=1))
    (out / "check_report.md").write_text(report.to_markdown())
    print("\n".join(headline(f)))
    print(f"\n{report.summary()}; wrote floors.json, floors.md, check_report.json, check_report.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
