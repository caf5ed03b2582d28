"""Run a controller, emulated workers and a workload on a `VirtualClock`: a deterministic discrete-event
simulation (same arguments and seed -> identical outcomes), hours of trace in minutes of wall time.

    res = simulate({"resnet50": 66, "bert_base": 10}, num_gpus=1, workers=6, policy="clockwork",
                   workload=lambda ids: Poisson(ids, rate=500, slo_ms=100), duration_s=60, seed=1)
    res.statuses, res.goodput, res.slo_attainment, res.speed

Models are "profile:<name>" entries of the emulation profile (or artifact directories); instance ids are
allocated in the order given, starting at 0. Arrivals come from a `workbench.workload` Workload (or a factory
`f(model_ids) -> Workload`), or from an iterable of (t_ns, model_id, slo_ns or None) in time order.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from workbench.clock import VirtualClock
from workbench.controller.config import ControllerConfig
from workbench.controller.controller import Controller
from workbench.controller.policy import Policy
from workbench.controller.requests import STATUSES, SUCCESS

NS = 1_000_000_000


@dataclass
class SimResult:
    policy: str
    model_ids: list[int]
    num_gpus: int
    virtual_s: float            # simulated seconds of arrivals (duration)
    wall_s: float               # wall time of the run (after set-up)
    cpu_s: float                # process CPU time of the run (robust to other load on the machine)
    events: int                 # clock events run
    submitted: int
    statuses: dict[str, int]
    summary: dict               # controller + policy counters
    workload: dict = field(default_factory=dict)
    recorder: Any = None

    @property
    def goodput(self) -> float:
        """Requests per virtual second that succeeded (met their deadline)."""
        return self.statuses.get(SUCCESS, 0) / self.virtual_s if self.virtual_s > 0 else 0.0

    @property
    def slo_attainment(self) -> float:
        """Fraction of submitted requests that succeeded."""
        return self.statuses.get(SUCCESS, 0) / self.submitted if self.submitted else 0.0

    @property
    def speed(self) -> float:
        """Virtual seconds per wall second."""
        return self.virtual_s / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def requests_per_wall_s(self) -> float:
        return self.submitted / self.wall_s if self.wall_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"policy": self.policy, "models": len(self.model_ids), "num_gpus": self.num_gpus,
                "virtual_s": self.virtual_s, "wall_s": self.wall_s, "cpu_s": self.cpu_s, "events": self.events,
                "submitted": self.submitted, "statuses": dict(self.statuses), "goodput": self.goodput,
                "slo_attainment": self.slo_attainment, "speed": self.speed,
                "requests_per_wall_s": self.requests_per_wall_s, "summary": self.summary,
                "workload": self.workload}


class ArrivalPump:
    """Submits (t, model_id, slo) arrivals in time order with one pending timer."""

    def __init__(self, ctl: Controller, clock: VirtualClock, arrivals: Iterable[tuple], t_end: int | None):
        self.ctl, self.clock = ctl, clock
        self.it = iter(arrivals)
        self.t_end = t_end
        self.submitted = 0
        self.outcomes: Counter[str] = Counter()
        self._next = next(self.it, None)
        self._last = -1
        self._schedule()

    def _done(self, outcome) -> None:
        self.outcomes[outcome.status] += 1

    def _schedule(self) -> None:
        nxt = self._next
        if nxt is None or (self.t_end is not None and nxt[0] >= self.t_end):
            self._next = None
            return
        if nxt[0] < self._last:
            raise ValueError(f"arrivals must be in time order: {nxt[0]} after {self._last}")
        self._last = nxt[0]
        self.clock.call_at(nxt[0], self._fire)

    def _fire(self) -> None:
        now = self.clock.now()
        submit, done = self.ctl.submit, self._done
        while self._next is not None and self._next[0] <= now:
            a = self._next
            submit(a[1], slo=a[2] if len(a) > 2 else None, callback=done)
            self.submitted += 1
            self._next = next(self.it, None)
            if self._next is not None and self._next[0] < a[0]:
                raise ValueError(f"arrivals must be in time order: {self._next[0]} after {a[0]}")
        self._schedule()


def model_list(models: Mapping[str, int] | Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    items = list(models.items()) if isinstance(models, Mapping) else [tuple(x) for x in models]
    out = []
    for name, copies in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"model name must be a non-empty string, got {name!r}")
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies of {name!r} must be an int >= 1, got {copies!r}")
        path = name if (name.startswith("profile:") or "/" in name) else f"profile:{name}"
        out.append((path, copies))
    if not out:
        raise ValueError("no models given")
    return out


def simulate(models: Mapping[str, int] | Sequence[tuple[str, int]], *, num_gpus: int = 1, workers: int = 1,
             policy: str | Policy = "clockwork", workload: Any = None, arrivals: Iterable[tuple] | None = None,
             duration_s: float, seed: int = 0, profile: Any = "h200", config: ControllerConfig | None = None,
             worker_config: Any = None, recorder: Any = None, policy_options: dict | None = None,
             drain_s: float | None = None, on_ready: Callable[[Controller, VirtualClock], None] | None = None,
             on_progress: Callable[[float, Controller], None] | None = None, progress_every_s: float = 60.0
             ) -> SimResult:
    """Simulate `duration_s` virtual seconds of arrivals, then let outstanding requests finish (at most
    `drain_s`, default the longest SLO). `workers` workers with `num_gpus` emulated GPUs each.
    `on_progress(virtual_s, controller)` is called every `progress_every_s` virtual seconds."""
    from workbench.worker.emulated import EmulatedWorker
    from workbench.worker.profile import Profile

    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    if (workload is None) == (arrivals is None):
        raise ValueError("give exactly one of `workload` (a Workload or a factory) and `arrivals`")
    if workers < 1 or num_gpus < 1:
        raise ValueError(f"need workers >= 1 and num_gpus >= 1 (got {workers}, {num_gpus})")
    specs = model_list(models)
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    clock = VirtualClock()
    ctl = Controller(clock, policy=policy, config=config, recorder=recorder, **(policy_options or {}))
    def make_worker(w: int) -> Callable[[Callable[[Any], None]], EmulatedWorker]:
        return lambda cb: EmulatedWorker(clock, num_gpus, prof, worker_config, cb, seed=seed * 1000 + w)

    for w in range(workers):
        ctl.add_worker(make_worker(w))
    ids: list[int] = []
    for path, copies in specs:
        ids += ctl.load_model(path, copies)
    ctl.wait_ready()
    if on_ready is not None:
        on_ready(ctl, clock)
    t0 = clock.now()
    t_end = t0 + int(duration_s * NS)
    pump: ArrivalPump | None = None
    wl: Any = None              # the Workload (anything with start(), submitted and stats())
    if arrivals is not None:
        pump = ArrivalPump(ctl, clock, ((t0 + a[0],) + tuple(a[1:]) for a in arrivals), t_end)
    else:
        wl = workload(ids) if callable(workload) and not hasattr(workload, "start") else workload
        wl.start(ctl, clock, t0=t0, duration_s=duration_s)
    events0 = clock.events_run
    w0, c0 = time.perf_counter(), time.process_time()
    if on_progress is None:
        clock.run_until(t_end)
    else:   # run in slices, reporting virtual seconds done (no clock events added: outcomes are unchanged)
        step_ns = max(1, int(progress_every_s * NS))
        while clock.now() < t_end:
            clock.run_until(min(t_end, clock.now() + step_ns))
            on_progress((clock.now() - t0) / NS, ctl)
    drain = int((drain_s if drain_s is not None else _max_slo_s(ctl) + 1.0) * NS)
    step = NS // 10
    while _pending(ctl) and clock.now() < t_end + drain:
        clock.run_until(clock.now() + step)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    statuses = {s: ctl.stats.get(s, 0) for s in STATUSES}
    submitted = pump.submitted if pump is not None else wl.submitted
    return SimResult(policy=ctl.policy.name, model_ids=ids, num_gpus=len(ctl.gpus), virtual_s=duration_s,
                     wall_s=wall, cpu_s=cpu, events=clock.events_run - events0, submitted=submitted,
                     statuses=statuses, summary=ctl.summary(), workload=wl.stats() if wl is not None else {},
                     recorder=recorder)


def _pending(ctl: Controller) -> int:
    s = ctl.stats
    return s.get("admitted", 0) - sum(s.get(k, 0) for k in STATUSES if k != "rejected")


def _max_slo_s(ctl: Controller) -> float:
    return max(ctl.max_slo, ctl.config.default_slo) / NS
