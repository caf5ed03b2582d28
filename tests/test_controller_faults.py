"""Faults: worker errors, a worker that stops answering, a model that never fits. No request is lost or
answered twice, nobody hears after their deadline, and the GPU timelines stay usable."""
import polars as pl
import pytest

from test_controller_support import MS, ControllerConfig, Outcomes, WorkerConfig, arrivals, exec_overlaps, make
from workbench.worker.emulated import EmulatedWorker


def test_worker_errors_end_requests_with_error_once():
    # host staging memory for one ResNet-50 input only: every batch of 2 or more fails in the worker
    wc = WorkerConfig.load(host_io_pool_size=700_000)
    clock, ctl, ids, rec = make(models=(("resnet50", 1),), worker_config=wc)
    out = Outcomes(clock)
    rids = arrivals(clock, ctl, ids, out, 300, 1 * MS)         # 1000/s: batches form
    clock.run_until(clock.now() + 2000 * MS)
    out.check_once(rids)
    st = out.statuses()
    assert st.get("error", 0) > 0 and st.get("success", 0) > 0
    assert set(st) <= {"success", "error", "dropped"}
    errs = [o for o in out.by_id.values() if o.status == "error"]
    assert all("COPY_INPUT_HOST_ALLOC" in o.message for o in errs)
    failed = rec.actions().filter((pl.col("type") == "INFER") & (pl.col("status") != 0))
    assert (failed["batch_size"] >= 2).all() and failed.height > 0
    assert ctl.gpus[0].exec.jobs == {}                         # nothing left on the timeline


class HangingWorker(EmulatedWorker):
    """The real emulated worker, but from `hang_at` on it never answers (a crashed or wedged process)."""
    hang_at = 10**18

    def _call(self, r):
        if self.clock.now() < self.hang_at:
            super()._call(r)


def test_worker_that_stops_answering_is_taken_out_of_service():
    class Hang(HangingWorker):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if kw.get("seed", 0) == 1:                         # worker 1 hangs after 500 ms
                self.hang_at = self.clock.now() + 500 * MS
    cfg = ControllerConfig(grace=20 * MS)            # noticed before the 100 ms deadlines pass
    clock, ctl, ids, rec = make(workers=2, models=(("resnet50", 4),), worker_cls=Hang, config=cfg)
    out = Outcomes(clock)
    t0 = clock.now()
    rids = arrivals(clock, ctl, ids, out, 600, 2 * MS, t0=t0)   # 1.2 s at 500/s
    clock.run_until(t0 + 3000 * MS)
    out.check_once(rids)
    st = out.statuses()
    assert ctl.gpus[1].failed and not ctl.gpus[0].failed
    assert st.get("error", 0) > 0
    assert all("did not answer" in o.message for o in out.by_id.values() if o.status == "error")
    late = [o for o in out.by_id.values() if o.arrival > t0 + 800 * MS]
    assert late and sum(o.status == "success" for o in late) > 0.95 * len(late)   # served by worker 0
    assert ctl.gpus[1].loaded == {} and ctl.gpus[1].exec.jobs == {}
    assert not exec_overlaps(rec.actions())


def test_model_larger_than_the_cache_is_never_loaded():
    wc = WorkerConfig.load(weights_cache_size=5 * 16 * 2**20)     # 5 pages < ResNet-50's 7
    clock, ctl, ids, rec = make(models=(("resnet50", 1), ("mobilenet_v2", 1)), worker_config=wc)
    out = Outcomes(clock)
    rids = arrivals(clock, ctl, ids, out, 40, 5 * MS)
    clock.run_until(clock.now() + 1000 * MS)
    out.check_once(rids)
    by_model = {}
    for o in out.by_id.values():
        by_model.setdefault(o.model_id, set()).add(o.status)
    assert by_model[ids[0]] == {"dropped"} and by_model[ids[1]] == {"success"}
    loads = rec.actions().filter(pl.col("type") == "LOAD_WEIGHTS")
    assert set(loads["model_id"].to_list()) == {ids[1]}


@pytest.mark.parametrize("policy", ["clockwork", "triton", "ray"])
def test_close_finalises_pending_requests(policy):
    clock, ctl, ids, _ = make(policy=policy, models=(("resnet50", 2),))
    out = Outcomes(clock)
    rids = arrivals(clock, ctl, ids, out, 50, 100_000)
    clock.run_until(clock.now() + 3 * MS)
    ctl.close()
    clock.run_until(clock.now() + 1000 * MS)
    out.check_once(rids)
    assert "error" in out.statuses()
    late = ctl.submit(ids[0], callback=out)
    clock.run_until(clock.now() + MS)
    assert out.by_id[late].status == "rejected"
