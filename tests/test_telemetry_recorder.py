"""Recorder: rows in, polars frames and Parquet out; chunking, spilling, bad rows, killed writers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from workbench.contract import Status
from workbench.telemetry import (ACTION_SCHEMA, REQUEST_SCHEMA, Recorder, TelemetryError, read_telemetry,
                                 rows_to_frame)

REPO = Path(__file__).resolve().parents[1]


def req(i: int, **kw) -> dict:
    row = dict(request_id=i, model_id=i % 3, model="resnet50", worker=0, gpu=i % 2, batch_size=1 + i % 4,
               arrival=1000 * i, deadline=1000 * i + 500, completion=1000 * i + 300, slo=500, status="success",
               latency=300, cold_start=(i == 0), message="")
    row.update(kw)
    return row


def act(i: int, **kw) -> dict:
    row = dict(action_id=i, worker=0, gpu=0, type="INFER", model_id=1, batch_size=2, earliest=10, latest=20,
               sent=5, planned_begin=10, planned_end=15, predicted_duration=5, completed=16, measured_begin=10,
               measured_end=16, measured_duration=6, gpu_clock=1980, status=Status.SUCCESS, status_name="SUCCESS")
    row.update(kw)
    return row


def test_parquet_round_trip_keeps_values_and_schema(tmp_path):
    rec = Recorder()
    for i in range(10):
        rec.add_request(**req(i))
    rec.add_action(**act(0))
    rec.add_action(**act(1, type="LOAD_WEIGHTS", status=Status.LOAD_WEIGHTS_TOO_LATE,
                        status_name="LOAD_WEIGHTS_TOO_LATE"))
    rec.write(tmp_path)
    r, a = read_telemetry(tmp_path)
    assert r.schema == pl.Schema(REQUEST_SCHEMA) and a.schema == pl.Schema(ACTION_SCHEMA)
    assert r["request_id"].to_list() == list(range(10))
    assert r["cold_start"].to_list() == [True] + [False] * 9
    assert r.row(3, named=True)["batch_size"] == 4
    assert a["status"].to_list() == [0, 51]   # IntEnum stored as its code
    assert a["type"].to_list() == ["INFER", "LOAD_WEIGHTS"]
    assert r.equals(rec.requests()) and a.equals(rec.actions())
    rec.close()


def test_missing_optional_columns_get_defaults():
    df = rows_to_frame([dict(request_id=7, model_id=2, arrival=5, status="dropped")])
    row = df.row(0, named=True)
    assert (row["gpu"], row["batch_size"], row["worker"], row["cold_start"], row["message"]) == (-1, 0, -1, False, "")
    adf = rows_to_frame([dict(action_id=1, type="EVICT_WEIGHTS")], "action")
    assert adf.row(0, named=True)["requests_queued"] == -1


def test_unknown_or_missing_column_is_rejected_and_nothing_recorded():
    rec = Recorder()
    rec.add_request(**req(0))
    with pytest.raises(TelemetryError, match=r"unknown column\(s\) \['latncy'\]"):
        rec.add_request(**req(1, latncy=3))
    bad = req(2)
    del bad["arrival"]
    with pytest.raises(TelemetryError, match=r"missing required column\(s\) \['arrival'\]"):
        rec.add_request(**bad)
    with pytest.raises(TelemetryError, match="type"):
        rec.add_action(action_id=3)
    assert rec.requests().height == 1 and rec.actions().height == 0
    rec.close()


def test_value_of_wrong_type_is_named_and_other_rows_kept():
    rec = Recorder()
    rec.add_request(**req(0))
    rec.add_request(**req(1, arrival=1.5))
    with pytest.raises(TelemetryError, match=r"column 'arrival': value 1.5 \(float\)"):
        rec.requests()
    df = rec.requests()   # the error is reported once; the rows stay
    assert df.height == 2 and df["arrival"].to_list() == [0, None]
    rec.close()


def test_chunks_keep_order_across_many_rows():
    rec = Recorder(chunk_rows=100)
    for i in range(1050):
        rec.add_request(**req(i))
        if i == 500:
            assert rec.requests().height == 501   # reading mid-run does not disturb recording
    assert rec.num_requests == 1050
    assert rec.requests()["request_id"].to_list() == list(range(1050))
    rec.close()


def test_concurrent_writers_lose_nothing():
    rec = Recorder(chunk_rows=64)

    def work(k: int) -> None:
        for i in range(2000):
            rec.add_request(**req(k * 10_000 + i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = rec.requests()["request_id"]
    assert ids.len() == 8000 and ids.n_unique() == 8000
    rec.close()


def test_spill_writes_readable_parts_then_consolidates(tmp_path):
    rec = Recorder(tmp_path, chunk_rows=50, spill_rows=100, flush_interval_s=0.1)
    for i in range(330):
        rec.add_request(**req(i))
    rec.add_action(**act(0))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:   # the timed flush also picks up rows still in the lists
        if read_telemetry(tmp_path)[0].height == 330 and read_telemetry(tmp_path)[1].height == 1:
            break
        time.sleep(0.05)
    assert read_telemetry(tmp_path)[0]["request_id"].to_list() == list(range(330))
    assert list(tmp_path.glob("requests.part-*.parquet"))
    rec.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actions.parquet", "requests.parquet"]
    r, a = read_telemetry(tmp_path)
    assert r.height == 330 and a.height == 1
    rec.close()   # idempotent


def test_killed_writer_leaves_readable_parts(tmp_path):
    """A process killed with SIGKILL mid-run: everything up to its last timed flush reads back."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from workbench.telemetry import Recorder
        rec = Recorder({str(tmp_path)!r}, chunk_rows=10, spill_rows=10**9, flush_interval_s=0.1)
        i = 0
        while True:
            rec.add_request(request_id=i, model_id=0, arrival=i, status="success")
            i += 1
            if i % 100 == 0:
                print(i, flush=True)
                time.sleep(0.01)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if int(line) >= 3000:
                break
        deadline = time.monotonic() + 30   # wait for a timed flush that holds the first 3000 rows
        while time.monotonic() < deadline and read_telemetry(tmp_path)[0].height < 3000:
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    assert not (tmp_path / "requests.parquet").exists()
    r, _ = read_telemetry(tmp_path)
    assert r.height >= 3000
    assert r["request_id"].to_list() == list(range(r.height))   # a prefix, in order, no gaps


