"""The CUDA worker on a real GPU (marker `gpu`; run on the H200). Artifacts are compiled on the build machine
(`python -m bench.worker_artifacts` -> .gpu/worker, or the models helper's bench.build_gpu_artifacts ->
.gpu/artifacts; $WORKBENCH_GPU_ARTIFACTS first) and carried to the GPU machine.

The first test runs everywhere: without a GPU the module imports and construction fails clearly."""
import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from workbench.contract import ClearCache, EvictWeights, GetWorkerState, Infer, LoadModelFromDisk, LoadWeights, Status
from workbench.worker.config import WorkerConfig

from no_gpu import run_without_gpu

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [Path(p) for p in (os.environ.get("WORKBENCH_GPU_ARTIFACTS"),) if p] + \
    [ROOT / ".gpu" / "worker", ROOT / ".gpu" / "artifacts"]   # ours, or bench.build_gpu_artifacts' bundle
CFG = dict(weights_cache_size="1 GiB", io_pool_size="64 MiB", workspace_pool_size="256 MiB",
           host_io_pool_size="64 MiB")


def artifact(name: str) -> Path:
    for d in SEARCH:
        if (d / name / "manifest.json").is_file():
            return d / name
    pytest.fail(f"artifact {name} not in {[str(d) for d in SEARCH]}: run `python -m bench.build_gpu_artifacts` (or "
                f"bench.worker_artifacts) on the build machine, carry .gpu/artifacts.tar.xz and run "
                f"`bash bench/gpu_suite.sh setup` on the GPU machine")


def test_imports_without_a_gpu_and_fails_clearly():
    # a child that sees no CUDA device, so the failure path is exercised on the H200 too
    out = run_without_gpu(f"""
        import pytest
        import workbench.worker.cuda as cuda_mod   # must import on any machine
        from workbench.worker.config import WorkerConfig
        with pytest.raises(cuda_mod.CUDAUnavailable, match="CPUWorker or EmulatedWorker") as e:
            cuda_mod.CUDAWorker(WorkerConfig.load(None, **{CFG!r}))
        print("refused:", e.value)
    """)
    assert out.startswith("refused: CUDAWorker ")


class Collector:
    def __init__(self):
        self.results, self.dupes, self.cv = {}, [], threading.Condition()

    def __call__(self, r):
        with self.cv:
            if r.id in self.results:
                self.dupes.append(r)
            self.results[r.id] = r
            self.cv.notify_all()

    def wait(self, i, timeout=120):
        with self.cv:
            assert self.cv.wait_for(lambda: i in self.results, timeout), f"no result for action {i}"
            return self.results.pop(i)


@pytest.fixture
def gpu_worker():
    from workbench.worker.cuda import CUDAWorker
    col = Collector()
    w = CUDAWorker(WorkerConfig.load(None, **CFG), col, num_gpus=1)
    ids = iter(range(1, 10**9))

    def do(make):
        a = make(next(ids))
        w.submit(a)
        return col.wait(a.id)
    w.do = do
    yield w
    w.close()
    del w.do                  # w -> do -> w: without the cycle the next test starts with this worker gone
    gc.collect()
    assert not col.dupes


def gpu_used(w) -> int:
    free, total = w.device.gpu_memory_info(0)
    return total - free


def mlp_on_gpu0(col, **config):
    """A CUDAWorker (CFG plus `config`) whose model 0 is the mlp, its weights loaded on GPU 0 (actions 1 and 2)."""
    from workbench.worker.cuda import CUDAWorker
    w = CUDAWorker(WorkerConfig.load(None, **{**CFG, **config}), col, num_gpus=1)
    try:
        w.submit(LoadModelFromDisk(id=1, model_id=0, path=str(artifact("mlp_cuda"))))
        assert col.wait(1).ok
        w.submit(LoadWeights(id=2, model_id=0, gpu=0))
        assert col.wait(2).ok
    except BaseException:
        w.close()
        raise
    return w


