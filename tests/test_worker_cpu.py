"""The CPU worker end to end with a real TVM-compiled model (mlp): numerics, codes, faults, consistency, and
agreement with the emulated worker on the statuses of the same action sequence."""
import json
import shutil
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from workbench.clock import VirtualClock
from workbench.contract import (ClearCache, EvictWeights, GetWorkerState, Infer, LoadModelFromDisk, LoadWeights,
                                Status)
from workbench.worker.config import ConfigError, WorkerConfig
from workbench.worker.cpu import CPUDevice, CPUWorker
from workbench.worker.emulated import EmulatedWorker
from result_collector import Collector

SMALL = dict(weights_cache_size="48 MiB", io_pool_size="8 MiB", workspace_pool_size="8 MiB",
             host_io_pool_size="8 MiB")   # 3 pages of 16 MiB: room for 3 mlp copies


@pytest.fixture(scope="session")
def mlp_artifact(tmp_path_factory):
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    out = tmp_path_factory.mktemp("worker") / "mlp_cpu"
    compile_model(zoo.get("mlp"), out, target="cpu")
    return out


@pytest.fixture
def cpu(mlp_artifact):
    col = Collector()
    w = CPUWorker(WorkerConfig.load(None, **SMALL), col)
    w.do = lambda a: (w.submit(a), col.wait(a.id))[1]
    w.col = col
    yield w
    w.close()
    assert not col.dupes


def reference(artifact_dir, x):
    from workbench.models.artifact import Artifact
    from workbench.models.reference import reference_forward
    art = Artifact.open(artifact_dir)
    return reference_forward("mlp", x, [(t.name, a) for t, a in zip(art.tensors, art.weight_arrays())])


def test_numerics_for_every_batch_size(cpu, mlp_artifact):
    r = cpu.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact), copies=2))
    assert r.ok and r.model_ids == (0, 1) and r.batch_sizes == (1, 2, 4, 8, 16) and r.num_pages == 1
    assert cpu.do(LoadWeights(id=2, model_id=1, gpu=0)).ok
    rng = np.random.default_rng(0)
    for n in range(1, 17):            # every compiled size and every padded size in between
        x = rng.standard_normal((n, 128)).astype(np.float32)
        res = cpu.do(Infer(id=100 + n, model_id=1, gpu=0, batch_size=n, inputs=(x,)))
        assert res.ok, res.message
        assert res.outputs[0].shape == (n, 10)
        np.testing.assert_allclose(res.outputs[0], reference(mlp_artifact, x), rtol=1e-4, atol=1e-5)
        assert res.exec.duration > 0 and res.gpu_clock == 0
    assert cpu.check_consistency() == []


def test_copies_share_host_weights_and_kernels(cpu, mlp_artifact):
    cpu.do(LoadModelFromDisk(id=1, model_id=10, path=str(mlp_artifact), copies=1000))
    s = cpu.do(GetWorkerState(id=2)).state
    assert len(s["models"]) == 1000 and s["host_weights_bytes"] == 16 * 2**20   # one page, once
    assert len({id(m.entry.handle.loaded) for m in cpu.models.values()}) == 1
    x = np.ones((2, 128), np.float32)
    for mid in (10, 500, 1009):
        assert cpu.do(LoadWeights(id=mid, model_id=mid, gpu=0)).ok
    outs = [cpu.do(Infer(id=5000 + m, model_id=m, gpu=0, batch_size=2, inputs=(x,))).outputs[0] for m in (10, 500, 1009)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert cpu.do(LoadWeights(id=3, model_id=11, gpu=0)).status == Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE
    s = cpu.do(GetWorkerState(id=4)).state
    assert s["gpus"][0]["models"] == [10, 500, 1009] and s["gpus"][0]["free_pages"] == 0
    assert cpu.do(ClearCache(id=5)).ok
    assert cpu.state()["gpus"][0]["free_pages"] == 3 and cpu.check_consistency() == []


def test_bad_inputs_and_unknown_models(cpu, mlp_artifact):
    cpu.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact)))
    cpu.do(LoadWeights(id=2, model_id=0, gpu=0))
    cases = {
        10: (Infer(id=10, model_id=0, gpu=0, batch_size=2, inputs=(np.zeros((2, 128), np.float64),)),
             Status.COPY_INPUT_INVALID_INPUT),
        11: (Infer(id=11, model_id=0, gpu=0, batch_size=2, inputs=(np.zeros((2, 127), np.float32),)),
             Status.COPY_INPUT_BAD_SIZES),
        12: (Infer(id=12, model_id=0, gpu=0, batch_size=32), Status.COPY_INPUT_INVALID_BATCH_SIZE),
        13: (Infer(id=13, model_id=3, gpu=0), Status.COPY_INPUT_UNKNOWN_MODEL),
        14: (LoadWeights(id=14, model_id=0, gpu=1), Status.INVALID_GPU),
        15: (LoadModelFromDisk(id=15, model_id=0, path=str(mlp_artifact)), Status.INVALID_MODEL_ID),
    }
    for a, _ in cases.values():
        cpu.submit(a)
    for i, (a, status) in cases.items():
        assert cpu.col.wait(i).status == status
    r = cpu.do(Infer(id=20, model_id=0, gpu=0, batch_size=3))     # generated inputs (zeros)
    assert r.ok and r.outputs[0].shape == (3, 10)
    np.testing.assert_allclose(r.outputs[0], reference(mlp_artifact, np.zeros((3, 128), np.float32)), rtol=1e-4, atol=1e-5)
    assert cpu.check_consistency() == []


