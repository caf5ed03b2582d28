"""The executor process: hosts one in-process worker (CPU or CUDA) and serves it to a `ProcessWorker` in the
session over a local channel. Run as `python -m workbench.worker.host --fd N --shm-fd M --ppid P`; only
`workbench.worker.process` starts it.

Why a process: the executor's launch path must not wait for the interpreter lock while the notebook kernel
runs cells, the controller and charts (h200-baseline.md, "Launch, streams and the GIL": one busy thread makes
a ResNet-50 inference 4x slower). Here the worker's executor threads (which also write their results), one
reader and a sender thread used only when the socket is full are the only Python that runs. The switch
interval stays at Python's 5 ms unless the session asks (measured: 0.5 ms made round trips ~15% slower on the
CPU device, with no busy thread here to preempt), and startup objects are frozen out of the collector.

Wire format (both sides import it from here), transport-neutral on purpose:
- frames on a SOCK_STREAM socket: 8-byte little-endian length + a pickle (protocol 5) of a tuple;
- actions and results cross as `workbench.contract.encode` dicts: ("a", action_dict, input_refs) and
  ("r", result_dict, output_refs); the hot path's two messages have a compact form of the same values, a flat
  tuple in field order (`INFER_WIRE`, `INFER_RESULT_WIRE`): ("A", values, input_refs) for an Infer whose inputs
  are in shared memory and ("R", values, output_refs) for an InferResult whose outputs are (measured on this VM:
  a result costs 8 us instead of 28 us to encode, frame, unpickle and decode);
- Infer inputs and outputs travel in one shared-memory file (memfd) mapped by both processes:
  [header | input region | output region]. The session owns the input region (allocates a slot per Infer and
  frees it when the result arrives); this process owns the output region, a ring written in result order whose
  read position (header, 8 bytes) the session advances after copying each result's outputs out. A ref is
  [(offset in the region, dtype str, shape), ...]; None means "inline in the dict" (used when the arrays are
  not plain numpy, or do not fit, so shared memory is an optimisation, never a new failure);
- control: session -> here ("init", dict) first, ("close",) last; here -> session ("ready", dict) or
  ("fatal", message) once, ("closed",) last.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import gc
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import traceback
from enum import IntEnum
from typing import Any, Sequence

import numpy as np

from workbench.contract import (Action, ActionType, ClearCache, ClearCacheResult, ErrorResult, EvictWeights,
                                EvictWeightsResult, GetWorkerState, GetWorkerStateResult, Infer, InferResult,
                                LoadModelFromDisk, LoadModelFromDiskResult, LoadWeights, LoadWeightsResult, Result,
                                Status, Timing, decode, encode, error, make_timing)

_LEN = struct.Struct("<Q")
HEADER = 256          # shared-memory header; regions start 256-byte aligned after it
ALIGN = 256


def _aligned(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)


# --------------------------------------------------------------------------------------------- fast codec
# `encode`/`decode` of workbench.contract, the same dicts, several times faster on the hot path (per-class field
# lists, no dataclasses.fields()/__init__ per call). Anything unusual falls back to the contract's own functions,
# so errors read the same; tests/test_worker_process.py checks both give identical values for every class.
_STATUS = {int(s): s for s in Status}
_TYPES = {int(t): t for t in ActionType}
_SCALARS = (int, str, float, bool, bytes, type(None))


class _Codec:
    __slots__ = ("cls", "name", "fields", "keys")

    def __init__(self, cls: type):
        self.cls, self.name = cls, cls.__name__
        self.fields = tuple(f.name for f in dataclasses.fields(cls))
        self.keys = frozenset(self.fields) | {"__kind__"}


_BY_CLASS: dict[type, _Codec] = {}
_BY_NAME: dict[str, _Codec] = {}
for _cls in (LoadModelFromDisk, LoadWeights, EvictWeights, Infer, ClearCache, GetWorkerState, ErrorResult,
             LoadModelFromDiskResult, LoadWeightsResult, EvictWeightsResult, InferResult, ClearCacheResult,
             GetWorkerStateResult, Timing):
    _BY_CLASS[_cls] = _BY_NAME[_cls.__name__] = _Codec(_cls)


def _plain(v: Any) -> Any:
    """contract._plain, same cases, exact types first (an IntEnum is neither an array nor a dataclass, so testing
    it before them, which is slow, changes nothing)."""
    t = type(v)
    if t in _SCALARS:
        return v
    if t is Timing:
        return {"__kind__": "Timing", "begin": v.begin, "end": v.end, "duration": v.duration}
    if t is Status or t is ActionType:
        return int(v)
    if isinstance(v, np.ndarray):
        return {"__nd__": v.dtype.str, "shape": list(v.shape), "data": np.ascontiguousarray(v).tobytes()}
    if dataclasses.is_dataclass(v):
        return fast_encode(v)
    if isinstance(v, IntEnum):
        return int(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def fast_encode(obj: Any, skip: str = "") -> dict:
    """contract.encode(obj), with field `skip` (if any) encoded as None."""
    c = _BY_CLASS.get(type(obj))
    if c is None:
        return encode(obj)
    src = obj.__dict__
    d = {"__kind__": c.name}
    for name in c.fields:
        v = src[name]
        d[name] = v if type(v) in _SCALARS else (None if name == skip else _plain(v))
    return d


def _unplain(v: Any) -> Any:
    t = type(v)
    if t is list:
        return tuple([_unplain(x) for x in v])
    if t is dict:
        if "__nd__" in v:
            return np.frombuffer(v["data"], dtype=np.dtype(v["__nd__"])).reshape(v["shape"]).copy()
        if "__kind__" in v:
            return fast_decode(v)
    return v


def fast_decode(d: Any) -> Any:
    """contract.decode(d) (which handles, and raises for, anything but a complete well-formed dict)."""
    c = _BY_NAME.get(d.get("__kind__")) if type(d) is dict else None
    if c is None or d.keys() != c.keys:
        return decode(d)
    if c.cls is Timing:
        return Timing(d["begin"], d["end"], d["duration"])
    obj = c.cls.__new__(c.cls)
    od = obj.__dict__
    for name in c.fields:
        v = d[name]
        od[name] = v if type(v) in _SCALARS else _unplain(v)
    try:
        if "status" in od:
            od["status"] = _STATUS[od["status"]]
        if "action_type" in od:
            od["action_type"] = _TYPES[od["action_type"]]
    except (KeyError, TypeError):
        return decode(d)
    if type(od.get("state", {})) is tuple:
        od["state"] = dict(od["state"])
    return obj


# ---------------------------------------------------------------------------- compact forms of the hot path
# Field order of the flat tuples; the values are those of the dict form (enums as ints, each Timing as its three
# ints), so both forms decode to equal objects (tests/test_worker_process.py checks it).
INFER_WIRE = ("id", "earliest", "latest", "model_id", "gpu", "batch_size", "expected_duration")
INFER_RESULT_WIRE = ("id", "action_type", "status", "message", "received", "sent", "gpu", "batch_size",
                     "copy_input", "exec", "copy_output", "gpu_clock_before", "gpu_clock")
_new = object.__new__
_setattr = object.__setattr__


def compact_infer(a: Any) -> tuple | None:
    """The Infer's fields but its inputs as a flat tuple, or None when it is not exactly an Infer."""
    if type(a) is not Infer:
        return None
    d = a.__dict__
    return (d["id"], d["earliest"], d["latest"], d["model_id"], d["gpu"], d["batch_size"], d["expected_duration"])