@pytest.mark.gpu
def test_load_infer_evict_outputs_equal_the_cpu_worker(gpu_worker):
    from workbench.worker.cpu import CPUWorker
    cuda_art, cpu_art = artifact("mlp_cuda"), artifact("mlp_cpu")
    w = gpu_worker
    r = w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(cuda_art), copies=2))
    assert r.ok, r.message
    assert w.do(lambda i: LoadWeights(id=i, model_id=1, gpu=0)).ok
    col = Collector()
    cpu = CPUWorker(WorkerConfig.load(None, **CFG), col)
    try:
        cpu.submit(LoadModelFromDisk(id=1, model_id=0, path=str(cpu_art)))
        assert col.wait(1).ok
        cpu.submit(LoadWeights(id=2, model_id=0, gpu=0))
        assert col.wait(2).ok
        rng = np.random.default_rng(0)
        for n in range(1, 17):
            x = rng.standard_normal((n, 128)).astype(np.float32)
            g = w.do(lambda i: Infer(id=i, model_id=1, gpu=0, batch_size=n, inputs=(x,)))
            cpu.submit(Infer(id=100 + n, model_id=0, gpu=0, batch_size=n, inputs=(x,)))
            c = col.wait(100 + n)
            assert g.ok and c.ok, (g.message, c.message)
            np.testing.assert_allclose(g.outputs[0], c.outputs[0], rtol=1e-4, atol=1e-5)
            assert g.exec.duration > 0 and g.copy_input.duration > 0 and g.copy_output.duration > 0
            assert g.gpu_clock > 0 and g.gpu_clock_before > 0, "NVML SM clock missing"
    finally:
        cpu.close()
    assert w.do(lambda i: EvictWeights(id=i, model_id=1, gpu=0)).ok
    assert w.do(lambda i: Infer(id=i, model_id=1, gpu=0)).status == Status.EXEC_WEIGHTS_MISSING
    assert w.check_consistency() == []


@pytest.mark.gpu
def test_execs_too_short_to_sample_reuse_a_recent_clock_reading(gpu_worker):
    """An exec over before its thread could read the SM clock does not wait for NVML: it reports the latest
    reading while that is younger than CLOCK_MAX_AGE; a ResNet-50 exec (ms) is sampled while it runs."""
    from workbench.worker import cuda as cuda_mod
    w = gpu_worker
    reads = []
    real = w.device.clock.read
    w.device.clock.read = lambda d: reads.append(d) or real(d)
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(artifact("mlp_cuda")))).ok
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=1, path=str(artifact("resnet50_cuda")))).ok
    for m in (0, 1):
        assert w.do(lambda i: LoadWeights(id=i, model_id=m, gpu=0)).ok
    x = np.zeros((1, 128), np.float32)
    short = [w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=1, inputs=(x,))) for _ in range(60)]
    assert all(r.ok and r.gpu_clock > 0 for r in short)
    assert len(reads) <= 4, f"{len(reads)} NVML reads for 60 execs of a few us"
    del reads[:]
    long = w.do(lambda i: Infer(id=i, model_id=1, gpu=0, batch_size=1))
    assert long.ok and long.gpu_clock > 0 and len(reads) >= 1, "a ms exec is sampled while it runs"
    w.device._clock_seen[0] = (w.device._clock_seen[0][0], time.monotonic_ns() - cuda_mod.CLOCK_MAX_AGE - 1)
    del reads[:]
    assert w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=1, inputs=(x,))).gpu_clock > 0
    assert len(reads) == 1, "a stale reading is refreshed"


@pytest.mark.gpu
def test_inputs_in_registered_host_memory_are_read_in_place(gpu_worker):
    import mmap
    w = gpu_worker
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(artifact("mlp_cuda")))).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
    region = mmap.mmap(-1, 1 << 20)                      # like the process worker's shared memory
    buf = np.frombuffer(region, np.uint8)
    w.device.register_host(buf.ctypes.data, buf.nbytes)
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    inside = buf[4096:4096 + x.nbytes].view(np.float32).reshape(x.shape)
    inside[...] = x
    pageable = w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=4, inputs=(x,)))
    direct = w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=4, inputs=(inside,)))
    assert pageable.ok and direct.ok, (pageable.message, direct.message)
    np.testing.assert_array_equal(direct.outputs[0], pageable.outputs[0])
    inside[...] = -x                                     # read where it lies at each Infer, not cached
    again = w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=4, inputs=(inside,)))
    assert again.ok and not np.array_equal(again.outputs[0], direct.outputs[0])
    assert w.check_consistency() == []
    w.close()                                            # gives the range back: it can be registered anew
    import cupy
    cupy.cuda.runtime.hostRegister(buf.ctypes.data, buf.nbytes, 0)
    cupy.cuda.runtime.hostUnregister(buf.ctypes.data)


@pytest.mark.gpu
def test_close_returns_the_device_memory_at_once():
    col = Collector()
    w = mlp_on_gpu0(col)
    w.submit(Infer(id=3, model_id=0, gpu=0))
    assert col.wait(3).ok                       # a graph captured over the weights' pages
    used = gpu_used(w)
    w.close()                                   # w stays referenced: no garbage collection involved
    assert used - gpu_used(w) >= 2**30, "the weights cache was not freed by close()"
    assert w.state()["gpus"][0]["models"] == [] and w.check_consistency() == []


