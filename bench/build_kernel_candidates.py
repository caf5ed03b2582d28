"""Build the kernel-quality candidates here (full TVM, no GPU) for `bench.kernel_quality` to measure on the GPU.

    python -m bench.build_kernel_candidates [--round 1] [--out .gpu/kq] [--bundle .gpu/kq.tar.xz]
                                            [--models resnet50,mobilenet_v2,bert_base,resnet18] [--no-kernels]

Rounds: 1 = fp32/fp16 global settings and the kernel search; 2 = round 1's kernel winners composed into whole
models (--from); 3 = fp16 with the mma.sync tensor-core rule (schedules.MmaMatmul) against dlight's wmma, every
CNN lowering, b1 and b16, whole models only:

    python -m bench.build_kernel_candidates --round 3 --out .gpu/kq3 --bundle .gpu/kq3.tar.xz --no-kernels

4 = the ResNets (matmul lowering) with SmallReduction 256, fp32 and fp16; 5 = round 4's fp16 pick plus the
injective rule (schedules.InjectiveVectorize: vectorized im2col/cast kernels); 6 = the injective rule on
BERT's and MobileNetV2's fp16 picks; 7 = the fp16 picks of rounds 5/6 with fp16 activations between kernels
(schedules.keep_fp16_activations), all four models; 8 = the fp16 winners in data/tuning after round 7 with fp16
weights (tuning.Variant.weights, schedules.keep_fp16_weights: no weight-cast kernels, half the weight bytes);
9 = the CNNs' fp16 and fp32 winners after round 8 with the RGB stem's im2col as one gather (zoo.py);
10 = BERT-base's fp16 winner with the attention matmuls on the batched mma schedule (label suffix -bmma);
11 = the fp16 winners with reductions reading fp16 (-ri16), fitted row reductions (-rr256) and InjectiveRows
(-rows8), BERT-base, ResNet-50, ResNet-18 (see round11); 12 = what `workbench compile` builds from the tuning
database at b2, b4 and b8 (fp32 and fp16, every model), the compiled batch sizes no round measured; 13-17 =
split-K, dlight's 64x128 tile, the SIMT matmul schedule and BERT's split-K targets with it (see round13..round17);
27 = every cell's leading candidates (from --from) with their graphs timed again, queued (see round27), reusing
the binaries built for the rounds that measured them; 28-32 = tiles and settings for the cells left, and the
leaders built again after a change of their kernels (29: BERT's split-K sums in its layer norms; 30: the ResNets'
reshaped im2col vectorized; rounds 29 and 30 also take --from); 33 = BERT b16's split-K targets; 34 = implicit
GEMM (the ResNets' 3x3 convs without im2col kernels, schedule.implicit_gemm; see round34); 35 = implicit GEMM at
the other batch sizes; 36 = BERT's Q, K and V projections fused (tuning.Variant projections); 37 = every batch
size of 1..16 no round measured; 38 = the cells a pick (--from) left unmet, again; 39 = those left after it, with
split-K aimed at other block counts; 40 = those left then, one GEMM shape at a time on other tiles:

    python -m bench.build_kernel_candidates --round 5 --models resnet50,resnet18 --out .gpu/kq5 \
        --bundle .gpu/kq5.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 7 --out .gpu/kq7 --bundle .gpu/kq7.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 8 --out .gpu/kq8 --bundle .gpu/kq8.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 9 --models resnet50,resnet18,mobilenet_v2 --out .gpu/kq9 \
        --bundle .gpu/kq9.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 10 --models bert_base --out .gpu/kq10 \
        --bundle .gpu/kq10.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 11 --models bert_base,resnet50,resnet18 --out .gpu/kq11 \
        --bundle .gpu/kq11.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 12 --out .gpu/kq12 --bundle .gpu/kq12.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 15 --out .gpu/kq15 --bundle .gpu/kq15.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 34 --models resnet18,resnet50 --out .gpu/kq34 \
        --bundle .gpu/kq34.tar.xz --no-kernels
    python -m bench.build_kernel_candidates --round 35 --models resnet18,resnet50 --out .gpu/kq35 \
        --bundle .gpu/kq35.tar.xz --no-kernels

Every candidate records its weights (dtypes, bytes, and the source's fp32 bytes) and `weight_cast_kernels`:
calls of kernels that read only weights (ToMixedPrecision's fp32->fp16 weight casts, redone every inference),
in the candidate and in the same variant with fp32 weights (counted after fusion). An fp16-weights candidate
takes its weights in fp16: bench.kernel_quality must give each candidate the seeded weights in its signature's
dtypes (weight_dtypes/as_dtypes there).

Two kinds of candidates, all for {"kind": "cuda", "arch": "sm_90"}:
- whole models: a zoo model at one batch size compiled with one `tuning.Variant` (conv lowering, precision,
  global schedule settings, relax CUDA-graph rewrite) -> models/<id>.so, measured end to end and checked
  against the NumPy reference;
- kernels: every matmul-like kernel (and every short-reduction kernel: depthwise convs) of a model variant,
  scheduled once per choice of the search space (dlight Matmul configs, SmallReduction block sizes), many per
  module -> kernels/<job>_<n>.so, measured one kernel at a time; the winners per kernel key become
  per-kernel choices in the tuning database.
Plus refs/<model>.npz: the NumPy (float64) reference outputs of 16 inputs for the zoo's seeded weights; the GPU
script regenerates inputs and weights from their seeds (kernel_quality.reference_inputs, zoo.init_weight,
both checked by sha256) instead of carrying them.

Incremental: a candidate whose .json exists is not rebuilt (--force rebuilds). Compiles run one at a time
(one core). fp16 candidates need a tvm-ffi whose serializer works (schedules.check_tensorize_support):
run with PYTHONPATH=<dir with apache-tvm-ffi 0.1.14.post1> if the venv has 0.1.15.x; they are skipped
otherwise. Then carry the bundle: carry=['.device-site', '.gpu/kq.tar.xz'].
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90"
REF_SAMPLES = 16
REF_SEED = 1234
WEIGHT_SEED = 0
KERNELS_PER_MODULE = 40

# The search space of dlight's Matmul rule (fp32, SIMT): overrides of its CUDA config. x is the M (row) axis,
# y the N axis; a tile is (vthread*block*micro)_x by _y, block_x*block_y threads: d 32x64 (dlight's), a 64x64,
# b/c 128x128 (k 8/16), e 64x128, f 128x64, h 32x32 (64 threads), i 16x128 (small M), k 64x128 with vthreads.
MATMUL_CONFIGS: dict[str, dict] = {
    "d": {},                                                                                   # 32x64, 128 thr
    "a": dict(block_size_x=16, block_size_y=16, micro_size_x=4, micro_size_y=4, micro_size_k=16, vector_size=4),
    "b": dict(block_size_x=16, block_size_y=16, micro_size_x=8, micro_size_y=8, micro_size_k=8, vector_size=4),
    "c": dict(block_size_x=16, block_size_y=16, micro_size_x=8, micro_size_y=8, micro_size_k=16, vector_size=4),
    "e": dict(block_size_x=16, block_size_y=16, micro_size_x=4, micro_size_y=8, micro_size_k=16, vector_size=4),
    "f": dict(block_size_x=16, block_size_y=16, micro_size_x=8, micro_size_y=4, micro_size_k=16, vector_size=4),
    "h": dict(block_size_x=8, block_size_y=8, micro_size_x=4, micro_size_y=4, micro_size_k=16, vector_size=4),
    "i": dict(block_size_x=8, block_size_y=32, micro_size_x=2, micro_size_y=4, micro_size_k=16, vector_size=4),
    "k": dict(block_size_x=8, block_size_y=16, vthread_x=2, vthread_y=2, micro_size_x=4, micro_size_y=4,
              micro_size_k=16, vector_size=4),
}
SMALL_REDUCTION_THREADS = (64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ModelCandidate:
    model: str                    # base zoo name
    batch: int
    label: str                    # e.g. fp32-a, fp16, fp32-sr256-a, fp32-cg
    variant: dict                 # tuning.Variant JSON

    @property
    def lowering(self) -> str:
        return self.variant["lowering"]

    @property
    def id(self) -> str:
        return f"{self.model}{'-matmul' if self.lowering == 'matmul' else ''}_b{self.batch}_{self.label}"


def _variant(lowering: str, precision: str = "fp32", matmul: str | None = None, sr: int | None = None,
             cuda_graph: bool = False, mma: bool = True, inj: int | None = None, act16: bool = False,
             w16: bool = False, ri16: bool = False, rows: int | None = None, rr: int | None = None) -> dict:
    sched: dict = {}
    if not mma:
        sched["mma"] = False                  # schedules.ScheduleSpec: dlight's wmma for fp16 matmuls
    if matmul:
        sched["matmul"] = dict(MATMUL_CONFIGS[matmul])
    if sr:
        sched["small_reduction"] = sr
    if inj:
        sched["injective"] = inj              # schedules.InjectiveVectorize, `inj` elements per thread
    if act16:
        sched["activations"] = "fp16"         # schedules.keep_fp16_activations: kernels pass each other fp16
    if ri16:
        sched["reduce_inputs"] = "fp16"       # softmax/layer norm/avg pool read fp16, widen in their own kernel
    if rows:
        sched["rows"] = rows                  # schedules.InjectiveRows: gathers/transposes, `rows` per thread
    if rr:
        sched["row_reduction"] = rr           # schedules.RowReduction: threads per row fitted, at most `rr`
    out = {"lowering": lowering, "precision": precision, "cuda_graph": cuda_graph, "schedule": sched}
    if w16:
        out["weights"] = "fp16"               # tuning.Variant.weights: the artifact stores weights in fp16
    return out


def round1(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Whole-model candidates and kernel-search jobs (model, lowering, batch) of the first round."""
    cands: list[ModelCandidate] = []

    def add(model, b, label, **kw):
        cands.append(ModelCandidate(model, b, label, _variant(**kw)))

    for model in ("resnet50", "resnet18"):
        for lw in ("direct", "matmul"):
            for b in (1, 16):
                add(model, b, "fp32", lowering=lw)
                add(model, b, "fp32-a", lowering=lw, matmul="a")
                if b == 16:
                    add(model, b, "fp32-b", lowering=lw, matmul="b")
                if model == "resnet50":                  # round 1 predates MmaMatmul: dlight's wmma
                    add(model, b, "fp16", lowering=lw, precision="fp16", mma=False)
        if model == "resnet50":
            add(model, 1, "fp32-cg", lowering="matmul", cuda_graph=True)
    for lw in ("direct", "matmul"):
        for b in (1, 16):
            add("mobilenet_v2", b, "fp32", lowering=lw)
            add("mobilenet_v2", b, "fp32-sr256", lowering=lw, sr=256)
            add("mobilenet_v2", b, "fp32-sr256-a", lowering=lw, sr=256, matmul="a")
            add("mobilenet_v2", b, "fp16-sr256", lowering=lw, precision="fp16", sr=256, mma=False)
    for b in (1, 16):
        add("bert_base", b, "fp32", lowering="direct")
        add("bert_base", b, "fp32-a", lowering="direct", matmul="a")
        add("bert_base", b, "fp32-b", lowering="direct", matmul="b")
        add("bert_base", b, "fp16", lowering="direct", precision="fp16", mma=False)
    add("bert_base", 1, "fp32-cg", lowering="direct", cuda_graph=True)
    jobs = [(m, lw, b) for m in ("resnet50", "mobilenet_v2") for lw in ("direct", "matmul") for b in (1, 16)]
    jobs += [("bert_base", "direct", b) for b in (1, 16)]
    keep = set(models)
    return [c for c in cands if c.model in keep], [j for j in jobs if j[0] in keep]


