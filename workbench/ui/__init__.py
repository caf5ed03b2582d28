"""The notebook workbench: `Session` (worker + controller in this kernel), live views, widgets, reports.

    from workbench.ui import Session
    session = Session(device="auto"); session.dashboard()

Imports are lazy: `import workbench.ui` costs nothing until a name is used (ipywidgets, altair, TVM load then).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Session": "workbench.ui.session",
    "SessionError": "workbench.ui.session",
    "SessionClosed": "workbench.ui.session",
    "LoadedModel": "workbench.ui.session",
    "Run": "workbench.ui.session",
    "sessions": "workbench.ui.session",
    "close_all": "workbench.ui.session",
    "Dashboard": "workbench.ui.widgets",
    "ModelLoader": "workbench.ui.widgets",
    "EnvView": "workbench.ui.widgets",
    "LatencyView": "workbench.ui.views",
    "TimelineView": "workbench.ui.views",
    "CacheView": "workbench.ui.views",
    "OutcomesView": "workbench.ui.views",
    "Snapshot": "workbench.ui.snapshot",
    "Pump": "workbench.ui.pump",
    "VegaChart": "workbench.ui.vega",
    "run_notebook": "workbench.ui.report",
    "export_html": "workbench.ui.report",
}
_MODULES = {"artifacts", "aggregates", "charts", "report", "views", "widgets", "session", "pump", "vega",
            "profiling", "snapshot", "tables", "testing"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"workbench.ui.{name}")
    raise AttributeError(f"module 'workbench.ui' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