@pytest.mark.gpu
def test_codes_and_windows_on_the_gpu(gpu_worker):
    w = gpu_worker
    w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(artifact("mlp_cuda"))))
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=5, path=str(artifact("mlp_cpu")))).status == \
        Status.INVALID_PATH
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0, latest=1)).status == Status.LOAD_WEIGHTS_TOO_LATE
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
    assert w.do(lambda i: Infer(id=i, model_id=0, gpu=0, latest=1)).status == Status.COPY_INPUT_TOO_LATE
    assert w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=64)).status == Status.COPY_INPUT_INVALID_BATCH_SIZE
    r = w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=5))           # generated inputs, padded to 8
    assert r.ok and r.outputs[0].shape == (5, 10)
    s = w.do(lambda i: GetWorkerState(id=i)).state
    assert s["gpus"][0]["models"] == [0] and s["gpus"][0]["total_pages"] == 64
    assert w.do(lambda i: ClearCache(id=i)).ok and w.state()["gpus"][0]["used_pages"] == 0
    assert w.check_consistency() == []


@pytest.mark.gpu
@pytest.mark.slow
def test_load_evict_10000_times_returns_gpu_memory_to_its_start(gpu_worker):
    w = gpu_worker
    w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(artifact("mlp_cuda"))))
    w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0))
    assert w.do(lambda i: Infer(id=i, model_id=0, gpu=0)).ok
    w.do(lambda i: EvictWeights(id=i, model_id=0, gpu=0))
    start = gpu_used(w)
    host = w.state()["host_weights_bytes"]
    for _ in range(10_000):
        assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
        assert w.do(lambda i: EvictWeights(id=i, model_id=0, gpu=0)).ok
    moved = gpu_used(w) - start
    print(f"GPU memory after 10,000 load/evict: {moved:+d} bytes from the start level")
    assert abs(moved) <= 2 * 2**20, f"GPU memory moved by {moved} bytes over 10,000 load/evict"
    assert w.state()["host_weights_bytes"] == host and w.check_consistency() == []


@pytest.mark.gpu
@pytest.mark.slow
def test_memory_outside_the_cache_stays_bounded_as_models_grow(gpu_worker):
    w = gpu_worker
    path = str(artifact("mlp_cuda"))
    used = []
    for k in range(32):   # 32 separately loaded models: kernels loaded once each
        assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=1000 * k, path=path, copies=50)).ok
        assert w.do(lambda i: LoadWeights(id=i, model_id=1000 * k, gpu=0)).ok
        for _ in range(2):   # the VM's first run, then a CUDA graph (the GPU's exec slot is allocated once)
            assert w.do(lambda i: Infer(id=i, model_id=1000 * k, gpu=0, batch_size=16)).ok
        assert w.do(lambda i: EvictWeights(id=i, model_id=1000 * k, gpu=0)).ok
        used.append(gpu_used(w))
    per_model = (used[-1] - used[0]) / 31
    print(f"GPU memory outside the weights cache: {used[0] / 2**20:.1f} MiB after 1 model, "
          f"{used[-1] / 2**20:.1f} MiB after 32 ({per_model / 2**20:.2f} MiB per model)")
    assert per_model < 4 * 2**20, f"{per_model / 2**20:.2f} MiB per loaded model"
    before = gpu_used(w)
    for c in range(1, 50):   # copies share kernels, and a copy's graphs go with its weights: 49 more cost nothing
        assert w.do(lambda i: LoadWeights(id=i, model_id=c, gpu=0)).ok
        assert w.do(lambda i: Infer(id=i, model_id=c, gpu=0, batch_size=16)).ok
        assert w.do(lambda i: EvictWeights(id=i, model_id=c, gpu=0)).ok
    assert gpu_used(w) - before < 2**20


