"""Recorder's positional fast path (`add_request_row` / `add_action_row`, rows packed with String columns as
codes of `recorder.strings`): the same frames as the keyword path and as the controller's keyword fallback,
bad values named with their column (the rest kept), order and completeness under threads, bounded string
table, rows held as packed bytes until read, and subclasses that hook the keyword methods still seeing every
row."""
from __future__ import annotations

import threading

import polars as pl
import pytest

from workbench.contract import Status
from workbench.telemetry import (ACTION_COLUMNS, ACTION_FIELDS, REQUEST_COLUMNS, REQUEST_FIELDS, Recorder,
                                 TelemetryError, read_telemetry)


def req(i: int, **kw) -> dict:
    row = dict(request_id=i, model_id=i % 3, model="resnet50", worker=0, gpu=i % 2, batch_size=1 + i % 4,
               arrival=1000 * i, deadline=1000 * i + 500, completion=1000 * i + 300, slo=500,
               status="success" if i % 5 else "timeout", latency=300, cold_start=(i == 0), message="",
               action_id=i // 2, slo_factor=0.0)
    row.update(kw)
    return row


def act(i: int, **kw) -> dict:
    row = dict(action_id=i, worker=0, gpu=i % 2, type="INFER", model_id=1, batch_size=2, earliest=10 * i,
               latest=10 * i + 20, sent=5, planned_begin=10, planned_end=15, predicted_duration=5, completed=16,
               measured_begin=10, measured_end=16, measured_duration=6, gpu_clock=1980, status=int(Status.SUCCESS),
               status_name="SUCCESS", gpu_clock_before=1980, requests_queued=3, copies_loaded=1, message="")
    row.update(kw)
    return row


def as_tuple(row: dict, fields: tuple[str, ...], rec: Recorder | None = None) -> tuple:
    """The row in schema order; with `rec`, String columns as its codes (what the controller sends)."""
    if rec is None:
        return tuple(row[f] for f in fields)
    columns = REQUEST_COLUMNS if fields == REQUEST_FIELDS else ACTION_COLUMNS
    return tuple(rec.strings[row[c.name]] if c.dtype == pl.Utf8 else row[c.name] for c in columns)


def test_fields_are_the_schema_order():
    assert REQUEST_FIELDS == tuple(c.name for c in REQUEST_COLUMNS) and len(REQUEST_FIELDS) == 16
    assert ACTION_FIELDS == tuple(c.name for c in ACTION_COLUMNS) and len(ACTION_FIELDS) == 23
    assert set(req(0)) == set(REQUEST_FIELDS) and set(act(0)) == set(ACTION_FIELDS)


def test_positional_rows_equal_keyword_rows_and_interleave_in_order():
    kw, pos, mixed = Recorder(chunk_rows=7), Recorder(chunk_rows=7), Recorder(chunk_rows=7)
    for i in range(50):
        kw.add_request(**req(i))
        kw.add_action(**act(i))
        pos.add_request_row(as_tuple(req(i), REQUEST_FIELDS, pos))
        pos.add_action_row(as_tuple(act(i), ACTION_FIELDS, pos))
        if i % 3 == 0:
            mixed.add_request(**req(i))
        elif i % 3 == 1:
            mixed.add_request_row(as_tuple(req(i), REQUEST_FIELDS, mixed))
        else:   # strings given as str: encoded by the slow path, same row
            mixed.add_request_row(as_tuple(req(i), REQUEST_FIELDS))
    assert pos.requests().equals(kw.requests()) and pos.actions().equals(kw.actions())
    assert mixed.requests().equals(kw.requests())
    assert pos.requests()["status"].to_list()[:6] == ["timeout"] + ["success"] * 4 + ["timeout"]
    for r in (kw, pos, mixed):
        r.close()


def test_row_of_wrong_length_is_refused_at_once_and_nothing_recorded():
    rec = Recorder()
    rec.add_request_row(as_tuple(req(0), REQUEST_FIELDS))
    with pytest.raises(TelemetryError, match=r"request row: got 14 values; add_request_row takes a tuple of all 16 "
                                             r"columns in schema order \['request_id', 'model_id'.*nothing recorded"):
        rec.add_request_row(as_tuple(req(1), REQUEST_FIELDS)[:14])   # the brief's 14 columns only
    with pytest.raises(TelemetryError, match=r"action row: got a int"):
        rec.add_action_row(7)
    rec.add_request_row(list(as_tuple(req(2), REQUEST_FIELDS)))   # any sequence of the right length will do
    assert rec.requests()["request_id"].to_list() == [0, 2] and rec.actions().height == 0
    rec.close()


def test_value_of_wrong_type_is_named_with_its_column():
    rec = Recorder()
    rec.add_action_row(as_tuple(act(0), ACTION_FIELDS, rec))
    rec.add_action_row(as_tuple(act(1, gpu_clock="fast"), ACTION_FIELDS, rec))
    with pytest.raises(TelemetryError, match=r"action column 'gpu_clock': value 'fast' \(str\)"):
        rec.actions()
    df = rec.actions()
    assert df.height == 2 and df["gpu_clock"].to_list() == [1980, None] and df["action_id"].to_list() == [0, 1]
    rec.close()


def test_concurrent_positional_writers_lose_nothing_and_keep_each_threads_order():
    rec = Recorder(chunk_rows=64)
    n = 3000

    def work(k: int) -> None:
        for i in range(n):
            rec.add_request_row(as_tuple(req(k * 100_000 + i, message=f"m{i % 7}"), REQUEST_FIELDS, rec))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    counts, heights = [], []
    while any(t.is_alive() for t in threads):
        counts.append(rec.num_requests)   # pending + being converted + converted: never goes back
        if len(counts) % 200 == 0:
            heights.append(rec.requests().height)   # frames built while the writers go on
    for t in threads:
        t.join()
    assert counts == sorted(counts) and heights == sorted(heights)
    ids = rec.requests()["request_id"]
    assert ids.len() == 4 * n and ids.n_unique() == 4 * n and rec.num_requests == 4 * n
    for k in range(4):
        mine = ids.filter((ids >= k * 100_000) & (ids < (k + 1) * 100_000)).to_list()
        assert mine == list(range(k * 100_000, k * 100_000 + n))
    df = rec.requests()
    assert df["message"].to_list() == [f"m{(i % 100_000) % 7}" for i in df["request_id"].to_list()]
    rec.close()


def test_subclass_hooking_keyword_methods_sees_positional_rows():
    seen: list[tuple[str, int]] = []

    class Hooked(Recorder):
        def add_request(self, **row):
            super().add_request(**row)
            seen.append(("request", row["request_id"]))

        def add_action(self, **row):
            super().add_action(**row)
            seen.append(("action", row["action_id"]))

    rec = Hooked()
    rec.add_request_row(as_tuple(req(4, message="late"), REQUEST_FIELDS, rec))
    rec.add_action_row(as_tuple(act(9), ACTION_FIELDS, rec))
    rec.add_request(**req(5))
    assert seen == [("request", 4), ("action", 9), ("request", 5)]
    assert rec.requests()["message"].to_list() == ["late", ""]   # the hook saw strings, not codes
    with pytest.raises(TelemetryError, match="got 3 values"):   # routed rows are checked at once
        rec.add_request_row((1, 2, 3))
    assert rec.requests()["request_id"].to_list() == [4, 5]
    assert Recorder.add_request_row is not Hooked.add_request_row   # the base class keeps its fast path
    rec.close()


def test_on_row_pokes_for_positional_rows_and_for_the_controllers_row_writers():
    rec = Recorder()                   # as the UI session keeps it: its pump is poked through `on_row`
    pokes = []
    rec.on_row = lambda: pokes.append(1)
    rec.add_request_row(as_tuple(req(0), REQUEST_FIELDS, rec))
    rec.add_action_row(as_tuple(act(0), ACTION_FIELDS, rec))
    rec.row_writer("request").write(as_tuple(req(1), REQUEST_FIELDS, rec))
    assert len(pokes) == 3 and rec.num_requests == 2 and rec.num_actions == 1
    rec.close()


def test_positional_rows_spill_and_consolidate(tmp_path):
    rec = Recorder(tmp_path, chunk_rows=100, spill_rows=200, flush_interval_s=60)
    for i in range(1000):
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS, rec))
    rec.flush()   # converted; 1000 rows >= spill_rows: parts written as the chunks come
    assert sum(pl.read_parquet(p).height for p in tmp_path.glob("requests.part-*.parquet")) >= 800
    rec.close()
    r, a = read_telemetry(tmp_path)
    assert r["request_id"].to_list() == list(range(1000)) and a.height == 0


