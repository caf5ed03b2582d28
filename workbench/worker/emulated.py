"""The emulated GPU: the worker state machine of `base.py` with a device that does no compute and takes the
durations a profile recorded (Clockwork's `worker_dummy`). Same windows, cache accounting and status codes as
the real workers, because it is the same code; only the device differs.

It owns no threads: executors are driven by `clock.call_at`, so it runs in real time on a `RealClock` (callbacks
on the clock's thread) and deterministically in virtual time on a `VirtualClock` (same seed and actions, same
results). In virtual time (without task telemetry) it runs a lean copy of that state machine with the same
events and results, several times cheaper (`_Lean`, at the end of this file). Models are loaded by profile
name ("profile:resnet50": no files, so thousands of instances cost nothing) or from an artifact directory
(sizes from its manifest, durations from its measurements.json, or from the profile entry of the same model
name)."""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np

from workbench.clock import Clock
from workbench.contract import Action, LoadModelFromDisk, Result, Timing, make_timing
from workbench.worker.base import Device, InvalidModelPath, ModelEntry, Worker, entry_from_artifact
from workbench.worker.config import WorkerConfig
from workbench.worker.measurements import read_measurements
from workbench.worker.page_cache import Allocation
from workbench.worker.profile import ExecDist, Profile, ProfileError, ProfileModel

PROFILE_PREFIX = "profile:"


class EmulatedModel:
    """What the emulated device needs to time a model."""
    __slots__ = ("exec", "weights_load_ns")

    def __init__(self, exec_: dict[int, ExecDist], weights_load_ns: int):
        self.exec = exec_
        self.weights_load_ns = weights_load_ns


class EmulatedDevice(Device):
    name = "emulated"
    threaded = False

    def __init__(self, profile: Profile, num_gpus: int, seed: int = 0):
        self.profile = profile
        self.rngs = [random.Random(f"workbench-emulated-{seed}-{g}") for g in range(num_gpus)]
        self.page_size = profile.page_size

    def setup(self, worker: Worker) -> None:
        self.page_size = worker.config.page_size

    # -- models
    def open_model(self, action: LoadModelFromDisk, now: int) -> tuple[ModelEntry, Timing]:
        path = action.path
        if path.startswith(PROFILE_PREFIX):
            try:
                pm = self.profile.model(path[len(PROFILE_PREFIX):])
            except ProfileError as e:
                raise InvalidModelPath(str(e)) from None
            return self._entry_from_profile(pm, path), Timing(now, now, 0)
        return self._entry_from_artifact(path), Timing(now, now, 0)

    def _entry_from_profile(self, pm: ProfileModel, path: str) -> ModelEntry:
        runs = pm.runs_for(self.page_size, self.profile.page_size)
        in_b = sum(s.nbytes for s in pm.inputs) if pm.inputs else 0
        out_b = sum(s.nbytes for s in pm.outputs) if pm.outputs else 0
        bs = pm.batch_sizes
        return ModelEntry(
            name=pm.name, path=path, batch_sizes=bs, inputs=pm.inputs, outputs=pm.outputs, input_bytes=in_b,
            output_bytes=out_b, weights_bytes=pm.weights_bytes, page_size=self.page_size, runs=runs,
            io_bytes={b: pm.io_bytes.get(b, (in_b + out_b) * b) for b in bs},
            workspace_bytes={b: pm.workspace_bytes.get(b, 0) for b in bs},
            weights_load_ns=pm.weights_load_ns, exec_ns={b: d.p50_ns for b, d in pm.exec.items()},
            handle=EmulatedModel(dict(pm.exec), pm.weights_load_ns))

    def _entry_from_artifact(self, path: str) -> ModelEntry:
        from workbench.models.artifact import Artifact, ArtifactError
        try:
            art = Artifact.open(path, verify=False)
        except ArtifactError as e:
            raise InvalidModelPath(str(e)) from None
        if art.page_size != self.page_size:
            raise InvalidModelPath(f"{path}: artifact page size {art.page_size} != worker page_size "
                                   f"{self.page_size}: recompile with --page-size {self.page_size} or change "
                                   f"page_size in the worker config")
        entry = entry_from_artifact(art, path)
        meas = read_measurements(art)
        if meas is not None and meas.exec:
            exec_ = {b: meas.exec[b] for b in art.batch_sizes if b in meas.exec}
            load_ns = meas.weights_load_ns
        elif art.name in self.profile.models:
            pm = self.profile.models[art.name]
            exec_ = {b: pm.exec[b] for b in art.batch_sizes if b in pm.exec}
            load_ns = pm.weights_load_ns
        else:
            raise InvalidModelPath(f"{path}: no measurements.json and no entry {art.name!r} in profile "
                                   f"{self.profile.path or self.profile.device}: the emulated worker needs durations")
        if not exec_:
            raise InvalidModelPath(f"{path}: no exec durations for batch sizes {list(art.batch_sizes)}")
        entry.batch_sizes = tuple(b for b in art.batch_sizes if b in exec_)
        entry.weights_load_ns = load_ns
        entry.exec_ns = {b: exec_[b].p50_ns for b in entry.batch_sizes}
        entry.handle = EmulatedModel(exec_, load_ns)
        return entry

    # -- timed work: returns immediately with `end` in the future
    def load_weights(self, gpu: int, entry: ModelEntry, alloc: Allocation, now: int) -> tuple[Timing, Any]:
        m: EmulatedModel = entry.handle
        d = m.weights_load_ns
        if self.profile.load_sigma > 0:
            d = max(1, int(d * np.exp(self.profile.load_sigma * self.rngs[gpu].gauss(0.0, 1.0))))
        return Timing(now, now + d, d), None

    def _copy(self, nbytes: int, rate: float, now: int) -> Timing:
        d = self.profile.copy_latency_ns + int(nbytes / rate * 1e9)
        return Timing(now, now + d, d)

    def copy_input(self, gpu: int, entry: ModelEntry, batch: int, n: int, inputs: Sequence[np.ndarray] | None,
                   io_offset: int, host_offset: int, now: int) -> tuple[Timing, Any]:
        return self._copy(entry.input_bytes * n, self.profile.h2d_bytes_per_s, now), None

    def execute(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any,
                now: int) -> tuple[Timing, Any, int, int]:
        d = entry.handle.exec[batch].draw(self.rngs[gpu])
        clk = self.profile.sm_clock_mhz
        return Timing(now, now + d, d), None, clk, clk

    def copy_output(self, gpu: int, entry: ModelEntry, outputs: Any, n: int, host_offset: int,
                    now: int) -> tuple[Timing, tuple[np.ndarray, ...] | None]:
        return self._copy(entry.output_bytes * n, self.profile.d2h_bytes_per_s, now), None


