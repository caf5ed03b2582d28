"""Profile an artifact on this machine's device when it has no measurements.json for it.

The controller seeds its estimates from the measurements a worker reports at LoadModelFromDisk (Clockwork's
`model.measurements`); an artifact compiled here has none, and without them every exec is predicted to take 0 ns
until it has run. So whoever loads a real artifact into a controller (`Session.load`, `workbench run`,
bench/controller_gpu) first calls `ensure_measurements`: weights load and exec per batch size measured once (a
few runs each, bounded in time), written to `measurements.json` in the artifact; the controller then refines
the estimates from every measured action.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from workbench.worker.measurements import FILE, write_measurements

Say = Callable[[str, int, int, str], None]


def device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    try:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(int(device.partition(":")[2] or 0))
        return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:  # noqa: BLE001
        return device


def has_measurements(path: str | Path, device: str) -> bool:
    f = Path(path) / FILE
    if not f.is_file():
        return False
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    names = set(d.get("devices", {})) | {d.get("device", "")}
    want = device_name(device)
    return want in names or (device == "cpu" and "cpu" in names)


def ensure_measurements(path: str | Path, device: str, say: Say | None = None) -> bool:
    """Profile the artifact on `device` ("cpu", "cuda:N") unless it has measurements for it; True if it did."""
    if has_measurements(path, device):
        return False
    profile_artifact(path, device, say=say)
    return True


def profile_artifact(path: str | Path, device: str = "cpu", runs: int = 20, budget_s: float = 0.5,
                     say: Say | None = None) -> Path:
    """Measure weights load and exec per batch size through a worker of this device (CPUWorker / CUDAWorker),
    so the measurements are what that worker reports at run time: on CUDA the exec replayed as a CUDA graph and
    timed by its own events (the VM called directly measured 2-4 % slower, which the controller then
    over-predicted by 0.2-0.3 ms until each model's estimates had refilled). Writes measurements.json."""
    from workbench.contract import EvictWeights, Infer, LoadModelFromDisk, LoadWeights
    from workbench.models.artifact import Artifact

    say = say or (lambda *a: None)
    art = Artifact.open(path, verify=False)
    do, close = _worker(art, device)
    try:
        do(LoadModelFromDisk(id=0, model_id=0, path=str(art.path)))
        loads = []
        for _ in range(3):
            loads.append(do(LoadWeights(id=0, model_id=0, gpu=0)).timing.duration)
            do(EvictWeights(id=0, model_id=0, gpu=0))
        do(LoadWeights(id=0, model_id=0, gpu=0))
        samples: dict[int, list[int]] = {}
        bs = list(art.batch_sizes)
        for k, b in enumerate(bs):
            say("compile", k, len(bs), f"profiling {art.name} batch {b} on {device}")
            inputs = tuple(np.zeros((b, *t.shape), dtype=t.dtype) for t in art.inputs)
            infer = Infer(id=0, model_id=0, gpu=0, batch_size=b, inputs=inputs)
            for _ in range(2):                   # warm-up: kernel load, graph capture
                do(infer)
            out, stop = [], time.perf_counter() + budget_s
            while len(out) < runs and (len(out) < 3 or time.perf_counter() < stop):
                out.append(do(infer).exec.duration)
            samples[b] = out
    finally:
        close()
    say("compile", len(bs), len(bs), f"profiled {art.name} on {device}")
    return write_measurements(art.path, device_name(device), int(np.median(loads)), samples,
                              measured=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _worker(art, device: str) -> tuple[Callable, Callable[[], None]]:
    """(do(action) -> its successful result, close) for a worker of `device` sized for this artifact alone."""
    import threading

    from workbench.worker.config import WorkerConfig

    bs = art.batch_sizes
    io = max(art.io_bytes(b) for b in bs) + (1 << 20)
    workspace = max(art.workspace_bytes(b) for b in bs) + (1 << 20)
    cfg = WorkerConfig.load(None, page_size=art.page_size, weights_cache_size=max(1, art.num_pages) * art.page_size,
                            io_pool_size=2 * io, workspace_pool_size=workspace, host_io_pool_size=2 * io)
    cv, box = threading.Condition(), {}

    def on(r) -> None:
        with cv:
            box[r.id] = r
            cv.notify_all()

    if device == "cpu":
        from workbench.worker.cpu import CPUWorker
        w = CPUWorker(cfg, on)
    else:
        from workbench.worker.cuda import CUDAWorker
        w = CUDAWorker(cfg, on, num_gpus=1, devices=[int(device.partition(":")[2] or 0)])
    ids = iter(range(1, 1 << 62))

    def do(a):
        a = dataclasses.replace(a, id=next(ids))
        w.submit(a)
        with cv:
            if not cv.wait_for(lambda: a.id in box, 600):
                raise RuntimeError(f"profiling {art.name}: no result for {type(a).__name__} within 600 s")
            r = box.pop(a.id)
        if not r.ok:
            raise RuntimeError(f"profiling {art.name} on {device}: {type(a).__name__} failed: {r.status.name} "
                               f"{r.message}")
        return r

    return do, w.close
