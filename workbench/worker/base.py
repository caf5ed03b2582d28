"""The worker state machine shared by every device (CUDA, CPU, emulated): Clockwork's action executor
(clockwork.md §2.3). It makes no decisions: it runs each action's tasks inside their [earliest, latest]
windows, in `earliest` order per queue, never evicts on its own, and answers every action with exactly one
result carrying Clockwork's status codes.

Per GPU there are four queues (weights: loads and evicts; inputs; exec; outputs) plus two worker-wide ones
(disk: LoadModelFromDisk; control: ClearCache, GetWorkerState and immediate rejections). An Infer is three
tasks: copy input (eligible at earliest - copy_input_lead_in, must start by latest), exec (window
[earliest, latest], one at a time per GPU), copy output (no window). A device with `async_exec` (CUDA)
enqueues the output copy on the exec stream behind the model and waits once for both, so its Infer ends with
the exec task; the input copy's host side never waits either (the exec stream waits for it on the GPU).
Threaded executors start a task in the caller's thread when its queue is idle (see executor.py): on an
idle GPU an Infer's copy and launch run in the thread that submitted it. When that Infer's exec is also ready
(on CUDA: its graph captured), `Worker._start_ready` does both tasks' checks and the launch in one step, without
their queues, whose lookups and hand-offs were a large part of what the worker added to an Infer on the H200
(bench.worker_exec). Any check that would fail leaves the Infer to the tasks, which give its status.

What differs between devices is only the `Device` (how weights move, how a model executes, how long it takes)
and whether executors are threads (real devices) or clock callbacks (emulated)."""
from __future__ import annotations

import csv
import os
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from workbench.clock import Clock
from workbench.contract import (FOREVER, Action, ClearCache, ClearCacheResult, EvictWeights,
                                EvictWeightsResult, GetWorkerState, GetWorkerStateResult, Infer, InferResult,
                                LoadModelFromDisk, LoadModelFromDiskResult, LoadWeights, LoadWeightsResult,
                                Result, Status, Timing, error, id_problem)
from workbench.models.source import TensorSpec
from workbench.worker.config import WorkerConfig
from workbench.worker.executor import ClockExecutor, Executor, Task, ThreadExecutor
from workbench.worker.page_cache import Allocation, InsufficientCache, PageCache
from workbench.worker.pools import MemoryPool, PoolExhausted

GPU_KINDS = ("weights", "inputs", "exec", "outputs")


class InvalidModelPath(Exception):
    """LoadModelFromDisk of a path that is not a loadable model (status INVALID_PATH)."""