def test_read_telemetry_of_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_telemetry(tmp_path / "nope")


def test_empty_recorder_writes_empty_frames_with_schema(tmp_path):
    rec = Recorder()
    rec.write(tmp_path)
    r, a = read_telemetry(tmp_path)
    assert r.height == 0 and r.schema == pl.Schema(REQUEST_SCHEMA) and a.schema == pl.Schema(ACTION_SCHEMA)
    rec.close()
    assert os.path.exists(tmp_path / "requests.parquet")


def test_rows_after_close_are_still_readable(tmp_path):
    rec = Recorder(tmp_path, chunk_rows=10)
    for i in range(25):
        rec.add_request(**req(i))
    rec.close()
    rec.add_request(**req(25))   # e.g. a late completion callback
    assert rec.requests().height == 26
    assert read_telemetry(tmp_path)[0].height == 25   # the files hold what was there at close


def test_close_writes_everything_before_reporting_a_bad_value(tmp_path):
    rec = Recorder(tmp_path)
    rec.add_request(**req(0))
    rec.add_request(**req(1, latency="slow"))
    with pytest.raises(TelemetryError, match=r"column 'latency': value 'slow'"):
        rec.close()
    r, _ = read_telemetry(tmp_path)
    assert r["request_id"].to_list() == [0, 1] and r["latency"].to_list() == [300, None]
