"""ProcessWorker: a real CPUWorker in its own executor process, with a real TVM-compiled mlp: same results as
the in-process worker, malformed actions answered, a kill -9 turned into one error per action in flight and a
clean restart, the child dying with its parent, nothing leaked after close()."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from workbench.contract import (ActionType, ClearCache, ClearCacheResult, ErrorResult, EvictWeights,
                                EvictWeightsResult, GetWorkerState, GetWorkerStateResult, Infer, InferResult,
                                LoadModelFromDisk, LoadModelFromDiskResult, LoadWeights, LoadWeightsResult, Status,
                                Timing, decode, encode)
from workbench.worker.config import WorkerConfig
from workbench.worker.cpu import CPUWorker
from workbench.worker.host import (compact_infer, compact_infer_result, fast_decode, fast_encode,
                                   infer_from_compact, infer_result_from_compact)
from workbench.worker.process import ProcessWorker, WorkerProcessError, _Flight, start_worker
from result_collector import Collector

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(weights_cache_size="48 MiB", io_pool_size="8 MiB", workspace_pool_size="8 MiB",
             host_io_pool_size="8 MiB")


def config() -> WorkerConfig:
    return WorkerConfig.load(None, **SMALL)


@pytest.fixture(scope="session")
def mlp_artifact(tmp_path_factory):
    """The mlp compiled for the CPU at batch sizes 1, 2, 4 (shared by the process-worker test files)."""
    out = tmp_path_factory.getbasetemp() / "process_worker_mlp_cpu"
    if not (out / "manifest.json").is_file():
        from workbench.models import zoo
        from workbench.models.compiler import compile_model
        compile_model(zoo.get("mlp"), out, target="cpu", batch_sizes=(1, 2, 4))
    return out


def attach(w, col):
    w.col = col
    w.do = lambda a: (w.submit(a), col.wait(a.id))[1]
    return w


@pytest.fixture
def proc_worker():
    col = Collector()
    w = attach(ProcessWorker("cpu", config(), col), col)
    yield w
    w.close()
    assert not col.dupes, f"actions answered twice: {[r.id for r in col.dupes]}"


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------------ codec
def samples():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = Timing(1, 2, 3)
    return [
        LoadModelFromDisk(id=1, model_id=3, path="/a/b", copies=2, max_batch_size=8, earliest=5, latest=9),
        LoadWeights(id=2, model_id=1, gpu=0, expected_duration=7), EvictWeights(id=3, model_id=1),
        Infer(id=4, model_id=1, batch_size=3, inputs=(x, x.astype(np.int64))), Infer(id=5, inputs=None),
        ClearCache(id=6), GetWorkerState(id=7),
        ErrorResult(id=8, action_type=ActionType.INFER, status=Status.EXEC_TOO_LATE, message="late", timing=t),
        LoadModelFromDiskResult(id=9, action_type=ActionType.LOAD_MODEL_FROM_DISK, model_ids=(0, 1),
                                batch_sizes=(1, 2), exec_ns=(5, 6), timing=t),
        LoadWeightsResult(id=10, action_type=ActionType.LOAD_WEIGHTS, timing=t),
        EvictWeightsResult(id=11, action_type=ActionType.EVICT_WEIGHTS, timing=t),
        InferResult(id=12, action_type=ActionType.INFER, copy_input=t, exec=Timing(4, 5, 6), outputs=(x,),
                    gpu_clock=1980),
        InferResult(id=13, action_type=ActionType.INFER, outputs=None),
        ClearCacheResult(id=14, action_type=ActionType.CLEAR_CACHE),
        GetWorkerStateResult(id=15, action_type=ActionType.GET_WORKER_STATE,
                             state={"gpus": [{"gpu": 0, "models": [1, 2]}], "device": "cpu"}),
    ]


@pytest.mark.parametrize("obj", samples(), ids=lambda o: type(o).__name__)
def test_fast_codec_gives_the_contracts_values(obj):
    d = encode(obj)
    assert fast_encode(obj) == d
    fast, slow = fast_decode(d), decode(d)
    assert type(fast) is type(slow) and encode(fast) == encode(slow)
    if hasattr(slow, "status"):
        assert type(fast.status) is Status and type(fast.action_type) is ActionType


@pytest.mark.parametrize("obj", [o for o in samples() if type(o) in (Infer, InferResult)], ids=lambda o: str(o.id))
def test_compact_forms_decode_to_what_the_dict_form_gives(obj):
    """The hot path's flat tuples (Infer with inputs, InferResult with outputs in shared memory) give objects
    equal to those of the dict form, with the same field types."""
    if type(obj) is Infer:
        v, arrays = compact_infer(obj), obj.inputs
        fast = infer_from_compact(v, arrays)
        slow = fast_decode({**fast_encode(obj, skip="inputs"), "inputs": list(arrays) if arrays else None})
    else:
        v, arrays = compact_infer_result(obj), obj.outputs
        fast = infer_result_from_compact(v, arrays)
        slow = fast_decode({**fast_encode(obj, skip="outputs"), "outputs": list(arrays) if arrays else None})
        assert type(fast.status) is Status and type(fast.action_type) is ActionType
        assert type(fast.exec) is Timing and fast.exec == obj.exec
    assert type(fast) is type(slow) and encode(fast) == encode(slow) == encode(obj)
    assert {k: type(x) for k, x in fast.__dict__.items()} == {k: type(x) for k, x in slow.__dict__.items()}


def test_compact_forms_are_only_for_the_exact_classes():
    class Sub(Infer):
        pass
    assert compact_infer(Sub(id=1)) is None and compact_infer(GetWorkerState(id=1)) is None
    assert compact_infer_result(ErrorResult(id=1, action_type=ActionType.INFER)) is None
    with pytest.raises(ValueError, match="compact Infer has 2 values"):
        infer_from_compact((1, 2), None)


def test_fast_decode_rejects_what_decode_rejects():
    d = encode(Infer(id=1))
    with pytest.raises(ValueError, match="unknown fields"):
        fast_decode({**d, "bogus": 1})
    with pytest.raises(ValueError, match="not an encoded action"):
        fast_decode({"__kind__": "Nope"})
    short = dict(d)
    del short["batch_size"]                     # missing fields take their defaults, as in decode
    assert fast_decode(short).batch_size == 1


# ------------------------------------------------------------------------------------------ equivalence
SEQUENCE_INPUTS = [np.random.default_rng(i).standard_normal((n, 128)).astype(np.float32)
                   for i, n in enumerate((1, 3, 4, 2))]


def run_sequence(w, path) -> list:
    """Load, weights, infers of several batch sizes, evict, infer without weights, state."""
    out = [w.do(LoadModelFromDisk(id=1, model_id=0, path=str(path), copies=2)),
           w.do(LoadWeights(id=2, model_id=1))]
    for i, x in enumerate(SEQUENCE_INPUTS):
        out.append(w.do(Infer(id=10 + i, model_id=1, batch_size=len(x), inputs=(x,))))
    out.append(w.do(Infer(id=20, model_id=1, batch_size=2, inputs=None)))     # generated inputs
    out.append(w.do(EvictWeights(id=21, model_id=1)))
    out.append(w.do(Infer(id=22, model_id=1, batch_size=1, inputs=(SEQUENCE_INPUTS[0],))))
    out.append(w.do(GetWorkerState(id=23)))
    return out


def test_same_results_as_the_in_process_worker(proc_worker, mlp_artifact):
    col = Collector()
    local = attach(CPUWorker(config(), col), col)
    try:
        want = run_sequence(local, mlp_artifact)
    finally:
        local.close()
    got = run_sequence(proc_worker, mlp_artifact)
    assert [(r.id, r.status) for r in got] == [(r.id, r.status) for r in want]
    assert got[-2].status == Status.EXEC_WEIGHTS_MISSING
    for g, w in zip(got, want):
        if isinstance(w, InferResult):
            assert len(g.outputs) == 1 and g.outputs[0].shape == w.outputs[0].shape
            np.testing.assert_array_equal(g.outputs[0], w.outputs[0])
            assert g.exec.duration > 0 and g.copy_input.end <= g.exec.begin
    assert got[0].model_ids == (0, 1) and got[0].batch_sizes == (1, 2, 4)
    state = got[-1].state
    assert state["device"] == "cpu" and state["gpus"][0]["models"] == [] and len(state["models"]) == 2
    assert proc_worker.num_gpus == 1 and proc_worker.in_flight() == 0


@pytest.mark.parametrize("shm_bytes", [0, 1024], ids=["no-shared-memory", "too-small-shared-memory"])
def test_arrays_that_do_not_fit_go_inline(mlp_artifact, shm_bytes):
    col = Collector()
    w = attach(ProcessWorker("cpu", config(), col, shm_bytes=shm_bytes), col)
    try:
        assert w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact))).ok
        assert w.do(LoadWeights(id=2, model_id=0)).ok
        x = SEQUENCE_INPUTS[2]                                   # 4 x 128 float32: 2 KiB, more than 1024
        r = w.do(Infer(id=3, model_id=0, batch_size=4, inputs=(np.asfortranarray(x),)))
        assert r.ok, r.message
    finally:
        w.close()
    col2 = Collector()
    ref = attach(CPUWorker(config(), col2), col2)
    try:
        ref.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact)))
        ref.do(LoadWeights(id=2, model_id=0))
        np.testing.assert_array_equal(r.outputs[0], ref.do(Infer(id=3, model_id=0, batch_size=4,
                                                                 inputs=(x,))).outputs[0])
    finally:
        ref.close()


def test_output_ring_wraps_and_overflows_inline(mlp_artifact):
    """40 infers in flight through a 4 KiB ring (16 results of 256 bytes): it wraps, fills (those results go
    inline) and every output is still right."""
    col = Collector()
    w = attach(ProcessWorker("cpu", config(), col, shm_bytes=4096), col)
    try:
        w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact)))
        w.do(LoadWeights(id=2, model_id=0))
        xs = [np.full((4, 128), i / 40, np.float32) for i in range(40)]
        for i, x in enumerate(xs):
            w.submit(Infer(id=100 + i, model_id=0, batch_size=4, inputs=(x,)))
        got = col.wait(*range(100, 140))
        one = w.do(Infer(id=200, model_id=0, batch_size=1, inputs=(xs[7][:1],)))
    finally:
        w.close()
    assert all(r.ok for r in got), [r.message for r in got if not r.ok]
    for x, r in zip(xs, got):
        assert r.outputs[0].shape == (4, 10)
        np.testing.assert_array_equal(r.outputs[0][0], r.outputs[0][3])   # identical rows in, identical out
    np.testing.assert_array_equal(one.outputs[0][0], got[7].outputs[0][0])
    assert len({r.outputs[0][0, 0] for r in got}) > 30                     # not one buffer seen 40 times


# ---------------------------------------------------------------------------------------- bad actions
def test_malformed_actions_get_error_results(proc_worker, mlp_artifact):
    w = proc_worker
    assert w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact))).ok
    assert w.do(LoadWeights(id=2, model_id=0)).ok
    cases = {
        3: (Infer(id=3, model_id=0, gpu=3), Status.INVALID_GPU),
        4: (LoadWeights(id=4, model_id="zero"), Status.INVALID_ACTION),
        5: (Infer(id=5, model_id=0, batch_size=1, inputs=(np.zeros((1, 128), np.float64),)),
            Status.COPY_INPUT_INVALID_INPUT),
        6: (Infer(id=6, model_id=0, batch_size=2, inputs=(np.zeros((1, 128), np.float32),)),
            Status.COPY_INPUT_BAD_SIZES),
        7: (Infer(id=7, model_id=0, batch_size=1, inputs=[[1.0] * 128]), Status.COPY_INPUT_INVALID_INPUT),
        8: (LoadModelFromDisk(id=8, model_id=5, path="/nonexistent/model"), Status.INVALID_PATH),
        9: (LoadModelFromDisk(id=9, model_id=6, path=lambda: 0), Status.INVALID_ACTION),   # cannot be sent
    }
    for a, _ in cases.values():
        w.submit(a)
    got = w.col.wait(*cases)
    for r, (a, status) in zip(got, cases.values()):
        assert isinstance(r, ErrorResult) and r.status == status and r.message, (a, r)
    assert "cannot be sent" in w.col.results[9].message

    # an action id already in flight is refused without disturbing the first one
    late = time.monotonic_ns() + 300_000_000
    w.submit(GetWorkerState(id=50, earliest=late))
    w.submit(ClearCache(id=50))
    with w.col.cv:
        assert w.col.cv.wait_for(lambda: 50 in w.col.results, 10)
        first = w.col.results.pop(50)
    assert first.status == Status.INVALID_ACTION and "already in flight" in first.message
    second = w.col.wait(50)
    assert second.ok and isinstance(second, GetWorkerStateResult)
    w.col.dupes.clear()

    # a frame the executor cannot decode (not made by encode) is answered with its id
    with w._send_lock, w._lock:
        w._flights[60] = _Flight(Infer(id=60), w._gen.n)
        w._gen.chan.send(("a", {"__kind__": "Infer", "id": 60, "bogus": 1}, None))
        w._flights[62] = _Flight(ClearCache(id=62), w._gen.n)
        w._gen.chan.send(("a", encode(ClearCacheResult(id=62, action_type=ActionType.CLEAR_CACHE)), None))
    r = w.col.wait(60)
    assert r.status == Status.INVALID_ACTION and "malformed action" in r.message and "bogus" in r.message
    r = w.col.wait(62)
    assert r.status == Status.INVALID_ACTION and "ClearCacheResult is not an action" in r.message
    assert w.do(GetWorkerState(id=61)).ok                    # and the executor carries on
    with pytest.raises(TypeError, match="contract Action"):
        w.submit({"id": 1})
    assert w.in_flight() == 0


# --------------------------------------------------------------------------------------------- crashes
def test_kill_9_gives_one_error_per_action_in_flight_then_restarts(mlp_artifact):
    col = Collector()
    restarts = []
    w = attach(ProcessWorker("cpu", config(), col, on_restart=restarts.append), col)
    try:
        assert w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact))).ok
        assert w.do(LoadWeights(id=2, model_id=0)).ok
        x = SEQUENCE_INPUTS[0]
        later = time.monotonic_ns() + 10_000_000_000           # queued in the executor when it dies
        queued = list(range(10, 20))
        for i in queued:
            w.submit(Infer(id=i, model_id=0, batch_size=1, inputs=(x,), earliest=later))
        w.submit(LoadModelFromDisk(id=20, model_id=7, path=str(mlp_artifact), earliest=later))
        old = w.pid
        assert w.do(GetWorkerState(id=21)).ok                  # every action above has reached the executor
        os.kill(old, signal.SIGKILL)
        racing = list(range(30, 35))                           # submitted while it dies and restarts
        for i in racing:
            w.submit(GetWorkerState(id=i))
        got = col.wait(*queued, 20, *racing, timeout=120)
        for r in got[:len(queued) + 1]:
            assert r.status == Status.RUNTIME_ERROR, r
            assert "executor process died" in r.message and "SIGKILL" in r.message and str(old) in r.message
        assert all(r.ok or r.status == Status.RUNTIME_ERROR for r in got[len(queued) + 1:])
        deadline = time.monotonic() + 60
        while not restarts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restarts == [1] and w.restarts == 1 and w.pid != old and w.alive
        assert not alive(old)
        state = w.do(GetWorkerState(id=40)).state
        assert state["models"] == []                           # a fresh executor: models must be loaded again
        assert w.do(LoadModelFromDisk(id=41, model_id=0, path=str(mlp_artifact))).ok
        assert w.do(LoadWeights(id=42, model_id=0)).ok
        r = w.do(Infer(id=43, model_id=0, batch_size=1, inputs=(x,)))
        assert r.ok and r.outputs[0].shape == (1, 10)
        assert "restarts=1" in repr(w)
    finally:
        w.close()
    assert not col.dupes and w.in_flight() == 0


def test_no_restart_after_max_restarts(mlp_artifact):
    col = Collector()
    w = attach(ProcessWorker("cpu", config(), col, max_restarts=0), col)
    try:
        w.submit(GetWorkerState(id=1, earliest=time.monotonic_ns() + 10_000_000_000))
        assert w.do(ClearCache(id=2)).ok
        os.kill(w.pid, signal.SIGKILL)
        r = col.wait(1)
        assert r.status == Status.RUNTIME_ERROR and "not restarted" in r.message
        r = w.do(GetWorkerState(id=3))
        assert r.status == Status.RUNTIME_ERROR and "max_restarts=0" in r.message
        assert w.restarts == 0 and not w.alive
    finally:
        w.close()
    assert not col.dupes


# --------------------------------------------------------------------------------------- clock, lifetime
def test_child_timestamps_are_on_the_sessions_clock(proc_worker):
    for i in range(5):
        t0 = time.monotonic_ns()
        r = proc_worker.do(GetWorkerState(id=i))
        t1 = time.monotonic_ns()
        assert t0 <= r.received <= r.sent <= t1, (t0, r.received, r.sent, t1)


PARENT = textwrap.dedent("""
    import sys, time
    from workbench.worker.config import WorkerConfig
    from workbench.worker.process import ProcessWorker
    w = ProcessWorker("cpu", WorkerConfig.load(None, weights_cache_size="16 MiB", io_pool_size="1 MiB",
                                                workspace_pool_size="1 MiB", host_io_pool_size="1 MiB"))
    print(w.pid, flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)          # without close()
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["kill-9", "exit"])
def test_the_executor_dies_with_its_parent(how, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, env=env, text=True)
    try:
        child = int(parent.stdout.readline())
        assert child != parent.pid
        if how == "kill-9":
            assert alive(child)
            parent.kill()
        parent.wait(60)
        assert wait_gone(child), f"executor {child} outlived its parent ({how})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_close_answers_queued_actions_and_leaves_nothing(mlp_artifact):
    threads, fds = set(threading.enumerate()), _fds()
    col = Collector()
    w = attach(ProcessWorker("cpu", config(), col), col)
    pid = w.pid
    w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact)))
    later = time.monotonic_ns() + 30_000_000_000
    for i in range(10, 15):
        w.submit(Infer(id=i, model_id=0, batch_size=1, earliest=later))
    w.close()
    got = col.wait(*range(10, 15), timeout=1)
    assert all(r.status == Status.SHUTTING_DOWN for r in got)
    assert not alive(pid)
    assert set(threading.enumerate()) - threads == set()
    assert _fds() - fds == set(), f"file descriptors left open: {_fds() - fds}"
    w.submit(GetWorkerState(id=99))                          # after close: answered, not sent
    assert col.results[99].status == Status.SHUTTING_DOWN
    w.close()                                                 # idempotent
    assert not col.dupes and "closed" in repr(w)


