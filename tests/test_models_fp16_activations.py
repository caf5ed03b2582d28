"""fp16 activations between kernels (ScheduleSpec.activations = "fp16", schedules.keep_fp16_activations).

CPU only: the Relax module after the mixed-precision pass is checked here (dtypes, fusion, and its numerics run
on the CPU against the NumPy reference); CUDA compiles for sm_90 need no GPU. What the CUDA kernels compute and
how fast is measured on the H200 by `bench.kernel_quality run` (round 7 bundle) against the NumPy reference.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench.kernel_quality import TOLERANCE, numerics
from relax_walk import bindings as _bindings, dtype as _dtype, op_name as _op
from workbench.models.schedules import ScheduleError, ScheduleSpec
from workbench.models.tuning import TuningError, Variant, load_model_file

ROOT = Path(__file__).resolve().parents[1]
ACT16 = ScheduleSpec(injective=8, activations="fp16")


# ---------------------------------------------------------------------------------------------------------
# Selecting it: the spec, the variant, the tuning database
# ---------------------------------------------------------------------------------------------------------

def test_activations_default_fp32_round_trip_and_older_entries_read_unchanged():
    assert ScheduleSpec().activations == "fp32" and ScheduleSpec().is_default
    on = ScheduleSpec.from_json({"small_reduction": 256, "injective": 8, "activations": "fp16"})
    assert on.activations == "fp16" and not on.is_default
    assert on.to_json() == {"small_reduction": 256, "injective": 8, "activations": "fp16"}
    # the default is never written, even when given
    assert ScheduleSpec.from_json({"injective": 8, "activations": "fp32"}).to_json() == {"injective": 8}
    v = Variant("matmul", "fp16", on)
    assert Variant.from_json(json.loads(json.dumps(v.to_json()))) == v
    assert "activations=fp16" in v.describe()
    assert not Variant(precision="fp16", schedule=ScheduleSpec(activations="fp16")).is_default
    # every committed entry writes back exactly what is stored; only entries that say so have fp16 activations
    files = sorted((ROOT / "data" / "tuning").glob("*/*.json"))
    assert files
    for f in files:
        for p in load_model_file(f)["precisions"].values():
            for e in p["batches"].values():
                old = Variant.from_json(e["variant"])
                said = e["variant"].get("schedule", {}).get("activations", "fp32")
                assert old.schedule.activations == said and old.to_json() == e["variant"], f


def test_bad_values_name_the_key(tmp_path):
    for bad in ("bf16", "float16", 16, None):
        with pytest.raises(ScheduleError, match=r"schedule.activations must be one of fp32, fp16"):
            ScheduleSpec(activations=bad)
    with pytest.raises(ScheduleError, match=r"schedule.activations 'fp16' needs precision fp16"):
        Variant("direct", "fp32", ScheduleSpec(activations="fp16"))
    with pytest.raises(ScheduleError, match=r"unknown field\(s\) activation;.*activations"):
        ScheduleSpec.from_json({"activation": "fp16"})
    # a damaged database file names the file and the entry
    from workbench.models import tuning
    tuning.record("mlp", "cuda", "sm_90", Variant("direct", "fp16", ACT16), 16, {"p50_ms": 1.0}, directory=tmp_path)
    path = tuning.model_file("mlp", "cuda", "sm_90", tmp_path)
    d = json.loads(path.read_text())
    d["precisions"]["fp16"]["batches"]["16"]["variant"]["schedule"]["activations"] = "fp8"
    path.write_text(json.dumps(d))
    with pytest.raises(TuningError, match=rf"{re.escape(str(path))}: precisions.fp16.batches.16.variant: "
                                          r"schedule.activations must be one of fp32, fp16.*got 'fp8'"):
        tuning.load_model_file(path)


def test_a_database_entry_selects_fp16_activations_and_fp16_alone_does_not(tmp_path):
    from workbench.models import tuning, zoo
    from workbench.models.compiler import resolve_tuning
    k = {"00ff": {"rule": "small_reduction", "threads": 128}}
    tuning.record("tiny_transformer", "cuda", "sm_90",
                  Variant("direct", "fp16", ScheduleSpec(injective=8, activations="fp16", kernels=k)),
                  16, {"p50_ms": 1.0}, directory=tmp_path)
    tuning.record("tiny_transformer", "cuda", "sm_90", Variant("direct", "fp16", ScheduleSpec(injective=8)),
                  1, {"p50_ms": 0.5}, directory=tmp_path)
    stored = json.loads(tuning.model_file("tiny_transformer", "cuda", "sm_90", tmp_path).read_text())
    assert stored["precisions"]["fp16"]["batches"]["16"]["variant"]["schedule"]["activations"] == "fp16"
    assert "activations" not in stored["precisions"]["fp16"]["batches"]["1"]["variant"]["schedule"]
    # plan keeps the setting per entry (nearest batch; merging per-kernel choices keeps it too)
    p = tuning.plan("tiny_transformer", "cuda", "sm_90", [1, 2, 8, 16], "fp16", directory=tmp_path)
    assert {b: v.schedule.activations for b, v in p.variants.items()} == {1: "fp32", 2: "fp32", 8: "fp16",
                                                                          16: "fp16"}
    assert all(v.schedule.kernels == k for v in p.variants.values())
    # what `workbench compile --precision fp16` resolves: the database's variant, or plain fp16 without one
    _, variants, record = resolve_tuning(zoo.get("tiny_transformer"), [16], "cuda", "sm_90", tuning=tmp_path,
                                         precision="fp16")
    assert variants[16].schedule.activations == "fp16" and record["batches"]["16"]["from_batch"] == 16
    _, variants, record = resolve_tuning(zoo.get("tiny_transformer"), [16], "cuda", "sm_90", tuning=None,
                                         precision="fp16")
    assert record is None and variants[16] == Variant(precision="fp16")
    assert variants[16].schedule.activations == "fp32"


# ---------------------------------------------------------------------------------------------------------
# The Relax module after the mixed-precision pass
# ---------------------------------------------------------------------------------------------------------

def test_mixed_precision_module_dtypes():
    """ResNet-18 (conv as matmul) b2: the im2col, relu, max-pool and residual-add activations are fp16 (fp32 with
    ToMixedPrecision alone), matmuls still take fp16 and accumulate in fp32, the signature and the output dtype
    are unchanged, and the rewrite is idempotent."""
    import tvm_ffi
    from workbench.models import schedules, zoo
    mod = zoo.get("resnet18", conv="matmul").make_module(2)
    before = schedules.mixed_precision(mod, "fp16")
    after = schedules.mixed_precision(mod, "fp16", "fp16")
    f0, f1 = before["main"], after["main"]
    assert [(p.name, _dtype(p)) for p in f1.params] == [(p.name, _dtype(p)) for p in mod["main"].params]
    assert _dtype(f1.body.body) == _dtype(mod["main"].body.body) == "float32"
    moved = ("relax.nn.relu", "relax.nn.pad", "relax.strided_slice", "relax.concat", "relax.nn.max_pool2d")

    def dtypes(f, ops):
        return {(_op(b.value), _dtype(b.var)) for b in _bindings(f) if _op(b.value) in ops}

    assert {d for _, d in dtypes(f0, moved)} == {"float32"}
    assert {d for _, d in dtypes(f1, moved)} == {"float16"} and len({o for o, _ in dtypes(f1, moved)}) == 5
    # residual adds (both operands activations) run in fp16; bias adds (an fp32 weight) in fp32, then rounded
    params = set(f1.params)
    adds = [b for b in _bindings(f1) if _op(b.value) == "relax.add"]
    residual = [b for b in adds if not any(a in params for a in b.value.args)]
    assert residual and all(_dtype(b.var) == "float16" for b in residual)
    assert all(_dtype(b.var) == "float32" for b in adds if b not in residual)
    matmuls = [b.value for b in _bindings(f1) if _op(b.value) == "relax.matmul"]
    assert len(matmuls) == 21
    assert all(_dtype(m.args[0]) == _dtype(m.args[1]) == "float16" and str(m.attrs.out_dtype) == "float32"
               for m in matmuls)
    assert tvm_ffi.structural_equal(after, schedules.keep_fp16_activations(after), map_free_vars=True)
    with pytest.raises(ScheduleError, match="activations fp16 needs precision fp16"):
        schedules.mixed_precision(mod, "fp32", "fp16")
    with pytest.raises(ScheduleError, match=r"main compute\(s\) no fp16 values; activations fp16 needs precision"):
        schedules.keep_fp16_activations(mod)


def _kernel_calls(fused) -> tuple[list[tuple[str, list, list]], set]:
    """(kernel name, input args, output dtypes) per call_tir of a fused module's main, and main's params."""
    from tvm import relax
    main = fused["main"]
    calls = []
    for b in _bindings(main):
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir":
            args = list(b.value.args[1].fields)
            ty = b.var.ty
            outs = [str(t.dtype) for t in ty.fields] if isinstance(ty, relax.TupleType) else [str(ty.dtype)]
            calls.append((b.value.args[0].name_hint, args, outs))
    return calls, set(main.params)


@pytest.mark.parametrize("model,conv,casts_before", [("resnet18", "matmul", 0), ("tiny_transformer", None, 8)])
def test_fused_kernels_hand_each_other_fp16(model, conv, casts_before):
    """After fusion: no kernel is a lone cast of an intermediate (ToMixedPrecision alone gives them in the
    transformer: layer-norm outputs cast for each of Q, K, V and the FFN), and kernels read fp32 from another
    kernel only in front of a reduction that needs it (average pool, layer norm, softmax) or after the
    embedding gather of fp32 weight rows."""
    from tvm import relax
    from workbench.models import schedules, zoo
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get(model, conv=conv).make_module(2)
    counts = {}
    for act in ("fp32", "fp16"):
        fused = schedules.fuse(mod, tgt, "fp16", act)
        calls, params = _kernel_calls(fused)
        produced = {}
        for b in _bindings(fused["main"]):
            if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir":
                produced[b.var] = b.value.args[0].name_hint
        casts = [n for n, args, _ in calls if re.fullmatch(r"cast\d*", n) and not all(a in params for a in args)]
        fp32_reads = [(produced[a], n) for n, args, _ in calls for a in args
                      if a in produced and _dtype(a) == "float32"]
        counts[act] = (len(calls), casts, fp32_reads)
    n0, casts0, reads0 = counts["fp32"]
    n1, casts1, reads1 = counts["fp16"]
    assert len(casts0) == casts_before and not casts1
    assert n1 == n0 - len(casts0)
    assert len(reads1) < len(reads0) / 2
    for producer, reader in reads1:
        assert re.match(r"(fused_)?(adaptive_avg_pool2d|layer_norm|softmax)", reader) or producer == "take", \
            (producer, reader)


@pytest.mark.parametrize("model,batch", [("mlp", 4), ("tiny_transformer", 2)])
def test_numerics_on_the_cpu_stay_within_the_fp16_tolerance(model, batch):
    """The rewritten module compiled for the CPU (LLVM computes fp16 too) against the NumPy float64 reference,
    with bench.kernel_quality's fp16 tolerance (scale-relative max error)."""
    import tvm
    from tvm import relax
    from workbench.models import schedules, zoo
    from workbench.models.reference import reference_forward
    src = zoo.get(model)
    spec = src.inputs[0]
    rng = np.random.default_rng(7)
    x = (rng.integers(0, 1000, (batch, *spec.shape)).astype(spec.dtype) if spec.dtype.startswith("int")
         else rng.standard_normal((batch, *spec.shape)).astype(spec.dtype))
    weights = src.weights()
    ref = reference_forward(model, [x], weights)
    mod = schedules.mixed_precision(src.make_module(batch), "fp16", "fp16")
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for _, w in weights]).numpy()
    assert y.dtype == np.float32 and y.shape == ref.shape
    r = numerics(y, ref, "fp16")
    assert r["tolerance"] == TOLERANCE["fp16"] == 3e-2
    assert r["pass"] and r["rel_err"] < TOLERANCE["fp16"] / 3, r


