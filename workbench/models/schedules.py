"""Kernel schedules for the CUDA pipeline, with the knobs that tuning turns.

TVM 0.27's default CUDA pipeline schedules every fused kernel with dlight rules (Matmul, GEMV, Reduction,
GeneralReduction, Fallback) using fixed parameters. This module exposes them:
- `ScheduleSpec`: what tuning chooses (JSON-able): a global override of the dlight Matmul config, the
  `SmallReduction` rule on/off with its block size, the `MmaMatmul` rule on/off, the `InjectiveVectorize` rule
  on/off with its lanes, the dtype of activations between fp16 kernels, split-K's block target, and per-kernel
  choices keyed by `kernel_key`;
- `MmaMatmul`: fp16 matmul-like kernels (what `ToMixedPrecision` gives: fp16 inputs, fp32 accumulation) on
  mma.sync tensor cores with ldmatrix and cp.async (`workbench.models.tensorcore`, a tile config per shape),
  ahead of dlight's Matmul rule, whose wmma path is 2-5x slower (bench/results/gemm_tensorcore.md). On by
  default; it declines (dlight takes the kernel) fp32 kernels, batched matmuls (attention), direct
  convolutions (use the zoo's matmul lowering), M < 16, N or K < 32, and pre-sm_80 targets. Its cp.async
  copies need `tensorcore.PASS_CONFIG` in the PassContext of the build: `compiler.build_relax` is the one place
  that builds relax modules;
- `SmallReduction`: a rule for reductions too short to share between threads (a 3x3 depthwise conv reduces
  over 9 values): one thread per output, the reduction unrolled in registers. dlight's GeneralReduction gives
  such a kernel one thread block per output (MobileNetV2 b16: 12x slower than torch);
- `InjectiveVectorize` (ScheduleSpec.injective, off by default): kernels without reduction (casts, the
  matmul lowering's im2col: pad, shifted slices, concatenation) with vectorized innermost accesses (16-byte
  loads/stores) instead of dlight Fallback's one scalar element per thread; it declines what it cannot
  vectorize whole and aligned;
- `InjectiveRows` (ScheduleSpec.rows, off by default): injective kernels InjectiveVectorize declines (the RGB
  stem's im2col gather, BERT's head transposes) as rows: one thread per innermost output element, `rows`
  positions of the next axis per thread, so index arithmetic is done once per thread, ahead of Fallback;
- `RowReduction` (ScheduleSpec.row_reduction, off by default): dlight GeneralReduction's schedule (softmax,
  layer norm) with threads per row fitted to the row (one warp for a 128-long softmax row, not 256 threads);
- `SimtMatmul` (ScheduleSpec.simt, off by default; workbench/models/simt_gemm.py): fp32 matmul-like kernels on
  a register-tiled SIMT schedule with cp.async double buffering, ahead of dlight's Matmul (strict fp32: no
  tensor cores);
- split-K (ScheduleSpec.split_k, off by default; workbench/models/split_k.py, run in `fusion_passes`): matmuls
  whose output gives fewer thread blocks than the setting, computed as partial matmuls over slices of K and
  summed by a kernel that takes their epilogue (`split_k.sum_rule`: one thread per output);
- implicit GEMM (ScheduleSpec.implicit_gemm, off by default; workbench/models/implicit_gemm.py, run in
  `fusion_passes`): the matmul lowering's kxk convs (cin % 8 == 0, fp16) as one kernel whose A copy computes the
  pad and im2col (16-byte cp.async with the padding as predicate) instead of an im2col kernel and buffer;
- `kernel_key(func)`: a stable id of an unscheduled kernel (structural hash of its TIR, which includes the
  shapes), so a choice measured for one kernel applies wherever the same kernel appears;
- `relax_pipeline(target, spec, precision)`: the default CUDA pipeline with `ApplyTunedSchedule` in place of
  dlight's ApplyDefaultSchedule, optionally after `ToMixedPrecision` (fp16 inputs to matmul/conv, fp32
  accumulation and outputs: the analogue of torch's fp16 autocast);
- `keep_fp16_activations` (ScheduleSpec.activations = "fp16", run by relax_pipeline): after ToMixedPrecision,
  every activation rounded to fp16 where it is produced, so kernels hand each other fp16 instead of fp32
  (accumulation stays fp32; the function's outputs keep their dtype); with ScheduleSpec.reduce_inputs "fp16"
  the fp32 reductions (softmax, layer norm, average pool) read fp16 too and widen it in their own kernel;
- `keep_fp16_weights` (tuning.Variant.weights = "fp16", run by compiler.lower after mixed precision): the
  function's float32 weight parameters become float16, so the artifact stores them in fp16 and no kernel casts
  a weight per run (the cast's readers take the parameter itself; fp32 readers widen it in registers);
- `candidate_schedules(func, target, choices)`: one scheduled PrimFunc per choice, for measuring kernels alone.

Tensor cores (fp16): dlight's Matmul rule tensorizes fp16 matmuls with M, N, K > 64 through wmma intrinsics.
`s_tir::Tensorize` deep-copies the intrinsic through tvm-ffi's JSON graph serializer, which segfaults in
apache-tvm-ffi 0.1.15.x on any object with a DataType field (0.1.14.x works; the built .so files are
bit-identical): `check_tensorize_support()` probes for it in a subprocess so a compile fails with a clear error
instead of a crash. Needs the full TVM (compiler side only).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# dlight's Matmul config for CUDA in TVM 0.27 (dl.gpu.Matmul.get_configs): a 32x64 tile, 128 threads.
MATMUL_FIELDS = ("block_size_x", "block_size_y", "vthread_x", "vthread_y", "micro_size_x", "micro_size_y",
                 "micro_size_k", "vector_size", "unroll", "use_shared", "storage_align", "inner_x")
DEFAULT_SMALL_REDUCTION_MAX = 64          # longest reduction SmallReduction takes (3x3 depthwise = 9, 5x5 = 25)
PRECISIONS = ("fp32", "fp16")
# dtype of the activations fp16 kernels hand each other (ScheduleSpec.activations): "fp32" as ToMixedPrecision
# leaves them (matmul/conv results and their elementwise epilogues in fp32), "fp16" (keep_fp16_activations)
ACTIVATIONS = ("fp32", "fp16")
# dtype in which the fp32 reductions (softmax, layer norm, average pool: WIDEN_INSIDE_OPS) read an fp16 activation
# (ScheduleSpec.reduce_inputs, with activations "fp16"): "fp32", widened by the producing kernel (FuseOps fuses the
# widening cast into it: a matmul epilogue stores fp32), or "fp16", widened inside the reduction's own kernel
REDUCE_INPUTS = ("fp32", "fp16")
# dtype the artifact stores float weights in at precision fp16 (tuning.Variant.weights): "fp32" (the source's, cast
# to fp16 by one kernel per weight per run) or "fp16" (keep_fp16_weights)
WEIGHTS = ("fp32", "fp16")
RULES = ("default", "matmul", "small_reduction", "mma", "injective", "simt")
INJECTIVE_LANES = (2, 4, 8, 16)           # elements per thread the injective rule may be given
INJECTIVE_THREADS = 256                   # threads per block of InjectiveVectorize
INJECTIVE_MAX_BYTES = 16                  # widest vector per thread: TVM 0.27 writes an fp32 x 8 constant as an
                                          # invalid 8-argument make_ulonglong4 (NVRTC: too many arguments)
# dtypes InjectiveVectorize accepts: TVM 0.27's CUDA codegen has no valid 8-lane int64 vectors (see
# tensorcore.gemm_shape), and bool/sub-byte vectors are untested
INJECTIVE_DTYPES = ("float16", "bfloat16", "float32", "int32")
INJECTIVE_ROWS = (1, 2, 4, 8, 16, 32)    # positions per thread InjectiveRows may be given
ROW_REDUCTION_THREADS = (32, 64, 128, 256, 512, 1024)   # most threads per row RowReduction may be given
MAX_SPLIT_K_BLOCKS = 1 << 16              # the largest block target ScheduleSpec.split_k may name
SPEC_FIELDS = ("matmul", "small_reduction", "kernels", "mma", "injective", "activations", "reduce_inputs", "rows",
               "row_reduction", "split_k", "simt", "implicit_gemm")


class ScheduleError(ValueError):
    """A schedule choice that cannot be used (unknown rule or field); the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------------
# What tuning chooses
# ---------------------------------------------------------------------------------------------------------

def check_matmul_config(cfg: dict | None, where: str = "matmul config") -> dict | None:
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ScheduleError(f"{where} must be an object of dlight Matmul.Config fields, got {cfg!r}")
    bad = sorted(set(cfg) - set(MATMUL_FIELDS))
    if bad:
        raise ScheduleError(f"{where}: unknown field(s) {', '.join(bad)}; valid: {', '.join(MATMUL_FIELDS)}")
    for k, v in cfg.items():
        if k in ("use_shared", "storage_align", "inner_x"):
            if not isinstance(v, bool):
                raise ScheduleError(f"{where}: {k} must be true or false, got {v!r}")
        elif not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "unroll" else 1):
            raise ScheduleError(f"{where}: {k} must be a positive integer, got {v!r}")
    return dict(cfg)


