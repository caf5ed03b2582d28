"""The Triton-like and Ray-Serve-like baselines in the same harness."""
import polars as pl
import pytest

from test_controller_support import MS, Outcomes, WorkerConfig, exec_overlaps, make, submit_at
from workbench.controller.controller import make_policy
from workbench.workload.poisson import Poisson


def run(ctl, clock, ids, rate, seconds, slo_ms=100, seed=0, rates=None):
    wl = Poisson(rates or ids, rate=None if rates else rate, slo_ms=slo_ms, seed=seed)
    wl.start(ctl, clock, duration_s=seconds)
    clock.run_until(clock.now() + int((seconds + 3) * 1e9))
    assert wl.completed == wl.submitted
    return wl


def test_triton_runs_late_requests_and_reports_timeouts():
    clock, ctl, ids, rec = make(policy="triton", models=(("resnet50", 2),))
    wl = run(ctl, clock, ids, rate=1500, seconds=1, slo_ms=30)      # overload with a tight SLO
    assert wl.outcomes["timeout"] > 0 and wl.outcomes.get("dropped", 0) == 0
    inf = rec.actions().filter((pl.col("type") == "INFER") & (pl.col("status") == 0))
    # every admitted request still ran (no deadline awareness): GPU time went to requests already late
    assert inf["batch_size"].sum() == wl.submitted
    assert inf["latest"].max() == -1                               # no window: latest = FOREVER
    assert not exec_overlaps(rec.actions())


def test_triton_loads_on_demand_and_evicts_lru_by_bytes():
    wc = WorkerConfig.load(weights_cache_size=16 * 16 * 2**20)        # 16 pages: 2 ResNet-50 (7) + 2 MobileNet (1)
    clock, ctl, ids, rec = make(policy="triton", models=(("resnet50", 4), ("mobilenet_v2", 2)), worker_config=wc)
    out, rids = Outcomes(clock), []
    t0 = clock.now()
    order = [0, 1, 4, 5, 2, 0, 3, 1]
    for i, k in enumerate(order * 3):
        submit_at(clock, ctl, t0 + i * 20 * MS, ids[k], out, rids, slo=200 * MS)
    clock.run_until(t0 + 2000 * MS)
    out.check_once(rids)
    assert out.statuses() == {"success": len(rids)}
    acts = rec.actions().sort("action_id")
    assert (acts.filter(pl.col("type") == "LOAD_WEIGHTS")["status"] == 0).all()
    # replay the placement: never more pages than the cache, never two copies
    pages = {m: ctl.models[m].num_pages for m in ids}
    held: set[int] = set()
    for row in acts.filter(pl.col("type").is_in(["LOAD_WEIGHTS", "EVICT_WEIGHTS"])).iter_rows(named=True):
        if row["type"] == "LOAD_WEIGHTS":
            assert row["model_id"] not in held
            held.add(row["model_id"])
        else:
            held.discard(row["model_id"])
        assert sum(pages[m] for m in held) <= 16
    assert acts.filter(pl.col("type") == "EVICT_WEIGHTS").height > 0


def test_ray_caps_models_per_replica_and_scales_out_hot_models():
    clock, ctl, ids, rec = make(policy="ray", gpus=3, models=(("resnet50", 6),), max_models_per_replica=2)
    rates = {ids[0]: 600.0} | {m: 15.0 for m in ids[1:]}
    run(ctl, clock, ids, None, 2, rates=rates)
    acts = rec.actions().sort("action_id")
    held: dict[int, set[int]] = {}
    for row in acts.filter(pl.col("type").is_in(["LOAD_WEIGHTS", "EVICT_WEIGHTS"])).iter_rows(named=True):
        s = held.setdefault(row["gpu"], set())
        if row["type"] == "LOAD_WEIGHTS":
            s.add(row["model_id"])
        else:
            s.discard(row["model_id"])
        assert len(s) <= 2
    hot = acts.filter((pl.col("type") == "INFER") & (pl.col("model_id") == ids[0]))
    assert hot["gpu"].n_unique() >= 2                              # the busy model was multiplexed out
    assert ctl.policy.counters["evictions"] > 0
    assert not exec_overlaps(acts)


def test_ray_is_not_memory_aware():
    wc = WorkerConfig.load(weights_cache_size=10 * 16 * 2**20)        # one ResNet-50 fits, two do not
    clock, ctl, ids, rec = make(policy="ray", models=(("resnet50", 3),), worker_config=wc, max_models_per_replica=3)
    out, rids = Outcomes(clock), []
    for i in range(3):
        submit_at(clock, ctl, clock.now() + i * MS, ids[i], out, rids, slo=100 * MS)
    clock.run_until(clock.now() + 1000 * MS)
    out.check_once(rids)
    loads = rec.actions().filter(pl.col("type") == "LOAD_WEIGHTS")
    assert "LOAD_WEIGHTS_INSUFFICIENT_CACHE" in loads["status_name"].to_list()
    assert out.statuses().get("error", 0) >= 1


def test_policy_options_are_checked():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fifo")
    with pytest.raises(ValueError, match="max_models_per_replica"):
        make_policy("ray", max_models_per_replica=0)
    with pytest.raises(TypeError):
        make_policy("triton", no_such_option=1)
