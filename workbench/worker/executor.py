"""Executors: one queue per (GPU, kind of work), popped in `earliest` order only (Clockwork's
single_reader_priority_queue, clockwork.md §1.4). A task is never started before it is eligible; whether it
may still start (its `latest`) and whether the resources exist is the task's own check (`begin`).

Two ways to drive the same tasks:
- `ThreadExecutor`: a thread per queue, for real devices. `run` blocks on the device (outside the worker lock)
  while the other queues of the same GPU proceed, as Clockwork's per-stream executor threads do. A task whose
  `run` does not block (`inline = True`: it only enqueues GPU work or copies a few bytes) starts in the
  submitting thread when its queue is idle and it is eligible: a thread hand-off costs ~50-100 us of wake-up
  and interpreter-lock hand-over, the whole budget of an action. A `split` task (an exec on a GPU) launches
  there and leaves only the wait for its completion to the executor's thread, which then wakes while the GPU
  works instead of before it can start; an exec shorter than that wake-up the caller may wait for itself (`hold`,
  `wait_here`).
- `ClockExecutor`: no thread of its own. It wakes with `clock.call_at` and completes a task at the end time
  its `run` returns; used by the emulated device, so it works in real time (`RealClock`) and in deterministic
  virtual time (`VirtualClock`) alike.

Task protocol (all calls of `begin`/`finish`/`cleanup` hold the worker lock):
    begin(now)     -> Result | None   window and resource checks; a Result ends the task (an error)
    run(now)       -> Timing          the device work; `Timing.end` is when it completes (may be in the future)
    finish(timing) -> Result | None   install state; a Result ends the action, None means it was handed on
    waited()                          a split task, once waited for: give back what the next launch may need
    cleanup()                         release what the task holds (used when run raises or on shutdown)
    fail(status, message) -> Result   the error result for this task's action
"""
from __future__ import annotations

import ctypes
import heapq
import itertools
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Callable

from workbench.contract import Result, Status, Timing

if TYPE_CHECKING:
    from workbench.clock import Clock, Timer

_seq = itertools.count()


class Task:
    """Base of every executor task. `eligible`: earliest start (ns); `latest`: last start (ns)."""
    __slots__ = ("eligible", "latest", "seq", "enqueued")
    kind: str = "task"
    inline: bool = False      # run() never blocks: may run in the submitting thread (ThreadExecutor)
    split: bool = False       # run() = launch() (no blocking) + wait(): launch may run in the submitting thread

    def __init__(self, eligible: int, latest: int):
        self.eligible = eligible
        self.latest = latest
        self.seq = next(_seq)
        self.enqueued = 0

    def __lt__(self, other: "Task") -> bool:
        return (self.eligible, self.seq) < (other.eligible, other.seq)

    # protocol, see the module docstring
    def begin(self, now: int) -> Result | None: ...
    def run(self, now: int) -> Timing: ...
    def finish(self, timing: Timing) -> Result | None: ...
    def launch(self, now: int) -> None: ...        # split tasks only
    def wait(self) -> Timing: ...                  # split tasks only
    def waited(self) -> None: ...                  # split tasks: give back what the next launch may need
    def cleanup(self) -> None: ...
    def fail(self, status: Status, message: str) -> Result: ...


