"""SLO sweep (Clockwork's `slo-exp-1`, Fig. 7 "How low can it go?"): Poisson arrivals over `models` while the
SLO steps every `period_s`: start at `start` and multiply by `factor` (op "mul") or add `factor` (op "add") each
period, until it passes `end` (then the workload stops). The SLO is absolute (`unit="ms"`) or a multiple of the
model's batch-1 latency (`unit="factor"`, sent as `slo_factor`, as Clockwork does)."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from workbench.workload.base import MS, NS, OpenLoop, as_id_list, poisson_times, positive


class SloSweep(OpenLoop):
    kind = "slo_sweep"

    def __init__(self, models: Sequence[int] | int, *, rate: float, start: float, factor: float = 1.5,
                 period_s: float = 30.0, end: float | None = None, op: str = "mul", unit: str = "ms",
                 **kw: Any):
        if "slo_ms" in kw or "slo_factor" in kw:
            raise ValueError(f"{self.kind}: the SLO comes from start/factor/end, not slo_ms/slo_factor")
        super().__init__(**kw)
        self.models = as_id_list(models, self.kind)
        rate, start = positive(rate, f"{self.kind}: rate"), positive(start, f"{self.kind}: start")
        factor = positive(factor, f"{self.kind}: factor")
        if op not in ("mul", "add"):
            raise ValueError(f"{self.kind}: op must be 'mul' or 'add' (got {op!r})")
        if (op == "mul" and not factor > 1) or (op == "add" and not factor > 0):
            raise ValueError(f"{self.kind}: factor must be > 1 for op 'mul', > 0 for 'add' (got {factor})")
        if unit not in ("ms", "factor"):
            raise ValueError(f"{self.kind}: unit must be 'ms' or 'factor' (got {unit!r})")
        if end is not None and positive(end, f"{self.kind}: end") < start:
            raise ValueError(f"{self.kind}: end ({end}) < start ({start})")
        self.rate, self.start_value, self.factor = rate, start, factor
        self.period_ns = int(positive(period_s, f"{self.kind}: period_s") * NS)
        self.end, self.op, self.unit = end, op, unit

    def step(self, t: int) -> int:
        return int((t - self.t0) // self.period_ns)

    def value_at(self, t: int) -> float:
        """The SLO (ms or factor, per `unit`) in force at time t."""
        k = self.step(t)
        return self.start_value * self.factor ** k if self.op == "mul" else self.start_value + self.factor * k

    def steps(self) -> list[float]:
        """Every SLO value the sweep visits (up to `end`, or 64 steps when open-ended)."""
        out, k = [], 0
        while len(out) < 64:
            v = self.start_value * self.factor ** k if self.op == "mul" else self.start_value + self.factor * k
            if self.end is not None and v > self.end * (1 + 1e-9):
                break
            out.append(v)
            k += 1
        return out

    def _arrivals(self) -> Iterator[tuple]:
        ids = np.asarray(self.models, dtype=np.int64)
        for times in poisson_times(self.rng, self.rate, self.t0):
            idx = self.rng.integers(0, len(ids), size=times.size)
            for t, m in zip(times.tolist(), ids[idx].tolist()):
                v = self.value_at(t)
                if self.end is not None and v > self.end * (1 + 1e-9):
                    return
                if self.unit == "ms":
                    yield t, m, int(round(v * MS)), None
                else:
                    yield t, m, None, v
