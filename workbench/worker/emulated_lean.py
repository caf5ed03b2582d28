"""The lean state machine of the emulated worker (`EmulatedWorker` runs it in virtual time, without task
telemetry). A module of its own so that it can be compiled with mypyc (setup.py) while `EmulatedWorker`, a
subclass of the plain Python `Worker` that tests and users subclass in turn, stays plain Python.

In virtual time the emulated worker runs a lean copy of the state machine of base.py/executor.py: the same
queues (per GPU weights/inputs/exec/outputs, worker-wide disk/control), the same (eligible, order) priority,
windows, checks, pools, page cache, random draws and status codes, and the same clock events in the same
order (a wake-up when an idle queue gets an eligible head, one event when each task's work ends). So its
results are identical to the general path's for the same actions and seed (tests/test_worker_emulated.py
compares them), at a fraction of the cost: no locks, no task classes, no per-task wrappers, results built
without the dataclass constructors, pools that count bytes instead of placing ranges while placement
cannot matter (_Pool). An Infer's three stages have their common case written out (_kick_in, _on_done,
_begin_exec: an Infer whose (model, n) was seen before, pools with room as counted, an idle next queue), with
the same steps in the same order as the general methods, and events go straight onto a VirtualClock's heap
(Clock.poster).
"""
from __future__ import annotations

import heapq as _heapq
import random
from math import cos as _cos, exp as _exp, log as _log, sin as _sin, sqrt as _sqrt
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np

from workbench.contract import (FOREVER as _FOREVER, Action, ActionType as _AT, ClearCacheResult as _ClearCacheResult,
                                EvictWeightsResult as _EvictWeightsResult, GetWorkerStateResult as _GWSResult,
                                Infer as _Infer, InferResult as _InferResult, LoadModelFromDiskResult as _LMResult,
                                LoadWeightsResult as _LoadWeightsResult, Result, Status as _S, Timing, error as _error,
                                make_timing)
from workbench.controller import compiled as _compiled  # noqa: F401 - refuses a stale compiled build
from workbench.worker.base import GPUModel as _GPUModel, InvalidModelPath, ModelCopy as _ModelCopy, ModelEntry
from workbench.worker.page_cache import Allocation, InsufficientCache as _InsufficientCache
from workbench.worker.pools import MemoryPool as _MemoryPool, PoolExhausted as _PoolExhausted
from workbench.worker.profile import ExecDist

if TYPE_CHECKING:
    from workbench.worker.emulated import EmulatedWorker

# (Final: compiled, these are constants rather than lookups in the module's namespace)
_new: Final = object.__new__
_setattr: Final = object.__setattr__
_heappush: Final = _heapq.heappush
_heappop: Final = _heapq.heappop
_TWOPI: Final = 2.0 * 3.141592653589793


def _gauss_inline_matches() -> bool:
    """Whether the exec draw written out in _Lean._begin_exec is this Python's random.Random.gauss(0.0, 1.0)
    (the same values and the same state after: it keeps gauss' second value in `gauss_next` as gauss does)."""
    a = random.Random(12345)
    b: Any = random.Random(12345)       # (gauss_next is an attribute of random.Random the stubs do not name)
    for i in range(64):
        if i % 7 == 3:
            a.random(), b.random()
        z = b.gauss_next
        b.gauss_next = None
        if z is None:
            x2pi = b.random() * _TWOPI
            g2rad = _sqrt(-2.0 * _log(1.0 - b.random()))
            z = _cos(x2pi) * g2rad
            b.gauss_next = _sin(x2pi) * g2rad
        if a.gauss(0.0, 1.0) != z or a.getstate() != b.getstate():
            return False
    return True


_GAUSS_INLINE: Final = _gauss_inline_matches()
_MAX_LOG: Final = 4096              # _Pool.MAX_LOG