def test_corrupt_shared_object_gives_an_error_and_a_consistent_worker(cpu, mlp_artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(mlp_artifact, bad)
    (bad / "b4.so").write_bytes(b"\x7fELF this is not a shared object")
    r = cpu.do(LoadModelFromDisk(id=1, model_id=0, path=str(bad)))
    assert r.status == Status.INVALID_PATH and "b4.so" in r.message       # caught by its checksum
    # the same damage with a matching checksum: the .so itself fails to load
    import hashlib
    m = json.loads((bad / "manifest.json").read_text())
    m["batches"]["4"]["sha256"] = hashlib.sha256((bad / "b4.so").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(m))
    r = cpu.do(LoadModelFromDisk(id=2, model_id=0, path=str(bad)))
    assert r.status == Status.RUNTIME_ERROR and "b4.so" in r.message
    assert cpu.models == {} and cpu.check_consistency() == []
    assert cpu.do(LoadModelFromDisk(id=3, model_id=0, path=str(mlp_artifact))).ok   # id 0 is still free
    assert cpu.do(LoadWeights(id=4, model_id=0, gpu=0)).ok
    assert cpu.do(Infer(id=5, model_id=0, gpu=0)).ok
    assert cpu.do(LoadModelFromDisk(id=6, model_id=7, path=str(tmp_path / "missing"))).status == Status.INVALID_PATH


class GatedCPUDevice(CPUDevice):
    """The real CPU device, with exec held open until the test releases it (to race an evict with it)."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def execute(self, *a, **kw):
        out = super().execute(*a, **kw)
        self.started.set()
        assert self.release.wait(30)
        return out


@pytest.fixture
def gated(mlp_artifact):
    """(worker, its GatedCPUDevice, collector): the mlp loaded as model 0, its weights on gpu 0 (actions 1, 2)."""
    from workbench.worker.base import MonotonicClock, Worker
    col = Collector()
    dev = GatedCPUDevice()
    w = Worker(dev, 1, WorkerConfig.load(None, **SMALL), col, MonotonicClock())
    try:
        w.submit(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact)))
        col.wait(1)
        w.submit(LoadWeights(id=2, model_id=0, gpu=0))
        col.wait(2)
        yield w, dev, col
    finally:
        dev.release.set()
        w.close()


def test_evict_during_inference_gives_84(gated):
    w, dev, col = gated
    w.submit(Infer(id=3, model_id=0, gpu=0, batch_size=4))
    assert dev.started.wait(30)
    w.submit(EvictWeights(id=4, model_id=0, gpu=0))
    assert col.wait(4).ok                       # the evict does not wait for the inference
    dev.release.set()
    r = col.wait(3)
    assert r.status == Status.EXEC_CONCURRENT_WEIGHTS_MODIFICATION and "evicted" in r.message
    assert w.check_consistency() == [] and w.state()["gpus"][0]["free_pages"] == 3


def test_rehearsing_the_end_of_an_exec_changes_nothing(gated, mlp_artifact):
    """ExecTask.prepare(rehearse=True), run while the exec still runs (as CUDADevice.wait_exec runs it, with time
    to spare), leaves no trace: pools, actions in flight and results delivered are as before, and the result
    that comes out is the exec's own, once."""
    from workbench.worker.base import ExecTask
    w, dev, col = gated
    x = np.random.default_rng(3).standard_normal((4, 128)).astype(np.float32)
    w.submit(Infer(id=3, model_id=0, gpu=0, batch_size=4, inputs=(x,)))
    assert dev.started.wait(30)
    task = w.gpus[0].executors["exec"].busy
    assert isinstance(task, ExecTask) and task.action.id == 3

    def seen():
        return (w.state()["gpus"][0], w.gpus[0].workspace.allocations, dict(w.outstanding), w.results_delivered,
                len(col.results))
    before = seen()
    assert before[0]["workspace_pool_used"] > 0 and 3 in before[2]
    task.prepare(True)
    pending = dict(task.result.__dict__)
    task.prepare(True)
    assert seen() == before
    assert pending["outputs"] is None and pending["sent"] == 0 and pending["id"] == 3
    dev.release.set()
    r = col.wait(3)
    assert r.ok, r.message
    np.testing.assert_allclose(r.outputs[0], reference(mlp_artifact, x), rtol=1e-4, atol=1e-5)
    assert r.sent >= r.exec.end > 0 and not col.dupes
    assert w.check_consistency() == [] and w.in_flight() == 0


def test_cpu_config_larger_than_memory_is_refused():
    with pytest.raises(ConfigError, match="lower weights_cache_size"):
        CPUWorker(WorkerConfig.load(None, weights_cache_size="100 TiB"))


# --------------------------------------------------------------------------- random sequences, and agreement
op = st.tuples(st.sampled_from(["load", "load", "evict", "infer", "infer", "infer", "clear"]),
               st.integers(0, 3), st.integers(0, 20))


def to_actions(ops, path):
    out = [LoadModelFromDisk(id=0, model_id=0, path=path, copies=3)]
    for i, (kind, m, b) in enumerate(ops, start=1):
        if kind == "load":
            out.append(LoadWeights(id=i, model_id=m, gpu=0))
        elif kind == "evict":
            out.append(EvictWeights(id=i, model_id=m, gpu=0))
        elif kind == "clear":
            out.append(ClearCache(id=i))
        else:
            x = np.full((b, 128), 0.5, np.float32) if 0 < b <= 16 else None
            out.append(Infer(id=i, model_id=m, gpu=0, batch_size=b, inputs=None if x is None else (x,)))
    return out


def run_one_by_one(submit, wait, actions):
    statuses = []
    for a in actions:
        submit(a)
        statuses.append(wait(a.id).status)
    return statuses


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=12))
def test_random_sequences_cpu_and_emulated_agree(mlp_artifact, ops):
    """Every action answered once, the cache consistent, and the emulated worker (same artifact, durations
    from the profile) gives the same statuses as the real CPU worker for the same sequence."""
    actions = to_actions(ops, str(mlp_artifact))
    col = Collector()
    cpu = CPUWorker(WorkerConfig.load(None, **SMALL).replace(weights_cache_size=32 * 2**20), col)  # 2 pages
    try:
        cpu_statuses = run_one_by_one(cpu.submit, col.wait, actions)
        assert cpu.check_consistency() == [] and cpu.in_flight() == 0 and not col.dupes
    finally:
        cpu.close()
    clock = VirtualClock()
    emu_results = {}
    emu = EmulatedWorker(clock, 1, "h200", WorkerConfig.load(None, **SMALL).replace(weights_cache_size=32 * 2**20),
                         lambda r: emu_results.__setitem__(r.id, r))

    def emu_wait(i):
        clock.run()
        return emu_results[i]
    emu_statuses = run_one_by_one(emu.submit, emu_wait, actions)
    assert emu.check_consistency() == []
    assert cpu_statuses == emu_statuses


