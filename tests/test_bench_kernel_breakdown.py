"""bench.kernel_breakdown build: a real CUDA compile (no GPU needed) of the mlp at fp16, b16, whose manifest must
account for every kernel call of the model with the rule that scheduled it."""
from __future__ import annotations

import json

import pytest

from bench import kernel_breakdown as kb

KNOWN_RULES = {"mma", "dlight_matmul", "gemv", "reduction", "small_reduction", "general_reduction", "fallback"}


def test_spec_parse_names_the_bad_entry():
    s = kb.Spec.parse("resnet50:matmul:16:fp16")
    assert (s.model, s.lowering, s.batch, s.precision, s.id) == ("resnet50", "matmul", 16, "fp16",
                                                                 "resnet50-matmul_b16_fp16")
    with pytest.raises(SystemExit, match="resnet50:16"):
        kb.Spec.parse("resnet50:16")
    with pytest.raises(SystemExit, match="'x'"):
        kb.Spec.parse("mlp:direct:x:fp16")


@pytest.fixture(scope="module")
def mlp_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("kbd")
    built = kb.build([kb.Spec.parse("mlp:direct:16:fp16")], out)
    return out, built


@pytest.mark.slow
def test_build_covers_every_kernel_call_with_its_rule(mlp_build):
    from tvm import relax
    from workbench.models import zoo
    from workbench.models.compiler import lower, main_function, make_target
    from workbench.models.tuning import Variant
    out, built = mlp_build
    manifest, metas = kb.load_dir(out)
    assert manifest["models"] == ["mlp_b16_fp16"]
    meta = metas[0]
    assert (out / meta["so"]).is_file() and meta["so_bytes"] > 0
    # independent count: every call in the lowered main whose callee is a PrimFunc of the module
    low = lower(zoo.get("mlp").make_module(16), make_target("cuda", "sm_90"), Variant("direct", "fp16"))
    _, main = main_function(low)
    prims = {gv.name_hint for gv, f in low.functions_items() if not isinstance(f, relax.Function)}
    ir_calls = [b.value.op.name_hint for blk in main.body.blocks for b in blk.bindings
                if isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.GlobalVar)
                and b.value.op.name_hint in prims]
    by_name = {k["name"]: k for k in meta["kernels"]}
    assert set(by_name) == prims
    assert meta["kernel_calls"] == len(ir_calls) == sum(k["calls"] for k in meta["kernels"])
    for name in set(ir_calls):
        assert by_name[name]["calls"] == ir_calls.count(name)
    for k in meta["kernels"]:
        assert k["rule"] in KNOWN_RULES, k
        assert k["params"] and k["device_kernels"], k       # measurable alone, and its CUDA kernel found
        assert k["outputs"], k
    # the two 256-wide layers go to the mma rule (their CUDA uses mma.sync); the 10-wide output layer (N < 32)
    # is declined by it and scheduled by dlight; fp16 casts of the weights read only weights
    matmuls = {n: k for n, k in by_name.items() if n.startswith("fused_matmul")}
    assert sorted(k["rule"] for k in matmuls.values()) == ["dlight_matmul", "mma", "mma"]
    for k in matmuls.values():
        assert (k["tensor_core"] == "mma.sync") == (k["rule"] == "mma")
        m, kk = k["params"][0][0]
        n = k["params"][1][0][1]
        assert k["flops"] == 2 * m * n * kk
    assert sum(k["weight_only_calls"] for k in meta["kernels"]) == 3     # fc1..fc3 weights cast to fp16
    # a second build reuses the recorded variant (incremental)
    again = kb.build([kb.Spec.parse("mlp:direct:16:fp16")], out)
    assert again["models"][0] == json.loads((out / "mlp_b16_fp16.json").read_text())


def test_markdown_and_aggregate_from_a_result():
    res = {"id": "m_b1_fp16", "whole": {"p50_ms": 0.1, "host_call_ms": 0.05}, "kernel_calls": 3,
           "kernels": [
               {"name": "a", "rule": "mma", "calls": 2, "weight_only_calls": 0, "flops": 2e6, "bytes": 1e5,
                "tensor_core": "mma.sync", "params": [[[16, 16], "float16"]], "p50_us": 10.0, "total_us": 20.0},
               {"name": "b", "rule": "fallback", "calls": 1, "weight_only_calls": 1, "flops": 0, "bytes": 1e5,
                "tensor_core": None, "params": [[[16], "float32"]], "p50_us": 30.0, "total_us": 30.0},
               {"name": "c", "rule": "fallback", "calls": 1, "weight_only_calls": 0, "flops": 0, "bytes": 1,
                "tensor_core": None, "params": None, "error": "x"}],
           "in_model": {"a": {"calls": 2, "us": 25.0}, "b": {"calls": 1, "us": 31.0},
                        "vm.builtin.alloc_storage": {"calls": 4, "us": 2.0}}}
    res.update(kb.aggregate(res))
    assert res["sum_standalone_us"] == 50.0 and res["whole_us"] == pytest.approx(100.0)
    assert res["per_rule"]["fallback"]["us"] == 30.0 and res["per_rule"]["mma"]["calls"] == 2
    assert res["weight_only_us"] == 30.0 and res["unmeasured"] == ["c"]
    assert res["in_model_kernels_us"] == 56.0 and res["in_model_builtins_us"] == 2.0
    assert res["call_count_mismatch"] == ["c"]             # the VM never called c although the IR says once
    md = kb.markdown({"meta": {}, "models": [res]})
    assert "| mma | 1 | 2 | 0.020 | 40.0% | 20.0% |" in md
    assert "Unmeasured kernels (called): c." in md


@pytest.mark.slow
def test_build_compiles_a_variant_with_fused_projections_as_workbench_compile_does(tmp_path):
    """A variant with fused projections is built from the fused source, as compiler.resolve_tuning gives it: one
    matmul per layer for the query, key and value, read by the attention einsums (no slice kernels)."""
    variant = {"lowering": "direct", "precision": "fp16", "cuda_graph": False, "projections": "fused",
               "schedule": {"activations": "fp16", "reduce_inputs": "fp16"}, "weights": "fp16"}
    spec = kb.Spec.from_variant("tiny_transformer", 4, variant, "qkv", "test")
    meta = kb.build_one(spec, tmp_path)

    def reading(shape):
        return [k for k in meta["kernels"] if k["params"] and shape in [p[0] for p in k["params"]] and k["calls"]]
    (fused,) = reading([4, 32, 3 * 128])                  # only the fused matmul touches it whole: no slice kernel
    assert "matmul" in fused["name"] and fused["calls"] == 2 and fused["rule"] == "mma"
    einsums = reading([4, 32, 3, 2, 64])                   # its result as [b, s, part, heads, head_dim]
    assert sorted(k["calls"] for k in einsums) == [2, 2] and all("einsum" in k["name"] for k in einsums)
    assert [p[0] for p in meta["signature"]].count([128, 3 * 128]) == 2
