"""The executor process: hosts one in-process worker (CPU or CUDA) and serves it to a `ProcessWorker` in the
session over a local channel. Run as `python -m workbench.worker.host --fd N --shm-fd M --ppid P`; only
`workbench.worker.process` starts it.

Why a process: the executor's launch path must not wait for the interpreter lock while the notebook kernel
runs cells, the controller and charts (h200-baseline.md, "Launch, streams and the GIL": one busy thread makes
a ResNet-50 inference 4x slower). Here the worker's executor threads, one reader and one result sender are
the only Python that runs.

Wire format (both sides import it from here), transport-neutral on purpose:
- frames on a SOCK_STREAM socket: 8-byte little-endian length + a pickle (protocol 5) of a tuple;
- actions and results cross as `workbench.contract.encode` dicts: ("a", action_dict, input_refs) and
  ("r", result_dict, output_refs);
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
import ctypes
import gc
import mmap
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
import traceback
from typing import Any, Sequence

import numpy as np

from workbench.contract import InferResult, Result, Status, decode, encode, error

_LEN = struct.Struct("<Q")
HEADER = 256          # shared-memory header; regions start 256-byte aligned after it
ALIGN = 256


def _aligned(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)


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


def write_arrays(region: np.ndarray, offset: int, arrays: Sequence[np.ndarray]) -> list:
    """Copy arrays back to back (each 256-byte aligned) into region[offset:]; returns their refs."""
    refs = []
    for a in arrays:
        n = a.nbytes
        dst = region[offset:offset + n]
        if n:
            np.copyto(dst.view(a.dtype).reshape(a.shape), a, casting="no")
        refs.append((offset, a.dtype.str, tuple(a.shape)))
        offset += _aligned(n)
    return refs


def read_arrays(region: np.ndarray, refs: Sequence, copy: bool) -> list[np.ndarray]:
    out = []
    for offset, dt, shape in refs:
        dtype = np.dtype(dt)
        count = int(np.prod(shape, dtype=np.int64))
        a = region[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)
        out.append(a.copy() if copy else a)
    return out


def shm_bytes(arrays: Sequence[Any]) -> int | None:
    """Bytes a set of arrays takes in a region, or None if they cannot go through shared memory."""
    if not isinstance(arrays, (tuple, list)) or not arrays:
        return None
    total = 0
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype.hasobject:
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


def pin(shm: SharedIO) -> str:
    """Page-lock the shared memory for the GPU (cudaHostRegister), so copies from it are DMA copies.
    Returns '' on success, else why not (not fatal: copies are then staged by the driver)."""
    try:
        import cupy
        cupy.cuda.runtime.hostRegister(shm.address(), shm.size, 0)
        return ""
    except Exception as e:  # noqa: BLE001 - pinning is an optimisation
        return f"{type(e).__name__}: {e}"


class Host:
    """Serves one worker: the main thread reads actions and submits them; a sender thread encodes results
    (outputs into the shared ring) and writes them back, so executor threads never block on the socket."""

    _STOP = object()

    def __init__(self, chan: Channel, shm: SharedIO | None):
        self.chan = chan
        self.shm = shm
        self.ring = OutputRing(shm) if shm is not None else None
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.worker: Any = None
        self.sender = threading.Thread(target=self._send_loop, name="host-sender", daemon=True)

    # executor threads call this: hand over and return at once
    def on_result(self, r: Result) -> None:
        self.q.put(r)

    def _frame(self, r: Result) -> bytes:
        refs = None
        if isinstance(r, InferResult) and r.outputs is not None and self.ring is not None:
            placed = self.ring.put(r.outputs)
            if placed is not None:
                refs = placed
                r = _without(r, "outputs")
        return Channel.frame(("r", encode(r), refs))

    def _send_loop(self) -> None:
        q = self.q
        while True:
            items = [q.get()]
            while not q.empty():          # batch whatever else is ready into one write
                items.append(q.get())
            frames, stop = [], False
            for it in items:
                if it is self._STOP:
                    stop = True
                    frames.append(Channel.frame(("closed",)))
                    break
                try:
                    frames.append(self._frame(it))
                except Exception as e:  # noqa: BLE001 - never lose a result: send it as an error instead
                    traceback.print_exc()
                    frames.append(Channel.frame(("r", encode(error(_ActionRef(it), Status.RUNTIME_ERROR,
                                                                   f"result could not be encoded: {e}")), None)))
            try:
                self.chan.send_frames(frames)
            except OSError:
                os._exit(0)               # the session is gone
            if stop:
                return

    def _action(self, d: dict, refs: Any):
        if refs is not None:
            d["inputs"] = read_arrays(self.shm.inputs, refs, copy=False)   # views; the slot is ours until the result
        return decode(d)

    def serve(self) -> None:
        """Read until ("close",) (close the worker, flush, say "closed") or EOF (the session died: exit now)."""
        while True:
            try:
                msgs = self.chan.recv()
            except (EOFError, OSError):
                os._exit(0)
            for m in msgs:
                tag = m[0]
                if tag == "a":
                    try:
                        a = self._action(m[1], m[2])
                    except Exception as e:  # noqa: BLE001 - a malformed action is answered, never fatal
                        self.q.put(_malformed(m[1], e))
                        continue
                    self.worker.submit(a)
                elif tag == "close":
                    self.worker.close()        # answers what is still queued (SHUTTING_DOWN)
                    self.q.put(self._STOP)
                    self.sender.join()
                    return
                else:
                    print(f"workbench.worker.host: unknown message {tag!r} ignored", file=sys.stderr)


class _ActionRef:
    """Just enough of an action (id, type) to build its ErrorResult."""

    def __init__(self, r: Result):
        self.id, self.type = r.id, r.action_type


def _without(obj: Any, name: str) -> Any:
    import dataclasses
    return dataclasses.replace(obj, **{name: None})


def _malformed(d: Any, e: Exception) -> Result:
    """The error result for an action dict that does not decode, when its id and type can be read."""
    from workbench.contract import ErrorResult
    from workbench.contract import _CLASSES  # noqa: PLC2701 - the kind names are the contract's
    kind = d.get("__kind__") if isinstance(d, dict) else None
    cls = _CLASSES.get(kind)
    aid = d.get("id") if isinstance(d, dict) else None
    if cls is None or not hasattr(cls, "type") or not isinstance(aid, int):
        aid = aid if isinstance(aid, int) else -1
        from workbench.contract import ActionType
        return ErrorResult(id=aid, action_type=ActionType.GET_WORKER_STATE, status=Status.INVALID_ACTION,
                           message=f"malformed action (no readable id/kind): {e}")
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
    sys.setswitchinterval(init.get("switch_interval", 0.0005))
    shm = SharedIO(a.shm_fd, init["in_bytes"], init["out_bytes"]) if a.shm_fd >= 0 else None
    host = Host(chan, shm)
    try:
        host.worker = make_worker(init, host.on_result)
    except BaseException as e:  # noqa: BLE001 - the session raises it with this message
        chan.send(("fatal", f"{type(e).__name__}: {e}"))
        return 1
    pinned = pin(shm) if (shm is not None and init["device"] == "cuda" and init.get("pin", True)) else "not asked"
    host.sender.start()
    gc.collect()
    gc.freeze()                       # startup objects (TVM, numpy, the worker) are never scanned again
    chan.send(("ready", {"pid": os.getpid(), "num_gpus": host.worker.num_gpus,
                         "device": host.worker.device.name, "pinned": pinned or "yes",
                         "switch_interval": sys.getswitchinterval()}))
    host.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)                       # no interpreter teardown (TVM/CUDA destructors): the worker is closed


if __name__ == "__main__":
    raise SystemExit(main())
