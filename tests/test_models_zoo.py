"""The zoo: signatures, deterministic weights, architecture figures (from the IR) against the published
architectures, and numerics of CPU (llvm) builds against the NumPy references."""
from __future__ import annotations

import numpy as np
import pytest

from workbench.models import reference, zoo
from workbench.models.architecture import dtype_of, shape_of, var_name

ALL = ["mlp", "resnet18", "resnet50", "mobilenet_v2", "bert_base", "tiny_transformer"]


@pytest.fixture(scope="module")
def sources():
    return {name: zoo.get(name) for name in ALL}


def random_inputs(src, b: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for spec in src.inputs:
        if spec.dtype.startswith("int"):
            vocab = zoo.TRANSFORMER_CONFIGS[src.name].vocab
            out.append(rng.integers(0, vocab, (b, *spec.shape)).astype(spec.dtype))
        else:
            out.append(rng.standard_normal((b, *spec.shape)).astype(spec.dtype))
    return out


def run_llvm(src, b: int, inputs: list[np.ndarray]) -> np.ndarray:
    import tvm
    from tvm import relax
    ex = tvm.compile(src.make_module(b), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in inputs] + [tvm.runtime.tensor(a) for _, a in src.weights()]
    return vm["main"](*args).numpy()


# ---------------------------------------------------------------------------------------------------------
# Registry and signature
# ---------------------------------------------------------------------------------------------------------

def test_names():
    assert zoo.names() == ALL
    assert zoo.names(variants=True) == ALL + ["resnet18-matmul", "resnet50-matmul", "mobilenet_v2-matmul"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown zoo model 'resnet51'.*resnet18.*resnet50.*bert_base"):
        zoo.get("resnet51")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("b", [1, 3])
def test_main_takes_inputs_then_weights_in_order(sources, name, b):
    src = sources[name]
    mod = src.make_module(b)
    assert [gv.name_hint for gv in mod.get_global_vars()] == ["main"]
    func = mod["main"]
    params = list(func.params)
    n_in = len(src.inputs)
    assert int(func.attrs["num_input"]) == n_in
    assert [(shape_of(p), dtype_of(p)) for p in params[:n_in]] == [((b, *s.shape), s.dtype) for s in src.inputs]
    weights = src.weights()
    assert [(var_name(p), shape_of(p), dtype_of(p)) for p in params[n_in:]] == \
        [(n, a.shape, str(a.dtype)) for n, a in weights]
    assert src.origin == f"zoo:{name}"


def test_image_and_token_inputs(sources):
    assert sources["resnet50"].inputs[0].shape == (3, 224, 224)
    assert sources["resnet50"].inputs[0].dtype == "float32"
    assert [(s.name, s.shape, s.dtype) for s in sources["bert_base"].inputs] == [("input_ids", (128,), "int32")]
    assert sources["tiny_transformer"].inputs[0].shape == (32,)


def test_bad_batch_size(sources):
    with pytest.raises(ValueError, match="batch size must be a positive int, got 0"):
        sources["mlp"].make_module(0)


def test_weights_deterministic_from_seed():
    a, b, c = zoo.get("resnet18", seed=0), zoo.get("resnet18", seed=0), zoo.get("resnet18", seed=1)
    wa, wb, wc = a.weights(), b.weights(), c.weights()
    assert all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(wa, wb))
    assert not any(np.array_equal(x[1], y[1]) for x, y in zip(wa, wc))
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for _, x in wa)


# ---------------------------------------------------------------------------------------------------------
# Architecture figures (computed from the IR) vs published architectures
# ---------------------------------------------------------------------------------------------------------

def bn_channels(arch: dict) -> int:
    """Channels of the BatchNorms folded away: every zoo conv had a BN, one per output channel."""
    return sum(layer["weight"][0] for layer in arch["layers"] if layer["kind"] == "conv2d")


# Parameter tolerance: folding a BN into its conv replaces the BN's gamma and beta (2 learnable values per
# channel; running mean/var are buffers, not parameters) by one conv bias per channel, so the folded model has
# exactly (published - BN channels) parameters: 4,800 fewer for ResNet-18 (0.04%), 26,560 for ResNet-50
# (0.10%), 17,056 for MobileNetV2 (0.49%). The tests check that identity exactly, and the raw count within 0.5%.
# MAC tolerance: 1%; the published figures (conv + fc multiply-accumulates, torchvision's "GFLOPS" column,
# 1.81 / 4.09 / 0.30 G) are rounded to three digits; pools, bias adds and activations are not counted.
CNN_FIGURES = {
    # name: compute layers in the IR (53 ResNet-50 convs = 1 stem + 16 blocks x 3 + 4 downsample)
    "resnet18": {"conv2d": 20, "linear": 1, "max_pool2d": 1, "global_avg_pool": 1},
    "resnet50": {"conv2d": 53, "linear": 1, "max_pool2d": 1, "global_avg_pool": 1},
    "mobilenet_v2": {"conv2d": 52, "linear": 1, "global_avg_pool": 1},
}