def rss() -> int:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_evict_many_times_keeps_memory_flat(cpu, mlp_artifact):
    cpu.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact)))
    ids = iter(range(10, 10**9))

    def cycle(n):
        for _ in range(n):
            assert cpu.do(LoadWeights(id=next(ids), model_id=0, gpu=0)).ok
            assert cpu.do(EvictWeights(id=next(ids), model_id=0, gpu=0)).ok
    cycle(200)                      # warm up allocators
    before = rss()
    cycle(3000)
    grown = rss() - before
    assert grown < 4 * 2**20, f"host memory grew {grown / 2**20:.1f} MiB over 3000 load/evict"
    assert cpu.check_consistency() == [] and cpu.state()["gpus"][0]["used_pages"] == 0


def test_measurements_json_feeds_load_model_results(cpu, mlp_artifact, tmp_path):
    from workbench.worker.measurements import read_measurements, write_measurements
    art = tmp_path / "measured"
    shutil.copytree(mlp_artifact, art)
    write_measurements(art, "test", 12_345, {1: [100, 110, 120], 16: [500, 520, 900]})
    m = read_measurements(art)
    assert m.weights_load_ns == 12_345 and m.exec[1].p50_ns == 110 and m.exec[16].samples_ns == (500, 520, 900)
    r = cpu.do(LoadModelFromDisk(id=1, model_id=0, path=str(art), max_exec_duration=600))
    assert r.weights_load_ns == 12_345 and r.batch_sizes == (1, 2, 4, 8, 16)
    assert r.exec_ns == (110, 0, 0, 0, 520)
    r = cpu.do(LoadModelFromDisk(id=2, model_id=5, path=str(art), max_batch_size=4))
    assert r.batch_sizes == (1, 2, 4)
    # the emulated worker draws its durations from the same file
    clock = VirtualClock()
    out = {}
    emu = EmulatedWorker(clock, 1, "h200", WorkerConfig.load(None, **SMALL), lambda r: out.__setitem__(r.id, r))
    for a in (LoadModelFromDisk(id=1, model_id=0, path=str(art)), LoadWeights(id=2, model_id=0, gpu=0),
              Infer(id=3, model_id=0, gpu=0, batch_size=9)):
        emu.submit(a)
        clock.run()
    assert out[2].timing.duration == pytest.approx(12_345, rel=0.1)
    assert out[3].exec.duration in (500, 520, 900)