def test_pending_rows_hold_no_garbage_collected_objects():
    """At most `stage_rows` callers' tuples are kept: thousands of pending rows must not drive Python's cyclic
    GC (documented property; holding them made the GC run several times more often in a simulation)."""
    import gc

    rec = Recorder(chunk_rows=1 << 30, stage_rows=64)
    m, ok, empty = rec.strings["m"], rec.strings["success"], rec.strings[""]
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(5000):
            rec.add_request_row((i, 1, m, 0, 0, 1, i, i, i, 5, ok, 0, False, empty, -1, 0.0))
        grew = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert grew < 100 and rec.num_requests == 5000
    assert rec.requests()["arrival"].to_list() == list(range(5000))
    rec.close()


def test_rows_wait_packed_in_bounded_memory_until_read():
    """At most `stage_rows` rows wait as the callers' tuples; the rest wait as packed bytes (8 bytes a value);
    frames, of about `chunk_rows` rows, are built by the first read (close() of an in-memory recorder builds
    none)."""
    rec = Recorder(stage_rows=64, chunk_rows=1000)
    for i in range(10_000):
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS, rec))
        assert len(rec._req.rows) < 64
    t = rec._req
    assert all(type(b) is bytes for b in t.blocks) and not t.frames
    assert sum(map(len, t.blocks)) == 10_000 // 64 * 64 * 16 * 8
    assert rec.num_requests == 10_000 == t.pending
    rec.close()
    assert not t.frames and rec.num_requests == 10_000
    rec.flush()
    assert [f.height for f in t.frames] == [1024] * 9 + [784] and not t.blocks and not t.rows
    assert rec.requests()["request_id"].to_list() == list(range(10_000)) and rec.num_requests == 10_000
    rec.add_request_row(as_tuple(req(10_000), REQUEST_FIELDS, rec))   # recording goes on after a read
    assert rec.requests()["request_id"].to_list() == list(range(10_001))


