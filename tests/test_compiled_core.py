"""The simulation core compiled with mypyc (setup.py, workbench/controller/compiled.py): where the compiled build
is present it runs the same simulations as the .py sources, row for row; the sources stay runnable beside it; a
build older than its sources is refused; the benchmarks' timing wrappers still see the compiled entry points;
and the core type-checks, which the compiled build needs."""
from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.controller import compiled

TESTS = Path(__file__).resolve().parent
MS = 1_000_000


def scenario_digests() -> dict[str, str]:
    """sha256 of every request row, action row and counter of three short simulations (Clockwork with models
    swapped and requests dropped, and both baselines), as the core that is imported runs them."""
    from workbench.controller.simulation import simulate
    from workbench.telemetry.recorder import Recorder
    from workbench.worker.config import WorkerConfig
    from workbench.workload import Poisson

    small_cache = WorkerConfig.load(None, weights_cache_size=f"{40 * 16} MiB")     # 40 pages: models are swapped
    out = {}
    for policy, rate, slo_ms in (("clockwork", 1500, 40), ("triton", 600, 100), ("ray", 600, 100)):
        rec = Recorder()
        res = simulate({"resnet50": 12, "mobilenet_v2": 8, "bert_base": 3}, num_gpus=1, workers=2, policy=policy,
                       workload=lambda ids: Poisson(ids, rate=rate, slo_ms=slo_ms, seed=5), duration_s=1.5, seed=3,
                       worker_config=small_cache, recorder=rec)
        h = hashlib.sha256(rec.requests().write_csv().encode())
        h.update(rec.actions().write_csv().encode())
        h.update(json.dumps(res.summary, sort_keys=True, default=str).encode())
        out[policy] = h.hexdigest()
        assert res.statuses["success"] > 100, (policy, res.statuses)
    return out


def _run_in(root: Path, code: str, sources: bool = False) -> str:
    """Run `code` in a fresh interpreter importing the package from `root` (its .py sources if `sources`);
    its stdout."""
    prog = "import sys; sys.path.insert(0, %r)\n" % str(TESTS)
    if sources:
        prog += "from workbench.controller.compiled import prefer_sources; prefer_sources()\n"
    r = subprocess.run([sys.executable, "-c", prog + code], capture_output=True, text=True, timeout=600, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def built_root(tmp_path_factory) -> Path:
    """A tree whose core is compiled: this one where `make` built it, else a copy built here the same way
    (setup.py with WORKBENCH_COMPILE=1; a few minutes)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    if all(compiled.source_path(m).with_suffix(suffix).exists() for m in compiled.MODULES):
        return compiled.ROOT
    root = tmp_path_factory.mktemp("built")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(compiled.ROOT / name, root / name)
    shutil.copytree(compiled.ROOT / "workbench", root / "workbench",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "compiled.json"))
    (root / "data").symlink_to(compiled.ROOT / "data")      # the emulation profiles
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root, capture_output=True,
                       text=True, timeout=1800, env={**os.environ, "WORKBENCH_COMPILE": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root


SCENARIOS = ("import json, sys, test_compiled_core as t\n"
             "from workbench.controller.compiled import MODULES, loaded_compiled\n"
             "d = t.scenario_digests()\n"
             "files = {m: sys.modules[m].__file__ for m in MODULES}\n"
             "print(json.dumps({'digests': d, 'compiled': loaded_compiled(), 'files': files}))\n")


@pytest.mark.slow
def test_sources_run_beside_the_compiled_build_and_give_its_results(built_root):
    src = json.loads(_run_in(built_root, SCENARIOS, sources=True).splitlines()[-1])
    assert src["compiled"] == [] and all(f.endswith(".py") for f in src["files"].values()), src["files"]
    out = json.loads(_run_in(built_root, SCENARIOS).splitlines()[-1])
    assert out["compiled"] == list(compiled.MODULES), out["files"]
    assert out["digests"] == src["digests"], "the compiled core ran the simulations differently"


def test_a_compiled_build_older_than_its_sources_is_refused(tmp_path):
    src = tmp_path / "workbench" / "clock.py"
    src.parent.mkdir()
    src.write_text("x = 1\n")
    manifest = tmp_path / "compiled.json"
    modules = ("workbench.clock",)
    compiled.check_fresh(tmp_path, manifest, modules)         # nothing built: nothing to check
    built = src.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0])
    built.write_bytes(b"")
    with pytest.raises(ImportError, match=r"\['workbench.clock'\].*clean_compiled"):
        compiled.check_fresh(tmp_path, manifest, modules)     # built, but no record of what from
    manifest.write_text(json.dumps({"workbench.clock": compiled.source_hash("workbench.clock", tmp_path)}))
    compiled.check_fresh(tmp_path, manifest, modules)         # built from this source
    src.write_text("x = 2\n")
    with pytest.raises(ImportError, match=r"\['workbench.clock'\] were built from other sources.*rebuild"):
        compiled.check_fresh(tmp_path, manifest, modules)


def test_the_build_records_the_sources_it_compiled(built_root):
    hashes = json.loads((built_root / "workbench" / "controller" / "compiled.json").read_text())
    assert hashes == {m: compiled.source_hash(m, built_root) for m in compiled.MODULES}
    out = _run_in(built_root, "import workbench.controller.controller\n"
                              "from workbench.controller.compiled import prefer_sources\n"
                              "try:\n    prefer_sources()\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    assert "refused: prefer_sources() after" in out     # too late: the compiled modules are in use


@pytest.mark.slow
def test_cpu_split_and_breakdown_time_the_entry_points_of_the_core_as_built(monkeypatch):
    monkeypatch.syspath_prepend(str(compiled.ROOT))
    from bench.controller_common import Breakdown
    from bench.controller_throughput import run
    from workbench.controller.simulation import simulate
    from workbench.workload import Poisson

    d = run(400.0, 0.5, 1.0, "clockwork", 0)
    assert 0 < d["controller_cpu_s"] < d["cpu_s"], d            # the wrappers saw the controller, and not only it
    assert 0 < d["steady"]["controller_cpu_s"] < d["steady"]["cpu_s"]
    bd = Breakdown()
    with bd.installed():
        simulate({"resnet50": 8}, workers=2, policy="clockwork", duration_s=0.5, seed=1,
                 workload=lambda ids: Poisson(ids, rate=400, slo_ms=100, seed=1))
    assert all(bd.calls[k] > 100 for k in ("workload", "controller", "worker")), bd.calls


@pytest.mark.slow
def test_the_compiled_modules_type_check():
    from mypy import api                 # a dev dependency: the compiled build needs it
    files = [str(compiled.source_path(m)) for m in compiled.MODULES]
    out, err, status = api.run(["--ignore-missing-imports", "--follow-imports=silent", "--check-untyped-defs",
                                "--disallow-untyped-defs", "--no-incremental", *files])
    assert status == 0, out + err
