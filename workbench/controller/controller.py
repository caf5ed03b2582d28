"""The controller: models, GPUs, workers, requests, actions and results; a `Policy` makes the decisions.

Client API (the workloads call it; brief "Controller client API"):
    rid = controller.submit(model_id, inputs=None, slo=None, slo_factor=None, callback=None)
`callback(RequestOutcome)` is called exactly once, no later than the request's deadline (arrival + slo).

Set-up:
    ctl = Controller(clock, policy="clockwork")                 # or "triton", "ray", or a Policy
    ctl.add_worker(lambda on_result: EmulatedWorker(clock, 2, "h200", None, on_result))
    ids = ctl.load_model("profile:resnet50", copies=10)        # every worker loads it from disk
    ctl.wait_ready()                                           # virtual: runs the clock until ready

Concurrency: everything runs under one lock. Callers (clock timers, worker result threads, clients) enter
through `submit`, `_on_result` and `_on_timer`; the actions to send and the callbacks to call are queued
while the lock is held and delivered after it is released, so a worker or client never runs inside it.
In virtual time there are no threads and no wall time: the same seed gives the same outcomes.

Faults: an action unanswered long after it should have ended is given up (its watchdog); `failed_after` of
them in a row take the GPU out of service. The controller then probes the worker (GetWorkerState every
`probe_interval`) and brings the GPU back when it answers, with the placement its cache really holds. A worker
that restarts (ProcessWorker's `on_restart`, or `worker_restarted(w)`) has lost its models and cache: its GPUs
are taken out of service, the models are loaded from disk again, and the GPUs come back empty. Results that
arrive after their watchdog, or that belong to a GPU's previous life (its `epoch`), never touch the current
placement directly: if they changed the worker's cache, the controller re-reads the worker's state.

Timers: the controller keeps its own timer entries (time, seq, kind, obj) for request deadlines and action
watchdogs and arms one clock timer for the earliest; entries whose request or action finished are dropped
lazily, in bulk. Entries that come in time order (deadlines per SLO, Infer watchdogs per GPU) wait in FIFOs,
the rest in a heap; they are merged by (time, seq), so the order is the one a single heap would give. Policy
wake-ups (`call_at`) go straight to the clock.

Speed: `submit`, `send_infer` and the success path of an Infer result are written out for the common case
(a ready model, an SLO it can meet, no inputs to check; a successful batch); everything else takes the general
path. A virtual clock needs no thread bookkeeping in `_flush` (and its common case, one action to send and
then the callbacks, is written out there too).
"""
from __future__ import annotations

import heapq
import json
import math
import threading
import warnings
from threading import get_ident
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Final, cast

import numpy as np

from workbench.clock import Clock
from workbench.contract import (FOREVER, Action, ActionType, EvictWeights, GetWorkerState, GetWorkerStateResult,
                                Infer, InferResult, LoadModelFromDisk, LoadModelFromDiskResult, LoadWeights,
                                LoadWeightsResult, Result, Status)
from workbench.controller.compiled import mypyc_attr
from workbench.controller.config import ControllerConfig
from workbench.controller.estimates import ModelEstimates
from workbench.controller.policy import Policy, split_outputs
from workbench.controller.requests import (DONE, ERROR, INFLIGHT, QUEUED, REJECTED, SUCCESS, TIMEOUT,
                                           Request, RequestOutcome)
from workbench.controller.state import GPUState, ModelState
from workbench.telemetry.row_writer import RowWriter

# (Final: the compiled core inlines these constants rather than reading the module's namespace)
DEADLINE: Final = 0
WATCHDOG: Final = 1
PROBE_DUE: Final = 2
# A timer entry: (time, seq, kind, obj); obj is a Request (DEADLINE), an ActionRecord (WATCHDOG) or a
# (worker, what, time) tuple (PROBE_DUE).
TimerEntry = tuple[int, int, int, Any]
# The longest SLO accepted (2**62 ns, ~146 years): a deadline (arrival + slo) must fit the int64 telemetry columns
# and the workers' int64 times; a longer one is rejected like any other bad SLO.
MAX_SLO: Final = 1 << 62

_TYPE_NAMES: Final = {t: t.name for t in ActionType}
_REQUEST_FIELDS: Final = ("request_id", "model_id", "model", "worker", "gpu", "batch_size", "arrival",
                          "deadline", "completion", "slo", "status", "latency", "cold_start", "message", "action_id",
                          "slo_factor")
_ACTION_FIELDS: Final = ("action_id", "worker", "gpu", "type", "model_id", "batch_size", "earliest", "latest",
                         "sent", "planned_begin", "planned_end", "predicted_duration", "completed", "measured_begin",
                         "measured_end", "measured_duration", "gpu_clock", "status", "status_name",
                         "gpu_clock_before", "requests_queued", "copies_loaded", "message")
_INFER: Final = ActionType.INFER
_new: Final = object.__new__
_tuple_new: Final = tuple.__new__
_setattr: Final = object.__setattr__
_STATUS_NAMES: Final = {s: s.name for s in Status}


@mypyc_attr(native_class=False)      # (a dict subclass: mypyc compiles those as plain Python classes)
class _SameString(dict):
    """Stands in for a recorder's string table (`Recorder.strings`) where rows go by keyword: `s[x]` is x."""

    def __missing__(self, key: Any) -> Any:
        return key


_SAME_STRING: Final = _SameString()


@mypyc_attr(native_class=False)      # (an exception: a plain Python class for mypyc too)
class ControllerError(RuntimeError):
    """A set-up problem (no workers, models added in the wrong order, startup failed)."""


class ActionRecord:
    """An action in flight, with what the controller planned for it."""
    __slots__ = ("id", "type", "worker", "gpu", "model", "reqs", "batch_size", "earliest", "latest", "sent",
                 "planned_begin", "planned_end", "predicted", "done", "extra", "epoch", "queued", "copies")

    def __init__(self, aid: int, atype: ActionType, worker: int, gpu: GPUState | None, model: ModelState | None,
                 earliest: int, latest: int, sent: int, planned_begin: int, predicted: int):
        self.id = aid
        self.type = atype
        self.worker = worker
        self.gpu = gpu
        self.model = model
        self.reqs: list[Request] = []
        self.batch_size = 0
        self.earliest = earliest
        self.latest = latest
        self.sent = sent
        self.planned_begin = planned_begin
        self.planned_end = planned_begin + predicted
        self.predicted = predicted
        self.done = False
        self.extra: Any = None
        self.epoch = gpu.epoch if gpu is not None else 0
        self.queued = -1            # requests queued for the model when the action was made (telemetry)
        self.copies = -1            # GPUs holding the model ready then


PROBE: Final = "probe"      # ActionRecord.extra of a GetWorkerState that probes a worker (not a start-up one)


class WorkerInfo:
    """What the controller tracks per worker for recovery."""
    __slots__ = ("disk_loads", "probe", "again", "stale", "reloading", "gen", "probe_timer_at")

    def __init__(self) -> None:
        self.disk_loads: list[LoadModelFromDisk] = []   # to replay after a restart
        self.probe: ActionRecord | None = None          # the GetWorkerState probe in flight
        self.again = False          # the cache changed behind the probe in flight: probe again when it answers
        self.stale = False          # a late load/evict result changed the cache: probe until one answers in time
        self.reloading: set[int] = set()   # disk_loads (indices) not yet loaded again after a restart
        self.gen = 0                # restarts seen
        self.probe_timer_at = -1    # a probe is due at this time (-1: none planned)