class EmulatedWorker(Worker):
    """`EmulatedWorker(clock, num_gpus, profile, config, on_result, seed=0)`; `profile` is a Profile, a profile
    name ("h200") or a path to a profile file."""

    def __init__(self, clock: Clock, num_gpus: int = 1, profile: Profile | str = "h200",
                 config: WorkerConfig | None = None, on_result: Callable[[Result], None] | None = None,
                 seed: int = 0, lean: bool | None = None):
        """`lean`: run the lean state machine (default: on a virtual clock without task telemetry)."""
        prof = profile if isinstance(profile, Profile) else Profile.load(profile)
        self.profile = prof
        super().__init__(EmulatedDevice(prof, num_gpus, seed), num_gpus, config,
                         on_result or (lambda r: None), clock)
        if lean is None:
            lean = bool(getattr(clock, "virtual", False)) and not self.config.telemetry
        if lean and self.config.telemetry:
            raise ValueError("the lean emulated worker records no task telemetry: use lean=False with "
                             "telemetry = true")
        self._lean = _Lean(self) if lean else None
        if self._lean is not None and type(self).submit is EmulatedWorker.submit:
            self.submit = self._lean.submit      # an instance attribute: no dispatch through submit() below

    def submit(self, action: Action) -> None:
        if self._lean is not None:
            self._lean.submit(action)
        else:
            super().submit(action)

    def close(self, timeout: float = 30.0) -> None:
        if self._lean is not None:
            self._lean.close()
        else:
            super().close(timeout)


# ================================================================================================ lean path
# In virtual time the emulated worker runs a lean copy of the state machine of base.py/executor.py: the same
# queues (per GPU weights/inputs/exec/outputs, worker-wide disk/control), the same (eligible, order) priority,
# windows, checks, pools, page cache, random draws and status codes, and the same clock events in the same
# order (a wake-up when an idle queue gets an eligible head, one event when each task's work ends). So its
# results are identical to the general path's for the same actions and seed (tests/test_worker_emulated.py
# compares them), at a fraction of the cost: no locks, no task classes, no per-task wrappers, results built
# without the dataclass constructors, pools that count bytes instead of placing ranges while placement
# cannot matter (_Pool). An Infer's three stages have their common case written out (_kick_in, _on_done,
# _begin_exec: an Infer whose (model, n) was seen before, pools with room as counted, an idle next queue), with
# the same steps in the same order as the general methods, and events go straight onto a VirtualClock's heap
# (Clock.poster).

