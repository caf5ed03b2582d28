"""A tensor-core GEMM schedule with mma.sync (ldmatrix + mma.m16n8k16), for fp16 inputs and fp32 accumulation.

dlight's Matmul rule tensorizes fp16 matmuls through wmma (bench/results/kernel_quality.md: 3.6-5x slower than
torch's cuBLAS on the H200). This module schedules the same matmul TensorIR with TVM's mma intrinsics
(`tvm.s_tir.tensor_intrin.cuda`: LDMATRIX_*/MMA_*; the tvm.testing.tir.mma_schedule structure):

- block tile BM x BN, K step BK, warps_m x warps_n warps (each a (BM/warps_m) x (BN/warps_n) tile of 16x16
  mma fragments held in registers);
- A and B staged through dynamic shared memory (rows padded by 8 halves against bank conflicts), copied with
  16-byte vector loads; the global->shared copies are software-pipelined min(`stages`, K steps) deep and made
  asynchronous (cp.async: needs PassContext config `tirx.use_async_copy`, see `PASS_CONFIG`) when that depth
  is >= 3; K loops of one or two block_k steps copy synchronously (a 2-deep pipeline races: see the end of
  `_schedule_gemm`, and `cp_async_hazards`, which finds that race in generated CUDA);
- the fragments of the next k step are loaded (ldmatrix) while the current one computes (register double
  buffer);
- the accumulators go through shared memory to global memory in 16-byte vector stores, which is where any
  elementwise epilogue (the cast to fp16, the crop of padding) is fused.

Shapes: M, N, K need not be multiples of the tile: `pad_einsum` pads the iteration space and the padded A/B
reads are guarded (zero fill) inside the shared-memory copy, the output crop inside the final store. The
vector width of the guarded copies is the largest of 8/4/2/1 halves dividing K (A) and N or K (B), so K % 8 != 0
(ResNet's first 7x7x3 conv, K = 147) works but copies narrowly.

Layouts (what the relax pipeline gives our zoo models after ToMixedPrecision: `Dense` and the conv-as-matmul
lowering store weights [in, out] and call `matmul(x, W)`): A[M, K] fp16, B[K, N] fp16 ("kn"); B[N, K] ("nk",
nn.Linear-style weights) is supported too. The reduction block must have the form
C[i, j] += f32(A[i, k]) * f32(B[k, j]) (or B[j, k]); the output is C (fp32) or any elementwise chain after it
(e.g. a cast to fp16), fused into the store.

Whole models: `schedules.MmaMatmul` (first in the CUDA rule list, `ScheduleSpec.mma`) applies this schedule to
the fused kernels of a relax module after ToMixedPrecision, with `choose_config` per shape. `_normalize` folds a
matmul-like block into the 2-D form first (dlight's iter-trait analysis and reindex): BERT's [b, s, k] x [k, n]
and ResNet's conv-as-matmul (b*h*w rows). Batched matmuls (attention's [b, h, s, d] x [b, h, d, s] and
[b, h, s, s] x [b, h, s, d]: axes both inputs read) fold into C[q, i, j] += A[q, i, k] * B[q, k, j] (or
B[q, j, k]) with every batch axis fused into q, and each thread block computes one ordinary tile of one batch
entry (q on blockIdx.z, `choose_batched_config`); kernels without a batch axis are scheduled exactly as before.
Direct convolutions (shifted reads: TVM's CUDA codegen breaks on their vectorized gathers) are refused. Elementwise
producers fold into the shared-memory copies, elementwise consumers (bias, ReLU, GELU, residual add, casts) into
the store. Implicit-GEMM convs (implicit_gemm.py) come as a plain matmul whose A is an im2col block, which folds
into the copy of A like any producer: with cin % 8 == 0 a predicated 16-byte cp.async, the padding its predicate.

Needs the full TVM compiler (tvm.s_tir), like schedules.py; Tensorize needs a tvm-ffi whose serializer works
(schedules.check_tensorize_support).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

WARP = 32
MMA = 16                                  # the fragment tile: 16x16 (A 16x16, B 16x16, C 16x16 per intrinsic)
PASS_CONFIG = {"tirx.use_async_copy": True}   # cp.async for the pipelined copies (harmless for other kernels)
SMEM_LIMIT = 227 * 1024                   # H100/H200: dynamic shared memory per block
MIN_ARCH = 80                             # mma.m16n8k16 f16 and cp.async need sm_80+
# Smallest extents the relax rule (`schedules.MmaMatmul`) takes: below these a 16-row fragment / 32-deep K step
# is mostly padding and dlight's SIMT or GEMV rules are the better fit (MobileNetV2's 16-channel 1x1 convs,
# batch-1 classifier heads with M = 1).
MIN_M, MIN_N, MIN_K = 16, 32, 32
MAX_GRID_Z = 65535                        # CUDA's gridDim.z limit: a batched matmul's batch entries


class TensorCoreError(ValueError):
    """A config or kernel this schedule cannot handle; the message names the value and what is allowed."""


class TileConfig:
    """What the GEMM schedules' tile configs (frozen dataclasses of int fields) share: every field a positive
    integer, and a JSON round trip that names unknown fields. `error` is the schedule's exception class."""
    error: type = TensorCoreError

    def _check_positive(self) -> None:
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise self.error(f"{type(self).__name__}.{f} must be a positive integer, got {v!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict):
        bad = sorted(set(d) - set(cls.__dataclass_fields__))
        if bad:
            raise cls.error(f"{cls.__name__}: unknown field(s) {', '.join(bad)}; valid: "
                            f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**d)


@dataclass(frozen=True)
class MmaConfig(TileConfig):
    """Tile sizes of the mma schedule. Warp tile = (block_m / warps_m) x (block_n / warps_n), multiples of 16."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 32
    warps_m: int = 2
    warps_n: int = 2
    stages: int = 3                       # global->shared pipeline depth (1: no pipelining, no cp.async)

    def __post_init__(self):
        self._check_positive()
        if self.block_k % MMA:
            raise TensorCoreError(f"MmaConfig.block_k must be a multiple of 16, got {self.block_k}")
        for blk, w, name in ((self.block_m, self.warps_m, "m"), (self.block_n, self.warps_n, "n")):
            if blk % (w * MMA):
                raise TensorCoreError(f"MmaConfig.block_{name}={blk} must be a multiple of 16 * warps_{name} "
                                      f"({16 * w}): each warp holds whole 16x16 fragments")
        if self.warps > 32:
            raise TensorCoreError(f"MmaConfig: {self.warps} warps exceed 1024 threads per block")
        if self.smem_bytes() > SMEM_LIMIT:
            raise TensorCoreError(f"MmaConfig {self.label}: {self.smem_bytes()} bytes of shared memory exceed "
                                  f"{SMEM_LIMIT}: lower stages, block_k or the block tile")

    @property
    def warps(self) -> int:
        return self.warps_m * self.warps_n

    @property
    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.warps_m}x{self.warps_n}_s{self.stages}"

    def smem_bytes(self) -> int:
        """Upper bound: the pipelined A/B tiles (padded rows) plus the fp32 output tile (not overlapped)."""
        a = self.block_m * (self.block_k + 8) * 2
        b = self.block_k * (self.block_n + 8) * 2          # kn; nk is block_n * (block_k + 8): same order
        return max(self.stages, 1) * (a + b) + self.block_m * (self.block_n + 4) * 4



# Named configs (MmaConfig fields). 128x128 with 4 warps of 64x64 is the classic Ampere/Hopper mma.sync tile
# (234 registers, no spills for sm_90 per ptxas); 8 warps of 64x32 trade registers for latency hiding; the
# narrow / small tiles are for N = 64..256 or few blocks.
CONFIGS: dict[str, dict] = {
    "t128": dict(block_m=128, block_n=128, block_k=32, warps_m=2, warps_n=2, stages=3),
    "t128w8": dict(block_m=128, block_n=128, block_k=32, warps_m=2, warps_n=4, stages=4),
    "t256x128": dict(block_m=256, block_n=128, block_k=32, warps_m=4, warps_n=2, stages=3),
    "t128x64": dict(block_m=128, block_n=64, block_k=32, warps_m=2, warps_n=2, stages=4),
    "t64": dict(block_m=64, block_n=64, block_k=32, warps_m=2, warps_n=2, stages=4),
    # 96 and 48 columns: N = 768 (BERT's projections and FFN output) in 8 or 16 column tiles, so the grid is a
    # whole number of waves on 132 SMs more often (b16: 16 x 8 = 128 blocks of 128x96, where 128x128 gives 96)
    "t128x96": dict(block_m=128, block_n=96, block_k=32, warps_m=2, warps_n=2, stages=3),
    "t64x96": dict(block_m=64, block_n=96, block_k=32, warps_m=2, warps_n=2, stages=4),
    "t64x48": dict(block_m=64, block_n=48, block_k=32, warps_m=2, warps_n=1, stages=4),
}
H200_SMS = 132


def configs_for(m: int, n: int, k: int) -> list[str]:
    """2-6 configs worth measuring for a shape: no tile wider than N (a half-empty tile wastes the tensor cores),
    small tiles when the 128x128 grid would not fill the H200's 132 SMs, a bigger tile when it fills them many
    times, and for N a multiple of 96 and 128 (BERT's 768) the 96- and 48-column tiles."""
    if n <= 64:
        return ["t128x64", "t64"]
    if n <= 128:
        return ["t128x64", "t128", "t128w8"]
    blocks = math.ceil(m / 128) * math.ceil(n / 128)
    wide = ["t128x96", "t64x96", "t64x48"] if n % 96 == 0 and n % 128 == 0 else []   # N = 768: other waves
    if blocks < H200_SMS:
        return ["t128", "t128x64", "t64"] + wide
    if blocks >= 4 * H200_SMS:
        return ["t128", "t128w8", "t256x128"] + wide[:1]
    return ["t128", "t128w8", "t128x64"] + wide


def choose_config(m: int, n: int, k: int) -> str:
    """The one config the relax rule uses for a shape, from bench/results/gemm_tensorcore.md (H200; "blocks"
    = the 128-row grid): N <= 64: 128x64 (ResNet layer1 b16: 1.33x over 64x64); N <= 128: 128x128 (layer2
    b16); a 128x128 grid that fills the SMs: 128x128 (BERT FFN1); fewer blocks than SMs: 64x64 (more blocks:
    BERT QKV 1.16x, b1 FFN1 1.29x, ResNet layer3 1.32x over 128x128), unless K is long enough that the bigger
    tile's reuse wins anyway (BERT FFN2, K = 3072: 1.23x; ResNet layer4's 1x1 at 112 blocks, K = 512, loses
    7% with 64x64). Narrow N with fewer than half the SMs busy (batch 1) takes 64x64 too (not measured)."""
    rows = math.ceil(m / 128)
    if n <= 128:
        if rows < H200_SMS // 2:
            return "t64"
        return "t128x64" if n <= 64 else "t128"
    blocks = rows * math.ceil(n / 128)
    if blocks >= H200_SMS:
        return "t128"
    if blocks < H200_SMS // 2 or k <= 2048:
        return "t64"
    return "t128"


def choose_batched_config(batch: int, m: int, n: int, k: int) -> str:
    """The config for `batch` independent M x N x K matmuls (one tile of one entry per block). Short K
    (attention: K = head dim 64 or sequence 128) makes them memory-bound with a large output tile per FLOP:
    64x64 tiles fit up to 4 blocks per SM (56 KiB shared memory each) and give the most blocks (BERT-base
    b16's QK^T: 768 over 132 SMs). Long K: the 2-D choice for the stacked batch * M rows, but no taller tile
    than one entry has rows. Not measured on the H200 yet (round 10 builds it)."""
    if k <= 256 or m <= 64:
        return "t64"
    label = choose_config(batch * m, n, k)
    return "t64" if CONFIGS[label]["block_m"] > max(m, 64) else label


def named_config(label: str) -> "MmaConfig":
    if label not in CONFIGS:
        raise TensorCoreError(f"unknown mma config {label!r}; valid: {', '.join(CONFIGS)}")
    return MmaConfig.from_json(CONFIGS[label])


# ---------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------

def gemm_func(m: int, n: int, k: int, out_dtype: str = "float32", b_layout: str = "kn", batch: int | None = None):
    """C[m, n] = A[m, k] (fp16) x B (fp16, [k, n] for "kn" or [n, k] for "nk"), fp32 accumulation; out_dtype
    float16 adds a cast block (as ToMixedPrecision's fused kernels have). batch: `batch` independent matmuls,
    C[b, m, n] = A[b, m, k] x B[b, k, n] (or B[b, n, k]: "nk", attention's Q x K^T). Returns a PrimFunc (main)."""
    from tvm import te, tirx
    if b_layout not in ("kn", "nk"):
        raise TensorCoreError(f"b_layout must be 'kn' (B[K, N]) or 'nk' (B[N, K]), got {b_layout!r}")
    if out_dtype not in ("float32", "float16"):
        raise TensorCoreError(f"out_dtype must be float32 or float16, got {out_dtype!r}")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise TensorCoreError(f"batch must be None or a positive integer, got {batch!r}")
    if batch is not None:
        return _batched_gemm_func(batch, m, n, k, out_dtype, b_layout)
    a = te.placeholder((m, k), "float16", name="A")
    b = te.placeholder((k, n) if b_layout == "kn" else (n, k), "float16", name="B")
    r = te.reduce_axis((0, k), name="k")

    def bval(i, j):
        return b[r, j] if b_layout == "kn" else b[j, r]

    c = te.compute((m, n), lambda i, j: te.sum(tirx.Cast("float32", a[i, r]) * tirx.Cast("float32", bval(i, j)),
                                               axis=[r]), name="C")
    outs = [a, b, c]
    if out_dtype == "float16":
        d = te.compute((m, n), lambda i, j: tirx.Cast("float16", c[i, j]), name="D")
        outs = [a, b, d]
    return te.create_prim_func(outs).with_attr("global_symbol", "main")


def _batched_gemm_func(batch: int, m: int, n: int, k: int, out_dtype: str, b_layout: str):
    from tvm import te, tirx
    a = te.placeholder((batch, m, k), "float16", name="A")
    b = te.placeholder((batch, k, n) if b_layout == "kn" else (batch, n, k), "float16", name="B")
    r = te.reduce_axis((0, k), name="k")

    def bval(q, j):
        return b[q, r, j] if b_layout == "kn" else b[q, j, r]

    c = te.compute((batch, m, n), lambda q, i, j: te.sum(tirx.Cast("float32", a[q, i, r]) *
                                                         tirx.Cast("float32", bval(q, j)), axis=[r]), name="C")
    outs = [a, b, c]
    if out_dtype == "float16":
        d = te.compute((batch, m, n), lambda q, i, j: tirx.Cast("float16", c[q, i, j]), name="D")
        outs = [a, b, d]
    return te.create_prim_func(outs).with_attr("global_symbol", "main")


# ---------------------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------------------

def _matmul_block(sch):
    """The one reduction block (in the form `_normalize` gives), and its layout facts: (block, trans_b,
    extents (M, N, K)). Batched blocks: see `_batched_matmul_block`."""
    block, trans_b, ext, batch = _batched_matmul_block(sch)
    if batch is not None:
        raise TensorCoreError(f"block {sch.get(block).name_hint}: a batched matmul ({batch} x {ext}); "
                              f"use _batched_matmul_block")
    return block, trans_b, ext


def _batched_matmul_block(sch, in_dtype: str = "float16"):
    """(block, trans_b, (M, N, K), batch) of the one reduction block: batch None for the 2-D form
    C[i, j] += A[i, k] * B[k, j] (or B[j, k]), else the extent of the batch axis of the batched form
    C[b, i, j] += A[b, i, k] * B[b, k, j] (or B[b, j, k]) `_normalize` gives attention's matmuls."""
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    red = []
    for b in blocks:
        stmt = sch.get(b)
        if any(int(iv.iter_type) == _REDUCE for iv in stmt.iter_vars):
            red.append(b)
    if len(red) != 1:
        raise TensorCoreError(f"expected exactly one reduction block (the matmul), found {len(red)}")
    block = red[0]
    stmt = sch.get(block)
    if len(stmt.iter_vars) not in (3, 4) or len(stmt.reads) < 2:
        raise TensorCoreError(f"block {stmt.name_hint}: expected a 2-D matmul C[i, j] += A[i, k] * B[.., ..] "
                              f"with 3 iteration variables, got {len(stmt.iter_vars)}")
    batched = len(stmt.iter_vars) == 4
    ivs = [iv.var for iv in stmt.iter_vars]
    vb = ivs[0] if batched else None
    vi, vj, vk = ivs[-3:]
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if kinds != [_SPATIAL] * (len(kinds) - 1) + [_REDUCE]:
        raise TensorCoreError(f"block {stmt.name_hint}: expected iteration kinds (S, S, R) or (S, S, S, R)")
    out = _buf(stmt.writes[0])
    ins = [r for r in stmt.reads if _buf(r).name != out.name]
    if len(ins) != 2:
        raise TensorCoreError(f"block {stmt.name_hint}: expected two inputs, got {len(ins)}")
    a_reg, b_reg = ins

    def idx(region):
        return [str(rg.min) for rg in region.region]

    lead = [str(vb)] if batched else []
    if idx(a_reg) != lead + [str(vi), str(vk)]:
        raise TensorCoreError(f"block {stmt.name_hint}: A must be read as A[{'b, ' if batched else ''}i, k], "
                              f"got {idx(a_reg)}")
    bi = idx(b_reg)
    if bi == lead + [str(vk), str(vj)]:
        trans_b = False
    elif bi == lead + [str(vj), str(vk)]:
        trans_b = True
    else:
        raise TensorCoreError(f"block {stmt.name_hint}: B must be read as B[k, j] or B[j, k]"
                              f"{' (after the batch index)' if batched else ''}, got {bi}")
    if batched and [str(x.min) for x in stmt.writes[0].region] != [str(vb), str(vi), str(vj)]:
        raise TensorCoreError(f"block {stmt.name_hint}: C must be written as C[b, i, j]")
    for r in (a_reg, b_reg):
        if str(_buf(r).dtype) != in_dtype:
            raise TensorCoreError(f"block {stmt.name_hint}: inputs must be {in_dtype}, {_buf(r).name} is "
                                  f"{_buf(r).dtype}")
    if str(out.dtype) != "float32":
        raise TensorCoreError(f"block {stmt.name_hint}: the accumulator must be float32, got {out.dtype}")
    ext = tuple(int(iv.dom.extent) for iv in stmt.iter_vars)
    return block, trans_b, ext[-3:], (ext[0] if batched else None)


_SPATIAL, _REDUCE = 0, 2                   # IterVar kinds (kDataPar, kCommReduce)


def _buf(region):
    """The buffer of a block's read/write region (TVM 0.27 calls it `source`; older TVMs `buffer`)."""
    return region.source if hasattr(region, "source") else region.buffer


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - a func without a root block is not ours to schedule
        return False


def _vec(n: int, limit: int = 8) -> int:
    v = limit
    while v > 1 and n % v:
        v //= 2
    return v


def schedule_gemm(func, cfg: MmaConfig | None = None, check_size: bool = False, two_stage: str | None = None):
    """An s_tir.Schedule of `func` (a matmul-like kernel: see `_normalize`, plus elementwise producers and
    consumers) using mma.sync tensor cores with `cfg` (None: `choose_config` for the shape). check_size: refuse
    extents below MIN_M / MIN_N / MIN_K (the relax rule). Raises TensorCoreError when the kernel or config does
    not fit. two_stage: how a K loop of two block_k steps is pipelined (see the end of `_schedule_gemm`; None,
    the rule's choice: not at all)."""
    if two_stage not in TWO_STAGE:
        raise TensorCoreError(f"two_stage must be one of {TWO_STAGE}, got {two_stage!r}")
    try:
        return _schedule_gemm(func, cfg, check_size, two_stage)
    except TensorCoreError:
        raise
    except (RuntimeError, ValueError, TypeError, AttributeError) as e:   # TVM's ScheduleError / InternalError
        last = str(e).strip().splitlines()[-1][:500] if str(e).strip() else ""
        raise TensorCoreError(f"the mma schedule ({cfg.label if cfg else 'per shape'}) does not apply: "
                              f"{type(e).__name__}: {last}") from e


def gemm_shape(func) -> tuple[int, int, int, bool]:
    """(M, N, K, trans_b) of a matmul-like kernel as the schedule sees it (after `_normalize`); for a batched
    matmul those of one batch entry (`batched_gemm_shape` gives the batch too)."""
    return batched_gemm_shape(func)[1:]


def batched_gemm_shape(func, in_dtype: str = "float16") -> tuple[int | None, int, int, int, bool]:
    """(batch, M, N, K, trans_b) of a matmul-like kernel after `_normalize`: batch None for a 2-D matmul, else
    the number of independent matmuls (every axis both inputs read, fused: attention's batch x heads). in_dtype:
    its inputs' (float32 for the SIMT schedule's kernels)."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    _normalize(sch, in_dtype)
    _, trans_b, (m, n, k), batch = _batched_matmul_block(sch, in_dtype)
    return batch, m, n, k, trans_b


def _is_canonical(stmt) -> bool:
    """C[i, j] += A[i, k] * B[k, j] (or B[j, k]) with exactly these three iteration variables."""
    if len(stmt.iter_vars) != 3 or len(stmt.reads) != 2:
        return False
    vi, vj, vk = (str(iv.var) for iv in stmt.iter_vars)
    a = [str(r.min) for r in stmt.reads[0].region]
    b = [str(r.min) for r in stmt.reads[1].region]
    return a == [vi, vk] and b in ([vk, vj], [vj, vk])


def _is_canonical_batched(stmt) -> bool:
    """C[b, i, j] += A[b, i, k] * B[b, k, j] (or B[b, j, k]) with exactly these four iteration variables."""
    if len(stmt.iter_vars) != 4 or len(stmt.reads) != 2:
        return False
    vb, vi, vj, vk = (str(iv.var) for iv in stmt.iter_vars)
    a = [str(r.min) for r in stmt.reads[0].region]
    b = [str(r.min) for r in stmt.reads[1].region]
    c = [str(r.min) for r in stmt.writes[0].region]
    return a == [vb, vi, vk] and b in ([vb, vk, vj], [vb, vj, vk]) and c == [vb, vi, vj]


def _normalize(sch, in_dtype: str = "float16") -> None:
    """Bring the one reduction block into C[I, J] += A[I, K] * B[K, J] (or B[J, K]) form, as dlight's Matmul
    rule does (its iter-trait analysis and reindex), but without a batch axis: the spatial axes only A reads
    fuse into I (BERT's batch x sequence, ResNet's batch x H x W), those only B reads into J, the one reduction
    axis is K. B keeps its global memory order: [K, J] when its innermost axis is a J axis (Dense weights
    [in, out]), else [J, K] (nn.Linear-style), so the shared-memory copy reads contiguous rows either way. A block that
    is already in that form is left alone. Raises TensorCoreError for batched matmuls (an axis both inputs
    read), direct convolutions and anything that is not a matmul.

    Batched matmuls (axes both inputs read: attention's batch x heads, `IterKind.kIter_S`) fold into
    C[b, i, j] += A[b, i, k] * B[b, k, j] (or B[b, j, k]), every batch axis fused into b: `_schedule_gemm` gives
    each block one tile of one batch entry (b on blockIdx.z). A kernel without a batch axis takes exactly the
    2-D path it took before batched support (the same TIR, the same CUDA)."""
    from tvm import tirx
    from tvm.s_tir.dlight.gpu.matmul import IterKind, detect_iter_traits, make_iter_fusion_index_map
    from tvm.tirx.analysis import undefined_vars
    if not _has_root(sch):
        raise TensorCoreError("the function has no root block")
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    red = [b for b in blocks if any(int(iv.iter_type) == _REDUCE for iv in sch.get(b).iter_vars)]
    if len(red) != 1:
        raise TensorCoreError(f"expected exactly one reduction block (the matmul), found {len(red)}")
    block = red[0]
    stmt = sch.get(block)
    if any(int(iv.iter_type) not in (_SPATIAL, _REDUCE) for iv in stmt.iter_vars):
        raise TensorCoreError(f"block {stmt.name_hint}: iteration kinds other than spatial/reduction")
    if len(stmt.reads) == 2 and (any(str(_buf(r).dtype) != in_dtype for r in stmt.reads) or
                                 str(_buf(stmt.writes[0]).dtype) != "float32"):
        raise TensorCoreError(f"block {stmt.name_hint}: inputs must be {in_dtype} and the accumulator float32, got "
                              f"{[str(_buf(r).dtype) for r in stmt.reads]} -> {_buf(stmt.writes[0]).dtype}")
    if _is_canonical(stmt) or _is_canonical_batched(stmt):
        return
    for iv in stmt.iter_vars:
        if not hasattr(iv.dom.extent, "value"):
            raise TensorCoreError(f"block {stmt.name_hint}: symbolic extent {iv.dom.extent}")
    traits = detect_iter_traits(stmt)
    if traits is None:
        raise TensorCoreError(f"block {stmt.name_hint}: expected a 2-D matmul C[i, j] += A[i, k] * B[.., ..] "
                              f"or a matmul-like block that folds into one (dlight's iter-trait analysis)")
    a_t, b_t, c_t, blk_t = traits
    S, I, J, K = IterKind.kIter_S, IterKind.kIter_I, IterKind.kIter_J, IterKind.kIter_K
    batched = any(t.kind == S for t in blk_t)
    # Only operands whose reads are plain variables with A's innermost one the single K axis: the fused K (and
    # J) axes are then contiguous rows of the buffers. A direct conv's shifted reads (h + ry) and multi-axis K
    # make the vectorized copies gather with 8-lane int64 index vectors, which TVM 0.27's CUDA codegen emits as
    # an invalid make_longlong4 of 8 arguments (NVRTC: "too many arguments"): those stay with dlight.
    k_vars = [iv.var for iv, t in zip(stmt.iter_vars, blk_t) if t.kind == K]
    for which, region in (("A", stmt.reads[0].region), ("B", stmt.reads[1].region)):
        if not all(isinstance(r.min, tirx.Var) or hasattr(r.min, "value") for r in region):
            raise TensorCoreError(f"block {stmt.name_hint}: {which} is read at computed indices "
                                  f"{[str(r.min) for r in region]} (a direct convolution?): not supported")
    if len(k_vars) != 1 or not stmt.reads[0].region[-1].min.same_as(k_vars[0]):
        raise TensorCoreError(f"block {stmt.name_hint}: A's rows must be contiguous along the one reduction axis")
    j_vars = {iv.var for iv, t in zip(stmt.iter_vars, blk_t) if t.kind == J}
    b_inner = set(undefined_vars(stmt.reads[1].region[-1].min))
    kn = bool(b_inner) and b_inner <= j_vars
    ra = sch.reindex(block, ("read", 0))
    rb = sch.reindex(block, ("read", 1))
    rc = sch.reindex(block, ("write", 0))
    lead = [S] if batched else []         # no batch axis: exactly the 2-D maps of before
    sch.transform_layout(ra, ("write", 0), make_iter_fusion_index_map(a_t, lead + [I, K]))
    sch.transform_layout(rb, ("write", 0), make_iter_fusion_index_map(b_t, lead + ([K, J] if kn else [J, K])))
    sch.transform_layout(rc, ("read", 0), make_iter_fusion_index_map(c_t, lead + [I, J]))
    sch.transform_block_layout(block, make_iter_fusion_index_map(blk_t, lead + [I, J, K]))


TWO_STAGE = (None, "legacy", "ordered")


def _schedule_gemm(func, cfg: MmaConfig | None, check_size: bool = False, two_stage: str | None = None):
    from tvm import s_tir
    from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group, shared_16x16_to_ldmatrix_32x8_layout
    sch = s_tir.Schedule(func)
    _normalize(sch)
    block, trans_b, (m, n, k), batch = _batched_matmul_block(sch)
    if check_size and (m < MIN_M or n < MIN_N or k < MIN_K):
        raise TensorCoreError(f"M, N, K = {m}, {n}, {k}: below the rule's minimum {MIN_M}, {MIN_N}, {MIN_K}")
    if batch is not None and batch > MAX_GRID_Z:
        raise TensorCoreError(f"batch {batch} exceeds gridDim.z's limit {MAX_GRID_Z} (one batch entry per block)")
    cfg = cfg or named_config(choose_config(m, n, k) if batch is None else choose_batched_config(batch, m, n, k))
    wm = cfg.block_m // cfg.warps_m // MMA                # fragments per warp along M
    wn = cfg.block_n // cfg.warps_n // MMA
    kk = cfg.block_k // MMA
    vec_a = _vec(k)
    vec_b = _vec(k if trans_b else n)

    # batched: the batch loop stays outermost, one batch entry per block (blockIdx.z); the tiles below it are
    # those of a 2-D matmul, the buffers keep a leading batch axis of extent 1 per block
    bz, i, j, r = padded_loops(sch, block, (cfg.block_m, cfg.block_n, cfg.block_k), (m, n, k), batch)
    i, i_tc = sch.split(i, factors=[None, MMA])
    j, j_tc = sch.split(j, factors=[None, MMA])
    r, r_tc = sch.split(r, factors=[None, MMA])
    sch.reorder(i, j, r, i_tc, j_tc, r_tc)
    outer = sch.blockize(i_tc)

    i0, i1, i2 = sch.split(i, factors=[None, cfg.warps_m, wm])
    j0, j1, j2 = sch.split(j, factors=[None, cfg.warps_n, wn])
    k0, k1 = sch.split(r, factors=[None, kk])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
    if batch is not None:
        sch.bind(bz, "blockIdx.z")
    sch.bind(i0, "blockIdx.y")
    sch.bind(j0, "blockIdx.x")
    ty = sch.fuse(i1, j1)
    sch.bind(ty, "threadIdx.y")

    # global -> shared (dynamic), 16-byte vectors when the row length allows, padded rows
    stage_shared(sch, outer, 0, k0, (cfg.warps, WARP), vec_a, 8)
    stage_shared(sch, outer, 1, k0, (cfg.warps, WARP), vec_b, 8)

    # shared -> registers (ldmatrix), per k step
    a_w = sch.cache_read(outer, 0, "warp")
    b_w = sch.cache_read(outer, 1, "warp")
    sch.compute_at(a_w, k1)
    sch.compute_at(b_w, k1)

    # registers -> shared -> global (with the epilogue)
    c_sh = sch.cache_write(outer, 0, "shared.dyn")
    c_w = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(c_w, ty)
    c_w_name = sch.get(c_w).name_hint
    sch.reverse_compute_at(c_sh, ty)

    def tile_fragments(blk, h: int, w: int):
        a, b = sch.get_loops(blk)[-2:]
        a0, a1 = sch.split(a, factors=[None, h])
        b0, b1 = sch.split(b, factors=[None, w])
        sch.reorder(a0, b0, a1, b1)
        return a1

    loop_a = tile_fragments(a_w, MMA, MMA)
    loop_b = tile_fragments(b_w, MMA, MMA)
    loop_c = tile_fragments(c_w, MMA, MMA)

    if batch is None:
        def frag_map(x, y):
            return (x // MMA, y // MMA, *shared_16x16_to_ldmatrix_32x8_layout(x % MMA, y % MMA))
    else:                                 # the same fragment layout below the batch index
        def frag_map(b, x, y):
            return (b, x // MMA, y // MMA, *shared_16x16_to_ldmatrix_32x8_layout(x % MMA, y % MMA))

    sch.transform_layout(a_w, ("write", 0), frag_map)
    sch.transform_layout(b_w, ("write", 0), frag_map)
    sch.transform_layout(c_w, ("read", 0), frag_map)

    init = sch.decompose_reduction(outer, k0)
    intr = get_mma_intrin_group(load_scope="shared.dyn", store_scope="shared.dyn", in_dtype="float16",
                                out_dtype="float32", trans_a=False, trans_b=trans_b,
                                not_use_mma_store_intrinic=True)
    sch.tensorize(loop_a, intr["load_a"])
    sch.tensorize(loop_b, intr["load_b"])
    sch.tensorize(sch.get_loops(block)[-3], intr["compute"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intr["init"])
    sch.tensorize(loop_c, intr["store"])
    # pad the fp32 tile's rows by 4 words: the fragment stores (8 rows x 4 lanes) then hit distinct banks. After
    # tensorize: the intrinsic's block is what writes the shared tile then.
    sch.storage_align(sch.get_sblock(c_w_name + "_o"), 0, axis=-2, factor=32, offset=4)

    # elementwise consumers (cast, pad_einsum's crop) into the shared -> global copy
    _inline_consumers(sch, c_sh)
    fused = sch.fuse(*sch.get_loops(c_sh)[-2:])
    vec_c = _vec(n, 4)
    _, f_tx, f_v = sch.split(fused, factors=[None, WARP, vec_c])
    sch.bind(f_tx, "threadIdx.x")
    sch.vectorize(f_v)

    # Register double buffer: the next k step's ldmatrix overlaps this step's mma. The inner pipeline is
    # injected first, so the outer loop then holds 5 statements: the A and B copies, the inner prologue
    # (first fragments), the inner steady state and its epilogue; the annotation is the one meta-schedule's
    # MultiLevelTilingTensorCore uses with async copies: the copies run stages - 1 iterations ahead.
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    # No deeper than the K loop is long: a prologue longer than the loop leaves cp.async.wait_group with a
    # non-constant count, which CUDA codegen rejects. And not 2 deep: with s = 2 the first-fragment ldmatrix
    # (stage s - 2 = 0) shares stage 0 with the async copies, and TVM 0.27's pipeline injector then emits
    # cp.async.wait_group *before* the cp.async.commit_group of those copies, so the ldmatrix reads shared
    # memory the copies have not filled (a race: ResNet's K = 64 1x1 convs, two K steps, gave wrong whole
    # models and NaN on the H200, round 3). Two-step K loops therefore run unpipelined (synchronous copies, as
    # a one-step K = 32 loop does); `two_stage` ("legacy": that broken annotation, "ordered": both stages
    # apart, copies then fragments in program order) is for bench/mma_kernel_check only.
    s = min(cfg.stages, math.ceil(k / cfg.block_k))
    if s >= 3:
        sch.annotate(k0, "software_pipeline_stage", [0, 0, s - 2, s - 1, s - 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 3, 2, 4])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
    elif s == 2 and two_stage == "legacy":
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 1, 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 3, 2, 4])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
    elif s == 2 and two_stage == "ordered":
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 1, 1, 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2, 3, 4])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
    return sch


def padded_loops(sch, block, tile: tuple[int, int, int], ext: tuple[int, int, int], batch: int | None) -> tuple:
    """The loops (batch loop or None, i, j, k) of the matmul `block` of extents `ext`, its iteration space padded
    to whole `tile`s first (pad_einsum, a no-op for multiples: guarded producers of A and B and a cropping
    consumer of C, which the schedules inline into their copies and their store)."""
    if any(e % t for e, t in zip(ext, tile)):
        sch.pad_einsum(block, list(tile) if batch is None else [1, *tile])
    loops = sch.get_loops(block)
    return (None, *loops) if batch is None else tuple(loops)


def stage_shared(sch, block, idx: int, at, threads: tuple[int, int], vec: int, offset: int):
    """Copy read `idx` of `block` through dynamic shared memory, once per iteration of loop `at`: its producers
    (pad_einsum's guarded copy, _normalize's reindex, casts) folded into the copy, which threads (y, x) share
    in `vec`-element vectors; rows padded to `offset` elements past a multiple of 32 (bank spread). The copy."""
    blk = sch.cache_read(block, idx, "shared.dyn")
    sch.compute_at(blk, at)
    _inline_producers(sch, blk)
    fused = sch.fuse(*sch.get_loops(blk)[-2:])
    _, f_ty, f_tx, f_v = sch.split(fused, factors=[None, *threads, vec])
    sch.bind(f_tx, "threadIdx.x")
    sch.bind(f_ty, "threadIdx.y")
    sch.vectorize(f_v)
    sch.storage_align(blk, 0, axis=-2, factor=32, offset=offset)
    return blk


def _inline_producers(sch, blk) -> None:
    """Inline every producer chain of `blk` (a shared-memory copy) into it: the copy then reads the kernel's
    input buffers directly, with any padding guard, layout change or elementwise op folded into its loads."""
    for _ in range(16):
        prods = sch.get_producers(blk)
        if not prods:
            return
        for p in prods:
            try:
                sch.compute_inline(p)
            except Exception as e:  # noqa: BLE001 - a producer that is not elementwise (a second matmul...)
                raise TensorCoreError(f"cannot fold producer {sch.get(p).name_hint} into the shared-memory copy: "
                                      f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else e}") from e
    raise TensorCoreError("producer chain longer than 16 blocks")


def _inline_consumers(sch, blk) -> None:
    """Fold every elementwise consumer of `blk` (the shared -> global store) into it, as dlight's
    auto_inline_consumers does: intermediate blocks are inlined forward into their readers first (a GELU reads
    its input twice: not a chain), then the one block left is reverse-inlined into the store."""
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumers
    auto_inline_consumers(sch, blk)
    left = sch.get_consumers(blk)
    if left:
        raise TensorCoreError(f"cannot fuse consumer(s) {[sch.get(c).name_hint for c in left]} into the store")


def scheduled_func(func, cfg: MmaConfig | None = None):
    """The scheduled PrimFunc (marked scheduled, so the relax pipeline's dlight pass leaves it alone)."""
    return schedule_gemm(func, cfg).mod["main"].with_attr("tirx.is_scheduled", True)


def build(func, target, cfg: MmaConfig | None = None) -> Any:
    """tvm.compile of one scheduled gemm for `target`, with cp.async enabled."""
    import tvm
    f = scheduled_func(func, cfg)
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        return tvm.compile(tvm.IRModule({"main": f}), target=target)


def cp_async_hazards(cuda_source: str) -> list[str]:
    """Kernels of a CUDA source (TVM codegen) that wait on cp.async groups while copies they issued are still
    uncommitted: `cp.async.wait_group` only waits for committed groups, so what follows (ldmatrix) may read
    shared memory before those copies land. Scans each kernel body in program text order, which is execution
    order for the straight-line pipeline prologue where TVM 0.27's injector put the wait too early for
    2-stage pipelines (see `_schedule_gemm`). Returns the names of the kernels with such a wait."""
    import re
    from workbench.models.compiler import cuda_kernels
    bad = []
    for name, part in cuda_kernels(cuda_source).items():
        pending = 0
        for tok in re.findall(r"ptx_cp_async\w*\(|cp\.async\.cg|cp\.async\.ca|commit_group\w*\(|wait_group\w*\(",
                              part):
            if "commit_group" in tok:
                pending = 0
            elif "wait_group" in tok:
                if pending:
                    bad.append(name)
                    break
            else:
                pending += 1
    return bad
