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
                assert w._start_ready(a, now) is None
    finally:
        w.close()


@pytest.mark.parametrize("kind", ["cpu", "emulated", "process"])
def test_bools_are_not_ints_in_any_integer_field(kind):
    """True would quietly be model 1 or gpu 1: every integer field refuses a bool, naming the field."""
    from workbench.contract import LoadModelFromDisk, LoadWeights
    cases = {10: (LoadWeights(id=10, model_id=True), Status.INVALID_ACTION, "model_id"),
             11: (Infer(id=11, gpu=True), Status.INVALID_GPU, "gpu True"),
             12: (Infer(id=12, earliest=True), Status.INVALID_ACTION, "earliest/latest"),
             13: (LoadModelFromDisk(id=13, model_id=True, path="profile:resnet50"), Status.INVALID_MODEL_ID, "model_id"),
             14: (LoadModelFromDisk(id=14, model_id=7, path="profile:resnet50", copies=True), Status.INVALID_ACTION,
                  "copies"),
             15: (Infer(id=15, batch_size=True), Status.INVALID_ACTION, "batch_size")}
    rec = Recorder()
    w, clock = make(kind, rec)
    try:
        for a, _, _ in cases.values():
            w.submit(a)
        if clock:
            clock.run()
        got = {r.id: r for r in rec.wait(len(cases))}
    finally:
        w.close()
    for i, (_, status, field) in cases.items():
        assert got[i].status == status and field in got[i].message, got[i]
