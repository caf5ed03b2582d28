"""The GPU check shared by the mma and SIMT GEMM tests: every test module a `python -m bench.gemm_tensorcore build`
or `bench.gemm_simt build` made, run on random inputs against NumPy's float64 product."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_modules(env: str, default: str, bench: str) -> tuple[Path, list[dict]]:
    """(directory, its manifest's test modules): $env, else .gpu/<default>; a clear failure naming the build."""
    d = Path(os.environ.get(env, ROOT / ".gpu" / default))
    man = d / "manifest.json"
    if not man.is_file():
        pytest.fail(f"no {man}: run `python -m bench.{bench} build` on the CPU machine and carry .gpu/{default}")
    tests = json.loads(man.read_text()).get("tests") or []
    if not tests:
        pytest.fail(f"{man} lists no test modules: rebuild with `python -m bench.{bench} build`")
    return d, tests


def run_all(d: Path, tests: list[dict], in_dtype: str, tmp_path: Path, tolerance) -> None:
    """Each module's C = A x B (B as [K, N] or [N, K]; batched: a leading entry axis) against NumPy in float64,
    the output filled with NaN first: every element written, max error / max |C| <= tolerance(test)."""
    import cupy
    import tvm
    from workbench.models import cubin_cache
    cubin_cache.ensure_cuda_backend()
    cubin_cache.install(cubin_cache.CubinCache(tmp_path / "cubins"))
    arch = cubin_cache.device_arch(0)
    rng = np.random.default_rng(0)
    for t in tests:
        m, n, k = t["m"], t["n"], t["k"]
        lead = (t["batch"],) if t.get("batch") else ()
        a = rng.uniform(-1, 1, lead + (m, k)).astype(in_dtype)
        b = rng.uniform(-1, 1, lead + ((k, n) if t["b_layout"] == "kn" else (n, k))).astype(in_dtype)
        bk = b.astype(np.float64) if t["b_layout"] == "kn" else b.astype(np.float64).swapaxes(-1, -2)
        ref = a.astype(np.float64) @ bk
        with cubin_cache.compiling_for(arch):
            f = tvm.runtime.load_module(str(d / t["so"]))[t["function"]]
        gc = cupy.full(lead + (m, n), np.nan, dtype=t.get("out_dtype", "float32"))
        f(tvm.runtime.from_dlpack(cupy.asarray(a)), tvm.runtime.from_dlpack(cupy.asarray(b)),
          tvm.runtime.from_dlpack(gc))
        cupy.cuda.runtime.deviceSynchronize()
        out = cupy.asnumpy(gc).astype(np.float64)
        assert np.isfinite(out).all(), f"{t['name']}: non-finite outputs (unwritten elements?)"
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err <= tolerance(t), \
            f"{t['name']} ({lead}{m}x{n}x{k}, {t['b_layout']}, {t['label']}): rel err {err:.2e} > {tolerance(t)}"
