"""Build hook beside pyproject.toml (which holds the metadata): pure Python by default; with WORKBENCH_COMPILE=1 the
simulation core (`MODULES` in workbench/controller/compiled.py: the clock, the controller, the emulated
worker and the telemetry row writer) is compiled with mypyc, 2-3x faster in virtual time. The .py files stay the
source and the fallback: a tree or an interpreter without the compiled modules (the GPU machine) runs them as they
are.

    WORKBENCH_COMPILE=1 pip install --no-build-isolation -e .    # compiled, in place (mypy from the environment)
    pip install -e .                                              # pure Python
    python setup.py clean_compiled                                # remove the compiled modules again

The build records the sha256 of each source it compiled (workbench/controller/compiled.json); importing the
core checks it, so an edited source is never shadowed by a stale compiled module."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SPEC = ROOT / "workbench" / "controller" / "compiled.py"
MANIFEST = SPEC.with_name("compiled.json")
GROUP = "workbench_core"        # the shared library: workbench_core__mypyc.<abi>.so at the top of the tree


def core_modules() -> list[str]:
    """MODULES of compiled.py, read without importing the package (importing checks the compiled build)."""
    for node in ast.parse(SPEC.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"{SPEC}: no MODULES tuple")


def source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


class BuildExt(build_ext):
    """build_ext that records the sources it compiled, once the build succeeded."""

    def run(self) -> None:
        super().run()
        if self.extensions:
            hashes = {m: hashlib.sha256(source(m).read_bytes()).hexdigest() for m in core_modules()}
            MANIFEST.write_text(json.dumps(hashes, indent=1) + "\n")


class CleanCompiled(Command):
    description = "remove the mypyc-compiled core from the source tree (back to pure Python)"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        gone = []
        for m in core_modules():
            src = source(m)
            gone += list(src.parent.glob(f"{src.stem}.cpython-*.so")) + list(src.parent.glob(f"{src.stem}.*.pyd"))
        gone += list(ROOT.glob(f"{GROUP}__mypyc.*.so")) + list(ROOT.glob(f"{GROUP}__mypyc.*.pyd"))
        if MANIFEST.exists():
            gone.append(MANIFEST)
        for p in gone:
            p.unlink()
            print(f"removed {p.relative_to(ROOT)}")
        shutil.rmtree(ROOT / "build" / "mypyc", ignore_errors=True)


def compiled_extensions() -> list:
    if os.environ.get("WORKBENCH_COMPILE", "") in ("", "0"):
        return []
    from mypyc.build import mypycify     # only needed here: pure-Python installs do not need mypy
    # --follow-imports=silent: modules imported by the core but not compiled (contract, worker.base, numpy)
    # are analysed for their types, their own type errors not reported.
    return mypycify([str(source(m).relative_to(ROOT)) for m in core_modules()]
                    + ["--ignore-missing-imports", "--follow-imports=silent"],
                    opt_level=os.environ.get("WORKBENCH_COMPILE_OPT", "3"), group_name=GROUP,
                    target_dir=str(Path("build") / "mypyc"))


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": BuildExt, "clean_compiled": CleanCompiled})