def test_every_column_round_trips_through_the_fast_path():
    """Each kind of column, with values at the edges: Int64 extremes, floats, bools, repeated and empty strings,
    non-ASCII and long strings; the positional frame equals the keyword one value for value."""
    big, small = 2 ** 63 - 1, -(2 ** 63)
    rows = [req(0, arrival=big, deadline=small, slo_factor=2.5, cold_start=True, message="x" * 300),
            req(1, model="", status="rejected", message="ümlaut ✓", slo_factor=float("inf"), cold_start=False),
            req(2, gpu=-1, batch_size=0, status="error", message="", slo_factor=-0.0, cold_start=1),
            req(3, status="dropped", message="x" * 300, slo_factor=7)]   # an int in the Float64 column
    acts = [act(0, type="LOAD_WEIGHTS", status=int(Status.LOAD_WEIGHTS_TOO_LATE), status_name="LOAD_WEIGHTS_TOO_LATE",
                message="too late"),
            act(1, type="EVICT_WEIGHTS", latest=-1, gpu_clock=0, message=""),
            act(2, status=Status.SUCCESS)]   # an IntEnum in an Int64 column
    kw, pos = Recorder(), Recorder()
    for r in rows:
        kw.add_request(**r)
        pos.add_request_row(as_tuple(r, REQUEST_FIELDS, pos))
    for a in acts:
        kw.add_action(**a)
        pos.add_action_row(as_tuple(a, ACTION_FIELDS, pos))
    rf, af = pos.requests(), pos.actions()
    assert rf.equals(kw.requests()) and af.equals(kw.actions())
    assert rf.schema == pl.Schema(dict((c.name, c.dtype) for c in REQUEST_COLUMNS))
    assert rf["arrival"][0] == big and rf["deadline"][0] == small
    assert rf["cold_start"].to_list() == [True, False, True, False]
    assert rf["slo_factor"].to_list() == [2.5, float("inf"), -0.0, 7.0]
    assert rf["message"].to_list() == ["x" * 300, "ümlaut ✓", "", "x" * 300]
    assert rf["status"].to_list() == ["timeout", "rejected", "error", "dropped"]
    assert af["type"].to_list() == ["LOAD_WEIGHTS", "EVICT_WEIGHTS", "INFER"]
    assert af["status"].to_list() == [51, 0, 0] and af["status_name"].to_list()[0] == "LOAD_WEIGHTS_TOO_LATE"
    kw.close()
    pos.close()