@pytest.mark.gpu
def test_resnet50_output_matches_the_reference(gpu_worker):
    from workbench.models.artifact import Artifact
    from workbench.models.reference import reference_forward
    path = artifact("resnet50_cuda")
    w = gpu_worker
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(path))).ok
    lw = w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0))
    assert lw.ok and lw.timing.duration > 0
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    r = w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=2, inputs=(x,)))
    assert r.ok, r.message
    art = Artifact.open(path)
    ref = reference_forward("resnet50", x, [(t.name, a) for t, a in zip(art.tensors, art.weight_arrays())])
    np.testing.assert_allclose(r.outputs[0], ref, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
def test_bert_with_a_contiguous_page_run(gpu_worker):
    """BERT's 94 MB word embedding lives in a run of 6 contiguous pages: fragment the cache first so the run
    must be placed around other models' pages, then check the output against the NumPy reference."""
    from workbench.models.artifact import Artifact
    from workbench.models.reference import reference_forward
    path = artifact("bert_base_cuda")
    mlp = artifact("mlp_cuda")
    w = gpu_worker
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=100, path=str(mlp), copies=60)).ok
    for m in range(100, 160):                 # fill the 64-page cache with single pages, free every other one
        assert w.do(lambda i: LoadWeights(id=i, model_id=m, gpu=0)).ok
    for m in range(100, 160, 2):
        assert w.do(lambda i: EvictWeights(id=i, model_id=m, gpu=0)).ok
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(path))).ok
    r = w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0))
    assert r.status == Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE and "contiguous" in r.message   # 34 free, none adjacent
    for m in range(101, 160, 2):
        assert w.do(lambda i: EvictWeights(id=i, model_id=m, gpu=0)).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
    ids = np.random.default_rng(2).integers(0, 30522, (1, 128)).astype(np.int32)
    r = w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=1, inputs=(ids,)))
    assert r.ok, r.message
    art = Artifact.open(path)
    ref = reference_forward("bert_base", ids, [(t.name, a) for t, a in zip(art.tensors, art.weight_arrays())])
    np.testing.assert_allclose(r.outputs[0], ref, rtol=5e-3, atol=5e-3)
    assert w.check_consistency() == []


@pytest.mark.gpu
def test_cuda_graphs_replay_the_vm_exactly_and_follow_weights_that_move(gpu_worker):
    """An exec replayed as a CUDA graph gives the VM's outputs bit for bit, reads each Infer's new inputs, and
    after an evict and a load into other pages runs on the new pages (a new graph), never the old addresses."""
    path = artifact("resnet50_cuda")
    w = gpu_worker
    stats = w.device.graph_stats
    assert w.device.graphs, "CUDA graphs are on by default"
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(path), copies=2)).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
    rng = np.random.default_rng(3)
    x, y = (rng.standard_normal((2, 3, 224, 224)).astype(np.float32) for _ in range(2))

    def infer(model, inp):
        r = w.do(lambda i: Infer(id=i, model_id=model, gpu=0, batch_size=2, inputs=(inp,)))
        assert r.ok, r.message
        return r.outputs[0]

    w.device.graphs = False                 # the reference: through the VM
    vm_x = infer(0, x)
    assert stats["launches"] == 0
    w.device.graphs = True
    np.testing.assert_array_equal(infer(0, x), vm_x)          # captured, replayed: bit-identical
    assert stats["captures"] == 1 and stats["launches"] == 1 and stats["failures"] == 0
    vm_y_expected = infer(0, y)                               # the graph reads the new inputs
    assert stats["launches"] == 2
    assert not np.array_equal(vm_y_expected, vm_x)
    # move the weights: copy 1 takes copy 0's pages, copy 0 is loaded again elsewhere
    def first_page(model):
        return w.models[model].gpus[0].binding.pages[0].data.ptr

    old = first_page(0)
    assert w.do(lambda i: EvictWeights(id=i, model_id=0, gpu=0)).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=1, gpu=0)).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
    assert first_page(1) == old and first_page(0) != old
    for model in (0, 1, 0, 1):
        np.testing.assert_array_equal(infer(model, x), vm_x)
    np.testing.assert_array_equal(infer(0, y), vm_y_expected)
    assert stats["failures"] == 0
    # overwrite the pages copy 0 used to hold: a graph still pointing there would now give wrong outputs
    assert w.do(lambda i: EvictWeights(id=i, model_id=1, gpu=0)).ok
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=7, path=str(artifact("resnet18_cuda")))).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=7, gpu=0)).ok
    assert w.do(lambda i: Infer(id=i, model_id=7, gpu=0, batch_size=1)).ok
    np.testing.assert_array_equal(infer(0, x), vm_x)
    assert w.check_consistency() == []


