"""Azure Functions trace replay (Clockwork's `azure` workload, clockwork.md §6.2 / §6.6).

Functions map to model instances as Clockwork's `azure2` does: functions sorted by total invocations
(descending), the instance list shuffled with the seed (Clockwork loads its models in pseudo-random order), and
function of rank i -> instance `models[M * i // F]` (contiguous blocks: "4 or 5 functions per model" at 4,026
instances). `mapping="round_robin"` gives rank i -> `models[i % M]` instead.

Each trace minute is replayed over `interval_s` seconds (60 = real time; less compresses time) with
`count * scale` arrivals per function, spread inside the interval:
- "poisson": Poisson(count * scale) arrivals at uniform random times (Clockwork's PoissonTraceReplay: exponential
  gaps at rate count * scale / interval);
- "uniform": round(count * scale) arrivals (the fraction rounded randomly) at uniform random times;
- "even": the same number, evenly spaced inside the interval.
All three are deterministic for a seed. Minutes are read from the trace lazily, `chunk_minutes` at a time.
`trace` is a path (a day file or the directory of day files), an `AzureTrace`, or "synthetic:N[:SEED[:DAYS]]"
for a generated trace of N functions in the real layout (workbench.workload.azure_synth; cached on disk).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from workbench.workload.azure_trace import AzureTrace
from workbench.workload.base import NS, Block, OpenLoop, as_id_list, positive

SPREADS = ("poisson", "uniform", "even")
MAPPINGS = ("clockwork", "round_robin")


def map_functions(ranks: np.ndarray, models: Sequence[int], mapping: str = "clockwork") -> np.ndarray:
    """Model id per function, given each function's rank (0 = most invoked)."""
    m = np.asarray(models, dtype=np.int64)
    f = ranks.size
    if mapping == "clockwork":
        return m[(len(m) * ranks) // max(f, 1)]
    if mapping == "round_robin":
        return m[ranks % len(m)]
    raise ValueError(f"mapping must be one of {MAPPINGS} (got {mapping!r})")


class AzureReplay(OpenLoop):
    kind = "azure"

    def __init__(self, trace: AzureTrace | str | os.PathLike, models: Sequence[int] | int, *,
                 scale: float = 1.0, interval_s: float = 60.0, start_minute: int = 0,
                 minutes: int | None = None, spread: str = "poisson", mapping: str = "clockwork",
                 shuffle_models: bool = True, days: Iterable[int] | None = None,
                 triggers: Iterable[str] | None = None, chunk_minutes: int = 60, **kw: Any):
        super().__init__(**kw)
        scale, interval_s = positive(scale, f"{self.kind}: scale"), positive(interval_s, f"{self.kind}: interval_s")
        if spread not in SPREADS:
            raise ValueError(f"{self.kind}: spread must be one of {SPREADS} (got {spread!r})")
        if isinstance(trace, str) and trace.startswith("synthetic:"):   # generated once, cached
            from workbench.workload.azure_synth import parse_synthetic, synthetic_trace_dir
            trace = synthetic_trace_dir(*parse_synthetic(trace))
        self.trace = trace if isinstance(trace, AzureTrace) else AzureTrace.open(trace, days, triggers=triggers)
        if self.trace.num_functions == 0:
            raise ValueError(f"{self.kind}: the trace has no function with any invocation")
        total = self.trace.num_minutes
        if not 0 <= start_minute < total:
            raise ValueError(f"{self.kind}: start_minute {start_minute} is outside the trace (0..{total - 1})")
        self.start_minute = int(start_minute)
        self.minutes = total - self.start_minute if minutes is None else int(minutes)
        if not 0 < self.minutes <= total - self.start_minute:
            raise ValueError(f"{self.kind}: minutes must be in 1..{total - self.start_minute} (got {minutes})")
        self.models = as_id_list(models, self.kind)
        order = list(self.models)
        if shuffle_models:
            order = [order[i] for i in np.random.default_rng([self.seed, 1]).permutation(len(order))]
        self.model_of = map_functions(self.trace.functions["rank"].to_numpy(), order, mapping)
        self.scale, self.interval_ns, self.spread = float(scale), int(interval_s * NS), spread
        self.chunk = max(1, int(chunk_minutes))

    def expected_requests(self) -> float:
        """Requests the replay will send on average (trace counts in the window x scale)."""
        return float(self.trace.counts(self.start_minute, self.minutes).sum()) * self.scale

    def _minute(self, counts: np.ndarray, t_start: int) -> tuple[np.ndarray, np.ndarray]:
        """Arrival times (sorted, ns) and model ids of one trace minute."""
        rng = self.rng
        lam = counts.astype(np.float64) * self.scale
        if self.spread == "poisson":
            n = rng.poisson(lam)
        else:
            base = np.floor(lam)
            n = (base + (rng.random(lam.size) < lam - base)).astype(np.int64)
        total = int(n.sum())
        if total == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        fn = np.repeat(np.arange(counts.size), n)
        if self.spread == "even":
            first = np.repeat(np.cumsum(n) - n, n)
            k = np.arange(total) - first
            offs = (k + 0.5) / np.repeat(n, n) * self.interval_ns
        else:
            offs = rng.random(total) * self.interval_ns
        order = np.argsort(offs, kind="stable")
        return (t_start + offs[order].astype(np.int64)), self.model_of[fn[order]]

    def _blocks(self) -> Iterator[Block]:
        slo, factor = self.slo, self.slo_factor
        for c0 in range(0, self.minutes, self.chunk):
            n_min = min(self.chunk, self.minutes - c0)
            block = self.trace.counts(self.start_minute + c0, n_min)
            for j in range(n_min):
                t_start = self.t0 + (c0 + j) * self.interval_ns
                if self.t_end is not None and t_start >= self.t_end:
                    return
                times, models = self._minute(block[:, j], t_start)
                if times.size:
                    yield times.tolist(), models.tolist(), [slo] * times.size, [factor] * times.size
