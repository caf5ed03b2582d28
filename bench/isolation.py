"""Isolation (issue 9): exec and load latency idle vs with a busy session, in-process vs ProcessWorker, and the
cost of crossing the process boundary.

    python -m bench.isolation --device cpu                      # here: mlp, compiled on the fly
    python -m bench.isolation --device cuda [--models resnet50_cuda,mlp_cuda]   # on the H200

Conditions, interleaved round by round so that drift hits all alike:
- idle: nothing else runs in this (the session's) process;
- thread: a CPU-bound pure-Python loop in a thread (a notebook cell computing);
- thread+pump: that, plus a 4 Hz "chart pump" thread doing 25 ms of Python per tick (a live dashboard).
This process also plays the controller: actions are submitted ahead (`earliest` = now + lead, one per slot).

Per (model, mode, condition), on the worker clock:
- exec: the device-measured exec duration (CUDA events; wall time on the CPU);
- latency: outputs on the host - earliest (what a controller's prediction must absorb);
- late: exec begin - earliest;
- load: LoadWeights duration, and load latency = load end - earliest (evict/load cycles).
Goals (issue 9): p99/p50 <= 1.01 and p50 within 3% of idle, for INFER and LOAD.
Overhead: round trip (submit -> on_result) of a no-op GetWorkerState and of an Infer, process minus
in-process (goal < 100 us).
Writes bench/results/isolation.json/.md for cuda, isolation_cpu.json/.md for cpu. On the CPU, TVM runs one
thread in both modes (TVM_NUM_THREADS=1), so the busy thread competes for the interpreter lock, not for a
core of a 2-core machine."""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np

from bench.worker_common import ARTIFACTS, artifact, pct, write
from workbench.contract import EvictWeights, GetWorkerState, Infer, LoadModelFromDisk, LoadWeights
from workbench.worker.config import WorkerConfig

CPU_CFG = dict(weights_cache_size="64 MiB", io_pool_size="16 MiB", workspace_pool_size="16 MiB",
               host_io_pool_size="16 MiB")
CUDA_CFG = dict(weights_cache_size="2 GiB", io_pool_size="256 MiB", workspace_pool_size="1 GiB",
                host_io_pool_size="256 MiB")
CONDITIONS = ("idle", "thread", "thread+pump")


# --------------------------------------------------------------------------------------- session load
class SessionLoad:
    """The busy-kernel conditions, as threads of this process."""

    def __init__(self, condition: str, pump_hz: float = 4.0, pump_work_s: float = 0.025, nice: int = 0):
        self.condition, self.pump_hz, self.pump_work_s, self.nice = condition, pump_hz, pump_work_s, nice
        self.stop = False
        self.threads: list[threading.Thread] = []

    def _spin(self) -> None:
        if self.nice:   # niceness changes who gets a core, not who holds the interpreter lock
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        x = 0
        while not self.stop:
            x += 1

    def _pump(self) -> None:
        period = 1.0 / self.pump_hz
        nxt = time.monotonic()
        while not self.stop:
            end = time.monotonic() + self.pump_work_s
            rows = []
            while time.monotonic() < end:   # build a chart's data in Python, as a dashboard refresh does
                rows.append({"t": len(rows), "v": len(rows) * 0.5, "k": str(len(rows) % 7)})
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> "SessionLoad":
        if "thread" in self.condition:
            self.threads.append(threading.Thread(target=self._spin, name="busy-cell", daemon=True))
        if "pump" in self.condition:
            self.threads.append(threading.Thread(target=self._pump, name="chart-pump", daemon=True))
        for t in self.threads:
            t.start()
        time.sleep(0.02 if self.threads else 0)
        return self

    def __exit__(self, *exc) -> None:
        self.stop = True
        for t in self.threads:
            t.join()


# --------------------------------------------------------------------------------------------- worker
class Results:
    def __init__(self) -> None:
        self.got: dict = {}
        self.cv = threading.Condition()

    def __call__(self, r) -> None:
        t = time.monotonic_ns()
        with self.cv:
            self.got[r.id] = (r, t)
            self.cv.notify_all()

    def wait(self, ids, timeout: float = 300):
        with self.cv:
            if not self.cv.wait_for(lambda: all(i in self.got for i in ids), timeout):
                raise TimeoutError(f"no result for {[i for i in ids if i not in self.got][:5]}")
            return [self.got.pop(i) for i in ids]


