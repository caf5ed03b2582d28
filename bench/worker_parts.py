"""Where the worker's overhead per action goes, part by part, next to the floors a Python worker cannot go below.

    python -m bench.worker_parts [--device cuda] [--models mlp_cuda,resnet50_cuda] [--reps 300]

(a) Thread hand-off floor: the round trip of the benchmark's caller handing work to another Python thread and
    being woken by its answer (a `threading.Condition` each way, as `bench.worker_exec` waits for on_result), hot
    (back to back) and idle (the caller sleeps the given exec time first, as it does while an action runs). The
    in-process worker's result is delivered from its executor thread, so one wake of a sleeping caller is part of
    any end-to-end figure; the hand-off to the executor thread that waits for the GPU is the other.
(b) The worker's path traced: Infer actions one at a time, submitted as bench.worker_exec and the process worker's
    host submit them (`answer_here`: an exec within submit_wait_max is waited for in submit), each step stamped
    (`perf_counter_ns`) by wrappers around the worker's own methods; the p50 of each gap between consecutive
    stamps. The wrappers add ~0.3-1 us per stamp.
(c) CUDA (cupy) host-call costs on this machine: the calls one action makes, each timed alone (p50 of 2,000).
(d) Code after a wait: the same Python (`_after_exec`: what the worker does between an exec's end and its result,
    in kind) run by a thread right after it waited D ms for a CUDA event ('cold'), after it slept until 300 us
    before the end and ran that code once ('warmed', what the worker's exec_wake_ahead does), and after it polled
    the event from a Python loop ('polled': the interpreter kept running, that code and its data not).
Writes bench/results/worker_parts.json and .md.
"""
from __future__ import annotations

import argparse
import functools
import platform
import threading
import time
from pathlib import Path

import numpy as np

from bench.worker_common import ARTIFACTS, artifact, pct, write
from bench.worker_exec import CFG, inputs_for
from workbench.contract import Infer, LoadModelFromDisk, LoadWeights
from workbench.worker.config import WorkerConfig


# ------------------------------------------------------------------------------------------- (a) hand-off floor
def handoff(reps: int, idle_s: float) -> dict:
    """p50/p99 (us) of a round trip caller -> thread -> caller through two Conditions."""
    cv = threading.Condition()
    state = {"job": 0, "done": 0, "stop": False}

    def serve() -> None:
        with cv:
            while not state["stop"]:
                while state["job"] == state["done"] and not state["stop"]:
                    cv.wait(0.5)
                state["done"] = state["job"]
                cv.notify_all()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = []
    for i in range(reps + 20):
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter_ns()
        with cv:
            state["job"] += 1
            cv.notify_all()
            cv.wait_for(lambda: state["done"] == state["job"], 5)
        if i >= 20:
            out.append(time.perf_counter_ns() - t0)
    with cv:
        state["stop"] = True
        cv.notify_all()
    t.join()
    return {"p50_us": pct(out, 0.5) / 1e3, "p99_us": pct(out, 0.99) / 1e3}


# ------------------------------------------------------------------------------------------- (b) traced steps
class Tracer:
    def __init__(self) -> None:
        self.stamps: list[tuple[str, int]] = []
        self.undo: list = []

    def stamp(self, name: str) -> None:
        self.stamps.append((name, time.perf_counter_ns()))

    def wrap(self, owner: type, attr: str) -> None:
        fn = owner.__dict__[attr]
        stamp, name = self.stamp, f"{owner.__name__}.{attr}"

        @functools.wraps(fn)
        def wrapped(*a, **kw):
            stamp(name + " >")
            try:
                return fn(*a, **kw)
            finally:
                stamp(name + " <")
        setattr(owner, attr, wrapped)
        self.undo.append((owner, attr, fn))

    def restore(self) -> None:
        for owner, attr, fn in reversed(self.undo):
            setattr(owner, attr, fn)