@pytest.mark.parametrize("column, value, message", [
    ("arrival", "soon", r"request column 'arrival': value 'soon' \(str\)"),
    ("slo_factor", "fast", r"request column 'slo_factor': value 'fast' \(str\)"),
    ("cold_start", 5, r"request column 'cold_start': value 5 \(int\) is not Boolean"),
    ("status", 10 ** 6, r"request column 'status': code 1000000 is not in the recorder's string table"),
    ("status", -3, r"request column 'status': code -3 is not in the recorder's string table"),
    ("message", 2.5, r"request column 'message': value 2.5 \(float\) is not String"),
    ("model", b"resnet50", r"request column 'model': value b'resnet50' \(bytes\) is not String"),
])
def test_positional_value_of_wrong_type_is_named_and_becomes_null(column, value, message):
    rec = Recorder(stage_rows=4)
    for i in range(10):
        row = as_tuple(req(i), REQUEST_FIELDS, rec)
        if i == 6:
            row = tuple(value if f == column else v for f, v in zip(REQUEST_FIELDS, row))
        rec.add_request_row(row)
    with pytest.raises(TelemetryError, match=message):
        rec.requests()
    df = rec.requests()   # reported once; every row kept, in order, the bad value null
    assert df["request_id"].to_list() == list(range(10))
    assert df[column].to_list()[6] is None and df[column].null_count() == 1
    rec.close()


def test_none_is_null_in_any_column():
    rec = Recorder()
    rec.add_request_row(as_tuple(req(0, arrival=None, model=None, slo_factor=None), REQUEST_FIELDS, rec))
    rec.add_request(**req(1, message=None, cold_start=None))
    df = rec.requests()   # no error: None is how a caller says "unknown"
    assert df["arrival"].to_list() == [None, 1000] and df["model"].to_list() == [None, "resnet50"]
    assert df["slo_factor"].to_list() == [None, 0.0] and df["message"].to_list() == ["", None]
    assert df["cold_start"].to_list() == [True, None]
    rec.close()


def test_keyword_value_of_wrong_type_in_a_string_column_is_named():
    rec = Recorder()
    rec.add_request(**req(0))
    rec.add_request(**req(1, message=7))   # a keyword row's String column takes str only (an int is no code here)
    with pytest.raises(TelemetryError, match=r"column 'message': value 7 \(int\) is not String"):
        rec.requests()
    assert rec.requests()["message"].to_list() == ["", None]
    rec.close()


