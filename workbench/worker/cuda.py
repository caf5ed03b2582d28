"""The CUDA worker: the worker state machine of `base.py` on NVIDIA GPUs, through cupy and the TVM runtime
(Clockwork's worker, clockwork.md §1.4, §2.3, §3.1).

Per GPU:
- one weights cache allocated once (cudaMalloc of weights_cache_size) and cut into pages; a model's weights
  are bound in place as DLPack views at (page, offset), so loading is page copies and nothing else;
- an io arena (io_pool_size) holding staged inputs; TVM allocates outputs and intermediates from its own
  pooled allocator (measured bounded by the largest model/batch, h200-baseline.md), which the workspace pool
  accounts for and the free-memory check reserves room for;
- executor threads (weights, inputs, exec, outputs), each with its own non-blocking CUDA stream (inputs and
  outputs at higher priority), durations from CUDA events recorded on those streams;
- the SM clock read through NVML while each exec runs (after its launch, and again before its end when it is
  still running), so the reads overlap the GPU work.
Process-wide: host weights in pinned memory, read once per model and shared by all its copies; a pinned host
io arena (host_io_pool_size) for inputs and outputs.

Importing this module needs neither cupy nor a GPU; constructing a CUDAWorker without one fails clearly."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from workbench.clock import Clock
from workbench.contract import LoadModelFromDisk, Result, Timing
from workbench.worker.base import (Device, ModelEntry, MonotonicClock, Worker, entry_from_artifact, open_artifact,
                                   used_bytes_per_run)
from workbench.worker.config import WorkerConfig
from workbench.worker.page_cache import Allocation

ALIGN = 256
H2D, D2H = 1, 2     # cudaMemcpyKind


class CUDAUnavailable(RuntimeError):
    """No usable CUDA device (or no cupy): the message says which and what to use instead."""


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise CUDAUnavailable(f"CUDAWorker needs cupy (pip install 'workbench[gpu]', cupy-cuda13x): {e}. On a "
                              f"machine without a GPU use CPUWorker or EmulatedWorker") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - cudaErrorNoDevice / InsufficientDriver
        raise CUDAUnavailable(f"CUDAWorker needs an NVIDIA GPU and driver: {type(e).__name__}: {e}. On a machine "
                              f"without a GPU use CPUWorker or EmulatedWorker") from None
    if n == 0:
        raise CUDAUnavailable("CUDAWorker found no CUDA device: use CPUWorker or EmulatedWorker")
    return cupy


class SMClock:
    """SM clock in MHz through NVML; 0 where NVML is unavailable."""

    def __init__(self, devices: Sequence[int]):
        self.handles: dict[int, Any] = {}
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            for d in devices:
                self.handles[d] = pynvml.nvmlDeviceGetHandleByIndex(d)
        except Exception:  # noqa: BLE001 - clocks are telemetry, never a reason to fail
            self.nvml = None

    def read(self, device: int) -> int:
        h = self.handles.get(device)
        if h is None:
            return 0
        try:
            return int(self.nvml.nvmlDeviceGetClockInfo(h, self.nvml.NVML_CLOCK_SM))
        except Exception:  # noqa: BLE001
            return 0


class CUDAModel:
    """Shared by all copies of a model: pinned host weights (once), kernels loaded once per GPU, and how many
    bytes of each page run are used (the unused tail of the last page is not transferred)."""
    __slots__ = ("artifact", "loaded", "host_weights", "host_mem", "run_bytes")

    def __init__(self, artifact: Any, loaded: dict[int, Any], host_weights: np.ndarray, host_mem: Any,
                 run_bytes: dict[int, int]):
        self.artifact, self.loaded, self.host_weights, self.host_mem = artifact, loaded, host_weights, host_mem
        self.run_bytes = run_bytes


class CUDADevice(Device):
    name = "cuda"
    threaded = True

    def __init__(self, devices: Sequence[int] | None = None, sync_each_page: bool = False):
        self.cp = _cupy()
        n = self.cp.cuda.runtime.getDeviceCount()
        self.devices = list(range(n)) if devices is None else list(devices)
        bad = [d for d in self.devices if not 0 <= d < n]
        if bad:
            raise CUDAUnavailable(f"CUDA device(s) {bad} do not exist: this machine has devices 0..{n - 1}")
        self.sync_each_page = sync_each_page   # Clockwork synchronises after every 16 MiB chunk (rate limit)
        self.clock = SMClock(self.devices)
        self._local = threading.local()        # per executor thread: its streams (one thread per (gpu, kind))
        self.cache_mem: list[Any] = []
        self.cache: list[Any] = []             # uint8 cupy array over each GPU's weights cache
        self.io_mem: list[Any] = []
        self.io: list[Any] = []
        self.host_io_mem: Any = None
        self.host_io: np.ndarray | None = None
        self.page_size = 0

    # -- setup
    def gpu_memory_info(self, gpu: int) -> tuple[int, int]:
        with self.cp.cuda.Device(self.devices[gpu]):
            free, total = self.cp.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def setup(self, worker: Worker) -> None:
        cp, cfg = self.cp, worker.config
        if worker.num_gpus > len(self.devices):
            raise CUDAUnavailable(f"CUDAWorker asked for {worker.num_gpus} GPUs, devices {self.devices} available")
        self.devices = self.devices[:worker.num_gpus]
        self.page_size = cfg.page_size
        for g, d in enumerate(self.devices):
            with cp.cuda.Device(d):
                free, _ = cp.cuda.runtime.memGetInfo()
                name = cp.cuda.runtime.getDeviceProperties(d)["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                cfg.check_fits(int(free), f"GPU {d} ({name})")
                size = cfg.num_pages * cfg.page_size
                mem = cp.cuda.Memory(size)                      # one cudaMalloc, never returned to a pool
                self.cache_mem.append(mem)
                self.cache.append(cp.ndarray((size,), cp.uint8, cp.cuda.MemoryPointer(mem, 0)))
                iom = cp.cuda.Memory(cfg.io_pool_size)
                self.io_mem.append(iom)
                self.io.append(cp.ndarray((cfg.io_pool_size,), cp.uint8, cp.cuda.MemoryPointer(iom, 0)))
        self.host_io_mem = cp.cuda.alloc_pinned_memory(cfg.host_io_pool_size)
        self.host_io = np.frombuffer(self.host_io_mem, np.uint8, cfg.host_io_pool_size)
        import tvm
        self.tvm = tvm

    def _stream(self, kind: str, gpu: int):
        """This thread's stream (executor threads are one per (gpu, kind), so one stream each)."""
        s = getattr(self._local, "stream", None)
        if s is None:
            with self.cp.cuda.Device(self.devices[gpu]):
                prio = -1 if kind in ("inputs", "outputs") else 0
                try:
                    s = self.cp.cuda.Stream(non_blocking=True, priority=prio)
                except TypeError:   # older cupy without stream priorities
                    s = self.cp.cuda.Stream(non_blocking=True)
            self._local.stream = s
        return s

    def _events(self):
        ev = getattr(self._local, "events", None)
        if ev is None:
            ev = self._local.events = (self.cp.cuda.Event(), self.cp.cuda.Event())
        return ev

    def _timed(self, stream, start_ev, end_ev, t0: int) -> Timing:
        end_ev.synchronize()
        t1 = time.monotonic_ns()
        ms = self.cp.cuda.get_elapsed_time(start_ev, end_ev)
        return Timing(t0, t1, int(round(ms * 1e6)))

    # -- models
    def open_model(self, action: LoadModelFromDisk, now: int) -> tuple[ModelEntry, Timing]:
        t0 = time.monotonic_ns()
        art = open_artifact(action.path, "cuda", self.page_size)
        pageable = art.read_weights()
        mem = self.cp.cuda.alloc_pinned_memory(pageable.nbytes)   # pinned once, shared by every copy
        host = np.frombuffer(mem, np.uint8, pageable.nbytes)
        host[:] = pageable
        del pageable
        loaded = {}
        for g, d in enumerate(self.devices):                      # kernels once per GPU, shared by copies
            with self.cp.cuda.Device(d):
                loaded[g] = art.load(self.tvm.cuda(d))
        entry = entry_from_artifact(art, action.path)
        entry.handle = CUDAModel(art, loaded, host, mem, used_bytes_per_run(art))
        entry.host_weights_bytes = host.nbytes
        t1 = time.monotonic_ns()
        return entry, Timing(t0, t1, t1 - t0)

    def release_model(self, entry: ModelEntry) -> None:
        entry.handle = None

    def _pages(self, gpu: int, alloc: Allocation) -> list:
        ps, arena = self.page_size, self.cache[gpu]
        pages: list = [None] * alloc.num_pages
        for first, c, n in alloc.runs:
            pages[first] = arena[c * ps:(c + n) * ps]
            for k in range(1, n):
                pages[first + k] = arena[(c + k) * ps:(c + k + 1) * ps]
        return pages

    # -- timed work
    def load_weights(self, gpu: int, entry: ModelEntry, alloc: Allocation, now: int) -> tuple[Timing, Any]:
        cp, m = self.cp, entry.handle
        ps = self.page_size
        with cp.cuda.Device(self.devices[gpu]):
            stream = self._stream("weights", gpu)
            start, end = self._events()
            src0, dst0 = m.host_weights.ctypes.data, self.cache[gpu].data.ptr
            t0 = time.monotonic_ns()
            start.record(stream)
            for first, c, n in alloc.runs:
                left = m.run_bytes[first]
                for k in range(n):          # page by page (16 MiB chunks)
                    nbytes = min(ps, left)
                    if nbytes <= 0:
                        break
                    cp.cuda.runtime.memcpyAsync(dst0 + (c + k) * ps, src0 + (first + k) * ps, nbytes, H2D, stream.ptr)
                    if self.sync_each_page:
                        stream.synchronize()
                    left -= nbytes
            end.record(stream)
            timing = self._timed(stream, start, end, t0)
            binding = m.loaded[gpu].bind_weights(self._pages(gpu, alloc))
        return timing, binding

    def copy_input(self, gpu: int, entry: ModelEntry, batch: int, n: int, inputs: Sequence[np.ndarray] | None,
                   io_offset: int, host_offset: int, now: int) -> tuple[Timing, Any]:
        cp = self.cp
        with cp.cuda.Device(self.devices[gpu]):
            stream = self._stream("inputs", gpu)
            start, end = self._events()
            io, host = self.io[gpu], self.host_io
            t0 = time.monotonic_ns()
            staged, off, hoff = [], io_offset, host_offset
            if inputs is not None:           # into pinned memory first, so the H2D copy is async and fast
                for x, spec in zip(inputs, entry.inputs):
                    nb = spec.nbytes * n
                    host[hoff:hoff + nb] = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
                    hoff += -(-nb // ALIGN) * ALIGN
            hoff = host_offset
            start.record(stream)
            for spec in entry.inputs:
                nb, full = spec.nbytes * n, spec.nbytes * batch
                dst = io.data.ptr + off
                if inputs is not None:
                    cp.cuda.runtime.memcpyAsync(dst, host.ctypes.data + hoff, nb, H2D, stream.ptr)
                    hoff += -(-nb // ALIGN) * ALIGN
                else:
                    nb = 0                   # generated input: zeros
                if full > nb:
                    cp.cuda.runtime.memsetAsync(dst + nb, 0, full - nb, stream.ptr)
                staged.append(io[off:off + full].view(spec.dtype).reshape((batch, *spec.shape)))
                off += -(-full // ALIGN) * ALIGN
            end.record(stream)
            timing = self._timed(stream, start, end, t0)
        return timing, staged

    def execute(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any,
                now: int) -> tuple[Timing, Any, int, int]:
        cp = self.cp
        d = self.devices[gpu]
        with cp.cuda.Device(d):
            stream = self._stream("exec", gpu)
            start, end = self._events()
            t0 = time.monotonic_ns()
            start.record(stream)
            outs = entry.handle.loaded[gpu].run(batch, staged, binding, stream=stream)
            end.record(stream)
            # NVML reads cost tens of us each: take them while the GPU executes what was just launched, so
            # they sample the clock under this exec's load and stay off the critical path.
            before = self.clock.read(d)
            after = before if end.done else self.clock.read(d)
            timing = self._timed(stream, start, end, t0)
        return timing, outs, before, after

    def copy_output(self, gpu: int, entry: ModelEntry, outputs: Any, n: int, host_offset: int,
                    now: int) -> tuple[Timing, tuple[np.ndarray, ...] | None]:
        cp = self.cp
        with cp.cuda.Device(self.devices[gpu]):
            stream = self._stream("outputs", gpu)
            start, end = self._events()
            host = self.host_io
            t0 = time.monotonic_ns()
            start.record(stream)
            views, hoff = [], host_offset
            for o, spec in zip(outputs, entry.outputs):
                with stream:                 # a non-contiguous output would be copied on this stream
                    o = cp.ascontiguousarray(o)
                nb = spec.nbytes * n
                cp.cuda.runtime.memcpyAsync(host.ctypes.data + hoff, o.data.ptr, nb, D2H, stream.ptr)
                views.append((hoff, nb, spec))
                hoff += -(-nb // ALIGN) * ALIGN
            end.record(stream)
            timing = self._timed(stream, start, end, t0)
            result = tuple(host[h:h + nb].view(spec.dtype).reshape((n, *spec.shape)).copy() for h, nb, spec in views)
        return timing, result

    def close(self) -> None:
        self.cache.clear()
        self.cache_mem.clear()
        self.io.clear()
        self.io_mem.clear()
        self.host_io = None
        self.host_io_mem = None


class CUDAWorker(Worker):
    """`CUDAWorker(config, on_result, num_gpus=None, devices=None, clock=None)`: one worker over `num_gpus` GPUs
    (default: all; `devices` picks which CUDA devices). `clock` must be real time (default: monotonic)."""

    def __init__(self, config: WorkerConfig | None = None, on_result: Callable[[Result], None] | None = None,
                 num_gpus: int | None = None, devices: Sequence[int] | None = None, clock: Clock | None = None,
                 sync_each_page: bool = False):
        if clock is not None and clock.virtual:
            raise ValueError("CUDAWorker runs on a real GPU: give it a real-time clock (or none), not a VirtualClock")
        device = CUDADevice(devices, sync_each_page)
        super().__init__(device, num_gpus or len(device.devices), config, on_result or (lambda r: None),
                         clock or MonotonicClock())