import heapq as _heapq
from math import cos as _cos, exp as _exp, log as _log, sin as _sin, sqrt as _sqrt
from workbench.contract import (FOREVER as _FOREVER, ActionType as _AT, ClearCacheResult as _ClearCacheResult,
                                EvictWeightsResult as _EvictWeightsResult, GetWorkerStateResult as _GWSResult,
                                Infer as _Infer, InferResult as _InferResult, LoadModelFromDiskResult as _LMResult,
                                LoadWeightsResult as _LoadWeightsResult, Status as _S, error as _error)
from workbench.worker.base import ModelCopy as _ModelCopy
from workbench.worker.page_cache import InsufficientCache as _InsufficientCache
from workbench.worker.pools import MemoryPool as _MemoryPool, PoolExhausted as _PoolExhausted

_new = object.__new__
_setattr = object.__setattr__
_heappush = _heapq.heappush
_heappop = _heapq.heappop
_TWOPI = 2.0 * 3.141592653589793


def _gauss_inline_matches() -> bool:
    """Whether the exec draw written out in _Lean._begin_exec is this Python's random.Random.gauss(0.0, 1.0)
    (the same values and the same state after: it keeps gauss' second value in `gauss_next` as gauss does)."""
    a, b = random.Random(12345), random.Random(12345)
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


_GAUSS_INLINE = _gauss_inline_matches()


class _Pool:
    """A MemoryPool (same sizes, alignment, errors) that answers alloc/free by counting bytes while the
    answer cannot depend on where ranges are placed: with `live` allocations the free space is split into at
    most live + 1 ranges, so `free >= length * (live + 1)` guarantees a fit. Otherwise it replays the operations
    since the pool was last empty (the range allocator's state depends on nothing older) into a real
    MemoryPool and runs exactly until the pool is empty again."""
    __slots__ = ("name", "size", "used", "live", "log", "real", "offsets", "_next")
    ALIGN = 256
    MAX_LOG = 4096
    exact_switches = 0                      # times any pool had to place ranges exactly (tests read it)

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
            and len(self.log) < self.MAX_LOG

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
        off = self.real.alloc(nbytes)          # raises PoolExhausted exactly as the general path does
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
        self.__init__(self.name, self.size)

    def state(self) -> dict:
        return {"size": self.size, "used": self.used, "allocations": len(self.live)}


# task kinds; the queue a kind runs on: per GPU 0..3 (weights, inputs, exec, outputs), worker-wide disk/control
_LOAD, _EVICT, _CIN, _EXEC, _COUT, _DISK, _CTRL, _IMM = range(8)
_KIND_NAME = ("weights", "weights", "inputs", "exec", "outputs", "disk", "control", "control")
_QUEUE = (0, 0, 1, 2, 3, -1, -2, -2)
_TOO_LATE = (_S.LOAD_WEIGHTS_TOO_LATE, _S.EVICT_WEIGHTS_TOO_LATE, _S.COPY_INPUT_TOO_LATE, _S.EXEC_TOO_LATE,
             _S.COPY_OUTPUT_TOO_LATE, _S.COULD_NOT_START_IN_TIME, _S.COULD_NOT_START_IN_TIME,
             _S.COULD_NOT_START_IN_TIME)
_TOO_EARLY = (_S.LOAD_WEIGHTS_TOO_EARLY, _S.EVICT_WEIGHTS_TOO_EARLY, _S.COPY_INPUT_TOO_EARLY, _S.EXEC_TOO_EARLY,
              _S.COPY_OUTPUT_TOO_EARLY, _S.COULD_NOT_START_IN_TIME, _S.COULD_NOT_START_IN_TIME,
              _S.COULD_NOT_START_IN_TIME)
_FIRST_KIND = {_AT.LOAD_WEIGHTS: _LOAD, _AT.EVICT_WEIGHTS: _EVICT, _AT.INFER: _CIN,
               _AT.LOAD_MODEL_FROM_DISK: _DISK, _AT.CLEAR_CACHE: _CTRL, _AT.GET_WORKER_STATE: _CTRL}


class _Task:
    """One task of an action (the general path's Task subclasses in one record)."""
    __slots__ = ("kind", "a", "received", "eligible", "latest", "seq", "gpu", "status", "message", "track",
                 "m", "entry", "batch", "io", "host", "ws", "version", "cin", "ex", "clk", "alloc", "gm",
                 "err", "info", "plan")

    def __init__(self, kind: int, a: Any, received: int, eligible: int, latest: int, seq: int):
        self.kind, self.a, self.received, self.eligible, self.latest, self.seq = \
            kind, a, received, eligible, latest, seq
        self.io = self.host = self.ws = -1
        self.alloc = self.entry = self.m = self.plan = None


