"""fp16 weights (tuning.Variant.weights = "fp16", schedules.keep_fp16_weights): the artifact stores float weights
in fp16, so no kernel casts a weight on every run and weights.bin, its pages and LoadWeights halve.

CPU only: the Relax module after the pass (dtypes, fusion for sm_90), CUDA artifacts compiled here (no GPU
needed), and numerics of the rewritten module built for the CPU (LLVM) against the NumPy reference. The CUDA
kernels run on the H200 in tests/test_models_gpu.py (the `fp16w` artifacts) and `bench.kernel_quality` (round 8).
"""
from __future__ import annotations

import dataclasses
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
W16 = Variant("direct", "fp16", ACT16, weights="fp16")


# ---------------------------------------------------------------------------------------------------------
# Selecting it: the variant, the tuning database
# ---------------------------------------------------------------------------------------------------------

def test_weights_default_fp32_round_trip_and_older_entries_read_unchanged():
    assert Variant().weights == "fp32" and "weights" not in Variant(precision="fp16").to_json()
    assert W16.to_json() == {"lowering": "direct", "precision": "fp16", "cuda_graph": False,
                             "schedule": {"injective": 8, "activations": "fp16"}, "weights": "fp16"}
    assert Variant.from_json(json.loads(json.dumps(W16.to_json()))) == W16
    assert "weights=fp16" in W16.describe() and "weights" not in Variant(precision="fp16").describe()
    assert not W16.is_default
    # the default is never written, even when given
    assert "weights" not in Variant.from_json({"precision": "fp16", "weights": "fp32"}).to_json()
    # every committed entry writes back exactly what is stored
    files = sorted((ROOT / "data" / "tuning").glob("*/*.json"))
    assert files
    for f in files:
        for p in load_model_file(f)["precisions"].values():
            for e in p["batches"].values():
                v = Variant.from_json(e["variant"])
                assert v.weights == e["variant"].get("weights", "fp32") and v.to_json() == e["variant"], f


def test_bad_values_name_the_key(tmp_path):
    for bad in ("bf16", "float16", 16, None):
        with pytest.raises(ScheduleError, match=r"variant.weights must be one of fp32, fp16"):
            Variant("direct", "fp16", weights=bad)
    with pytest.raises(ScheduleError, match=r"variant.weights 'fp16' needs precision fp16"):
        Variant("direct", "fp32", weights="fp16")
    with pytest.raises(ScheduleError, match=r"unknown field\(s\) weight;.*weights"):
        Variant.from_json({"precision": "fp16", "weight": "fp16"})
    from workbench.models import schedules
    with pytest.raises(ScheduleError, match="unknown weights 'fp8'"):
        schedules.mixed_precision(None, "fp16", weights="fp8")
    with pytest.raises(ScheduleError, match="weights fp16 needs precision fp16"):
        schedules.mixed_precision(None, "fp32", weights="fp16")
    # a damaged database file names the file and the entry
    from workbench.models import tuning
    tuning.record("mlp", "cuda", "sm_90", W16, 16, {"p50_ms": 1.0}, directory=tmp_path)
    path = tuning.model_file("mlp", "cuda", "sm_90", tmp_path)
    d = json.loads(path.read_text())
    assert d["precisions"]["fp16"]["batches"]["16"]["variant"]["weights"] == "fp16"
    d["precisions"]["fp16"]["batches"]["16"]["variant"]["weights"] = "int8"
    path.write_text(json.dumps(d))
    with pytest.raises(TuningError, match=rf"{re.escape(str(path))}: precisions.fp16.batches.16.variant: "
                                          r"variant.weights must be one of fp32, fp16.*got 'int8'"):
        tuning.load_model_file(path)