def test_a_child_that_cannot_start_fails_clearly():
    threads, fds = set(threading.enumerate()), _fds()
    # the child sees no CUDA device (also on the H200), so the failure path is exercised everywhere
    with pytest.raises(WorkerProcessError, match="cuda executor process failed to start.*CPUWorker or Emulated"):
        ProcessWorker("cuda", config(), env={"CUDA_VISIBLE_DEVICES": ""})
    assert set(threading.enumerate()) - threads == set() and _fds() - fds == set()
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        ProcessWorker("tpu", config())


def test_in_process_mode_is_labelled(mlp_artifact):
    w = start_worker("cpu", config(), isolated=False)
    try:
        assert isinstance(w, CPUWorker) and not getattr(w, "isolated", False)
    finally:
        w.close()
    p = start_worker("cpu", config())
    try:
        assert isinstance(p, ProcessWorker) and p.isolated and "isolated" in repr(p) and str(p.pid) in repr(p)
    finally:
        p.close()


def test_close_from_on_result_and_close_during_a_restart():
    threads = set(threading.enumerate())
    # close() called by the result callback itself: the supervisor finishes it
    col = Collector()
    w = None

    def on(r):
        col(r)
        if r.id == 1:
            w.close()
    w = ProcessWorker("cpu", config(), on)
    pid = w.pid
    later = time.monotonic_ns() + 30_000_000_000
    w.submit(GetWorkerState(id=2, earliest=later))
    w.submit(GetWorkerState(id=1))
    assert col.wait(1).ok and col.wait(2).status == Status.SHUTTING_DOWN
    assert wait_gone(pid)
    deadline = time.monotonic() + 30
    while "closed" not in repr(w) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "closed" in repr(w) and not col.dupes

    # close() while a killed executor is being replaced: every action answered once, nothing left running
    col = Collector()
    w = attach(ProcessWorker("cpu", config(), col), col)
    old = w.pid
    w.submit(GetWorkerState(id=10, earliest=later))
    assert w.do(ClearCache(id=11)).ok
    os.kill(old, signal.SIGKILL)
    time.sleep(0.05)
    w.submit(GetWorkerState(id=12))
    w.close()
    r10, r12 = col.wait(10, 12)
    assert r10.status in (Status.RUNTIME_ERROR, Status.SHUTTING_DOWN)
    assert r12.status in (Status.RUNTIME_ERROR, Status.SHUTTING_DOWN) or r12.ok
    assert not col.dupes and not alive(old) and (w.pid == old or wait_gone(w.pid))
    time.sleep(0.2)
    assert set(threading.enumerate()) - threads == set()


