"""Implicit GEMM (workbench.models.implicit_gemm, ScheduleSpec.implicit_gemm): the matmul lowering's kxk convs as
one kernel whose copy of A computes the pad and the im2col.

CPU only: the TE formulation and the rewritten relax module are checked on llvm against the NumPy reference
(reference.py); the CUDA build for sm_90 has no im2col/concatenation kernel for the 3x3 convs, its conv kernels are
mma kernels whose activation loads are all predicated 16-byte cp.async copies, and NVRTC compiles the source.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from workbench.models import reference, zoo
from workbench.models.schedules import ScheduleError, ScheduleSpec
from workbench.models.tuning import Variant

FP16_TOL = 3e-2                     # bench.kernel_quality's fp16 tolerance (max error / max |reference|)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def test_spec_field_is_off_by_default_and_round_trips():
    assert ScheduleSpec().implicit_gemm is False and ScheduleSpec().to_json() == {}
    on = ScheduleSpec.from_json({"implicit_gemm": True, "activations": "fp16"})
    assert on.implicit_gemm and not on.is_default and on.to_json() == {"activations": "fp16", "implicit_gemm": True}
    assert ScheduleSpec.from_json(on.to_json()) == on
    v = Variant("matmul", "fp16", on)
    assert Variant.from_json(v.to_json()) == v and "implicit_gemm" in v.describe()
    with pytest.raises(ScheduleError, match="schedule.implicit_gemm must be true or false, got 1"):
        ScheduleSpec(implicit_gemm=1, activations="fp16")
    with pytest.raises(ScheduleError, match="schedule.implicit_gemm needs activations 'fp16'"):
        ScheduleSpec(implicit_gemm=True)


@pytest.mark.parametrize("h,w,cin,cout,k,s", [(7, 7, 8, 16, 3, 1), (8, 6, 16, 8, 3, 2), (9, 9, 8, 8, 5, 2)])
def test_conv_gemm_computes_the_padded_convolution(h, w, cin, cout, k, s):
    """The TE formulation alone (fp32 on llvm) against reference.conv2d: odd sizes, stride 2, a 5x5 kernel."""
    import tvm
    from tvm import te
    from workbench.models.implicit_gemm import conv_gemm
    p = k // 2
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    x = te.placeholder((2, h, w, cin), "float32", name="x")
    wt = te.placeholder((k * k * cin, cout), "float32", name="w")
    c = conv_gemm(x, wt, k, s, p, oh, ow, "float32", "float32")
    f = tvm.compile(te.create_prim_func([x, wt, c]), target="llvm")
    rng = np.random.default_rng(0)
    xn = rng.standard_normal((2, h, w, cin)).astype(np.float32)
    wn = rng.standard_normal((cout, cin, k, k)).astype(np.float32)        # OIHW
    out = tvm.runtime.tensor(np.zeros((2, oh, ow, cout), np.float32))
    f(tvm.runtime.tensor(xn), tvm.runtime.tensor(zoo.lowered_weight(wn, (k * k * cin, cout))), out)
    want = reference.conv2d(xn.transpose(0, 3, 1, 2).astype(np.float64), wn.astype(np.float64), None, s, p)
    np.testing.assert_allclose(out.numpy(), want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def _small_net():
    """A ResNet-style net of the matmul lowering: an RGB stem (cin 3: keeps its im2col gather), two 3x3 convs (stride 1
    and 2) that implicit GEMM takes, a strided 1x1 shortcut and a residual add + relu epilogue."""
    from tvm.relax.frontend import nn
    conv = zoo._conv_factory("matmul")

    class Net(nn.Module):
        def __init__(self):
            self.stem = conv(3, 32, 3)
            self.conv1 = conv(32, 32, 3)              # N = 32: the mma rule's smallest (tensorcore.MIN_N)
            self.conv2 = conv(32, 64, 3, 2)
            self.down = conv(32, 64, 1, 2)

        def main(self, x):
            y = nn.op.relu(self.stem(x))
            return nn.op.relu(self.conv2(nn.op.relu(self.conv1(y))) + self.down(y))

    return Net()


def _net_module(batch: int, hw: int):
    from tvm.relax.frontend import nn
    net = _small_net()
    mod, params = net.export_tvm(spec={"main": {"x": nn.spec.Tensor([batch, hw, hw, 3], "float32")}}, debug=False)
    return mod, [(n, tuple(int(d) for d in p.shape)) for n, p in params]


def _net_reference(x: np.ndarray, w: dict) -> np.ndarray:
    def conv(t, name, s):
        o, kk = w[f"{name}.bias"].shape[0], int(round((w[f"{name}.weight"].shape[0] // t.shape[1]) ** 0.5))
        weight = zoo.canonical_weight(w[f"{name}.weight"], (o, t.shape[1], kk, kk))
        return reference.conv2d(t, weight, w[f"{name}.bias"], s, kk // 2)
    t = x.transpose(0, 3, 1, 2).astype(np.float64)
    y = reference.relu(conv(t, "stem", 1))
    out = reference.relu(conv(reference.relu(conv(y, "conv1", 1)), "conv2", 2) + conv(y, "down", 2))
    return out.transpose(0, 2, 3, 1)


def _fp16_mod(mod, implicit: bool):
    from workbench.models import schedules
    from workbench.models.implicit_gemm import implicit_gemm_pass
    mod = schedules.mixed_precision(mod, "fp16", activations="fp16")
    return implicit_gemm_pass()(mod) if implicit else mod


def _ops(mod) -> list[str]:
    """The ops main calls, in order (a call_tir as the name of the PrimFunc it calls)."""
    import tvm
    from tvm import relax
    out = []
    for blk in mod["main"].body.blocks:
        for b in blk.bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
                name = str(b.value.op.name)
                out.append(b.value.args[0].name_hint if name == "relax.call_tir" else name)
    return out


def test_pass_rewrites_the_3x3_convs_only_and_the_model_still_computes_the_same_on_cpu():
    """fp16 (ToMixedPrecision, fp16 activations) on llvm: the two 3x3 convs become implicit_conv calls (their
    pads, slices and concatenations gone), the stem (cin 3) and the 1x1 stay; the output matches the NumPy
    reference and the explicit im2col's build."""
    import tvm
    from tvm import relax
    mod, params = _net_module(2, 10)
    rng = np.random.default_rng(1)
    weights = {n: (rng.standard_normal(s) * (np.sqrt(2 / s[0]) if len(s) == 2 else 0.05)).astype(np.float32)
               for n, s in params}
    x = rng.standard_normal((2, 10, 10, 3)).astype(np.float32)
    outs = {}
    for implicit in (False, True):
        m = _fp16_mod(mod, implicit)
        ops = _ops(m)
        calls = [o for o in ops if o.startswith("implicit_conv")]
        assert len(calls) == (2 if implicit else 0)
        assert ops.count("relax.concat") == (0 if implicit else 2)
        assert ops.count("relax.nn.pad") == (1 if implicit else 3) and "im2col" in ops     # the stem's stay
        vm = relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())
        args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(weights[n]) for n, _ in params]
        outs[implicit] = vm["main"](*args).numpy()
    want = _net_reference(x, weights)
    assert _rel_err(outs[True], want) < FP16_TOL
    assert _rel_err(outs[True], outs[False].astype(np.float64)) < 1e-3       # same products, fp32 sums


