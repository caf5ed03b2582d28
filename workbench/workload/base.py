"""The workload base: arrivals scheduled on a `Clock`, requests sent with `controller.submit(...)`.

Every workload runs unchanged on a `RealClock` and a `VirtualClock`: it only calls `clock.now()`/`clock.call_at()`
and `controller.submit(model_id, inputs=None, slo=..., slo_factor=..., callback=...)`. Arrival times are planned
as absolute times from the start (never `now + gap`), and all randomness comes from one seeded numpy Generator,
so the same seed gives the same arrivals. Completion callbacks may come from another thread (real time); they
only count the outcome and, where a workload reacts to completions (closed loop), hand the reaction to the
clock with `call_soon`, so the workload's state changes happen on the clock's thread (in virtual time everything
already runs on that one thread, so the reaction runs at once, saving a clock event per request).

Cost per request in virtual time is what matters for long simulations: open loops generate arrivals in numpy
blocks (`OpenLoop._blocks`) and keep one timer pending, so an arrival costs one clock event, a few list reads and
the submit call (`python -m bench.trace_reader` measures it).
"""
from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections import Counter
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from workbench.clock import Clock

NS = 1_000_000_000
MS = 1_000_000


class Controller(Protocol):
    def submit(self, model_id: int, inputs: Any = None, slo: int | None = None, slo_factor: float | None = None,
               callback: Callable | None = None) -> int: ...


def ms_to_ns(ms: float | None) -> int | None:
    return None if ms is None else int(round(ms * MS))


def positive(value: Any, what: str) -> float:
    """`value` as a float, if it is a finite number > 0; else a ValueError naming `what` (a string would pass
    `x > 0` checks' place with a TypeError, or be repeated by `* MS`; NaN, infinity and bools are no durations)."""
    v = _finite(value)
    if v is not None and v > 0:
        return v
    raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def non_negative(value: Any, what: str) -> float:
    """`value` as a float, if it is a finite number >= 0 (a rate or a pause that may be 0); else a ValueError
    naming `what` (an infinite rate would schedule every arrival at the same instant, without end)."""
    v = _finite(value)
    if v is not None and v >= 0:
        return v
    raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


def _finite(value: Any) -> float | None:
    """`value` as a float if it is a finite real number, not a bool or a string; else None."""
    if isinstance(value, (bool, str, bytes)) or str(getattr(value, "dtype", "")) == "bool" \
            or not hasattr(value, "__float__"):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


class Workload:
    """Base class. Subclasses implement `_begin()` (schedule the first arrivals). Use `start()` once."""

    kind = "workload"

    def __init__(self, *, seed: int = 0, slo_ms: float | None = None, slo_factor: float | None = None,
                 name: str | None = None):
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.slo = None if slo_ms is None else ms_to_ns(positive(slo_ms, f"{self.kind}: slo_ms"))
        self.slo_factor = None if slo_factor is None else positive(slo_factor, f"{self.kind}: slo_factor")
        self.name = name or self.kind
        self.controller: Controller | None = None
        self.clock: Clock | None = None
        self.t0 = 0
        self.t_end: int | None = None
        self.stopped = False
        self.submitted = 0
        self.completed = 0
        self.outcomes: Counter[str] = Counter()
        self.submit_errors: list[str] = []
        self._lock = threading.Lock()
        self._locked = True     # completions may come from another thread (False on a virtual clock: one thread)
        self._on_complete: list[Callable[[Any], None]] = []

    # ----------------------------------------------------------------------------------------- control
    def start(self, controller: Controller, clock: Clock, *, t0: int | None = None,
              duration_s: float | None = None) -> "Workload":
        """Begin issuing requests at `t0` (default now) until `duration_s` later (default: until `stop()`)."""
        if self.clock is not None:
            raise RuntimeError(f"{self.name}: already started")
        self.controller, self.clock = controller, clock
        self._locked = not getattr(clock, "virtual", False)
        self.t0 = clock.now() if t0 is None else int(t0)
        self.t_end = None if duration_s is None else self.t0 + int(round(duration_s * NS))
        self._begin()
        return self

    def stop(self) -> None:
        """No more arrivals (requests in flight still complete)."""
        self.stopped = True

    def add_completion_hook(self, fn: Callable[[Any], None]) -> None:
        """`fn(outcome)` after every completion (any thread)."""
        self._on_complete.append(fn)

    @property
    def in_flight(self) -> int:
        return self.submitted - self.completed

    def _begin(self) -> None:
        raise NotImplementedError

    def _active(self, t: int) -> bool:
        return not self.stopped and (self.t_end is None or t < self.t_end)

    # ------------------------------------------------------------------------------------------ submit
    def _submit(self, model_id: int, slo: int | None, slo_factor: float | None,
                callback: Callable[[Any], None] | None = None) -> bool:
        """Send one request; False if `submit` raised (counted as outcome "submit_error", never retried).
        Called on the clock's thread only (the one writer of `submitted`)."""
        self.submitted += 1
        try:
            self.controller.submit(int(model_id), inputs=None, slo=slo, slo_factor=slo_factor,
                                   callback=callback or self._done)
            return True
        except Exception as e:  # noqa: BLE001 - a refused submit is an outcome, not a crash of the workload
            self._refused(e)
            return False

    def _refused(self, e: Exception) -> None:
        with self._lock:
            self.completed += 1
            self.outcomes["submit_error"] += 1
            if len(self.submit_errors) < 10:
                self.submit_errors.append(f"{type(e).__name__}: {e}")

    def _done(self, outcome: Any) -> None:
        if self._locked:
            with self._lock:
                self.completed += 1
                self.outcomes[getattr(outcome, "status", "unknown")] += 1
        else:                   # virtual time: everything runs on the clock's one thread
            self.completed += 1
            self.outcomes[getattr(outcome, "status", "unknown")] += 1
        if self._on_complete:
            for fn in self._on_complete:
                fn(outcome)

    def stats(self) -> dict:
        with self._lock:
            return {"name": self.name, "kind": self.kind, "submitted": self.submitted,
                    "completed": self.completed, "outcomes": dict(self.outcomes),
                    "submit_errors": list(self.submit_errors)}