# ------------------------------------------------------------------------------------------------ models
@dataclass(eq=False)
class ModelEntry:
    """One loaded model (artifact or profile entry), shared by all its copies: kernels and host weights are
    held once here, whatever the number of copies."""
    name: str
    path: str
    batch_sizes: tuple[int, ...]
    inputs: tuple[TensorSpec, ...] | None        # None: not known (profile without specs): shapes unchecked
    outputs: tuple[TensorSpec, ...] | None
    input_bytes: int                             # per sample, all inputs
    output_bytes: int                            # per sample, all outputs
    weights_bytes: int
    page_size: int
    runs: list[tuple[int, int]]
    io_bytes: dict[int, int]                     # per compiled batch size: inputs + outputs on the device
    workspace_bytes: dict[int, int]              # per compiled batch size
    weights_load_ns: int = 0                     # profiled, 0 if unknown
    exec_ns: dict[int, int] = field(default_factory=dict)
    host_weights_bytes: int = 0                  # host memory this entry holds for weights (once for all copies)
    handle: Any = None                           # device specific: loaded kernels, host weights, profile

    @property
    def num_pages(self) -> int:
        return sum(n for _, n in self.runs)

    def __post_init__(self) -> None:
        self._sizes = {False: tuple(s.nbytes for s in self.inputs) if self.inputs is not None else (self.input_bytes,),
                       True: tuple(s.nbytes for s in self.outputs) if self.outputs is not None else (self.output_bytes,)}
        self._plans: dict[int, InferPlan] = {}

    def plan(self, n: int) -> "InferPlan | None":
        """What an Infer of n samples needs that never changes for this model (None: no compiled batch size
        fits n). Built on first use, once the model is registered (its batch sizes are final by then)."""
        p = self._plans.get(n)
        if p is None:
            b = self.padded_batch_size(n) if n >= 1 else None
            if b is None:
                return None
            p = self._plans[n] = InferPlan(self, n, b)
        return p

    def host_bytes(self, n: int, outputs: bool = False) -> int:
        """Host io bytes for n samples of the inputs (or outputs), each tensor 256-byte aligned."""
        return sum(-(-b * n // 256) * 256 for b in self._sizes[outputs])

    def padded_batch_size(self, n: int) -> int | None:
        """Smallest compiled batch size >= n (Clockwork runs n on that variant), None if n is too large."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        return None


class InferPlan:
    """Per (model, batch of n samples): the padded batch size, the pool sizes to take, and the inputs'
    signature ((dtype, shape), ...) that a well-formed Infer matches exactly (one cheap comparison per input;
    anything else takes the full check, which names the problem)."""
    __slots__ = ("n", "batch", "io_bytes", "host_in", "host_out", "workspace", "signature")

    def __init__(self, e: ModelEntry, n: int, b: int):
        self.n, self.batch = n, b
        self.io_bytes = e.io_bytes[b]
        self.host_in = e.host_bytes(n)
        self.host_out = e.host_bytes(n, outputs=True)
        self.workspace = e.workspace_bytes[b]
        self.signature = (None if e.inputs is None else
                          tuple((np.dtype(s.dtype), (n, *s.shape)) for s in e.inputs))


def _align(n: int, a: int = 256) -> int:
    return -(-n // a) * a


def used_bytes_per_run(art: Any) -> dict[int, int]:
    """First page of each run -> bytes of the run that hold weights (aligned up to 256): a load moves only
    these, not the unused tail of a run's last page."""
    used = {first: 0 for first, _ in art.runs}
    for t in art.tensors:
        used[t.page] = max(used[t.page], _align(t.offset + t.nbytes))
    return used


def open_artifact(path: str, target: str, page_size: int):
    """The artifact at `path`, checked for this worker: compiled for `target` with the worker's page size;
    anything else is InvalidModelPath naming the problem and the fix."""
    from workbench.models.artifact import Artifact, ArtifactError
    try:
        art = Artifact.open(path)
    except ArtifactError as e:
        raise InvalidModelPath(str(e)) from None
    if art.target != target:
        raise InvalidModelPath(f"{path} is compiled for {art.target}; the {target.upper()} worker needs an artifact "
                               f"built with `workbench compile ... --target {target}`")
    if art.page_size != page_size:
        raise InvalidModelPath(f"{path}: artifact page size {art.page_size} != worker page_size {page_size}: "
                               f"recompile with --page-size {page_size} or change page_size in the worker config")
    return art


def entry_from_artifact(art: Any, path: str) -> ModelEntry:
    """A ModelEntry from an opened Artifact (sizes from its manifest, durations from its measurements.json).
    io_bytes counts each input and output 256-byte aligned, as devices lay them out in the io pool."""
    from workbench.worker.measurements import read_measurements
    meas = read_measurements(art)
    bs = tuple(art.batch_sizes)
    io = {b: sum(_align(s.nbytes * b) for s in (*art.inputs, *art.outputs)) for b in bs}
    return ModelEntry(
        name=art.name, path=str(path), batch_sizes=bs, inputs=tuple(art.inputs), outputs=tuple(art.outputs),
        input_bytes=sum(s.nbytes for s in art.inputs), output_bytes=sum(s.nbytes for s in art.outputs),
        weights_bytes=art.weights_bytes, page_size=art.page_size, runs=[tuple(r) for r in art.runs],
        io_bytes=io, workspace_bytes={b: art.workspace_bytes(b) for b in bs},
        weights_load_ns=meas.weights_load_ns if meas else 0,
        exec_ns={b: meas.exec[b].p50_ns for b in bs if meas and b in meas.exec})


class StagedViews:
    """A device's views of staged inputs per (gpu, io offset, model, batch): the io pool hands the same offsets
    out again and again, so the views (and the TVM tensors over them) are made once, not per Infer. Bounded:
    emptied when full (views are cheap to remake; they hold no memory of their own)."""
    __slots__ = ("_d", "limit")

    def __init__(self, limit: int = 4096):
        self._d: dict = {}
        self.limit = limit

    def get(self, key: tuple) -> Any:
        return self._d.get(key)

    def put(self, key: tuple, value: Any) -> Any:
        if len(self._d) >= self.limit:
            self._d.clear()
        self._d[key] = value
        return value

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


class MonotonicClock(Clock):
    """Real time without a timer thread, for workers whose executors are threads (CPU, CUDA)."""

    now = staticmethod(time.monotonic_ns)   # real time, read without a Python frame (the hot path reads it often)

    def call_at(self, t: int, fn: Callable, *args):
        raise NotImplementedError("MonotonicClock has no timers: use RealClock")


class GPUModel:
    """A model copy's state on one GPU. `version` changes on every load/evict/clear, so a task that raced one
    of them notices (Clockwork's RuntimeModel.version). `ready`: per number of samples, (plan, the device's ready
    exec) of Infers that start in one step (`Worker._start_ready`), found once per weights binding."""
    __slots__ = ("version", "weights", "binding", "ready")

    def __init__(self) -> None:
        self.version = 0
        self.weights: Allocation | None = None
        self.binding: Any = None
        self.ready: dict[int, tuple[InferPlan, Any]] = {}


class ModelCopy:
    __slots__ = ("model_id", "entry", "gpus")

    def __init__(self, model_id: int, entry: ModelEntry, num_gpus: int):
        self.model_id = model_id
        self.entry = entry
        self.gpus = [GPUModel() for _ in range(num_gpus)]


# ------------------------------------------------------------------------------------------------ device
class Device:
    """What a worker needs from a device. Every `run`-side method returns a Timing whose `end` is when the
    work completes: real devices block and return end = now after the work; the emulated device returns
    immediately with end in the future."""
    name = "device"
    threaded = True

    def gpu_memory_info(self, gpu: int) -> tuple[int, int] | None:
        """(free, total) bytes of the device, or None where that does not apply."""
        return None

    def setup(self, worker: "Worker") -> None:
        """Allocate the per-GPU caches and pools (called once by the worker)."""

    def open_model(self, action: LoadModelFromDisk, now: int) -> tuple[ModelEntry, Timing]:
        raise NotImplementedError

    def load_weights(self, gpu: int, entry: ModelEntry, alloc: Allocation, now: int) -> tuple[Timing, Any]:
        """Copy the entry's host weights into the cache pages of `alloc`; returns (timing, binding)."""
        raise NotImplementedError

    def copy_input(self, gpu: int, entry: ModelEntry, batch: int, n: int, inputs: Sequence[np.ndarray] | None,
                   io_offset: int, host_offset: int, now: int, exec_next: bool = False) -> tuple[Timing, Any]:
        """Stage n samples of input (None: generate them) for the padded batch `batch` at `io_offset` of the
        GPU's io pool, through `host_offset` of the host io pool; returns (timing, staged). `exec_next`: the
        exec of these inputs is launched right after, before any other exec on this GPU (a device may then
        stage them where that exec reads them)."""
        raise NotImplementedError

    async_exec = False   # True: launch_exec returns without waiting, and wait_exec waits (execute = both)

    def execute(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any,
                now: int) -> tuple[Timing, Any, int, int]:
        """Run the model; returns (timing, device outputs, SM clock before, SM clock after)."""
        raise NotImplementedError

    def launch_exec(self, gpu: int, entry: ModelEntry, binding: Any, batch: int, staged: Any, now: int) -> Any:
        raise NotImplementedError

    def wait_exec(self, launched: Any, prepare: Callable[[bool], None] | None = None) -> tuple[Timing, Any, int, int]:
        """Wait for a launched exec: (timing, outputs, SM clock before, SM clock after). `prepare` (the task's work
        that needs no outputs) is called once before the exec ends when the device can tell, else before the wait;
        its argument says whether the exec has time left to rehearse the task's ending too (ExecTask.prepare)."""
        raise NotImplementedError

    def copy_output(self, gpu: int, entry: ModelEntry, outputs: Any, n: int, host_offset: int,
                    now: int) -> tuple[Timing, tuple[np.ndarray, ...] | None]:
        """The first n rows of each output, to the host (through `host_offset` of the host io pool)."""
        raise NotImplementedError

    def ready_exec(self, gpu: int, binding: Any, batch: int) -> Any:
        """A device whose execs can launch in one step from the submitting thread (CUDA graphs) returns, for an
        exec of this model copy (`binding`) and batch size that is ready to, what `launch_ready` takes; else None."""
        return None

    def launch_ready(self, ready: Any, inputs: Sequence[np.ndarray], n: int) -> tuple[Timing, Any, Any] | None:
        """Enqueue a ready exec's input copy and launch it: (copy timing, staged, launched), as `copy_input` with
        `exec_next` and `launch_exec` would give; None, with nothing enqueued, when it is no longer ready."""
        raise NotImplementedError

    def expected_exec(self, launched: Any) -> int:
        """ns that a launched exec (`launch_ready`'s) is expected to take; 0 when unknown."""
        return 0

    def input_timing(self, timing: Timing, staged: Any) -> Timing:
        """The copy-input Timing once the exec that used `staged` has finished. A device that does not wait
        for its input copy on the host (CUDA: the exec stream waits for it on the GPU) measures it then."""
        return timing

    def release_model(self, entry: ModelEntry) -> None:
        """Free what open_model took (called if registering the model fails)."""

    def close(self) -> None:
        pass


class GPUState:
    def __init__(self, gpu: int, config: WorkerConfig):
        self.gpu = gpu
        self.cache = PageCache(config.num_pages, config.page_size)
        self.io = MemoryPool("io", config.io_pool_size)
        self.workspace = MemoryPool("workspace", config.workspace_pool_size)
        self.executors: dict[str, Executor] = {}
        self.loading: set[int] = set()   # id() of allocations held by loads in flight


# ------------------------------------------------------------------------------------------------ worker
class Worker:
    """`submit(action)`; every action's result is delivered once, by calling `on_result(result)` from an
    executor thread or a clock callback, never from inside `submit` unless its caller allows it (`answer_here`).

    This is the in-process worker: its executor threads share the interpreter lock with everything else in the
    process (a notebook kernel's cells, charts, the controller), so it is NOT isolated; `ProcessWorker`
    (workbench.worker.process) hosts it in its own process."""
    isolated = False

    def __init__(self, device: Device, num_gpus: int, config: WorkerConfig | None,
                 on_result: Callable[[Result], None], clock: Clock):
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        self.device = device
        self.num_gpus = num_gpus
        self.config = config or WorkerConfig.load()
        self.on_result = on_result
        self.clock = clock
        self.lock = threading.RLock()
        self.closed = False
        self.models: dict[int, ModelCopy] = {}
        self.entries: list[ModelEntry] = []
        self.outstanding: dict[int, Action] = {}
        self.results_delivered = 0
        self.telemetry_rows: list[tuple] = []
        self.gpus = [GPUState(g, self.config) for g in range(num_gpus)]
        self.host_io = MemoryPool("host_io", self.config.host_io_pool_size)
        device.setup(self)
        hook = self._task_done if self.config.telemetry else None
        if device.threaded:
            def make(name: str) -> Executor:
                return ThreadExecutor(name, self.lock, clock, self._deliver, hook, wake_early=self.config.wake_early)
        else:
            outbox: list[Result] = []

            def make(name: str) -> Executor:
                return ClockExecutor(name, self.lock, clock, self._deliver, hook, outbox=outbox)
        for st in self.gpus:
            for kind in GPU_KINDS:
                st.executors[kind] = make(f"gpu{st.gpu}-{kind}")
        # an Infer on an idle GPU whose exec is ready starts in one step (_start_ready); with telemetry on, every
        # Infer goes through its tasks, which write one row each
        self._ready_path = device.threaded and device.async_exec and not self.config.telemetry
        self.disk = make("disk")
        self.control = make("control")

    # ---------------------------------------------------------------------------------------- public API
    def __repr__(self) -> str:
        where = "emulated" if self.device.name == "emulated" else "in-process: NOT isolated"
        return f"{type(self).__name__}({self.device.name}, {where}, {self.num_gpus} gpu(s), {len(self.models)} model(s))"

    def submit(self, action: Action, *, answer_here: bool = False) -> None:
        """Queue `action`; its result comes through on_result. `answer_here`: the caller holds no lock that
        on_result takes, and on_result does not submit (the process worker's host): an Infer that starts at once
        and whose exec is expected to take at most `submit_wait_max` is then waited for in this thread, and its
        result delivered before submit returns, saving the executor thread's wake-up, longer than such an exec."""
        if not isinstance(action, Action):
            raise TypeError(f"submit() takes a workbench.contract Action, got {type(action).__name__}")
        now = self.clock.now()
        held = None
        with self.lock:
            if self.closed:
                r = error(action, Status.SHUTTING_DOWN, "worker is closed", now, now)
                self.results_delivered += 1
                deliver_now = True
            elif self._ready_path and type(action) is Infer and (held := self._start_ready(action, now)):
                ex = self.gpus[action.gpu].executors["exec"]
                if not (answer_here and 0 < self.device.expected_exec(held.launched) <= self.config.submit_wait_max):
                    ex.start_launched(held, now)  # type: ignore[attr-defined]
                    return
                ex.hold(held, now)  # type: ignore[attr-defined]
                deliver_now = False
            else:
                deliver_now = False
                problem = None if _well_formed_infer(action, self.num_gpus) else self._malformed(action)
                # never tracked: an id that is not one (id_problem), or the id of an action in flight, malformed or
                # not (its entry is never taken)
                if type(action.id) is not int or action.id in self.outstanding:
                    problem = problem or (Status.INVALID_ACTION, f"action id {action.id} is already in flight")
                    task: Task = _Immediate(self, action, now, *problem, track=False)
                else:
                    self.outstanding[action.id] = action
                    task = (_Immediate(self, action, now, *problem) if problem is not None
                            else self._first_task(action, now))
                ex = self._executor_for(task)
                # a threaded device starts a non-blocking first step (an Infer's input copy) right here when its
                # queue is idle: no thread hand-off on the critical path. Its thread delivers any result.
                r = ex.submit(task, inline=self.device.threaded)
                if r is not None:
                    ex.deliver_later(r)  # type: ignore[attr-defined]
        if deliver_now:
            self._call(r)
        elif held is not None:      # waited for here, outside the lock
            self._deliver(ex.wait_here(held))  # type: ignore[attr-defined]

    def state(self) -> dict:
        """Pages, pools and models per GPU (the GetWorkerState payload)."""
        with self.lock:
            gpus = []
            for st in self.gpus:
                gpus.append({
                    "gpu": st.gpu, "weights_cache_size": st.cache.num_pages * st.cache.page_size,
                    "page_size": st.cache.page_size, "total_pages": st.cache.num_pages,
                    "free_pages": st.cache.free_pages, "used_pages": st.cache.used_pages,
                    "io_pool_size": st.io.size, "io_pool_used": st.io.used,
                    "workspace_pool_size": st.workspace.size, "workspace_pool_used": st.workspace.used,
                    "models": sorted(m.model_id for m in self.models.values() if m.gpus[st.gpu].weights is not None),
                })
            models = [{"model_id": m.model_id, "name": m.entry.name, "path": m.entry.path,
                       "batch_sizes": list(m.entry.batch_sizes), "input_bytes": m.entry.input_bytes,
                       "output_bytes": m.entry.output_bytes, "weights_bytes": m.entry.weights_bytes,
                       "num_pages": m.entry.num_pages, "weights_load_ns": m.entry.weights_load_ns,
                       "exec_ns": [m.entry.exec_ns.get(b, 0) for b in m.entry.batch_sizes]}
                      for m in sorted(self.models.values(), key=lambda m: m.model_id)]
            return {"device": self.device.name, "page_size": self.config.page_size,
                    "host_io_pool_size": self.host_io.size, "host_io_pool_used": self.host_io.used,
                    "host_weights_bytes": sum(e.host_weights_bytes for e in self.entries),
                    "num_gpus": self.num_gpus, "gpus": gpus, "models": models}

    def check_consistency(self) -> list[str]:
        """Accounting problems (empty when consistent): every cache page is held by exactly one installed
        weights allocation or one load in flight; with nothing in flight, every pool is empty."""
        problems = []
        with self.lock:
            busy = self.in_flight()
            for st in self.gpus:
                installed = [m.gpus[st.gpu].weights for m in self.models.values() if m.gpus[st.gpu].weights]
                live = {id(a) for a in st.cache.allocations()}
                inst_ids = {id(a) for a in installed}
                if len(inst_ids) != len(installed):
                    problems.append(f"gpu {st.gpu}: one allocation installed for two models")
                if inst_ids | st.loading != live:
                    problems.append(f"gpu {st.gpu}: cache allocations {len(live)} != installed {len(inst_ids)}"
                                    f" + loading {len(st.loading)}")
                pages = sum(a.num_pages for a in st.cache.allocations())
                if pages != st.cache.used_pages:
                    problems.append(f"gpu {st.gpu}: used pages {st.cache.used_pages} != allocated {pages}")
                seen: set[int] = set()
                for a in st.cache.allocations():
                    if seen & set(a.pages):
                        problems.append(f"gpu {st.gpu}: a page is in two allocations")
                    seen |= set(a.pages)
                if not busy and (st.io.used or st.workspace.used):
                    problems.append(f"gpu {st.gpu}: pools not empty when idle (io {st.io.used}, "
                                    f"workspace {st.workspace.used})")
            if not busy and self.host_io.used:
                problems.append(f"host io pool not empty when idle ({self.host_io.used})")
        return problems

    def in_flight(self) -> int:
        """Actions submitted and not yet answered."""
        return len(self.outstanding)

    def close(self, timeout: float = 30.0) -> None:
        """Stop every executor; actions not yet answered get SHUTTING_DOWN. Writes telemetry if enabled. An
        executor thread still running a task after `timeout` s (a hung device call, a file that never reads)
        keeps the device memory and models allocated, with a RuntimeWarning: freeing them under that task could
        corrupt memory or crash the process; the rest is released when the process exits."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            executors = [e for st in self.gpus for e in st.executors.values()] + [self.disk, self.control]
            out = []
            for ex in executors:
                for task in ex.drain():
                    task.cleanup()
                    out.append(task.fail(Status.SHUTTING_DOWN, "worker closed before the action ran"))
        self._deliver(out)
        stuck = [ex.name for ex in executors if not ex.close(timeout)]
        with self.lock:   # in-flight threaded tasks that finished during close were answered already
            leftovers = [error(a, Status.SHUTTING_DOWN, "worker closed", self.clock.now(), self.clock.now())
                         for a in self.outstanding.values()]
        self._deliver(leftovers)
        try:
            if self.config.telemetry:
                self._write_telemetry()
        finally:   # also when the telemetry cannot be written: a second close() returns at once
            if stuck:
                warnings.warn(f"worker executor(s) {', '.join(stuck)} still running a task {timeout:g} s after "
                              f"close(): the device memory and models stay allocated (not freed under that task) "
                              f"until the process exits", RuntimeWarning, stacklevel=2)
            else:
                self.release_device()

    def release_device(self) -> None:
        """At close: the weights cache, every model's host memory and kernels, then the device itself go now,
        not when this object is collected."""
        with self.lock:
            self.clear_cache()
            for e in self.entries:
                self.device.release_model(e)
        self.device.close()

    def clear_cache(self) -> None:
        """Free every installed weights allocation (caller holds the lock); loads in flight keep theirs and see
        the version change."""
        for m in self.models.values():
            for g, gm in enumerate(m.gpus):
                self.drop_weights(g, gm)

    def drop_weights(self, gpu: int, gm: "GPUModel") -> None:
        """A model copy's weights on `gpu` are superseded: bump its version (an exec or load in flight sees the
        change) and free its pages, if it has any (caller holds the lock)."""
        gm.version += 1
        if gm.weights is not None:
            self.gpus[gpu].cache.free(gm.weights)
            gm.weights, gm.binding, gm.ready = None, None, {}

    # ---------------------------------------------------------------------------------------- internals
    def _start_ready(self, a: Infer, now: int) -> "ExecTask | None":
        """Start an Infer here, in one step, when its GPU is idle and its exec ready (Device.ready_exec: on CUDA,
        its graph captured): what CopyInputTask and ExecTask would do inline, without their queues and lookups.
        Every check of theirs that could fail is made first; when one would, this returns None and the tasks
        run the Infer and give the status. Only the checks and the launch come before the GPU starts: the
        bookkeeping follows while it runs (under the lock throughout). Returns the launched ExecTask, for the
        caller to hand to the exec executor. Caller holds the lock."""
        if not (_well_formed_infer(a, self.num_gpus) and a.earliest <= now <= a.latest) or a.id in self.outstanding:
            return None                   # (well-formed first: the others compare and hash its fields)
        m = self.models.get(a.model_id)
        if m is None:
            return None
        g = m.gpus[a.gpu]
        ready = g.ready.get(a.batch_size) or self._find_ready(m, g, a.gpu, a.batch_size)
        if ready is None or not _matches(a.inputs, ready[0].signature):
            return None
        st = self.gpus[a.gpu]
        ex, ix = st.executors["exec"], st.executors["inputs"]
        # both queues idle: no Infer holds this GPU's workspace pool (it is empty; _find_ready checked that the
        # plan fits), and none goes before this one. Host io: CopyInputTask takes plan.host_in and gives it back in
        # the same step; with none held elsewhere, it would fit
        if ex.busy is not None or ex.heap or ix.busy is not None or ix.heap or self.host_io.used:
            return None
        plan = ready[0]
        try:
            launched = self.device.launch_ready(ready[1], a.inputs, a.batch_size)
        except Exception:  # noqa: BLE001 - the tasks run it again and give a device failure its status
            launched = None
        if launched is None:              # no longer ready (CUDA: its graph reads a slot or buffer since replaced)
            del g.ready[a.batch_size]
            return None
        s = _InferState()                 # (no io pool offset: its inputs went to the exec slot, not the io arena)
        s.model, s.entry, s.batch, s.plan = m, m.entry, plan.batch, plan
        s.copy_input, s.staged, launched = launched
        task = ExecTask(self, a, now, s)
        task.workspace = st.workspace.alloc(plan.workspace)
        task.version, task.binding, task.launched = g.version, g.binding, launched
        self.outstanding[a.id] = a
        return task

    def _find_ready(self, m: ModelCopy, g: GPUModel, gpu: int, n: int) -> tuple[InferPlan, Any] | None:
        """(plan, ready exec) of n samples of this model copy on `gpu`, remembered in g.ready until its weights
        change; None while its exec is not ready or the tasks would refuse it (no weights, no such batch size,
        a plan that does not fit the pools)."""
        plan = m.entry.plan(n)
        st = self.gpus[gpu]
        if (g.weights is None or plan is None or plan.host_in > self.host_io.size or plan.io_bytes > st.io.size
                or plan.workspace > st.workspace.size):
            return None
        dev = self.device.ready_exec(gpu, g.binding, plan.batch)
        if dev is None:
            return None
        ready = g.ready[n] = (plan, dev)
        return ready

    def _malformed(self, a: Action) -> tuple[Status, str] | None:
        """The first problem with an action's fields, or None. Integer fields must be ints, not bools (True would
        quietly be model or gpu 1) nor numpy integers."""
        if (why := id_problem(a.id)) is not None:
            return Status.INVALID_ACTION, why
        if type(a.earliest) is not int or type(a.latest) is not int:
            return Status.INVALID_ACTION, f"earliest/latest must be int ns, got {a.earliest!r}, {a.latest!r}"
        if isinstance(a, (LoadWeights, EvictWeights, Infer)):
            if type(a.model_id) is not int:
                return Status.INVALID_ACTION, f"model_id must be an int, got {a.model_id!r}"
            if type(a.gpu) is not int or not 0 <= a.gpu < self.num_gpus:
                return Status.INVALID_GPU, f"gpu {a.gpu!r} does not exist: this worker has gpus 0..{self.num_gpus - 1}"
        if isinstance(a, Infer) and type(a.batch_size) is not int:
            return Status.INVALID_ACTION, f"batch_size must be an int, got {a.batch_size!r}"
        if isinstance(a, LoadModelFromDisk):
            if not isinstance(a.path, str) or not a.path:
                return Status.INVALID_ACTION, f"path must be a non-empty string, got {a.path!r}"
            if type(a.copies) is not int or a.copies < 1:
                return Status.INVALID_ACTION, f"copies must be an int >= 1, got {a.copies!r}"
            if type(a.model_id) is not int or a.model_id < 0:
                return Status.INVALID_MODEL_ID, f"model_id must be an int >= 0, got {a.model_id!r}"
        return None

    def _first_task(self, a: Action, now: int) -> Task:
        make = _FIRST_TASK.get(type(a))
        if make is None:                                    # a subclass of an action type
            make = next((f for t, f in _FIRST_TASK.items() if isinstance(a, t)), None)
        if make is None:
            return _Immediate(self, a, now, Status.INVALID_ACTION, f"unknown action type {type(a).__name__}")
        return make(self, a, now)

    def _executor_for(self, task: Task) -> Executor:
        if task.kind in ("disk", "control"):
            return self.disk if task.kind == "disk" else self.control
        return self.gpus[task.action.gpu].executors[task.kind]  # type: ignore[attr-defined]

    def hand_on(self, task: Task) -> Result | None:
        """Queue the next task of a pipeline (caller holds the lock); after close it fails instead."""
        if self.closed:
            task.cleanup()
            return task.fail(Status.SHUTTING_DOWN, "worker closed during the action")
        return self.gpus[task.action.gpu].executors[task.kind].submit(task, inline=True)  # type: ignore[attr-defined]

    def _deliver(self, results: list[Result]) -> None:
        """Hand results to on_result, outside the lock; each action id is answered exactly once."""
        if not results:
            return
        with self.lock:
            ok = []
            for r in results:
                if getattr(r, "_untracked", False):
                    ok.append(r)
                elif self.outstanding.pop(r.id, None) is not None:
                    ok.append(r)
                else:   # a second result for one action would be a worker bug: never pass it on
                    traceback.print_stack()
                    print(f"worker bug: second result for action {r.id} ({r.status.name}) dropped")
            self.results_delivered += len(ok)
        for r in ok:
            self._call(r)

    def _call(self, r: Result) -> None:
        try:
            self.on_result(r)
        except Exception:  # noqa: BLE001 - the receiver's bug must not stop the executor
            traceback.print_exc()

    def _task_done(self, task: Task, timing: Timing | None, r: Result | None) -> None:
        a = task.action  # type: ignore[attr-defined]
        self.telemetry_rows.append((
            a.id, a.type.name, task.kind, getattr(a, "gpu", -1), int(r.status) if r is not None else 0,
            getattr(a, "model_id", -1), getattr(a, "batch_size", 0), task.enqueued, task.eligible,
            timing.begin if timing else 0, timing.end if timing else 0, timing.duration if timing else 0))

    def _write_telemetry(self) -> None:
        d = Path(self.config.log_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"worker_{self.device.name}_{os.getpid()}_task_telemetry.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["action_id", "action_type", "task", "gpu", "status", "model_id", "batch_size",
                        "enqueued", "eligible", "begin", "end", "duration"])
            w.writerows(self.telemetry_rows)


# ------------------------------------------------------------------------------------------------ tasks
class ActionTask(Task):
    """A task working for one action; `fail` builds that action's ErrorResult."""
    __slots__ = ("w", "action", "received")
    too_early = Status.COULD_NOT_START_IN_TIME
    too_late = Status.COULD_NOT_START_IN_TIME

    def __init__(self, w: Worker, action: Action, received: int, eligible: int, latest: int):
        super().__init__(eligible, latest)
        self.w = w
        self.action = action
        self.received = received

    def check_window(self, now: int) -> Result | None:
        if now > self.latest:
            return self.fail(self.too_late, f"{self.kind} task could not start by latest={self.latest} "
                                            f"(now {now}, {(now - self.latest) / 1e6:.3f} ms late)")
        if now < self.eligible:   # safeguard: executors never release a task early
            return self.fail(self.too_early, f"{self.kind} task started before it was eligible at {self.eligible}")
        return None

    def fail(self, status: Status, message: str) -> Result:
        now = self.w.clock.now()
        return error(self.action, status, message, self.received, now)

    def cleanup(self) -> None:
        pass

    def copy(self, model_id: int) -> ModelCopy | None:
        return self.w.models.get(model_id)