def test_resnet18_fp16_matches_the_reference_on_cpu():
    """The zoo's ResNet-18 (matmul lowering, 32x32 input: every stage's 3x3 convs at a few pixels) with implicit
    GEMM, fp16 on llvm, against reference_forward."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn
    src = zoo.get("resnet18", conv="matmul")
    mod, _ = zoo._resnet_module("resnet18", "matmul").export_tvm(
        spec={"main": {"input": nn.spec.Tensor([1, 3, 32, 32], "float32")}}, debug=False)
    m = _fp16_mod(mod, True)
    ops = _ops(m)
    assert sum(o.startswith("implicit_conv") for o in ops) == 16 and "relax.concat" not in ops and "im2col" in ops
    weights = src.weights()
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for _, w in weights]).numpy()
    assert _rel_err(got, reference.reference_forward("resnet18-matmul", [x], weights).astype(np.float64)) < FP16_TOL


@pytest.fixture(scope="module")
def cuda_build():
    """The small net at b4 (16x16) for sm_90 with implicit GEMM: (CUDA source, kernel name -> rule)."""
    from workbench.models.compiler import build_relax, cuda_sources, lower, make_target
    mod, _ = _net_module(4, 16)
    tgt = make_target("cuda", "sm_90")
    v = Variant.from_json({"lowering": "matmul", "precision": "fp16", "weights": "fp16", "schedule": {
        "activations": "fp16", "injective": 8, "implicit_gemm": True}})
    rules: dict = {}
    ex = build_relax(lower(mod, tgt, v, rules_used=rules), tgt)
    return "\n".join(cuda_sources(ex)), rules


@pytest.mark.slow
def test_cuda_build_has_no_im2col_kernel_for_the_3x3_convs(cuda_build):
    from workbench.models import schedules
    from workbench.models.compiler import make_target
    _, rules = cuda_build
    implicit = sorted(n for n in rules if n.startswith("fused_implicit_conv"))
    assert len(implicit) == 2 and all(rules[n] == "MmaMatmul" for n in implicit)
    assert all("add" in n and "relu" in n for n in implicit)                 # the epilogue fused into the conv
    assert not any("concatenate" in n for n in rules)                        # (the 1x1's subsample is a slice)
    assert [n for n in rules if "pad" in n] == [n for n in rules if "im2col" in n]     # the stem's only
    mod, _ = _net_module(4, 16)                                            # without the option: two im2col kernels
    plain = [gv.name_hint for gv, _ in schedules.fuse(mod, make_target("cuda", "sm_90"), "fp16", "fp16")
             .functions_items()]
    assert sum("concatenate" in n for n in plain) == 2


@pytest.mark.slow
def test_cuda_conv_kernels_load_activations_as_16_byte_cp_async_and_compile(cuda_build):
    from workbench.models import cubin_cache
    from workbench.models.compiler import cuda_kernels
    from workbench.models.tensorcore import cp_async_hazards
    src, _ = cuda_build
    bodies = {n: b for n, b in cuda_kernels(src).items() if n.startswith("fused_implicit_conv")}
    assert len(bodies) == 2
    for name, body in bodies.items():
        assert "mma.sync" in body and "ldmatrix" in body, name
        # ptx_cp_async_legacy_pred_cg_16_2_2(dst, dst_off, src, src_off, predicate): 16 bytes, zero-filled when
        # the predicate (in bounds: not padding) is false
        pred = re.findall(r"ptx_cp_async_legacy_pred_cg_16_2_2\(buf_dyn_shmem_ptr, .*?, (\w+_ptr), ", body)
        acts = {p for p in pred if "weight" not in p}
        assert len(acts) == 1, (name, pred)
        act = acts.pop()
        assert not re.search(re.escape(act) + r"\[", body), f"{name}: scalar loads of {act}"
    assert cp_async_hazards(src) == []
    assert cubin_cache.compile_cubin(src, "sm_90")[:4] == b"\x7fELF"
