"""Replay recorded exec durations through the controller's estimator at other settings (window, percentile).

    python -m bench.estimator_replay [--telemetry data/telemetry/h200_resnet50x20_clockwork]
                                     [--settings 10:0.99,50:0.95:shared,...] [--name estimator_replay]

Each successful INFER of the recording, in the order its result arrived, is predicted by a `SlidingEstimate`
per (model, compiled batch size) -- the controller's own class -- seeded, like the controller, with the first
prediction the controller made for that pair, and then given the measured duration. A setting marked `shared`
keeps one window per compiled batch size for all copies, as the controller does with `share_estimates` (the
recordings hold copies of one artifact). Reported per setting: the
prediction error |measured - predicted| (p50, p99, p99.9) and the share of execs that ran longer than predicted
(the ones that can make a request late). The first row replays the setting the recording was made with and is
compared with the errors the controller actually recorded, which validates the replay.
Writes bench/results/estimator_replay.json and .md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.worker_common import write
from workbench.controller.estimates import SlidingEstimate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "data" / "telemetry" / "h200_resnet50x20_clockwork"
SETTINGS = "10:0.99,10:0.9,20:0.95,20:0.9,50:0.98,100:0.99,20:0.95:shared,50:0.95:shared,100:0.95:shared"


def pct(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def infers(telemetry: Path) -> list[tuple[int, int, int, int, int]]:
    """(model_id, compiled batch, measured ns, recorded predicted ns, clock MHz) of each successful INFER."""
    import polars as pl
    a = pl.read_parquet(telemetry / "actions.parquet")
    inf = a.filter((pl.col("type") == "INFER") & (pl.col("status") == 0)).sort("completed")
    sizes = sorted({b for b in inf["batch_size"].unique().to_list()})
    compiled = [1, 2, 4, 8, 16, 32, 64, 128]
    pad = {b: next(c for c in compiled if c >= b) for b in sizes}
    return [(r["model_id"], pad[r["batch_size"]], r["measured_duration"], r["predicted_duration"],
             r["gpu_clock"] or 1) for r in inf.iter_rows(named=True)]


def replay(rows: list, window: int, p: float, shared: bool = False) -> dict:
    est: dict[tuple[int, int], SlidingEstimate] = {}
    errs, under, rel = [], [], []
    for m, b, measured, predicted, clock in rows:
        key = (-1 if shared else m, b)
        e = est.get(key)
        if e is None:
            e = est[key] = SlidingEstimate(window, p, predicted * clock)
        guess = e.value / clock
        errs.append(abs(measured - guess))
        rel.append(abs(measured - guess) / measured)
        if measured > guess:
            under.append(measured - guess)
        e.add(measured * clock)
    return summary(errs, under, rel)


def summary(errs: list[float], under: list[float], rel: list[float]) -> dict:
    """Error percentiles (absolute, and relative to the measured duration: the predictability goal is 1 %), and
    the execs that ran longer than predicted: their share and by how much (p99)."""
    s, u = sorted(errs), sorted(under)
    return {"n": len(s), "p50_us": pct(s, 0.5) / 1e3, "p99_us": pct(s, 0.99) / 1e3, "p999_us": pct(s, 0.999) / 1e3,
            "p99_relative": pct(sorted(rel), 0.99),
            "under_predicted": len(u) / len(s) if s else 0.0, "under_by_p99_us": pct(u, 0.99) / 1e3 if u else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--telemetry", default=str(DEFAULT), help="a telemetry directory holding actions.parquet")
    ap.add_argument("--settings", default=SETTINGS, help="window:percentile[:shared], comma-separated; the "
                                                          "first is the recording's own")
    ap.add_argument("--name", default="estimator_replay", help="results file name under bench/results")
    a = ap.parse_args(argv)
    rows = infers(Path(a.telemetry))
    if not rows:
        raise SystemExit(f"{a.telemetry}: no successful INFER actions to replay")
    recorded = summary([abs(m - p) for _, _, m, p, _ in rows], [m - p for _, _, m, p, _ in rows if m > p],
                       [abs(m - p) / m for _, _, m, p, _ in rows])
    out = [{"setting": "recorded by the controller", **recorded}]
    for spec in a.settings.split(","):
        w, p, *mode = spec.split(":")
        if mode not in ([], ["shared"]):
            raise SystemExit(f"--settings {spec!r}: give window:percentile or window:percentile:shared")
        shared = mode == ["shared"]
        out.append({"setting": f"window {int(w)}, p{float(p):g}" + (", shared by the copies" if shared else ""),
                    "window": int(w), "percentile": float(p), "shared": shared,
                    **replay(rows, int(w), float(p), shared)})
    md = ["| estimator | INFERs | error p50 (us) | error p99 (us) | error p99.9 (us) | error p99, of the exec | "
          "ran longer than predicted | by (p99, us) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['setting']} | {r['n']:,} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['p999_us']:.1f} | "
           f"{r['p99_relative']:.2%} | {r['under_predicted']:.1%} | {r['under_by_p99_us']:.1f} |" for r in out]
    shown = Path(a.telemetry).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    md += ["", f"Recording: `{shown}` (see data/telemetry/README.md). Error = |measured - predicted| exec "
               "duration per INFER; each setting replays the same measurements in result order through the "
               "controller's SlidingEstimate per (model, compiled batch size) (shared: per compiled batch size), "
               "seeded with the controller's first prediction for the pair. The first replayed setting is the recording's own (its row should match "
               "'recorded by the controller')."]
    write(a.name, {"telemetry": str(shown), "rows": out}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
