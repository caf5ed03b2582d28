"""Summaries computed on small frames whose answers are known by hand."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from workbench.telemetry import rows_to_frame
from workbench.telemetry import summary as S

MS = 1_000_000
S_ = 1_000_000_000


def requests_frame() -> pl.DataFrame:
    rows = []
    # 10 requests, one every 100 ms, SLO 50 ms; latencies 10..100 ms; two fail
    for i in range(10):
        arrival = i * 100 * MS
        lat = (i + 1) * 10 * MS
        status = "timeout" if i == 8 else "dropped" if i == 9 else "success"
        rows.append(dict(request_id=i, model_id=i % 2, model="a" if i % 2 == 0 else "b", arrival=arrival,
                         slo=50 * MS, deadline=arrival + 50 * MS, completion=arrival + lat, latency=lat,
                         status=status, cold_start=i in (0, 1), batch_size=1 if status == "success" else 0))
    return rows_to_frame(rows)


def test_attainment_goodput_and_percentiles():
    r = requests_frame()
    s = S.summarize(r, start=0, end=1 * S_)
    assert s["requests"] == 10 and s["success"] == 8
    assert s["by_status"] == {"dropped": 1, "success": 8, "timeout": 1}
    assert s["slo_met"] == 5                      # latencies 10..50 ms meet a 50 ms SLO
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["goodput_rps"] == pytest.approx(5.0)  # 5 in a 1 s window
    assert s["throughput_rps"] == pytest.approx(8.0)
    assert s["cold_starts"] == 2
    lat = s["latency_ms"]                          # successes: 10..80 ms
    assert lat["p50"] == pytest.approx(45.0) and lat["max"] == pytest.approx(80.0)
    assert lat["p99"] == pytest.approx(np.percentile(np.arange(10, 90, 10), 99))
    assert set(s["per_model"]) == {"a", "b"}
    assert s["per_model"]["a"]["slo_met"] == 3 and s["per_model"]["b"]["slo_met"] == 2


def test_warmup_excludes_early_arrivals():
    s = S.summarize(requests_frame(), start=0, end=1 * S_, warmup_ns=500 * MS)
    assert s["requests"] == 5 and s["slo_met"] == 0 and s["window"]["duration_s"] == pytest.approx(0.5)


def test_empty_frame_gives_nan_not_crash():
    s = S.summarize(rows_to_frame([]))
    assert s["requests"] == 0 and math.isnan(s["slo_attainment"]) and math.isnan(s["latency_ms"]["p50"])


def test_per_model_by_instance():
    pm = S.per_model(requests_frame(), by="model_id", duration_ns=S_)
    assert pm["model_id"].to_list() == [0, 1]
    assert pm["requests"].to_list() == [5, 5]
    assert pm["goodput_rps"].to_list() == [3.0, 2.0]


def actions_frame() -> pl.DataFrame:
    rows = []
    for i, (b, done) in enumerate([(1, 150), (4, 250), (4, 260), (8, 900)]):
        rows.append(dict(action_id=i, type="INFER", model_id=0, batch_size=b, completed=done * MS, status=0,
                         predicted_duration=10 * MS, measured_duration=(8 + 2 * i) * MS,
                         planned_end=done * MS, measured_end=done * MS + (i - 1) * MS))
    rows.append(dict(action_id=9, type="LOAD_WEIGHTS", model_id=0, completed=5 * MS, status=0,
                     predicted_duration=2 * MS, measured_duration=3 * MS))
    rows.append(dict(action_id=10, type="INFER", model_id=0, batch_size=2, completed=6 * MS, status=81,
                     status_name="EXEC_TOO_LATE"))
    return rows_to_frame(rows, "action")


def test_per_minute_buckets_and_weighted_batch():
    r, a = requests_frame(), actions_frame()
    pm = S.per_minute(r, a, bucket_s=0.5, start=0)
    assert pm["bucket"].to_list() == [0, 1, 2]   # the last request completes at exactly 1 s
    first = pm.row(0, named=True)
    # completions before 500 ms: requests 0..4 (completion = 100 i + 10 (i+1) ms), all within 50 ms
    assert first["completed"] == 5 and first["slo_met"] == 5
    assert first["goodput_rps"] == pytest.approx(10.0)
    # INFER actions completing in [0, 500 ms): batches 1, 4, 4 -> sum b^2 / sum b = 33 / 9; the failed one ignored
    assert first["mean_batch"] == pytest.approx(33 / 9)
    assert pm.row(1, named=True)["mean_batch"] == pytest.approx(8.0)
    assert pm.row(2, named=True)["mean_batch"] is None
    assert first["cold_starts"] == 2 and first["cold_models"] == 2


def test_prediction_error_cdf_and_tails():
    a = actions_frame()
    e = S.prediction_errors(a)
    inf = e.filter(pl.col("type") == "INFER")
    assert inf["prediction_error_ns"].to_list() == [2 * MS, 0, -2 * MS, -4 * MS]   # predicted - measured
    assert inf["completion_error_ns"].to_list() == [1 * MS, 0, -1 * MS, -2 * MS]
    cdf = S.error_cdf(a, points=5)
    c = cdf.filter((pl.col("type") == "INFER") & (pl.col("metric") == "prediction"))
    assert c["cdf"].to_list() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert c["error_ms"].to_list()[0] == -4.0 and c["error_ms"].to_list()[-1] == 2.0
    assert c["error_ms"].is_sorted()
    load = cdf.filter((pl.col("type") == "LOAD_WEIGHTS") & (pl.col("metric") == "prediction"))
    assert load["error_ms"].to_list() == [-1.0] * 5
    tails = S.error_tails(a)
    under = tails.filter((pl.col("type") == "INFER") & (pl.col("metric") == "prediction") & (pl.col("side") == "under"))
    assert under["quantile"].to_list() == [0.5] and under["n"].to_list() == [2]
    assert under["error_ms"].to_list() == [3.0]   # median of 2 ms and 4 ms under-predictions
    s = S.action_stats(a)
    assert s["INFER"]["failures"] == {"EXEC_TOO_LATE": 1}
    assert s["INFER"]["prediction_error_ms"]["under_predicted_fraction"] == pytest.approx(0.5)


def test_cache_occupancy_follows_loads_evicts_and_clears():
    rows = [
        dict(action_id=1, type="LOAD_WEIGHTS", gpu=0, model_id=1, status=0, measured_begin=10, completed=20),
        dict(action_id=2, type="LOAD_WEIGHTS", gpu=0, model_id=2, status=0, measured_begin=30, completed=40),
        dict(action_id=3, type="LOAD_WEIGHTS", gpu=1, model_id=1, status=0, measured_begin=35, completed=45),
        dict(action_id=4, type="LOAD_WEIGHTS", gpu=0, model_id=3, status=53, measured_begin=0, completed=50),
        dict(action_id=5, type="EVICT_WEIGHTS", gpu=0, model_id=1, status=0, measured_end=60, completed=61),
        dict(action_id=6, type="CLEAR_CACHE", gpu=-1, status=0, measured_end=0, completed=100),
    ]
    occ = S.cache_occupancy(rows_to_frame(rows, "action"), {1: 7, 2: 3, 3: 5})
    g0 = occ.filter(pl.col("gpu") == 0)
    assert g0["t"].to_list() == [10, 30, 60, 100]
    assert g0["pages"].to_list() == [7, 10, 3, 0]     # the failed load (53) never occupied anything
    assert g0["models"].to_list() == [1, 2, 1, 0]
    g1 = occ.filter(pl.col("gpu") == 1)
    assert g1["pages"].to_list() == [7, 0]            # the clear empties every GPU of the worker
