"""The workload base: arrivals scheduled on a `Clock`, requests sent with `controller.submit(...)`.

Every workload runs unchanged on a `RealClock` and a `VirtualClock`: it only calls `clock.now()`/`clock.call_at()`
and `controller.submit(model_id, inputs=None, slo=..., slo_factor=..., callback=...)`. Arrival times are planned
as absolute times from the start (never `now + gap`), and all randomness comes from one seeded numpy Generator,
so the same seed gives the same arrivals. Completion callbacks may come from another thread (real time); they
only count the outcome and, where a workload reacts to completions (closed loop), hand the reaction to the
clock with `call_soon`, so the workload's state changes happen on the clock's thread.
"""
from __future__ import annotations

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


class Workload:
    """Base class. Subclasses implement `_begin()` (schedule the first arrivals). Use `start()` once."""

    kind = "workload"

    def __init__(self, *, seed: int = 0, slo_ms: float | None = None, slo_factor: float | None = None,
                 name: str | None = None):
        if slo_ms is not None and not slo_ms > 0:
            raise ValueError(f"{self.kind}: slo_ms must be > 0 (got {slo_ms!r})")
        if slo_factor is not None and not slo_factor > 0:
            raise ValueError(f"{self.kind}: slo_factor must be > 0 (got {slo_factor!r})")
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.slo = ms_to_ns(slo_ms)
        self.slo_factor = slo_factor
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
        self._on_complete: list[Callable[[Any], None]] = []

    # ----------------------------------------------------------------------------------------- control
    def start(self, controller: Controller, clock: Clock, *, t0: int | None = None,
              duration_s: float | None = None) -> "Workload":
        """Begin issuing requests at `t0` (default now) until `duration_s` later (default: until `stop()`)."""
        if self.clock is not None:
            raise RuntimeError(f"{self.name}: already started")
        self.controller, self.clock = controller, clock
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
        """Send one request; False if `submit` raised (counted as outcome "submit_error", never retried)."""
        with self._lock:
            self.submitted += 1
        try:
            self.controller.submit(int(model_id), inputs=None, slo=slo, slo_factor=slo_factor,
                                   callback=callback or self._done)
            return True
        except Exception as e:  # noqa: BLE001 - a refused submit is an outcome, not a crash of the workload
            with self._lock:
                self.completed += 1
                self.outcomes["submit_error"] += 1
                if len(self.submit_errors) < 10:
                    self.submit_errors.append(f"{type(e).__name__}: {e}")
            return False

    def _done(self, outcome: Any) -> None:
        with self._lock:
            self.completed += 1
            self.outcomes[getattr(outcome, "status", "unknown")] += 1
        for fn in self._on_complete:
            fn(outcome)

    def stats(self) -> dict:
        with self._lock:
            return {"name": self.name, "kind": self.kind, "submitted": self.submitted,
                    "completed": self.completed, "outcomes": dict(self.outcomes),
                    "submit_errors": list(self.submit_errors)}


class OpenLoop(Workload):
    """Arrivals that do not depend on completions: `_arrivals()` yields (t_ns, model_id, slo_ns, slo_factor)
    in time order; one timer is pending at a time (the next arrival), so thousands of models cost nothing."""

    def _arrivals(self) -> Iterator[tuple[int, int, int | None, float | None]]:
        raise NotImplementedError

    def _begin(self) -> None:
        self._it = self._arrivals()
        self._next = next(self._it, None)
        self._schedule()

    def next_arrival_pending(self) -> bool:
        """True while arrivals remain to be sent."""
        return getattr(self, "_next", None) is not None and not self.stopped

    def _schedule(self) -> None:
        nxt = self._next
        if nxt is None or not self._active(nxt[0]):
            self._next = None
            return
        self.clock.call_at(nxt[0], self._fire)

    def _fire(self) -> None:
        now = self.clock.now()
        # submit every arrival that is due (one timer can cover several when real time runs late)
        while self._next is not None and self._next[0] <= now and self._active(self._next[0]):
            _, model_id, slo, slo_factor = self._next
            self._submit(model_id, slo, slo_factor)
            self._next = next(self._it, None)
        self._schedule()


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