def _cpus(spec: str | None) -> list[int] | None:
    """"2,3" or "8-11" -> CPU numbers (None: not confined)."""
    if not spec:
        return None
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def make_worker(device: str, mode: str, res: Results, args):
    if device == "cpu":
        cfg = WorkerConfig.load(None, **CPU_CFG)
    else:
        cfg = WorkerConfig.load(None, **CUDA_CFG)
    if mode == "process":
        from workbench.worker.process import ProcessWorker
        env = {"TVM_NUM_THREADS": os.environ["TVM_NUM_THREADS"]} if "TVM_NUM_THREADS" in os.environ else None
        return ProcessWorker(device, cfg, res, num_gpus=1, switch_interval=args.switch_interval, env=env,
                             cpus=_cpus(args.worker_cpus))
    if device == "cpu":
        from workbench.worker.cpu import CPUWorker
        return CPUWorker(cfg, res)
    from workbench.worker.cuda import CUDAWorker
    return CUDAWorker(cfg, res, num_gpus=1)


class Ids:
    def __init__(self, start: int = 100) -> None:
        self.n = start

    def take(self, k: int) -> list[int]:
        out = list(range(self.n, self.n + k))
        self.n += k
        return out


def do(w, res: Results, a):
    w.submit(a)
    (r, _), = res.wait([a.id])
    if not r.ok:
        raise RuntimeError(f"{type(a).__name__} {a.id}: {r.status.name}: {r.message}")
    return r


