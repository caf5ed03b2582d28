"""The mma.sync tensor-core GEMM schedule (workbench.models.tensorcore).

CPU (no GPU): configs are validated; the schedule applies to a multiple-of-tile and to a ragged matmul, the
module builds for sm_90 and its CUDA source really uses ldmatrix + mma.sync + cp.async (not wmma), and NVRTC
compiles it. GPU (marker `gpu`, runtime-only TVM on the H200): the modules `python -m bench.gemm_tensorcore
build` puts under .gpu/gemm_tc/tests (WORKBENCH_GEMM_TC overrides the directory; 2-D and batched, as attention's
QK^T and PV) agree with NumPy:

    PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 python -m pytest -m gpu tests/test_models_tensorcore.py
"""
from __future__ import annotations

import pytest

import gemm_gpu
from workbench.models.tensorcore import MmaConfig, TensorCoreError

SMALL = MmaConfig(block_m=64, block_n=64, block_k=32, warps_m=2, warps_n=2, stages=3)


def test_config_rejects_tiles_that_do_not_split_into_warp_fragments():
    with pytest.raises(TensorCoreError, match="block_m=96 must be a multiple of 16 \\* warps_m \\(64\\)"):
        MmaConfig(block_m=96, warps_m=4)
    with pytest.raises(TensorCoreError, match="block_k must be a multiple of 16"):
        MmaConfig(block_k=24)
    with pytest.raises(TensorCoreError, match="shared memory"):
        MmaConfig(block_m=256, block_n=256, warps_m=4, warps_n=4, block_k=64, stages=4)
    with pytest.raises(TensorCoreError, match="unknown field\\(s\\) tile"):
        MmaConfig.from_json({"tile": 3})
    assert MmaConfig.from_json(SMALL.to_json()) == SMALL
    assert SMALL.label == "64x64x32_w2x2_s3"


def _source(func, cfg: MmaConfig) -> str:
    from workbench.models import tensorcore
    from workbench.models.compiler import cuda_sources, make_target
    (src,) = cuda_sources(tensorcore.build(func, make_target("cuda", "sm_90"), cfg))
    return src


@pytest.mark.slow
def test_multiple_of_tile_builds_with_ldmatrix_mma_and_cp_async():
    from workbench.models import tensorcore
    src = _source(tensorcore.gemm_func(256, 256, 256, "float32", "kn"), SMALL)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4" in src
    assert "cp.async.cg.shared.global" in src and "cp.async.wait_group" in src     # pipelined async copies
    assert "wmma::" not in src
    assert "_pred_" not in src                   # whole tiles: no guarded copies


@pytest.mark.slow
def test_ragged_shape_guards_copies_and_compiles_with_nvrtc():
    from workbench.models import cubin_cache, tensorcore
    # M, N, K not multiples of 64/64/32 and K % 8 != 0 (4-half copies), fp16 output through the fused cast
    src = _source(tensorcore.gemm_func(200, 72, 100, "float16", "kn"), SMALL)
    assert "mma.sync.aligned.m16n8k16" in src and "ldmatrix" in src
    assert "ptx_cp_async_legacy_pred" in src     # out-of-range rows/cols are zero-filled, not read
    assert "half* __restrict__ D_ptr" in src     # the fp16 output written by the kernel itself
    cubin = cubin_cache.compile_cubin(src, "sm_90")
    assert cubin.startswith(b"\x7fELF")


@pytest.mark.slow
def test_96_and_48_column_tiles_are_offered_for_768_columns_and_build():
    """The tiles for N = 768 (BERT's projections and FFN output: 8 or 16 column tiles, whole waves on 132 SMs
    more often) are offered for such N only, and each builds BERT b4's projection (M = 512) with ldmatrix, mma and
    cp.async, no cp.async hazard, NVRTC compiling it."""
    from workbench.models import cubin_cache, tensorcore
    wide = {"t128x96", "t64x96", "t64x48"}
    assert wide <= set(tensorcore.configs_for(512, 768, 768)) and wide <= set(tensorcore.configs_for(2048, 768, 3072))
    assert not wide & set(tensorcore.configs_for(784, 2048, 512) + tensorcore.configs_for(3136, 256, 2304))
    for label in sorted(wide):
        src = _source(tensorcore.gemm_func(512, 768, 768, "float16", "kn"), tensorcore.named_config(label))
        assert "mma.sync.aligned.m16n8k16" in src and "ldmatrix" in src and "cp.async.cg.shared.global" in src
        assert tensorcore.cp_async_hazards(src) == [], label
        assert cubin_cache.compile_cubin(src, "sm_90").startswith(b"\x7fELF"), label


@pytest.mark.slow
def test_layouts_and_rejections():
    from tvm import s_tir, te, tirx
    from workbench.models import tensorcore
    _, trans, ext = tensorcore._matmul_block(s_tir.Schedule(tensorcore.gemm_func(64, 48, 32, "float32", "nk")))
    assert trans is True and ext == (64, 48, 32)
    _, trans, _ = tensorcore._matmul_block(s_tir.Schedule(tensorcore.gemm_func(64, 48, 32, "float32", "kn")))
    assert trans is False
    a = te.placeholder((64, 32), "float32", name="A")
    b = te.placeholder((32, 64), "float32", name="B")
    r = te.reduce_axis((0, 32), name="k")
    c = te.compute((64, 64), lambda i, j: te.sum(a[i, r] * b[r, j], axis=[r]), name="C")
    f32 = te.create_prim_func([a, b, c])
    with pytest.raises(TensorCoreError, match="inputs must be float16"):
        tensorcore.schedule_gemm(f32, SMALL)
    x = te.placeholder((64, 32), "float16", name="X")
    s = te.compute((64,), lambda i: te.sum(tirx.Cast("float32", x[i, r]), axis=[r]), name="S")
    with pytest.raises(TensorCoreError, match="2-D matmul"):
        tensorcore.schedule_gemm(te.create_prim_func([x, s]), SMALL)
    with pytest.raises(TensorCoreError, match="b_layout"):
        tensorcore.gemm_func(64, 64, 64, "float32", "mk")


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_mma_gemm_matches_numpy_on_gpu(tmp_path):
    d, tests = gemm_gpu.test_modules("WORKBENCH_GEMM_TC", "gemm_tc", "gemm_tensorcore")
    # fp32 accumulation of exact fp16 products: ~1e-6 of the scale; an fp16 output adds its rounding (5e-4)
    gemm_gpu.run_all(d, tests, "float16", tmp_path, lambda t: 1e-4 if t["out_dtype"] == "float32" else 2e-3)
    names = {t["name"] for t in tests}
    assert any(n.startswith("batched_") for n in names), \
        f"{sorted(names)}: no batched cases: rebuild with `python -m bench.gemm_tensorcore build`"
