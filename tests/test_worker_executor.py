"""ThreadExecutor's inline starts: a non-blocking task runs in the submitting thread, a split task launches
there and is waited for by the executor's own thread, and every task still ends with exactly one result."""
from __future__ import annotations

import threading
import time

from workbench.contract import ErrorResult, GetWorkerState, Status, Timing
from workbench.worker.base import MonotonicClock
from workbench.worker.executor import Task, ThreadExecutor


class Probe(Task):
    """A task that records which thread ran each step; `wait` blocks until `gpu_done` is set (a real event
    set by another thread, standing for the GPU finishing)."""
    __slots__ = ("name", "log", "gpu_done", "fail_launch")

    def __init__(self, name: str, log: list, split: bool = False, inline: bool = False, fail_launch: bool = False):
        super().__init__(0, 1 << 62)
        self.name, self.log, self.fail_launch = name, log, fail_launch
        self.gpu_done = threading.Event()
        if split:
            self.__class__ = SplitProbe
        elif inline:
            self.__class__ = InlineProbe

    def _note(self, step: str) -> None:
        self.log.append((self.name, step, threading.current_thread().name))

    def begin(self, now):
        self._note("begin")
        return None

    def run(self, now):
        self._note("run")
        return Timing(now, now, 0)

    def launch(self, now):
        self._note("launch")
        if self.fail_launch:
            raise RuntimeError("launch failed")

    def wait(self):
        self.gpu_done.wait(10)
        self._note("wait")
        return Timing(0, 0, 0)

    def waited(self):
        self._note("waited")

    def finish(self, timing):
        self._note("finish")
        return ErrorResult(id=hash(self.name) & 0xFFFF, action_type=GetWorkerState.type, status=Status.SUCCESS,
                           message=self.name)

    def fail(self, status, message):
        return ErrorResult(id=0, action_type=GetWorkerState.type, status=status, message=message)


class SplitProbe(Probe):
    __slots__ = ()
    split = True

    def run(self, now):        # queued: the executor's thread launches and waits (as ExecTask.run does)
        self.launch(now)
        return self.wait()


class InlineProbe(Probe):
    __slots__ = ()
    inline = True


def make_executor():
    lock = threading.RLock()
    delivered: list = []
    got = threading.Condition()

    def deliver(results):
        with got:
            delivered.extend((r.message, threading.current_thread().name) for r in results)
            got.notify_all()

    ex = ThreadExecutor("gpu0-exec", lock, MonotonicClock(), deliver)
    return ex, lock, delivered, got


def wait_for(got, cond):
    with got:
        assert got.wait_for(cond, 10)


def test_inline_task_runs_in_the_submitting_thread_and_returns_its_result():
    ex, lock, delivered, got = make_executor()
    log: list = []
    try:
        with lock:
            r = ex.submit(Probe("a", log, inline=True), inline=True)
        me = threading.current_thread().name
        assert r is not None and r.message == "a"
        assert [(s, t) for _, s, t in log] == [("begin", me), ("run", me), ("finish", me)]
        assert ex.busy is None and delivered == []     # the caller delivers what an inline start returns
    finally:
        ex.close()


def test_split_task_launches_inline_and_its_thread_waits_and_delivers():
    ex, lock, delivered, got = make_executor()
    log: list = []
    first, second = Probe("first", log, split=True), Probe("second", log, split=True)
    try:
        with lock:
            assert ex.submit(first, inline=True) is None
            assert ex.busy is first                      # busy until the wait is over: one exec at a time
            assert ex.submit(second, inline=True) is None  # so this one queues
        me = threading.current_thread().name
        assert log[:2] == [("first", "begin", me), ("first", "launch", me)]
        assert ("second", "begin", me) not in log
        first.gpu_done.set()
        wait_for(got, lambda: len(delivered) == 1)
        assert delivered[0] == ("first", "worker-gpu0-exec")
        second.gpu_done.set()
        wait_for(got, lambda: len(delivered) == 2)
        steps = [(n, s) for n, s, t in log if t == "worker-gpu0-exec"]
        # once the first has been waited for, the second launches before the first finishes (the GPU is not left
        # idle while the first's result is built), and the first gives back what the launch may need before it
        assert steps == [("first", "wait"), ("first", "waited"), ("second", "begin"), ("second", "launch"),
                         ("first", "finish"), ("second", "wait"), ("second", "waited"), ("second", "finish")]
        assert ex.busy is None or ex.busy is second
    finally:
        ex.close()


def test_failed_launch_ends_the_task_with_one_error_and_frees_the_executor():
    ex, lock, delivered, got = make_executor()
    log: list = []
    try:
        with lock:
            r = ex.submit(Probe("bad", log, split=True, fail_launch=True), inline=True)
        assert r is not None and r.status == Status.RUNTIME_ERROR and "launch failed" in r.message
        assert ex.busy is None
        ok = Probe("next", log, inline=True)
        with lock:
            assert ex.submit(ok, inline=True).message == "next"
    finally:
        ex.close()


def test_close_still_waits_for_a_launched_task_and_delivers_once():
    ex, lock, delivered, got = make_executor()
    log: list = []
    t = Probe("inflight", log, split=True)
    with lock:
        ex.submit(t, inline=True)
    threading.Timer(0.05, t.gpu_done.set).start()
    ex.close()                                      # joins the thread, which first finishes the launched task
    assert delivered == [("inflight", "worker-gpu0-exec")]