def test_plan_gives_one_weights_dtype_for_every_batch_size(tmp_path):
    """weights.bin serves every batch size: fp16 only when every entry used says so, else fp32 for all (and
    the provenance says which figures were measured with the other setting)."""
    from workbench.models import tuning, zoo
    from workbench.models.compiler import resolve_tuning
    k = {"00ff": {"rule": "small_reduction", "threads": 128}}
    tuning.record("tiny_transformer", "cuda", "sm_90", dataclasses.replace(W16, schedule=dataclasses.replace(
        ACT16, kernels=k)), 16, {"p50_ms": 1.0}, directory=tmp_path)
    tuning.record("tiny_transformer", "cuda", "sm_90", Variant("direct", "fp16", ACT16), 1, {"p50_ms": 0.5},
                  directory=tmp_path)
    p = tuning.plan("tiny_transformer", "cuda", "sm_90", [1, 16], "fp16", directory=tmp_path)
    assert {b: v.weights for b, v in p.variants.items()} == {1: "fp32", 16: "fp32"}
    assert p.provenance[16]["measured_weights"] == "fp16" and "measured_weights" not in p.provenance[1]
    assert all(v.schedule.kernels == k and v.schedule.activations == "fp16" for v in p.variants.values())
    p = tuning.plan("tiny_transformer", "cuda", "sm_90", [8, 16], "fp16", directory=tmp_path)   # both from b16
    assert {b: v.weights for b, v in p.variants.items()} == {8: "fp16", 16: "fp16"}
    tuning.record("tiny_transformer", "cuda", "sm_90", W16, 1, {"p50_ms": 0.4}, directory=tmp_path)
    _, variants, record = resolve_tuning(zoo.get("tiny_transformer"), [1, 2, 16], "cuda", "sm_90",
                                         tuning=tmp_path, precision="fp16")
    assert {v.weights for v in variants.values()} == {"fp16"}
    assert record["batches"]["16"]["variant"]["weights"] == "fp16"


# ---------------------------------------------------------------------------------------------------------
# The Relax module after the pass
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activations", ["fp32", "fp16"])
def test_weight_parameters_become_fp16_and_their_casts_go(activations):
    """tiny_transformer b2 (matmuls, biases, embeddings, layer norms): every float32 weight but the layer norms'
    is a float16 parameter; no astype of a weight to fp16 is left; a converted weight is read by a matmul
    directly, by a gather/slice of its own fp16 values, or through a widening cast of its own per reader; inputs,
    outputs and names are unchanged; the rewrite is idempotent."""
    import tvm_ffi
    from workbench.models import schedules, zoo
    mod = zoo.get("tiny_transformer").make_module(2)
    before = schedules.mixed_precision(mod, "fp16", activations)
    after = schedules.mixed_precision(mod, "fp16", activations, "fp16")
    f0, f1 = mod["main"], after["main"]
    assert [p.name for p in f1.params] == [p.name for p in f0.params]
    assert _dtype(f1.params[0]) == "int32" and _dtype(f1.body.body) == _dtype(f0.body.body) == "float32"
    kept = [p.name for p in f1.params[1:] if _dtype(p) == "float32"]
    assert kept and all("LayerNorm" in n for n in kept) and len(kept) == 10
    half = {p for p in f1.params[1:] if _dtype(p) == "float16"}
    assert len(half) == len(f1.params) - 1 - len(kept)
    assert schedules.fp16_weight_params(before["main"]) == [i for i, p in enumerate(f1.params) if p in half]
    readers: dict[str, int] = {}
    for b in _bindings(f1):
        for a in getattr(b.value, "args", []):
            if a in half:
                op = _op(b.value)
                readers[op] = readers.get(op, 0) + 1
                if op == "relax.astype":
                    assert str(b.value.attrs.dtype) == "float32"
    # 13 dense weights; 13 biases widened; the word embedding gathered and 2 embeddings sliced in fp16
    assert readers == {"relax.matmul": 13, "relax.astype": 13, "relax.take": 1, "relax.strided_slice": 2}
    widened = [b.var for b in _bindings(f1) if _op(b.value) == "relax.astype" and b.value.args[0] in half]
    uses = [a for b in _bindings(f1) for a in getattr(b.value, "args", []) if a in set(widened)]
    assert len(uses) == len(set(uses)) == len(widened)        # one widening cast per reader
    assert not [b for b in _bindings(f1) if _op(b.value) == "relax.astype" and b.value.args[0] in set(f1.params)
                and str(b.value.attrs.dtype) == "float16"]            # ToMixedPrecision's weight casts are gone
    assert [b for b in _bindings(before["main"]) if _op(b.value) == "relax.astype"
            and b.value.args[0] in set(before["main"].params[1:])]    # (they were there)
    assert tvm_ffi.structural_equal(after, schedules.keep_fp16_weights(after), map_free_vars=True)
    if activations == "fp16":
        assert tvm_ffi.structural_equal(after, schedules.keep_fp16_activations(after), map_free_vars=True)
    with pytest.raises(ScheduleError, match=r"main compute\(s\) no fp16 values; weights fp16 needs precision"):
        schedules.keep_fp16_weights(mod)