def infer_from_compact(v: Sequence, inputs: Any) -> Infer:
    """The Infer that fast_decode gives for the same values (inputs: a tuple of arrays or None)."""
    if len(v) != len(INFER_WIRE):
        raise ValueError(f"compact Infer has {len(v)} values, expected {len(INFER_WIRE)}")
    a = _new(Infer)
    _setattr(a, "__dict__", {"id": v[0], "earliest": v[1], "latest": v[2], "model_id": v[3], "gpu": v[4],
                             "batch_size": v[5], "inputs": inputs, "expected_duration": v[6]})
    return a


def compact_infer_result(r: Any) -> tuple | None:
    """The InferResult's fields but its outputs as a flat tuple, or None when it is not exactly an InferResult
    with Timing steps (the dict form then carries it)."""
    if type(r) is not InferResult:
        return None
    d = r.__dict__
    ci, ex, co = d["copy_input"], d["exec"], d["copy_output"]
    if type(ci) is not Timing or type(ex) is not Timing or type(co) is not Timing:
        return None
    st, at = d["status"], d["action_type"]
    return (d["id"], int(at) if isinstance(at, IntEnum) else at, int(st) if isinstance(st, IntEnum) else st,
            d["message"], d["received"], d["sent"], d["gpu"], d["batch_size"], ci.begin, ci.end, ci.duration,
            ex.begin, ex.end, ex.duration, co.begin, co.end, co.duration, d["gpu_clock_before"], d["gpu_clock"])


