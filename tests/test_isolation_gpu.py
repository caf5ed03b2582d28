"""Issue 9 on the GPU (marker `gpu`; run on the H200): the ProcessWorker hosting a CUDAWorker gives the same
outputs as the in-process CUDAWorker, frees the GPU when its process is killed, and keeps exec and latency
unchanged while a busy Python thread runs in the session (the in-process worker's figures are printed).

Artifacts are compiled on the build machine (`python -m bench.worker_artifacts`) and carried under .gpu/worker
(or $WORKBENCH_GPU_ARTIFACTS)."""
import gc
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from workbench.contract import EvictWeights, GetWorkerState, Infer, Status
from workbench.worker.config import WorkerConfig

from test_isolation import Results, measure, prepared, show, summary   # noqa: E402 - shared with the CPU test

ARTIFACTS = Path(os.environ.get("WORKBENCH_GPU_ARTIFACTS", Path(__file__).resolve().parents[1] / ".gpu" / "worker"))
CFG = dict(weights_cache_size="1 GiB", io_pool_size="64 MiB", workspace_pool_size="256 MiB",
           host_io_pool_size="64 MiB")


def artifact(name: str) -> Path:
    p = ARTIFACTS / name
    if not (p / "manifest.json").is_file():
        pytest.fail(f"artifact {p} missing: run `python -m bench.build_gpu_artifacts` on the build machine, carry "
                    f".gpu/artifacts.tar.xz and run `bash bench/gpu_suite.sh setup` (or set WORKBENCH_GPU_ARTIFACTS)")
    return p


def gpu_used_mib() -> float | None:
    """Device 0 memory in use (NVML, no CUDA context in this process), None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    except Exception:  # noqa: BLE001
        return None


def wait_for(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.gpu
def test_cuda_process_worker_matches_in_process_and_frees_the_gpu_when_killed():
    from workbench.worker.cuda import CUDAWorker
    from workbench.worker.process import ProcessWorker
    path = artifact("mlp_cuda")
    xs = [np.random.default_rng(n).standard_normal((n, 128)).astype(np.float32) for n in (1, 3, 8)]

    def run(w, res):
        prepared(w, res, path)
        outs = []
        for i, x in enumerate(xs):
            w.submit(Infer(id=10 + i, model_id=0, batch_size=len(x), inputs=(x,)))
            (r,) = res.wait([10 + i])
            assert r.ok, r.message
            assert r.exec.duration > 0 and r.gpu_clock > 0
            outs.append(r.outputs[0])
        return outs

    res = Results()
    local = CUDAWorker(WorkerConfig.load(None, **CFG), res, num_gpus=1)
    try:
        want = run(local, res)
    finally:
        local.close()
    del local                 # its weights cache goes with the last reference: measure from here
    gc.collect()

    base = gpu_used_mib()
    res, restarts = Results(), []
    w = ProcessWorker("cuda", WorkerConfig.load(None, **CFG), res, num_gpus=1, on_restart=restarts.append)
    try:
        assert w.info["pinned"] == "yes", f"shared memory not page-locked: {w.info['pinned']}"
        got = run(w, res)
        for g, e in zip(got, want):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        used = gpu_used_mib()
        if base is not None:
            assert used - base >= 1024 * 0.9, f"executor should hold its 1 GiB weights cache: {base} -> {used}"
        later = time.monotonic_ns() + 30_000_000_000
        w.submit(Infer(id=50, model_id=0, batch_size=1, earliest=later))
        w.submit(EvictWeights(id=51, model_id=0, earliest=later))
        old = w.pid
        os.kill(old, signal.SIGKILL)
        r50, r51 = res.wait([50, 51])
        assert r50.status == r51.status == Status.RUNTIME_ERROR and "executor process died" in r50.message
        assert wait_for(lambda: restarts == [1])
        if base is not None:                          # the dead executor's context is gone, the new one's is up
            assert wait_for(lambda: gpu_used_mib() < used + 512), f"GPU memory not freed: {gpu_used_mib()} MiB"
        w.submit(GetWorkerState(id=60))
        (s,) = res.wait([60])
        assert s.state["models"] == []
        assert run(w, res)[0].shape == want[0].shape
    finally:
        w.close()
    if base is not None:
        assert wait_for(lambda: gpu_used_mib() < base + 256), f"GPU memory after close: {gpu_used_mib()} MiB"


@pytest.mark.gpu
@pytest.mark.slow
def test_a_busy_session_thread_does_not_slow_the_cuda_process_worker(capsys):
    from workbench.worker.cuda import CUDAWorker
    from workbench.worker.process import ProcessWorker
    name = "resnet50_cuda" if (ARTIFACTS / "resnet50_cuda" / "manifest.json").is_file() else "mlp_cuda"
    path = artifact(name)
    from workbench.models.artifact import Artifact
    spec = Artifact.open(path).inputs[0]
    x = (np.random.default_rng(0).standard_normal((1, *spec.shape)).astype(spec.dtype),)
    timing = dict(lead_ns=30_000_000, slot_ns=15_000_000)
    cfg = WorkerConfig.load(None, **CFG)

    res = Results()
    local = CUDAWorker(cfg, res, num_gpus=1)
    try:
        prepared(local, res, path)
        measure(local, res, x, 100, rounds=1, batches=1, **timing)
        in_process = summary(measure(local, res, x, 1000, **timing))
    finally:
        local.close()

    res = Results()
    w = ProcessWorker("cuda", cfg, res, num_gpus=1)
    try:
        prepared(w, res, path)
        measure(w, res, x, 100, rounds=1, batches=1, **timing)
        isolated = summary(measure(w, res, x, 1000, **timing))
    finally:
        w.close()
    with capsys.disabled():
        print(f"\n{name} b1\n" + show("process worker", isolated) + "\n"
              + show("in-process worker (not isolated)", in_process))
    assert isolated["exec"]["ratio_p50"] <= 1.03, isolated        # issue 9: median within 3% of idle
    assert isolated["latency"]["ratio_p50"] <= 1.10, isolated
