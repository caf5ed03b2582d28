"""The SIMT fp32 GEMM schedule (workbench/models/simt_gemm.py) and its relax rule (schedules.SimtMatmul).

CPU: configs and their errors, the per-shape choice, the CUDA the schedule emits for sm_90 (cp.async pipeline
without the wait-before-commit race, per-thread register tiles, the epilogue fused into the store), and which
kernels the rule takes in whole models. GPU (marker `gpu`, runtime-only TVM on the H200): the small modules
`python -m bench.gemm_simt build` puts under .gpu/gemm_simt/tests (WORKBENCH_GEMM_SIMT overrides the directory)
against NumPy; whole models in tests/test_models_gpu.py (kind fp32simt). Speed: bench/results/gemm_simt.md.
"""
from __future__ import annotations

import json
import re

import pytest

import gemm_gpu
from workbench.models import simt_gemm
from workbench.models.schedules import ScheduleError, ScheduleSpec, check_choice
from workbench.models.simt_gemm import SimtConfig, SimtError



def test_configs_name_what_is_wrong():
    assert SimtConfig() == simt_gemm.named_config("s64") and SimtConfig().threads == 128
    assert SimtConfig(block_m=128, block_n=128, thread_n=8).threads == 256
    with pytest.raises(SimtError, match="SimtConfig.stages must be a positive integer, got 0"):
        SimtConfig(stages=0)
    with pytest.raises(SimtError, match="block_m=100 must be a multiple of thread_m=8"):
        SimtConfig(block_m=100)
    with pytest.raises(SimtError, match="thread_n must be a multiple of 4"):
        SimtConfig(thread_n=6, block_n=132)
    with pytest.raises(SimtError, match="frag_k must be 1, 2 or 4"):
        SimtConfig(frag_k=8)
    with pytest.raises(SimtError, match="2048 threads per block; need a multiple of 32 up to 1024"):
        SimtConfig(block_m=256, block_n=128, thread_m=4, thread_n=4)
    with pytest.raises(SimtError, match="16 threads per block; need a multiple of 32"):
        SimtConfig(block_m=16, block_n=16, thread_m=4, thread_n=4)
    with pytest.raises(SimtError, match="bytes of shared memory exceed"):
        SimtConfig(block_m=256, block_n=256, block_k=64, thread_m=16, thread_n=16, stages=4)
    with pytest.raises(SimtError, match="unknown field.*bogus"):
        SimtConfig.from_json({"bogus": 1})
    with pytest.raises(SimtError, match="unknown SIMT gemm config 'nope'; valid: s64, s64t4, s128x64"):
        simt_gemm.named_config("nope")
    for label in simt_gemm.CONFIGS:
        c = simt_gemm.named_config(label)
        assert SimtConfig.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_the_choice_follows_the_grid_of_64x64_tiles():
    assert simt_gemm.choose_config(None, 512, 768, 3072) == "s64t4"       # 96 blocks: under two waves
    assert simt_gemm.choose_config(None, 50176, 64, 576) == "s128x64"     # N = 64, 784 blocks
    assert simt_gemm.choose_config(None, 2048, 768, 768) == "s64"
    assert simt_gemm.choose_config(None, 256, 64, 576) == "s64t4"         # N = 64 but few blocks
    assert simt_gemm.choose_config(192, 128, 64, 128) == "s64"            # batch entries count as blocks


def test_the_spec_setting_is_off_by_default_round_trips_and_checks_its_type():
    assert not ScheduleSpec().simt and ScheduleSpec().is_default
    on = ScheduleSpec(simt=True, split_k=256)
    assert on.to_json() == {"split_k": 256, "simt": True} and not on.is_default
    assert ScheduleSpec.from_json(json.loads(json.dumps(on.to_json()))) == on
    from workbench.models.tuning import Variant
    assert "simt" in Variant("direct", "fp32", on).describe() and "simt" not in Variant().describe()
    with pytest.raises(ScheduleError, match="schedule.simt must be true or false"):
        ScheduleSpec(simt="yes")
    assert check_choice({"rule": "simt", "config": "s64t4"})["config"] == "s64t4"
    with pytest.raises(ScheduleError, match="simt config 't128' is not one of s64, s64t4, s128x64"):
        check_choice({"rule": "simt", "config": "t128"})


def _cuda(func, cfg=None) -> str:
    from workbench.models.compiler import cuda_sources, make_target
    return "\n".join(cuda_sources(simt_gemm.build(func, make_target("cuda", "sm_90"), cfg)))


def test_the_kernel_pipelines_its_copies_and_keeps_each_threads_tile_in_registers():
    from workbench.models.tensorcore import cp_async_hazards
    src = _cuda(simt_gemm.gemm_func(2048, 768, 768), simt_gemm.named_config("s128x64"))
    assert "cp.async.cg.shared.global" in src and "cp.async.wait_group 1" in src and not cp_async_hazards(src)
    assert "__launch_bounds__(128)" in src
    # 8x8 outputs per thread in registers (C_local[64]), A and B staged in registers, operand loads as float2
    assert re.search(r"float C_local\w*\[64\]", src) and "float2" in src
    one_stage = _cuda(simt_gemm.gemm_func(2048, 768, 768), SimtConfig(block_m=64, block_n=64, block_k=16,
                                                                        thread_m=8, thread_n=4, stages=1))
    assert "cp.async" not in one_stage


