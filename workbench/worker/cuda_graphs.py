"""CUDA graphs for the CUDA worker's execs: the whole exec (start event, every kernel of the model, end event,
the copy of the outputs to pinned memory, fetched event) replayed by one native call.

Why: launched through TVM's VM, a ResNet-50 exec costs ~300 us of host time (BERT ~1 ms) spread over hundreds
of kernel launches, and the GPU idles whenever the launching thread waits (for the GIL, for a core). Measured
on the H200 (`.gpu/graph_probe.py`): a replay costs 6 us of host time, and device time p99/p50 falls from
1.008 to 1.002 for ResNet-50 b1, with outputs bit-identical to the VM's.

What a graph bakes in, and how each stays valid:
- the weights' addresses: a graph belongs to one `WeightBinding` (its `launch_cache`) and dies with it, so a
  model evicted and loaded again into other pages gets new graphs;
- the inputs' address: graphs read a per-GPU exec slot (one exec per GPU at a time). An Infer whose exec
  launches as soon as its inputs are enqueued copies them straight into the slot, on the exec stream; one staged
  while another exec runs is copied there on the GPU (D2D, a few us) before its graph's start event;
- the outputs' destination: the pinned output buffer's address is part of the key;
- the intermediates' addresses: TVM's pooled allocator hands the capture call blocks that it takes back when the
  call returns. Every exec on a GPU runs on that GPU's one exec stream, one at a time, so whoever uses those
  blocks next runs strictly before or after a replay. (TVM's pool returns memory to the driver only when an
  allocation fails: the workspace pool's accounting keeps the worker from getting there.)
- the events: the per-GPU start/end/fetched events, recorded by the graph itself (external event-record nodes),
  so the measured exec time cannot include a host stall between a launch and its first kernel.

A graph is captured (on a side stream; nothing runs) at the first exec of each model copy and batch size after
its weights are loaded: that exec starts ~1 ms later (ResNet-50's capture), every exec runs as a graph. (Before
the very first exec of a model's batch size on a GPU, an untimed call loads its kernels, which a capture may
not do.) A model whose capture fails runs through the VM."""
from __future__ import annotations

import functools
from typing import Any, Callable

MAX_GRAPHS_PER_BINDING = 64   # (batch size, slot, output buffer) keys of one model copy; more: start again
NO_GRAPH = object()            # a key that cannot be captured (it runs through the VM)


@functools.cache
def record_external() -> Callable[[int, int], None] | None:
    """cudaEventRecordWithFlags(event, stream, cudaEventRecordExternal), or None where cuda-bindings lacks it."""
    try:
        from cuda.bindings import runtime as crt
        flag = crt.cudaEventRecordExternal
    except (ImportError, AttributeError):
        return None

    def record(event_ptr: int, stream_ptr: int) -> None:
        err, = crt.cudaEventRecordWithFlags(event_ptr, stream_ptr, flag)
        if err != crt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaEventRecordWithFlags(external) failed: {err}")

    return record


def capture(cp: Any, stream: Any, launch: Callable[[], list], events: tuple, out_base: int, spans: list) -> Any:
    """(graph, outputs): a graph of: record events[0]; `launch()` (the model on `stream`, returning its output
    tensors); record events[1]; copy each output to out_base + offset; record events[2]. Raises if the model
    cannot be captured (the stream is left out of capture mode either way)."""
    record = record_external()
    if record is None:
        raise RuntimeError("cuda-bindings has no cudaEventRecordWithFlags: CUDA graphs need it")
    start, end, fetched = events
    sptr = stream.ptr
    stream.begin_capture(mode=cp.cuda.runtime.streamCaptureModeRelaxed)
    try:
        record(start.ptr, sptr)
        outs = launch()
        record(end.ptr, sptr)
        for o, (off, nb, _spec) in zip(outs, spans):
            if not o.is_contiguous():
                raise RuntimeError("a non-contiguous output cannot be copied by a graph node")
            cp.cuda.runtime.memcpyAsync(out_base + off, o.data_ptr(), nb, cp.cuda.runtime.memcpyDeviceToHost, sptr)
        record(fetched.ptr, sptr)
    finally:
        graph = stream.end_capture()
    graph.upload(stream)
    return graph, outs          # the outputs' memory must stay allocated as long as the graph may write it


def copies(cp: Any, stream: Any, parts: list[tuple[int, int, int]], events: tuple) -> Any:
    """A one-shot graph of: record events[0]; each (dst, src, nbytes) host-to-device copy; record events[1].
    A LoadWeights launches its page copies with it, so a host stall between two pages cannot idle the link
    inside the timed span."""
    record = record_external()
    if record is None:
        raise RuntimeError("cuda-bindings has no cudaEventRecordWithFlags: CUDA graphs need it")
    sptr, h2d = stream.ptr, cp.cuda.runtime.memcpyHostToDevice
    stream.begin_capture(mode=cp.cuda.runtime.streamCaptureModeRelaxed)
    try:
        record(events[0].ptr, sptr)
        for dst, src, nbytes in parts:
            cp.cuda.runtime.memcpyAsync(dst, src, nbytes, h2d, sptr)
        record(events[1].ptr, sptr)
    finally:
        graph = stream.end_capture()
    return graph


def cache_for(binding: Any) -> dict:
    """The binding's graphs (emptied when it holds too many)."""
    cache = binding.launch_cache
    if len(cache) >= MAX_GRAPHS_PER_BINDING:
        cache.clear()
    return cache
