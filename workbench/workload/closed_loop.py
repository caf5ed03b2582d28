"""Closed loop (Clockwork's `ClosedLoop`, `comparison_experiment2`): N clients, each keeping `concurrency`
requests in flight, rotating over its models; after a completion the slot waits `think_time_ms` (fixed or
exponential) and sends the next request.

A request answered in zero time (refused or dropped at once) keeps its slot until the request's deadline (or
`backoff_ms` if given; at least 1 ms): in Clockwork a dropped request reached the client only as a timeout at
its deadline, and in virtual time an instant refusal would otherwise make the loop resubmit forever without
time advancing."""
from __future__ import annotations

import functools
from typing import Any, Sequence

from workbench.workload.base import MS, Workload, as_id_list, non_negative, positive


class ClosedLoop(Workload):
    kind = "closed_loop"

    def __init__(self, models: Sequence[int] | int, *, clients: int | None = None, concurrency: int = 1,
                 think_time_ms: float = 0.0, think: str = "fixed", stagger_ms: float = 0.0,
                 max_requests: int | None = None, backoff_ms: float | None = None, **kw: Any):
        super().__init__(**kw)
        self.models = as_id_list(models, self.kind)
        self.clients = len(self.models) if clients is None else int(clients)
        if self.clients < 1:
            raise ValueError(f"{self.kind}: clients must be >= 1 (got {clients})")
        if self.clients > len(self.models):
            raise ValueError(f"{self.kind}: {self.clients} clients but only {len(self.models)} models: "
                             f"each client needs at least one model")
        if int(concurrency) < 1:
            raise ValueError(f"{self.kind}: concurrency must be >= 1 (got {concurrency})")
        think_time_ms = non_negative(think_time_ms, f"{self.kind}: think_time_ms")
        stagger_ms = non_negative(stagger_ms, f"{self.kind}: stagger_ms")
        self.backoff_ns = None if backoff_ms is None else int(positive(backoff_ms, f"{self.kind}: backoff_ms") * MS)
        if think not in ("fixed", "exponential"):
            raise ValueError(f"{self.kind}: think must be 'fixed' or 'exponential' (got {think!r})")
        self.concurrency = int(concurrency)
        self.think_ns = int(think_time_ms * MS)
        self.think = think
        self.stagger_ns = int(stagger_ms * MS)
        self.max_requests = max_requests
        # client c rotates over models[c::clients]
        self.client_models = [self.models[c::self.clients] for c in range(self.clients)]
        self._cursor = [0] * self.clients
        self.client_in_flight = [0] * self.clients
        self.client_max_in_flight = [0] * self.clients

    def _begin(self) -> None:
        self._callbacks = [functools.partial(self._completed, c) for c in range(self.clients)]
        for c in range(self.clients):
            for _ in range(self.concurrency):
                delay = int(self.rng.uniform(0, self.stagger_ns)) if self.stagger_ns else 0
                self.clock.call_at(self.t0 + delay, self._issue, c)

    def _issue(self, c: int) -> None:
        if self.stopped or (self.t_end is not None and self.clock.now() >= self.t_end):
            return
        if self.max_requests is not None and self.submitted >= self.max_requests:
            return
        models = self.client_models[c]
        model_id = models[self._cursor[c] % len(models)]
        self._cursor[c] += 1
        n = self.client_in_flight[c] = self.client_in_flight[c] + 1
        if n > self.client_max_in_flight[c]:
            self.client_max_in_flight[c] = n
        if not self._submit(model_id, self.slo, self.slo_factor, callback=self._callbacks[c]):
            self.clock.call_soon(self._free_slot, c, self.backoff_ns or MS)   # refused: retry after a pause

    def _completed(self, c: int, outcome: Any) -> None:
        self._done(outcome)
        hold = 0
        if getattr(outcome, "latency", 1) <= 0:   # answered at once: hold the slot (see the module doc)
            if self.backoff_ns is not None:
                hold = self.backoff_ns
            else:
                hold = int(getattr(outcome, "deadline", 0) or 0) - int(getattr(outcome, "arrival", 0) or 0)
            hold = max(hold, MS)
        if self.clock.virtual:   # one thread: react now (saves a clock event per request)
            self._free_slot(c, hold)
        else:                    # may run on another thread: react on the clock's
            self.clock.call_soon(self._free_slot, c, hold)

    def _free_slot(self, c: int, hold: int = 0) -> None:
        self.client_in_flight[c] -= 1
        gap = self.think_ns if self.think == "fixed" else int(self.rng.exponential(self.think_ns))
        if hold > gap:
            gap = hold
        if gap == 0:
            self._issue(c)
        else:
            self.clock.call_at(self.clock.now() + gap, self._issue, c)
