"""Split-K (workbench/models/split_k.py, ScheduleSpec.split_k): matmuls with small outputs computed as partial
matmuls over slices of K, then summed by a kernel that takes the matmul's epilogue.

CPU only: the rewrite's numerics on LLVM against the unsplit module and NumPy; the CUDA fusion and scheduling
for sm_90 (no GPU needed). Speed, and the numerics of the CUDA kernels against the float64 reference, are
measured on the H200 by `bench.kernel_quality run` on the round-13 bundle (bench/results/kernel_quality.md).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from relax_walk import bindings as _bindings
from workbench.models.schedules import ScheduleError, ScheduleSpec
from workbench.models.split_k import MAX_ROWS_SPLITS, MIN_SLICE, splits
from workbench.models.tuning import Variant


def test_splits_fill_the_block_target_within_the_limits_of_k():
    assert splits(49, 512, 4608, 512) == 32             # 2 x 8 tiles of 32x64 -> 16 blocks, x 32 = 512
    assert splits(49, 512, 4608, 256) == 16
    assert splits(12544, 64, 147, 1024) == 1            # enough blocks already (and K odd)
    assert splits(1, 1000, 2048, 1024) == 1             # GEMV: dlight's GEMV rule splits K across threads
    assert splits(2, 1000, 2048, 1024) == 32
    assert splits(128, 768, 768, 1024) == 8             # 48 blocks; 768 / 16 = 48 < MIN_SLICE stops at 8
    assert 768 // 8 >= MIN_SLICE > 768 // 16
    assert splits(64, 64, 96, 1024) == 1                # 96 / 2 = 48 < MIN_SLICE
    assert splits(64, 64, 384, 1024) == 4               # 384 / 8 = 48 < MIN_SLICE
    assert splits(64, 64, 130, 1024) == 2               # 130 / 4 is not whole


def test_the_setting_is_off_by_default_round_trips_and_names_bad_values():
    assert ScheduleSpec().split_k is None and ScheduleSpec().to_json() == {}
    on = ScheduleSpec(split_k=1024, small_reduction=256)
    assert not on.is_default and not ScheduleSpec(split_k=256).is_default
    assert on.to_json() == {"small_reduction": 256, "split_k": 1024}
    assert ScheduleSpec.from_json(json.loads(json.dumps(on.to_json()))) == on
    v = Variant("matmul", "fp32", on)
    assert Variant.from_json(json.loads(json.dumps(v.to_json()))) == v
    for bad in (0, -4, True, "1024", 1.5, 1 << 17):
        with pytest.raises(ScheduleError, match=r"schedule.split_k must be an int in \[1, 65536\]"):
            ScheduleSpec(split_k=bad)


def _dense_module(x_shape, k: int, n: int, dtype: str = "float32", out_dtype: str = ""):
    """relu(x @ w + b) + r: a matmul with a bias, an activation and a residual add as its epilogue."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([*x_shape, k], dtype))
    w = relax.Var("w", relax.TensorType([k, n], dtype))
    b = relax.Var("b", relax.TensorType([n], out_dtype or dtype))
    r = relax.Var("r", relax.TensorType([*x_shape, n], out_dtype or dtype))
    with bb.function("main", [x, w, b, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w, out_dtype=out_dtype or None))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, b)))
            out = bb.emit_output(relax.op.add(y, r))
        bb.emit_func_output(out)
    return bb.get()


