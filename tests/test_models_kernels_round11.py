"""Round-11 kernel levers (bench/results/kernel_breakdown.md's findings after round 10):

- ScheduleSpec.reduce_inputs "fp16" (schedules.keep_fp16_activations(reduce_inputs="fp16")): softmax, layer norm
  and the average pool read their fp16 input and widen it inside their own kernel, so the producer (QK^T, the
  residual add's matmul epilogue) stores fp16 instead of fp32;
- ScheduleSpec.row_reduction (schedules.RowReduction): softmax / layer norm with threads per row fitted to the row;
- ScheduleSpec.rows (schedules.InjectiveRows): gathers InjectiveVectorize declines (the RGB stem's im2col, BERT's
  head transposes) as rows of coalesced stores, index arithmetic once per thread.

CPU only: the Relax modules and their numerics on LLVM against the NumPy reference; CUDA builds for sm_90 (and
NVRTC) need no GPU. Speed is measured on the H200 by `bench.kernel_quality run` on the round-11 bundle.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from relax_walk import bindings as _bindings, dtype as _dtype
from workbench.models.schedules import ScheduleError, ScheduleSpec
from workbench.models.tuning import Variant

LEVERS = dict(injective=8, activations="fp16", reduce_inputs="fp16", rows=8, row_reduction=256)


# ---------------------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------------------

def test_new_settings_are_off_by_default_round_trip_and_name_bad_values():
    d = ScheduleSpec()
    assert (d.reduce_inputs, d.rows, d.row_reduction) == ("fp32", None, None) and d.to_json() == {}
    on = ScheduleSpec(**LEVERS)
    assert not on.is_default
    assert on.to_json() == {"injective": 8, "activations": "fp16", "reduce_inputs": "fp16", "rows": 8,
                            "row_reduction": 256}
    assert ScheduleSpec.from_json(json.loads(json.dumps(on.to_json()))) == on
    v = Variant("direct", "fp16", on, weights="fp16")
    assert Variant.from_json(json.loads(json.dumps(v.to_json()))) == v
    for spec in (ScheduleSpec(rows=8), ScheduleSpec(row_reduction=32),
                 ScheduleSpec(activations="fp16", reduce_inputs="fp16")):
        assert not spec.is_default
    with pytest.raises(ScheduleError, match=r"schedule.reduce_inputs 'fp16' needs activations 'fp16'"):
        ScheduleSpec(reduce_inputs="fp16")
    with pytest.raises(ScheduleError, match=r"schedule.reduce_inputs must be one of fp32, fp16.*got 'bf16'"):
        ScheduleSpec(activations="fp16", reduce_inputs="bf16")
    for bad in (0, 3, 64, True, "8"):
        with pytest.raises(ScheduleError, match=r"schedule.rows must be one of 1, 2, 4, 8, 16, 32"):
            ScheduleSpec(rows=bad)
    for bad in (16, 48, 2048, True):
        with pytest.raises(ScheduleError, match=r"schedule.row_reduction must be one of 32, 64, 128, 256, 512, 1024"):
            ScheduleSpec(row_reduction=bad)
    with pytest.raises(ScheduleError, match=r"unknown field\(s\) reduce_input;.*reduce_inputs, rows, row_reduction"):
        ScheduleSpec.from_json({"reduce_input": "fp16"})


def test_default_rules_place_the_new_rules_ahead_of_the_rules_they_relieve():
    from workbench.models import schedules
    names = lambda spec: [type(r).__name__ for r in schedules.default_rules(spec)]   # noqa: E731
    assert not {"InjectiveRows", "RowReduction"} & set(names(ScheduleSpec(injective=8)))
    on = names(ScheduleSpec(**LEVERS))
    assert on.index("InjectiveVectorize") < on.index("InjectiveRows") < on.index("Fallback")
    assert on.index("RowReduction") < on.index("GeneralReduction")


# ---------------------------------------------------------------------------------------------------------
# reduce_inputs "fp16": the Relax module and its kernels
# ---------------------------------------------------------------------------------------------------------

def _calls(fused):
    """(kernel name, input vars, output var) per call_tir of a fused module's main."""
    from tvm import relax
    out = []
    for b in _bindings(fused["main"]):
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir":
            out.append((b.value.args[0].name_hint, list(b.value.args[1].fields), b.var))
    return out


@pytest.mark.parametrize("model,conv,reducers", [("tiny_transformer", None, ("softmax", "layer_norm")),
                                                  ("resnet18", "matmul", ("adaptive_avg_pool2d",))])
