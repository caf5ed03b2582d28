"""`Session` against the real CPU worker (TVM-compiled mlp) and the emulated worker: loading, requests, workloads,
live widgets fed by the pump, bad input, and no leaked threads or memory across sessions."""
from __future__ import annotations

import gc
import os
import html
import resource
import threading
import time
import weakref

import numpy as np
import pytest

from workbench.models import zoo
from workbench.models.reference import reference_forward
from workbench.ui.artifacts import ModelNotFound
from workbench.ui.session import Session, SessionClosed, SessionError, cuda_devices
from workbench.ui.testing import CommRecorder

pytestmark = pytest.mark.slow


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.is_alive()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _infer_ok(session: Session, model, inputs=None, tries: int = 5):
    """The first request after a load may find no copy on the device yet (a cold start): retry a few times."""
    for _ in range(tries):
        out = session.infer(model, inputs, slo_ms=2000).result(timeout=30)
        if out.ok:
            return out
    return out


@pytest.fixture(scope="module")
def cpu():
    with Session(device="cpu", name="fixture") as s:
        s.load("mlp", copies=2)
        yield s


def test_load_infer_run_on_the_cpu_worker(cpu):
    assert cpu.device == "cpu" and cpu.target == "cpu"
    x = np.random.default_rng(0).standard_normal((1, 128)).astype("float32")
    out = _infer_ok(cpu, "mlp", x)
    assert out.ok, out
    expected = reference_forward("mlp", x, zoo.get("mlp").weights())
    np.testing.assert_allclose(out.outputs[0].reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
    run = cpu.run("closed_loop", models="mlp", duration_s=1.0, concurrency=2, slo_ms=100)
    assert run.wait(timeout=30) and run.done
    stats = run.stats()
    assert stats["submitted"] == stats["completed"] > 10
    reqs, acts = cpu.requests, cpu.actions
    assert reqs.height >= stats["submitted"] and set(reqs["model"]) == {"mlp"}
    assert (acts["type"] == "INFER").sum() > 0 and (acts["type"] == "LOAD_WEIGHTS").sum() >= 1
    models = cpu.models
    assert models.row(0, named=True)["copies"] == 2 and models.row(0, named=True)["ready"] == 2
    assert "mlp×2" in repr(cpu)


def test_bad_input_is_reported_and_the_session_stays_usable(cpu):
    with pytest.raises(ModelNotFound, match="unknown model 'resnet_9000'.*zoo name"):
        cpu.load("resnet_9000")
    for copies in (0, -2):
        with pytest.raises(ValueError, match=f"copies must be >= 1, got {copies}"):
            cpu.load("mlp", copies=copies)
    with pytest.raises(TypeError, match="copies must be an int"):
        cpu.load("mlp", copies=1.5)
    with pytest.raises(ValueError, match="'bert_base' is not loaded in this session.*session.load"):
        cpu.infer("bert_base")
    with pytest.raises(ValueError, match="unknown workload 'zigzag'"):
        cpu.run("zigzag")
    wrong = cpu.infer("mlp", np.zeros((3, 7), "float32")).result(timeout=10)
    assert wrong.status == "rejected" and "shape" in wrong.message
    # an SLO in ms that is not a finite number > 0 is named (a string was repeated a million times, NaN and
    # infinity failed int()); one too short for the model is the controller's to reject, with its reason
    for slo_ms in (float("nan"), float("inf"), "100", -5, 0, True, np.bool_(True)):
        with pytest.raises(ValueError, match="slo_ms must be a finite number > 0"):
            cpu.infer("mlp", slo_ms=slo_ms)
    short = cpu.infer("mlp", slo_ms=1e-6).result(timeout=10)
    assert short.status == "rejected" and "shorter than" in short.message
    with pytest.raises(ValueError, match=r"models=\[\] names no model.*loaded: \['mlp'\]"):
        cpu.run("closed_loop", models=[])
    assert cpu.infer("mlp", slo_ms=np.float32(500)).result(timeout=10).ok
    assert _infer_ok(cpu, "mlp").ok          # still usable


def test_absent_devices_and_bad_arguments_are_refused_without_threads():
    before = _threads()
    n_cuda, why = cuda_devices()
    if n_cuda == 0:
        with pytest.raises(SessionError, match="no CUDA device is usable"):
            Session(device="cuda")
    with pytest.raises(SessionError, match=f"GPU {max(n_cuda, 3)} is not present|no physical GPUs"):
        Session(device="cuda" if n_cuda else "cpu", gpus=[max(n_cuda, 3)])
    with pytest.raises(ValueError, match="device='tpu'"):
        Session(device="tpu")
    with pytest.raises(ValueError, match="at least one GPU"):
        Session(device="emulated", gpus=0)
    with pytest.raises(ValueError, match="clock='virtual'.*workbench.experiments"):
        Session(device="emulated", clock="virtual")
    with pytest.raises(ValueError, match="unknown policy"):
        Session(device="emulated", policy="fastest")
    assert _threads() <= before


def test_a_worker_that_cannot_start_is_reported_and_cleaned_up():
    before = _threads()
    from workbench.worker.config import WorkerConfig
    huge = WorkerConfig.load(weights_cache_size=1 << 50)              # 1 PiB of host memory: refused
    s = Session(device="cpu", worker_config=huge)
    with pytest.raises(SessionError, match="failed to start.*weights_cache_size"):
        s.load("mlp")
    assert "worker failed" in repr(s)
    s.close()
    assert _threads() <= before


def test_closed_session_says_so():
    s = Session(device="emulated")
    s.load("mlp")
    s.close()
    s.close()                                                         # idempotent
    for call in (lambda: s.load("mlp"), lambda: s.infer("mlp"), lambda: s.run(), lambda: s.dashboard()):
        with pytest.raises(SessionClosed, match="is closed: create a new workbench Session"):
            call()
    assert s.requests.height >= 0 and "[closed]" in repr(s)          # telemetry stays readable


def test_a_new_session_of_the_same_name_replaces_the_open_one():
    before = _threads()
    first = Session(device="emulated")
    first.load("mlp")
    with pytest.warns(UserWarning, match="replaces it"):
        second = Session(device="emulated")              # re-running the cell: the old one must not leak
    assert first.closed and not second.closed
    with pytest.raises(SessionClosed):
        first.infer("mlp")
    side = Session(device="emulated", name="side")        # a distinct name keeps both open
    assert not second.closed and "'side'" in repr(side)
    side.load("mlp")
    second.load("mlp")
    assert _infer_ok(side, "mlp").ok and _infer_ok(second, "mlp").ok
    side.close()
    second.close()
    assert _threads() <= before


def test_emulated_models_come_from_the_profile():
    with Session(device="emulated", gpus=2) as s:
        m = s.load("resnet50", copies=3)
        assert m.path == "profile:resnet50" and m.ids == [0, 1, 2]
        with pytest.raises(ModelNotFound, match="profile 'h200'.*resnet50"):
            s.load("alexnet")
        assert _infer_ok(s, m).ok
        assert len(s.gpus) == 2 and "2 emulated GPUs" in repr(s)


def test_dashboard_is_fed_by_the_pump_at_a_bounded_rate():
    with CommRecorder() as rec, Session(device="emulated", max_hz=4.0) as s:
        s.load("resnet50", copies=2)
        dash = s.dashboard()
        tabs = dash.widget().children[-1]
        assert s.dashboard() is dash
        assert tabs.titles == ("Requests", "Latency", "Timeline", "Cache", "Environment")
        start = time.monotonic()
        run = s.run("poisson", rate=500, duration_s=1.5, slo_ms=100)
        progress = run.widget()
        assert run.wait(timeout=30)
        outcomes = dash.views["Requests"].charts[0]
        live = len(rec.updates("values", outcomes.comm.comm_id))       # sent while the workload ran
        assert s.flush()
        elapsed = time.monotonic() - start
        sent = rec.updates("values", outcomes.comm.comm_id, with_meta=True)
        assert live >= 2                                              # live updates, not only the final flush
        assert live <= len(sent) <= 4.0 * elapsed + 3                 # the pump's rate, not the request rate
        assert {th for _, th, _ in sent} == {f"workbench-ui-pump-{s.id}"}
        goodput = sum(r["n"] for r in sent[-1][2] if r["outcome"] == "goodput")
        assert goodput == (s.requests["status"] == "success").sum() > 100
        timeline = dash.views["Timeline"].charts[0].values
        assert {r["which"] for r in timeline} == {"planned", "actual"} and timeline
        bar = progress.children[0]
        assert bar.value == bar.max and bar.bar_style == "success"
        stats = s.pump.stats()
        assert stats["ticks"] >= 1 and not stats["errors"]
        assert "requests" in dash.text() and "LatencyView" in dash.text()


def test_loader_widget_shows_errors_in_place_then_loads():
    with CommRecorder() as rec, Session(device="emulated") as s:
        loader = s.loader()
        loader.widget()
        shown = lambda: html.unescape(loader.status.value)   # noqa: E731
        assert loader.submit("nope", 1).result(timeout=30) is None
        assert "could not load 'nope'" in shown() and "resnet50" in shown()
        assert loader.compile_bar.bar_style == "danger"
        assert loader.submit("mlp", 0).result(timeout=30) is None
        assert "copies must be >= 1" in shown()
        loaded = loader.submit("mlp", 2).result(timeout=30)
        assert loaded is not None and loaded.copies == 2
        assert loader.load_bar.value == loader.load_bar.max and loader.load_bar.bar_style == "success"
        assert "loaded mlp ×2" in shown()
        writers = {th for _, th, _ in rec.updates("value", loader.status.comm.comm_id, with_meta=True)}
        assert writers and all(w.startswith("workbench-loader") for w in writers)
        loader.model.value, loader.copies.value = "mlp", 2             # as a user would type them
        loader.button.click()                                       # the button does the same, on the thread
        assert loader.last_future.result(timeout=30).copies == 2
        assert s.models.filter(s.models["name"] == "mlp")["copies"].item() == 4


def test_sessions_leak_no_threads_or_memory():
    def use(device: str) -> None:
        with Session(device=device) as s:
            s.load("mlp")
            s.dashboard()
            s.run("closed_loop", models="mlp", duration_s=0.3, concurrency=2, slo_ms=100).wait(30)

    use("cpu")                                          # warm up: imports, compiled kernels, caches
    gc.collect()
    threads, rss = _threads(), _rss_mb()
    for _ in range(3):
        use("cpu")
    a, b = Session(device="cpu"), Session(device="emulated")   # two at once in one kernel
    a.load("mlp")
    b.load("mlp")
    assert _infer_ok(a, "mlp").ok and _infer_ok(b, "mlp").ok
    a.close()
    b.close()
    with pytest.raises(RuntimeError, match="boom"):     # a crash inside a `with` block still closes
        with Session(device="cpu") as s:
            s.load("mlp")
            raise RuntimeError("boom")
    assert s.closed
    again = Session(device="cpu")                       # a new session after the crash works
    again.load("mlp")
    assert _infer_ok(again, "mlp").ok
    worker, session = weakref.ref(again.worker), weakref.ref(again)
    again.close()
    del again, s
    gc.collect()
    assert worker() is None and session() is None       # the worker (and its host "device" memory) is freed
    time.sleep(0.2)
    assert _threads() <= threads, _threads() - threads
    assert _rss_mb() - rss < 64, f"RSS grew {_rss_mb() - rss:.0f} MB over 6 sessions"


def test_an_artifact_without_measurements_is_profiled_once(tmp_path):
    import shutil

    from workbench.ui import artifacts
    from workbench.worker import profiling
    from workbench.worker.measurements import read_measurements

    art = artifacts.resolve("mlp", "cpu", (1, 4))
    copy = tmp_path / "mlp"
    shutil.copytree(art.path, copy)
    (copy / "measurements.json").unlink(missing_ok=True)
    assert not profiling.has_measurements(copy, "cpu")
    seen = []
    profiling.profile_artifact(copy, "cpu", runs=5, say=lambda *a: seen.append(a))
    m = read_measurements(copy)
    assert m is not None and sorted(m.exec) == [1, 4] and all(d.p50_ns > 0 for d in m.exec.values())
    assert m.weights_load_ns > 0 and profiling.has_measurements(copy, "cpu")
    assert seen[-1][:3] == ("compile", 2, 2)


def test_an_isolated_session_runs_its_executor_process_on_the_cpus_given():
    with pytest.raises(ValueError, match="worker_cpus.*isolated=True"):
        Session(device="cpu", name="not-isolated", isolated=False, worker_cpus=[0])
    want = [sorted(os.sched_getaffinity(0))[-1]]
    with Session(device="cpu", name="pinned", worker_cpus=want) as s:         # isolated by default
        s.load("mlp")
        x = np.random.default_rng(2).standard_normal((1, 128)).astype("float32")
        out = _infer_ok(s, "mlp", x)
        assert out.ok, out
        expected = reference_forward("mlp", x, zoo.get("mlp").weights())
        np.testing.assert_allclose(out.outputs[0].reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
        assert s.worker.isolated and s.worker.info["cpus"] == want
        assert os.sched_getaffinity(s.worker.pid) == set(want)


def test_isolated_false_keeps_the_worker_in_this_process_and_says_so():
    with Session(device="cpu", name="in-process", isolated=False) as s:
        s.load("mlp")
        out = _infer_ok(s, "mlp", np.ones((1, 128), "float32"))
        assert out.ok, out
        assert not getattr(s.worker, "isolated", False) and "NOT isolated" in repr(s.worker)


def test_a_session_lowers_the_switch_interval_so_a_busy_cell_cannot_hold_the_controller_for_long():
    import sys
    before = sys.getswitchinterval()
    try:
        for bad in (0, -1, 2.0, "fast", True):
            with pytest.raises(ValueError, match="switch_interval"):
                Session(device="emulated", name="bad-switch", switch_interval=bad)
        sys.setswitchinterval(0.005)
        with Session(device="emulated", name="switch", switch_interval=None):
            assert sys.getswitchinterval() == pytest.approx(0.005)        # None: left as it is
        with Session(device="emulated", name="switch"):
            assert sys.getswitchinterval() == pytest.approx(0.0005)       # the default
        sys.setswitchinterval(0.0001)
        with Session(device="emulated", name="switch"):
            assert sys.getswitchinterval() == pytest.approx(0.0001)       # a lower one the user set stays
    finally:
        sys.setswitchinterval(before)