def _run_llvm(mod, args):
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _calls(mod) -> list[str]:
    from tvm import relax
    return [b.value.args[0].name_hint for b in _bindings(mod["main"])
            if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.call_tir"]


@pytest.mark.parametrize("x_shape,k,n", [((2, 7, 7), 1024, 96), ((3, 40), 512, 200)])
def test_split_matmul_gives_the_unsplit_values_on_the_cpu(x_shape, k, n):
    from workbench.models.split_k import split_k_pass
    rng = np.random.default_rng(3)
    m = int(np.prod(x_shape))
    args = [rng.standard_normal((*x_shape, k)).astype("float32"), rng.standard_normal((k, n)).astype("float32"),
            rng.standard_normal(n).astype("float32"), rng.standard_normal((*x_shape, n)).astype("float32")]
    mod = _dense_module(x_shape, k, n)
    split = split_k_pass(1024)(mod)
    s = splits(m, n, k, 1024)
    assert s > 1
    names = _calls(split)
    assert names[0].startswith("matmul_split_k") and names[1].startswith("split_k_sum"), names
    p = next(b.var for b in _bindings(split["main"]) if "matmul_split_k" in str(b.value))
    assert [int(d) for d in p.ty.shape] == [s, *x_shape, n]      # the partials: one per slice of K
    want = np.maximum(args[0].astype("float64") @ args[1] + args[2], 0) + args[3]
    got, base = _run_llvm(split, args), _run_llvm(mod, args)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 1e-5
    assert np.abs(got - base).max() / scale < 1e-5
    import tvm_ffi
    assert tvm_ffi.structural_equal(split_k_pass(1024)(split), split)      # the partials are no relax matmul
    assert _calls(split_k_pass(4)(mod)) == _calls(mod)                      # 4 blocks: enough already


def test_fp16_inputs_keep_fp32_partials_and_the_output_dtype():
    """After ToMixedPrecision a matmul reads fp16 and writes fp32 (out_dtype); with fp16 activations it may write
    fp16: the partials are fp32 either way (fp16 partials would round S times), the output keeps its dtype."""
    from workbench.models.split_k import split_k_pass
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 2048)).astype("float16")
    w = (rng.standard_normal((2048, 64)) / 40).astype("float16")
    for out in ("float32", "float16"):
        b, r = np.zeros(64, out), np.zeros((64, 64), out)
        mod = split_k_pass(1024)(_dense_module((64,), 2048, 64, "float16", out))
        p = next(b.var for b in _bindings(mod["main"]) if "matmul_split_k" in str(b.value))
        assert str(p.ty.dtype) == "float32" and str(mod["main"].ret_ty.dtype) == out
        got = _run_llvm(mod, [x, w, b, r])
        want = np.maximum(x.astype("float64") @ w.astype("float64"), 0)
        assert got.dtype == np.dtype(out) and np.abs(got - want).max() / np.abs(want).max() < 3e-3


def test_on_cuda_the_epilogue_fuses_into_the_sum_and_dlight_schedules_the_partials_as_matmuls():
    """resnet18 (matmul lowering) b1 for sm_90: every small matmul becomes a partial kernel that dlight's Matmul
    rule schedules (not Fallback), the bias/ReLU/residual epilogues fuse into the summing kernels (one thread per
    output: SplitKSum), the inputs and weights are read in place (their reshapes are views in the VM, no copy
    kernel), and the kernels launched grow by one per split matmul only."""
    from tvm import tirx
    from workbench.models import schedules, zoo
    from workbench.models.compiler import lower, make_target
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get("resnet18", conv="matmul").make_module(1)
    split = _calls(schedules.fuse(mod, tgt, split_k=1024))
    partial = [c for c in split if c.startswith("matmul_split_k")]
    sums = [c for c in split if "split_k_sum" in c]
    assert len(partial) == len(sums) >= 8
    assert all(c.startswith("fused_split_k_sum") and "_add" in c for c in sums), sums
    rules: dict[str, str] = {}
    launched = {}
    for name, spec in (("plain", ScheduleSpec(matmul={})), ("split", ScheduleSpec(split_k=1024))):
        low = lower(mod, tgt, Variant("matmul", "fp32", spec), rules_used=rules if name == "split" else None)
        kernels = {gv.name_hint for gv, f in low.functions_items() if isinstance(f, tirx.PrimFunc)}
        launched[name] = [c for c in re.findall(r"^\s*(\w+)\(", low["main"].script(), re.M) if c in kernels]
    # x and w viewed as [.., S, K/S] and [S, K/S, N]: views (the VM's reshape) or fused into x's producer
    assert not [c for c in launched["split"] if c.startswith("reshape")]
    assert len(launched["split"]) == len(launched["plain"]) + len(partial)
    assert {rules[c] for c in set(partial)} == {"ConfiguredMatmul"}, {c: rules[c] for c in set(partial)}
    # the sums: one thread per output (GeneralReduction, which took them before SplitKSum, gave each output a
    # thread block: BERT-base b16 ran 4.5x slower on the H200); no other kernel is SplitKSum's
    assert {rules[c] for c in set(sums)} == {"SplitKSum"}, {c: rules[c] for c in set(sums)}
    assert not {c for c, r in rules.items() if r == "SplitKSum"} - set(sums)