def round3(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """fp16 whole models with the mma.sync tensor-core rule (schedules.MmaMatmul, on by default: label
    `fp16-mma`, `fp16-sr256-mma` for MobileNetV2 with its SmallReduction setting) and, measured in the same run,
    the same variant with dlight's wmma (`"mma": false`: labels `fp16`, `fp16-sr256`, the ids round 1 used for
    them, so a merged pick takes this run's figures). Both conv lowerings of the CNNs, b1 and b16. mma
    candidates first: an interrupted build has them."""
    cands: list[ModelCandidate] = []
    plan = [(m, lw) for m in ("bert_base", "resnet50", "resnet18", "mobilenet_v2")
            for lw in (("direct",) if m == "bert_base" else ("matmul", "direct"))]
    for mma in (True, False):
        for model, lw in plan:
            sr = 256 if model == "mobilenet_v2" else None
            label = ("fp16-sr256" if sr else "fp16") + ("-mma" if mma else "")
            for b in (1, 16):
                cands.append(ModelCandidate(model, b, label, _variant(lw, "fp16", sr=sr, mma=mma)))
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round4(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The ResNets (conv lowered to matmul, their tuned lowering) with SmallReduction at 256 threads, fp32 and fp16
    (mma), b1 and b16: bench.kernel_breakdown found their 3x3 max-pool, scheduled by dlight's GeneralReduction
    with one thread block per output, taking 3.0 of ResNet-50 b16 fp16's 6.4 ms."""
    cands = [ModelCandidate(model, b, label, _variant("matmul", precision, sr=256))
             for model in ("resnet50", "resnet18") for b in (1, 16)
             for label, precision in (("fp32-sr256", "fp32"), ("fp16-sr256-mma", "fp16"))]
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round5(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Round 4's pick for the ResNets (conv lowered to matmul, fp16 with mma, SmallReduction at 256 threads) plus
    schedules.InjectiveVectorize at 8 elements per thread (fp32-reading kernels get 4: 16-byte vectors):
    bench.kernel_breakdown found ResNet-50-matmul b16 fp16's im2col kernels (pad, shifted slices, concat,
    fp16 cast) and casts, one scalar element per thread under dlight's Fallback, taking ~1.7 of its 3.3 ms at
    640-700 GB/s. b1 and b16."""
    cands = [ModelCandidate(model, b, "fp16-sr256-inj8-mma", _variant("matmul", "fp16", sr=256, inj=8))
             for model in ("resnet50", "resnet18") for b in (1, 16)]
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round6(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Round 5's InjectiveVectorize (8 elements per thread) on the other two models' fp16 picks: BERT-base
    (mma; its elementwise kernels took 0.69 of 4.27 ms at b16 under Fallback, bench.kernel_breakdown) and
    MobileNetV2 (conv lowered to matmul, mma, SmallReduction at 256). b1 and b16."""
    cands = [ModelCandidate("bert_base", b, "fp16-inj8-mma", _variant("direct", "fp16", inj=8)) for b in (1, 16)]
    cands += [ModelCandidate("mobilenet_v2", b, "fp16-sr256-inj8-mma", _variant("matmul", "fp16", sr=256, inj=8))
              for b in (1, 16)]
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round7(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The fp16 picks of rounds 5 and 6 with fp16 activations between kernels (ScheduleSpec.activations,
    schedules.keep_fp16_activations; label suffix `-act16`): ToMixedPrecision leaves every matmul/conv result
    widened to fp32 by its bias add, so kernels store fp32 that the next one reads back and casts. Fused, at b16:
    ResNet-50 146 launches, 15 of them lone casts of activations, 53 fp32 reads of another kernel's output ->
    131, 0, 1 (the average pool's input), activations written 1198 -> 738 MiB; BERT-base 307, 48, 147 -> 259,
    0, 38 (layer-norm and softmax inputs). ResNet-50, ResNet-18, MobileNetV2 (conv lowered to matmul,
    SmallReduction 256, InjectiveVectorize 8, mma) and BERT-base (direct, InjectiveVectorize 8, mma), b1 and b16,
    plus MobileNetV2 b16's pick exactly (round 6 left it without the injective rule)."""
    cands = [ModelCandidate(model, b, "fp16-sr256-inj8-mma-act16", _variant("matmul", "fp16", sr=256, inj=8,
                                                                             act16=True))
             for model in ("resnet50", "resnet18", "mobilenet_v2") for b in (1, 16)]
    cands += [ModelCandidate("bert_base", b, "fp16-inj8-mma-act16", _variant("direct", "fp16", inj=8, act16=True))
              for b in (1, 16)]
    cands.append(ModelCandidate("mobilenet_v2", 16, "fp16-sr256-mma-act16", _variant("matmul", "fp16", sr=256,
                                                                                      act16=True)))
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round8(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The fp16 winners in data/tuning after round 7 (kernel_quality pick over rounds 1, 3-7) with fp16 weights
    (label suffix `-w16`): ToMixedPrecision casts every matmul/conv weight from the artifact's fp32 to fp16 in a
    kernel of its own on every run (ResNet-50 54 of its 130 kernel calls at b16, BERT-base 73 of 257)
    and the bias adds read fp32. ResNet-50 and ResNet-18 (conv lowered to matmul, SmallReduction 256,
    InjectiveVectorize 8, mma, fp16 activations), BERT-base (direct, InjectiveVectorize 8, mma, fp16 activations),
    b1 and b16; MobileNetV2's two winners (matmul, SmallReduction 256, mma; b1 with InjectiveVectorize 8)."""
    cands = [ModelCandidate(model, b, "fp16-sr256-inj8-mma-act16-w16",
                            _variant("matmul", "fp16", sr=256, inj=8, act16=True, w16=True))
             for model in ("resnet50", "resnet18") for b in (1, 16)]
    cands += [ModelCandidate("bert_base", b, "fp16-inj8-mma-act16-w16",
                             _variant("direct", "fp16", inj=8, act16=True, w16=True)) for b in (1, 16)]
    cands.append(ModelCandidate("mobilenet_v2", 1, "fp16-sr256-inj8-mma-w16",
                                _variant("matmul", "fp16", sr=256, inj=8, w16=True)))
    cands.append(ModelCandidate("mobilenet_v2", 16, "fp16-sr256-mma-w16", _variant("matmul", "fp16", sr=256, w16=True)))
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round9(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The CNNs' winners in data/tuning after round 8, fp16 and fp32, rebuilt with the RGB stem's im2col as one
    gather (zoo.IM2COL_SLICE_CHANNELS; label suffix `-g`): bench.kernel_breakdown found ResNet-50 b16 fp16's 7x7
    stem im2col, a concatenation of 49 three-channel slices under dlight's Fallback, taking 0.67 of its 2.2 ms.
    ResNet-50, ResNet-18 and MobileNetV2 (conv lowered to matmul), b1 and b16."""
    fp16 = dict(sr=256, inj=8, act16=True, w16=True)
    cands = [ModelCandidate(model, b, "fp16-sr256-inj8-mma-act16-w16-g", _variant("matmul", "fp16", **fp16))
             for model in ("resnet50", "resnet18") for b in (1, 16)]
    cands += [ModelCandidate("mobilenet_v2", 1, "fp16-sr256-inj8-mma-w16-g",
                             _variant("matmul", "fp16", sr=256, inj=8, w16=True)),
              ModelCandidate("mobilenet_v2", 16, "fp16-sr256-mma-w16-g", _variant("matmul", "fp16", sr=256, w16=True))]
    cands += [ModelCandidate("resnet50", 1, "fp32-g", _variant("matmul")),
              ModelCandidate("resnet50", 16, "fp32-sr256-g", _variant("matmul", sr=256))]
    cands += [ModelCandidate("resnet18", b, "fp32-g", _variant("matmul")) for b in (1, 16)]
    cands += [ModelCandidate("mobilenet_v2", b, "fp32-sr256-g", _variant("matmul", sr=256)) for b in (1, 16)]
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round10(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """BERT-base's fp16 winner in data/tuning after round 9 (direct, InjectiveVectorize 8, mma, fp16 activations,
    fp16 weights) rebuilt with the mma rule taking the batched attention matmuls too (label suffix `-bmma`):
    bench.kernel_breakdown found QK^T (f16[16,12,128,64] x f16[16,12,64,128]) and PV under dlight's Matmul rule
    at ~20 TFLOP/s, 0.46 of b16's 3.4 ms. MmaMatmul now gives each thread block one tile of one (batch, head)
    entry (tensorcore.choose_batched_config); every non-batched kernel is unchanged, so the round-8 ids
    without the suffix still describe what their variant builds without batched support. b1 and b16."""
    cands = [ModelCandidate("bert_base", b, "fp16-inj8-mma-act16-w16-bmma",
                            _variant("direct", "fp16", inj=8, act16=True, w16=True)) for b in (1, 16)]
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def round11(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The fp16 winners in data/tuning after round 10 (BERT-base: direct, InjectiveVectorize 8, mma, fp16
    activations and weights; the ResNets: conv lowered to matmul, SmallReduction 256, the same) with the levers
    of bench/results/kernel_breakdown.md's round-10 findings:
    - `-ri16` (schedule.reduce_inputs "fp16", schedules.keep_fp16_activations): softmax, layer norm and the
      average pool read their fp16 input and widen it in their own kernel; the producers (QK^T, the residual
      adds' matmul epilogues, the last conv) store fp16 instead of fp32 (BERT b16: softmax read f32[16,12,128,128],
      12 x 30.7 us; 25 layer norms read f32[16,128,768]);
    - `-rr256` (schedule.row_reduction 256, schedules.RowReduction): softmax and layer norm with threads per
      row fitted to the row (32 warp-shuffle threads per 128-long softmax row instead of GeneralReduction's 256);
    - `-rows8` (schedule.rows 8, schedules.InjectiveRows): the gathers InjectiveVectorize declines, ahead of
      dlight's Fallback: the RGB stem's im2col (ResNet-50 b16: 130 us at 529 GB/s) and BERT's head transposes
      (K to [b, H, d, s]: 12 x 8.8 us at 717 GB/s; the context merge: 12 x 4.3 us).
    All levers on (label suffix `-ri16-rr256-rows8`) for BERT-base b1/b16, ResNet-50 b1/b16, ResNet-18 b16; at
    b16 also each lever alone on the winner (BERT: -ri16, -ri16-rr256, -rows8; ResNet-50: -ri16, -rows8), so the
    lead can attribute the change."""
    bert = dict(inj=8, act16=True, w16=True)
    cnn = dict(sr=256, inj=8, act16=True, w16=True)
    levers = dict(ri16=True, rr=256, rows=8)
    cands = [ModelCandidate("bert_base", b, "fp16-inj8-mma-act16-w16-ri16-rr256-rows8",
                            _variant("direct", "fp16", **bert, **levers)) for b in (16, 1)]
    cands += [ModelCandidate("resnet50", b, "fp16-sr256-inj8-mma-act16-w16-ri16-rr256-rows8",
                             _variant("matmul", "fp16", **cnn, **levers)) for b in (16, 1)]
    cands.append(ModelCandidate("resnet18", 16, "fp16-sr256-inj8-mma-act16-w16-ri16-rr256-rows8",
                                _variant("matmul", "fp16", **cnn, **levers)))
    cands += [ModelCandidate("bert_base", 16, "fp16-inj8-mma-act16-w16-ri16", _variant("direct", "fp16", **bert,
                                                                                      ri16=True)),
              ModelCandidate("bert_base", 16, "fp16-inj8-mma-act16-w16-ri16-rr256",
                             _variant("direct", "fp16", **bert, ri16=True, rr=256)),
              ModelCandidate("bert_base", 16, "fp16-inj8-mma-act16-w16-rows8", _variant("direct", "fp16", **bert,
                                                                                       rows=8)),
              ModelCandidate("resnet50", 16, "fp16-sr256-inj8-mma-act16-w16-ri16",
                             _variant("matmul", "fp16", **cnn, ri16=True)),
              ModelCandidate("resnet50", 16, "fp16-sr256-inj8-mma-act16-w16-rows8",
                             _variant("matmul", "fp16", **cnn, rows=8))]
    keep = set(models)
    return [c for c in cands if c.model in keep], []


def _config_label(cfg: dict) -> str:
    """The MATMUL_CONFIGS label of a dlight Matmul config (or "x" for one not among them)."""
    return next((k for k, c in MATMUL_CONFIGS.items() if c == cfg), "x")


def variant_label(v: dict) -> str:
    """The candidate label of a tuning.Variant JSON, in the order the rounds' labels use (fp16-sr256-inj8-mma-...)."""
    s = v.get("schedule", {})
    parts = [v["precision"]]
    parts += [f"sr{s['small_reduction']}"] if "small_reduction" in s else []
    parts += [f"inj{s['injective']}"] if "injective" in s else []
    parts += ["mma"] if v["precision"] == "fp16" and s.get("mma", True) else []
    parts += ["act16"] if s.get("activations") == "fp16" else []
    parts += ["w16"] if v.get("weights") == "fp16" else []
    parts += ["ri16"] if s.get("reduce_inputs") == "fp16" else []
    parts += [f"rr{s['row_reduction']}"] if "row_reduction" in s else []
    parts += [f"rows{s['rows']}"] if "rows" in s else []
    parts += [f"sk{s['split_k']}"] if "split_k" in s else []
    parts += [f"m{_config_label(s['matmul'])}"] if "matmul" in s else []
    parts += ["simt"] if s.get("simt") else []
    parts += ["ig"] if s.get("implicit_gemm") else []
    parts += ["qkv"] if v.get("projections") == "fused" else []
    parts += ["k"] if s.get("kernels") else []
    parts += ["g"] if v.get("cuda_graph") else []
    return "-".join(parts)


def _db_variant(model: str, b: int, precision: str, without: tuple[str, ...] = ()) -> dict | None:
    """The tuning database's variant for (model, b, precision) as `workbench compile` plans it (tuning.plan),
    as JSON, with the variant and schedule fields `without` removed (a later round's own setting); None without
    entries."""
    from workbench.models import tuning
    plan = tuning.plan(model, "cuda", ARCH, [b], precision)
    if plan is None:
        return None
    v = {k: x for k, x in plan.variants[b].to_json().items() if k not in without}
    v["schedule"] = {k: x for k, x in v["schedule"].items() if k not in without}
    return v


def round12(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """What `workbench compile` builds at the batch sizes no round measured: the tuning database's variant (the
    nearest measured batch's winner, tuning.plan) at b2, b4 and b8, fp32 and fp16, every model. With b1 and b16
    that is every batch size the compiler builds by default (1, 2, 4, 8, 16; the worker pads any n in 1..16 to the
    next of them), so the goal check covers every batch the zoo serves."""
    cands = []
    for model in models:
        for precision in ("fp32", "fp16"):
            for b in (2, 4, 8):
                v = _db_variant(model, b, precision)
                if v is not None:
                    cands.append(ModelCandidate(model, b, variant_label(v), v))
    return cands, []


def round13(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Split-K (schedule.split_k, workbench/models/split_k.py) on the tuning database's variants after round 12:
    the round-1 kernel search found the fp32 matmuls of small outputs running on a few thread blocks (ResNet-50
    b1's [49, 4608] x [4608, 512]: 16 blocks, 191 us; BERT b1's FFN output: 48 blocks, 131 us), and no dlight
    Matmul config helped them. fp32 and fp16 (the fp16 partial matmuls on MmaMatmul, as batched matmuls) at b1,
    b2, b4, b8 and b16 with block targets 256 and 1024 (label suffix `-sk256`, `-sk1024`), and the database's
    variant without split-K again at b1 and b16 (side by side in the same run)."""
    cands = []
    for model in models:
        for precision in ("fp32", "fp16"):
            for b in (1, 16, 2, 4, 8):
                for split in ((None, 1024, 256) if b in (1, 16) else (1024, 256)):
                    v = _db_variant(model, b, precision, without=("split_k",))   # (the database after it has)
                    if v is None:
                        continue
                    if split is not None:
                        v["schedule"]["split_k"] = split
                    cands.append(ModelCandidate(model, b, variant_label(v), v))
    return cands, []


def round14(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The fp32 cells split-K left slower than torch are the large batches, where every matmul has blocks
    enough and dlight's SIMT Matmul tile sets the pace. Round 1's kernel search found its config `k` (a 64x128
    tile with virtual threads: MATMUL_CONFIGS) up to 23% faster on such kernels, but no whole model was built
    with it. fp32 at b4, b8 and b16: the database's variant after round 13 with config k (label suffix `-mk`),
    with split-K as the database has it and without it."""
    cands = []
    for model in models:
        for b in (16, 8, 4):
            v = _db_variant(model, b, "fp32")
            if v is None:
                continue
            split = v["schedule"].get("split_k")
            for keep in ((True, False) if split else (False,)):
                w = _db_variant(model, b, "fp32", without=("split_k", "matmul"))
                w["schedule"]["matmul"] = dict(MATMUL_CONFIGS["k"])
                if keep:
                    w["schedule"]["split_k"] = split
                cands.append(ModelCandidate(model, b, variant_label(w), w))
    return cands, []


def round15(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """SimtMatmul (schedule.simt, workbench/models/simt_gemm.py) on the fp32 variants of the tuning database
    after round 14: bench/results/gemm_simt.md measured it 1.2-2x faster than dlight's Matmul on our models'
    fp32 matmul shapes. Every model at b1, b2, b4, b8 and b16: the database's variant as it is (beside it, in the
    same run), with simt (label suffix `-simt`), and with simt and split-K toggled (the database's split-K
    removed, or split-K 256 added), since the SIMT tiles change how many blocks a matmul gets."""
    cands = []
    for model in models:
        for b in (1, 16, 2, 4, 8):
            v = _db_variant(model, b, "fp32", without=("simt",))
            if v is None:
                continue
            cands.append(ModelCandidate(model, b, variant_label(v), v))
            split = v["schedule"].get("split_k")
            for toggled in (False, True):
                w = json.loads(json.dumps(v))
                w["schedule"]["simt"] = True
                if toggled and split:
                    del w["schedule"]["split_k"]
                elif toggled:
                    w["schedule"]["split_k"] = 256
                cands.append(ModelCandidate(model, b, variant_label(w), w))
    return cands, []


def round16(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Round 15's SIMT candidates, defined over the database after round 15, again after the schedule unrolled its
    k loop (kernels a median 1.08x faster, up to 1.27x). Ids round 15 measured get new figures."""
    return [c for c in round15(models)[0] if c.variant["schedule"].get("simt")], []


def round17(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The fp32 cells left slower than torch after round 16 are BERT's b4, b8 and b16, where the SIMT kernels of
    the 768-wide projections and the FFN output get 96-384 blocks of 64x64 (a wave and a half on 132 SMs at
    b8). Larger split-K block targets (512, 1024, 2048) on the database's variant (SIMT on), beside its own 256
    in the same run."""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        for b in (4, 8, 16):
            v = _db_variant(model, b, "fp32", without=("split_k",))
            if v is None or not v["schedule"].get("simt"):
                continue
            for split in (256, 512, 1024, 2048):
                w = json.loads(json.dumps(v))
                w["schedule"]["split_k"] = split
                cands.append(ModelCandidate(model, b, variant_label(w), w))
    return cands, []


def round18(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The fp32 variants never had the settings that sped up the fp16 ones' non-matmul kernels: InjectiveVectorize
    (the matmul lowering's im2col, casts), InjectiveRows (the RGB stem's gather, BERT's head transposes) and
    RowReduction (softmax, layer norm with threads fitted to the row). Every model at b1, b2, b4, b8 and b16: the
    database's fp32 variant with inj8, rows8 and rr256 added, and BERT's variants as they are, beside them."""
    cands = []
    for model in models:
        for b in (1, 2, 4, 8, 16):
            v = _db_variant(model, b, "fp32", without=("injective", "rows", "row_reduction"))
            if v is None:
                continue
            if model == "bert_base":
                cands.append(ModelCandidate(model, b, variant_label(v), v))
            w = json.loads(json.dumps(v))
            w["schedule"].update(injective=8, rows=8, row_reduction=256)
            cands.append(ModelCandidate(model, b, variant_label(w), w))
    return cands, []


def round19(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The zoo's BERT now computes attention's two products as einsums on [b, s, heads, d] (the head reshapes are
    views: no transpose kernels), and RowReduction packs short rows (softmax) four to a thread block, so every
    BERT figure before this round measured other kernels (kernel_quality.KERNELS_CHANGED). At b1, b2, b4, b8 and
    b16: the database's fp32 variant with round 18's settings (inj8, rows8, rr256), the fp16 variant with and
    without split-K 256, and TVM's default pipeline at b1 and b16 (the tables' baseline)."""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        for b in (1, 2, 4, 8, 16):
            if b in (1, 16):
                cands.append(ModelCandidate(model, b, "fp32", _variant("direct")))
            v = _db_variant(model, b, "fp32")
            v["schedule"].update(injective=8, rows=8, row_reduction=256)
            cands.append(ModelCandidate(model, b, variant_label(v), v))
            for split in (None, 256):
                w = _db_variant(model, b, "fp16", without=("split_k",))
                if split:
                    w["schedule"]["split_k"] = split
                cands.append(ModelCandidate(model, b, variant_label(w), w))
    return cands, []


def round20(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Round 19's BERT b1 fp32 candidate (inj8, rr256, rows8, split-K 256, SIMT) failed its numerics check (b2-b16
    with the same settings passed): the same variant again, without each of its settings in turn, and with SIMT
    alone, to find the kernel at fault."""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        full = _variant("direct", inj=8, rows=8, rr=256)
        full["schedule"].update(split_k=256, simt=True)
        for drop in (None, "split_k", "simt", "injective", "rows", "row_reduction"):
            v = json.loads(json.dumps(full))
            v["schedule"].pop(drop, None)
            cands.append(ModelCandidate(model, 1, variant_label(v), v))
        v = _variant("direct")
        v["schedule"]["simt"] = True
        cands.append(ModelCandidate(model, 1, variant_label(v), v))
    return cands, []


def round21(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Round 19's candidates again after RowReduction's fix: round 20 found its packed rows at fault (TVM's
    ThreadSync dropped the barrier between lane 0's store of a row's maximum and the other lanes' loads at b1);
    one-warp rows now keep their results in registers. Ids round 19 measured get new figures."""
    return round19(models)


def round22(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """BERT on its einsum graph: (a) layer norm on one warp a row (RowReduction at most 32 threads: 24 values a
    thread, four rows a block, results in registers) where round 21's rows of 768 had 256 threads, one row a
    block and two block-wide reductions: every batch, fp32 and fp16, the database's variant with rr32; (b) split-K
    targets again where round 21 came within 10% of torch: fp32 b16 without split-K and with 512 and 1024 (the
    database's 2048 is round 21's), fp16 b4, b8 and b16 with 512 and 1024 (256 and none are round 21's)."""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        for b in (1, 2, 4, 8, 16):
            for precision in ("fp32", "fp16"):
                v = _db_variant(model, b, precision)
                v["schedule"].update({**({"injective": 8, "rows": 8} if precision == "fp32" else {}),
                                      "row_reduction": 32})
                cands.append(ModelCandidate(model, b, variant_label(v), v))
        for b, precision, splits in ((16, "fp32", (None, 512, 1024)), (4, "fp16", (512, 1024)),
                                     (8, "fp16", (512, 1024)), (16, "fp16", (512, 1024))):
            for split in splits:
                v = _db_variant(model, b, precision, without=("split_k",))
                if precision == "fp32":
                    v["schedule"].update(injective=8, rows=8, row_reduction=256)
                if split:
                    v["schedule"]["split_k"] = split
                cands.append(ModelCandidate(model, b, variant_label(v), v))
    return cands, []


def _gemm_choices(model: str, b: int, variant: dict, rule: str, pick, only: str = "") -> dict:
    """Per-kernel choices (schedule.kernels) for the matmul kernels of the variant's graph: `pick(batch, m, n, k)`
    (batch None for a 2-D matmul, else the batched entries: split-K partials, attention's products) gives the
    `rule`'s ("mma" or "simt") tile for a kernel, or None to leave it to the rule's per-shape choice. `only`: the
    kernels whose name starts with it (round 34: the implicit-GEMM convs)."""
    from workbench.models import schedules, tensorcore, tuning
    v = tuning.Variant.from_json(variant)
    fused = schedules.fuse_variant(_source(model, v).make_module(b), _target(), v)
    out = {}
    for k in schedules.kernels(fused, _target()):
        if not k.name.startswith(only):
            continue
        try:
            batch, m, n, kk, _ = tensorcore.batched_gemm_shape(k.func, "float16" if rule == "mma" else "float32")
        except Exception:  # noqa: BLE001 - not a matmul the GEMM schedules fold
            continue
        config = pick(batch, m, n, kk)
        if config is not None:
            out[k.key] = {"rule": rule, "config": config}
    return out


def round23(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """BERT's fp16 cells still slower than torch at b4 and b16 (and b8, met by 0.6%) spend most of their time in the
    mma matmuls with N = 768 (the projections and the FFN output), whose 128x128 and 64x64 grids leave SMs idle in
    the last wave (b16: 96 blocks of 128x128 on 132 SMs). The 96- and 48-column tiles (tensorcore.CONFIGS) for
    exactly those kernels (per-kernel choices), on the database's fp16 variant at b4, b8 and b16."""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        for b in (4, 8, 16):
            for config in ("t128x96", "t64x96", "t64x48"):
                v = _db_variant(model, b, "fp16")
                v["schedule"]["kernels"] = _gemm_choices(model, b, v, "mma",
                                                         lambda q, m, n, k, c=config: c if n == 768 else None)
                cands.append(ModelCandidate(model, b, f"{variant_label(v)}-{config}", v))
    return cands, []


def round24(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Tiles per kernel where round 23 came within 4% of torch. fp16 b16: the projections (N = K = 768) on 64x96 as
    in round 23's winner but the FFN output (K = 3072) on 128x96 (bench/results/gemm_tensorcore.md: 0.042 against
    0.049 ms), or the projections on 128x64. fp16 b4: round 23's 64x96 without split-K, and on the projections'
    split-K partials only (the FFN output's left to the per-shape tile). fp32 b16: attention's QK^T (K read as
    [t, d]) on the SIMT tiles s64t4 and s128x64 instead of s64."""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        v = _db_variant(model, 16, "fp16")
        v["schedule"].pop("kernels", None)
        for proj in ("t64x96", "t128x64"):
            w = json.loads(json.dumps(v))
            w["schedule"]["kernels"] = _gemm_choices(
                model, 16, w, "mma", lambda q, m, n, k, p=proj: None if n != 768 else p if k == 768 else "t128x96")
            cands.append(ModelCandidate(model, 16, f"{variant_label(w)}-{proj}-t128x96", w))
        v = _db_variant(model, 4, "fp16", without=("kernels", "split_k"))
        v["schedule"]["kernels"] = _gemm_choices(model, 4, v, "mma", lambda q, m, n, k: "t64x96" if n == 768 else None)
        cands.append(ModelCandidate(model, 4, f"{variant_label(v)}-t64x96", v))
        v = _db_variant(model, 4, "fp16", without=("kernels",))
        v["schedule"]["kernels"] = _gemm_choices(model, 4, v, "mma",   # the projections' partials: K = 768 / S
                                                 lambda q, m, n, k: "t64x96" if n == 768 and k < 768 else None)
        cands.append(ModelCandidate(model, 4, f"{variant_label(v)}-proj-t64x96", v))
        v = _db_variant(model, 16, "fp32", without=("kernels",))
        for tile in ("s64t4", "s128x64"):
            w = json.loads(json.dumps(v))
            w["schedule"]["kernels"] = _gemm_choices(
                model, 16, w, "simt", lambda q, m, n, k, t=tile: t if (q, n, k) == (192, 128, 64) else None)
            cands.append(ModelCandidate(model, 16, f"{variant_label(w)}-qk-{tile}", w))
    return cands, []


def round25(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """fp32 BERT b16, 1% slower than torch after round 24: its matmuls with N = 768 (projections, FFN output; split-K
    partials included) on the SIMT schedule's 96-column tiles (simt_gemm.CONFIGS s128x96, s64x96: a grid of
    whole waves where the 64x64 tile's 384 blocks and the 8x8 tiles' 192 leave SMs idle), with the database's
    split-K and without it."""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        for split in (True, False):
            v = _db_variant(model, 16, "fp32", without=("kernels",) if split else ("kernels", "split_k"))
            for tile in ("s128x96", "s64x96"):
                w = json.loads(json.dumps(v))
                w["schedule"]["kernels"] = _gemm_choices(model, 16, w, "simt",
                                                         lambda q, m, n, k, t=tile: t if n == 768 else None)
                cands.append(ModelCandidate(model, 16, f"{variant_label(w)}-{tile}", w))
    return cands, []


def round26(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """SimtMatmul now spreads a thread's columns of a B[N, K] operand across threads (sub-tiles of one column:
    neighbouring threads read neighbouring rows of B in shared memory, where 4 consecutive rows a thread put a
    warp's loads in 2 of the 32 banks). The one such kernel in the zoo is fp32 BERT's attention QK^T, so every fp32
    BERT figure before this round measured another kernel (kernel_quality.KERNELS_CHANGED): the database's fp32
    variants at b1, b2, b4, b8 and b16 again, b16's without its per-kernel QK^T tile, and TVM's default at b1 and b16
    (the tables' baseline). (The database merges every batch's per-kernel choices into each; keyed by shape, b16's
    match no kernel at b1-b8, which are built without.)"""
    cands = []
    for model in (m for m in models if m == "bert_base"):
        for b in (1, 2, 4, 8, 16):
            if b in (1, 16):
                cands.append(ModelCandidate(model, b, "fp32", _variant("direct")))
            for without in ((("kernels",),) if b < 16 else ((), ("kernels",))):
                v = _db_variant(model, b, "fp32", without=without)
                cands.append(ModelCandidate(model, b, variant_label(v), v))
    return cands, []


def round28(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The cells within 4% of torch after round 27: reduced ResNet-18 b8 (1.009; three candidates measured so
    far), reduced BERT b4 (1.037) and b16 (1.016), fp32 BERT b16 (1.002). ResNet-18 b8 fp16: the database's
    variant with split-K aimed at 128 and 512 blocks (256 now), and with every matmul on the first, second and
    third tile `tensorcore.configs_for` offers its shape (its rows: batch x M for split partials). BERT: the FFN's
    first matmul (N = 3072, the one left to the per-shape tile) on the tiles configs_for offers it in fp16 at b4
    and b16, and on the SIMT tiles s64x96, s128x96 and s128x64 in fp32 at b16."""
    from workbench.models import tensorcore
    cands = []
    if "resnet18" in models:
        for split in (128, 512):
            v = _db_variant("resnet18", 8, "fp16")
            v["schedule"]["split_k"] = split
            cands.append(ModelCandidate("resnet18", 8, variant_label(v), v))
        for i in range(3):
            v = _db_variant("resnet18", 8, "fp16")
            v["schedule"]["kernels"] = _gemm_choices(
                "resnet18", 8, v, "mma", lambda q, m, n, k, i=i: (tensorcore.configs_for((q or 1) * m, n, k)
                                                                   + [None] * 3)[i])
            cands.append(ModelCandidate("resnet18", 8, f"{variant_label(v)}-c{i}", v))
    if "bert_base" in models:
        ffn1 = [(b, "fp16", "mma", tile) for b in (4, 16) for tile in tensorcore.configs_for(b * 128, 3072, 768)]
        for b, precision, rule, tile in ffn1 + [(16, "fp32", "simt", t) for t in ("s64x96", "s128x96", "s128x64")]:
            v = _db_with_choices("bert_base", b, precision, rule, lambda q, m, n, k, t=tile: t if n == 3072 else None)
            cands.append(ModelCandidate("bert_base", b, f"{variant_label(v)}-ffn1-{tile}", v))
    return cands, []


def _db_with_choices(model: str, b: int, precision: str, rule: str, pick) -> dict:
    """The tuning database's variant with the per-kernel choices of `pick` (see _gemm_choices) added to its own."""
    v = _db_variant(model, b, precision)
    v["schedule"]["kernels"] = {**(v["schedule"].get("kernels") or {}), **_gemm_choices(model, b, v, rule, pick)}
    return v


REMEASURE_WITHIN = 1.15      # round 27: the candidates within 15% of their cell's fastest ...
REMEASURE_PER_CELL = 5       # ... at most this many per (model, batch, precision)


def leaders(results: dict, models: list[str], per_cell: int = REMEASURE_PER_CELL, rank=None,
            before: int | None = None) -> list[ModelCandidate]:
    """Per (model, batch, precision) the eligible candidates of `results` (as judged before round `before`) within
    REMEASURE_WITHIN of the fastest by `rank` (ms; default kernel_quality.served_ms), at most per_cell, fastest
    first; relax CUDA-graph variants are never captured from outside."""
    from bench.kernel_quality import eligible, served_ms
    rank = rank or served_ms
    cells: dict = {}
    for r in results["models"]:
        if r["model"] in models and eligible(r, before)[0] and not r["variant"].get("cuda_graph"):
            cells.setdefault((r["model"], r["batch"], r["variant"]["precision"]), []).append(r)
    cands = []
    for key in sorted(cells):
        rs = sorted(cells[key], key=rank)
        top = rank(rs[0])
        for r in [r for r in rs if rank(r) <= top * REMEASURE_WITHIN][:per_cell]:
            cands.append(ModelCandidate(r["model"], r["batch"], r["label"], r["variant"]))
    return cands


def round27(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The graphs timed again, queued (kernel_quality.time_queued): rounds before timed each replay on an idle GPU,
    the host's launch of the graph inside the interval, and so every graph figure they left (kernel_quality.
    graph_figure). Every cell's `leaders` as those rounds served them, their binaries reused from the round that
    measured them (`reuse_builds`), with torch again."""
    def old_served(r: dict) -> float:                  # as rounds 1-26 served them: any graph figure ranks
        return (r.get("graph") or {}).get("p50_ms") or r["tvm"]["p50_ms"]
    return leaders(results, models, rank=old_served), []


def reuse_builds(cands: list[ModelCandidate], results: dict, out: Path, search: Path) -> int:
    """Copy into `out` the binaries (models/<id>.so and .json) of candidates already built in the bundle directories
    under `search` (.gpu/kq*), from the round that measured them (`results`), so build_model does not compile them
    again: the very code those rounds measured. Returns how many were copied."""
    measured = {r["id"]: r.get("round") for r in results["models"]}
    dirs = {}
    for m in sorted(search.glob("*/manifest.json")):
        try:
            man = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if man.get("format") == "workbench-kq-candidates":
            dirs.setdefault(man.get("round"), []).append(m.parent)
    copied = 0
    for c in cands:
        dst = out / "models" / f"{c.id}.json"
        if dst.is_file():
            continue
        for d in dirs.get(measured.get(c.id), []):
            src = d / "models" / f"{c.id}.json"
            if src.is_file() and (d / "models" / f"{c.id}.so").is_file() and \
                    json.loads(src.read_text()).get("variant") == c.variant:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(d / "models" / f"{c.id}.so", dst.with_suffix(".so"))
                shutil.copy2(src, dst)
                copied += 1
                break
    return copied


def round29(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """A split-K sum whose result goes on to a layer norm (BERT's attention-output and FFN-output projections, with
    their bias and residual adds) is now part of the layer norm's kernel (split_k.layer_norm_pass): every BERT
    variant with split-K runs other kernels (kernel_quality.KERNELS_CHANGED). BERT's three leading candidates per
    batch and precision (`leaders`, as served after round 28), built again, and TVM's default at b1 and b16 (the
    tables' baseline)."""
    if "bert_base" not in models:
        return [], []
    return [ModelCandidate("bert_base", b, "fp32", _variant("direct")) for b in (1, 16)] + \
        leaders(results, ["bert_base"], per_cell=3, before=29), []


def round30(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """InjectiveVectorize now takes the ResNets' im2col kernels that split-K's [.., S, K / S] views are fused into
    (their concatenation tests and reshaped indices simplified and made lane-uniform), which dlight's Fallback ran
    one element per thread (ResNet-18 b8 fp16: 56 of 468 us): every ResNet variant with the injective rule runs
    other kernels (kernel_quality.KERNELS_CHANGED). Their three leading candidates per batch and precision, built
    again, and TVM's default at b1 and b16 (the tables' baseline)."""
    resnets = [m for m in ("resnet18", "resnet50") if m in models]
    defaults = [ModelCandidate(m, b, "fp32", _variant("direct")) for m in resnets for b in (1, 16)]
    return defaults + leaders(results, resnets, per_cell=3, before=30), []


def round31(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """BERT b16, 0.2% (fp32) and 1-3% (fp16) slower than torch after round 29: one class of its matmuls at a time
    on another tile. fp32: the query/key/value split-K partials (K = 192 each) and the FFN output's (K = 768) on
    s64t4 or s128x64, attention's PV on s64t4 or s128x64. fp16: the FFN's first matmul on 256x128, the 768 x 768
    projections on 128x128 or 128x64 (64x96 now)."""
    if "bert_base" not in models:
        return [], []
    cands = []
    for precision, rule, name, shape, tiles in (
            ("fp32", "simt", "qkv", (4, 2048, 768, 192), ("s64t4", "s128x64")),
            ("fp32", "simt", "ffn2", (4, 2048, 768, 768), ("s128x64", "s64t4")),
            ("fp32", "simt", "pv", (192, 128, 64, 128), ("s64t4", "s128x64")),
            ("fp16", "mma", "ffn1", (None, 2048, 3072, 768), ("t256x128",)),
            ("fp16", "mma", "proj", (None, 2048, 768, 768), ("t128", "t128x64"))):
        for tile in tiles:
            v = _db_with_choices("bert_base", 16, precision, rule,
                                 lambda q, m, n, k, t=tile, w=shape: t if (q, m, n, k) == w else None)
            cands.append(ModelCandidate("bert_base", 16, f"{variant_label(v)}-{name}-{tile}", v))
    return cands, []


def round32(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Reduced ResNet-18 b1: 0.51 of torch's time after round 30 but at p99/p50 1.012, with one other candidate
    (split-K at 1024 blocks, 75% slower). Its database variant with split-K aimed at 128 and 512 blocks, and with
    the b4 and b8 winners' reductions (fp16 inputs, fitted rows, InjectiveRows), at 256 and 512."""
    if "resnet18" not in models:
        return [], []
    rows = {"reduce_inputs": "fp16", "row_reduction": 256, "rows": 8}
    cands = []
    for extra in ({"split_k": 128}, {"split_k": 512}, rows, {**rows, "split_k": 512}):
        v = _db_variant("resnet18", 1, "fp16")
        v["schedule"] = {**v["schedule"], **extra}
        cands.append(ModelCandidate("resnet18", 1, variant_label(v), v))
    return cands, []


def round33(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """BERT b16, the two cells not met but by 0.2% (fp32) and 1.6% (fp16), after round 29 moved the attention-output
    and FFN-output split-K sums into the layer norms (which now read the partials, so the split's balance moved):
    the database's variants with split-K aimed at other block counts (fp32: 1024 and 4096 against 2048, giving 2
    and 8 partials against 4; fp16: 1024 and 2048 against 512, splitting the 768-column projections in 2 and 4),
    and fp32's attention QK^T (192 x 128x128, K = 64), on the per-shape tile since round 26, on s64t4 and s128x64."""
    if "bert_base" not in models:
        return [], []
    cands = []
    for precision, targets in (("fp32", (1024, 4096)), ("fp16", (1024, 2048))):
        for target in targets:
            v = _db_variant("bert_base", 16, precision)
            v["schedule"]["split_k"] = target
            cands.append(ModelCandidate("bert_base", 16, variant_label(v), v))
    for tile in ("s64t4", "s128x64"):
        v = _db_with_choices("bert_base", 16, "fp32", "simt",
                             lambda q, m, n, k, t=tile: t if (q, m, n, k) == (192, 128, 128, 64) else None)
        cands.append(ModelCandidate("bert_base", 16, f"{variant_label(v)}-qk-{tile}", v))
    return cands, []


def _implicit_candidates(model: str, b: int, variants: bool, tiles: bool) -> list[ModelCandidate]:
    """Implicit-GEMM candidates of a reduced (model, b): with `variants`, the database's variant as it was before
    implicit GEMM (side by side in the same run), with implicit GEMM (label suffix -ig; split-K's convs keep their
    im2col) and with implicit GEMM without split-K (every 3x3 conv implicit); with `tiles`, the implicit-GEMM
    variant alone and with the implicit convs on the first, second and third tile `tensorcore.configs_for` offers
    their shape (-c0..-c2: the rows a block gathers)."""
    from workbench.models import tensorcore
    base = _db_variant(model, b, "fp16", without=("implicit_gemm", "kernels"))   # (the database after it has)
    ig = {**base, "schedule": {**base["schedule"], "implicit_gemm": True}}
    no_sk = {**ig, "schedule": {k: v for k, v in ig["schedule"].items() if k != "split_k"}}
    cands = [ModelCandidate(model, b, variant_label(v), v) for v in ((base, ig, no_sk) if variants else (ig,))]
    for i in range(3) if tiles else ():
        v = json.loads(json.dumps(ig))
        v["schedule"]["kernels"] = {**(v["schedule"].get("kernels") or {}), **_gemm_choices(
            model, b, v, "mma", lambda q, m, n, k, i=i: (tensorcore.configs_for(m, n, k) + [None] * 3)[i],
            only="fused_implicit_conv")}
        cands.append(ModelCandidate(model, b, f"{variant_label(v)}-c{i}", v))
    return cands


def round34(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Implicit GEMM (schedule.implicit_gemm, workbench/models/implicit_gemm.py): the 3x3 convs (cin % 8 == 0) as
    one kernel whose copy of A computes the pad and im2col (16-byte cp.async, the padding as predicate) instead of
    an im2col kernel writing 9x the activation (ResNet-18 b16 fp16: ~170 us of 0.78 ms, 1.20x torch). Reduced
    ResNet-18 b16 and b8 and ResNet-50 b16 (`_implicit_candidates`' variants), ResNet-18 b16 with its tiles."""
    cells = (("resnet18", 16, True), ("resnet18", 8, False), ("resnet50", 16, False))
    return [c for model, b, tiles in cells if model in models
            for c in _implicit_candidates(model, b, True, tiles)], []


def round35(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Round 34's implicit GEMM (which won all three of its cells) at the reduced ResNets' other batch sizes
    (ResNet-18 b1, b2, b4; ResNet-50 b1, b2, b4, b8: `_implicit_candidates`' variants), and the tiles of round 34's
    ResNet-18 b16 at ResNet-18 b8 and ResNet-50 b16, beside their implicit-GEMM winners again."""
    cells = [(m, b, True, False) for m, sizes in (("resnet18", (1, 2, 4)), ("resnet50", (1, 2, 4, 8))) for b in sizes]
    cells += [("resnet18", 8, False, True), ("resnet50", 16, False, True)]
    return [c for model, b, variants, tiles in cells if model in models
            for c in _implicit_candidates(model, b, variants, tiles)], []


def round36(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Fused projections (tuning.Variant projections "fused", workbench/models/projections.py): BERT's Q, K and V
    as one 768 x 2304 matmul whose result the attention einsums read in place. At b16 the three 768-wide
    projections ran at 165 TFLOP/s in fp16 (the 3072-wide FFN matmul at 228) and were split along K with a summing
    kernel each in fp32; the two BERT b16 cells were the last ones not met (fp32 1.00x, fp16 1.02x). Every BERT
    batch size in both numerics (one artifact's batch sizes share a weights layout): the database's variant and
    the same with fused projections, side by side (the database's variant as before this round's picks: separate
    projections and no tile for the fused matmul); at b16 and b8 also the fused matmul on three tiles its rule
    does not pick by itself (-c0..-c2), and at fp32 b16 fused with split-K aimed at 1024 blocks instead of 2048."""
    if "bert_base" not in models:
        return [], []
    tiles = {"fp32": ("simt", ("s64t4", "s128x64", "s128x96")), "fp16": ("mma", ("t128w8", "t128x64", "t128x96"))}
    cands = []
    sizes = (1, 2, 4, 8, 16)
    for precision, (rule, offered) in tiles.items():
        bases = {b: _db_variant("bert_base", b, precision, without=("projections",)) for b in sizes}
        picked = {k for b in sizes for k in _gemm_choices("bert_base", b, {**bases[b], "projections": "fused"}, rule,
                                                          _fused_matmul("any"))}    # (tiles of the fused matmul)
        for b in sizes:
            base = bases[b]
            kernels = {k: c for k, c in (base["schedule"].get("kernels") or {}).items() if k not in picked}
            base["schedule"] = {k: x for k, x in base["schedule"].items() if k != "kernels"}
            base["schedule"].update({"kernels": kernels} if kernels else {})
            fused = {**base, "projections": "fused"}
            cands += [ModelCandidate("bert_base", b, variant_label(v), v) for v in (base, fused)]
            for i, tile in enumerate(offered if b >= 8 else ()):
                v = json.loads(json.dumps(fused))
                v["schedule"]["kernels"] = {**(v["schedule"].get("kernels") or {}),
                                            **_gemm_choices("bert_base", b, v, rule, _fused_matmul(tile))}
                cands.append(ModelCandidate("bert_base", b, f"{variant_label(v)}-c{i}", v))
            if precision == "fp32" and b == 16:
                v = json.loads(json.dumps(fused))
                v["schedule"]["split_k"] = 1024
                cands.append(ModelCandidate("bert_base", b, variant_label(v), v))
    return cands, []


def _fused_matmul(tile: str):
    """A `_gemm_choices` pick: `tile` for BERT's fused projections (N = 3 x 768, unbatched), else the rule's."""
    return lambda q, m, n, k: tile if q is None and n == 3 * 768 else None


# the batch sizes 1..16 that rounds 1-36 left unmeasured (they measured 1, 2, 4, 8 and 16)
BETWEEN = (3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15)


def round37(models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Every batch size in 1..16 no earlier round measured (BETWEEN): the tuning database's variant as `workbench
    compile --batch-sizes` builds it there (the nearest measured batch's winner, tuning.plan), fp32 and fp16,
    every model; `run` times torch at the same batch sizes. With b1, b2, b4, b8 and b16 the goal check then
    covers every batch size of the issue's 1..16, each compiled for itself (the worker otherwise pads a batch
    to the next compiled size)."""
    return [ModelCandidate(model, b, variant_label(v), v) for model in models for precision in ("fp32", "fp16")
            for b in BETWEEN if (v := _db_variant(model, b, precision)) is not None], []


def _cells(results: dict, models: list[str], keep) -> list[tuple[str, int, dict]]:
    """(model, batch, the winner's result row) of every cell of `results` (a pick's output) whose goal row `keep`
    takes, for the models asked for."""
    rows = {r["id"]: r for r in results["models"]}
    return sorted(((g["model"], g["batch"], rows[g["tvm_id"]]) for g in results["picked"]["goal"]
                   if g["model"] in models and keep(g)), key=lambda c: (*c[:2], c[2]["id"]))


def _unmet(results: dict, models: list[str]) -> list[tuple[str, int, dict]]:
    """The cells whose goal is not met as the CUDA worker runs them (graph_meets_goal false)."""
    return _cells(results, models, lambda g: not g.get("graph_meets_goal"))


def round38(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The cells of `results` (a pick's output) not met as the CUDA worker runs them (goal graph_meets_goal false),
    measured again: the winner (the same candidate: its new figure replaces the old) and, where they differ from
    it, the database's variants of the measured powers of two on either side of the batch size, at that batch
    size. Round 37 left five: four by p99/p50 alone (1.013-1.014 against 1.01, from ~1.4 s of replays each)."""
    cands = []
    for model, b, won in _unmet(results, models):
        cands.append(ModelCandidate(model, b, won["label"], won["variant"]))
        lo, hi = 1 << (b.bit_length() - 1), 1 << (b - 1).bit_length()
        for n in sorted({lo, hi} - {b}):
            v = _db_variant(model, n, won["variant"]["precision"])
            if v is not None and v != won["variant"] and variant_label(v) not in [
                    c.label for c in cands if (c.model, c.batch) == (model, b)]:
                cands.append(ModelCandidate(model, b, variant_label(v), v))
    return cands, []


SPLIT_K_TARGETS = (256, 512, 1024, 2048, 4096, None)     # schedule.split_k: the block counts split-K aims at


def round39(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The cells of `results` not met as the CUDA worker runs them (after round 38: BERT b11 fp32 1.8% slower than
    torch; ResNet-18 b7 and b14 fp32, ResNet-50 b14 fp32 and BERT b15 fp16 by p99/p50 alone, 1.011-1.016 in both
    rounds, where torch's graphs keep 1.002-1.006): the winner's variant with split-K aimed at each other target
    of SPLIT_K_TARGETS (None: off). Split-K decides which matmuls run as partial matmuls plus a summing kernel, and
    so every such kernel's grid: its waves on the 132 SMs, and their tails."""
    cands = []
    for model, b, row in _unmet(results, models):
        won = row["variant"]
        for target in SPLIT_K_TARGETS:
            if target == won["schedule"].get("split_k"):
                continue
            v = json.loads(json.dumps(won))
            v["schedule"] = {k: x for k, x in v["schedule"].items() if k != "split_k"}
            v["schedule"].update({"split_k": target} if target else {})
            cands.append(ModelCandidate(model, b, variant_label(v), v))
    return cands, []


ROUNDS = {1: round1, 3: round3, 4: round4, 5: round5, 6: round6, 7: round7, 8: round8, 9: round9, 10: round10,
          11: round11, 12: round12, 13: round13, 14: round14, 15: round15, 16: round16, 17: round17,
          18: round18, 19: round19, 20: round20,
          21: round21, 22: round22,
          23: round23, 24: round24, 25: round25,
          26: round26, 28: round28, 31: round31, 32: round32, 33: round33, 34: round34, 35: round35,
          36: round36, 37: round37}


def round2(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """Whole models composed from the round-1 kernel winners (bench/results/kernel_quality.json from `pick`):
    per (model, lowering, batch) measured by the kernel search, the per-kernel choices on top of (a) TVM's
    default rules and (b) the best global settings round 1 measured for that model/lowering/batch."""
    winners = results["picked"]["kernel_winners"]
    rows = [r for r in results["models"] if "tvm" in r and (r.get("numerics") or {}).get("pass")
            and not r["variant"].get("cuda_graph")]
    cands: list[ModelCandidate] = []
    for job in sorted({w["job"] for w in winners.values()}):
        name, _, b = job.rpartition("_b")
        model, lowering = (name[:-len("-matmul")], "matmul") if name.endswith("-matmul") else (name, "direct")
        if model not in models:
            continue
        kmap = {k: w["choice"] for k, w in winners.items() if w["job"] == job}
        base = {"lowering": lowering, "precision": "fp32", "cuda_graph": False, "schedule": {"kernels": kmap}}
        cands.append(ModelCandidate(model, int(b), "fp32-k", base))
        same = [r for r in rows if r["model"] == model and r["batch"] == int(b) and r["variant"]["precision"] ==
                "fp32" and r["variant"]["lowering"] == lowering]
        if same:
            best = min(same, key=lambda r: r["tvm"]["p50_ms"])
            sched = {k: v for k, v in best["variant"]["schedule"].items() if k != "kernels"}
            if sched:
                cands.append(ModelCandidate(model, int(b), "fp32-k-" + best["label"].split("-", 1)[-1],
                                            {**base, "schedule": {**sched, "kernels": kmap}}))
    return cands, []


def round40(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The cells of `results` still unmet after round 39 (BERT b11 fp32, 1.8% slower than a torch whose b11 runs
    8% faster per sample than its b10 and b12; BERT b15 fp16 by p99/p50 alone, 1.014): the winner's variant with
    one class of its GEMM kernels (one shape) at a time on each tile its rule offers besides the one it picks
    itself (SIMT: the five named tiles; mma: `tensorcore.configs_for` the shape), labelled -<shape>-<tile>."""
    from workbench.models import schedules, simt_gemm, tensorcore, tuning
    cands = []
    for model, b, row in _unmet(results, models):
        won = row["variant"]
        v = tuning.Variant.from_json(won)
        rule, dtype = ("mma", "float16") if v.precision == "fp16" else ("simt", "float32")
        shapes = set()
        for k in schedules.kernels(schedules.fuse_variant(_source(model, v).make_module(b), _target(), v), _target()):
            try:
                shapes.add(tensorcore.batched_gemm_shape(k.func, dtype)[:4])
            except Exception:  # noqa: BLE001 - not a GEMM this rule folds
                continue
        for q, m, n, kk in sorted(shapes, key=lambda s: (s[0] or 0, s[1:])):
            if rule == "simt":
                own, offered = simt_gemm.choose_config(q, m, n, kk), list(simt_gemm.CONFIGS)
            else:
                own = tensorcore.choose_config(m, n, kk) if q is None else tensorcore.choose_batched_config(q, m, n, kk)
                offered = tensorcore.configs_for(m, n, kk) if q is None else ["t64", "t128x64", "t128"]
            tag = f"{f'q{q}' if q else ''}m{m}n{n}k{kk}"
            for tile in [t for t in offered if t != own]:
                t_v = json.loads(json.dumps(won))
                t_v["schedule"]["kernels"] = {**(won["schedule"].get("kernels") or {}), **_gemm_choices(
                    model, b, won, rule, lambda q2, m2, n2, k2, t=tile, w=(q, m, n, kk): t if (q2, m2, n2, k2) == w
                    else None)}
                cands.append(ModelCandidate(model, b, f"{variant_label(t_v)}-{tag}-{tile}", t_v))
    return cands, []


# rounds built from a pick's results (--from)
CLOSE_MARGIN = 0.99    # a cell met with a graph ratio above this is within the drift of torch between runs


def round41(results: dict, models: list[str]) -> tuple[list[ModelCandidate], list[tuple[str, str, int]]]:
    """The cells of `results` (a pick's output) met by less than 1% as the CUDA worker runs them (graph ratio above
    CLOSE_MARGIN), measured again beside torch: their winner, whose new figure replaces the old. After round 40 two:
    BERT b11 fp32 (0.999; rounds 37-40 measured TVM 6.520-6.641 ms, torch 6.499-6.525) and BERT b5 reduced
    (0.995)."""
    close = _cells(results, models, lambda g: g.get("graph_meets_goal") and g["graph_ratio"] > CLOSE_MARGIN)
    return [ModelCandidate(m, b, r["label"], r["variant"]) for m, b, r in close], []


FROM_RESULTS = {2: round2, 27: round27, 29: round29, 30: round30, 38: round38, 39: round39, 40: round40,
                41: round41}


# ---------------------------------------------------------------------------------------------------------

def _target():
    from workbench.models.compiler import make_target
    return make_target("cuda", ARCH)


def _source(model: str, v):
    """The zoo model as variant `v` (tuning.Variant) compiles it: its lowering and projections."""
    from workbench.models import zoo
    from workbench.models.compiler import with_projections
    src = zoo.get(model, seed=WEIGHT_SEED, conv=v.lowering if v.lowering != "direct" else None)
    return with_projections(src, v.projections)


def _sig(func) -> list[list]:
    from workbench.models.compiler import _tensor_sig, _ty
    return [[list(s), d] for s, d in (_tensor_sig(_ty(p)) for p in func.params)]


def build_model(c: ModelCandidate, out: Path, force: bool) -> dict | None:
    meta_path = out / "models" / f"{c.id}.json"
    if meta_path.is_file() and not force:
        return json.loads(meta_path.read_text())
    from tvm import relax
    from workbench.models import projections, schedules, zoo
    from workbench.models.compiler import build_relax, cuda_kernels, cuda_sources, lower, main_function
    from workbench.models.tensorcore import cp_async_hazards
    from workbench.models.tuning import Variant
    v = Variant.from_json(c.variant)
    if v.precision == "fp16" and not schedules.tensorize_supported():
        print(f"  skip {c.id}: fp16 needs apache-tvm-ffi<0.1.15 (see schedules.check_tensorize_support)")
        return None
    tgt = _target()
    src = _source(c.model, v)
    t0 = time.perf_counter()
    mod = src.make_module(c.batch)
    fname, func = main_function(mod)
    applied: dict = {}
    low = lower(mod, tgt, v, applied)
    ex = build_relax(low, tgt)
    so = out / "models" / f"{c.id}.so"
    so.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(so))
    secs = time.perf_counter() - t0
    sources = cuda_sources(ex)
    meta = {"id": c.id, "model": c.model, "name": src.name, "batch": c.batch, "label": c.label,
            "variant": c.variant, "so": f"models/{so.name}", "function": fname,
            "cuda_source_sha256": [hashlib.sha256(s.encode()).hexdigest() for s in sources],
            "kernels": sum(s.count("extern \"C\" __global__") for s in sources),
            "tensor_core": any("wmma::mma_sync" in s or "mma.sync" in s for s in sources),
            "mma_sync_kernels": sum("mma.sync" in body for s in sources for body in cuda_kernels(s).values()),
            "uses_cp_async": any("cp.async" in s for s in sources),
            # kernels that wait on uncommitted cp.async copies (a race: tensorcore.cp_async_hazards); must be []
            "cp_async_hazard_kernels": [h for s in sources for h in cp_async_hazards(s)],
            # kernels that only cast an intermediate (not an input or weight): what fp16 activations remove
            "activation_cast_kernels": activation_casts(sources, [p.name for p in func.params]),
            "signature": _sig(low[fname]), "num_inputs": len(src.inputs), "compile_s": round(secs, 2),
            "so_bytes": so.stat().st_size,
            "weights": weights_record(src, low[fname], v, c.batch, tgt)}
    if v.projections == "fused":          # what kernel_quality needs to lay the zoo's weights out (no TVM there)
        meta["projections"] = [dataclasses.asdict(g) for g in projections.find_groups(
            zoo.get(c.model, conv=c.lowering if c.lowering != "direct" else None).make_module(1)["main"])]
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def weight_only_calls(func, num_inputs: int) -> int:
    """Calls, in a relax function after fusion (call_tir) or lowered (a PrimFunc called with its output last), of
    kernels whose every tensor input is a weight (a parameter after the inputs): work on weights alone, redone
    every inference (ToMixedPrecision's fp32->fp16 weight casts)."""
    from tvm import relax
    weights = set(list(func.params)[num_inputs:])
    n = 0
    for block in func.body.blocks:
        for binding in block.bindings:
            v = binding.value
            if not isinstance(v, relax.Call):
                continue
            if getattr(v.op, "name", None) == "relax.call_tir":
                ins = list(v.args[1].fields) if isinstance(v.args[1], relax.Tuple) else [v.args[1]]
            elif isinstance(v.op, relax.GlobalVar):
                ins = list(v.args[:-1])
            else:
                continue
            ins = [a for a in ins if isinstance(a, relax.Var)]
            n += bool(ins) and all(a in weights for a in ins)
    return n


def weights_record(src, lowered_main, v, batch: int, tgt) -> dict:
    """The candidate's weights: dtypes, bytes (and the source's), and weight-only kernel calls in the lowered
    model, after fusion, and after fusion of the same variant with fp32 weights (the `before` of fp16 weights)."""
    from workbench.models import schedules
    from workbench.models.compiler import _tensor_sig, _ty
    n_in = len(src.inputs)
    sigs = [_tensor_sig(_ty(p)) for p in list(lowered_main.params)[n_in:]]
    nbytes = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in sigs)
    source_bytes = sum(int(a.nbytes) for _, a in src.weights())
    dtypes: dict[str, int] = {}
    for _, d in sigs:
        dtypes[d] = dtypes.get(d, 0) + 1
    mod = src.make_module(batch)
    fused = {w: weight_only_calls(schedules.fuse_variant(mod, tgt, v, w)["main"], n_in)
             for w in sorted({v.weights, "fp32"})} if v.precision == "fp16" else {}
    return {"setting": v.weights, "dtypes": dtypes, "bytes": int(nbytes), "source_bytes": int(source_bytes),
            "weight_cast_kernels": {"lowered": weight_only_calls(lowered_main, n_in),
                                    "fused": fused.get(v.weights), "fused_fp32_weights": fused.get("fp32")}}


def activation_casts(sources: list[str], param_names: list[str]) -> list[str]:
    """Kernels of the CUDA sources that are a lone cast (TVM names them cast<N>_kernel) of an intermediate tensor,
    not of one of the function's parameters `param_names` (inputs, weights): TVM names a kernel's pointer
    parameters after the relax variables passed to it, "." and other non-word characters made "_")."""
    import re
    from workbench.models.compiler import cuda_kernels
    params = {re.sub(r"\W", "_", n) + "_ptr" for n in param_names}
    out = []
    for s in sources:
        for name, body in cuda_kernels(s).items():
            m = re.search(r"\b" + re.escape(name) + r"\(([^)]*)\)", body)
            if re.fullmatch(r"cast\d*_kernel", name) and m and \
                    not any(p.split()[-1] in params for p in m.group(1).split(",")):
                out.append(name)
    return sorted(out)


def build_kernel_job(model: str, lowering: str, b: int, out: Path, force: bool, seen: set[str]) -> dict:
    """All measurable kernels of one model variant and batch, scheduled with every applicable choice."""
    job = f"{model}{'-matmul' if lowering == 'matmul' else ''}_b{b}"
    meta_path = out / "kernels" / f"{job}.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        seen.update(k["key"] for k in meta["kernels"])
        return meta
    import tvm
    from workbench.models import schedules, zoo
    from workbench.models.tensorcore import PASS_CONFIG
    tgt = _target()
    src = zoo.get(model, seed=WEIGHT_SEED, conv=lowering if lowering != "direct" else None)
    t0 = time.perf_counter()
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    fused = schedules.fuse(src.make_module(b), tgt)
    kernels = schedules.kernels(fused, tgt)
    entries, funcs, modules = [], {}, []

    def flush():
        if not funcs:
            return
        n = len(modules)
        so = out / "kernels" / f"{job}_{n}.so"
        with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
            ex = tvm.compile(tvm.IRModule(dict(funcs)), target=tgt)
        ex.export_library(str(so))
        from workbench.models.compiler import cuda_sources
        srcs = cuda_sources(ex)
        modules.append({"so": f"kernels/{so.name}", "functions": sorted(funcs),
                        "cuda_source_sha256": [hashlib.sha256(s.encode()).hexdigest() for s in srcs]})
        funcs.clear()

    for k in kernels:
        if k.key in seen:
            continue
        if k.default_rule == "matmul":
            choices = [{"rule": "matmul", "config": dict(cfg), "label": lab} for lab, cfg in MATMUL_CONFIGS.items()]
        elif k.default_rule == "general_reduction":
            choices = [{"rule": "default", "label": "default"}] + [
                {"rule": "small_reduction", "threads": t, "label": f"sr{t}"} for t in SMALL_REDUCTION_THREADS]
        else:
            continue
        scheduled = schedules.candidate_schedules(k, tgt, [{kk: vv for kk, vv in c.items() if kk != "label"}
                                                          for c in choices])
        if k.default_rule == "general_reduction" and all(s is None for s in scheduled[1:]):
            continue                          # a long reduction (softmax, layernorm): not a SmallReduction kernel
        seen.add(k.key)
        rec = k.describe()
        rec["choices"] = []
        if len(funcs) + len(choices) > KERNELS_PER_MODULE:
            flush()
        for c, f in zip(choices, scheduled):
            sym = None
            if f is not None:
                sym = f"k{k.key}_{c['label']}"
                funcs[sym] = f.with_attr("global_symbol", sym)
            rec["choices"].append({**c, "symbol": sym, "module": len(modules)})
        entries.append(rec)
    flush()
    meta = {"job": job, "model": model, "lowering": lowering, "batch": b, "kernels": entries, "modules": modules,
            "all_kernels": [k.describe() for k in kernels], "build_s": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta) + "\n")
    return meta


def build_refs(model: str, out: Path, force: bool) -> dict:
    """16 inputs, the NumPy reference outputs, and what regenerates the weights (seed, shapes, scales)."""
    from workbench.models import zoo
    from workbench.models.reference import reference_forward
    path = out / "refs" / f"{model}.npz"
    meta_path = out / "refs" / f"{model}.json"
    if meta_path.is_file() and path.is_file() and not force:
        return json.loads(meta_path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    src = zoo.get(model, seed=WEIGHT_SEED)
    canonical = zoo.canonical_shapes(model)
    entry = zoo._ZOO[model]
    weights = src.weights()
    h = hashlib.sha256()
    for _, w in weights:
        h.update(np.ascontiguousarray(w).tobytes())
    from bench.kernel_quality import reference_inputs
    spec = src.inputs[0]
    high = zoo.TRANSFORMER_CONFIGS[model].vocab if model in zoo.TRANSFORMER_CONFIGS else None
    x = reference_inputs(spec.to_json(), REF_SAMPLES, REF_SEED, high)
    t0 = time.perf_counter()
    y = np.concatenate([reference_forward(model, [x[i:i + 4]], weights) for i in range(0, REF_SAMPLES, 4)])
    np.savez(path, y=y)                   # the inputs are regenerated from the seed (random floats do not compress)
    lowered = {}
    if "matmul" in entry.lowerings:
        lowered["matmul"] = [[n, list(w.shape)] for n, w in zoo.get(model, seed=WEIGHT_SEED, conv="matmul").weights()]
    meta = {"model": model, "seed": WEIGHT_SEED, "weights_sha256": h.hexdigest(),
            "canonical": [[n, list(s), float(entry.scale(n))] for n, s in canonical.items()],
            "lowered": lowered, "ref": f"refs/{path.name}", "input": spec.to_json(), "samples": REF_SAMPLES,
            "input_seed": REF_SEED, "input_high": high, "x_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
            "ref_seconds": round(time.perf_counter() - t0, 1), "ref_abs_max": float(np.abs(y).max())}
    meta_path.write_text(json.dumps(meta) + "\n")
    return meta


def pack(out: Path, bundle: Path) -> Path:
    bundle.parent.mkdir(parents=True, exist_ok=True)
    tmp = bundle.with_name(f".{bundle.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w:xz", preset=6) as tar:
        for p in sorted(out.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(out)))
    os.replace(tmp, bundle)
    return bundle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.build_kernel_candidates", description=__doc__.split("\n")[0])
    p.add_argument("--round", type=int, default=1, choices=sorted([*FROM_RESULTS, *ROUNDS]))
    p.add_argument("--from", dest="from_results", default=str(ROOT / "bench" / "results" / "kernel_quality.json"),
                   help="rounds 2 and 27: the `bench.kernel_quality pick` output (kernel winners; candidates)")
    p.add_argument("--models", default="resnet50,mobilenet_v2,bert_base,resnet18")
    p.add_argument("--out", default=str(ROOT / ".gpu" / "kq"))
    p.add_argument("--bundle", default=str(ROOT / ".gpu" / "kq.tar.xz"))
    p.add_argument("--no-kernels", action="store_true", help="whole-model candidates and references only")
    p.add_argument("--no-models", action="store_true", help="kernel candidates and references only")
    p.add_argument("--force", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the candidates and exit")
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    out = Path(a.out)
    if a.round in FROM_RESULTS:
        results = json.loads(Path(a.from_results).read_text())
        cands, jobs = FROM_RESULTS[a.round](results, models)
        if a.round == 27 and not a.dry_run:
            print(f"reused {reuse_builds(cands, results, out, ROOT / '.gpu')} of {len(cands)} builds", flush=True)
    else:
        cands, jobs = ROUNDS[a.round](models)
    if a.dry_run:
        for c in cands:
            print(c.id, json.dumps(c.variant))
        for j in jobs:
            print("kernels", j)
        return 0
    from workbench.models import schedules
    import tvm_ffi
    print(f"tvm-ffi {tvm_ffi.__version__}; tensor cores (fp16) buildable: {schedules.tensorize_supported()}",
          flush=True)
    t_all = time.perf_counter()
    refs = {}
    for m in models:
        t0 = time.perf_counter()
        refs[m] = build_refs(m, out, a.force)
        print(f"refs {m}: {time.perf_counter() - t0:.1f} s", flush=True)
    built = []
    if not a.no_models:
        for i, c in enumerate(cands):
            t0 = time.perf_counter()
            meta = build_model(c, out, a.force)
            if meta is not None:
                built.append(meta)
                w = meta.get("weights") or {}
                wc = w.get("weight_cast_kernels") or {}
                print(f"[{i + 1}/{len(cands)}] {c.id}: {meta['kernels']} kernels, compile {meta['compile_s']} s "
                      f"({time.perf_counter() - t0:.1f} s)"
                      + (f"; weights {w['bytes'] / 1e6:.1f} MB (source {w['source_bytes'] / 1e6:.1f} MB), "
                         f"weight-cast kernel calls {wc.get('fused_fp32_weights')} with fp32 weights -> "
                         f"{wc.get('lowered')}" if w else ""), flush=True)
    kjobs = []
    if not a.no_kernels:
        seen: set[str] = set()
        for m, lw, b in jobs:
            t0 = time.perf_counter()
            meta = build_kernel_job(m, lw, b, out, a.force, seen)
            kjobs.append(meta)
            n = sum(len([c for c in k["choices"] if c["symbol"]]) for k in meta["kernels"])
            print(f"kernels {meta['job']}: {len(meta['kernels'])} kernels, {n} schedules in "
                  f"{len(meta['modules'])} modules ({time.perf_counter() - t0:.1f} s)", flush=True)
    import tvm
    manifest = {"format": "workbench-kq-candidates", "version": 1, "round": a.round, "arch": ARCH,
                "tvm_version": tvm.__version__, "tvm_ffi_version": tvm_ffi.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": refs,
                "candidates": built, "kernel_jobs": [{k: v for k, v in j.items() if k != "all_kernels"}
                                                     for j in kjobs],
                "matmul_configs": MATMUL_CONFIGS,
                # compile time of everything in the bundle (incremental runs skip what exists): the tuning cost
                "build_s": round(sum(c["compile_s"] for c in built) + sum(j["build_s"] for j in kjobs)
                                 + sum(r["ref_seconds"] for r in refs.values()), 1),
                "this_run_s": round(time.perf_counter() - t_all, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest) + "\n")
    t0 = time.perf_counter()
    bundle = pack(out, Path(a.bundle))
    print(f"wrote {bundle} ({bundle.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s; "
          f"carry=['.device-site', '{bundle.relative_to(ROOT) if bundle.is_relative_to(ROOT) else bundle}']")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
