"""Bug hunt in the worker (review): resources tied to the worker's lifetime, exactly one result per action on
every path, the emulated worker's lean path agreeing with its general path on failures, config validation."""
import gc
import json
import shutil
import weakref

import numpy as np
import pytest

from workbench.clock import VirtualClock
from workbench.contract import (ClearCache, GetWorkerState, Infer, InferResult, LoadModelFromDisk, LoadWeights,
                                Status)
from workbench.worker.config import ConfigError, WorkerConfig
from workbench.worker.cpu import CPUWorker
from workbench.worker.emulated import EmulatedWorker
from workbench.worker.profile import Profile
from result_collector import Collector

MS = 1_000_000
SMALL = dict(weights_cache_size="48 MiB", io_pool_size="8 MiB", workspace_pool_size="8 MiB",
             host_io_pool_size="8 MiB")
PROFILE = Profile.load("h200")


@pytest.fixture(scope="session")
def mlp_artifact(tmp_path_factory):
    """The mlp compiled for the CPU at batch sizes 1, 2, 4 (the same directory test_worker_process.py uses, so
    one session compiles it once)."""
    out = tmp_path_factory.getbasetemp() / "process_worker_mlp_cpu"
    if not (out / "manifest.json").is_file():
        from workbench.models import zoo
        from workbench.models.compiler import compile_model
        compile_model(zoo.get("mlp"), out, target="cpu", batch_sizes=(1, 2, 4))
    return out


class Emu:
    """An emulated worker on a VirtualClock (lean or general path) recording every result in arrival order."""

    def __init__(self, lean, **cfg):
        self.clock = VirtualClock()
        self.got = []
        self.w = EmulatedWorker(self.clock, 1, PROFILE, WorkerConfig.load(None, **{**SMALL, **cfg}),
                                self.got.append, lean=lean)
        assert (self.w._lean is not None) == lean

    def by_id(self, i):
        return [r for r in self.got if r.id == i]

    def do(self, a):
        self.w.submit(a)
        self.clock.run()
        return self.by_id(a.id)[-1]


# ------------------------------------------------------------------------------ one result per action
@pytest.mark.parametrize("lean", [False, True])
def test_malformed_action_reusing_an_in_flight_id_does_not_take_its_result(lean):
    """A malformed action (invalid gpu) whose id is that of an action still queued is answered on its own
    (untracked, as any duplicate id): the queued action keeps its place in `outstanding` and gets its own
    result. It used to overwrite the entry, so the queued Infer's result was dropped as a 'second result'."""
    e = Emu(lean)
    assert e.do(LoadModelFromDisk(id=1, model_id=0, path="profile:mlp")).ok
    assert e.do(LoadWeights(id=2, model_id=0)).ok
    t = e.clock.now()
    e.w.submit(Infer(id=5, model_id=0, earliest=t + 10 * MS))
    e.w.submit(LoadWeights(id=5, model_id=0, gpu=7))            # malformed (no gpu 7) and a duplicate id
    e.clock.run_until(t + MS)
    assert [r.status for r in e.by_id(5)] == [Status.INVALID_GPU]
    assert e.w.in_flight() == 1, "the queued Infer is no longer tracked"
    e.clock.run()
    rs = e.by_id(5)
    assert len(rs) == 2 and type(rs[1]) is InferResult and rs[1].ok
    assert e.w.in_flight() == 0 and e.w.check_consistency() == []


@pytest.mark.parametrize("lean", [False, True])
def test_close_answers_a_queued_duplicate_id_once_and_its_original_once(lean):
    """close() while a duplicate-id rejection is still queued: the original action and the duplicate each get
    one result. The duplicate's SHUTTING_DOWN used to be tracked, take the original's slot, and one of the two
    was dropped as a 'second result'."""
    e = Emu(lean)
    assert e.do(LoadModelFromDisk(id=1, model_id=0, path="profile:mlp")).ok
    t = e.clock.now()
    e.w.submit(GetWorkerState(id=5, earliest=t + 10 * MS))
    e.w.submit(GetWorkerState(id=5))                            # duplicate id: its rejection is queued
    e.w.close()
    assert [r.status for r in e.by_id(5)] == [Status.SHUTTING_DOWN, Status.SHUTTING_DOWN]
    e.clock.run()
    assert len(e.by_id(5)) == 2 and e.w.in_flight() == 0 and e.w.check_consistency() == []


