"""`RowWriter`: one writer's telemetry rows written straight into the recorder's memory (the controller's hot path).

Compiled with the simulation core (workbench/controller/compiled.py), the writes are mypyc's native
`librt.strings` byte-writer primitives: the controller passes a request's values to `write_request` and an
action's to `write_action` as native ints and floats, which land in the buffer as 8 little-endian bytes each with
no Python object made (no boxed int, no tuple, no Python frame of the recorder's). Rows from Python take
`write(row)`: a tuple of the table's values, converted one by one as struct would (an int, a bool or anything
with __index__ as int64; a float, an int or anything with __float__ as a double); a value that does not convert
leaves nothing written and `write` returns False, so the caller hands the row to the recorder's checking path,
which names it.
Where librt is missing (a pure-Python install, the GPU machine) the buffer is `workbench.telemetry.byte_writer`'s
(librt's API in Python) and a row is one struct call.

A full buffer goes to the recorder (`full`, under its lock), which keeps its rows as a block and starts the
writer afresh; readers take the whole rows written so far (`take`, under the recorder's lock). One writer at a
time (the controller writes under its own lock); the recorder only moves `start`, and takes only whole rows, so
a row being written is never split.
"""
from __future__ import annotations

import operator
import struct
from typing import Any, Callable

from workbench.controller import compiled as _compiled  # noqa: F401 - refuses a compiled build older than its sources

try:
    from librt.strings import BytesWriter, write_f64_le, write_i64_le
    NATIVE = True
except ImportError:     # no librt (it comes with mypy, which the compiled build needs): the same API in Python
    from workbench.telemetry.byte_writer import BytesWriter, write_f64_le, write_i64_le  # type: ignore
    NATIVE = False

REQUEST_LAYOUT = "q" * 15 + "d"    # the request row's columns (workbench.telemetry.schema): slo_factor a double
ACTION_LAYOUT = "q" * 23           # the action row's: all int64 (String columns as codes)


def _int(v: Any) -> int:
    if type(v) is int or type(v) is bool:
        return v
    if isinstance(v, float):        # as struct: no silent truncation
        raise TypeError(f"float {v!r} for an int column")
    return operator.index(v)


def _float(v: Any) -> float:
    if type(v) is float:
        return v
    if isinstance(v, (str, bytes, bytearray)):
        raise TypeError(f"{type(v).__name__} {v!r} for a float column")
    return float(v)