# ---------------------------------------------------------------------------------------------------------
# CUDA: the mma rule still takes the fused kernels
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cuda_build_keeps_mma_and_has_no_activation_cast_kernel(tmp_path):
    """tiny_transformer b16 for sm_90 with the variant a database entry selects: every matmul with a bias
    epilogue is scheduled by MmaMatmul (rules_used) and is an mma.sync kernel, matmul epilogues store fp16, no
    kernel is a lone cast of an intermediate, no cp.async hazard, and NVRTC compiles the source."""
    from bench.build_kernel_candidates import activation_casts
    from workbench.models import tuning, zoo
    from workbench.models.compiler import build_relax, cuda_kernels, cuda_sources, lower, make_target, resolve_tuning
    from workbench.models.cubin_cache import compile_cubin
    from workbench.models.tensorcore import cp_async_hazards
    tuning.record("tiny_transformer", "cuda", "sm_90", Variant("direct", "fp16", ACT16), 16, {"p50_ms": 1.0},
                  directory=tmp_path)
    src, variants, _ = resolve_tuning(zoo.get("tiny_transformer"), [16], "cuda", "sm_90", tuning=tmp_path,
                                      precision="fp16")
    assert variants[16].schedule.activations == "fp16"
    tgt = make_target("cuda", "sm_90")
    mod = src.make_module(16)
    rules: dict = {}
    ex = build_relax(lower(mod, tgt, variants[16], None, rules), tgt)
    sources = cuda_sources(ex)
    kernels = {n: body for s in sources for n, body in cuda_kernels(s).items()}
    dense = [n for n in rules if n.startswith("fused_matmul") and "_add" in n]
    assert len(dense) >= 4 and all(rules[n] == "MmaMatmul" for n in dense), rules
    assert all("mma.sync.aligned.m16n8k16" in kernels[f"{n}_kernel"] for n in dense)
    # TVM names a fused kernel's output compute_intermediate...: the QKV and FFN1 epilogues store fp16
    stores_half = [n for n in dense if re.search(r"half\* __restrict__ compute_intermediate\w*_ptr",
                                                 kernels[f"{n}_kernel"].split("{", 1)[0])]
    assert len(stores_half) >= 2, "matmul epilogues do not store fp16"
    assert activation_casts(sources, [p.name for p in mod["main"].params]) == []
    assert [h for s in sources for h in cp_async_hazards(s)] == []
    assert all(compile_cubin(s, "sm_90").startswith(b"\x7fELF") for s in sources)
