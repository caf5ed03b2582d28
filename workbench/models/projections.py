"""Fused projections: sibling matmuls that read one input computed as one wider matmul (tuning.Variant
projections "fused").

A transformer's attention projects its input three times, `q = x Wq + bq`, `k = x Wk + bk`, `v = x Wv + bv`
(BERT-base: three 768 x 768 matmuls per layer). One matmul `x [Wq Wk Wv] + [bq bk bv]`, N = 2304, gives the
GEMM schedules three times the thread blocks per launch and one launch instead of three (BERT-base b16 fp16:
the three ran at 165 TFLOP/s, the 3072-wide FFN matmul at 228; fp32 ran them split along K, with a summing
kernel each). The weights must then lie side by side: the fused model takes `[Wq Wk Wv]` as one weight, so this
is a change of the model's weights layout, made to the ModelSource (`fused`, which `compiler.resolve_tuning`
applies when the variant says so), not a kernel schedule. Weight names stay readable: the fused weight of
`encoder.layer.0.attention.self.query.weight` and its siblings is
`encoder.layer.0.attention.self.query_key_value.weight`.

The fused matmul's result is cut back into q, k and v by slices of its last axis. A slice is a copy kernel of
its own (FuseOps joins no injective producer to a matmul-like consumer), so fusion is taken only where every
part is read by einsums (attention's products, through the head reshape): `einsum_views_pass` and
`schedules._einsum_widened` then give each such einsum the fused result itself, reshaped [.., parts, heads,
head_dim], with a view stage selecting its part inside the einsum's PrimFunc, which the GEMM schedules inline
into their global -> shared copies (the same kernels, reading rows 3x as long). Groups whose results anything
else reads are left alone.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from workbench.models.architecture import shape_of
from workbench.models.implicit_gemm import OUT_EWISE_FUSABLE   # (relax's own einsum kernels get it too)

PROJECTIONS = ("separate", "fused")


class ProjectionError(ValueError):
    """A model that cannot be given fused projections, with the reason."""


@dataclass(frozen=True)
class Group:
    """Sibling projections: weight parameter indices (after the inputs) of their matrices and biases, in the
    order the model computes them; `widths` their output widths."""
    weights: tuple[int, ...]
    biases: tuple[int, ...]
    widths: tuple[int, ...]


def fused_name(names: list[str]) -> str:
    """"a.query.weight", "a.key.weight" -> "a.query_key.weight": the common prefix and suffix (by dotted part)
    around the parts that differ, joined by "_" (a name TVM can carry into kernel source as it carries dots)."""
    parts = [n.split(".") for n in names]
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    tail = 0
    while all(len(p) > lead + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    middle = "_".join("_".join(p[lead:len(p) - tail]) for p in parts)
    return ".".join(parts[0][:lead] + [middle] + (parts[0][len(parts[0]) - tail:] if tail else []))


@functools.lru_cache(maxsize=None)
def _ops():
    import tvm
    return {n: tvm.ir.Op.get(f"relax.{n}") for n in ("matmul", "add", "reshape", "einsum", "strided_slice")}


def _projections(func) -> list[tuple]:
    """Every `add(matmul(x, W), b)` binding of a Relax function (inputs, then weights: its "num_input") with W
    [K, N] and b [N] weight parameters, the matmul read only by its add and the result read only by einsums
    through a reshape of its last axis: (add var, matmul var, x, W index, b index, N, (x, K, dtype)), weight
    indices counted after the inputs."""
    from tvm import relax
    ops = _ops()
    n_in = int(func.attrs["num_input"])
    weight_index = {p: i - n_in for i, p in enumerate(func.params) if i >= n_in}
    defs, users = {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            defs[b.var] = b.value
            args = b.value.args if isinstance(b.value, relax.Call) else [b.value]
            for a in args:
                for v in relax.analysis.free_vars(a):
                    users.setdefault(v, []).append(b.var if isinstance(b.value, relax.Call) else None)
    for v in relax.analysis.free_vars(func.body.body):
        users.setdefault(v, []).append(None)                      # returned

    def op_of(var):
        val = defs.get(var)
        return val.op if isinstance(val, relax.Call) else None

    def read_by_einsums_only(var) -> bool:
        reshapes = users.get(var, [])
        return bool(reshapes) and all(
            u is not None and op_of(u) == ops["reshape"]
            and all(w is not None and op_of(w) == ops["einsum"] for w in users.get(u, [None])) for u in reshapes)

    found = []
    for var, val in defs.items():
        if not isinstance(val, relax.Call) or val.op != ops["add"]:
            continue
        mm, bias = val.args if op_of(val.args[0]) == ops["matmul"] else val.args[::-1]
        if op_of(mm) != ops["matmul"] or bias not in weight_index or users.get(mm) != [var]:
            continue
        x, w = defs[mm].args
        ws, bs = shape_of(w), shape_of(bias)
        if w not in weight_index or ws is None or bs is None or len(ws) != 2 or bs != ws[1:] or shape_of(x) is None:
            continue
        out_dtype = getattr(defs[mm].attrs, "out_dtype", None)
        if str(w.ty.dtype) != str(bias.ty.dtype) or str(out_dtype or "") not in ("", "void", str(w.ty.dtype)):
            continue
        if read_by_einsums_only(var):
            found.append((var, mm, x, weight_index[w], weight_index[bias], ws[1], (x, ws[0], str(w.ty.dtype))))
    return found


def find_groups(func) -> list[Group]:
    """The sibling projections of a Relax function: those of `_projections` that share their input x (two or
    more), in the order the function computes them."""
    by_input: dict = {}
    for _, _, _, w, b, n, key in _projections(func):
        by_input.setdefault(key, []).append((w, b, n))
    return [Group(tuple(m[0] for m in ms), tuple(m[1] for m in ms), tuple(m[2] for m in ms))
            for ms in by_input.values() if len(ms) >= 2]


def fuse_module(mod, groups: list[Group]):
    """mod with main's sibling projections of `groups` (find_groups of main) computed as one matmul each: main
    then takes, in place of a group's first matrix and first bias, their concatenations (along the output axis)
    and no longer takes the group's other matrices and biases."""
    import tvm
    from tvm import relax
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    params = list(func.params)
    weights = params[n_in:]
    group_of = {w: g for g in groups for w in g.weights}
    members = {var: (group_of[w], group_of[w].weights.index(w), mm, x)
               for var, mm, x, w, _, _, _ in _projections(func) if w in group_of}
    if len(members) != sum(len(g.weights) for g in groups):
        raise ProjectionError("the groups given are not the function's sibling projections (find_groups)")
    fused_param, dropped = {}, set()
    for g in groups:
        for idx in (g.weights, g.biases):
            first = weights[idx[0]]
            shapes = [shape_of(weights[i]) for i in idx]
            fused_param[first] = relax.Var(fused_name([weights[i].name for i in idx]),
                                           relax.TensorType([*shapes[0][:-1], sum(s[-1] for s in shapes)],
                                                            str(first.ty.dtype)))
            dropped.update(weights[i] for i in idx[1:])

    @relax.expr_functor.mutator
    class _Fuse(relax.PyExprMutator):
        def __init__(self):
            super().__init__(mod)
            self.done: dict = {}          # group -> its parts (new vars)
            self.skip = {m[2] for m in members.values()}

        def visit_var_binding_(self, binding):
            var = binding.var
            if var in self.skip:
                return None
            if var not in members:
                return super().visit_var_binding_(binding)
            g, part, _, x = members[var]
            if g not in self.done:
                w, b = fused_param[weights[g.weights[0]]], fused_param[weights[g.biases[0]]]
                y = self.builder_.emit(relax.op.add(relax.op.matmul(self.visit_expr(x), w), b), "projections")
                ends = np.cumsum((0,) + g.widths)
                axis = len(shape_of(y)) - 1
                self.done[g] = [self.builder_.emit(relax.op.strided_slice(y, [axis], [int(ends[i])],
                                                                          [int(ends[i + 1])]), "projection")
                                for i in range(len(g.widths))]
            self.set_var_remap(var, self.done[g][part])
            return None

    body = _Fuse().visit_expr(func.body)
    new_params = [fused_param.get(p, p) for p in params if p not in dropped]
    new_func = relax.Function(new_params, body, func.ret_ty if hasattr(func, "ret_ty") else None,
                              func.is_pure, func.attrs)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = new_func
    return relax.transform.Normalize()(out)


