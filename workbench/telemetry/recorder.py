"""`Recorder`: one row per request and per action, cheap on the controller's hot path.

Two ways to add a row (both thread-safe, both keep rows in call order):

- Positional fast path, for the controller: `add_request_row(values)` / `add_action_row(values)`, where `values`
  is a tuple of *every* column in schema order (`REQUEST_FIELDS` / `ACTION_FIELDS`, i.e. `REQUEST_COLUMNS` /
  `ACTION_COLUMNS` in `workbench.telemetry.schema`, optional columns included: 16 request values, 23 action
  values). The call checks the length (a wrong one raises `TelemetryError` at once, recording nothing) and
  extends one flat list with the values: no per-column work and no lock (the extend is atomic). The types are
  checked when the rows are converted (see below): a value of the wrong type becomes null and is reported as a
  `TelemetryError` naming the column and the value, raised by the next `flush()` / `requests()` / `actions()` /
  `write()` / `close()`.
- Keyword path, for everyone else: `add_request(**row)` / `add_action(**row)` fill in the defaults of optional
  columns and check the names at once (an unknown or missing required column raises `TelemetryError` and
  records nothing), then extend the same list. A subclass that overrides `add_request` / `add_action` (e.g. to
  be notified of each row) also sees the rows given positionally: they are routed through its override.

Where the time goes (measured by `python -m bench.telemetry_overhead`, bench/results/telemetry_overhead.md):
turning a row's Python values into columns is most of what recording costs, about 0.5 us a row on warm caches
but 1-3 us inside a simulation, whose own working set keeps the recorder's data and code cold. A second thread
does not hide it (the conversion holds the GIL, so it only moves the work and the freed objects to the other
core), and holding thousands of rows as Python objects before converting them cost as much as converting.
So the rows go through two cheap steps, both in the thread that adds the row:

1. Staging, every `stage_rows` rows (default 256; 16 to 4,096 measured the same in a simulation): the pending
   values are taken off the front of the flat list and appended column by column to compact buffers:
   `array('q')` for Int64 columns and `array('d')` for Float64 (8 bytes a value, checked by the C conversion;
   a block with a value of the wrong type takes the slow path, which names it), plain lists for String and
   Boolean columns (their values are a few shared objects: "success", "", True...). The int objects die here.
2. Sealing, every `chunk_rows` rows (default 16,384): the buffers become one polars DataFrame (numeric columns
   without a copy). The pending Python objects a table holds are thus bounded by `stage_rows` rows, and the
   rest is compact: about 8 bytes per numeric value.

With `spill_dir`, the sealed frames are also written to Parquet part files (`requests.part-00000.parquet`, ...)
every `spill_rows` rows or `flush_interval_s` seconds by a background thread (the only one; without
`spill_dir` there is none), each written to a temporary name and renamed, so a run that is killed keeps
everything up to the last flush, readable. `close()` writes the rest and consolidates the parts into
`requests.parquet` / `actions.parquet`. `read_telemetry(dir)` reads either layout.
"""
from __future__ import annotations

import os
import threading
import time
from array import array
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import polars as pl

from workbench.telemetry.schema import ACTION_COLUMNS, REQUEST_COLUMNS, REQUIRED, Column

REQUESTS_FILE = "requests.parquet"
ACTIONS_FILE = "actions.parquet"
REQUEST_FIELDS: tuple[str, ...] = tuple(c.name for c in REQUEST_COLUMNS)
"""The order of the values `Recorder.add_request_row` takes (16 columns)."""
ACTION_FIELDS: tuple[str, ...] = tuple(c.name for c in ACTION_COLUMNS)
"""The order of the values `Recorder.add_action_row` takes (23 columns)."""
_REQUEST_WIDTH, _ACTION_WIDTH = len(REQUEST_FIELDS), len(ACTION_FIELDS)
_ARRAY_CODES = {pl.Int64: ("q", np.int64), pl.Float64: ("d", np.float64)}   # dtype -> (array typecode, numpy)


class TelemetryError(ValueError):
    """A row that does not fit the schema (unknown/missing column, wrong number of values, value of the wrong
    type)."""