def check_choice(choice: dict, where: str = "kernel choice") -> dict:
    """A per-kernel choice: {"rule": "default"} | {"rule": "matmul", "config": {...}} |
    {"rule": "small_reduction", "threads": n} | {"rule": "mma", "config": label (tensorcore.CONFIGS; absent:
    the per-shape choice)} | {"rule": "simt", "config": label (simt_gemm.CONFIGS; absent: per shape)} |
    {"rule": "injective", "lanes": n (INJECTIVE_LANES)}."""
    if not isinstance(choice, dict) or choice.get("rule") not in RULES:
        raise ScheduleError(f"{where}: {choice!r} needs a 'rule' among {', '.join(RULES)}")
    rule = choice["rule"]
    if rule == "matmul":
        check_matmul_config(choice.get("config") or {}, f"{where} config")
    if rule in ("mma", "simt"):
        from workbench.models import simt_gemm, tensorcore
        configs = (tensorcore if rule == "mma" else simt_gemm).CONFIGS
        if choice.get("config") is not None and choice["config"] not in configs:
            raise ScheduleError(f"{where}: {rule} config {choice['config']!r} is not one of {', '.join(configs)}")
    if rule == "small_reduction":
        t = choice.get("threads")
        if not isinstance(t, int) or t < 32 or t > 1024 or t % 32:
            raise ScheduleError(f"{where}: threads must be a multiple of 32 in [32, 1024], got {t!r}")
    if rule == "injective":
        n = choice.get("lanes")
        if not isinstance(n, int) or isinstance(n, bool) or n not in INJECTIVE_LANES:
            raise ScheduleError(f"{where}: lanes must be one of {', '.join(map(str, INJECTIVE_LANES))} (elements "
                                f"per thread), got {n!r}")
    return dict(choice)


@dataclass(frozen=True)
class ScheduleSpec:
    """How to schedule a model's kernels. Empty = TVM's default dlight schedules."""
    matmul: dict | None = None                    # overrides of dlight's CUDA Matmul config, for every matmul
    small_reduction: int | None = None            # threads per block of SmallReduction (None: rule off)
    kernels: dict[str, dict] = field(default_factory=dict)   # kernel_key -> choice (check_choice)
    mma: bool = True                              # MmaMatmul first for fp16 kernels (False: dlight's wmma)
    injective: int | None = None                  # lanes per thread of InjectiveVectorize (None: rule off)
    # "fp16": kernels pass each other fp16 activations (keep_fp16_activations, run by relax_pipeline; precision
    # fp16 only). It lives here, not in tuning.Variant, because the spec is what reaches relax_pipeline: every
    # tool that builds through a spec (compiler.lower, the candidate builder) gets it without more plumbing.
    activations: str = "fp32"
    # "fp16": softmax, layer norm and average pool read their fp16 input and widen it in registers (the
    # producer stores fp16; keep_fp16_activations(reduce_inputs="fp16")); needs activations "fp16"
    reduce_inputs: str = "fp32"
    # InjectiveRows (None: off): injective kernels InjectiveVectorize declines (gathers such as the RGB stem's
    # im2col, with an innermost extent no vector divides) get one thread per innermost element and `rows`
    # positions of the next axis per thread, so each thread computes its column's index arithmetic once
    rows: int | None = None
    # RowReduction (None: off): GeneralReduction's kernels (softmax, layer norm) with threads per row fitted to
    # the row, at most `row_reduction` (32 for BERT's 128-long softmax rows instead of 256)
    row_reduction: int | None = None
    # split_k.split_k_pass (None: off): matmuls whose output gives fewer thread blocks than `split_k` are computed
    # as partial matmuls over slices of K, then summed (with their epilogue) by a second kernel
    split_k: int | None = None
    # SimtMatmul (False: off): fp32 matmuls on simt_gemm's register-tiled, cp.async-pipelined schedule, ahead of
    # dlight's Matmul (1.4-2.2x faster on our models' shapes on the H200: bench/results/gemm_simt.md)
    simt: bool = False
    # implicit_gemm.implicit_gemm_pass (False: off): the matmul lowering's kxk convs without an im2col kernel, the
    # pad and im2col computed in the mma kernel's copy of A (fp16, cin % 8 == 0; split-K's matmuls keep theirs)
    implicit_gemm: bool = False

    def __post_init__(self):
        if not isinstance(self.mma, bool):
            raise ScheduleError(f"schedule.mma must be true or false, got {self.mma!r}")
        if not isinstance(self.simt, bool):
            raise ScheduleError(f"schedule.simt must be true or false, got {self.simt!r}")
        if not isinstance(self.implicit_gemm, bool):
            raise ScheduleError(f"schedule.implicit_gemm must be true or false, got {self.implicit_gemm!r}")
        if self.implicit_gemm and self.activations != "fp16":
            raise ScheduleError(f"schedule.implicit_gemm needs activations 'fp16' (the kernel copies the conv's fp16 "
                                f"input; with fp32 activations no conv qualifies), got {self.activations!r}")
        if not isinstance(self.activations, str) or self.activations not in ACTIVATIONS:
            raise ScheduleError(f"schedule.activations must be one of {', '.join(ACTIVATIONS)} (the dtype kernels "
                                f"pass each other at precision fp16), got {self.activations!r}")
        if not isinstance(self.reduce_inputs, str) or self.reduce_inputs not in REDUCE_INPUTS:
            raise ScheduleError(f"schedule.reduce_inputs must be one of {', '.join(REDUCE_INPUTS)} (the dtype softmax, "
                                f"layer norm and average pool read activations in), got {self.reduce_inputs!r}")
        if self.reduce_inputs != "fp32" and self.activations != "fp16":
            raise ScheduleError(f"schedule.reduce_inputs {self.reduce_inputs!r} needs activations 'fp16' (with fp32 "
                                f"activations every reduction input is fp32 anyway), got {self.activations!r}")
        if self.rows is not None and (not isinstance(self.rows, int) or isinstance(self.rows, bool)
                                      or self.rows not in INJECTIVE_ROWS):
            raise ScheduleError(f"schedule.rows must be one of {', '.join(map(str, INJECTIVE_ROWS))} (positions per "
                                f"thread of InjectiveRows), got {self.rows!r}")
        if self.row_reduction is not None and (not isinstance(self.row_reduction, int)
                                               or isinstance(self.row_reduction, bool)
                                               or self.row_reduction not in ROW_REDUCTION_THREADS):
            raise ScheduleError(f"schedule.row_reduction must be one of {', '.join(map(str, ROW_REDUCTION_THREADS))} "
                                f"(most threads per row of RowReduction), got {self.row_reduction!r}")
        if self.split_k is not None and (not isinstance(self.split_k, int) or isinstance(self.split_k, bool)
                                         or not 1 <= self.split_k <= MAX_SPLIT_K_BLOCKS):
            raise ScheduleError(f"schedule.split_k must be an int in [1, {MAX_SPLIT_K_BLOCKS}] (thread blocks a matmul "
                                f"is split along K to reach), got {self.split_k!r}")
        check_matmul_config(self.matmul, "schedule.matmul")
        if self.small_reduction is not None:
            check_choice({"rule": "small_reduction", "threads": self.small_reduction}, "schedule.small_reduction")
        if self.injective is not None:
            check_choice({"rule": "injective", "lanes": self.injective}, "schedule.injective")
        for k, c in self.kernels.items():
            check_choice(c, f"schedule.kernels[{k}]")

    @property
    def is_default(self) -> bool:
        return (self.matmul is None and self.small_reduction is None and not self.kernels and self.mma
                and self.injective is None and self.activations == "fp32" and self.reduce_inputs == "fp32"
                and self.rows is None and self.row_reduction is None and self.split_k is None and not self.simt
                and not self.implicit_gemm)

    def to_json(self) -> dict:
        """Only what differs from the default: {} is TVM's dlight rules plus MmaMatmul (written before the rule
        existed, {} meant dlight alone; for fp32 kernels, the only ones such entries were measured with except
        round 1's fp16 rows, the two are the same)."""
        out: dict[str, Any] = {}
        if self.matmul is not None:
            out["matmul"] = dict(self.matmul)
        if self.small_reduction is not None:
            out["small_reduction"] = self.small_reduction
        if self.kernels:
            out["kernels"] = {k: dict(v) for k, v in sorted(self.kernels.items())}
        if not self.mma:
            out["mma"] = False
        if self.injective is not None:
            out["injective"] = self.injective
        if self.activations != "fp32":
            out["activations"] = self.activations
        if self.reduce_inputs != "fp32":
            out["reduce_inputs"] = self.reduce_inputs
        if self.rows is not None:
            out["rows"] = self.rows
        if self.row_reduction is not None:
            out["row_reduction"] = self.row_reduction
        if self.split_k is not None:
            out["split_k"] = self.split_k
        if self.simt:
            out["simt"] = True
        if self.implicit_gemm:
            out["implicit_gemm"] = True
        return out

    @classmethod
    def from_json(cls, d: dict | None) -> "ScheduleSpec":
        d = d or {}
        if not isinstance(d, dict):
            raise ScheduleError(f"schedule must be an object, got {d!r}")
        bad = sorted(set(d) - set(SPEC_FIELDS))
        if bad:
            raise ScheduleError(f"schedule: unknown field(s) {', '.join(bad)}; valid: {', '.join(SPEC_FIELDS)}")
        return cls(d.get("matmul"), d.get("small_reduction"), dict(d.get("kernels") or {}), d.get("mma", True),
                   d.get("injective"), d.get("activations", "fp32"), d.get("reduce_inputs", "fp32"), d.get("rows"),
                   d.get("row_reduction"), d.get("split_k"), d.get("simt", False), d.get("implicit_gemm", False))


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------

