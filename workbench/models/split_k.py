"""Split-K: matmuls whose output is too small to fill the GPU, computed as partial matmuls over slices of K.

dlight's Matmul rule gives each thread block one output tile (32x64 in fp32) and loops over all of K inside it.
A matmul with a small output and a long K then runs on a few blocks of a 132-SM GPU, each walking K alone:
ResNet-50's last stage at batch 1 ([49, 4608] x [4608, 512]) gets 16 blocks and ran 191 us on the H200 (1.2
TFLOP/s), BERT-base's FFN output at batch 1 ([128, 3072] x [3072, 768]) 48 blocks and 131 us. cuBLAS splits K
in such shapes; this rewrite does the same in the Relax graph, before fusion:

    y = matmul(x, w)          x: [..., K], w: [K, N] (a weight: 2-D)
 -> p[s, ..., n] = sum over k < K/S of x3[..., s, k] * w3[s, k, n]     (one kernel, S times the blocks)
    y = sum over s of p[s]                                              (a second kernel)

with x3 = reshape(x, [..., S, K/S]) and w3 = reshape(w, [S, K/S, N]): views (the VM's reshape, no kernel), so
every index the partial kernel reads at is a plain loop variable, and s is a batch axis of both operands.
S is the smallest power of two that brings the blocks (counted with dlight's 32x64 fp32 tile) to
`target_blocks`, keeping K/S >= MIN_SLICE, S <= MAX_SPLITS and K divisible by S. The count stays dlight's under
SimtMatmul too, whose tiles are 2-4x larger: a target then means that many fewer real blocks (BERT's fp32
winners with it carry targets of 512 and 2048).

The partial kernel is an ordinary batched matmul to the schedule rules: dlight's Matmul or SimtMatmul in fp32,
MmaMatmul for fp16 inputs (which accumulate and hand over partials in fp32; it declines reads at computed
indices such as x[..., s*K/S + k], hence the views). The summing kernel is marked as a matmul for fusion (op_pattern
kOutEWiseFusable), so the matmul's epilogue (bias, activation, residual add) fuses into it as it fused into the
matmul, and is scheduled by `SplitKSum` (ahead of the other rules when ScheduleSpec.split_k is set): one
thread per output, its S partials added in registers. dlight's GeneralReduction, which took it otherwise, gives
every output a thread block of 256 threads for S values (BERT-base b16 ran 4.5x slower). S extra reads and one
write of the output are then the whole cost. Sums are still fp32 fused multiply-adds, in another order: the
numerics are those of fp32 (strict fp32 stays strict, unlike TF32). Matmuls with M == 1 (GEMV: dlight's GEMV
rule already splits K across threads) and batched matmuls (attention: both operands activations) are left
alone. On the H200 (bench/results/kernel_quality.md, round 13) the tuned models are 1.1-3.9x faster in fp32
(ResNet-50 b1 3.40 -> 1.07 ms) and up to 1.4x in fp16.

A matmul whose result reaches a layer norm only through elementwise ops used once (BERT's attention-output and
FFN-output projections: + bias, + residual, casts) gets its partials summed by an unrolled expression instead
(at most MAX_ROWS_SPLITS partials), marked kBroadcast, and `layer_norm_pass` marks the layer norms kCommReduce:
FuseOps then fuses the sum and the adds into the layer norm's kernel (RowReduction inlines them into the row's
reductions), one kernel where the summing kernel's store and the layer norm's load were two. On the H200 (round
29) BERT b4 fp16 1.067 -> 1.029 ms as a graph, b1 fp16 0.676 -> 0.645, fp32 b1-b8 2-3% faster.
"""
from __future__ import annotations

import functools
import operator

TILE_M, TILE_N = 32, 64            # dlight Matmul's fp32 CUDA tile (rows x columns of the output per block)
MIN_SLICE = 64                     # shortest slice of K a partial matmul gets
MAX_SPLITS = 64                    # most slices: the summing kernel adds them in registers (SmallReduction)
SUM_BLOCK = "split_k_sum"          # the summing kernel's reduction block, which SplitKSum looks for
ROWS_BLOCK = "split_k_rows"        # the unrolled sum of a matmul whose result goes on to a layer norm
BROADCAST = 1                      # tvm OpPatternKind.kBroadcast: fuses into a following reduction
COMM_REDUCE = 3                    # tvm OpPatternKind.kCommReduce: takes the elementwise ops before it
OUT_EWISE_FUSABLE = 4              # tvm OpPatternKind.kOutEWiseFusable: elementwise consumers fuse into it
MAX_ROWS_SPLITS = 8                # most partials an unrolled sum adds (one load each per element)