def test_fp16_partials_are_batched_matmuls_for_the_tensor_core_rule():
    """With x and w read through their [.., S, K/S] / [S, K/S, N] views, every index of the partial kernel is a
    loop variable and S a batch axis of both operands: MmaMatmul (mma.sync) takes the fp16 partials, where it
    declines reads at computed indices (x[.., s*K/S + k])."""
    from workbench.models import schedules, tensorcore, zoo
    from workbench.models.compiler import make_target
    from tvm import tirx
    tgt = make_target("cuda", "sm_90")
    fused = schedules.fuse(zoo.get("tiny_transformer").make_module(1), tgt, "fp16", "fp16", "fp16", "fp16", 1024)
    shapes = [tensorcore.batched_gemm_shape(f) for gv, f in fused.functions_items()
              if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("matmul_split_k")]
    assert shapes and all(batch is not None and batch > 1 and k >= 64 for batch, _, _, k, _ in shapes), shapes
    from workbench.models.compiler import lower
    rules: dict[str, str] = {}
    spec = ScheduleSpec(split_k=1024, activations="fp16", reduce_inputs="fp16")
    lower(zoo.get("tiny_transformer").make_module(1), tgt, Variant("direct", "fp16", spec, weights="fp16"),
          rules_used=rules)
    partial = {c for c in rules if c.startswith("matmul_split_k")}
    assert partial and {rules[c] for c in partial} == {"MmaMatmul"}, rules


