"""`Recorder`: one row per request and per action, essentially free on the controller's hot path.

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

The pending values are kept flat, not as row tuples: the caller's tuple dies at once, so recording holds no
garbage-collected objects (thousands of held tuples would make Python's cyclic GC run several times more often,
which costs the whole process more than the recording itself). Every `chunk_rows` rows the pending values are
handed to a background thread, which takes them off the front of the list (the hot path keeps extending it
meanwhile) and converts them to a polars DataFrame, column i being the strided slice `values[i::width]`. The hot
path never waits for a conversion or a disk write. (`python -m bench.telemetry_overhead` measures all this.)

With `spill_dir`, the converted chunks are also written to Parquet part files (`requests.part-00000.parquet`, ...)
every `spill_rows` rows or `flush_interval_s` seconds, each written to a temporary name and renamed, so a run
that is killed keeps everything up to the last flush, readable. `close()` writes the rest and consolidates the
parts into `requests.parquet` / `actions.parquet`. `read_telemetry(dir)` reads either layout.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from workbench.telemetry.schema import ACTION_COLUMNS, REQUEST_COLUMNS, REQUIRED, Column

REQUESTS_FILE = "requests.parquet"
ACTIONS_FILE = "actions.parquet"
REQUEST_FIELDS: tuple[str, ...] = tuple(c.name for c in REQUEST_COLUMNS)
"""The order of the values `Recorder.add_request_row` takes (16 columns)."""
ACTION_FIELDS: tuple[str, ...] = tuple(c.name for c in ACTION_COLUMNS)
"""The order of the values `Recorder.add_action_row` takes (23 columns)."""
_REQUEST_WIDTH, _ACTION_WIDTH = len(REQUEST_FIELDS), len(ACTION_FIELDS)


class TelemetryError(ValueError):
    """A row that does not fit the schema (unknown/missing column, wrong number of values, value of the wrong
    type)."""


class _Table:
    """One row kind: the pending values (extended by the hot path) and the converted chunks. Everything but
    `values` is guarded by the recorder's lock."""

    def __init__(self, name: str, columns: tuple[Column, ...], chunk_rows: int = 4096):
        self.name = name
        self.columns = columns
        self.names = tuple(c.name for c in columns)
        self.width = len(columns)
        self.template = {c.name: c.default for c in columns}    # in column order: {**template, **row} keeps it
        self.keys = frozenset(self.names)
        self.required = frozenset(c.name for c in columns if c.default is REQUIRED)
        self.schema = {c.name: c.dtype for c in columns}
        self.values: list = []            # pending rows, flat: row r is values[r * width:(r + 1) * width]; only
        self.chunk_rows = chunk_rows      #   ever extended by whole rows and cut from the front by the converter
        self.limit = chunk_rows * self.width   # len(values) at which the hot path hands them to the thread
        self.taken = 0                    # rows being converted right now
        self.frames: list[pl.DataFrame] = []      # every converted chunk, in order
        self.unwritten: list[pl.DataFrame] = []   # converted chunks not yet in a part file (spill only)
        self.unwritten_rows = 0
        self.parts: list[Path] = []

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

    def to_frame(self, values: list, start: int = 0, stop: int | None = None
                 ) -> tuple[pl.DataFrame, TelemetryError | None]:
        """The whole rows in flat `values[start:stop]` as a frame, plus an error naming the first value of the
        wrong type (that value becomes null, so the other rows are kept)."""
        k, err = self.width, None
        stop = len(values) if stop is None else stop
        cols = []
        for i, c in enumerate(self.columns):
            col = values[start + i:stop:k]
            try:
                cols.append(pl.Series(c.name, col, dtype=c.dtype))
            except Exception as e:  # noqa: BLE001 - name the column and the offending value
                bad = next((v for v in col if v is not None and not _fits(v, c.dtype)), None)
                err = err or TelemetryError(
                    f"telemetry {self.name} column {c.name!r}: value {bad!r} ({type(bad).__name__}) is not "
                    f"{c.dtype}; pass {c.dtype} values ({str(e).splitlines()[0]})")
                cols.append(pl.Series(c.name, [v if _fits(v, c.dtype) else None for v in col], dtype=c.dtype))
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
    """Telemetry rows for one run. Thread-safe; `add_*` may be called from any thread."""

    def __init__(self, spill_dir: str | os.PathLike | None = None, *, chunk_rows: int = 4096,
                 spill_rows: int = 65_536, flush_interval_s: float = 5.0):
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_rows = max(1, int(chunk_rows))
        self.spill_rows = int(spill_rows)
        self.flush_interval_s = float(flush_interval_s)
        self._lock = threading.Lock()           # bookkeeping (frames, counts, thread start)
        self._convert_lock = threading.Lock()   # one conversion at a time, so chunks stay in order
        self._req = _Table("request", REQUEST_COLUMNS, self.chunk_rows)
        self._act = _Table("action", ACTION_COLUMNS, self.chunk_rows)
        self._req_values = self._req.values     # the hot path's lists (never replaced)
        self._act_values = self._act.values
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        if self.spill_dir is not None:   # timed flushes need the thread from the start
            self._start_thread()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # A subclass that hooks the keyword methods (e.g. to be told of every row) must see positional rows too.
        if cls.add_request is not Recorder.add_request and cls.add_request_row is Recorder.add_request_row:
            cls.add_request_row = Recorder._request_row_via_keywords   # type: ignore[method-assign]
        if cls.add_action is not Recorder.add_action and cls.add_action_row is Recorder.add_action_row:
            cls.add_action_row = Recorder._action_row_via_keywords     # type: ignore[method-assign]

    # ------------------------------------------------------------------------------------------ hot path
    def add_request_row(self, values: tuple) -> None:
        """One request row: a tuple of all `REQUEST_FIELDS` in order (types checked when converted)."""
        if type(values) is not tuple or len(values) != _REQUEST_WIDTH:
            values = self._req.as_tuple(values)
        pending = self._req_values
        pending += values   # one C call: atomic, so concurrent rows never interleave
        if len(pending) >= self._req.limit:
            self._due(self._req)

    def add_action_row(self, values: tuple) -> None:
        """One action row: a tuple of all `ACTION_FIELDS` in order (types checked when converted)."""
        if type(values) is not tuple or len(values) != _ACTION_WIDTH:
            values = self._act.as_tuple(values)
        pending = self._act_values
        pending += values
        if len(pending) >= self._act.limit:
            self._due(self._act)

    def add_request(self, **row: Any) -> None:
        """One request row by column name; optional columns may be left out. Raises TelemetryError (recording
        nothing) for an unknown or missing required column."""
        t = self._req
        merged = {**t.template, **row}   # defaults filled in, column order kept; unknown names go last
        if len(merged) != t.width or not row.keys() >= t.required:
            raise t.bad_row(row)
        pending = self._req_values
        pending += tuple(merged.values())
        if len(pending) >= t.limit:
            self._due(t)

    def add_action(self, **row: Any) -> None:
        """One action row by column name (see `add_request`)."""
        t = self._act
        merged = {**t.template, **row}
        if len(merged) != t.width or not row.keys() >= t.required:
            raise t.bad_row(row)
        pending = self._act_values
        pending += tuple(merged.values())
        if len(pending) >= t.limit:
            self._due(t)

    def _request_row_via_keywords(self, values: tuple) -> None:
        self.add_request(**dict(zip(self._req.names, self._req.as_tuple(values))))

    def _action_row_via_keywords(self, values: tuple) -> None:
        self.add_action(**dict(zip(self._act.names, self._act.as_tuple(values))))

    def _due(self, t: _Table) -> None:
        """A chunk is ready: hand it to the background thread (and stop asking until it has been taken)."""
        t.limit = len(t.values) + self.chunk_rows * t.width
        self._q.put(t)
        self._ensure_thread()

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
        with self._lock:
            return t.pending + t.taken + sum(f.height for f in t.frames)

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

    def flush(self) -> None:
        """Convert every row recorded so far (in the caller's thread: waiting for the background queue instead
        would wait for rows that producers keep adding, and stall a live chart's snapshot under load); with
        spill_dir, also write the part files that are due. Raises a deferred error."""
        for t in (self._req, self._act):
            if t.values:
                self._convert(t)   # after any conversion in progress (its lock): frames stay in order
        if self.spill_dir is not None:
            self._write_parts(force=False)   # each part's name is reserved under the lock: writers never clash
        self._raise_deferred()

    def _drain_inline(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            try:
                if isinstance(item, _Table):
                    self._convert(item)
            finally:
                self._q.task_done()

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
        deferred: TelemetryError | None = None
        try:
            self.flush()
        except TelemetryError as e:
            deferred = e
        finally:
            with self._lock:
                thread, self._thread, self._closed = self._thread, None, True
            if thread is not None:   # stop it before touching the part files
                self._q.put(None)
                thread.join(timeout=30)
        self._drain_inline()   # anything queued behind the stop marker
        if self.spill_dir is not None:
            self._write_parts(force=True)
            try:
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

    # ------------------------------------------------------------------------------- background thread
    def _ensure_thread(self) -> None:
        if self._thread is None and not self._closed:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="workbench-telemetry", daemon=True)
        self._thread.start()

    def _convert(self, t: _Table) -> None:
        """Take every row pending in `t` off the front of its list (one cut, so a backlog costs no repeated
        shifting of the rest) and convert them, `chunk_rows` per frame (bigger chunks convert slower: the strided
        column slices stop fitting in the CPU caches)."""
        with self._convert_lock:
            k = t.width
            with self._lock:
                pending = t.values
                n = len(pending) // k
                taken = pending[:n * k]
                del pending[:n * k]   # the hot path only appends whole rows: these are the first n
                t.taken = n
            try:
                for r0 in range(0, n, self.chunk_rows):
                    r1 = min(n, r0 + self.chunk_rows)
                    df, err = t.to_frame(taken, r0 * k, r1 * k)
                    if err is not None and self._error is None:
                        self._error = err
                    with self._lock:
                        t.frames.append(df)
                        t.taken -= r1 - r0
                        if self.spill_dir is not None:
                            t.unwritten.append(df)
                            t.unwritten_rows += df.height
            finally:
                with self._lock:
                    t.taken = 0
                t.limit = self.chunk_rows * k   # rows that came meanwhile: the next one hands them over if due

    def _loop(self) -> None:
        # Items: a _Table = convert its pending rows; "write" = write part files now; None = stop.
        last_write = time.monotonic()
        while True:
            timeout = None
            if self.spill_dir is not None:
                timeout = max(0.05, self.flush_interval_s - (time.monotonic() - last_write))
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                # timed flush: convert the rows still pending (behind the chunks already queued, which keeps
                # the order), then a marker that writes the part files once they are converted
                for t in (self._req, self._act):
                    if t.values:
                        self._q.put(t)
                self._q.put("write")
                last_write = time.monotonic()
                continue
            try:
                if item is None:
                    return
                if item == "write":
                    self._write_parts(force=True)
                    continue
                self._convert(item)
                if self.spill_dir is not None:
                    due = time.monotonic() - last_write >= self.flush_interval_s
                    if self._write_parts(force=due) or due:   # chunks arriving all the time: still timed
                        last_write = time.monotonic()
            except BaseException as e:  # noqa: BLE001 - surfaced by the next flush()/requests()/close()
                self._error = e
            finally:
                self._q.task_done()

    def _write_parts(self, force: bool) -> bool:
        """Write unwritten chunks of each table as one part file when big enough (or forced)."""
        wrote = False
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