def splits(m: int, n: int, k: int, target_blocks: int) -> int:
    """How many slices of K an [m, k] x [k, n] matmul is computed in (1: not split)."""
    if m <= 1:
        return 1
    blocks = -(-m // TILE_M) * -(-n // TILE_N)
    s = 1
    while blocks * s < target_blocks and 2 * s <= MAX_SPLITS and k % (2 * s) == 0 and k // (2 * s) >= MIN_SLICE:
        s *= 2
    return s


def split_k_pass(target_blocks: int):
    """A module pass rewriting every eligible relax matmul of every Relax function (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="SplitK")
    def _pass(mod, _ctx):
        return _mutator_class()(mod, target_blocks).transform()

    return _pass


def is_layer_norm(func) -> bool:
    """Whether a PrimFunc is a layer norm as topi makes them (its output block T_layer_norm): LegalizeOps' and
    keep_fp16_activations' (which reads fp16)."""
    from tvm import s_tir, tirx
    if not isinstance(func, tirx.PrimFunc):
        return False
    try:
        s_tir.Schedule(func).get_sblock("T_layer_norm")
    except Exception:  # noqa: BLE001 - no such block
        return False
    return True


def layer_norm_pass():
    """Marks the layer norms' kernels as reductions (kCommReduce; AnnotateTIROpPattern makes them
    kOutEWiseFusable), so FuseOps fuses the elementwise ops before one into it: an unrolled split-K sum
    (ROWS_BLOCK) and the bias and residual adds after it. Run after AnnotateTIROpPattern."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="LayerNormTakesElementwise")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and is_layer_norm(func):
                mod[gv] = func.with_attr("op_pattern", COMM_REDUCE)
        return mod

    return _pass


def sum_rule(threads: int = 256):
    """The schedule rule of the summing kernels (see the module docstring); it declines every other kernel."""
    return _sum_rule_class()(threads)


@functools.lru_cache(maxsize=None)
def _sum_rule_class():
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
    from workbench.models.schedules import small_reduction_rule

    class SplitKSum(GPUScheduleRule):
        """SmallReduction (one thread per output, `threads` per block) for kernels with a split_k_sum block."""

        def __init__(self, threads: int = 256):
            self.inner = small_reduction_rule(threads, MAX_SPLITS)

        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc):
                return None
            try:
                s_tir.Schedule(func).get_sblock(SUM_BLOCK)
            except Exception:  # noqa: BLE001 - no such block: not a summing kernel
                return None
            return self.inner.apply(func, target, tunable)

    return SplitKSum


@functools.lru_cache(maxsize=None)
def _mutator_class():
    """The Relax mutator (built on first use: it needs the TVM compiler)."""
    import tvm
    from tvm import relax, te

    matmul_op = tvm.ir.Op.get("relax.matmul")
    layer_norm_op = tvm.ir.Op.get("relax.nn.layer_norm")
    call_tir_op = tvm.ir.Op.get("relax.call_tir")
    elementwise = {tvm.ir.Op.get(f"relax.{n}") for n in ("add", "subtract", "multiply", "astype")}

    def operands(value) -> list:
        """The values a binding's expression reads (a call's arguments, a tuple's fields, nested)."""
        out, todo = [], [value]
        while todo:
            e = todo.pop()
            if isinstance(e, relax.Call):
                todo.extend(e.args)
            elif isinstance(e, relax.Tuple):
                todo.extend(e.fields)
            elif isinstance(e, relax.TupleGetItem):
                todo.append(e.tuple_value)
            elif isinstance(e, relax.Var):
                out.append(e)
        return out

    def layer_norm_input(value, mod):
        """The normalized input of a layer norm call (relax's, or a call_tir of a layer-norm kernel, as
        keep_fp16_activations makes them), else None."""
        if not isinstance(value, relax.Call):
            return None
        if value.op == layer_norm_op:
            return value.args[0]
        if value.op == call_tir_op and is_layer_norm(mod[value.args[0]]):
            return value.args[1].fields[0]
        return None

    def into_layer_norm(func, mod) -> set:
        """The matmul calls of `func` whose result reaches a layer norm's input only through elementwise ops (bias
        and residual adds, casts), each value on the way used once: their sums may become part of that kernel."""
        defs: dict = {}
        uses: dict = {}
        body = func.body
        for block in body.blocks:
            for b in block.bindings:
                defs[b.var] = b.value
                for a in operands(b.value):
                    uses[a] = uses.get(a, 0) + 1
        for a in operands(body.body):
            uses[a] = uses.get(a, 0) + 1
        found = set()
        for value in defs.values():
            start = layer_norm_input(value, mod)
            if start is None:
                continue
            todo = [start]
            while todo:
                v = todo.pop()
                d = defs.get(v)
                if uses.get(v) != 1 or not isinstance(d, relax.Call):
                    continue
                if d.op == matmul_op:
                    found.add(d)
                elif d.op in elementwise:
                    todo.extend(d.args)
        return found

    def static_shape(ty) -> list[int] | None:
        try:
            return [int(d) for d in ty.shape]
        except (TypeError, ValueError, AttributeError):
            return None                                        # symbolic or unknown: leave the matmul alone

    @relax.expr_functor.mutator
    class SplitK(relax.PyExprMutator):
        def __init__(self, mod, target_blocks: int):
            super().__init__(mod)
            self.mod_ = mod
            self.target_blocks = target_blocks

        def transform(self):
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.into_ln = into_layer_norm(func, self.mod_)
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def visit_call_(self, call):
            rows = call in self.into_ln
            call = self.visit_expr_post_order(call)
            if call.op != matmul_op:
                return call
            x, w = call.args
            xs, ws = static_shape(x.ty), static_shape(w.ty)
            if xs is None or ws is None or len(ws) != 2 or len(xs) < 2 or xs[-1] != ws[0]:
                return call
            k, n = ws
            m = 1
            for d in xs[:-1]:
                m *= d
            s = splits(m, n, k, self.target_blocks)
            if s == 1:
                return call
            out = str(call.ty.dtype)
            acc = "float32" if out == "float16" else out      # fp16 partials would round S times
            kp = k // s
            x3 = self.builder_.emit(relax.op.reshape(x, [*xs[:-1], s, kp]))
            w3 = self.builder_.emit(relax.op.reshape(w, [s, kp, n]))
            p = self.builder_.emit(self.builder_.call_te(_partial, x3, w3, acc, primfunc_name_hint="matmul_split_k"))
            rows = rows and s <= MAX_ROWS_SPLITS
            gv = self.builder_.add_func(_summing_func(tuple([s, *xs[:-1], n]), acc, out, rows),
                                        "split_k_rows" if rows else "split_k_sum")
            return relax.call_tir(gv, [p], relax.TensorType([*xs[:-1], n], out))

    def _partial(x3, w3, acc: str):
        k = te.reduce_axis((0, w3.shape[1]), "k")
        return te.compute(
            (w3.shape[0], *x3.shape[:-2], w3.shape[2]),
            lambda sl, *i: te.sum(x3[(*i[:-1], sl, k)].astype(acc) * w3[sl, k, i[-1]].astype(acc), axis=k),
            name="matmul_split_k")

    def _summing_func(dims: tuple[int, ...], acc: str, out: str, rows: bool = False):
        """The sum of the partials. `rows`: unrolled (elementwise to the fusion, kBroadcast), so that it and the
        elementwise ops after it fuse into the layer norm they lead to (`layer_norm_pass`): one kernel where the
        sum, its store, the layer norm's launch and its load were two."""
        shape = [tvm.tirx.IntImm("int64", d) for d in dims]       # int64, as the legalized ops' shapes
        p = te.placeholder(shape, acc, "p")
        if rows:
            y = te.compute(shape[1:], lambda *i: functools.reduce(operator.add, (p[(j, *i)] for j in range(dims[0]))),
                           name=ROWS_BLOCK)
        else:
            r = te.reduce_axis((0, dims[0]), "s")
            y = te.compute(shape[1:], lambda *i: te.sum(p[(r, *i)], axis=r), name=SUM_BLOCK)
        if out != acc:
            y = te.compute(shape[1:], lambda *i: y[i].astype(out), name="split_k_cast")
        func = te.create_prim_func([p, y]).without_attr("global_symbol")    # named by add_func
        return func.with_attr("op_pattern", BROADCAST if rows else OUT_EWISE_FUSABLE)

    return SplitK
