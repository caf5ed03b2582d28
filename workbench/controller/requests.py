"""Requests, their final statuses and the outcome a client receives.

Every request ends with exactly one final status (the controller finalises it once and only once):

| status    | meaning |
|-----------|---------|
| success   | executed and the result was known no later than the deadline |
| timeout   | admitted and (possibly) executing, but the deadline passed before its result was known |
| dropped   | the controller could not schedule it to finish by its deadline (told as soon as that is known, at
|           | the latest when the deadline passes; Clockwork's INFER5 dropped silently, we never do) |
| rejected  | bad input: unknown model, wrong input size, a bad SLO, or an SLO shorter than the model's batch-1
|           | exec estimate plus the controller's result buffer (no batch could ever meet it) |
| error     | the worker returned an error for its action (or stopped answering) |
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Final, NamedTuple

if TYPE_CHECKING:
    from workbench.controller.state import GPUState, ModelState

# (Final: the compiled core inlines them rather than reading the module's namespace)
SUCCESS: Final = "success"
TIMEOUT: Final = "timeout"
DROPPED: Final = "dropped"
REJECTED: Final = "rejected"
ERROR: Final = "error"
STATUSES: Final = (SUCCESS, TIMEOUT, DROPPED, REJECTED, ERROR)

# Request.state: where the request is in its life (the final status is separate)
QUEUED: Final = 0      # waiting in a model queue
INFLIGHT: Final = 1    # part of an Infer action that has been sent
DONE: Final = 2        # finalised (status set, callback queued)


class RequestOutcome(NamedTuple):
    """What the client's callback receives, exactly once, no later than the request's deadline (an immutable
    record; a NamedTuple because the controller builds one per request)."""
    request_id: int
    model_id: int
    status: str
    arrival: int
    completion: int
    latency: int
    deadline: int
    outputs: tuple | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


_tuple_new: Final = tuple.__new__


class Request:
    """The controller's record of one request (mutable, owned by the controller under its lock)."""
    __slots__ = ("id", "model", "arrival", "deadline", "exec_deadline", "slo", "slo_factor", "inputs",
                 "callback", "state", "status", "message", "completion", "outputs", "gpu", "batch_size",
                 "action_id", "cold", "lw_size", "exec_size", "seq", "skipped")

    def __init__(self, rid: int, model: ModelState | None, arrival: int, slo: int, slo_factor: float, inputs: Any,
                 callback: Callable[[RequestOutcome], Any] | None, buffer: int):
        self.id = rid
        self.model = model                     # None if the model is unknown (a rejected request)
        self.arrival = arrival
        self.slo = slo
        self.slo_factor = slo_factor
        self.deadline = arrival + slo          # the client's deadline
        self.exec_deadline = self.deadline - buffer   # exec must end by this to be reported in time
        self.inputs: Any = inputs              # what the client gave (checked: a tuple of arrays) or None
        self.callback = callback
        self.state = QUEUED
        self.status: str | None = None
        self.message = ""
        self.completion = 0
        self.outputs: tuple | None = None
        self.gpu: GPUState | None = None       # the GPU it ran on
        self.batch_size = 0
        self.action_id = -1
        self.cold = False                      # no copy of the model was loaded when it arrived
        self.lw_size = 0                       # outstanding load-weights demand (LoadTracker, integer ns)
        self.exec_size = 0                     # outstanding exec demand (LoadTracker, integer ns)
        self.skipped = False

    def outcome(self) -> RequestOutcome:
        m = self.model
        return _tuple_new(RequestOutcome, (self.id, m.id if m is not None else -1, self.status, self.arrival,
                                           self.completion, self.completion - self.arrival, self.deadline,
                                           self.outputs, self.message))

    def __repr__(self) -> str:
        return (f"Request({self.id}, model={getattr(self.model, 'id', None)}, arrival={self.arrival}, "
                f"deadline={self.deadline}, state={self.state}, status={self.status})")
