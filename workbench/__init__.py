"""Clockwork Workbench: predictable multi-tenant DNN inference serving, notebook-first.

Layers (docs/architecture.md): models -> worker -> controller -> workload/telemetry -> ui, with env beside them.
Importing the package is cheap: nothing heavy (TVM, CUDA) is imported until it is used.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    """`workbench.Session`, `workbench.check` and friends, imported on first use (importing them is not free)."""
    if name in ("Session", "Dashboard"):
        import workbench.ui as ui
        return getattr(ui, name)
    if name == "check":
        from workbench.env import check
        return check
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
