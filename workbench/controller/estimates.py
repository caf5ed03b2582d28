"""Duration estimates (Clockwork `Model::add_measurement/estimate`, `sliding_window.h`, clockwork.md §4.4).

Per (model, batch size) a window of the last `window` measured exec durations multiplied by the GPU clock
(MHz) at which they ran; the estimate is a high percentile of the window (Clockwork: p99 of 10, i.e. nearly
the maximum; ours by default p95 of 50, shared by the copies of an artifact, see ControllerConfig), divided
by the clock of the GPU it is asked for. Normalising by the clock keeps the estimate valid when a GPU's clock
changes. Weight loads use the same window over raw durations (clock 1).
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque


def percentile(values: list[int], p: float) -> float:
    """Linear interpolation between order statistics (numpy's default), for a small list."""
    s = sorted(values)
    n = len(s)
    if n == 1:
        return float(s[0])
    rank = p * (n - 1)
    lo = int(rank)
    if lo >= n - 1:
        return float(s[-1])
    return s[lo] + (rank - lo) * (s[lo + 1] - s[lo])


class SlidingEstimate:
    """p-th percentile of the last `window` samples; `value` is in ns x MHz (or ns when clock=1). Samples are
    kept as floats (exact for the integers they hold, < 2**53): a window of one type compares faster."""
    __slots__ = ("samples", "p", "value", "window", "_at", "_sorted")

    def __init__(self, window: int = 10, p: float = 0.99, seed: float | None = None):
        if window < 1:
            raise ValueError(f"estimate window must be >= 1, got {window}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"estimate percentile must be in [0, 1], got {p}")
        self.samples: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []          # the samples, sorted (kept so, not re-sorted per sample)
        self.window = window
        self.p = p
        self.value = 0.0
        # per number of samples n: (lo, rank - lo) of `percentile`, or None where it returns the maximum
        at = _AT.get((p, window))
        if at is None:
            at = [None]
            at += [_interp(p, n) for n in range(1, window + 1)]
            _AT[(p, window)] = at
        self._at: list[tuple[int, float] | None] = at
        if seed is not None and seed > 0:
            self.add(seed)

    def add(self, sample: float) -> None:
        sample = float(sample)
        samples = self.samples
        s = self._sorted
        if len(samples) == self.window:
            del s[bisect_left(s, samples[0])]
        samples.append(sample)
        insort(s, sample)
        n = len(s)
        if n == 1:
            self.value = float(sample)
            return
        at = self._at[n]
        # the same arithmetic as percentile(), so estimates do not depend on which is used
        self.value = float(s[-1]) if at is None else s[at[0]] + at[1] * (s[at[0] + 1] - s[at[0]])

    @property
    def known(self) -> bool:
        return bool(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


_AT: dict[tuple[float, int], list[tuple[int, float] | None]] = {}


def _interp(p: float, n: int) -> tuple[int, float] | None:
    rank = p * (n - 1)
    lo = int(rank)
    return None if lo >= n - 1 else (lo, rank - lo)


class ModelEstimates:
    """Exec estimates per supported batch size plus the weights-load estimate of one model.

    `exec_table(clock)` lists the estimate (ns) per batch size on a GPU at `clock` MHz. Sizes with no profiled
    duration are extrapolated linearly from the largest smaller known size (conservative: batching is never
    slower per sample than running one at a time), until measured.
    """
    __slots__ = ("batch_sizes", "exec", "load", "ref_clock", "values", "_tables", "_index")

    def __init__(self, batch_sizes: tuple[int, ...], exec_ns: tuple[int, ...], load_ns: int, ref_clock: int,
                 window: int = 10, p: float = 0.99):
        if len(exec_ns) not in (0, len(batch_sizes)):
            raise ValueError(f"{len(exec_ns)} profiled exec durations for {len(batch_sizes)} batch sizes "
                             f"{batch_sizes}: give one per batch size (or none)")
        self.batch_sizes = tuple(batch_sizes)
        self.ref_clock = int(ref_clock)
        self.exec = {b: SlidingEstimate(window, p, (exec_ns[i] * ref_clock) if exec_ns else None)
                     for i, b in enumerate(self.batch_sizes)}
        self.load = SlidingEstimate(window, p, load_ns if load_ns > 0 else None)
        self.values: list[float] = []           # ns x MHz per batch size (extrapolated where unmeasured)
        self._tables: dict[int, list[int]] = {}  # clock -> exec ns per batch size
        self._index = {b: k for k, b in enumerate(self.batch_sizes)}
        self._recompute()

    def _recompute(self) -> None:
        vals, prev_b, prev = [], 0, 0.0
        for b in self.batch_sizes:
            e = self.exec[b]
            if e.samples:
                v = e.value
                prev_b, prev = b, v
            else:
                v = prev * b / prev_b if prev_b else 0.0
            vals.append(v)
        self.values = vals
        self._tables = {}

    def add_exec(self, batch_size: int, duration_ns: int, clock_mhz: int) -> None:
        e = self.exec[batch_size]
        samples = e.samples
        sample = float(duration_ns * (clock_mhz or self.ref_clock))
        if not samples:
            e.add(sample)
            self._recompute()
            return
        old = e.value
        s = e._sorted                           # e.add(sample), written out (a window that had a sample)
        if len(samples) == e.window:
            del s[bisect_left(s, samples[0])]
        samples.append(sample)
        insort(s, sample)
        at = e._at[len(s)]
        e.value = v = float(s[-1]) if at is None else s[at[0]] + at[1] * (s[at[0] + 1] - s[at[0]])
        if v != old:
            # What _recompute would change: this size's value and the unmeasured sizes after it (extrapolated
            # from it); the cached tables get those entries anew (new lists: a caller may hold the old one).
            k = self._index[batch_size]
            vals = self.values
            vals[k] = v
            sizes = self.batch_sizes
            ex = self.exec
            j = k + 1
            while j < len(sizes) and not ex[sizes[j]].samples:
                vals[j] = v * sizes[j] / batch_size
                j += 1
            ref = self.ref_clock
            tables = self._tables
            for c, t in list(tables.items()):
                clock = c or ref
                t = t.copy()
                for i in range(k, j):
                    t[i] = int(vals[i] // clock)
                tables[c] = t

    def add_load(self, duration_ns: int) -> None:
        self.load.add(duration_ns)

    def exec_table(self, clock_mhz: int) -> list[int]:
        """Exec estimate (ns) per batch size, in `batch_sizes` order, at `clock_mhz` (cached per clock)."""
        t = self._tables.get(clock_mhz)
        if t is None:
            clock = clock_mhz or self.ref_clock
            t = self._tables[clock_mhz] = [int(v // clock) for v in self.values]
        return t

    def exec_ns(self, batch_size: int, clock_mhz: int = 0) -> int:
        return self.exec_table(clock_mhz)[self.batch_sizes.index(batch_size)]

    def load_ns(self) -> int:
        return int(self.load.value)
