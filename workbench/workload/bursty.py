"""Clockwork Fig. 6 "Can Clockwork serve thousands?" (`bursty_experiment2`, clockwork.md §6.2): a steady
high-priority *minor* model at `minor_rate` plus a *major* workload of `major_rate` spread round-robin over a
growing set of active models: after `lead_in_periods`, period k (k = 1, 2, ...) has `k * models_per_period`
active models (capped at the number of major models). Both streams are Poisson."""
from __future__ import annotations

import heapq
from typing import Any, Iterator, Sequence

from workbench.workload.base import NS, OpenLoop, as_id_list, non_negative, poisson_times, positive


class Bursty(OpenLoop):
    kind = "bursty"

    def __init__(self, minor_model: int, major_models: Sequence[int] | int, *, minor_rate: float = 200.0,
                 major_rate: float = 1000.0, period_s: float = 1.0, lead_in_periods: int = 0,
                 models_per_period: int = 1, **kw: Any):
        super().__init__(**kw)
        self.minor_model = int(minor_model)
        self.major_models = as_id_list(major_models, self.kind)
        self.minor_rate = non_negative(minor_rate, f"{self.kind}: minor_rate")
        self.major_rate = non_negative(major_rate, f"{self.kind}: major_rate")
        if self.minor_rate + self.major_rate == 0:
            raise ValueError(f"{self.kind}: minor_rate and major_rate are both 0: no request would arrive")
        if lead_in_periods < 0 or models_per_period < 1:
            raise ValueError(f"{self.kind}: need lead_in_periods >= 0, models_per_period >= 1")
        self.period_ns = int(positive(period_s, f"{self.kind}: period_s") * NS)
        self.lead_in = int(lead_in_periods)
        self.per_period = int(models_per_period)

    def active_models(self, t: int) -> int:
        """Number of active major models at time t."""
        k = (t - self.t0) // self.period_ns - self.lead_in + 1
        return max(0, min(len(self.major_models), k * self.per_period))

    def _minor(self) -> Iterator[tuple]:
        for times in poisson_times(self.rng, self.minor_rate, self.t0):
            for t in times.tolist():
                yield t, self.minor_model, self.slo, self.slo_factor

    def _major(self) -> Iterator[tuple]:
        start = self.t0 + self.lead_in * self.period_ns
        i = 0
        for times in poisson_times(self.rng, self.major_rate, start):
            for t in times.tolist():
                n = self.active_models(t)
                if n == 0:
                    continue
                yield t, self.major_models[i % n], self.slo, self.slo_factor
                i += 1

    def _arrivals(self) -> Iterator[tuple]:
        # both streams draw from one Generator lazily: merge order is deterministic, so is the result
        return heapq.merge(self._minor(), self._major(), key=lambda a: a[0])
