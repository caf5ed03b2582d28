"""The one contract between controller and worker: actions, their results, and status codes.

Mirrors Clockwork's `workerapi` (reference/clockwork.md §2). Actions and results are plain frozen
dataclasses of ints, strings, bytes and numpy arrays, so any transport (a function call, a pipe, a
socket) can carry them: `encode()` turns one into a dict of plain values, `decode()` turns it back.
All times are nanoseconds on the worker's clock.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

FOREVER = 2**63 - 1  # a `latest` that never expires


class ActionType(IntEnum):
    LOAD_MODEL_FROM_DISK = 0
    LOAD_WEIGHTS = 1
    INFER = 2
    EVICT_WEIGHTS = 3
    CLEAR_CACHE = 4
    GET_WORKER_STATE = 5


class Status(IntEnum):
    """Clockwork's worker status codes, same numbers and meanings (clockwork.md §2.2)."""
    SUCCESS = 0
    CANCELLED = 1
    RUNTIME_ERROR = 2
    SHUTTING_DOWN = 3
    UNKNOWN_MODEL = 10
    COULD_NOT_START_IN_TIME = 11
    INVALID_ACTION = 12
    INVALID_GPU = 13
    WEIGHTS_NOT_PRESENT = 20
    WEIGHTS_ALREADY_LOADED = 21
    WEIGHTS_IN_USE = 22
    WEIGHTS_CHANGED = 23
    INVALID_INPUT = 30
    INVALID_BATCH_SIZE = 31
    INVALID_MODEL_ID = 40
    INVALID_PATH = 41
    NETWORK_SEND_TOO_LATE = 45  # made by the controller, never by a worker
    LOAD_WEIGHTS_TOO_EARLY = 50
    LOAD_WEIGHTS_TOO_LATE = 51
    LOAD_WEIGHTS_UNKNOWN_MODEL = 52
    LOAD_WEIGHTS_INSUFFICIENT_CACHE = 53
    LOAD_WEIGHTS_CONCURRENT_MODIFICATION = 54
    EVICT_WEIGHTS_TOO_EARLY = 60
    EVICT_WEIGHTS_TOO_LATE = 61
    EVICT_WEIGHTS_UNKNOWN_MODEL = 62
    EVICT_WEIGHTS_NOT_IN_CACHE = 63
    COPY_INPUT_TOO_EARLY = 70
    COPY_INPUT_TOO_LATE = 71
    COPY_INPUT_UNKNOWN_MODEL = 72
    COPY_INPUT_INVALID_BATCH_SIZE = 73
    COPY_INPUT_HOST_ALLOC = 74
    COPY_INPUT_INVALID_INPUT = 75
    COPY_INPUT_IO_POOL_EXHAUSTED = 76
    COPY_INPUT_BAD_SIZES = 77
    COPY_INPUT_BAD_DECOMPRESS = 78
    EXEC_TOO_EARLY = 80
    EXEC_TOO_LATE = 81
    EXEC_WEIGHTS_MISSING = 82
    EXEC_WORKSPACE_POOL_EXHAUSTED = 83
    EXEC_CONCURRENT_WEIGHTS_MODIFICATION = 84
    COPY_OUTPUT_TOO_EARLY = 90
    COPY_OUTPUT_TOO_LATE = 91
    COPY_OUTPUT_HOST_ALLOC = 92


@dataclass(frozen=True)
class Timing:
    """Worker-clock begin/end of a step; `duration` is the device-measured time (CUDA events on a GPU)."""
    begin: int = 0
    end: int = 0
    duration: int = 0


def make_timing(begin: int, end: int, duration: int) -> Timing:
    """Timing(begin, end, duration) without the frozen dataclass's per-field __init__ calls (workers' hot paths;
    an equal object)."""
    t = object.__new__(Timing)
    object.__setattr__(t, "__dict__", {"begin": begin, "end": end, "duration": duration})
    return t


# ----------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Action:
    type: ClassVar[ActionType]
    id: int
    earliest: int = 0
    latest: int = FOREVER


@dataclass(frozen=True)
class LoadModelFromDisk(Action):
    """Load an artifact directory into host memory as `copies` instances with ids model_id..model_id+copies-1."""
    type: ClassVar[ActionType] = ActionType.LOAD_MODEL_FROM_DISK
    model_id: int = 0
    path: str = ""
    copies: int = 1
    max_batch_size: int = 32
    max_exec_duration: int = 1_000_000_000


@dataclass(frozen=True)
class LoadWeights(Action):
    type: ClassVar[ActionType] = ActionType.LOAD_WEIGHTS
    model_id: int = 0
    gpu: int = 0
    expected_duration: int = 0


@dataclass(frozen=True)
class EvictWeights(Action):
    type: ClassVar[ActionType] = ActionType.EVICT_WEIGHTS
    model_id: int = 0
    gpu: int = 0


@dataclass(frozen=True)
class Infer(Action):
    """Run `batch_size` inputs (concatenated along axis 0 of each input; None = worker generates them)."""
    type: ClassVar[ActionType] = ActionType.INFER
    model_id: int = 0
    gpu: int = 0
    batch_size: int = 1
    inputs: tuple[np.ndarray, ...] | None = None
    expected_duration: int = 0


@dataclass(frozen=True)
class ClearCache(Action):
    type: ClassVar[ActionType] = ActionType.CLEAR_CACHE