@pytest.mark.gpu
def test_inputs_staged_in_the_exec_slot_or_while_an_exec_runs_give_the_same_outputs(gpu_worker):
    """An Infer whose exec launches at once has its inputs copied straight into the slot its graph reads; Infers
    sent together (their inputs copied while an earlier exec runs) are staged in the io arena and copied into
    the slot on the GPU. Both give every Infer its own outputs, bit for bit."""
    w = gpu_worker
    stats = w.device.graph_stats
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(artifact("resnet50_cuda")))).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(5)]
    alone = []
    for x in xs:                                      # one at a time: each exec follows its copy at once
        before = stats["staged_in_slot"]
        r = w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=1, inputs=(x,)))
        assert r.ok, r.message
        assert stats["staged_in_slot"] == before + 1
        alone.append(r.outputs[0])
    assert all(not np.array_equal(alone[0], o) for o in alone[1:])
    col = Collector()
    w.on_result = col
    before = stats["staged_in_slot"]
    for k, x in enumerate(xs):                        # together: inputs 2..5 are copied while execs run
        w.submit(Infer(id=1000 + k, model_id=0, gpu=0, batch_size=1, inputs=(x,)))
    together = [col.wait(1000 + k) for k in range(len(xs))]
    assert all(r.ok for r in together), [r.message for r in together]
    assert stats["staged_in_slot"] - before < len(xs), "an Infer sent during a 5 ms exec was staged in the slot"
    for r, ref in zip(together, alone):
        np.testing.assert_array_equal(r.outputs[0], ref)
    assert stats["failures"] == 0 and w.check_consistency() == []


@pytest.mark.gpu
def test_an_infer_on_an_idle_gpu_starts_in_one_step_and_is_answered_as_by_the_tasks(gpu_worker):
    """Once its graph is captured, an Infer on an idle GPU starts in one step (Worker._start_ready): outputs bit for
    bit and result fields as through the tasks (padded batches included); any Infer one of the tasks' checks would
    refuse is left to them and gets its status; an evict during its exec is noticed; pools stay exact."""
    w = gpu_worker
    col = w.on_result
    stats = w.device.graph_stats
    assert w.do(lambda i: LoadModelFromDisk(id=i, model_id=0, path=str(artifact("resnet50_cuda")))).ok
    assert w.do(lambda i: LoadWeights(id=i, model_id=0, gpu=0)).ok
    rng = np.random.default_rng(11)

    def infer(x, **kw):
        return w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=len(x), inputs=(x,), **kw))

    for n in (2, 3):                                  # 3 runs padded to the compiled batch size 4
        xs = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for _ in range(3)]
        w._ready_path = False
        before = stats["ready"]
        tasks = [infer(x) for x in xs]                # the first one captures the graph
        assert stats["ready"] == before
        w._ready_path = True
        ready = [infer(x) for x in xs]
        assert stats["ready"] == before + len(xs)
        for t, r in zip(tasks, ready):
            assert t.ok and r.ok, (t.message, r.message)
            assert r.outputs[0].shape == t.outputs[0].shape == (n, 1000)
            np.testing.assert_array_equal(r.outputs[0], t.outputs[0])
            assert r.received <= r.copy_input.begin <= r.exec.begin <= r.exec.end <= r.sent
            assert r.copy_input.duration > 0 and r.copy_output.duration > 0 and r.gpu_clock > 0
            assert abs(r.exec.duration - t.exec.duration) < 0.2 * t.exec.duration
        assert not np.array_equal(ready[0].outputs[0], ready[1].outputs[0])
    # what a task would refuse is left to the tasks
    before = stats["ready"]
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    assert w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=2, inputs=(x[:, :2],))).status == \
        Status.COPY_INPUT_BAD_SIZES
    assert w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=2, inputs=(x.astype(np.float64),))).status == \
        Status.COPY_INPUT_INVALID_INPUT
    assert infer(x, latest=1).status == Status.COPY_INPUT_TOO_LATE
    assert w.do(lambda i: Infer(id=i, model_id=9, gpu=0, batch_size=2, inputs=(x,))).status == \
        Status.COPY_INPUT_UNKNOWN_MODEL
    assert stats["ready"] == before
    # an evict during a ready exec (16 samples: ~11 ms)
    x16 = rng.standard_normal((16, 3, 224, 224)).astype(np.float32)
    assert infer(x16).ok and infer(x16).ok and stats["ready"] == before + 1
    w.submit(Infer(id=5000, model_id=0, gpu=0, batch_size=16, inputs=(x16,)))
    w.submit(EvictWeights(id=5001, model_id=0, gpu=0))
    assert col.wait(5001).ok
    r = col.wait(5000)
    assert r.status == Status.EXEC_CONCURRENT_WEIGHTS_MODIFICATION, r.message
    assert stats["ready"] == before + 2
    assert infer(x).status == Status.EXEC_WEIGHTS_MISSING
    st = w.state()["gpus"][0]
    assert st["io_pool_used"] == st["workspace_pool_used"] == 0 and w.in_flight() == 0
    assert w.check_consistency() == []


