"""The emulated GPU: the worker state machine of `base.py` with a device that does no compute and takes the
durations a profile recorded (Clockwork's `worker_dummy`). Same windows, cache accounting and status codes as
the real workers, because it is the same code; only the device differs.

It owns no threads: executors are driven by `clock.call_at`, so it runs in real time on a `RealClock` (callbacks
on the clock's thread) and deterministically in virtual time on a `VirtualClock` (same seed and actions, same
results). In virtual time (without task telemetry) it runs a lean copy of that state machine with the same
events and results, several times cheaper (`_Lean`, in emulated_lean.py). Models are loaded by profile
name ("profile:resnet50": no files, so thousands of instances cost nothing) or from an artifact directory
(sizes from its manifest, durations from its measurements.json, or from the profile entry of the same model
name)."""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np

from workbench.clock import Clock
from workbench.contract import Action, LoadModelFromDisk, Result, Timing
from workbench.worker.base import Device, InvalidModelPath, ModelEntry, Worker, entry_from_artifact
from workbench.worker.config import WorkerConfig
from workbench.worker.emulated_lean import _Lean, _Pool  # noqa: F401 - the lean state machine (see there)
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
                   io_offset: int, host_offset: int, now: int, exec_next: bool = False) -> tuple[Timing, Any]:
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
            # an instance attribute that shadows the method: the controller's calls skip the dispatch below
            self.__dict__["submit"] = self._lean.submit

    def submit(self, action: Action, *, answer_here: bool = False) -> None:
        if self._lean is not None:
            self._lean.submit(action)
        else:
            super().submit(action, answer_here=answer_here)

    def close(self, timeout: float = 30.0) -> None:
        if self._lean is not None:
            self._lean.close()
        else:
            super().close(timeout)