def _dense_ln_module(x_shape, k: int, n: int, residual_used_twice: bool = False):
    """layer_norm(x @ w + b + r) (BERT's projection and FFN outputs), optionally with the pre-norm value also
    returned (used twice: its sum must stay a kernel of its own)."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([*x_shape, k], "float32"))
    w = relax.Var("w", relax.TensorType([k, n], "float32"))
    b = relax.Var("b", relax.TensorType([n], "float32"))
    r = relax.Var("r", relax.TensorType([*x_shape, n], "float32"))
    g = relax.Var("g", relax.TensorType([n], "float32"))
    beta = relax.Var("beta", relax.TensorType([n], "float32"))
    with bb.function("main", [x, w, b, r, g, beta]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, w)), b)), r))
            ln = bb.emit(relax.op.nn.layer_norm(y, g, beta, axes=[-1], epsilon=1e-5))
            out = bb.emit_output(relax.Tuple([ln, y]) if residual_used_twice else ln)
        bb.emit_func_output(out)
    return bb.get()


def _fused(mod, split_k: int):
    import tvm
    from tvm import relax
    from workbench.models.split_k import layer_norm_pass, split_k_pass
    return tvm.transform.Sequential([split_k_pass(split_k), relax.transform.LegalizeOps(),
                                     relax.transform.AnnotateTIROpPattern(), layer_norm_pass(),
                                     relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def _partials(mod) -> tuple[int, list[str]]:
    """How many partial products the module's split matmul computes (its output's leading axis), and the kernels
    that read them."""
    from tvm import relax
    calls = [b for b in _bindings(mod["main"]) if isinstance(b.value, relax.Call)
             and getattr(b.value.op, "name", "") == "relax.call_tir"]
    (p,) = [b.var for b in calls if b.value.args[0].name_hint.startswith("matmul_split_k")]
    readers = [b.value.args[0].name_hint for b in calls if any(a.same_as(p) for a in b.value.args[1].fields)]
    return int(p.ty.shape[0]), readers


def test_a_sum_that_leads_to_a_layer_norm_becomes_part_of_its_kernel_with_the_same_values():
    """The partials' sum of a matmul whose result reaches a layer norm through elementwise ops used once is
    two); on LLVM it gives the unsplit values. A pre-norm value used again keeps its own summing kernel. The
    boundary: MAX_ROWS_SPLITS partials go to the layer norm, the next split count up to a summing kernel."""
    rng = np.random.default_rng(7)
    shape, k, n = (2, 24), 1024, 96
    m = shape[0] * shape[1]
    at_max = next(t for t in range(1, 1 << 16) if splits(m, n, k, t) == MAX_ROWS_SPLITS)   # split_k targets
    above = next(t for t in range(at_max, 1 << 16) if splits(m, n, k, t) > MAX_ROWS_SPLITS)
    args = [rng.standard_normal((*shape, k)).astype("float32"), rng.standard_normal((k, n)).astype("float32"),
            rng.standard_normal(n).astype("float32"), rng.standard_normal((*shape, n)).astype("float32"),
            rng.standard_normal(n).astype("float32"), rng.standard_normal(n).astype("float32")]
    fused = _fused(_dense_ln_module(shape, k, n), at_max)
    _, readers = _partials(fused)
    assert len(readers) == 1 and readers[0].startswith("fused_split_k_rows") and readers[0].endswith("layer_norm")
    names = [c for c in _calls(fused) if not c.startswith("reshape")]        # (the VM's views on the GPU)
    assert len(names) == 2 and names[0].startswith("matmul_split_k"), names
    assert names[1].startswith("fused_split_k_rows") and names[1].endswith("layer_norm"), names
    y = args[0].astype("float64") @ args[1] + args[2] + args[3]
    want = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * args[4] + args[5]
    got, base = _run_llvm(fused, args), _run_llvm(_dense_ln_module(shape, k, n), args)
    assert np.abs(got - want).max() < 1e-4 and np.abs(got - base).max() < 1e-4
    twice = _calls(_fused(_dense_ln_module(shape, k, n, residual_used_twice=True), at_max))
    assert any(c.startswith("fused_split_k_sum") for c in twice) and not any("rows" in c for c in twice), twice
    many = _fused(_dense_ln_module(shape, k, n), above)                 # too many partials to unroll
    _, readers = _partials(many)
    assert len(readers) == 1 and readers[0].startswith("fused_split_k_sum"), readers
    assert not any("rows" in c for c in _calls(many))


def test_on_cuda_berts_sums_before_layer_norms_fuse_into_them_and_row_reduction_schedules_them():
    """A transformer at b4 in fp16 (layer norms as keep_fp16_activations' call_tir) and fp32 (relax's layer_norm): the
    attention-output and FFN-output sums (with their bias and residual adds) are part of the layer-norm kernel,
    which RowReduction schedules; the query/key/value sums, whose results go on to the attention, keep SplitKSum."""
    from workbench.models import zoo
    from workbench.models.compiler import lower, make_target
    tgt = make_target("cuda", "sm_90")
    mod = zoo.get("tiny_transformer").make_module(4)
    for v in (Variant("direct", "fp16", ScheduleSpec(split_k=512, activations="fp16", reduce_inputs="fp16",
                                                     row_reduction=256), weights="fp16"),
              Variant("direct", "fp32", ScheduleSpec(split_k=512, row_reduction=256, simt=True))):
        rules: dict[str, str] = {}
        lower(mod, tgt, v, rules_used=rules)
        rows = {c: r for c, r in rules.items() if "split_k_rows" in c}
        assert rows and all(c.endswith("layer_norm") and r == "RowReduction" for c, r in rows.items()), rules
        assert {r for c, r in rules.items() if "split_k_sum" in c} == {"SplitKSum"}, rules
        assert not [c for c in rules if c.startswith("layer_norm")], rules     # no layer norm left on its own
