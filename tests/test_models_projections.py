"""Fused projections (workbench/models/projections.py, tuning.Variant projections "fused"): attention's Q, K and V
as one matmul over weights stored side by side, its result read in place by the attention einsums."""
import dataclasses
import json
import re

import numpy as np
import pytest

from bench.kernel_quality import TOLERANCE, numerics
from workbench.models import projections, schedules, zoo
from workbench.models.projections import Group, ProjectionError
from workbench.models.reference import reference_forward
from workbench.models.schedules import ScheduleError
from workbench.models.tuning import Variant

TINY = zoo.TINY_TRANSFORMER
ACT16 = schedules.ScheduleSpec(activations="fp16", reduce_inputs="fp16")


def _ids(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY.vocab, (batch, TINY.seq)).astype(np.int32)


def _run_cpu(mod, x, weights) -> np.ndarray:
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in weights]).numpy()


def _callees(mod) -> list[str]:
    """The relax ops and call_tir PrimFuncs main calls, in order."""
    return re.findall(r"= R\.(?:call_tir\((?:cls\.)?)?(\w+)", mod["main"].script())


def test_fused_name_keeps_the_common_dotted_prefix_and_suffix():
    assert projections.fused_name(["l.0.self.query.weight", "l.0.self.key.weight", "l.0.self.value.weight"]) == \
        "l.0.self.query_key_value.weight"
    assert projections.fused_name(["a.x.w", "a.y.z.w"]) == "a.x_y_z.w"
    assert projections.fused_name(["q", "k"]) == "q_k"


def test_groups_are_the_attention_projections_and_models_without_them_are_refused():
    src = zoo.get("tiny_transformer")
    names = [n for n, _ in src.weights()]
    groups = projections.find_groups(src.make_module(2)["main"])
    assert len(groups) == TINY.layers
    for layer, g in enumerate(groups):
        assert [names[i] for i in g.weights] == [f"encoder.layer.{layer}.attention.self.{p}.weight"
                                                 for p in ("query", "key", "value")]
        assert [names[i] for i in g.biases] == [n.replace(".weight", ".bias") for n in (names[i] for i in g.weights)]
        assert g.widths == (TINY.hidden,) * 3
    # the FFN, the attention output and the pooler have no sibling; an MLP and a CNN have no einsum reader
    for model in ("mlp", "resnet18-matmul"):
        with pytest.raises(ProjectionError, match=rf"{model}: no sibling projections to fuse"):
            projections.fused(zoo.get(model))


def test_fused_source_takes_concatenated_weights_and_computes_the_reference_on_cpu():
    """The fused module (slices of the one matmul feed the einsums; the CPU pipeline keeps them) with the fused
    weights gives the reference's output; the weights list keeps every other weight in place."""
    src = zoo.get("tiny_transformer")
    fused = projections.fused(src)
    w, fw = src.weights(), fused.weights()
    assert len(fw) == len(w) - 4 * TINY.layers
    by_name = dict(w)
    for layer in range(TINY.layers):
        p = f"encoder.layer.{layer}.attention.self"
        got = dict(fw)[f"{p}.query_key_value.weight"]
        assert got.shape == (TINY.hidden, 3 * TINY.hidden) and got.flags.c_contiguous
        np.testing.assert_array_equal(got[:, TINY.hidden:2 * TINY.hidden], by_name[f"{p}.key.weight"])
        np.testing.assert_array_equal(dict(fw)[f"{p}.query_key_value.bias"][-TINY.hidden:],
                                      by_name[f"{p}.value.bias"])
    assert [n for n, _ in fw if "query_key_value" not in n] == [n for n, _ in w if ".self." not in n]
    assert fused.architecture["projections"] == [f"encoder.layer.{i}.attention.self.query_key_value.weight"
                                                 for i in range(TINY.layers)]
    mod = fused.make_module(2)
    assert [p.name for p in mod["main"].params[1:]] == [n for n, _ in fw]
    assert _callees(mod).count("matmul") == _callees(src.make_module(2)).count("matmul") - 2 * TINY.layers
    x = _ids(2)
    np.testing.assert_allclose(_run_cpu(mod, x, [a for _, a in fw]), reference_forward("tiny_transformer", x, w),
                               rtol=2e-5, atol=2e-5)
    groups = projections.find_groups(src.make_module(1)["main"])
    with pytest.raises(ProjectionError, match="do not match the projections' widths"):
        projections.fuse_weights([(n, a[..., :-1]) for n, a in w], groups)


