"""`Recorder`: one row per request and per action, cheap on the controller's hot path.

`add_request(**row)` / `add_action(**row)` only check the keys and append each value to a per-column list under
one lock. Every `chunk_rows` rows the lists are swapped out (O(1) under the lock) and a background thread turns
them into a polars DataFrame, so the hot path never waits for a conversion or a disk write.

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


class TelemetryError(ValueError):
    """A row that does not fit the schema (unknown/missing column, value of the wrong type)."""


class _Table:
    """The pending column lists of one row kind plus its converted chunks. Guarded by the recorder's lock."""

    def __init__(self, name: str, columns: tuple[Column, ...]):
        self.name = name
        self.columns = columns
        self.keys = frozenset(c.name for c in columns)
        self.required = frozenset(c.name for c in columns if c.default is REQUIRED)
        self.schema = {c.name: c.dtype for c in columns}
        self.names = tuple(c.name for c in columns)
        self.defaults = tuple(c.default for c in columns)
        self.frames: list[pl.DataFrame] = []      # every converted chunk, in order
        self.unwritten: list[pl.DataFrame] = []   # converted chunks not yet in a part file (spill only)
        self.unwritten_rows = 0
        self.parts: list[Path] = []
        self._fresh_lists()

    def _fresh_lists(self) -> None:
        self.lists: list[list] = [[] for _ in self.columns]   # one list per column, in column order
        self.appends = tuple(lst.append for lst in self.lists)  # bound methods: no lookups on the hot path
        self.n = 0

    def swap(self) -> tuple[list[list], int]:
        lists, n = self.lists, self.n
        self._fresh_lists()
        return lists, n

    def bad_row(self, row: dict) -> TelemetryError:
        unknown = sorted(set(row) - self.keys)
        missing = sorted(self.required - set(row))
        parts = []
        if unknown:
            parts.append(f"unknown column(s) {unknown}")
        if missing:
            parts.append(f"missing required column(s) {missing}")
        return TelemetryError(f"telemetry {self.name} row: {'; '.join(parts)} "
                              f"(columns: {[c.name for c in self.columns]})")

    def to_frame(self, lists: list[list], n: int) -> tuple[pl.DataFrame, TelemetryError | None]:
        """The chunk as a frame, plus an error naming the first value of the wrong type (that value becomes
        null, so the other rows are kept)."""
        cols, err = [], None
        for c, values in zip(self.columns, lists):
            try:
                cols.append(pl.Series(c.name, values, dtype=c.dtype))
            except Exception as e:  # noqa: BLE001 - name the column and the offending value
                bad = next((v for v in values if v is not None and not _fits(v, c.dtype)), None)
                err = err or TelemetryError(
                    f"telemetry {self.name} column {c.name!r}: value {bad!r} ({type(bad).__name__}) is not "
                    f"{c.dtype}; pass {c.dtype} values ({str(e).splitlines()[0]})")
                cols.append(pl.Series(c.name, [v if _fits(v, c.dtype) else None for v in values],
                                      dtype=c.dtype))
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
        self.chunk_rows = int(chunk_rows)
        self.spill_rows = int(spill_rows)
        self.flush_interval_s = float(flush_interval_s)
        self._lock = threading.Lock()
        self._req = _Table("request", REQUEST_COLUMNS)
        self._act = _Table("action", ACTION_COLUMNS)
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        if self.spill_dir is not None:   # timed flushes need the thread from the start
            self._start_thread()

    # ------------------------------------------------------------------------------------------ hot path
    def add_request(self, **row: Any) -> None:
        t = self._req
        keys = row.keys()
        if not (keys <= t.keys and t.required <= keys):
            raise t.bad_row(row)
        get = row.get
        with self._lock:
            for append, value in zip(t.appends, map(get, t.names, t.defaults)):
                append(value)
            t.n += 1
            if t.n >= self.chunk_rows:
                self._q.put((t, *t.swap()))
                self._ensure_thread()

    def add_action(self, **row: Any) -> None:
        t = self._act
        keys = row.keys()
        if not (keys <= t.keys and t.required <= keys):
            raise t.bad_row(row)
        get = row.get
        with self._lock:
            for append, value in zip(t.appends, map(get, t.names, t.defaults)):
                append(value)
            t.n += 1
            if t.n >= self.chunk_rows:
                self._q.put((t, *t.swap()))
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
        with self._lock:
            return self._req.n + sum(f.height for f in self._req.frames) + self._queued_rows(self._req)

    @property
    def num_actions(self) -> int:
        with self._lock:
            return self._act.n + sum(f.height for f in self._act.frames) + self._queued_rows(self._act)

    def _queued_rows(self, t: _Table) -> int:
        return sum(item[2] for item in list(self._q.queue) if isinstance(item, tuple) and item[0] is t)

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
        """Convert every pending row (and, with spill_dir, write due part files). Raises a deferred error."""
        with self._lock:
            for t in (self._req, self._act):
                if t.n:
                    self._q.put((t, *t.swap()))
        if self._q.unfinished_tasks:
            if self._closed:   # rows added after close(): no thread any more, convert them here
                self._drain_inline()
            else:
                self._ensure_thread()
                self._q.join()
        self._raise_deferred()

    def _drain_inline(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            try:
                if isinstance(item, tuple):
                    t, lists, n = item
                    df, err = t.to_frame(lists, n)
                    if err is not None and self._error is None:
                        self._error = err
                    with self._lock:
                        t.frames.append(df)
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
            if self._thread is not None:   # stop it before touching the part files
                self._q.put(None)
                self._thread.join(timeout=30)
                self._thread = None
            self._closed = True
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
            self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="workbench-telemetry", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # Items: (table, lists, n) = convert a chunk; "write" = write part files now; None = stop.
        last_write = time.monotonic()
        while True:
            timeout = None
            if self.spill_dir is not None:
                timeout = max(0.05, self.flush_interval_s - (time.monotonic() - last_write))
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                # timed flush: queue the rows still in the lists behind the chunks already queued (keeps
                # the order), then a marker that writes the part files once they are converted
                with self._lock:
                    for t in (self._req, self._act):
                        if t.n:
                            self._q.put((t, *t.swap()))
                self._q.put("write")
                last_write = time.monotonic()
                continue
            try:
                if item is None:
                    return
                if item == "write":
                    self._write_parts(force=True)
                    continue
                t, lists, n = item
                df, err = t.to_frame(lists, n)
                if err is not None and self._error is None:
                    self._error = err
                with self._lock:
                    t.frames.append(df)
                    if self.spill_dir is not None:
                        t.unwritten.append(df)
                        t.unwritten_rows += df.height
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