def test_results_handed_to_deliver_later_come_from_the_executor_thread():
    ex, lock, delivered, got = make_executor()
    try:
        with lock:
            ex.deliver_later(ErrorResult(id=7, action_type=GetWorkerState.type, status=Status.INVALID_ACTION,
                                         message="late"))
        wait_for(got, lambda: delivered)
        assert delivered == [("late", "worker-gpu0-exec")]
    finally:
        ex.close()


def test_the_next_due_exec_launches_before_the_previous_result_is_delivered():
    lock = threading.RLock()
    log: list = []
    seen_at_delivery: list = []
    got = threading.Condition()

    def deliver(results):       # what had happened when each result went out
        with got:
            seen_at_delivery.extend((r.message, [(n, s) for n, s, _ in log]) for r in results)
            got.notify_all()

    ex = ThreadExecutor("gpu0-exec", lock, MonotonicClock(), deliver)
    first, second = Probe("first", log, split=True), Probe("second", log, split=True)
    try:
        with lock:
            ex.submit(first, inline=True)
            ex.submit(second, inline=True)              # due now, queued behind the launched one
        first.gpu_done.set()
        wait_for(got, lambda: len(seen_at_delivery) == 1)
        name, before = seen_at_delivery[0]
        assert name == "first" and ("second", "launch") in before    # the GPU was given work first
        assert ("second", "finish") not in before
        second.gpu_done.set()
        wait_for(got, lambda: len(seen_at_delivery) == 2)
        assert [m for m, _ in seen_at_delivery] == ["first", "second"]
    finally:
        ex.close()


def test_a_held_exec_is_waited_for_and_ended_in_the_callers_thread():
    """Worker.submit's answer_here: the caller launches a short exec, holds the executor and waits itself; the
    next exec queued meanwhile launches from the caller's thread too, and the executor's thread waits for that."""
    ex, lock, delivered, got = make_executor()
    log: list = []
    first, second = Probe("first", log, split=True), Probe("second", log, split=True)
    me = threading.current_thread().name
    try:
        with lock:
            first.launch(0)
            ex.hold(first, 0)
            assert ex.busy is first and not ex.idle()
            assert ex.submit(second, inline=True) is None      # queued behind the held exec
        assert ("second", "begin", me) not in log
        first.gpu_done.set()
        out = ex.wait_here(first)
        assert [r.message for r in out] == ["first"] and delivered == []   # the caller delivers its result
        assert [(n, s) for n, s, t in log if t == me] == [
            ("first", "launch"), ("first", "wait"), ("first", "waited"), ("second", "begin"), ("second", "launch"),
            ("first", "finish")]
        assert ex.busy is second
        second.gpu_done.set()
        wait_for(got, lambda: len(delivered) == 1)
        assert delivered == [("second", "worker-gpu0-exec")]
    finally:
        ex.close()


def test_the_end_of_a_held_exec_does_not_wake_the_idle_executor_thread():
    """An exec answered in the caller's thread ends without waking the executor's idle thread, which would then run
    beside the caller, for the interpreter lock and the worker's lock, at every such Infer."""
    ex, lock, _, _ = make_executor()
    wakes = []
    wait = ex._cv.wait

    def counted(timeout=None):          # counted as the thread enters a wait: every later entry follows a wake-up
        if threading.current_thread() is ex._thread:
            wakes.append(time.monotonic())
        return wait(timeout)
    ex._cv.wait = counted
    try:
        time.sleep(0.7)                 # the thread's wait under way (0.5 s) times out: it now waits through `counted`
        assert wakes, "the idle executor thread never waited"
        before, t0 = len(wakes), time.monotonic()
        for i in range(100):
            t = Probe(f"t{i}", [], split=True)
            with lock:
                t.launch(0)
                ex.hold(t, 0)
            t.gpu_done.set()
            assert [r.message for r in ex.wait_here(t)] == [f"t{i}"]
            time.sleep(0.001)           # the caller idles between Infers (a woken thread would run meanwhile)
        timeouts = int((time.monotonic() - t0) / 0.5) + 1     # the idle thread's own 0.5 s timeouts meanwhile
        assert len(wakes) - before <= timeouts, f"woken {len(wakes) - before} times by 100 held execs"
    finally:
        ex.close()


def test_close_waits_for_a_held_exec_to_end():
    ex, lock, delivered, got = make_executor()
    t = Probe("held", [], split=True)
    with lock:
        ex.hold(t, 0)
    closed: list = []
    closer = threading.Thread(target=lambda: closed.append(ex.close(timeout=10)))
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and closed == []       # the device must outlive the exec its caller waits for
    t.gpu_done.set()
    assert [r.message for r in ex.wait_here(t)] == ["held"]
    closer.join(10)
    assert closed == [True]
    t2 = Probe("stuck", [], split=True)
    ex2, lock2, _, _ = make_executor()
    with lock2:
        ex2.hold(t2, 0)
    assert ex2.close(timeout=0.2) is False          # still held: reported as running, so its memory is kept
    t2.gpu_done.set()
    ex2.wait_here(t2)
