"""The injective rule (schedules.InjectiveVectorize, ScheduleSpec.injective): vectorized elementwise / im2col
kernels for the CUDA pipeline.

CPU only: CUDA compiles for sm_90 need no GPU (NVRTC runs here too); what the kernels compute and how fast is
measured on the H200 by `bench.kernel_quality run` (round 5 bundle) against the NumPy reference.
"""
from __future__ import annotations

import json
import re

import pytest

from workbench.models.schedules import ScheduleError, ScheduleSpec, check_choice
from workbench.models.tuning import Variant


def test_spec_injective_is_off_by_default_and_round_trips(tmp_path):
    assert ScheduleSpec().injective is None and ScheduleSpec().to_json() == {}
    on = ScheduleSpec.from_json({"small_reduction": 256, "injective": 8})
    assert on.injective == 8 and not on.is_default
    assert on.to_json() == {"small_reduction": 256, "injective": 8}
    assert ScheduleSpec.from_json(on.to_json()) == on
    v = Variant("matmul", "fp16", on)
    assert Variant.from_json(json.loads(json.dumps(v.to_json()))) == v
    assert "injective=8" in v.describe() and "small_reduction=256" in v.describe()
    for bad in (3, 0, 32, True, "8"):
        with pytest.raises(ScheduleError, match="schedule.injective: lanes must be one of 2, 4, 8, 16"):
            ScheduleSpec(injective=bad)
    assert check_choice({"rule": "injective", "lanes": 4}) == {"rule": "injective", "lanes": 4}
    # a per-batch plan that merges per-kernel choices keeps the entry's other settings (injective, mma)
    from workbench.models import tuning
    k = {"00ff": {"rule": "small_reduction", "threads": 128}}
    tuning.record("mlp", "cuda", "sm_90", Variant("direct", "fp16", ScheduleSpec(injective=8, mma=False,
                                                                                   kernels=k)),
                  16, {"p50_ms": 1.0}, directory=tmp_path)
    p = tuning.plan("mlp", "cuda", "sm_90", [4, 16], "fp16", directory=tmp_path)
    for b in (4, 16):
        s = p.variants[b].schedule
        assert (s.injective, s.mma, s.kernels) == (8, False, k), b


def test_default_rules_include_the_rule_only_when_switched_on():
    from workbench.models import schedules
    names = lambda spec: [type(r).__name__ for r in schedules.default_rules(spec)]   # noqa: E731
    assert "InjectiveVectorize" not in names(ScheduleSpec())
    on = names(ScheduleSpec(small_reduction=256, injective=8))
    assert on.index("SmallReduction") < on.index("InjectiveVectorize") < on.index("Fallback")


def _sch_lanes(sch) -> int | None:
    """The vector width of a scheduled kernel (None: not scheduled)."""
    if sch is None:
        return None
    m = re.search(r"T\.vectorized\(T\.int64\((\d+)\)\)|T\.vectorized\((\d+)\)", sch.mod["main"].script())
    assert m, sch.mod["main"].script()
    return int(m.group(1) or m.group(2))


def test_rule_takes_aligned_injective_kernels_and_declines_the_rest():
    from tvm import te, tirx
    from workbench.models import schedules
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    rule = schedules.injective_rule(8)

    def lanes(*tensors) -> int | None:
        with tgt:
            return _sch_lanes(rule.apply(te.create_prim_func(list(tensors)), tgt, False))

    x = te.placeholder((16, 64), "float16", name="x")
    bias = te.placeholder((64,), "float16", name="bias")
    row = te.placeholder((16,), "float16", name="row")
    add = te.compute((16, 64), lambda i, j: x[i, j] + bias[j] + row[i], name="add")
    assert lanes(x, bias, row, add) == 8                       # 8 fp16 = 16 bytes; row[i] is broadcast
    xf = te.placeholder((16, 64), "float32", name="xf")
    cast = te.compute((16, 64), lambda i, j: xf[i, j].astype("float16"), name="cast")
    assert lanes(xf, cast) == 4                                # fp32 reads cap it at 16 bytes
    # a concatenation at multiples of the vector: the lane-uniform `64 <= j` becomes `8 <= j // 8`
    y = te.placeholder((16, 64), "float16", name="y")
    cat = te.compute((16, 128), lambda i, j: tirx.if_then_else(j >= 64, y[i, j - 64], x[i, j]), name="cat")
    assert lanes(x, y, cat) == 8
    x6 = te.placeholder((16, 6), "float16", name="x6")
    assert lanes(x6, te.compute((16, 6), lambda i, j: x6[i, j] * x6[i, j], name="sq")) == 2   # 6 % 4 != 0
    # declined: odd innermost extent, reductions, transposes (gathers), lane-dependent conditions and
    # unaligned reads (a pad along the innermost axis), int64 buffers
    x7 = te.placeholder((16, 147), "float16", name="x7")
    assert lanes(x7, te.compute((16, 147), lambda i, j: x7[i, j] + x7[i, j], name="odd")) is None
    r = te.reduce_axis((0, 64), name="r")
    assert lanes(x, te.compute((16,), lambda i: te.sum(x[i, r], axis=[r]), name="sum")) is None
    assert lanes(x, te.compute((64, 16), lambda i, j: x[j, i], name="t")) is None
    def pad(p: int):
        return te.compute((16, 64 + 2 * p), lambda i, j: tirx.if_then_else(
            tirx.all(j >= p, j < 64 + p), x[i, j - p], tirx.const(0, "float16")), name=f"pad{p}")
    assert lanes(x, pad(1)) is None
    assert lanes(x, pad(4)) == 4                               # whole 4-vectors are padding or data
    xi = te.placeholder((16, 64), "int64", name="xi")
    assert lanes(xi, te.compute((16, 64), lambda i, j: xi[i, j] + xi[i, j], name="i64")) is None