def test_reductions_read_fp16_and_their_producers_store_fp16(model, conv, reducers):
    """With reduce_inputs fp16 no kernel reads an fp32 tensor another kernel wrote (before: every softmax, layer
    norm and the average pool did), the reductions read fp16, no kernel is added, and the rewrite is idempotent."""
    import tvm_ffi
    from workbench.models import schedules, zoo
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get(model, conv=conv).make_module(2)
    found = {}
    for ri in ("fp32", "fp16"):
        calls = _calls(schedules.fuse(mod, tgt, "fp16", "fp16", "fp16", ri))
        produced = {out: name for name, _, out in calls}
        fp32_reads = [(produced[a], name) for name, args, _ in calls for a in args
                      if a in produced and _dtype(a) == "float32"]
        readers = {name: [_dtype(a) for a in args if a in produced] for name, args, _ in calls
                   if any(r in name for r in reducers)}
        found[ri] = (len(calls), fp32_reads, readers)
    n0, reads0, readers0 = found["fp32"]
    n1, reads1, readers1 = found["fp16"]
    assert reads0 and all(any(r in reader for r in reducers) for _, reader in reads0), reads0
    assert reads1 == [] and n1 <= n0
    assert readers1 and all(d == ["float16"] for d in readers1.values()), readers1
    assert {n for n in readers0 if "float32" in readers0[n]}
    # idempotent: running the rewrite again changes nothing
    once = schedules.mixed_precision(mod, "fp16", "fp16", "fp16", "fp16")
    assert tvm_ffi.structural_equal(once, schedules.keep_fp16_activations(once, "fp16"), map_free_vars=True)


def test_reduce_inputs_is_checked_where_it_is_given():
    from workbench.models import schedules, zoo
    mod = zoo.get("mlp").make_module(2)
    with pytest.raises(ScheduleError, match="reduce_inputs fp16 needs activations fp16"):
        schedules.mixed_precision(mod, "fp16", "fp32", "fp32", "fp16")
    with pytest.raises(ScheduleError, match=r"unknown reduce_inputs 'fp8'; valid: fp32, fp16"):
        schedules.mixed_precision(mod, "fp16", "fp16", "fp32", "fp8")


def test_numerics_on_the_cpu_match_the_fp32_widening():
    """tiny_transformer b2 on LLVM: the softmax and layer norms widened inside their kernels give the values they
    gave widened by their producers (the widened value was an fp16 value either way), within bench.kernel_quality's
    fp16 tolerance of the NumPy float64 reference."""
    import tvm
    from tvm import relax
    from bench.kernel_quality import TOLERANCE, numerics
    from workbench.models import schedules, zoo
    from workbench.models.reference import reference_forward
    src = zoo.get("tiny_transformer")
    x = np.random.default_rng(7).integers(0, 1000, (2, *src.inputs[0].shape)).astype("int32")
    weights = src.weights()
    ref = reference_forward("tiny_transformer", [x], weights)
    out = {}
    for ri in ("fp32", "fp16"):
        mod = schedules.mixed_precision(src.make_module(2), "fp16", "fp16", "fp16", ri)
        main = mod["main"]
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        ws = [tvm.runtime.tensor(w.astype(_dtype(p))) for (_, w), p in zip(weights, list(main.params)[1:])]
        out[ri] = vm["main"](tvm.runtime.tensor(x), *ws).numpy()
    r = numerics(out["fp16"], ref, "fp16")
    assert r["pass"] and r["rel_err"] < TOLERANCE["fp16"] / 3, r
    scale = float(np.abs(ref).max())
    assert float(np.abs(out["fp16"] - out["fp32"]).max()) <= 1e-3 * scale


# ---------------------------------------------------------------------------------------------------------
# The rules, on single kernels (CUDA source, NVRTC)
# ---------------------------------------------------------------------------------------------------------

def _cuda(funcs: dict) -> str:
    import tvm
    from workbench.models.compiler import cuda_sources, make_target
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(tvm.IRModule({n: f.with_attr("tirx.is_scheduled", True).with_attr("global_symbol", n)
                                       for n, f in funcs.items()}), target=make_target("cuda", "sm_90"))
    return "\n".join(cuda_sources(ex))


def _signature(src: str, kernel: str) -> str:
    m = re.search(r"__global__ void __launch_bounds__\((\d+)\) " + kernel + r"\(([^)]*)\)", src)
    assert m, kernel
    return m.group(1) + ":" + m.group(2)