# ------------------------------------------------------------------- lean path == general path on failures
def damaged_copy(src, dst):
    """An artifact whose manifest is valid JSON but lacks a batch's "file"."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["batches"]["1"]["file"]
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_a_manifest_field_missing_is_an_invalid_path_naming_the_manifest(mlp_artifact, tmp_path):
    """Artifact.open raised KeyError for it (workers answered RUNTIME_ERROR); it is the artifact's problem."""
    from workbench.models.artifact import Artifact, ArtifactError
    bad = damaged_copy(mlp_artifact, tmp_path / "bad")
    with pytest.raises(ArtifactError, match=r"manifest\.json is inconsistent \(KeyError: 'file'\)"):
        Artifact.open(bad)
    for lean in (False, True):
        r = Emu(lean).do(LoadModelFromDisk(id=1, model_id=0, path=str(bad)))
        assert r.status == Status.INVALID_PATH and "manifest.json is inconsistent" in r.message


@pytest.fixture
def open_fails(monkeypatch):
    """Fault injection: the emulated device's open_model fails with an unexpected exception (a worker bug, or
    the disk failing mid-read) for artifacts under a directory named "bad"."""
    from workbench.worker.emulated import EmulatedDevice
    real = EmulatedDevice.open_model

    def open_model(self, action, now):
        if "/bad" in action.path:
            raise KeyError("file")
        return real(self, action, now)
    monkeypatch.setattr(EmulatedDevice, "open_model", open_model)


@pytest.mark.parametrize("lean", [False, True])
def test_load_model_whose_open_raises_is_answered_runtime_error(lean, mlp_artifact, tmp_path, open_fails):
    """The general path (ClockExecutor) turns an exception in a task's run into RUNTIME_ERROR; the lean path ran
    LoadModelFromDisk's run unguarded, so the exception escaped clock.run() and the action was never answered."""
    bad = shutil.copytree(mlp_artifact, tmp_path / "bad")
    e = Emu(lean)
    r = e.do(LoadModelFromDisk(id=1, model_id=0, path=str(bad)))
    assert r.status == Status.RUNTIME_ERROR and "KeyError" in r.message
    assert e.w.in_flight() == 0 and e.w.models == {} and e.w.check_consistency() == []
    # the worker goes on: the disk queue is free, the ids are free
    assert e.do(LoadModelFromDisk(id=2, model_id=0, path=str(mlp_artifact))).ok
    assert e.do(LoadWeights(id=3, model_id=0)).ok and e.do(Infer(id=4, model_id=0, batch_size=3)).ok


def test_lean_and_general_paths_give_the_same_results_for_a_failing_load(mlp_artifact, tmp_path, open_fails):
    bad = shutil.copytree(mlp_artifact, tmp_path / "bad")
    runs = []
    for lean in (False, True):
        e = Emu(lean)
        for i, a in enumerate([LoadModelFromDisk(id=1, model_id=0, path=str(bad)),
                               LoadModelFromDisk(id=2, model_id=0, path=str(mlp_artifact)),
                               LoadWeights(id=3, model_id=0), Infer(id=4, model_id=0, batch_size=2)]):
            e.clock.call_at(i * MS, e.w.submit, a)
        e.clock.run()
        runs.append((e.got, e.w.state(), e.w.results_delivered))
    assert runs[0] == runs[1]


def test_measurements_with_infinity_or_negative_durations_count_as_damaged(mlp_artifact, tmp_path):
    """A damaged measurements.json means no measurements (as in Clockwork), never a crash (Infinity made
    int() raise OverflowError) nor negative durations that would run the emulated worker's time backwards."""
    from workbench.worker.measurements import FILE, read_measurements
    good = {"format": 1, "weights_load_ns": 1000, "exec_ns": {"1": 5000}}
    for bad in ('{"format": 1, "weights_load_ns": Infinity, "exec_ns": {"1": 5000}}',
                json.dumps({**good, "exec_ns": {"1": -5}}), json.dumps({**good, "weights_load_ns": -1}),
                json.dumps({**good, "exec_samples_ns": {"1": [5000, -3]}})):
        (tmp_path / FILE).write_text(bad)
        assert read_measurements(tmp_path) is None, bad
    (tmp_path / FILE).write_text(json.dumps(good))
    m = read_measurements(tmp_path)
    assert m is not None and m.weights_load_ns == 1000 and m.exec[1].p50_ns == 5000