def infer_result_from_compact(v: Sequence, outputs: Any) -> InferResult:
    """The InferResult that fast_decode gives for the same values (outputs: a tuple of arrays or None)."""
    if len(v) != 19:
        raise ValueError(f"compact InferResult has {len(v)} values, expected 19")
    r = _new(InferResult)
    _setattr(r, "__dict__", {
        "id": v[0], "action_type": _TYPES[v[1]], "status": _STATUS[v[2]], "message": v[3], "received": v[4],
        "sent": v[5], "gpu": v[6], "batch_size": v[7], "copy_input": make_timing(v[8], v[9], v[10]),
        "exec": make_timing(v[11], v[12], v[13]), "copy_output": make_timing(v[14], v[15], v[16]),
        "gpu_clock_before": v[17], "gpu_clock": v[18], "outputs": outputs})
    return r


# ------------------------------------------------------------------------------------------------- channel
class Channel:
    """Length-prefixed pickled tuples over a connected stream socket. `send` may carry several messages in one
    system call; `recv` blocks until at least one message is complete and returns every complete one."""

    def __init__(self, sock: socket.socket, chunk: int = 1 << 18):
        self.sock = sock
        self._buf = bytearray()
        self._chunk = bytearray(chunk)
        self._chunk_mv = memoryview(self._chunk)

    @staticmethod
    def frame(msg: tuple) -> bytes:
        p = pickle.dumps(msg, protocol=5)
        return _LEN.pack(len(p)) + p

    def send(self, *msgs: tuple) -> None:
        self.send_frames([self.frame(m) for m in msgs])

    def send_frames(self, frames: Sequence[bytes]) -> None:
        self.sock.sendall(frames[0] if len(frames) == 1 else b"".join(frames))

    def recv(self) -> list:
        """Raises EOFError when the peer has gone (closed its end or died)."""
        while True:
            out = self._parse()
            if out:
                return out
            n = self.sock.recv_into(self._chunk_mv)
            if n == 0:
                raise EOFError("peer closed the channel")
            self._buf += self._chunk_mv[:n]

    def _parse(self) -> list:
        buf, pos, out = self._buf, 0, []
        with memoryview(buf) as mv:
            while len(buf) - pos >= _LEN.size:
                (n,) = _LEN.unpack_from(buf, pos)
                if len(buf) - pos - _LEN.size < n:
                    break
                start = pos + _LEN.size
                out.append(pickle.loads(mv[start:start + n]))
                pos = start + n
        if pos:
            del buf[:pos]
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------ shared memory
class SharedIO:
    """The shared-memory file both processes map: header, input region, output region (see module doc)."""

    def __init__(self, fd: int, in_bytes: int, out_bytes: int):
        self.fd, self.in_bytes, self.out_bytes = fd, in_bytes, out_bytes
        self.size = HEADER + in_bytes + out_bytes
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = np.frombuffer(self.map, np.uint8, self.size)
        self.inputs = self.buf[HEADER:HEADER + in_bytes]
        self.outputs = self.buf[HEADER + in_bytes:]
        self.read_pos = ctypes.c_uint64.from_buffer(self.map, 0)   # output ring: consumed up to (monotonic)

    @staticmethod
    def create(in_bytes: int, out_bytes: int) -> "SharedIO":
        """A new anonymous shared-memory file (memfd: nothing to unlink, gone when both processes are)."""
        fd = os.memfd_create("workbench-worker-io", os.MFD_CLOEXEC)
        os.ftruncate(fd, HEADER + in_bytes + out_bytes)
        return SharedIO(fd, in_bytes, out_bytes)

    def address(self) -> int:
        return self.buf.ctypes.data

    def close(self) -> None:
        del self.read_pos
        self.buf = self.inputs = self.outputs = None  # type: ignore[assignment]
        try:
            self.map.close()
        except BufferError:   # a view is still alive somewhere: the mapping goes with the process
            pass