@pytest.mark.gpu
def test_the_exec_thread_sleeps_until_shortly_before_the_exec_ends():
    """With exec_wake_ahead the exec thread sleeps through most of an exec instead of spinning (the process's CPU time
    per Infer drops well below the exec's length while the caller waits), with the same outputs; its expectation of
    the next exec follows a faster one at once and a slower one an eighth of the way, and an exec much shorter than
    expected is still answered."""
    from workbench.worker.cuda import CUDAWorker
    x = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    cpu, outs, execs = {}, {}, {}
    for ahead in (0, 400_000):
        col = Collector()
        w = CUDAWorker(WorkerConfig.load(None, **CFG, exec_wake_ahead=ahead), col, num_gpus=1)
        try:
            w.submit(LoadModelFromDisk(id=1, model_id=0, path=str(artifact("resnet50_cuda"))))
            assert col.wait(1).ok
            w.submit(LoadWeights(id=2, model_id=0, gpu=0))
            assert col.wait(2).ok
            ids = iter(range(10, 10**6))

            def infer():
                a = Infer(id=next(ids), model_id=0, gpu=0, batch_size=1, inputs=(x,))
                w.submit(a)
                r = col.wait(a.id)
                assert r.ok, r.message
                return r
            for _ in range(5):
                infer()
            c0 = time.process_time()
            rs = [infer() for _ in range(30)]
            cpu[ahead] = (time.process_time() - c0) / len(rs)
            outs[ahead], execs[ahead] = rs[-1].outputs[0], np.median([r.exec.duration for r in rs])
            if ahead:
                expect, key = w.models[0].entry.handle.expect_exec, (0, 1)
                assert 0.9 * execs[ahead] < expect[key] < 1.1 * execs[ahead]
                expect[key] = 20 * expect[key]                # an exec much shorter than expected
                r = infer()
                assert expect[key] == r.exec.duration, "a faster exec sets the expectation at once"
                low = expect[key] = r.exec.duration // 2      # a slower one moves it an eighth of the way
                r = infer()
                assert expect[key] == low + (r.exec.duration - low) // 8
            assert w.check_consistency() == []
        finally:
            w.close()
    np.testing.assert_array_equal(outs[0], outs[400_000])
    assert cpu[0] > 0.7 * execs[0] / 1e9, f"spinning through the wait: {cpu[0] * 1e6:.0f} us CPU per Infer"
    assert cpu[400_000] < 0.5 * cpu[0], f"CPU per Infer {cpu[400_000] * 1e6:.0f} us asleep vs {cpu[0] * 1e6:.0f} us"


@pytest.mark.gpu
def test_a_long_exec_rehearses_its_ending_and_every_infer_keeps_its_own_outputs(gpu_worker, monkeypatch):
    """While a ResNet-50 exec (ms) runs, wait_exec rehearses its ending (the outputs copied to the host ahead, the
    last exec's values, and ExecTask.prepare(rehearse=True)); the MLP's exec (us) has no time for it. Infers of
    alternating inputs each get their own outputs, bit for bit, and the pools stay exact."""
    from workbench.worker.base import ExecTask
    w = gpu_worker
    calls = []
    prepare = ExecTask.prepare

    def spy(task, rehearse):
        calls.append((task.action.model_id, rehearse))
        prepare(task, rehearse)
    monkeypatch.setattr(ExecTask, "prepare", spy)
    for mid, name in ((0, "mlp_cuda"), (1, "resnet50_cuda")):
        assert w.do(lambda i, mid=mid, name=name: LoadModelFromDisk(id=i, model_id=mid, path=str(artifact(name)))).ok
        assert w.do(lambda i, mid=mid: LoadWeights(id=i, model_id=mid, gpu=0)).ok
    rng = np.random.default_rng(8)
    for mid, shape in ((0, (1, 128)), (1, (1, 3, 224, 224))):
        xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
        outs = []
        for k in range(8):
            r = w.do(lambda i: Infer(id=i, model_id=mid, gpu=0, batch_size=1, inputs=(xs[k % 2],)))
            assert r.ok, r.message
            outs.append(r.outputs[0])
        assert not np.array_equal(outs[0], outs[1])
        for k in range(2, 8):
            np.testing.assert_array_equal(outs[k], outs[k % 2])
    resnet = [r for m, r in calls if m == 1]
    assert len(resnet) == 8 and sum(resnet) >= 6, resnet      # from the second exec on, its length is known
    assert not any(r for m, r in calls if m == 0)
    st = w.state()["gpus"][0]
    assert st["io_pool_used"] == st["workspace_pool_used"] == 0 and w.in_flight() == 0
    assert w.check_consistency() == []
    from workbench.worker.cuda import CUDAWorker           # exec_rehearse = false: never
    calls.clear()
    col = Collector()
    off = CUDAWorker(WorkerConfig.load(None, **CFG, exec_rehearse=False), col, num_gpus=1)
    try:
        for a in (LoadModelFromDisk(id=1, model_id=1, path=str(artifact("resnet50_cuda"))),
                  LoadWeights(id=2, model_id=1, gpu=0),
                  *(Infer(id=3 + k, model_id=1, gpu=0, batch_size=1, inputs=(xs[0],)) for k in range(4))):
            off.submit(a)
            r = col.wait(a.id)
            assert r.ok, r.message
        np.testing.assert_array_equal(r.outputs[0], outs[0])   # (the ResNet-50 ones, made last)
    finally:
        off.close()
    assert [r for _, r in calls] == [False] * 4


