"""Run the notebooks headless where this runs (the H200: bench/gpu_suite.sh stage `notebooks`), keep the executed
notebooks and their offline reports, and hold them to the assertions of tests/test_notebooks.py.

    python -m bench.notebooks_gpu [--notebooks 01_quickstart,03_latency] [--out .gpu/notebooks] [--device cuda]
    python -m bench.notebooks_gpu --check          # only: can the notebooks' packages be imported here?

Each notebook runs in our kernel spec ("Clockwork Workbench", installed into a private prefix, as the tests do)
with nbclient, then the matching test of tests/test_notebooks.py checks it (same helpers, same assertions). A
notebook whose first cell sets `device = "auto"` and that shows its Session must show it on `--device` (cuda
on the H200: `auto` must find the GPU there); 01 and 02 must show it. Executed notebooks and reports go under --out/<notebook>/;
bench/results/notebooks_gpu.json and .md get one row per notebook.

The GPU machine has no package registry: nbclient, ipykernel, ipywidgets, altair and the rest travel as wheels
in .whl-nb/ (bench/gpu_suite.sh installs them into .gpu/site); the dashboard's Vega bundle, which vl-convert
(21 MiB) builds, travels already built in .gpu/ui-cache (a copy of ~/.cache/workbench/ui). `--check` verifies, before the suite spends device
time, that every carried distribution's requirements are met by what is installed there (the few left out on
purpose are listed in OMITTED) and that the modules the notebooks import load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NOTEBOOKS = ROOT / "notebooks"
# notebook -> the test of tests/test_notebooks.py that runs and checks it
CHECKS = {"01_quickstart": "test_quickstart", "02_model_loading": "test_model_loading",
          "03_latency": "test_latency", "04_environment": "test_environment", "05_experiments": "test_experiments"}
# notebooks that display their Session (so the device `auto` picked can be read from the output)
SHOWS_DEVICE = {"01_quickstart", "02_model_loading"}
# what the notebooks (through workbench.ui and the report export) import
MODULES = ("nbclient", "nbformat", "nbconvert", "jupyter_client", "ipykernel", "IPython", "ipywidgets", "anywidget",
           "altair", "jsonschema", "zmq", "tornado", "polars", "workbench.ui", "workbench.ui.report")
# required by a carried wheel's metadata but not needed to run a notebook headless, so not carried (size):
# the debugger, IPython's completion and terminal, and the classic-notebook / JupyterLab front-end assets
OMITTED = {"debugpy", "jedi", "prompt-toolkit", "widgetsnbextension", "jupyterlab-widgets"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_packages(site: Path | None = None) -> list[str]:
    """Problems with the installed packages, [] when none: unmet requirements of the distributions installed in
    `site` (the carried wheels; None: not checked), then modules that do not import."""
    import importlib
    import importlib.metadata as md
    from packaging.requirements import Requirement

    installed = {_norm(d.metadata["Name"]): d.version for d in md.distributions()}
    dists = md.distributions(path=[str(site)]) if site else []
    problems = []
    for d in dists:
        for line in d.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _norm(req.name)
            if name in OMITTED:
                continue
            have = installed.get(name)
            if have is None:
                problems.append(f"{d.metadata['Name']} {d.version} needs {req}: not installed")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{d.metadata['Name']} {d.version} needs {req}: {have} is installed")
    for mod in MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - report every kind of import failure
            problems.append(f"import {mod} failed: {type(e).__name__}: {e}")
    return problems


def install_kernel(prefix: Path) -> str:
    """Our kernel spec into `prefix`, found through JUPYTER_PATH (the interpreter's own prefix is left alone)."""
    from workbench.env.commands import KERNEL_NAME, install_kernel as install
    install(prefix=str(prefix))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        filter(None, [str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")]))
    return KERNEL_NAME


def run_one(stem: str, kernel: str, out: Path, device: str | None) -> dict:
    """Run and check one notebook; the row for the results (error set when a check failed)."""
    import nbformat
    sys.path.insert(0, str(ROOT / "tests"))
    import test_notebooks as T   # its helpers and assertions, shared rather than copied

    d = out / stem
    shutil.rmtree(d, ignore_errors=True)
    row: dict = {"notebook": stem, "device": None, "seconds": None, "error": None, "dir": str(d)}
    t0 = time.perf_counter()
    try:
        getattr(T, CHECKS[stem])(kernel, d)           # runs the notebook into d, then asserts on what it shows
        nb = nbformat.read(d / f"{stem}.ipynb", as_version=4)
        text = T._text(nb)
        shown = sorted(set(re.findall(r"Session \d+.*?: device=(cpu|cuda)\b", text)))
        row["device"] = ",".join(shown) or "not shown"
        first = next((c.source for c in nb.cells if c.cell_type == "code"), "")
        if device and shown and re.search(r"""^device\s*=\s*["']auto["']""", first, re.M):
            assert shown == [device], f"device='auto' should have picked {device}; the notebook shows {shown}"
        if device and stem in SHOWS_DEVICE:
            assert shown, f"{stem} shows its Session, with the device 'auto' picked: not found in its output"
        m = re.search(r"(\d+) requests, SLO attainment ([\d.]+)%, goodput (\d+)/s", text)
        if m:
            row.update(requests=int(m.group(1)), slo_attainment_pct=float(m.group(2)), goodput_per_s=int(m.group(3)))
    except Exception as e:  # noqa: BLE001 - one failed notebook must not hide the others' results
        where = traceback.extract_tb(e.__traceback__)[-1]      # a bare `assert` (not rewritten here) says nothing
        row["error"] = (f"{type(e).__name__}: {e}" if str(e).strip() else
                        f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {where.line}")[:2000]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def write(rows: list[dict], out: Path, device: str | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.node(), "python": sys.version.split()[0], "expected_device": device,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "notebooks_gpu.json").write_text(json.dumps({"meta": meta, "notebooks": rows}, indent=1))
    lines = [f"# Notebooks run headless on {meta['host']} ({meta['time']}, Python {meta['python']})", "",
             f"Executed notebooks and reports: {out}/<notebook>/. Checked by tests/test_notebooks.py's assertions"
             f"{f' and a Session on {device}' if device else ''}.", "",
             "| notebook | result | device shown | requests | SLO attainment | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        res = "pass" if r["error"] is None else f"FAIL: {r['error'].splitlines()[0][:200]}"
        slo = f"{r['slo_attainment_pct']}%" if "slo_attainment_pct" in r else ""
        lines.append(f"| {r['notebook']} | {res} | {r['device'] or ''} | {r.get('requests', '')} | {slo} | "
                     f"{r['seconds']} |")
    (RESULTS / "notebooks_gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.notebooks_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--notebooks", default="01_quickstart,03_latency",
                   help=f"comma-separated, of {', '.join(CHECKS)} (default: the two that run on the GPU, "
                        f"01_quickstart,03_latency)")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu" / "notebooks")
    p.add_argument("--device", default="cuda", help="device 'auto' must pick ('' for no check)")
    p.add_argument("--check", action="store_true", help="only check that the packages are there")
    p.add_argument("--site", type=Path, default=ROOT / ".gpu" / "site",
                   help="where the carried wheels were installed (its distributions' requirements are checked)")
    a = p.parse_args(argv)
    problems = check_packages(a.site if a.site.is_dir() else None)
    for line in problems:
        print("problem:", line, flush=True)
    if a.check or problems:
        print("packages: ok" if not problems else f"packages: {len(problems)} problem(s)")
        return 1 if problems else 0
    stems = [s.strip().removesuffix(".ipynb") for s in a.notebooks.split(",") if s.strip()]
    unknown = [s for s in stems if s not in CHECKS or not (NOTEBOOKS / f"{s}.ipynb").is_file()]
    if unknown:
        p.error(f"unknown notebook(s) {unknown}: use {', '.join(CHECKS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="workbench-kernel-") as prefix:
        kernel = install_kernel(Path(prefix))
        for stem in stems:
            print(f"--- {stem}", flush=True)
            rows.append(run_one(stem, kernel, a.out.resolve(), a.device or None))
            print(json.dumps(rows[-1]), flush=True)
    write(rows, a.out, a.device or None)
    print((RESULTS / "notebooks_gpu.md").read_text())
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
