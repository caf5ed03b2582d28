"""ONNX import: small ONNX files built here with the `onnx` package, compiled for llvm, checked against
onnxruntime; and every bad-input error names the file and the fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from workbench.models import onnx_import
from workbench.models.onnx_import import OnnxImportError

C, M, K, HW = 3, 8, 5, 16


def _f32(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _save(tmp_path: Path, name: str, nodes, inputs, outputs, inits, opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def conv_bn_net(tmp_path: Path, batch_dim="N", conv_bias: bool = True) -> Path:
    """Conv + BatchNormalization + Relu + GlobalAveragePool + Flatten + Gemm with random float weights."""
    rng = np.random.default_rng(0)
    inits = [_f32("conv.w", rng.standard_normal((M, C, 3, 3)) * 0.3),
             _f32("bn.scale", 1 + 0.2 * rng.standard_normal(M)), _f32("bn.bias", 0.1 * rng.standard_normal(M)),
             _f32("bn.mean", 0.1 * rng.standard_normal(M)), _f32("bn.var", 0.5 + rng.random(M)),
             _f32("fc.w", rng.standard_normal((K, M)) * 0.3), _f32("fc.b", rng.standard_normal(K) * 0.1),
             numpy_helper.from_array(np.array([-1, M], np.int64), "flat.shape")]
    conv_inputs = ["x", "conv.w"]
    if conv_bias:
        inits.append(_f32("conv.b", rng.standard_normal(M) * 0.1))
        conv_inputs.append("conv.b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"],
                              epsilon=1e-5, name="bn"),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Reshape", ["p", "flat.shape"], ["f"]),        # an int64 shape initializer
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1, name="fc")]
    return _save(tmp_path, f"convbn_{batch_dim}_{int(conv_bias)}", nodes,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, C, HW, HW])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, K])], inits)


def run_llvm(src, b: int, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax
    ex = tvm.compile(src.make_module(b), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for _, a in src.weights()])
    return out.numpy()


@pytest.mark.parametrize("batch_dim", ["N", 1])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_import_matches_onnxruntime(tmp_path, batch_dim, conv_bias):
    path = conv_bn_net(tmp_path, batch_dim, conv_bias)
    src = onnx_import.load(path)
    assert src.origin == f"onnx:{path.resolve()}"
    assert [(s.name, s.shape, s.dtype) for s in src.inputs] == [("x", (C, HW, HW), "float32")]
    # BN folded into the conv; the int64 Reshape shape is consumed at import, so it is not a weight;
    # the Gemm weight is stored transposed so no transpose runs per inference.
    weights = src.weights()
    names = [n for n, _ in weights]
    assert dict(weights)["fc.w"].shape == (M, K)
    assert src.architecture["op_counts"].get("permute_dims", 0) == 0
    assert names == ["conv.w", "fc.w", "fc.b", "conv.w.folded_bias"] if not conv_bias else \
        names == ["conv.w", "fc.w", "fc.b", "conv.b"]
    arch = src.architecture
    assert arch["layer_counts"] == {"conv2d": 1, "global_avg_pool": 1, "linear": 1}
    assert arch["params"] == M * C * 9 + M + K * M + K
    assert arch["macs_per_sample"] == M * C * 9 * HW * HW + K * M

    sess = ort.InferenceSession(str(path))     # onnxruntime runs the original, un-folded file
    rng = np.random.default_rng(1)
    for b in (1, 4):
        x = rng.standard_normal((b, C, HW, HW)).astype(np.float32)
        expected = sess.run(None, {"x": x})[0] if batch_dim == "N" or b == 1 else \
            np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(b)])
        got = run_llvm(src, b, x)
        assert got.shape == (b, K)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_signature_is_inputs_then_weights(tmp_path):
    from workbench.models.architecture import dtype_of, shape_of, var_name
    src = onnx_import.load(conv_bn_net(tmp_path))
    func = src.make_module(3)["main"]
    params = list(func.params)
    assert int(func.attrs["num_input"]) == 1
    assert shape_of(params[0]) == (3, C, HW, HW) and dtype_of(params[0]) == "float32"
    assert [(var_name(p), shape_of(p)) for p in params[1:]] == [(n, a.shape) for n, a in src.weights()]


def test_unprepared_weights_keep_bn_and_gemm_layout(tmp_path):
    src = onnx_import.load(conv_bn_net(tmp_path), prepare_weights=False)
    weights = dict(src.weights())
    assert {"bn.scale", "bn.bias", "bn.mean", "bn.var"} <= set(weights)
    assert weights["fc.w"].shape == (K, M)      # as in the file: Gemm transB=1
    x = np.random.default_rng(2).standard_normal((2, C, HW, HW)).astype(np.float32)
    expected = ort.InferenceSession(str(conv_bn_net(tmp_path))).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_llvm(src, 2, x), expected, rtol=1e-4, atol=1e-5)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.onnx"):
        onnx_import.load(tmp_path / "nothere.onnx")


@pytest.mark.parametrize("content", [b"this is not an ONNX file\n" * 10, "truncated"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        good = conv_bn_net(tmp_path).read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    with pytest.raises(OnnxImportError, match=r"bad\.onnx.*(not a readable|not a valid) ONNX model"):
        onnx_import.load(path)


def test_unsupported_op_names_op_and_file(tmp_path):
    # Celu is a standard ONNX op (opset 12) that onnxruntime runs but TVM 0.27's Relax importer lacks.
    assert "Celu" not in onnx_import.supported_ops()
    path = _save(tmp_path, "celu", [helper.make_node("Celu", ["x"], ["y"], name="my_celu")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [])
    ort.InferenceSession(str(path))            # a valid model: only TVM cannot import it
    with pytest.raises(OnnxImportError) as info:
        onnx_import.load(path)
    msg = str(info.value)
    assert "Celu" in msg and "my_celu" in msg and str(path) in msg and "re-export" in msg


def test_input_without_batch_axis(tmp_path):
    path = _save(tmp_path, "scalar", [helper.make_node("Relu", ["x"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [])
    with pytest.raises(OnnxImportError, match=r"scalar\.onnx: input 'x' has no batch axis"):
        onnx_import.load(path)


def test_dynamic_non_batch_axis_needs_input_shapes(tmp_path):
    path = _save(tmp_path, "dyn", [helper.make_node("Relu", ["x"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])], [])
    with pytest.raises(OnnxImportError, match=r"dynamic non-batch axes \[\(1, 'L'\)\].*input_shapes"):
        onnx_import.load(path)
    src = onnx_import.load(path, input_shapes={"x": (6,)})
    assert src.inputs[0].shape == (6,)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(run_llvm(src, 2, x), np.maximum(x, 0))


def test_hard_coded_batch_is_refused(tmp_path):
    # A Reshape to a fixed [1, -1] silently merges the batch: refuse it at that batch size, with the fix.
    path = _save(tmp_path, "fixed", [helper.make_node("Reshape", ["x", "s"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                 [numpy_helper.from_array(np.array([1, -1], np.int64), "s")])
    src = onnx_import.load(path)               # fine at batch 1
    with pytest.raises(OnnxImportError, match=r"fixed\.onnx: output 0 has shape \[1, 32\].*dynamic batch axis"):
        src.make_module(4)


def test_int64_input_and_gather_weights(tmp_path):
    # Token ids (int64) into an embedding table: an integer input and a Gather on a weight.
    table = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    path = _save(tmp_path, "emb", [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
                 [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])],
                 [numpy_helper.from_array(table, "table")])
    src = onnx_import.load(path)
    assert src.inputs[0].dtype == "int64"
    assert src.architecture["layer_counts"] == {"embedding": 1}
    ids = np.array([[0, 9, 3], [1, 1, 2]], np.int64)
    np.testing.assert_array_equal(run_llvm(src, 2, ids), table[ids])


def test_op_the_importer_fails_on_names_op_and_file(tmp_path):
    # Conv is supported, but not on 6-D data: TVM's converter raises; the error names the op and the file.
    path = _save(tmp_path, "conv6d", [helper.make_node("Conv", ["x", "w"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 2, 2, 2, 2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 2, 2, 2, 2])],
                 [_f32("w", np.ones((3, 2, 1, 1, 1, 1)))])
    with pytest.raises(OnnxImportError, match=r"conv6d\.onnx: TVM .* could not import .* op Conv: .*Fix"):
        onnx_import.load(path)


def test_probe_batch_size(tmp_path):
    path = conv_bn_net(tmp_path)
    src = onnx_import.load(path, batch_size=4)
    assert src.architecture["macs_per_sample"] == M * C * 9 * HW * HW + K * M     # per sample, not per batch
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        onnx_import.load(path, batch_size=0)
