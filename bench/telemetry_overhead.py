"""Telemetry recording overhead: ns per row for each Recorder API, and the slowdown of a virtual-time simulation
with recording on vs off, measured side by side.

    python -m bench.telemetry_overhead [--rows 200000] [--pairs 12] [--duration 20] [--rate 2000] [--instructions]

(a) Micro: ns per call with full rows as the controller sends them (16 request columns, 23 action columns,
    String columns as codes of the recorder's string table): the keyword API `add_request(**row)` /
    `add_action(**row)`, the positional fast path `add_request_row(t)` / `add_action_row(t)` (the hot path
    alone: packing into bytes), the floors (a do-nothing function taking the same keywords; a bare
    `list.append`) and the total per row with the frames built (everything a row costs). These run on warm
    caches.
(b) Side by side: one fixed virtual-time simulation (controller + one emulated H200 worker with 2 GPUs,
    15 ResNet-50 copies, Poisson arrivals, `workbench.controller.simulation.simulate`), run with recording off
    and with each way of recording on, each run in a fresh process, interleaved in rounds (the order shuffled
    every round); each round gives one ratio on/off per variant, and the figure is the median over the rounds
    with its quartiles. An extra "off" run per round
    (off vs off) shows the noise of the machine; a "gather only" run (the controller builds each row, the
    recorder drops it) separates the controller's share from the recorder's. Wall and process CPU time (all
    threads, so the background conversion counts) are both reported; recorder.close() (for a spilling recorder
    the last conversion and the Parquet writes; an in-memory one builds no frames at close) is included. The
    first `requests()` + `actions()` after the run, which builds the frames of an in-memory recorder, is timed
    separately and reported next to it. The controller records through the recorder's row writers
    (`Recorder.row_writer`: each request's native values written into the recorder's memory); the "positional" variant
    hides them, so the controller hands tuples to `add_*_row`, and the "keywords" variant hides those too, so it
    falls back to `add_request(**row)`. The row writers' ratio is what recording costs a simulation: in virtual
    time it changes nothing the simulation serves (tests/test_telemetry_row_writer.py), so this is the simulator's
    CPU; whether recording slows the serving hot path is measured in real time by `bench.telemetry_hot_path`.
(c) The positional tuple path's own cost inside the run: each `add_*_row` call timed (`perf_counter_ns`) in --timed-runs
    runs into a Recorder and as many into a recorder that drops the row; the difference per call, robust to
    preemption (median over blocks of 2,048 calls).
(d) With --instructions: instructions per simulated request under valgrind (deterministic: a shared machine's
    noise does not reach it), from two run lengths per variant so that fixed costs cancel.
Writes bench/results/telemetry_overhead.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

BEFORE = {"add_request_ns": 2235, "add_action_ns": 2959, "sim_overhead_pct": 14.3,
          "source": "bench/results/telemetry_overhead.md of commit e549d7b (column-list recorder, keyword calls)"}
PREVIOUS = {"add_request_row_ns": 314, "add_request_row_with_conversion_ns": 829, "cpu_ratio_median": 1.069,
            "cpu_ratio_q1": 1.035, "cpu_ratio_q3": 1.173, "off_again_median": 0.981, "off_again_q1": 0.929,
            "off_again_q3": 1.025, "convert_ns_per_request": 1439, "minor_faults": 2155, "gather_only_median": 1.007,
            # section (c)'s method applied to that recorder (the controller handing it strings), 3 runs against 2
            # of the discarding recorder on 2026-11-29: mean per call 1,333 ns vs 155 ns, 1.144 calls a request
            "timed_ns_per_call_mean": 1178, "timed_ns_per_request_mean": 1347,
            "source": "bench/results/telemetry_overhead.md of commit 31f830e (Python values staged into array "
                      "columns every 256 rows, sealed every 16,384; strings as str)"}


# ------------------------------------------------------------------------------------------------ (a) micro
def _rows(n: int) -> tuple[list[dict], list[dict]]:
    """Realistic rows: ids and times vary, strings and small ints repeat (as in a run)."""
    reqs, acts = [], []
    for i in range(n):
        t = 1_000_000_000 + 37_000 * i
        reqs.append(dict(request_id=i, model_id=i % 15, model="resnet50", worker=0, gpu=i % 2, batch_size=1 << (i % 4),
                         arrival=t, deadline=t + 100_000_000, completion=t + 9_000_000 + i % 1000, slo=100_000_000,
                         status="success" if i % 50 else "timeout", latency=9_000_000 + i % 1000,
                         cold_start=i % 1000 == 0, message="", action_id=i // 3, slo_factor=0.0))
        acts.append(dict(action_id=i, worker=0, gpu=i % 2, type="INFER" if i % 20 else "LOAD_WEIGHTS",
                         model_id=i % 15, batch_size=1 << (i % 4), earliest=t, latest=t + 5_000_000, sent=t - 10_000,
                         planned_begin=t + 1000, planned_end=t + 2_001_000, predicted_duration=2_000_000,
                         completed=t + 2_100_000, measured_begin=t + 1500, measured_end=t + 2_050_000,
                         measured_duration=2_048_500, gpu_clock=1980, status=0, status_name="SUCCESS",
                         gpu_clock_before=1980, requests_queued=i % 7, copies_loaded=1, message=""))
    return reqs, acts


def _best_ns(n: int, repeats: int, setup: Callable[[], Any], loop: Callable[[Any], None],
             after: Callable[[Any], None] = lambda s: None) -> float:
    best = float("inf")
    for _ in range(repeats):
        s = setup()
        t = time.perf_counter_ns()
        loop(s)
        best = min(best, (time.perf_counter_ns() - t) / n)
        after(s)
    return best


def _coded(rows: list[dict], fields: tuple[str, ...], strings: Any) -> list[tuple]:
    """Rows as the controller sends them positionally: String columns as codes of the recorder's string table."""
    from workbench.telemetry.recorder import ACTION_COLUMNS, REQUEST_COLUMNS

    text = {c.name for c in REQUEST_COLUMNS + ACTION_COLUMNS if c.dtype == __import__("polars").Utf8}
    return [tuple(strings[r[f]] if f in text else r[f] for f in fields) for r in rows]