def test_row_reduction_fits_threads_to_bert_rows_and_reads_fp16():
    """BERT-base b16's softmax (rows of 128) and layer norm (rows of 768) as keep_fp16_activations emits them with
    reduce_inputs fp16: RowReduction gives the softmax one warp per row (warp shuffles, no block-wide
    reduction), four rows to a thread block, and the layer norm 256 threads; both kernels read and write half;
    NVRTC compiles them. A layer norm whose epilogue has another shape (the [CLS] slice) is declined."""
    from tvm import te, topi
    from workbench.models import cubin_cache, schedules
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    x = te.placeholder((16, 12, 128, 128), "float16", name="scores")
    softmax = te.create_prim_func([x, topi.cast(topi.nn.softmax(topi.cast(x, "float32"), -1), "float16")])
    h = te.placeholder((16, 128, 768), "float16", name="hidden")
    g = te.placeholder((768,), "float32", name="gamma")
    b = te.placeholder((768,), "float32", name="beta")
    normed = topi.nn.layer_norm(topi.cast(h, "float32"), g, b, axis=[-1], epsilon=1e-12)
    layer_norm = te.create_prim_func([h, g, b, topi.cast(normed, "float16")])
    cls = te.create_prim_func([h, g, b, topi.strided_slice(topi.cast(normed, "float16"), [0, 0, 0], [16, 1, 768])])
    rule = schedules.row_reduction_rule(256)
    with tgt:
        got = {n: schedules.apply_rules(f, tgt, [rule]) for n, f in
               (("softmax", softmax), ("layer_norm", layer_norm), ("cls", cls))}
        assert got["cls"] is None
    src = _cuda({n: got[n].mod["main"] for n in ("softmax", "layer_norm")})
    sm = _signature(src, "softmax_kernel")
    assert sm.startswith("128:") and "float*" not in sm and "half* __restrict__ scores_ptr" in sm, sm   # 4 rows
    ln = _signature(src, "layer_norm_kernel")
    assert ln.startswith("256:") and "half* __restrict__ hidden_ptr" in ln, ln
    body = src.split("softmax_kernel(", 2)[2].split("extern \"C\"")[0]
    assert "__shfl_down_sync" in body and "red_buf_staging" not in body     # warp reductions only
    assert "threadIdx.y" in body and "threadIdx.y" not in src.split("layer_norm_kernel(", 2)[2]
    assert cubin_cache.compile_cubin(src, "sm_90").startswith(b"\x7fELF")


@pytest.fixture(scope="module")
def resnet18_b16_kernels():
    from workbench.models import schedules, zoo
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    fused = schedules.fuse(zoo.get("resnet18", conv="matmul").make_module(16), tgt, "fp16", "fp16", "fp16", "fp16")
    return tgt, schedules.kernels(fused, tgt)


@pytest.mark.slow
def test_injective_rows_takes_the_stem_gather_and_only_what_the_vector_rule_declines(resnet18_b16_kernels):
    """ResNet-18-matmul b16 fp16: the RGB stem's im2col (f32 NCHW image -> f16 [16, 112, 112, 147]) goes to
    InjectiveRows: 147 threads, one per column, 8 output pixels each (consecutive threads store consecutive
    halves), 32-bit index arithmetic, NVRTC compiles it. Every other kernel keeps the rule it had."""
    from workbench.models import cubin_cache, schedules
    tgt, kernels = resnet18_b16_kernels
    before = ScheduleSpec(small_reduction=256, injective=8, activations="fp16", reduce_inputs="fp16")
    after = ScheduleSpec(small_reduction=256, injective=8, activations="fp16", reduce_inputs="fp16", rows=8)
    changed, stem = {}, None
    with tgt:
        for k in kernels:
            r0 = type(schedules.first_schedule(k.func, tgt, schedules.default_rules(before))[1]).__name__
            sch, rule = schedules.first_schedule(k.func, tgt, schedules.default_rules(after))
            if type(rule).__name__ != r0:
                changed[k.name] = (r0, type(rule).__name__)
            if "im2col" in k.name:
                stem = (k, sch)
    assert stem is not None and stem[0].params == [((16, 3, 224, 224), "float32"), ((16, 112, 112, 147), "float16")]
    assert changed == {stem[0].name: ("Fallback", "InjectiveRows")}, changed
    src = _cuda({stem[0].name: stem[1].mod["main"]})
    sig = _signature(src, stem[0].name + "_kernel")
    assert sig.startswith("147:") and "half* __restrict__" in sig and "float* __restrict__" in sig, sig
    body = src.split(stem[0].name + "_kernel(", 2)[2]
    assert "int64_t" not in body
    # 8 pixels per thread: stores at +0, +147, ..., +1029 halves from the thread's first
    assert all(f"+ {147 * i})]" in body for i in range(1, 8))
    assert cubin_cache.compile_cubin(src, "sm_90").startswith(b"\x7fELF")


