"""Row writers (`Recorder.row_writer`, workbench/telemetry/row_writer.py): rows written straight into the recorder's
memory (by librt's native byte writer, or its Python stand-in where librt is missing); read back exactly as the
tuple path records them, in order, mid-run included; a row that does not convert falls back in its place."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from workbench.telemetry import ACTION_FIELDS, REQUEST_FIELDS, Recorder, TelemetryError
from workbench.telemetry.recorder import _WRITER_ROWS
from workbench.telemetry.row_writer import RowWriter



def request_row(rec: Recorder, i: int, status: str = "success") -> tuple:
    s = rec.strings
    t = 1_000_000_000 + 37_000 * i
    return (i, i % 15, s["resnet50"], 0, i % 2, 1 << (i % 4), t, t + 100_000_000, t + 9_000_000 + i, 100_000_000,
            s[status], 9_000_000 + i, i % 100 == 0, s[""], i // 3, 0.25 * i)


def action_row(rec: Recorder, i: int) -> tuple:
    s = rec.strings
    t = 2_000_000_000 + 41_000 * i
    return (i, 0, i % 2, s["INFER"], i % 15, 4, t, t + 5_000_000, t - 10_000, t + 1000, t + 2_001_000, 2_000_000,
            t + 2_100_000, t + 1500, t + 2_050_000, 2_048_500, 1980, 0, s["SUCCESS"], 1980, i % 7, 1, s[""])


class TuplesOnly(Recorder):
    """Records through `add_*_row` only (it hooks them, so it gets no writers): the reference."""

    def add_request_row(self, values: tuple) -> None:
        super().add_request_row(values)

    def add_action_row(self, values: tuple) -> None:
        super().add_action_row(values)


def test_writer_rows_read_back_as_the_tuple_path_records_them_across_buffers():
    n = 2 * _WRITER_ROWS + 377                      # two full buffers handed back, one partly filled
    rec, ref = Recorder(), TuplesOnly()
    assert ref.row_writer("request") is None
    wr, wa = rec.row_writer("request"), rec.row_writer("action")
    for i in range(n):
        assert wr.write(request_row(rec, i))
        ref.add_request_row(request_row(ref, i))
        if i % 5 == 0:
            assert wa.write(action_row(rec, i))
            ref.add_action_row(action_row(ref, i))
    assert rec.num_requests == n and rec.num_actions == len(range(0, n, 5))
    assert rec.requests().equals(ref.requests()) and rec.actions().equals(ref.actions())
    assert rec.requests()["request_id"].to_list() == list(range(n))
    assert rec.requests()["slo_factor"][-1] == 0.25 * (n - 1) and rec.requests()["cold_start"][100]


def test_a_read_sees_every_row_written_and_later_rows_follow_in_order():
    rec = Recorder()
    w = rec.row_writer("request")
    for i in range(10):
        w.write(request_row(rec, i))
    assert rec.requests()["request_id"].to_list() == list(range(10))     # a partly filled buffer, taken
    for i in range(10, 10 + _WRITER_ROWS + 5):
        w.write(request_row(rec, i))
        if i == 600:
            assert rec.num_requests == 601
    assert rec.requests()["request_id"].to_list() == list(range(10 + _WRITER_ROWS + 5))


def test_a_row_that_does_not_pack_is_recorded_in_its_place_and_named():
    rec = Recorder()
    w = rec.row_writer("request")
    w.write(request_row(rec, 0))
    nulls = list(request_row(rec, 1))
    nulls[8] = None                                   # completion unknown: a null, not an error
    assert not w.write(tuple(nulls))
    rec.add_request_row(tuple(nulls))                 # what the controller does with a row the writer refused
    bad = list(request_row(rec, 2))
    bad[6] = "soon"                                   # a str in the Int64 column `arrival`
    assert not w.write(tuple(bad))
    rec.add_request_row(tuple(bad))
    w.write(request_row(rec, 3))
    assert not w.write(request_row(rec, 4)[:14])     # too short: refused, nothing written
    with pytest.raises(TelemetryError, match=r"column 'arrival'.*'soon'"):
        rec.flush()
    df = rec.requests()
    assert df["request_id"].to_list() == [0, 1, 2, 3]
    assert df["completion"][1] is None and df["arrival"][2] is None and df["arrival"][3] is not None


def test_on_row_is_told_of_writer_rows_and_of_the_others():
    rec = Recorder()
    w = rec.row_writer("action")
    seen = []
    rec.on_row = lambda: seen.append(1)
    w.write(action_row(rec, 0))
    rec.add_request_row(request_row(rec, 1))
    rec.add_request(**dict(zip(REQUEST_FIELDS, request_row(rec, 2)), model="resnet50", status="success",
                           message=""))
    assert len(seen) == 3
    rec.on_row = None
    w.write(action_row(rec, 1))
    assert len(seen) == 3 and rec.num_actions == 2


def test_bad_kind_and_layout_are_named():
    with pytest.raises(ValueError, match="'request' or 'action'"):
        Recorder().row_writer("requests")
    with pytest.raises(ValueError, match="one 'd' or 'q' per column"):
        RowWriter("qqx", 4, lambda w: None)


def test_a_reader_thread_beside_the_writer_loses_and_repeats_nothing():
    rec = Recorder()
    w = rec.row_writer("request")
    n, stop, counts = 6 * _WRITER_ROWS + 11, threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            counts.append(rec.requests().height)

    t = threading.Thread(target=read)
    t.start()
    for i in range(n):
        w.write(request_row(rec, i))
    stop.set()
    t.join()
    assert rec.requests()["request_id"].to_list() == list(range(n))
    assert counts == sorted(counts) and counts[-1] <= n       # reads only ever grew


def test_spilling_recorder_writes_writer_rows_to_its_parts(tmp_path):
    rec = Recorder(tmp_path, spill_rows=_WRITER_ROWS, flush_interval_s=60)
    w = rec.row_writer("request")
    for i in range(3 * _WRITER_ROWS):
        w.write(request_row(rec, i))
    rec.close()
    df = pl.read_parquet(tmp_path / "requests.parquet")
    assert df["request_id"].to_list() == list(range(3 * _WRITER_ROWS))


def test_a_simulation_records_the_same_through_writers_as_through_tuples():
    from workbench.controller.simulation import simulate
    from workbench.workload import Poisson

    frames = []
    for rec in (Recorder(), TuplesOnly()):
        res = simulate({"resnet50": 6}, num_gpus=1, workers=1, duration_s=1.0, seed=2, recorder=rec,
                       workload=lambda ids: Poisson(ids, rate=800, slo_ms=50, seed=3))
        assert rec.num_requests == res.submitted > 500
        frames.append((rec.requests(), rec.actions()))
    assert frames[0][0].equals(frames[1][0]) and frames[0][1].equals(frames[1][1])


def test_recording_changes_nothing_a_simulation_serves():
    """In virtual time recording costs CPU only: the same arrivals give the same outcomes, request by request, and
    the same number of clock events with recording on and off."""
    from workbench.controller.simulation import simulate
    from workbench.workload import Poisson

    runs = []
    for rec in (None, Recorder()):
        res = simulate({"resnet50": 6}, num_gpus=2, workers=1, duration_s=1.0, seed=4, recorder=rec,
                       workload=lambda ids: Poisson(ids, rate=1500, slo_ms=25, seed=5))
        runs.append((res.submitted, res.statuses, res.events, res.summary))
    assert runs[0] == runs[1] and runs[0][0] > 1000 and sum(runs[0][1].values()) == runs[0][0]


def test_a_full_string_table_gives_one_shot_codes_and_the_same_rows():
    """The controller keeps the string codes of its rows in a dict of its own: only codes the table keeps for
    the run, never a one-shot code (which stands for one row only)."""
    from workbench.controller.simulation import simulate
    from workbench.workload import Poisson

    frames = []
    for cap in (0, 16_384):
        rec = Recorder()
        rec.strings.CAP = cap                         # 0: the table is full from the start
        simulate({"resnet50": 3}, num_gpus=1, workers=1, duration_s=0.5, seed=4, recorder=rec,
                 workload=lambda ids: Poisson(ids, rate=400, slo_ms=50, seed=5))
        assert len(rec.strings.values) == (0 if cap == 0 else len(set(rec.strings.values)))
        frames.append(rec.requests())
    assert frames[0].height > 100 and frames[0].equals(frames[1])
    assert set(frames[0]["model"]) == {"resnet50"} and "success" in set(frames[0]["status"])


# ------------------------------------------------------- librt's byte writer and the Python one agree with struct
@pytest.mark.parametrize("layout,row", [
    ("qqdq", (1, -2, 3.5, 2**62)),
    ("qqqqq", (0, 2**30, -(2**40) - 7, 2**60 - 1, -(2**60) + 1)),
    ("qd", (True, 7)),                                # a bool as 1, an int as a double
    ("qd", (np.int64(-5), np.float64(0.125))),        # __index__ / float subclasses, as struct takes them
    ("q", (2**63,)),                                  # out of range
    ("q", (1.0,)),                                    # a float for an int64: refused, as by struct
    ("d", ("1.0",)),
    ("q", (None,)),
    ("qq", (1,)),                                     # wrong length
])
def test_rows_are_written_as_struct_packs_them(layout, row):
    import struct

    try:
        want = struct.pack("<" + layout, *row)
    except (struct.error, TypeError):
        want = None
    w = RowWriter(layout, 4, lambda w: None)
    assert (w.buf.getvalue() if w.write(row) else None) == want
    assert want is not None or len(w.buf) == 0        # a refused row leaves nothing written


@pytest.mark.parametrize("fn,value", [("write_i64_le", v) for v in (0, -1, 2**62, 2**63, -(2**63), 1.0, "1", None)]
                         + [("write_f64_le", v) for v in (0.0, -2.5, 3, "1", None)])
def test_the_python_byte_writer_behaves_as_librts(fn, value):
    """Where librt (mypyc's runtime, installed with mypy) is missing, row_writer runs on byte_writer."""
    import librt.strings as lib
    from workbench.telemetry import byte_writer as py

    out = []
    for mod in (lib, py):
        w = mod.BytesWriter()
        try:
            getattr(mod, fn)(w, value)
            out.append(w.getvalue())
        except (TypeError, ValueError) as e:
            out.append(type(e))
    assert out[0] == out[1]


@pytest.mark.parametrize("kind, method, make", [("request", "write_request", request_row),
                                                 ("action", "write_action", action_row)])
def test_native_row_methods_write_what_write_does_from_the_tuple(kind, method, make):
    rec = Recorder()
    a, b = rec.row_writer(kind), rec.row_writer(kind)
    for i in (0, 1, 7, 10**6):
        row = make(rec, i)
        assert getattr(a, method)(*row) and b.write(row)
    assert a.buf.getvalue() == b.buf.getvalue() and len(a.buf) == 4 * a.rowsize
    assert not getattr(a, method)(2**63, *make(rec, 5)[1:])     # out of int64: refused, nothing written
    assert len(a.buf) == 4 * a.rowsize
    other = "action" if kind == "request" else "request"
    with pytest.raises(ValueError, match=f"{method} on a writer of layout"):
        getattr(rec.row_writer(other), method)(*make(rec, 0))


def test_an_action_row_with_a_number_of_another_type_is_recorded_and_named():
    """A worker that reports a float time: the native call refuses it (compiled, at the call), the row goes to the
    recorder's checking path in its place, which names the value."""
    from workbench.clock import VirtualClock
    from workbench.contract import ActionType, LoadWeightsResult, Status, Timing
    from workbench.controller.controller import ActionRecord, Controller

    rec = Recorder()
    ctl = Controller(VirtualClock(), recorder=rec)
    ok = ActionRecord(1, ActionType.LOAD_WEIGHTS, 0, None, None, 10, 20, 5, 10, 7)
    bad = ActionRecord(2, ActionType.LOAD_WEIGHTS, 0, None, None, 10, 20, 5, 10, 7)
    ctl._record_action(ok, LoadWeightsResult(1, ActionType.LOAD_WEIGHTS, timing=Timing(11, 18, 7)), 30)
    ctl._record_action(bad, LoadWeightsResult(2, ActionType.LOAD_WEIGHTS, timing=Timing(11, 18.5, 7.5)), 31)
    ctl._record_action(ok, LoadWeightsResult(1, ActionType.LOAD_WEIGHTS, timing=Timing(12, 19, 7)), 32)
    with pytest.raises(TelemetryError, match="measured_end"):
        rec.actions()
    assert rec.num_actions == 3


def test_request_and_action_layouts_match_the_schema():
    """The native row methods' layouts are the schema's (a column added there must be added to them)."""
    from workbench.telemetry.row_writer import ACTION_LAYOUT, REQUEST_LAYOUT

    rec = Recorder()
    assert rec.row_writer("request").layout == REQUEST_LAYOUT and len(REQUEST_LAYOUT) == len(REQUEST_FIELDS)
    assert rec.row_writer("action").layout == ACTION_LAYOUT and len(ACTION_LAYOUT) == len(ACTION_FIELDS)


def test_without_librt_the_python_byte_writer_records_the_same(tmp_path):
    """The GPU machine has no librt (and runs the core from its sources): the rows must come out the same."""
    import json
    import os
    import subprocess
    import sys

    code = ("import sys, json\n"
            "sys.modules['librt'] = sys.modules['librt.strings'] = None      # as if not installed\n"
            "from workbench.controller.compiled import prefer_sources; prefer_sources()\n"
            "import test_telemetry_row_writer as t\n"
            "from workbench.telemetry import Recorder\n"
            "from workbench.telemetry import row_writer\n"
            "rec = Recorder(); w = rec.row_writer('request')\n"
            "[w.write_request(*t.request_row(rec, i)) for i in range(3000)]\n"
            "print(json.dumps([row_writer.BytesWriter.__module__, rec.requests().write_csv()]))\n")
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", code], cwd=here.parent, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{here.parent}:{here}"})
    assert out.returncode == 0, out.stderr[-2000:]
    module, csv = json.loads(out.stdout.strip().splitlines()[-1])
    rec = Recorder()
    w = rec.row_writer("request")
    for i in range(3000):
        w.write_request(*request_row(rec, i))
    assert module == "workbench.telemetry.byte_writer" and csv == rec.requests().write_csv()
