"""Every notebook runs top to bottom headless (nbclient, in the "Clockwork Workbench" kernel) and exports its
offline report; the tests assert on what the notebooks show, not only that no cell failed."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from workbench.env.commands import KERNEL_NAME, install_kernel
from workbench.ui.report import STATIC_FILES, run_notebook, widget_state

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """Our kernel spec, installed into a private prefix (the venv is left alone)."""
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    install_kernel(prefix=str(prefix))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(prefix / "share" / "jupyter"), old]))
    yield KERNEL_NAME
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def _run(name: str, kernel: str, out: Path):
    rep = run_notebook(NOTEBOOKS / name, out, kernel=kernel, timeout=300)
    assert rep.kernel == KERNEL_NAME
    nb = nbformat.read(rep.notebook, as_version=4)
    return rep, nb


def _text(nb) -> str:
    """Every stream and text/plain output of the executed notebook."""
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            assert o.output_type != "error", f"cell failed: {o.get('ename')}: {o.get('evalue')}"
            if o.output_type == "stream":
                parts.append(o.text)
            elif "data" in o:
                parts.append(o.data.get("text/plain", ""))
    return "\n".join(parts)


def _charts(nb) -> list[dict]:
    """Saved states of the VegaChart widgets."""
    return [s["state"] for s in widget_state(nb).values()
            if s["model_name"] == "AnyModel" and "spec" in s["state"] and "values" in s["state"]]


def _check_report(rep, nb) -> None:
    html = rep.html.read_text()
    for f in STATIC_FILES:
        assert (rep.html.parent / f).is_file()
    srcs = re.findall(r"""<(?:script|link)[^>]*\b(?:src|href)=["']([^"']+)["']""", html)
    assert "require.js" in srcs and "widgetRendererSrc = 'embed-amd.js'" in html
    remote = [u for u in srcs if re.match(r"(https?:)?//", u)]
    assert not remote, f"the report loads {remote}: it would not open offline"
    assert "esm.sh" not in html                                    # vega comes from the saved bundle
    libs = [s for s in widget_state(nb).values() if len(s["state"].get("bundle", "")) > 100_000]
    assert len(libs) == (1 if _charts(nb) else 0), "the Vega bundle must be saved once per notebook, not per chart"
    assert "application/vnd.jupyter.widget-state+json" in html


def test_quickstart(kernel, tmp_path):
    rep, nb = _run("01_quickstart.ipynb", kernel, tmp_path)
    text = _text(nb)
    m = re.search(r"(\d+) requests, SLO attainment ([\d.]+)%, goodput (\d+)/s", text)
    assert m, text[-2000:]
    assert int(m.group(1)) > 50 and float(m.group(2)) > 50.0       # a real workload ran and mostly met its SLO
    assert re.search(r"mlp ×2 \(ids 0-1", text)
    assert "first request:" in text
    charts = _charts(nb)
    titles = {json.dumps(c["spec"].get("title", "")) for c in charts}
    assert any("Request outcomes" in t for t in titles) and any("Action timeline" in t for t in titles)
    with_data = [c for c in charts if c["values"]]
    assert len(with_data) >= 4                                        # the dashboard's charts saved with data
    outcome_rows = next(c["values"] for c in charts if "Request outcomes" in json.dumps(c["spec"].get("title")))
    assert sum(r["n"] for r in outcome_rows if r["outcome"] == "goodput") > 50
    bars = [s["state"] for s in widget_state(nb).values() if s["model_name"] == "IntProgressModel"]
    assert any(b["value"] == b["max"] == 1000 and b["bar_style"] == "success" for b in bars)   # the run's bar
    _check_report(rep, nb)


def test_model_loading(kernel, tmp_path):
    rep, nb = _run("02_model_loading.ipynb", kernel, tmp_path)
    text = _text(nb)
    assert "mlp ×1 (ids 0," in text and "mlp ×2 (ids 1-2" in text
    assert "ModelNotFound: unknown model 'no_such_model'" in text
    assert "copies must be >= 1, got 0" in text and "copies must be >= 1, got -3" in text
    assert "SessionClosed: session" in text and "[closed]" in text
    m = re.search(r"GPU 0: (\d+) pages \(([\d.]+)%\)", text)
    assert m and int(m.group(1)) > 0
    assert re.search(r"EVICT_WEIGHTS .*SUCCESS", text)                 # the small cache forced evictions
    shown = [s["state"]["value"] for s in widget_state(nb).values() if s["model_name"] == "HTMLModel"]
    assert any("could not load" in v and "no_such_model" in v for v in shown)   # the error, in place
    _check_report(rep, nb)


def test_latency(kernel, tmp_path):
    rep, nb = _run("03_latency.ipynb", kernel, tmp_path)
    text = _text(nb)
    assert re.search(r"mlp b1 +n=\d+ +p50=", text)
    assert re.search(r"resnet50 b1 +n=\d+ +p50=3\.\d+", text)        # emulated H200 profile: ~3.5 ms
    assert "INFER p99/p50 per batch size" in text
    assert re.search(r"prediction-error CDF as SVG: \d{4,} bytes", text)
    hist = [c for c in _charts(nb) if "latency distributions" in json.dumps(c["spec"].get("title", ""))]
    assert hist and all(c["values"] for c in hist)
    _check_report(rep, nb)


def test_environment(kernel, tmp_path):
    rep, nb = _run("04_environment.ipynb", kernel, tmp_path)
    text = _text(nb)
    assert re.search(r"(PASS|WARN|FAIL): \d+ pass, \d+ warn, \d+ fail, \d+ unavailable", text)
    assert "RLIMIT_MEMLOCK" in text and "launch" in text.lower()
    shown = [s["state"]["value"] for s in widget_state(nb).values() if s["model_name"] == "HTMLModel"]
    assert any("<table" in v and "RLIMIT_NOFILE" in v for v in shown)
    _check_report(rep, nb)


def test_experiments(kernel, tmp_path):
    rep, nb = _run("05_experiments.ipynb", kernel, tmp_path)
    text = _text(nb)
    m = re.search(r"(\d+) runs in [\d.]+ s of wall time \((\d+) simulated seconds\)", text)
    assert m and int(m.group(1)) == 9
    table = next(o.data["text/plain"] for c in nb.cells for o in c.get("outputs", [])
                 if "data" in o and "slo_attainment" in o.data.get("text/plain", "") and "shape: (9," in
                 o.data["text/plain"])
    for policy in ("clockwork", "triton", "ray"):
        assert table.count(policy) == 3
    charts = _charts(nb)
    comparison = [c for c in charts if c["spec"].get("hconcat")]
    assert comparison and len(next(iter(comparison[0]["spec"]["datasets"].values()))) == 9   # 3 policies x 3 SLOs
    assert re.search(r"OutcomesView: \d+ requests: \d+ ok", text)
    assert sum(bool(c["values"]) for c in charts) >= 3                # the run's dashboard, with data
    bars = [s["state"] for s in widget_state(nb).values() if s["model_name"] == "IntProgressModel"]
    assert any(b["value"] == b["max"] == 9 and b["bar_style"] == "success" for b in bars)
    _check_report(rep, nb)