def test_inputs_off_the_fast_path_take_the_full_check(cpu, mlp_artifact):
    """Inputs that are not exactly a tuple of plain arrays of the precomputed signature are judged by the full
    check: accepted when it accepts them (same outputs), refused with its status otherwise; results are the
    same InferResult objects either way."""
    from workbench.contract import InferResult, encode
    cpu.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact)))
    cpu.do(LoadWeights(id=2, model_id=0, gpu=0))
    x = np.random.default_rng(3).standard_normal((3, 128)).astype(np.float32)
    ref = cpu.do(Infer(id=10, model_id=0, batch_size=3, inputs=(x,)))      # padded to batch 4
    assert ref.ok and type(ref) is InferResult and ref.outputs[0].shape == (3, 10)
    np.testing.assert_allclose(ref.outputs[0], reference(mlp_artifact, x), rtol=1e-4, atol=1e-5)
    rebuilt = InferResult(**{k: getattr(ref, k) for k in ref.__dataclass_fields__})
    assert encode(rebuilt) == encode(ref)
    for i, inputs in enumerate(([x], (x.view(np.matrix),))):               # a list; an ndarray subclass
        r = cpu.do(Infer(id=20 + i, model_id=0, batch_size=3, inputs=inputs))
        assert r.ok, r.message
        np.testing.assert_array_equal(r.outputs[0], ref.outputs[0])
    bad = {30: ((x.tolist(),), Status.COPY_INPUT_INVALID_INPUT), 31: ((x, x), Status.COPY_INPUT_INVALID_INPUT),
           32: ((x[:2],), Status.COPY_INPUT_BAD_SIZES), 33: ((x.astype(np.float64),), Status.COPY_INPUT_INVALID_INPUT)}
    for i, (inputs, status) in bad.items():
        r = cpu.do(Infer(id=i, model_id=0, batch_size=3, inputs=inputs))
        assert r.status == status, (i, r.status, r.message)
    assert cpu.check_consistency() == []
