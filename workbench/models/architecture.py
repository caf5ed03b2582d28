"""Architecture figures computed FROM the Relax IR: parameter count, MACs per sample, and a layer list.

Nothing here is hard-coded per model: `analyze` walks the bindings of the function "main", reads every
operator's argument and result shapes, and classifies compute layers:
- conv2d: MACs = output elements x (input channels / groups) x kh x kw;
- linear: a matmul with a weight (or a view of one, e.g. nn.Linear's permute_dims) as an operand; applied to
  4-D activations [b, h, w, k] it is a conv lowered to matmul (1x1 or im2col) and counts as conv2d;
- matmul: activation x activation (attention scores and context);
- embedding: a `take` from a weight table; pools, layer norms and softmaxes are counted, with 0 MACs.
MACs count multiply-accumulates of conv and matmul layers only (the convention of torchvision's figures);
FLOPs = 2 x MACs.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

# Ops that only re-view a tensor: a view of a weight is still a weight (nn.Linear transposes its weight).
_VIEW_OPS = {"relax.permute_dims", "relax.reshape", "relax.strided_slice", "relax.astype", "relax.expand_dims",
             "relax.squeeze", "relax.flatten"}
_COUNTED_OPS = {"relax.nn.max_pool2d": "max_pool2d", "relax.nn.avg_pool2d": "avg_pool2d",
                "relax.nn.layer_norm": "layer_norm", "relax.nn.softmax": "softmax",
                "relax.nn.batch_norm": "batch_norm"}


def _type(expr):
    """The Relax type of an expression (TVM 0.27 calls it `ty`; earlier versions `struct_info`)."""
    return expr.ty if hasattr(expr, "ty") else expr.struct_info


def var_name(var) -> str:
    return var.name if hasattr(var, "name") else var.name_hint


def dtype_of(expr) -> str:
    return str(_type(expr).dtype)


def _shape(expr) -> tuple[int, ...] | None:
    shape = getattr(_type(expr), "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except (TypeError, ValueError):     # symbolic dimension
        return None


def einsum_terms(call) -> tuple[list[str], str]:
    """(the operands' index letters, the output's) of a relax einsum call: "bshd,bthd->bhst" -> (["bshd", "bthd"],
    "bhst")."""
    lhs, out = str(call.attrs.subscripts).replace(" ", "").split("->")
    return lhs.split(","), out


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


def shape_of(expr) -> tuple[int, ...] | None:
    """Static shape of a Relax expression, None if unknown or symbolic."""
    return _shape(expr)


def _is_spatial_mean(call) -> bool:
    data = _shape(call.args[0])
    axes = call.attrs.axis
    if data is None or len(data) != 4 or axes is None:
        return False
    return sorted(int(a) % 4 for a in axes) in ([2, 3], [1, 2])


def analyze(mod, num_inputs: int | None = None, batch_size: int | None = None) -> dict:
    """Architecture summary of mod["main"].

    The first `num_inputs` parameters are inputs (default: the function's "num_input" attribute), the rest
    weights. MACs are per sample: the totals divided by `batch_size` (default: axis 0 of the first input).
    """
    from tvm import relax

    func = mod["main"]
    if num_inputs is None:
        attrs = func.attrs
        num_inputs = int(attrs["num_input"]) if attrs is not None and "num_input" in attrs else 1
    params = list(func.params)
    inputs, weights = params[:num_inputs], params[num_inputs:]
    if batch_size is None:
        first = _shape(inputs[0]) if inputs else None
        batch_size = first[0] if first else 1

    weight_root = {w: w for w in weights}         # a weight, or a view of one -> the weight parameter
    layers: list[dict] = []
    counts: Counter = Counter()
    op_counts: Counter = Counter()

    def add_layer(kind: str, call, out, macs: int, weight=None) -> None:
        counts[kind] += 1
        root = weight_root[weight] if weight is not None else None
        data = call.args[1] if kind == "embedding" else call.args[0]
        data = data.fields[0] if isinstance(data, relax.Tuple) else data       # einsum's operands
        layers.append({"kind": kind, "input": _shape(data),
                       "weight": _shape(root) if root is not None else None,
                       "weight_name": var_name(root) if root is not None else None,
                       "output": _shape(out), "macs": int(macs // batch_size)})

    def visit(var, call) -> None:
        name = call.op.name
        op_counts[name.replace("relax.", "")] += 1
        args = list(call.args)
        if name in _VIEW_OPS and args and args[0] in weight_root:
            weight_root[var] = weight_root[args[0]]
        elif name == "relax.nn.conv2d":
            out, w = _shape(var), _shape(args[1])
            kernel_layout = str(call.attrs.kernel_layout)
            out_channels = w[kernel_layout.index("O")] if w else 0
            macs = _prod(out) * (_prod(w) // out_channels) if out_channels else 0
            add_layer("conv2d", call, var, macs, args[1])
        elif name == "relax.matmul":
            a, out = _shape(args[0]), _shape(var)
            macs = _prod(out) * (a[-1] if a else 0)
            weight = next((x for x in args if x in weight_root), None)
            if weight is None:
                kind = "matmul"
            else:   # a dense layer on NHWC activations [b, h, w, c] is a conv (zoo conv="matmul": im2col)
                kind = "conv2d" if a is not None and len(a) == 4 and weight is not args[0] else "linear"
            add_layer(kind, call, var, macs, weight)
        elif name == "relax.einsum":     # attention's products (zoo transformers): MACs = outputs x contracted extent
            ins, out = args[0].fields if isinstance(args[0], relax.Tuple) else args, _shape(var)
            terms, rhs = einsum_terms(call)
            extent = {c: n for term, x in zip(terms, ins) for c, n in zip(term, _shape(x) or ())}
            contracted = _prod([n for c, n in extent.items() if c not in rhs])
            add_layer("matmul", call, var, _prod(out) * contracted)
        elif name == "relax.take" and args[0] in weight_root:
            add_layer("embedding", call, var, 0, args[0])
        elif name == "relax.nn.adaptive_avg_pool2d":
            out = _shape(var)
            global_pool = out is not None and out[2:] == (1, 1) or out is not None and out[1:3] == (1, 1)
            add_layer("global_avg_pool" if global_pool else "adaptive_avg_pool2d", call, var, 0)
        elif name == "relax.mean" and _is_spatial_mean(call):
            add_layer("global_avg_pool", call, var, 0)     # ONNX GlobalAveragePool imports as a mean
        elif name in _COUNTED_OPS:
            add_layer(_COUNTED_OPS[name], call, var, 0)

    def walk(expr) -> None:
        if isinstance(expr, relax.SeqExpr):
            for block in expr.blocks:
                for binding in block.bindings:
                    value = binding.value
                    if isinstance(value, relax.Call) and isinstance(value.op, tvm_op_type()):
                        visit(binding.var, value)
                    elif isinstance(value, relax.Var) and value in weight_root:
                        weight_root[binding.var] = weight_root[value]
                    elif isinstance(value, relax.SeqExpr):
                        walk(value)
            walk(expr.body)

    walk(func.body)

    weight_params = {}
    by_prefix: Counter = Counter()
    weight_bytes = 0
    for w in weights:
        shape, dtype, name = _shape(w), dtype_of(w), var_name(w)
        n = _prod(shape)
        weight_params[name] = n
        by_prefix[name.split(".", 1)[0]] += n
        weight_bytes += n * np.dtype(dtype).itemsize
    macs = sum(layer["macs"] for layer in layers)
    return {
        "params": int(sum(weight_params.values())),
        "params_by_prefix": dict(by_prefix),
        "weight_tensors": len(weights),
        "weight_bytes": int(weight_bytes),
        "macs_per_sample": int(macs),
        "flops_per_sample": int(2 * macs),
        "layer_counts": dict(counts),
        "op_counts": dict(op_counts),
        "layers": layers,
    }


def tvm_op_type():
    import tvm
    return tvm.ir.Op
