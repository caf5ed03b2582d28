"""The client API: admission, the five final statuses, exactly one callback no later than the deadline."""
import math

import numpy as np
import pytest

from test_controller_support import MS, Outcomes, make, submit_at
from workbench.controller.controller import ControllerError


def run_one(ctl, clock, model_id, **kw):
    out = Outcomes(clock)
    rid = ctl.submit(model_id, callback=out, **kw)
    clock.run_until(clock.now() + 2000 * MS)
    out.check_once([rid])
    return out.by_id[rid]


def test_success_reports_latency_and_telemetry():
    clock, ctl, ids, rec = make()
    o = run_one(ctl, clock, ids[0], slo=100 * MS)
    assert o.status == "success" and o.ok
    assert o.latency == o.completion - o.arrival and 0 < o.latency <= 100 * MS
    assert o.deadline == o.arrival + 100 * MS
    row = rec.requests().filter(rec.requests()["request_id"] == o.request_id).row(0, named=True)
    assert row["status"] == "success" and row["model"] == "resnet50" and row["batch_size"] == 1
    assert row["cold_start"] is True          # no copy was loaded when it arrived
    assert row["gpu"] == 0 and row["worker"] == 0
    kinds = set(rec.actions()["type"].to_list())
    assert {"LOAD_WEIGHTS", "INFER", "LOAD_MODEL_FROM_DISK", "GET_WORKER_STATE"} <= kinds


@pytest.mark.parametrize("kw, match", [
    ({"slo": 0}, "slo must be"), ({"slo": -5}, "slo must be"), ({"slo": math.nan}, "slo must be"),
    ({"slo": "100"}, "slo must be"), ({"slo": True}, "slo must be"),
    ({"slo_factor": 0}, "slo_factor must be"), ({"slo_factor": math.inf}, "slo_factor must be"),
    ({"slo": 50 * MS, "slo_factor": 3}, "not both"),
    ({"slo": 2 * MS}, "shorter than"),           # below resnet50's 3.5 ms batch-1 estimate + buffer
    ({"slo_factor": 1.0}, "shorter than"),       # 1x batch-1: no time left for the result
])
def test_bad_slo_is_rejected(kw, match):
    clock, ctl, ids, _ = make()
    o = run_one(ctl, clock, ids[0], **kw)
    assert o.status == "rejected" and match in o.message


def test_unknown_model_rejected_asynchronously():
    clock, ctl, ids, _ = make()
    out = Outcomes(clock)
    rid = ctl.submit(12345, callback=out)
    assert rid not in out.by_id            # not called inside submit: a client that resubmits cannot recurse
    clock.run_until(clock.now() + MS)
    o = out.by_id[rid]
    assert o.status == "rejected" and "unknown model 12345" in o.message
    assert run_one(ctl, clock, "resnet50").status == "rejected"     # ids are ints, not names


def test_inputs_checked_against_the_model():
    clock, ctl, ids, _ = make()
    good = np.zeros((3, 224, 224), np.float32)
    assert run_one(ctl, clock, ids[0], inputs=good).status == "success"
    assert run_one(ctl, clock, ids[0], inputs=good[None]).status == "success"   # with a batch axis of 1
    o = run_one(ctl, clock, ids[0], inputs=np.zeros((3, 224, 223), np.float32))
    assert o.status == "rejected" and "602112 bytes" in o.message
    o = run_one(ctl, clock, ids[0], inputs=[1, 2, 3])
    assert o.status == "rejected" and "numpy array" in o.message


def test_slo_factor_scales_the_batch1_estimate():
    clock, ctl, ids, _ = make()
    o = run_one(ctl, clock, ids[0], slo_factor=20)
    assert o.status == "success"
    assert o.deadline - o.arrival == int(ctl.models[ids[0]].b1_ns * 20)


def test_request_before_ready_is_rejected():
    from workbench.clock import VirtualClock
    from workbench.controller.controller import Controller
    from workbench.worker.emulated import EmulatedWorker
    clock = VirtualClock()
    ctl = Controller(clock)
    with pytest.raises(ControllerError, match="add_worker"):
        ctl.load_model("profile:resnet50")
    ctl.add_worker(lambda cb: EmulatedWorker(clock, 1, "h200", None, cb))
    mid = ctl.load_model("profile:resnet50")[0]
    out = Outcomes(clock)
    rid = ctl.submit(mid, callback=out)
    ctl.wait_ready()
    clock.run_until(clock.now() + MS)
    assert out.by_id[rid].status == "rejected" and "still being loaded" in out.by_id[rid].message
    with pytest.raises(ControllerError, match="before load_model"):
        ctl.add_worker(lambda cb: EmulatedWorker(clock, 1, "h200", None, cb))


def test_unknown_profile_model_fails_startup_with_its_name():
    from workbench.clock import VirtualClock
    from workbench.controller.controller import Controller
    from workbench.worker.emulated import EmulatedWorker
    clock = VirtualClock()
    ctl = Controller(clock)
    ctl.add_worker(lambda cb: EmulatedWorker(clock, 1, "h200", None, cb))
    mid = ctl.load_model("profile:no_such_model")[0]
    with pytest.raises(ControllerError, match="no_such_model"):
        ctl.wait_ready()
    o = run_one(ctl, clock, mid)
    assert o.status == "rejected" and "no_such_model" in o.message


def test_cold_model_that_cannot_load_in_time_is_dropped_by_its_deadline():
    clock, ctl, ids, _ = make()
    # 5 ms: admissible (batch-1 3.5 ms + 1 ms buffer) but a cold start needs the ~1.9 ms load first
    o = run_one(ctl, clock, ids[0], slo=5 * MS)
    assert o.status == "dropped" and o.completion <= o.deadline
    assert run_one(ctl, clock, ids[0], slo=5 * MS).status == "success"   # warm now: it fits


def test_overload_drops_early_and_answers_everything_once():
    clock, ctl, ids, _ = make(models=(("resnet50", 2),))
    out, rids = Outcomes(clock), []
    t0 = clock.now()
    for i in range(400):                      # 400 requests in 40 ms with a 20 ms SLO: far over capacity
        submit_at(clock, ctl, t0 + i * 100_000, ids[i % 2], out, rids, slo=20 * MS)
    clock.run_until(t0 + 2000 * MS)
    out.check_once(rids)
    st = out.statuses()
    assert st.get("success", 0) >= 20 and st.get("dropped", 0) > 100
    assert set(st) <= {"success", "dropped"}
    drops = [o for o in out.by_id.values() if o.status == "dropped"]
    assert any(o.completion < o.deadline - 5 * MS for o in drops)   # told early, not at the deadline
    ok = [o for o in out.by_id.values() if o.status == "success"]
    assert all(o.completion <= o.deadline for o in ok)
