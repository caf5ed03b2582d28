"""Action ids that cannot key a result (a list, a float equal to an id in flight, a bool, a string, None, a negative
int): every worker answers them INVALID_ACTION, exactly once, naming the problem, and the action in flight whose id
such a value equals keeps its own result. Unhashable ids used to raise TypeError out of submit()."""
import threading
import time

import pytest

from workbench.clock import VirtualClock
from workbench.contract import ClearCache, GetWorkerState, GetWorkerStateResult, Infer, Status, id_problem
from workbench.worker.config import WorkerConfig
from workbench.worker.cpu import CPUWorker
from workbench.worker.emulated import EmulatedWorker
from workbench.worker.process import ProcessWorker
from workbench.worker.profile import Profile

BAD = [[1], 1.0, True, "1", None, -1]
CFG = dict(weights_cache_size="48 MiB", io_pool_size="8 MiB", workspace_pool_size="8 MiB", host_io_pool_size="8 MiB")


class Recorder:
    """Every result in arrival order (ids may not hash)."""

    def __init__(self):
        self.results, self.cv = [], threading.Condition()

    def __call__(self, r):
        with self.cv:
            self.results.append(r)
            self.cv.notify_all()

    def wait(self, n, timeout=30):
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.results) >= n, timeout), self.results
            return list(self.results)


def make(kind, rec):
    if kind == "emulated":
        clock = VirtualClock()
        return EmulatedWorker(clock, 1, Profile.load("h200"), WorkerConfig.load(None, **CFG), rec), clock
    if kind == "cpu":
        return CPUWorker(WorkerConfig.load(None, **CFG), rec), None
    return ProcessWorker("cpu", WorkerConfig.load(None, **CFG), rec), None


@pytest.mark.parametrize("kind", ["cpu", "emulated", "process"])
def test_ids_that_cannot_key_a_result_are_answered_once_and_leave_the_action_in_flight_alone(kind):
    rec = Recorder()
    w, clock = make(kind, rec)
    try:
        now = clock.now() if clock else time.monotonic_ns()
        w.submit(GetWorkerState(id=1, earliest=now + 300_000_000))       # in flight while the rest arrive
        for bad in BAD:
            w.submit(ClearCache(id=bad))
        w.submit(Infer(id=[1], model_id=0))
        if clock:
            clock.run()
        got = rec.wait(len(BAD) + 2)
        time.sleep(0.05 if clock is None else 0)                          # nothing more may come
        assert len(rec.results) == len(BAD) + 2
    finally:
        w.close()
    first = [r for r in got if type(r.id) is int and r.id == 1 and isinstance(r, GetWorkerStateResult)]
    assert len(first) == 1 and first[0].ok, "the action in flight lost its result"
    refused = [r for r in got if r is not first[0]]
    assert sorted(map(repr, (r.id for r in refused))) == sorted(map(repr, BAD + [[1]]))
    for r in refused:
        assert r.status == Status.INVALID_ACTION and r.message == id_problem(r.id), r


def test_the_ready_path_declines_malformed_infers_without_raising():
    """Worker._start_ready (CUDA's one-step start) checks the fields' types before comparing or hashing them."""
    w = CPUWorker(WorkerConfig.load(None, **CFG), Recorder())
    try:
        now = time.monotonic_ns()
        with w.lock:
            for a in (Infer(id=[1]), Infer(id=2, earliest="soon"), Infer(id=3, latest=None), Infer(id=4, gpu=1.0)):
                assert w._start_ready(a, now) is False
    finally:
        w.close()
