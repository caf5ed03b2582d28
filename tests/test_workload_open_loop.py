"""The open-loop engine (blocks of arrivals, one pending timer) and the closed loop's event economy in virtual
time: cut at the duration inside a block, stop() mid-run, refused submits, custom generators, and exactly one
clock event per arrival."""
from __future__ import annotations

import numpy as np

from workbench.clock import VirtualClock
from workbench.workload import AzureReplay, ClosedLoop, OpenLoop, Poisson
from workbench.workload.sink import Sink

NS = 1_000_000_000
MS = 1_000_000


class NullController:
    """Accepts every request and never answers: only the workload's own clock events remain."""

    def __init__(self, clock: VirtualClock, refuse_every: int = 0):
        self.clock, self.refuse_every = clock, refuse_every
        self.calls: list[tuple] = []

    def submit(self, model_id, inputs=None, slo=None, slo_factor=None, callback=None) -> int:
        self.calls.append((self.clock.now(), model_id, slo, slo_factor))
        if self.refuse_every and len(self.calls) % self.refuse_every == 0:
            raise RuntimeError("queue full")
        return len(self.calls)


def test_duration_cuts_inside_a_block_and_one_event_per_arrival():
    clock = VirtualClock()
    ctl = NullController(clock)
    w = Poisson(10, rate=20_000, seed=1, slo_ms=50).start(ctl, clock, duration_s=0.3333)
    clock.run()
    t = np.array([c[0] for c in ctl.calls])
    assert len(t) == w.submitted and abs(len(t) - 6666) < 5 * np.sqrt(6666)   # blocks are 4,096 arrivals
    assert t.max() < int(0.3333 * NS) and t.max() > int(0.3333 * NS) - 2 * MS
    assert np.all(np.diff(t) >= 0) and all(c[2] == 50 * MS and c[3] is None for c in ctl.calls)
    assert clock.events_run == len(np.unique(t))   # one timer per arrival time, nothing else
    assert not w.next_arrival_pending() and clock.pending() == 0


def test_stop_mid_run_ends_arrivals_and_leaves_no_timer():
    clock = VirtualClock()
    ctl = NullController(clock)
    w = Poisson([3, 4], rate=1000, seed=2).start(ctl, clock)   # no duration: runs until stopped
    assert w.next_arrival_pending()
    clock.call_at(int(0.25 * NS), w.stop)
    clock.run_until(2 * NS)
    assert ctl.calls and max(c[0] for c in ctl.calls) <= int(0.25 * NS)
    assert w.submitted == len(ctl.calls) and not w.next_arrival_pending()
    assert clock.pending() == 0


def test_refused_submits_are_outcomes_and_arrivals_go_on():
    clock = VirtualClock()
    ctl = NullController(clock, refuse_every=4)
    w = Poisson(2, rate=500, seed=3).start(ctl, clock, duration_s=1.0)
    clock.run()
    assert w.submitted == len(ctl.calls) > 400
    assert w.outcomes["submit_error"] == w.submitted // 4 == w.completed
    assert w.stats()["submit_errors"][0] == "RuntimeError: queue full"


class Scripted(OpenLoop):
    """A custom generator through `_arrivals()` (tuples, numpy ids): batched into blocks by the base class."""
    kind = "scripted"
    BLOCK = 7

    def _arrivals(self):
        for k in range(30):
            yield self.t0 + k * MS, np.int64(k % 3), (k + 1) * MS, None if k % 2 else 2.5


class Gappy(OpenLoop):
    """A custom `_blocks()` with empty blocks in between."""
    kind = "gappy"

    def _blocks(self):
        yield [], [], [], []
        yield [self.t0 + 5, self.t0 + 5, self.t0 + 9], [1, 2, 3], [None] * 3, [None] * 3
        yield [], [], [], []
        yield [self.t0 + 20], [4], [7], [None]


def test_custom_generators_keep_order_values_and_simultaneous_arrivals():
    clock = VirtualClock()
    ctl = NullController(clock)
    Scripted(seed=0).start(ctl, clock, t0=100)
    clock.run()
    assert ctl.calls == [(100 + k * MS, k % 3, (k + 1) * MS, None if k % 2 else 2.5) for k in range(30)]
    assert all(type(c[1]) is int for c in ctl.calls)
    clock = VirtualClock()
    ctl = NullController(clock)
    Gappy().start(ctl, clock, t0=1000)
    clock.run()
    assert ctl.calls == [(1005, 1, None, None), (1005, 2, None, None), (1009, 3, None, None), (1020, 4, 7, None)]
    assert clock.events_run == 3   # two arrivals at the same time share one event


def test_azure_replay_sends_each_minute_inside_its_interval_with_one_event_each(tmp_path):
    from workbench.workload.azure_synth import write_synthetic_trace

    write_synthetic_trace(tmp_path, n_functions=300, seed=4)
    clock = VirtualClock()
    ctl = NullController(clock)
    w = AzureReplay(tmp_path, 50, scale=0.5, interval_s=1.0, start_minute=600, minutes=4, seed=1,
                    slo_ms=100).start(ctl, clock)
    clock.run()
    t = np.array([c[0] for c in ctl.calls])
    assert len(t) == w.submitted > 100 and np.all(np.diff(t) >= 0) and t.max() < 4 * NS
    assert clock.events_run == len(np.unique(t))
    assert w.expected_requests() == float(w.trace.counts(600, 4).sum()) * 0.5


def test_closed_loop_in_virtual_time_costs_no_extra_event_per_request():
    clock = VirtualClock()
    sink = Sink(clock, 2.0)
    w = ClosedLoop(range(4), concurrency=3, seed=0).start(sink, clock, duration_s=0.5)
    clock.run()
    # the first issue of each slot, then one Sink completion per request: the reaction runs in that event
    assert w.submitted == len(sink.arrivals) == 4 * 3 * 250
    assert clock.events_run == 4 * 3 + w.submitted
    assert w.completed == w.submitted and max(w.client_max_in_flight) == 3