class _Plan:
    """What every Infer of one (model id, n samples) needs, worked out once (the model id of a loaded model
    always names the same entry): its pool lengths as the pools align them, durations and exec distribution."""
    __slots__ = ("m", "entry", "batch", "info", "io_n", "io_len", "hin_n", "hin_len", "hout_n", "ws_n", "cin_d",
                 "cout_d", "dist")

    def __init__(self, m: Any, e: Any, info: tuple, dist: Any):
        self.m, self.entry, self.batch, self.info = m, e, info[0], info
        self.io_n, self.io_len = info[1], _aligned(info[1])
        self.hin_n, self.hin_len = info[2], _aligned(info[2])
        self.hout_n = info[3]
        self.ws_n = e.workspace_bytes[info[0]]
        self.cin_d, self.cout_d = info[4], info[5]
        self.dist = dist


def _aligned(nbytes: int) -> int:
    """The length _Pool.alloc takes for nbytes."""
    length = -(-nbytes // 256) * 256
    return length if length >= 256 else 256


class _Lane:
    """One GPU's queues, pools and random stream (what its Infers' stages use)."""
    __slots__ = ("gpu", "wq", "inq", "exq", "outq", "io", "ws", "rng")


class _Queue:
    """One executor queue: a heap of (eligible, seq, task), at most one task running. `role`: which queue of
    _QUEUE (0..3 per GPU: weights, inputs, exec, outputs; -1 disk, -2 control); `lane`: its GPU's, if any."""
    __slots__ = ("heap", "busy", "wake", "wake_at", "wake_gen", "closed", "role", "lane")

    def __init__(self, role: int, lane: _Lane | None = None) -> None:
        self.heap: list = []
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

    def __init__(self, w: "EmulatedWorker"):
        self.w = w
        self.clock = w.clock
        self.post = w.clock.post      # events are cancelled by generation (wake_gen) or identity (busy)
        self.dev: EmulatedDevice = w.device
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
        for st in w.gpus:                       # byte-counting pools with the general pools' sizes
            st.io = _Pool(st.io.name, st.io.size)
            st.workspace = _Pool(st.workspace.name, st.workspace.size)
        w.host_io = _Pool(w.host_io.name, w.host_io.size)
        self.host_io = w.host_io
        self.queues = []
        for g, st in enumerate(w.gpus):
            lane = _Lane()
            lane.gpu, lane.io, lane.ws, lane.rng = g, st.io, st.workspace, self.rngs[g]
            qs = [_Queue(r, lane) for r in range(4)]
            lane.wq, lane.inq, lane.exq, lane.outq = qs
            self.queues.append(qs)
        self.disk = _Queue(-1)
        self.control = _Queue(-2)
        self.outbox: list = []
        self.seq = 0
        self.num_gpus = w.num_gpus
        self._infer_info: dict = {}             # (entry, n) -> what an Infer of n samples needs, see _info
        self._dists: dict = {}                  # (entry, batch) -> exec duration distribution
        self._plans: dict = {}                  # (model id, n) -> _Plan, for loaded models
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

    def submit(self, a: Any) -> None:
        # a well-formed Infer with a fresh id, straight onto its GPU's input queue (what _submit does for it)
        w = self.w
        if type(a) is _Infer and not w.closed:
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

    def _submit(self, a: Any) -> None:
        """Any action, the general way."""
        if not isinstance(a, Action):
            raise TypeError(f"submit() takes a workbench.contract Action, got {type(a).__name__}")
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
        if a.id in outstanding:             # malformed or not: never take the entry of the action in flight
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
                            except _PoolExhausted as ex:
                                self.release(t)
                                res = self.fail(t, _S.COPY_OUTPUT_HOST_ALLOC, str(ex))
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
        gm = t.m.gpus[lane.gpu]
        if gm.weights is None:
            self.release(t)
            return self.fail(t, _S.EXEC_WEIGHTS_MISSING, f"model {t.a.model_id} has no weights on gpu {t.a.gpu}: "
                                                         f"send LoadWeights first")
        p = t.plan
        try:
            t.ws = lane.ws.alloc(p.ws_n)
        except _PoolExhausted as ex:
            self.release(t)
            return self.fail(t, _S.EXEC_WORKSPACE_POOL_EXHAUSTED, str(ex))
        t.version = gm.version
        dist = p.dist
        if type(dist) is tuple:
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
            try:
                t.ws = w.gpus[t.gpu].workspace.alloc(t.entry.workspace_bytes[t.batch])
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
                                                     f"are already in use (copies {a.model_id}..{a.model_id + a.copies - 1})")
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
        t.cin = timing
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
        timing = t.cin
        if t.err is not None:
            return self.fail(t, *t.err)
        e = t.entry
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