_DTYPES: dict[str, np.dtype] = {}


def _dtype(s: str) -> np.dtype:
    dt = _DTYPES.get(s)
    if dt is None:
        dt = _DTYPES[s] = np.dtype(s)
    return dt


def write_arrays(region: np.ndarray, offset: int, arrays: Sequence[np.ndarray]) -> list:
    """Copy arrays back to back (each 256-byte aligned) into region[offset:]; returns their refs."""
    refs = []
    for a in arrays:
        if a.nbytes:
            np.ndarray(a.shape, a.dtype, buffer=region, offset=offset)[...] = a
        refs.append((offset, a.dtype.str, a.shape))
        offset += _aligned(a.nbytes)
    return refs


def read_arrays(region: np.ndarray, refs: Sequence, copy: bool) -> list[np.ndarray]:
    """The arrays of `refs` in region: views (copy=False) or copies."""
    if copy:
        return [np.ndarray(shape, _dtype(dt), buffer=region, offset=off).copy() for off, dt, shape in refs]
    return [np.ndarray(shape, _dtype(dt), buffer=region, offset=off) for off, dt, shape in refs]


def shm_bytes(arrays: Sequence[Any]) -> int | None:
    """Bytes a set of arrays takes in a region, or None if they cannot go through shared memory."""
    if not isinstance(arrays, (tuple, list)) or not arrays:
        return None
    total = 0
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype.hasobject or a.dtype.names is not None:
            return None
        total += _aligned(a.nbytes)
    return total


class OutputRing:
    """This process's side of the output region: records written in result order, never overwriting bytes the
    session has not consumed (header read_pos). Positions are monotonic byte counts; offset = pos % size."""

    def __init__(self, shm: SharedIO):
        self.shm = shm
        self.size = shm.out_bytes
        self.write_pos = 0

    def put(self, arrays: Sequence[np.ndarray]) -> tuple[list, int] | None:
        """(refs, end position) or None when the ring has no room (the caller sends the arrays inline)."""
        n = shm_bytes(arrays)
        if n is None or n > self.size:
            return None
        pos = self.write_pos
        off = pos % self.size
        if off + n > self.size:        # does not fit before the end: skip to the start of the ring
            pos += self.size - off
            off = 0
        if pos + n - self.shm.read_pos.value > self.size:
            return None
        refs = write_arrays(self.shm.outputs, off, arrays)
        self.write_pos = pos + n
        return refs, self.write_pos


