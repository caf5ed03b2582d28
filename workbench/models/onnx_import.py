"""Import a user's ONNX file as a ModelSource (via `tvm.relax.frontend.onnx.from_onnx`).

- Weights (the graph's initializers) become parameters of "main" after the inputs (`keep_params_in_input`),
  in initializer order; initializers the importer consumes as constants (Reshape shapes, axes, ...) are
  dropped from the signature, so `weights()` lists exactly what the compiled function takes.
- Axis 0 of every input is the batch axis, dynamic ("N") or fixed (1, 8, ...): `make_module(b)` re-imports
  with axis 0 set to b and checks that every output really has batch b (a graph that hard-codes its batch
  size in a Reshape is refused with a fix, instead of silently computing the wrong thing).
- Weights are prepared once, on the ONNX graph, rather than on every inference (TVM 0.27's own
  FoldBatchnormToConv2D needs weights bound as constants, which ours are not): Conv -> BatchNormalization
  pairs are folded into the conv's weight and bias, and Gemm weights with transB=1 are stored transposed
  (otherwise the default pipeline runs a transpose kernel per weight per inference).
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .source import ModelSource, TensorSpec
from .zoo import check_signature


class OnnxImportError(ValueError):
    """An ONNX file that cannot become a ModelSource; the message names the file and the fix."""


def load(path: str | Path, batch_size: int | None = None,
         input_shapes: Mapping[str, Sequence[int]] | None = None, prepare_weights: bool = True) -> ModelSource:
    """Read and import `path` now (at `batch_size`, default 1), so bad files fail here and not at compile time.

    `input_shapes` gives per-sample shapes (without the batch axis) for inputs whose non-batch axes are dynamic.
    `prepare_weights` folds BatchNormalization into Conv and pre-transposes Gemm weights (same outputs).
    """
    path = Path(path).expanduser().resolve()
    model = read_model(path)
    check_supported_ops(model, path)
    inputs = input_specs(model, path, input_shapes or {})
    if prepare_weights:
        model = pretranspose_gemm_weights(fold_conv_batchnorm(model))
    probe = batch_size if batch_size is not None else 1
    if not isinstance(probe, int) or probe < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    initializers = {init.name.removeprefix("onnx::"): init for init in model.graph.initializer}
    first = _import(model, path, inputs, probe)
    weight_names = _weight_names(first, len(inputs))

    def weights() -> list[tuple[str, np.ndarray]]:
        from onnx import numpy_helper
        return [(name, numpy_helper.to_array(initializers[name], base_dir=str(path.parent)))
                for name in weight_names]

    weight_specs = [(n, a.shape, str(a.dtype)) for n, a in weights()]

    def make_module(b: int):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"batch size must be a positive int, got {b!r}")
        mod = first if b == probe else _import(model, path, inputs, b)
        if _weight_names(mod, len(inputs)) != weight_names:
            raise OnnxImportError(f"{path}: the weights 'main' takes changed with the batch size ({b}); "
                                  "the graph's shape computations depend on the batch: re-export it with a "
                                  "dynamic batch axis")
        check_signature(mod, inputs, b, weight_specs, where=str(path))
        return mod

    from .architecture import analyze
    arch = analyze(first, num_inputs=len(inputs), batch_size=probe)
    arch["description"] = f"ONNX model {path.name} (opset {_opset(model)})"
    return ModelSource(name=path.stem, origin=f"onnx:{path}", inputs=inputs, make_module=make_module,
                       weights=weights, architecture=arch)


# ---------------------------------------------------------------------------------------------------------

def read_model(path: Path):
    import onnx
    if not path.exists():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    if not path.is_file():
        raise OnnxImportError(f"{path} is not a file; pass the path of a .onnx model file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 (protobuf raises DecodeError, RuntimeWarning, ... on bad bytes)
        raise OnnxImportError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
                              "check that the file is a complete .onnx export (not truncated or another format)"
                              ) from e
    # Arbitrary bytes can parse as an (empty) protobuf message: require what every real export has.
    if model.ir_version < 3 or len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise OnnxImportError(f"{path} is not a valid ONNX model (ir_version {model.ir_version}, "
                              f"{len(model.graph.node)} nodes, {len(model.graph.output)} outputs); "
                              "check that the file is a complete .onnx export (ONNX IR version >= 3)")
    return model


def supported_ops() -> set[str]:
    """ONNX ops (default domain) that this TVM's Relax importer converts."""
    from tvm.relax.frontend.onnx import onnx_frontend
    return set(onnx_frontend._get_convert_map()) | {"Constant", "If"}  # noqa: SLF001 (no public list exists)


