"""Reader for the Azure Functions 2019 trace (AzureFunctionsDataset2019): per-minute invocation counts per
function, one file per day, `invocations_per_function_md.anon.dNN.csv` (days 01-14; the older preview name
`invocations_per_function_md.svls.anon.dNN.csv` is accepted too).

Layout: a header `HashOwner,HashApp,HashFunction,Trigger,1,2,...,1440`, then one row per function: the hashed
ids, the trigger type (http, timer, event, queue, storage, orchestration, others), and 1,440 integer counts.
A real day has tens of thousands of rows (~46,000 in day 1), i.e. ~66 M counts: files are read lazily with polars
(`scan_csv`), only the columns a window needs are parsed, and the counts are read one window of minutes at a time.

Quirks handled: all-zero functions (kept in the file, dropped by default since they never invoke), the same
function appearing in several days (keyed by the three hashes), a function listed twice in one day (counts
summed), Windows line ends, and the id columns being strings that look like numbers (read as strings).
Problems are errors naming the file, the line and the column: a header without the 1,440 minute columns in
order, a row with the wrong number of fields, an empty or non-integer count, a negative count.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

MINUTES_PER_DAY = 1440
KEY_COLUMNS = ("HashOwner", "HashApp", "HashFunction")
ID_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")
MINUTE_COLUMNS = tuple(str(m) for m in range(1, MINUTES_PER_DAY + 1))
FILE_RE = re.compile(r"^invocations_per_function_md\.(?:svls\.)?anon\.d(\d+)\.csv$")
_MAX_COUNT = 2**31 - 1   # counts are parsed as Int32
TRIGGERS = ("http", "timer", "event", "queue", "storage", "orchestration", "others")


class TraceError(ValueError):
    """A trace file that does not have the Azure Functions layout; the message names the file/line/column."""


@dataclass
class DayFile:
    path: Path
    day: int
    id_columns: tuple[str, ...]
    minute_columns: tuple[str, ...]
    rows: int = 0
    fn_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row -> function (-1 dropped)


def find_day_files(path: str | os.PathLike, days: Iterable[int] | None = None) -> list[tuple[Path, int]]:
    """The (file, day) pairs under `path` (a directory or one file), sorted by day, filtered by `days`."""
    p = Path(path).expanduser()
    if p.is_file():
        m = FILE_RE.match(p.name)
        files = [(p, int(m.group(1)) if m else 1)]
    elif p.is_dir():
        files = sorted(((f, int(FILE_RE.match(f.name).group(1))) for f in p.iterdir() if FILE_RE.match(f.name)),
                       key=lambda x: x[1])
        if not files:
            raise TraceError(f"{p}: no trace files named invocations_per_function_md.anon.dNN.csv in this "
                             f"directory (give the directory holding the unpacked AzureFunctionsDataset2019)")
    else:
        raise TraceError(f"{p}: no such file or directory (give a trace file or the directory of day files)")
    if days is not None:
        want = {int(d) for d in days}
        have = {d for _, d in files}
        missing = sorted(want - have)
        if missing:
            raise TraceError(f"{p}: no file for day(s) {missing} (days present: {sorted(have)})")
        files = [(f, d) for f, d in files if d in want]
    seen: dict[int, Path] = {}
    for f, d in files:
        if d in seen:
            raise TraceError(f"day {d} appears twice: {seen[d]} and {f} (keep one)")
        seen[d] = f
    return files


def read_header(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(id columns, minute columns) of a trace file, or a TraceError naming what is wrong with the header."""
    with open(path, "rb") as f:
        raw = f.readline()
    if not raw:
        raise TraceError(f"{path}: the file is empty (expected a header line)")
    names = [c.strip().strip('"') for c in raw.decode("utf-8", "replace").rstrip("\r\n").split(",")]
    n_ids = 0
    while n_ids < len(names) and not names[n_ids].isdigit():
        n_ids += 1
    ids, minutes = tuple(names[:n_ids]), tuple(names[n_ids:])
    if "HashFunction" not in ids:
        raise TraceError(f"{path}, line 1: the header has no HashFunction column (id columns {list(ids)}; "
                         f"expected {list(ID_COLUMNS)} then 1..1440)")
    for i, (got, want) in enumerate(zip(minutes, MINUTE_COLUMNS)):
        if got != want:
            raise TraceError(f"{path}, line 1, column {n_ids + i + 1}: header {got!r} where minute column "
                             f"{want!r} was expected (the counts must be columns '1'..'1440' in order)")
    if len(minutes) != MINUTES_PER_DAY:
        raise TraceError(f"{path}, line 1: {len(names)} columns = {n_ids} id columns + {len(minutes)} minute "
                         f"columns; expected {len(ids)} + {MINUTES_PER_DAY} (minute columns '1'..'1440')")
    return ids, minutes