# ------------------------------------------------------------------------ resources end with the worker
def cpu_worker(**cfg):
    col = Collector()
    w = CPUWorker(WorkerConfig.load(None, **{**SMALL, **cfg}), col)
    w.col = col
    w.do = lambda a: (w.submit(a), col.wait(a.id))[1]
    return w


def test_close_releases_the_models_host_weights_and_kernels(mlp_artifact):
    """close() frees what LoadModelFromDisk took on the host (weights read once per model, loaded kernels; on
    CUDA page-locked memory) even while the closed worker object is still referenced, as it frees the cache."""
    w = cpu_worker()
    assert w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact), copies=2)).ok
    assert w.do(LoadWeights(id=2, model_id=1)).ok
    host = weakref.ref(w.entries[0].handle.host_weights)
    w.close()
    gc.collect()
    assert host() is None, "the model's host weights outlive close()"
    assert w.device.arenas == [] and w.state()["gpus"][0]["used_pages"] == 0
    assert w.submit(Infer(id=3, model_id=1)) is None and w.col.wait(3).status == Status.SHUTTING_DOWN
    assert not w.col.dupes


def test_close_releases_memory_even_when_the_telemetry_cannot_be_written(mlp_artifact, tmp_path):
    """A telemetry write that fails at close (log_dir is a file) still raises, naming the path, but no longer
    skips freeing the weights cache and the device's arenas (a second close() returns at once, so nothing
    would ever free them)."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    w = cpu_worker(telemetry=True, log_dir=str(not_a_dir))
    assert w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact))).ok
    assert w.do(LoadWeights(id=2, model_id=0)).ok
    with pytest.raises(OSError, match="file"):
        w.close()
    assert w.device.arenas == [] and w.device.io_arenas == []
    assert w.state()["gpus"][0]["used_pages"] == 0 and w.check_consistency() == []
    w.close()                                                   # idempotent


# ------------------------------------------------------------------------------------- validation gaps
def test_page_size_must_be_a_multiple_of_the_tensor_alignment():
    """A page size that is not a multiple of 256 was accepted, but no artifact can be compiled for it (pack()
    refuses it) and the CPU worker's pages would not be 256-byte aligned: refused, naming the key and a fix."""
    with pytest.raises(ConfigError, match=r"page_size = 1000 is not a multiple of 256.*use 1024"):
        WorkerConfig.load(None, page_size=1000, weights_cache_size="1 MiB")
    assert WorkerConfig.load(None, page_size="64 KiB", weights_cache_size="1 MiB").num_pages == 16


def broken_profile(edit):
    d = PROFILE.to_json()
    edit(d)
    return d


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["models"]["mlp"].__setitem__("exec", {"1": {"p50_ns": -5_000_000, "sigma": 0.0}}),
     r"model 'mlp' exec batch 1 p50_ns/samples_ns = -5000000 must be >= 0"),
    (lambda d: d["models"]["mlp"].__setitem__("exec", {"1": {"p50_ns": 10, "samples_ns": [10, -3]}}),
     r"samples_ns = -3"),
    (lambda d: d["models"]["mlp"].__setitem__("exec", {"0": {"p50_ns": 10}}), r"exec batch = 0 must be >= 1"),
    (lambda d: d["models"]["mlp"].__setitem__("weights_load_ns", -1), r"weights_load_ns = -1"),
    (lambda d: d["models"]["resnet50"].__setitem__("runs", [[0, 2], [3, 4]]), r"'resnet50'.*do not partition"),
    (lambda d: d.__setitem__("h2d_bytes_per_s", 0), r"h2d_bytes_per_s = 0.0 must be > 0"),
    (lambda d: d.__setitem__("copy_latency_ns", -10), r"copy_latency_ns = -10 must be >= 0"),
])
def test_profile_values_that_cannot_be_emulated_are_refused(edit, match):
    from workbench.worker.profile import ProfileError
    with pytest.raises(ProfileError, match=match):
        Profile.from_json(broken_profile(edit), "p.json")



