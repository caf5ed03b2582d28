"""An artifact's measurements.json (Clockwork's `model.measurements`): profiled weights-load and exec times,
which LoadModelFromDisk reports and the emulated worker draws from.

Format written by `write_measurements` (and read back here):
  {"format": 1, "device": "NVIDIA H200", "measured": "2026-...", "weights_load_ns": int,
   "exec_ns": {"<batch>": p50 ns}, "exec_p99_ns": {"<batch>": ns}, "exec_samples_ns": {"<batch>": [ns, ...]}}
Also accepted: the same fields nested under "devices": {name: {...}} (the first device is used unless one is
named), and keys "weights" / "b<N>" as in Clockwork's file (ns)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.worker.profile import Z99, ExecDist

FILE = "measurements.json"


@dataclass
class Measurements:
    weights_load_ns: int
    exec: dict[int, ExecDist]
    device: str = ""


def parse_measurements(d: dict, device: str | None = None) -> Measurements | None:
    if "devices" in d and isinstance(d["devices"], dict) and d["devices"]:
        name = device if device in d["devices"] else next(iter(d["devices"]))
        sub = dict(d["devices"][name])
        sub.setdefault("device", name)
        d = sub
    exec_: dict[int, ExecDist] = {}
    p50 = {int(b): int(v) for b, v in (d.get("exec_ns") or {}).items()}
    for k, v in d.items():   # Clockwork-style b1, b2, ...
        if k.startswith("b") and k[1:].isdigit():
            p50.setdefault(int(k[1:]), int(v))
    p99 = {int(b): int(v) for b, v in (d.get("exec_p99_ns") or {}).items()}
    samples = {int(b): tuple(int(x) for x in v) for b, v in (d.get("exec_samples_ns") or {}).items()}
    for b, med in p50.items():
        if b in samples and samples[b]:
            exec_[b] = ExecDist(med, 0.0, samples[b])
        elif b in p99 and med > 0:
            exec_[b] = ExecDist(med, math.log(max(p99[b], med) / med) / Z99)
        else:
            exec_[b] = ExecDist(med)
    load = int(d.get("weights_load_ns", d.get("weights", 0)) or 0)
    if load < 0 or any(e.p50_ns < 0 or min(e.samples_ns, default=0) < 0 for e in exec_.values()):
        raise ValueError("negative duration")   # time would run backwards in the emulated worker
    if not exec_ and not load:
        return None
    return Measurements(load, exec_, str(d.get("device", "")))


def read_measurements(artifact: Any, device: str | None = None) -> Measurements | None:
    """The measurements of an opened Artifact (or a directory), None if it has none."""
    path = Path(getattr(artifact, "path", artifact)) / FILE
    if not path.is_file():
        return None
    try:
        return parse_measurements(json.loads(path.read_text()), device)
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError, OverflowError):   # e.g. Infinity
        return None   # a damaged file means no measurements, as in Clockwork


def write_measurements(artifact_dir: str | Path, device: str, weights_load_ns: int,
                       exec_samples_ns: dict[int, list[int]], measured: str = "") -> Path:
    """Write measurements.json from measured samples (p50, p99 and the samples themselves)."""
    def pct(s: list[int], q: float) -> int:
        s = sorted(s)
        return s[min(len(s) - 1, int(q * len(s)))]

    d = {"format": 1, "device": device, "measured": measured, "weights_load_ns": int(weights_load_ns),
         "exec_ns": {str(b): pct(s, 0.5) for b, s in sorted(exec_samples_ns.items())},
         "exec_p99_ns": {str(b): pct(s, 0.99) for b, s in sorted(exec_samples_ns.items())},
         "exec_samples_ns": {str(b): [int(x) for x in s] for b, s in sorted(exec_samples_ns.items())}}
    path = Path(artifact_dir) / FILE
    path.write_text(json.dumps(d) + "\n")
    return path
