"""Clocks: the controller and the emulated worker are written against `Clock`, so the same code runs in real
time (a timer thread) and in virtual time (a deterministic discrete-event loop: same inputs, same result)."""
from __future__ import annotations

import functools
import heapq
import itertools
import threading
import time
from typing import Any, Callable, ClassVar, Final, SupportsInt

from workbench.controller.compiled import mypyc_attr


class Timer:
    __slots__ = ("t", "seq", "fn", "args", "cancelled")

    def __init__(self, t: int, seq: int, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.t, self.seq, self.fn, self.args, self.cancelled = t, seq, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Timer") -> bool:
        return (self.t, self.seq) < (other.t, other.seq)


@mypyc_attr(allow_interpreted_subclasses=True)
class Clock:
    """Nanosecond time plus callbacks at a given time. Callbacks run one at a time, in (time, order) order."""
    virtual: ClassVar[bool] = False     # (a ClassVar: a subclass, compiled or not, sets it in its class body)

    def now(self) -> int:
        raise NotImplementedError

    def call_at(self, t: SupportsInt, fn: Callable[..., Any], *args: Any) -> Timer:
        raise NotImplementedError

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> Timer:
        return self.call_at(self.now(), fn, *args)

    def post(self, t: int, fn: Callable[..., Any], *args: Any) -> None:
        """`call_at` without a handle (it cannot be cancelled): cheaper where nothing needs to cancel."""
        self.call_at(t, fn, *args)

    def poster(self) -> tuple[Callable[[tuple], None], Callable[[], int]]:
        """(push, next_seq) for a hot path that posts many events: `push((t, next_seq(), fn, args))` with
        t >= now does what `post(t, fn, *args)` does."""
        post = self.post
        return (lambda e: post(e[0], e[2], *e[3])), itertools.count().__next__

    def run_until(self, t_end: int | None = None, max_events: int | None = None) -> int:
        """Run the events due by t_end (virtual clocks only: a real clock runs them on its own thread)."""
        raise NotImplementedError(f"{type(self).__name__} runs its events itself (only a virtual clock has run_until)")

    def close(self) -> None:
        pass


# VirtualClock's heap sentinel: after every event (times are < 2**63). A plain `tuple` for mypyc, so that it
# stays one object (`e is not _END`) rather than a native tuple boxed anew at each use.
_END: Final[tuple] = (1 << 127, -1, None, None)


@mypyc_attr(allow_interpreted_subclasses=True)
class VirtualClock(Clock):
    """Discrete-event time. Nothing happens until `run()`/`run_until()` is called; time jumps event to event.

    Every event is one heap entry `(t, seq, fn, args)`: `seq` (a counter) breaks ties in posting order, so the
    order is fully determined and tuples compare in C without reaching `fn`. A cancellable `call_at` event
    carries its Timer in place of the arguments and `fn` None (the loop skips it once cancelled). The heap's
    bottom is a sentinel later than any time, so the loop needs no emptiness test. `_heap` and `_seq` are never
    replaced, so `poster()` can hand out a push straight onto the heap (exactly what `post` does, without the
    call)."""
    virtual: ClassVar[bool] = True

    def __init__(self, start: int = 0):
        self._now = start
        self._heap: list[tuple] = [_END]
        self._seq = itertools.count()
        self.events_run = 0

    def now(self) -> int:
        return self._now

    def call_at(self, t: SupportsInt, fn: Callable[..., Any], *args: Any) -> Timer:
        ti = int(t)
        if ti < self._now:
            ti = self._now
        timer = Timer(ti, next(self._seq), fn, args)
        heapq.heappush(self._heap, (ti, timer.seq, None, timer))
        return timer

    def post(self, t: int, fn: Callable[..., Any], *args: Any) -> None:
        """An event without a Timer: (t, seq, fn, args) goes on the heap as is (t: int ns)."""
        now = self._now
        heapq.heappush(self._heap, (t if t > now else now, next(self._seq), fn, args))

    def poster(self) -> tuple[Callable[[tuple], None], Callable[[], int]]:
        if type(self).post is not VirtualClock.post:     # a subclass that changes post(): go through it
            return super().poster()
        return functools.partial(heapq.heappush, self._heap), self._seq.__next__

    def pending(self) -> int:
        return sum(e[2] is not None or not e[3].cancelled for e in self._heap if e is not _END)

    def run_until(self, t_end: int | None = None, max_events: int | None = None) -> int:
        """Run events with time <= t_end (all if None); leaves now = t_end when given. Returns events run."""
        heap, n = self._heap, 0
        pop = heapq.heappop
        limit = (1 << 63) if t_end is None else t_end
        if max_events is None:
            # the hot loop: nothing per event beyond the pop, the time and the call
            try:
                while heap[0][0] <= limit:
                    t, _, fn, args = pop(heap)
                    if fn is None:          # call_at(): a Timer, maybe cancelled
                        if args.cancelled:
                            continue
                        fn, args = args.fn, args.args
                    self._now = t
                    n += 1
                    fn(*args)
            finally:
                self.events_run += n
            if t_end is not None and self._now < t_end:
                self._now = t_end
            return n
        while heap[0][0] <= limit and n < max_events:
            t, _, fn, args = pop(heap)
            if fn is None:
                if args.cancelled:
                    continue
                fn, args = args.fn, args.args
            self._now = t
            n += 1
            try:
                fn(*args)
            finally:
                self.events_run += 1
        if t_end is not None and n < max_events and self._now < t_end:
            self._now = t_end
        return n

    def run(self, t_end: int | None = None, max_events: int | None = None) -> int:
        """`run_until`."""
        return self.run_until(t_end, max_events)


class RealClock(Clock):
    """Monotonic wall time; callbacks run on one daemon timer thread, in time order."""

    def __init__(self, name: str = "clock"):
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        # (not `_thread`: mypyc names the C field after the attribute, and `__thread` is a C keyword)
        self._timer_thread = threading.Thread(target=self._loop, name=f"workbench-{name}", daemon=True)
        self._timer_thread.start()

    def now(self) -> int:
        return time.monotonic_ns()

    def call_at(self, t: SupportsInt, fn: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(int(t), next(self._seq), fn, args)
        with self._cv:
            if self._closed:
                raise RuntimeError("clock is closed")
            heapq.heappush(self._heap, timer)
            if self._heap[0] is timer:
                self._cv.notify()
        return timer

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed:
                    if self._heap:
                        wait = (self._heap[0].t - time.monotonic_ns()) / 1e9
                        if wait <= 0:
                            break
                        self._cv.wait(min(wait, 0.5))
                    else:
                        self._cv.wait(0.5)
                if self._closed:
                    return
                timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                try:
                    timer.fn(*timer.args)
                except Exception:  # a failing callback must not stop every later one
                    import traceback
                    traceback.print_exc()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._timer_thread:
            self._timer_thread.join(timeout=5)