@pytest.mark.parametrize("activations", ["fp32", "fp16"])
def test_einsums_read_the_fused_projection_in_place(activations):
    """After the CUDA fusion passes' einsum views (relax einsums, fp32 activations) or keep_fp16_activations'
    widened einsums (fp16), no slice of the projection is left: each attention einsum takes the projection
    reshaped [b, s, 3, heads, head_dim]; built for the CPU the module still computes the reference."""
    import tvm
    from tvm import relax
    def passes(source):
        mod = source.make_module(2)
        if activations == "fp16":
            mod = schedules.mixed_precision(mod, "fp16", "fp16", "fp16", "fp16")
        return projections.einsum_views_pass()(mod)

    def slices(mod):           # (name, shape) of every strided_slice main computes
        return re.findall(r"(\w+): R\.Tensor\(([^)]*)\), dtype=\"\w+\"\) = R\.strided_slice", mod["main"].script())

    src = projections.fused(zoo.get("tiny_transformer"))
    mod = passes(src)
    calls = _callees(mod)
    main = mod["main"].script()
    unfused = slices(passes(zoo.get("tiny_transformer")))
    assert slices(mod) == unfused and len(unfused) == 3        # only the embedding rows and [CLS]: no part is cut
    einsums = [c for c in calls if c.startswith("einsum")]
    assert len(einsums) == 2 * TINY.layers
    heads = TINY.hidden // TINY.heads
    five = re.findall(rf"R\.Tensor\(\(2, {TINY.seq}, 3, {TINY.heads}, {heads}\)", main)
    assert len(five) == 3 * TINY.layers                          # q, k and v of every layer
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    viewed = [f for f in funcs.values() if "projection_part" in f.script()]
    assert len(viewed) == 2 and all(int(f.attrs["op_pattern"]) == projections.OUT_EWISE_FUSABLE for f in viewed)
    x = _ids(2, seed=1)
    ws = [a.astype(str(p.ty.dtype)) for (_, a), p in zip(src.weights(), mod["main"].params[1:])]
    y = _run_cpu(relax.transform.LegalizeOps()(mod), x, ws)
    ref = reference_forward("tiny_transformer", x, zoo.get("tiny_transformer").weights())
    if activations == "fp32":
        np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
    else:
        r = numerics(y, ref, "fp16")
        assert r["pass"] and r["rel_err"] < TOLERANCE["fp16"] / 3, r


