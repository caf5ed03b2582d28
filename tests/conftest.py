import os
import shutil

import pytest


def _cuda_device_reason() -> str | None:
    """None if a CUDA device is usable here, else why not."""
    if os.environ.get("WORKBENCH_NO_GPU"):
        return "WORKBENCH_NO_GPU is set"
    try:
        from cuda.bindings import driver as cu
    except Exception as e:  # noqa: BLE001
        return f"cuda-bindings not importable ({e})"
    try:
        err, = cu.cuInit(0)
        if int(err) != 0:
            return f"cuInit failed: {err.name if hasattr(err, 'name') else err} (no NVIDIA driver or GPU)"
        err, n = cu.cuDeviceGetCount()
        if int(err) != 0 or n == 0:
            return "no CUDA device"
    except Exception as e:  # noqa: BLE001
        return f"CUDA driver unavailable ({e})"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_reason = None
    checked = False
    for item in items:
        if "gpu" in item.keywords:
            if not checked:
                gpu_reason, checked = _cuda_device_reason(), True
            if gpu_reason:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {gpu_reason}"))
        if "browser" in item.keywords and not shutil.which("chromium"):
            item.add_marker(pytest.mark.skip(reason="browser test: /usr/bin/chromium not installed"))
