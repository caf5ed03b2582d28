"""The simulation core compiled with mypyc (an optional build: `WORKBENCH_COMPILE=1 pip install
--no-build-isolation -e .`, see setup.py), and what the pure-Python fallback needs to run the same sources.

`MODULES` lists the compiled modules (setup.py reads it). The build writes `compiled.json` beside this file
(module -> sha256 of the source it was compiled from). Python loads an extension module in preference to the
.py beside it, so an edited source would silently run its old compiled code: importing this module (the clock
and the controller package do) raises ImportError instead when a compiled module no longer matches its source.
`prefer_sources()` makes a process run the .py files even where the compiled modules are built (comparisons).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

MODULES = (
    "workbench.clock",
    "workbench.controller.requests",
    "workbench.controller.tracker",
    "workbench.controller.estimates",
    "workbench.controller.state",
    "workbench.controller.loads",
    "workbench.controller.policy",
    "workbench.controller.scheduler",
    "workbench.controller.baselines",
    "workbench.controller.controller",
    "workbench.worker.emulated_lean",
    "workbench.telemetry.row_writer",
)
ROOT = Path(__file__).resolve().parent.parent.parent      # the directory holding the `workbench` package
MANIFEST = ROOT / "workbench" / "controller" / "compiled.json"

_T = TypeVar("_T")

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr as mypyc_attr
else:
    try:
        from mypy_extensions import mypyc_attr
    except ImportError:     # pure Python (e.g. the GPU machine): the decorator only means something to mypyc
        def mypyc_attr(*attrs: str, **kwattrs: Any) -> Callable[[_T], _T]:
            return lambda cls: cls


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_hash(module: str, root: Path = ROOT) -> str:
    return hashlib.sha256(source_path(module, root).read_bytes()).hexdigest()


def loaded_compiled() -> list[str]:
    """The modules of MODULES imported so far that came from a compiled extension."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [m for m in MODULES if m in sys.modules and str(getattr(sys.modules[m], "__file__", "")).endswith(suffixes)]


def check_fresh(root: Path = ROOT, manifest: Path = MANIFEST, modules: Sequence[str] = MODULES) -> None:
    """Raise ImportError if a compiled module of this interpreter's ABI is in the tree but its source changed
    since it was built (or the build's manifest is missing). Other ABIs' builds are ignored: this interpreter
    does not load them."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]        # e.g. .cpython-311-x86_64-linux-gnu.so
    built = [m for m in modules if source_path(m, root).with_suffix(suffix).exists()]
    if not built:
        return
    try:
        hashes = json.loads(manifest.read_text())
    except (OSError, ValueError):
        hashes = {}
    stale = [m for m in built if hashes.get(m) != source_hash(m, root)]
    if stale:
        raise ImportError(
            f"compiled modules {stale} were built from other sources than the .py files beside them (Python would "
            f"run the old compiled code; {manifest.name} records what was built): rebuild with "
            f"`WORKBENCH_COMPILE=1 pip install --no-build-isolation -e .` or remove the compiled build with "
            f"`python setup.py clean_compiled`")


class _Sources(importlib.abc.MetaPathFinder):
    """Finds the modules of MODULES as their .py sources, ahead of the compiled extensions beside them."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_file_location(name, source_path(name)) if name in MODULES else None


def prefer_sources() -> None:
    """From now on, import the core from its .py sources even where compiled modules are built (interpreted
    runs to compare with compiled ones). Call it before anything imports the core."""
    if any(isinstance(f, _Sources) for f in sys.meta_path):
        return
    early = loaded_compiled()
    if early:
        raise RuntimeError(f"prefer_sources() after {early} were imported compiled: call it first")
    sys.meta_path.insert(0, _Sources())


check_fresh()
