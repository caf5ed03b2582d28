"""Poisson open loop (Clockwork's `PoissonOpenLoop`, `poisson-open-loop`, `fill_memory`): independent Poisson
arrivals per model. Generated as one Poisson process at the total rate whose arrivals pick model i with
probability rate_i / total (the same process, and one pending timer however many models)."""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from workbench.workload.base import Block, OpenLoop, as_id_list, non_negative, poisson_times


class Poisson(OpenLoop):
    kind = "poisson"

    def __init__(self, models: Sequence[int] | int | Mapping[int, float], *, rate: float | None = None,
                 rates: Sequence[float] | None = None, **kw: Any):
        """`rate`: total requests/s spread evenly over `models`; or `rates`: one rate per model; or `models` as
        a {model_id: rate} mapping."""
        super().__init__(**kw)
        if isinstance(models, Mapping):
            self.models = [int(m) for m in models]
            r = list(models.values())
        else:
            self.models = as_id_list(models, self.kind)
            if rates is not None:
                if len(rates) != len(self.models):
                    raise ValueError(f"{self.kind}: {len(rates)} rates for {len(self.models)} models")
                r = list(rates)
            elif rate is not None:
                r = [non_negative(rate, f"{self.kind}: rate") / len(self.models)] * len(self.models)
            else:
                raise ValueError(f"{self.kind}: give `rate` (total requests/s) or `rates` (one per model)")
        r = [non_negative(v, f"{self.kind}: the rate of model {m}") for m, v in zip(self.models, r)]
        self.rates = np.asarray(r, dtype=np.float64)
        self.total_rate = float(self.rates.sum())
        if not self.total_rate > 0:
            raise ValueError(f"{self.kind}: the total rate must be > 0")

    def _blocks(self) -> Iterator[Block]:
        ids = np.asarray(self.models, dtype=np.int64)
        p = self.rates / self.total_rate
        uniform = bool(np.all(p == p[0]))
        slo, factor = self.slo, self.slo_factor
        for times in poisson_times(self.rng, self.total_rate, self.t0):
            idx = self.rng.integers(0, len(ids), size=times.size) if uniform \
                else self.rng.choice(len(ids), size=times.size, p=p)
            yield times.tolist(), ids[idx].tolist(), [slo] * times.size, [factor] * times.size