def test_cpus_confine_every_thread_of_the_executor_process(mlp_artifact):
    allowed = sorted(os.sched_getaffinity(0))
    want = [allowed[-1]]
    col = Collector()
    w = attach(ProcessWorker("cpu", config(), col, cpus=want), col)
    try:
        assert w.do(LoadModelFromDisk(id=1, model_id=0, path=str(mlp_artifact))).ok   # TVM's threads started
        assert w.do(LoadWeights(id=2, model_id=0, gpu=0)).ok
        assert w.do(Infer(id=3, model_id=0, gpu=0, batch_size=1)).ok
        assert w.info["cpus"] == want
        tasks = list(Path(f"/proc/{w.pid}/task").iterdir())
        assert len(tasks) > 1
        for t in tasks:
            assert os.sched_getaffinity(int(t.name)) == set(want), f"thread {t.name} not confined"
    finally:
        w.close()
    with pytest.raises(ValueError, match=r"cpus=\[100000\].*CPU numbers of this machine"):
        ProcessWorker("cpu", config(), Collector(), cpus=[100000])


def test_no_restart_when_close_gave_up_waiting_before_the_executor_died():
    # close(timeout) that stops waiting for the supervisor kills the executor and marks the worker "closed";
    # the supervisor, seeing the death only then, must not take it for a crash and start a new executor.
    # The interleaving, forced: the state is "closed" before the executor dies.
    threads = set(threading.enumerate())
    restarted = []
    w = ProcessWorker("cpu", config(), Collector(), on_restart=restarted.append)
    old = w.pid
    with w._lock:
        w._state = "closed"
    os.kill(old, signal.SIGKILL)
    w._supervisor.join(30)
    assert not w._supervisor.is_alive(), "the supervisor went on after the worker was closed"
    assert restarted == [] and w.restarts == 0 and w.pid == old and wait_gone(old)
    w._finalize()                      # what close() does after giving up: release everything
    assert set(threading.enumerate()) - threads == set()
