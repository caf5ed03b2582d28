"""Run an experiment: every run of its sweep, headless, with a progress bar; write telemetry, summaries, the
exact configuration, the environment and an HTML report.

    from workbench.experiments import run
    summary = run("experiments/fig5_ci.toml", out="reports/fig5-ci")      # or a dict with the same structure

Output directory:
    config.toml / config.json   the experiment exactly as given / as resolved (defaults filled, runs expanded)
    environment.json            packages, Python, OS, clocks, GPU or emulation profile, checker results
    summary.json                one entry per run (summarize() + run facts), `interrupted` if stopped early
    report.html                 offline HTML report with charts (Altair, data and libraries inlined)
    runs/<label>/               requests.parquet, actions.parquet, timeseries.parquet, prediction_errors.parquet,
                                cache.parquet, summary.json (and Clockwork's TSVs if [report] clockwork_tsv)

Interrupted (Ctrl-C, SIGTERM), it stops sending requests, closes the controller (requests still pending end
with status error, "controller closed"), writes everything recorded so far and marks the summary
`"interrupted": true`; `workbench run` then exits with status 130. The telemetry is also flushed to Parquet
part files every few seconds while running, so even a killed run leaves readable data.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import polars as pl

from workbench.env.interpreter import lower_switch_interval
from workbench.experiments.build import build_clock, build_system, build_workload, model_pages
from workbench.experiments.config import ExperimentConfig, ExperimentError, RunSpec, from_dict, load
from workbench.experiments.environment import environment
from workbench.telemetry.recorder import Recorder, TelemetryError, read_telemetry
from workbench.telemetry import summary as S

NS = 1_000_000_000


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) during a run: a BaseException, like KeyboardInterrupt, so that no `except Exception`
    in a callback swallows it."""


_STOP = threading.Event()   # set by SIGTERM/SIGINT; the run loop stops at its next safe point


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and Ctrl-C stop the run at the next safe point of `_drive`, which raises `Interrupted` there.
    Raising from the handler itself could land in the middle of a controller or recorder call (in virtual time
    everything runs in this thread) and lose a request's final status."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _STOP.set()

    _STOP.clear()
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _check_stop() -> None:
    if _STOP.is_set():
        raise Interrupted("signal received")