Block = tuple[list, list, list, list]
"""Arrivals in time order as four equal-length lists: times (ns, sorted), model ids (int), SLO (ns or None) and
SLO factor (or None)."""


class OpenLoop(Workload):
    """Arrivals that do not depend on completions. Subclasses implement `_blocks()` (vectorised generators: build
    each `Block` with numpy and `.tolist()`) or `_arrivals()`, yielding (t_ns, model_id, slo_ns, slo_factor) in
    time order, which the default `_blocks()` batches. One timer is pending at a time (the next arrival), so
    thousands of models cost nothing, and an arrival costs one clock event, a few list reads and the submit."""

    BLOCK = 1024   # arrivals per block when batching `_arrivals()`
    _pending = False

    def _arrivals(self) -> Iterator[tuple[int, int, int | None, float | None]]:
        raise NotImplementedError

    def _blocks(self) -> Iterator[Block]:
        it = self._arrivals()
        while True:
            chunk = list(itertools.islice(it, self.BLOCK))
            if not chunk:
                return
            times, models, slos, factors = (list(c) for c in zip(*chunk))
            yield times, [int(m) for m in models], slos, factors

    def _begin(self) -> None:
        self._block_it = self._blocks()
        self._last_block = False
        self._fire_m = self._fire               # one bound method for every timer
        self._push, self._seq_next = self.clock.poster()   # the next arrival is later than now (Clock.poster)
        self._pending = self._load()
        if self._pending:
            self.clock.post(self._times[0], self._fire)

    def next_arrival_pending(self) -> bool:
        """True while arrivals remain to be sent."""
        return self._pending and not self.stopped

    def _load(self) -> bool:
        """Make the next non-empty block (cut at t_end) current; False when no arrivals remain."""
        if not self._last_block:
            for times, models, slos, factors in self._block_it:
                if self.t_end is not None and times and times[-1] >= self.t_end:
                    k = bisect.bisect_left(times, self.t_end)
                    times, models, slos, factors = times[:k], models[:k], slos[:k], factors[:k]
                    self._last_block = True
                if times:
                    self._times, self._models, self._slos, self._factors = times, models, slos, factors
                    self._i = 0
                    return True
                if self._last_block:
                    break
        self._last_block = True
        self._block_it.close()
        return False

    def _fire(self) -> None:
        # submit every arrival that is due (one timer can cover several when real time runs late), then set one
        # timer for the next (post: a timer nothing cancels; `stop()` is checked when it fires); `submitted` is
        # only ever written on the clock's thread, so it needs no lock. The submit is positional, in the
        # client API's order (model_id, inputs, slo, slo_factor, callback): cheaper than keywords.
        now = self.clock.now()
        times, i = self._times, self._i
        submit, done = self.controller.submit, self._done
        models, slos, factors = self._models, self._slos, self._factors
        while not self.stopped:
            if i == len(times):
                if not self._load():
                    self._pending = False
                    return
                times, i = self._times, 0
                models, slos, factors = self._models, self._slos, self._factors
            t = times[i]
            if t > now:
                self._i = i
                self._push((t, self._seq_next(), self._fire_m, ()))
                return
            self.submitted += 1
            try:
                submit(models[i], None, slos[i], factors[i], done)
            except Exception as e:  # noqa: BLE001 - a refused submit is an outcome, not a crash of the workload
                self._refused(e)
            i += 1
        self._pending = False


def poisson_times(rng: np.random.Generator, rate_per_s: float, t_start: int, block: int = 4096) -> Iterator[np.ndarray]:
    """Blocks of absolute arrival times (ns, int64) of a Poisson process of `rate_per_s` from `t_start`."""
    if rate_per_s <= 0:
        return
    t = float(t_start)
    scale = NS / rate_per_s
    while True:
        times = t + np.cumsum(rng.exponential(scale, size=block))
        t = float(times[-1])
        yield times.astype(np.int64)


def as_id_list(models: Sequence[int] | int, what: str) -> list[int]:
    """A list of model ids from a list or a count (0..n-1); rejects an empty or negative spec."""
    if isinstance(models, (int, np.integer)):
        if models <= 0:
            raise ValueError(f"{what}: need at least one model (got {models})")
        return list(range(int(models)))
    ids = [int(m) for m in models]
    if not ids:
        raise ValueError(f"{what}: the model list is empty")
    return ids