def micro(n: int, repeats: int = 5) -> dict:
    from workbench.telemetry.recorder import ACTION_FIELDS, REQUEST_FIELDS, Recorder

    reqs, acts = _rows(n)
    probe = Recorder()
    req_t = _coded(reqs, REQUEST_FIELDS, probe.strings)
    act_t = _coded(acts, ACTION_FIELDS, probe.strings)
    probe.close()
    interned = list(probe.strings.values)
    out: dict[str, float] = {"chunk_rows": probe.chunk_rows}

    def kw_floor(**row: Any) -> None:
        return None

    def fresh(**kw: Any) -> Recorder:
        r = Recorder(**kw)
        for s in interned:   # the same codes as the tuples were built with
            r.strings[s]
        return r

    close = lambda r: r.close()                   # noqa: E731
    out["kwargs_floor_ns"] = _best_ns(n, repeats, lambda: None, lambda s: [kw_floor(**r) for r in reqs])
    out["append_floor_ns"] = _best_ns(n, repeats, list, lambda s: [s.append(t) for t in req_t])
    out["loop_floor_ns"] = _best_ns(n, repeats, lambda: None, lambda s: [None for t in req_t])
    for kind, rows, tuples in (("request", reqs, req_t), ("action", acts, act_t)):
        add, add_row = f"add_{kind}", f"add_{kind}_row"
        # what a run pays per row: the call, and packing every `stage_rows` rows into bytes
        out[f"{add}_ns"] = _best_ns(n, repeats, fresh, lambda r: [getattr(r, add)(**x) for x in rows], close)
        out[f"{add_row}_ns"] = _best_ns(n, repeats, fresh, lambda r: [getattr(r, add_row)(t) for t in tuples],
                                        close)
        # everything a row costs: the call, and sealing the packed rows into polars frames (flush)
        out[f"{add_row}_with_conversion_ns"] = _best_ns(
            n, repeats, fresh, lambda r: ([getattr(r, add_row)(t) for t in tuples], r.flush()), close)
        out[f"{kind}_convert_ns"] = out[f"{add_row}_with_conversion_ns"] - out[f"{add_row}_ns"]
        # a row writer (the controller's path; called here from Python, the compiled controller calls it natively)
        write_all = lambda w: [w.write(t) for t in tuples]   # noqa: E731
        out[f"{kind}_writer_ns"] = _best_ns(n, repeats, fresh, lambda r: write_all(r.row_writer(kind)), close)
    return out


def _once(setup: Callable[[], Any], fn: Callable[[Any], float]) -> float:
    s = setup()
    try:
        return fn(s)
    finally:
        s.close()


# ------------------------------------------------------------------------------------- (b) side by side
class DiscardingRecorder:
    """Takes rows and drops them: with it, what recording costs is only the caller gathering the values (String
    columns looked up in a string table, as for a Recorder)."""

    def __init__(self) -> None:
        from workbench.telemetry.recorder import StringCodes

        self.strings = StringCodes()

    def add_request_row(self, values: tuple) -> None:
        pass

    def add_action_row(self, values: tuple) -> None:
        pass

    def add_request(self, **row: Any) -> None:
        pass

    def add_action(self, **row: Any) -> None:
        pass

    def close(self) -> None:
        pass


