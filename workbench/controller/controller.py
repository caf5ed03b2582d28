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

Timers: the controller keeps its own heap of (time, seq, kind, obj) for request deadlines and action
watchdogs and arms one clock timer for the earliest; entries whose request or action finished are dropped
lazily, in bulk. Policy wake-ups (`call_at`) go straight to the clock.
"""
from __future__ import annotations

import heapq
import itertools
import json
import math
import threading
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.clock import Clock
from workbench.contract import (FOREVER, Action, ActionType, EvictWeights, GetWorkerState, Infer,
                                LoadModelFromDisk, LoadWeights, Result, Status)
from workbench.controller.config import ControllerConfig
from workbench.controller.estimates import ModelEstimates
from workbench.controller.policy import Policy, split_outputs
from workbench.controller.requests import (DONE, ERROR, INFLIGHT, QUEUED, REJECTED, SUCCESS, TIMEOUT, Request,
                                           RequestOutcome)
from workbench.controller.state import GPUState, ModelState

DEADLINE, WATCHDOG, CALL = 0, 1, 2

_TYPE_NAMES = {t: t.name for t in ActionType}
_STATUS_NAMES = {s: s.name for s in Status}


class ControllerError(RuntimeError):
    """A set-up problem (no workers, models added in the wrong order, startup failed)."""


class ActionRecord:
    """An action in flight, with what the controller planned for it."""
    __slots__ = ("id", "type", "worker", "gpu", "model", "reqs", "batch_size", "earliest", "latest", "sent",
                 "planned_begin", "planned_end", "predicted", "done", "extra")

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


class Controller:
    def __init__(self, clock: Clock, policy: str | Policy = "clockwork", config: ControllerConfig | None = None,
                 recorder: Any = None, **policy_options: Any):
        self.clock = clock
        self.config = config or ControllerConfig()
        self.recorder = recorder
        self.policy = make_policy(policy, **policy_options)
        self._lock = threading.RLock()
        self._ready_cv = threading.Condition(self._lock)
        self.workers: list[Any] = []
        self.worker_gpus: list[list[GPUState]] = []
        self.gpus: list[GPUState] = []
        self.models: dict[int, ModelState] = {}
        self.page_size = 0
        self._next_model = 0
        self._rid = itertools.count()
        self._aid = itertools.count(1)
        self._actions: dict[int, ActionRecord] = {}
        self._timers: list = []
        self._tseq = itertools.count()
        self._armed_at: int | None = None
        self._armed_timer = None
        self._outbox: deque = deque()
        self._callbacks: deque = deque()
        self._startup_pending = 0
        self._startup_errors: list[str] = []
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []     # internal errors (bugs) detected, e.g. a scheduling loop
        self.max_slo = 0
        self.closed = False
        self.policy.attach(self)

    # ====================================================================================== set-up
    def add_worker(self, make: Callable[[Callable[[Result], None]], Any]) -> int:
        """Attach a worker: `make(on_result)` builds it (e.g. `lambda cb: EmulatedWorker(clock, 2, "h200",
        None, cb)`). Its GPUs become usable when its GetWorkerState answer arrives. Returns its index."""
        with self._lock:
            if self.models:
                raise ControllerError("add every worker before load_model(): models are loaded on all workers")
            idx = len(self.workers)
            worker = make(lambda result, _w=idx: self._on_result(_w, result))
            self.workers.append(worker)
            self.worker_gpus.append([])
            now = self.clock.now()
            self._startup_pending += 1
            self._send_control(idx, GetWorkerState(id=next(self._aid), earliest=0, latest=FOREVER), now)
        self._flush()
        return idx

    def load_model(self, path: str, copies: int = 1, name: str | None = None) -> list[int]:
        """Load a model (an artifact directory or "profile:<name>") on every worker as `copies` instances.
        Returns their model ids (usable once `ready`)."""
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
                a = LoadModelFromDisk(id=next(self._aid), earliest=0, latest=FOREVER, model_id=first, path=path,
                                      copies=copies, max_batch_size=c.max_batch, max_exec_duration=c.max_exec)
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
            if self._armed_timer is not None:
                self._armed_timer.cancel()
        self._flush()
        for w in self.workers:
            w.close()

    # ====================================================================================== client API
    def submit(self, model_id: int, inputs: Any = None, slo: int | None = None, slo_factor: float | None = None,
               callback: Callable[[RequestOutcome], Any] | None = None) -> int:
        """Submit one request; returns its id. Never raises for a bad request: it ends with status rejected."""
        with self._lock:
            rid = self._submit(model_id, inputs, slo, slo_factor, callback)
        if self._outbox or self._callbacks:
            self._flush()
        return rid

    def _submit(self, model_id: Any, inputs: Any, slo: Any, slo_factor: Any, callback: Any) -> int:
        now = self.clock.now()
        rid = next(self._rid)
        c = self.config
        if type(model_id) is not int and isinstance(model_id, np.integer):
            model_id = int(model_id)
        m = self.models.get(model_id) if type(model_id) is int else None
        problem = ""
        if m is None:
            problem = (f"unknown model {model_id!r}: model ids are ints 0..{self._next_model - 1} "
                       f"(load_model() returns them)")
        elif not m.ready:
            problem = m.error or f"model {model_id} is still being loaded by the workers: wait_ready() first"
        if not problem:
            slo, problem = self._slo(m, slo, slo_factor)
        if not problem and inputs is not None:
            inputs, problem = _check_inputs(m, inputs)
        r = Request(rid, m, now, slo if not problem else (slo if isinstance(slo, int) and slo > 0 else 0),
                    float(slo_factor) if isinstance(slo_factor, (int, float)) else 0.0,
                    inputs, callback, c.buffer)
        if problem:
            self._reject(r, now, problem)
            return rid
        if self.closed:
            self._reject(r, now, "controller is closed")
            return rid
        r.cold = not m.loaded
        self.stats["admitted"] += 1
        if slo > self.max_slo:
            self.max_slo = slo
        self._push_timer(r.deadline, DEADLINE, r)
        self.policy.on_request(r, now)
        return rid

    def _slo(self, m: ModelState, slo: Any, slo_factor: Any) -> tuple[int, str]:
        c = self.config
        if slo_factor is None and type(slo) is int and slo >= m.min_slo:   # the common case, quickly
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
        self.stats[REJECTED] += 1
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
        self.stats[status] += 1
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
        self.recorder.add_request(
            request_id=r.id, model_id=m.id if m is not None else -1, model=m.name if m is not None else "",
            worker=g.worker if g is not None else -1, gpu=g.local if g is not None else -1,
            batch_size=r.batch_size, arrival=r.arrival, deadline=r.deadline, completion=r.completion, slo=r.slo,
            status=r.status, latency=r.completion - r.arrival, cold_start=bool(r.cold and g is not None),
            message=r.message, action_id=r.action_id, slo_factor=r.slo_factor)

    # ====================================================================================== sending actions
    def send_infer(self, g: GPUState, m: ModelState, reqs: list[Request], predicted: int, begin: int,
                   earliest: int, latest: int, now: int) -> ActionRecord:
        """Send an Infer of `reqs` (model m) to g, planned to run [begin, begin + predicted]."""
        aid = next(self._aid)
        n = len(reqs)
        inputs = _batch_inputs(reqs)
        action = Infer(id=aid, earliest=earliest, latest=latest, model_id=m.id, gpu=g.local, batch_size=n,
                       inputs=inputs, expected_duration=predicted)
        rec = ActionRecord(aid, ActionType.INFER, g.worker, g, m, earliest, latest, now, begin, predicted)
        rec.reqs = reqs
        rec.batch_size = n
        for r in reqs:
            if r.state != DONE:   # baselines still run requests whose deadline passed
                r.state = INFLIGHT
                r.gpu = g
                r.batch_size = n
                r.action_id = aid
        g.exec.add(aid, predicted, begin)
        g.infers_outstanding += 1
        bm = g.busy_models
        bm[m.id] = bm.get(m.id, 0) + 1
        if m.id in g.loaded:
            g.loaded.move_to_end(m.id)
        self._track(rec, action)
        return rec

    def send_load(self, g: GPUState, m: ModelState, predicted: int, begin: int, earliest: int, latest: int,
                  now: int) -> ActionRecord:
        aid = next(self._aid)
        action = LoadWeights(id=aid, earliest=earliest, latest=latest, model_id=m.id, gpu=g.local,
                             expected_duration=predicted)
        rec = ActionRecord(aid, ActionType.LOAD_WEIGHTS, g.worker, g, m, earliest, latest, now, begin, predicted)
        g.pcie.add(aid, predicted, begin)
        self._track(rec, action)
        return rec

    def send_evict(self, g: GPUState, m: ModelState, now: int) -> ActionRecord:
        aid = next(self._aid)
        action = EvictWeights(id=aid, earliest=0, latest=FOREVER, model_id=m.id, gpu=g.local)
        rec = ActionRecord(aid, ActionType.EVICT_WEIGHTS, g.worker, g, m, 0, FOREVER, now, now, 0)
        self._track(rec, action)
        return rec

    def _send_control(self, w: int, action: Action, now: int) -> None:
        rec = ActionRecord(action.id, action.type, w, None, None, action.earliest, action.latest, now, now, 0)
        rec.extra = action
        self._actions[action.id] = rec
        self._push_timer(now + self.config.startup_timeout, WATCHDOG, rec)
        self._outbox.append((self.workers[w], action))

    def _track(self, rec: ActionRecord, action: Action) -> None:
        self._actions[rec.id] = rec
        base = rec.latest if rec.latest < FOREVER else max(rec.sent, rec.planned_begin)
        self._push_timer(base + rec.predicted + self.config.grace, WATCHDOG, rec)
        self._outbox.append((self.workers[rec.worker], action))

    # ====================================================================================== timers
    def call_at(self, t: int, fn: Callable, arg: Any = None) -> None:
        """Run `fn(arg, now)` under the lock at time t (policy wake-ups: straight on the clock, they are
        usually the earliest thing pending and would otherwise re-arm the controller's timer each time)."""
        self.clock.call_at(t, self._run_call, fn, arg)

    def _run_call(self, fn: Callable, arg: Any) -> None:
        with self._lock:
            if self.closed:
                return
            fn(arg, self.clock.now())
        if self._outbox or self._callbacks:
            self._flush()

    def _push_timer(self, t: int, kind: int, obj: Any) -> None:
        heapq.heappush(self._timers, (t, next(self._tseq), kind, obj))
        if self._armed_at is None or t < self._armed_at:
            self._arm(t)

    def _arm(self, t: int) -> None:
        """One clock timer, at the earliest entry."""
        if self._armed_timer is not None:
            self._armed_timer.cancel()
        self._armed_at = t
        self._armed_timer = self.clock.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._armed_at = None
            self._armed_timer = None
            now = self.clock.now()
            timers = self._timers
            calls = 0
            while timers and timers[0][0] <= now:
                t, _, kind, obj = heapq.heappop(timers)
                if kind == DEADLINE:
                    if obj.state != DONE:
                        self._deadline(obj, now)
                elif kind == CALL:
                    calls += 1
                    if calls > 100_000:   # a policy wake-up that keeps re-arming itself at the same time
                        raise self.internal_error(f"scheduling loop: {getattr(obj[0], '__qualname__', obj[0])} "
                                                  f"ran 100000 times at t={now} without time advancing")
                    obj[0](obj[1], now)
                elif not obj.done:
                    if now - t > self.config.grace // 2:   # we ran late ourselves (a stalled process):
                        self._push_timer(now + self.config.grace, WATCHDOG, obj)   # the worker may have too
                    else:
                        self._watchdog(obj, now)
            # entries whose request or action is already finished need no wake-up: drop them in bulk
            while timers and _finished(timers[0]):
                heapq.heappop(timers)
            if timers and not self.closed and (self._armed_at is None or timers[0][0] < self._armed_at):
                self._arm(timers[0][0])
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
        """The worker has not answered an action long after it should have: treat it as failed."""
        self._actions.pop(rec.id, None)
        rec.done = True
        self.stats["watchdog"] += 1
        msg = (f"worker {rec.worker} did not answer {_TYPE_NAMES[rec.type]} action {rec.id} within "
               f"{(now - rec.sent) / 1e6:.1f} ms")
        g = rec.gpu
        if rec.type in (ActionType.GET_WORKER_STATE, ActionType.LOAD_MODEL_FROM_DISK):
            self._startup_failed(rec, msg)
        elif rec.type == ActionType.INFER:
            g.exec.error(rec.id)
            self._infer_finished(rec)
            for r in rec.reqs:
                self.finalize(r, ERROR, now, msg)
            self.policy.on_infer_done(rec, None, now)
        elif rec.type == ActionType.LOAD_WEIGHTS:
            g.pcie.error(rec.id)
            self.policy.on_load_done(rec, None, now)
        elif rec.type == ActionType.EVICT_WEIGHTS:
            self.policy.on_evict_done(rec, False, now)
        self._record_action(rec, None, now, status=int(Status.RUNTIME_ERROR), status_name="NO_ANSWER")
        if g is not None and rec.type != ActionType.EVICT_WEIGHTS:
            g.timeouts += 1
            if g.timeouts >= self.config.failed_after and not g.failed:
                g.failed = True
                self.stats["gpus_failed"] += 1
                self.policy.on_gpu_failed(g, now)

    # ====================================================================================== results
    def _on_result(self, w: int, result: Result) -> None:
        with self._lock:
            now = self.clock.now()
            rec = self._actions.pop(result.id, None)
            if rec is None:   # answered after its watchdog gave up on it, or not ours
                self.stats["late_results"] += 1
            else:
                rec.done = True
                t = rec.type
                if t == ActionType.INFER:
                    self._infer_result(rec, result, now)
                elif t == ActionType.LOAD_WEIGHTS:
                    self._load_result(rec, result, now)
                elif t == ActionType.EVICT_WEIGHTS:
                    self.policy.on_evict_done(rec, result.ok, now)
                    self._record_action(rec, result, now)
                elif t == ActionType.LOAD_MODEL_FROM_DISK:
                    self._model_result(rec, result, now)
                elif t == ActionType.GET_WORKER_STATE:
                    self._state_result(rec, result, now)
                if rec.gpu is not None:
                    rec.gpu.timeouts = 0
        if self._outbox or self._callbacks:
            self._flush()

    def _infer_finished(self, rec: ActionRecord) -> None:
        g = rec.gpu
        g.infers_outstanding -= 1
        bm = g.busy_models
        left = bm[rec.model.id] - 1
        if left:
            bm[rec.model.id] = left
        else:
            del bm[rec.model.id]

    def _infer_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        g = rec.gpu
        m = rec.model
        self._infer_finished(rec)
        if result.status == 0:
            ex = result.exec
            g.exec.success(rec.id, ex.end)
            clk = (result.gpu_clock_before + result.gpu_clock) // 2
            if clk > 0:
                g.clock = clk
            m.est.add_exec(m.pad(rec.batch_size), ex.duration, clk)
            outs = split_outputs(result, rec.batch_size) if result.outputs else None
            for i, r in enumerate(rec.reqs):
                if r.state == DONE:
                    continue
                if now <= r.deadline:
                    self.finalize(r, SUCCESS, now, "", outs[i] if outs else None)
                else:
                    self.finalize(r, TIMEOUT, now, f"result arrived {(now - r.deadline) / 1e6:.3f} ms after the "
                                                   f"deadline")
        else:
            g.exec.error(rec.id)
            again = self.policy.retry(rec, result, now)
            msg = (f"worker {rec.worker} gpu {g.local}: {_STATUS_NAMES.get(result.status, result.status)}: "
                   f"{result.message}")
            for r in rec.reqs:
                if r.state != DONE and r not in again:
                    self.finalize(r, ERROR, now, msg)
        self._record_action(rec, result, now)
        self.policy.on_infer_done(rec, result, now)

    def _load_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        g = rec.gpu
        if result.ok:
            g.pcie.success(rec.id, result.timing.end)
            rec.model.est.add_load(result.timing.duration)
        else:
            g.pcie.error(rec.id)
        self._record_action(rec, result, now)
        self.policy.on_load_done(rec, result, now)

    def _state_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        w = rec.worker
        self._record_action(rec, result, now)
        if not result.ok:
            self._startup_failed(rec, f"worker {w} GetWorkerState failed: {result.status.name}: {result.message}")
            return
        st = result.state
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

    def _model_result(self, rec: ActionRecord, result: Result, now: int) -> None:
        a: LoadModelFromDisk = rec.extra
        self._record_action(rec, result, now)
        ids = range(a.model_id, a.model_id + a.copies)
        if not result.ok:
            msg = (f"worker {rec.worker} could not load {a.path!r} (models {a.model_id}..{a.model_id + a.copies - 1})"
                   f": {result.status.name}: {result.message}")
            for i in ids:
                self.models[i].error = msg
            self._startup_failed(rec, msg)
            return
        c = self.config
        for i in ids:
            m = self.models[i]
            if m.est is None:
                m.batch_sizes = tuple(result.batch_sizes)
                m.max_batch = m.batch_sizes[-1]
                m.input_bytes = result.input_bytes
                m.output_bytes = result.output_bytes
                m.weights_bytes = result.weights_bytes
                m.num_pages = result.num_pages
                m.est = ModelEstimates(m.batch_sizes, tuple(result.exec_ns), result.weights_load_ns,
                                       c.default_clock, c.estimate_window, c.estimate_percentile)
                m.b1_ns = m.est.exec_table(c.default_clock)[0]
                m.min_slo = m.b1_ns + c.buffer
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
        mb = me = md = clk = 0
        if result is not None:
            st = int(result.status)
            name = _STATUS_NAMES.get(result.status, str(st))
            t = getattr(result, "exec", None) or getattr(result, "timing", None)
            if t is not None:
                mb, me, md = t.begin, t.end, t.duration
            clk = getattr(result, "gpu_clock", 0)
        else:
            st, name = int(status), status_name or ""
        latest = rec.latest if rec.latest < FOREVER else -1
        self.recorder.add_action(
            action_id=rec.id, worker=rec.worker, gpu=g.local if g is not None else -1, type=_TYPE_NAMES[rec.type],
            model_id=rec.model.id if rec.model is not None else getattr(rec.extra, "model_id", -1),
            batch_size=rec.batch_size, earliest=rec.earliest, latest=latest, sent=rec.sent,
            planned_begin=rec.planned_begin, planned_end=rec.planned_end, predicted_duration=rec.predicted,
            completed=now, measured_begin=mb, measured_end=me, measured_duration=md, gpu_clock=clk,
            status=st, status_name=name)

    # ====================================================================================== delivery
    def _flush(self) -> None:
        """Send queued actions, then call queued callbacks, outside the lock."""
        out = self._outbox
        while out:
            try:
                worker, action = out.popleft()
            except IndexError:
                break
            worker.submit(action)
        cbs = self._callbacks
        while cbs:
            try:
                r = cbs.popleft()
            except IndexError:
                break
            _call_back(r.callback, r.outcome())

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