class _Immediate(ActionTask):
    """An action answered without running (malformed, invalid gpu, duplicate id)."""
    __slots__ = ("status", "message", "track")
    kind = "control"

    def __init__(self, w: Worker, action: Action, now: int, status: Status, message: str, track: bool = True):
        super().__init__(w, action, now, 0, FOREVER)
        self.status, self.message, self.track = status, message, track

    def begin(self, now: int) -> Result | None:
        return self.fail(self.status, self.message)

    def fail(self, status: Status, message: str) -> Result:
        r = super().fail(status, message)
        if not self.track:   # also its SHUTTING_DOWN at close: never answered in place of the action in flight
            object.__setattr__(r, "_untracked", True)
        return r


class LoadWeightsTask(ActionTask):
    __slots__ = ("alloc", "version", "gpu_model", "binding")
    kind = "weights"
    too_early = Status.LOAD_WEIGHTS_TOO_EARLY
    too_late = Status.LOAD_WEIGHTS_TOO_LATE

    def __init__(self, w: Worker, a: LoadWeights, now: int):
        super().__init__(w, a, now, a.earliest, a.latest)
        self.alloc: Allocation | None = None

    def begin(self, now: int) -> Result | None:
        a: LoadWeights = self.action
        if (r := self.check_window(now)) is not None:
            return r
        m = self.copy(a.model_id)
        if m is None:
            return self.fail(Status.LOAD_WEIGHTS_UNKNOWN_MODEL, f"model {a.model_id} is not loaded on this worker")
        st = self.w.gpus[a.gpu]
        g = m.gpus[a.gpu]
        self.w.drop_weights(a.gpu, g)       # a load supersedes whatever was there (Clockwork frees it first)
        try:
            self.alloc = st.cache.alloc(m.entry.runs)
        except InsufficientCache as e:
            return self.fail(Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE, f"model {a.model_id} on gpu {a.gpu}: {e}")
        st.loading.add(id(self.alloc))
        self.version = g.version
        self.gpu_model = g
        return None

    def run(self, now: int) -> Timing:
        a: LoadWeights = self.action
        timing, self.binding = self.w.device.load_weights(a.gpu, self.w.models[a.model_id].entry, self.alloc, now)
        return timing

    def finish(self, timing: Timing) -> Result | None:
        a: LoadWeights = self.action
        st = self.w.gpus[a.gpu]
        st.loading.discard(id(self.alloc))
        if self.gpu_model.version != self.version:
            st.cache.free(self.alloc)
            return self.fail(Status.LOAD_WEIGHTS_CONCURRENT_MODIFICATION,
                             f"model {a.model_id} on gpu {a.gpu} was evicted or reloaded during the load")
        self.gpu_model.weights, self.gpu_model.binding = self.alloc, self.binding
        return LoadWeightsResult(id=a.id, action_type=a.type, received=self.received, sent=self.w.clock.now(),
                                 timing=timing)

    def cleanup(self) -> None:
        if self.alloc is not None and not self.alloc.freed:
            st = self.w.gpus[self.action.gpu]
            st.loading.discard(id(self.alloc))
            st.cache.free(self.alloc)