class _Table:
    """One row kind: the pending values (extended by the hot path without a lock), the staged columns and the
    sealed frames. Everything but `values` is guarded by the recorder's lock."""

    def __init__(self, name: str, columns: tuple[Column, ...], stage_rows: int = 256):
        self.name = name
        self.columns = columns
        self.names = tuple(c.name for c in columns)
        self.width = len(columns)
        self.template = {c.name: c.default for c in columns}    # in column order: {**template, **row} keeps it
        self.keys = frozenset(self.names)
        self.required = frozenset(c.name for c in columns if c.default is REQUIRED)
        self.schema = {c.name: c.dtype for c in columns}
        self.codes = tuple(_ARRAY_CODES.get(c.dtype, (None, None))[0] for c in columns)   # None: a plain list
        self.values: list = []            # pending rows, flat: row r is values[r * width:(r + 1) * width]; only
        #                                   ever extended by whole rows and cut from the front when staged
        self.stage_limit = max(1, stage_rows) * self.width   # len(values) at which the adding thread stages
        self.staged: list = self.fresh()  # one compact buffer per column
        self.staged_rows = 0
        self.frames: list[pl.DataFrame] = []      # every sealed chunk, in order
        self.frame_rows = 0
        self.unwritten: list[pl.DataFrame] = []   # sealed chunks not yet in a part file (spill only)
        self.unwritten_rows = 0
        self.parts: list[Path] = []
        self.spill = False                # frames also go to `unwritten` (set by a spilling recorder)

    def fresh(self) -> list:
        return [array(code) if code else [] for code in self.codes]

    @property
    def pending(self) -> int:
        return len(self.values) // self.width

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

    # -------------------------------------------------------------------- conversion (caller holds the lock)
    def stage(self) -> TelemetryError | None:
        """Move every whole row pending into the staged columns (one cut off the front of the list: the hot
        path only appends whole rows, so these are the first n). A block holding a value that the C conversion
        refuses is sealed on its own by the slow path, which names the value (returned)."""
        k, values = self.width, self.values
        n = len(values) // k
        if not n:
            return None
        block = values[:n * k]
        del values[:n * k]
        r0 = self.staged_rows
        try:
            for i, col in enumerate(self.staged):
                if self.codes[i]:
                    col.fromlist(block[i::k])   # C conversion and type check; unchanged if it raises
                else:
                    col += block[i::k]
        except (TypeError, ValueError, OverflowError):
            for col in self.staged:             # undo this block's columns, keep the order of the frames
                del col[r0:]
            err = self.seal()
            df, err2 = self.to_frame(block)
            self.add_frame(df)
            return err or err2
        self.staged_rows = r0 + n
        return None

    def seal(self) -> TelemetryError | None:
        """The staged rows as one frame (numeric columns without a copy; the buffers are replaced, never
        reused, since the frame now owns them)."""
        if not self.staged_rows:
            return None
        err, cols = None, []
        for c, code, data in zip(self.columns, self.codes, self.staged):
            if code:
                cols.append(pl.Series(c.name, np.frombuffer(data, dtype=_ARRAY_CODES[c.dtype][1])))
            else:
                s, e = self.series(c, data)
                cols.append(s)
                err = err or e
        self.staged, self.staged_rows = self.fresh(), 0
        self.add_frame(pl.DataFrame(cols))
        return err

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


