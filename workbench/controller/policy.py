"""The interface between the controller (bookkeeping: requests, actions, results, deadlines, telemetry) and a
scheduling policy (decisions: what to load, evict and run where, and when). Clockwork and the baselines are
policies; they run in the same harness, so their telemetry is comparable row for row."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from workbench.contract import InferResult, Result
from workbench.controller.compiled import mypyc_attr
from workbench.controller.requests import DROPPED, Request

if TYPE_CHECKING:
    from workbench.controller.controller import ActionRecord, Controller
    from workbench.controller.state import GPUState, ModelState


@mypyc_attr(allow_interpreted_subclasses=True)   # policies are pluggable: subclasses may be plain Python
class Policy:
    # (ClassVars: a subclass, compiled or not, overrides them in its class body)
    name: ClassVar[str] = "policy"
    # What a request still queued (never sent) at its deadline becomes.
    expired_status: ClassVar[str] = DROPPED
    ctl: Controller                 # set by attach(), when the controller takes the policy

    def __init__(self) -> None:
        pass

    def attach(self, ctl: "Controller") -> None:
        self.ctl = ctl

    # -- topology
    def on_gpu_added(self, g: "GPUState") -> None:
        """A worker reported its GPUs (before any model is ready)."""

    def on_model_ready(self, m: "ModelState") -> None:
        """Every worker has loaded m from disk; requests for it are accepted from now on."""

    # -- requests
    def on_request(self, r: Request, now: int) -> None:
        """An admitted request (valid model, inputs and SLO); the policy queues it."""
        raise NotImplementedError

    def on_finalized(self, r: Request, prev_state: int, now: int) -> None:
        """r got its final status; `prev_state` is where it was (QUEUED or INFLIGHT)."""

    def queued_requests(self) -> list[Request]:
        """Requests waiting in the policy's queues, not yet final (for close())."""
        return []

    # -- results
    def on_infer_done(self, rec: "ActionRecord", result: Result | None, now: int) -> None:
        """After the controller handled an Infer result (or its watchdog): timelines re-anchored, estimates
        updated, requests finalised unless the policy took them back with `retry`."""

    def retry(self, rec: "ActionRecord", result: Result, now: int) -> list[Request]:
        """Requests of a failed Infer that the policy queues again (the rest end with status error)."""
        return []

    def on_load_done(self, rec: "ActionRecord", result: Result | None, now: int) -> None:
        """A LoadWeights result (None: the worker never answered)."""

    def on_evict_done(self, rec: "ActionRecord", ok: bool, now: int) -> None:
        pass

    def on_gpu_failed(self, g: "GPUState", now: int) -> None:
        """g is out of service: plan nothing more there and forget its placement (`state.unload` /
        `state.finish_load(.., False)` for what it held or was loading)."""

    def on_gpu_revived(self, g: "GPUState", now: int) -> None:
        """g is back in service (its placement, as its worker reported it, has been adopted)."""

    def adopt(self, m: "ModelState", g: "GPUState", now: int) -> None:
        """g's worker reports m's weights in g's cache, which the controller did not know: m is loaded there."""
        from workbench.controller import state
        state.begin_load(m, g)
        state.finish_load(m, g, True)

    def forget(self, m: "ModelState", g: "GPUState", now: int) -> None:
        """g's worker reports no weights of m, which the controller believed loaded there."""
        from workbench.controller import state
        state.unload(m, g)

    def summary(self) -> dict:
        return {}


def split_outputs(result: InferResult, n: int) -> list[tuple | None]:
    """One tuple of per-sample outputs per request of the batch (None when the worker returned none)."""
    outs = result.outputs
    if not outs:
        return [None] * n
    return [tuple(o[i] for o in outs) for i in range(n)]
