"""`Sink`: a stand-in for the controller that answers every request itself, after a fixed or exponential
latency on the same clock, and logs each arrival. For checking a workload's arrival process (rates, gaps,
concurrency) and its own overhead without a serving system behind it; it makes no scheduling decisions."""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from workbench.clock import Clock
from workbench.controller.requests import RequestOutcome   # what a client hears, from a Sink too
from workbench.workload.base import non_negative


class Sink:
    def __init__(self, clock: Clock, latency_ms: float = 0.0, *, exponential: bool = False, seed: int = 0,
                 status: str = "success"):
        self.clock = clock
        self.latency_ns = int(non_negative(latency_ms, "sink: latency_ms") * 1e6)
        self.exponential = exponential
        self.rng = np.random.default_rng(seed)
        self.status = status
        self.arrivals: list[tuple[int, int, int | None, float | None]] = []   # (t, model, slo, slo_factor)
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def submit(self, model_id: int, inputs: Any = None, slo: int | None = None, slo_factor: float | None = None,
               callback: Callable[[RequestOutcome], None] | None = None) -> int:
        now = self.clock.now()
        with self._lock:
            rid = len(self.arrivals)
            self.arrivals.append((now, model_id, slo, slo_factor))
            self.in_flight += 1
            if self.in_flight > self.max_in_flight:
                self.max_in_flight = self.in_flight
            lat = int(self.rng.exponential(self.latency_ns)) if self.exponential else self.latency_ns
        deadline = now + (slo or 0)
        self.clock.call_at(now + lat, self._finish, rid, model_id, now, deadline, callback)
        return rid

    def _finish(self, rid: int, model_id: int, arrival: int, deadline: int, callback) -> None:
        now = self.clock.now()
        with self._lock:
            self.in_flight -= 1
        if callback is not None:
            callback(RequestOutcome(rid, model_id, self.status, arrival, now, now - arrival, deadline))

    def times(self) -> np.ndarray:
        return np.array([a[0] for a in self.arrivals], dtype=np.int64)

    def models(self) -> np.ndarray:
        return np.array([a[1] for a in self.arrivals], dtype=np.int64)