def make_policy(policy: str | Policy, **kw: Any) -> Policy:
    if isinstance(policy, Policy):
        if kw:
            raise ValueError(f"policy options {sorted(kw)} given with a Policy instance: set them on the instance")
        return policy
    from workbench.controller.baselines import RayServePolicy, TritonPolicy
    from workbench.controller.scheduler import ClockworkPolicy
    table = {"clockwork": ClockworkPolicy, "triton": TritonPolicy, "ray": RayServePolicy}
    if policy not in table:
        raise ValueError(f"unknown policy {policy!r}: use one of {sorted(table)} or a Policy instance")
    return table[policy](**kw)


@mypyc_attr(allow_interpreted_subclasses=True)   # (tests and notebooks may override a method in Python)
class Controller:
    def __init__(self, clock: Clock, policy: str | Policy = "clockwork", config: ControllerConfig | None = None,
                 recorder: Any = None, **policy_options: Any):
        self.clock = clock
        self.config = config or ControllerConfig()
        self.recorder = recorder
        # rows as tuples in schema order where the recorder takes them (Recorder.add_request_row/add_action_row),
        # String columns as codes from its string table (`recorder.strings`); else keyword rows of strings
        codes = getattr(recorder, "strings", None)
        fast = codes is not None and hasattr(recorder, "add_request_row") and hasattr(recorder, "add_action_row")
        self._request_row = recorder.add_request_row if fast else None
        self._action_row = recorder.add_action_row if fast else None
        # cheaper still: the rows written straight into the recorder's memory (Recorder.row_writer), no object made
        row_writer = getattr(recorder, "row_writer", None) if fast else None
        self._request_writer: RowWriter | None = row_writer("request") if row_writer is not None else None
        self._action_writer: RowWriter | None = row_writer("action") if row_writer is not None else None
        # str -> what a row carries for it (a dict whose __missing__ interns new strings)
        self._codes: dict[str, Any] = codes if codes is not None and fast else _SAME_STRING
        # the strings of the rows (statuses, model names, ""), each looked up in the string table once and kept
        # in a plain dict, cheaper to read; only codes the table keeps for the whole run (`StringCodes.stable`)
        self._stable_code: Any = getattr(self._codes, "stable", None)
        self._row_codes: dict[Any, Any] = {}
        self.policy = make_policy(policy, **policy_options)
        self._lock = threading.RLock()
        self._ready_cv = threading.Condition(self._lock)
        self.workers: list[Any] = []
        self.worker_gpus: list[list[GPUState]] = []
        self.gpus: list[GPUState] = []
        self.models: dict[int, ModelState] = {}
        self._estimates: dict[str, ModelEstimates] = {}   # artifact path -> its copies' estimates (shared)
        self.page_size = 0
        self._next_model = 0
        # (ints, not itertools.count: compiled, `next()` on a count is a call through the builtins module)
        self._next_rid = 0                         # request ids
        self._next_aid = 1                         # action ids
        self._actions: dict[int, ActionRecord] = {}
        self._lost: dict[int, ActionRecord] = {}   # given up by their watchdog; a late answer may still come
        self._winfo: list[WorkerInfo] = []
        self._flushing: set[int] = set()           # threads inside _flush (it is not re-entered)
        self._in_flush = False
        self._virtual = bool(clock.virtual)        # one thread: _flush needs no per-thread bookkeeping
        self._timers: list[TimerEntry] = []        # watchdogs and other timers (a heap)
        # FIFOs of timer entries that come in time order, merged with the heap by (time, seq): request deadlines
        # per SLO (key: the slo) and Infer watchdogs per GPU (key: -1 - gpu index)
        self._fifos: dict[int, deque[TimerEntry]] = {}
        self._next_tseq = 0                        # timer entries' seq
        self._armed_at: int | None = None
        self._arm_gen = 0                # the armed timer's generation: older ones are cancelled
        self._outbox: deque[tuple[Any, Action]] = deque()     # (worker, action) to send
        self._callbacks: deque[Request] = deque()             # finalised requests whose callback is due
        self._startup_pending = 0
        self._startup_errors: list[str] = []
        self._stats: Counter[str] = Counter()
        self._admitted = 0              # counted apart from _stats: the hot path avoids the Counter
        self._default_slo = self.config.default_slo
        self._grace = self.config.grace
        self._buffer = self.config.buffer
        self.errors: list[str] = []     # internal errors (bugs) detected, e.g. a scheduling loop
        self.max_slo = 0
        self.closed = False
        self.policy.attach(self)

    @property
    def stats(self) -> Counter:
        """Counts of final statuses ("success", ...), "admitted" requests and controller events."""
        st = self._stats
        if self._admitted:
            st["admitted"] = self._admitted
        return st

    # ====================================================================================== set-up
    def add_worker(self, make: Callable[[Callable[[Result], None]], Any]) -> int:
        """Attach a worker: `make(on_result)` builds it (e.g. `lambda cb: EmulatedWorker(clock, 2, "h200",
        None, cb)`). Its GPUs become usable when its GetWorkerState answer arrives. Returns its index."""
        with self._lock:
            if self.models:
                raise ControllerError("add every worker before load_model(): models are loaded on all workers")
            idx = len(self.workers)
            worker = make(self._on_result)   # results name their action, and the action its worker
            self.workers.append(worker)
            self.worker_gpus.append([])
            self._winfo.append(WorkerInfo())
            if hasattr(worker, "on_restart"):       # ProcessWorker: tell us when its executor was replaced
                prev = worker.on_restart

                def restarted(n: int, _w: int = idx, _prev: Any = prev) -> None:
                    self.worker_restarted(_w)
                    if _prev is not None:
                        _prev(n)
                worker.on_restart = restarted
            now = self.clock.now()
            self._startup_pending += 1
            self._send_control(idx, GetWorkerState(id=self._new_aid(), earliest=0, latest=FOREVER), now)
        self._flush()
        return idx

    def load_model(self, path: object, copies: object = 1, name: str | None = None) -> list[int]:
        """Load a model (an artifact directory or "profile:<name>") on every worker as `copies` instances.
        Returns their model ids (usable once `ready`). (path: a str, copies: an int; checked here, hence
        `object`: compiled, a declared type would be enforced with a TypeError before these messages.)"""
        if not isinstance(path, str) or not path:
            raise ValueError(f"model path must be a non-empty string, got {path!r}")
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be an int >= 1, got {copies!r}")
        with self._lock:
            if not self.workers:
                raise ControllerError("no workers: call add_worker() before load_model()")
            first = self._next_model
            self._next_model += copies
            label = name or _model_name(path)
            specs = _input_specs(path)
            for i in range(first, first + copies):
                m = ModelState(i, label, path)
                m.input_specs = specs
                self.models[i] = m
            now = self.clock.now()
            c = self.config
            for w in range(len(self.workers)):
                self._startup_pending += 1
                a = LoadModelFromDisk(id=self._new_aid(), earliest=0, latest=FOREVER, model_id=first, path=path,
                                      copies=copies, max_batch_size=c.max_batch, max_exec_duration=c.max_exec)
                self._winfo[w].disk_loads.append(a)
                self._send_control(w, a, now)
        self._flush()
        return list(range(first, first + copies))

    @property
    def ready(self) -> bool:
        """Every worker reported its GPUs and every model load answered."""
        return self._startup_pending == 0

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until `ready` (virtual clock: run it until then). Raises ControllerError naming any model
        that failed to load."""
        if self.clock.virtual:
            while not self.ready:
                if self.clock.run_until(None, max_events=1) == 0:
                    raise ControllerError("virtual clock ran out of events before the workers answered")
        else:
            with self._ready_cv:
                if not self._ready_cv.wait_for(lambda: self.ready, timeout_s):
                    raise ControllerError(f"workers did not answer within {timeout_s} s "
                                          f"({self._startup_pending} answers pending)")
        if self._startup_errors:
            raise ControllerError("; ".join(self._startup_errors))

    def close(self) -> None:
        """Stop: requests still pending end with status error; workers are closed."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            now = self.clock.now()
            for r in self.policy.queued_requests():
                self.finalize(r, ERROR, now, "controller closed")
            for rec in list(self._actions.values()):
                for r in rec.reqs:
                    self.finalize(r, ERROR, now, "controller closed")
            self._arm_gen += 1
        self._flush()
        for w in self.workers:   # their last answers (SHUTTING_DOWN) release what is in flight, nothing more
            w.close()

    # ====================================================================================== client API
    def submit(self, model_id: Any, inputs: Any = None, slo: Any = None, slo_factor: Any = None,
               callback: Callable[[RequestOutcome], Any] | None = None) -> int:
        """Submit one request; returns its id. Never raises for a bad request: it ends with status rejected.
        (model_id: an int; slo: ns, an int or a float; slo_factor: a number. Anything else is checked here and
        rejected, hence the `Any`s.)"""
        with self._lock:
            m = self.models.get(model_id) if type(model_id) is int else None
            s = self._default_slo if slo is None else slo
            # the common case (a ready model, an int SLO it can meet, no inputs to check), straight through
            if m is not None and type(s) is int and inputs is None and slo_factor is None and m.ready \
                    and m.min_slo <= s <= MAX_SLO and not self.closed:
                slo = s
                now = self.clock.now()
                rid = self._next_rid
                self._next_rid = rid + 1
                r = Request(rid, m, now, slo, 0.0, None, callback, self._buffer)
                r.cold = not m.loaded
                self._admitted += 1
                if slo > self.max_slo:
                    self.max_slo = slo
                # request deadlines: one FIFO per SLO (they come in deadline order), merged with the timer heap
                dq = self._fifos.get(slo)
                t = r.deadline
                if dq and dq[-1][0] <= t:
                    seq = self._next_tseq
                    self._next_tseq = seq + 1
                    dq.append((t, seq, DEADLINE, r))
                else:
                    self._push_deadline(r)
                self.policy.on_request(r, now)
            else:
                rid = self._submit(model_id, inputs, slo, slo_factor, callback)
        if self._outbox or self._callbacks:
            self._flush()
        return rid

    def _submit(self, model_id: Any, inputs: Any, slo: Any, slo_factor: Any, callback: Any) -> int:
        now = self.clock.now()
        rid = self._next_rid
        self._next_rid = rid + 1
        c = self.config
        if type(model_id) is not int and isinstance(model_id, np.integer):
            model_id = int(model_id)
        # numpy scalars (e.g. SLOs from np.arange) are the numbers they hold (np.bool_ stays a bad value)
        if isinstance(slo, np.generic):
            slo = slo.item()
        if isinstance(slo_factor, np.generic):
            slo_factor = slo_factor.item()
        m = self.models.get(model_id) if type(model_id) is int else None
        problem = ""
        if m is None:
            problem = (f"unknown model {model_id!r}: model ids are ints 0..{self._next_model - 1} "
                       f"(load_model() returns them)")
        elif not m.ready:
            problem = m.error or f"model {model_id} is still being loaded by the workers: wait_ready() first"
        else:
            slo, problem = self._slo(m, slo, slo_factor)
            if not problem and inputs is not None:
                inputs, problem = _check_inputs(m, inputs)
        if problem and not (isinstance(slo, int) and 0 < slo <= MAX_SLO):
            slo = 0                     # what the rejected request's row records
        r = Request(rid, m, now, slo,
                    float(slo_factor) if isinstance(slo_factor, (int, float)) else 0.0,
                    inputs, callback, c.buffer)
        if problem:
            self._reject(r, now, problem)
            return rid
        if self.closed:
            self._reject(r, now, "controller is closed")
            return rid
        assert m is not None        # (no problem: the model is known)
        r.cold = not m.loaded
        self._admitted += 1
        if slo > self.max_slo:
            self.max_slo = slo
        self._push_deadline(r)
        self.policy.on_request(r, now)
        return rid

    def _slo(self, m: ModelState, slo: Any, slo_factor: Any) -> tuple[int, str]:
        c = self.config
        if slo_factor is None and type(slo) is int and m.min_slo <= slo <= MAX_SLO:   # the common case, quickly
            return slo, ""
        if slo is not None and slo_factor is not None:
            return 0, f"give slo or slo_factor, not both (slo={slo!r}, slo_factor={slo_factor!r})"
        if slo_factor is not None:
            if not isinstance(slo_factor, (int, float)) or isinstance(slo_factor, bool) \
                    or not math.isfinite(slo_factor) or slo_factor <= 0:
                return 0, f"slo_factor must be a finite number > 0, got {slo_factor!r}"
            if m.b1_ns <= 0:
                return 0, f"model {m.id} ({m.name}) has no batch-1 exec estimate for slo_factor: give slo in ns"
            slo = int(m.b1_ns * slo_factor)
        elif slo is None:
            slo = c.default_slo
        else:
            if not isinstance(slo, (int, float)) or isinstance(slo, bool) or not math.isfinite(slo) or slo <= 0:
                return 0, f"slo must be a number of ns > 0, got {slo!r}"
            slo = int(slo)
        if slo > MAX_SLO:
            return 0, (f"slo {slo / 1e9:.3g} s is longer than the longest accepted, 2**62 ns (~146 years): "
                       f"give a shorter slo{' or slo_factor' if slo_factor is not None else ''}")
        # No batch can meet an SLO below the batch-1 exec estimate plus the result buffer: reject it at once
        # (Clockwork clamped such SLOs upwards with unsigned arithmetic, clockwork.md §4.3/§8.7).
        if slo < m.min_slo:
            return slo, (f"slo {slo / 1e6:.3f} ms is shorter than model {m.id} ({m.name})'s batch-1 exec estimate "
                         f"{m.b1_ns / 1e6:.3f} ms + buffer {c.buffer / 1e6:.3f} ms: no batch can meet it")
        return slo, ""

    def _reject(self, r: Request, now: int, message: str) -> None:
        r.state = DONE
        r.status = REJECTED
        r.completion = now
        r.message = message
        self._stats[REJECTED] += 1
        self._record_request(r)
        if r.callback is not None:   # later, from the clock: a client that resubmits on rejection cannot recurse
            self.clock.call_soon(_call_back, r.callback, r.outcome())

    # ====================================================================================== finalisation
    def finalize(self, r: Request, status: str, now: int, message: str = "", outputs: tuple | None = None) -> bool:
        """Give r its final status (once; later calls return False)."""
        if r.state == DONE:
            return False
        prev = r.state
        r.state = DONE
        r.status = status
        r.completion = now
        r.message = message
        r.outputs = outputs
        r.inputs = None
        self._stats[status] += 1
        self.policy.on_finalized(r, prev, now)
        if self.recorder is not None:
            self._record_request(r)
        if r.callback is not None:
            self._callbacks.append(r)
        return True

    def _record_request(self, r: Request) -> None:
        if self.recorder is None:
            return
        g = r.gpu
        m = r.model
        status = r.status
        assert status is not None, "a request is recorded once final"
        mid, model = (m.id, self._row_code(m.name)) if m is not None else (-1, self._row_code(""))
        worker, gpu = (g.worker, g.local) if g is not None else (-1, -1)
        st, cold, message = self._row_code(status), bool(r.cold and g is not None), self._row_code(r.message)
        w = self._request_writer
        if w is not None and w.write_request(r.id, mid, model, worker, gpu, r.batch_size, r.arrival, r.deadline,
                                             r.completion, r.slo, st, r.completion - r.arrival, cold, message,
                                             r.action_id, r.slo_factor):
            return                            # native values straight into the recorder's memory
        row = (r.id, mid, model, worker, gpu, r.batch_size, r.arrival, r.deadline, r.completion, r.slo, st,
               r.completion - r.arrival, cold, message, r.action_id, r.slo_factor)
        if self._request_row is not None:     # the recorder's positional path (checks each value, names a bad one)
            self._request_row(row)
        else:
            self.recorder.add_request(**dict(zip(_REQUEST_FIELDS, row)))

    def _row_code(self, x: Any) -> Any:
        """What a row carries for string `x`: its code in the recorder's string table (the string itself for
        keyword rows)."""
        c = self._row_codes.get(x)
        if c is not None:
            return c
        if self._stable_code is None or type(x) is not str:   # keyword rows; or a bad value, named when sealed
            return self._codes[x]
        c = self._stable_code(x)
        if c is None:                       # the table is full: a one-shot code, for this row only
            return self._codes[x]
        self._row_codes[x] = c              # bounded: as many as the table keeps (StringCodes.CAP)
        return c

    # ====================================================================================== sending actions
    def send_infer(self, g: GPUState, m: ModelState, reqs: list[Request], predicted: int, begin: int,
                   earliest: int, latest: int, now: int) -> ActionRecord:
        """Send an Infer of `reqs` (model m) to g, planned to run [begin, begin + predicted]."""
        aid = self._next_aid
        self._next_aid = aid + 1
        n = len(reqs)
        inputs = None
        for r in reqs:
            if r.inputs is not None:
                inputs = _batch_inputs(reqs)
                break
        action = _new(Infer)     # a frozen dataclass, built without its (slow) generated __init__
        _setattr(action, "__dict__", {"id": aid, "earliest": earliest, "latest": latest, "model_id": m.id,
                                      "gpu": g.local, "batch_size": n, "inputs": inputs,
                                      "expected_duration": predicted})
        rec = ActionRecord(aid, _INFER, g.worker, g, m, earliest, latest, now, begin, predicted)
        rec.reqs = reqs
        rec.batch_size = n
        rec.queued = m.n_queued
        rec.copies = len(m.loaded)
        for r in reqs:
            if r.state != DONE:   # baselines still run requests whose deadline passed
                r.state = INFLIGHT
                r.gpu = g
                r.batch_size = n
                r.action_id = aid
        ex = g.exec
        jobs = ex.jobs
        if not jobs:
            ex.work_begin = begin
        jobs[aid] = predicted
        ex.total += predicted
        g.infers_outstanding += 1
        bm = g.busy_models
        mid = m.id
        bm[mid] = bm.get(mid, 0) + 1
        loaded = g.loaded
        if mid in loaded:
            loaded.move_to_end(mid)
        self._actions[aid] = rec
        t = (latest if latest < FOREVER else (now if now > begin else begin)) + predicted + self._grace
        dq = self._fifos.get(-1 - g.index)         # watchdogs per GPU come (nearly always) in time order
        if dq and dq[-1][0] <= t:
            seq = self._next_tseq
            self._next_tseq = seq + 1
            dq.append((t, seq, WATCHDOG, rec))
        else:
            self._push_watchdog(t, rec, -1 - g.index)
        self._outbox.append((self.workers[g.worker], action))
        return rec

    def send_load(self, g: GPUState, m: ModelState, predicted: int, begin: int, earliest: int, latest: int,
                  now: int) -> ActionRecord:
        aid = self._new_aid()
        action = LoadWeights(id=aid, earliest=earliest, latest=latest, model_id=m.id, gpu=g.local,
                             expected_duration=predicted)
        rec = ActionRecord(aid, ActionType.LOAD_WEIGHTS, g.worker, g, m, earliest, latest, now, begin, predicted)
        rec.queued = m.n_queued
        rec.copies = len(m.loaded)
        g.pcie.add(aid, predicted, begin)
        g.placing[m.id] = g.placing.get(m.id, 0) + 1
        self._track(rec, action)
        return rec

    def send_evict(self, g: GPUState, m: ModelState, now: int) -> ActionRecord:
        aid = self._new_aid()
        action = EvictWeights(id=aid, earliest=0, latest=FOREVER, model_id=m.id, gpu=g.local)
        rec = ActionRecord(aid, ActionType.EVICT_WEIGHTS, g.worker, g, m, 0, FOREVER, now, now, 0)
        g.placing[m.id] = g.placing.get(m.id, 0) + 1
        self._track(rec, action)
        return rec

    def _send_control(self, w: int, action: Action, now: int, extra: Any = None, timeout: int | None = None
                      ) -> ActionRecord:
        rec = ActionRecord(action.id, action.type, w, None, None, action.earliest, action.latest, now, now, 0)
        rec.extra = action if extra is None else extra
        self._actions[action.id] = rec
        self._push_timer(now + (self.config.startup_timeout if timeout is None else timeout), WATCHDOG, rec)
        self._outbox.append((self.workers[w], action))
        return rec

    def _track(self, rec: ActionRecord, action: Action) -> None:
        self._actions[rec.id] = rec
        base = rec.latest if rec.latest < FOREVER else max(rec.sent, rec.planned_begin)
        self._push_timer(base + rec.predicted + self.config.grace, WATCHDOG, rec)
        self._outbox.append((self.workers[rec.worker], action))

    # ====================================================================================== timers
    def call_at(self, t: int, fn: Callable, arg: Any = None) -> None:
        """Run `fn(arg, now)` under the lock at time t (policy wake-ups: straight on the clock, they are
        usually the earliest thing pending and would otherwise re-arm the controller's timer each time)."""
        self.clock.post(t, self._run_call, fn, arg)

    def _run_call(self, fn: Callable, arg: Any) -> None:
        try:
            with self._lock:
                if self.closed:
                    return
                fn(arg, self.clock.now())
        finally:
            if self._outbox or self._callbacks:
                self._flush()

    def _new_aid(self) -> int:
        aid = self._next_aid
        self._next_aid = aid + 1
        return aid

    def _new_tseq(self) -> int:
        seq = self._next_tseq
        self._next_tseq = seq + 1
        return seq

    def _push_deadline(self, r: Request) -> None:
        self._push_fifo(r.slo, r.deadline, DEADLINE, r)

    def _push_watchdog(self, t: int, rec: ActionRecord, key: int) -> None:
        self._push_fifo(key, t, WATCHDOG, rec)

    def _push_fifo(self, key: int, t: int, kind: int, obj: Any) -> None:
        dq = self._fifos.get(key)
        if dq is None:
            dq = self._fifos[key] = deque()
        if dq and dq[-1][0] > t:          # out of time order: the heap takes it
            self._push_timer(t, kind, obj)
            return
        dq.append((t, self._new_tseq(), kind, obj))
        if self._armed_at is None or t < self._armed_at:
            self._arm(t)

    def _next_due(self, now: int) -> tuple | None:
        """Pop the earliest (time, seq) entry due by now from the timer heap and the deadline FIFOs."""
        timers = self._timers
        best = timers[0] if timers and timers[0][0] <= now else None
        src = None
        for dq in self._fifos.values():
            if dq:
                e = dq[0]
                if e[0] <= now and (best is None or e < best):
                    best, src = e, dq
        if best is None:
            return None
        if src is None:
            return heapq.heappop(timers)
        return src.popleft()

    def _first_pending(self) -> int | None:
        """Drop finished entries at the fronts; the time of the earliest one left."""
        timers = self._timers
        while timers and _finished(timers[0]):
            heapq.heappop(timers)
        t = timers[0][0] if timers else None
        for dq in self._fifos.values():
            # _finished(dq[0]) written out: the FIFOs hold deadlines and watchdogs only
            while dq:
                e = dq[0]
                if (e[3].state == DONE) if e[2] == DEADLINE else e[3].done:
                    dq.popleft()
                else:
                    break
            if dq and (t is None or dq[0][0] < t):
                t = dq[0][0]
        return t

    def _push_timer(self, t: int, kind: int, obj: Any) -> None:
        heapq.heappush(self._timers, (t, self._new_tseq(), kind, obj))
        if self._armed_at is None or t < self._armed_at:
            self._arm(t)

    def _arm(self, t: int) -> None:
        """One clock timer, at the earliest entry (the one armed before is cancelled by its generation)."""
        self._arm_gen = gen = self._arm_gen + 1
        self._armed_at = t
        self.clock.post(t, self._on_timer, gen)

    def _rearm(self) -> None:
        """Arm the timer at the earliest pending entry, unless it is armed sooner. (A method of its own: in
        _on_timer, which sets _armed_at to None, mypy would take it for None still, and mypyc check that.)"""
        first = self._first_pending()
        if first is not None and not self.closed and (self._armed_at is None or first < self._armed_at):
            self._arm(first)

    def _on_timer(self, gen: int) -> None:
        try:
            with self._lock:
                if gen != self._arm_gen:
                    return
                self._armed_at = None
                now = self.clock.now()
                try:
                    while True:
                        e = self._next_due(now)
                        if e is None:
                            break
                        t, _, kind, obj = e
                        if kind == DEADLINE:
                            if obj.state != DONE:
                                self._deadline(obj, now)
                        elif kind == PROBE_DUE:
                            self._probe_due(obj, now)
                        elif not obj.done:
                            if now - t > self.config.grace // 2:   # we ran late ourselves (a stalled process):
                                self._push_timer(now + self.config.grace, WATCHDOG, obj)   # the worker may have too
                            else:
                                self._watchdog(obj, now)
                finally:
                    # Re-arm even if a handler failed: a controller without its timer would never give up on a
                    # lost result or tell a client its deadline passed. Finished entries are dropped in bulk.
                    self._rearm()
        finally:
            if self._outbox or self._callbacks:
                self._flush()

    def _deadline(self, r: Request, now: int) -> None:
        if r.state == QUEUED:
            status = self.policy.expired_status
            self.finalize(r, status, now, "deadline passed before the request could be scheduled"
                          if status != TIMEOUT else "deadline passed while queued")
        else:
            self.finalize(r, TIMEOUT, now, "deadline passed before the result arrived")

    def _watchdog(self, rec: ActionRecord, now: int) -> None:
        """The worker has not answered an action long after it should have: treat it as failed (it is kept in
        `_lost`, so that a late answer is still recognised)."""
        self._actions.pop(rec.id, None)
        rec.done = True
        self._stats["watchdog"] += 1
        lost = self._lost
        lost[rec.id] = rec
        if len(lost) > 100_000:            # answers that never come: forget the oldest
            del lost[next(iter(lost))]
        msg = (f"worker {rec.worker} did not answer {_TYPE_NAMES[rec.type]} action {rec.id} within "
               f"{(now - rec.sent) / 1e6:.1f} ms")
        g = rec.gpu
        t = rec.type
        if rec.extra is PROBE:
            self._record_action(rec, None, now, status=int(Status.RUNTIME_ERROR), status_name="NO_ANSWER")
            self._probe_answered(rec, None, now)
            return
        if isinstance(rec.extra, tuple):   # a reload after a restart
            self._record_action(rec, None, now, status=int(Status.RUNTIME_ERROR), status_name="NO_ANSWER")
            self._reload_result(rec, None, now)
            return
        if t in (ActionType.GET_WORKER_STATE, ActionType.LOAD_MODEL_FROM_DISK):
            self._startup_failed(rec, msg)
        elif t == ActionType.INFER:
            assert g is not None, "an Infer names its GPU"
            g.exec.error(rec.id)
            self._infer_finished(rec)
            for r in rec.reqs:
                self.finalize(r, ERROR, now, msg)
            if not self.closed:
                self.policy.on_infer_done(rec, None, now)
        elif t == ActionType.LOAD_WEIGHTS:
            assert g is not None, "a LoadWeights names its GPU"
            g.pcie.error(rec.id)
            self._placed(rec)
            if rec.epoch == g.epoch and not self.closed:
                self.policy.on_load_done(rec, None, now)
        elif t == ActionType.EVICT_WEIGHTS:
            self._placed(rec)
            if not self.closed:
                self.policy.on_evict_done(rec, False, now)
                self._probe(rec.worker, now)   # it may or may not have run: the cache says
        self._record_action(rec, None, now, status=int(Status.RUNTIME_ERROR), status_name="NO_ANSWER")
        if g is not None and t != ActionType.EVICT_WEIGHTS:
            g.timeouts += 1
            if g.timeouts >= self.config.failed_after and not g.failed and not self.closed:
                self._take_out(g, "no answer", now)

    # ====================================================================================== recovery
    def _take_out(self, g: GPUState, reason: str, now: int) -> None:
        """Take g out of service: nothing more is planned there; its placement is forgotten (what its cache
        really holds is read back from the worker when it is brought back)."""
        g.failed = True
        g.reason = reason
        g.epoch += 1
        self._stats["gpus_failed"] += 1
        self.policy.on_gpu_failed(g, now)
        if reason == "no answer":
            self._probe(g.worker, now)

    def worker_restarted(self, w: int) -> None:
        """Worker w lost its models and cache (its executor process was replaced): forget its placement, take
        its GPUs out of service, load the models from disk again; the GPUs come back once that is done.
        Called by ProcessWorker's `on_restart` (wired by add_worker); any thread."""
        with self._lock:
            if self.closed:
                return
            now = self.clock.now()
            wi = self._winfo[w]
            wi.gen += 1
            self._stats["worker_restarts"] += 1
            for g in self.worker_gpus[w]:
                if g.failed:
                    g.epoch += 1
                    g.reason = "restart"
                else:
                    self._take_out(g, "restart", now)
                g.timeouts = 0
            for aid in [aid for aid, rec in self._lost.items() if rec.worker == w]:
                del self._lost[aid]          # the old process is gone: these answers will never come
            wi.probe = None
            wi.again = wi.stale = False
            wi.reloading = set(range(len(wi.disk_loads)))
            for i in sorted(wi.reloading):
                self._send_reload(w, i, now)
            if not wi.reloading:
                self._probe(w, now)
        self._flush()

    def _send_reload(self, w: int, i: int, now: int) -> None:
        wi = self._winfo[w]
        a = wi.disk_loads[i]
        again = LoadModelFromDisk(id=self._new_aid(), earliest=0, latest=FOREVER, model_id=a.model_id, path=a.path,
                                  copies=a.copies, max_batch_size=a.max_batch_size,
                                  max_exec_duration=a.max_exec_duration)
        self._send_control(w, again, now, extra=(i, wi.gen))

    def _reload_result(self, rec: ActionRecord, result: Result | None, now: int) -> None:
        i, gen = rec.extra
        w = rec.worker
        wi = self._winfo[w]
        if gen != wi.gen or self.closed or i not in wi.reloading:   # from before a later restart, or a duplicate
            return
        # INVALID_MODEL_ID: the ids are in use, i.e. an earlier attempt (given up by its watchdog) did load them
        if result is not None and (result.ok or result.status == Status.INVALID_MODEL_ID):
            wi.reloading.discard(i)
            if not wi.reloading:
                self._probe(w, now)
            return
        why = f"{result.status.name}: {result.message}" if result is not None else "no answer"
        self._stats["reload_errors"] += 1
        a = wi.disk_loads[i]
        for g in self.worker_gpus[w]:
            g.reason = f"restart: loading {a.path!r} again failed ({why})"
        self._probe_later(w, now + self.config.probe_interval, "reload")

    def _probe(self, w: int, now: int) -> None:
        """Ask worker w for its state (at most one probe in flight; if one is, ask again after it)."""
        wi = self._winfo[w]
        if self.closed:
            return
        if wi.probe is not None:
            wi.again = True
            return
        self._stats["probes"] += 1
        a = GetWorkerState(id=self._new_aid(), earliest=0, latest=FOREVER)
        wi.probe = self._send_control(w, a, now, extra=PROBE, timeout=self.config.probe_interval)

    def _probe_later(self, w: int, t: int, what: Any) -> None:
        wi = self._winfo[w]
        if 0 <= wi.probe_timer_at <= t:
            return
        wi.probe_timer_at = t
        self._push_timer(t, PROBE_DUE, (w, what, t))

    def _probe_due(self, obj: tuple, now: int) -> None:
        w, what, t = obj
        wi = self._winfo[w]
        if wi.probe_timer_at != t or self.closed:
            return
        wi.probe_timer_at = -1
        if what == "reload":                   # load again what has not been loaded since the restart
            for i in sorted(wi.reloading):
                self._send_reload(w, i, now)
        else:
            self._probe(w, now)

    def _needs_probe(self, w: int) -> bool:
        return any(g.failed for g in self.worker_gpus[w]) and not self._winfo[w].reloading

    def _probe_answered(self, rec: ActionRecord, result: Result | None, now: int) -> None:
        """A probe's answer (None: its watchdog gave up). Bring the worker's GPUs back with the placement its
        cache reports, unless the cache may have changed since the probe was sent (probe again first)."""
        w = rec.worker
        wi = self._winfo[w]
        if wi.probe is not rec:                # superseded (a restart) or already given up
            if result is not None and (self._needs_probe(w) or wi.stale):
                self._probe(w, now)            # a late answer: the worker answers again
            return
        wi.probe = None
        if self.closed:
            return
        if result is None or not result.ok:
            if wi.again or wi.stale or self._needs_probe(w):
                wi.again = False
                if result is None:
                    self._probe(w, now)        # the watchdog already waited probe_interval
                else:
                    self._probe_later(w, now + self.config.probe_interval, PROBE)
            return
        if wi.again:                           # a result that changed the cache arrived meanwhile
            wi.again = False
            self._probe(w, now)
            return
        if wi.reloading:
            return
        wi.stale = False
        gpus = {int(gs["gpu"]): gs for gs in cast(GetWorkerStateResult, result).state.get("gpus", ())}
        for g in self.worker_gpus[w]:
            gs = gpus.get(g.local)
            if gs is not None:
                self._reconcile(g, gs, now)

    def _reconcile(self, g: GPUState, gs: dict, now: int) -> None:
        """Make the view of g agree with what its cache holds (models with a load or evict in flight are left
        to their results), and bring g back into service if it was out."""
        held = set(int(m) for m in gs.get("models", ()))
        placing = g.placing
        pol = self.policy
        for mid in list(g.loaded):
            if mid not in held and mid not in placing:
                pol.forget(g.loaded[mid], g, now)
                self._stats["placement_repaired"] += 1
        for mid in sorted(held):
            m = self.models.get(mid)
            if m is None or mid in g.loaded or mid in placing or not m.ready:
                continue
            if g.free_pages >= m.num_pages:
                pol.adopt(m, g, now)
            else:
                self.send_evict(g, m, now)     # no room for it in our accounting: free it
            self._stats["placement_repaired"] += 1
        if g.failed:
            g.failed = False
            g.reason = ""
            g.timeouts = 0
            self._stats["gpus_revived"] += 1
            pol.on_gpu_revived(g, now)

    def _placed(self, rec: ActionRecord) -> None:
        """A LoadWeights/EvictWeights is no longer in flight (answered or given up)."""
        g, m = rec.gpu, rec.model
        assert g is not None and m is not None, "a LoadWeights/EvictWeights names its model and GPU"
        p = g.placing
        mid = m.id
        left = p.get(mid, 0) - 1
        if left > 0:
            p[mid] = left
        else:
            p.pop(mid, None)

    def _late_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        """An answer after the watchdog gave up on the action: the worker is alive; if the action changed its
        cache, re-read the worker's state."""
        self._stats["late_results"] += 1
        w = rec.worker
        if rec.extra is PROBE:
            self._probe_answered(rec, result, now)
            return
        if isinstance(rec.extra, tuple):
            self._reload_result(rec, result, now)
            return
        g = rec.gpu
        if g is None:
            return
        g.timeouts = 0
        if result.ok and rec.type in (ActionType.LOAD_WEIGHTS, ActionType.EVICT_WEIGHTS):
            self._winfo[w].stale = True        # the view no longer matches the cache until a probe answers
            self._probe(w, now)
        elif self._needs_probe(w):
            self._probe(w, now)

    # ====================================================================================== results
    def _on_result(self, result: Result) -> None:
        try:
            with self._lock:
                rec = self._actions.pop(result.id, None)
                now = self.clock.now()
                if rec is None:   # answered after its watchdog gave up on it, or not ours
                    rec = self._lost.pop(result.id, None)
                    if rec is None:
                        self._stats["late_results"] += 1
                    elif not self.closed:
                        self._late_result(rec, result, now)
                    return
                rec.done = True
                t = rec.type
                if t is _INFER:
                    if result.status == 0:
                        self._infer_ok(rec, cast(InferResult, result), now)
                    else:
                        self._infer_result(rec, result, now)
                elif t == ActionType.LOAD_WEIGHTS:
                    self._load_result(rec, result, now)
                elif t == ActionType.EVICT_WEIGHTS:
                    self._evict_result(rec, result, now)
                elif rec.extra is PROBE:
                    self._record_action(rec, result, now)
                    self._probe_answered(rec, result, now)
                elif isinstance(rec.extra, tuple):
                    self._record_action(rec, result, now)
                    self._reload_result(rec, result, now)
                elif t == ActionType.LOAD_MODEL_FROM_DISK:
                    self._model_result(rec, result, now)
                elif t == ActionType.GET_WORKER_STATE:
                    self._state_result(rec, result, now)
                if rec.gpu is not None:
                    rec.gpu.timeouts = 0
        finally:
            if self._outbox or self._callbacks:
                self._flush()

    def _infer_ok(self, rec: ActionRecord, result: InferResult, now: int) -> None:
        """A successful Infer: the hot path, written out."""
        g = rec.gpu
        m = rec.model
        assert g is not None and m is not None, "an Infer names its model and GPU"
        est = m.est
        assert est is not None, "a model runs once it has estimates"
        g.infers_outstanding -= 1           # _infer_finished(rec), written out
        bm = g.busy_models
        mid = m.id
        left = bm[mid] - 1
        if left:
            bm[mid] = left
        else:
            del bm[mid]
        ex = result.exec
        tl = g.exec
        jobs = tl.jobs
        aid = rec.id
        if jobs and next(iter(jobs)) == aid:   # g.exec.success(aid, ex.end) when the head finished, written out
            tl.total -= jobs.pop(aid)
            tl.work_begin = ex.end
        else:
            tl.success(aid, ex.end)
        clk = (result.gpu_clock_before + result.gpu_clock) // 2
        if clk > 0:
            g.clock = clk
        est.add_exec(m.pad(rec.batch_size), ex.duration, clk)
        reqs = rec.reqs
        outs = split_outputs(result, rec.batch_size) if result.outputs else None
        for i, r in enumerate(reqs):
            if r.state == DONE:
                continue
            if now <= r.deadline:
                if outs is None:
                    self.finalize(r, SUCCESS, now)
                else:
                    self.finalize(r, SUCCESS, now, "", outs[i])
            else:
                self.finalize(r, TIMEOUT, now, f"result arrived {(now - r.deadline) / 1e6:.3f} ms after the deadline")
        if self.recorder is not None:
            self._record_action(rec, result, now)
        if not self.closed:
            self.policy.on_infer_done(rec, result, now)

    def _infer_finished(self, rec: ActionRecord) -> None:
        g, m = rec.gpu, rec.model
        assert g is not None and m is not None, "an Infer names its model and GPU"
        g.infers_outstanding -= 1
        bm = g.busy_models
        left = bm[m.id] - 1
        if left:
            bm[m.id] = left
        else:
            del bm[m.id]

    def _infer_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        if result.status == 0:
            self._infer_ok(rec, cast(InferResult, result), now)
            return
        g = rec.gpu
        assert g is not None, "an Infer names its GPU"
        self._infer_finished(rec)
        g.exec.error(rec.id)
        again = self.policy.retry(rec, result, now) if not self.closed else []
        msg = (f"worker {rec.worker} gpu {g.local}: {_STATUS_NAMES.get(result.status, result.status)}: "
               f"{result.message}")
        for r in rec.reqs:
            if r.state != DONE and r not in again:
                self.finalize(r, ERROR, now, msg)
        self._record_action(rec, result, now)
        if not self.closed:
            self.policy.on_infer_done(rec, result, now)

    def _load_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        g, m = rec.gpu, rec.model
        assert g is not None and m is not None and m.est is not None, "a LoadWeights names a ready model and a GPU"
        self._placed(rec)
        if result.ok:
            timing = cast(LoadWeightsResult, result).timing
            g.pcie.success(rec.id, timing.end)
            m.est.add_load(timing.duration)
        else:
            g.pcie.error(rec.id)
        self._record_action(rec, result, now)
        if self.closed:
            return
        if rec.epoch != g.epoch:      # sent before g's view was reset: the worker's cache says what happened
            if result.ok:
                self._probe(rec.worker, now)
            return
        self.policy.on_load_done(rec, result, now)
        if result.status == Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE:
            # sent because the view had room for it: unless the pages are only fragmented, the cache holds what the
            # view does not (an evict that was lost, an Infer wrongly answered "weights missing"), and every load
            # there would be refused in turn. Re-read the cache; _reconcile adopts or evicts what it holds.
            self._probe(rec.worker, now)

    def _evict_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        g = rec.gpu
        assert g is not None, "an EvictWeights names its GPU"
        self._placed(rec)
        self._record_action(rec, result, now)
        if self.closed:
            return
        if rec.epoch != g.epoch and result.ok:
            self._probe(rec.worker, now)
        self.policy.on_evict_done(rec, result.ok, now)

    def _state_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        w = rec.worker
        self._record_action(rec, result, now)
        if not result.ok:
            self._startup_failed(rec, f"worker {w} GetWorkerState failed: {result.status.name}: {result.message}")
            return
        st = cast(GetWorkerStateResult, result).state
        page_size = int(st["page_size"])
        if self.page_size and page_size != self.page_size:
            self._startup_failed(rec, f"worker {w} has page size {page_size}, others {self.page_size}: "
                                      f"give every worker the same page_size")
            return
        self.page_size = page_size
        c = self.config
        for gs in st["gpus"]:
            g = GPUState(len(self.gpus), w, int(gs["gpu"]), int(gs["total_pages"]), page_size, c.default_clock,
                         c.future, c.lag)
            g.free_pages = int(gs.get("free_pages", g.total_pages))
            self.gpus.append(g)
            self.worker_gpus[w].append(g)
            self.policy.on_gpu_added(g)
        self._startup_done()

    def _model_result(self, rec: ActionRecord, res: Result, now: int) -> None:
        a: LoadModelFromDisk = rec.extra
        self._record_action(rec, res, now)
        result = cast(LoadModelFromDiskResult, res)     # (its fields are read only when it is ok)
        ids = range(a.model_id, a.model_id + a.copies)
        if not result.ok:
            msg = (f"worker {rec.worker} could not load {a.path!r} (models {a.model_id}..{a.model_id + a.copies - 1})"
                   f": {result.status.name}: {result.message}")
            for i in ids:
                self.models[i].error = msg
            self._startup_failed(rec, msg)
            return
        c = self.config
        if not any(result.exec_ns) and self.models[a.model_id].est is None:
            warnings.warn(f"{a.path!r}: worker {rec.worker} reports no exec measurements for its device, so every "
                          f"batch size is predicted to take 0 ns until it has run once; profile the artifact first "
                          f"(workbench.worker.profiling.ensure_measurements(path, device)), as Session.load and "
                          f"`workbench run` do", RuntimeWarning, stacklevel=2)
        shared = self._estimates   # artifact path -> the estimates its copies share (config.share_estimates)
        for i in ids:
            m = self.models[i]
            if m.est is None:
                m.batch_sizes = tuple(result.batch_sizes)
                m.max_batch = m.batch_sizes[-1]
                m.input_bytes = result.input_bytes
                m.output_bytes = result.output_bytes
                m.weights_bytes = result.weights_bytes
                m.num_pages = result.num_pages
                est = shared.get(a.path) if c.share_estimates else None
                if est is None:
                    est = ModelEstimates(m.batch_sizes, tuple(result.exec_ns), result.weights_load_ns,
                                         c.default_clock, c.estimate_window, c.estimate_percentile)
                    if c.share_estimates:
                        shared[a.path] = est
                m.est = est
                m.b1_ns = m.est.exec_table(c.default_clock)[0]
                # at least 1 ns: with buffer 0 and no exec estimate, an SLO of 0 must still be rejected
                m.min_slo = max(m.b1_ns + c.buffer, 1)
            elif (tuple(result.batch_sizes) != m.batch_sizes or result.num_pages != m.num_pages
                  or result.input_bytes != m.input_bytes):
                m.error = (f"worker {rec.worker} reports model {i} ({a.path}) with batch sizes "
                           f"{result.batch_sizes}, {result.num_pages} pages, {result.input_bytes} input bytes; "
                           f"another worker reported {m.batch_sizes}, {m.num_pages}, {m.input_bytes}")
                self._startup_errors.append(m.error)
            m.workers_reported.append(rec.worker)
            if len(m.workers_reported) == len(self.workers) and not m.error:
                m.ready = True
                self.policy.on_model_ready(m)
        self._startup_done()

    def _startup_failed(self, rec: ActionRecord, msg: str) -> None:
        self._startup_errors.append(msg)
        self._startup_done()

    def _startup_done(self) -> None:
        self._startup_pending -= 1
        if self._startup_pending == 0:
            self._ready_cv.notify_all()

    # ====================================================================================== telemetry
    def _record_action(self, rec: ActionRecord, result: Result | None, now: int, status: int | None = None,
                       status_name: str | None = None) -> None:
        if self.recorder is None:
            return
        g = rec.gpu
        # (Any: whatever numbers the worker reported go into the row as they are)
        mb: Any = 0
        me: Any = 0
        md: Any = 0
        clk: Any = 0
        clk0: Any = 0
        message = ""
        if result is not None:
            st = int(result.status)
            name = self._row_code(_STATUS_NAMES.get(result.status) or str(st))
            t = getattr(result, "exec", None) or getattr(result, "timing", None)
            if t is not None:
                mb, me, md = t.begin, t.end, t.duration
            clk = getattr(result, "gpu_clock", 0)
            clk0 = getattr(result, "gpu_clock_before", 0)
            message = result.message
        else:
            assert status is not None, "an action without a result is recorded with a status"
            st, name = int(status), self._row_code(status_name or "")
        latest = rec.latest if rec.latest < FOREVER else -1
        gpu = g.local if g is not None else -1
        typ = self._row_code(_TYPE_NAMES[rec.type])
        mid = rec.model.id if rec.model is not None else getattr(rec.extra, "model_id", -1)
        msg = self._row_code(message)
        w = self._action_writer
        if w is not None:
            try:                              # native values straight into the recorder's memory
                if w.write_action(rec.id, rec.worker, gpu, typ, mid, rec.batch_size, rec.earliest, latest, rec.sent,
                                  rec.planned_begin, rec.planned_end, rec.predicted, now, mb, me, md, clk, st, name,
                                  clk0, rec.queued, rec.copies, msg):
                    return
            except TypeError:                 # a number the worker reported is no int: the checking path names it
                pass
        row = (rec.id, rec.worker, gpu, typ, mid, rec.batch_size, rec.earliest, latest, rec.sent, rec.planned_begin,
               rec.planned_end, rec.predicted, now, mb, me, md, clk, st, name, clk0, rec.queued, rec.copies, msg)
        if self._action_row is not None:
            self._action_row(row)
        else:
            self.recorder.add_action(**dict(zip(_ACTION_FIELDS, row)))

    # ====================================================================================== delivery
    def _flush(self) -> None:
        """Send queued actions, then call queued callbacks, outside the lock. Never re-entered on one thread:
        a worker that answers inside `submit` (a closed one does) or a callback that submits again only queues
        more for the loop below, so a long queue is delivered iteratively, not by recursion."""
        if self._virtual:
            self._flush_virtual()
            return
        me = get_ident()
        flushing = self._flushing
        if me in flushing:
            return
        flushing.add(me)
        try:
            self._deliver()
        finally:
            flushing.discard(me)

    def _flush_virtual(self) -> None:
        """_flush for a virtual clock (one thread: a flag instead of the set of flushing threads)."""
        if self._in_flush:
            return
        self._in_flush = True
        try:
            self._deliver()
        finally:
            self._in_flush = False

    def _deliver(self) -> None:
        out = self._outbox
        cbs = self._callbacks
        while out or cbs:
            while out:
                try:
                    worker, action = out.popleft()
                except IndexError:
                    break
                try:
                    worker.submit(action)
                except Exception:  # noqa: BLE001 - its watchdog gives the action up; keep delivering
                    import traceback
                    traceback.print_exc()
            while cbs:
                try:
                    r = cbs.popleft()
                except IndexError:
                    break
                cb = r.callback
                assert cb is not None, "only requests with a callback are queued for one"
                m = r.model
                try:
                    cb(_tuple_new(RequestOutcome, (r.id, m.id if m is not None else -1, r.status, r.arrival,
                                                   r.completion, r.completion - r.arrival, r.deadline,
                                                   r.outputs, r.message)))
                except Exception:  # noqa: BLE001 - a client's bug must not stop the controller
                    import traceback
                    traceback.print_exc()

    def internal_error(self, message: str) -> ControllerError:
        """Record a bug the controller detected in itself (its callers may swallow the exception: a worker's
        result thread keeps going), and return the exception to raise."""
        self.errors.append(message)
        return ControllerError(message)

    # ====================================================================================== introspection
    def summary(self) -> dict:
        """Counts of final statuses and controller events, plus the policy's own counters."""
        with self._lock:
            d = dict(self.stats)
            d["gpus"] = len(self.gpus)
            d["models"] = len(self.models)
            d["actions_in_flight"] = len(self._actions)
            d["internal_errors"] = len(self.errors)
            d.update(self.policy.summary())
            return d

    def placement(self) -> dict[int, list[int]]:
        """model id -> global GPU indices holding it ready."""
        with self._lock:
            return {m.id: [g.index for g in m.loaded] for m in self.models.values() if m.loaded}


