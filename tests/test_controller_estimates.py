"""Duration estimates (p99 of a sliding window, normalised by GPU clock) and the GPU timelines."""
import numpy as np
import pytest

from workbench.controller.estimates import ModelEstimates, SlidingEstimate, percentile
from workbench.controller.tracker import Timeline


@pytest.mark.parametrize("values", [[5], [1, 2], [3, 1, 2], list(range(10)), [7, 7, 7, 100, 1, 2, 3, 4, 5, 6]])
def test_percentile_matches_numpy_linear(values):
    assert percentile(values, 0.99) == pytest.approx(float(np.percentile(values, 99)))
    assert percentile(values, 0.5) == pytest.approx(float(np.percentile(values, 50)))


def test_window_keeps_only_last_samples():
    e = SlidingEstimate(window=10, p=0.99)
    e.add(1000)                      # an outlier that must age out
    for _ in range(10):
        e.add(10)
    assert e.value == 10
    e.add(20)
    assert 10 < e.value <= 20        # p99 of ten samples is nearly their maximum


def test_exec_estimate_normalised_by_clock():
    est = ModelEstimates((1, 2, 4), (1_000_000, 1_500_000, 2_500_000), 2_000_000, ref_clock=1000)
    assert est.exec_table(1000) == [1_000_000, 1_500_000, 2_500_000]
    assert est.exec_table(2000) == [500_000, 750_000, 1_250_000]      # twice the clock, half the time
    est.add_exec(1, 2_000_000, 500)        # 2 ms at half the clock is the same work as 1 ms at full clock
    assert est.exec_ns(1, 1000) == 1_000_000
    est.add_exec(1, 3_000_000, 500)        # more work: the p99 rises
    assert est.exec_ns(1, 1000) > 1_400_000
    assert est.load_ns() == 2_000_000


def test_unprofiled_sizes_are_extrapolated_then_measured():
    est = ModelEstimates((1, 2, 4), (), 0, ref_clock=1000)
    assert est.exec_table(1000) == [0, 0, 0]           # nothing known yet
    est.add_exec(1, 3_000_000, 1000)
    assert est.exec_table(1000) == [3_000_000, 6_000_000, 12_000_000]
    est.add_exec(4, 5_000_000, 1000)
    assert est.exec_table(1000)[2] == 5_000_000


def test_estimate_rejects_mismatched_profile():
    with pytest.raises(ValueError, match="batch sizes"):
        ModelEstimates((1, 2), (5,), 0, ref_clock=1000)


def test_timeline_available_never_before_now_plus_future():
    tl = Timeline(future=1000, lag=10**9)
    assert tl.available(5000) == 6000
    tl.add(1, 10_000, begin=6000)
    tl.add(2, 10_000, begin=16_000)
    assert tl.available(5000) == 26_000
    assert tl.backlog(5000) == 21_000


def test_timeline_reanchors_on_results():
    tl = Timeline(future=0, lag=10**9)
    tl.add(1, 10_000, begin=0)
    tl.add(2, 10_000, begin=10_000)
    tl.add(3, 10_000, begin=20_000)
    assert tl.success(1, 15_000)          # ran 5 us late: the rest shifts by 5 us
    assert tl.available(0) == 35_000
    assert tl.success(3, 31_000)          # job 2 must have finished before 3 (one stream): both gone
    assert len(tl) == 0 and tl.available(0) == 31_000
    assert not tl.success(2, 40_000)      # its late result changes nothing
    assert tl.available(0) == 31_000


def test_timeline_error_removes_without_moving_time():
    tl = Timeline(future=0, lag=10**9)
    tl.add(1, 10_000, begin=100)
    tl.add(2, 10_000, begin=10_100)
    assert tl.error(1)
    assert tl.available(0) == 10_100
    assert not tl.error(1)


def test_timeline_overdue_head_stops_blocking():
    tl = Timeline(future=0, lag=1000)
    tl.add(1, 10_000, begin=0)
    tl.add(2, 5000, begin=10_000)
    # at 50_000 the head is 40 us overdue: assume it is ending at now - lag, so the plan continues from there
    assert tl.available(50_000) == 50_000 - 1000 + 5000