class EvictTask(ActionTask):
    __slots__ = ()
    kind = "weights"
    too_early = Status.EVICT_WEIGHTS_TOO_EARLY
    too_late = Status.EVICT_WEIGHTS_TOO_LATE

    def __init__(self, w: Worker, a: EvictWeights, now: int):
        super().__init__(w, a, now, a.earliest, a.latest)

    def begin(self, now: int) -> Result | None:
        a: EvictWeights = self.action
        if (r := self.check_window(now)) is not None:
            return r
        m = self.copy(a.model_id)
        if m is None:
            return self.fail(Status.EVICT_WEIGHTS_UNKNOWN_MODEL, f"model {a.model_id} is not loaded on this worker")
        g = m.gpus[a.gpu]
        if g.weights is None:
            return self.fail(Status.EVICT_WEIGHTS_NOT_IN_CACHE, f"model {a.model_id} has no weights on gpu {a.gpu}")
        self.w.drop_weights(a.gpu, g)
        return None

    def run(self, now: int) -> Timing:
        return Timing(now, now, 0)

    def finish(self, timing: Timing) -> Result | None:
        a = self.action
        return EvictWeightsResult(id=a.id, action_type=a.type, received=self.received, sent=self.w.clock.now(),
                                  timing=timing)


_NO_TIMING = Timing()