@pytest.mark.parametrize("name", list(CNN_FIGURES))
def test_cnn_architecture_matches_published(sources, name):
    arch = sources[name].architecture
    published = zoo.PUBLISHED[name]
    assert arch["params"] + bn_channels(arch) == published["params"]
    assert arch["params"] == pytest.approx(published["params"], rel=0.005)
    assert arch["macs_per_sample"] == pytest.approx(published["macs"], rel=0.01)
    assert arch["flops_per_sample"] == 2 * arch["macs_per_sample"]
    assert arch["layer_counts"] == CNN_FIGURES[name]
    assert arch["weight_bytes"] == 4 * arch["params"]
    assert arch["published"] == published


def test_resnet50_has_its_pools_at_the_right_places(sources):
    # A ResNet-50 without its max-pool once gave a 7x wrong speed figure: pin the shapes around both pools.
    layers = sources["resnet50"].architecture["layers"]
    assert [layer["kind"] for layer in layers[:2]] == ["conv2d", "max_pool2d"]
    assert layers[0]["output"] == (1, 64, 112, 112)
    assert layers[1]["output"] == (1, 64, 56, 56)
    assert layers[-2]["kind"] == "global_avg_pool" and layers[-2]["input"] == (1, 2048, 7, 7)
    assert layers[-1]["kind"] == "linear" and layers[-1]["weight"] == (2048, 1000)    # dense: [in, out]
    kernels = [layer["weight"][2] for layer in layers if layer["kind"] == "conv2d"]
    assert (kernels.count(7), kernels.count(3), kernels.count(1)) == (1, 16, 16 * 2 + 4)   # 4 downsamples


def test_mobilenet_v2_depthwise_convs(sources):
    layers = sources["mobilenet_v2"].architecture["layers"]
    depthwise = [layer for layer in layers if layer["kind"] == "conv2d" and layer["weight"][1] == 1
                 and layer["weight"][2:] == (3, 3)]
    assert len(depthwise) == 17     # one per inverted residual block
    assert layers[-2]["input"] == (1, 1280, 7, 7)


def test_bert_base_architecture(sources):
    arch = sources["bert_base"].architecture
    published = zoo.PUBLISHED["bert_base"]
    # No BN here: the count must be exact (bert-base-uncased BertModel, pooler included).
    assert arch["params"] == published["params"]
    assert arch["params_by_prefix"] == {"embeddings": published["embedding_params"],
                                        "encoder": published["encoder_params"], "pooler": 768 * 768 + 768}
    # 12 layers x (Q, K, V, attention output, FFN in, FFN out) + pooler; QK^T and PV per layer.
    assert arch["layer_counts"] == {"embedding": 1, "layer_norm": 25, "linear": 73, "matmul": 24, "softmax": 12}
    h, f, s, n = 768, 3072, 128, 12
    dense = s * n * (4 * h * h + 2 * h * f)       # per token: Q, K, V, O projections and the FFN
    attention = n * 2 * s * s * h                  # scores and context
    assert arch["macs_per_sample"] == dense + attention + h * h      # + pooler (CLS token only)
    assert arch["macs_per_sample"] == pytest.approx(11.17e9, rel=0.001)


def test_tiny_transformer_is_small(sources):
    arch = sources["tiny_transformer"].architecture
    assert arch["layer_counts"]["linear"] == 2 * 6 + 1
    assert arch["params"] < 1_000_000


# ---------------------------------------------------------------------------------------------------------
# Numerics: CPU builds vs NumPy references (no resnet50 / bert_base CPU compile: too slow for CI)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,batch_sizes", [("mlp", (1, 4)), ("tiny_transformer", (1, 3)),
                                              ("resnet18", (1,)),
                                              pytest.param("mobilenet_v2", (2,), marks=pytest.mark.slow)])
def test_llvm_build_matches_reference(sources, name, batch_sizes):
    src = sources[name]
    weights = src.weights()
    for b in batch_sizes:
        inputs = random_inputs(src, b, seed=b)
        got = run_llvm(src, b, inputs)
        expected = reference.reference_forward(name, inputs, weights)
        assert got.shape == expected.shape and got.shape[0] == b
        assert np.std(expected) > 1e-2                 # a non-degenerate output, so the comparison means something
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
        if b > 1:                                      # samples are independent: no batch mixing
            np.testing.assert_allclose(got[1:2], run_llvm(src, 1, [x[1:2] for x in inputs]), rtol=1e-4,
                                       atol=1e-4 * scale)


