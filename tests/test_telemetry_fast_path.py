"""Recorder's positional fast path (`add_request_row` / `add_action_row`): the same frames as the keyword path,
checks deferred to conversion (bad rows named, the rest kept), order and completeness under threads, and
subclasses that hook the keyword methods still seeing every row."""
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


def as_tuple(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row[f] for f in fields)


def test_fields_are_the_schema_order():
    assert REQUEST_FIELDS == tuple(c.name for c in REQUEST_COLUMNS) and len(REQUEST_FIELDS) == 16
    assert ACTION_FIELDS == tuple(c.name for c in ACTION_COLUMNS) and len(ACTION_FIELDS) == 23
    assert set(req(0)) == set(REQUEST_FIELDS) and set(act(0)) == set(ACTION_FIELDS)


def test_positional_rows_equal_keyword_rows_and_interleave_in_order():
    kw, pos, mixed = Recorder(chunk_rows=7), Recorder(chunk_rows=7), Recorder(chunk_rows=7)
    for i in range(50):
        kw.add_request(**req(i))
        kw.add_action(**act(i))
        pos.add_request_row(as_tuple(req(i), REQUEST_FIELDS))
        pos.add_action_row(as_tuple(act(i), ACTION_FIELDS))
        if i % 2:
            mixed.add_request(**req(i))
        else:
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
    rec.add_action_row(as_tuple(act(0), ACTION_FIELDS))
    rec.add_action_row(as_tuple(act(1, gpu_clock="fast"), ACTION_FIELDS))
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
            rec.add_request_row(as_tuple(req(k * 100_000 + i), REQUEST_FIELDS))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    counts = []
    while any(t.is_alive() for t in threads):
        counts.append(rec.num_requests)   # pending + being converted + converted: never goes back
    for t in threads:
        t.join()
    assert counts == sorted(counts)
    ids = rec.requests()["request_id"]
    assert ids.len() == 4 * n and ids.n_unique() == 4 * n and rec.num_requests == 4 * n
    for k in range(4):
        mine = ids.filter((ids >= k * 100_000) & (ids < (k + 1) * 100_000)).to_list()
        assert mine == list(range(k * 100_000, k * 100_000 + n))
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
    rec.add_request_row(as_tuple(req(4), REQUEST_FIELDS))
    rec.add_action_row(as_tuple(act(9), ACTION_FIELDS))
    rec.add_request(**req(5))
    assert seen == [("request", 4), ("action", 9), ("request", 5)]
    with pytest.raises(TelemetryError, match="got 3 values"):   # routed rows are checked at once
        rec.add_request_row((1, 2, 3))
    assert rec.requests()["request_id"].to_list() == [4, 5]
    assert Recorder.add_request_row is not Hooked.add_request_row   # the base class keeps its fast path
    rec.close()


def test_ui_session_recorder_is_poked_for_positional_rows():
    from workbench.ui.session import _NotifyingRecorder

    rec = _NotifyingRecorder()
    pokes = []
    rec.on_row = lambda: pokes.append(1)
    rec.add_request_row(as_tuple(req(0), REQUEST_FIELDS))
    rec.add_action_row(as_tuple(act(0), ACTION_FIELDS))
    assert len(pokes) == 2 and rec.num_requests == 1 and rec.num_actions == 1
    rec.close()


def test_positional_rows_spill_and_consolidate(tmp_path):
    rec = Recorder(tmp_path, chunk_rows=100, spill_rows=200, flush_interval_s=60)
    for i in range(1000):
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS))
    rec.flush()   # converted; 1000 rows >= spill_rows: parts written as the chunks come
    assert sum(pl.read_parquet(p).height for p in tmp_path.glob("requests.part-*.parquet")) >= 800
    rec.close()
    r, a = read_telemetry(tmp_path)
    assert r["request_id"].to_list() == list(range(1000)) and a.height == 0


def test_pending_rows_hold_no_garbage_collected_objects():
    """The caller's tuple is not kept: thousands of pending rows must not drive Python's cyclic GC (documented
    property; holding them made the GC run several times more often in a simulation)."""
    import gc

    rec = Recorder(chunk_rows=1 << 30)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(5000):
            rec.add_request_row((i, 1, "m", 0, 0, 1, i, i, i, 5, "success", 0, False, "", -1, 0.0))
        grew = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert grew < 100 and rec.num_requests == 5000
    assert rec.requests()["arrival"].to_list() == list(range(5000))
    rec.close()


def test_pending_python_values_stay_bounded_and_the_rest_is_compact():
    """A long run holds at most `stage_rows` rows as Python values; numeric columns wait in 8-byte buffers."""
    from array import array

    rec = Recorder(stage_rows=64, chunk_rows=1000)
    for i in range(10_000):
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS))
        assert rec._req.pending <= 64
    t = rec._req
    assert t.staged_rows + t.frame_rows + t.pending == 10_000 == rec.num_requests
    kinds = {c.name: type(col) for c, col in zip(REQUEST_COLUMNS, t.staged)}
    assert kinds["arrival"] is array and kinds["slo_factor"] is array and kinds["status"] is list
    assert rec.requests()["request_id"].to_list() == list(range(10_000))
    rec.close()


def test_bad_value_inside_a_staged_block_keeps_order_and_is_named():
    rec = Recorder(stage_rows=4, chunk_rows=8)
    for i in range(30):
        rec.add_request_row(as_tuple(req(i, arrival=1.5 if i == 13 else 1000 * i, slo_factor=float(i)),
                                     REQUEST_FIELDS))
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
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS))
        rec.add_action_row(as_tuple(act(i), ACTION_FIELDS))
    assert threading.active_count() == before
    assert rec.actions()["action_id"].to_list() == list(range(1000))
    rec.close()


def test_spill_thread_writes_parts_when_spill_rows_are_sealed_without_a_flush(tmp_path):
    import time

    rec = Recorder(tmp_path, stage_rows=10, chunk_rows=50, spill_rows=100, flush_interval_s=3600)
    for i in range(500):
        rec.add_request_row(as_tuple(req(i), REQUEST_FIELDS))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and read_telemetry(tmp_path)[0].height < 400:
        time.sleep(0.02)
    r = read_telemetry(tmp_path)[0]
    assert r.height >= 400 and r["request_id"].to_list() == list(range(r.height))
    rec.close()
    assert read_telemetry(tmp_path)[0]["request_id"].to_list() == list(range(500))
