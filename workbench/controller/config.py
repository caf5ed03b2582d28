"""Controller settings (Clockwork INFER4 constants, clockwork.md §4.1-4.2, adapted where noted)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MS = 1_000_000
# a field's annotation -> (the values it takes, how to say so)
_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "int": (int, "an int (ns or a count)"), "float": ((int, float), "a number"), "bool": (bool, "True or False")}


@dataclass(frozen=True)
class ControllerConfig:
    default_slo: int = 100 * MS        # SLO of a request that names none; also the LoadTracker capacity
    schedule_ahead: int = 10 * MS      # dispatch only while a GPU's planned backlog is below this
    # The exec of a request must end `buffer` before its deadline, leaving time for the output copy and the
    # result to reach the client. Clockwork used 5 ms (it crossed a network); in-process 1 ms is ample.
    buffer: int = 1 * MS
    future: int = 500_000              # nothing planned starts sooner than now + future (send latency)
    lag: int = 10 * MS                 # a GPU timeline's head overdue by more than this stops blocking it
    max_loads: int = 2                 # LoadWeights outstanding per GPU
    max_loadweights_slo: int = 25 * MS
    load_interval: int = 1 * MS        # load decisions for warm models are coalesced over this interval
    max_batch: int = 16
    max_exec: int = 250 * MS           # batch sizes whose estimate exceeds this are not used
    default_clock: int = 1980          # MHz: the clock profiled durations are assumed to be measured at
    # Exec/load estimate = this percentile of the last `estimate_window` measurements. Clockwork's p99 of 10 is
    # nearly the maximum, so one slow exec (0.3 % of them, +4 %, on the H200) makes the next ten predictions of
    # its model 0.2 ms too long. With `share_estimates`, the copies of one artifact (the same compiled kernels)
    # feed and read one window, which fills 20x faster with 20 copies, and p95 of 50 leaves out its two slowest
    # samples. Replayed on two H200 recordings of 20 ResNet-50 copies (bench/results/estimator_replay*.md):
    # error p99 201 / 195 us (Clockwork's p99 of 10 per copy) -> 33 / 33 us, and execs that ran longer than
    # predicted 16 % -> 7-8 %. False keeps one window per copy, as Clockwork does.
    estimate_window: int = 50
    estimate_percentile: float = 0.95
    share_estimates: bool = True
    # An action unanswered `grace` after latest + predicted duration has failed (its requests end with error;
    # `failed_after` such actions in a row take the GPU out of service). Real time in a busy Python process
    # needs slack: a watchdog that itself fires late (the process stalled) waits another grace instead.
    grace: int = 100 * MS
    failed_after: int = 3              # unanswered actions in a row before a GPU is taken out of service
    # A worker whose GPU was taken out of service is asked for its state (GetWorkerState) every probe_interval
    # until it answers; the answer brings the GPU back, with what its cache really holds.
    probe_interval: int = 1000 * MS
    retry_window_errors: bool = True   # requeue requests whose Infer could not start in time (if still feasible)
    startup_timeout: int = 60_000 * MS  # LoadModelFromDisk / GetWorkerState window

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            # Times and counts must be ints: a float (e.g. default_slo = 1e8 in a TOML file) flows into request
            # deadlines and breaks the int-only telemetry columns and the controller's int fast paths.
            want, kind = _TYPES[str(f.type)]        # (the annotation as written: a str, see __future__)
            if not isinstance(v, want) or (isinstance(v, bool) and want is not bool):
                hint = f" (write {int(v)})" if want is int and isinstance(v, float) and v.is_integer() else ""
                raise ValueError(f"ControllerConfig.{f.name} must be {kind}, got {type(v).__name__} {v!r}{hint}")
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"ControllerConfig.{f.name} must be >= 0, got {v}")
        for name in ("default_slo", "max_batch", "max_loads", "default_clock", "estimate_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ControllerConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.estimate_percentile <= 1.0:
            raise ValueError(f"ControllerConfig.estimate_percentile must be in (0, 1], got {self.estimate_percentile}")

    def replace(self, **changes) -> "ControllerConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ControllerConfig field(s) {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)
