"""Implicit GEMM: the zoo's conv-as-matmul lowering without the im2col buffer (ScheduleSpec.implicit_gemm).

The matmul lowering (zoo `_conv_factory`) builds a kxk conv's operand as pad -> k*k shifted strided slices ->
concatenation, `matmul(cols, W)`, W [k*k*cin, cout]. FuseOps fuses no injective producer into a matmul (the
matmul is kOutEWiseFusable: only elementwise producers join it), so the im2col is a kernel of its own that writes
k*k times the activation and the matmul reads it back (ResNet-18 b16 fp16: ~170 us of 0.78 ms).

`implicit_gemm_pass` rewrites, before legalization, each such `matmul(concat(slices(pad(x))), W)` into one
call_tir of a PrimFunc of two blocks: the im2col as a compute of x with the padding a bounds test
(`im2col[n, y, x, kk] = x[n, s*y + i - p, s*x + j - p, c]` or 0, kk = (i*k + j)*cin + c, the concatenation's
tap-major column order, so the weights keep their layout), and the matmul reading it. The function is marked
kOutEWiseFusable, so FuseOps still fuses the epilogue (bias, residual add, relu, casts) into it; the pad, slices
and concatenation, now unused, are dropped. The mma rule (tensorcore._schedule_gemm) sees a plain matmul
C[m, co] += im2col[m, kk] * W[kk, co] and inlines the im2col block into its global->shared copy of A: with
cin % 8 == 0 an 8-lane vector of kk never crosses a tap, so the copy is one 16-byte cp.async per vector with the
bounds test as its predicate (zero-filled when false: the padding), and no im2col is ever stored.

Taken only where that holds: fp16 operands, x included (ScheduleSpec.activations "fp16": with fp32 activations
ToMixedPrecision casts the padded x, which the copy could only do element by element), cin % MIN_CHANNELS == 0
(not the RGB stems, cin = 3, which stay as they are), static shapes. A matmul that split-K rewrote before (the pass
runs after split_k_pass) reads its im2col through a reshape and stays explicit too.
"""
from __future__ import annotations

import functools

from workbench.models.architecture import shape_of

MIN_CHANNELS = 8                   # cin a multiple of this: 8 fp16 lanes = one 16-byte vector within one tap
OUT_EWISE_FUSABLE = 4              # tvm OpPatternKind.kOutEWiseFusable: elementwise consumers fuse into it
IM2COL_BLOCK = "implicit_im2col"   # the im2col block, inlined into the A copy by the mma schedule
FUNC_NAME = "implicit_conv"        # the PrimFunc (and so the fused kernels' names: fused_implicit_conv_add_...)


def conv_gemm(x, w, k: int, s: int, p: int, oh: int, ow: int, in_dtype: str = "float16",
              out_dtype: str = "float32"):
    """TE: C[n, y, x, co] = sum over kk of im2col[n, y, x, kk] * w[kk, co], accumulated in `out_dtype`, where
    im2col[n, y, x, (i*k + j)*cin + c] = x[n, s*y + i - p, s*x + j - p, c] (0 outside x: the padding) in
    `in_dtype` (x is cast if it differs). x: NHWC, unpadded; w: [k*k*cin, cout]. Returns C."""
    from tvm import te, tirx
    n, h, wd, cin = (int(d) for d in x.shape)
    kdim, cout = (int(d) for d in w.shape)
    if kdim != k * k * cin:
        raise ValueError(f"weight rows {kdim} != k*k*cin = {k * k * cin}")

    def col(b, y, xx, kk):
        tap, c = kk // cin, kk % cin
        hy, wx = s * y + tap // k - p, s * xx + tap % k - p
        v = x[b, hy, wx, c]
        v = v if str(x.dtype) == in_dtype else tirx.Cast(in_dtype, v)
        return tirx.if_then_else(tirx.all(hy >= 0, hy < h, wx >= 0, wx < wd), v, tirx.const(0, in_dtype))

    i64 = functools.partial(tirx.IntImm, "int64")        # the shapes' dtype (see conv_gemm_func)
    a = te.compute([i64(d) for d in (n, oh, ow, kdim)], col, name=IM2COL_BLOCK)
    r = te.reduce_axis((i64(0), i64(kdim)), name="k")
    return te.compute([i64(d) for d in (n, oh, ow, cout)], lambda b, y, xx, co: te.sum(
        tirx.Cast(out_dtype, a[b, y, xx, r]) * tirx.Cast(out_dtype, w[r, co]), axis=[r]), name="matmul")