def inputs_for(art, n: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    out = []
    for s in art.inputs:
        if np.issubdtype(np.dtype(s.dtype), np.integer):
            out.append(rng.integers(0, 100, (n, *s.shape)).astype(s.dtype))
        else:
            out.append(rng.standard_normal((n, *s.shape)).astype(s.dtype))
    return tuple(out)


def scheduled_infers(w, res, ids, x, b, n, lead_ns, slot_ns) -> dict:
    t0 = time.monotonic_ns() + lead_ns
    plan = {i: t0 + k * slot_ns for k, i in enumerate(ids.take(n))}
    for i, e in plan.items():
        w.submit(Infer(id=i, model_id=0, batch_size=b, inputs=x, earliest=e))
    out = {"exec": [], "latency": [], "late": []}
    for r, _ in res.wait(list(plan)):
        if not r.ok:
            raise RuntimeError(f"Infer {r.id}: {r.status.name}: {r.message}")
        e = plan[r.id]
        out["exec"].append(r.exec.duration)
        out["latency"].append(r.copy_output.end - e)
        out["late"].append(r.exec.begin - e)
    return out


def scheduled_loads(w, res, ids, n, lead_ns) -> dict:
    out = {"load": [], "load_latency": []}
    for _ in range(n):
        do(w, res, EvictWeights(id=ids.take(1)[0], model_id=0))
        e = time.monotonic_ns() + lead_ns
        r = do(w, res, LoadWeights(id=ids.take(1)[0], model_id=0, earliest=e))
        out["load"].append(r.timing.duration)
        out["load_latency"].append(r.timing.end - e)
    return out


def dma_floor(path: Path, n: int) -> list[int]:
    """The link's own spread: the artifact's weight pages copied from pinned memory to the device page by page
    (as LoadWeights does, here by plain cudaMemcpyAsync calls), timed by CUDA events, n times, in the same run."""
    import cupy as cp
    from workbench.models.artifact import Artifact
    art = Artifact.open(path)
    ps, total = art.page_size, art.num_pages * art.page_size
    host, dev = cp.cuda.alloc_pinned_memory(total), cp.cuda.alloc(total)
    s, e0, e1 = cp.cuda.Stream(non_blocking=True), cp.cuda.Event(), cp.cuda.Event()
    out = []
    for i in range(n + 5):
        e0.record(s)
        for off in range(0, total, ps):
            cp.cuda.runtime.memcpyAsync(dev.ptr + off, host.ptr + off, min(ps, total - off), 1, s.ptr)
        e1.record(s)
        e1.synchronize()
        if i >= 5:
            out.append(int(cp.cuda.get_elapsed_time(e0, e1) * 1e6))
    return out


def stats(samples: list[int], idle_p50: float | None) -> dict:
    p50, p99 = pct(samples, 0.5), pct(samples, 0.99)
    return {"n": len(samples), "p50_us": p50 / 1e3, "p99_us": p99 / 1e3, "max_us": max(samples) / 1e3,
            "p99_over_p50": p99 / p50 if p50 else float("nan"),
            "p50_vs_idle": p50 / idle_p50 if idle_p50 else 1.0}


def bench_model(device: str, path: Path, mode: str, args) -> tuple[list[dict], dict]:
    from workbench.models.artifact import Artifact
    art = Artifact.open(path)
    b = args.batch
    x = inputs_for(art, b)
    res, ids = Results(), Ids()
    w = make_worker(device, mode, res, args)
    info = dict(getattr(w, "info", {}) or {})
    try:
        do(w, res, LoadModelFromDisk(id=1, model_id=0, path=str(path)))
        do(w, res, LoadWeights(id=2, model_id=0))
        warm = scheduled_infers(w, res, ids, x, b, 30, args.lead_ms * 1_000_000, 3_000_000)
        exec_p50 = pct(warm["exec"], 0.5)
        slot = max(args.slot_ms * 1_000_000, int(3 * exec_p50))
        samples = {c: {"exec": [], "latency": [], "late": [], "load": [], "load_latency": []} for c in CONDITIONS}
        conditions = [c for c in CONDITIONS if c in args.conditions.split(",")]
        for _ in range(args.rounds):
            for c in conditions:
                with SessionLoad(c, nice=args.busy_nice):
                    for _ in range(args.batches):
                        for k, v in scheduled_infers(w, res, ids, x, b, args.per_batch, args.lead_ms * 1_000_000,
                                                     slot).items():
                            samples[c][k] += v
                    if args.loads:
                        for k, v in scheduled_loads(w, res, ids, args.loads, args.lead_ms * 1_000_000).items():
                            samples[c][k] += v
    finally:
        w.close()
    rows = []
    for c in conditions:
        for metric, vals in samples[c].items():
            if not vals:
                continue
            idle = pct(samples["idle"][metric], 0.5) if samples["idle"][metric] else None
            rows.append({"device": device, "model": path.name, "batch": b, "mode": mode, "condition": c,
                         "metric": metric, "slot_us": slot / 1e3, **stats(vals, idle)})
    return rows, info


def round_trips(w, res, ids, make, n: int, legs: list | None = None) -> list[int]:
    """Submit -> on_result times; with `legs`, also each trip's legs on the one machine clock (the worker
    stamps `received` and `sent`): to the worker, inside it, and back."""
    out = []
    for _ in range(n):
        a = make(ids.take(1)[0])
        t0 = time.monotonic_ns()
        w.submit(a)
        (r, t1), = res.wait([a.id])
        if not r.ok:
            raise RuntimeError(f"{r.status.name}: {r.message}")
        out.append(t1 - t0)
        if legs is not None:
            legs.append((r.received - t0, r.sent - r.received, t1 - r.sent))
    return out


LEGS = ("to_worker", "in_worker", "back")


def _legs(legs: list) -> dict:
    return {f"{k}_p50_us": pct([x[i] for x in legs], 0.5) / 1e3 for i, k in enumerate(LEGS)}


def overhead(device: str, path: Path, args) -> dict:
    """Round trips idle: no-op and Infer (batch 1, unscheduled), per mode; process minus in-process. Each
    trip is also cut into legs (submit -> worker received -> result sent -> on_result), which shows where the
    boundary's time goes."""
    from workbench.models.artifact import Artifact
    x = inputs_for(Artifact.open(path), 1)
    out = {}
    for mode in ("inprocess", "process"):
        res, ids = Results(), Ids()
        w = make_worker(device, mode, res, args)
        noop_legs: list = []
        infer_legs: list = []
        try:
            do(w, res, LoadModelFromDisk(id=1, model_id=0, path=str(path)))
            do(w, res, LoadWeights(id=2, model_id=0))
            round_trips(w, res, ids, lambda i: GetWorkerState(id=i), 50)
            noop = round_trips(w, res, ids, lambda i: GetWorkerState(id=i), args.overhead_reps, noop_legs)
            round_trips(w, res, ids, lambda i: Infer(id=i, model_id=0, batch_size=1, inputs=x), 30)
            infer = round_trips(w, res, ids, lambda i: Infer(id=i, model_id=0, batch_size=1, inputs=x),
                                args.overhead_reps, infer_legs)
        finally:
            w.close()
        out[mode] = {"noop_p50_us": pct(noop, 0.5) / 1e3, "noop_p99_us": pct(noop, 0.99) / 1e3,
                     "infer_p50_us": pct(infer, 0.5) / 1e3, "infer_p99_us": pct(infer, 0.99) / 1e3,
                     "noop_legs": _legs(noop_legs), "infer_legs": _legs(infer_legs)}
    out["noop_overhead_us"] = out["process"]["noop_p50_us"] - out["inprocess"]["noop_p50_us"]
    out["infer_overhead_us"] = out["process"]["infer_p50_us"] - out["inprocess"]["infer_p50_us"]
    out["model"] = path.name
    return out


_ECHO = """
import os, socket, struct, sys, time
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    m = s.recv(8)
    if not m:
        break
    s.send(struct.pack("q", time.monotonic_ns()))
"""


def wake_floor(n: int = 300, gaps_ms: tuple = (0.0, 0.2, 5.0)) -> list[dict]:
    """This machine's own cost of waking a blocked thread of another process, as a function of how long it slept
    (a socket ping-pong with a bare Python echo process; nothing of the workbench): the floor under every leg
    of a round trip that crosses the process boundary after the receiver has waited, e.g. through an exec."""
    import socket
    import struct
    import subprocess
    import sys
    a, b = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", _ECHO, str(b.fileno())], pass_fds=(b.fileno(),))
    b.close()
    out = []
    try:
        for gap in gaps_ms:
            legs = []
            for _ in range(n):
                time.sleep(gap / 1e3)
                t0 = time.monotonic_ns()
                a.send(b"x" * 8)
                t = struct.unpack("q", a.recv(8))[0]
                legs.append((t - t0, time.monotonic_ns() - t))
            to, back = [x[0] for x in legs], [x[1] for x in legs]
            out.append({"gap_ms": gap, "to_p50_us": pct(to, 0.5) / 1e3, "to_p99_us": pct(to, 0.99) / 1e3,
                        "back_p50_us": pct(back, 0.5) / 1e3, "back_p99_us": pct(back, 0.99) / 1e3})
    finally:
        a.close()
        child.wait(10)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--models", default=None, help="artifact names under --artifacts (default by device)")
    p.add_argument("--artifacts", default=str(ARTIFACTS))
    p.add_argument("--modes", default="inprocess,process")
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batches", type=int, default=2, help="batches of scheduled infers per round and condition")
    p.add_argument("--per-batch", type=int, default=25)
    p.add_argument("--loads", type=int, default=10, help="evict/load cycles per round and condition (0: none)")
    p.add_argument("--lead-ms", type=float, default=20.0, help="earliest = submit time + lead")
    p.add_argument("--slot-ms", type=float, default=3.0, help="min spacing of scheduled infers (>= 3x exec p50)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval in the child (default: Python's 5 ms)")
    p.add_argument("--overhead-reps", type=int, default=500)
    p.add_argument("--busy-nice", type=int, default=0, help="niceness of the busy thread (19: on a 2-core machine "
                                                             "it then competes for the GIL, not for a core)")
    p.add_argument("--name", default=None, help="results file name (default isolation / isolation_cpu)")
    p.add_argument("--worker-cpus", default=None, help="confine the process worker to these CPUs (e.g. 1 or 8-11)")
    p.add_argument("--session-cpus", default=None, help="confine this process (the session: the busy thread, "
                                                          "the pump) to these CPUs (e.g. 0 or 0-7)")
    a = p.parse_args(argv)
    if a.session_cpus:
        os.sched_setaffinity(0, _cpus(a.session_cpus))
    a.lead_ms, a.slot_ms = int(a.lead_ms), int(a.slot_ms)
    if a.device == "cpu":
        os.environ.setdefault("TVM_NUM_THREADS", "1")   # before TVM starts its pool, here and in the child
    wake = wake_floor()
    names = a.models.split(",") if a.models else (["mlp_cpu"] if a.device == "cpu" else ["resnet50_cuda", "mlp_cuda"])
    rows, infos, overheads, floors = [], {}, [], []
    for name in names:
        path = artifact(name, Path(a.artifacts))
        if path is None and a.device == "cpu" and name == "mlp_cpu":
            from bench.worker_artifacts import build
            path, _ = build("mlp", "cpu", Path(a.artifacts), True)
        if path is None:
            print(f"skip {name}: not found under {a.artifacts} (run python -m bench.worker_artifacts)")
            continue
        for mode in a.modes.split(","):
            t0 = time.monotonic()
            r, info = bench_model(a.device, path, mode, a)
            rows += r
            infos[f"{name}/{mode}"] = info
            print(f"{name} {mode}: {time.monotonic() - t0:.0f} s")
        overheads.append(overhead(a.device, path, a))
        if a.device == "cuda" and a.loads:
            per_cell = a.rounds * a.loads
            floor = dma_floor(path, max(per_cell, 120))
            floors.append({"model": name, "cell": stats(floor[:per_cell], None), "all": stats(floor, None)})
    md = ["| model | mode | condition | metric | p50 (us) | p99 (us) | max (us) | p99/p50 | p50 vs idle |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['model']} b{r['batch']} | {r['mode']} | {r['condition']} | {r['metric']} | "
                  f"{r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['max_us']:.1f} | {r['p99_over_p50']:.3f} | "
                  f"{r['p50_vs_idle']:.3f} |")
    md += ["", "| model | in-process no-op p50 / p99 (us) | process no-op p50 / p99 (us) | no-op overhead (us) | "
               "in-process Infer p50 (us) | process Infer p50 (us) | Infer overhead (us) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in overheads:
        ip, pr = o["inprocess"], o["process"]
        md.append(f"| {o['model']} | {ip['noop_p50_us']:.1f} / {ip['noop_p99_us']:.1f} | {pr['noop_p50_us']:.1f} / "
                  f"{pr['noop_p99_us']:.1f} | {o['noop_overhead_us']:.1f} | {ip['infer_p50_us']:.1f} | "
                  f"{pr['infer_p50_us']:.1f} | {o['infer_overhead_us']:.1f} |")
    md += ["", "Round trips cut into legs, p50 (us): submit -> the worker received it -> the worker sent the result "
               "-> on_result.", "", "| model | action | mode | to worker | in worker | back |",
           "| --- | --- | --- | --- | --- | --- |"]
    for o in overheads:
        for kind in ("noop", "infer"):
            for mode in ("inprocess", "process"):
                lg = o[mode][f"{kind}_legs"]
                md.append(f"| {o['model']} | {kind} | {mode} | " + " | ".join(f"{lg[f'{k}_p50_us']:.1f}" for k in LEGS)
                          + " |")
    md += ["", "Wake floor (this machine, same run): a bare Python echo process on a socket pair, pinged after the "
               "sender slept `gap`; to = until the echo process has the message, back = until the reply is read.", "",
           "| gap (ms) | to p50 / p99 (us) | back p50 / p99 (us) |", "| --- | --- | --- |"]
    md += [f"| {w['gap_ms']:g} | {w['to_p50_us']:.1f} / {w['to_p99_us']:.1f} | {w['back_p50_us']:.1f} / "
           f"{w['back_p99_us']:.1f} |" for w in wake]
    if floors:
        md += ["", "Load floor (the hardware's spread, same run): the same weight pages copied from pinned memory "
                   "by plain cudaMemcpyAsync calls, event-timed, back to back.", "",
               "| model | copies | p50 (us) | p99 (us) | p99/p50 |", "| --- | --- | --- | --- | --- |"]
        for f in floors:
            for k in ("cell", "all"):
                q = f[k]
                md.append(f"| {f['model']} | {q['n']} | {q['p50_us']:.1f} | {q['p99_us']:.1f} | "
                          f"{q['p99_over_p50']:.3f} |")
    md += ["", f"Infers (batch {a.batch}) submitted {a.lead_ms} ms ahead, one per slot (>= {a.slot_ms} ms and 3x exec "
               f"p50), {a.rounds} rounds x {a.batches} x {a.per_batch} per condition; {a.loads} evict/load cycles per "
               "round. exec = device-measured duration; latency = outputs on host - earliest; late = exec begin - "
               "earliest; load = LoadWeights duration; load_latency = load end - earliest. Conditions: idle; thread = "
               f"a pure-Python busy loop in a session thread (nice {a.busy_nice}); thread+pump = that plus 25 ms of "
               f"Python at 4 Hz. Worker CPUs: {a.worker_cpus or 'any'}; session CPUs: {a.session_cpus or 'any'}. "
               "Goals (issue 9): p99/p50 <= 1.01 and p50 within 3% of idle for exec and load; overhead < 100 us. "
               f"Process worker child: {next((v for k, v in infos.items() if k.endswith('/process')), {})}."]
    write(a.name or ("isolation" if a.device == "cuda" else "isolation_cpu"),
          {"rows": rows, "overhead": overheads, "load_floor": floors, "wake_floor": wake, "child": infos,
           "args": vars(a)}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