def fuse_weights(named: list[tuple[str, np.ndarray]], groups: list[Group]) -> list[tuple[str, np.ndarray]]:
    """The weights list of a model with fused projections, from the model's own (in its weight order)."""
    out, dropped = {}, set()
    for g in groups:
        for idx in (g.weights, g.biases):
            parts = [named[i] for i in idx]
            if [a.shape[-1] for _, a in parts] != list(g.widths) or len({a.shape[:-1] for _, a in parts}) != 1:
                raise ProjectionError(f"weights {[n for n, _ in parts]} do not match the projections' widths "
                                      f"{list(g.widths)}")
            out[idx[0]] = (fused_name([n for n, _ in parts]),
                           np.ascontiguousarray(np.concatenate([a for _, a in parts], axis=-1)))
            dropped.update(idx[1:])
    return [out.get(i, nw) for i, nw in enumerate(named) if i not in dropped]


def fused(source):
    """`source` (a ModelSource) with its sibling projections fused: the same inputs, outputs and name; weights
    in the fused layout (fuse_weights); architecture["projections"] lists the fused weights. Raises
    ProjectionError if the model has none to fuse."""
    mod1 = source.make_module(1)
    groups = find_groups(mod1["main"])
    if not groups:
        raise ProjectionError(f"{source.name}: no sibling projections to fuse (matmuls with a bias that share "
                              f"their input and whose results only einsums read)")
    func = mod1["main"]
    names = [p.name for p in list(func.params)[int(func.attrs["num_input"]):]]

    def make_module(batch_size: int):
        mod = source.make_module(batch_size)
        if find_groups(mod["main"]) != groups:
            raise ProjectionError(f"{source.name}: batch {batch_size} has other sibling projections than batch 1")
        return fuse_module(mod, groups)

    def weights():
        return fuse_weights(source.weights(), groups)

    arch = dict(source.architecture or {})
    arch["projections"] = [fused_name([names[i] for i in g.weights]) for g in groups]
    return dataclasses.replace(source, make_module=make_module, weights=weights, architecture=arch)