def test_out_of_range_token_ids_are_clipped(sources):
    src = sources["tiny_transformer"]
    ids = np.array([[-7, 0, 999, 1000, 123456] + [5] * 27], np.int32)
    got = run_llvm(src, 1, [ids])
    expected = reference.reference_forward("tiny_transformer", [np.clip(ids, 0, 999)], src.weights())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", pytest.param("bert_base", marks=pytest.mark.slow), "mobilenet_v2"])
def test_deep_models_stay_finite(sources, name):
    # The seed weights are scaled so 50+ layers neither explode nor vanish (checked on the NumPy reference:
    # a CPU build of these takes too long for CI).
    src = sources[name]
    out = reference.reference_forward(name, random_inputs(src, 1), src.weights())
    assert np.isfinite(out).all()
    assert 1e-3 < np.std(out) < 1e3


# ---------------------------------------------------------------------------------------------------------
# Convs lowered to matmul (NHWC, im2col): same function, same architecture, weights re-laid out
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_matmul_lowering_has_the_same_architecture(sources, name):
    lowered = zoo.get(f"{name}-matmul")
    assert lowered.name == f"{name}-matmul" and lowered.origin == f"zoo:{name}-matmul"
    assert lowered.inputs == sources[name].inputs
    a, b = lowered.architecture, sources[name].architecture
    for key in ("params", "macs_per_sample", "layer_counts", "weight_bytes"):
        assert a[key] == b[key], key
    assert (a["conv_lowering"], b["conv_lowering"]) == ("matmul", "direct")
    ops = a["op_counts"]
    assert "nn.conv2d" not in ops or name == "mobilenet_v2"          # only depthwise convs stay conv2d
    assert ops.get("nn.conv2d", 0) == (17 if name == "mobilenet_v2" else 0)
    assert ops.get("permute_dims", 0) == 1                           # the NCHW input, never a weight
    assert ops.get("call_tir", 0) == 1                               # the RGB stem's im2col, as one gather


def test_matmul_lowering_weights_are_the_direct_weights_re_laid_out(sources):
    direct = dict(sources["resnet18"].weights())
    lowered = zoo.get("resnet18", conv="matmul").weights()
    shapes = zoo.canonical_shapes("resnet18")
    assert list(direct) == [n for n, _ in lowered]
    assert dict(lowered)["conv1.weight"].shape == (7 * 7 * 3, 64)
    for n, w in lowered:
        np.testing.assert_array_equal(zoo.canonical_weight(w, shapes[n]), direct[n])


@pytest.mark.slow
def test_matmul_lowering_llvm_build_matches_reference():
    src = zoo.get("resnet18-matmul")
    inputs = random_inputs(src, 1)
    expected = reference.reference_forward(src.name, inputs, src.weights())
    np.testing.assert_allclose(reference.reference_forward("resnet18", inputs, zoo.get("resnet18").weights()),
                               expected, rtol=1e-6)
    got = run_llvm(src, 1, inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_conv_option_errors():
    with pytest.raises(ValueError, match="unknown conv lowering 'winograd'; valid: direct, matmul"):
        zoo.get("resnet18", conv="winograd")
    with pytest.raises(ValueError, match="zoo model 'bert_base' has no convs to lower"):
        zoo.get("bert_base", conv="matmul")
    with pytest.raises(ValueError, match="unknown zoo model 'bert_base-matmul'|has no convs"):
        zoo.get("bert_base-matmul")
    assert zoo.get("resnet18", conv="direct").name == "resnet18"


def test_reference_rejects_unknown_model():
    with pytest.raises(ValueError, match="no NumPy reference for model 'onnx:/x.onnx'.*onnxruntime"):
        reference.reference_forward("onnx:/x.onnx", [np.zeros((1, 3))], [])


def test_check_signature_catches_a_wrong_module(sources):
    src = sources["mlp"]
    weights = [(n, a.shape, str(a.dtype)) for n, a in src.weights()]
    zoo.check_signature(src.make_module(2), src.inputs, 2, weights, where="zoo:mlp")
    with pytest.raises(RuntimeError, match=r"zoo:mlp: 'main' does not take .* first difference at #0"):
        zoo.check_signature(src.make_module(2), src.inputs, 3, weights, where="zoo:mlp")
    with pytest.raises(RuntimeError, match=r"first difference at #2: \('fc1.bias'"):
        zoo.check_signature(src.make_module(2), src.inputs, 2, weights[:1] + weights[2:] + weights[1:2],
                            where="zoo:mlp")
