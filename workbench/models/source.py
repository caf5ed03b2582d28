"""What the compiler takes: a model from the zoo or from an ONNX file, as Relax IR plus its weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of one sample: `shape` excludes the batch dimension, which is always axis 0."""
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    nbytes: int = field(init=False, repr=False, compare=False)   # of one sample; read on every Infer's hot path

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])


@dataclass
class ModelSource:
    """A servable model before compilation.

    `make_module(b)` returns a tvm.IRModule whose Relax function "main" takes the inputs (batch b on axis 0)
    followed by every weight, in the order `weights()` lists them, and returns the output (or a tuple).
    Weights are deterministic (zoo: from `seed`), and no value affects latency.
    """
    name: str
    origin: str                                   # "zoo:resnet50" or "onnx:/abs/path/model.onnx"
    inputs: tuple[TensorSpec, ...]
    make_module: Callable[[int], object]
    weights: Callable[[], list[tuple[str, np.ndarray]]]
    architecture: dict = field(default_factory=dict)   # params, flops per sample, layer summary
