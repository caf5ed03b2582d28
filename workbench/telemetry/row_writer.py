"""`RowWriter`: one writer's telemetry rows packed straight into the recorder's memory (the controller's hot path).

`write(row)` packs a row's values into the current buffer with one C call (`_rowpack.pack`, _rowpack.c, built
with the compiled core; else `struct.Struct.pack_into`, the same values at ~4x the cost): no Python frame of
the recorder's, no tuple kept, no second pass. A full buffer goes to the recorder (`full`, under its
lock), which keeps it as a block of packed rows and hands a new one. The recorder also takes the rows written
so far (`take`, under its lock) whenever it is read, so readers see every row at once.

One writer at a time (the controller writes under its own lock); the recorder only moves `start`. A row written
while a reader takes is either in the view taken or after `start`: `used` moves only once the row is packed.

Compiled with the simulation core (workbench/controller/compiled.py), so the controller's calls are native.
"""
from __future__ import annotations

import struct
from typing import Any, Callable

from workbench.controller import compiled as _compiled  # noqa: F401 - refuses a compiled build older than its sources

try:
    from workbench.telemetry._rowpack import pack as _c_pack
except ImportError:     # not built (pure Python): struct packs the same values
    _c_pack = None


class RowWriter:
    """Rows of one table, written by one writer into buffers of `rows` rows. `layout`: a struct code per column,
    "d" for a double, "q" for an int64 (8 bytes each)."""

    def __init__(self, layout: str, rows: int, full: Callable[["RowWriter"], None]) -> None:
        if not layout or set(layout) - {"d", "q"}:
            raise ValueError(f"RowWriter layout {layout!r}: one 'd' or 'q' per column")
        self.layout = layout.encode()
        self.struct = struct.Struct("@" + layout)
        self.c_pack: Any = _c_pack
        self.rowsize = 8 * len(layout)
        self.size = self.rowsize * max(1, rows)
        self.buf = bytearray(self.size)
        self.used = 0                   # bytes of `buf` holding rows
        self.start = 0                  # bytes of `buf` the recorder has taken already
        self.full = full                # the recorder's: keep `buf` (via `renew`), under its lock
        self.notify: Any = None         # called after each row (the recorder's `on_row` hook), or None

    def write(self, row: tuple) -> bool:
        """Pack one row (all the table's values, in schema order). False where a value does not pack (nothing
        written: the caller records the row by the recorder's checking path, which names the value)."""
        c_pack = self.c_pack
        if c_pack is not None:
            if not c_pack(self.buf, self.used, row, self.layout):
                return False
        else:
            try:
                self.struct.pack_into(self.buf, self.used, *row)
            except Exception:  # noqa: BLE001 - struct.error, TypeError, OverflowError: all mean "check it slowly"
                return False
        self.used += self.rowsize
        if self.used >= self.size:
            self.full(self)
        if self.notify is not None:
            self.notify()
        return True

    @property
    def waiting(self) -> int:
        """Rows written and not yet taken."""
        return (self.used - self.start) // self.rowsize

    def take(self) -> memoryview | None:
        """The rows written since the last take (recorder, under its lock), or None."""
        used = self.used
        if used == self.start:
            return None
        view = memoryview(self.buf)[self.start:used]
        self.start = used
        return view

    def renew(self) -> memoryview | None:
        """`take`, then a fresh buffer (recorder, under its lock, when the buffer is full)."""
        view = self.take()
        self.buf = bytearray(self.size)
        self.used = self.start = 0
        return view
