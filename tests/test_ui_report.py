"""Reports: a notebook run headless (nbclient) and exported to HTML that opens offline with its charts; the
`workbench notebook` command."""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from workbench.cli import main as cli
from workbench.ui.report import ReportError, export_html, run_notebook, widget_state

pytestmark = pytest.mark.slow

CELLS = [
    "import time\n"
    "from workbench.telemetry.recorder import Recorder\n"
    "from workbench.ui import Dashboard\n"
    "rec, MS = Recorder(), 1_000_000\n"
    "for i in range(400):\n"
    "    t = 10**9 + i * MS\n"
    "    rec.add_action(action_id=i, gpu=i % 2, type='INFER', model_id=0, batch_size=1 + i % 4, earliest=t,\n"
    "                   latest=t + 5 * MS, sent=t, planned_begin=t, planned_end=t + MS, predicted_duration=MS,\n"
    "                   completed=t + MS, measured_begin=t, measured_end=t + MS, measured_duration=MS + i * 100,\n"
    "                   status=0, status_name='SUCCESS')\n"
    "    rec.add_request(request_id=i, model_id=0, model='mlp', arrival=t, deadline=t + 10 * MS,\n"
    "                    completion=t + MS, slo=10 * MS, status='success' if i % 10 else 'dropped', latency=MS)",
    "n_rows = rec.requests().height\nprint('rows', n_rows, 'scale', scale)",
    "Dashboard.of(rec.requests(), rec.actions())",
]


def _notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def test_run_and_export_a_notebook_with_parameters(tmp_path):
    nb_path = _notebook(tmp_path / "demo.ipynb", CELLS)
    rep = run_notebook(nb_path, tmp_path / "out", kernel="python3", parameters={"scale": 3})
    nb = nbformat.read(rep.notebook, as_version=4)
    assert nb.cells[0].metadata["tags"] == ["injected-parameters"]
    assert "rows 400 scale 3" in nb.cells[2].outputs[0].text
    charts = [s["state"] for s in widget_state(nb).values() if "spec" in s["state"] and "values" in s["state"]]
    assert len(charts) >= 5 and sum(bool(c["values"]) for c in charts) >= 4
    out = rep.html.parent
    for f in ("require.js", "embed-amd.js", "anywidget.js",
              "@jupyter-widgets/html-manager/dist/1551f4f60c37af51121f.woff2"):
        assert (out / f).is_file(), f
    html = rep.html.read_text()
    assert "application/vnd.jupyter.widget-state+json" in html and '<script src="require.js">' in html
    again = export_html(rep.notebook, tmp_path / "again", name="report")   # export alone, from the file
    assert again.name == "report.html" and (again.parent / "embed-amd.js").is_file()


def test_a_failing_cell_is_named_and_what_ran_is_kept(tmp_path):
    nb_path = _notebook(tmp_path / "bad.ipynb", ["x = 1", "raise ValueError('the answer is ' + str(x + 41))"])
    with pytest.raises(ReportError, match="bad.ipynb: a cell failed.*the answer is 42"):
        run_notebook(nb_path, tmp_path / "out", kernel="python3")
    kept = nbformat.read(tmp_path / "out" / "bad.failed.ipynb", as_version=4)
    assert kept.cells[1].outputs[0].ename == "ValueError"


def test_notebook_command(tmp_path, capsys):
    assert cli(["notebook", str(tmp_path / "missing.ipynb")]) == 2
    assert "missing.ipynb does not exist" in capsys.readouterr().err
    nb_path = _notebook(tmp_path / "tiny.ipynb", ["print('hello from', name)"])
    assert cli(["notebook", str(nb_path), "--out", str(tmp_path / "rep"), "--kernel", "python3",
                "-p", "name=\"the CLI\""]) == 0
    assert "report:" in capsys.readouterr().out
    nb = nbformat.read(tmp_path / "rep" / "tiny.ipynb", as_version=4)
    assert nb.cells[1].outputs[0].text == "hello from the CLI\n"
    assert (tmp_path / "rep" / "index.html").is_file()
    assert cli(["notebook", str(nb_path), "-p", "1bad=2"]) == 2


@pytest.mark.browser
def test_exported_report_renders_its_charts_with_the_network_blocked(tmp_path):
    from playwright.sync_api import sync_playwright

    rep = run_notebook(_notebook(tmp_path / "demo.ipynb", CELLS), tmp_path / "out", kernel="python3",
                       parameters={"scale": 1})
    remote: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith(("file:", "blob:", "data:")):
            return r.continue_()
        remote.append(url)
        return r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            ctx = browser.new_context(viewport={"width": 1200, "height": 900})
            ctx.route("**/*", route)
            page = ctx.new_page()
            page.goto(rep.html.as_uri())
            page.wait_for_function("document.querySelectorAll('.workbench-vega svg.marks').length >= 1",
                                   timeout=60_000)
            rows = page.evaluate("Array.from(document.querySelectorAll('.workbench-vega')).map(e => e.dataset.rows)")
            marks = page.evaluate("document.querySelector('.workbench-vega svg.marks').querySelectorAll('path')"
                                  ".length")
            shots = Path(__file__).resolve().parents[1] / "reports" / "browser"
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "offline_report.png"), full_page=True)
        finally:
            browser.close()
    assert not remote, f"the report asked the network for {remote}"
    assert any(r and int(r) > 0 for r in rows) and marks > 5
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