def traced(path: Path, art, device: str, b: int, reps: int, warmup: int) -> dict:
    from workbench.worker import base, executor
    tr = Tracer()
    if device == "cpu":
        from workbench.worker.cpu import CPUDevice as Dev, CPUWorker as W
    else:
        from workbench.worker.cuda import CUDADevice as Dev, CUDAWorker as W
    for owner, attrs in ((base.Worker, ("submit", "_start_ready", "_deliver")),
                         (base.CopyInputTask, ("begin", "finish")),
                         (base.ExecTask, ("begin", "launch", "wait", "prepare", "finish", "run")),
                         (executor.ThreadExecutor, ("_run_inline", "wait_here")),
                         (Dev, ("copy_input", "launch_ready", "launch_exec", "wait_exec", "execute"))):
        for attr in attrs:
            if attr in owner.__dict__:
                tr.wrap(owner, attr)
    cv = threading.Condition()
    box: dict = {}

    def on(r):
        tr.stamp("on_result")
        with cv:
            box[r.id] = r
            cv.notify_all()

    w = W(WorkerConfig.load(None, **CFG), on, num_gpus=1) if device == "cuda" else W(WorkerConfig.load(None, **CFG), on)

    def do(a):
        w.submit(a, answer_here=True)      # as the process worker's host submits
        with cv:
            cv.wait_for(lambda: a.id in box, 120)
            r = box.pop(a.id)
        tr.stamp("caller woke")
        return r
    gaps: dict[str, list[int]] = {}
    try:
        assert do(LoadModelFromDisk(id=1, model_id=0, path=str(path))).ok
        assert do(LoadWeights(id=2, model_id=0, gpu=0)).ok
        x = tuple(inputs_for(art, b, np.random.default_rng(0)))
        order: list[str] = []
        for i in range(warmup + reps):
            tr.stamps.clear()
            tr.stamp("caller submits")
            r = do(Infer(id=10 + i, model_id=0, gpu=0, batch_size=b, inputs=x))
            assert r.ok, r.message
            if i < warmup:
                continue
            s = tr.stamps
            for (n0, t0), (n1, t1) in zip(s, s[1:]):
                k = f"{n0} -> {n1}"
                if k not in gaps:
                    gaps[k] = []
                    order.append(k)
                gaps[k].append(t1 - t0)
            gaps.setdefault("total", []).append(s[-1][1] - s[0][1])
            gaps.setdefault("exec (CUDA events)", []).append(r.exec.duration)
    finally:
        w.close()
        tr.restore()
    return {k: {"p50_us": pct(v, 0.5) / 1e3, "n": len(v)} for k, v in gaps.items()}


# ------------------------------------------------------------------------------------------- (c) CUDA call costs
def cuda_calls(reps: int = 2000) -> dict:
    import cupy as cp
    rt = cp.cuda.runtime
    s = cp.cuda.Stream(non_blocking=True)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    host4k, host600k = np.ones(1024, np.float32), np.ones(150_528, np.float32)
    dev = cp.empty(1 << 22, cp.uint8)
    dev2 = cp.empty(1 << 22, cp.uint8)
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(1 << 20), np.uint8)
    e0.record(s)
    e0.synchronize()
    def device_context() -> None:
        with cp.cuda.Device(0):
            pass

    calls = {
        "with cp.cuda.Device(0)": device_context,
        "Event.record": lambda: e1.record(s),
        "stream.wait_event": lambda: s.wait_event(e0),
        "memcpyAsync H2D 4 KB pageable": lambda: rt.memcpyAsync(dev.data.ptr, host4k.ctypes.data, 4096, 1, s.ptr),
        "memcpyAsync H2D 602 KB pageable": lambda: rt.memcpyAsync(dev.data.ptr, host600k.ctypes.data, 602_112, 1,
                                                                   s.ptr),
        "memcpyAsync D2D 4 KB": lambda: rt.memcpyAsync(dev2.data.ptr, dev.data.ptr, 4096, 3, s.ptr),
        "memcpyAsync D2H 4 KB pinned": lambda: rt.memcpyAsync(pinned.ctypes.data, dev.data.ptr, 4096, 2, s.ptr),
        "Event.synchronize (done)": lambda: e0.synchronize(),
        "Event.done": lambda: e0.done,
        "get_elapsed_time": lambda: cp.cuda.get_elapsed_time(e0, e0),
        "numpy copy of 4 KB": lambda: pinned[:4096].view(np.float32).copy(),
        "np.ascontiguousarray(4 KB)": lambda: np.ascontiguousarray(host4k),
        "time.monotonic_ns": time.monotonic_ns,
    }
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        calls["NVML SM clock read"] = lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
    except Exception:  # noqa: BLE001 - optional
        pass
    out = {}
    for name, fn in calls.items():
        ts = []
        for i in range(reps):
            t0 = time.perf_counter_ns()
            fn()
            ts.append(time.perf_counter_ns() - t0)
            if i % 64 == 63:
                s.synchronize()
        s.synchronize()
        out[name] = pct(ts, 0.5) / 1e3
    return out


