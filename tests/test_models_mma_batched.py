"""Batched matmuls (attention's QK^T and PV) on the mma.sync schedule (workbench.models.tensorcore, issue 8).

CPU only: CUDA compiles for sm_90 need no GPU, NVRTC compiles the sources here. What the kernels compute is
checked on the H200 by tests/test_models_tensorcore.py's GPU test (the batched cases of bench.gemm_tensorcore's
`.gpu/gemm_tc`) and by `bench.kernel_quality run` on round 10 (`bench.build_kernel_candidates --round 10`).
"""
from __future__ import annotations

import pytest

from workbench.models import tensorcore as tc

ATTENTION = ("fused_einsum", "einsum")     # QK^T (times the scale) and PV in the fused BERT-like models (zoo einsums)


def test_batched_gemm_func_and_shape_for_both_b_layouts():
    from tvm import s_tir
    for layout, trans in (("kn", False), ("nk", True)):
        f = tc.gemm_func(128, 64, 32, "float16", layout, batch=12)
        assert tc.batched_gemm_shape(f) == (12, 128, 64, 32, trans)
        assert tc.gemm_shape(f) == (128, 64, 32, trans)          # one batch entry's M, N, K
        with pytest.raises(tc.TensorCoreError, match="batched matmul.*_batched_matmul_block"):
            tc._matmul_block(s_tir.Schedule(f))
    assert tc.batched_gemm_shape(tc.gemm_func(64, 48, 32)) == (None, 64, 48, 32, False)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(tc.TensorCoreError, match="batch must be None or a positive integer"):
            tc.gemm_func(64, 64, 64, batch=bad)


def test_choose_batched_config_uses_small_tiles_for_short_k_and_never_taller_than_an_entry():
    assert tc.choose_batched_config(192, 128, 128, 64) == "t64"      # BERT-base b16 QK^T: 768 blocks
    assert tc.choose_batched_config(12, 128, 64, 128) == "t64"       # b1 PV
    assert tc.choose_batched_config(8, 32, 512, 1024) == "t64"       # 32-row entries: no 128-row tile
    long_k = tc.choose_batched_config(64, 512, 512, 1024)            # a compute-bound batch: the 2-D choice
    assert long_k == tc.choose_config(64 * 512, 512, 1024) == "t128"
    for args in ((1, 16, 32, 32), (192, 128, 128, 64), (4, 100, 2000, 4096)):
        assert tc.choose_batched_config(*args) in tc.CONFIGS


@pytest.mark.slow
def test_batched_schedule_binds_the_batch_to_blockidx_z():
    """(slow: the first tensorize registers TVM's CUDA tensor intrinsics, ~20 s on the 2-core machine)"""
    f = tc.gemm_func(96, 64, 64, "float32", "nk", batch=3)
    script = tc.schedule_gemm(f, tc.named_config("t64")).mod["main"].script()
    assert 'T.thread_binding(3, thread="blockIdx.z")' in script
    assert 'T.ptx_legacy.mma("m16n8k16"' in script and "T.ptx_legacy.ldmatrix(" in script
    with pytest.raises(tc.TensorCoreError, match="below the rule's minimum"):   # per-entry minimums still apply
        tc.schedule_gemm(tc.gemm_func(96, 16, 64, batch=3), check_size=True)
    with pytest.raises(tc.TensorCoreError, match="exceeds gridDim.z's limit 65535"):
        tc.schedule_gemm(tc.gemm_func(16, 32, 32, batch=65536))


def _build(funcs: dict):
    import tvm
    from workbench.models.compiler import cuda_sources, make_target
    with tvm.transform.PassContext(opt_level=3, config=tc.PASS_CONFIG):
        ex = tvm.compile(tvm.IRModule(funcs), target=make_target("cuda", "sm_90"))
    return "\n".join(cuda_sources(ex))