@dataclass(frozen=True)
class GetWorkerState(Action):
    type: ClassVar[ActionType] = ActionType.GET_WORKER_STATE


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Result:
    """Every result: which action, its status and (on failure) a message naming the problem."""
    id: int
    action_type: ActionType
    status: Status = Status.SUCCESS
    message: str = ""
    received: int = 0   # worker clock when the action arrived
    sent: int = 0       # worker clock when the result left

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


@dataclass(frozen=True)
class ErrorResult(Result):
    timing: Timing = Timing()


@dataclass(frozen=True)
class LoadModelFromDiskResult(Result):
    model_ids: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    input_bytes: int = 0            # per sample, all inputs together
    output_bytes: int = 0           # per sample
    weights_bytes: int = 0
    num_pages: int = 0
    page_size: int = 0
    weights_load_ns: int = 0        # profiled (measurements.json), 0 if absent
    exec_ns: tuple[int, ...] = ()   # profiled per batch size, 0 if absent
    timing: Timing = Timing()


@dataclass(frozen=True)
class LoadWeightsResult(Result):
    timing: Timing = Timing()


@dataclass(frozen=True)
class EvictWeightsResult(Result):
    timing: Timing = Timing()


@dataclass(frozen=True)
class InferResult(Result):
    gpu: int = 0
    batch_size: int = 0
    copy_input: Timing = Timing()
    exec: Timing = Timing()
    copy_output: Timing = Timing()
    gpu_clock_before: int = 0       # SM clock, MHz, read before exec
    gpu_clock: int = 0              # SM clock, MHz, read after exec
    outputs: tuple[np.ndarray, ...] | None = None


@dataclass(frozen=True)
class ClearCacheResult(Result):
    pass


@dataclass(frozen=True)
class GetWorkerStateResult(Result):
    state: dict = field(default_factory=dict)


RESULT_FOR = {
    ActionType.LOAD_MODEL_FROM_DISK: LoadModelFromDiskResult,
    ActionType.LOAD_WEIGHTS: LoadWeightsResult,
    ActionType.INFER: InferResult,
    ActionType.EVICT_WEIGHTS: EvictWeightsResult,
    ActionType.CLEAR_CACHE: ClearCacheResult,
    ActionType.GET_WORKER_STATE: GetWorkerStateResult,
}


def id_problem(aid: Any) -> str | None:
    """Why `aid` cannot be an action's id, or None: ids are ints >= 0 (not bools), the key every result is matched
    to its action by. A worker answers an action with such an id INVALID_ACTION without tracking it: it may not
    hash (a list) or may equal the id of an action in flight (1.0 and 1)."""
    if type(aid) is not int or aid < 0:
        return f"action id must be an int >= 0, got {aid!r}"
    return None


def error(action: Action, status: Status, message: str, received: int = 0, sent: int = 0,
          timing: Timing = Timing()) -> ErrorResult:
    """The failure result for `action`: always the same shape, whatever failed."""
    return ErrorResult(id=action.id, action_type=action.type, status=Status(status), message=message,
                       received=received, sent=sent, timing=timing)


# --------------------------------------------------------------------------------------- serialization
_CLASSES = {c.__name__: c for c in (LoadModelFromDisk, LoadWeights, EvictWeights, Infer, ClearCache,
                                    GetWorkerState, ErrorResult, LoadModelFromDiskResult, LoadWeightsResult,
                                    EvictWeightsResult, InferResult, ClearCacheResult, GetWorkerStateResult,
                                    Timing)}


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"__nd__": v.dtype.str, "shape": list(v.shape), "data": np.ascontiguousarray(v).tobytes()}
    if dataclasses.is_dataclass(v):
        return encode(v)
    if isinstance(v, IntEnum):
        return int(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def encode(obj: Action | Result | Timing) -> dict:
    """A dict of plain values (ints, str, bytes, lists, dicts) that any transport can carry."""
    d = {"__kind__": type(obj).__name__}
    for f in dataclasses.fields(obj):
        d[f.name] = _plain(getattr(obj, f.name))
    return d


def _unplain(v: Any) -> Any:
    if isinstance(v, dict) and "__nd__" in v:
        return np.frombuffer(v["data"], dtype=np.dtype(v["__nd__"])).reshape(v["shape"]).copy()
    if isinstance(v, dict) and "__kind__" in v:
        return decode(v)
    if isinstance(v, list):
        return tuple(_unplain(x) for x in v)
    return v


def decode(d: dict) -> Action | Result | Timing:
    """Inverse of `encode`; raises ValueError naming the problem for anything malformed."""
    if not isinstance(d, dict) or d.get("__kind__") not in _CLASSES:
        raise ValueError(f"not an encoded action or result: kind {d.get('__kind__') if isinstance(d, dict) else type(d).__name__!r}")
    cls = _CLASSES[d["__kind__"]]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names - {"__kind__"}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kw = {k: _unplain(v) for k, v in d.items() if k != "__kind__"}
    if "status" in kw:
        kw["status"] = Status(kw["status"])
    if "action_type" in kw:
        kw["action_type"] = ActionType(kw["action_type"])
    if "state" in kw and isinstance(kw["state"], tuple):
        kw["state"] = dict(kw["state"])
    return cls(**kw)