class Recorder:
    """Telemetry rows for one run. Thread-safe; `add_*` may be called from any thread.

    stage_rows: rows a table collects as Python values before they are moved into compact column buffers (in
    the adding thread). chunk_rows: rows per sealed polars frame. spill_dir / spill_rows / flush_interval_s:
    Parquet part files (see the module docstring)."""

    def __init__(self, spill_dir: str | os.PathLike | None = None, *, chunk_rows: int = 16_384,
                 spill_rows: int = 65_536, flush_interval_s: float = 5.0, stage_rows: int = 256):
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_rows = max(1, int(chunk_rows))
        self.stage_rows = max(1, min(int(stage_rows), self.chunk_rows))
        self.spill_rows = int(spill_rows)
        self.flush_interval_s = float(flush_interval_s)
        self._lock = threading.Lock()         # staged columns, frames, counts, part names
        self._write_lock = threading.Lock()   # one part file at a time, so a killed run leaves no gap
        self._req = _Table("request", REQUEST_COLUMNS, self.stage_rows)
        self._act = _Table("action", ACTION_COLUMNS, self.stage_rows)
        self._req.spill = self._act.spill = self.spill_dir is not None
        self._req_values, self._req_limit = self._req.values, self._req.stage_limit   # the hot path's
        self._act_values, self._act_limit = self._act.values, self._act.stage_limit   # (never replaced)
        self._error: BaseException | None = None
        self._closed = False
        self.convert_cpu_s = 0.0              # CPU time spent staging and sealing, all threads (for benchmarks)
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
    def add_request_row(self, values: tuple) -> None:
        """One request row: a tuple of all `REQUEST_FIELDS` in order (types checked when staged)."""
        if type(values) is not tuple or len(values) != _REQUEST_WIDTH:
            values = self._req.as_tuple(values)
        pending = self._req_values
        pending += values   # one C call: atomic, so concurrent rows never interleave
        if len(pending) >= self._req_limit:
            self._stage(self._req)

    def add_action_row(self, values: tuple) -> None:
        """One action row: a tuple of all `ACTION_FIELDS` in order (types checked when staged)."""
        if type(values) is not tuple or len(values) != _ACTION_WIDTH:
            values = self._act.as_tuple(values)
        pending = self._act_values
        pending += values
        if len(pending) >= self._act_limit:
            self._stage(self._act)

    def add_request(self, **row: Any) -> None:
        """One request row by column name; optional columns may be left out. Raises TelemetryError (recording
        nothing) for an unknown or missing required column."""
        t = self._req
        merged = {**t.template, **row}   # defaults filled in, column order kept; unknown names go last
        if len(merged) != t.width or not row.keys() >= t.required:
            raise t.bad_row(row)
        pending = self._req_values
        pending += tuple(merged.values())
        if len(pending) >= self._req_limit:
            self._stage(t)

    def add_action(self, **row: Any) -> None:
        """One action row by column name (see `add_request`)."""
        t = self._act
        merged = {**t.template, **row}
        if len(merged) != t.width or not row.keys() >= t.required:
            raise t.bad_row(row)
        pending = self._act_values
        pending += tuple(merged.values())
        if len(pending) >= self._act_limit:
            self._stage(t)

    def _request_row_via_keywords(self, values: tuple) -> None:
        self.add_request(**dict(zip(self._req.names, self._req.as_tuple(values))))

    def _action_row_via_keywords(self, values: tuple) -> None:
        self.add_action(**dict(zip(self._act.names, self._act.as_tuple(values))))

    def _stage(self, t: _Table) -> None:
        """`stage_rows` rows are pending: stage them now, in this thread, while they are in the CPU's caches
        (and seal a chunk when one is full). If another thread holds the lock, leave them: the next row retries."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            c0 = time.thread_time()
            err = t.stage()
            if t.staged_rows >= self.chunk_rows:
                err = t.seal() or err
            due = t.unwritten_rows >= self.spill_rows and self._thread is not None
            self.convert_cpu_s += time.thread_time() - c0
        finally:
            self._lock.release()
        if err is not None and self._error is None:
            self._error = err
        if due:
            self._wake.set()   # the spill thread writes the part file: no disk write on the hot path

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
        with self._lock:   # rows move from pending to staged to frames under it: the count never goes back
            return t.pending + t.staged_rows + t.frame_rows

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
        """Stage and seal every row recorded so far (in the caller's thread: waiting for another thread would
        wait for rows that producers keep adding, and stall a live chart's snapshot under load)."""
        with self._lock:
            c0 = time.thread_time()
            for t in (self._req, self._act):
                err = t.stage()
                err = t.seal() or err
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
        """Flush; with spill_dir, consolidate the part files into requests.parquet / actions.parquet. Idempotent.
        A row of the wrong type is reported (TelemetryError) after everything else has been written."""
        if self._closed:
            return
        with self._lock:
            thread, self._thread, self._closed = self._thread, None, True
        if thread is not None:   # stop it before touching the part files
            self._wake.set()
            thread.join(timeout=30)
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
        """Part files: when `spill_rows` sealed rows wait (woken by the sealing thread) and every
        `flush_interval_s` (then with every row recorded so far, converted here)."""
        last = time.monotonic()
        while not self._closed:
            self._wake.wait(timeout=max(0.01, self.flush_interval_s - (time.monotonic() - last)))
            self._wake.clear()
            if self._closed:
                return
            try:
                timed = time.monotonic() - last >= self.flush_interval_s
                if timed:
                    self._convert_all()
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
