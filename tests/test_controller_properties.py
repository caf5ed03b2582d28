"""Property tests in virtual time over random arrivals, SLOs, GPU counts and policies."""
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_controller_support import MS, ControllerConfig, Outcomes, WorkerConfig, exec_overlaps, make, submit_at

arrival = st.tuples(st.integers(0, 4000),                    # gap to the previous arrival, us
                    st.integers(0, 4),                        # model index
                    st.one_of(st.none(), st.integers(2, 300)))  # SLO in ms (None: default); 2 ms is rejected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals=st.lists(arrival, min_size=1, max_size=300),
       policy=st.sampled_from(["clockwork", "clockwork-front", "triton", "ray"]),
       gpus=st.integers(1, 2), cache_pages=st.sampled_from([None, 16, 30]), seed=st.integers(0, 3),
       speed=st.sampled_from([1, 4]), ahead_ms=st.sampled_from([10, 2]))
def test_invariants(arrivals, policy, gpus, cache_pages, seed, speed, ahead_ms):
    # cache_pages 16: two ResNet-50s (7 pages) fit; 30: BERT (22 pages, a 6-page contiguous run) fits alone
    wc = WorkerConfig.load(weights_cache_size=cache_pages * 16 * 2**20) if cache_pages else None
    opts = {"max_models_per_replica": 2} if policy == "ray" else {}
    if policy == "clockwork-front":
        policy, opts = "clockwork", {"batching": "front"}
    clock, ctl, ids, rec = make(policy=policy, gpus=gpus, models=(("resnet50", 3), ("mobilenet_v2", 1),
                                                                  ("bert_base", 1)),
                                worker_config=wc, seed=seed, config=ControllerConfig(schedule_ahead=ahead_ms * MS),
                                **opts)
    out, rids = Outcomes(clock), []
    t = clock.now()
    for gap, mi, slo in arrivals:
        t += gap * 1000 // speed            # speed 4: up to ~2,000 requests/s, far past capacity
        submit_at(clock, ctl, t, ids[mi], out, rids, **({} if slo is None else {"slo": slo * MS}))
    end = t + 2000 * MS
    clock.run_until(end, max_events=50_000)     # a scheduling loop that never advances time fails here
    assert clock.now() == end, f"stuck at {clock.now()} with {clock.pending()} events pending"

    # every request: exactly one final status, delivered no later than its deadline
    out.check_once(rids, ctl)
    reqs, acts = rec.requests(), rec.actions()
    assert reqs.height == len(rids) and reqs["request_id"].n_unique() == len(rids)
    # one request never overlaps another on a GPU (from the worker's exec timings)
    assert not exec_overlaps(acts)
    # goodput counts only requests that met their deadline
    ok = reqs.filter(pl.col("status") == "success")
    assert (ok["completion"] <= ok["deadline"]).all()
    assert ok.height == sum(o.status == "success" for o in out.by_id.values())
    # a dropped request never ran (nothing completes after being dropped)
    dropped = reqs.filter(pl.col("status") == "dropped")
    assert (dropped["action_id"] == -1).all() and (dropped["gpu"] == -1).all()
    # rows agree with the callbacks
    for row in reqs.iter_rows(named=True):
        o = out.by_id[row["request_id"]]
        assert (row["status"], row["completion"], row["deadline"]) == (o.status, o.completion, o.deadline)
    # a request ran in at most one successful batch, and batches hold no more requests than their size
    inf = acts.filter((pl.col("type") == "INFER") & (pl.col("status") == 0))
    ran = reqs.filter(pl.col("action_id") >= 0).group_by("action_id").len()
    joined = ran.join(inf.select(["action_id", "batch_size"]), on="action_id", how="left")
    assert (joined["len"] <= joined["batch_size"].fill_null(10**9)).all()
    # nothing is left planned on any GPU, and the cache accounting balances
    for g in ctl.gpus:
        assert g.exec.jobs == {} and g.infers_outstanding == 0
        assert g.free_pages == g.total_pages - sum(m.num_pages for m in list(g.loaded.values()) + list(g.loading.values()))
        assert g.free_pages >= 0 or policy == "ray"
    if policy == "clockwork":
        for m in ctl.models.values():
            assert m.outstanding_exec == 0 and m.n_queued == 0
