"""Clockwork TSV export and import: the columns Clockwork writes, round trips, and malformed logs."""
from __future__ import annotations

import polars as pl
import pytest

from workbench.telemetry import rows_to_frame
from workbench.telemetry import clockwork_tsv as T
from workbench.telemetry import summary as S

MS = 1_000_000


def frames():
    reqs = rows_to_frame([
        dict(request_id=0, model_id=3, arrival=100 * MS, slo=50 * MS, deadline=150 * MS, completion=120 * MS,
             latency=20 * MS, status="success", cold_start=True, action_id=7, batch_size=2),
        dict(request_id=1, model_id=3, arrival=101 * MS, slo=50 * MS, deadline=151 * MS, completion=160 * MS,
             latency=59 * MS, status="success", action_id=7, batch_size=2),
        dict(request_id=2, model_id=4, arrival=102 * MS, slo=50 * MS, deadline=152 * MS, completion=152 * MS,
             latency=50 * MS, status="timeout"),
        dict(request_id=3, model_id=4, arrival=103 * MS, slo=50 * MS, deadline=153 * MS, completion=110 * MS,
             latency=7 * MS, status="dropped"),
    ])
    acts = rows_to_frame([
        dict(action_id=6, type="LOAD_WEIGHTS", worker=0, gpu=1, model_id=3, sent=101 * MS, planned_end=104 * MS,
             predicted_duration=2 * MS, measured_begin=102 * MS, measured_end=105 * MS,
             measured_duration=3 * MS, completed=106 * MS, status=0, status_name="SUCCESS"),
        dict(action_id=7, type="INFER", worker=0, gpu=1, model_id=3, batch_size=2, sent=106 * MS,
             planned_end=112 * MS, predicted_duration=5 * MS, measured_begin=107 * MS, measured_end=113 * MS,
             measured_duration=6 * MS, completed=114 * MS, gpu_clock=1980, gpu_clock_before=1975, status=0,
             status_name="SUCCESS", requests_queued=2, copies_loaded=1),
        dict(action_id=8, type="INFER", worker=0, gpu=1, model_id=4, batch_size=1, sent=107 * MS,
             completed=109 * MS, status=81, status_name="EXEC_TOO_LATE"),
    ], "action")
    return reqs, acts


def test_columns_and_values_match_clockwork(tmp_path):
    reqs, acts = frames()
    rp, ap = T.write_clockwork_tsv(reqs, acts, tmp_path)
    header = rp.read_text().splitlines()[0].split("\t")
    assert tuple(header) == T.REQUEST_LOG_COLUMNS
    assert tuple(ap.read_text().splitlines()[0].split("\t")) == T.ACTION_LOG_COLUMNS
    r = pl.read_csv(rp, separator="\t")
    assert r["t"].to_list() == [120 * MS, 160 * MS, 152 * MS, 110 * MS]          # t = departure
    assert r["result"].to_list() == [0, 0, 4, 8]
    assert r["deadline"].to_list() == [50 * MS] * 4                           # the SLO, as Clockwork logs it
    assert r["deadline_met"].to_list() == [1, 0, 0, 0]
    assert r["is_coldstart"].to_list() == [1, 0, 0, 0]
    a = pl.read_csv(ap, separator="\t")
    assert a["action_type"].to_list() == [1, 2, 2]
    infer = a.row(1, named=True)
    assert infer["expected_exec_complete"] == 6 * MS and infer["worker_exec_complete"] == 7 * MS   # vs sent
    assert infer["worker_gpu_clock_before"] == 1975 and infer["worker_gpu_clock"] == 1980
    assert infer["goodput"] == 3 * MS            # 6 ms of exec x half its requests met their deadline
    assert infer["requests_queued"] == 2
    assert a.row(2, named=True)["status"] == 81 and a.row(0, named=True)["goodput"] == -1


def test_round_trip_preserves_what_summaries_use(tmp_path):
    reqs, acts = frames()
    T.write_clockwork_tsv(reqs, acts, tmp_path)
    r2 = T.read_clockwork_request_log(tmp_path / T.REQUEST_LOG)
    a2 = T.read_clockwork_action_log(tmp_path / T.ACTION_LOG)
    for col in ("request_id", "model_id", "arrival", "deadline", "completion", "slo", "status", "latency",
                "cold_start"):
        assert r2[col].to_list() == reqs[col].to_list(), col
    assert S.summarize(r2)["slo_met"] == S.summarize(reqs)["slo_met"] == 1
    assert a2["type"].to_list() == ["LOAD_WEIGHTS", "INFER", "INFER"]
    e1, e2 = S.prediction_errors(acts), S.prediction_errors(a2)
    assert e1["prediction_error_ns"].to_list() == e2["prediction_error_ns"].to_list()
    assert e1["completion_error_ns"].to_list() == e2["completion_error_ns"].to_list()


def test_unknown_status_cannot_be_exported():
    reqs = rows_to_frame([dict(request_id=0, model_id=0, arrival=0, status="lost")])
    with pytest.raises(ValueError, match=r"statuses \['lost'\] have no Clockwork result code"):
        T.request_log(reqs)


def test_malformed_logs_are_named(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("t\trequest_id\n1\t2\n")
    with pytest.raises(ValueError, match=r"x.tsv: not a Clockwork log: header lacks \['result'"):
        T.read_clockwork_request_log(p)
    q = tmp_path / "y.tsv"
    q.write_text("\t".join(T.REQUEST_LOG_COLUMNS) + "\n" + "\t".join(["1", "0", "99"] + ["0"] * 9) + "\n")
    with pytest.raises(ValueError, match=r"result codes \[99\]"):
        T.read_clockwork_request_log(q)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        T.read_clockwork_action_log(tmp_path / "nope.tsv")
