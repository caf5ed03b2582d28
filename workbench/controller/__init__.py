"""The controller: Clockwork's scheduler (requests, estimates, infer scheduling, loads and evictions), the
Triton-like and Ray-Serve-like baselines as pluggable policies, and virtual-time simulation.

    from workbench.controller import Controller, ControllerConfig, RequestOutcome, simulate

    ctl = Controller(clock, policy="clockwork")        # "triton", "ray", or a Policy instance
    ctl.add_worker(lambda on_result: EmulatedWorker(clock, 2, "h200", None, on_result))
    ids = ctl.load_model("profile:resnet50", copies=10)
    ctl.wait_ready()
    rid = ctl.submit(ids[0], slo=100_000_000, callback=print)   # exactly one RequestOutcome, by the deadline

Modules: requests (statuses, RequestOutcome), estimates (p99 sliding windows), tracker (GPU/PCIe timelines),
loads (the LoadTracker demand model), scheduler (the Clockwork policy), baselines, controller (bookkeeping and
the client API), simulation (VirtualClock + emulated workers + a workload). Imports are lazy.
"""
from __future__ import annotations

from typing import Any

from workbench.controller import compiled as _compiled  # noqa: F401 - refuses a compiled build older than its sources

_EXPORTS = {
    "Controller": "workbench.controller.controller",
    "ControllerError": "workbench.controller.controller",
    "ControllerConfig": "workbench.controller.config",
    "RequestOutcome": "workbench.controller.requests",
    "STATUSES": "workbench.controller.requests",
    "Policy": "workbench.controller.policy",
    "ClockworkPolicy": "workbench.controller.scheduler",
    "TritonPolicy": "workbench.controller.baselines",
    "RayServePolicy": "workbench.controller.baselines",
    "simulate": "workbench.controller.simulation",
    "SimResult": "workbench.controller.simulation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench.controller' has no attribute {name!r}")