class TimedCalls:
    """A recorder (or the discarding one) whose positional calls are each timed (`perf_counter_ns`, in the
    calling thread): the difference between the two, per call, is the recorder's own cost inside the run,
    cache misses included, without the noise of whole-run ratios."""

    def __init__(self, inner: Any) -> None:
        from array import array
        from time import perf_counter_ns as now

        self.inner, self.strings, self.samples = inner, inner.strings, array("q")
        ar, aa, s = inner.add_request_row, inner.add_action_row, self.samples

        def add_request_row(values: tuple) -> None:
            t = now()
            ar(values)
            s.append(now() - t)

        def add_action_row(values: tuple) -> None:
            t = now()
            aa(values)
            s.append(now() - t)

        self.add_request_row, self.add_action_row = add_request_row, add_action_row

    def close(self) -> None:
        self.inner.close()

    def per_call_ns(self, block: int = 2048) -> dict:
        """Median over blocks of `block` consecutive calls of the block's mean (robust to the rare call that the
        shared machine preempts; a block holds ~7 packings of request rows and ~1 of action rows), and the plain
        mean."""
        import numpy as np

        x = np.frombuffer(self.samples, dtype=np.int64)
        m = len(x) // block * block
        blocks = x[:m].reshape(-1, block).mean(axis=1)
        return {"calls": len(x), "block_median_ns": float(np.median(blocks)), "mean_ns": float(x.mean())}


class TuplesOnly:
    """A Recorder seen without `row_writer`: the controller then records with `add_request_row(t)` /
    `add_action_row(t)`, the positional tuple path (how it recorded before row writers)."""

    def __init__(self) -> None:
        from workbench.telemetry.recorder import Recorder

        self.inner = Recorder()
        self.strings = self.inner.strings
        self.add_request_row, self.add_action_row = self.inner.add_request_row, self.inner.add_action_row
        self.add_request, self.add_action = self.inner.add_request, self.inner.add_action

    def close(self) -> None:
        self.inner.close()


class KeywordOnly:
    """A Recorder seen through its keyword methods only: the controller then records with `add_request(**row)`
    / `add_action(**row)` (how it recorded before the positional path existed)."""

    def __init__(self) -> None:
        from workbench.telemetry.recorder import Recorder

        self.inner = Recorder()
        self.add_request, self.add_action = self.inner.add_request, self.inner.add_action

    def close(self) -> None:
        self.inner.close()


def simulation(variant: str, a: argparse.Namespace, tmp: Path | None) -> dict:
    """One run; returns wall and CPU seconds (recorder.close() included), the main thread's CPU seconds, the
    recorder's own conversion CPU seconds, minor page faults, requests and rows."""
    import resource

    from workbench.controller.simulation import simulate
    from workbench.telemetry.recorder import Recorder
    from workbench.workload import Poisson

    rec: Any = None
    if variant == "keywords":
        rec = KeywordOnly()
    elif variant == "positional_timed":
        rec = TimedCalls(Recorder())
    elif variant == "gather_timed":
        rec = TimedCalls(DiscardingRecorder())
    elif variant == "writer":
        rec = Recorder()
    elif variant == "positional":
        rec = TuplesOnly()
    elif variant == "gather_only":
        rec = DiscardingRecorder()
    elif variant == "writer_spill":
        rec = Recorder(Path(tmp or tempfile.gettempdir()) / f"spill-{os.getpid()}-{time.monotonic_ns()}",
                       flush_interval_s=1.0)
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
    res = simulate({"resnet50": 15}, num_gpus=2, workers=1, duration_s=a.duration, seed=a.seed,
                   workload=lambda ids: Poisson(ids, rate=a.rate, slo_ms=100, seed=7), recorder=rec)
    w0, c0 = time.perf_counter(), time.process_time()
    rows, convert, read = (0, 0), 0.0, 0.0
    if rec is not None:
        rec.close()
    main = time.thread_time() - t0
    wall, cpu = res.wall_s + time.perf_counter() - w0, res.cpu_s + time.process_time() - c0
    inner = rec.inner if isinstance(rec, (KeywordOnly, TuplesOnly, TimedCalls)) else rec
    if isinstance(inner, Recorder):
        rows, convert = (inner.num_requests, inner.num_actions), inner.convert_cpu_s
        r0 = time.process_time()   # reading the frames afterwards (not part of the run's figures)
        inner.requests(), inner.actions()
        read = time.process_time() - r0
    if variant == "writer_spill":
        shutil.rmtree(rec.spill_dir, ignore_errors=True)
    timed = rec.per_call_ns() if isinstance(rec, TimedCalls) else None
    return {"timed_calls": timed, "wall_s": wall, "cpu_s": cpu, "main_thread_cpu_s": main,
            "convert_cpu_s": convert, "read_cpu_s": read,
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
            "requests": res.submitted, "request_rows": rows[0], "action_rows": rows[1]}