# ========================================================================================== helpers
def _finished(entry: tuple) -> bool:
    kind = entry[2]
    if kind == DEADLINE:
        return entry[3].state == DONE
    if kind == WATCHDOG:
        return entry[3].done
    return False


def _call_back(cb: Callable, outcome: RequestOutcome) -> None:
    try:
        cb(outcome)
    except Exception:  # noqa: BLE001 - a client's bug must not stop the controller
        import traceback
        traceback.print_exc()


def _model_name(path: str) -> str:
    if path.startswith("profile:"):
        return path[len("profile:"):]
    return Path(path.rstrip("/")).name


def _input_specs(path: str) -> tuple | None:
    """(shape, dtype) per input from an artifact's manifest.json, if there is one (None: unknown)."""
    p = Path(path) / "manifest.json"
    try:
        d = json.loads(p.read_text())
        return tuple((tuple(int(x) for x in t["shape"]), str(t["dtype"])) for t in d["inputs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_inputs(m: ModelState, inputs: Any) -> tuple[tuple | None, str]:
    """Inputs of one sample as a tuple of arrays with a leading batch axis of 1, or a problem."""
    arrays = (inputs,) if isinstance(inputs, np.ndarray) else inputs
    if not isinstance(arrays, (tuple, list)) or not all(isinstance(x, np.ndarray) for x in arrays):
        return None, f"inputs must be a numpy array or a tuple of numpy arrays, got {type(inputs).__name__}"
    specs = getattr(m, "input_specs", None)
    if specs is not None:
        if len(arrays) != len(specs):
            return None, f"model {m.id} ({m.name}) takes {len(specs)} input(s), got {len(arrays)}"
        out = []
        for k, (x, (shape, dtype)) in enumerate(zip(arrays, specs)):
            if x.dtype != np.dtype(dtype):
                return None, f"input {k} of model {m.id} ({m.name}) must be {dtype}, got {x.dtype}"
            if x.shape == shape:
                x = x[None]
            elif x.shape != (1, *shape):
                return None, (f"input {k} of model {m.id} ({m.name}) must have shape {shape} (one sample), "
                              f"got {x.shape}")
            out.append(x)
        return tuple(out), ""
    nbytes = sum(x.nbytes for x in arrays)
    if m.input_bytes and nbytes != m.input_bytes:
        return None, (f"inputs of model {m.id} ({m.name}) must total {m.input_bytes} bytes per sample, got "
                      f"{nbytes} bytes")
    out = []
    for x in arrays:
        if x.ndim == 0:
            return None, f"inputs of model {m.id} ({m.name}) must not be 0-d arrays"
        out.append(x if x.shape[0] == 1 else x[None])
    return tuple(out), ""


def _batch_inputs(reqs: list[Request]) -> tuple | None:
    given = [r.inputs for r in reqs if r.inputs is not None]
    if not given:
        return None
    proto = given[0]
    cols = []
    for k in range(len(proto)):
        parts = [r.inputs[k] if r.inputs is not None else np.zeros_like(proto[k]) for r in reqs]
        cols.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
    return tuple(cols)
