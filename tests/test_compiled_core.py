"""The simulation core compiled with mypyc (setup.py, workbench/controller/compiled.py): where the compiled build
is present it runs the same simulations as the .py sources, row for row; the sources stay runnable beside it; a
build older than its sources is refused; the benchmarks' timing wrappers still see the compiled entry points;
and the core type-checks, which the compiled build needs."""
from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
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


def _in_sources_process(code: str) -> str:
    """Run `code` in a fresh interpreter that imports the core from its .py sources; its stdout."""
    prog = ("import sys; sys.path.insert(0, %r)\n"
            "from workbench.controller.compiled import prefer_sources; prefer_sources()\n" % str(TESTS)) + code
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300,
                       cwd=compiled.ROOT, env={**os.environ, "PYTHONPATH": str(compiled.ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _core_is_compiled() -> bool:
    import workbench.controller.controller  # noqa: F401 - the core, as built
    import workbench.worker.emulated  # noqa: F401
    return bool(compiled.loaded_compiled())


@pytest.mark.slow
def test_sources_run_beside_the_compiled_build_and_give_its_results():
    out = json.loads(_in_sources_process(
        "import json, test_compiled_core as t\n"
        "from workbench.controller.compiled import MODULES, loaded_compiled\n"
        "d = t.scenario_digests()\n"
        "import sys\n"
        "files = {m: sys.modules[m].__file__ for m in MODULES}\n"
        "print(json.dumps({'digests': d, 'compiled': loaded_compiled(), 'files': files}))\n").splitlines()[-1])
    assert out["compiled"] == [] and all(f.endswith(".py") for f in out["files"].values()), out["files"]
    if not _core_is_compiled():
        pytest.skip("the core runs from its .py sources here (not built: WORKBENCH_COMPILE=1 pip install "
                    "--no-build-isolation -e .)")
    digests = scenario_digests()
    assert compiled.loaded_compiled() == list(compiled.MODULES)
    assert digests == out["digests"], "the compiled core ran the simulations differently"


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


def test_the_build_manifest_matches_the_tree_when_built():
    if not _core_is_compiled():
        pytest.skip("the core runs from its .py sources here (not built)")
    hashes = json.loads(compiled.MANIFEST.read_text())
    assert hashes == {m: compiled.source_hash(m) for m in compiled.MODULES}
    with pytest.raises(RuntimeError, match="prefer_sources"):
        compiled.prefer_sources()        # too late in this process: the compiled modules are in use


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
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (the compiled build needs it)")
    files = [str(compiled.source_path(m)) for m in compiled.MODULES]
    out, err, status = api.run(["--ignore-missing-imports", "--follow-imports=silent", "--check-untyped-defs",
                                "--disallow-untyped-defs", "--no-incremental", *files])
    assert status == 0, out + err
