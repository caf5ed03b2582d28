"""A SIMT fp32 GEMM schedule of cuBLAS's SGEMM kind, for strict-fp32 matmuls (no tensor cores, no TF32).

dlight's Matmul rule gives each thread block a 32x64 tile with 4x4 outputs per thread, reads its operands from
shared memory inside the FMA loop and copies the next K slice only after the current one is used: on the H200
it runs our models' fp32 matmuls at 17-24 TFLOP/s (bench/results/kernel_breakdown_fp32.md; 67 is the data
sheet's fp32 peak), and they take 77-95% of the fp32 b16 models' time. This schedule is the classic SGEMM
structure instead:

- block tile block_m x block_n, K step block_k; each thread computes thread_m x thread_n outputs held in
  registers, as (thread_m / 4) x (thread_n / 4) sub-tiles of 4x4 spread block_m / (thread_m / 4) rows apart
  (and columns likewise: virtual threads, which InjectVirtualThread interleaves), so the threads of a warp
  read neighbouring vectors of the shared tiles;
- A and B staged through dynamic shared memory (rows padded by 4 words) in 16-byte vectors, double (or more)
  buffered: the copies of the next K steps are issued as cp.async while this one computes (software pipeline,
  `stages` deep; needs `tensorcore.PASS_CONFIG`, which `compiler.build_relax` sets);
- every `frag_k` k steps each thread loads its A rows and B columns into registers (8-byte vectors, see
  LOCAL_LANES), then does thread_m * thread_n * frag_k FMAs; the K step's loop is unrolled, so the compiler
  loads the next fragments while the FMAs run (on the H200 a median 1.08x over the loop kept, 0.78-1.27x
  across the benchmark's 104 shape and tile pairs);
- the accumulators go straight from registers to global memory, with any elementwise epilogue (bias, ReLU,
  GELU, residual add) fused into that store.

On the H200 (bench/results/gemm_simt.md) it runs our models' fp32 matmul shapes 1.4-2.2x faster than dlight's
Matmul, at 0.99-1.26x cuBLAS's time on the large ones (torch, TF32 off) and 1.4-1.9x on short grids (which
split-K splits in the models), and attention's batched matmuls at 0.6x torch's. `choose_config` picks the
tile per shape.

It takes the matmuls `tensorcore._normalize` folds into C[I, J] += A[I, K] * B[K, J] (or B[J, K]) with fp32
inputs and accumulator (Dense and conv-as-matmul kernels, split-K partials, attention's batched matmuls, one
batch entry per block on blockIdx.z). M, N, K need not be multiples of the tile (`pad_einsum` guards the
copies and crops the store). Needs the full TVM compiler (tvm.s_tir).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from workbench.models.tensorcore import (MAX_GRID_Z, PASS_CONFIG, SMEM_LIMIT, TensorCoreError, TileConfig,
                                         _batched_matmul_block, _inline_consumers, _normalize, padded_loops,
                                         stage_shared)

SUB = 4                                   # a thread's sub-tile: 4x4 outputs
MIN_ARCH = 80                             # cp.async needs sm_80+
MIN_M, MIN_N, MIN_K = 16, 16, 16          # below these dlight's SIMT / GEMV rules fit (batch-1 heads, M = 1)
MAX_THREADS = 1024
# Lanes of the shared -> register loads: 2. When every access of a shared buffer is a 4-lane vector, TVM 0.27's
# StorageRewrite retypes it float4, and InjectPTXAsyncCopy then fails on the cp.async into it (its check that
# the load and store indices have equal lanes). 8-byte loads cost ~2% more issue slots than 16-byte ones here.
LOCAL_LANES = 2


class SimtError(TensorCoreError):
    """A config or kernel the SIMT schedule cannot handle; the message names the value and what is allowed."""


@dataclass(frozen=True)
class SimtConfig(TileConfig):
    """Tile sizes: threads per block = (block_m / thread_m) x (block_n / thread_n)."""
    error = SimtError
    block_m: int = 64                     # (the defaults: CONFIGS["s64"])
    block_n: int = 64
    block_k: int = 16
    thread_m: int = 8
    thread_n: int = 4
    stages: int = 2                       # global->shared pipeline depth (1: no pipelining, no cp.async)
    frag_k: int = 2                       # k steps per register load of A and B (fewer: fewer registers)

    def __post_init__(self):
        self._check_positive()
        for name in ("block_k", "thread_m", "thread_n"):
            if getattr(self, name) % SUB:
                raise SimtError(f"SimtConfig.{name} must be a multiple of {SUB}, got {getattr(self, name)}")
        if self.frag_k not in (1, 2, 4):
            raise SimtError(f"SimtConfig.frag_k must be 1, 2 or 4, got {self.frag_k}")
        for blk, t, name in ((self.block_m, self.thread_m, "m"), (self.block_n, self.thread_n, "n")):
            if blk % t:
                raise SimtError(f"SimtConfig.block_{name}={blk} must be a multiple of thread_{name}={t}")
        if self.threads > MAX_THREADS or self.threads % 32:
            raise SimtError(f"SimtConfig {self.label}: {self.threads} threads per block; need a multiple of 32 "
                            f"up to {MAX_THREADS}")
        if self.smem_bytes() > SMEM_LIMIT:
            raise SimtError(f"SimtConfig {self.label}: {self.smem_bytes()} bytes of shared memory exceed "
                            f"{SMEM_LIMIT}: lower stages, block_k or the block tile")

    @property
    def threads(self) -> int:
        return (self.block_m // self.thread_m) * (self.block_n // self.thread_n)

    @property
    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}_t{self.thread_m}x{self.thread_n}_s{self.stages}"
                f"_f{self.frag_k}")

    def smem_bytes(self) -> int:
        """The pipelined A and B tiles, rows padded by 4 words (B [K, N] or [N, K]: the larger)."""
        b = max(self.block_k * (self.block_n + SUB), self.block_n * (self.block_k + SUB))
        return max(self.stages, 1) * (self.block_m * (self.block_k + SUB) + b) * 4


# Named configs: what `choose_config` picks from (bench/results/gemm_simt.md: 8 tiles measured on our models'
# shapes on the H200). 64x64 tiles of 128 threads with 8x4 outputs each won or tied on most (more blocks per SM
# hide latency better than the 128x128 tile's register reuse); 4x4 outputs per thread (256 threads) when the
# grid is short of two waves; 128x64 for N = 64 with many rows (ResNet's early 3x3 convs as matmuls).
CONFIGS: dict[str, dict] = {
    "s64": dict(block_m=64, block_n=64, block_k=16, thread_m=8, thread_n=4, stages=2, frag_k=2),
    "s64t4": dict(block_m=64, block_n=64, block_k=16, thread_m=4, thread_n=4, stages=2, frag_k=4),
    "s128x64": dict(block_m=128, block_n=64, block_k=16, thread_m=8, thread_n=8, stages=2, frag_k=2),
    # 96 columns: N = 768 (BERT's projections and FFN output) in 8 column tiles, so the grid is a whole number of
    # waves on 132 SMs more often (b16: 16 x 8 = 128 blocks of 128x96)
    "s128x96": dict(block_m=128, block_n=96, block_k=16, thread_m=8, thread_n=8, stages=2, frag_k=2),
    "s64x96": dict(block_m=64, block_n=96, block_k=16, thread_m=8, thread_n=4, stages=2, frag_k=2),
}
H200_SMS = 132


def named_config(label: str) -> SimtConfig:
    if label not in CONFIGS:
        raise SimtError(f"unknown SIMT gemm config {label!r}; valid: {', '.join(CONFIGS)}")
    return SimtConfig.from_json(CONFIGS[label])


def choose_config(batch: int | None, m: int, n: int, k: int) -> str:
    """The config for a shape (batch entries each get their own tiles), by its grid of 64x64 tiles: fewer than
    two waves on the H200's SMs: s64t4 (BERT b4's FFN output: 1.05x over s64); N <= 64 and four waves or more:
    s128x64 (ResNet-18 b16's 56x56 3x3 conv: 1.14x); else s64."""
    blocks = (batch or 1) * math.ceil(m / 64) * math.ceil(n / 64)
    if blocks < 2 * H200_SMS:
        return "s64t4"
    if n <= 64 and blocks >= 4 * H200_SMS:
        return "s128x64"
    return "s64"


def _vec(n: int) -> int:
    v = SUB
    while v > 1 and n % v:
        v //= 2
    return v


def schedule_gemm(func, cfg: SimtConfig | None = None, check_size: bool = False):
    """An s_tir.Schedule of `func` (a matmul-like fp32 kernel, see the module docstring) with `cfg` (None: by
    `choose_config`). check_size: refuse extents below MIN_M / MIN_N / MIN_K (the relax rule). Raises SimtError
    when the kernel or the config does not fit."""
    try:
        return _schedule_gemm(func, cfg, check_size)
    except TensorCoreError as e:
        raise e if isinstance(e, SimtError) else SimtError(str(e)) from e
    except (RuntimeError, ValueError, TypeError, AttributeError) as e:   # TVM's ScheduleError / InternalError
        last = str(e).strip().splitlines()[-1][:500] if str(e).strip() else ""
        raise SimtError(f"the SIMT gemm schedule ({cfg.label if cfg else 'per shape'}) does not apply: "
                        f"{type(e).__name__}: {last}") from e


def _schedule_gemm(func, cfg: SimtConfig | None, check_size: bool):
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    _normalize(sch, "float32")
    block, trans_b, (m, n, k), batch = _batched_matmul_block(sch, "float32")
    if check_size and (m < MIN_M or n < MIN_N or k < MIN_K):
        raise SimtError(f"M, N, K = {m}, {n}, {k}: below the rule's minimum {MIN_M}, {MIN_N}, {MIN_K}")
    if batch is not None and batch > MAX_GRID_Z:
        raise SimtError(f"batch {batch} exceeds gridDim.z's limit {MAX_GRID_Z} (one batch entry per block)")
    cfg = cfg or named_config(choose_config(batch, m, n, k))
    ty_n, tx_n = cfg.block_m // cfg.thread_m, cfg.block_n // cfg.thread_n
    # B[N, K] sits in shared memory as rows of k, so a thread's columns are rows there: 4 consecutive ones put a
    # warp's loads 4 rows apart, in 2 of the 32 banks (BERT fp32's QK^T ran at 20 TFLOP/s against PV's 33). Its
    # columns are then sub-tiles of one (sub_n 1): virtual threads thread_n apart, neighbouring threads reading
    # neighbouring rows; the output columns are stored one by one, still coalesced across threads.
    sub_n = 1 if trans_b else SUB
    vm, vn = cfg.thread_m // SUB, cfg.thread_n // sub_n

    # Output row i of the block tile = bi * block_m + si * (block_m / vm) + ty * 4 + mi: thread ty's vm 4-row
    # sub-tiles lie block_m / vm apart (columns likewise), so a warp's threads read neighbouring vectors. si and
    # sj are virtual threads: the register buffers are sized per (si, sj) and replicated by TVM's
    # InjectVirtualThread, where serial loops would size them over the box from a thread's first row to its last.
    bz, i, j, r = padded_loops(sch, block, (cfg.block_m, cfg.block_n, cfg.block_k), (m, n, k), batch)
    bi, si, ty, mi = sch.split(i, factors=[None, vm, ty_n, SUB])
    bj, sj, tx, nj = sch.split(j, factors=[None, vn, tx_n, sub_n])
    k0, k1, k2 = sch.split(r, factors=[None, cfg.block_k // cfg.frag_k, cfg.frag_k])
    sch.reorder(bi, bj, si, sj, ty, tx, k0, k1, k2, mi, nj)
    if batch is not None:
        sch.bind(bz, "blockIdx.z")
    sch.bind(bi, "blockIdx.y")
    sch.bind(bj, "blockIdx.x")
    sch.bind(si, "vthread.y")
    sch.bind(sj, "vthread.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")

    # accumulators in registers, stored with the epilogue after the K loop
    c_loc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(c_loc, tx, preserve_unit_loops=True)

    # global -> shared (dynamic: more than 48 KiB), 16-byte vectors where the row length allows, rows padded by
    # 4 words (bank spread): A's rows are block_k wide, B's block_n ([K, N]) or block_k ([N, K])
    stage_shared(sch, block, 0, k0, (ty_n, tx_n), _vec(k), (cfg.block_k + SUB) % 32)
    stage_shared(sch, block, 1, k0, (ty_n, tx_n), _vec(k if trans_b else n),
                 ((cfg.block_k if trans_b else cfg.block_n) + SUB) % 32)

    # shared -> registers every frag_k steps: A's 4 rows x frag_k, B's frag_k x 4 columns (per virtual thread)
    for idx in (0, 1):
        loc = sch.cache_read(block, idx, "local")
        sch.compute_at(loc, k1)
        inner = cfg.frag_k if idx == 0 or trans_b else SUB     # A and B[N, K]: k; B[K, N]: columns
        *rest, last = sch.get_loops(loc)[-(2 if batch is None else 3):]     # the copy's own loops
        vo, v = sch.split(last, factors=[None, min(LOCAL_LANES, inner)])
        sch.vectorize(v)                          # A [.., row, k]: k; B [k, col]: columns, [col, k]: k
        for loop in (*rest, vo):
            sch.unroll(loop)
    # k1 unrolled too: the compiler can then load the next fragments while this step's FMAs run
    for loop in (k1, k2, mi, nj):
        sch.unroll(loop)

    _inline_consumers(sch, c_loc)
    sch.decompose_reduction(block, k0)
    if n % SUB == 0 and sub_n == SUB:
        sch.vectorize(sch.get_loops(c_loc)[-1])

    s = min(cfg.stages, math.ceil(k / cfg.block_k))
    if s >= 2:                                    # copies run s - 1 K steps ahead of the compute
        sch.annotate(k0, "software_pipeline_stage", [0, 0, s - 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
    return sch


def scheduled_func(func, cfg: SimtConfig | None = None):
    """The scheduled PrimFunc (marked scheduled, so the relax pipeline's dlight pass leaves it alone)."""
    return schedule_gemm(func, cfg).mod["main"].with_attr("tirx.is_scheduled", True)


def build(func, target, cfg: SimtConfig | None = None):
    """tvm.compile of one scheduled gemm for `target`, with cp.async enabled."""
    import tvm
    f = scheduled_func(func, cfg)
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        return tvm.compile(tvm.IRModule({"main": f}), target=target)


def gemm_func(m: int, n: int, k: int, b_layout: str = "kn", batch: int | None = None):
    """C[m, n] = A[m, k] x B ([k, n] for "kn", [n, k] for "nk"), all fp32; batch: `batch` independent matmuls
    C[b, m, n] = A[b, m, k] x B[b, ...]. Returns a PrimFunc (main), for the benchmark and the tests."""
    from tvm import te
    if b_layout not in ("kn", "nk"):
        raise SimtError(f"b_layout must be 'kn' (B[K, N]) or 'nk' (B[N, K]), got {b_layout!r}")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise SimtError(f"batch must be None or a positive integer, got {batch!r}")
    lead = () if batch is None else (batch,)
    a = te.placeholder(lead + (m, k), "float32", name="A")
    b = te.placeholder(lead + ((k, n) if b_layout == "kn" else (n, k)), "float32", name="B")
    r = te.reduce_axis((0, k), name="k")

    def bval(q, j):
        return b[q + ((r, j) if b_layout == "kn" else (j, r))]

    if batch is None:
        c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * bval((), j), axis=[r]), name="C")
    else:
        c = te.compute((batch, m, n), lambda q, i, j: te.sum(a[q, i, r] * bval((q,), j), axis=[r]), name="C")
    return te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")