def check_supported_ops(model, path: Path) -> None:
    try:
        known = supported_ops()
    except Exception:  # noqa: BLE001 (private API moved: from_onnx's own error is caught later)
        return
    missing: dict[str, list[str]] = {}
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        if domain not in ("ai.onnx", "") or node.op_type not in known:
            label = node.op_type if domain in ("ai.onnx", "") else f"{domain}::{node.op_type}"
            missing.setdefault(label, []).append(node.name or node.output[0])
    if missing:
        ops = "; ".join(f"{op} (nodes: {', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})"
                        for op, nodes in sorted(missing.items()))
        raise OnnxImportError(
            f"{path}: TVM {_tvm_version()}'s ONNX importer does not support op(s) {ops}. Fix: re-export the "
            "model without them (e.g. express the op with supported ones, or a different opset / export option); "
            "workbench.models.onnx_import.supported_ops() lists what is supported")


def _onnx_dtype(elem_type: int) -> str:
    from onnx import helper
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def input_specs(model, path: Path, overrides: Mapping[str, Sequence[int]]) -> tuple[TensorSpec, ...]:
    """The graph's real inputs (not initializers) with per-sample shapes; axis 0 is the batch."""
    init_names = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in init_names:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise OnnxImportError(f"{path}: input {value.name!r} is not a tensor (sequence/map inputs are "
                                  "not supported); re-export with tensor inputs")
        dtype = _onnx_dtype(ttype.elem_type)
        if value.name in overrides:
            shape = tuple(int(d) for d in overrides[value.name])
        else:
            if not ttype.HasField("shape") or len(ttype.shape.dim) == 0:
                raise OnnxImportError(
                    f"{path}: input {value.name!r} has no batch axis ("
                    f"{'unknown rank' if not ttype.HasField('shape') else 'a scalar'}); every input needs axis 0 "
                    "as the batch axis: re-export with a leading batch dimension")
            dims = list(ttype.shape.dim)[1:]
            dynamic = [(i + 1, d.dim_param or "?") for i, d in enumerate(dims) if not d.dim_value]
            if dynamic:
                raise OnnxImportError(
                    f"{path}: input {value.name!r} has dynamic non-batch axes {dynamic}; pass "
                    f"input_shapes={{{value.name!r}: (per-sample shape)}} to fix them")
            shape = tuple(int(d.dim_value) for d in dims)
        specs.append(TensorSpec(value.name, shape, dtype))
    if not specs:
        raise OnnxImportError(f"{path}: the graph has no inputs besides its weights")
    for name in overrides:
        if name not in {s.name for s in specs}:
            raise OnnxImportError(f"{path}: input_shapes names {name!r}, which is not an input; inputs: "
                                  f"{', '.join(s.name for s in specs)}")
    return tuple(specs)


def _import(model, path: Path, inputs: tuple[TensorSpec, ...], batch_size: int):
    from tvm.relax.frontend.onnx import from_onnx

    shape_dict = {s.name: [batch_size, *s.shape] for s in inputs}
    dtype_dict = {s.name: s.dtype for s in inputs}
    printed = io.StringIO()   # the importer prints "Error converting operator X" before re-raising
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")   # the importer warns about every renamed input and checker nit
            mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=True)
    except Exception as e:  # noqa: BLE001 (the importer raises many types; all mean "cannot import")
        where = re.search(r"Error converting operator (\w+)", printed.getvalue())
        op = f" op {where.group(1)}:" if where else ""
        raise OnnxImportError(f"{path}: TVM {_tvm_version()} could not import the model at batch size "
                              f"{batch_size}:{op} {type(e).__name__}: {_summary(e)} Fix: simplify or re-export "
                              "the graph (e.g. onnxsim, a different opset) so that op is expressed differently"
                              ) from e
    mod["main"] = _prune_unused_params(mod["main"], len(inputs))
    _check_outputs(mod["main"], path, batch_size)
    return mod


