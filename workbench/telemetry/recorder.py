"""`Recorder`: one row per request and per action, cheap on the controller's hot path.

Three ways to add a row (all thread-safe; each keeps its rows in call order):

- Row writers, for the controller: `w = recorder.row_writer("request")` (or "action") gives a `RowWriter`
  (workbench/telemetry/row_writer.py, compiled with the simulation core) for one writer at a time: `w.write(values)`
  takes the same tuple as `add_request_row`, and `w.write_request(...)` / `w.write_action(...)` a row's values as
  native arguments (compiled, no Python object is made for them); either writes the row's bytes straight into a
  buffer of the recorder's, which keeps full buffers as blocks of packed rows and takes the whole rows of a partly
  filled one whenever it is read. No recorder code runs per row. A row with a value that does not convert is not written
  (False); the writer's caller then hands it to `add_*_row`, which records it in its place and names the bad
  value. A subclass that hooks the row methods gets no writers (its hooks must see every row).
- Positional tuples: `add_request_row(values)` / `add_action_row(values)`, where `values`
  is a tuple of *every* column in schema order (`REQUEST_FIELDS` / `ACTION_FIELDS`, i.e. `REQUEST_COLUMNS` /
  `ACTION_COLUMNS` in `workbench.telemetry.schema`, optional columns included: 16 request values, 23 action
  values), every value a number: Int64 columns an int, Float64 a float (or int), Boolean a bool (or 0/1), and
  String columns a *code* from the recorder's string table, `recorder.strings[s]` (a dict: a few shared strings,
  such as statuses and model names, keep one code for the whole run). The call checks the length (a wrong one
  raises `TelemetryError` at once, recording nothing) and appends the tuple to a list: one C call, no lock.
  Every `stage_rows` rows the adding thread packs the waiting tuples into bytes with one precompiled
  `struct.Struct` (8 bytes a column) in one C loop. A row that does not pack takes a slow path: str values in
  String columns are encoded there (correct, just slower); any other value of the wrong type becomes null and
  is reported as a `TelemetryError` naming the column and the value, raised by the next `flush()` /
  `requests()` / `actions()` / `write()` / `close()` (so the caller's own work is never interrupted by
  telemetry). None is a null in any column. Booleans are recorded as 0/1, so an int other than 0/1 in a
  Boolean column, or a code not in the string table, is found (and named) when the frames are built.
- Keyword path, for everyone else: `add_request(**row)` / `add_action(**row)` take strings as strings, fill in
  the defaults of optional columns and check the names at once (an unknown or missing required column raises
  `TelemetryError` and records nothing); values of the wrong type are reported as above. A subclass that
  overrides `add_request` / `add_action` (e.g. to be notified of each row) also sees the rows given
  positionally: they are routed through its override, codes turned back into strings.

`on_row`, if set, is called after every row whichever way it came (e.g. to poke a live view).

Where the time goes (measured by `python -m bench.telemetry_overhead`, bench/results/telemetry_overhead.md;
section (c) times each call inside the simulation): inside a simulation the recorder's code and data are cold,
and in this VM every first touch of a 4 KiB page costs ~1-3 us, so what counts is the code a row runs, the
memory it touches and the Python objects it keeps. Measured and rejected: a second thread (the conversion holds
the GIL; it only moves the work and the freed objects to the other core); holding every row as Python objects
until read (nothing converted in the run, but the kept tuples and ints cost ~3,000 page faults a run and 2-3x
the memory); staging Python values into `array` columns every 256 rows and sealing polars frames every 16,384
during the run (the previous design: ~1.2 us a call inside the run, though 0.5 us on warm caches: cold polars
code and ~2,000 page faults a run); packing each row into bytes as it comes (~0.6-0.7 us a call inside the
run, cold code every time: no better than packing in batches; a growing bytearray of a whole chunk also
faulted every page anew, and `mmap.write` per row is slower than `bytearray +=`); packing every 4 or 16 rows
(a fixed cost per batch of a few us). What did win: writing each row as it comes *from compiled code, without
making Python objects* (the row writers): every design above paid for a tuple of boxed values and for converting
each value back (struct's generic item path, ~140 instructions a value); the compiled controller hands a
request's native values to the compiled writer, whose writes are mypyc's native byte-writer primitives. So:

0. Row writers write each row into a buffer of `_WRITER_ROWS` rows; full buffers become blocks as in 1.
1. The tuples wait in `rows` (at most `stage_rows`, default 256: bounded Python objects); then the adding
   thread packs them, in one C loop (`b"".join(starmap(pack, rows))`), into one more block of bytes: ~0.6 us
   a call inside the simulation, most of it reading tuples that are no longer in the CPU's caches and storing
   the bytes in fresh memory (copying them on into anonymous memory in huge pages measured the same).
2. Frames are built only when someone reads (`requests()` / `actions()` / `flush()` / `write()`, the spill
   thread, a spilling `close()`): the rows since the last read become frames of about `chunk_rows` rows in a
   few vectorized steps (the blocks read in place and transposed once, 256 rows at a time, into the frame's
   memory; numeric columns taken by polars without a further copy; String columns gathered from the string
   table by code; Boolean values and String codes range-checked, a bad one named). Packed rows are as compact
   as the frames (8 bytes a value), so waiting costs no memory; the blocks read are let go.

The string table interns the first `StringCodes.CAP` distinct strings for good. After that a string not yet in
it gets a one-shot code, held only until its row is sealed, so a run whose messages are all different (e.g.
"result arrived 1.234 ms after the deadline") keeps only a bounded table.

With `spill_dir`, the sealed frames are also written to Parquet part files (`requests.part-00000.parquet`, ...)
every `spill_rows` rows or `flush_interval_s` seconds by a background thread (the only one; without
`spill_dir` there is none), each written to a temporary name and renamed, so a run that is killed keeps
everything up to the last flush, readable. `close()` writes the rest and consolidates the parts into
`requests.parquet` / `actions.parquet`. `read_telemetry(dir)` reads either layout.
"""
from __future__ import annotations

