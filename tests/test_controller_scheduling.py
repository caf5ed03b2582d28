"""Infer scheduling, loads and evictions against real emulated workers in virtual time."""
import json

import polars as pl

from test_controller_support import MS, ControllerConfig, Outcomes, WorkerConfig, exec_overlaps, make, submit_at
from workbench.workload.poisson import Poisson
from workbench.worker.profile import PROFILE_DIR, Profile


def poisson(ctl, clock, models, rate, slo_ms, seconds, seed=0):
    wl = Poisson(models, rate=rate, slo_ms=slo_ms, seed=seed)
    wl.start(ctl, clock, duration_s=seconds)
    clock.run_until(clock.now() + int((seconds + 1) * 1e9))
    assert wl.completed == wl.submitted
    return wl


def infers(rec):
    return rec.actions().filter(pl.col("type") == "INFER")


def test_batches_grow_under_load_and_meet_the_earliest_deadline():
    clock, ctl, ids, rec = make(models=(("resnet50", 1),))
    wl = poisson(ctl, clock, ids, rate=1200, slo_ms=50, seconds=2)   # above batch-1 capacity (~290/s)
    assert wl.outcomes["success"] > 0.95 * wl.submitted
    inf = infers(rec).filter(pl.col("status") == 0)
    assert inf["batch_size"].max() >= 4
    reqs = rec.requests().filter(pl.col("status") == "success")
    # the batch of every successful request was planned to end by the earliest exec deadline in it
    per_action = reqs.group_by("action_id").agg((pl.col("deadline").min() - ctl.config.buffer).alias("ed"))
    joined = inf.join(per_action, on="action_id")
    assert (joined["planned_end"] <= joined["ed"]).all()
    assert not exec_overlaps(rec.actions())


def test_action_windows_follow_clockwork():
    clock, ctl, ids, rec = make(models=(("resnet50", 2),))
    poisson(ctl, clock, ids, rate=400, slo_ms=100, seconds=1)
    c = ctl.config
    inf = infers(rec)
    assert (inf["earliest"] == inf["sent"]).all()
    want = inf.select(pl.max_horizontal(pl.col("sent") + c.future + c.schedule_ahead,
                                         pl.col("planned_begin") + c.schedule_ahead))[:, 0]
    assert (inf["latest"] == want).all()
    assert (inf["planned_begin"] >= inf["sent"] + c.future).all()
    # the plan never runs more than schedule_ahead (+ one batch) ahead of the moment it was made
    assert (inf["planned_begin"] - inf["sent"] <= c.schedule_ahead + c.future).all()


def test_hot_model_is_replicated_and_placement_spreads_over_workers():
    clock, ctl, ids, rec = make(workers=2, gpus=2, models=(("resnet50", 8),))
    rates = {ids[0]: 1500.0} | {m: 20.0 for m in ids[1:]}     # one model needs more than a GPU
    wl = Poisson(rates, slo_ms=100, seed=1)
    wl.start(ctl, clock, duration_s=2)
    clock.run_until(clock.now() + 3 * 10**9)
    assert len(ctl.models[ids[0]].loaded) >= 2
    ran = infers(rec).filter((pl.col("model_id") == ids[0]) & (pl.col("status") == 0))
    assert ran.select(["worker", "gpu"]).unique().height >= 2
    assert rec.actions().filter(pl.col("type") == "INFER").select(["worker", "gpu"]).unique().height == 4
    assert wl.outcomes["success"] > 0.97 * wl.submitted
    assert not exec_overlaps(rec.actions())