class _InferState:
    """What an Infer holds while it moves through its three tasks."""
    __slots__ = ("model", "entry", "batch", "plan", "io_offset", "staged", "copy_input", "exec", "outputs",
                 "clock_before", "clock_after", "host_offset", "exec_next")

    def __init__(self) -> None:
        self.exec_next = False
        self.io_offset = -1
        self.host_offset = -1
        self.staged = self.outputs = None
        self.copy_input = self.exec = _NO_TIMING
        self.clock_before = self.clock_after = 0


class InferTask(ActionTask):
    __slots__ = ("s",)

    def release(self) -> None:
        s, st = self.s, self.w.gpus[self.action.gpu]
        if s.io_offset >= 0:
            st.io.free(s.io_offset)
            s.io_offset = -1
        if s.host_offset >= 0:
            self.w.host_io.free(s.host_offset)
            s.host_offset = -1
        s.staged = s.outputs = None

    def cleanup(self) -> None:
        self.release()


class CopyInputTask(InferTask):
    __slots__ = ()
    kind = "inputs"
    inline = True     # stages and enqueues the copy; never waits for it
    too_early = Status.COPY_INPUT_TOO_EARLY
    too_late = Status.COPY_INPUT_TOO_LATE

    def __init__(self, w: Worker, a: Infer, now: int):
        super().__init__(w, a, now, max(0, a.earliest - w.config.copy_input_lead_in), a.latest)
        self.s = _InferState()

    def begin(self, now: int) -> Result | None:
        a: Infer = self.action
        if now > self.latest or now < self.eligible:
            return self.check_window(now)
        m = self.w.models.get(a.model_id)
        if m is None:
            return self.fail(Status.COPY_INPUT_UNKNOWN_MODEL, f"model {a.model_id} is not loaded on this worker")
        e = m.entry
        plan = e.plan(a.batch_size)
        if plan is None:
            return self.fail(Status.COPY_INPUT_INVALID_BATCH_SIZE,
                             f"batch size {a.batch_size} for model {a.model_id} ({e.name}): compiled batch sizes "
                             f"are {list(e.batch_sizes)}; use 1..{e.batch_sizes[-1]}")
        if not _matches(a.inputs, plan.signature) and (r := self._check_inputs(e, a)) is not None:
            return r
        s = self.s
        try:
            s.io_offset = self.w.gpus[a.gpu].io.alloc(plan.io_bytes)
        except PoolExhausted as ex:
            return self.fail(Status.COPY_INPUT_IO_POOL_EXHAUSTED, str(ex))
        try:
            s.host_offset = self.w.host_io.alloc(plan.host_in)
        except PoolExhausted as ex:
            self.release()
            return self.fail(Status.COPY_INPUT_HOST_ALLOC, str(ex))
        s.model, s.entry, s.batch, s.plan = m, e, plan.batch, plan
        # its exec will launch the moment the copy is enqueued (in `finish`, under the lock this task holds from
        # here on or that only this GPU's input executor, busy with it, could hand on an exec under)
        s.exec_next = (a.earliest <= now and self.w.device.async_exec
                       and self.w.gpus[a.gpu].executors["exec"].idle())
        return None

    def _check_inputs(self, e: ModelEntry, a: Infer) -> Result | None:
        if a.inputs is None:
            if not self.w.config.allow_zero_size_inputs:
                return self.fail(Status.COPY_INPUT_INVALID_INPUT, "no inputs given and allow_zero_size_inputs is "
                                                                  "false in the worker config")
            return None
        if not isinstance(a.inputs, (tuple, list)) or not all(isinstance(x, np.ndarray) for x in a.inputs):
            return self.fail(Status.COPY_INPUT_INVALID_INPUT, "inputs must be a tuple of numpy arrays")
        if e.inputs is None:   # profile without specs: only the batch dimension is checked
            bad = [x.shape for x in a.inputs if x.ndim == 0 or x.shape[0] != a.batch_size]
            if bad:
                return self.fail(Status.COPY_INPUT_BAD_SIZES, f"inputs {bad} do not have batch_size "
                                                              f"{a.batch_size} rows")
            return None
        if len(a.inputs) != len(e.inputs):
            return self.fail(Status.COPY_INPUT_INVALID_INPUT, f"model {e.name} takes {len(e.inputs)} input(s) "
                                                              f"{[s.name for s in e.inputs]}, got {len(a.inputs)}")
        for x, spec in zip(a.inputs, e.inputs):
            if x.dtype != np.dtype(spec.dtype):
                return self.fail(Status.COPY_INPUT_INVALID_INPUT, f"input {spec.name!r} of {e.name} must be "
                                                                  f"{spec.dtype}, got {x.dtype}")
            want = (a.batch_size, *spec.shape)
            if tuple(x.shape) != want:
                return self.fail(Status.COPY_INPUT_BAD_SIZES, f"input {spec.name!r} of {e.name} must have shape "
                                                              f"{want} for batch_size {a.batch_size}, got {x.shape}")
        return None

    def run(self, now: int) -> Timing:
        a: Infer = self.action
        s = self.s
        timing, s.staged = self.w.device.copy_input(a.gpu, s.entry, s.batch, a.batch_size, a.inputs,
                                                    s.io_offset, s.host_offset, now, s.exec_next)
        return timing

    def finish(self, timing: Timing) -> Result | None:
        self.s.copy_input = timing
        self.w.host_io.free(self.s.host_offset)
        self.s.host_offset = -1
        return self.w.hand_on(ExecTask(self.w, self.action, self.received, self.s))