# ------------------------------------------------------------------------------------------ process worker
def test_process_worker_action_submitted_while_closing_does_not_untrack_one_in_flight():
    """submit() while the ProcessWorker is closing answers the new action SHUTTING_DOWN locally; it used to
    pop the flight of the action in flight with the same id, so that action's own answer from the executor was
    dropped as 'not in flight' (two actions with id 2, one result)."""
    import time
    from workbench.worker.process import ProcessWorker
    col = Collector()
    w = None

    def on(r):
        col(r)
        if r.id == 1:
            w.close()                       # from on_result: the supervisor finishes it; state is "closing"
            w.submit(GetWorkerState(id=2))  # id 2 is still queued in the executor
    w = ProcessWorker("cpu", WorkerConfig.load(None, **SMALL), on)
    w.submit(GetWorkerState(id=2, earliest=time.monotonic_ns() + 30_000_000_000))
    w.submit(GetWorkerState(id=1))
    col.wait(1, 2)
    deadline = time.monotonic() + 30
    while "closed" not in repr(w) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "closed" in repr(w)
    twos = [r for r in col.dupes if r.id == 2] + [col.results[2]]
    assert [r.status for r in twos] == [Status.SHUTTING_DOWN, Status.SHUTTING_DOWN], twos
    assert w.in_flight() == 0


def test_cpu_close_with_infers_queued_at_every_stage_answers_each_once_and_frees_the_pools(mlp_artifact):
    import time
    w = cpu_worker()
    assert w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact))).ok
    assert w.do(LoadWeights(id=2, model_id=0)).ok
    later = time.monotonic_ns() + 30_000_000_000
    x = np.ones((2, 128), np.float32)
    ids = list(range(10, 20))
    for i in ids[:5]:    # input copied (lead-in is 5 ms, so not yet), or exec queued far ahead
        w.submit(Infer(id=i, model_id=0, batch_size=2, inputs=(x,), earliest=later))
    for i in ids[5:]:    # eligible now: some run, some are queued behind them when close() comes
        w.submit(Infer(id=i, model_id=0, batch_size=4, inputs=(np.ones((4, 128), np.float32),)))
    w.close()
    got = w.col.wait(*ids, timeout=30)
    assert all(r.ok or r.status == Status.SHUTTING_DOWN for r in got)
    assert all(r.status == Status.SHUTTING_DOWN for r in got[:5])
    assert not w.col.dupes and w.in_flight() == 0 and w.check_consistency() == []
    assert w.host_io.used == 0 and w.gpus[0].io.used == 0 and w.gpus[0].workspace.used == 0


# ------------------------------------------------------------------------------ close with a task still running
@pytest.mark.slow
def test_close_keeps_memory_allocated_while_an_executor_is_still_running_a_task(tmp_path):
    """close() waits `timeout` s for each executor thread; one still running a task (here a CPU exec of ~1 s)
    must not have the weights cache and the model freed under it: the worker answers every action, warns, and
    keeps them. When the task ends, its late result is dropped (the action was answered SHUTTING_DOWN)."""
    import threading
    import time
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    art = tmp_path / "mlp_b8192"
    compile_model(zoo.get("mlp"), art, target="cpu", batch_sizes=(8192,))
    col = Collector()
    w = CPUWorker(WorkerConfig.load(None, **{**SMALL, "io_pool_size": "64 MiB", "workspace_pool_size": "64 MiB",
                                             "host_io_pool_size": "64 MiB"}), col)
    w.submit(LoadModelFromDisk(id=1, model_id=0, path=str(art), max_batch_size=8192,
                                   max_exec_duration=10**12))
    assert col.wait(1).ok, col.results[1].message
    w.submit(LoadWeights(id=2, model_id=0, gpu=0))
    assert col.wait(2).ok
    exec_ex = w.gpus[0].executors["exec"]
    w.submit(Infer(id=3, model_id=0, gpu=0, batch_size=8192))
    deadline = time.monotonic() + 30
    while exec_ex.busy is None and 3 not in col.results and time.monotonic() < deadline:
        time.sleep(0.001)
    assert exec_ex.busy is not None, "the exec never started"
    used = w.gpus[0].cache.used_pages
    with pytest.warns(RuntimeWarning, match="still running a task"):
        w.close(timeout=0.02)
    assert col.wait(3).status == Status.SHUTTING_DOWN
    assert w.gpus[0].cache.used_pages == used > 0, "the weights cache was freed under the running exec"
    assert w.models[0].entry is not None
    exec_ex._thread.join(60)                  # the exec ends on memory that is still there
    assert not exec_ex._thread.is_alive() and col.dupes == [] and col.results[3].status == Status.SHUTTING_DOWN
    assert [t for t in threading.enumerate() if t.name.startswith("worker-") and t.is_alive()] == []