def test_memory_pressure_evicts_lru_and_never_overfills_the_cache():
    # 3 ResNet-50s (7 pages each) fit; 6 models in rotation force evictions
    wc = WorkerConfig.load(weights_cache_size=22 * 16 * 2**20)
    clock, ctl, ids, rec = make(models=(("resnet50", 6),), worker_config=wc)
    out, rids = Outcomes(clock), []
    t0 = clock.now()
    for i in range(120):
        submit_at(clock, ctl, t0 + i * 5 * MS, ids[(i // 4) % 6], out, rids, slo=100 * MS)
    clock.run_until(t0 + 2000 * MS)
    out.check_once(rids)
    acts = rec.actions()
    loads = acts.filter(pl.col("type") == "LOAD_WEIGHTS")
    assert (loads["status"] == 0).all(), loads.filter(pl.col("status") != 0)["status_name"].to_list()
    assert acts.filter(pl.col("type") == "EVICT_WEIGHTS").height >= 3
    assert (acts.filter(pl.col("type") == "EVICT_WEIGHTS")["status"] == 0).all()
    assert out.statuses().get("success", 0) > 100
    g = ctl.gpus[0]
    assert g.free_pages == 22 - 7 * len(g.loaded) >= 0
    assert not exec_overlaps(acts)


def _slow_profile(tmp_path, factor):
    """The h200 profile, but resnet50 runs `factor` times slower than its profiled median."""
    d = json.loads((PROFILE_DIR / "h200.json").read_text())
    for e in d["models"]["resnet50"]["exec"].values():
        e["samples_ns"] = [int(e["p50_ns"] * factor)] * 9 + [int(e["p50_ns"] * factor * 1.05)]
    p = tmp_path / "slow.json"
    p.write_text(json.dumps(d))
    return Profile.load(p)


def test_prediction_errors_self_correct(tmp_path):
    from workbench.controller.controller import Controller
    from workbench.clock import VirtualClock
    from workbench.telemetry.recorder import Recorder
    from workbench.worker.emulated import EmulatedWorker
    prof = _slow_profile(tmp_path, 1.6)
    clock, rec = VirtualClock(), Recorder()
    ctl = Controller(clock, recorder=rec)
    ctl.add_worker(lambda cb: EmulatedWorker(clock, 1, prof, None, cb))
    mid = ctl.load_model("profile:resnet50")[0]
    ctl.wait_ready()
    p50 = ctl.models[mid].est.exec_ns(1)
    wl = Poisson([mid], rate=150, slo_ms=60, seed=2)
    wl.start(ctl, clock, duration_s=2)
    clock.run_until(clock.now() + 3 * 10**9)
    assert ctl.models[mid].est.exec_ns(1) >= 1.6 * p50          # the estimate learned the real duration
    inf = infers(rec).filter(pl.col("status") == 0).sort("action_id")
    first, last = inf.head(5), inf.tail(50)
    err_first = (first["measured_duration"] - first["predicted_duration"]).abs().max()
    err_last = (last["measured_duration"] - last["predicted_duration"]).abs().max()
    assert err_last < err_first / 4
    assert wl.outcomes["success"] > 0.95 * wl.submitted


def test_same_seed_same_outcomes():
    def run():
        clock, ctl, ids, rec = make(workers=2, gpus=1, models=(("resnet50", 20), ("bert_base", 5)), seed=4)
        poisson(ctl, clock, ids, rate=600, slo_ms=80, seconds=1, seed=9)
        return rec.requests(), rec.actions()
    r1, a1 = run()
    r2, a2 = run()
    assert r1.equals(r2) and a1.equals(a2)
    assert r1.height > 400


def test_requests_retried_after_a_late_start_keep_their_inputs(tmp_path):
    """The worker runs 3x slower than profiled: planned starts slip past `latest`, the worker rejects those
    Infers as too late, and their requests are queued again, with their own inputs."""
    import numpy as np
    from workbench.controller.controller import Controller
    from workbench.clock import VirtualClock
    from workbench.telemetry.recorder import Recorder
    from workbench.worker.emulated import EmulatedWorker
    prof = _slow_profile(tmp_path, 3.0)
    clock, rec = VirtualClock(), Recorder()
    ctl = Controller(clock, recorder=rec)
    sent = {}

    class Spy(EmulatedWorker):                      # the real worker; we only look at what it is sent
        def submit(self, action):
            if getattr(action, "inputs", None) is not None:
                sent[action.id] = set(action.inputs[0][:, 0, 0, 0].tolist())
            super().submit(action)
    ctl.add_worker(lambda cb: Spy(clock, 1, prof, None, cb))
    ids = ctl.load_model("profile:resnet50", 2)
    ctl.wait_ready()
    out, rids, value = Outcomes(clock), [], {}
    t0 = clock.now()
    for i in range(200):
        x = np.full((3, 224, 224), float(i), np.float32)
        t = t0 + i * 400_000

        def go(i=i, x=x):
            rid = ctl.submit(ids[i % 2], inputs=x, slo=150 * MS, callback=out)
            rids.append(rid)
            value[rid] = float(i)
        clock.call_at(t, go)
    clock.run_until(t0 + 2000 * MS)
    out.check_once(rids)
    assert ctl.summary().get("clockwork_retried", 0) > 0
    too_late = rec.actions().filter(pl.col("status_name").str.contains("TOO_LATE"))
    assert too_late.height > 0
    reqs = rec.requests().filter(pl.col("status") == "success")
    assert reqs.height > 20
    for row in reqs.iter_rows(named=True):
        assert value[row["request_id"]] in sent[row["action_id"]]


def test_overloaded_hot_model_on_two_gpus_while_a_replica_loads():
    """One hot model, two GPUs, far past capacity: requests one GPU cannot finish but the other (or a replica
    being loaded) can are handed over, never bounced back and forth at one instant (which once looped)."""
    for slo, rate in ((15, 1500), (50, 5000)):
        clock, ctl, ids, rec = make(gpus=2, models=(("resnet50", 1),))
        wl = Poisson(ids, rate=rate, slo_ms=slo, seed=1)
        wl.start(ctl, clock, duration_s=1)
        end = clock.now() + 2 * 10**9
        clock.run_until(end, max_events=1_000_000)
        assert clock.now() == end and wl.completed == wl.submitted
        assert ctl.errors == []
        assert len(ctl.models[ids[0]].loaded) == 2
        assert wl.outcomes["success"] > 800 and wl.outcomes["dropped"] > 0
        assert len(ctl.gpus[0].heap) < 100 and len(ctl.gpus[1].heap) < 100
        assert not exec_overlaps(rec.actions())


def test_copies_of_one_model_share_their_estimates_unless_configured_apart():
    for share in (True, False):
        clock, ctl, ids, rec = make(models=(("resnet50", 3),), config=ControllerConfig(share_estimates=share))
        m0, m1 = ctl.models[ids[0]], ctl.models[ids[1]]
        seeded = m1.est.exec_ns(1)
        poisson(ctl, clock, [ids[0]], rate=100, slo_ms=100, seconds=1)     # only copy 0 runs
        b1 = infers(rec).filter((pl.col("status") == 0) & (pl.col("batch_size") == 1)).height
        assert b1 > 20
        window = ctl.config.estimate_window
        assert len(m0.est.exec[1]) == min(1 + b1, window)                # the profiled seed, then measurements
        if share:   # copy 1 predicts from what copy 0 measured: the same kernels
            assert m1.est is m0.est
        else:       # one window per copy, as Clockwork: copy 1 still has only its seed
            assert m1.est is not m0.est and len(m1.est.exec[1]) == 1 and m1.est.exec_ns(1) == seeded
