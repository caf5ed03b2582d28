"""Helpers for the controller benchmarks: the 4,000-instance model mix, Zipf rates, and a CPU-time split that
says how much of a simulation's time the controller itself spent (vs the emulated workers, the clock and the
workload)."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

# 4,000 instances of the profile's models (Clockwork ran 61 zoo models x 66 copies = 4,026). Their weights
# (22,200 pages of 16 MiB) are ~2.7x what six 21.5 GiB weights caches hold, so models are swapped as in §6.5.
MIX_4000 = {"resnet50": 2000, "resnet18": 1000, "mobilenet_v2": 600, "bert_base": 200, "tiny_transformer": 200}


def zipf_rates(ids: list[int], total: float, s: float = 1.0, seed: int = 0) -> dict[int, float]:
    """Rates summing to `total` over `ids`, Zipf(s) by a seeded random rank."""
    import numpy as np
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(len(ids)) + 1
    w = 1.0 / ranks.astype(float) ** s
    w *= total / w.sum()
    return {m: float(x) for m, x in zip(ids, w)}


class CpuSplit:
    """Thread CPU time inside the controller's entry points, minus the worker submits it makes (the worker's
    result callbacks run inside the worker's own events, so they count for the controller, as they should)."""

    def __init__(self) -> None:
        self.controller = 0.0
        self.worker_submit = 0.0
        self.entries = 0
        self.overhead = 0.0   # seconds the measuring itself adds per entry (calibrated at install)
        self._depth = 0

    @property
    def controller_own(self) -> float:
        return self.controller - self.worker_submit - self.entries * self.overhead

    @contextlib.contextmanager
    def installed(self) -> Iterator["CpuSplit"]:
        from workbench.controller.controller import Controller
        from workbench.worker.base import Worker
        saved = {n: getattr(Controller, n) for n in ("submit", "_on_result", "_on_timer", "_run_call")}
        saved_submit = Worker.submit
        tt = time.thread_time
        split = self

        def wrap(f):
            def g(self, *a, **kw):
                if split._depth:
                    return f(self, *a, **kw)
                split._depth += 1
                split.entries += 1
                t = tt()
                try:
                    return f(self, *a, **kw)
                finally:
                    split.controller += tt() - t
                    split._depth -= 1
            return g

        # calibrate: what a wrapped no-op costs beyond the no-op itself, counted as controller time
        def noop(self):
            return None
        wrapped, n = wrap(noop), 20000
        t0 = tt()
        for _ in range(n):
            noop(None)
        bare = tt() - t0
        before = self.controller
        for _ in range(n):
            wrapped(None)
        inside = self.controller - before           # the no-op's time plus the clock reads inside the window
        self.overhead = max(0.0, inside - bare) / n
        self.controller, self.entries = 0.0, 0

        def wsubmit(self, action):
            t = tt()
            try:
                return saved_submit(self, action)
            finally:
                split.worker_submit += tt() - t

        try:
            for n, f in saved.items():
                setattr(Controller, n, wrap(f))
            Worker.submit = wsubmit
            yield self
        finally:
            for n, f in saved.items():
                setattr(Controller, n, f)
            Worker.submit = saved_submit


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")