# ------------------------------------------------------------------------------------------- (d) code after a wait
WARM_AHEAD_NS = 300_000


def after_wait(reps: int, durations_ms: tuple[float, ...] = (5.0, 20.0)) -> dict:
    """Per wait length and mode (cold, warmed, polled; interleaved, rotating order): p50 of the time from the
    caller's launch to the end of `_after_exec` in the waiting thread minus the GPU time (us), of `_after_exec`
    alone (us), and the waiting thread's CPU time over the wait (1: it spun)."""
    import cupy as cp
    from workbench.contract import Infer, InferResult, Status, Timing
    from workbench.env.floors import KERNELS_SRC
    from workbench.worker.pools import MemoryPool
    kernel, sink = cp.RawKernel(KERNELS_SRC, "wb_busy"), cp.zeros(1, cp.float32)   # busy for a given time
    stream = cp.cuda.Stream(non_blocking=True)
    start, end, done0, done1 = (cp.cuda.Event() for _ in range(4))
    done0.record(stream)
    done1.record(stream)
    done1.synchronize()
    pool, lock, cv = MemoryPool("workspace", 1 << 20), threading.RLock(), threading.Condition()
    host_out, action = np.zeros(1000, np.float32), Infer(id=1, model_id=0, gpu=0, batch_size=1)

    def _after_exec(events) -> InferResult:
        with lock:
            pool.free(pool.alloc(4096))
            t = Timing(1, 2, int(cp.cuda.get_elapsed_time(*events) * 1e6))
            r = InferResult(id=action.id, action_type=action.type, status=Status.SUCCESS, received=0,
                            sent=time.monotonic_ns(), gpu=0, batch_size=1, copy_input=t, exec=t, copy_output=t,
                            outputs=(host_out.copy(),))
            {1: action}.pop(1)
        return r

    job: dict = {}

    def waiter() -> None:
        while True:
            with cv:
                cv.wait_for(lambda: "go" in job)
                go = job.pop("go")
            if go is None:
                return
            mode, launched, ns = go
            if mode == "warmed":
                time.sleep(max(0, launched + ns - WARM_AHEAD_NS - time.monotonic_ns()) / 1e9)
                _after_exec((done0, done1))
            c0, w0 = time.thread_time_ns(), time.monotonic_ns()
            if mode == "polled":
                while not end.done:
                    pass
            else:
                end.synchronize()
            w1, c1 = time.monotonic_ns(), time.thread_time_ns()
            _after_exec((start, end))
            with cv:
                job["r"] = (time.monotonic_ns(), time.monotonic_ns() - w1, (c1 - c0) / max(1, w1 - w0))
                cv.notify_all()

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    modes = ("cold", "warmed", "polled")
    out: dict = {}
    try:
        for ms in durations_ms:
            ns = int(ms * 1e6)
            got: dict = {m: [] for m in modes}
            for i in range(reps + 20):
                for mode in modes[i % 3:] + modes[:i % 3]:
                    time.sleep(0.003)
                    t0 = time.monotonic_ns()
                    start.record(stream)
                    kernel((1,), (32,), (sink, np.uint64(ns)), stream=stream)
                    end.record(stream)
                    with cv:
                        job["go"] = (mode, t0, ns)
                        cv.notify_all()
                        if not cv.wait_for(lambda: "r" in job, 10):
                            raise RuntimeError("the waiting thread died")
                        t2, after, cpu = job.pop("r")
                    if i >= 20:
                        gpu = cp.cuda.get_elapsed_time(start, end) * 1e6
                        got[mode].append((t2 - t0 - gpu, after, cpu))
            for mode, v in got.items():
                a = np.array(v)
                out[f"{ms:g} ms {mode}"] = {"e2e_minus_gpu_us": float(np.median(a[:, 0])) / 1e3,
                                            "after_exec_us": float(np.median(a[:, 1])) / 1e3,
                                            "wait_cpu_fraction": float(np.median(a[:, 2]))}
    finally:
        with cv:
            job["go"] = None
            cv.notify_all()
        th.join(10)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_parts", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--models", default=None)
    p.add_argument("--artifacts", default=str(ARTIFACTS))
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    a = p.parse_args(argv)
    from workbench.models.artifact import Artifact
    names = a.models.split(",") if a.models else (["mlp_cpu"] if a.device == "cpu" else ["mlp_cuda", "resnet50_cuda"])
    res: dict = {"handoff": {}, "traced": {}, "cuda_calls": {}, "after_wait": {}}
    for idle_ms in (0.0, 0.1, 5.0):
        res["handoff"][f"idle {idle_ms:g} ms"] = handoff(a.reps, idle_ms / 1e3)
    for name in names:
        path = artifact(name, Path(a.artifacts))
        if path is None and name == "mlp_cpu":
            from bench.worker_artifacts import build
            path, _ = build("mlp", "cpu", Path(a.artifacts), True)
        art = Artifact.open(path)
        for b in (int(x) for x in a.batch_sizes.split(",")):
            res["traced"][f"{name} b{b}"] = traced(path, art, a.device, b, a.reps, a.warmup)
    if a.device == "cuda":
        res["cuda_calls"] = cuda_calls()
        res["after_wait"] = after_wait(a.reps // 3)
    md = [f"Python {platform.python_version()}, {a.reps} reps. Part (a): round trip caller -> thread -> caller "
          f"(two Condition hand-offs), after the caller idled:", "", "| idle before | p50 (us) | p99 (us) |",
          "| --- | --- | --- |"]
    md += [f"| {k} | {v['p50_us']:.1f} | {v['p99_us']:.1f} |" for k, v in res["handoff"].items()]
    for k, steps in res["traced"].items():
        md += ["", f"Part (b): {k}, p50 of each gap between consecutive stamps (us):", "", "| gap | p50 (us) | n |",
               "| --- | --- | --- |"]
        md += [f"| {g} | {v['p50_us']:.1f} | {v['n']} |" for g, v in steps.items()]
    if res["cuda_calls"]:
        md += ["", "Part (c): host cost of one call, p50 (us):", "", "| call | p50 (us) |", "| --- | --- |"]
        md += [f"| {k} | {v:.2f} |" for k, v in res["cuda_calls"].items()]
    if res["after_wait"]:
        md += ["", f"Part (d): code after a wait, p50 of {a.reps // 3} per row (modes interleaved). e2e = the caller's "
               "launch of a D ms kernel -> the waiting thread done with `_after_exec`, minus the kernel's time; "
               "wait CPU = the waiting thread's CPU time over its wait (1: it spun):", "",
               "| wait, mode | e2e - GPU (us) | _after_exec (us) | wait CPU |", "| --- | --- | --- | --- |"]
        md += [f"| {k} | {v['e2e_minus_gpu_us']:.1f} | {v['after_exec_us']:.1f} | {v['wait_cpu_fraction']:.2f} |"
               for k, v in res["after_wait"].items()]
    write("worker_parts", res, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
