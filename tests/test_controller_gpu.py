"""The controller in real time against the CUDA worker on a real GPU (marker `gpu`; run on the H200 with the
artifacts of `python -m bench.build_gpu_artifacts` carried as .gpu/artifacts, or $WORKBENCH_GPU_ARTIFACTS)."""
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from test_controller_support import MS, Waiter, process_worker_killed_is_reloaded_and_serves_again

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [Path(p) for p in (os.environ.get("WORKBENCH_GPU_ARTIFACTS"),) if p] + \
    [ROOT / ".gpu" / "artifacts", ROOT / ".gpu" / "worker"]


def artifact(name):
    for d in SEARCH:
        if (d / name / "manifest.json").is_file():
            return d / name
    pytest.fail(f"artifact {name} not in {[str(d) for d in SEARCH]}: run `python -m bench.build_gpu_artifacts` "
                f"on the build machine and carry .gpu/ to the GPU machine")


def controller(models):
    from workbench.clock import RealClock
    from workbench.controller import Controller
    from workbench.telemetry.recorder import Recorder
    from workbench.worker.config import WorkerConfig
    from workbench.worker.cuda import CUDAWorker
    clock, rec = RealClock(), Recorder()
    ctl = Controller(clock, recorder=rec)
    cfg = WorkerConfig.load(None, weights_cache_size="8 GiB", io_pool_size="256 MiB",
                            workspace_pool_size="2 GiB", host_io_pool_size="256 MiB")
    ctl.add_worker(lambda cb: CUDAWorker(cfg, cb, num_gpus=1, clock=clock))
    ids = {name: ctl.load_model(str(artifact(name)), copies) for name, copies in models.items()}
    ctl.wait_ready(300)
    return clock, ctl, rec, ids


@pytest.mark.gpu
def test_outputs_reach_the_right_request_on_the_gpu():
    from workbench.models.artifact import Artifact
    from workbench.models.reference import reference_forward
    clock, ctl, rec, ids = controller({"mlp_cuda": 2})
    try:
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal(128).astype(np.float32) for _ in range(64)]
        w = Waiter(clock, len(xs))
        rids = [ctl.submit(ids["mlp_cuda"][i % 2], inputs=x, slo=1000 * MS, callback=w) for i, x in enumerate(xs)]
        assert w.done.wait(120)
        art = Artifact.open(artifact("mlp_cuda"))          # the weights the GPU ran with (no compiler here)
        weights = [(t.name, a) for t, a in zip(art.tensors, art.weight_arrays())]
        for rid, x in zip(rids, xs):
            o = w.by_id[rid]
            assert o.status == "success", o.message
            np.testing.assert_allclose(o.outputs[0], reference_forward("mlp", x[None], weights)[0],
                                       rtol=1e-4, atol=1e-4)
        assert set(w.calls.values()) == {1}
    finally:
        ctl.close()
        clock.close()


@pytest.mark.gpu
def test_resnet50_copies_poisson_on_the_gpu():
    import polars as pl
    from workbench.workload import Poisson
    clock, ctl, rec, ids = controller({"resnet50_cuda": 8})
    try:
        wl = Poisson(ids["resnet50_cuda"], rate=150, slo_ms=100, seed=0)
        wl.start(ctl, clock, duration_s=5)
        deadline = threading.Event()
        for _ in range(200):
            if deadline.wait(0.1) or (not wl.next_arrival_pending() and wl.completed == wl.submitted):
                break
        assert wl.completed == wl.submitted > 500
        assert wl.outcomes["success"] >= 0.9 * wl.submitted, dict(wl.outcomes)
        inf = rec.actions().filter((pl.col("type") == "INFER") & (pl.col("status") == 0))
        assert inf.height > 0 and (inf["gpu_clock"] > 0).all()
        late = rec.requests().filter((pl.col("status") == "success") & (pl.col("completion") > pl.col("deadline")))
        assert late.height == 0
    finally:
        ctl.close()
        clock.close()


@pytest.mark.gpu
def test_cuda_process_worker_killed_is_reloaded_and_serves_again():
    """The CUDA executor process killed with SIGKILL: requests in flight end with error once, the controller
    hears the restart, loads the model from disk again (its weights too, on demand) and serves on the GPU."""
    from workbench.worker.config import WorkerConfig
    cfg = WorkerConfig.load(None, weights_cache_size="8 GiB", io_pool_size="256 MiB",
                            workspace_pool_size="2 GiB", host_io_pool_size="256 MiB")
    process_worker_killed_is_reloaded_and_serves_again("cuda", cfg, artifact("mlp_cuda"), 150, num_gpus=1)