@pytest.mark.parametrize("args", [(200, 72, 100, "kn", None), (130, 96, 88, "nk", None), (128, 64, 147, "kn", 3)])
def test_ragged_transposed_and_batched_shapes_compile(args):
    from workbench.models.tensorcore import cp_async_hazards
    src = _cuda(simt_gemm.gemm_func(*args))
    assert "cp.async" in src and not cp_async_hazards(src)
    if args[-1]:
        assert "blockIdx.z" in src


def test_a_transposed_b_is_read_by_neighbouring_threads_from_neighbouring_rows():
    """B[N, K] (BERT's QK^T reads K as [t, d]) sits in shared memory as rows of k: thread x reads row x of each of
    its column sub-tiles (rows 20 words apart with s64's 16 + 4), not 4 consecutive rows (4 x 20 apart: 2 of the
    32 banks for a warp); its register tile stays 8 x 4 accumulators, and each output column is stored alone."""
    src = _cuda(simt_gemm.gemm_func(128, 128, 64, "nk", 192), simt_gemm.named_config("s64"))
    assert "threadIdx.x) * 20)" in src and "threadIdx.x) * 80)" not in src
    assert "float C_local_ptr[32];" in src and "*(float4*)(C_ptr" not in src


@pytest.mark.parametrize("label", ["s128x96", "s64x96"])
def test_the_96_column_tiles_compile_for_berts_768_columns(label):
    """SIMT tiles of 96 columns (N = 768 in 8 column tiles): BERT b16's FFN output and a ragged shape compile with
    pipelined copies, no cp.async hazard, and NVRTC takes the source."""
    from workbench.models import cubin_cache
    from workbench.models.tensorcore import cp_async_hazards
    for args in ((2048, 768, 3072, "kn", None), (200, 100, 72, "kn", None)):
        src = _cuda(simt_gemm.gemm_func(*args), simt_gemm.named_config(label))
        assert "cp.async" in src and not cp_async_hazards(src), (label, args)
    assert cubin_cache.compile_cubin(src, "sm_90").startswith(b"\x7fELF")


def test_fp16_and_tiny_matmuls_are_refused_with_the_reason():
    from workbench.models import tensorcore
    with pytest.raises(SimtError, match="inputs must be float32"):
        simt_gemm.schedule_gemm(tensorcore.gemm_func(64, 64, 64))
    with pytest.raises(SimtError, match="below the rule's minimum"):
        simt_gemm.schedule_gemm(simt_gemm.gemm_func(1, 1000, 512), check_size=True)


def test_the_rule_takes_the_fp32_matmuls_of_a_whole_model_with_their_epilogues():
    """tiny_transformer fp32 b4 for sm_90: SimtMatmul schedules the projections and the FFN with their bias, GELU
    and residual adds fused into its store (as many kernels as without the rule) and attention's batched
    matmuls; dlight's Matmul keeps only what the rule declines (the classifier head: M = 4 rows). With split-K
    the partials (batched over the K slices) are the rule's too."""
    from tvm import tirx
    from workbench.models import schedules, zoo
    from workbench.models.compiler import lower, make_target
    from workbench.models.tuning import Variant
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get("tiny_transformer").make_module(4)

    def build(**spec):
        rules: dict[str, str] = {}
        low = lower(mod, tgt, Variant("direct", "fp32", ScheduleSpec(matmul={}, **spec)), rules_used=rules)
        return rules, {gv.name_hint for gv, f in low.functions_items() if isinstance(f, tirx.PrimFunc)}

    (plain, plain_names), (rules, names) = build(), build(simt=True)
    simt = {k for k, r in rules.items() if r == "SimtMatmul"}
    dlight = {k for k, r in plain.items() if r == "ConfiguredMatmul"}
    assert simt and simt < dlight, rules
    assert any("add" in k and "matmul" in k for k in simt), simt       # an epilogue fused into the SIMT store
    assert names == plain_names
    fused = {gv.name_hint: f for gv, f in schedules.fuse(mod, tgt).functions_items()}
    for name in dlight - simt:
        with pytest.raises(SimtError, match="below the rule's minimum"):
            simt_gemm.schedule_gemm(fused[name], check_size=True)
    split, _ = build(simt=True, split_k=1024)
    assert any(k.startswith("matmul_split_k") and r == "SimtMatmul" for k, r in split.items()), split


@pytest.mark.gpu
def test_simt_gemm_matches_numpy_on_gpu(tmp_path):
    d, tests = gemm_gpu.test_modules("WORKBENCH_GEMM_SIMT", "gemm_simt", "gemm_simt")
    assert {t["b_layout"] for t in tests} == {"kn", "nk"} and any(t["batch"] for t in tests)
    gemm_gpu.run_all(d, tests, "float32", tmp_path, lambda t: 1e-5)
