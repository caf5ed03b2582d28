"""Reproducible reports: run a notebook headless (nbclient, widget state saved) and export it to an HTML page
that opens offline with its widgets and charts (vendored require.js / embed-amd.js / anywidget.js beside it)."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = ("require.js", "embed-amd.js", "anywidget.js")
# Font Awesome (button icons), where embed-amd.js's CSS looks for it relative to the page
FONT = ("fa-solid.woff2", ("@jupyter-widgets/1551f4f60c37af51121f.woff2",
                           "@jupyter-widgets/html-manager/dist/1551f4f60c37af51121f.woff2"))
KERNEL_NAME = "clockwork-workbench"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class ReportError(RuntimeError):
    """The notebook could not be run or exported; the message names the notebook and the failing cell."""


@dataclass
class Report:
    notebook: Path       # the executed notebook (with outputs and widget state)
    html: Path           # the offline HTML page
    seconds: float       # execution wall time
    kernel: str

    def __repr__(self) -> str:
        return f"Report({self.html}, executed in {self.seconds:.1f} s with kernel {self.kernel!r})"


def default_kernel() -> str:
    """Our kernel ("Clockwork Workbench") when installed, else the interpreter's own python3 kernel."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        return "python3"
    exe = spec.argv[0] if spec.argv else ""
    return KERNEL_NAME if exe and Path(exe).exists() else "python3"


def execute(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, kernel: str | None = None,
            timeout: int = 600, cwd: str | os.PathLike | None = None, parameters: dict | None = None):
    """Run the notebook top to bottom; returns (executed NotebookNode, seconds, kernel name).

    `parameters` (name -> value) are injected as a first cell of assignments (papermill-style, without papermill).
    The notebook runs in `cwd` (default: its own directory) so relative paths inside it resolve as in JupyterLab.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    if not path.is_file():
        raise ReportError(f"notebook {path} does not exist")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 - name the file
        raise ReportError(f"{path} is not a readable notebook: {e}") from None
    if parameters:
        src = "# injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        nb.cells.insert(0, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    kernel = kernel or default_kernel()
    env_cwd = str(Path(cwd) if cwd else path.resolve().parent)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, store_widget_state=True,
                            resources={"metadata": {"path": env_cwd}})
    start = time.perf_counter()
    try:
        client.execute(env=kernel_env())
    except CellExecutionError as e:
        if out_dir is not None:   # keep what ran, for the post-mortem
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(out_dir) / f"{path.stem}.failed.ipynb")
        index = next((i for i, c in enumerate(nb.cells)
                      if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
        src = nb.cells[index].source.strip().splitlines() if index is not None else []
        where = f"cell {index + 1 - bool(parameters)}" if index is not None else "a cell"
        first = f" (`{src[0][:80]}`{' …' if len(src) > 1 else ''})" if src else ""
        raise ReportError(f"{path}: a cell failed: {where}{first} raised {e.ename}: {e.evalue}") from None
    return nb, time.perf_counter() - start, kernel


def kernel_env(environ: dict | None = None) -> dict:
    """The environment for a kernel that must import this checkout's `workbench` even when the package is not
    installed (e.g. a source checkout run with PYTHONPATH, or `python -m workbench` from the repo root)."""
    import workbench

    env = dict(os.environ if environ is None else environ)
    root = str(Path(workbench.__file__).resolve().parents[1])
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def write_static(out_dir: str | os.PathLike) -> None:
    """Copy the vendored widget/JS runtime next to an HTML page."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:
        src = STATIC / name
        if not src.is_file():
            raise ReportError(f"vendored {src} is missing: reinstall the package (see {STATIC / 'README.md'})")
        dst = out / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
    src = STATIC / FONT[0]
    for rel in FONT[1]:
        dst = out / rel
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def export_html(nb, out_dir: str | os.PathLike, name: str = "index") -> Path:
    """Render an executed notebook (NotebookNode or path) to `out_dir/name.html` that needs no network."""
    import nbformat
    from nbconvert import HTMLExporter

    if not hasattr(nb, "cells"):
        nb = nbformat.read(Path(nb), as_version=4)
    out = Path(out_dir)
    write_static(out)
    exporter = HTMLExporter(require_js_url="require.js", widget_renderer_url="embed-amd.js", mathjax_url="")
    body, _ = exporter.from_notebook_node(nb)
    html_path = out / f"{name}.html"
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(html_path)
    return html_path


def run_notebook(path: str | os.PathLike, out_dir: str | os.PathLike, *, kernel: str | None = None,
                 timeout: int = 600, parameters: dict | None = None) -> Report:
    """Execute `path` headless and write `out_dir/<stem>.ipynb` (executed, widget state saved) and
    `out_dir/index.html` (+ the JS it needs) — the reproducible report."""
    import nbformat

    path, out = Path(path), Path(out_dir)
    nb, seconds, kernel = execute(path, out, kernel=kernel, timeout=timeout, parameters=parameters)
    out.mkdir(parents=True, exist_ok=True)
    nb_path = out / f"{path.stem}.ipynb"
    nbformat.write(nb, nb_path)
    return Report(nb_path, export_html(nb, out), seconds, kernel)


def widget_state(nb) -> dict:
    """model_id -> saved state of every widget in an executed notebook."""
    return nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
