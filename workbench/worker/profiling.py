"""Profile an artifact on this machine's device when it has no measurements.json for it.

The controller seeds its estimates from the measurements a worker reports at LoadModelFromDisk (Clockwork's
`model.measurements`); an artifact compiled here has none, and without them every exec is predicted to take 0 ns
until it has run. So whoever loads a real artifact into a controller (`Session.load`, `workbench run`,
bench/controller_gpu) first calls `ensure_measurements`: weights load and exec per batch size measured once (a
few runs each, bounded in time), written to `measurements.json` in the artifact; the controller then refines
the estimates from every measured action.
"""
from __future__ import annotations

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
    """Measure weights load (host -> device pages) and exec per batch size; write measurements.json."""
    from workbench.models.artifact import Artifact
    from workbench.models import runtime as R

    say = say or (lambda *a: None)
    art = Artifact.open(path, verify=False)
    dev = R.device_of(device)
    model = art.load(dev)
    host = art.read_weights(verify=False)
    pages = R.alloc_pages(art, dev)
    loads = []
    for _ in range(3):
        t = time.perf_counter_ns()
        R.copy_weights(art, pages, host)
        _sync(device)
        loads.append(time.perf_counter_ns() - t)
    binding = model.bind_weights(pages)
    samples: dict[int, list[int]] = {}
    bs = list(art.batch_sizes)
    for k, b in enumerate(bs):
        say("compile", k, len(bs), f"profiling {art.name} batch {b} on {device}")
        inputs = [np.zeros((b, *t.shape), dtype=t.dtype) for t in art.inputs]
        if device != "cpu":
            import cupy
            with cupy.cuda.Device(int(device.partition(":")[2] or 0)):
                inputs = [cupy.asarray(x) for x in inputs]
        model.run(b, inputs, binding)            # warm-up (first call pays lazy initialisation)
        _sync(device)
        out, stop = [], time.perf_counter() + budget_s
        while len(out) < runs and (len(out) < 3 or time.perf_counter() < stop):
            t = time.perf_counter_ns()
            model.run(b, inputs, binding)
            _sync(device)
            out.append(time.perf_counter_ns() - t)
        samples[b] = out
    say("compile", len(bs), len(bs), f"profiled {art.name} on {device}")
    if device != "cpu":       # give the pages back to the device, not to cupy's pool (the worker needs it)
        import cupy
        del binding, pages, inputs, model
        cupy.get_default_memory_pool().free_all_blocks()
    return write_measurements(art.path, device_name(device), int(np.median(loads)), samples,
                              measured=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _sync(device: str) -> None:
    if device != "cpu":
        import cupy
        cupy.cuda.Device(int(device.partition(":")[2] or 0)).synchronize()
