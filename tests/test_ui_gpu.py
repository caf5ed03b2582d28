"""Session on a real GPU (run on the H200: `pytest -m gpu tests/test_ui_gpu.py`). Needs the CUDA mlp artifact
compiled here and carried (.gpu/artifacts/mlp_cuda, see bench/build_gpu_artifacts.py): the GPU machine has only
the TVM runtime, so `Session.load("mlp")` takes the prebuilt artifact from .gpu/artifacts."""
from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _free_bytes(dev: int = 0) -> int:
    import cupy
    with cupy.cuda.Device(dev):
        free, _ = cupy.cuda.runtime.memGetInfo()
    return int(free)


def _ok(session, model, inputs=None):
    for _ in range(5):
        out = session.infer(model, inputs, slo_ms=2000).result(timeout=60)
        if out.ok:
            return out
    return out


def test_auto_session_runs_on_the_gpu_and_frees_its_memory():
    from workbench.models.artifact import Artifact
    from workbench.models.reference import reference_forward
    from workbench.ui.artifacts import DEFAULT_BATCH_SIZES, find_prebuilt
    from workbench.ui.session import Session

    threads = {t.name for t in threading.enumerate()}
    free0 = _free_bytes()
    s = Session(device="auto")
    assert s.device == "cuda", s.device_note
    s.load("mlp", copies=2)
    x = np.random.default_rng(0).standard_normal((1, 128)).astype("float32")
    out = _ok(s, "mlp", x)
    assert out.ok, out
    got = out.outputs[0]
    got = got.get() if hasattr(got, "get") else np.asarray(got)
    # the reference weights come from the artifact the session ran: the GPU machine has no TVM compiler, so
    # zoo.get("mlp").weights() (which builds the nn.Module) is not available there
    art = Artifact.open(find_prebuilt("mlp", "cuda", DEFAULT_BATCH_SIZES))
    ref = reference_forward("mlp", x, [(t.name, w) for t, w in zip(art.tensors, art.weight_arrays())])
    np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-3, atol=1e-3)
    run = s.run("closed_loop", models="mlp", duration_s=2.0, concurrency=4, slo_ms=20)
    assert run.wait(timeout=60)
    summary = s.summary()
    assert summary["success"] > 100 and summary["slo_attainment"] > 0.9, summary
    acts = s.actions
    infer = acts.filter((acts["type"] == "INFER") & (acts["status"] == 0))
    assert infer.height > 0 and (infer["gpu_clock"] > 0).any()          # SM clock read from the GPU
    assert _free_bytes() < free0 - (1 << 30)                            # the weights cache is allocated
    worker = weakref.ref(s.worker)
    s.close()
    gc.collect()
    time.sleep(0.5)
    assert worker() is None
    assert _free_bytes() > free0 - (512 << 20), "GPU memory not returned after close()"
    assert {t.name for t in threading.enumerate()} <= threads


def test_absent_gpu_is_named():
    from workbench.ui.session import Session, SessionError, cuda_devices

    n, _ = cuda_devices()
    with pytest.raises(SessionError, match=f"GPU {n} is not present: this machine has {n} CUDA device"):
        Session(device="cuda", gpus=[n])


def test_quickstart_notebook_on_the_gpu(tmp_path):
    import re
    from pathlib import Path

    import altair  # noqa: F401 - the notebook's charts (carried to the GPU machine in .whl-nb/)
    import ipywidgets  # noqa: F401 - the notebook's controls
    import nbclient  # noqa: F401 - runs the notebook
    import nbformat
    from workbench.ui.report import run_notebook

    nb = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"
    rep = run_notebook(nb, tmp_path, kernel="python3", timeout=600)
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                     for c in nbformat.read(rep.notebook, as_version=4).cells for o in c.get("outputs", []))
    assert "device=cuda" in text
    m = re.search(r"(\d+) requests, SLO attainment ([\d.]+)%", text)
    assert m and int(m.group(1)) > 100