class ExecTask(InferTask):
    __slots__ = ("version", "workspace", "binding", "launched", "result")
    kind = "exec"
    too_early = Status.EXEC_TOO_EARLY
    too_late = Status.EXEC_TOO_LATE

    def __init__(self, w: Worker, a: Infer, received: int, s: _InferState):
        super().__init__(w, a, received, a.earliest, a.latest)
        self.s = s
        self.workspace = -1
        self.launched = None
        self.result: InferResult | None = None    # made by prepare, completed by finish

    @property
    def split(self) -> bool:   # a device that launches without waiting (CUDA) lets launch run inline
        return self.w.device.async_exec

    def begin(self, now: int) -> Result | None:
        a: Infer = self.action
        if now > self.latest or now < self.eligible:
            self.release()
            return self.check_window(now)
        g = self.s.model.gpus[a.gpu]
        if g.weights is None:
            self.release()
            return self.fail(Status.EXEC_WEIGHTS_MISSING, f"model {a.model_id} has no weights on gpu {a.gpu}: "
                                                          f"send LoadWeights first")
        try:
            self.workspace = self.w.gpus[a.gpu].workspace.alloc(self.s.plan.workspace)
        except PoolExhausted as ex:
            self.release()
            return self.fail(Status.EXEC_WORKSPACE_POOL_EXHAUSTED, str(ex))
        self.version, self.binding = g.version, g.binding
        return None

    def run(self, now: int) -> Timing:
        a: Infer = self.action
        s = self.s
        timing, s.outputs, s.clock_before, s.clock_after = self.w.device.execute(
            a.gpu, s.entry, self.binding, s.batch, s.staged, now)
        return timing

    def launch(self, now: int) -> None:
        s = self.s
        self.launched = self.w.device.launch_exec(self.action.gpu, s.entry, self.binding, s.batch, s.staged, now)

    def wait(self) -> Timing:
        s, launched, self.launched = self.s, self.launched, None
        timing, s.outputs, s.clock_before, s.clock_after = self.w.device.wait_exec(launched, self.prepare)
        return timing

    def prepare(self, rehearse: bool) -> None:
        """Called by wait_exec while the GPU still runs the exec: the result, but for what depends on the exec's
        end, so that less is left to do, and that warm, once it has ended. `rehearse`: the exec has time left to
        run, once, on a throwaway result, the steps that follow its end (finish, then delivery), each under the
        lock as they will be: code a thread has not run for milliseconds runs 2-4x slower on the H200's VM
        (bench.worker_parts, part d), and here it would run just after the exec, on the path to its result.
        Nothing it touches changes (the pool block it takes is given back)."""
        s, w = self.s, self.w
        s.copy_input = w.device.input_timing(s.copy_input, s.staged)
        self.result = pending_result(self)
        if rehearse:
            gpu = self.action.gpu
            with w.lock:
                pool = w.gpus[gpu].workspace
                try:
                    pool.free(pool.alloc(1))
                except PoolExhausted:
                    pass
                r = infer_result(self, s.copy_input, s.outputs, pending_result(self))
            with w.lock:
                w.outstanding.get(r.id)

    def waited(self) -> None:      # the exec is over: the next one may take its workspace before this one finishes
        self._free_workspace()

    def _free_workspace(self) -> None:
        if self.workspace >= 0:
            self.w.gpus[self.action.gpu].workspace.free(self.workspace)
            self.workspace = -1

    def finish(self, timing: Timing) -> Result | None:
        a: Infer = self.action
        s, w = self.s, self.w
        self._free_workspace()
        self.binding = None
        s.exec = timing
        device = w.device
        if self.result is None:
            s.copy_input = device.input_timing(s.copy_input, s.staged)
        if s.model.gpus[a.gpu].version != self.version:
            self.release()
            return self.fail(Status.EXEC_CONCURRENT_WEIGHTS_MODIFICATION,
                             f"weights of model {a.model_id} on gpu {a.gpu} were evicted or reloaded during exec")
        s.staged = None
        if device.async_exec:   # the exec brought the outputs to the host already: no third task
            out_timing, outputs = device.copy_output(a.gpu, s.entry, s.outputs, a.batch_size, -1, 0)
            self.release()
            return infer_result(self, out_timing, outputs, self.result)
        return w.hand_on(CopyOutputTask(self))

    def cleanup(self) -> None:
        self._free_workspace()
        self.release()


