"""What an experiment ran on: package versions, Python, OS, CPU, clocks, GPU/profile and the checker's results
(`workbench.env.check()`), written next to the results as environment.json."""
from __future__ import annotations

import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("workbench", "numpy", "polars", "apache-tvm", "tvm-ffi", "altair", "vl-convert-python", "tqdm",
            "cupy-cuda13x", "cuda-bindings", "nvidia-ml-py", "torch", "onnxruntime")
REPO = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit(repo: Path = REPO) -> str | None:
    """The checked-out commit, read from .git without running git."""
    head = repo / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            target = repo / ".git" / ref[5:]
            if target.is_file():
                return target.read_text().strip()
            packed = repo / ".git" / "packed-refs"
            for line in packed.read_text().splitlines() if packed.is_file() else []:
                if line.endswith(" " + ref[5:]):
                    return line.split()[0]
            return None
        return ref
    except OSError:
        return None


def clocks() -> dict[str, Any]:
    info = {}
    for name in ("monotonic", "perf_counter", "time"):
        ci = time.get_clock_info(name)
        info[name] = {"implementation": ci.implementation, "resolution_s": ci.resolution}
    try:
        info["clocksource"] = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource") \
            .read_text().strip()
    except OSError:
        info["clocksource"] = None
    info["switch_interval_s"] = sys.getswitchinterval()
    return info


def environment(device: dict | None = None, profile: Any = None, run_checker: bool = True) -> dict[str, Any]:
    env: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "clocks": clocks(),
        "device": device or {},
        "environ": {k: os.environ[k] for k in sorted(os.environ)
                    if k.startswith(("CUDA_", "WORKBENCH_", "TVM_", "OMP_", "NVIDIA_"))},
    }
    if profile is not None:
        env["emulation_profile"] = {"device": profile.device, "source": profile.source, "path": profile.path,
                                    "sm_clock_mhz": profile.sm_clock_mhz, "page_size": profile.page_size,
                                    "h2d_bytes_per_s": profile.h2d_bytes_per_s}
    if run_checker:
        try:
            from workbench.env import check
            rep = check(gpu=True, devices=(device or {}).get("kind") == "cuda")
            env["checks"] = rep.to_dict()
            env["checks_summary"] = rep.summary()
        except Exception as e:  # noqa: BLE001 - the environment record must never stop an experiment
            env["checks"] = None
            env["checks_summary"] = f"checker unavailable: {type(e).__name__}: {e}"
    return env