def _fused_counts(fused) -> tuple[int, list[str]]:
    """(kernel calls, names of kernels called on weights alone) of a fused module's main."""
    from tvm import relax
    main = fused["main"]
    weights = set(main.params[int(main.attrs["num_input"]):])
    calls, weight_only = 0, []
    for b in _bindings(main):
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir":
            calls += 1
            args = list(b.value.args[1].fields)
            if args and all(a in weights for a in args):
                weight_only.append(b.value.args[0].name_hint)
    return calls, weight_only


@pytest.mark.parametrize("model,conv,casts", [("tiny_transformer", None, 13), ("resnet18", "matmul", 21)])
def test_after_fusion_no_kernel_works_on_weights_alone(model, conv, casts):
    """sm_90 fusion: with fp32 weights one cast kernel per matmul weight (run on every inference); with fp16
    weights none, and exactly those launches are gone (bias widening and fp16 gathers fused into their
    kernels, layer-norm parameters read in fp32 as before)."""
    from bench.build_kernel_candidates import weight_only_calls
    from workbench.models import schedules, zoo
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get(model, conv=conv).make_module(2)
    for act in ("fp32", "fp16"):
        n0, cast0 = _fused_counts(schedules.fuse(mod, tgt, "fp16", act, "fp32"))
        fused = schedules.fuse(mod, tgt, "fp16", act, "fp16")
        n1, cast1 = _fused_counts(fused)
        assert len(cast0) == casts and all(re.fullmatch(r"cast\d*", n) for n in cast0)
        assert cast1 == [] and n1 == n0 - casts
        assert weight_only_calls(fused["main"], len(zoo.get(model).inputs)) == 0


@pytest.mark.parametrize("model,batch", [("mlp", 4), ("tiny_transformer", 2)])
def test_numerics_on_the_cpu_stay_within_the_fp16_tolerance(model, batch):
    """The rewritten module (fp16 activations and weights) built for the CPU (LLVM) and given the source
    weights rounded to fp16 against the NumPy float64 reference of the fp32 weights, with
    bench.kernel_quality's fp16 tolerance; the weights' rounding adds little to the error of fp16 compute."""
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
    errs = {}
    for w in ("fp32", "fp16"):
        mod = schedules.mixed_precision(src.make_module(batch), "fp16", "fp16", w)
        params = mod["main"].params[len(src.inputs):]
        ws = [a.astype(_dtype(p)) for (_, a), p in zip(weights, params)]
        assert {str(a.dtype) for a in ws} == ({"float16"} if model == "mlp" else {"float16", "float32"}) \
            or w == "fp32"
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        y = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in ws]).numpy()
        assert y.dtype == np.float32 and y.shape == ref.shape
        r = numerics(y, ref, "fp16")
        assert r["tolerance"] == TOLERANCE["fp16"] == 3e-2
        assert r["pass"] and r["rel_err"] < TOLERANCE["fp16"] / 3, r
        errs[w] = r["rel_err"]
    assert errs["fp16"] < 2 * errs["fp32"] + 1e-3, errs


