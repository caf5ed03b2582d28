"""`Session`: the workbench inside a Jupyter kernel.

    s = Session(device="auto")              # worker(s) + controller start in background threads; returns at once
    mlp = s.load("mlp", copies=2)           # compile (or reuse the cached artifact) and load
    fut = s.infer("mlp")                    # concurrent.futures.Future -> RequestOutcome
    run = s.run("closed_loop", models="mlp", duration_s=3, concurrency=4)   # in the background
    s.dashboard()                           # live widgets; s.requests / s.actions: polars frames so far
    s.close()                               # or `with Session() as s:` — stops every thread, frees memory

A new Session closes an open one of the same `name` (default: the device), so re-running the cell that creates
it never leaks the previous worker (and its GPU memory); give distinct names to keep several open.

On "cpu" and "cuda" the executor runs in its own process (`workbench.worker.process`), so its timing does not
depend on what else runs in this kernel; `isolated=False` puts it in the kernel's process instead, for debugging
only (NOT isolated: its threads then wait for the interpreter lock like any other), and `worker_cpus=[...]`
confines the executor process to cores the kernel leaves free.

The controller itself runs in the kernel's process, so a busy cell delays its decisions by up to the interpreter's
switch interval each time it wakes; a Session lowers it to `switch_interval` (default 0.5 ms; None leaves it) for
the kernel's life (`workbench.env.interpreter` says why).

Threads a session owns (all stopped by `close()`): the controller's clock timer thread, the executor process's
supervisor (or, in-process, the worker's executors), the telemetry converter, the UI pump (only once a view is
shown) and the model loader. Cells never block on them; button handlers only start work on them.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from workbench.env.interpreter import SWITCH_INTERVAL, lower_switch_interval
from workbench.telemetry.recorder import Recorder
from workbench.ui import aggregates as A
from workbench.ui.artifacts import DEFAULT_BATCH_SIZES, ModelNotFound, Progress
from workbench.workload.base import ms_to_ns, positive

DEVICES = ("auto", "cuda", "cpu", "emulated")
CLOCKS = ("real",)
MS = 1_000_000
# A CPU session stands host memory in for GPU memory: Clockwork's 21.5 GiB cache would not fit a laptop.
CPU_DEFAULTS = {"weights_cache_size": 1 << 30, "io_pool_size": 64 << 20, "workspace_pool_size": 256 << 20,
                "host_io_pool_size": 64 << 20}
# A notebook kernel is a busy Python process (cells, widgets, GC): an action's result can reach the controller
# late without the worker being dead, so the controller waits longer before writing an action off and needs
# more unanswered actions in a row before it takes a GPU out of service (it does not bring one back).
SESSION_CONTROLLER = {"grace": 500 * MS, "failed_after": 8}

_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()
_ids = itertools.count(1)


class SessionError(RuntimeError):
    """A session used wrongly (e.g. after close) or a load that failed; the message says what to do."""


class SessionClosed(SessionError):
    pass


@dataclass
class LoadedModel:
    """Copies of a model loaded by one `load` call (the session also keeps one per name, with every copy)."""
    name: str
    ids: list[int]
    path: str
    compiled: bool = False
    seconds: float = 0.0
    _next: Any = field(default_factory=lambda: itertools.count(), repr=False)

    @property
    def copies(self) -> int:
        return len(self.ids)

    def pick(self) -> int:
        """The next copy, round robin (requests to a name spread over its copies)."""
        return self.ids[next(self._next) % len(self.ids)]

    def __str__(self) -> str:
        span = f"{self.ids[0]}" if len(self.ids) == 1 else f"{self.ids[0]}-{self.ids[-1]}"
        how = "compiled" if self.compiled else "cached"
        return f"{self.name} ×{self.copies} (ids {span}, {how} artifact, {self.seconds:.1f} s)"


def cuda_devices() -> tuple[int, str]:
    """(number of CUDA devices, "" or why none are usable)."""
    try:
        from cuda.bindings import driver as cu
    except Exception as e:  # noqa: BLE001
        return 0, f"cuda-bindings not importable ({e})"
    try:
        err, = cu.cuInit(0)
        if int(err) != 0:
            return 0, f"cuInit failed ({getattr(err, 'name', err)}): no NVIDIA driver or GPU"
        err, n = cu.cuDeviceGetCount()
        if int(err) != 0:
            return 0, f"cuDeviceGetCount failed ({getattr(err, 'name', err)})"
        return int(n), "" if n else "no CUDA device"
    except Exception as e:  # noqa: BLE001
        return 0, f"CUDA driver unavailable ({e})"


class Run:
    """A workload running in the background: `wait()`, `stop()`, `done`, `stats()`; `.widget()` shows progress."""

    def __init__(self, session: "Session", workload: Any, duration_s: float | None):
        self.session = session
        self.workload = workload
        self.duration_s = duration_s
        self.started = time.monotonic()
        self._widget = None

    @property
    def done(self) -> bool:
        w = self.workload
        ended = w.stopped or (w.t_end is not None and self.session.clock.now() >= w.t_end)
        return ended and w.in_flight == 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the workload has ended and every request has its final status (True), or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if self.session.closed:
                return self.done
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        self.workload.stop()

    def stats(self) -> dict:
        return self.workload.stats()

    def text(self) -> str:
        s = self.stats()
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())) or "none yet"
        state = "done" if self.done else "running"
        return f"Run({s['name']}: {s['submitted']} submitted, {s['completed']} completed [{outcomes}], {state})"

    __repr__ = text

    # the pump writes the progress widget (one writer)
    def update(self, snap: Any) -> None:
        if self._widget is None:
            return
        bar, label = self._widget.children
        elapsed = time.monotonic() - self.started
        total = self.duration_s or max(elapsed, 1e-9)
        with bar.hold_sync():
            bar.value = 1000 if self.done else min(999, int(1000 * elapsed / total))
            bar.bar_style = "success" if self.done else ""
        label.value = self.text()

    def widget(self):
        if self._widget is None:
            import ipywidgets as W
            self._widget = W.HBox([W.IntProgress(value=0, min=0, max=1000, description="run"),
                                   W.Label(self.text())])
            self.session._pump_add(self)
        return self._widget

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        b = dict(self.widget()._repr_mimebundle_())
        b["text/plain"] = self.text()
        return b


class Session:
    """Worker(s) + controller + telemetry in background threads of this kernel. See the module docstring."""

    def __init__(self, device: str = "auto", gpus: int | Sequence[int] | None = None, policy: str = "clockwork",
                 clock: str = "real", *, profile: str = "h200", worker_config: Any = None,
                 controller_config: Any = None, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 max_hz: float = 4.0, seed: int = 0, isolated: bool = True, name: str | None = None,
                 worker_cpus: Sequence[int] | None = None, switch_interval: float | None = SWITCH_INTERVAL,
                 **policy_options: Any):
        # every attribute close() touches exists before anything can fail
        self.id = next(_ids)
        self.closed = False
        self._closing = False
        self._lock = threading.RLock()
        self._models: dict[str, LoadedModel] = {}
        self._runs: list[Run] = []
        self._pump = None
        self._dashboard = None
        self._loader = None
        self.clock = self.controller = self.worker = self.recorder = None
        self._starter: threading.Thread | None = None
        self.start_error = ""
        if device not in DEVICES:
            raise ValueError(f"device={device!r}: use one of {', '.join(map(repr, DEVICES))}")
        if clock not in CLOCKS:
            raise ValueError(f"clock={clock!r}: a Session runs in real time (clock='real'); for virtual time "
                             f"run an experiment with workbench.experiments (device='emulated', clock='virtual')")
        self.policy_name = policy if isinstance(policy, str) else type(policy).__name__
        self.batch_sizes = tuple(batch_sizes)
        self.max_hz = max_hz
        self.profile_name = profile
        self.isolated = bool(isolated)
        if worker_cpus is not None and not self.isolated:
            raise ValueError("worker_cpus confines the executor process: give isolated=True with it")
        self.worker_cpus = None if worker_cpus is None else list(worker_cpus)
        lower_switch_interval(switch_interval)
        self.device, self.gpus, self.device_note = self._resolve_device(device, gpus)
        self.name = name or self.device
        for old in sessions():       # re-running `session = Session()` must not leak the previous one
            if old.name == self.name:
                warnings.warn(f"closing {old.describe()}: a new Session named {self.name!r} replaces it "
                              f"(pass name=... to keep several sessions open)", stacklevel=2)
                old.close()
        try:
            self._start(policy, worker_config, controller_config, seed, policy_options)
        except BaseException:
            self.close()            # a failed start leaves no thread behind
            raise
        _sessions.add(self)

    # ------------------------------------------------------------------------------------------ start
    @staticmethod
    def _resolve_device(device: str, gpus: int | Sequence[int] | None) -> tuple[str, list[int], str]:
        n_cuda, why = (0, "") if device in ("cpu", "emulated") else cuda_devices()
        if device == "auto":
            device = "cuda" if n_cuda > 0 else "cpu"
            why = f"auto: {'found ' + str(n_cuda) + ' CUDA device(s)' if n_cuda else why + '; using the CPU'}"
        if device == "cuda" and n_cuda == 0:
            raise SessionError(f"device='cuda' but no CUDA device is usable here ({why}): use device='cpu' or "
                               f"'emulated', or device='auto' to pick what exists")
        if gpus is None:
            idx = list(range(n_cuda)) if device == "cuda" else [0]
        elif isinstance(gpus, bool) or not isinstance(gpus, (int, list, tuple, range)):
            raise ValueError(f"gpus={gpus!r}: give a count (int >= 1) or a list of GPU indices")
        elif isinstance(gpus, int):
            if gpus < 1:
                raise ValueError(f"gpus={gpus}: a session needs at least one GPU (use gpus=1)")
            idx = list(range(gpus))
        else:
            idx = [int(g) for g in gpus]
            if not idx or len(set(idx)) != len(idx) or min(idx) < 0:
                raise ValueError(f"gpus={list(gpus)}: give distinct GPU indices >= 0")
        if device == "cuda":
            absent = [g for g in idx if g >= n_cuda]
            if absent:
                raise SessionError(f"GPU {absent[0]} is not present: this machine has {n_cuda} CUDA device(s) "
                                   f"(indices 0..{n_cuda - 1})")
        elif idx != list(range(len(idx))):
            raise SessionError(f"gpus={idx}: device={device!r} has no physical GPUs to pick; give a count "
                               f"(gpus={len(idx)}) of {'host-memory' if device == 'cpu' else 'emulated'} devices")
        if device == "cpu" and len(idx) > 8:
            raise ValueError(f"gpus={len(idx)}: at most 8 host-memory devices on device='cpu'")
        return device, idx, why

    def _start(self, policy: Any, worker_config: Any, controller_config: Any, seed: int, policy_options: dict) -> None:
        from workbench.clock import RealClock
        from workbench.controller.controller import Controller
        from workbench.worker.config import WorkerConfig

        if isinstance(worker_config, (str, Path)):
            worker_config = WorkerConfig.load(worker_config)
        elif worker_config is None and self.device == "cpu":
            import os
            worker_config = WorkerConfig.load() if os.environ.get("WORKBENCH_CONFIG") else \
                WorkerConfig.load(**CPU_DEFAULTS)
        self.worker_config = worker_config
        self.clock = RealClock(name=f"session{self.id}-clock")
        self.recorder = Recorder()
        if controller_config is None:
            from workbench.controller.config import ControllerConfig
            controller_config = ControllerConfig().replace(**SESSION_CONTROLLER)
        self.controller = Controller(self.clock, policy=policy, config=controller_config, recorder=self.recorder,
                                     **policy_options)
        self.t0 = self.clock.now()
        # Building the worker imports TVM (and CUDA) and allocates its memory: seconds. Do it on a thread so
        # the cell returns at once; load() waits for it and reports a failure.
        self._starter = threading.Thread(target=self._start_worker, args=(worker_config, seed),
                                         name=f"workbench-session{self.id}-start", daemon=True)
        self._starter.start()

    def _start_worker(self, worker_config: Any, seed: int) -> None:
        n = len(self.gpus)
        try:
            if self.device == "emulated":
                from workbench.worker.emulated import EmulatedWorker
                self.controller.add_worker(lambda cb: self._keep(EmulatedWorker(
                    self.clock, n, self.profile_name, worker_config, cb, seed=seed)))
            elif self.isolated:       # the executor in its own process (workbench.worker.process)
                from workbench.worker.process import start_worker
                kw = {"num_gpus": n} if self.device == "cpu" else {"devices": self.gpus}
                if self.worker_cpus is not None:
                    kw["cpus"] = self.worker_cpus
                self.controller.add_worker(lambda cb: self._keep(start_worker(self.device, worker_config, cb,
                                                                              isolated=True, **kw)))
            elif self.device == "cpu":
                from workbench.worker.cpu import CPUWorker
                self.controller.add_worker(lambda cb: self._keep(CPUWorker(worker_config, cb, num_gpus=n)))
            else:
                from workbench.worker import CUDAWorker
                self.controller.add_worker(lambda cb: self._keep(CUDAWorker(worker_config, cb, devices=self.gpus)))
        except BaseException as e:  # noqa: BLE001 - reported by wait_started() and the status line
            self.start_error = f"{type(e).__name__}: {e}"

    def wait_started(self, timeout_s: float = 120.0) -> None:
        """Wait until the worker is up; raise SessionError saying why if it could not start."""
        self._check_open()
        self._starter.join(timeout_s)
        if self._starter.is_alive():
            raise SessionError(f"the {self.device} worker did not start within {timeout_s} s")
        if self.start_error:
            raise SessionError(f"the {self.device} worker failed to start: {self.start_error} "
                               f"(close this session and create a new one with other settings)")
        if self.worker_config is None and self.worker is not None:
            self.worker_config = self.worker.config

    def _keep(self, worker: Any) -> Any:
        self.worker = worker
        return worker

    @property
    def target(self) -> str:
        return "cuda" if self.device == "cuda" else "cpu"

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed: create a new workbench Session() "
                                f"(its telemetry is still readable: .requests / .actions)")

    # ------------------------------------------------------------------------------------------ models
    def load(self, model: str, copies: int = 1, *, batch_sizes: Sequence[int] | None = None,
             progress: Progress | None = None, timeout_s: float = 600.0) -> LoadedModel:
        """Load `copies` instances of `model`: a zoo name (compiled once per target, then reused from the
        artifact cache), an artifact directory, or an .onnx file; on device='emulated', a profile model name.
        Blocks until the workers have it (use the dashboard's loader, or `load_async`, to keep the cell free).
        Raises with a message saying what to fix; the session stays usable."""
        self._check_open()
        if isinstance(copies, bool) or not isinstance(copies, int):
            raise TypeError(f"copies must be an int >= 1, got {copies!r}")
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        if not isinstance(model, (str, Path)) or not str(model).strip():
            raise ValueError(f"model must be a zoo name, an artifact directory or an .onnx file, got {model!r}")
        say = progress or (lambda *a: None)
        start = time.perf_counter()
        self.wait_started()
        path, label, compiled = self._artifact_for(str(model).strip(), batch_sizes, say)
        say("load", 0, copies, f"loading {label} ×{copies} into the worker")
        ids = self.controller.load_model(path, copies=copies, name=label)
        deadline = time.monotonic() + timeout_s
        while True:
            states = [self.controller.models[i] for i in ids]
            failed = [m for m in states if m.error]
            if failed:
                raise SessionError(f"the worker could not load {label!r} ({path}): {failed[0].error}")
            n_ready = sum(m.ready for m in states)
            say("load", n_ready, copies, f"loading {label}: {n_ready}/{copies} copies ready")
            if n_ready == copies:
                break
            if self.closed:
                raise SessionClosed(f"session {self.id} was closed while loading {label!r}")
            if time.monotonic() > deadline:
                raise SessionError(f"loading {label!r} did not finish within {timeout_s} s")
            time.sleep(0.01)
        loaded = LoadedModel(label, list(ids), path, compiled, time.perf_counter() - start)
        with self._lock:     # the session's record of the name: every copy loaded under it
            total = self._models.get(label)
            if total is None:
                total = self._models[label] = LoadedModel(label, [], path)
            total.ids.extend(ids)
            total.path = path
        say("load", copies, copies, f"loaded {label} ×{copies}")
        if self._pump is not None:
            self._pump.poke()
        return loaded

    def load_async(self, model: str, copies: int = 1, **kw: Any) -> cf.Future:
        """`load` on the loader thread; returns a Future of the LoadedModel."""
        self._check_open()
        return self._loader_pool().submit(self.load, model, copies, **kw)

    def _artifact_for(self, model: str, batch_sizes: Sequence[int] | None, say: Progress) -> tuple[str, str, bool]:
        from workbench.ui import artifacts
        if self.device == "emulated":
            from workbench.worker.profile import Profile
            prof = Profile.load(self.profile_name) if isinstance(self.profile_name, str) else self.profile_name
            names = sorted(prof.models)
            if model in names:
                say("compile", 1, 1, f"emulated: {model} timed from profile {self.profile_name!r}")
                return f"profile:{model}", model, False
            if not artifacts.is_artifact_dir(model):
                raise ModelNotFound(f"unknown model {model!r} for device='emulated': use a model of profile "
                                    f"{self.profile_name!r} ({', '.join(names)}) or an artifact directory")
        art = artifacts.resolve(model, self.target, batch_sizes or self.batch_sizes,
                                page_size=self.worker_config.page_size if self.worker_config else None,
                                progress=say)
        from workbench.worker.profiling import ensure_measurements
        device = "cpu" if self.device == "cpu" else f"cuda:{self.gpus[0]}"
        if self.device != "emulated":
            try:
                ensure_measurements(art.path, device, say=say)
            except OSError as e:
                raise SessionError(f"could not write measurements for {art.path} ({e}): make the artifact "
                                   f"directory writable, or add its measurements.json") from None
        return str(art.path), art.name, art.compiled

    @property
    def models(self) -> pl.DataFrame:
        """Loaded models: name, copies, ids, artifact path, ready copies, weights pages."""
        rows = []
        with self._lock:
            loaded = list(self._models.values())
        states = dict(self.controller.models) if self.controller else {}
        for lm in loaded:
            ms = [states[i] for i in lm.ids if i in states]
            rows.append({"name": lm.name, "copies": lm.copies, "ids": lm.ids, "path": lm.path,
                         "ready": sum(m.ready for m in ms), "pages": ms[0].num_pages if ms else 0,
                         "batch_sizes": list(ms[0].batch_sizes) if ms else []})
        return pl.DataFrame(rows, schema={"name": pl.Utf8, "copies": pl.Int64, "ids": pl.List(pl.Int64),
                                          "path": pl.Utf8, "ready": pl.Int64, "pages": pl.Int64,
                                          "batch_sizes": pl.List(pl.Int64)})

    def _model_id(self, model: str | int | LoadedModel) -> int:
        if isinstance(model, LoadedModel):
            return model.pick()
        if isinstance(model, int) and not isinstance(model, bool):
            if model not in self.controller.models:
                raise ValueError(f"unknown model id {model}: loaded ids are {sorted(self.controller.models)}")
            return model
        with self._lock:
            lm = self._models.get(str(model))
            known = sorted(self._models)
        if lm is None:
            raise ValueError(f"model {model!r} is not loaded in this session (loaded: {known or 'none'}): "
                             f"call session.load({model!r}) first")
        return lm.pick()

    def _model_ids(self, models: Any) -> list[int]:
        if isinstance(models, (str, int, LoadedModel)):
            models = [models]
        ids: list[int] = []
        for m in models:
            if isinstance(m, LoadedModel):
                ids.extend(m.ids)
            elif isinstance(m, str):
                with self._lock:
                    lm = self._models.get(m)
                if lm is None:
                    raise ValueError(f"model {m!r} is not loaded in this session (loaded: "
                                     f"{sorted(self._models) or 'none'}): call session.load({m!r}) first")
                ids.extend(lm.ids)
            else:
                ids.append(self._model_id(m))
        return ids

    # ---------------------------------------------------------------------------------------- requests
    def infer(self, model: str | int | LoadedModel, inputs: Any = None, *, slo_ms: float | None = None,
              slo_factor: float | None = None) -> cf.Future:
        """Submit one request; the Future's result is the RequestOutcome (status, latency, outputs, message),
        known no later than the deadline. A request the controller cannot serve (inputs of the wrong shape, an SLO
        shorter than the model can meet, a bad slo_factor) ends as status 'rejected' with the reason; `slo_ms`,
        converted here, must be a finite number of ms > 0 (ValueError otherwise)."""
        self._check_open()
        mid = self._model_id(model)
        slo = None if slo_ms is None else ms_to_ns(positive(slo_ms, "slo_ms"))
        fut: cf.Future = cf.Future()
        fut.set_running_or_notify_cancel()
        self.controller.submit(mid, inputs, slo=slo, slo_factor=slo_factor, callback=fut.set_result)
        return fut

    def run(self, workload: Any = "closed_loop", *, duration_s: float | None = 5.0, models: Any = None,
            **options: Any) -> Run:
        """Drive a workload in the background: a `workbench.workload` instance, or a kind ("closed_loop",
        "poisson", "bursty", "slo_sweep", "azure") with `models` (names or ids; default every loaded model) and
        the workload's options (e.g. concurrency=4, rate=200, slo_ms=50). Returns a `Run` (wait/stop/stats)."""
        self._check_open()
        if duration_s is not None:
            positive(duration_s, "duration_s (or None: until run.stop())")
        if isinstance(workload, str):
            from workbench.workload import WORKLOADS
            if workload not in WORKLOADS:
                raise ValueError(f"unknown workload {workload!r}: use one of {sorted(WORKLOADS)} or a Workload")
            ids = self._model_ids(models if models is not None else list(self._models))
            if not ids and models is not None and self._models:
                raise ValueError(f"models={models!r} names no model: give loaded models (loaded: "
                                 f"{sorted(self._models)}) or leave models out for all of them")
            if not ids:
                raise SessionError("no model is loaded: call session.load(...) before session.run(...)")
            workload = WORKLOADS[workload](ids, **options)
        elif models is not None or options:
            raise ValueError("models=/options are for a workload given by name; set them on the Workload instance")
        workload.start(self.controller, self.clock, duration_s=duration_s)
        r = Run(self, workload, duration_s)
        with self._lock:
            self._runs.append(r)
        return r

    # --------------------------------------------------------------------------------------- telemetry
    @property
    def requests(self) -> pl.DataFrame:
        """Every request so far (one row each; schema in workbench.telemetry.schema)."""
        return self.recorder.requests()

    @property
    def actions(self) -> pl.DataFrame:
        """Every action so far (one row each)."""
        return self.recorder.actions()

    def snapshot(self):
        """The telemetry now, as the views see it."""
        from workbench.ui.snapshot import Snapshot
        ctl = self.controller
        models = dict(ctl.models) if ctl else {}
        gpus = list(ctl.gpus) if ctl else []
        return Snapshot(self.recorder.requests(), self.recorder.actions(), self.t0, self.clock.now(),
                        {i: m.name for i, m in models.items()}, {i: m.num_pages for i, m in models.items()},
                        {g.local: g.total_pages for g in gpus if g.worker == 0})

    def summary(self) -> dict:
        """Request outcome counts, latency percentiles and goodput so far."""
        return A.request_summary(self.requests)

    # ------------------------------------------------------------------------------------------- UI
    def _pump_add(self, view: Any) -> None:
        if self.closed:
            return
        with self._lock:
            if self._pump is None:
                from workbench.ui.pump import Pump
                self._pump = Pump(self.snapshot, max_hz=self.max_hz, name=f"workbench-ui-pump-{self.id}")
                self.recorder.on_row = self._pump.poke
        self._pump.add(view)

    @property
    def pump(self):
        return self._pump

    def flush(self, timeout: float = 10.0) -> bool:
        """Redraw every live view with everything recorded so far (e.g. before saving the notebook)."""
        return self._pump.flush(timeout) if self._pump is not None else True

    def loader(self):
        """The model-loader widget (zoo / artifact picker, copies, progress, errors in place)."""
        from workbench.ui.widgets import ModelLoader
        with self._lock:
            if self._loader is None:
                self._loader = ModelLoader(self)
            return self._loader

    def _loader_pool(self) -> cf.ThreadPoolExecutor:
        return self.loader()._pool

    def dashboard(self):
        """Status, model loader, and live tabs: request outcomes, latency, timeline, cache, environment."""
        self._check_open()
        from workbench.ui.views import StatusLine
        from workbench.ui.widgets import Dashboard, EnvView
        with self._lock:
            if self._dashboard is None:
                views = Dashboard.live_views()
                status = StatusLine(self.describe)
                self._dashboard = Dashboard(views, loader=self.loader(), env=EnvView(), status=status)
                for v in (status, *views.values()):
                    self._pump_add(v)
                self._dashboard.pump = self._pump
            return self._dashboard

    def widget(self):
        """The dashboard's widget (to compose into your own layout)."""
        return self.dashboard().widget()

    def view(self, kind: str):
        """One live view on its own ("requests", "latency", "timeline", "cache"), fed by the pump."""
        from workbench.ui.views import CacheView, LatencyView, OutcomesView, TimelineView
        table = {"requests": OutcomesView, "latency": LatencyView, "timeline": TimelineView, "cache": CacheView}
        if kind not in table:
            raise ValueError(f"unknown view {kind!r}: use one of {sorted(table)}")
        self._check_open()
        v = table[kind]()
        self._pump_add(v)
        return v

    # ------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        """Stop workloads, the pump (after a last redraw), the controller and workers, the clock; free memory.
        Idempotent; telemetry stays readable."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for r in self._runs:
            r.stop()
        if self._pump is not None:
            self._pump.close(final_tick=True)
        if self.recorder is not None:
            self.recorder.on_row = None
        if self._loader is not None:
            self._loader.close()
        self.closed = True
        if self._starter is not None and self._starter is not threading.current_thread():
            self._starter.join(timeout=120)
        try:
            if self.controller is not None:
                self.controller.close()          # finalises pending requests, closes the workers
            elif self.worker is not None:
                self.worker.close()
        finally:
            if self.clock is not None:
                self.clock.close()
            if self.recorder is not None:
                self.recorder.close()            # converts the last rows; frames stay readable
            self.worker = None                   # drop the device memory (host arenas / GPU pools)
            if self.controller is not None:
                self.controller.workers.clear()
            _sessions.discard(self)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- text
    def describe(self) -> str:
        n = len(self.gpus)
        unit = {"cuda": "GPU", "cpu": "host-memory device", "emulated": "emulated GPU"}[self.device]
        with self._lock:
            models = ", ".join(f"{m.name}×{m.copies}" for m in self._models.values()) or "no models"
        state = "closed" if self.closed else ("worker failed: " + self.start_error if self.start_error else
                                              "starting" if self._starter is not None and self._starter.is_alive()
                                              else "open")
        label = "" if self.name == self.device else f" {self.name!r}"
        return (f"Session {self.id}{label} [{state}]: device={self.device} ({n} {unit}{'s' if n != 1 else ''}), "
                f"policy={self.policy_name}; {models}")

    def __repr__(self) -> str:
        s = self.describe()
        if self.recorder is not None and not self.closed:
            s += f"; {self.recorder.num_requests} requests, {self.recorder.num_actions} actions"
        return s

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return {"text/plain": repr(self)}


def sessions() -> list[Session]:
    """Sessions of this kernel that are still open."""
    return [s for s in list(_sessions) if not s.closed]


def close_all() -> None:
    for s in sessions():
        s.close()


atexit.register(close_all)