# ------------------------------------------------------------------------------------------------- host
def die_with_parent(ppid: int) -> None:
    """SIGKILL this process when the parent dies (Linux prctl PR_SET_PDEATHSIG), and exit now if it already
    has (the parent died before the prctl). The channel's EOF is the second, portable watchdog."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG = 1
        except OSError:
            pass
    if os.getppid() != ppid:
        os._exit(0)


def make_worker(init: dict, on_result) -> Any:
    from workbench.worker.config import WorkerConfig
    config = WorkerConfig(**init["config"])
    kind = init["device"]
    if kind == "cpu":
        from workbench.worker.cpu import CPUWorker
        return CPUWorker(config, on_result, num_gpus=init.get("num_gpus") or 1)
    if kind == "cuda":
        from workbench.worker.cuda import CUDAWorker
        return CUDAWorker(config, on_result, num_gpus=init.get("num_gpus"), devices=init.get("devices"),
                          sync_each_page=bool(init.get("sync_each_page", False)))
    raise ValueError(f"unknown device {kind!r}: use 'cpu' or 'cuda'")


def pin(worker: Any, shm: SharedIO) -> str:
    """Page-lock the shared memory for the GPU (CUDADevice.register_host), so inputs are DMA-copied from where
    they lie. Returns '' on success, else why not (not fatal: inputs are then staged)."""
    try:
        worker.device.register_host(shm.address(), shm.size)
        return ""
    except Exception as e:  # noqa: BLE001 - pinning is an optimisation
        return f"{type(e).__name__}: {e}"


class Host:
    """Serves one worker. The main thread reads actions and submits them, letting the worker answer a short exec
    in this thread (`answer_here`: it holds no lock, and on_result only sends). A result is encoded and written by the
    executor thread that produced it, without blocking (MSG_DONTWAIT): measured 40 us faster per result than
    handing it to a sender thread, which must wait for the interpreter lock the producing thread still holds.
    Only when the socket is full (the session is slow to read) do frames go to a backlog that a sender thread
    writes, so executor threads never block on the session; order is kept (frames wait while a backlog exists),
    which the output ring needs."""

    def __init__(self, chan: Channel, shm: SharedIO | None):
        self.chan = chan
        self.shm = shm
        self.ring = OutputRing(shm) if shm is not None else None
        self.worker: Any = None
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._dontwait = getattr(socket, "MSG_DONTWAIT", 0)
        self.backlogged = 0            # frames that had to wait for the sender thread (diagnostics)
        self.sender = threading.Thread(target=self._send_loop, name="host-sender", daemon=True)

    # executor threads call this
    def on_result(self, r: Result) -> None:
        with self._lock:
            try:
                frame = self._frame(r)
            except Exception as e:  # noqa: BLE001 - never lose a result: send it as an error instead
                traceback.print_exc()
                frame = Channel.frame(("r", encode(error(_ActionRef(r), Status.RUNTIME_ERROR,
                                                         f"result could not be encoded: {e}")), None))
            self._write(frame)

    def _write(self, frame: bytes) -> None:   # caller holds the lock
        if not self._backlog and self._dontwait:
            try:
                n = self.chan.sock.send(frame, self._dontwait)
            except BlockingIOError:
                n = 0
            except OSError:
                os._exit(0)               # the session is gone
            if n == len(frame):
                return
            frame = memoryview(frame)[n:]
        self._backlog.append(frame)
        self.backlogged += 1
        self._cv.notify()

    def _frame(self, r: Result) -> bytes:
        if isinstance(r, InferResult) and r.outputs is not None and self.ring is not None:
            placed = self.ring.put(r.outputs)
            if placed is not None:
                v = compact_infer_result(r)
                if v is not None:
                    return Channel.frame(("R", v, placed))
                return Channel.frame(("r", fast_encode(r, skip="outputs"), placed))
        return Channel.frame(("r", fast_encode(r), None))

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._backlog:
                    self._cv.wait()
                frame = self._backlog[0]
            if frame is None:
                return
            try:
                self.chan.sock.sendall(frame)
            except OSError:
                os._exit(0)
            with self._cv:
                self._backlog.popleft()
                self._cv.notify_all()

    def finish(self) -> None:
        """Send ("closed",) after every result, and wait until all is written."""
        with self._cv:
            self._write(Channel.frame(("closed",)))
            self._backlog.append(None)    # stops the sender once everything before it is written
            self._cv.notify()
        self.sender.join()

    def _action(self, d: dict, refs: Any):
        if refs is not None:
            d["inputs"] = read_arrays(self.shm.inputs, refs, copy=False)   # views; the slot is ours until the result
        return fast_decode(d)

    def serve(self) -> None:
        """Read until ("close",) (close the worker, flush, say "closed") or EOF (the session died: exit now)."""
        while True:
            try:
                msgs = self.chan.recv()
            except (EOFError, OSError):
                os._exit(0)
            for m in msgs:
                tag = m[0]
                if tag == "A":   # compact Infer, inputs in shared memory
                    try:
                        a = infer_from_compact(m[1], tuple(read_arrays(self.shm.inputs, m[2], copy=False)))
                    except Exception as e:  # noqa: BLE001 - answered, never fatal
                        v = m[1]
                        aid = v[0] if isinstance(v, (tuple, list)) and v else None
                        self.on_result(_malformed({"__kind__": "Infer", "id": aid}, e))
                        continue
                    self.worker.submit(a, answer_here=True)
                elif tag == "a":
                    try:
                        a = self._action(m[1], m[2])
                        if not isinstance(a, Action):
                            raise ValueError(f"{type(a).__name__} is not an action")
                    except Exception as e:  # noqa: BLE001 - a malformed action is answered, never fatal
                        self.on_result(_malformed(m[1], e))
                        continue
                    self.worker.submit(a, answer_here=True)
                elif tag == "close":
                    self.worker.close()        # answers what is still queued (SHUTTING_DOWN)
                    self.finish()
                    return
                else:
                    print(f"workbench.worker.host: unknown message {tag!r} ignored", file=sys.stderr)


class _ActionRef:
    """Just enough of an action (id, type) to build its ErrorResult."""

    def __init__(self, r: Result):
        self.id, self.type = r.id, r.action_type


def _malformed(d: Any, e: Exception) -> Result:
    """The error result for an action dict that does not decode, when its id and type can be read."""
    kind = d.get("__kind__") if isinstance(d, dict) else None
    cls = _BY_NAME[kind].cls if kind in _BY_NAME else None
    aid = d.get("id") if isinstance(d, dict) else None
    if cls is None or not hasattr(cls, "type") or not isinstance(aid, int):
        aid = aid if isinstance(aid, int) else -1
        return ErrorResult(id=aid, action_type=ActionType.GET_WORKER_STATE, status=Status.INVALID_ACTION,
                           message=f"malformed action (not an action kind, so its type is unknown): {e}")
    return ErrorResult(id=aid, action_type=cls.type, status=Status.INVALID_ACTION, message=f"malformed action: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.worker.host", description=__doc__.split("\n")[0])
    p.add_argument("--fd", type=int, required=True, help="the connected socket to the session")
    p.add_argument("--ppid", type=int, required=True, help="the session's pid: this process dies with it")
    p.add_argument("--shm-fd", type=int, default=-1, help="the shared-memory file (memfd), -1 for none")
    a = p.parse_args(argv)
    die_with_parent(a.ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C belongs to the session, which closes us
    sock = socket.socket(fileno=a.fd)
    os.set_inheritable(a.fd, False)
    chan = Channel(sock)
    try:
        (init,) = chan.recv()[:1]
    except (EOFError, OSError):
        return 0
    assert init[0] == "init", init[0]
    init = init[1]
    if init.get("switch_interval"):
        sys.setswitchinterval(init["switch_interval"])
    if init.get("cpus"):                              # the session confined this process (ProcessWorker cpus)
        os.environ.setdefault("TVM_BIND_THREADS", "0")   # else TVM pins its pool threads to cores it picks
    shm = SharedIO(a.shm_fd, init["in_bytes"], init["out_bytes"]) if a.shm_fd >= 0 else None
    host = Host(chan, shm)
    try:
        host.worker = make_worker(init, host.on_result)
    except BaseException as e:  # noqa: BLE001 - the session raises it with this message
        chan.send(("fatal", f"{type(e).__name__}: {e}"))
        return 1
    asked = shm is not None and init["device"] == "cuda" and init.get("pin", True)
    pinned = pin(host.worker, shm) if asked else "not asked"
    host.sender.start()
    gc.collect()
    gc.freeze()                       # startup objects (TVM, numpy, the worker) are never scanned again
    chan.send(("ready", {"pid": os.getpid(), "num_gpus": host.worker.num_gpus,
                         "device": host.worker.device.name, "pinned": pinned or "yes",
                         "switch_interval": sys.getswitchinterval(),
                         "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}))
    host.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)                       # no interpreter teardown (TVM/CUDA destructors): the worker is closed


if __name__ == "__main__":
    raise SystemExit(main())
