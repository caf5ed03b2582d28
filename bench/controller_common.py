"""Helpers for the controller benchmarks: the 4,000-instance model mix, Zipf rates, CPU-time splits that say
how much of a simulation's time the controller itself spent (vs the emulated workers, the clock and the
workload): `CpuSplit` (controller vs the rest) and `Breakdown` (every component, exclusive times), and which
build of the simulation core runs (`select_core`, `core_description`: compiled with mypyc or interpreted).

The splits wrap entry points by assigning to class attributes. That works for the mypyc-compiled classes too:
the callers enter through Python-level lookups (the workload's `controller.submit`, bound methods posted on the
clock or handed to the workers), which find the wrappers; calls inside the compiled core do not, and need not."""
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
        try:
            from workbench.worker.emulated import _Lean
        except ImportError:          # a tree without the lean emulated worker (before/after comparisons)
            _Lean = None
        saved = {n: getattr(Controller, n) for n in ("submit", "_on_result", "_on_timer", "_run_call")}
        saved_submit = Worker.submit
        saved_lean = _Lean.submit if _Lean is not None else None
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

        def lsubmit(self, action):      # the emulated worker's lean path (virtual time)
            t = tt()
            try:
                return saved_lean(self, action)
            finally:
                split.worker_submit += tt() - t

        try:
            for n, f in saved.items():
                setattr(Controller, n, wrap(f))
            Worker.submit = wsubmit
            if _Lean is not None:
                _Lean.submit = lsubmit
            yield self
        finally:
            for n, f in saved.items():
                setattr(Controller, n, f)
            Worker.submit = saved_submit
            if _Lean is not None:
                _Lean.submit = saved_lean


def select_core(interpreted: bool) -> None:
    """Run the simulation core from its .py sources even where the compiled build is present (`interpreted`),
    else as built. Call before anything imports the core."""
    if interpreted:
        from workbench.controller.compiled import prefer_sources
        prefer_sources()


def core_description() -> str:
    """How the simulation core ran (after it ran): compiled with mypyc, or interpreted."""
    from workbench.controller.compiled import MODULES, loaded_compiled
    n = len(loaded_compiled())
    return f"compiled with mypyc ({n} of {len(MODULES)} core modules)" if n else "interpreted (pure Python)"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


class Breakdown:
    """Exclusive time per component of a simulation: the workload (arrivals, completion callbacks), the
    controller (its entry points), the emulated workers (their submit and clock events) and the rest (the
    clock's event loop and heap, and the simulation driver). Entering a component's function stops the clock of
    the component that called it, so nothing is counted twice. It reads `time.perf_counter` (a thread CPU clock
    costs a system call per read, which distorted the split by ~25%); `shares()` are fractions of the measured
    time, to apply to a CPU time measured without the wrappers. Each wrapped call's own cost, calibrated at
    install, is taken off the component called."""

    COMPONENTS = ("workload", "controller", "worker", "clock and driver")

    def __init__(self) -> None:
        self.time = dict.fromkeys(self.COMPONENTS, 0.0)
        self.calls = dict.fromkeys(self.COMPONENTS, 0)
        self.overhead = 0.0     # seconds one wrapped call adds (calibrated)
        self._stack: list[str] = []
        self._mark = 0.0

    def reset(self) -> None:
        """Start counting afresh (e.g. after a warm-up)."""
        tt = time.perf_counter
        for k in self.time:
            self.time[k] = 0.0
            self.calls[k] = 0
        self._mark = tt()

    def shares(self) -> dict[str, float]:
        """Fraction of the time per component, measuring cost removed."""
        t = {k: max(0.0, self.time[k] - self.calls[k] * self.overhead) for k in self.COMPONENTS}
        total = sum(t.values()) or 1.0
        return {k: v / total for k, v in t.items()}

    def per_request_us(self, n: int, total_s: float) -> dict[str, float]:
        """Microseconds per request and component, splitting `total_s` (e.g. CPU seconds) by `shares()`."""
        return {k: f * total_s / max(n, 1) * 1e6 for k, f in self.shares().items()}

    def _targets(self) -> list[tuple[type, str, str]]:
        from workbench.controller.controller import Controller
        from workbench.worker.base import Worker
        from workbench.worker.executor import ClockExecutor
        from workbench.workload.base import OpenLoop, Workload
        t = [(Controller, n, "controller") for n in ("submit", "_on_result", "_on_timer", "_run_call",
                                                     "worker_restarted")]
        try:
            from workbench.worker.emulated import _Lean
            t += [(_Lean, n, "worker") for n in ("submit", "_on_wake", "_on_done")]
        except ImportError:     # a tree without the lean emulated worker: its general path's clock events
            t += [(ClockExecutor, n, "worker") for n in ("_on_wake", "_on_done")]
        t += [(Worker, "submit", "worker")]
        t += [(OpenLoop, "_fire", "workload"), (Workload, "_done", "workload")]
        return [(c, n, k) for c, n, k in t if n in c.__dict__]

    @contextlib.contextmanager
    def installed(self) -> Iterator["Breakdown"]:
        tt = time.perf_counter
        stack = self._stack
        acc = self.time
        calls = self.calls
        me = self

        def wrap(f, comp):
            def g(*a, **kw):
                now = tt()
                acc[stack[-1]] += now - me._mark
                stack.append(comp)
                calls[comp] += 1
                me._mark = now
                try:
                    return f(*a, **kw)
                finally:
                    now = tt()
                    acc[stack.pop()] += now - me._mark
                    me._mark = now
            return g

        # calibrate: a wrapped no-op against a bare one (both inside a component, as in the simulation)
        def noop():
            return None
        stack[:] = ["clock and driver"]
        w, n = wrap(noop, "clock and driver"), 20000
        t0 = tt()
        for _ in range(n):
            noop()
        bare = tt() - t0
        t0 = tt()
        for _ in range(n):
            w()
        self.overhead = max(0.0, (tt() - t0) - bare) / n
        saved = [(c, name, c.__dict__[name]) for c, name, _ in self._targets()]
        try:
            for (c, name, f), (_, _, comp) in zip(saved, self._targets()):
                setattr(c, name, wrap(f, comp))
            self.reset()
            stack[:] = ["clock and driver"]
            yield self
        finally:
            acc[stack[0]] += tt() - self._mark
            for c, name, f in saved:
                setattr(c, name, f)