@pytest.mark.gpu
def test_a_short_exec_is_answered_inside_submit_when_its_caller_allows():
    """submit(answer_here=True) (the process worker's host): the MLP's exec, expected within submit_wait_max, is
    waited for in the submitting thread and answered before submit returns, with the outputs the executor thread
    gives; a ResNet-50 exec (ms) is still answered by the executor thread, and so is the MLP with the setting 0
    or without answer_here."""
    from workbench.worker.cuda import CUDAWorker
    me = threading.current_thread().name
    x = np.random.default_rng(6).standard_normal((1, 128)).astype(np.float32)
    img = np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for wait_max in (100_000, 0):
        col, by = Collector(), {}

        def on_result(r):
            by[r.id] = threading.current_thread().name
            col(r)
        w = CUDAWorker(WorkerConfig.load(None, **CFG, submit_wait_max=wait_max), on_result, num_gpus=1)
        try:
            for mid, name in ((0, "mlp_cuda"), (1, "resnet50_cuda")):
                w.submit(LoadModelFromDisk(id=1 + 2 * mid, model_id=mid, path=str(artifact(name))))
                assert col.wait(1 + 2 * mid).ok
                w.submit(LoadWeights(id=2 + 2 * mid, model_id=mid, gpu=0))
                assert col.wait(2 + 2 * mid).ok
            ids = iter(range(10, 10**6))

            def infer(mid, inputs, here):
                a = Infer(id=next(ids), model_id=mid, gpu=0, batch_size=1, inputs=(inputs,))
                w.submit(a, answer_here=here)
                answered = a.id in col.results                  # before submit returned?
                r = col.wait(a.id)
                assert r.ok, r.message
                return r, answered, by[a.id]
            for _ in range(3):                                  # graphs captured, execs' lengths known
                infer(0, x, False), infer(1, img, False)
            assert w.models[0].entry.handle.expect_exec[(0, 1)] <= 100_000   # the MLP's exec is short
            ref, _, thread = infer(0, x, False)
            assert thread == "worker-gpu0-exec"
            for _ in range(20):
                r, answered, thread = infer(0, x, True)
                if wait_max:
                    assert answered and thread == me
                else:
                    assert thread == "worker-gpu0-exec"
                np.testing.assert_array_equal(r.outputs[0], ref.outputs[0])
                assert r.exec.duration > 0 and r.copy_input.duration > 0 and r.gpu_clock > 0
            r, answered, thread = infer(1, img, True)                          # milliseconds: not waited for here
            assert not answered and thread == "worker-gpu0-exec"
            assert w.check_consistency() == [] and w.in_flight() == 0 and not col.dupes
        finally:
            w.close()


@pytest.mark.gpu
def test_a_ready_exec_whose_slot_was_replaced_goes_through_the_tasks_once(gpu_worker):
    """A graph reads the GPU's exec slot and output buffer: once a larger model replaces them, the next Infer of a
    ready model is not launched on the old ones (nothing enqueued) but run by the tasks, which capture it again,
    and the one after it starts in one step again; outputs stay those of the model."""
    w = gpu_worker
    stats = w.device.graph_stats
    for mid, name in ((0, "mlp_cuda"), (1, "resnet50_cuda")):
        assert w.do(lambda i, mid=mid, name=name: LoadModelFromDisk(id=i, model_id=mid, path=str(artifact(name)))).ok
        assert w.do(lambda i, mid=mid: LoadWeights(id=i, model_id=mid, gpu=0)).ok
    x = np.random.default_rng(5).standard_normal((4, 128)).astype(np.float32)
    mlp = [w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=4, inputs=(x,))) for _ in range(2)]
    assert all(r.ok for r in mlp) and stats["ready"] == 1
    slot, captures = w.device._slots[0], stats["captures"]
    big = np.zeros((8, 3, 224, 224), np.float32)          # 4.8 MB of inputs: more than the slot holds
    assert w.do(lambda i: Infer(id=i, model_id=1, gpu=0, batch_size=8, inputs=(big,))).ok
    assert w.device._slots[0] is not slot
    again = [w.do(lambda i: Infer(id=i, model_id=0, gpu=0, batch_size=4, inputs=(x,))) for _ in range(2)]
    assert all(r.ok for r in again)
    assert stats["ready"] == 2 and stats["captures"] == captures + 2     # resnet50 b8, then mlp b4 again
    for r in again:
        np.testing.assert_array_equal(r.outputs[0], mlp[0].outputs[0])
    assert w.check_consistency() == [] and w.in_flight() == 0