def guard(task: Task, step: Callable, *args):
    """Run task.begin/finish; an exception there (a worker bug) still ends the action with one result."""
    try:
        return step(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        try:
            task.cleanup()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        return task.fail(Status.RUNTIME_ERROR, f"worker error in the {task.kind} task: {type(e).__name__}: {e}")


def tight_timer_slack() -> bool:
    """Make this thread's timed waits wake on time: Linux lets a timed futex wait overrun by the thread's timer
    slack (50 us by default), which lands on every action's start (PR_SET_TIMERSLACK = 29, 1 ns). False where
    unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


Deliver = Callable[[list], None]   # hands finished results to the worker (outside its lock)


class Executor:
    def __init__(self, name: str, lock: threading.RLock, clock: "Clock", deliver: Deliver,
                 on_task_done: Callable[[Task, Timing | None, Result | None], None] | None = None):
        self.name = name
        self.lock = lock
        self.clock = clock
        self.deliver = deliver
        self.on_task_done = on_task_done   # telemetry hook
        self.heap: list[Task] = []
        self.busy: Task | None = None   # the task running (a launched split task until it has been waited for)
        self.closed = False

    def submit(self, task: Task, inline: bool = False) -> Result | None:
        """Queue `task` (caller holds the lock). `inline`: the task may start right away in the caller (an
        executor callback for ClockExecutor; any thread for ThreadExecutor if `task.inline`); a ThreadExecutor
        returns the result such a start produced, for the caller to deliver."""
        raise NotImplementedError

    def queued(self) -> int:
        return len(self.heap)

    def idle(self) -> bool:
        """Nothing runs and nothing waits: a task submitted now with `inline` starts before any other."""
        return self.busy is None and not self.heap and not self.closed

    def drain(self) -> list[Task]:
        """Remove and return every queued task (shutdown)."""
        tasks, self.heap = self.heap, []
        return tasks

    def close(self, timeout: float = 30.0) -> bool:
        """Stop taking tasks; True once no task of this executor is running any more."""
        self.closed = True
        return True


class ClockExecutor(Executor):
    """Drives tasks from clock callbacks; one task in flight at a time.

    `outbox` is shared by all executors of a worker: a task handed on from inside a clock callback (the next
    step of an Infer) starts inline when its executor is idle and it is eligible, saving a clock event; any
    result that produces waits in the outbox and is delivered when the callback ends."""

    def __init__(self, *a, outbox: list | None = None, **kw):
        super().__init__(*a, **kw)
        self._done_timer: "Timer | None" = None
        self._wake: "Timer | None" = None
        self._wake_at = 0
        self.outbox: list = outbox if outbox is not None else []

    def submit(self, task: Task, inline: bool = False) -> None:   # caller holds the lock
        now = self.clock.now()
        task.enqueued = now
        heapq.heappush(self.heap, task)
        if self.busy is None and self.heap[0] is task:
            if inline and task.eligible <= now:
                self.outbox.extend(self._kick())
            else:
                self._schedule_wake(task.eligible)

    def _flush(self, out: list) -> list:
        if self.outbox:
            out = out + self.outbox
            self.outbox.clear()
        return out

    def _schedule_wake(self, t: int) -> None:
        if self._wake is not None:
            if self._wake_at <= t:
                return
            self._wake.cancel()
        self._wake_at = t
        self._wake = self.clock.call_at(t, self._on_wake)

    def _on_wake(self) -> None:
        with self.lock:
            self._wake = None
            out = self._flush(self._kick())
        if out:
            self.deliver(out)

    def _kick(self) -> list[Result]:
        out: list[Result] = []
        now = self.clock.now()
        while self.heap and self.busy is None and not self.closed:
            head = self.heap[0]
            if head.eligible > now:
                self._schedule_wake(head.eligible)
                break
            heapq.heappop(self.heap)
            r = guard(head, head.begin, now)
            if r is not None:
                self._done(head, None, r)
                out.append(r)
                continue
            try:
                timing = head.run(now)
            except Exception as e:  # noqa: BLE001 - a device failure becomes the action's result
                head.cleanup()
                r = head.fail(Status.RUNTIME_ERROR, f"{type(e).__name__}: {e}")
                self._done(head, None, r)
                out.append(r)
                continue
            self.busy = head
            self._done_timer = self.clock.call_at(timing.end, self._on_done, head, timing)
        return out

    def _on_done(self, task: Task, timing: Timing) -> None:
        with self.lock:
            if self.busy is not task:   # shut down meanwhile
                return
            self.busy = None
            self._done_timer = None
            r = guard(task, task.finish, timing)
            self._done(task, timing, r)
            out = [r] if r is not None else []
            out = self._flush(out + self._kick())
        if out:
            self.deliver(out)

    def _done(self, task: Task, timing: Timing | None, r: Result | None) -> None:
        if self.on_task_done is not None:
            self.on_task_done(task, timing, r)

    def drain(self) -> list[Task]:
        tasks = super().drain()
        if self.busy is not None:
            tasks.append(self.busy)
            self.busy = None
            if self._done_timer is not None:
                self._done_timer.cancel()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        return tasks


class ThreadExecutor(Executor):
    """A thread that sleeps until the head of its queue is eligible, then runs it to completion. Results that
    an inline start produced where they could not be delivered (inside `Worker.submit`) are handed to this
    thread with `deliver_later`. `wake_early` (ns): the sleep ends this long before the head is due and the
    thread then yields (`time.sleep(0)`, which frees the interpreter lock) until it is, since a sleeping thread
    wakes 50-150 us late on Linux."""

    def __init__(self, *a, wake_early: int = 0, **kw):
        super().__init__(*a, **kw)
        self.wake_early = wake_early
        self._cv = threading.Condition(self.lock)
        self._later: list[Result] = []
        self._launched: Task | None = None   # a split task launched inline, for this thread to wait for
        self._held: Task | None = None       # a split task launched inline, that its caller waits for (hold)
        self._thread = threading.Thread(target=self._loop, name=f"worker-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, task: Task, inline: bool = False) -> Result | None:   # caller holds the lock
        now = self.clock.now()
        task.enqueued = now
        if inline and (task.inline or task.split) and self.idle() and task.eligible <= now:
            return self._run_inline(task, now)
        heapq.heappush(self.heap, task)
        if self.heap[0] is task:
            self._cv.notify()
        return None

    def _run_inline(self, task: Task, now: int) -> Result | None:
        """begin/run/finish in the caller's thread, under the lock (run does not block: `task.inline`)."""
        self.busy = task
        timing = None
        try:
            r = guard(task, task.begin, now)
            if r is None and task.split:
                try:
                    task.launch(now)
                except Exception as e:  # noqa: BLE001 - a device failure becomes the action's result
                    task.cleanup()
                    r = task.fail(Status.RUNTIME_ERROR, f"{type(e).__name__}: {e}")
                else:
                    self.start_launched(task, now)   # busy until this executor's thread has waited for it
                    return None
            elif r is None:
                try:
                    timing = task.run(now)
                except Exception as e:  # noqa: BLE001 - a device failure becomes the action's result
                    task.cleanup()
                    r = task.fail(Status.RUNTIME_ERROR, f"{type(e).__name__}: {e}")
                else:
                    r = guard(task, task.finish, timing)
            self._done(task, timing, r)
        except BaseException:
            self._launched = None
            raise
        finally:
            if self._launched is not task:
                self.busy = None
                if self.heap:
                    self._cv.notify()
        return r

    def start_launched(self, task: Task, now: int) -> None:
        """Make `task`, a split task its caller has launched on this idle executor's device (the worker's ready
        path), the running task, for this executor's thread to wait for (caller holds the lock)."""
        task.enqueued = now
        self.busy = self._launched = task
        self._cv.notify()

    def hold(self, task: Task, now: int) -> None:
        """Make `task`, a split task its caller has launched on this idle executor's device, the running task, for
        the caller to wait for itself with `wait_here` (caller holds the lock): an exec shorter than this thread's
        wake-up (Worker.submit's `answer_here`)."""
        task.enqueued = now
        self.busy = self._held = task

    def wait_here(self, task: Task) -> list[Result]:
        """Wait for a task given to `hold`, in the calling thread (not holding the lock), and end it as this
        executor's thread would: its result and any the next launch produced, for the caller to deliver."""
        out: list[Result] = []
        try:
            self._run_to_end(task, out, True)
        finally:
            with self._cv:
                self._held = None
                if self.closed:            # close() waits for a held task (notified otherwise, this executor's
                    self._cv.notify_all()  # idle thread would wake for nothing, at every such Infer)
        return out

    def deliver_later(self, r: Result) -> None:   # caller holds the lock
        self._later.append(r)
        self._cv.notify()

    def _next(self) -> tuple[Task | None, list[Result]]:
        with self._cv:
            while not self.closed or self._launched is not None:
                if self._launched is not None:
                    return self._launched, []
                if self._later:
                    later, self._later = self._later, []
                    return None, later
                if self.heap:
                    wait = self.heap[0].eligible - self.clock.now()
                    if wait <= 0:
                        self.busy = heapq.heappop(self.heap)
                        return self.busy, []
                    if wait > self.wake_early:
                        self._cv.wait(min((wait - self.wake_early) / 1e9, 0.5))
                    else:                          # the last stretch: yield until due (sleep(0) frees the GIL)
                        self._cv.release()
                        time.sleep(0)
                        self._cv.acquire()
                else:
                    self._cv.wait(0.5)
            later, self._later = self._later, []
            return None, later

    def _loop(self) -> None:
        tight_timer_slack()
        while True:
            task, later = self._next()
            if later:
                self.deliver(later)
            if task is None:
                if self.closed:
                    return
                continue
            out: list[Result] = []
            launched = task is self._launched
            if launched:
                self._launched = None
            self._run_to_end(task, out, launched)
            # delivered last, once idle: the receiver (often about to submit the next action) then does not wait
            # for this thread's bookkeeping to give back the interpreter lock
            if out:
                self.deliver(out)

    def _run_to_end(self, task: Task, out: list, launched: bool) -> None:
        try:
            self._execute(task, out, launched)
        except Exception:  # noqa: BLE001 - a bug in one task must not stop the executor
            traceback.print_exc()
            with self.lock:
                if self.busy is task:
                    self._release(out)

    def _execute(self, task: Task, out: list, launched: bool = False) -> None:
        """Run `task` to its end; its result (if any) goes to `out`. This executor is released (`_release`) under
        the same hold of the lock as its last step, or, for a split task (an exec), as soon as it has been waited
        for: the GPU is done with it, so the next exec launches before this one's result is built."""
        if not launched:
            with self.lock:
                r = guard(task, task.begin, self.clock.now())
                if r is not None:
                    self._done(task, None, r)
                    out.append(r)
                    self._release(out)
                    return
        try:
            timing = task.wait() if launched else task.run(self.clock.now())
        except Exception as e:  # noqa: BLE001 - a device failure becomes the action's result
            with self.lock:
                task.cleanup()
                r = task.fail(Status.RUNTIME_ERROR, f"{type(e).__name__}: {e}")
                self._done(task, None, r)
                out.append(r)
                self._release(out)
            return
        with self.lock:
            split = task.split
            if split:                    # the device is done with it: the next exec launches before it finishes
                task.waited()
                self._release(out)
            r = guard(task, task.finish, timing)
            self._done(task, timing, r)
            if r is not None:
                out.append(r)
            if not split:
                self._release(out)

    def _release(self, out: list) -> None:
        """The running task is over (caller holds the lock). The next exec, if due, is launched before this one's
        result goes out: delivering it (on the process worker: encoding and sending it) would otherwise leave the
        GPU idle meanwhile."""
        self.busy = None
        if self.heap and not self.closed and self.heap[0].split:
            now = self.clock.now()
            if self.heap[0].eligible <= now:
                r = self._run_inline(heapq.heappop(self.heap), now)
                if r is not None:
                    out.append(r)

    def _done(self, task: Task, timing: Timing | None, r: Result | None) -> None:
        if self.on_task_done is not None:
            self.on_task_done(task, timing, r)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the thread, waiting up to `timeout` s for the task it runs; False if it is still running one."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self.closed = True
            self._cv.notify_all()
            # a held task runs in the thread that submitted it: the device must outlive it as it does this thread's
            none_held = self._cv.wait_for(lambda: self._held is None, timeout)
        if threading.current_thread() is self._thread:
            return none_held   # closed from its own task (a result callback): it stops when that returns
        self._thread.join(timeout=max(deadline - time.monotonic(), 0))
        return none_held and not self._thread.is_alive()