def test_string_table_stays_bounded_when_every_message_differs():
    rec = Recorder(stage_rows=8)
    rec.strings.CAP = 5   # a small table: everything after the fifth distinct string is a one-shot code
    for i in range(500):
        rec.add_request_row(as_tuple(req(i, message=f"late by {i} ms"), REQUEST_FIELDS, rec))
        if i == 250:
            assert rec.requests().height == 251   # a read mid-run releases the one-shot strings read
            assert len(rec.strings.pending) == 0
    assert len(rec.strings.values) == 5
    df = rec.requests()
    assert df["message"].to_list() == [f"late by {i} ms" for i in range(500)]
    assert df["model"].unique().to_list() == ["resnet50"] and len(rec.strings.pending) == 0
    rec.close()


def test_string_codes_are_consistent_across_threads():
    from workbench.telemetry.recorder import StringCodes

    codes = StringCodes()
    words = [f"w{i}" for i in range(300)]
    got: list[list[int]] = []

    def work() -> None:
        got.append([codes[w] for w in words])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g == got[0] for g in got) and sorted(got[0]) == list(range(300))
    assert [codes.values[c] for c in got[0]] == words


def test_controller_frames_equal_its_keyword_fallback():
    """The same fixed-seed simulation recorded through the controller's positional fast path (codes) and through
    its keyword fallback (strings; a recorder without `add_*_row`): equal frames, every column."""
    from workbench.controller.simulation import simulate
    from workbench.workload import Poisson

    class KeywordOnly:
        def __init__(self) -> None:
            self.inner = Recorder()
            self.add_request, self.add_action = self.inner.add_request, self.inner.add_action

    frames = []
    for rec in (Recorder(stage_rows=16, chunk_rows=500), KeywordOnly()):
        simulate({"resnet50": 4}, duration_s=1.0, seed=3, recorder=rec,
                 workload=lambda ids: Poisson(ids, rate=3000, slo_ms=15, seed=5))
        inner = getattr(rec, "inner", rec)
        frames.append((inner.requests(), inner.actions()))
    (r1, a1), (r2, a2) = frames
    assert r1.height > 1000 and a1.height > 50
    assert set(r1["status"]) >= {"success", "dropped"} and (r1["message"] != "").any()
    assert r1.equals(r2) and a1.equals(a2)


def test_bad_value_inside_a_staged_block_keeps_order_and_is_named():
    rec = Recorder(stage_rows=4, chunk_rows=8)
    for i in range(30):
        rec.add_request_row(as_tuple(req(i, arrival=1.5 if i == 13 else 1000 * i, slo_factor=float(i)),
                                     REQUEST_FIELDS, rec))
    with pytest.raises(TelemetryError, match=r"request column 'arrival': value 1.5 \(float\)"):
        rec.flush()
    df = rec.requests()
    assert df["request_id"].to_list() == list(range(30))
    assert df["arrival"].to_list() == [None if i == 13 else 1000 * i for i in range(30)]
    assert df["slo_factor"].to_list() == [float(i) for i in range(30)]
    rec.close()


def test_in_memory_recorder_starts_no_thread():
    before = threading.active_count()
    rec = Recorder(stage_rows=8, chunk_rows=16)
    for i in range(1000):
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS, rec))
        rec.add_action_row(as_tuple(act(i), ACTION_FIELDS, rec))
    assert threading.active_count() == before
    assert rec.actions()["action_id"].to_list() == list(range(1000))
    rec.close()


def test_spill_thread_writes_parts_when_spill_rows_are_sealed_without_a_flush(tmp_path):
    import time

    rec = Recorder(tmp_path, stage_rows=10, chunk_rows=50, spill_rows=100, flush_interval_s=3600)
    for i in range(500):
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS, rec))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and read_telemetry(tmp_path)[0].height < 400:
        time.sleep(0.02)
    r = read_telemetry(tmp_path)[0]
    assert r.height >= 400 and r["request_id"].to_list() == list(range(r.height))
    rec.close()
    assert read_telemetry(tmp_path)[0]["request_id"].to_list() == list(range(500))