class _Pool:
    """A MemoryPool (same sizes, alignment, errors) that answers alloc/free by counting bytes while the
    answer cannot depend on where ranges are placed: with `live` allocations the free space is split into at
    most live + 1 ranges, so `free >= length * (live + 1)` guarantees a fit. Otherwise it replays the operations
    since the pool was last empty (the range allocator's state depends on nothing older) into a real
    MemoryPool and runs exactly until the pool is empty again."""
    __slots__ = ("name", "size", "used", "live", "log", "real", "offsets", "_next")
    ALIGN: ClassVar[int] = 256
    MAX_LOG: ClassVar[int] = _MAX_LOG
    exact_switches: ClassVar[int] = 0       # times any pool had to place ranges exactly (tests read it)

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size
        self.used = 0
        self.live: dict[int, int] = {}      # handle -> aligned length
        self.log: list[tuple[int, int]] = []   # (handle, length) allocs and (handle, 0) frees since empty
        self.real: _MemoryPool | None = None
        self.offsets: dict[int, int] = {}    # handle -> offset in `real`
        self._next = 0

    @property
    def allocations(self) -> int:
        return len(self.live)

    def counted(self, length: int) -> bool:
        """An allocation of `length` (aligned) bytes can be answered by counting (see the class docstring)."""
        return self.real is None and length <= self.size and self.size - self.used >= length * (len(self.live) + 1) \
            and len(self.log) < _MAX_LOG

    def take(self, length: int) -> int:
        """Allocate `length` (aligned) bytes by counting; only when `counted(length)`."""
        h = self._next = self._next + 1
        self.live[h] = length
        self.used += length
        self.log.append((h, length))
        return h

    def alloc(self, nbytes: int) -> int:
        length = -(-nbytes // 256) * 256
        if length < 256:
            length = 256
        if self.real is None:
            if self.counted(length):
                return self.take(length)
            self._go_exact()
        live = self.live
        real = self.real
        assert real is not None                # (placing exactly, since _go_exact)
        off = real.alloc(nbytes)               # raises PoolExhausted exactly as the general path does
        h = self._next = self._next + 1
        live[h] = length
        self.offsets[h] = off
        self.used += length
        return h

    def free(self, h: int) -> None:
        length = self.live.pop(h)
        self.used -= length
        if self.real is None:
            self.log.append((h, 0))
            if not self.live:
                self.log.clear()
        else:
            self.real.free(self.offsets.pop(h))
            if not self.live:
                self.real = None
                self.offsets.clear()

    def _go_exact(self) -> None:
        _Pool.exact_switches += 1
        real = _MemoryPool(self.name, self.size)
        offs: dict[int, int] = {}
        for h, length in self.log:
            if length:
                offs[h] = real.alloc(length)
            else:
                real.free(offs.pop(h))
        self.real, self.offsets = real, offs
        self.log.clear()

    def clear(self) -> None:
        """Empty, as new."""
        self.used = 0
        self.live = {}
        self.log = []
        self.real = None
        self.offsets = {}
        self._next = 0

    def state(self) -> dict:
        return {"size": self.size, "used": self.used, "allocations": len(self.live)}


# task kinds; the queue a kind runs on: per GPU 0..3 (weights, inputs, exec, outputs), worker-wide disk/control
_LOAD: Final = 0
_EVICT: Final = 1
_CIN: Final = 2
_EXEC: Final = 3
_COUT: Final = 4
_DISK: Final = 5
_CTRL: Final = 6
_IMM: Final = 7
_KIND_NAME: Final = ("weights", "weights", "inputs", "exec", "outputs", "disk", "control", "control")
_QUEUE: Final = (0, 0, 1, 2, 3, -1, -2, -2)
_TOO_LATE: Final = (_S.LOAD_WEIGHTS_TOO_LATE, _S.EVICT_WEIGHTS_TOO_LATE, _S.COPY_INPUT_TOO_LATE, _S.EXEC_TOO_LATE,
             _S.COPY_OUTPUT_TOO_LATE, _S.COULD_NOT_START_IN_TIME, _S.COULD_NOT_START_IN_TIME,
             _S.COULD_NOT_START_IN_TIME)
_TOO_EARLY: Final = (_S.LOAD_WEIGHTS_TOO_EARLY, _S.EVICT_WEIGHTS_TOO_EARLY, _S.COPY_INPUT_TOO_EARLY, _S.EXEC_TOO_EARLY,
              _S.COPY_OUTPUT_TOO_EARLY, _S.COULD_NOT_START_IN_TIME, _S.COULD_NOT_START_IN_TIME,
              _S.COULD_NOT_START_IN_TIME)
_FIRST_KIND: Final = {_AT.LOAD_WEIGHTS: _LOAD, _AT.EVICT_WEIGHTS: _EVICT, _AT.INFER: _CIN,
               _AT.LOAD_MODEL_FROM_DISK: _DISK, _AT.CLEAR_CACHE: _CTRL, _AT.GET_WORKER_STATE: _CTRL}


class _Task:
    """One task of an action (the general path's Task subclasses in one record). The attributes declared below
    without a value are set by the kinds of task that use them, before they are read."""
    __slots__ = ("kind", "a", "received", "eligible", "latest", "seq", "gpu", "status", "message", "track",
                 "m", "entry", "batch", "io", "host", "ws", "version", "cin", "ex", "alloc", "gm",
                 "err", "info", "plan", "timing")
    gpu: int                        # the GPU of a per-GPU task
    status: _S                      # an immediate answer's (_IMM)
    message: str
    track: bool                     # _IMM: whether it answers the action in flight with its id
    m: _ModelCopy                   # the model copy (Infer stages, loads)
    batch: int                      # Infer: the padded batch size
    version: int                    # the weights' version when the task began (exec, load)
    cin: tuple[int, int, int]       # Infer: the input copy's (begin, end, duration)
    ex: tuple[int, int, int]        # Infer: the exec's (begin, end, duration)
    gm: _GPUModel                   # load: the model's state on its GPU
    err: tuple[_S, str] | None      # disk: why opening the model failed
    info: tuple                     # Infer: _Lean._info(entry, n)
    timing: Timing                  # disk: opening the model

    def __init__(self, kind: int, a: Any, received: int, eligible: int, latest: int, seq: int):
        self.kind, self.received, self.eligible, self.latest, self.seq = kind, received, eligible, latest, seq
        self.a = a                  # the action (any Action subclass: its fields are read per kind)
        self.io = self.host = self.ws = -1
        self.alloc: Allocation | None = None
        self.entry: ModelEntry | None = None
        self.plan: _Plan | None = None


class _Plan:
    """What every Infer of one (model id, n samples) needs, worked out once (the model id of a loaded model
    always names the same entry): its pool lengths as the pools align them, durations and exec distribution."""
    __slots__ = ("m", "entry", "batch", "info", "io_n", "io_len", "hin_n", "hin_len", "hout_n", "ws_n", "cin_d",
                 "cout_d", "dist")

    def __init__(self, m: _ModelCopy, e: ModelEntry, info: tuple, dist: tuple[int, float] | ExecDist):
        self.m, self.entry, self.batch, self.info = m, e, info[0], info
        self.io_n, self.io_len = info[1], _aligned(info[1])
        self.hin_n, self.hin_len = info[2], _aligned(info[2])
        self.hout_n = info[3]
        self.ws_n = e.workspace_bytes[info[0]]
        self.cin_d, self.cout_d = info[4], info[5]
        self.dist = dist            # (p50, sigma) of a lognormal draw (ExecDist.draw written out), else the ExecDist


def _aligned(nbytes: int) -> int:
    """The length _Pool.alloc takes for nbytes."""
    length = -(-nbytes // 256) * 256
    return length if length >= 256 else 256


class _Lane:
    """One GPU's queues, pools and random stream (what its Infers' stages use)."""
    __slots__ = ("gpu", "wq", "inq", "exq", "outq", "io", "ws", "rng")
    gpu: int
    wq: _Queue
    inq: _Queue
    exq: _Queue
    outq: _Queue
    io: _Pool
    ws: _Pool
    rng: Any                        # a random.Random, whose gauss_next (not in the stubs) _begin_exec uses


class _Queue:
    """One executor queue: a heap of (eligible, seq, task), at most one task running. `role`: which queue of
    _QUEUE (0..3 per GPU: weights, inputs, exec, outputs; -1 disk, -2 control); `lane`: its GPU's, if any."""
    __slots__ = ("heap", "busy", "wake", "wake_at", "wake_gen", "closed", "role", "lane")

    def __init__(self, role: int, lane: _Lane | None = None) -> None:
        self.heap: list[tuple[int, int, _Task]] = []
        self.busy: _Task | None = None
        self.wake = False         # a wake-up is pending (at wake_at); wake_gen tells it from cancelled ones
        self.wake_at = 0
        self.wake_gen = 0
        self.closed = False
        self.role = role
        self.lane = lane


class _Lean:
    """The lean state machine of one EmulatedWorker (virtual time). Owns nothing the worker's general state
    does not: models, entries, outstanding, per-GPU page caches, pools and `loading` sets are the worker's."""

    def __init__(self, w: EmulatedWorker):
        self.w = w
        self.clock = w.clock
        self.post = w.clock.post      # events are cancelled by generation (wake_gen) or identity (busy)
        from workbench.worker.emulated import EmulatedDevice
        dev = w.device
        assert isinstance(dev, EmulatedDevice)
        self.dev = dev
        self.rngs = self.dev.rngs
        prof = self.dev.profile
        self.load_sigma = prof.load_sigma
        self.copy_lat = prof.copy_latency_ns
        self.h2d = prof.h2d_bytes_per_s
        self.d2h = prof.d2h_bytes_per_s
        self.sm_clock = prof.sm_clock_mhz
        cfg = w.config
        self.lead_in = cfg.copy_input_lead_in
        self.allow_zero = cfg.allow_zero_size_inputs
        # byte-counting pools with the general pools' sizes, in place of the worker's (the same interface)
        self.host_io = _Pool(w.host_io.name, w.host_io.size)
        w.host_io = self.host_io                # type: ignore[assignment]
        self.queues: list[list[_Queue]] = []
        for g, st in enumerate(w.gpus):
            lane = _Lane()
            lane.gpu, lane.rng = g, self.rngs[g]
            lane.io = _Pool(st.io.name, st.io.size)
            lane.ws = _Pool(st.workspace.name, st.workspace.size)
            st.io, st.workspace = lane.io, lane.ws   # type: ignore[assignment]
            qs = [_Queue(r, lane) for r in range(4)]
            lane.wq, lane.inq, lane.exq, lane.outq = qs
            self.queues.append(qs)
        self.disk = _Queue(-1)
        self.control = _Queue(-2)
        self.outbox: list[Result] = []
        self.seq = 0
        self.num_gpus = w.num_gpus
        self._infer_info: dict[tuple[ModelEntry, int], tuple] = {}   # (entry, n) -> what an Infer of n needs: _info
        self._dists: dict[tuple[ModelEntry, int], tuple[int, float] | ExecDist] = {}   # (entry, batch) -> see _dist
        self._plans: dict[tuple[int, int], _Plan] = {}   # (model id, n) -> _Plan, for loaded models
        clock = w.clock
        self.now = clock.now
        self._done_cb = self._on_done           # bound once (a bound method per posted event otherwise)
        # posting an event: _push((t, _cnext(), fn, args)) with t >= now (Clock.poster)
        self._push, self._cnext = clock.poster()

    # ---------------------------------------------------------------------------------------- queues
    def queue(self, t: _Task) -> _Queue:
        q = _QUEUE[t.kind]
        if q >= 0:
            return self.queues[t.gpu][q]
        return self.disk if q == -1 else self.control

    def submit(self, a: Any, *, answer_here: bool = False) -> None:   # (answers come from clock callbacks alone)
        # a well-formed Infer with a fresh id, straight onto its GPU's input queue (what _submit does for it)
        w = self.w
        cls = type(a)               # (not `type(a) is _Infer`: that would type a's fields, checked only below)
        if cls is _Infer and not w.closed:
            aid, g = a.id, a.gpu
            outstanding = w.outstanding
            if type(aid) is int and aid >= 0 and type(a.earliest) is int and type(a.latest) is int \
                    and type(a.model_id) is int and type(g) is int and 0 <= g < self.num_gpus \
                    and type(a.batch_size) is int and aid not in outstanding:
                outstanding[aid] = a
                self.seq = seq = self.seq + 1
                e = a.earliest - self.lead_in
                if e < 0:
                    e = 0
                now = self.now()
                t = _Task(_CIN, a, now, e, a.latest, seq)
                t.gpu = g
                q = self.queues[g][1]
                heap = q.heap
                _heappush(heap, (e, seq, t))
                if q.busy is None and heap[0][2] is t and not (q.wake and q.wake_at <= e):
                    q.wake = True                              # _wake(q, e)
                    q.wake_at = e
                    q.wake_gen = gen = q.wake_gen + 1
                    self._push((e if e > now else now, self._cnext(), self._on_wake, (q, gen)))
                return
        self._submit(a)

    def _submit(self, action: Any) -> None:
        """Any action, the general way."""
        if not isinstance(action, Action):
            raise TypeError(f"submit() takes a workbench.contract Action, got {type(action).__name__}")
        a: Any = action             # (an Action of any type: the fields of its type are read below, by type)
        w = self.w
        now = self.clock.now()
        if w.closed:
            r = _error(a, _S.SHUTTING_DOWN, "worker is closed", now, now)
            w.results_delivered += 1
            w._call(r)
            return
        if a.type is _AT.INFER and type(a.id) is int and a.id >= 0 and type(a.earliest) is int \
                and type(a.latest) is int and type(a.model_id) is int and type(a.gpu) is int \
                and 0 <= a.gpu < self.num_gpus and type(a.batch_size) is int:
            problem = None                  # what _malformed finds for a well-formed Infer
        else:
            problem = w._malformed(a)
        outstanding = w.outstanding
        self.seq += 1
        if type(a.id) is not int or a.id in outstanding:   # never tracked: see Worker.submit
            t = _Task(_IMM, a, now, 0, _FOREVER, self.seq)
            t.status, t.message = problem or (_S.INVALID_ACTION, f"action id {a.id} is already in flight")
            t.track = False
        else:
            outstanding[a.id] = a
            kind = _FIRST_KIND.get(a.type) if problem is None else None
            if kind is None:
                t = _Task(_IMM, a, now, 0, _FOREVER, self.seq)
                t.status, t.message = problem if problem is not None else \
                    (_S.INVALID_ACTION, f"unknown action type {type(a).__name__}")
                t.track = True
            elif kind == _CIN:
                e = a.earliest - self.lead_in
                t = _Task(_CIN, a, now, e if e > 0 else 0, a.latest, self.seq)
                t.gpu = a.gpu
            else:
                t = _Task(kind, a, now, a.earliest, a.latest, self.seq)
                if kind <= _EVICT:
                    t.gpu = a.gpu
        q = self.queue(t)
        heap = q.heap
        _heapq.heappush(heap, (t.eligible, t.seq, t))
        if q.busy is None and heap[0][2] is t:
            self._wake(q, t.eligible)

    def _wake(self, q: _Queue, t: int) -> None:
        if q.wake:
            if q.wake_at <= t:
                return
        q.wake = True
        q.wake_at = t
        q.wake_gen = gen = q.wake_gen + 1
        self.post(t, self._on_wake, q, gen)

    def _on_wake(self, q: _Queue, gen: int) -> None:
        if gen != q.wake_gen:       # cancelled (superseded by an earlier wake-up, or closed)
            return
        q.wake = False
        out = self._kick_in(q, self.now()) if q.role == 1 else self._kick(q, self.now())
        if self.outbox:
            out = out + self.outbox
            self.outbox.clear()
        if out:
            self.deliver(out)

    def _kick(self, q: _Queue, now: int) -> list:
        out: list = []
        heap = q.heap
        while heap and q.busy is None and not q.closed:
            t = heap[0][2]
            if t.eligible > now:
                self._wake(q, t.eligible)
                break
            _heappop(heap)
            if t.plan is not None and t.kind == _EXEC:      # an Infer's exec: begins (and posts its end) there
                try:
                    r = self._begin_exec(q, t, now)
                except Exception as e:  # noqa: BLE001
                    r = self._bug(t, e)
                if r is not None:
                    out.append(r)
                continue
            try:
                r = self.begin(t, now)
            except Exception as e:  # noqa: BLE001 - a worker bug still ends the action with one result
                r = self._bug(t, e)
            if r is not None:
                out.append(r)
                continue
            try:
                d = self.run(t, now)
            except Exception as e:  # noqa: BLE001 - a device failure becomes the action's result (ClockExecutor)
                self.cleanup(t)
                out.append(self.fail(t, _S.RUNTIME_ERROR, f"{type(e).__name__}: {e}"))
                continue
            q.busy = t
            self.post(now + d, self._on_done, q, t, now, d)
        return out

    def _kick_in(self, q: _Queue, now: int) -> list:
        """_kick for an input copy queue: an Infer whose plan is known and whose pools have room as counted
        starts here (what begin() and run() do for it); anything else goes through begin()."""
        out: list = []
        heap = q.heap
        while heap and q.busy is None and not q.closed:
            t = heap[0][2]
            if t.eligible > now:
                self._wake(q, t.eligible)
                break
            _heappop(heap)
            a = t.a
            p = self._plans.get((a.model_id, a.batch_size))
            if p is not None and now <= t.latest and a.inputs is None and self.allow_zero:
                lane = q.lane
                assert lane is not None, "an input queue belongs to a GPU"
                io = lane.io
                host = self.host_io
                n = p.io_len
                m = p.hin_len
                if io.counted(n) and host.counted(m):   # the general path takes the same two allocations
                    t.io = io.take(n)
                    t.host = host.take(m)
                    t.m, t.entry, t.batch, t.info, t.plan = p.m, p.entry, p.batch, p.info, p
                    d = p.cin_d
                    q.busy = t
                    self._push((now + d, self._cnext(), self._done_cb, (q, t, now, d)))
                    continue
            try:
                r = self.begin(t, now)
            except Exception as e:  # noqa: BLE001 - a worker bug still ends the action with one result
                r = self._bug(t, e)
            if r is not None:
                out.append(r)
                continue
            d = t.info[4]
            q.busy = t
            self._push((now + d, self._cnext(), self._done_cb, (q, t, now, d)))
        return out

    def _on_done(self, q: _Queue, t: _Task, begin: int, d: int) -> None:
        if q.busy is not t:
            return
        q.busy = None
        if t.plan is not None and not self.w.closed:
            # An Infer that began its input copy ends a stage, the worker open: the steps of finish(),
            # hand_on(), _kick() and deliver() written out for it, in their order (the same events posted in
            # the same order, the same results in the same order), the pools' counted case and an idle next
            # queue taken straight through.
            now = begin + d
            lane = q.lane
            assert lane is not None, "an Infer's stages run on its GPU's queues"
            k = t.kind
            res = r = None
            if k == _CIN:
                try:
                    a = t.a
                    t.cin = (begin, now, d)
                    self.host_io.free(t.host)
                    t.host = -1
                    self.seq = seq = self.seq + 1     # the same record goes on as the Infer's exec task
                    el = a.earliest
                    t.kind, t.eligible, t.latest, t.seq = _EXEC, el, a.latest, seq
                    xq = lane.exq
                    if xq.busy is None and not xq.heap and el <= now:
                        res = self._begin_exec(xq, t, now)    # what _kick(xq) does with t alone in it
                    else:
                        heap = xq.heap
                        _heappush(heap, (el, seq, t))
                        if xq.busy is None and heap[0][2] is t:
                            if el <= now:
                                self.outbox.extend(self._kick(xq, now))
                            else:
                                self._wake(xq, el)
                except Exception as e:  # noqa: BLE001
                    r = self._bug(t, e)
                if r is None and res is None and not q.heap and not self.outbox:
                    return
                out = [r] if r is not None else []
                if q.heap:
                    out += self._kick_in(q, now)
            elif k == _EXEC:
                try:
                    if t.ws >= 0:
                        lane.ws.free(t.ws)
                        t.ws = -1
                    t.ex = (begin, now, d)
                    if t.m.gpus[lane.gpu].version != t.version:
                        self.release(t)
                        a = t.a
                        r = self.fail(t, _S.EXEC_CONCURRENT_WEIGHTS_MODIFICATION,
                                      f"weights of model {a.model_id} on gpu {a.gpu} were evicted or reloaded "
                                      f"during exec")
                    else:
                        self.seq = seq = self.seq + 1     # ... and as its output copy
                        t.kind, t.eligible, t.latest, t.seq = _COUT, 0, _FOREVER, seq
                        oq = lane.outq
                        if oq.busy is None and not oq.heap and now <= _FOREVER:
                            # begin() + run() of the output copy, at the head of its idle queue
                            p = t.plan
                            try:
                                t.host = self.host_io.alloc(p.hout_n)
                            except _PoolExhausted as exc:
                                self.release(t)
                                res = self.fail(t, _S.COPY_OUTPUT_HOST_ALLOC, str(exc))
                            if res is None:
                                d = p.cout_d
                                oq.busy = t
                                self._push((now + d, self._cnext(), self._done_cb, (oq, t, now, d)))
                        else:
                            heap = oq.heap
                            _heappush(heap, (0, seq, t))
                            if oq.busy is None and heap[0][2] is t:
                                self.outbox.extend(self._kick(oq, now))
                except Exception as e:  # noqa: BLE001
                    r = self._bug(t, e)
                if r is None and res is None and not q.heap and not self.outbox:
                    return
                out = [r] if r is not None else []
                if q.heap:
                    out += self._kick(q, now)
            else:                                       # _COUT
                try:
                    self.release(t)
                    a = t.a
                    r = _new(_InferResult)
                    clk = self.sm_clock
                    ci, ex, co = make_timing(*t.cin), make_timing(*t.ex), make_timing(begin, now, d)
                    _setattr(r, "__dict__", {"id": a.id, "action_type": a.type, "status": _S.SUCCESS, "message": "",
                                             "received": t.received, "sent": now, "gpu": a.gpu,
                                             "batch_size": a.batch_size, "copy_input": ci, "exec": ex,
                                             "copy_output": co, "gpu_clock_before": clk, "gpu_clock": clk,
                                             "outputs": None})
                except Exception as e:  # noqa: BLE001
                    r = self._bug(t, e)
                if not q.heap and not self.outbox:
                    w = self.w                          # deliver([r])
                    if w.outstanding.pop(r.id, None) is not None:
                        w.results_delivered += 1
                        w._call(r)
                    else:
                        self.deliver([r])
                    return
                out = [r]
                if q.heap:
                    out += self._kick(q, now)
            if res is not None:
                out.append(res)
            if self.outbox:
                out += self.outbox
                self.outbox.clear()
            if out:
                self.deliver(out)
            return
        try:
            r = self.finish(t, begin, d)
        except Exception as e:  # noqa: BLE001
            r = self._bug(t, e)
        out = [r] if r is not None else []
        out += self._kick(q, self.clock.now())
        if self.outbox:
            out += self.outbox
            self.outbox.clear()
        if out:
            self.deliver(out)

    def _begin_exec(self, xq: _Queue, t: _Task, now: int) -> Result | None:
        """begin() + run() of an Infer's exec task at the head of its idle queue; posts its end. A failure
        result, or None."""
        if now > t.latest or now < t.eligible:
            r = self._window(t, now)
            self.release(t)
            return r
        lane = xq.lane
        assert lane is not None, "an exec queue belongs to a GPU"
        gm = t.m.gpus[lane.gpu]
        if gm.weights is None:
            self.release(t)
            return self.fail(t, _S.EXEC_WEIGHTS_MISSING, f"model {t.a.model_id} has no weights on gpu {t.a.gpu}: "
                                                         f"send LoadWeights first")
        p = t.plan
        assert p is not None, "_begin_exec runs an Infer with a plan"
        try:
            t.ws = lane.ws.alloc(p.ws_n)
        except _PoolExhausted as ex:
            self.release(t)
            return self.fail(t, _S.EXEC_WORKSPACE_POOL_EXHAUSTED, str(ex))
        t.version = gm.version
        dist = p.dist
        if isinstance(dist, tuple):
            rng = lane.rng
            if _GAUSS_INLINE:                   # rng.gauss(0.0, 1.0), as random.Random computes it
                z = rng.gauss_next
                rng.gauss_next = None
                if z is None:
                    x2pi = rng.random() * _TWOPI
                    g2rad = _sqrt(-2.0 * _log(1.0 - rng.random()))
                    z = _cos(x2pi) * g2rad
                    rng.gauss_next = _sin(x2pi) * g2rad
            else:
                z = rng.gauss(0.0, 1.0)
            d = int(dist[0] * _exp(dist[1] * z))
            if d < 1:
                d = 1
        else:
            d = dist.draw(lane.rng)
        xq.busy = t
        self._push((now + d, self._cnext(), self._done_cb, (xq, t, now, d)))
        return None

    def hand_on(self, t: _Task, now: int) -> Result | None:
        if self.w.closed:
            self.cleanup(t)
            return self.fail(t, _S.SHUTTING_DOWN, "worker closed during the action")
        q = self.queue(t)
        heap = q.heap
        _heapq.heappush(heap, (t.eligible, t.seq, t))
        if q.busy is None and heap[0][2] is t:
            if t.eligible <= now:
                self.outbox.extend(self._kick(q, now))
            else:
                self._wake(q, t.eligible)
        return None

    def deliver(self, results: list) -> None:
        w = self.w
        outstanding = w.outstanding
        ok = []
        for r in results:
            if "_untracked" in r.__dict__ or outstanding.pop(r.id, None) is not None:
                ok.append(r)
            else:
                import traceback
                traceback.print_stack()
                print(f"worker bug: second result for action {r.id} ({r.status.name}) dropped")
        w.results_delivered += len(ok)
        call = w._call
        for r in ok:
            call(r)

    # ---------------------------------------------------------------------------------------- tasks
    def fail(self, t: _Task, status: _S, message: str) -> Result:
        now = self.clock.now()
        return _error(t.a, status, message, t.received, now)

    def _bug(self, t: _Task, e: Exception) -> Result:
        import traceback
        traceback.print_exc()
        try:
            self.cleanup(t)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        return self.fail(t, _S.RUNTIME_ERROR, f"worker error in the {_KIND_NAME[t.kind]} task: "
                                              f"{type(e).__name__}: {e}")

    def _window(self, t: _Task, now: int) -> Result | None:
        if now > t.latest:
            return self.fail(t, _TOO_LATE[t.kind], f"{_KIND_NAME[t.kind]} task could not start by latest="
                                                    f"{t.latest} (now {now}, {(now - t.latest) / 1e6:.3f} ms late)")
        if now < t.eligible:
            return self.fail(t, _TOO_EARLY[t.kind], f"{_KIND_NAME[t.kind]} task started before it was eligible "
                                                     f"at {t.eligible}")
        return None

    def release(self, t: _Task) -> None:
        if t.io >= 0:
            self.w.gpus[t.gpu].io.free(t.io)
            t.io = -1
        if t.host >= 0:
            self.host_io.free(t.host)
            t.host = -1

    def cleanup(self, t: _Task) -> None:
        k = t.kind
        if k == _LOAD:
            if t.alloc is not None and not t.alloc.freed:
                st = self.w.gpus[t.gpu]
                st.loading.discard(id(t.alloc))
                st.cache.free(t.alloc)
        elif k == _EXEC:
            if t.ws >= 0:
                self.w.gpus[t.gpu].workspace.free(t.ws)
                t.ws = -1
            self.release(t)
        elif k == _CIN or k == _COUT:
            self.release(t)
        elif k == _DISK:
            if t.entry is not None:
                self.dev.release_model(t.entry)
                t.entry = None

    def begin(self, t: _Task, now: int) -> Result | None:
        k = t.kind
        if now > t.latest or now < t.eligible:
            r = self._window(t, now)
            if k == _EXEC or k == _COUT:
                self.release(t)
            return r
        a = t.a
        w = self.w
        if k == _CIN:
            m = w.models.get(a.model_id)
            if m is None:
                return self.fail(t, _S.COPY_INPUT_UNKNOWN_MODEL, f"model {a.model_id} is not loaded on this worker")
            e = m.entry
            n = a.batch_size
            info = self._infer_info.get((e, n))
            if info is None:
                info = self._infer_info[(e, n)] = self._info(e, n)
            b = info[0]
            if b is None:
                return self.fail(t, _S.COPY_INPUT_INVALID_BATCH_SIZE,
                                 f"batch size {a.batch_size} for model {a.model_id} ({e.name}): compiled batch "
                                 f"sizes are {list(e.batch_sizes)}; use 1..{e.batch_sizes[-1]}")
            if a.inputs is not None or not self.allow_zero:
                r = self._check_inputs(t, e, a)
                if r is not None:
                    return r
            try:
                t.io = w.gpus[t.gpu].io.alloc(info[1])
            except _PoolExhausted as ex:
                return self.fail(t, _S.COPY_INPUT_IO_POOL_EXHAUSTED, str(ex))
            try:
                t.host = self.host_io.alloc(info[2])
            except _PoolExhausted as ex:
                self.release(t)
                return self.fail(t, _S.COPY_INPUT_HOST_ALLOC, str(ex))
            t.m, t.entry, t.batch, t.info = m, e, b, info
            if info[4] >= 0 and info[5] >= 0:     # (copy durations that end no earlier than they begin)
                key = (a.model_id, n)
                p = self._plans.get(key)
                if p is None or p.m is not m:
                    p = self._plans[key] = _Plan(m, e, info, self._dist(e, b))
                t.plan = p
            return None
        if k == _EXEC:
            gm = t.m.gpus[t.gpu]
            if gm.weights is None:
                self.release(t)
                return self.fail(t, _S.EXEC_WEIGHTS_MISSING, f"model {a.model_id} has no weights on gpu {a.gpu}: "
                                                             f"send LoadWeights first")
            entry = t.entry
            assert entry is not None, "set by the input copy"
            try:
                t.ws = w.gpus[t.gpu].workspace.alloc(entry.workspace_bytes[t.batch])
            except _PoolExhausted as ex:
                self.release(t)
                return self.fail(t, _S.EXEC_WORKSPACE_POOL_EXHAUSTED, str(ex))
            t.version = gm.version
            return None
        if k == _COUT:
            try:
                t.host = self.host_io.alloc(t.info[3])
            except _PoolExhausted as ex:
                self.release(t)
                return self.fail(t, _S.COPY_OUTPUT_HOST_ALLOC, str(ex))
            return None
        if k == _LOAD:
            m = w.models.get(a.model_id)
            if m is None:
                return self.fail(t, _S.LOAD_WEIGHTS_UNKNOWN_MODEL, f"model {a.model_id} is not loaded on this "
                                                                   f"worker")
            st = w.gpus[a.gpu]
            g = m.gpus[a.gpu]
            w.drop_weights(a.gpu, g)
            try:
                t.alloc = st.cache.alloc(m.entry.runs)
            except _InsufficientCache as e:
                return self.fail(t, _S.LOAD_WEIGHTS_INSUFFICIENT_CACHE, f"model {a.model_id} on gpu {a.gpu}: {e}")
            st.loading.add(id(t.alloc))
            t.version = g.version
            t.gm = g
            t.m = m
            return None
        if k == _EVICT:
            m = w.models.get(a.model_id)
            if m is None:
                return self.fail(t, _S.EVICT_WEIGHTS_UNKNOWN_MODEL, f"model {a.model_id} is not loaded on this "
                                                                    f"worker")
            g = m.gpus[a.gpu]
            if g.weights is None:
                return self.fail(t, _S.EVICT_WEIGHTS_NOT_IN_CACHE, f"model {a.model_id} has no weights on gpu "
                                                                   f"{a.gpu}")
            w.drop_weights(a.gpu, g)
            return None
        if k == _IMM:
            r = self.fail(t, t.status, t.message)
            if not t.track:
                _setattr(r, "_untracked", True)
            return r
        if k == _CTRL:
            if a.type == _AT.CLEAR_CACHE:
                w.clear_cache()
                return _ClearCacheResult(id=a.id, action_type=a.type, received=t.received, sent=now)
            return _GWSResult(id=a.id, action_type=a.type, received=t.received, sent=now, state=w.state())
        # _DISK
        taken = [i for i in range(a.model_id, a.model_id + a.copies) if i in w.models]
        if taken:
            return self.fail(t, _S.INVALID_MODEL_ID, f"model ids {taken[:5]}{'...' if len(taken) > 5 else ''} "
                                                     f"are already in use (copies {a.model_id}.."
                                                     f"{a.model_id + a.copies - 1})")
        return None

    def _dist(self, e: Any, b: int) -> Any:
        """The exec duration distribution of (entry, batch): (p50, sigma) when it draws a lognormal (ExecDist.draw
        without the call), else the ExecDist itself."""
        key = (e, b)
        dist = self._dists.get(key)
        if dist is None:
            ed = e.handle.exec[b]
            dist = self._dists[key] = ed if (ed.samples_ns or ed.sigma <= 0) else (ed.p50_ns, ed.sigma)
        return dist

    def _info(self, e: Any, n: int) -> tuple:
        """(padded batch or None, io bytes, host bytes in, host bytes out, copy-in ns, copy-out ns) for n."""
        b = e.padded_batch_size(n) if n >= 1 else None
        if b is None:
            return (None,) * 6
        return (b, e.io_bytes[b], e.host_bytes(n), e.host_bytes(n, outputs=True),
                self.copy_lat + int(e.input_bytes * n / self.h2d * 1e9),
                self.copy_lat + int(e.output_bytes * n / self.d2h * 1e9))

    def _check_inputs(self, t: _Task, e: Any, a: Any) -> Result | None:
        if a.inputs is None:
            return self.fail(t, _S.COPY_INPUT_INVALID_INPUT, "no inputs given and allow_zero_size_inputs is "
                                                            "false in the worker config")
        if not isinstance(a.inputs, (tuple, list)) or not all(isinstance(x, np.ndarray) for x in a.inputs):
            return self.fail(t, _S.COPY_INPUT_INVALID_INPUT, "inputs must be a tuple of numpy arrays")
        if e.inputs is None:
            bad = [x.shape for x in a.inputs if x.ndim == 0 or x.shape[0] != a.batch_size]
            if bad:
                return self.fail(t, _S.COPY_INPUT_BAD_SIZES, f"inputs {bad} do not have batch_size {a.batch_size} "
                                                            f"rows")
            return None
        if len(a.inputs) != len(e.inputs):
            return self.fail(t, _S.COPY_INPUT_INVALID_INPUT, f"model {e.name} takes {len(e.inputs)} input(s) "
                                                            f"{[s.name for s in e.inputs]}, got {len(a.inputs)}")
        for x, spec in zip(a.inputs, e.inputs):
            if x.dtype != np.dtype(spec.dtype):
                return self.fail(t, _S.COPY_INPUT_INVALID_INPUT, f"input {spec.name!r} of {e.name} must be "
                                                                f"{spec.dtype}, got {x.dtype}")
            want = (a.batch_size, *spec.shape)
            if tuple(x.shape) != want:
                return self.fail(t, _S.COPY_INPUT_BAD_SIZES, f"input {spec.name!r} of {e.name} must have shape "
                                                            f"{want} for batch_size {a.batch_size}, got {x.shape}")
        return None

    def run(self, t: _Task, now: int) -> int:
        """Start t's work at now; its duration (the task ends at now + duration)."""
        k = t.kind
        if k == _CIN:
            return t.info[4]
        if k == _EXEC:
            dist = self._dist(t.entry, t.batch)
            if type(dist) is tuple:
                d = int(dist[0] * _exp(dist[1] * self.rngs[t.gpu].gauss(0.0, 1.0)))
                return d if d > 1 else 1
            return dist.draw(self.rngs[t.gpu])
        if k == _COUT:
            return t.info[5]
        if k == _LOAD:
            d = t.m.entry.handle.weights_load_ns
            if self.load_sigma > 0:
                d = max(1, int(d * np.exp(self.load_sigma * self.rngs[t.gpu].gauss(0.0, 1.0))))
            return d
        if k == _EVICT:
            return 0
        # _DISK
        try:
            t.entry, timing = self.dev.open_model(t.a, now)
            t.err = None
        except InvalidModelPath as e:
            t.err = (_S.INVALID_PATH, str(e))
            timing = make_timing(now, now, 0)
        t.timing = timing
        return timing.end - now

    def finish(self, t: _Task, begin: int, d: int) -> Result | None:
        k = t.kind
        w = self.w
        a = t.a
        end = begin + d
        if k == _CIN:
            t.cin = (begin, end, d)
            self.host_io.free(t.host)
            t.host = -1
            self.seq += 1               # the same record goes on as the Infer's exec task
            t.kind, t.eligible, t.latest, t.seq = _EXEC, a.earliest, a.latest, self.seq
            return self.hand_on(t, end)
        if k == _EXEC:
            if t.ws >= 0:
                w.gpus[t.gpu].workspace.free(t.ws)
                t.ws = -1
            t.ex = (begin, end, d)
            if t.m.gpus[t.gpu].version != t.version:
                self.release(t)
                return self.fail(t, _S.EXEC_CONCURRENT_WEIGHTS_MODIFICATION,
                                 f"weights of model {a.model_id} on gpu {a.gpu} were evicted or reloaded during exec")
            self.seq += 1               # ... and as its output copy
            t.kind, t.eligible, t.latest, t.seq = _COUT, 0, _FOREVER, self.seq
            return self.hand_on(t, end)
        if k == _COUT:
            self.release(t)
            r = _new(_InferResult)
            clk = self.sm_clock
            cb, ce, cd = t.cin
            eb, ee, edur = t.ex
            _setattr(r, "__dict__", {"id": a.id, "action_type": a.type, "status": _S.SUCCESS, "message": "",
                                     "received": t.received, "sent": end, "gpu": a.gpu,
                                     "batch_size": a.batch_size, "copy_input": make_timing(cb, ce, cd),
                                     "exec": make_timing(eb, ee, edur), "copy_output": make_timing(begin, end, d),
                                     "gpu_clock_before": clk, "gpu_clock": clk, "outputs": None})
            return r
        if k == _LOAD:
            st = w.gpus[a.gpu]
            st.loading.discard(id(t.alloc))
            if t.gm.version != t.version:
                st.cache.free(t.alloc)
                return self.fail(t, _S.LOAD_WEIGHTS_CONCURRENT_MODIFICATION,
                                 f"model {a.model_id} on gpu {a.gpu} was evicted or reloaded during the load")
            t.gm.weights, t.gm.binding = t.alloc, None
            return _LoadWeightsResult(id=a.id, action_type=a.type, received=t.received, sent=end,
                                      timing=make_timing(begin, end, d))
        if k == _EVICT:
            return _EvictWeightsResult(id=a.id, action_type=a.type, received=t.received, sent=end,
                                       timing=make_timing(begin, end, d))
        # _DISK
        timing = t.timing
        if t.err is not None:
            return self.fail(t, *t.err)
        e = t.entry
        assert e is not None, "opened by run()"
        keep = tuple(b for b in e.batch_sizes
                     if b <= a.max_batch_size and (e.exec_ns.get(b, 0) <= a.max_exec_duration))
        taken = [i for i in range(a.model_id, a.model_id + a.copies) if i in w.models]
        if not keep or taken:
            self.dev.release_model(e)
            if taken:
                return self.fail(t, _S.INVALID_MODEL_ID, f"model ids {taken[:5]} were taken during the load")
            return self.fail(t, _S.INVALID_ACTION, f"{e.name}: no batch size of {list(e.batch_sizes)} is <= "
                                                   f"max_batch_size {a.max_batch_size} with exec <= "
                                                   f"max_exec_duration {a.max_exec_duration} ns")
        e.batch_sizes = keep
        w.entries.append(e)
        ids = tuple(range(a.model_id, a.model_id + a.copies))
        for i in ids:
            w.models[i] = _ModelCopy(i, e, w.num_gpus)
        return _LMResult(
            id=a.id, action_type=a.type, received=t.received, sent=end, model_ids=ids,
            batch_sizes=keep, input_bytes=e.input_bytes, output_bytes=e.output_bytes, weights_bytes=e.weights_bytes,
            num_pages=e.num_pages, page_size=e.page_size, weights_load_ns=e.weights_load_ns,
            exec_ns=tuple(e.exec_ns.get(b, 0) for b in keep), timing=timing)

    # ---------------------------------------------------------------------------------------- close
    def close(self) -> None:
        w = self.w
        if w.closed:
            return
        w.closed = True
        queues = [q for qs in self.queues for q in qs] + [self.disk, self.control]
        out = []
        for q in queues:
            tasks = [e[2] for e in q.heap]
            q.heap = []
            if q.busy is not None:       # its end event finds the queue no longer busy with it
                tasks.append(q.busy)
                q.busy = None
            if q.wake:
                q.wake_gen += 1
                q.wake = False
            for t in tasks:
                self.cleanup(t)
                r = self.fail(t, _S.SHUTTING_DOWN, "worker closed before the action ran")
                if t.kind == _IMM and not t.track:     # a duplicate id's: not the answer of the action in flight
                    _setattr(r, "_untracked", True)
                out.append(r)
        self.deliver(out)
        for q in queues:
            q.closed = True
        now = self.clock.now()
        self.deliver([_error(a, _S.SHUTTING_DOWN, "worker closed", now, now) for a in w.outstanding.values()])
        w.release_device()