# ---------------------------------------------------------------------------------------------------------
# CUDA: the kernels, the artifact
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cuda_kernels_keep_mma_and_read_fp16_weights():
    """tiny_transformer b16 for sm_90: the same kernels go to MmaMatmul as with fp32 weights (their epilogue
    widens the fp16 bias in registers), no kernel reads only weights, and NVRTC compiles the source."""
    from bench.build_kernel_candidates import weight_only_calls
    from workbench.models import zoo
    from workbench.models.compiler import build_relax, cuda_kernels, cuda_sources, lower, make_target
    from workbench.models.cubin_cache import compile_cubin
    from workbench.models.tensorcore import cp_async_hazards
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get("tiny_transformer").make_module(16)
    rules = {}
    for w in ("fp32", "fp16"):
        rules[w] = {}
        low = lower(mod, tgt, dataclasses.replace(W16, weights=w), None, rules[w])
    mma = {w: sorted(n for n, r in rules[w].items() if r == "MmaMatmul") for w in rules}
    assert len(mma["fp16"]) == len(mma["fp32"]) >= 4
    assert weight_only_calls(low["main"], 1) == 0
    sources = cuda_sources(build_relax(low, tgt))
    kernels = {n: body for s in sources for n, body in cuda_kernels(s).items()}
    dense = [n for n in mma["fp16"] if "_add" in n]
    assert dense and all("mma.sync.aligned.m16n8k16" in kernels[f"{n}_kernel"] for n in dense)
    # the bias (an fp16 parameter) is read as half inside the mma kernel
    assert all(re.search(r"half\* __restrict__ \w+_bias_ptr", kernels[f"{n}_kernel"].split("{", 1)[0])
               for n in dense)
    assert [h for s in sources for h in cp_async_hazards(s)] == []
    assert all(compile_cubin(s, "sm_90").startswith(b"\x7fELF") for s in sources)


@pytest.fixture(scope="module")
def mlp_artifacts(tmp_path_factory):
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    d = tmp_path_factory.mktemp("w16")
    arts = {w: compile_model(zoo.get("mlp"), d / w, batch_sizes=[1, 16], target="cuda",
                             variant=dataclasses.replace(W16, weights=w))
            for w in ("fp32", "fp16")}
    return arts


def test_compiled_artifact_stores_fp16_weights(mlp_artifacts, tmp_path):
    """mlp for sm_90 with fp16 weights: manifest tensors float16 with half the bytes (and pages recomputed),
    the same names/shapes/order, the variant recorded per batch; Artifact.open validates it; its weights are the
    source's rounded to fp16, viewed as float16 exactly as bind_weights views pages; and the CPU build of the
    same module computes the reference from those bytes within the fp16 tolerance."""
    import tvm
    from tvm import relax
    from workbench.models import schedules, zoo
    from workbench.models.artifact import Artifact
    from workbench.models.reference import reference_forward
    from workbench.models.runtime import _view, alloc_pages, copy_weights
    a32, a16 = mlp_artifacts["fp32"], mlp_artifacts["fp16"]
    a16 = Artifact.open(a16.path)
    assert [t.dtype for t in a32.tensors] == ["float32"] * 6 and [t.dtype for t in a16.tensors] == ["float16"] * 6
    assert [(t.name, t.shape) for t in a16.tensors] == [(t.name, t.shape) for t in a32.tensors]
    assert [t.nbytes * 2 for t in a16.tensors] == [t.nbytes for t in a32.tensors]
    assert a16.weights_bytes * 2 == a32.weights_bytes
    assert a16.manifest["weights"]["file_bytes"] < a32.manifest["weights"]["file_bytes"]
    for b in a16.batch_sizes:
        assert a16.manifest["batches"][str(b)]["variant"]["weights"] == "fp16"
        assert "weights" not in a32.manifest["batches"][str(b)]["variant"]
    src = zoo.get("mlp")
    host = a16.read_weights()
    pages = alloc_pages(a16)                       # 256-byte aligned, as a weights cache hands them out
    copy_weights(a16, pages, host)
    views = [_view(pages[t.page], t) for t in a16.tensors]
    for (name, w), v, arr in zip(src.weights(), views, a16.weight_arrays(host)):
        assert v.dtype == np.float16 and np.array_equal(v, w.astype(np.float16)) and np.array_equal(v, arr), name
        assert str(tvm.runtime.from_dlpack(v).dtype) == "float16"      # what bind_weights hands the VM
    # the artifact's bytes give the reference's result (CPU build of the same rewritten module)
    x = np.random.default_rng(3).standard_normal((4, *src.inputs[0].shape)).astype(np.float32)
    mod = schedules.mixed_precision(src.make_module(4), "fp16", "fp16", "fp16")
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.from_dlpack(v) for v in views]).numpy()
    r = numerics(y, reference_forward("mlp", [x], src.weights()), "fp16")
    assert r["pass"] and r["rel_err"] < TOLERANCE["fp16"] / 3, r