import itertools
import mmap
import os
import struct
import threading
import time
from itertools import starmap
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import polars as pl

from workbench.telemetry.row_writer import RowWriter
from workbench.telemetry.schema import ACTION_COLUMNS, REQUEST_COLUMNS, REQUIRED, Column

REQUESTS_FILE = "requests.parquet"
ACTIONS_FILE = "actions.parquet"
REQUEST_FIELDS: tuple[str, ...] = tuple(c.name for c in REQUEST_COLUMNS)
"""The order of the values `Recorder.add_request_row` takes (16 columns)."""
ACTION_FIELDS: tuple[str, ...] = tuple(c.name for c in ACTION_COLUMNS)
"""The order of the values `Recorder.add_action_row` takes (23 columns)."""
_REQUEST_WIDTH, _ACTION_WIDTH = len(REQUEST_FIELDS), len(ACTION_FIELDS)

_INT, _FLOAT, _BOOL, _STR = "q", "d", "?", "s"   # how a column travels: its struct code ("?": 'q' holding 0/1,
#                                                  "s": 'q' holding a string code)
_KINDS = {pl.Int64: _INT, pl.Float64: _FLOAT, pl.Boolean: _BOOL, pl.Utf8: _STR}
_PACK_Q, _PACK_D = struct.Struct("q").pack, struct.Struct("d").pack
_WRITER_ROWS = 1024    # rows per RowWriter buffer (128 KiB of request rows)
_HUGE = 2 << 20        # a huge page
_BLOCK = 256           # rows transposed at a time
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)   # private: huge pages allowed
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def _empty_int64(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised int64 array; a big one in memory advised to use huge pages (in a VM every 4 KiB page
    fault costs microseconds, and the frames' memory is touched for the first time here)."""
    nbytes = shape[0] * shape[1] * 8
    if nbytes < _HUGE or _MADV_HUGEPAGE is None:
        return np.empty(shape, dtype=np.int64)
    mm = mmap.mmap(-1, -(-nbytes // _HUGE) * _HUGE, flags=_MAP_FLAGS)
    mm.madvise(_MADV_HUGEPAGE)
    return np.frombuffer(mm, dtype=np.int64, count=shape[0] * shape[1]).reshape(shape)   # keeps `mm` alive


class TelemetryError(ValueError):
    """A row that does not fit the schema (unknown/missing column, wrong number of values, value of the wrong
    type)."""


class StringCodes(dict):
    """The positional rows' string table: `codes[s]` is the int that stands for string `s` in a String column.

    A dict, so that a hit costs one C lookup on the hot path; a miss (`__missing__`) interns the string, or,
    once `CAP` strings are interned, hands out a one-shot code (>= `ONE_SHOT`) for a single row, released when
    that row is sealed. A value that is not a str gets a one-shot code too; sealing reports it (the column's
    value becomes null)."""

    CAP = 16_384
    ONE_SHOT = 1 << 48

    def __init__(self) -> None:
        super().__init__()
        self.values: list[str] = []            # code -> string (interned codes only)
        self.pending: dict[int, Any] = {}      # one-shot code - ONE_SHOT -> value, until its row is sealed
        self._next = itertools.count()         # atomic: one-shot numbers from any thread
        self._lock = threading.Lock()
        self._series: pl.Series | None = None  # `values` as a polars column (rebuilt when it grew)

    def __missing__(self, key: Any) -> int:
        code = self.stable(key) if type(key) is str else None
        return code if code is not None else self.one_shot(key)

    def one_shot(self, value: Any) -> int:
        k = next(self._next)
        self.pending[k] = value
        return self.ONE_SHOT + k

    def stable(self, s: str) -> int | None:
        """The code of `s` for the whole run (interning it), or None once the table is full and `s` is not in it
        (a one-shot code is for one row only: never keep one)."""
        with self._lock:
            code = dict.get(self, s)
            if code is None and len(self.values) < self.CAP:
                code = len(self.values)
                self.values.append(s)
                dict.__setitem__(self, s, code)
            return code

    def code(self, value: Any) -> int:
        """`self[value]`, for any value (an unhashable one gets a one-shot code)."""
        try:
            return self[value]
        except TypeError:
            return self.one_shot(value)

    def value(self, code: Any, release: bool = True) -> Any:
        """The string a code stands for (a one-shot's value is released unless `release` is False); anything
        that is not a valid code comes back unchanged."""
        if type(code) is int:
            if 0 <= code < len(self.values):
                return self.values[code]
            if code >= self.ONE_SHOT and code - self.ONE_SHOT in self.pending:
                k = code - self.ONE_SHOT
                return self.pending.pop(k) if release else self.pending[k]
        return code

    def table(self) -> pl.Series:
        """The interned strings as one polars column (index = code). Called under the recorder's lock."""
        n = len(self.values)
        if self._series is None or self._series.len() != n:
            self._series = pl.Series("s", self.values[:n], dtype=pl.Utf8)
        return self._series

    def decode(self, name: str, codes: np.ndarray, table: str) -> tuple[pl.Series, TelemetryError | None]:
        """A String column from its codes (vectorized; releases the one-shot codes), or (with nulls where a code
        is invalid or a one-shot value is not a str, an error naming the first)."""
        strings = self.table()
        n = strings.len()
        if n and codes.min() >= 0 and codes.max() < n:   # the usual case: interned codes only
            return strings[pl.Series(codes.astype(np.uint32))].alias(name), None
        one = codes >= self.ONE_SHOT
        bad = (codes < 0) | ((codes >= n) & ~one)
        special = one | bad
        err, first_bad = None, None
        if n:
            s = strings[pl.Series(np.where(special, 0, codes).astype(np.uint32))].alias(name)
        else:
            s = pl.Series(name, [None] * len(codes), dtype=pl.Utf8)
        if one.any():
            where = np.flatnonzero(one)
            vals = [self.pending.pop(int(k) - self.ONE_SHOT, _NO_CODE) for k in codes[where]]
            for v in vals:
                if type(v) is not str and v is not None:   # None: a null, as in the keyword path
                    first_bad = v
                    break
            s = s.scatter(where, pl.Series([v if type(v) is str else None for v in vals], dtype=pl.Utf8))
        if bad.any():
            if first_bad is None:
                first_bad = _BadCode(int(codes[np.flatnonzero(bad)[0]]))
            s = s.scatter(np.flatnonzero(bad), pl.Series([None] * int(bad.sum()), dtype=pl.Utf8))
        if first_bad is not None:
            if isinstance(first_bad, _BadCode):
                what = (f"code {first_bad.code} is not in the recorder's string table (codes come from "
                        f"recorder.strings[s])")
            elif first_bad is _NO_CODE:
                what = "a one-shot string code was used twice or never handed out (use recorder.strings[s])"
            else:
                what = f"value {first_bad!r} ({type(first_bad).__name__}) is not String; pass str values"
            err = TelemetryError(f"telemetry {table} column {name!r}: {what}")
        return s, err


class _BadCode:
    def __init__(self, code: int):
        self.code = code


_NO_CODE: Any = object()


class _Table:
    """One row kind: the rows waiting as tuples (`rows`, appended to by the hot path without a lock), the packed
    rows (`blocks`) and the sealed frames. Everything but `rows`' appends is guarded by the recorder's lock."""

    def __init__(self, name: str, columns: tuple[Column, ...], chunk_rows: int = 65_536, stage_rows: int = 256):
        self.name = name
        self.columns = columns
        self.names = tuple(c.name for c in columns)
        self.width = len(columns)
        self.template = {c.name: c.default for c in columns}    # in column order: {**template, **row} keeps it
        self.keys = frozenset(self.names)
        self.required = frozenset(c.name for c in columns if c.default is REQUIRED)
        self.schema = {c.name: c.dtype for c in columns}
        self.kinds = tuple(_KINDS[c.dtype] for c in columns)
        self.str_idx = tuple(i for i, k in enumerate(self.kinds) if k is _STR)
        self.layout = "".join("d" if k is _FLOAT else "q" for k in self.kinds)   # a struct code per column
        self.packer = struct.Struct("@" + self.layout)
        self.rowsize = self.packer.size
        assert self.rowsize == 8 * self.width   # every column 8 bytes: the rows read back as an int64 matrix
        self.chunk_rows = max(1, chunk_rows)
        self.rows: list[tuple] = []       # the newest rows, as the callers' tuples: only ever appended to (one C
        #                                   call each) and cut from the front when packed, never replaced
        self.stage_limit = max(1, stage_rows)   # len(rows) at which the adding thread packs them
        self.writers: list[RowWriter] = []  # writers packing rows straight into buffers (`Recorder.row_writer`)
        self.blocks: list[bytes] = []       # packed rows not yet sealed, oldest first
        self.packed = 0                     # rows in `blocks`
        self.frames: list[pl.DataFrame] = []      # every sealed frame, in order
        self.frame_rows = 0
        self.unwritten: list[pl.DataFrame] = []   # sealed frames not yet in a part file (spill only)
        self.unwritten_rows = 0
        self.parts: list[Path] = []
        self.spill = False                # frames also go to `unwritten` (set by a spilling recorder)

    @property
    def pending(self) -> int:
        """Rows not yet sealed (caller holds the lock)."""
        return self.packed + len(self.rows) + sum(w.waiting for w in self.writers)

    def bad_row(self, row: dict) -> TelemetryError:
        unknown = sorted(set(row) - self.keys)
        missing = sorted(self.required - set(row))
        parts = []
        if unknown:
            parts.append(f"unknown column(s) {unknown}")
        if missing:
            parts.append(f"missing required column(s) {missing}")
        return TelemetryError(f"telemetry {self.name} row: {'; '.join(parts)} (columns: {list(self.names)})")

    def as_tuple(self, values: Any) -> tuple:
        """`values` as a tuple of the right length, or a TelemetryError naming what is wrong."""
        try:
            t = tuple(values)
        except TypeError:
            t = None
        if t is None or len(t) != self.width:
            what = f"a {type(values).__name__}" if t is None else f"{len(t)} values"
            raise TelemetryError(f"telemetry {self.name} row: got {what}; add_{self.name}_row takes a tuple of all "
                                 f"{self.width} columns in schema order {list(self.names)} (nothing recorded)")
        return t

    # ------------------------------------------------------- packing and sealing (caller holds the lock)
    def pack(self, strings: StringCodes) -> TelemetryError | None:
        """Pack the rows waiting in `rows` into one more block of bytes: all of them in one C loop
        (`b"".join(starmap(pack, rows))`: inside a simulation no dearer than packing each row as it comes, whose
        code is cold every time). The list is cut from the front: other threads only append to it, so the rows
        after the cut stay, in order. A row that does not pack takes the slow path (`fix`). The writers' rows
        come first: a writer's row that did not pack is added as a tuple and packed at once (`Recorder`), so
        every writer's rows keep their order."""
        for w in self.writers:
            self.add_view(w.take())
        rows = self.rows
        n = len(rows)
        if not n:
            return None
        batch = rows[:n]
        del rows[:n]
        pack = self.packer.pack
        try:
            self.blocks.append(b"".join(starmap(pack, batch)))
            self.packed += n
            return None
        except (struct.error, TypeError):
            pass
        err, good = None, []
        for v in batch:   # row by row, in order, around the ones that do not pack
            try:
                good.append(pack(*v))
                continue
            except (struct.error, TypeError):
                pass
            vals, wrong = self.fix(v, strings)
            if not wrong:
                good.append(pack(*vals))
                continue
            self.add_block(good)
            good = []
            e = self.seal_packed(strings)   # the rows before this one first: order kept
            df, e2 = self.to_frame(vals)
            self.add_frame(df)
            err = err or e or e2
        self.add_block(good)
        return err

    def add_view(self, rows: bytes | None) -> None:
        """Whole packed rows from a writer."""
        if rows is not None:
            self.blocks.append(rows)
            self.packed += len(rows) // self.rowsize

    def add_block(self, packed_rows: list[bytes]) -> None:
        if packed_rows:
            self.blocks.append(b"".join(packed_rows))
            self.packed += len(packed_rows)

    def fix(self, values: tuple, strings: StringCodes) -> tuple[list, bool]:
        """A row that did not pack: str values in String columns encoded (an int there is a code; any other
        value gets a one-shot code, named when sealed), numeric values checked. Returns (values, whether a
        numeric value is of the wrong type); in that case String columns hold strings again (one-shot codes
        released) for `to_frame`, which names the bad value."""
        vals = list(values)
        wrong = False
        for i, kind in enumerate(self.kinds):
            if kind is not _STR:
                ok, vals[i] = _packs(kind, vals[i])
                wrong = wrong or not ok
        for i in self.str_idx:
            v = vals[i]
            if wrong:
                vals[i] = strings.value(v)
            elif type(v) is not int:
                vals[i] = strings.code(v)
        return vals, wrong

    def seal(self, strings: StringCodes) -> TelemetryError | None:
        """Every row recorded so far into the frames (see `seal_packed`)."""
        err = self.pack(strings)
        return self.seal_packed(strings) or err

    def seal_packed(self, strings: StringCodes) -> TelemetryError | None:
        """Every packed row into frames of about `chunk_rows` rows (bounding the memory a read needs); the
        blocks are let go."""
        blocks, err, group, n = self.blocks, None, [], 0
        self.blocks, self.packed = [], 0
        for blk in blocks:
            group.append(blk)
            n += len(blk) // self.rowsize
            if n >= self.chunk_rows:
                err = self.frame_of(group, n, strings) or err
                group, n = [], 0
        if n:
            err = self.frame_of(group, n, strings) or err
        return err

    def frame_of(self, blocks: list[bytes], n: int, strings: StringCodes) -> TelemetryError | None:
        """The `n` rows packed in `blocks` as one frame: read in place as int64 matrices and transposed once
        into the frame's memory, so each column is one contiguous array (numeric columns taken by polars as
        they are, Float64 reinterpreted, Boolean and String codes checked, String columns gathered from the
        string table)."""
        k = self.width
        cols = _empty_int64((k, n))
        j = 0
        for blk in blocks:
            view = np.frombuffer(blk, dtype=np.int64).reshape(-1, k)
            rows = len(view)
            for r in range(0, rows, _BLOCK):   # in blocks that stay in the cache: 3x faster than at once
                cols[:, j + r:j + min(rows, r + _BLOCK)] = view[r:r + _BLOCK].T
            j += rows
        err, out = None, []
        for c, kind, x in zip(self.columns, self.kinds, cols):
            e = None
            if kind is _INT:
                s = pl.Series(c.name, x)
            elif kind is _FLOAT:
                s = pl.Series(c.name, x.view(np.float64))
            elif kind is _BOOL:
                s, e = self._bools(c.name, x)
            else:
                s, e = strings.decode(c.name, x, self.name)
            out.append(s)
            err = err or e
        self.add_frame(pl.DataFrame(out))
        return err

    def _bools(self, name: str, x: np.ndarray) -> tuple[pl.Series, TelemetryError | None]:
        s = pl.Series(name, x != 0)
        bad = (x >> 1) != 0   # neither 0 nor 1
        if not bad.any():
            return s, None
        where = np.flatnonzero(bad)
        err = TelemetryError(f"telemetry {self.name} column {name!r}: value {int(x[where[0]])} (int) is not "
                             f"Boolean; pass True/False")
        return s.scatter(where, pl.Series([None] * len(where), dtype=pl.Boolean)), err

    def add_frame(self, df: pl.DataFrame) -> None:
        self.frames.append(df)
        self.frame_rows += df.height
        if self.spill:
            self.unwritten.append(df)
            self.unwritten_rows += df.height

    def series(self, c: Column, col: list) -> tuple[pl.Series, TelemetryError | None]:
        """A column from Python values, or (the values of the wrong type as nulls, an error naming the first)."""
        try:
            return pl.Series(c.name, col, dtype=c.dtype), None
        except Exception as e:  # noqa: BLE001 - name the column and the offending value
            bad = next((v for v in col if v is not None and not _fits(v, c.dtype)), None)
            err = TelemetryError(
                f"telemetry {self.name} column {c.name!r}: value {bad!r} ({type(bad).__name__}) is not "
                f"{c.dtype}; pass {c.dtype} values ({str(e).splitlines()[0]})")
            return pl.Series(c.name, [v if _fits(v, c.dtype) else None for v in col], dtype=c.dtype), err

    def to_frame(self, values: list) -> tuple[pl.DataFrame, TelemetryError | None]:
        """The whole rows in flat `values` as a frame, checked value by value (the slow path)."""
        k, err, cols = self.width, None, []
        for i, c in enumerate(self.columns):
            s, e = self.series(c, values[i::k])
            cols.append(s)
            err = err or e
        return pl.DataFrame(cols), err

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=self.schema)


def _fits(v: Any, dtype: Any) -> bool:
    try:
        pl.Series([v], dtype=dtype)
        return True
    except Exception:  # noqa: BLE001
        return False


def _packs(kind: str, v: Any) -> tuple[bool, Any]:
    """(whether `v` fits a numeric column of this kind, the value to record)."""
    if kind is _BOOL:
        if isinstance(v, (bool, np.bool_)):
            return True, bool(v)
        ok = type(v) is int and v in (0, 1)
        return ok, bool(v) if ok else v
    try:
        (_PACK_D if kind is _FLOAT else _PACK_Q)(v)
        return True, v
    except struct.error:
        return False, v


class Recorder:
    """Telemetry rows for one run. Thread-safe; `add_*` may be called from any thread.

    stage_rows: rows a table keeps as the callers' tuples before the adding thread packs them into bytes.
    chunk_rows: rows per frame built when read (bounds the memory a read needs).
    spill_dir / spill_rows / flush_interval_s: Parquet part files (see the module docstring).
    `strings`: the string table positional rows take their String columns' codes from."""

    def __init__(self, spill_dir: str | os.PathLike | None = None, *, chunk_rows: int = 65_536,
                 spill_rows: int = 65_536, flush_interval_s: float = 5.0, stage_rows: int = 256):
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_rows = max(1, int(chunk_rows))
        self.stage_rows = max(1, int(stage_rows))
        self.spill_rows = int(spill_rows)
        self.flush_interval_s = float(flush_interval_s)
        self.strings = StringCodes()
        self._lock = threading.Lock()         # sealing, frames, counts, part names
        self._write_lock = threading.Lock()   # one part file at a time, so a killed run leaves no gap
        self._req = _Table("request", REQUEST_COLUMNS, self.chunk_rows, self.stage_rows)
        self._act = _Table("action", ACTION_COLUMNS, self.chunk_rows, self.stage_rows)
        self._req.spill = self._act.spill = self.spill_dir is not None
        self._req_rows, self._req_limit = self._req.rows, self._req.stage_limit   # the hot path's (never replaced)
        self._act_rows, self._act_limit = self._act.rows, self._act.stage_limit
        self._error: BaseException | None = None
        self._closed = False
        self._on_row: Callable[[], None] | None = None
        self.convert_cpu_s = 0.0              # CPU time spent sealing, all threads (for benchmarks)
        self._wake = threading.Event()        # the spill thread: part files are due (or stop)
        self._thread: threading.Thread | None = None
        if self.spill_dir is not None:
            self._thread = threading.Thread(target=self._spill_loop, name="workbench-telemetry", daemon=True)
            self._thread.start()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # A subclass that hooks the keyword methods (e.g. to be told of every row) must see positional rows too.
        if cls.add_request is not Recorder.add_request and cls.add_request_row is Recorder.add_request_row:
            cls.add_request_row = Recorder._request_row_via_keywords   # type: ignore[method-assign]
        if cls.add_action is not Recorder.add_action and cls.add_action_row is Recorder.add_action_row:
            cls.add_action_row = Recorder._action_row_via_keywords     # type: ignore[method-assign]

    # ------------------------------------------------------------------------------------------ hot path
    def row_writer(self, kind: str) -> RowWriter | None:
        """A `RowWriter` for one writer's rows of `kind` ("request" or "action": tuples as `add_request_row` /
        `add_action_row` take them), packing each straight into the recorder's memory; None for a subclass
        that hooks the row methods (its hooks must see every row: use `add_*_row`). A row the writer cannot
        pack goes to `add_*_row`, which records it in its place and names the bad value."""
        cls = type(self)
        if kind not in ("request", "action"):
            raise ValueError(f"row_writer: kind must be 'request' or 'action', not {kind!r}")
        if any(getattr(cls, m) is not getattr(Recorder, m) for m in
               ("add_request", "add_action", "add_request_row", "add_action_row")):
            return None
        t = self._req if kind == "request" else self._act
        w = RowWriter(t.layout, _WRITER_ROWS, lambda w: self._writer_full(t, w))
        w.notify = self._on_row
        with self._lock:
            t.writers.append(w)
        return w

    @property
    def on_row(self) -> Callable[[], None] | None:
        """Called (no arguments, in the adding thread) after every row, whichever way it came: e.g. to poke a
        live view. Keep it cheap: it runs on the hot path."""
        return self._on_row

    @on_row.setter
    def on_row(self, fn: Callable[[], None] | None) -> None:
        with self._lock:
            self._on_row = fn
            for t in (self._req, self._act):
                for w in t.writers:
                    w.notify = fn

    def add_request_row(self, values: tuple) -> None:
        """One request row: a tuple of all `REQUEST_FIELDS` in order, String columns as codes from
        `self.strings` (see the module docstring)."""
        if type(values) is not tuple or len(values) != _REQUEST_WIDTH:
            values = self._req.as_tuple(values)
        rows = self._req_rows
        rows.append(values)   # one C call: atomic, so concurrent rows never interleave
        if len(rows) >= self._req_limit or self._req.writers:
            self._pack(self._req)
        if self._on_row is not None:
            self._on_row()

    def add_action_row(self, values: tuple) -> None:
        """One action row: a tuple of all `ACTION_FIELDS` in order, String columns as codes (see
        `add_request_row`)."""
        if type(values) is not tuple or len(values) != _ACTION_WIDTH:
            values = self._act.as_tuple(values)
        rows = self._act_rows
        rows.append(values)
        if len(rows) >= self._act_limit or self._act.writers:
            self._pack(self._act)
        if self._on_row is not None:
            self._on_row()

    def add_request(self, **row: Any) -> None:
        """One request row by column name; optional columns may be left out. Raises TelemetryError (recording
        nothing) for an unknown or missing required column."""
        t = self._req
        merged = {**t.template, **row}   # defaults filled in, column order kept; unknown names go last
        if len(merged) != t.width or not row.keys() >= t.required:
            raise t.bad_row(row)
        self._add_keywords(t, list(merged.values()))

    def add_action(self, **row: Any) -> None:
        """One action row by column name (see `add_request`)."""
        t = self._act
        merged = {**t.template, **row}
        if len(merged) != t.width or not row.keys() >= t.required:
            raise t.bad_row(row)
        self._add_keywords(t, list(merged.values()))

    def _add_keywords(self, t: _Table, vals: list) -> None:
        code = self.strings.code
        for i in t.str_idx:   # strings as strings: a value that is not a str gets a one-shot code, named when sealed
            vals[i] = code(vals[i])
        rows = t.rows
        rows.append(tuple(vals))
        if len(rows) >= t.stage_limit or t.writers:
            self._pack(t)
        if self._on_row is not None:
            self._on_row()

    def _request_row_via_keywords(self, values: tuple) -> None:
        self.add_request(**self._decoded(self._req, values))

    def _action_row_via_keywords(self, values: tuple) -> None:
        self.add_action(**self._decoded(self._act, values))

    def _decoded(self, t: _Table, values: Any) -> dict:
        vals = list(t.as_tuple(values))
        for i in t.str_idx:
            vals[i] = self.strings.value(vals[i])
        return dict(zip(t.names, vals))

    def _writer_full(self, t: _Table, w: RowWriter) -> None:
        """A writer's buffer is full: keep it as a block, hand the writer a new one."""
        with self._lock:
            t.add_view(w.renew())
            due = self._thread is not None and t.pending + t.unwritten_rows >= self.spill_rows
        if due:
            self._wake.set()

    def _pack(self, t: _Table) -> None:
        """`stage_rows` rows wait: pack them now, in this thread (no conversion: frames are built when read).
        If another thread holds the lock, leave them: the next row retries (where the table has writers, wait
        instead: a writer's row that fell back here must be packed before the writer's next rows). Wakes the
        spill thread when `spill_rows` rows wait for a part file."""
        if not self._lock.acquire(blocking=bool(t.writers)):
            return
        try:
            err = t.pack(self.strings)
            due = self._thread is not None and t.pending + t.unwritten_rows >= self.spill_rows
        finally:
            self._lock.release()
        if err is not None and self._error is None:
            self._error = err
        if due:
            self._wake.set()   # the spill thread seals and writes the part file: no disk write on the hot path

    # ------------------------------------------------------------------------------------------- reading
    def requests(self) -> pl.DataFrame:
        """Every request row recorded so far (a new DataFrame; the recorder keeps recording)."""
        return self._frame(self._req)

    def actions(self) -> pl.DataFrame:
        """Every action row recorded so far."""
        return self._frame(self._act)

    @property
    def num_requests(self) -> int:
        return self._count(self._req)

    @property
    def num_actions(self) -> int:
        return self._count(self._act)

    def _count(self, t: _Table) -> int:
        with self._lock:   # rows move from packed to frames under it: the count never goes back
            return t.pending + t.frame_rows

    def _frame(self, t: _Table) -> pl.DataFrame:
        self.flush()
        with self._lock:
            frames = list(t.frames)
        if not frames:
            return t.empty()
        if len(frames) > 1:
            df = pl.concat(frames, rechunk=True)
            with self._lock:   # compact: later reads concat one frame (+ whatever arrived since)
                if all(a is b for a, b in zip(t.frames, frames)):
                    t.frames[:len(frames)] = [df]
            return df
        return frames[0]

    def _convert_all(self) -> None:
        """Seal every row recorded so far (in the caller's thread: waiting for another thread would wait for
        rows that producers keep adding, and stall a live chart's snapshot under load)."""
        with self._lock:
            c0 = time.thread_time()
            for t in (self._req, self._act):
                err = t.seal(self.strings)
                if err is not None and self._error is None:
                    self._error = err
            self.convert_cpu_s += time.thread_time() - c0

    def flush(self) -> None:
        """Convert every row recorded so far; with spill_dir, also write the part files that are due. Raises a
        deferred error (a value of the wrong type)."""
        self._convert_all()
        if self.spill_dir is not None and not self._closed:
            self._write_parts(force=False)
        self._raise_deferred()

    def write(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write everything recorded so far as `requests.parquet` and `actions.parquet` in `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = (d / REQUESTS_FILE, d / ACTIONS_FILE)
        _write_atomic(self.requests(), paths[0])
        _write_atomic(self.actions(), paths[1])
        return paths

    def close(self) -> None:
        """With spill_dir: seal every row, write the last part files and consolidate them into requests.parquet /
        actions.parquet; a row of the wrong type is reported (TelemetryError) after everything else has been
        written. In memory: the rows stay packed (frames are built by the first read, which reports a bad String
        code or Boolean; a value of the wrong type found when it was added is reported here). Idempotent; rows
        added after close are still kept."""
        if self._closed:
            return
        with self._lock:
            thread, self._thread, self._closed = self._thread, None, True
        if thread is not None:   # stop it before touching the part files
            self._wake.set()
            thread.join(timeout=30)
        if self.spill_dir is not None:
            self._convert_all()
        deferred, self._error = self._error, None   # reported after the files are written
        if self.spill_dir is not None:
            try:
                self._write_parts(force=True)
                self.write(self.spill_dir)
            except TelemetryError as e:
                deferred = deferred or e
            for t in (self._req, self._act):
                for p in t.parts:
                    p.unlink(missing_ok=True)
                t.parts.clear()
        if deferred is not None:
            raise deferred
        self._raise_deferred()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- spill thread
    def _spill_loop(self) -> None:
        """Part files: when `spill_rows` rows wait (woken by a thread that packed rows) and every
        `flush_interval_s`, with every row recorded so far, sealed here."""
        last = time.monotonic()
        while not self._closed:
            self._wake.wait(timeout=max(0.01, self.flush_interval_s - (time.monotonic() - last)))
            self._wake.clear()
            if self._closed:
                return
            try:
                timed = time.monotonic() - last >= self.flush_interval_s
                self._convert_all()
                if timed:
                    last = time.monotonic()
                self._write_parts(force=timed)
            except BaseException as e:  # noqa: BLE001 - surfaced by the next flush()/requests()/close()
                self._error = e

    def _write_parts(self, force: bool) -> bool:
        """Write the unwritten frames of each table as one part file when big enough (or forced)."""
        wrote = False
        with self._write_lock:
            for t in (self._req, self._act):
                with self._lock:
                    if not t.unwritten or (not force and t.unwritten_rows < self.spill_rows):
                        continue
                    frames, t.unwritten, t.unwritten_rows = t.unwritten, [], 0
                    path = self.spill_dir / f"{t.name}s.part-{len(t.parts):05d}.parquet"
                    t.parts.append(path)
                _write_atomic(pl.concat(frames), path)
                wrote = True
        return wrote

    def _raise_deferred(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e


def _write_atomic(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.write_parquet(tmp)
    os.replace(tmp, path)


def read_telemetry(directory: str | os.PathLike) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(requests, actions) from a directory written by `Recorder.write`/`close`, or the part files a killed
    run left behind."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"telemetry directory {d} does not exist")
    out = []
    for name, table in (("requests", _Table("request", REQUEST_COLUMNS)),
                        ("actions", _Table("action", ACTION_COLUMNS))):
        whole = d / f"{name}.parquet"
        parts = sorted(d.glob(f"{name}.part-*.parquet"))
        if whole.is_file():
            out.append(pl.read_parquet(whole))
        elif parts:
            out.append(pl.concat([pl.read_parquet(p) for p in parts]))
        else:
            out.append(table.empty())
    return out[0], out[1]


def rows_to_frame(rows: Iterable[dict], kind: str = "request") -> pl.DataFrame:
    """Build a telemetry frame from row dicts (defaults filled in, keys checked): handy in tests and notebooks."""
    rec = Recorder()
    add = rec.add_request if kind == "request" else rec.add_action
    for r in rows:
        add(**r)
    df = rec.requests() if kind == "request" else rec.actions()
    rec.close()
    return df
