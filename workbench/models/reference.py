"""NumPy reference implementations of the zoo models, written independently of the Relax IR.

`reference_forward(name, inputs, weights)` computes a zoo model's output in float64 and returns float32, so a
compiled artifact can be checked for every batch size. Weights are the `ModelSource.weights()` list (or a dict
by name): the same torchvision / Hugging Face names the zoo uses.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from . import zoo

Weights = Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]]


def names() -> list[str]:
    """Zoo models with a reference (all of them)."""
    return ["mlp", "resnet18", "resnet50", "mobilenet_v2", "bert_base", "tiny_transformer"]


def reference_forward(source_name: str, inputs, weights: Weights) -> np.ndarray:
    """The output of zoo model `source_name` for `inputs` (an array or a list with one array per input)."""
    name = source_name.split(":", 1)[1] if source_name.startswith("zoo:") else source_name
    name, lowering = zoo.split_name(name)
    if name not in names():
        raise ValueError(f"no NumPy reference for model {source_name!r}; references exist for: {', '.join(names())}"
                         " (for ONNX models compare with onnxruntime)")
    x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    w = {k: np.asarray(v, dtype=np.float64) for k, v in (weights.items() if isinstance(weights, Mapping) else weights)}
    if lowering != "direct":          # the matmul lowering computes the same function, weights re-laid out
        shapes = zoo.canonical_shapes(name)
        w = {k: zoo.canonical_weight(v, shapes[k]) for k, v in w.items()}
    if name == "mlp":
        out = _mlp(np.asarray(x, np.float64), w)
    elif name in zoo.RESNET_BLOCKS:
        out = _resnet(np.asarray(x, np.float64), w, zoo.RESNET_BLOCKS[name])
    elif name == "mobilenet_v2":
        out = _mobilenet_v2(np.asarray(x, np.float64), w)
    else:
        out = _transformer(np.asarray(x), w, zoo.TRANSFORMER_CONFIGS[name])
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------

def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def linear(x: np.ndarray, w: dict, prefix: str) -> np.ndarray:
    """y = x W + b with the zoo's [in, out] weight."""
    return x @ w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int, padding: int,
           groups: int = 1) -> np.ndarray:
    """NCHW convolution with an OIHW weight, as a sum over kernel taps of strided shifted slices (im2col)."""
    b, c, h, wd = x.shape
    o, cg, kh, kw = weight.shape
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.stack([xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                     for i in range(kh) for j in range(kw)], axis=2)           # [b, c, kh*kw, oh, ow]
    cols = cols.reshape(b, groups, cg * kh * kw, oh * ow)                       # channel-major, then taps
    wg = weight.reshape(groups, o // groups, cg * kh * kw)
    out = np.matmul(wg[None], cols).reshape(b, o, oh, ow)                       # [b, g, o/g, oh*ow]
    return out + bias.reshape(1, -1, 1, 1) if bias is not None else out


def conv(x: np.ndarray, w: dict, prefix: str, stride: int = 1, groups: int = 1) -> np.ndarray:
    weight = w[f"{prefix}.weight"]
    return conv2d(x, weight, w[f"{prefix}.bias"], stride, weight.shape[-1] // 2, groups)


def max_pool2d(x: np.ndarray, size: int, stride: int, padding: int) -> np.ndarray:
    b, c, h, wd = x.shape
    oh, ow = (h + 2 * padding - size) // stride + 1, (wd + 2 * padding - size) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    return np.max(np.stack([xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                            for i in range(size) for j in range(size)]), axis=0)


def layer_norm(x: np.ndarray, w: dict, prefix: str, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1e-7 absolute (Abramowitz & Stegun 7.1.26), NumPy has none and scipy is not a dependency."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------------------

def _mlp(x: np.ndarray, w: dict) -> np.ndarray:
    return linear(relu(linear(relu(linear(x, w, "fc1")), w, "fc2")), w, "fc3")


def _resnet(x: np.ndarray, w: dict, blocks: tuple[str, tuple[int, ...]]) -> np.ndarray:
    kind, counts = blocks
    x = max_pool2d(relu(conv(x, w, "conv1", stride=2)), 3, 2, 1)
    for i, n in enumerate(counts):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            stride = 2 if (j == 0 and i > 0) else 1
            if kind == "basic":
                y = conv(relu(conv(x, w, f"{p}.conv1", stride)), w, f"{p}.conv2")
            else:
                y = conv(relu(conv(relu(conv(x, w, f"{p}.conv1")), w, f"{p}.conv2", stride)), w, f"{p}.conv3")
            shortcut = conv(x, w, f"{p}.downsample", stride) if f"{p}.downsample.weight" in w else x
            x = relu(y + shortcut)
    return linear(x.mean(axis=(2, 3)), w, "fc")


def _mobilenet_v2(x: np.ndarray, w: dict) -> np.ndarray:
    x = relu6(conv(x, w, "stem", stride=2))
    k, cin = 0, 32
    for t, c, n, s in zoo.MOBILENET_V2_SETTINGS:
        for j in range(n):
            p, stride = f"blocks.{k}", (s if j == 0 else 1)
            y = relu6(conv(x, w, f"{p}.expand")) if t != 1 else x
            hidden = y.shape[1]
            y = conv(relu6(conv(y, w, f"{p}.depthwise", stride, groups=hidden)), w, f"{p}.project")
            x = x + y if (stride == 1 and cin == c) else y
            k, cin = k + 1, c
    x = relu6(conv(x, w, "head"))
    return linear(x.mean(axis=(2, 3)), w, "classifier")


def _transformer(ids: np.ndarray, w: dict, cfg: "zoo.TransformerConfig") -> np.ndarray:
    b, s = ids.shape
    ids = np.clip(ids.astype(np.int64), 0, cfg.vocab - 1)        # the compiled model clips too
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, w, "embeddings.LayerNorm", cfg.eps)
    d = cfg.hidden // cfg.heads
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}"

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(b, s, cfg.heads, d).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(x, w, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        ctx = (softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)) @ v).transpose(0, 2, 1, 3).reshape(b, s, -1)
        a = layer_norm(linear(ctx, w, f"{p}.attention.output.dense") + x, w, f"{p}.attention.output.LayerNorm",
                       cfg.eps)
        h = gelu(linear(a, w, f"{p}.intermediate.dense"))
        x = layer_norm(linear(h, w, f"{p}.output.dense") + a, w, f"{p}.output.LayerNorm", cfg.eps)
    return np.tanh(linear(x[:, 0], w, "pooler.dense"))
