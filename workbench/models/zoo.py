"""The model zoo: DNNs written with `tvm.relax.frontend.nn`, weights drawn deterministically from a seed.

`get(name, seed=0) -> ModelSource`; `names()` lists what exists. Every model is inference-only: BatchNorm is
folded into the preceding convolution's bias (as a deployed model would be), so a conv has a bias and no BN
follows it. Weights are random but scaled (He init, damped residual branches) so that activations stay finite
and non-degenerate through 50+ layers; their values never affect latency.

`make_module(b)` exports the Relax function "main" taking the inputs (batch b on axis 0) and then every weight
in `weights()` order; the order is checked against the exported signature on every call. Weight names follow
torchvision / Hugging Face ("layer1.0.conv2.weight", "encoder.layer.3.attention.self.query.weight"), but
dense weights are stored [in, out] (see `Dense`). Inputs: images float32 NCHW [b, 3, 224, 224]; token ids
int32 [b, seq]. Outputs: logits [b, 1000] (CNNs), [b, 10] (mlp), the pooled [CLS] vector [b, hidden] (BERT).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .source import ModelSource, TensorSpec

# Published reference figures the architecture tests compare against (see tests/test_models_zoo.py).
# params: learnable parameters of the un-folded model (BN gamma/beta counted, running stats not);
# macs: multiply-accumulates per sample of conv + fully-connected layers (torchvision's "GFLOPS" column).
PUBLISHED: dict[str, dict] = {
    "resnet18": {"params": 11_689_512, "macs": 1.814e9, "source": "torchvision resnet18 (He et al. 2016)"},
    "resnet50": {"params": 25_557_032, "macs": 4.089e9, "source": "torchvision resnet50 (He et al. 2016)"},
    "mobilenet_v2": {"params": 3_504_872, "macs": 0.301e9,
                     "source": "torchvision mobilenet_v2 (Sandler et al. 2018: 3.4M params, 300M MAdds)"},
    "bert_base": {"params": 109_482_240, "encoder_params": 85_054_464, "embedding_params": 23_837_184,
                  "source": "bert-base-uncased BertModel with pooler (Devlin et al. 2019: 110M)"},
}


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------

def _nn():
    from tvm.relax.frontend import nn  # imported lazily: the run path must not need the TVM compiler
    return nn


def _wrap(expr, name: str):
    from tvm.relax.frontend.nn.core import wrap_nested
    return wrap_nested(expr, name)


def max_pool2d(x, size: int, stride: int, padding: int, layout: str = "NCHW"):
    from tvm import relax
    return _wrap(relax.op.nn.max_pool2d(x._expr, pool_size=size, strides=stride, padding=padding, layout=layout),
                 "max_pool2d")


def global_avg_pool(x, layout: str = "NCHW"):
    """[b, C] from NCHW or NHWC activations: the global average pool of ResNet and MobileNet heads."""
    from tvm import relax
    nn = _nn()
    pooled = _wrap(relax.op.nn.adaptive_avg_pool2d(x._expr, output_size=1, layout=layout), "global_avg_pool")
    return nn.op.reshape(pooled, [x.shape[0], x.shape[layout.index("C")]])


def Dense(cin: int, cout: int):  # noqa: N802 (a module class, built lazily so TVM loads only when needed)
    """y = x W + b with W stored [in, out], the layout the matmul reads. torch's nn.Linear (and TVM's) store
    [out, in], and since our weights are function parameters (not constants) TVM 0.27's pipeline then runs a
    transpose kernel per weight per inference (BERT-base: 73 kernels, ~0.7 GB of memory traffic)."""
    nn = _nn()

    class _Dense(nn.Module):
        def __init__(self):
            self.weight = nn.Parameter((cin, cout))
            self.bias = nn.Parameter((cout,))

        def forward(self, x):
            return nn.op.matmul(x, self.weight) + self.bias

    return _Dense()


CONV_LOWERINGS = ("direct", "matmul")


def _conv_factory(lowering: str):
    """Convs with BN folded into their bias (padding k//2 keeps 'same' size before the stride).

    "direct": relax conv2d on NCHW activations, OIHW weights. "matmul": NHWC activations; a 1x1 conv is a matmul
    and a kxk conv a matmul over an im2col built from k*k shifted strided slices (the H200 baseline measured
    this 1.1-1.4x faster under TVM's default dlight pipeline, though 0.27's dlight Matmul rule does schedule the
    direct conv2d too: measure both); its weight is stored as the matmul reads it,
    [kh*kw*cin, cout] (see `lowered_weight`), so no weight is transformed per inference. Depthwise convs stay
    conv2d (NHWC activations, OIHW weight) in both.
    """
    nn = _nn()
    if lowering == "direct":
        return lambda cin, cout, k, stride=1, groups=1: nn.Conv2D(cin, cout, k, stride=stride, padding=k // 2,
                                                                  groups=groups, bias=True)
    from tvm import relax
    op = nn.op

    class MatmulConv2D(nn.Module):
        def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
            if groups != 1 and not groups == cin == cout:
                raise ValueError(f"the matmul lowering handles dense or depthwise convs, not groups={groups}")
            self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
            self.weight = nn.Parameter((cout, 1, k, k) if groups != 1 else (k * k * cin, cout))
            self.bias = nn.Parameter((cout,))

        def forward(self, x):                                           # x: [b, h, w, cin]
            k, s, p = self.k, self.stride, self.k // 2
            if self.groups != 1:                                         # depthwise: no matmul form
                y = _wrap(relax.op.nn.conv2d(x._expr, self.weight._expr, strides=s, padding=p,
                                             groups=self.groups, data_layout="NHWC", kernel_layout="OIHW"),
                          "conv2d")
                return y + self.bias
            h, w = x.shape[1], x.shape[2]
            oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            if k == 1:
                cols = x if s == 1 else _wrap(relax.op.strided_slice(
                    x._expr, axes=[1, 2], begin=[0, 0], end=[h, w], strides=[s, s]), "subsample")
            else:
                xp = op.pad(x, [0, 0, p, p, p, p, 0, 0])
                if self.cin % IM2COL_SLICE_CHANNELS:
                    cols = op.tensor_expr_op(_im2col_te, "im2col", [xp, k, s, oh, ow])
                else:
                    taps = [_wrap(relax.op.strided_slice(xp._expr, axes=[1, 2], begin=[i, j],
                                                         end=[i + s * (oh - 1) + 1, j + s * (ow - 1) + 1],
                                                         strides=[s, s]), "tap")
                            for i in range(k) for j in range(k)]
                    cols = op.concat(taps, dim=3)                         # [b, oh, ow, k*k*cin], tap-major
            return op.matmul(cols, self.weight) + self.bias

    return MatmulConv2D


# The matmul lowering's im2col: as a concatenation of k*k shifted slices where each slice's channels fill whole
# 16-byte vectors (schedules.InjectiveVectorize then copies them at 2-3 TB/s on the H200); else (the RGB stems,
# cin = 3) as one gather whose index is computed per element: the concatenation's kernel there tests up to k*k
# slice bounds per element under dlight's Fallback (ResNet-50's 7x7 stem: 0.67 of 2.2 ms at b16 fp16, 103 GB/s,
# bench/results/kernel_breakdown.md).
IM2COL_SLICE_CHANNELS = 8


def _im2col_te(xp, k: int, s: int, oh: int, ow: int):
    """cols[n, y, x, (i*k + j)*cin + c] = xp[n, s*y + i, s*x + j, c] (xp: padded NHWC), the same tap-major
    column order as the concatenation of slices, so the lowered weight is the same."""
    from tvm import te
    cin = xp.shape[3]

    def at(n, y, x, col):
        t = col // cin
        return xp[n, s * y + t // k, s * x + t % k, col % cin]
    return te.compute((xp.shape[0], oh, ow, k * k * cin), at, name="im2col")


def lowered_weight(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A canonical (OIHW) conv weight in the lowered module's `shape`: for the matmul lowering
    [kh*kw*cin, cout], rows ordered (tap i, tap j, input channel) like the im2col columns."""
    if w.shape == tuple(shape):
        return w
    o, i, kh, kw = w.shape
    if tuple(shape) != (kh * kw * i, o):
        raise ValueError(f"cannot lay out a conv weight of shape {w.shape} as {shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(kh * kw * i, o))


def canonical_weight(w: np.ndarray, canonical_shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `lowered_weight`: back to OIHW from the canonical shape."""
    if w.shape == tuple(canonical_shape):
        return w
    o, i, kh, kw = canonical_shape
    return w.reshape(kh, kw, i, o).transpose(3, 2, 0, 1)


def _to_layout(x, lowering: str):
    """The NCHW image input in the activation layout of the lowering."""
    return x if lowering == "direct" else _nn().op.permute_dims(x, [0, 2, 3, 1])


# ---------------------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------------------

MLP_SIZES = (128, 256, 256, 10)


def _mlp_module():
    nn = _nn()

    class MLP(nn.Module):
        def __init__(self):
            s = MLP_SIZES
            self.fc1 = Dense(s[0], s[1])
            self.fc2 = Dense(s[1], s[2])
            self.fc3 = Dense(s[2], s[3])

        def main(self, input):  # noqa: A002 (the argument name is the input's name in the IR)
            return self.fc3(nn.op.relu(self.fc2(nn.op.relu(self.fc1(input)))))

    return MLP()


# ---------------------------------------------------------------------------------------------------------
# ResNet (torchvision layout and names; BN folded)
# ---------------------------------------------------------------------------------------------------------

RESNET_BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


def _resnet_module(name: str, lowering: str = "direct"):
    nn = _nn()
    layout = "NCHW" if lowering == "direct" else "NHWC"
    conv = _conv_factory(lowering)
    kind, counts = RESNET_BLOCKS[name]

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, cin: int, width: int, stride: int):
            self.conv1 = conv(cin, width, 3, stride)
            self.conv2 = conv(width, width, 3)
            self.downsample = conv(cin, width, 1, stride) if stride != 1 or cin != width else None

        def forward(self, x):
            y = self.conv2(nn.op.relu(self.conv1(x)))
            return nn.op.relu(y + (self.downsample(x) if self.downsample is not None else x))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin: int, width: int, stride: int):
            cout = width * 4
            self.conv1 = conv(cin, width, 1)
            self.conv2 = conv(width, width, 3, stride)     # torchvision v1.5: stride on the 3x3
            self.conv3 = conv(width, cout, 1)
            self.downsample = conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

        def forward(self, x):
            y = self.conv3(nn.op.relu(self.conv2(nn.op.relu(self.conv1(x)))))
            return nn.op.relu(y + (self.downsample(x) if self.downsample is not None else x))

    block = BasicBlock if kind == "basic" else Bottleneck

    class ResNet(nn.Module):
        def __init__(self):
            self.conv1 = conv(3, 64, 7, stride=2)
            cin = 64
            for i, (n, width) in enumerate(zip(counts, (64, 128, 256, 512))):
                blocks = []
                for j in range(n):
                    blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                    cin = width * block.expansion
                setattr(self, f"layer{i + 1}", nn.ModuleList(blocks))
            self.fc = Dense(cin, 1000)

        def main(self, input):  # noqa: A002
            x = max_pool2d(nn.op.relu(self.conv1(_to_layout(input, lowering))), 3, 2, 1, layout)
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = layer(x)
            return self.fc(global_avg_pool(x, layout))

    return ResNet()


def _resnet_init_scale(model: str) -> Callable[[str], float]:
    # The last conv of a residual branch is damped (a trained net's last-BN gamma is small; torchvision even
    # offers zero_init_residual): without it the activation variance doubles per block (2^16 for ResNet-50).
    last = ".conv2.weight" if RESNET_BLOCKS[model][0] == "basic" else ".conv3.weight"
    return lambda name: 0.3 if name.startswith("layer") and name.endswith(last) else 1.0


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision layout and names; BN folded)
# ---------------------------------------------------------------------------------------------------------

# (expansion t, output channels c, repeats n, first stride s), Sandler et al. 2018, Table 2
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _mobilenet_v2_module(lowering: str = "direct"):
    nn = _nn()
    layout = "NCHW" if lowering == "direct" else "NHWC"
    conv = _conv_factory(lowering)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int):
            hidden = cin * t
            self.expand = conv(cin, hidden, 1) if t != 1 else None
            self.depthwise = conv(hidden, hidden, 3, stride, groups=hidden)
            self.project = conv(hidden, cout, 1)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = nn.op.relu6(self.expand(x)) if self.expand is not None else x
            y = self.project(nn.op.relu6(self.depthwise(y)))   # linear bottleneck: no activation
            return x + y if self.residual else y

    class MobileNetV2(nn.Module):
        def __init__(self):
            self.stem = conv(3, 32, 3, stride=2)
            blocks, cin = [], 32
            for t, c, n, s in MOBILENET_V2_SETTINGS:
                for j in range(n):
                    blocks.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                    cin = c
            self.blocks = nn.ModuleList(blocks)
            self.head = conv(cin, 1280, 1)
            self.classifier = Dense(1280, 1000)

        def main(self, input):  # noqa: A002
            x = nn.op.relu6(self.stem(_to_layout(input, lowering)))
            x = nn.op.relu6(self.head(self.blocks(x)))
            return self.classifier(global_avg_pool(x, layout))

    return MobileNetV2()


def _mobilenet_init_scale(name: str) -> float:
    return 0.3 if name.endswith(".project.weight") else 1.0


# ---------------------------------------------------------------------------------------------------------
# BERT-style encoder (Hugging Face BertModel names; post-LN, erf GELU, tanh pooler)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransformerConfig:
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq: int
    vocab: int
    positions: int
    token_types: int = 2
    eps: float = 1e-12


BERT_BASE = TransformerConfig(layers=12, hidden=768, heads=12, ffn=3072, seq=128, vocab=30522, positions=512)
TINY_TRANSFORMER = TransformerConfig(layers=2, hidden=128, heads=2, ffn=512, seq=32, vocab=1000, positions=64)


def _transformer_module(cfg: TransformerConfig):
    """Input: token ids int32 [b, seq] (out-of-range ids are clipped into [0, vocab)); token types are all 0
    and every token is attended (no mask).
    Output: the pooled [CLS] representation [b, hidden] (tanh(dense(h[:, 0])))."""
    from tvm import relax
    nn = _nn()
    op = nn.op
    head_dim = cfg.hidden // cfg.heads

    class Embedding(nn.Module):
        """nn.Embedding, but an out-of-range id is clipped into range: TVM's default "fast" take would read
        out of bounds (and may crash the worker) on a bad token id."""

        def __init__(self, num: int, dim: int):
            self.weight = nn.Parameter((num, dim))

        def forward(self, ids):
            flat = op.reshape(ids, [-1])
            rows_ = _wrap(relax.op.take(self.weight._expr, flat._expr, axis=0, mode="clip"), "embedding")
            return op.reshape(rows_, [*ids.shape, self.weight.shape[1]])

    def rows(table, n: int):
        return _wrap(relax.op.strided_slice(table._expr, axes=[0], begin=[0], end=[n]), "rows")

    class Embeddings(nn.Module):
        def __init__(self):
            self.word_embeddings = Embedding(cfg.vocab, cfg.hidden)
            self.position_embeddings = Embedding(cfg.positions, cfg.hidden)
            self.token_type_embeddings = Embedding(cfg.token_types, cfg.hidden)
            self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

        def forward(self, ids):
            x = self.word_embeddings(ids)                               # [b, s, h]
            x = x + rows(self.position_embeddings.weight, cfg.seq)      # positions 0..s-1
            x = x + rows(self.token_type_embeddings.weight, 1)          # token type 0
            return self.LayerNorm(x)

    class SelfAttention(nn.Module):
        def __init__(self):
            self.query = Dense(cfg.hidden, cfg.hidden)
            self.key = Dense(cfg.hidden, cfg.hidden)
            self.value = Dense(cfg.hidden, cfg.hidden)

        def forward(self, x):
            b, s = x.shape[0], x.shape[1]

            def heads(t):
                return op.reshape(t, [b, s, cfg.heads, head_dim])

            def einsum(spec, *xs):
                return _wrap(relax.op.einsum([x._expr for x in xs], spec), "einsum")

            # attention's products as einsums on [b, s, H, d]: the head reshapes are views and the products read
            # them in place (matmuls would need [b, H, s, d] and [b, H, d, s], a transposing kernel each)
            q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))    # [b, s, H, d]
            p = op.softmax(einsum("bshd,bthd->bhst", q, k) * (1.0 / math.sqrt(head_dim)), axis=-1)
            ctx = einsum("bhst,bthd->bshd", p, v)                       # [b, s, H, d]
            return op.reshape(ctx, [b, s, cfg.hidden])

    class DenseLN(nn.Module):
        def __init__(self, cin: int):
            self.dense = Dense(cin, cfg.hidden)
            self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

        def forward(self, x, residual):
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(nn.Module):
        def __init__(self):
            self.self = SelfAttention()
            self.output = DenseLN(cfg.hidden)

        def forward(self, x):
            return self.output(self.self(x), x)

    class Intermediate(nn.Module):
        def __init__(self):
            self.dense = Dense(cfg.hidden, cfg.ffn)

        def forward(self, x):
            return op.gelu(self.dense(x))     # exact (erf) GELU, as BERT

    class Layer(nn.Module):
        def __init__(self):
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseLN(cfg.ffn)

        def forward(self, x):
            a = self.attention(x)
            return self.output(self.intermediate(a), a)

    class Encoder(nn.Module):
        def __init__(self):
            self.layer = nn.ModuleList([Layer() for _ in range(cfg.layers)])

        def forward(self, x):
            return self.layer(x)

    class Pooler(nn.Module):
        def __init__(self):
            self.dense = Dense(cfg.hidden, cfg.hidden)

        def forward(self, x):
            b = x.shape[0]
            first = _wrap(relax.op.strided_slice(x._expr, axes=[1], begin=[0], end=[1]), "cls")
            return op.tanh(self.dense(op.reshape(first, [b, cfg.hidden])))

    class Transformer(nn.Module):
        def __init__(self):
            self.embeddings = Embeddings()
            self.encoder = Encoder()
            self.pooler = Pooler()

        def main(self, input_ids):
            return self.pooler(self.encoder(self.embeddings(input_ids)))

    return Transformer()


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------

def init_weight(name: str, shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    """One weight, drawn from its own generator keyed by (seed, name): independent of every other tensor."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    last = name.rsplit(".", 1)[-1]
    if "LayerNorm" in name:                        # gamma ~ 1, beta ~ 0, both perturbed
        base = 1.0 if last == "weight" else 0.0
        return (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if "embeddings" in name:
        return rng.standard_normal(shape, dtype=np.float32)
    if last == "bias":                             # folded BN shift / linear bias: small, nonzero
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 4:                            # conv [O, I/g, kh, kw]: He normal (ReLU follows)
        fan_in = shape[1] * shape[2] * shape[3]
        std = math.sqrt(2.0 / fan_in)
    elif len(shape) == 2:                          # dense [in, out]: unit gain
        std = math.sqrt(1.0 / shape[0])
    else:
        raise ValueError(f"no init rule for weight {name!r} of shape {shape}")
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std * scale)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    build: Callable[[str], object]               # lowering -> nn.Module with a `main` method
    inputs: tuple[TensorSpec, ...]
    scale: Callable[[str], float] = lambda name: 1.0
    description: str = ""
    published: dict = field(default_factory=dict)
    lowerings: tuple[str, ...] = ("direct",)     # conv lowerings this model offers


_IMAGE = (TensorSpec("input", (3, 224, 224), "float32"),)

_ZOO: dict[str, _Entry] = {
    "mlp": _Entry(lambda lowering: _mlp_module(), (TensorSpec("input", (MLP_SIZES[0],), "float32"),),
                  description=f"MLP {'-'.join(map(str, MLP_SIZES))}, ReLU"),
    "resnet18": _Entry(lambda lowering: _resnet_module("resnet18", lowering), _IMAGE,
                       _resnet_init_scale("resnet18"), "ResNet-18, ImageNet 224x224, 1000 classes, BN folded",
                       PUBLISHED["resnet18"], CONV_LOWERINGS),
    "resnet50": _Entry(lambda lowering: _resnet_module("resnet50", lowering), _IMAGE,
                       _resnet_init_scale("resnet50"), "ResNet-50 v1.5, ImageNet 224x224, 1000 classes, BN folded",
                       PUBLISHED["resnet50"], CONV_LOWERINGS),
    "mobilenet_v2": _Entry(_mobilenet_v2_module, _IMAGE, _mobilenet_init_scale,
                           "MobileNetV2 1.0, ImageNet 224x224, 1000 classes, BN folded",
                           PUBLISHED["mobilenet_v2"], CONV_LOWERINGS),
    "bert_base": _Entry(lambda lowering: _transformer_module(BERT_BASE),
                        (TensorSpec("input_ids", (BERT_BASE.seq,), "int32"),),
                        description="BERT-base encoder 12x768, 12 heads, FFN 3072, seq 128, pooled output",
                        published=PUBLISHED["bert_base"]),
    "tiny_transformer": _Entry(lambda lowering: _transformer_module(TINY_TRANSFORMER),
                               (TensorSpec("input_ids", (TINY_TRANSFORMER.seq,), "int32"),),
                               description="BERT-style encoder 2x128, 2 heads, FFN 512, seq 32, pooled output"),
}

TRANSFORMER_CONFIGS = {"bert_base": BERT_BASE, "tiny_transformer": TINY_TRANSFORMER}
MATMUL_SUFFIX = "-matmul"    # "resnet50-matmul" = get("resnet50", conv="matmul")


def names(variants: bool = False) -> list[str]:
    """The zoo's models; with `variants`, also the NAME-matmul conv lowerings that `get` accepts."""
    out = list(_ZOO)
    if variants:
        out += [n + MATMUL_SUFFIX for n, e in _ZOO.items() if "matmul" in e.lowerings]
    return out


def split_name(name: str) -> tuple[str, str]:
    """"resnet50-matmul" -> ("resnet50", "matmul"); "resnet50" -> ("resnet50", "direct")."""
    if name.endswith(MATMUL_SUFFIX):
        return name[: -len(MATMUL_SUFFIX)], "matmul"
    return name, "direct"


def get(name: str, seed: int = 0, conv: str | None = None) -> ModelSource:
    """A zoo model as a ModelSource (cheap: nothing is compiled; weights are drawn when `weights()` is called).

    `conv="matmul"` (or the name "resnet50-matmul") lowers the convs of resnet18/resnet50/mobilenet_v2 to
    matmuls over NHWC activations; inputs, weights and outputs are identical to the direct (conv2d) form.
    """
    base, lowering = split_name(name)
    if base not in _ZOO:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(names())} (conv models also as "
                         f"NAME{MATMUL_SUFFIX}: {', '.join(n for n, e in _ZOO.items() if 'matmul' in e.lowerings)})")
    if conv is not None:
        if conv not in CONV_LOWERINGS:
            raise ValueError(f"unknown conv lowering {conv!r}; valid: {', '.join(CONV_LOWERINGS)}")
        if lowering != "direct" and conv != lowering:
            raise ValueError(f"model name {name!r} and conv={conv!r} disagree; pass one of them")
        lowering = conv
    entry = _ZOO[base]
    if lowering not in entry.lowerings:
        raise ValueError(f"zoo model {base!r} has no convs to lower (conv={lowering!r}); "
                         f"only {', '.join(n for n, e in _ZOO.items() if lowering in e.lowerings)} do")
    full_name = base if lowering == "direct" else base + MATMUL_SUFFIX
    module = entry.build(lowering)
    param_shapes = [(pname, tuple(int(d) for d in p.shape)) for pname, p in module.named_parameters()]
    canonical = canonical_shapes(base)     # values are drawn in the direct form: both lowerings get the same
    if [n for n, _ in param_shapes] != list(canonical):
        raise RuntimeError(f"zoo:{full_name}: lowered and direct modules name their weights differently")

    def weights() -> list[tuple[str, np.ndarray]]:
        out = []
        for pname, shape in param_shapes:
            out.append((pname, lowered_weight(init_weight(pname, canonical[pname], seed, entry.scale(pname)),
                                              shape)))
        return out

    def make_module(batch_size: int):
        return _export(full_name, module, entry.inputs, param_shapes, batch_size)

    from .architecture import analyze
    arch = analyze(make_module(1), num_inputs=len(entry.inputs))
    arch["description"] = entry.description + (", convs lowered to matmul (NHWC)" if lowering == "matmul" else "")
    arch["conv_lowering"] = lowering if "matmul" in entry.lowerings else None
    arch["zoo"] = {"model": base, "lowering": lowering, "seed": int(seed)}   # lets the compiler re-get it
    if entry.published:
        arch["published"] = dict(entry.published)
    return ModelSource(name=full_name, origin=f"zoo:{full_name}", inputs=entry.inputs, make_module=make_module,
                       weights=weights, architecture=arch)


def canonical_shapes(base: str) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape in the direct form (conv weights OIHW), in weight order."""
    return {n: tuple(int(d) for d in p.shape) for n, p in _ZOO[base].build("direct").named_parameters()}


def _export(name: str, module, inputs: tuple[TensorSpec, ...], param_shapes, batch_size: int):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
    nn = _nn()
    spec = {"main": {t.name: nn.spec.Tensor([batch_size, *t.shape], t.dtype) for t in inputs}}
    mod, _ = module.export_tvm(spec=spec, debug=False)
    check_signature(mod, inputs, batch_size, [(n, s, "float32") for n, s in param_shapes], where=f"zoo:{name}")
    return mod


def check_signature(mod, inputs: tuple[TensorSpec, ...], batch_size: int,
                    weights: list[tuple[str, tuple[int, ...], str]], where: str) -> None:
    """Raise unless mod["main"] takes exactly the inputs (batch on axis 0) then the weights (name, shape,
    dtype), in that order, and says so in its "num_input" attribute."""
    from .architecture import dtype_of, shape_of, var_name
    func = mod["main"]
    params = list(func.params)
    expected = [(t.name, (batch_size, *t.shape), t.dtype) for t in inputs] + [(n, tuple(s), d) for n, s, d in weights]
    got = [(var_name(p), shape_of(p), dtype_of(p)) for p in params]
    # Input names may be sanitized by an importer ("input.1" -> "input_1"): compare inputs by shape and dtype.
    n_in = len(inputs)
    mismatch = [i for i, (g, e) in enumerate(zip(got, expected))
                if (g[1:] if i < n_in else g) != (e[1:] if i < n_in else e)]
    if len(got) != len(expected) or mismatch:
        i = mismatch[0] if mismatch else min(len(got), len(expected))
        raise RuntimeError(f"{where}: 'main' does not take the inputs then the weights in order: {len(got)} params "
                           f"for {len(expected)} expected; first difference at #{i}: "
                           f"{got[i] if i < len(got) else None} vs {expected[i] if i < len(expected) else None}")
    num_input = func.attrs["num_input"] if func.attrs is not None and "num_input" in func.attrs else None
    if num_input is None or int(num_input) != n_in:
        raise RuntimeError(f"{where}: 'main' has num_input={num_input}, expected {n_in}")