def test_injective_rows_declines_reductions_short_rows_and_non_row_stores():
    from tvm import te
    from workbench.models import schedules
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    rule = schedules.injective_rows_rule(8)

    def takes(*tensors) -> bool:
        with tgt:
            return schedules.apply_rules(te.create_prim_func(list(tensors)), tgt, [rule]) is not None

    x = te.placeholder((64, 147), "float16", name="x")
    assert takes(x, te.compute((64, 147), lambda i, j: x[i, j] * x[i, j], name="sq"))
    assert takes(x, te.compute((60, 147), lambda i, j: x[i + 4, j], name="rows4"))     # 60 % 8: 4 rows a thread
    r = te.reduce_axis((0, 147), name="r")
    assert not takes(x, te.compute((64,), lambda i: te.sum(x[i, r], axis=[r]), name="sum"))
    s = te.placeholder((64, 16), "float16", name="s")
    assert not takes(s, te.compute((64, 16), lambda i, j: s[i, j] + s[i, j], name="short"))    # < 32 threads
    assert not takes(x, te.compute((2048,), lambda i: x[i // 147 % 64, i % 147], name="flat"))   # one axis


# ---------------------------------------------------------------------------------------------------------
# A whole model for sm_90, and round 11's candidates
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_transformer_cuda_build_with_all_levers():
    """tiny_transformer b16 for sm_90 with round 11's BERT variant: softmax and layer norms scheduled by
    RowReduction and reading half, no head transposes (attention's einsums read [b, s, heads, d]), QK^T and PV
    on mma.sync reading half, QK^T storing half, no kernel reads fp32 from another kernel, no lone activation
    cast, no cp.async hazard, NVRTC compiles it."""
    from bench.build_kernel_candidates import activation_casts
    from workbench.models import zoo
    from workbench.models.compiler import build_relax, cuda_kernels, cuda_sources, lower, make_target
    from workbench.models.cubin_cache import compile_cubin
    from workbench.models.tensorcore import cp_async_hazards
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get("tiny_transformer").make_module(16)
    v = Variant("direct", "fp16", ScheduleSpec(**LEVERS), weights="fp16")
    rules: dict = {}
    low = lower(mod, tgt, v, None, rules)
    sources = cuda_sources(build_relax(low, tgt))
    kernels = {n: body for s in sources for n, body in cuda_kernels(s).items()}
    assert rules["softmax"] == "RowReduction" and rules["layer_norm"] == "RowReduction", rules
    cls = [n for n in rules if n.startswith("fused_layer_norm") and "strided_slice" in n]
    assert len(cls) == 1 and rules[cls[0]] == "GeneralReduction", rules       # the [CLS] slice: RowReduction declines
    assert not [n for n in rules if "transpose" in n], rules      # the head reshapes are views of the einsums' operands
    qk = [n for n in rules if n.startswith("fused_einsum")]
    pv = [n for n in rules if n.startswith("einsum")]
    assert len(qk) == len(pv) == 1 and rules[qk[0]] == rules[pv[0]] == "MmaMatmul", rules
    head = kernels["softmax_kernel"].split("{", 1)[0]
    assert "float*" not in head and head.count("half*") == 2, head
    assert "float*" not in kernels[f"{qk[0]}_kernel"].split("{", 1)[0]
    assert activation_casts(sources, [p.name for p in mod["main"].params]) == []
    assert [h for s in sources for h in cp_async_hazards(s)] == []
    assert all(compile_cubin(s, "sm_90").startswith(b"\x7fELF") for s in sources)


def test_round11_candidates():
    from bench.build_kernel_candidates import ROUNDS
    cands, jobs = ROUNDS[11](["bert_base", "resnet50", "resnet18", "mobilenet_v2"])
    assert jobs == []
    full = {(c.model, c.batch) for c in cands if c.label.endswith("-ri16-rr256-rows8")}
    assert full == {("bert_base", 1), ("bert_base", 16), ("resnet50", 1), ("resnet50", 16), ("resnet18", 16)}
    for c in cands:
        v = Variant.from_json(c.variant)
        assert v.precision == "fp16" and v.weights == "fp16" and v.schedule.activations == "fp16"
        assert v.schedule.injective == 8 and v.lowering == ("direct" if c.model == "bert_base" else "matmul")
        assert ("-ri16" in c.label) == (v.schedule.reduce_inputs == "fp16")
        assert ("-rows8" in c.label) == (v.schedule.rows == 8)
        assert ("-rr256" in c.label) == (v.schedule.row_reduction == 256)
    assert len({c.id for c in cands}) == len(cands)
    assert [c for c in ROUNDS[11](["resnet18"])[0]] == [c for c in cands if c.model == "resnet18"]
