"""The CPU worker: real TVM (llvm) execution of artifacts with the worker state machine of `base.py`. Host
memory stands in for each "GPU": one numpy arena per GPU cut into cache pages, and one for its io pool, so
weights really move page by page into the cache and models really run on weights bound inside it. This is
what CI exercises end to end with real compiled models.

Executors are threads (one per queue), as on CUDA; there are no streams, so each step's duration is its wall
time. The SM clock in results is 0."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from workbench.clock import Clock
from workbench.contract import LoadModelFromDisk, Result, Timing, make_timing
from workbench.worker.base import (Device, ModelEntry, MonotonicClock, StagedViews, Worker, entry_from_artifact,
                                   open_artifact, used_bytes_per_run)
from workbench.worker.config import ConfigError, WorkerConfig
from workbench.worker.page_cache import Allocation

ALIGN = 256


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array whose data is 256-byte aligned (pages untouched until written)."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = (-raw.ctypes.data) % ALIGN
    return raw[skip:skip + nbytes]


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class CPUModel:
    """Shared by all copies of one model: the loaded kernels and the host weights (read once), and the VM
    function per batch size (called directly on the hot path, see `execute`)."""
    __slots__ = ("artifact", "loaded", "host_weights", "run_bytes", "fns")

    def __init__(self, artifact: Any, loaded: Any, host_weights: np.ndarray):
        self.artifact, self.loaded, self.host_weights = artifact, loaded, host_weights
        self.run_bytes = used_bytes_per_run(artifact)
        self.fns = loaded.functions


class _Staged:
    """Inputs staged in a GPU's io arena for one (offset, model, batch): numpy views and their TVM views. Both
    are views of fixed memory, so one instance is reused by every Infer staged at the same place."""
    __slots__ = ("arrays", "tvm")

    def __init__(self, arrays: list, tvm_args: tuple):
        self.arrays, self.tvm = arrays, tvm_args


class CPUDevice(Device):
    name = "cpu"
    threaded = True

    def __init__(self) -> None:
        self.arenas: list[np.ndarray] = []
        self.io_arenas: list[np.ndarray] = []
        self.page_size = 0
        self.views = StagedViews()

    def setup(self, worker: Worker) -> None:
        cfg = worker.config
        per_gpu = cfg.num_pages * cfg.page_size + cfg.io_pool_size
        avail = mem_available()
        if avail is not None and per_gpu * worker.num_gpus > avail:
            raise ConfigError(
                f"worker config ({cfg.source}) needs {per_gpu * worker.num_gpus / 2**30:.2f} GiB of host memory for "
                f"{worker.num_gpus} CPU device(s) (weights_cache_size + io_pool_size each) but only "
                f"{avail / 2**30:.2f} GiB is available: lower weights_cache_size in a config file "
                f"($WORKBENCH_CONFIG or WorkerConfig.load(path, weights_cache_size=...))")
        self.page_size = cfg.page_size
        for _ in range(worker.num_gpus):
            self.arenas.append(aligned_empty(cfg.num_pages * cfg.page_size))
            self.io_arenas.append(aligned_empty(cfg.io_pool_size))
        import tvm
        self.tvm_device = tvm.cpu(0)

    # -- models
    def open_model(self, action: LoadModelFromDisk, now: int) -> tuple[ModelEntry, Timing]:
        t0 = time.monotonic_ns()
        art = open_artifact(action.path, "cpu", self.page_size)
        host = art.read_weights()                       # once, shared by every copy
        loaded = art.load(self.tvm_device)              # each b{N}.so once, shared by every copy
        entry = entry_from_artifact(art, action.path)
        entry.handle = CPUModel(art, loaded, host)
        entry.host_weights_bytes = host.nbytes
        t1 = time.monotonic_ns()
        return entry, Timing(t0, t1, t1 - t0)

    def _pages(self, gpu: int, entry: ModelEntry, alloc: Allocation) -> list[np.ndarray]:
        ps, arena = self.page_size, self.arenas[gpu]
        pages: list[np.ndarray] = [None] * alloc.num_pages  # type: ignore[list-item]
        for first, c, n in alloc.runs:
            pages[first] = arena[c * ps:(c + n) * ps]
            for k in range(1, n):
                pages[first + k] = arena[(c + k) * ps:(c + k + 1) * ps]
        return pages

    def release_model(self, entry: ModelEntry) -> None:
        entry.handle = None   # host weights and kernels go with the last reference (Worker.close, failed loads)

    def load_weights(self, gpu: int, entry: ModelEntry, alloc: Allocation, now: int) -> tuple[Timing, Any]:
        m: CPUModel = entry.handle
        ps, arena = self.page_size, self.arenas[gpu]
        t0 = time.monotonic_ns()
        for first, c, n in alloc.runs:   # each run's used bytes, as the GPU worker transfers them
            nb = m.run_bytes[first]
            arena[c * ps:c * ps + nb] = m.host_weights[first * ps:first * ps + nb]
        t1 = time.monotonic_ns()
        binding = m.loaded.bind_weights(self._pages(gpu, entry, alloc))
        return Timing(t0, t1, t1 - t0), binding

    def _staged(self, gpu: int, entry: ModelEntry, batch: int, io_offset: int) -> _Staged:
        """The views of the inputs of (entry, batch) at io_offset of this GPU's io arena (made once, cached)."""
        key = (gpu, io_offset, entry, batch)
        st = self.views.get(key)
        if st is None:
            import tvm
            arena = self.io_arenas[gpu]
            arrays, off = [], io_offset
            for spec in entry.inputs:
                nbytes = spec.nbytes * batch
                arrays.append(arena[off:off + nbytes].view(spec.dtype).reshape((batch, *spec.shape)))
                off += -(-nbytes // ALIGN) * ALIGN
            # zero-copy TVM views, as LoadedArtifact.run makes of aligned contiguous numpy inputs
            st = self.views.put(key, _Staged(arrays, tuple(tvm.runtime.from_dlpack(x) for x in arrays)))
        return st

    def copy_input(self, gpu: int, entry: ModelEntry, batch: int, n: int, inputs: Sequence[np.ndarray] | None,
                   io_offset: int, host_offset: int, now: int, exec_next: bool = False) -> tuple[Timing, Any]:
        t0 = time.monotonic_ns()
        staged = self._staged(gpu, entry, batch, io_offset)
        for i, view in enumerate(staged.arrays):
            if inputs is None:
                view[...] = 0                    # generated input (allow_zero_size_inputs)
            elif n == batch:
                view[...] = inputs[i]
            else:
                view[:n] = inputs[i]
                view[n:] = 0                     # padding rows: defined values, results discarded
        t1 = time.monotonic_ns()
        return make_timing(t0, t1, t1 - t0), staged

    def execute(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any,
                now: int) -> tuple[Timing, Any, int, int]:
        fn = entry.handle.fns[batch]
        t0 = time.monotonic_ns()
        # LoadedArtifact.run without its per-call checks, which hold by construction here: the staged views
        # have the spec's shapes and dtypes, and the binding was made by this model's bind_weights.
        out = fn(*staged.tvm, *binding.tensors)
        outs = [o.numpy() for o in (list(out) if not hasattr(out, "shape") else [out])]
        t1 = time.monotonic_ns()
        return make_timing(t0, t1, t1 - t0), outs, 0, 0

    def copy_output(self, gpu: int, entry: ModelEntry, outputs: Any, n: int, host_offset: int,
                    now: int) -> tuple[Timing, tuple[np.ndarray, ...] | None]:
        t0 = time.monotonic_ns()
        # each output is a fresh array of this exec (numpy() copies): the first n rows are copied out only
        # when padding rows are to be dropped
        host = tuple(o if o.shape[0] == n else np.array(o[:n]) for o in outputs)
        t1 = time.monotonic_ns()
        return make_timing(t0, t1, t1 - t0), host

    def close(self) -> None:
        self.views.clear()
        self.arenas.clear()
        self.io_arenas.clear()


class CPUWorker(Worker):
    """`CPUWorker(config, on_result, num_gpus=1, clock=None)`: `num_gpus` host-memory "GPUs", each with its own
    weights cache and queues. `clock` must be a real-time clock (default: monotonic time, as RealClock)."""

    def __init__(self, config: WorkerConfig | None = None, on_result: Callable[[Result], None] | None = None,
                 num_gpus: int = 1, clock: Clock | None = None):
        if clock is not None and clock.virtual:
            raise ValueError("CPUWorker runs real computations: give it a real-time clock (or none), "
                             "not a VirtualClock; use EmulatedWorker for virtual time")
        super().__init__(CPUDevice(), num_gpus, config, on_result or (lambda r: None), clock or MonotonicClock())