class CopyOutputTask(InferTask):
    __slots__ = ()
    kind = "outputs"
    inline = True     # a few bytes to the host; runs in the exec thread when its queue is idle
    too_early = Status.COPY_OUTPUT_TOO_EARLY
    too_late = Status.COPY_OUTPUT_TOO_LATE

    def __init__(self, prev: ExecTask):
        super().__init__(prev.w, prev.action, prev.received, 0, FOREVER)
        self.s = prev.s

    def begin(self, now: int) -> Result | None:
        if now > self.latest or now < self.eligible:
            self.release()
            return self.check_window(now)
        try:
            self.s.host_offset = self.w.host_io.alloc(self.s.plan.host_out)
        except PoolExhausted as ex:
            self.release()
            return self.fail(Status.COPY_OUTPUT_HOST_ALLOC, str(ex))
        return None

    def run(self, now: int) -> Timing:
        a: Infer = self.action
        timing, host = self.w.device.copy_output(a.gpu, self.s.entry, self.s.outputs, a.batch_size,
                                                 self.s.host_offset, now)
        self.s.outputs = host
        return timing

    def finish(self, timing: Timing) -> Result | None:
        outputs = self.s.outputs
        self.release()
        return infer_result(self, timing, outputs)


_new = object.__new__
_setattr = object.__setattr__
_SUCCESS = Status.SUCCESS