def locate_bad_line(path: Path, n_fields: int, n_ids: int, names: Sequence[str],
                    only_line: int | None = None) -> str:
    """Scan the file for the first malformed row (or check `only_line`); a message naming line and column."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 or (only_line is not None and lineno != only_line):
                continue
            line = raw.rstrip(b"\r\n")
            if not line:   # polars reads an empty line as a row of nulls: name it rather than skip it
                return f"{path}, line {lineno}: empty line (remove it: every line after the header is one function)"
            fields = line.split(b",")
            if len(fields) != n_fields:
                return (f"{path}, line {lineno}: {len(fields)} fields, expected {n_fields} "
                        f"({n_ids} id columns + {MINUTES_PER_DAY} minute counts)")
            for j in range(n_ids, n_fields):
                v = fields[j].strip()
                if not v.isdigit():
                    what = "negative" if v.startswith(b"-") and v[1:].isdigit() else "not a non-negative integer"
                    return (f"{path}, line {lineno}, column {names[j]!r} (field {j + 1}): count "
                            f"{v.decode(errors='replace')!r} is {what}")
                if int(v) > _MAX_COUNT:
                    return (f"{path}, line {lineno}, column {names[j]!r} (field {j + 1}): count {int(v)} is larger "
                            f"than {_MAX_COUNT} (the counts are read as 32-bit integers)")
            if only_line is not None:
                break
    return f"{path}: malformed (could not locate the bad line)"


def _scan(df: DayFile) -> pl.LazyFrame:
    schema = {c: pl.Utf8 for c in df.id_columns}
    schema.update({c: pl.Int32 for c in df.minute_columns})
    return pl.scan_csv(df.path, schema=schema, has_header=True)


class AzureTrace:
    """An Azure Functions trace: validated day files, the function list, and per-minute counts on demand.

    `functions` (one row per function over all days, in first-seen order): the id columns, `total`
    (invocations over all days read) and `rank` (0 = most invoked; ties by first-seen order).
    """

    def __init__(self, days: list[DayFile], functions: pl.DataFrame):
        self.days = days
        self.functions = functions

    @classmethod
    def open(cls, path: str | os.PathLike, days: Iterable[int] | None = None, *,
             triggers: Iterable[str] | None = None, drop_idle: bool = True) -> "AzureTrace":
        """Validate every day file (header, field counts, counts are non-negative integers) and list the
        functions. `triggers` keeps only those trigger types; `drop_idle` drops functions that never invoke."""
        trig = None
        if triggers is not None:
            trig = [str(t).lower() for t in triggers]
            unknown = sorted(set(trig) - set(TRIGGERS))
            if unknown:
                raise TraceError(f"unknown trigger type(s) {unknown} (known: {list(TRIGGERS)})")
        day_files: list[DayFile] = []
        per_day: list[pl.DataFrame] = []
        for p, d in find_day_files(path, days):
            ids, minutes = read_header(p)
            if trig is not None and "Trigger" not in ids:
                raise TraceError(f"{p}: no Trigger column, so `triggers` cannot filter it")
            df = DayFile(p, d, ids, minutes)
            per_day.append(cls._validate_and_total(df).with_columns(pl.lit(len(day_files)).alias("_day")))
            day_files.append(df)
        keys = [c for c in KEY_COLUMNS if all(c in d.id_columns for d in day_files)]
        extra = [c for c in ("Trigger",) if all(c in d.id_columns for d in day_files)]
        allf = pl.concat([f.select(keys + extra + ["_day", "_row", "total"]) for f in per_day])
        if trig is not None:
            allf = allf.filter(pl.col("Trigger").str.to_lowercase().is_in(trig))
        functions = (allf.group_by(keys, maintain_order=True)
                     .agg([pl.col(c).first() for c in extra] + [pl.col("total").sum()]))
        if drop_idle:
            functions = functions.filter(pl.col("total") > 0)
        functions = functions.with_row_index("fn")
        order = np.lexsort((functions["fn"].to_numpy(), -functions["total"].to_numpy()))
        rank = np.empty(functions.height, np.int64)
        rank[order] = np.arange(functions.height)
        functions = functions.with_columns(pl.Series("rank", rank))
        # row -> function index per day file (-1 for rows filtered out)
        lookup = allf.join(functions.select(keys + ["fn"]), on=keys, how="inner")
        for i, df in enumerate(day_files):
            idx = np.full(df.rows, -1, np.int64)
            sub = lookup.filter(pl.col("_day") == i)
            idx[sub["_row"].to_numpy()] = sub["fn"].to_numpy()
            df.fn_index = idx
        return cls(day_files, functions.drop("fn"))

    @staticmethod
    def _validate_and_total(df: DayFile) -> pl.DataFrame:
        cols = [pl.col(c) for c in df.minute_columns]
        n_fields = len(df.id_columns) + len(df.minute_columns)
        names = list(df.id_columns) + list(df.minute_columns)
        try:
            t = (_scan(df).with_row_index("_row")
                 .select([pl.col(c) for c in df.id_columns] + [
                     pl.col("_row"),
                     pl.sum_horizontal([c.cast(pl.Int64) for c in cols]).alias("total"),
                     pl.min_horizontal(cols).alias("_min"),
                     pl.sum_horizontal([c.is_null() for c in cols]).alias("_nulls"),
                 ]).collect())
        except pl.exceptions.PolarsError:
            raise TraceError(locate_bad_line(df.path, n_fields, len(df.id_columns), names)) from None
        bad = t.filter((pl.col("_nulls") > 0) | (pl.col("_min") < 0))
        if bad.height:
            line = int(bad["_row"][0]) + 2   # 1-based, after the header
            raise TraceError(locate_bad_line(df.path, n_fields, len(df.id_columns), names, only_line=line))
        df.rows = t.height
        return t

    # ------------------------------------------------------------------------------------------ access
    @property
    def num_functions(self) -> int:
        return self.functions.height

    @property
    def num_minutes(self) -> int:
        return MINUTES_PER_DAY * len(self.days)

    def counts(self, start_minute: int = 0, minutes: int | None = None) -> np.ndarray:
        """int64 array (num_functions, minutes): invocations per function (rows in `functions` order) in trace
        minutes [start_minute, start_minute + minutes) (minute 0 = the first minute of the first day read)."""
        total = self.num_minutes
        if minutes is None:
            minutes = total - start_minute
        if start_minute < 0 or minutes < 0 or start_minute + minutes > total:
            raise TraceError(f"minutes [{start_minute}, {start_minute + minutes}) are outside the trace "
                             f"(0..{total}: {len(self.days)} day(s) of {MINUTES_PER_DAY})")
        out = np.zeros((self.num_functions, minutes), np.int64)
        for i, df in enumerate(self.days):
            lo = max(start_minute, i * MINUTES_PER_DAY)
            hi = min(start_minute + minutes, (i + 1) * MINUTES_PER_DAY)
            if lo >= hi:
                continue
            cols = [df.minute_columns[m - i * MINUTES_PER_DAY] for m in range(lo, hi)]
            block = _scan(df).select(cols).collect().to_numpy()
            keep = df.fn_index >= 0
            idx, view = df.fn_index[keep], out[:, lo - start_minute:hi - start_minute]
            if idx.size == np.unique(idx).size:
                view[idx] += block[keep]
            else:   # a function listed twice in one day: its counts add up
                np.add.at(view, idx, block[keep])
        return out

    def minute_totals(self) -> np.ndarray:
        """Invocations per minute over all functions kept (int64, num_minutes)."""
        parts = []
        for df in self.days:
            keep = pl.Series(df.fn_index >= 0)
            s = (_scan(df).select(pl.col(c).cast(pl.Int64) for c in df.minute_columns).collect()
                 .filter(keep).sum())
            parts.append(s.to_numpy().ravel())
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
