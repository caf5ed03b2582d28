"""The same controller in real time: RealClock timers, results from worker threads, clients on other threads.
Includes an end-to-end run with a real TVM-compiled model on the CPU worker: batched outputs are split back to
the right requests."""
import threading
import time

import numpy as np
import pytest

from test_controller_support import MS, Waiter, process_worker_killed_is_reloaded_and_serves_again
from workbench.clock import RealClock
from workbench.controller.controller import Controller
from workbench.worker.emulated import EmulatedWorker


def test_real_clock_emulated_workers_concurrent_clients():
    clock = RealClock()
    ctl = Controller(clock)
    try:
        for _ in range(2):
            ctl.add_worker(lambda cb: EmulatedWorker(clock, 1, "h200", None, cb))
        ids = ctl.load_model("profile:resnet50", 4)
        ctl.wait_ready(10)
        n_threads, per = 3, 60
        out = Waiter(clock, n_threads * per)
        rids, lock = [], threading.Lock()

        def client(k):
            for i in range(per):
                rid = ctl.submit(ids[(k + i) % 4], slo=200 * MS, callback=out)
                with lock:
                    rids.append(rid)
                time.sleep(0.002)
        ts = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert out.done.wait(10), f"{len(out.by_id)} of {n_threads * per} answered"
        time.sleep(0.05)
        assert len(set(rids)) == n_threads * per
        assert all(n == 1 for n in out.calls.values())
        st = out.statuses()
        msgs = sorted({o.message[:90] for o in out.by_id.values() if o.status != "success"})[:5]
        assert st.get("success", 0) >= 0.9 * n_threads * per, (st, msgs, ctl.summary())   # busy 2-core machine
        assert not [o for o in out.late if o.completion > o.deadline]
    finally:
        ctl.close()
        clock.close()


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    from workbench.worker.profiling import ensure_measurements
    out = tmp_path_factory.mktemp("controller") / "mlp_cpu"
    compile_model(zoo.get("mlp"), out, target="cpu")
    ensure_measurements(out, "cpu")       # the controller's estimates start from them
    return out


def test_an_artifact_without_measurements_is_loaded_with_a_warning_naming_the_fix(mlp_artifact, tmp_path):
    import shutil
    from workbench.worker.cpu import CPUWorker
    from workbench.worker.config import WorkerConfig
    bare = tmp_path / "mlp_cpu"
    shutil.copytree(mlp_artifact, bare)
    (bare / "measurements.json").unlink()
    clock = RealClock()
    ctl = Controller(clock)
    try:
        ctl.add_worker(lambda cb: CPUWorker(WorkerConfig.load(None, weights_cache_size="64 MiB"), cb))
        with pytest.warns(RuntimeWarning, match="no exec measurements.*ensure_measurements"):
            ids = ctl.load_model(str(bare), 2)
            ctl.wait_ready(60)
        assert ctl.models[ids[0]].b1_ns == 0
        ok = ctl.load_model(str(mlp_artifact), 1)       # measured: no warning, an estimate from the file
        ctl.wait_ready(60)
        assert ctl.models[ok[0]].b1_ns > 0
    finally:
        ctl.close()
        clock.close()


def test_cpu_worker_real_model_outputs_reach_the_right_request(mlp_artifact):
    from workbench.models import zoo
    from workbench.models.reference import reference_forward
    from workbench.worker.config import WorkerConfig
    from workbench.worker.cpu import CPUWorker
    from workbench.telemetry.recorder import Recorder
    clock = RealClock()
    rec = Recorder()
    ctl = Controller(clock, recorder=rec)
    try:
        cfg = WorkerConfig.load(None, weights_cache_size="64 MiB", io_pool_size="8 MiB",
                                workspace_pool_size="8 MiB", host_io_pool_size="8 MiB")
        ctl.add_worker(lambda cb: CPUWorker(cfg, cb, clock=clock))
        ids = ctl.load_model(str(mlp_artifact), 2)
        ctl.wait_ready(30)
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal(128).astype(np.float32) for _ in range(40)]
        out = Waiter(clock, len(xs) + 1)
        rids = [ctl.submit(ids[i % 2], inputs=x, slo=2000 * MS, callback=out) for i, x in enumerate(xs)]
        bad = ctl.submit(ids[0], inputs=np.zeros(127, np.float32), callback=out)   # wrong shape
        assert out.done.wait(30)
        assert out.by_id[bad].status == "rejected" and "(128,)" in out.by_id[bad].message
        weights = zoo.get("mlp").weights()
        for rid, x in zip(rids, xs):
            o = out.by_id[rid]
            assert o.status == "success", (o.message, ctl.summary(),
                                           rec.actions().select(["type", "model_id", "status_name"]).rows())
            want = reference_forward("mlp", x[None], weights)[0]
            np.testing.assert_allclose(o.outputs[0], want, rtol=1e-4, atol=1e-4)
    finally:
        ctl.close()
        clock.close()


@pytest.mark.slow
def test_process_worker_killed_is_reloaded_and_serves_again(mlp_artifact):
    """A real executor process killed with SIGKILL: requests in flight end with error once, the controller
    hears the restart (on_restart), loads the model from disk again and serves on it."""
    from workbench.worker.config import WorkerConfig
    cfg = WorkerConfig.load(None, weights_cache_size="64 MiB", io_pool_size="8 MiB",
                            workspace_pool_size="8 MiB", host_io_pool_size="8 MiB")
    process_worker_killed_is_reloaded_and_serves_again("cpu", cfg, mlp_artifact, 30)