def test_models_without_fused_projections_keep_their_kernels():
    """The einsum views change nothing where no einsum reads a slice: the unfused BERT's fused module (kernel keys
    and all) is what it was without the pass."""
    import tvm
    from workbench.models.compiler import make_target
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get("tiny_transformer").make_module(4)
    for v in (Variant(precision="fp16", schedule=ACT16, weights="fp16"), Variant(schedule=schedules.ScheduleSpec(
            simt=True, split_k=256))):
        with_pass = schedules.fuse_variant(mod, tgt, v)
        without = schedules.mixed_precision(mod, v.precision, v.schedule.activations, v.weights,
                                            v.schedule.reduce_inputs)
        if v.schedule.activations == "fp16":
            without = schedules.keep_fp16_activations(without, v.schedule.reduce_inputs)
        passes = [p for p in schedules.fusion_passes(tgt, v.schedule.split_k) if p.info.name != "EinsumViews"]
        with tgt:
            without = tvm.transform.Sequential(passes)(without)
        keys = [sorted(schedules.kernel_key(f) for _, f in m.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
                for m in (with_pass, without)]
        assert keys[0] == keys[1] and len(keys[0]) > 10


def test_variant_field_round_trips_and_bad_values_name_the_key():
    v = Variant(precision="fp16", schedule=ACT16, weights="fp16", projections="fused")
    assert v.to_json()["projections"] == "fused" and Variant.from_json(v.to_json()) == v
    assert "projections" not in Variant().to_json() and Variant.from_json({}).projections == "separate"
    assert "projections=fused" in v.describe() and not Variant(projections="fused").is_default
    with pytest.raises(ScheduleError, match="variant.projections must be one of separate, fused.*got 'qkv'"):
        Variant(projections="qkv")


def test_plan_fuses_projections_only_when_every_batch_size_does(tmp_path):
    """weights.bin serves every batch size: fused projections only where every entry used says so, and the
    compiler then compiles the fused source (its weights named as fused)."""
    from workbench.models import tuning
    from workbench.models.compiler import resolve_tuning
    fused = Variant(precision="fp16", schedule=ACT16, projections="fused")
    tuning.record("tiny_transformer", "cuda", "sm_90", fused, 16, {"p50_ms": 1.0}, directory=tmp_path)
    tuning.record("tiny_transformer", "cuda", "sm_90", dataclasses.replace(fused, projections="separate"), 1,
                  {"p50_ms": 0.5}, directory=tmp_path)
    p = tuning.plan("tiny_transformer", "cuda", "sm_90", [1, 16], "fp16", directory=tmp_path)
    assert {v.projections for v in p.variants.values()} == {"separate"}
    assert p.provenance[16]["measured_projections"] == "fused" and "measured_projections" not in p.provenance[1]
    src, variants, _ = resolve_tuning(zoo.get("tiny_transformer"), [1, 16], "cuda", "sm_90", tuning=tmp_path,
                                      precision="fp16")
    assert "projections" not in src.architecture and not any("_key_" in n for n, _ in src.weights())
    src, variants, _ = resolve_tuning(zoo.get("tiny_transformer"), [8, 16], "cuda", "sm_90", tuning=tmp_path,
                                      precision="fp16")
    assert {v.projections for v in variants.values()} == {"fused"}
    assert sum("query_key_value" in n for n, _ in src.weights()) == 2 * TINY.layers
    from workbench.models.compiler import CompileError
    with pytest.raises(CompileError, match="variant projections 'fused': mlp: no sibling projections"):
        resolve_tuning(zoo.get("mlp"), [1], "cuda", "sm_90", variant=fused)


def test_cpu_artifact_with_fused_projections_serves_the_reference(tmp_path):
    """The fused source compiled for the CPU: the artifact stores the fused weights (names, shapes, pages) and,
    bound from its pages, computes the reference at every batch size."""
    from workbench.models.artifact import Artifact
    from workbench.models.compiler import compile_model
    from workbench.models.runtime import alloc_pages, copy_weights
    src = zoo.get("tiny_transformer")
    art = compile_model(projections.fused(src), tmp_path / "art", batch_sizes=[1, 3], target="cpu", tuning=None)
    art = Artifact.open(art.path)
    fused = [t for t in art.tensors if "query_key_value" in t.name]
    assert [(t.name.split(".")[2], t.shape) for t in fused] == [(str(i), s) for i in range(TINY.layers)
                                                                for s in ((TINY.hidden, 3 * TINY.hidden),
                                                                          (3 * TINY.hidden,))]
    assert len(art.tensors) == len(src.weights()) - 4 * TINY.layers
    assert json.loads(json.dumps(art.manifest["architecture"]["projections"]))[0].startswith("encoder.layer.0")
    model = art.load("cpu")
    pages = alloc_pages(art)
    copy_weights(art, pages)
    binding = model.bind_weights(pages)
    for b in art.batch_sizes:
        x = _ids(b, seed=b)
        [y] = model.run(b, [x], binding)
        np.testing.assert_allclose(y, reference_forward("tiny_transformer", x, src.weights()), rtol=2e-5, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_build_reads_the_projection_in_the_einsum_kernels(precision):
    """BERT-tiny b16 for sm_90 with its tuned-style variant and fused projections: one matmul kernel per layer
    writes the projections (N = 3 x hidden), no kernel copies a part out of it, the attention einsums are GEMM
    kernels (mma.sync at fp16) whose parameters include the projection, and NVRTC compiles the source."""
    from workbench.models.compiler import build_relax, cuda_kernels, cuda_sources, lower, make_target
    from workbench.models.cubin_cache import compile_cubin
    from workbench.models.tensorcore import cp_async_hazards
    tgt = make_target("cuda", "sm_90")
    v = (Variant(precision="fp16", schedule=ACT16, weights="fp16", projections="fused") if precision == "fp16"
         else Variant(schedule=schedules.ScheduleSpec(simt=True), projections="fused"))
    rules: dict = {}
    low = lower(projections.fused(zoo.get("tiny_transformer")).make_module(16), tgt, v, None, rules)
    gemm = "MmaMatmul" if precision == "fp16" else "SimtMatmul"
    einsums = [n for n, r in rules.items() if "einsum" in n]
    assert len(einsums) == 2 and all(rules[n] == gemm for n in einsums), rules
    assert not [n for n in rules if "strided_slice" in n and "layer_norm" not in n and "tanh" not in n
                and "reshape" not in n], rules
    main = low["main"].script()
    assert len(re.findall(rf"R\.Tensor\(\(16, {TINY.seq}, {3 * TINY.hidden}\)", main)) >= TINY.layers
    heads = TINY.hidden // TINY.heads
    calls = re.findall(r"\n\s*(\w*einsum\w*)\(([^)]*)\)", main)
    five = set(re.findall(rf"(\w+): R\.Tensor\(\(16, {TINY.seq}, 3, {TINY.heads}, {heads}\)", main))
    assert len(calls) == 2 * TINY.layers and five
    assert all(sum(a.strip() in five for a in args.split(",")) == (2 if "multiply" in n else 1) for n, args in calls)
    sources = cuda_sources(build_relax(low, tgt))
    kernels = {n: body for s in sources for n, body in cuda_kernels(s).items()}
    if precision == "fp16":
        assert all("mma.sync" in kernels[f"{n}_kernel"] for n in einsums)
    assert [h for s in sources for h in cp_async_hazards(s)] == []
    assert all(compile_cubin(s, "sm_90").startswith(b"\x7fELF") for s in sources)


def test_kernel_quality_lays_candidate_weights_out_as_the_candidate_takes_them():
    """bench.kernel_quality gives a fused-projections candidate (groups recorded at build) the concatenated
    weights in its signature's shapes, from the zoo's seeded weights, without TVM."""
    from bench.kernel_quality import candidate_weights
    src = zoo.get("tiny_transformer")
    canonical = dict(src.weights())
    groups = projections.find_groups(src.make_module(1)["main"])
    meta = {"lowered": {}}
    c = {"variant": {"lowering": "direct"}, "projections": [dataclasses.asdict(g) for g in groups]}
    c = json.loads(json.dumps(c))
    got = candidate_weights(meta, canonical, c)
    want = projections.fused(src).weights()
    assert [w.shape for w in got] == [a.shape for _, a in want]
    assert all(np.array_equal(g, a) for g, (_, a) in zip(got, want))
    assert [w.shape for w in candidate_weights(meta, canonical, {"variant": {"lowering": "direct"}})] == \
        [a.shape for a in canonical.values()]
    assert Group(**{k: tuple(v) for k, v in c["projections"][0].items()}) == groups[0]