@pytest.mark.slow
def test_batched_nt_nn_and_ragged_gemms_build_for_sm90_and_nvrtc_compiles_them():
    """NT (B[q, n, k]: ldmatrix without .trans) and NN (B[q, k, n]: with .trans) at BERT-base's per-head
    shapes, 2 K steps (synchronous copies) and 4 (cp.async pipeline), plus ragged M/N/K per entry (guarded
    copies, cropped store): mma.sync, the batch on blockIdx.z, no cp.async hazard, NVRTC compiles."""
    from workbench.models import cubin_cache
    from workbench.models.compiler import cuda_kernels, make_target
    cases = {"qkt_nt": (192, 128, 128, 64, "float32", "nk", None), "pv_nn": (12, 128, 64, 128, "float16", "kn", None),
             "ragged_nt": (6, 100, 72, 40, "float16", "nk", "t64"),
             "ragged_nn": (5, 130, 96, 88, "float32", "kn", "t128x64")}
    funcs = {}
    with make_target("cuda", "sm_90"):
        for name, (q, m, n, k, od, lay, cfg) in cases.items():
            f = tc.gemm_func(m, n, k, od, lay, batch=q)
            sch = tc.schedule_gemm(f, tc.named_config(cfg) if cfg else None, check_size=True)
            funcs[name] = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("global_symbol", name)
    src = _build(funcs)
    bodies = cuda_kernels(src)
    assert sorted(bodies) == sorted(n + "_kernel" for n in cases)
    for name in cases:
        body = bodies[name + "_kernel"]
        assert "mma.sync.aligned.m16n8k16" in body and "ldmatrix.sync.aligned" in body, name
        assert "blockIdx.z" in body, name
        assert ("ldmatrix.sync.aligned.m8n8.x4.trans" in body) == name.endswith("_nn"), name   # B's ldmatrix
    assert "cp_async" in bodies["pv_nn_kernel"] and "cp_async" not in bodies["qkt_nt_kernel"]   # K steps 4 vs 2
    assert tc.cp_async_hazards(src) == []
    assert cubin_cache.compile_cubin(src, "sm_90").startswith(b"\x7fELF")


def _lowered(model: str, batch: int):
    from workbench.models import zoo
    from workbench.models.compiler import build_relax, cuda_sources, lower, make_target
    from workbench.models.tuning import Variant
    tgt = make_target("cuda", "sm_90")
    # data/tuning's fp16 winner for bert_base (direct, InjectiveVectorize 8, fp16 activations and weights)
    v = Variant.from_json({"lowering": "direct", "precision": "fp16", "cuda_graph": False,
                           "schedule": {"injective": 8, "activations": "fp16"}, "weights": "fp16"})
    rules: dict = {}
    ex = build_relax(lower(zoo.get(model).make_module(batch), tgt, v, None, rules), tgt)
    return rules, "\n".join(cuda_sources(ex))


@pytest.mark.slow
def test_tiny_transformer_attention_matmuls_take_the_mma_rule_and_compile():
    from workbench.models import cubin_cache
    from workbench.models.compiler import cuda_kernels
    rules, src = _lowered("tiny_transformer", 2)
    attn = {k: r for k, r in rules.items() if k.startswith(ATTENTION)}
    assert len(attn) == 2 and set(attn.values()) == {"MmaMatmul"}, rules
    bodies = cuda_kernels(src)
    for k in attn:
        assert "mma.sync.aligned.m16n8k16" in bodies[k + "_kernel"] and "blockIdx.z" in bodies[k + "_kernel"], k
    assert tc.cp_async_hazards(src) == []
    assert cubin_cache.compile_cubin(src, "sm_90").startswith(b"\x7fELF")


@pytest.mark.slow
def test_bert_base_b16_attention_is_batched_mma_and_other_kernels_keep_their_rules():
    """BERT-base b16 fp16 (data/tuning's winner variant): QK^T (192 x 128x128x64, times the scale, K read as
    [t, d]: B[N, K]) and PV (192 x 128x64x128) take MmaMatmul (dlight's ConfiguredMatmul before batched support),
    next to the 5 dense matmuls it took already; the source has no cp.async hazard."""
    from tvm import tirx
    from workbench.models import schedules, zoo
    from workbench.models.compiler import make_target
    rules, src = _lowered("bert_base", 16)
    attn = {k: r for k, r in rules.items() if k.startswith(ATTENTION)}
    assert len(attn) == 2 and set(attn.values()) == {"MmaMatmul"}, rules
    mma = sorted(k for k, r in rules.items() if r == "MmaMatmul")
    assert len(mma) == 7, mma                  # 5 dense (QKV/out projections, FFN1/2, pooler) + 2 attention
    assert tc.cp_async_hazards(src) == []
    tgt = make_target("cuda", "sm_90")
    fused = schedules.fuse(zoo.get("bert_base").make_module(16), tgt, "fp16", activations="fp16", weights="fp16")
    shapes = {gv.name_hint: tc.batched_gemm_shape(f) for gv, f in fused.functions_items()
              if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(ATTENTION)}
    assert sorted(shapes.values()) == [(192, 128, 64, 128, False), (192, 128, 128, 64, True)], shapes
