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
  its input copy is enqueued without a sync (the exec stream waits for it on the GPU; when the exec launches
  at once, the copy goes on the exec stream straight into the slot its CUDA graph reads: `launch_ready` does that
  and the launch in one call for the worker's ready path), and the exec stream copies the outputs to pinned memory
  right after the model, so the exec thread's one wait covers both;
- the SM clock read through NVML while each exec runs (after its launch, and again before its end when it is
  still running), so the reads overlap the GPU work; an exec too short to sample reuses a recent reading.
Process-wide: host weights in pinned memory, read once per model and shared by all its copies. Inputs are
copied from where they lie (the driver stages pageable ones; python -m bench.input_copy), so the host io pool
(host_io_pool_size) only accounts for the inputs and outputs in flight, with no memory behind it. Outputs land
in one pinned buffer per GPU, grown to the largest exec's outputs (one exec per GPU at a time).

Importing this module needs neither cupy nor a GPU; constructing a CUDAWorker without one fails clearly."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from workbench.clock import Clock
from workbench.contract import LoadModelFromDisk, Result, Timing, make_timing
from workbench.worker.base import (Device, ModelEntry, MonotonicClock, StagedViews, Worker, entry_from_artifact,
                                   open_artifact, used_bytes_per_run)
from workbench.worker.config import WorkerConfig
from workbench.worker import cuda_graphs
from workbench.worker.page_cache import Allocation

ALIGN = 256
H2D, D2H, D2D = 1, 2, 3     # cudaMemcpyKind
SAMPLE_MIN_EXEC = 200_000    # ns: execs shorter than this are not sampled by NVML (see wait_exec)
CLOCK_MAX_AGE = 50_000_000   # ns: how old the SM clock reading that stands in for them may be
REHEARSE_MIN_LEFT = 100_000  # ns of exec left that a rehearsal of its ending may use (see wait_exec)


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
    __slots__ = ("artifact", "loaded", "host_weights", "host_mem", "run_bytes", "fns", "out_layout", "slot_views",
                 "warm", "expect_exec", "out_views")

    def __init__(self, artifact: Any, loaded: dict[int, Any], host_weights: np.ndarray, host_mem: Any,
                 run_bytes: dict[int, int]):
        self.artifact, self.loaded, self.host_weights, self.host_mem = artifact, loaded, host_weights, host_mem
        self.run_bytes = run_bytes
        self.fns = {g: lo.functions for g, lo in loaded.items()}       # per GPU: batch size -> VM function
        self.slot_views: dict[tuple, Any] = {}                            # (gpu, (entry, batch, slot)) -> _IOViews
        self.warm: set[tuple[int, int]] = set()                           # (gpu, batch) whose kernels are loaded
        self.out_layout: dict[int, tuple] = {}                           # per batch size, see _out_layout
        self.expect_exec: dict[tuple[int, int], int] = {}                # (gpu, batch) -> its length (ns): wait_exec
        self.out_views: dict[tuple[int, int], tuple] = {}                # (gpu, batch) -> (buffer, views), _out_views


class _IOViews:
    """The inputs of one (GPU, io offset, model, batch) in the io arena: device pointers and byte sizes, cupy
    views and TVM views of them. Fixed memory, so made once and reused by every Infer staged there. `copies`:
    per input, (device address, bytes of the batch, bytes per sample), what `_enqueue_inputs` reads."""
    __slots__ = ("ptrs", "full", "arrays", "tvm", "copies")

    def __init__(self, ptrs: list, full: list, arrays: list, tvm_args: tuple, per_sample: list):
        self.ptrs, self.full, self.arrays, self.tvm = ptrs, full, arrays, tvm_args
        self.copies = list(zip(ptrs, full, per_sample))


class _Staged:
    """Inputs enqueued for an exec: their place in the io arena (`views`), the events around their copy, the host
    sources kept alive, when the copy was enqueued (`t0`, ns) and, once `wait_exec` has read its duration from
    the events, its Timing (`timing`)."""
    __slots__ = ("views", "start", "done", "keep", "t0", "timing")

    def __init__(self, views: _IOViews, start: Any, done: Any, keep: list, t0: int):
        self.views, self.start, self.done, self.keep, self.t0, self.timing = views, start, done, keep, t0, None


class _Fetched:
    """Outputs of an exec (padded batch size `batch`) copied from pinned memory, and the timing of their copy."""
    __slots__ = ("host", "timing", "batch")

    def __init__(self, host: tuple, timing: Timing, batch: int):
        self.host, self.timing, self.batch = host, timing, batch


class _Ready:
    """An exec of one model copy and batch size on one GPU that launches in one step (the worker's ready path,
    `Worker._start_ready`): its CUDA graph is captured, reading this GPU's exec slot (`slot`, `views`) and writing
    its output buffer (`buf`, read through `outs`); valid while both are still the GPU's (they only ever grow).
    `captured` is what `cuda_graphs.capture` returned, (graph, the device outputs it writes): held here, so that
    the worker, which keeps a ready exec beyond its place in the binding's launch cache (`GPUModel.ready`), never
    replays a graph whose outputs were freed when that cache was emptied (`cuda_graphs.cache_for`)."""
    __slots__ = ("gpu", "device", "batch", "graph", "captured", "slot", "views", "buf", "outs", "m", "stream")

    def __init__(self, gpu: int, device: int, batch: int, captured: tuple, slot: Any, views: _IOViews,
                 buf: np.ndarray, outs: list, m: CUDAModel, stream: Any):
        self.gpu, self.device, self.batch, self.slot, self.views = gpu, device, batch, slot, views
        self.graph, self.captured = captured[0], captured
        self.buf, self.outs, self.m, self.stream = buf, outs, m, stream


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
        self._pinned: list[int] = []            # host ranges page-locked by register_host (unregistered at close)
        self._out: list[np.ndarray | None] = []  # per GPU: pinned buffer the exec copies outputs into
        self._free_events: list = []
        self._exec_streams: list[Any] = []      # per GPU: execs launch from any thread (one in flight per GPU)
        self._exec_events: list[tuple] = []     # per GPU: (start, end, outputs fetched)
        self._clock_seen: list[tuple[int, int]] = []   # per GPU: the latest SM clock reading (MHz, monotonic ns)
        self.views = StagedViews()               # (gpu, io offset, entry, batch) -> _IOViews
        self.page_size = 0
        self.graphs = False                      # replay execs as CUDA graphs (config cuda_graphs; cuda_graphs.py)
        self._capture_streams: list[Any] = []    # per GPU: where graphs are captured (nothing runs there)
        self._slots: list[Any] = []              # per GPU: the exec slot graphs read their inputs from
        self.graph_stats = {"launches": 0, "captures": 0, "failures": 0, "staged_in_slot": 0, "ready": 0}
        self.wake_ahead = 0                      # config exec_wake_ahead (wait_exec)
        self.rehearse = False                    # config exec_rehearse (wait_exec)

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
        self.wake_ahead = cfg.exec_wake_ahead
        self.rehearse = cfg.exec_rehearse
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
                self._clock_seen.append((0, 0))
                self._capture_streams.append(self._new_stream(0))
                self._slots.append(None)
        self.graphs = cfg.cuda_graphs and cuda_graphs.record_external() is not None
        import tvm
        import tvm_ffi
        self.tvm, self._ffi = tvm, tvm_ffi

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
            parts = []                      # page by page (16 MiB chunks)
            for first, c, n in alloc.runs:
                left = m.run_bytes[first]
                for k in range(n):
                    nbytes = min(ps, left)
                    if nbytes <= 0:
                        break
                    parts.append((dst0 + (c + k) * ps, src0 + (first + k) * ps, nbytes))
                    left -= nbytes
            graph = None
            if self.graphs and not self.sync_each_page:
                try:                        # one launch for every page (cuda_graphs.copies)
                    graph = cuda_graphs.copies(cp, self._stream("capture", gpu), parts, (start, end))
                except Exception:  # noqa: BLE001 - page by page below is just as correct
                    self.graph_stats["failures"] += 1
            t0 = time.monotonic_ns()
            if graph is not None:
                graph.launch(stream)
            else:
                start.record(stream)
                for dst, src, nbytes in parts:
                    cp.cuda.runtime.memcpyAsync(dst, src, nbytes, H2D, stream.ptr)
                    if self.sync_each_page:
                        stream.synchronize()
                end.record(stream)
            timing = self._timed(stream, start, end, t0)
            binding = m.loaded[gpu].bind_weights(self._pages(gpu, alloc))
        return timing, binding

    def copy_input(self, gpu: int, entry: ModelEntry, batch: int, n: int, inputs: Sequence[np.ndarray] | None,
                   io_offset: int, host_offset: int, now: int, exec_next: bool = False) -> tuple[Timing, Any]:
        """Enqueue the input copy on this GPU's input stream and return at once: the exec stream waits for it
        on the GPU (`_Staged.done`), and its duration is read from events after the exec (`input_timing`).
        `exec_next` (the exec of these inputs is launched next, before any other on this GPU) with CUDA graphs:
        the copy goes on the exec stream straight into the exec slot the graph reads, so the launch neither waits
        for another stream nor copies the inputs again on the device (one D2D copy and ~7 us of host per input).
        Every input is copied from where it lies: one in pinned memory (the process worker's shared memory) by
        DMA; a pageable one (a notebook's array) by the driver, which stages it itself. On the H200's host
        staging through pinned memory of our own lost by 1.2-1.5x at 2.4-9.6 MB, tied at 602 KB and was mixed
        between runs at 8 KB and below, where end to end through the worker the driver's copy won (python -m
        bench.input_copy)."""
        cp = self.cp
        with cp.cuda.Device(self.devices[gpu]):
            start, done = self._event_pair()
            if exec_next and self.graphs:
                stream, views = self._exec_streams[gpu], self._slot_views(gpu, entry, batch)
                self.graph_stats["staged_in_slot"] += 1
            else:
                stream = self._stream("inputs", gpu)
                views = self.views.get((gpu, io_offset, entry, batch))
                if views is None:
                    views = self._io_views(gpu, entry, batch, io_offset)
            t0 = time.monotonic_ns()
            keep = self._enqueue_inputs(stream, start, done, views, inputs, n)
            t1 = time.monotonic_ns()
        return make_timing(t0, t1, t1 - t0), _Staged(views, start, done, keep, t0)

    def _enqueue_inputs(self, stream: Any, start: Any, done: Any, views: _IOViews,
                        inputs: Sequence[np.ndarray] | None, n: int) -> list:
        """Enqueue on `stream`: record `start`, copy each input's n rows to `views` (padding rows and generated
        inputs zeroed), record `done`. Returns the host sources, to keep alive until the copies have read them."""
        rt = self.cp.cuda.runtime
        keep, sptr = [], stream.ptr
        start.record(stream)
        for i, (dst, full, per_sample) in enumerate(views.copies):
            if inputs is not None:
                nb = per_sample * n
                x = np.ascontiguousarray(inputs[i])
                keep.append(x)           # a pinned source must live until the DMA has read it
                rt.memcpyAsync(dst, x.ctypes.data, nb, H2D, sptr)
            else:
                nb = 0                   # generated input: zeros
            if full > nb:
                rt.memsetAsync(dst + nb, 0, full - nb, sptr)
        done.record(stream)
        return keep

    def _io_views(self, gpu: int, entry: ModelEntry, batch: int, io_offset: int) -> _IOViews:
        """Make (once per place) the views of (entry, batch)'s inputs at io_offset of this GPU's io arena: cupy
        arrays, and the zero-copy TVM views LoadedArtifact.run would make of them (256-byte aligned, contiguous)."""
        return self.views.put((gpu, io_offset, entry, batch), self._views_at(self.io[gpu].data, io_offset, entry, batch))

    def _views_at(self, base: Any, offset: int, entry: ModelEntry, batch: int) -> _IOViews:
        cp, tvm = self.cp, self.tvm
        ptrs, full, arrays, off = [], [], [], offset
        for spec in entry.inputs:
            nb = spec.nbytes * batch
            ptrs.append(base.ptr + off)
            full.append(nb)
            arrays.append(cp.ndarray((batch, *spec.shape), spec.dtype, base + off))
            off += -(-nb // ALIGN) * ALIGN
        return _IOViews(ptrs, full, arrays, tuple(tvm.runtime.from_dlpack(a) for a in arrays),
                        [spec.nbytes for spec in entry.inputs])

    def _slot_views(self, gpu: int, entry: ModelEntry, batch: int) -> _IOViews:
        """Views of (entry, batch)'s inputs in this GPU's exec slot: the one place graphs read inputs from (one
        exec per GPU at a time), so a graph does not depend on where the io pool staged an Infer's inputs.
        The slot grows to the largest inputs seen (its address is part of every graph's key)."""
        slot = self._slots[gpu]
        if slot is not None:
            views = entry.handle.slot_views.get((gpu, (entry, batch, slot.ptr)))
            if views is not None:     # made for this slot: it is large enough
                return views
        need = sum(-(-s.nbytes * batch // ALIGN) * ALIGN for s in entry.inputs)
        if slot is None or slot.mem.size < need:
            slot = self._slots[gpu] = self.cp.cuda.alloc(max(need, 1 << 20))   # views of the old slot keep it alive
        key = (entry, batch, slot.ptr)
        views = entry.handle.slot_views.get((gpu, key))
        if views is None:
            views = entry.handle.slot_views[(gpu, key)] = self._views_at(slot, 0, entry, batch)
        return views

    def register_host(self, address: int, size: int) -> None:
        """Page-lock host memory that Infer inputs will come from (the process worker's shared memory): inputs
        lying there are DMA-copied in place, where the driver stages pageable ones. Unregistered when the worker
        closes (the memory must outlive the worker: a range freed while registered stays mapped in the driver, and
        a later allocation there fails with cudaErrorAlreadyMapped)."""
        self.cp.cuda.runtime.hostRegister(address, size, 0)
        self._pinned.append(address)

    def _event_pair(self):
        """A (start, done) pair of events for one input copy, reused once its exec has read them."""
        try:
            return self._free_events.pop()
        except IndexError:
            return self.cp.cuda.Event(), self.cp.cuda.Event()

    def input_timing(self, timing: Timing, staged: Any) -> Timing:
        return staged.timing if isinstance(staged, _Staged) else timing     # made by wait_exec

    def execute(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any,
                now: int) -> tuple[Timing, Any, int, int]:
        return self.wait_exec(self.launch_exec(gpu, entry, binding, batch, staged, now))

    def launch_exec(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any, now: int) -> Any:
        """Enqueue the model after the input copy (a GPU-side wait), then the copy of its outputs to this GPU's
        pinned output buffer on the same stream; returns without waiting. One exec per GPU is in flight (the
        exec executor), so the per-GPU events and buffer are this exec's until `wait_exec` returns."""
        cp = self.cp
        d = self.devices[gpu]
        m = entry.handle
        fn = m.fns[gpu][batch]
        layout = m.out_layout.get(batch)
        if layout is None:
            layout = self._out_layout(entry, batch)
        total, spans = layout
        with cp.cuda.Device(d):
            stream = self._exec_streams[gpu]
            sptr = stream.ptr
            start, end, fetched = self._exec_events[gpu]
            buf = self._out_buffer(gpu, total)
            if (gpu, batch) not in m.warm:
                # The function's first call loads its kernels (milliseconds, and not allowed during a capture):
                # make it an untimed call on this stream, so no exec's measured duration includes it.
                with self._ffi.use_raw_stream(m.loaded[gpu].device, sptr):
                    fn(*staged.views.tvm, *binding.tensors)
                m.warm.add((gpu, batch))
            if self.graphs:
                slot = self._slot_views(gpu, entry, batch)
                key = (batch, slot.ptrs[0] if slot.ptrs else 0, buf.ctypes.data)
                graph = binding.launch_cache.get(key)
                if graph is None:        # the first exec of this copy and batch size since its weights loaded
                    graph = self._capture(gpu, key, fn, slot, binding, m.loaded[gpu].device, buf, spans)
                    if graph is not cuda_graphs.NO_GRAPH:
                        outs = self._out_views(m, gpu, batch, buf, spans)
                        binding.launch_cache[("ready", batch)] = _Ready(gpu, d, batch, graph, self._slots[gpu],
                                                                         slot, buf, outs, m, stream)
                if graph is not cuda_graphs.NO_GRAPH:
                    t0 = time.monotonic_ns()
                    if staged.views is not slot:   # staged in the io arena (exec_next was not given)
                        stream.wait_event(staged.done)
                        for src, dst, nb in zip(staged.views.ptrs, slot.ptrs, staged.views.full):
                            cp.cuda.runtime.memcpyAsync(dst, src, nb, D2D, sptr)
                    graph[0].launch(stream)            # records `start` itself, after the wait and the copies
                    self.graph_stats["launches"] += 1
                    return gpu, batch, t0, self._out_views(m, gpu, batch, buf, spans), m, staged
            t0 = time.monotonic_ns()
            stream.wait_event(staged.done)
            start.record(stream)
            # LoadedArtifact.run without its per-call checks, which hold by construction here (the staged views
            # have the spec's shapes and dtypes; the binding was made by this model's bind_weights), and without
            # converting inputs and outputs (TVM views of the io arena are cached in _IOViews)
            with self._ffi.use_raw_stream(m.loaded[gpu].device, sptr):
                out = fn(*staged.views.tvm, *binding.tensors)
            outs = list(out) if not hasattr(out, "shape") else [out]
            end.record(stream)
            base = buf.ctypes.data
            for o, (off, nb, _spec) in zip(outs, spans):
                if o.is_contiguous():
                    src = o.data_ptr()
                else:
                    with stream:             # a non-contiguous output would be copied on this stream
                        o = cp.ascontiguousarray(cp.from_dlpack(o))
                    src = o.data.ptr
                cp.cuda.runtime.memcpyAsync(base + off, src, nb, D2H, sptr)
            fetched.record(stream)
        return gpu, batch, t0, self._out_views(m, gpu, batch, buf, spans), m, staged

    def ready_exec(self, gpu: int, binding: Any, batch: int) -> _Ready | None:
        """The ready exec of this model copy (its weights' binding) and batch size on `gpu`, once its graph is
        captured (None: the tasks run it, capturing it). `launch_ready` checks that it is still valid."""
        return binding.launch_cache.get(("ready", batch)) if self.graphs else None

    def launch_ready(self, r: _Ready, inputs: Sequence[np.ndarray], n: int) -> tuple[Timing, _Staged, tuple] | None:
        """`copy_input(exec_next=True)` then `launch_exec` of a ready exec, without their lookups: the inputs go
        straight into the slot on the exec stream, then the graph launches. (copy timing, staged, launched), or
        None, with nothing enqueued, when the graph no longer reads this GPU's slot and output buffer."""
        if r.slot is not self._slots[r.gpu] or r.buf is not self._out[r.gpu]:
            return None
        rt = self.cp.cuda.runtime
        caller = rt.getDevice()             # (cupy's Device context cost 6 us more, cold, on the H200)
        if caller != r.device:
            rt.setDevice(r.device)
        try:
            stream = r.stream
            start, done = self._event_pair()
            t0 = time.monotonic_ns()
            keep = self._enqueue_inputs(stream, start, done, r.views, inputs, n)
            t1 = time.monotonic_ns()
            r.graph.launch(stream)
        finally:
            if caller != r.device:
                rt.setDevice(caller)
        stats = self.graph_stats
        stats["launches"] += 1
        stats["staged_in_slot"] += 1
        stats["ready"] += 1
        staged = _Staged(r.views, start, done, keep, t0)
        return make_timing(t0, t1, t1 - t0), staged, (r.gpu, r.batch, t1, r.outs, r.m, staged)

    def expected_exec(self, launched: tuple) -> int:
        gpu, batch, _, _, m, _ = launched
        return m.expect_exec.get((gpu, batch), 0)

    @staticmethod
    def _out_layout(entry: ModelEntry, batch: int) -> tuple[int, list]:
        """(bytes, [(offset, nbytes, spec)]) of the outputs of a batch in the pinned output buffer, each
        256-byte aligned (made once per model and batch size)."""
        spans, off = [], 0
        for spec in entry.outputs:
            nb = spec.nbytes * batch
            spans.append((off, nb, spec))
            off += -(-nb // ALIGN) * ALIGN
        layout = entry.handle.out_layout[batch] = (off, spans)
        return layout

    @staticmethod
    def _out_views(m: CUDAModel, gpu: int, batch: int, buf: np.ndarray, spans: list) -> list:
        """numpy views of a batch's outputs in this GPU's pinned output buffer `buf` (made once per buffer)."""
        hit = m.out_views.get((gpu, batch))
        if hit is None or hit[0] is not buf:
            hit = m.out_views[(gpu, batch)] = (buf, [buf[o:o + nb].view(spec.dtype).reshape((batch, *spec.shape))
                                                     for o, nb, spec in spans])
        return hit[1]

    def wait_exec(self, launched: Any, prepare: Callable[[bool], None] | None = None) -> tuple[Timing, Any, int, int]:
        """Wait once for the exec and its output copy; the outputs leave as numpy arrays (`_Fetched`).

        Python run right after a wait of milliseconds runs 2-4x slower than just after other work (on the H200's
        VM: python -m bench.worker_parts, part d), and what follows this wait is the path from the exec's end to
        its result. So when the exec's length is known (`expect_exec`), this thread sleeps until `wake_ahead` (and
        2% of that length, its variation) before the expected end, then reads the SM clock a second time and runs
        `prepare`, and only then waits, spinning, for the last stretch. With REHEARSE_MIN_LEFT or more of the exec
        still to run, it first rehearses its ending: the outputs are copied to the host (the last exec's values,
        overwritten once this one has ended) and `prepare(True)` rehearses the task's part. On the H200's VM
        that took 7-30 us off the end to end of ResNet-50 and BERT Infers (config exec_rehearse; paired medians of
        two bench.worker_exec runs); a short exec has no time to spare for it."""
        gpu, batch, t0, outs, m, staged = launched
        cp, d = self.cp, self.devices[gpu]
        start, end, fetched = self._exec_events[gpu]
        last = m.expect_exec.get((gpu, batch), 0)
        # NVML reads cost 3-20 us each: take them while the GPU executes what was launched, so they sample the
        # clock under this exec's load and stay off the critical path. An exec of tens of us (its last run was
        # shorter than SAMPLE_MIN_EXEC, or it is over already) gives no load to sample and would wait for the
        # read: the latest reading stands in while it is younger than CLOCK_MAX_AGE.
        sample = last >= SAMPLE_MIN_EXEC or not last
        if sample and not end.done:
            before = self.clock.read(d)
        else:
            sample = False
            before = after = self._recent_clock(gpu, d)
        if last and self.wake_ahead:
            sleep = t0 + last - last // 50 - self.wake_ahead - time.monotonic_ns()
            if sleep > 0:
                time.sleep(sleep / 1e9)
        if sample:
            after = before if end.done else self.clock.read(d)
            self._clock_seen[gpu] = (after, time.monotonic_ns())
        # the input copy ended before the exec started: its duration is read now, off the path to the result (and
        # just before the reads of the exec's own, which then run warm)
        staged.done.synchronize()
        ns = int(round(cp.cuda.get_elapsed_time(staged.start, staged.done) * 1e6))
        staged.timing = make_timing(staged.t0, staged.t0 + ns, ns)
        self._free_events.append((staged.start, staged.done))     # reused by a later copy (list ops are atomic)
        host = tuple([np.empty_like(v) for v in outs])
        rehearse = self.rehearse and last > 0 and t0 + last - last // 50 - time.monotonic_ns() > REHEARSE_MIN_LEFT
        if rehearse:
            for h, v in zip(host, outs):
                np.copyto(h, v)
        if prepare is not None:
            prepare(rehearse)
        fetched.synchronize()
        t1 = time.monotonic_ns()
        for h, v in zip(host, outs):
            np.copyto(h, v)
        exec_ns = int(round(cp.cuda.get_elapsed_time(start, end) * 1e6))
        # expected next time: this one if faster, else an eighth of the way up to it: one slow exec (beside a weights
        # load, say) barely moves it. An exec longer than expected only spins longer; a shorter one is seen late.
        m.expect_exec[(gpu, batch)] = exec_ns if exec_ns <= last or not last else last + (exec_ns - last) // 8
        out_ns = int(round(cp.cuda.get_elapsed_time(end, fetched) * 1e6))
        return (make_timing(t0, t1 - out_ns, exec_ns), _Fetched(host, make_timing(t1 - out_ns, t1, out_ns), batch),
                before, after)

    def _recent_clock(self, gpu: int, device: int) -> int:
        mhz, at = self._clock_seen[gpu]
        now = time.monotonic_ns()
        if now - at > CLOCK_MAX_AGE or mhz == 0:
            mhz = self.clock.read(device)
            self._clock_seen[gpu] = (mhz, now)
        return mhz

    def _capture(self, gpu: int, key: tuple, fn: Any, slot: _IOViews, binding: Any, tvm_device: Any,
                 buf: np.ndarray, spans: list) -> Any:
        """Capture (on a side stream: nothing runs) the graph of this model copy and batch size reading the exec
        slot; NO_GRAPH, remembered, if the model cannot be captured (it then runs through the VM)."""
        stream = self._capture_streams[gpu]

        def launch() -> list:
            with self._ffi.use_raw_stream(tvm_device, stream.ptr):
                out = fn(*slot.tvm, *binding.tensors)
            return list(out) if not hasattr(out, "shape") else [out]

        cache = cuda_graphs.cache_for(binding)
        try:
            graph = cuda_graphs.capture(self.cp, stream, launch, self._exec_events[gpu], buf.ctypes.data, spans)
            self.graph_stats["captures"] += 1
        except Exception:  # noqa: BLE001 - the VM path stays correct; counted in graph_stats
            graph = cuda_graphs.NO_GRAPH
            self.graph_stats["failures"] += 1
        cache[key] = graph
        return graph

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
        host = outputs.host
        return outputs.timing, host if n == outputs.batch else tuple(h[:n] for h in host)

    def close(self) -> None:
        self.views.clear()
        self.cache.clear()
        self.cache_mem.clear()
        self.io.clear()
        self.io_mem.clear()
        self._out.clear()
        self._slots.clear()
        pinned, self._pinned = self._pinned, []
        for lo in pinned:
            try:
                self.cp.cuda.runtime.hostUnregister(lo)
            except Exception:  # noqa: BLE001 - already unmapped by its owner: nothing left to release
                pass


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
