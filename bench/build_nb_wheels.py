"""Fetch, here, the wheels the notebooks need on the GPU machine (Python 3.12, no package registry) into .whl-nb/.

    python -m bench.build_nb_wheels [--out .whl-nb]

nbclient, nbconvert, ipykernel, ipywidgets, anywidget, altair (not vl-convert-python: see ROOTS) and what they need, at the
versions installed in this venv (so the GPU machine runs what the tests here ran), as pure-Python or
cp312 manylinux x86-64 wheels. Left out, to stay inside the device tool's 64 MiB carry:
- what the H200 image already has (KINDS.md's package list): numpy, jinja2, pygments, narwhals, ...;
- what a headless kernel never imports although the metadata asks for it (OMITTED in bench.notebooks_gpu:
  the debugger, IPython's completion and terminal, the front-end assets of ipywidgets).
psygnal comes as its pure-Python wheel (0.1 MB, not 0.5 MB compiled), and wheels over 4 MB are repacked with
LZMA members (same file name, same contents and RECORD, so pip installs them as they are): vl-convert-python
goes from 32 to 21 MiB. `python -m bench.notebooks_gpu --check` (gpu_suite.sh stage `nbcheck`) verifies on the
GPU machine that every carried wheel's requirements are met there.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bench.notebooks_gpu import OMITTED

ROOT = Path(__file__).resolve().parents[1]
# vl-convert-python (21 MiB) is not carried: the charts' Vega bundle it builds is carried as .gpu/ui-cache
ROOTS = ("nbclient", "nbformat", "nbconvert", "jupyter_client", "ipykernel", "ipywidgets", "anywidget", "altair")
ON_DEVICE = {"numpy", "attrs", "jinja2", "markupsafe", "narwhals", "packaging", "psutil", "pygments",
             "python-dateutil", "six", "typing-extensions"}
UNUSED = {"parso", "wcwidth", "tzdata"}          # needed only by what is left out (jedi, prompt_toolkit, dateutil)
PURE = ("psygnal",)
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux_2_28_x86_64"]
REPACK_BYTES = 4 << 20


def _name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def repack_lzma(wheel: Path) -> None:
    """Rewrite a wheel with LZMA-compressed members (pip reads any zip method Python's zipfile reads)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zi = zipfile.ZipInfo(info.filename, info.date_time)
            zi.external_attr = info.external_attr
            zi.compress_type = zipfile.ZIP_LZMA if len(data) > 1024 else zipfile.ZIP_DEFLATED
            zout.writestr(zi, data)
    tmp.replace(wheel)


def pip_download(args: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(dest), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"pip download failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.build_nb_wheels", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".whl-nb")
    a = p.parse_args(argv)
    pins = [f"{r}=={md.version(r)}" for r in ROOTS]
    with tempfile.TemporaryDirectory(prefix="nb-wheels-") as tmp:
        dl = Path(tmp)
        pip_download([*PLATFORM, *pins], dl)
        drop = ON_DEVICE | UNUSED | {re.sub(r"[-_.]+", "-", n) for n in OMITTED}
        for w in dl.glob("*.whl"):
            if _name(w) in drop or _name(w) in PURE:
                w.unlink()
        pure = [f"{n}=={md.version(n)}" for n in PURE]
        pip_download(["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "py",
                      "--platform", "any", *pure], dl)
        shutil.rmtree(a.out, ignore_errors=True)
        a.out.mkdir(parents=True)
        for w in sorted(dl.glob("*.whl")):
            if w.stat().st_size > REPACK_BYTES:
                repack_lzma(w)
            shutil.copy2(w, a.out / w.name)
    wheels = sorted(a.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.2f} MiB in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