def test_synthetic_fp16_weights_regenerate_and_bad_weights_fail(tmp_path):
    """Synthetic weights are generated in fp16 and regenerate bit for bit from the manifest (the GPU bundles
    leave weights.bin out); a source weight beyond fp16's range fails the compile naming it, leaving nothing."""
    from workbench.models import zoo
    from workbench.models.artifact import Artifact, WEIGHTS
    from workbench.models.compiler import CompileError, compile_model
    art = compile_model(zoo.get("tiny_transformer"), tmp_path / "tt", batch_sizes=[2], target="cuda",
                        weights="synthetic", seed=5, variant=W16)
    dtypes = {t.name: t.dtype for t in art.tensors}
    assert dtypes["embeddings.word_embeddings.weight"] == "float16"
    assert dtypes["embeddings.LayerNorm.weight"] == "float32"
    stored = art.read_weights()
    (art.path / WEIGHTS).unlink()
    again = Artifact.open(art.path)
    assert np.array_equal(again.read_weights(), stored)          # regenerated, sha256 checked
    src = zoo.get("mlp")
    big = dataclasses.replace(src, weights=lambda: [(n, w * (1e6 if n == "fc2.weight" else 1.0))
                                                    for n, w in src.weights()])
    with pytest.raises(CompileError, match=r"weight fc2.weight has values beyond float16's range"):
        compile_model(big, tmp_path / "big", batch_sizes=[1], target="cuda", variant=W16)
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big.tmp-*"))


# ---------------------------------------------------------------------------------------------------------
# The benchmark tools
# ---------------------------------------------------------------------------------------------------------

def test_kernel_breakdown_takes_the_database_winner_or_a_variant_file(tmp_path):
    from bench import kernel_breakdown as kb
    from workbench.models import tuning
    tuning.record("resnet50", "cuda", "sm_90", Variant("matmul", "fp16", ACT16, weights="fp16"), 16,
                  {"p50_ms": 1.0}, directory=tmp_path)
    s = kb.Spec.parse("resnet50:16:tuned:fp16", str(tmp_path))
    assert (s.id, s.lowering, s.tuning_variant().weights) == ("resnet50-matmul_b16_fp16-tuned", "matmul", "fp16")
    assert kb.Spec.parse("resnet50:matmul:16:fp16").tuning_variant() == Variant("matmul", "fp16")
    with pytest.raises(SystemExit, match=r"'resnet18:1:tuned:fp16'.*no fp16 entry for resnet18"):
        kb.Spec.parse("resnet18:1:tuned:fp16", str(tmp_path))
    cands = {"candidates": [{"id": "x", "model": "bert_base", "batch": 1, "label": "fp16-w16",
                             "variant": W16.to_json()},
                            {"model": "mlp", "batch": 16, "variant": Variant(precision="fp16").to_json()}]}
    f = tmp_path / "manifest.json"
    f.write_text(json.dumps(cands))
    specs = kb.read_variants(str(f))
    assert [s.id for s in specs] == ["bert_base_b1_fp16-w16", "mlp_b16_variant"]
    assert specs[0].tuning_variant() == W16
    assert [s.id for s in kb.read_variants(str(f), ["mlp_b16_variant"])] == ["mlp_b16_variant"]
    with pytest.raises(SystemExit, match=r"--ids: nope not in"):
        kb.read_variants(str(f), ["nope"])
    cands["candidates"][1]["variant"]["weights"] = "fp8"
    f.write_text(json.dumps(cands))
    with pytest.raises(SystemExit, match=r"entry 1: variant.weights must be one of"):
        kb.read_variants(str(f))


def test_round8_candidates_are_the_fp16_picks_with_fp16_weights():
    from bench.build_kernel_candidates import round7, round8
    r8, jobs = round8(["resnet50", "resnet18", "bert_base", "mobilenet_v2"])
    assert not jobs and len(r8) == 8 and len({c.id for c in r8}) == 8
    assert all(c.id.endswith("-w16") and Variant.from_json(c.variant).weights == "fp16" for c in r8)
    r7 = {(c.model, c.batch, json.dumps(c.variant, sort_keys=True)) for c in round7(
        ["resnet50", "resnet18", "bert_base", "mobilenet_v2"])[0]}
    for c in r8:
        without = {k: v for k, v in c.variant.items() if k != "weights"}
        assert c.model == "mobilenet_v2" or (c.model, c.batch, json.dumps(without, sort_keys=True)) in r7