@pytest.mark.gpu
def test_queued_execs_follow_each_other_in_a_workspace_pool_that_holds_one():
    """Execs queued behind each other: the next one launches as soon as the previous one has been waited for,
    before that one's result is built, so it takes the workspace the previous one gave back at that moment (a
    pool that holds only one exec's workspace is enough), and every Infer still gets its own outputs."""
    from workbench.models.artifact import Artifact
    from workbench.worker.cuda import CUDAWorker
    path = artifact("resnet50_cuda")
    col = Collector()
    w = CUDAWorker(WorkerConfig.load(None, **{**CFG, "workspace_pool_size": Artifact.open(path).workspace_bytes(1)}),
                   col, num_gpus=1)
    try:
        w.submit(LoadModelFromDisk(id=1, model_id=0, path=str(path)))
        assert col.wait(1).ok
        w.submit(LoadWeights(id=2, model_id=0, gpu=0))
        assert col.wait(2).ok
        xs = [np.random.default_rng(k).standard_normal((1, 3, 224, 224)).astype(np.float32) for k in range(3)]
        alone = []
        for k, x in enumerate(xs):                   # one at a time: the reference outputs
            w.submit(Infer(id=10 + k, model_id=0, gpu=0, batch_size=1, inputs=(x,)))
            alone.append(col.wait(10 + k))
        for rep in range(3):                         # all at once: each queues behind the one before
            for k, x in enumerate(xs):
                w.submit(Infer(id=100 * (rep + 1) + k, model_id=0, gpu=0, batch_size=1, inputs=(x,)))
            queued = [col.wait(100 * (rep + 1) + k) for k in range(len(xs))]
            for a, q in zip(alone, queued):
                assert q.ok, q.message
                np.testing.assert_array_equal(q.outputs[0], a.outputs[0])
            for prev, nxt in zip(queued, queued[1:]):
                assert prev.exec.end <= nxt.exec.begin       # one exec at a time on the GPU
        assert w.check_consistency() == [] and w.in_flight() == 0 and col.dupes == []
        st = w.state()["gpus"][0]
        assert st["workspace_pool_used"] == st["io_pool_used"] == 0
    finally:
        w.close()


@pytest.mark.gpu
def test_with_telemetry_every_infer_goes_through_its_tasks(tmp_path):
    col = Collector()
    w = mlp_on_gpu0(col, telemetry=True, log_dir=str(tmp_path))
    try:
        for i in range(3, 9):
            w.submit(Infer(id=i, model_id=0, gpu=0, batch_size=4))
            assert col.wait(i).ok
        assert w.device.graph_stats["launches"] >= 5 and w.device.graph_stats["ready"] == 0
        rows = [(r[0], r[2]) for r in w.telemetry_rows]
        assert all((i, kind) in rows for i in range(3, 9) for kind in ("inputs", "exec"))
    finally:
        w.close()


@pytest.mark.gpu
def test_cuda_graphs_off_runs_the_vm(tmp_path):
    col = Collector()
    w = mlp_on_gpu0(col, cuda_graphs=False)
    try:
        for i in range(3, 8):
            w.submit(Infer(id=i, model_id=0, gpu=0, batch_size=4))
            assert col.wait(i).ok
        assert not w.device.graphs and w.device.graph_stats == {"launches": 0, "captures": 0, "failures": 0,
                                                          "staged_in_slot": 0, "ready": 0}
    finally:
        w.close()


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_the_first_exec_does_not_time_the_kernel_load(graphs):
    """A batch size's first call loads its kernels (milliseconds): the worker makes that call untimed, so the
    first exec's measured duration is like the next ones' (the controller's estimates start from it)."""
    col = Collector()
    w = mlp_on_gpu0(col, cuda_graphs=graphs)
    try:
        durations = []
        for i in range(3, 15):
            w.submit(Infer(id=i, model_id=0, gpu=0, batch_size=4))
            r = col.wait(i)
            assert r.ok, r.message
            durations.append(r.exec.duration)
        later = sorted(durations[1:])[len(durations[1:]) // 2]
        assert durations[0] < 3 * later, f"first exec {durations[0]} ns, later median {later} ns"
    finally:
        w.close()
