"""Workers: Clockwork's action executor (clockwork.md §2.3) on an emulated GPU, the CPU (TVM llvm) and CUDA.

    from workbench.worker import EmulatedWorker, CPUWorker, CUDAWorker, WorkerConfig

All three are the same state machine (`base.Worker`) over a different `Device`; see docs in base.py.
Imports are lazy so that `import workbench.worker` needs neither TVM nor cupy.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Worker": "workbench.worker.base",
    "WorkerConfig": "workbench.worker.config",
    "ConfigError": "workbench.worker.config",
    "EmulatedWorker": "workbench.worker.emulated",
    "Profile": "workbench.worker.profile",
    "CPUWorker": "workbench.worker.cpu",
    "CUDAWorker": "workbench.worker.cuda",
    "PageCache": "workbench.worker.page_cache",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench.worker' has no attribute {name!r}")


__all__ = list(_EXPORTS)
