"""The mma.sync tensor-core rule in the CUDA relax pipeline (schedules.MmaMatmul, workbench.models.tensorcore).

CPU only: CUDA compiles for sm_90 need no GPU; what the kernels compute is checked on the H200 by
`bench.kernel_quality run` (round 3 bundle) against the NumPy reference.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from workbench.models.schedules import ScheduleError, ScheduleSpec, check_choice
from workbench.models.tensorcore import CONFIGS, choose_config
from workbench.models.tuning import Variant, load_model_file

ROOT = Path(__file__).resolve().parents[1]


def test_spec_mma_defaults_on_and_round_trips_and_reads_old_database_files():
    assert ScheduleSpec().mma is True and ScheduleSpec().is_default
    assert ScheduleSpec().to_json() == {}                     # files written before the field read the same
    off = ScheduleSpec.from_json({"mma": False, "small_reduction": 256})
    assert off.mma is False and not off.is_default
    assert off.to_json() == {"small_reduction": 256, "mma": False}
    assert ScheduleSpec.from_json(off.to_json()) == off
    v = Variant(precision="fp16", schedule=off)
    assert Variant.from_json(json.loads(json.dumps(v.to_json()))) == v
    with pytest.raises(ScheduleError, match="schedule.mma must be true or false, got 'yes'"):
        ScheduleSpec(mma="yes")
    assert check_choice({"rule": "mma", "config": "t64"})["config"] == "t64"
    with pytest.raises(ScheduleError, match="mma config 't99' is not one of t128"):
        check_choice({"rule": "mma", "config": "t99"})
    files = sorted((ROOT / "data" / "tuning").glob("*/*.json"))
    for f in files:                                            # the committed database still parses
        load_model_file(f)


def test_choose_config_picks_the_measured_winner():
    """bench/results/gemm_tensorcore.md (H200): the fastest config per shape; ResNet layer4's 1x1 (t128 by 7%
    over t64) is the one miss the rule accepts for a simpler choice."""
    measured = {(2048, 768, 768): "t64", (2048, 3072, 768): "t128", (2048, 768, 3072): "t128",
                (128, 3072, 768): "t64", (50176, 64, 576): "t128x64", (12544, 128, 1152): "t128",
                (3136, 256, 2304): {"t64", "t128x64"}}
    for shape, best in measured.items():
        assert choose_config(*shape) in ({best} if isinstance(best, str) else best), shape
        assert choose_config(*shape) in CONFIGS


def _cuda_source(model: str, batch: int, variant: Variant | None) -> str:
    from workbench.models import zoo
    from workbench.models.compiler import build_relax, cuda_sources, lower, make_target
    tgt = make_target("cuda", "sm_90")
    ex = build_relax(lower(zoo.get(model).make_module(batch), tgt, variant), tgt)
    return "\n".join(cuda_sources(ex))


def _kernel_bodies(src: str) -> dict[str, str]:
    out = {}
    for part in src.split('extern "C" __global__')[1:]:
        head = part.split(";")[0]
        if "{" in head:                                   # a definition, not the forward declaration
            out[[n for n in re.findall(r"(\w+)\s*\(", head) if n != "__launch_bounds__"][0]] = part
    return out


def test_fp32_pipeline_and_wmma_variant_have_no_mma():
    """fp32 (TVM's default pipeline, built with the cp.async pass config) and fp16 with mma off (dlight) keep
    their kernels: no mma.sync, no cp.async."""
    import tvm
    from tvm import relax
    from workbench.models import zoo
    from workbench.models.compiler import cuda_sources, lower, make_target
    src = _cuda_source("mlp", 16, None)
    assert "mma.sync" not in src and "cp.async" not in src
    tgt = make_target("cuda", "sm_90")
    plain = relax.build(lower(zoo.get("mlp").make_module(16), tgt), tgt, relax_pipeline=None)
    assert "\n".join(cuda_sources(plain)) == src           # the pass config changes nothing without the rule
    wmma = _cuda_source("mlp", 16, Variant(precision="fp16", schedule=ScheduleSpec(mma=False)))
    assert "mma.sync" not in wmma and "cp.async" not in wmma
    assert tvm.__version__                                 # (imported for the build)


@pytest.mark.slow
def test_fp16_mlp_kernels_use_mma_sync_ldmatrix_and_cp_async():
    src = _cuda_source("mlp", 16, Variant(precision="fp16"))
    assert "wmma" not in src and "cp.async.cg.shared.global" in src
    bodies = _kernel_bodies(src)
    mm = {k: b for k, b in bodies.items() if "matmul" in k}
    assert len(mm) == 3, sorted(bodies)
    taken = {k for k, b in mm.items() if "mma.sync.aligned.m16n8k16" in b}
    # fc1 (16x256x128) and fc2 (16x256x256) are taken; fc3's N = 10 is below MIN_N: dlight's rule keeps it
    assert len(taken) == 2 and all("matmul2" not in k for k in taken), sorted(taken)
    for k in taken:
        assert "ldmatrix.sync.aligned" in mm[k], k
        assert "ptx_cp_async" in mm[k] and "cp_async_wait_group" in mm[k], k    # helpers around cp.async
        assert "max(" in mm[k] or "fmaxf" in mm[k], f"{k}: the bias + ReLU epilogue is fused into the store"


@pytest.mark.slow
def test_rule_declines_batched_fp32_tiny_and_old_arch_kernels():
    from tvm import tirx
    from workbench.models import schedules, zoo
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    rule = schedules.mma_rule()

    def applied(model, b, precision, target=tgt) -> dict[str, bool]:
        fused = schedules.fuse(zoo.get(model).make_module(b), tgt, precision)
        with target:
            return {gv.name_hint: rule.apply(f, target, False) is not None
                    for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}

    fp16 = applied("tiny_transformer", 2, "fp16")
    dense = {k for k in fp16 if k.startswith("fused_matmul")}
    taken = {k for k, v in fp16.items() if v}
    assert taken and taken <= dense
    # the pooler (M = batch = 2) goes to dlight; the batched attention matmuls are taken (test_models_mma_batched)
    assert dense - taken == {k for k in dense if k.endswith("_tanh")}, sorted(dense - taken)     # (its tanh)
    assert not any(v for k, v in fp16.items() if "softmax" in k or "layer_norm" in k)
    assert not any(applied("mlp", 16, "fp32").values())           # fp32 inputs: not tensor-core kernels
    old = make_target("cuda", "sm_75")
    assert not any(applied("mlp", 16, "fp16", old).values())      # mma.m16n8k16 f16 + cp.async need sm_80


@pytest.mark.slow
def test_conv_as_matmul_is_normalized_and_direct_conv_declined():
    """A matmul-lowered 3x3 conv (im2col of shifted slices, batch x H x W rows) folds into the 2-D form; a
    direct NCHW conv (shifted reads, 3 reduction axes) is refused: its vectorized gathers hit a TVM CUDA
    codegen bug (8-lane int64 indices), so dlight keeps it."""
    from tvm import tirx
    from workbench.models import schedules, tensorcore, zoo
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    for conv in ("matmul", "direct"):
        fused = schedules.fuse(zoo.get("resnet18", conv=conv).make_module(1), tgt, "fp16")
        shapes, refused = {}, []
        for gv, f in fused.functions_items():
            if isinstance(f, tirx.PrimFunc) and ("conv2d" in gv.name_hint or "matmul" in gv.name_hint):
                try:
                    shapes[gv.name_hint] = tensorcore.gemm_shape(f)
                except tensorcore.TensorCoreError as e:
                    refused.append(str(e))
        if conv == "matmul":      # layer2's 3x3 conv at b1: M = 28 * 28, N = 128, K = 9 * 128
            assert (784, 128, 1152, False) in shapes.values(), sorted(set(shapes.values()))
        else:
            assert not [k for k in shapes if "conv2d" in k] and any("direct convolution" in r for r in refused)


# ---------------------------------------------------------------------------------------------------------
# Issue 8: the 2-stage cp.async pipeline race (round 3: conv-as-matmul models wrong / NaN with mma)
# ---------------------------------------------------------------------------------------------------------

def test_cp_async_hazards_flags_a_wait_before_the_commit_of_its_copies():
    from workbench.models.tensorcore import cp_async_hazards
    head = 'extern "C" __global__ void __launch_bounds__(128) k_kernel(half* A);\n'

    def kernel(body: str) -> str:
        return head + 'extern "C" __global__ void __launch_bounds__(128) k_kernel(half* A) {\n' + body + "}\n"
    ok = kernel("ptx_cp_async_legacy_cg_16_2_2(a, 0, b, 0);\ncommit_group();\n"
                "ptx_cp_async_legacy_pred_cg_16_2_2(a, 8, b, 8, 1);\nasync_commit_group();\nwait_group_1();\n"
                "__syncthreads();\nasync_wait_group_0();\n")
    racy = kernel("ptx_cp_async_legacy_cg_16_2_2(a, 0, b, 0);\nasync_wait_group_0();\n__syncthreads();\n"
                  "ldmatrix();\nasync_commit_group();\n")
    assert cp_async_hazards(ok) == []
    assert cp_async_hazards(racy) == ["k_kernel"]
    assert cp_async_hazards(head) == []                   # a declaration alone is no kernel


def _gemm_cuda(k: int, two_stage: str | None = None) -> str:
    import tvm
    from workbench.models import tensorcore as tc
    from workbench.models.compiler import cuda_sources, make_target
    tgt = make_target("cuda", "sm_90")
    with tgt:
        f = tc.schedule_gemm(tc.gemm_func(256, 128, k, "float16"), tc.named_config("t64"),
                             two_stage=two_stage).mod["main"].with_attr("tirx.is_scheduled", True)
    with tvm.transform.PassContext(opt_level=3, config=tc.PASS_CONFIG):
        ex = tvm.compile(tvm.IRModule({"main": f}), target=tgt)
    return "\n".join(cuda_sources(ex))


@pytest.mark.slow
def test_two_step_k_loops_run_unpipelined_and_no_mma_kernel_waits_on_uncommitted_copies():
    """K = 64 (two 32-deep steps, ResNet's 64-channel 1x1 convs): the 2-stage pipeline round 3 measured
    waited on its first copies before committing them (wrong whole models, NaN); the rule now copies
    synchronously there, deeper K loops keep their cp.async pipeline, and no kernel has the hazard."""
    from workbench.models import tensorcore as tc
    legacy = _gemm_cuda(64, "legacy")
    assert "cp.async" in legacy and tc.cp_async_hazards(legacy) == ["main_kernel"]
    now = _gemm_cuda(64)
    assert "mma.sync.aligned.m16n8k16" in now and "ldmatrix" in now
    assert "cp.async" not in now and "wait_group" not in now and tc.cp_async_hazards(now) == []
    ordered = _gemm_cuda(64, "ordered")                    # the check's alternative: both stages apart
    assert "cp.async.cg" in ordered and tc.cp_async_hazards(ordered) == []
    for k in (96, 147, 576):                               # 3 steps (3 deep), 5 steps ragged K, 18 steps
        src = _gemm_cuda(k)
        assert "cp.async" in src and "wait_group" in src, k
        assert tc.cp_async_hazards(src) == [], k
    with pytest.raises(tc.TensorCoreError, match="two_stage must be one of"):
        tc.schedule_gemm(tc.gemm_func(256, 128, 64), two_stage="yes")


@pytest.mark.slow
def test_resnet18_conv_as_matmul_mma_kernels_have_no_cp_async_hazard():
    """The fused conv-as-matmul kernels of resnet18 (fp16, b1) the rule takes, compiled together: all use
    mma.sync, none waits on uncommitted copies, and layer2's K = 64 downsample conv has no cp.async."""
    import tvm
    from tvm import tirx
    from workbench.models import schedules, tensorcore, zoo
    from workbench.models.compiler import cuda_sources, make_target
    tgt = make_target("cuda", "sm_90")
    fused = schedules.fuse(zoo.get("resnet18", conv="matmul").make_module(1), tgt, "fp16")
    rule = schedules.mma_rule()
    funcs, shapes = {}, {}
    with tgt:
        for gv, f in fused.functions_items():
            if not isinstance(f, tirx.PrimFunc):
                continue
            sch = rule.apply(f, tgt, False)
            if sch is not None:
                funcs[gv.name_hint] = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(
                    "global_symbol", gv.name_hint)
                shapes[gv.name_hint] = tensorcore.gemm_shape(f)[:3]
    assert len(funcs) >= 12, sorted(funcs)
    two_step = [n for n, (m, n_, k) in shapes.items() if k == 64]
    assert two_step, shapes
    with tvm.transform.PassContext(opt_level=3, config=tensorcore.PASS_CONFIG):
        ex = tvm.compile(tvm.IRModule(funcs), target=tgt)
    src = "\n".join(cuda_sources(ex))
    assert tensorcore.cp_async_hazards(src) == []
    bodies = _kernel_bodies(src)
    for name in funcs:
        body = bodies[name + "_kernel"]
        assert "mma.sync.aligned.m16n8k16" in body, name
        assert ("ptx_cp_async" not in body) == (name in two_step), name      # (the helpers' calls)