def test_a_concatenation_seen_through_split_ks_reshape_is_taken_where_its_pieces_stay_whole_vectors():
    """Split-K reads an im2col's [.., K] columns as [.., S, K / S] (a view, which fusion writes into the im2col's
    kernel): the concatenation's tests become `c <= s * (K / S) + v`, and the reshape's indices floordiv /
    floormod by K. Both hold for a whole vector when every piece starts at a multiple of the lanes (after the
    indices are simplified by the loops' bounds); a piece starting elsewhere gets fewer lanes or none."""
    from tvm import te, tirx
    from workbench.models import schedules
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    rule = schedules.injective_rule(8)

    def reshaped_cat(piece: int, pieces: int):
        xs = [te.placeholder((16, piece), "float16", name=f"x{i}") for i in range(pieces)]
        k = pieces * piece

        def col(i, c):
            e = xs[0][i, c]
            for j in range(1, pieces):
                e = tirx.if_then_else(c >= j * piece, xs[j][i, c - j * piece], e)
            return e
        cat = te.compute((16, k), col, name="cat")
        out = te.compute((16, 2, k // 2), lambda i, s, v: cat[(i + (s * (k // 2) + v) // k) % 16,
                                                             (s * (k // 2) + v) % k], name="T_reshape")
        with tgt:
            return _sch_lanes(rule.apply(te.create_prim_func([*xs, out]), tgt, False))
    assert reshaped_cat(64, 3) == 8                            # pieces at 0, 64, 128 of 2 x 96
    assert reshaped_cat(12, 4) == 4                            # at 12, 24, 36 of 2 x 24: whole 4-vectors only
    assert reshaped_cat(13, 4) is None                         # at 13: every vector would straddle two pieces


@pytest.fixture(scope="module")
def resnet18_fp16_kernels():
    from workbench.models import schedules, zoo
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    fused = schedules.fuse(zoo.get("resnet18", conv="matmul").make_module(1), tgt, "fp16")
    return tgt, schedules.kernels(fused, tgt)


@pytest.mark.slow
def test_resnet_im2col_and_cast_kernels_get_vector_loads_and_stores(resnet18_fp16_kernels):
    """The kernels of ResNet-18-matmul fp16 that dlight's Fallback had: the im2col (pad, 9 shifted slices,
    concatenation along channels, fp16 cast) and weight casts are taken, with float4 loads and half4 stores
    in CUDA that NVRTC compiles; the stem's im2col (147 = 7 x 7 x 3 channels) and every reduction and matmul
    kernel are left to the other rules."""
    import tvm
    from workbench.models import cubin_cache, schedules
    from workbench.models.compiler import cuda_sources
    tgt, kernels = resnet18_fp16_kernels
    rule = schedules.injective_rule(8)
    taken, funcs = {}, {}
    with tgt:
        for k in kernels:
            sch = schedules.apply_rules(k.func, tgt, [rule])
            if sch is not None:
                taken[k.name] = k.default_rule
                funcs[k.name] = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("global_symbol",
                                                                                               k.name)
    im2col = [n for n in taken if "concatenate" in n]
    assert len(im2col) >= 3 and any(n.startswith("cast") for n in taken), sorted(taken)
    assert set(taken.values()) == {"fallback"}                  # only kernels Fallback scheduled before
    assert not [n for n in taken if "transpose" in n or "matmul" in n or "pool" in n]
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(tvm.IRModule({n: funcs[n] for n in im2col[:2] + [n for n in taken
                                                                          if n.startswith("cast")][:2]}),
                         target=tgt)
    src = "\n".join(cuda_sources(ex))
    assert "*(float4*)(" in src and "*(half4*)(" in src            # 16-byte loads, 8-byte stores
    assert "make_ulonglong4" not in src                           # (TVM's broken fp32 x 8 constants)
    assert cubin_cache.compile_cubin(src, "sm_90").startswith(b"\x7fELF")


@pytest.mark.slow
def test_resnet18_fp16_builds_with_the_rule(resnet18_fp16_kernels):
    """The whole model builds with the setting, and only Fallback's kernels change rule."""
    from workbench.models import zoo
    from workbench.models.compiler import build_relax, cuda_sources, lower
    tgt, _ = resnet18_fp16_kernels
    applied: dict = {}
    v = Variant("matmul", "fp16", ScheduleSpec(small_reduction=256, injective=8))
    ex = build_relax(lower(zoo.get("resnet18", conv="matmul").make_module(1), tgt, v, applied), tgt)
    src = "\n".join(cuda_sources(ex))
    assert "mma.sync.aligned.m16n8k16" in src and "*(float4*)(" in src and "*(half4*)(" in src