def pending_result(task: InferTask) -> InferResult:
    """A task's InferResult with the fields known before its exec ends; `infer_result` completes it. Built in one
    step: a frozen dataclass's __init__ sets each of its 15 fields with a separate call."""
    a: Infer = task.action
    r = _new(InferResult)
    _setattr(r, "__dict__", {
        "id": a.id, "action_type": a.type, "status": _SUCCESS, "message": "", "received": task.received, "sent": 0,
        "gpu": a.gpu, "batch_size": a.batch_size, "copy_input": task.s.copy_input, "exec": _NO_TIMING,
        "copy_output": _NO_TIMING, "gpu_clock_before": 0, "gpu_clock": 0, "outputs": None})
    return r


def infer_result(task: InferTask, copy_output: Timing, outputs: Any, r: InferResult | None = None) -> InferResult:
    """The task's InferResult: `r` (pending_result, made now if None) completed, the same object InferResult(...)
    would give (equal, same fields, same types)."""
    s = task.s
    r = r if r is not None else pending_result(task)
    d = r.__dict__
    d["sent"], d["exec"], d["copy_output"] = task.w.clock.now(), s.exec, copy_output
    d["gpu_clock_before"], d["gpu_clock"], d["outputs"] = s.clock_before, s.clock_after, outputs
    return r


def _matches(inputs: Any, signature: tuple | None) -> bool:
    """True when `inputs` is a tuple of exactly the plain numpy arrays the signature says (dtype and shape):
    then the full check (`CopyInputTask._check_inputs`) would pass; False says nothing (run the full check)."""
    if type(inputs) is not tuple or signature is None or len(inputs) != len(signature):
        return False
    for x, (dt, shape) in zip(inputs, signature):
        if type(x) is not np.ndarray or x.shape != shape or (x.dtype is not dt and x.dtype != dt):
            return False             # (a dtype of a builtin type is one object: `is` saves a slow comparison)
    return True


def _well_formed_infer(a: Action, num_gpus: int) -> bool:
    """True for an Infer whose fields are exactly of the types Worker._malformed accepts (it would find no
    problem); False says nothing (run _malformed)."""
    return (type(a) is Infer and type(a.id) is int and a.id >= 0 and type(a.earliest) is int
            and type(a.latest) is int and type(a.model_id) is int and type(a.gpu) is int and 0 <= a.gpu < num_gpus
            and type(a.batch_size) is int)


class LoadModelTask(ActionTask):
    __slots__ = ("entry", "error")
    kind = "disk"

    def __init__(self, w: Worker, a: LoadModelFromDisk, now: int):
        super().__init__(w, a, now, a.earliest, a.latest)
        self.entry: ModelEntry | None = None
        self.error: tuple[Status, str] | None = None

    def _ids_taken(self) -> list[int]:
        a: LoadModelFromDisk = self.action
        return [i for i in range(a.model_id, a.model_id + a.copies) if i in self.w.models]

    def begin(self, now: int) -> Result | None:
        if (r := self.check_window(now)) is not None:
            return r
        a: LoadModelFromDisk = self.action
        taken = self._ids_taken()
        if taken:
            return self.fail(Status.INVALID_MODEL_ID, f"model ids {taken[:5]}{'...' if len(taken) > 5 else ''} "
                                                      f"are already in use (copies {a.model_id}..{a.model_id + a.copies - 1})")
        return None

    def run(self, now: int) -> Timing:
        try:
            self.entry, timing = self.w.device.open_model(self.action, now)
        except InvalidModelPath as e:
            self.error = (Status.INVALID_PATH, str(e))
            return Timing(now, now, 0)
        self.error = None
        return timing

    def finish(self, timing: Timing) -> Result | None:
        a: LoadModelFromDisk = self.action
        if self.error is not None:
            return self.fail(*self.error)
        e = self.entry
        keep = tuple(b for b in e.batch_sizes
                     if b <= a.max_batch_size and (e.exec_ns.get(b, 0) <= a.max_exec_duration))
        taken = self._ids_taken()
        if not keep or taken:
            self.w.device.release_model(e)
            if taken:
                return self.fail(Status.INVALID_MODEL_ID, f"model ids {taken[:5]} were taken during the load")
            return self.fail(Status.INVALID_ACTION, f"{e.name}: no batch size of {list(e.batch_sizes)} is <= "
                                                    f"max_batch_size {a.max_batch_size} with exec <= "
                                                    f"max_exec_duration {a.max_exec_duration} ns")
        e.batch_sizes = keep
        self.w.entries.append(e)
        ids = tuple(range(a.model_id, a.model_id + a.copies))
        for i in ids:
            self.w.models[i] = ModelCopy(i, e, self.w.num_gpus)
        return LoadModelFromDiskResult(
            id=a.id, action_type=a.type, received=self.received, sent=self.w.clock.now(), model_ids=ids,
            batch_sizes=keep, input_bytes=e.input_bytes, output_bytes=e.output_bytes, weights_bytes=e.weights_bytes,
            num_pages=e.num_pages, page_size=e.page_size, weights_load_ns=e.weights_load_ns,
            exec_ns=tuple(e.exec_ns.get(b, 0) for b in keep), timing=timing)

    def cleanup(self) -> None:
        if self.entry is not None:
            self.w.device.release_model(self.entry)
            self.entry = None


class ControlTask(ActionTask):
    __slots__ = ()
    kind = "control"

    def __init__(self, w: Worker, a: Action, now: int):
        super().__init__(w, a, now, a.earliest, a.latest)

    def begin(self, now: int) -> Result | None:
        if (r := self.check_window(now)) is not None:
            return r
        a = self.action
        if isinstance(a, ClearCache):
            self.w.clear_cache()
            return ClearCacheResult(id=a.id, action_type=a.type, received=self.received, sent=self.w.clock.now())
        return GetWorkerStateResult(id=a.id, action_type=a.type, received=self.received, sent=self.w.clock.now(),
                                    state=self.w.state())


# action type -> its first task (Worker._first_task: by exact type, else the first type the action is an instance of)
_FIRST_TASK: dict[type, Callable[[Worker, Any, int], Task]] = {
    LoadWeights: LoadWeightsTask, EvictWeights: EvictTask, Infer: CopyInputTask, LoadModelFromDisk: LoadModelTask,
    ClearCache: ControlTask, GetWorkerState: ControlTask}
