"""Issue 9 on the CPU device: the executor's timing must not depend on a busy Python thread in the session.

Inferences of a small model (mlp, batch 1) are submitted ahead of time as the controller does (`earliest` =
now + 20 ms, one every 3 ms) and measured on the worker clock: exec duration, and latency = outputs on the
host - earliest (the delay a controller's prediction cannot know about). Phases alternate idle / busy (a
`while not stop: x += 1` thread in this process) so that load from elsewhere on the machine hits both alike.

Asserted: through the ProcessWorker the busy/idle ratio of the median stays under 1.5 (a noisy 2-core
machine). Printed, not asserted: the same for the in-process CPUWorker, which waits for the interpreter lock
the busy thread holds (see its p99 in the output: milliseconds instead of microseconds).
CPU contention is kept out of it, as it is on the 16-core H200 host: the busy thread runs at nice 19 (a
thread's niceness does not change who holds the interpreter lock, so the in-process worker suffers as much),
and the child runs TVM with one thread (a 2-thread pool would share a core with the busy thread)."""
import os
import threading
import time

import numpy as np
import pytest

from workbench.contract import Infer, LoadModelFromDisk, LoadWeights
from workbench.worker.config import WorkerConfig

SMALL = dict(weights_cache_size="48 MiB", io_pool_size="8 MiB", workspace_pool_size="8 MiB",
             host_io_pool_size="8 MiB")
MARGIN = 1.5


@pytest.fixture(scope="session")
def mlp_artifact(tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "process_worker_mlp_cpu"   # shared with test_worker_process.py
    if not (out / "manifest.json").is_file():
        from workbench.models import zoo
        from workbench.models.compiler import compile_model
        compile_model(zoo.get("mlp"), out, target="cpu", batch_sizes=(1, 2, 4))
    return out


class Results:
    def __init__(self):
        self.got, self.cv = {}, threading.Condition()

    def __call__(self, r):
        with self.cv:
            self.got[r.id] = r
            self.cv.notify_all()

    def wait(self, ids, timeout=120):
        with self.cv:
            assert self.cv.wait_for(lambda: all(i in self.got for i in ids), timeout), "results missing"
            return [self.got.pop(i) for i in ids]


class Busy:
    """A pure-Python CPU-bound loop in a thread of this process (a notebook cell computing)."""

    def __enter__(self):
        self.stop = False
        self.thread = threading.Thread(target=self._spin, name="busy-cell", daemon=True)
        self.thread.start()
        time.sleep(0.02)
        return self

    def _spin(self):
        try:   # lowest CPU priority: on 2 cores it must compete for the interpreter lock, not for a core
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        x = 0
        while not self.stop:
            x += 1

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def measure(worker, res: Results, inputs, first_id: int, rounds=3, batches=2, per_batch=20,
            lead_ns=20_000_000, slot_ns=3_000_000) -> dict:
    """{"idle"|"busy": {"exec": [...], "latency": [...]}} in ns, phases interleaved."""
    out = {k: {"exec": [], "latency": []} for k in ("idle", "busy")}
    next_id = first_id
    for _ in range(rounds):
        for phase in ("idle", "busy"):
            ctx = Busy() if phase == "busy" else None
            if ctx:
                ctx.__enter__()
            try:
                for _ in range(batches):
                    t0 = time.monotonic_ns() + lead_ns
                    ids = list(range(next_id, next_id + per_batch))
                    next_id += per_batch
                    plan = {}
                    for k, i in enumerate(ids):
                        plan[i] = t0 + k * slot_ns
                        worker.submit(Infer(id=i, model_id=0, batch_size=1, inputs=inputs, earliest=plan[i]))
                    for r in res.wait(ids):
                        assert r.ok, r.message
                        out[phase]["exec"].append(r.exec.duration)
                        out[phase]["latency"].append(r.copy_output.end - plan[r.id])
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
    return out


def summary(m: dict) -> dict:
    s = {}
    for what in ("exec", "latency"):
        idle, busy = np.array(m["idle"][what]) / 1e3, np.array(m["busy"][what]) / 1e3
        s[what] = {"idle_p50_us": float(np.median(idle)), "busy_p50_us": float(np.median(busy)),
                   "idle_p99_us": float(np.percentile(idle, 99)), "busy_p99_us": float(np.percentile(busy, 99)),
                   "ratio_p50": float(np.median(busy) / np.median(idle))}
    return s


def prepared(worker, res: Results, path, first_id=1):
    for a in (LoadModelFromDisk(id=first_id, model_id=0, path=str(path)), LoadWeights(id=first_id + 1, model_id=0)):
        worker.submit(a)                      # one after the other: they go to different queues
        (r,) = res.wait([a.id])
        assert r.ok, r.message


def show(label: str, s: dict) -> str:
    return "; ".join(f"{label} {k}: p50 idle {v['idle_p50_us']:.0f} us busy {v['busy_p50_us']:.0f} us "
                     f"(x{v['ratio_p50']:.2f}), p99 idle {v['idle_p99_us']:.0f} us busy {v['busy_p99_us']:.0f} us"
                     for k, v in s.items())


@pytest.mark.slow
def test_a_busy_session_thread_does_not_slow_the_process_worker(mlp_artifact, capsys):
    from workbench.worker.cpu import CPUWorker
    from workbench.worker.process import ProcessWorker
    x = (np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32),)
    cfg = WorkerConfig.load(None, **SMALL)

    res = Results()
    local = CPUWorker(cfg, res)
    try:
        prepared(local, res, mlp_artifact)
        measure(local, res, x, 100, rounds=1, batches=1)                 # warm-up
        in_process = summary(measure(local, res, x, 1000))
    finally:
        local.close()

    res = Results()
    best = None
    w = ProcessWorker("cpu", cfg, res, env={"TVM_NUM_THREADS": "1"})
    try:
        prepared(w, res, mlp_artifact)
        measure(w, res, x, 100, rounds=1, batches=1)
        for attempt in range(2):                                        # a second try if the machine hiccuped
            s = summary(measure(w, res, x, 1000 + 10_000 * attempt))
            if best is None or max(v["ratio_p50"] for v in s.values()) < max(v["ratio_p50"] for v in best.values()):
                best = s
            if all(v["ratio_p50"] < MARGIN for v in best.values()):
                break
    finally:
        w.close()
    with capsys.disabled():
        print("\n" + show("process worker", best) + "\n" + show("in-process worker (not isolated)", in_process))
    for what, v in best.items():
        assert v["ratio_p50"] < MARGIN, (f"process worker {what}: busy p50 {v['busy_p50_us']:.0f} us vs idle "
                                         f"{v['idle_p50_us']:.0f} us")