# ---------------------------------------------------------------------------------------------------------
# Einsums that read a part of a fused projection in place
# ---------------------------------------------------------------------------------------------------------

def part_of(lookup, var):
    """(y, part, parts) if `var` is reshape(strided_slice(y, last axis, [part * n, (part + 1) * n])) with the
    reshape splitting only that axis and y's last axis `parts` * n long (one of fuse_module's parts as an
    einsum reads it); else None. `lookup`: var -> its bound value (or None)."""
    from tvm import relax
    ops = _ops()
    r = lookup(var)
    if not isinstance(r, relax.Call) or r.op != ops["reshape"]:
        return None
    s = lookup(r.args[0])
    if not isinstance(s, relax.Call) or s.op != ops["strided_slice"]:
        return None
    y = s.args[0]
    ys, ss, rs = shape_of(y), shape_of(r.args[0]), shape_of(var)
    if ys is None or ss is None or rs is None or ss[:-1] != ys[:-1] or rs[:len(ys) - 1] != ys[:-1]:
        return None
    try:
        axes, begin = [int(a) for a in s.args[1]], [int(a) for a in s.args[2]]
        strides = [int(a) for a in s.args[4]] if len(s.args) > 4 and s.args[4] is not None else [1]
    except (TypeError, ValueError, AttributeError):
        return None
    n = ss[-1]
    if axes not in ([len(ys) - 1], [-1]) or strides != [1] or begin[0] % n or ys[-1] % n:
        return None
    return y, begin[0] // n, ys[-1] // n


def viewed(bb, lookup, operands: list):
    """(operands for the einsum's call, a function mapping the TE tensors of those operands to the einsum's own):
    an operand that is a part of a fused projection (`part_of`) is passed as the whole projection, reshaped
    [.., parts, *split] (a view), and selected by a TE stage the GEMM schedules inline."""
    from tvm import relax, te
    args, picks = [], []
    for x in operands:
        found = part_of(lookup, x)
        if found is None:
            args.append(x)
            picks.append(None)
            continue
        y, part, parts = found
        xs = shape_of(x)
        lead = len(shape_of(y)) - 1
        args.append(bb.emit(relax.op.reshape(y, [*xs[:lead], parts, *xs[lead:]])))
        picks.append((lead, part))

    def part_stage(t, lead: int, part: int):
        return te.compute(list(t.shape[:lead]) + list(t.shape[lead + 1:]),
                          lambda *i: t[i[:lead] + (part,) + i[lead:]], name="projection_part")

    def select(*tensors):
        return [t if pick is None else part_stage(t, *pick) for t, pick in zip(tensors, picks)]

    return args, select, any(p is not None for p in picks)


def einsum_views_pass():
    """A module pass giving every relax einsum that reads parts of a fused projection (`part_of`) the projection
    itself (see `viewed`); the parts' slices, then unread, are dropped. Other einsums are left as they are
    (LegalizeOps lowers them). For fp16 activations `schedules._einsum_widened` does the same."""
    import tvm
    from tvm import relax, topi

    @relax.expr_functor.mutator
    class _Views(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op != _ops()["einsum"] or not isinstance(call.args[0], relax.Tuple):
                return call
            args, select, any_part = viewed(self.builder_, self.lookup_binding, list(call.args[0].fields))
            if not any_part:
                return call
            spec = str(call.attrs.subscripts)
            return self.builder_.call_te(lambda *ts: topi.einsum(spec, *select(*ts)), *args,
                                         primfunc_name_hint="einsum", primfunc_attrs={"op_pattern": OUT_EWISE_FUSABLE})

    @tvm.transform.module_pass(opt_level=0, name="EinsumViews")
    def _pass(mod, _ctx):
        m = _Views(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return relax.transform.DeadCodeElimination()(m.builder_.get())

    return _pass