class RowWriter:
    """Rows of one table, written by one writer into a buffer of up to `rows` rows. `layout`: a struct code per
    column, "d" for a double, "q" for an int64 (8 bytes each)."""

    def __init__(self, layout: str, rows: int, full: Callable[["RowWriter"], None]) -> None:
        if not layout or set(layout) - {"d", "q"}:
            raise ValueError(f"RowWriter layout {layout!r}: one 'd' or 'q' per column")
        self.layout = layout
        self.floats = [c == "d" for c in layout]
        self.rowsize = 8 * len(layout)
        self.size = self.rowsize * max(1, rows)
        self.buf = BytesWriter()
        self.start = 0                  # bytes of `buf` the recorder has taken already
        self.full = full                # the recorder's: keep the rows (via `renew`), under its lock
        self.notify: Any = None         # called after each row (the recorder's `on_row` hook), or None
        # without librt a call per value costs ~0.15 us in Python: there a row is one struct call instead
        self.pack: Any = None if NATIVE else struct.Struct("<" + layout).pack

    def write(self, row: tuple) -> bool:
        """Write one row (all the table's values, in schema order). False where a value does not convert or the
        row has the wrong length (nothing written: the caller records it by the recorder's checking path)."""
        buf = self.buf
        at = len(buf)
        if len(row) != len(self.floats):
            return False
        if self.pack is not None:
            try:
                buf.write(self.pack(*row))
            except (struct.error, TypeError):
                return False
            self._written()
            return True
        try:
            for v, f in zip(row, self.floats):
                if f:
                    write_f64_le(buf, _float(v))
                else:
                    write_i64_le(buf, _int(v))
        except (TypeError, ValueError, OverflowError):
            buf.truncate(at)
            return False
        self._written()
        return True

    def write_request(self, request_id: int, model_id: int, model: int, worker: int, gpu: int, batch_size: int,
                      arrival: int, deadline: int, completion: int, slo: int, status: int, latency: int,
                      cold_start: bool, message: int, action_id: int, slo_factor: float) -> bool:
        """One request row from native values (REQUEST_LAYOUT; String columns as codes): no object is made.
        False (nothing written) only where a value does not convert, which the compiled build rules out."""
        if self.layout != REQUEST_LAYOUT:
            raise ValueError(f"write_request on a writer of layout {self.layout!r}")
        if self.pack is not None:
            return self.write((request_id, model_id, model, worker, gpu, batch_size, arrival, deadline, completion,
                               slo, status, latency, cold_start, message, action_id, slo_factor))
        buf = self.buf
        at = len(buf)
        try:
            write_i64_le(buf, request_id)
            write_i64_le(buf, model_id)
            write_i64_le(buf, model)
            write_i64_le(buf, worker)
            write_i64_le(buf, gpu)
            write_i64_le(buf, batch_size)
            write_i64_le(buf, arrival)
            write_i64_le(buf, deadline)
            write_i64_le(buf, completion)
            write_i64_le(buf, slo)
            write_i64_le(buf, status)
            write_i64_le(buf, latency)
            write_i64_le(buf, cold_start)
            write_i64_le(buf, message)
            write_i64_le(buf, action_id)
            write_f64_le(buf, slo_factor)
        except (TypeError, ValueError, OverflowError):
            buf.truncate(at)
            return False
        self._written()
        return True

    def write_action(self, action_id: int, worker: int, gpu: int, type: int, model_id: int, batch_size: int,
                     earliest: int, latest: int, sent: int, planned_begin: int, planned_end: int,
                     predicted_duration: int, completed: int, measured_begin: int, measured_end: int,
                     measured_duration: int, gpu_clock: int, status: int, status_name: int, gpu_clock_before: int,
                     requests_queued: int, copies_loaded: int, message: int) -> bool:
        """One action row from native values (ACTION_LAYOUT; String columns as codes), as `write_request`."""
        if self.layout != ACTION_LAYOUT:
            raise ValueError(f"write_action on a writer of layout {self.layout!r}")
        if self.pack is not None:
            return self.write((action_id, worker, gpu, type, model_id, batch_size, earliest, latest, sent,
                               planned_begin, planned_end, predicted_duration, completed, measured_begin,
                               measured_end, measured_duration, gpu_clock, status, status_name, gpu_clock_before,
                               requests_queued, copies_loaded, message))
        buf = self.buf
        at = len(buf)
        try:
            write_i64_le(buf, action_id)
            write_i64_le(buf, worker)
            write_i64_le(buf, gpu)
            write_i64_le(buf, type)
            write_i64_le(buf, model_id)
            write_i64_le(buf, batch_size)
            write_i64_le(buf, earliest)
            write_i64_le(buf, latest)
            write_i64_le(buf, sent)
            write_i64_le(buf, planned_begin)
            write_i64_le(buf, planned_end)
            write_i64_le(buf, predicted_duration)
            write_i64_le(buf, completed)
            write_i64_le(buf, measured_begin)
            write_i64_le(buf, measured_end)
            write_i64_le(buf, measured_duration)
            write_i64_le(buf, gpu_clock)
            write_i64_le(buf, status)
            write_i64_le(buf, status_name)
            write_i64_le(buf, gpu_clock_before)
            write_i64_le(buf, requests_queued)
            write_i64_le(buf, copies_loaded)
            write_i64_le(buf, message)
        except (TypeError, ValueError, OverflowError):
            buf.truncate(at)
            return False
        self._written()
        return True

    def _written(self) -> None:
        if len(self.buf) >= self.size:
            self.full(self)
        if self.notify is not None:
            self.notify()

    @property
    def waiting(self) -> int:
        """Whole rows written and not yet taken."""
        return (len(self.buf) - self.start) // self.rowsize

    def take(self) -> bytes | None:
        """The whole rows written since the last take (recorder, under its lock), or None."""
        end = self.start + self.waiting * self.rowsize
        if end == self.start:
            return None
        data = self.buf.getvalue()[self.start:end]
        self.start = end
        return data

    def renew(self) -> bytes | None:
        """`take`, then an empty buffer (the writer's own thread, via `full`, under the recorder's lock)."""
        data = self.take()
        self.buf.truncate(0)
        self.start = 0
        return data
