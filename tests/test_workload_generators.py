"""Arrival processes of the workload generators, checked statistically for fixed seeds, in virtual time against a
`Sink` (a stand-in controller that answers every request itself; it has no scheduling of its own to confound
the arrival statistics) and once in real time."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from workbench.clock import RealClock, VirtualClock
from workbench.workload import Bursty, ClosedLoop, Mix, Poisson, SloSweep
from workbench.workload.sink import Sink

NS = 1_000_000_000
MS = 1_000_000


def run(workload, latency_ms=1.0, duration_s=None, exponential=False, seed=0):
    clock = VirtualClock()
    sink = Sink(clock, latency_ms, exponential=exponential, seed=seed)
    workload.start(sink, clock, duration_s=duration_s)
    clock.run()
    return sink


def test_poisson_rate_and_interarrival_cv():
    s = run(Poisson(8, rate=500.0, seed=7, slo_ms=100), duration_s=40)
    t = s.times()
    n = len(t)
    assert abs(n - 20_000) < 4 * np.sqrt(20_000)            # count ~ Poisson(rate x duration)
    gaps = np.diff(t).astype(float)
    assert gaps.mean() == pytest.approx(2 * MS, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)   # exponential gaps: CV 1
    counts = np.bincount(s.models(), minlength=8)
    assert counts.min() > n / 8 * 0.9 and counts.max() < n / 8 * 1.1
    assert all(a[2] == 100 * MS for a in s.arrivals[:10])
    assert t.max() < 40 * NS


def test_poisson_per_model_rates_follow_weights():
    s = run(Poisson({10: 300.0, 20: 100.0}, seed=1), duration_s=30)
    counts = {m: int((s.models() == m).sum()) for m in (10, 20)}
    assert counts[10] / counts[20] == pytest.approx(3.0, rel=0.06)


def test_same_seed_same_arrivals_other_seed_differs():
    a = run(Poisson(4, rate=100, seed=3), duration_s=5).arrivals
    b = run(Poisson(4, rate=100, seed=3), duration_s=5).arrivals
    c = run(Poisson(4, rate=100, seed=4), duration_s=5).arrivals
    assert a == b and a != c


def test_closed_loop_never_exceeds_concurrency_and_rotates_models():
    w = ClosedLoop(range(6), clients=3, concurrency=4, seed=2, slo_ms=50)
    s = run(w, latency_ms=5.0, exponential=True, duration_s=2)
    assert max(w.client_max_in_flight) == 4 and s.max_in_flight == 12
    assert w.in_flight == 0 and w.completed == w.submitted == len(s.arrivals)
    # client c serves models c and c+3 alternately
    models = s.models()
    assert set(models.tolist()) == set(range(6))
    assert abs(int((models == 0).sum()) - int((models == 3).sum())) <= 4
    # with 12 slots and 5 ms mean latency, throughput is ~12 / 5 ms = 2400/s
    assert len(s.arrivals) == pytest.approx(2 * 2400, rel=0.1)


def test_closed_loop_think_time_spaces_requests():
    w = ClosedLoop([0], concurrency=1, think_time_ms=10, seed=0)
    s = run(w, latency_ms=2.0, duration_s=1)
    gaps = np.diff(s.times())
    assert np.all(gaps == 12 * MS)


def test_closed_loop_rejects_bad_parameters():
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        ClosedLoop(3, concurrency=0)
    with pytest.raises(ValueError, match="4 clients but only 3 models"):
        ClosedLoop(3, clients=4)
    for bad in (0, -1, float("nan"), float("inf"), "50", True):   # a string compared with > 0 raised TypeError
        with pytest.raises(ValueError, match=f"closed_loop: slo_ms must be a finite number > 0, got {bad!r}"):
            ClosedLoop(3, slo_ms=bad)
    with pytest.raises(ValueError, match="slo_factor must be a finite number > 0, got '2'"):
        ClosedLoop(3, slo_factor="2")


@pytest.mark.parametrize("make, match", [
    # an infinite rate put every arrival at the same instant without end (bursty hung; poisson failed on NaN
    # probabilities when it began), NaN slipped through `x < 0` checks
    (lambda: Bursty(0, [1], minor_rate=math.inf), r"bursty: minor_rate must be a finite number >= 0, got inf"),
    (lambda: Bursty(0, [1], major_rate=math.nan), r"bursty: major_rate must be a finite number >= 0, got nan"),
    (lambda: Bursty(0, [1], minor_rate=0, major_rate=0), r"bursty: minor_rate and major_rate are both 0"),
    (lambda: Bursty(0, [1], period_s=math.inf), r"bursty: period_s must be a finite number > 0, got inf"),
    (lambda: Poisson([0, 1], rate=math.inf), r"poisson: rate must be a finite number >= 0, got inf"),
    (lambda: Poisson({0: 5.0, 1: math.nan}), r"poisson: the rate of model 1 must be a finite number >= 0, got nan"),
    (lambda: Poisson([0], rates=["5"]), r"poisson: the rate of model 0 must be a finite number >= 0, got '5'"),
    (lambda: Poisson([0, 1], rates=[0, 0]), r"poisson: the total rate must be > 0"),
    (lambda: ClosedLoop(2, think_time_ms=math.inf), r"closed_loop: think_time_ms must be a finite number >= 0"),
    (lambda: ClosedLoop(2, stagger_ms=-1), r"closed_loop: stagger_ms must be a finite number >= 0, got -1"),
    (lambda: ClosedLoop(2, backoff_ms=0), r"closed_loop: backoff_ms must be a finite number > 0, got 0"),
    (lambda: SloSweep(2, rate=math.inf, start=10), r"slo_sweep: rate must be a finite number > 0, got inf"),
    (lambda: SloSweep(2, rate=10, start=10, end=math.inf), r"slo_sweep: end must be a finite number > 0, got inf"),
    (lambda: SloSweep(2, rate=10, start=10, period_s=math.nan), r"slo_sweep: period_s must be a finite number > 0"),
    (lambda: Sink(VirtualClock(), -1), r"sink: latency_ms must be a finite number >= 0, got -1"),
])
def test_rates_and_durations_must_be_finite(make, match):
    with pytest.raises(ValueError, match=match):
        make()
    assert Poisson([0, 1], rate=10).rates.tolist() == [5.0, 5.0] and Bursty(0, [1], minor_rate=0).minor_rate == 0


def test_slo_sweep_steps_every_period_until_end():
    w = SloSweep(range(4), rate=200, start=2.9, factor=1.5, period_s=1.0, end=20, seed=5)
    s = run(w)
    arr = np.array([(a[0], a[2]) for a in s.arrivals])
    steps = arr[:, 0] // NS
    for k in range(int(steps.max()) + 1):
        slo = arr[steps == k, 1]
        assert np.all(slo == int(round(2.9 * 1.5 ** k * MS))), k
    assert w.steps() == pytest.approx([2.9 * 1.5 ** k for k in range(5)])   # 2.9 .. 14.7; 22 > end
    assert steps.max() == 4                                               # stops when the SLO passes `end`
    fs = run(SloSweep([0], rate=50, start=1, factor=1, op="add", period_s=1, end=3, unit="factor", seed=1))
    assert sorted({a[3] for a in fs.arrivals}) == [1.0, 2.0, 3.0] and all(a[2] is None for a in fs.arrivals)


def test_bursty_active_set_grows_one_model_per_period():
    w = Bursty(0, range(1, 51), minor_rate=100, major_rate=2000, period_s=0.5, lead_in_periods=2, seed=9,
               slo_ms=100)
    s = run(w, duration_s=10)
    t, m = s.times(), s.models()
    minor = t[m == 0]
    assert len(minor) == pytest.approx(1000, rel=0.1)
    major_t, major_m = t[m != 0], m[m != 0]
    assert major_t.min() >= 1 * NS                                        # nothing during the 2-period lead-in
    period = (major_t - 1 * NS) // (NS // 2)                              # period k has k + 1 active models
    for k in range(int(period.max()) + 1):
        active = np.unique(major_m[period == k])
        assert active.max() <= k + 1 and len(active) == k + 1, k
    # round-robin: equal shares among the active models within a period
    last = major_m[period == period.max()]
    shares = np.bincount(last)[1:]
    assert shares.max() - shares[shares > 0].min() <= 1


def test_mix_runs_parts_with_their_own_slos():
    fg = Poisson([0], rate=100, seed=1, slo_ms=10)
    bg = ClosedLoop([1], concurrency=2, seed=2, slo_ms=1000)
    s = run(Mix([fg, bg]), latency_ms=4.0, duration_s=1)
    slos = {a[1]: a[2] for a in s.arrivals}
    assert slos == {0: 10 * MS, 1: 1000 * MS}
    assert Mix([fg, bg]).parts[0] is fg


def test_same_workload_runs_on_a_real_clock():
    """Unchanged on a RealClock: same seed, same model sequence as in virtual time; arrivals on time."""
    virtual = run(Poisson(5, rate=200, seed=11), duration_s=0.5)
    clock = RealClock("test-workload")
    try:
        sink = Sink(clock, 1.0)
        t0 = clock.now() + 50 * MS
        w = Poisson(5, rate=200, seed=11).start(sink, clock, t0=t0, duration_s=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (w.next_arrival_pending() or sink.in_flight):
            time.sleep(0.05)
    finally:
        clock.close()
    assert [a[1] for a in sink.arrivals] == [a[1] for a in virtual.arrivals]
    lateness = (sink.times() - t0) - virtual.times()     # virtual run started at t0 = 0
    assert np.all(lateness >= 0)


def test_closed_loop_holds_the_slot_until_the_deadline_after_an_instant_drop():
    """A request dropped at once frees its slot only at its deadline (Clockwork's clients saw a timeout)."""
    clock = VirtualClock()
    sink = Sink(clock, 0.0, status="dropped")
    w = ClosedLoop([0], concurrency=1, slo_ms=25, seed=0).start(sink, clock, duration_s=0.2)
    clock.run()
    assert np.all(np.diff(sink.times()) == 25 * MS) and len(sink.arrivals) == 8
    assert w.outcomes["dropped"] == 8
    clock = VirtualClock()
    sink = Sink(clock, 0.0, status="dropped")
    ClosedLoop([0], concurrency=1, slo_ms=25, backoff_ms=5, seed=0).start(sink, clock, duration_s=0.1)
    clock.run()
    assert np.all(np.diff(sink.times()) == 5 * MS)


def _max_overlap(starts: np.ndarray, ends: np.ndarray) -> int:
    ev = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends], key=lambda x: (x[0], x[1]))
    cur = best = 0
    for _, d in ev:
        cur += d
        best = max(best, cur)
    return best


def test_closed_loop_against_the_real_controller_never_exceeds_concurrency():
    import polars as pl

    from workbench.controller.controller import Controller
    from workbench.telemetry import Recorder
    from workbench.worker.emulated import EmulatedWorker

    clock = VirtualClock()
    rec = Recorder()
    ctl = Controller(clock, policy="clockwork", recorder=rec)
    ctl.add_worker(lambda cb: EmulatedWorker(clock, 1, "h200", None, cb))
    ids = ctl.load_model("profile:resnet50", copies=3)
    ctl.wait_ready()
    w = ClosedLoop(ids, concurrency=5, slo_ms=100, seed=3).start(ctl, clock, duration_s=1.0)
    clock.run_until(clock.now() + 2 * NS)
    req = rec.requests()
    assert req.height == w.submitted == w.completed > 200
    for mid in ids:   # one client per model: its requests never overlap more than 5 at a time
        g = req.filter(pl.col("model_id") == mid)
        assert _max_overlap(g["arrival"].to_numpy(), g["completion"].to_numpy()) <= 5
    assert max(w.client_max_in_flight) == 5
    rec.close()