def conv_gemm_func(x_shape, x_dtype: str, w_shape, k: int, s: int, p: int, oh: int, ow: int,
                   in_dtype: str = "float16", out_dtype: str = "float32"):
    """The PrimFunc (x, w) -> C of `conv_gemm`, marked kOutEWiseFusable for FuseOps. int64 shapes, as the
    legalized ops' (FuseTIR refuses a buffer its neighbours see with other shape dtypes)."""
    from tvm import te, tirx
    x = te.placeholder([tirx.IntImm("int64", int(d)) for d in x_shape], x_dtype, name="x")
    w = te.placeholder([tirx.IntImm("int64", int(d)) for d in w_shape], in_dtype, name="w")
    c = conv_gemm(x, w, k, s, p, oh, ow, in_dtype, out_dtype)
    return te.create_prim_func([x, w, c]).without_attr("global_symbol").with_attr("op_pattern", OUT_EWISE_FUSABLE)


def implicit_gemm_pass():
    """A module pass rewriting every eligible conv-as-matmul of every Relax function (module docstring)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="ImplicitGemm")
    def _pass(mod, _ctx):
        out = _mutator_class()(mod).transform()
        return relax.transform.DeadCodeElimination()(out)      # the now unused pads, slices, concatenations

    return _pass


def _ints(arr) -> list[int] | None:
    try:
        return [int(v) for v in arr]
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _mutator_class():
    """The Relax mutator (built on first use: it needs the TVM compiler)."""
    import tvm
    from tvm import relax

    ops = {n: tvm.ir.Op.get(f"relax.{n}") for n in ("matmul", "concat", "strided_slice")}
    pad_op = tvm.ir.Op.get("relax.nn.pad")

    def conv_of(call, defs: dict):
        """(x, w, k, s, p) if `call` is matmul(concat(k*k slices of pad(x)), w) as the matmul lowering writes a
        kxk conv (taps row-major, stride s in both axes, symmetric zero padding p), with fp16 operands (x too: an
        fp32 x, padded then cast by ToMixedPrecision, would be cast in the copy, element by element), an fp32
        result and cin % MIN_CHANNELS == 0; else None."""
        if call.op != ops["matmul"]:
            return None
        cols, w = call.args
        cat = defs.get(cols)
        if not isinstance(cat, relax.Call) or cat.op != ops["concat"]:
            return None
        taps = cat.args[0]
        taps = defs.get(taps, taps)
        if not isinstance(taps, relax.Tuple):
            return None
        cs, ws, out = shape_of(cols), shape_of(w), str(call.ty.dtype)
        if cs is None or ws is None or len(cs) != 4 or len(ws) != 2 or int(cat.attrs.axis) not in (3, -1):
            return None
        if str(cols.ty.dtype) != "float16" or str(w.ty.dtype) != "float16" or out != "float32":
            return None
        k = int(round(len(taps.fields) ** 0.5))
        if k < 2 or k * k != len(taps.fields):
            return None
        src, stride = None, None
        for t, tap in enumerate(taps.fields):
            sl = defs.get(tap)
            if not isinstance(sl, relax.Call) or sl.op != ops["strided_slice"]:
                return None
            axes, begin, strides = (_ints(sl.args[i]) if isinstance(sl.args[i], relax.Tuple) else
                                    _ints(getattr(sl.args[i], "values", None) or []) for i in (1, 2, 4))
            if axes != [1, 2] or begin != [t // k, t % k] or not strides or strides[0] != strides[1]:
                return None
            if (src is not None and not sl.args[0].same_as(src)) or (stride is not None and strides[0] != stride):
                return None
            src, stride = sl.args[0], strides[0]
        prod = defs.get(src)
        if not isinstance(prod, relax.Call) or prod.op != pad_op:
            return None
        pw = _ints(prod.attrs.pad_width)
        if pw is None or len(pw) != 8 or pw[:2] != [0, 0] or pw[6:] != [0, 0] or len(set(pw[2:6])) != 1:
            return None
        if str(prod.attrs.pad_mode) != "constant" or float(prod.attrs.pad_value) != 0.0:
            return None
        x = prod.args[0]
        xs, ys = shape_of(x), shape_of(call)
        if xs is None or ys is None or len(xs) != 4 or str(x.ty.dtype) != "float16" or xs[3] % MIN_CHANNELS:
            return None
        if cs != (xs[0], ys[1], ys[2], k * k * xs[3]) or ws[0] != k * k * xs[3]:
            return None
        return x, w, k, stride, pw[2]

    @relax.expr_functor.mutator
    class ImplicitGemm(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod

        def transform(self):
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
                    self.defs = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def visit_call_(self, call):
            found = conv_of(call, self.defs)
            call = self.visit_expr_post_order(call)
            if found is None:
                return call
            x, w, k, s, p = found
            x, w = self.visit_expr(x), self.visit_expr(w)
            n, oh, ow, cout = shape_of(call)
            func = conv_gemm_func(shape_of(x), str(x.ty.dtype), shape_of(w), k, s, p, oh, ow)
            gv = self.builder_.add_func(func, FUNC_NAME)
            return relax.call_tir(gv, [x, w], relax.TensorType([n, oh, ow, cout], "float32"))

    return ImplicitGemm