class _Progress:
    """tqdm when installed (and wanted), else a plain line every 10%."""

    def __init__(self, total: float, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0.0
        self._bar = None
        self._next_pct = 10
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=round(total, 3), desc=desc, unit="s", file=sys.stderr,
                                 mininterval=0.5 if sys.stderr.isatty() else 10.0,
                                 bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                                            "[{elapsed}<{remaining}{postfix}]")
            except ImportError:
                print(f"{desc}: 0% of {total:g} s", file=sys.stderr, flush=True)

    def update_to(self, x: float, **postfix: Any) -> None:
        if not self.enabled:
            return
        x = min(x, self.total)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            # set, not added: a sum of float steps overshot the total (tqdm warned "clamping frac" mid-line)
            self._bar.n = round(x, 3)
            self._bar.update(0)                          # redraws at most every mininterval
        else:
            pct = int(100 * x / self.total) if self.total else 100
            while pct >= self._next_pct:
                extra = " ".join(f"{k}={v}" for k, v in postfix.items())
                print(f"{self.desc}: {self._next_pct}% {extra}", file=sys.stderr, flush=True)
                self._next_pct += 10
        self.done = x

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run(config: ExperimentConfig | str | os.PathLike | dict, out: str | os.PathLike, *,
        progress: bool = True, report: bool | None = None,
        on_run_done: Callable[[dict], None] | None = None) -> dict:
    """Run every run of the experiment into `out`; returns the summary (also written to summary.json)."""
    cfg = config if isinstance(config, ExperimentConfig) else \
        from_dict(config) if isinstance(config, dict) else load(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.text:
        (out / "config.toml").write_text(cfg.text)
    _write_json(out / "config.json", {"experiment": cfg.raw, "source": str(cfg.path) if cfg.path else None,
                                      "runs": [{"label": r.label, "params": r.params, "settings": r.raw}
                                               for r in cfg.runs]})
    dev = cfg.raw["device"]
    prof = None
    if dev["kind"] == "emulated":
        from workbench.worker.profile import Profile
        p = dev["profile"]
        prof = Profile.load(cfg.resolve_path(p) if p.endswith(".json") else p)
    if any(r.raw["clock"] == "real" for r in cfg.runs):
        lower_switch_interval()   # the controller decides in this process (workbench.env.interpreter); recorded below
    env = environment(dev, prof)
    _write_json(out / "environment.json", env)
    results: list[dict] = []
    interrupted = False
    started = time.time()
    with _stop_on_signals():
        for i, spec in enumerate(cfg.runs):
            res = run_one(cfg, spec, out / "runs" / spec.label, progress=progress,
                          desc=f"{cfg.name} [{i + 1}/{len(cfg.runs)}] {spec.label}")
            results.append(res)
            _write_summary(out, cfg, results, interrupted=res["interrupted"], started=started, env=env)
            if on_run_done is not None:
                on_run_done(res)
            if res["interrupted"]:
                interrupted = True
                break
    summary = _write_summary(out, cfg, results, interrupted=interrupted, started=started, env=env)
    if report if report is not None else cfg.raw["report"]["html"]:
        try:
            from workbench.experiments.report import write_report
            write_report(out, cfg, summary, env)
        except ImportError as e:   # e.g. a GPU machine without altair / vl-convert: the data is all there
            print(f"report.html skipped: {e} (pip install altair vl-convert-python)", file=sys.stderr)
        except (KeyboardInterrupt, Interrupted):
            pass
    return summary


def _write_summary(out: Path, cfg: ExperimentConfig, results: list[dict], *, interrupted: bool, started: float,
                   env: dict) -> dict:
    summary = {"experiment": cfg.name, "description": cfg.raw["description"],
               "source": str(cfg.path) if cfg.path else None, "interrupted": interrupted,
               "runs_planned": len(cfg.runs), "runs_done": sum(not r["interrupted"] for r in results),
               "wall_s": time.time() - started, "checks_summary": env.get("checks_summary"), "runs": results}
    _write_json(out / "summary.json", summary)
    return summary


def run_one(cfg: ExperimentConfig, spec: RunSpec, run_dir: Path, *, progress: bool = True,
            desc: str = "") -> dict:
    """One run: build, drive the clock for the duration plus the drain, stop, write telemetry and summaries."""
    r = spec.raw
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(run_dir.glob("*.parquet")) + list(run_dir.glob("*.tsv")):
        stale.unlink()   # a re-run into the same folder must not mix in old part files
    duration_ns = int(r["duration_s"] * NS)
    drain_ns = int((r["drain_s"] if "drain_s" in r else _default_drain_s(spec)) * NS)
    clock = build_clock(spec)
    rec = Recorder(run_dir, flush_interval_s=2.0)
    ctl = wl = None
    interrupted = False
    error = None
    t0 = clock.now()
    wall0 = time.perf_counter()
    bar = _Progress(r["duration_s"], desc or spec.label, progress)
    ids: dict[str, list[int]] = {}
    pages: dict[int, int] = {}
    ctl_summary: dict = {}
    try:
        try:
            ctl, ids = build_system(cfg, spec, clock, rec)
            pages = model_pages(ctl)
            wl = build_workload(cfg, spec, ids)
            t0 = clock.now() + (0 if clock.virtual else 20_000_000)   # real time: a moment to arm timers
            wl.start(ctl, clock, t0=t0, duration_s=r["duration_s"])
            _drive(clock, wl, t0, duration_ns, drain_ns, bar)
        except (KeyboardInterrupt, Interrupted) as e:
            interrupted = True
            error = f"interrupted ({type(e).__name__}{': ' + str(e) if str(e) else ''})"
        finally:
            bar.close()
            if wl is not None:
                wl.stop()
            if ctl is not None:
                try:
                    ctl_summary = ctl.summary()
                    ctl.close()
                except Exception as e:  # noqa: BLE001 - keep what was recorded even if closing fails
                    error = (error + "; " if error else "") + f"closing the controller: {type(e).__name__}: {e}"
            clock.close()
    finally:
        try:
            rec.close()
        except TelemetryError as e:   # the files are written; a row of the wrong type is a controller bug
            error = (error + "; " if error else "") + str(e)
    wall_s = time.perf_counter() - wall0
    requests, actions = read_telemetry(run_dir)
    res = summarize_run(cfg, spec, requests, actions, run_dir, t0=t0, duration_ns=duration_ns, pages=pages)
    res.update({"interrupted": interrupted, "error": error, "wall_s": wall_s,
                "simulated_s": (clock.now() - t0) / NS if clock.virtual else None,
                "workload": wl.stats() if wl is not None else None, "controller": _jsonable(ctl_summary),
                "models": {name: [v[0], v[-1]] for name, v in ids.items()}})
    _write_json(run_dir / "summary.json", res)
    return res


def _default_drain_s(spec: RunSpec) -> float:
    w = spec.raw["workload"]
    slo_ms = w.get("slo_ms") or (w.get("end") if w.get("unit", "ms") == "ms" and w["kind"] == "slo_sweep" else None)
    return (slo_ms or 1000.0) / 1000.0 + 1.0


def _drive(clock, wl, t0: int, duration_ns: int, drain_ns: int, bar: _Progress) -> None:
    end = t0 + duration_ns
    if clock.virtual:
        step = max(duration_ns // 200, 1_000_000)
        t = clock.now()
        while t < end:
            t = min(t + step, end)
            clock.run_until(t)
            _check_stop()
            bar.update_to((t - t0) / NS, req=wl.submitted, done=wl.completed)
        wl.stop()
        limit = end + drain_ns
        while wl.in_flight > 0 and clock.now() < limit:
            clock.run_until(min(clock.now() + step, limit))
            _check_stop()
    else:
        while (now := clock.now()) < end:
            time.sleep(min(0.25, (end - now) / NS))
            _check_stop()
            bar.update_to((clock.now() - t0) / NS, req=wl.submitted, done=wl.completed)
        wl.stop()
        limit = end + drain_ns
        while wl.in_flight > 0 and clock.now() < limit:
            time.sleep(0.02)
            _check_stop()
    bar.update_to(duration_ns / NS, req=wl.submitted, done=wl.completed)


def summarize_run(cfg: ExperimentConfig, spec: RunSpec, requests: pl.DataFrame, actions: pl.DataFrame,
                  run_dir: Path, *, t0: int, duration_ns: int, pages: dict[int, int]) -> dict:
    r = spec.raw
    warm = int(r["warmup_s"] * NS)
    s = S.summarize(requests, actions, start=t0, end=t0 + duration_ns, warmup_ns=warm)
    bucket_s = float(r["report"]["bucket_s"])
    S.per_minute(requests, actions, bucket_s=bucket_s, start=t0).write_parquet(run_dir / "timeseries.parquet")
    S.error_cdf(actions).write_parquet(run_dir / "prediction_errors.parquet")
    occ = S.cache_occupancy(actions, pages or 0)
    occ.with_columns(((pl.col("t") - t0) / NS).alias("t_s")).write_parquet(run_dir / "cache.parquet")
    if r["report"]["clockwork_tsv"]:
        from workbench.telemetry.clockwork_tsv import write_clockwork_tsv
        write_clockwork_tsv(requests, actions, run_dir)
    s["error_tails"] = S.error_tails(actions).to_dicts()
    return {"label": spec.label, "params": spec.params, "policy": spec.policy,
            "workload_kind": r["workload"]["kind"], "clock": r["clock"], "device": r["device"],
            "t0_ns": t0, "bucket_s": bucket_s, "recorded_requests": requests.height, "recorded_actions": actions.height,
            "summary": _jsonable(s)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return _jsonable(v.item())
        except (TypeError, ValueError):
            return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)


def read_results(out: str | os.PathLike) -> tuple[dict, dict[str, tuple[pl.DataFrame, pl.DataFrame]]]:
    """(summary, {run label: (requests, actions)}) of an experiment output directory."""
    d = Path(out)
    summary = json.loads((d / "summary.json").read_text())
    runs = {}
    for r in summary["runs"]:
        runs[r["label"]] = read_telemetry(d / "runs" / r["label"])
    return summary, runs


__all__ = ["run", "run_one", "read_results", "Interrupted", "ExperimentError"]
