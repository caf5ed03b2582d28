"""The CUDA worker: the worker state machine of `base.py` on NVIDIA GPUs, through cupy and the TVM runtime
(Clockwork's worker, clockwork.md §1.4, §2.3, §3.1).

Per GPU:
- one weights cache allocated once (cudaMalloc of weights_cache_size) and cut into pages; a model's weights
  are bound in place as DLPack views at (page, offset), so loading is page copies and nothing else;
- an io arena (io_pool_size) holding staged inputs; TVM allocates outputs and intermediates from its own
  pooled allocator (measured bounded by the largest model/batch, h200-baseline.md), which the workspace pool
  accounts for and the free-memory check reserves room for;
- executor threads (weights, inputs, exec, outputs), each with its own non-blocking CUDA stream (inputs at
  higher priority), durations from CUDA events recorded on those streams. An Infer waits on the host once:
  its input copy is enqueued without a sync (the exec stream waits for it on the GPU), and the exec stream
  copies the outputs to pinned memory right after the model, so the exec thread's one wait covers both;
- the SM clock read through NVML while each exec runs (after its launch, and again before its end when it is
  still running), so the reads overlap the GPU work.
Process-wide: host weights in pinned memory, read once per model and shared by all its copies; a pinned host
io arena (host_io_pool_size) that stages pageable inputs (pinned inputs are read where they lie). Outputs land
in one pinned buffer per GPU, grown to the largest exec's outputs (one exec per GPU at a time).

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
STAGE_BELOW = 4 << 20   # pageable inputs smaller than this go through pinned staging (see copy_input)


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


class _Staged:
    """Inputs enqueued for an exec: device views, the events around their copy, the host sources kept alive."""
    __slots__ = ("arrays", "start", "done", "keep")

    def __init__(self, arrays: list, start: Any, done: Any, keep: list):
        self.arrays, self.start, self.done, self.keep = arrays, start, done, keep


class _Fetched:
    """Outputs of an exec already in pinned host memory, and the timing of their copy."""
    __slots__ = ("host", "timing")

    def __init__(self, host: list, timing: Timing):
        self.host, self.timing = host, timing


class CUDADevice(Device):
    name = "cuda"
    threaded = True
    async_exec = True

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
        self.host_io: np.ndarray | None = None   # pinned staging for pageable inputs
        self.host_io_ptr = 0
        self._out: list[np.ndarray | None] = []  # per GPU: pinned buffer the exec copies outputs into
        self._free_events: list = []
        self._exec_streams: list[Any] = []      # per GPU: execs launch from any thread (one in flight per GPU)
        self._exec_events: list[tuple] = []     # per GPU: (start, end, outputs fetched)
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
                self._out.append(None)
                self._exec_streams.append(self._new_stream(0))
                self._exec_events.append((cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()))
        self.host_io_mem = cp.cuda.alloc_pinned_memory(cfg.host_io_pool_size)
        self.host_io = np.frombuffer(self.host_io_mem, np.uint8, cfg.host_io_pool_size)
        self.host_io_ptr = self.host_io.ctypes.data
        import tvm
        self.tvm = tvm

    def _new_stream(self, priority: int):
        try:
            return self.cp.cuda.Stream(non_blocking=True, priority=priority)
        except TypeError:   # older cupy without stream priorities
            return self.cp.cuda.Stream(non_blocking=True)

    def _stream(self, kind: str, gpu: int):
        """This thread's stream for weights or inputs (a thread per (gpu, kind), or one submitting inline)."""
        streams = getattr(self._local, "streams", None)
        if streams is None:
            streams = self._local.streams = {}
        s = streams.get((kind, gpu))
        if s is None:
            with self.cp.cuda.Device(self.devices[gpu]):
                s = streams[(kind, gpu)] = self._new_stream(-1 if kind == "inputs" else 0)
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
        """Enqueue the input copy on this GPU's input stream and return at once: the exec stream waits for it
        on the GPU (`_Staged.done`), and its duration is read from events after the exec (`input_timing`).
        An input already in pinned memory (the process worker's shared memory) is copied from where it lies.
        A small pageable one (a notebook's array) is first staged at `host_offset` of the pinned host io arena
        (measured on the H200's host: a pageable cudaMemcpyAsync of 600 KB ~280 us, staging ~60 us); a large
        one is copied by the driver from where it lies (pageable H2D runs at 14.6 GB/s there, a host memcpy
        into pinned memory at 5.8-8 GB/s)."""
        cp = self.cp
        with cp.cuda.Device(self.devices[gpu]):
            stream = self._stream("inputs", gpu)
            start, done = self._event_pair()
            io = self.io[gpu]
            t0 = time.monotonic_ns()
            arrays, keep, off, hoff = [], [], io_offset, host_offset
            start.record(stream)
            for i, spec in enumerate(entry.inputs):
                nb, full = spec.nbytes * n, spec.nbytes * batch
                dst = io.data.ptr + off
                if inputs is not None:
                    x = np.ascontiguousarray(inputs[i])
                    if nb >= STAGE_BELOW or self._is_pinned(x):
                        keep.append(x)       # a pinned source must live until the DMA has read it
                        src = x.ctypes.data
                    else:
                        self.host_io[hoff:hoff + nb] = x.reshape(-1).view(np.uint8)
                        src = self.host_io_ptr + hoff
                        hoff += -(-nb // ALIGN) * ALIGN
                    cp.cuda.runtime.memcpyAsync(dst, src, nb, H2D, stream.ptr)
                else:
                    nb = 0                   # generated input: zeros
                if full > nb:
                    cp.cuda.runtime.memsetAsync(dst + nb, 0, full - nb, stream.ptr)
                arrays.append(cp.ndarray((batch, *spec.shape), spec.dtype, io.data + off))
                off += -(-full // ALIGN) * ALIGN
            done.record(stream)
            t1 = time.monotonic_ns()
        return Timing(t0, t1, t1 - t0), _Staged(arrays, start, done, keep)

    def _is_pinned(self, x: np.ndarray) -> bool:
        try:
            return self.cp.cuda.runtime.pointerGetAttributes(x.ctypes.data).type == 1   # cudaMemoryTypeHost
        except Exception:  # noqa: BLE001 - unknown: stage it (always correct)
            return False

    def _event_pair(self):
        """A (start, done) pair of events for one input copy, reused once its exec has read them."""
        try:
            return self._free_events.pop()
        except IndexError:
            return self.cp.cuda.Event(), self.cp.cuda.Event()

    def input_timing(self, timing: Timing, staged: Any) -> Timing:
        if not isinstance(staged, _Staged):
            return timing
        ns = int(round(self.cp.cuda.get_elapsed_time(staged.start, staged.done) * 1e6))   # both events are done
        self._free_events.append((staged.start, staged.done))
        return Timing(timing.begin, timing.begin + ns, ns)

    def execute(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any,
                now: int) -> tuple[Timing, Any, int, int]:
        return self.wait_exec(self.launch_exec(gpu, entry, binding, batch, staged, now))

    def launch_exec(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any, now: int) -> Any:
        """Enqueue the model after the input copy (a GPU-side wait), then the copy of its outputs to this GPU's
        pinned output buffer on the same stream; returns without waiting. One exec per GPU is in flight (the
        exec executor), so the per-GPU events and buffer are this exec's until `wait_exec` returns."""
        cp = self.cp
        d = self.devices[gpu]
        with cp.cuda.Device(d):
            stream = self._exec_streams[gpu]
            start, end, fetched = self._exec_events[gpu]
            t0 = time.monotonic_ns()
            stream.wait_event(staged.done)
            start.record(stream)
            outs = entry.handle.loaded[gpu].run(batch, staged.arrays, binding, stream=stream)
            end.record(stream)
            specs, total = entry.outputs, 0
            for spec in specs:
                total += -(-spec.nbytes * batch // ALIGN) * ALIGN
            buf = self._out_buffer(gpu, total)
            base = ptr = buf.ctypes.data
            spans = []
            for o, spec in zip(outs, specs):
                with stream:                 # a non-contiguous output would be copied on this stream
                    o = cp.ascontiguousarray(o)
                nb = spec.nbytes * batch
                cp.cuda.runtime.memcpyAsync(ptr, o.data.ptr, nb, D2H, stream.ptr)
                spans.append((ptr - base, nb, spec))
                ptr += -(-nb // ALIGN) * ALIGN
            fetched.record(stream)
        return gpu, batch, t0, buf, spans

    def wait_exec(self, launched: Any) -> tuple[Timing, Any, int, int]:
        """Wait once for the exec and its output copy; the outputs leave as numpy arrays (`_Fetched`)."""
        gpu, batch, t0, buf, spans = launched
        cp, d = self.cp, self.devices[gpu]
        start, end, fetched = self._exec_events[gpu]
        # NVML reads cost tens of us each: take them while the GPU executes what was launched, so they sample
        # the clock under this exec's load and stay off the critical path.
        before = self.clock.read(d)
        after = before if end.done else self.clock.read(d)
        fetched.synchronize()
        t1 = time.monotonic_ns()
        host = [buf[o:o + nb].view(spec.dtype).reshape((batch, *spec.shape)).copy() for o, nb, spec in spans]
        exec_ns = int(round(cp.cuda.get_elapsed_time(start, end) * 1e6))
        out_ns = int(round(cp.cuda.get_elapsed_time(end, fetched) * 1e6))
        return Timing(t0, t1 - out_ns, exec_ns), _Fetched(host, Timing(t1 - out_ns, t1, out_ns)), before, after

    def _out_buffer(self, gpu: int, nbytes: int) -> np.ndarray:
        """This GPU's pinned output buffer (used by its exec thread only), grown to the largest exec's outputs."""
        buf = self._out[gpu]
        if buf is None or buf.nbytes < nbytes:
            size = max(nbytes, 1 << 20)
            mem = self.cp.cuda.alloc_pinned_memory(size)
            buf = self._out[gpu] = np.frombuffer(mem, np.uint8, size)
        return buf

    def copy_output(self, gpu: int, entry: ModelEntry, outputs: Any, n: int, host_offset: int,
                    now: int) -> tuple[Timing, tuple[np.ndarray, ...] | None]:
        """The exec already brought the outputs to the host: the first n rows of each."""
        return outputs.timing, tuple(h[:n] for h in outputs.host)

    def close(self) -> None:
        self.cache.clear()
        self.cache_mem.clear()
        self.io.clear()
        self.io_mem.clear()
        self._out.clear()
        self.host_io = self.host_io_mem = None


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