def _prune_unused_params(func, num_inputs: int):
    """Drop weight parameters the body never uses (initializers the importer folded into constants)."""
    from tvm import relax
    used = set(relax.analysis.free_vars(func.body))
    params = list(func.params)
    keep = params[:num_inputs] + [p for p in params[num_inputs:] if p in used]
    attrs = {k: v for k, v in func.attrs.items() if k != "params"} if func.attrs is not None else {}
    attrs["num_input"] = num_inputs
    new = relax.Function(keep, func.body, is_pure=func.is_pure)
    return new.with_attrs(attrs)


def _weight_names(mod, num_inputs: int) -> list[str]:
    from .architecture import var_name
    return [var_name(p) for p in list(mod["main"].params)[num_inputs:]]


def _check_outputs(func, path: Path, batch_size: int) -> None:
    body = func.body
    ty = body.ty if hasattr(body, "ty") else body.struct_info
    fields = list(ty.fields) if hasattr(ty, "fields") else [ty]
    for i, field in enumerate(fields):
        shape = getattr(field, "shape", None)
        dims = None
        if shape is not None and hasattr(shape, "values"):
            try:
                dims = [int(d) for d in shape.values]
            except (TypeError, ValueError):
                dims = None
        if not dims or dims[0] != batch_size:
            raise OnnxImportError(
                f"{path}: output {i} has shape {dims if dims is not None else 'unknown'} when imported at batch "
                f"size {batch_size}: the graph does not keep axis 0 as the batch (e.g. a Reshape to a fixed "
                "[1, ...]). Fix: re-export with a dynamic batch axis (torch.onnx.export dynamic_axes / "
                "dynamic_shapes) and shape computations that keep it")


# ---------------------------------------------------------------------------------------------------------
# Conv + BatchNormalization folding on the ONNX graph
# ---------------------------------------------------------------------------------------------------------

def fold_conv_batchnorm(model):
    """A copy of `model` with each inference BatchNormalization that directly follows a Conv folded into
    the conv's weight and bias. Pairs whose tensors are not plain initializers, or whose conv output or
    weights are shared with other nodes, are left alone."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    removed = []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or bn.domain not in ("", "ai.onnx"):
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(consumers.get(conv.output[0], [])) != 1 \
                or conv.output[0] in graph_outputs:
            continue
        names = list(conv.input[1:]) + list(bn.input[1:5])
        if not all(n in inits for n in names) or any(len(consumers.get(n, [])) != 1 for n in conv.input[1:]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        w = numpy_helper.to_array(inits[conv.input[1]])
        scale, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        s = scale / np.sqrt(var + eps)
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 \
            and conv.input[2] else np.zeros_like(s)
        new_w = (w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        new_b = ((bias - mean) * s + beta).astype(w.dtype)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(new_w, conv.input[1]))
        if len(conv.input) > 2 and conv.input[2]:
            inits[conv.input[2]].CopyFrom(numpy_helper.from_array(new_b, conv.input[2]))
        else:
            bias_name = f"{conv.input[1]}.folded_bias"
            graph.initializer.append(numpy_helper.from_array(new_b, bias_name))
            inits[bias_name] = graph.initializer[-1]
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = bias_name
        conv.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
    # Drop initializers nothing uses any more (the BN statistics).
    used = {n for node in graph.node for n in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    for value in [v for v in graph.input if v.name in inits and v.name not in used]:
        graph.input.remove(value)
    return model


def pretranspose_gemm_weights(model):
    """A copy of `model` where each Gemm with transB=1 and a B initializer used only there gets B stored
    transposed and transB=0: the same function, with no per-inference transpose of the weight."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for node in graph.node:
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        trans_b = next((a for a in node.attribute if a.name == "transB"), None)
        name = node.input[1]
        if trans_b is None or not trans_b.i or name not in inits or uses.get(name) != 1:
            continue
        w = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        trans_b.i = 0
    return model


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _tvm_version() -> str:
    import tvm
    return tvm.__version__


def _summary(e: Exception) -> str:
    """The last line of TVM's error text: the message (what precedes it is a traceback)."""
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