def normalized(rule, func, target):
    """(schedule, block infos) of a PrimFunc for `rule`'s target, as dlight's rules start; None otherwise (the
    opening every rule of this module shares)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    if not isinstance(func, tirx.PrimFunc) or not rule.is_target_available(target):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return None if infos is None else (sch, infos)


def one_injective_block(rule, func, target):
    """(schedule, block) of a kernel that is one injective block once its producers are inlined (what the
    injective rules take), else None."""
    from tvm.s_tir.dlight.base import try_inline

    got = normalized(rule, func, target)
    if got is None or not all(i.is_injective() for i in got[1]):
        return None
    sch, infos = got
    infos = try_inline(sch, infos)
    return (sch, infos[0].block_rv) if len(infos) == 1 and infos[0].is_injective() else None


@functools.lru_cache(maxsize=None)
def _rule_classes():
    """The rule classes, built on first use (they subclass dlight's, which need the TVM compiler)."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.base import try_inline
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class ConfiguredMatmul(dl.gpu.Matmul):
        """dlight's Matmul rule with some fields of its CUDA config replaced (tensor-core paths unchanged)."""

        def __init__(self, overrides: dict | None = None):
            self.overrides = dict(overrides or {})

        def get_configs(self, target):
            cfg = super().get_configs(target)
            return dataclasses.replace(cfg, **self.overrides) if self.overrides else cfg

    class SmallReduction(GPUScheduleRule):
        """One thread per output for kernels whose reductions are all short (constant extent product <=
        `max_reduction`), e.g. depthwise convolutions; the reduction is unrolled. Same structure as dlight's
        Fallback, with a chosen block size."""

        def __init__(self, threads: int = 256, max_reduction: int = DEFAULT_SMALL_REDUCTION_MAX):
            self.threads = threads
            self.max_reduction = max_reduction

        def apply(self, func, target, _):
            got = normalized(self, func, target)
            if got is None or not any(i.is_reduction() for i in got[1]):
                return None
            sch, infos = got
            for info in infos:
                if not info.is_reduction():
                    continue
                n = 1
                for it in info.iters:
                    if it.kind == "R":
                        if not isinstance(it.dom, (int, tirx.IntImm)):
                            return None
                        n *= int(it.dom)
                if n > self.max_reduction:
                    return None
            infos = try_inline(sch, infos)
            if len(infos) == 2 and infos[0].is_reduction() and infos[1].is_injective():
                # reduction + elementwise epilogue (bias, activation): each thread computes its output in a
                # register and applies the epilogue; the intermediate never reaches global memory
                red, epi = infos[0].block_rv, infos[1].block_rv
                bx, tx = sch.split(sch.fuse(*sch.get_loops(epi)), factors=[None, self.threads])
                sch.bind(bx, "blockIdx.x")
                sch.bind(tx, "threadIdx.x")
                sch.compute_at(red, tx, preserve_unit_loops=True)
                sch.set_scope(red, 0, "local")
                inner = sch.get_loops(red)[2:]
                for lp in inner:
                    sch.unroll(lp)
                # no decompose_reduction (the fused bindings are not quasi-affine for it): the init runs under
                # "first reduction step", which unrolling turns into straight-line code
                return sch
            if len(infos) != 1 or not infos[0].is_reduction():
                return None
            block = infos[0].block_rv
            s_loops, r_loops, o_loops = [], [], []
            for lp, kind in zip(sch.get_loops(block), infos[0].dom_kind()):
                {"S": s_loops, "R": r_loops, "O": o_loops}[kind].append(lp)
            if o_loops:
                return None
            if not s_loops:
                s_loops.append(sch.add_unit_loop(block))
            sch.reorder(*s_loops, *r_loops)
            bx, tx = sch.split(sch.fuse(*s_loops), factors=[None, self.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            for lp in r_loops:
                sch.unroll(lp)
            if r_loops:
                sch.decompose_reduction(block, r_loops[0])
            return sch

    class GemmRule(GPUScheduleRule):
        """The relax rule of a GEMM schedule module (`module()`: tensorcore or simt_gemm): `config` one of its
        CONFIGS labels or None (its per-shape choice), CUDA targets of its MIN_ARCH or later only. Returns None
        for kernels the schedule does not take, so the next rule schedules them."""

        def __init__(self, config: str | None = None):
            self.config = None if config is None else self.module().named_config(config)

        @staticmethod
        def module():
            raise NotImplementedError

        def forms(self, func):
            """The forms of the kernel to try, in order."""
            return (func,)

        def apply(self, func, target, _):
            from tvm.s_tir.dlight.gpu.matmul import check_sm_version
            from workbench.models.tensorcore import TensorCoreError
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            if target.kind.name != "cuda" or check_sm_version(str(target.attrs.get("arch", ""))) < \
                    self.module().MIN_ARCH:
                return None
            for form in self.forms(func):
                try:
                    return self.module().schedule_gemm(form, self.config, check_size=True)
                except TensorCoreError:          # (SimtError is one)
                    pass
            return None

    class MmaMatmul(GemmRule):
        """fp16-input, fp32-accumulating matmul-like kernels on mma.sync tensor cores (tensorcore.schedule_gemm,
        `config` a tensorcore.CONFIGS label or None: per shape). Batched matmuls (attention's per-head QK^T and
        PV) are taken too, one batch entry per thread block (tensorcore.choose_batched_config per shape)."""

        @staticmethod
        def module():
            from workbench.models import tensorcore
            return tensorcore

        def forms(self, func):
            # an epilogue that reads a widened fp16 weight (keep_fp16_weights' bias): retried with the cast
            # inlined, so kernels the schedule takes as they are stay exactly as they were
            yield func
            inlined = inline_weight_casts(func)
            if inlined is not func:
                yield inlined

    class SimtMatmul(GemmRule):
        """fp32 matmul-like kernels (strict fp32: no tensor cores) on the SIMT schedule of simt_gemm: register
        tiles and cp.async double buffering, `config` a simt_gemm.CONFIGS label or None (per shape). Takes what
        tensorcore._normalize folds into a 2-D or batched matmul, so split-K partials and attention's batched
        matmuls too; declines everything else, and M, N or K below simt_gemm.MIN_M/N/K (GEMV, batch-1 heads)."""

        @staticmethod
        def module():
            from workbench.models import simt_gemm
            return simt_gemm

    class InjectiveVectorize(GPUScheduleRule):
        """Injective kernels (no reduction: elementwise, casts, pads, slices, concatenations, row gathers) with
        the innermost axis of the output vectorized: `lanes` contiguous elements per thread (8 fp16 = one
        16-byte store), the other axes fused over blocks of INJECTIVE_THREADS threads. dlight's Fallback gives
        such a kernel one scalar element per thread (ResNet-50-matmul's im2col kernels: ~700 GB/s on the H200).

        Takes a kernel only if every access stays a whole aligned vector: after inlining, one block whose
        innermost iteration var v (extent divisible by the lanes) indexes the innermost dimension of the output
        and of every input it reads as `v + r` (r not depending on v, divisible by the lanes; inputs not read
        along v are broadcast), every buffer's innermost extent is divisible by the lanes, and every condition
        is the same for all lanes of a vector (a concatenation's `512 <= v`, or `512 <= s * 1152 + v` once a
        split-K view [.., S, K / S] is fused into it and its indices simplified by the loops' bounds, is rewritten
        on v's vector, 8 * (v // 8), which the lowering simplifies to a per-thread test), no vector is wider than
        INJECTIVE_MAX_BYTES (fp32 kernels get 4 lanes) and every buffer is one of INJECTIVE_DTYPES. Fewer lanes
        are tried (down to 2) when the given number does not fit; otherwise it declines (None) and the next rule
        (Fallback) takes the kernel."""

        def __init__(self, lanes: int = 8, threads: int = INJECTIVE_THREADS):
            self.lanes = lanes
            self.threads = threads

        def apply(self, func, target, _):
            got = one_injective_block(self, func, target)
            if got is None:
                return None
            sch, block_rv = got
            name = sch.get(block_rv).name_hint
            lanes = self.lanes
            while lanes >= 2:
                plan = _injective_plan(sch, block_rv, lanes)
                if plan is not None:
                    break
                lanes //= 2
            else:
                return None
            sch = s_tir.Schedule(sch.mod["main"].with_body(plan))   # uniform conditions rewritten
            block = sch.get_sblock(name)
            loops = sch.get_loops(block)
            outer, vec = sch.split(loops[-1], factors=[None, lanes])
            bx, tx = sch.split(sch.fuse(*loops[:-1], outer), factors=[None, self.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)
            return sch

    def _injective_plan(sch, block_rv, lanes: int):
        """The function body with lane-uniform conditions rewritten if `lanes` elements per thread are safe
        for the block (see InjectiveVectorize), else None."""
        import tvm
        import tvm_ffi
        from tvm import tirx
        from tvm.sym.analyzer import Analyzer
        from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize
        from tvm.tirx.analysis import undefined_vars
        block = sch.get(block_rv)
        loops = [sch.get(lp) for lp in sch.get_loops(block_rv)]
        realize = get_sblockrealize(sch, block_rv)
        if not loops or len(loops) != len(block.iter_vars) or any(lp.thread_binding is not None for lp in loops):
            return None
        if any(not v.same_as(lp.loop_var) for v, lp in zip(realize.iter_values, loops)):
            return None                               # a non-trivial binding: the axes are not the loops
        v = block.iter_vars[-1].var
        if not isinstance(block.iter_vars[-1].dom.extent, tirx.IntImm) or \
                int(block.iter_vars[-1].dom.extent) % lanes:
            return None
        if not isinstance(block.body, tirx.BufferStore) or not block.body.indices or \
                not block.body.indices[-1].same_as(v):
            return None                               # the store must be out[..., v]: contiguous
        ana = Analyzer()
        for iv in block.iter_vars:
            ana.bind(iv.var, iv.dom)

        def lane_free(e) -> bool:
            return not any(x.same_as(v) for x in undefined_vars(e))

        def uniform(cmp):
            """`v + r < k`, `k <= v + r`, ... with r and k not depending on v and the threshold k - r a multiple of
            lanes (k - r + 1 for <= and >): the same for every lane of a vector, so v is replaced by its vector's
            first element, lanes * (v // lanes) (else unchanged). A concatenation's `512 <= v` (v // 8 >= 64 once
            simplified), or, reshaped by split-K's view [.., S, K / S], its `512 <= s * 1152 + v`."""
            flip = {tirx.LT: tirx.GT, tirx.LE: tirx.GE, tirx.GT: tirx.LT, tirx.GE: tirx.LE}
            a, b, op = cmp.a, cmp.b, type(cmp)
            if lane_free(a) and not lane_free(b):
                a, b, op = b, a, flip[op]                           # k < v + r is v + r > k, ...
            if lane_free(a) or not lane_free(b) or not lane_free(r := ana.simplify(a - v)):
                return cmp
            off = 1 if op in (tirx.LE, tirx.GT) else 0              # v <= t is v < t + 1, v > t is v >= t + 1
            m = ana.modular_set(ana.simplify(b - r + off))
            if m.coeff % lanes or m.base % lanes:
                return cmp
            first = tirx.FloorDiv(v, tirx.IntImm(str(v.ty), lanes)) * tirx.IntImm(str(v.ty), lanes)
            return op(first if is_zero(r) else first + r, b)     # (not simplified: it would bring v % lanes back)

        def is_zero(e) -> bool:
            return isinstance(e, tirx.IntImm) and int(e) == 0

        # v is the block's own var: rewriting the whole function touches only this block. First a reshape's index
        # arithmetic, (s * 1152 + v) // 2304 and % 2304, simplified by the loops' bounds
        body = tvm_ffi.structural_map(sch.mod["main"].body, [((tirx.FloorDiv, tirx.FloorMod), ana.simplify)])
        body = tvm_ffi.structural_map(body, [((tirx.LT, tirx.LE, tirx.GT, tirx.GE), uniform)])
        ok = [True]

        def check_access(buf, indices):
            if str(buf.dtype) not in INJECTIVE_DTYPES or lanes * buf.dtype.bits > 8 * INJECTIVE_MAX_BYTES or \
                    len(buf.strides) or not (isinstance(buf.elem_offset, tirx.IntImm) and
                                             int(buf.elem_offset) == 0):
                ok[0] = False                         # (strided or offset buffers: alignment unknown)
                return
            if not all(lane_free(i) for i in indices[:-1]):
                ok[0] = False                         # v in an outer dimension: a strided gather
                return
            if not indices or lane_free(indices[-1]):
                return                                # the same element for every lane: a broadcast
            r = ana.simplify(indices[-1] - v)
            extent = buf.shape[-1]
            m = ana.modular_set(r)
            if not lane_free(r) or not isinstance(extent, tirx.IntImm) or int(extent) % lanes or \
                    m.coeff % lanes or m.base % lanes:
                ok[0] = False                         # not v + r with r a multiple of lanes: a gather or an
                                                      # unaligned vector

        chunk = tirx.Var("chunk", "int64")            # stands for v // lanes: the same in every lane

        def on_cond(cond):
            cond = tvm_ffi.structural_map(cond, [(tirx.FloorDiv, lambda d: chunk if d.a.same_as(v) and isinstance(
                d.b, tirx.IntImm) and int(d.b) == lanes else d)])
            if not lane_free(cond):
                ok[0] = False                         # differs between lanes: the vectorizer would scalarize

        def on_call(c):
            if isinstance(c.op, tvm.ir.Op) and c.op.name in ("prim.if_then_else", "tirx.if_then_else"):
                on_cond(c.args[0])

        tvm_ffi.structural_walk(body, [(tvm.ir.TensorLoad, lambda n: check_access(n.source, n.indices)),
                                       (tirx.BufferStore, lambda n: check_access(n.buffer, n.indices)),
                                       (tirx.Select, lambda n: on_cond(n.condition)),
                                       (tvm.ir.Call, on_call),
                                       # a bound name hides what it stands for from these checks
                                       ((tirx.Let, tirx.LetStmt), lambda n: ok.__setitem__(0, False))],
                                order="post")
        return body if ok[0] else None

    return ConfiguredMatmul, SmallReduction, MmaMatmul, InjectiveVectorize, SimtMatmul


@functools.lru_cache(maxsize=None)
def _row_rule_classes():
    """RowReduction and InjectiveRows (built on first use: they need the TVM compiler)."""
    from tvm import tirx
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    def const(e) -> int | None:
        return int(e) if isinstance(e, (int, tirx.IntImm)) else None

    class RowReduction(GPUScheduleRule):
        """dlight's GeneralReduction schedule (softmax, layer norm: reductions along the last axis, then an
        elementwise block over the same axes; one thread block per row, each reduction a cross-thread one) with
        the threads per row fitted to the row: the fewest of 32, 64, ... `max_threads` that leave each thread at
        most `per_thread` elements. GeneralReduction always gives 256 threads: a 128-long softmax row (BERT's
        attention) leaves half of them idle and pays two block-wide reductions through shared memory, where 32
        threads reduce with warp shuffles alone. Rows of one warp share a thread block of BLOCK_THREADS (one row per
        threadIdx.y; one-warp blocks would hit the SM's limit of 32 resident blocks at half its warps), and their
        reductions' results stay in registers (no shared memory, no barrier).
        Declines (the next rule, GeneralReduction, takes it) anything else: several trailing reduction axes, a
        non-constant row, an epilogue of another shape."""

        BLOCK_THREADS = 128

        def __init__(self, max_threads: int = 256, per_thread: int = 4):
            self.max_threads = max_threads
            self.per_thread = per_thread

        def apply(self, func, target, _):
            got = normalized(self, func, target)
            if got is None:
                return None
            sch, infos = got
            infos = try_inline_contiguous_spatial(sch, infos)
            if not infos or len(infos) < 2:
                return None
            dom = infos[0].dom_kind()
            lead = len(dom) - len(dom.lstrip("S"))
            if lead == 0 or dom[lead:] != "R" or any(i.dom_kind() != dom for i in infos[:-1]):
                return None
            last = infos[-1]
            if not last.is_injective() or len(last.dom_kind()) != len(dom):
                return None
            row = const(infos[0].iters[-1].dom)
            loops = sch.get_loops(last.block_rv)
            if row is None or len(loops) != len(dom) or const(sch.get(loops[-1]).extent) != row:
                return None
            rows_total = math.prod(const(sch.get(lp).extent) or 0 for lp in loops[:lead])   # 0: not constant
            threads = 32
            while threads < self.max_threads and threads * self.per_thread < row:
                threads *= 2
            # One warp per row: its reductions' results stay in registers (the warp's all-reduce leaves them in
            # every lane), and rows share a thread block of BLOCK_THREADS threads (one row per threadIdx.y). Wider
            # rows keep them in shared memory, one row per block: TVM 0.27's ThreadSync misses the barrier between
            # lane 0's store of a row's result and the other lanes' loads when several rows share a block and
            # the batch axis has extent 1 (BERT b1's softmax read stale values).
            warp = threads == 32
            rows = 1
            while warp and threads * rows < self.BLOCK_THREADS and rows_total and rows_total % (2 * rows) == 0:
                rows *= 2
            bx, ty = sch.split(sch.fuse(*loops[:lead]), [None, rows])
            r_loop, tx = sch.split(loops[-1], [None, threads])
            sch.reorder(tx, r_loop)
            sch.bind(tx, "threadIdx.x")
            sch.unroll(r_loop)
            for info in reversed(infos[:-1]):
                block = info.block_rv
                for i, _ in enumerate(sch.get(block).writes):
                    sch.set_scope(block, buffer_index=i, storage_scope="local" if warp else "shared")
                sch.compute_at(block, ty, preserve_unit_loops=True)
                r_loop, tx = sch.split(sch.get_loops(block)[-1], [None, threads])
                sch.reorder(tx, r_loop)
                sch.bind(tx, "threadIdx.x")
                sch.unroll(r_loop)
            sch.bind(bx, "blockIdx.x")     # (bound last: compute_at under a thread-bound loop fails its checks)
            sch.bind(ty, "threadIdx.y")
            return sch

    class InjectiveRows(GPUScheduleRule):
        """Injective kernels as a grid of output rows: one thread per element of the innermost output axis
        (consecutive threads store consecutive elements), each thread `rows` consecutive positions of the next
        axis (unrolled), the remaining axes over thread blocks. For gathers that InjectiveVectorize declines and
        dlight's Fallback runs one element per thread, recomputing the whole index arithmetic per element: the
        RGB stem's im2col (f32 NCHW image -> f16 [b, 112, 112, 147] columns, divisions by 147, 21, 7 and 3 per
        element; 130 us at b16 on the H200) does its column's divisions once per thread here. Takes a kernel
        whose single block (after inlining) stores out[..., v] with v the innermost loop, of constant extent in
        [32, max_threads]; fewer rows are used where `rows` does not divide the next axis."""

        def __init__(self, rows: int = 8, max_threads: int = 1024):
            self.rows = rows
            self.max_threads = max_threads

        def apply(self, func, target, _):
            got = one_injective_block(self, func, target)
            if got is None:
                return None
            sch, block = got
            stmt = sch.get(block)
            loops = sch.get_loops(block)
            if len(loops) < 2 or len(loops) != len(stmt.iter_vars):
                return None
            inner = const(sch.get(loops[-1]).extent)
            outer = const(sch.get(loops[-2]).extent)
            if inner is None or outer is None or not 32 <= inner <= self.max_threads:
                return None
            if not isinstance(stmt.body, tirx.BufferStore) or not stmt.body.indices or \
                    not stmt.body.indices[-1].same_as(stmt.iter_vars[-1].var):
                return None                           # the innermost loop must walk the output's last axis
            rows = self.rows
            while outer % rows:
                rows //= 2
            o, r = sch.split(loops[-2], [None, rows])
            bx = sch.fuse(*loops[:-2], o)
            sch.reorder(bx, loops[-1], r)
            sch.bind(bx, "blockIdx.x")
            sch.bind(loops[-1], "threadIdx.x")
            sch.unroll(r)
            return sch

    return RowReduction, InjectiveRows


def row_reduction_rule(max_threads: int = 256):
    return _row_rule_classes()[0](max_threads)


def injective_rows_rule(rows: int = 8):
    return _row_rule_classes()[1](rows)


def mma_rule(config: str | None = None):
    return _rule_classes()[2](config)


def simt_rule(config: str | None = None):
    return _rule_classes()[4](config)


def matmul_rule(overrides: dict | None = None):
    return _rule_classes()[0](check_matmul_config(overrides))


def injective_rule(lanes: int = 8, threads: int = INJECTIVE_THREADS):
    return _rule_classes()[3](lanes, threads)


def small_reduction_rule(threads: int = 256, max_reduction: int = DEFAULT_SMALL_REDUCTION_MAX):
    return _rule_classes()[1](threads, max_reduction)


def default_rules(spec: ScheduleSpec | None = None) -> list:
    """dlight's CUDA rule list (relax.backend.cuda.legalize_passes), with the spec's global settings (MmaMatmul
    first unless spec.mma is False)."""
    from tvm.s_tir import dlight as dl
    from workbench.models import split_k
    spec = spec or ScheduleSpec()
    rules = [split_k.sum_rule(spec.small_reduction or 256)] if spec.split_k is not None else []   # its kernels only
    rules += ([mma_rule()] if spec.mma else []) + ([simt_rule()] if spec.simt else [])
    rules += [matmul_rule(spec.matmul), dl.gpu.GEMV(), dl.gpu.Reduction()]
    if spec.small_reduction is not None:
        rules.append(small_reduction_rule(spec.small_reduction))
    if spec.injective is not None:                # kernels without reduction only: no other rule's
        rules.append(injective_rule(spec.injective))
    if spec.rows is not None:                     # what InjectiveVectorize declines, ahead of Fallback
        rules.append(injective_rows_rule(spec.rows))
    if spec.row_reduction is not None:            # GeneralReduction's kernels whose rows it can fit
        rules.append(row_reduction_rule(spec.row_reduction))
    return rules + [dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def choice_rule(choice: dict, spec: ScheduleSpec | None = None):
    """The rule a per-kernel choice names (None for "default": use the spec's rule list)."""
    choice = check_choice(choice)
    if choice["rule"] == "matmul":
        base = dict((spec.matmul if spec else None) or {})
        base.update(choice.get("config") or {})
        return matmul_rule(base)
    if choice["rule"] == "small_reduction":
        return small_reduction_rule(choice["threads"])
    if choice["rule"] == "mma":
        return mma_rule(choice.get("config"))
    if choice["rule"] == "simt":
        return simt_rule(choice.get("config"))
    if choice["rule"] == "injective":
        return injective_rule(choice["lanes"])
    return None


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

def kernel_key(func) -> str:
    """Stable id of an unscheduled TIR kernel: its structural hash (shapes and dtypes included)."""
    import tvm_ffi
    return f"{tvm_ffi.structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}"


def apply_rules(func, target, rules: Iterable):
    """The first schedule a rule gives for `func` (or None)."""
    return first_schedule(func, target, rules)[0]


def first_schedule(func, target, rules: Iterable) -> tuple[Any, Any]:
    """(schedule, the rule that gave it) for the first rule that schedules `func`; (None, None) if none does."""
    from tvm import s_tir
    for rule in rules:
        try:
            sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - a rule that cannot schedule this kernel passes it on, as in dlight
            sch = None
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            assert isinstance(sch, s_tir.Schedule)
            return sch, rule
    return None, None


def _apply_tuned(mod, spec: ScheduleSpec, target, applied: dict | None = None, rules_used: dict | None = None):
    from tvm import tirx
    rules = default_rules(spec)
    updated = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]):
            continue
        tgt = func.attrs["target"] if func.attrs is not None and "target" in func.attrs else target
        sch = by = None
        choice = spec.kernels.get(kernel_key(func)) if spec.kernels else None
        if choice is not None:
            rule = choice_rule(choice, spec)
            if rule is not None:
                sch, by = first_schedule(func, tgt, [rule])
            if applied is not None:
                applied[gv.name_hint] = choice if (sch is not None or rule is None) else {"rule": "default",
                                                                                         "note": "choice failed"}
        if sch is None:
            sch, by = first_schedule(func, tgt, rules)
        if sch is not None:
            updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if rules_used is not None:
                rules_used[gv.name_hint] = type(by).__name__
    for gv, f in updated.items():
        mod[gv] = f
    return mod


def apply_tuned_schedule(spec: ScheduleSpec, applied: dict | None = None, rules_used: dict | None = None):
    """A module pass: schedule every unscheduled PrimFunc by its per-kernel choice if `spec` has one, else by
    the (configured) dlight rules. `applied` (optional) collects kernel name -> choice used; `rules_used`
    (optional) kernel name -> class name of the rule that scheduled it."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ApplyTunedSchedule")
    def _pass(mod, _ctx):
        from tvm.target import Target
        return _apply_tuned(mod, spec, Target.current(allow_none=False), applied, rules_used)

    return _pass


def fusion_passes(target, split_k: int | None = None, implicit_gemm: bool = False) -> list:
    """The CUDA pipeline up to (not including) scheduling: the kernels these produce are what `kernel_key`
    identifies, so the candidate builder and the compiler must use exactly these. `split_k`, `implicit_gemm`:
    ScheduleSpec's (implicit GEMM after split-K: a matmul split-K rewrote keeps its im2col)."""
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda      # (relax.pipeline's dispatcher misses 2 of 4)
    from workbench.models.implicit_gemm import implicit_gemm_pass
    from workbench.models.projections import einsum_views_pass
    from workbench.models.split_k import layer_norm_pass, split_k_pass
    return cuda.library_dispatch_passes(target) + ([split_k_pass(split_k)] if split_k else []) + (
        [implicit_gemm_pass()] if implicit_gemm else []) + [einsum_views_pass(),
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern()] + (
        [layer_norm_pass()] if split_k else []) + [
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def mixed_precision(mod, precision: str, activations: str = "fp32", weights: str = "fp32",
                    reduce_inputs: str = "fp32"):
    """fp16: matmul/conv inputs in fp16 with fp32 accumulation (relax ToMixedPrecision, out_dtype fp32: its
    matmul/conv results are rounded to fp16 and widened again, and elementwise ops that read an fp32 weight,
    e.g. every bias add, run in fp32 after them, so many kernels hand each other fp32). activations "fp16":
    then `keep_fp16_activations`, so kernels hand each other fp16. (ToMixedPrecision(out_dtype="float16")
    would not do that: it makes the matmuls accumulate in fp16, and the bias adds still widen to fp32.)
    weights "fp16": `keep_fp16_weights` right after ToMixedPrecision (the order compiler.lower runs them in:
    there keep_fp16_activations runs in relax_pipeline). reduce_inputs "fp16" (activations fp16 only): see
    keep_fp16_activations."""
    if precision not in PRECISIONS:
        raise ScheduleError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if activations not in ACTIVATIONS:
        raise ScheduleError(f"unknown activations {activations!r}; valid: {', '.join(ACTIVATIONS)}")
    if weights not in WEIGHTS:
        raise ScheduleError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    if activations == "fp16" and precision != "fp16":
        raise ScheduleError(f"activations fp16 needs precision fp16, got precision {precision!r}")
    if reduce_inputs not in REDUCE_INPUTS:
        raise ScheduleError(f"unknown reduce_inputs {reduce_inputs!r}; valid: {', '.join(REDUCE_INPUTS)}")
    if reduce_inputs == "fp16" and activations != "fp16":
        raise ScheduleError(f"reduce_inputs fp16 needs activations fp16, got activations {activations!r}")
    if weights == "fp16" and precision != "fp16":
        raise ScheduleError(f"weights fp16 needs precision fp16, got precision {precision!r}")
    if precision == "fp16":
        from tvm import relax
        check_tensorize_support()
        mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        if weights == "fp16":
            mod = keep_fp16_weights(mod)
        if activations == "fp16":
            mod = keep_fp16_activations(mod, reduce_inputs)
    return mod


# Ops that give on fp16 inputs what they give in fp32 rounded to fp16: exactly for data movement (e.g. the matmul
# lowering's im2col) and max/min/relu/clip; for + - * of two fp16 values up to the last bit (one correct rounding
# instead of fp32's then fp16's). keep_fp16_activations runs them on fp16 inputs, so the kernel boundary in front of
# them carries fp16: a widening cast there would be fused by FuseOps into the producing kernel, storing fp32.
FP16_SAFE_OPS = frozenset({
    "relax.nn.relu", "relax.clip", "relax.maximum", "relax.minimum", "relax.nn.pad", "relax.strided_slice",
    "relax.concat", "relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.flatten",
    "relax.broadcast_to", "relax.nn.max_pool2d", "relax.add", "relax.subtract", "relax.multiply"})


def keep_fp16_activations(mod, reduce_inputs: str = "fp32"):
    """Rewrite a module after ToMixedPrecision(out_dtype="float32") so that every fp32 activation (a value
    computed from the function's inputs, not from weights alone) is rounded to fp16 where it is produced and
    every reader sees the rounded value; fused kernels then store and load fp16 between each other.

    - An op that reads an fp32 weight (bias add, layer norm, the embedding gather) or is not in FP16_SAFE_OPS
      (softmax, gelu, tanh, average pool) still computes in fp32 from its inputs widened in registers, and its
      result is rounded. torch's fp16 autocast rounds the same values, except that it keeps layer-norm and
      softmax outputs in fp32.
    - Ops in FP16_SAFE_OPS whose float inputs are all fp16 run in fp16.
    - matmul/conv keep ToMixedPrecision's fp32 accumulation (their result was rounded to fp16 already), so the
      mma rule (schedules.MmaMatmul) still takes them, with a longer elementwise epilogue.
    - What a function returns is not rounded: the outputs keep their dtype (fp32), so an artifact's output spec
      does not change. Nor are values that leave their dataflow block.

    What still crosses kernels in fp32: the input of a reduction that needs fp32 (layer norm, softmax, average
    pool), whose widening cast FuseOps fuses into the producing kernel (BERT-base b16: QK^T stores its scores in
    fp32 for the softmax, the residual adds theirs for the layer norms), and the weights, which the artifact stores
    in fp32 (one cast kernel per weight per run, as before) unless keep_fp16_weights ran.

    reduce_inputs "fp16": those reductions (WIDEN_INSIDE_OPS, with an fp16 activation as their data operand) are
    legalized here instead, by the op's own legalization with the widening cast inside its PrimFunc and the
    result rounded in it: the producer stores fp16, the reduction reads fp16 and computes in fp32 (max, sums,
    mean and variance), as torch's fused softmax and layer norm do. Same values as with "fp32" (the widened
    value was an fp16 value either way), half the bytes between the two kernels.

    Idempotent. Relax functions without fp16 values are left alone; raises ScheduleError if no function has any
    (ToMixedPrecision, i.e. precision fp16, first)."""
    if reduce_inputs not in REDUCE_INPUTS:
        raise ScheduleError(f"unknown reduce_inputs {reduce_inputs!r}; valid: {', '.join(REDUCE_INPUTS)}")
    return _rewrite_mixed_funcs(mod, "activations", lambda f: True,
                                functools.partial(_fp16_activations_func, reduce_inputs=reduce_inputs))


def _remapper(bb, half: dict, new: dict, where: str) -> Callable:
    """remap(e): `e` with old vars replaced by `new` ones; a var with an fp16 twin in `half` (a rounded fp32
    activation, a converted weight) is read through a fresh widening cast, one per reader (a cast shared by
    readers would fuse into the producer)."""
    from tvm import relax

    def remap(e):
        if isinstance(e, relax.Var):
            return bb.emit(relax.op.astype(half[e], "float32")) if e in half else new.get(e, e)
        if isinstance(e, relax.Tuple):
            return relax.Tuple([remap(f) for f in e.fields])
        if isinstance(e, relax.TupleGetItem):
            return relax.TupleGetItem(remap(e.tuple_value), e.index)
        if isinstance(e, relax.Call):
            return relax.Call(e.op, [remap(a) for a in e.args], e.attrs, e.ty_args)
        if isinstance(e, (relax.If, relax.SeqExpr, relax.Function)):
            raise ScheduleError(f"{where}: cannot rewrite a nested {type(e).__name__}")
        return e                       # constants, shapes, scalars, strings, functions by name
    return remap


def _rewrite_mixed_funcs(mod, what: str, eligible: Callable, rewrite: Callable):
    """`rewrite(func, name, others)` applied to each Relax function that `eligible(func)` and that computes fp16
    values (after ToMixedPrecision); ScheduleError naming them if there are eligible functions but none computes
    any. `others` is an IRModule of the module's other functions; a rewrite returns the new function, or an
    IRModule holding it under `name` plus functions it added (PrimFuncs it called with call_tir)."""
    import tvm
    from tvm import relax
    funcs = {gv: f for gv, f in mod.functions_items()}
    cands = [gv for gv, f in funcs.items() if isinstance(f, relax.Function) and isinstance(f.body, relax.SeqExpr)
             and eligible(f)]
    mixed = [gv for gv in cands if any(_dtype(bd.var) == "float16" for blk in funcs[gv].body.blocks
                                       for bd in blk.bindings)]
    if cands and not mixed:
        raise ScheduleError(f"fp16 {what}: {', '.join(gv.name_hint for gv in cands)} compute(s) no fp16 values; "
                            f"{what} fp16 needs precision fp16 (ToMixedPrecision first)")
    for gv in mixed:
        others = tvm.IRModule({g: f for g, f in funcs.items() if g is not gv})
        out = rewrite(funcs[gv], gv.name_hint, others)
        if not isinstance(out, tvm.IRModule):
            funcs[gv] = out
            continue
        names = {g.name_hint for g in funcs}
        for g, f in out.functions_items():
            if g.name_hint == gv.name_hint:
                funcs[gv] = f
            elif g.name_hint not in names:          # new (the builder named it apart from every other)
                funcs[g] = f
    return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)


def keep_fp16_activations_pass(reduce_inputs: str = "fp32"):
    """`keep_fp16_activations` as a module pass (relax_pipeline runs it when spec.activations is "fp16")."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="KeepFP16Activations")
    def _pass(mod, _ctx):
        return keep_fp16_activations(mod, reduce_inputs)

    return _pass


def _dtype(expr) -> str | None:
    """The dtype of a tensor-typed relax expression (None for shapes, tuples, scalars)."""
    from tvm import relax
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _fp16_activations_func(func, name: str, others=None, reduce_inputs: str = "fp32"):
    import tvm
    from tvm import relax
    attrs = dict(func.attrs.items()) if func.attrs is not None else {}
    n_in = int(attrs["num_input"]) if "num_input" in attrs else len(func.params)
    acts = set(func.params[:n_in])     # old vars computed from the inputs (the rest of the params: weights)
    half: dict = {}                    # old fp32 activation var -> new fp16 var holding its rounded value
    new: dict = {}                     # old var -> new var (same dtype)
    body = func.body
    returned: set = set()              # old vars the function returns (directly or through aliases)

    def collect(e):
        if isinstance(e, relax.Var):
            returned.add(e)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                collect(f)

    collect(body.body)
    for blk in reversed(list(body.blocks)):
        for bd in reversed(list(blk.bindings)):
            if bd.var in returned and isinstance(bd.value, (relax.Var, relax.Tuple)):
                collect(bd.value)
    bb = relax.BlockBuilder(others)           # (names new PrimFuncs apart from the module's)

    remap = _remapper(bb, half, new, f"fp16 activations: function {name}")

    def as_fp16(e):
        """`e` as an operand of an fp16 op, or None (an fp32 tensor without an fp16 twin, e.g. a weight)."""
        if isinstance(e, relax.Tuple):
            fs = [as_fp16(f) for f in e.fields]
            return None if any(f is None for f in fs) else relax.Tuple(fs)
        if isinstance(e, relax.Var) and e in half:
            return half[e]
        d = _dtype(e)
        if d is None or d == "float16" or not d.startswith(("float", "bfloat")):
            return new.get(e, e) if isinstance(e, relax.Var) else e
        return None

    def from_inputs(e) -> bool:
        if isinstance(e, relax.Var):
            return e in acts
        if isinstance(e, relax.Tuple):
            return any(from_inputs(f) for f in e.fields)
        if isinstance(e, relax.TupleGetItem):
            return from_inputs(e.tuple_value)
        if isinstance(e, relax.Call):
            return any(from_inputs(a) for a in e.args)
        return False

    with bb.function(name, list(func.params), attrs={k: v for k, v in attrs.items() if k != "global_symbol"},
                     pure=bool(func.is_pure), private="global_symbol" not in attrs):
        for blk in body.blocks:
            dataflow = isinstance(blk, relax.DataflowBlock)
            scope = bb.dataflow() if dataflow else None
            if scope is not None:
                scope.__enter__()
            for bd in blk.bindings:
                v, val = bd.var, bd.value
                vname = v.name
                if not isinstance(bd, relax.VarBinding):
                    raise ScheduleError(f"fp16 activations: function {name}: binding {vname} is a "
                                        f"{type(bd).__name__}, which this rewrite does not handle")
                leaves = dataflow and not isinstance(v, relax.DataflowVar)
                emit = bb.emit_output if leaves else bb.emit
                if from_inputs(val):
                    acts.add(v)
                dt = _dtype(v)
                op = val.op.name if isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.Op) else None
                if v not in acts or op is None or v in returned or leaves or dt not in ("float32", "float16"):
                    new[v] = emit(remap(val), vname)
                    continue
                if op == "relax.astype":
                    src = val.args[0]
                    if dt == "float16" and src in half:          # rounding a value rounded already
                        new[v] = half[src]
                        continue
                    if dt == "float32" and _dtype(src) == "float16":
                        half[v] = new.get(src, src)              # widened where it is read (remap)
                        continue
                if (reduce_inputs == "fp16" and dt == "float32" and op in WIDEN_INSIDE_OPS and val.args
                        and val.args[0] in half and not any(a in half for a in val.args[1:])):
                    r = _widened_inside(bb, val, half[val.args[0]], [remap(a) for a in val.args[1:]])
                    if r is not None:
                        half[v] = bb.emit(r, vname)   # (readers widen it in registers, like any fp16 twin)
                        continue
                if dt == "float32" and op == "relax.einsum" and all(x in half for x in val.args[0].fields):
                    r = _einsum_widened(bb, val, [half[x] for x in val.args[0].fields])
                    if r is not None:
                        half[v] = bb.emit(r, vname)
                        continue
                if dt == "float32" and op in FP16_SAFE_OPS:
                    args = [as_fp16(a) for a in val.args]
                    if all(a is not None for a in args):
                        half[v] = bb.emit(relax.Call(val.op, args, val.attrs, val.ty_args), vname)
                        continue
                r = emit(remap(val), vname)
                if dt == "float32":
                    half[v] = bb.emit(relax.op.astype(r, "float16"))
                else:
                    new[v] = r
            if scope is not None:
                scope.__exit__(None, None, None)
        bb.emit_func_output(remap(body.body))
    return bb.get()


# Reductions that compute in fp32 from an fp16 activation (keep_fp16_activations, reduce_inputs "fp16"): their
# legalizations (relax.transform.legalize_ops) are one `bb.call_te(topi_op, data, ...)` each, which
# `_widened_inside` reruns with the data widened inside the PrimFunc.
WIDEN_INSIDE_OPS = frozenset({"relax.nn.softmax", "relax.nn.log_softmax", "relax.nn.layer_norm",
                              "relax.nn.rms_norm", "relax.nn.group_norm", "relax.nn.adaptive_avg_pool2d"})


class _WidenFirstOperand:
    """The BlockBuilder an op's legalization sees in `_widened_inside`: its call_te computes the op on the first
    operand widened to fp32 and rounds the result to fp16, inside one PrimFunc."""

    def __init__(self, bb):
        self.bb = bb
        self.calls = 0

    def call_te(self, func, *args, **kwargs):
        from tvm import topi
        self.calls += 1
        kwargs.setdefault("primfunc_name_hint", func.__name__)

        def widened(data, *rest, **kw):
            return topi.cast(func(topi.cast(data, "float32"), *rest, **kw), "float16")

        return self.bb.call_te(widened, *args, **kwargs)


def _einsum_widened(bb, call, xs16: list):
    """An fp32 einsum (the zoo transformers' attention products, which ToMixedPrecision leaves in fp32: the op has
    no mixed-precision policy) of fp16 activations as one PrimFunc that reads them, accumulates in fp32 and stores
    fp16: C += f32(A) * f32(B), the form MmaMatmul takes, like the matmuls ToMixedPrecision rewrites. An operand
    that is a part of a fused projection is read in place (projections.viewed)."""
    from tvm import te, topi
    from workbench.models.architecture import einsum_terms
    from workbench.models.projections import OUT_EWISE_FUSABLE, viewed
    terms, out = einsum_terms(call)
    if len(terms) != 2 or "." in "".join(terms) or any(len(set(t)) != len(t) for t in (*terms, out)):
        return None                  # (two operands, no ellipsis or repeated index: what the zoo writes)
    args, select, parts = viewed(bb, bb.lookup_binding, xs16)

    def einsum(*operands):
        # the widening inside the product, as relax's matmul legalizes with out_dtype (topi.einsum would widen in
        # separate blocks, which the GEMM schedules do not take)
        a, b = select(*operands)
        extent = {c: n for t, x in zip(terms, (a, b)) for c, n in zip(t, x.shape)}
        axes = {c: te.reduce_axis((0, extent[c]), name=c) for c in dict.fromkeys(terms[0] + terms[1]) if c not in out}

        def element(*idx):
            at = dict(zip(out, idx), **axes)
            return te.sum(a[tuple(at[c] for c in terms[0])].astype("float32")
                          * b[tuple(at[c] for c in terms[1])].astype("float32"), axis=list(axes.values()))

        return topi.cast(te.compute([extent[c] for c in out], element, name="T_einsum"), "float16")

    if not parts:          # (no attribute: other einsums keep the PrimFunc, and so the kernel key, they had)
        return bb.call_te(einsum, *args, primfunc_name_hint="einsum")
    return bb.call_te(einsum, *args, primfunc_name_hint="einsum", primfunc_attrs={"op_pattern": OUT_EWISE_FUSABLE})


def _widened_inside(bb, call, x16, rest: list):
    """`call` (an op of WIDEN_INSIDE_OPS on an fp32 activation whose fp16 value is `x16`) as a call_tir whose
    PrimFunc reads `x16`, computes the op's legalization in fp32 and stores fp16; None if the op's legalization
    is not one call_te (the caller then keeps the op)."""
    import tvm
    from tvm import relax
    legalize = tvm.ir.Op.get(call.op.name).get_attr("FLegalize")
    if legalize is None:
        return None
    shim = _WidenFirstOperand(bb)
    try:
        out = legalize(shim, relax.Call(call.op, [x16, *rest], call.attrs, call.ty_args))
    except Exception:  # noqa: BLE001 - a legalization that needs more than call_te: the op stays as it was
        return None
    if shim.calls != 1 or not isinstance(out, relax.Call) or getattr(out.op, "name", None) != "relax.call_tir":
        return None
    return out


def inline_weight_casts(func):
    """`func` with every block that casts a kernel parameter alone elementwise (keep_fp16_weights' widening of an
    fp16 bias, fused into a matmul's epilogue) inlined into its readers, so the epilogue reads the parameter
    directly: tensorcore.schedule_gemm folds elementwise consumers that read parameters into its store, not
    ones that read another block's output. Blocks a reduction reads (a matmul's operands: the schedule inlines
    those into its shared-memory copies itself) are left alone; a kernel without such blocks (every kernel of
    an fp32-weights build) is returned unchanged."""
    from tvm import s_tir, tirx
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - no root block: nothing to inline
        return func
    blocks = sch.get_child_blocks(root)
    local = {buf.name for buf in sch.get(root).alloc_buffers}

    def reduction(b) -> bool:
        return any(int(iv.iter_type) == 2 for iv in sch.get(b).iter_vars)            # kCommReduce

    inlined = False
    for b in blocks:
        stmt = sch.get(b)
        if (reduction(b) or not stmt.reads or len(stmt.writes) != 1
                or any(_region_buffer(r).name in local for r in stmt.reads)
                or not isinstance(getattr(stmt.body, "value", None), tirx.Cast)
                or any(reduction(c) for c in sch.get_consumers(b))):
            continue
        try:
            sch.compute_inline(b)
            inlined = True
        except Exception:  # noqa: BLE001 - not inlinable (e.g. not elementwise): left to the schedule
            pass
    return sch.mod["main"] if inlined else func


def _region_buffer(region):
    """The buffer of a block's read/write region (TVM 0.27 calls it `source`; older TVMs `buffer`)."""
    return region.source if hasattr(region, "source") else region.buffer


# Ops whose float weight operands keep_fp16_weights leaves in fp32: the norms. torch's fp16 autocast keeps them in
# fp32 too, they are a negligible share of the bytes (BERT-base: 77 KB of 438 MB), and a widening cast in front of
# them stays a kernel of its own after FuseOps (tried: tiny_transformer's 10 layer-norm gammas/betas in fp16 gave
# 10 cast kernels per run, what this pass removes; the error is the same either way: 2.40e-3 of the output's
# scale with them in fp16, 2.46e-3 in fp32, on the CPU against the NumPy reference).
FP32_WEIGHT_OPS = frozenset({"relax.nn.layer_norm", "relax.nn.group_norm", "relax.nn.rms_norm",
                             "relax.nn.batch_norm", "relax.nn.instance_norm"})
# Data movement that keep_fp16_weights runs on the fp16 weight itself, widening its result instead: exact, and
# FuseOps does not fuse a cast into a gather's data operand (take(astype(w)) cast the whole embedding table, a
# kernel of its own: BERT-base's 30522x768 words every run).
WEIGHT_MOVE_OPS = frozenset({"relax.take", "relax.strided_slice", "relax.reshape", "relax.permute_dims",
                             "relax.expand_dims", "relax.squeeze", "relax.flatten", "relax.broadcast_to"})


def keep_fp16_weights(mod):
    """Rewrite a module after ToMixedPrecision so that its float32 weight parameters are float16: the function's
    parameters after its `num_input` inputs (compiler.compile_model writes weights.bin in the parameter dtypes,
    in this order). Uses of a converted weight `w` (now `w16`):

    - `astype(w, "float16")` (ToMixedPrecision's cast of every matmul/conv weight, one cast kernel per weight per
      run) is removed: its readers take `w16`;
    - data movement of the weight alone (WEIGHT_MOVE_OPS: the embedding gather, a slice of position embeddings)
      runs on `w16` and its result is widened: `astype(take(w16, ids), "float32")`;
    - any other reader (a bias add) gets a fresh `astype(w16, "float32")` of its own, which FuseOps fuses into the
      reader's kernel (widened in registers; one shared cast would be a kernel of its own).

    torch's fp16 autocast does the same for linear/conv weights and biases. Left in fp32: weights read by an
    op in FP32_WEIGHT_OPS (layer-norm gamma/beta), weights a function returns or aliases, and non-float32
    weights. Inputs and outputs keep their dtypes; only weight parameter dtypes change. Idempotent. Relax
    functions without a "num_input" attribute (no inputs/weights split) are left alone; raises ScheduleError if
    no function computes in fp16 (ToMixedPrecision, i.e. precision fp16, first)."""
    return _rewrite_mixed_funcs(mod, "weights", lambda f: f.attrs is not None and "num_input" in f.attrs,
                                _fp16_weights_func)


def fp16_weight_params(func) -> list[int]:
    """Indices (among all parameters) of the float32 weight parameters keep_fp16_weights converts in `func`."""
    import tvm
    from tvm import relax
    n_in = int(func.attrs["num_input"])
    weights = {p: i for i, p in enumerate(func.params) if i >= n_in and _dtype(p) == "float32"}
    keep: set = set()

    def visit(e, op: str | None):
        """Keep the weights `e` holds in fp32 unless it is a direct operand of an op that may read fp16 or
        widen it (op None: returned, aliased or nested somewhere this pass does not rewrite)."""
        if isinstance(e, relax.Var):
            if e in weights and (op is None or op in FP32_WEIGHT_OPS):
                keep.add(e)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                visit(f, op)
        elif isinstance(e, relax.TupleGetItem):
            visit(e.tuple_value, None)
        elif isinstance(e, relax.Call):
            name = e.op.name if isinstance(e.op, tvm.ir.Op) else "call"
            for a in e.args:
                visit(a, name)

    for blk in func.body.blocks:
        for bd in blk.bindings:
            visit(bd.value, None if isinstance(bd.value, (relax.Var, relax.TupleGetItem)) else "binding")
    visit(func.body.body, None)
    return sorted(i for p, i in weights.items() if p not in keep)


def _fp16_weights_func(func, name: str, _others=None):
    import tvm
    from tvm import relax
    attrs = dict(func.attrs.items())
    convert = set(fp16_weight_params(func))
    if not convert:
        return func
    half: dict = {}                    # old fp32 weight param -> its fp16 parameter
    params = []
    for i, p in enumerate(func.params):
        if i in convert:
            half[p] = relax.Var(p.name, relax.TensorType(p.ty.shape, "float16"))
            params.append(half[p])
        else:
            params.append(p)
    new: dict = {}                     # old var -> what replaces it
    bb = relax.BlockBuilder()

    remap = _remapper(bb, half, new, f"fp16 weights: function {name}")

    astype = tvm.ir.Op.get("relax.astype")
    with bb.function(name, params, attrs={k: v for k, v in attrs.items() if k != "global_symbol"},
                     pure=bool(func.is_pure), private="global_symbol" not in attrs):
        for blk in func.body.blocks:
            dataflow = isinstance(blk, relax.DataflowBlock)
            scope = bb.dataflow() if dataflow else None
            if scope is not None:
                scope.__enter__()
            for bd in blk.bindings:
                v, val = bd.var, bd.value
                if not isinstance(bd, relax.VarBinding):
                    raise ScheduleError(f"fp16 weights: function {name}: binding {v.name} is a "
                                        f"{type(bd).__name__}, which this rewrite does not handle")
                leaves = dataflow and not isinstance(v, relax.DataflowVar)
                if (isinstance(val, relax.Call) and val.op.same_as(astype) and val.args[0] in half
                        and str(val.attrs.dtype) == "float16" and not leaves):
                    new[v] = half[val.args[0]]          # the cast kernel goes: readers take the fp16 parameter
                    continue
                if (isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.Op) and val.op.name in WEIGHT_MOVE_OPS
                        and val.args and val.args[0] in half and _dtype(v) == "float32"):
                    moved = bb.emit(relax.Call(val.op, [half[val.args[0]]] + [remap(a) for a in val.args[1:]],
                                               val.attrs, val.ty_args))
                    new[v] = (bb.emit_output if leaves else bb.emit)(relax.op.astype(moved, "float32"), v.name)
                    continue
                new[v] = (bb.emit_output if leaves else bb.emit)(remap(val), v.name)
            if scope is not None:
                scope.__exit__(None, None, None)
        bb.emit_func_output(remap(func.body.body))
    return bb.get()[name]


def relax_pipeline(target, spec: ScheduleSpec | None = None, applied: dict | None = None,
                   rules_used: dict | None = None):
    """The default relax CUDA pipeline (relax.backend.cuda.get_default_pipeline) scheduling with `spec`; with
    spec.activations "fp16", `keep_fp16_activations` first (on a module after mixed_precision(.., "fp16"))."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda
    spec = spec or ScheduleSpec()

    @tvm.transform.module_pass(opt_level=0, name="TunedCUDAPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                ([keep_fp16_activations_pass(spec.reduce_inputs)] if spec.activations == "fp16" else [])
                + fusion_passes(target, spec.split_k, spec.implicit_gemm)
                + [apply_tuned_schedule(spec, applied, rules_used)]
                + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))
            return seq(mod)

    return _pipeline


def fuse(mod, target, precision: str = "fp32", activations: str = "fp32", weights: str = "fp32",
         reduce_inputs: str = "fp32", split_k: int | None = None, implicit_gemm: bool = False):
    """The relax module after fusion (kernels unscheduled), as the pipeline sees it before scheduling."""
    import tvm
    mod = mixed_precision(mod, precision, activations, weights, reduce_inputs)
    with target:
        return tvm.transform.Sequential(fusion_passes(target, split_k, implicit_gemm))(mod)


def fuse_variant(mod, target, variant, weights: str | None = None):
    """`fuse` with a tuning Variant's settings (`weights`: another weights setting than the variant's)."""
    s = variant.schedule
    return fuse(mod, target, variant.precision, s.activations, weights or variant.weights, s.reduce_inputs,
                s.split_k, s.implicit_gemm)


@dataclass
class Kernel:
    """One unscheduled kernel of a fused module, with what is needed to run it alone."""
    name: str
    key: str
    func: Any
    params: list[tuple[tuple[int, ...], str]]      # (shape, dtype) of every buffer parameter, in order
    outputs: list[int]                              # indices of the parameters the kernel writes
    default_rule: str                               # which dlight rule schedules it by default

    def describe(self) -> dict:
        return {"name": self.name, "key": self.key, "params": [[list(s), d] for s, d in self.params],
                "outputs": self.outputs, "default_rule": self.default_rule}


def _written_params(func) -> list[int]:
    """Indices of the parameters a kernel stores to (in TVM 0.27 a parameter is a tensor-typed Var whose
    name is the name of the buffer the body stores to)."""
    import tvm_ffi
    from tvm import tirx
    stored: set[str] = set()
    tvm_ffi.structural_walk(func.body, [(tirx.BufferStore, lambda node: stored.add(node.buffer.name))],
                            order="post")
    return [i for i, p in enumerate(func.params) if p.name in stored]


def kernels(fused_mod, target) -> list[Kernel]:
    """The kernels of a fused module (see `fuse`), in name order, with their default rule."""
    from tvm import tirx
    from tvm.s_tir import dlight as dl
    names = [("matmul", matmul_rule()), ("gemv", dl.gpu.GEMV()), ("reduction", dl.gpu.Reduction()),
             ("general_reduction", dl.gpu.GeneralReduction()), ("fallback", dl.gpu.Fallback())]
    out = []
    with target:
        for gv, f in sorted(fused_mod.functions_items(), key=lambda kv: kv[0].name_hint):
            if not isinstance(f, tirx.PrimFunc):
                continue
            params = []
            for p in f.params:
                if not hasattr(p, "shape"):
                    params = None
                    break
                try:
                    params.append((tuple(int(d) for d in p.shape), str(p.dtype)))
                except (TypeError, ValueError):
                    params = None
                    break
            if params is None:
                continue                                # symbolic shapes or scalar params: not measurable alone
            rule = "none"
            for rn, r in names:
                if apply_rules(f, target, [r]) is not None:
                    rule = rn
                    break
            out.append(Kernel(gv.name_hint, kernel_key(f), f, params, _written_params(f), rule))
    return out


def candidate_schedules(kernel: Kernel, target, choices: list[dict], spec: ScheduleSpec | None = None) -> list:
    """One scheduled PrimFunc (or None where the rule does not apply) per choice."""
    out = []
    with target:
        for c in choices:
            rule = choice_rule(c, spec)
            rules = [rule] if rule is not None else default_rules(spec)
            sch = apply_rules(kernel.func, target, rules)
            out.append(None if sch is None else sch.mod["main"].with_attr("tirx.is_scheduled", True))
    return out


# ---------------------------------------------------------------------------------------------------------
# The tvm-ffi serializer check (tensor cores)
# ---------------------------------------------------------------------------------------------------------

_PROBE = "import tvm; tvm.ir.save_json(tvm.ir.PrimType('float32'))"


@functools.lru_cache(maxsize=None)
def tensorize_supported() -> bool:
    """Whether this TVM + tvm-ffi can serialize IR (Tensorize needs it); probed in a subprocess because the
    broken combination segfaults."""
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=120)
    return r.returncode == 0


def check_tensorize_support() -> None:
    if not tensorize_supported():
        import tvm_ffi
        raise ScheduleError(
            f"fp16 (tensor-core) kernels cannot be compiled with apache-tvm-ffi {tvm_ffi.__version__}: its JSON "
            f"serializer crashes on IR with DataType fields, which TVM's Tensorize uses (segfault). Install "
            f"'apache-tvm-ffi<0.1.15' (0.1.14.post1 works with apache-tvm 0.27; the compiled .so files are "
            f"identical), or compile with precision fp32")