def _one_process(variant: str, a: argparse.Namespace) -> dict:
    """One run in a fresh interpreter (after a short warm-up run of the same variant there): no run inherits
    another's heap, and the order of the variants cannot leak into the figures."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench.telemetry_overhead", "--one", variant, "--warm", "--duration",
           str(a.duration), "--rate", str(a.rate), "--seed", str(a.seed)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _spread(xs: list[float]) -> dict:
    s = sorted(xs)
    n = len(s)
    return {"median": statistics.median(s), "q1": s[(n - 1) // 4], "q3": s[(3 * (n - 1) + 3) // 4],
            "min": s[0], "max": s[-1]}


def side_by_side(a: argparse.Namespace) -> dict:
    """Every round runs each variant once, each in a fresh process, in a shuffled order (seeded); the ratios
    are paired within a round, so slow spells of the shared machine hit both sides of a ratio."""
    import random

    variants = ["off", "off_again", "gather_only", "writer", "positional", "writer_spill", "keywords"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for k in range(a.pairs):
        order = variants[:]
        random.Random(k).shuffle(order)
        for v in order:
            runs[v].append(_one_process("off" if v == "off_again" else v, a))
        print(f"  round {k + 1}/{a.pairs}: " + ", ".join(f"{v} {runs[v][-1]['cpu_s']:.3f}" for v in variants),
              flush=True)
    out: dict[str, Any] = {"runs": runs, "variants": {}}
    off = runs["off"]
    n_req = off[0]["requests"]
    best_off = min(r["cpu_s"] for r in off)
    for v in variants:
        if v == "off":
            continue
        rw = [r["wall_s"] / o["wall_s"] for r, o in zip(runs[v], off)]
        rc = [r["cpu_s"] / o["cpu_s"] for r, o in zip(runs[v], off)]
        best = min(r["cpu_s"] for r in runs[v])
        out["variants"][v] = {
            "wall_ratio_median": statistics.median(rw), "cpu_ratio_median": statistics.median(rc),
            "cpu_ratio_spread": _spread(rc), "wall_ratios": rw, "cpu_ratios": rc,
            "cpu_ns_per_request_median": (statistics.median(rc) - 1) * best_off / n_req * 1e9,
            "cpu_ratio_of_best": best / best_off, "cpu_ns_per_request_best": (best - best_off) / n_req * 1e9,
            "convert_ns_per_request_median": statistics.median(r["convert_cpu_s"] for r in runs[v]) / n_req * 1e9,
            "read_ns_per_request_median": statistics.median(r.get("read_cpu_s", 0.0) for r in runs[v]) / n_req * 1e9,
            "diff_vs_gather_ns_per_request_median": statistics.median(
                (r["cpu_s"] - g["cpu_s"]) for r, g in zip(runs[v], runs["gather_only"])) / n_req * 1e9,
            "minor_faults_median": statistics.median(r["minor_faults"] for r in runs[v]),
            "request_rows": runs[v][0]["request_rows"], "action_rows": runs[v][0]["action_rows"]}
    out["requests"] = n_req
    timed: dict[str, list[dict]] = {"positional_timed": [], "gather_timed": []}
    for k in range(a.timed_runs):   # alternating: the recorder's own cost per call, from timing each call
        for v in (("positional_timed", "gather_timed") if k % 2 == 0 else ("gather_timed", "positional_timed")):
            timed[v].append(_one_process(v, a))
    if a.timed_runs:
        per = {v: statistics.median(r["timed_calls"]["block_median_ns"] for r in rs) for v, rs in timed.items()}
        mean = {v: statistics.median(r["timed_calls"]["mean_ns"] for r in rs) for v, rs in timed.items()}
        calls = timed["positional_timed"][0]["timed_calls"]["calls"]
        own, own_mean = (d["positional_timed"] - d["gather_timed"] for d in (per, mean))
        out["timed_calls"] = {"runs": timed, "block_median_ns": per, "mean_ns": mean,
                              "calls_per_request": calls / n_req,
                              "recorder_ns_per_call": own, "recorder_ns_per_request": own * calls / n_req,
                              "recorder_ns_per_call_mean": own_mean,
                              "recorder_ns_per_request_mean": own_mean * calls / n_req}
    out["off_wall_s_median"] = statistics.median(r["wall_s"] for r in off)
    out["off_cpu_s_median"] = statistics.median(r["cpu_s"] for r in off)
    out["off_minor_faults_median"] = statistics.median(r["minor_faults"] for r in off)
    return out


def instructions(a: argparse.Namespace) -> dict:
    """Instructions executed per simulated request (valgrind's callgrind: deterministic, immune to the noise of
    a shared machine, blind to cache effects): each variant at two durations; the difference divided by the
    difference in requests cancels start-up and fixed costs."""
    import re
    import subprocess
    import sys

    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    variants = ["off", "gather_only", "positional", "writer"]
    out: dict[str, Any] = {"durations_s": list(a.instr_durations), "variants": {}}
    points: dict[str, list] = {v: [] for v in variants}
    for v in variants:   # both lengths back to back: each slope comes from one version of the code
        for dur in a.instr_durations:
            cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
                   "bench.telemetry_overhead", "--one", v, "--duration", str(dur), "--rate", str(a.rate),
                   "--seed", str(a.seed)]
            # same code paths every run; one BLAS thread: idle OpenBLAS threads spin a while after start-up, a
            # varying count under valgrind's serialised threads
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"})
            ir = int(re.search(r"Collected\s*:\s*(\d+)", p.stderr).group(1))
            points[v].append((json.loads(p.stdout.strip().splitlines()[-1])["requests"], ir))
            print(f"  {v} {dur:g} s: {points[v][-1][0]:,} requests, {ir:,} instructions", flush=True)
    for v, ((n0, i0), (n1, i1)) in points.items():
        out["variants"][v] = {"points": points[v], "per_request": (i1 - i0) / (n1 - n0)}
    base = out["variants"]["off"]["per_request"]
    for v, x in out["variants"].items():
        x["ratio"] = x["per_request"] / base
    return out


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.telemetry_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows per micro measurement")
    p.add_argument("--pairs", type=int, default=12, help="rounds of the side-by-side simulation (>= 5)")
    p.add_argument("--duration", type=float, default=20.0, help="simulated seconds per run")
    p.add_argument("--rate", type=float, default=2000.0, help="requests/s offered in the simulation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sim", action="store_true", help="micro benchmark only")
    p.add_argument("--instructions", action="store_true",
                   help="also count instructions per simulated request under valgrind (several minutes)")
    p.add_argument("--instr-durations", type=float, nargs=2, default=(1.0, 3.0), metavar=("SHORT", "LONG"),
                   help="simulated seconds of the two runs per variant under valgrind")
    p.add_argument("--timed-runs", type=int, default=4,
                   help="runs with each positional call timed, per side (recorder / discarding recorder)")
    p.add_argument("--one", choices=["off", "gather_only", "writer", "positional", "writer_spill", "keywords",
                                     "positional_timed", "gather_timed"],
                   help=argparse.SUPPRESS)
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:   # one simulation (a fresh process of the side-by-side runs, or one of the instruction counts)
        if a.warm:
            simulation(a.one, argparse.Namespace(**{**vars(a), "duration": min(a.duration, 1.0)}), None)
        r = simulation(a.one, a, None)
        print(json.dumps(r))
        return 0
    if a.pairs < 5 and not a.skip_sim:
        p.error("--pairs must be >= 5 (the figure is a median of pairs)")

    m = micro(a.rows)
    sim = None if a.skip_sim else side_by_side(a)
    instr = instructions(a) if a.instructions else None
    res = {"micro_ns": m, "simulation": sim, "instructions": instr, "before": BEFORE,
           "config": {"rows": a.rows, "pairs": a.pairs, "duration_s": a.duration, "rate": a.rate, "seed": a.seed,
                      "timed_runs": a.timed_runs},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "load_average": os.getloadavg()[0], "core": _core()},
           "command": "python -m bench.telemetry_overhead"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "telemetry_overhead.json").write_text(json.dumps(res, indent=1) + "\n")
    md = report(res)
    (RESULTS / "telemetry_overhead.md").write_text(md)
    print(md)
    return 0


NAMES = {"off_again": "off again (the noise: off vs off)",
         "gather_only": "controller gathers each row's values into a tuple, the recorder drops it",
         "writer": "row writers (`Recorder.row_writer`: the controller writes each row into the recorder's memory), "
                   "in memory",
         "positional": "positional tuples `add_request_row(t)` (the controller's path before row writers), in memory",
         "writer_spill": "row writers, spilling Parquet parts every 1 s",
         "keywords": "keyword calls `add_request(**row)` (the controller's fallback), in memory"}


def _verdict(sim: dict) -> tuple[bool, dict, dict]:
    """(recording on lies inside the off/off noise, positional spread, off/off spread): its median ratio within
    the off-again quartiles."""
    v = sim["variants"]
    p, o = v["writer"]["cpu_ratio_spread"], v["off_again"]["cpu_ratio_spread"]
    return o["q1"] <= p["median"] <= o["q3"], p, o


def _core() -> str:
    """How the simulation core runs in this tree (the simulations run in child processes that import the same)."""
    import workbench.controller.controller  # noqa: F401 - loads the core as the children do
    from bench.controller_common import core_description
    return core_description()


def report(res: dict) -> str:
    m, sim, ins, c = res["micro_ns"], res["simulation"], res["instructions"], res["config"]
    head = [f"# Telemetry recording overhead (`{res['command']}`)", "",
            f"Machine: {res['machine']['cpus']} CPUs, load average {res['machine']['load_average']:.1f} at the end "
            f"(shared with other work). Python {res['machine']['python']}. Simulation core (controller, clock, "
            f"emulated worker, the telemetry row writer; the rest of the recorder is plain "
            f"Python): {res['machine'].get('core', 'interpreted')}.", ""]
    lines = head + summary(res) + [
             f"## (a) Per row (best of 5, {c['rows']:,} rows, full rows as the controller sends them)", "",
             "| API | request row (16 columns) ns | action row (23 columns) ns |", "| --- | --- | --- |",
             f"| `add_request_row(t)` / `add_action_row(t)`: the positional fast path (the call, and packing "
             f"every 256 rows into bytes: what a run pays) | {m['add_request_row_ns']:.0f} | "
             f"{m['add_action_row_ns']:.0f} |",
             f"| `writer.write(t)` with `writer = recorder.row_writer(kind)`: each row packed at once into the "
             f"recorder's memory (called from Python here; the compiled controller calls it natively) | "
             f"{m.get('request_writer_ns', float('nan')):.0f} | {m.get('action_writer_ns', float('nan')):.0f} |",
             f"| `add_request(**row)` / `add_action(**row)`: keywords (likewise) | {m['add_request_ns']:.0f} | "
             f"{m['add_action_ns']:.0f} |",
             f"| building the polars frames from the packed rows, per row (the difference of the next row and the "
             f"first) | {m['request_convert_ns']:.0f} | {m['action_convert_ns']:.0f} |",
             f"| positional call + frames built (all a row costs) | "
             f"{m['add_request_row_with_conversion_ns']:.0f} | {m['add_action_row_with_conversion_ns']:.0f} |",
             "", f"Floors: a do-nothing function called with the 16 keywords {m['kwargs_floor_ns']:.0f} ns; a bare "
             f"`list.append` of the tuple {m['append_floor_ns']:.0f} ns (the loop alone {m['loop_floor_ns']:.0f} ns). "
             f"These loops read {c['rows']:,} tuples built beforehand, so they pay a cache miss per tuple that the "
             f"controller, which packs the tuple it just built, does not; section (c) measures inside the run. "
             f"Before: positional row {PREVIOUS['add_request_row_ns']} ns, all a row cost "
             f"{PREVIOUS['add_request_row_with_conversion_ns']} ns ({PREVIOUS['source']}); `add_request` "
             f"{BEFORE['add_request_ns']} ns, `add_action` {BEFORE['add_action_ns']} ns ({BEFORE['source']}).", ""]
    if sim is not None:
        v = sim["variants"]
        per_req_off = sim["off_cpu_s_median"] / sim["requests"] * 1e9
        lines += [f"## (b) Side by side: simulation with recording on vs off ({c['pairs']} rounds, each run a fresh "
                  "process, order shuffled)", "",
                  f"Controller + one emulated H200 worker (2 GPUs), 15 ResNet-50 copies, Poisson {c['rate']:g} r/s, "
                  f"{c['duration_s']:g} s simulated: {sim['requests']:,} requests, "
                  f"{v['writer']['request_rows']:,} request rows and {v['writer']['action_rows']:,} action "
                  f"rows per run. Recording off: median {sim['off_wall_s_median']:.2f} s wall, "
                  f"{sim['off_cpu_s_median']:.2f} s CPU ({per_req_off:,.0f} ns CPU per request). Each round gives "
                  f"a ratio on/off per variant; recorder.close() included. The controller records through the "
                  f"recorder's row writers where it has them, else with positional tuples, else keywords.", "",
                  "| recording | CPU on/off, median | quartiles | min-max | wall on/off, median | "
                  "CPU minus gather-only, ns per request (median of the rounds) | recorder building frames during "
                  "the run, ns CPU per request | first read after the run (frames built), ns CPU per request | "
                  "minor page faults per run | CPU ratios per round |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key in ("off_again", "gather_only", "writer", "positional", "writer_spill", "keywords"):
            if key in v:
                x = v[key]
                q = x["cpu_ratio_spread"]
                diff = "" if key in ("off_again", "gather_only") else \
                    f"{x['diff_vs_gather_ns_per_request_median']:,.0f}"
                lines.append(f"| {NAMES[key]} | {x['cpu_ratio_median']:.3f} | {q['q1']:.3f}-{q['q3']:.3f} | "
                             f"{q['min']:.3f}-{q['max']:.3f} | {x['wall_ratio_median']:.3f} | {diff} | "
                             f"{x['convert_ns_per_request_median']:,.0f} | {x['read_ns_per_request_median']:,.0f} | "
                             f"{x['minor_faults_median']:,.0f} | {', '.join(f'{r:.3f}' for r in x['cpu_ratios'])} |")
        lines += ["", f"Recording off: {sim['off_minor_faults_median']:,.0f} minor page faults per run (median)."]
        within, p, o = _verdict(sim)
        wr = v["writer"]
        tc = sim.get("timed_calls")
        if tc:
            pr = tc["block_median_ns"]
            lines += ["", f"## (c) The recorder's own cost inside the run, call by call ({c['timed_runs']} runs "
                      "per side, alternating)", "",
                      "The positional tuple path (`add_request_row(t)`). Each call timed with `perf_counter_ns` "
                      "in the same simulation, once into a "
                      "Recorder and once into a recorder that drops the row (the timing's own cost); per run the "
                      "median over blocks of 2,048 consecutive calls of the block's mean (robust to the calls the "
                      "shared machine preempts; a block holds ~7 packings of 256 request rows and ~1 of action "
                      "rows), then "
                      "the median over the runs.", "",
                      "| calls into | ns per call (block median) | runs | plain mean per call, ns (per run) |",
                      "| --- | --- | --- | --- |"]
            for key, label in (("positional_timed", "Recorder (positional fast path)"),
                               ("gather_timed", "a recorder that drops the row")):
                rs = [r["timed_calls"] for r in tc["runs"][key]]
                blocks = ", ".join(f"{r['block_median_ns']:,.0f}" for r in rs)
                means = ", ".join(f"{r['mean_ns']:,.0f}" for r in rs)
                lines.append(f"| {label} | {pr[key]:,.0f} | {blocks} | {means} |")
            lines += ["", f"The recorder's own cost inside the run: {tc['recorder_ns_per_call']:,.0f} ns per call, "
                      f"{tc['calls_per_request']:.2f} calls per request: **{tc['recorder_ns_per_request']:,.0f} ns "
                      f"per request** ({100 * tc['recorder_ns_per_request'] / per_req_off:.2f}% of a request's CPU "
                      f"with recording off); from the plain means (preemptions included): "
                      f"{tc['recorder_ns_per_request_mean']:,.0f} ns per request. The same method applied to the "
                      f"previous recorder ({PREVIOUS['source']}; measured once, plain means, its sealing every "
                      f"16,384 rows being too rare for the block median): {PREVIOUS['timed_ns_per_request_mean']:,} "
                      f"ns per request, so "
                      f"{PREVIOUS['timed_ns_per_request_mean'] / tc['recorder_ns_per_request_mean']:.1f}x less now."]
        own = f"{tc['recorder_ns_per_request']:,.0f} ns per request by (c)" if tc else "see (a)"
        lines += ["", f"What the figures say: recording on (row writers, in memory) takes {p['median']:.3f}x the CPU "
                  f"of recording off; off vs off gives {o['median']:.3f} with quartiles {o['q1']:.3f}-{o['q3']:.3f}, "
                  f"so recording on is **{'within' if within else 'NOT within'}** the off-vs-off noise of this run. "
                  f"Positional tuples instead: {v['positional']['cpu_ratio_median']:.3f}x; the tuple path's own "
                  f"work in the run: {own} (the call and packing the rows into bytes). With row writers, "
                  f"{wr['convert_ns_per_request_median']:,.0f} ns of frame building during the run; the frames are "
                  f"built when first read, after the run ({wr['read_ns_per_request_median']:,.0f} ns per request, "
                  f"once). Paired CPU difference of row writers to the gather-only runs (noisy): "
                  f"{wr['diff_vs_gather_ns_per_request_median']:,.0f} ns per request. Before "
                  f"({PREVIOUS['source']}): {PREVIOUS['cpu_ratio_median']:.3f} (quartiles "
                  f"{PREVIOUS['cpu_ratio_q1']:.3f}-{PREVIOUS['cpu_ratio_q3']:.3f}) against off/off "
                  f"{PREVIOUS['off_again_median']:.3f} "
                  f"({PREVIOUS['off_again_q1']:.3f}-{PREVIOUS['off_again_q3']:.3f}), "
                  f"{PREVIOUS['convert_ns_per_request']:,} ns per request of staging and sealing during the run and "
                  f"{PREVIOUS['minor_faults']:,} minor page faults per run.", ""]
    if ins is not None:
        iv = ins["variants"]
        lines += ["## Instructions per simulated request (valgrind callgrind; deterministic)", "",
                  f"Each variant run at {ins['durations_s'][0]:g} s and {ins['durations_s'][1]:g} s simulated; "
                  "instructions per request from the difference (start-up and fixed costs cancel). Immune to the "
                  "noise of the shared machine; cache effects are not counted.", "",
                  "| recording | instructions per request | vs off |", "| --- | --- | --- |"]
        for key in ("off", "gather_only", "positional", "writer"):
            if key in iv:
                lines.append(f"| {NAMES.get(key, 'off')} | {iv[key]['per_request']:,.0f} | "
                             f"{100 * (iv[key]['ratio'] - 1):+.2f}% |")
        if "gather_only" in iv:
            own = iv["positional"]["per_request"] - iv["gather_only"]["per_request"]
            lines += ["", f"The tuple path's own share (positional minus gather-only): {own:,.0f} instructions per "
                      f"request, {100 * own / iv['off']['per_request']:.2f}% of the simulation. Row writers add "
                      f"{iv['writer']['per_request'] - iv['off']['per_request']:,.0f} instructions per request in "
                      f"all (gathering the values included).", ""]
    lines += [f"Before the positional path, recording cost +{BEFORE['sim_overhead_pct']}% of the same simulation "
              f"({BEFORE['source']})."]
    return "\n".join(lines) + "\n"


def summary(res: dict) -> list[str]:
    m, sim, ins = res["micro_ns"], res["simulation"], res["instructions"]
    out = [f"Summary: a row writer costs the caller {m.get('request_writer_ns', float('nan')):.0f} ns per request row "
           f"called from Python (positional tuples: {m['add_request_row_ns']:.0f} ns; keywords: "
           f"{m['add_request_ns']:.0f} ns)"]
    if sim is not None:
        v = sim["variants"]
        within, p, o = _verdict(sim)
        g = v["gather_only"]["cpu_ratio_spread"]
        out[-1] += (f"; the simulation with recording on takes {p['median']:.3f}x the CPU time of recording off "
                    f"(median of {res['config']['pairs']} paired rounds, quartiles {p['q1']:.3f}-{p['q3']:.3f}); "
                    f"off vs off in the same run: {o['median']:.3f} (quartiles {o['q1']:.3f}-{o['q3']:.3f}, "
                    f"range {o['min']:.3f}-{o['max']:.3f}); the controller gathering each row for a recorder that "
                    f"drops it: {g['median']:.3f}; positional tuples instead of row writers: "
                    f"{v['positional']['cpu_ratio_median']:.3f}. Recording on within the off/off noise (its median "
                    f"inside the off/off quartiles): **{'yes' if within else 'no'}** in this run. In virtual time "
                    f"recording changes nothing the simulation serves (the same outcomes request by request: "
                    f"tests/test_telemetry_row_writer.py), so this is the simulator's own CPU; the serving hot path "
                    f"is measured in real time by `python -m bench.telemetry_hot_path` "
                    f"(bench/results/telemetry_hot_path_compiled.md)")
        tc = sim.get("timed_calls")
        if tc:
            out[-1] += (f". The positional tuple path's own cost inside the run, timed call by call: "
                        f"{tc['recorder_ns_per_request']:,.0f} ns per request (block median; "
                        f"{tc['recorder_ns_per_request_mean']:,.0f} from plain means; the previous recorder by the "
                        f"same method: {PREVIOUS['timed_ns_per_request_mean']:,} from plain means); the aim set for "
                        f"this path before row writers replaced it on the controller's hot path, <= ~300 ns per "
                        f"request, is "
                        f"{'met' if tc['recorder_ns_per_request_mean'] <= 300 else 'NOT met'}")
    if ins is not None:
        iv = ins["variants"]
        out[-1] += (f"; by instruction count (deterministic) recording with row writers adds "
                    f"{100 * (iv['writer']['ratio'] - 1):+.2f}% to the simulation (positional tuples: "
                    f"{100 * (iv['positional']['ratio'] - 1):+.2f}%, of which the controller gathering the values "
                    f"{100 * (iv['gather_only']['ratio'] - 1):+.2f}%)")
    return [out[-1] + ".", ""]


def _expected_ns(m: dict, v: dict) -> float:
    return v["request_rows"] * m["add_request_row_with_conversion_ns"] + \
        v["action_rows"] * m["add_action_row_with_conversion_ns"]


if __name__ == "__main__":
    raise SystemExit(main())
