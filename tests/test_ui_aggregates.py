"""The polars aggregates behind the live charts, on hand-made telemetry rows with known answers."""
from __future__ import annotations

import math

import polars as pl
import pytest

from workbench.telemetry.recorder import rows_to_frame
from workbench.ui import aggregates as A
from workbench.ui import charts as C

MS = 1_000_000
T0 = 10_000 * MS


def act(aid, type_, *, gpu=0, model=0, b=1, begin=0, dur=1 * MS, pred=None, status=0, latest=None, planned=None):
    begin = T0 + begin
    pb = T0 + (planned if planned is not None else 0) if planned is not None else begin
    return dict(action_id=aid, gpu=gpu, type=type_, model_id=model, batch_size=b, earliest=begin,
                latest=latest if latest is not None else begin + 5 * MS, sent=begin - MS // 10,
                planned_begin=pb, planned_end=pb + (pred or dur), predicted_duration=pred if pred is not None else dur,
                completed=begin + dur + 1000, measured_begin=begin, measured_end=begin + dur, measured_duration=dur,
                status=status, status_name="SUCCESS" if status == 0 else "EXEC_TOO_LATE")


def req(rid, status, *, model=0, name="mlp", arrival=0, latency=2 * MS, cold=False):
    a = T0 + arrival
    return dict(request_id=rid, model_id=model, model=name, gpu=0, batch_size=1, arrival=a, deadline=a + 10 * MS,
                completion=a + latency, slo=10 * MS, status=status, latency=latency, cold_start=cold)


def test_histogram_counts_every_successful_action_once_by_series():
    rows = [act(i, "INFER", model=i % 2, b=1 + (i % 2), dur=(1 + i % 3) * MS) for i in range(30)]
    rows += [act(100, "LOAD_WEIGHTS", dur=3 * MS), act(101, "EVICT_WEIGHTS", dur=10_000),
             act(102, "INFER", status=81)]                                  # failed: not a latency sample
    h = A.latency_histogram(rows_to_frame(rows, "action"), {0: "mlp", 1: "resnet18"})
    by = {s: n for s, n in h.group_by("series").agg(pl.col("n").sum()).iter_rows()}
    assert by == {"mlp b1": 15, "resnet18 b2": 15, "LOAD": 1, "EVICT": 1}
    assert set(h["kind"]) == {"INFER", "LOAD", "EVICT"}
    assert (h["hi"] > h["lo"]).all()
    one = h.filter(pl.col("series") == "LOAD").row(0, named=True)
    assert one["lo"] <= 3.0 < one["hi"]     # the 3 ms load falls in its bin


def test_percentiles_and_prediction_error():
    # measured 1..100 us above a 1 ms prediction
    rows = [act(i, "INFER", dur=MS + (i + 1) * 1000, pred=MS) for i in range(100)]
    acts = rows_to_frame(rows, "action")
    p = A.latency_percentiles(acts, {0: "mlp"}).row(0, named=True)
    assert p["series"] == "mlp b1" and p["n"] == 100
    assert p["p50"] == pytest.approx(1.0505, abs=1e-3)
    assert p["max"] == pytest.approx(1.1)
    assert p["predicted p50"] == pytest.approx(1.0)
    assert p["error p50 (us)"] == pytest.approx(50.5)
    assert p["under-predicted %"] == pytest.approx(100.0)
    cdf = A.prediction_error_cdf(acts)
    assert cdf.height == 99 and cdf["kind"].unique().to_list() == ["INFER"]
    assert cdf["error_us"].is_sorted() and 1 <= cdf["error_us"].min() and cdf["error_us"].max() <= 100


def test_many_infer_series_are_capped():
    rows = [act(i, "INFER", model=i) for i in range(A.MAX_SERIES + 5)]
    h = A.latency_histogram(rows_to_frame(rows, "action"))
    assert h["series"].n_unique() == A.MAX_SERIES + 1 and "INFER other" in h["series"].to_list()


def test_timeline_window_planned_and_actual_and_slack():
    rows = [act(1, "INFER", begin=0), act(2, "INFER", gpu=1, begin=5000 * MS, latest=T0 + 5000 * MS + 3 * MS),
            act(3, "LOAD_WEIGHTS", begin=5001 * MS, planned=5000 * MS + MS // 2, dur=2 * MS),
            act(4, "EVICT_WEIGHTS", begin=5002 * MS)]
    tl = A.timeline(rows_to_frame(rows, "action"), T0, now=T0 + 5010 * MS, window_s=1.0, names={0: "mlp"})
    assert sorted(set(tl["kind"])) == ["INFER", "LOAD"]            # evicts are not spans; action 1 is too old
    assert tl.height == 4 and set(tl["which"]) == {"planned", "actual"}
    inf = tl.filter((pl.col("kind") == "INFER") & (pl.col("which") == "actual")).row(0, named=True)
    assert inf["gpu"] == "GPU 1" and inf["model"] == "mlp"
    assert inf["begin"] == pytest.approx(5.0) and inf["slack_ms"] == pytest.approx(3.0)
    load = tl.filter(pl.col("kind") == "LOAD").sort("which")
    assert load["begin"].to_list() == pytest.approx([5.001, 5.0005])   # actual began 0.5 ms after planned


def test_cache_occupancy_tracks_loads_and_evicts():
    rows = [act(1, "LOAD_WEIGHTS", model=0, begin=0), act(2, "LOAD_WEIGHTS", model=1, begin=10 * MS),
            act(3, "EVICT_WEIGHTS", model=0, begin=20 * MS), act(4, "LOAD_WEIGHTS", model=2, gpu=1, begin=0),
            act(5, "LOAD_WEIGHTS", model=3, begin=30 * MS, status=53)]     # insufficient cache: no change
    occ = A.cache_occupancy(rows_to_frame(rows, "action"), T0, pages={0: 4, 1: 6, 2: 1},
                            cache_pages={0: 20, 1: 10})
    g0 = occ.filter(pl.col("gpu") == "GPU 0")
    assert g0["used"].to_list() == [4, 10, 6] and g0["percent"].to_list() == pytest.approx([20.0, 50.0, 30.0])
    assert occ.filter(pl.col("gpu") == "GPU 1")["used"].to_list() == [1]
    extended = A.cache_occupancy(rows_to_frame(rows, "action"), T0, pages={0: 4, 1: 6, 2: 1}, now=T0 + 5 * 10**9)
    g0 = extended.filter(pl.col("gpu") == "GPU 0")
    assert g0["used"].to_list() == [4, 10, 6, 6] and g0["t"][-1] == pytest.approx(5.0)   # the line reaches now
    unknown = A.cache_occupancy(rows_to_frame(rows, "action"), T0)            # sizes unknown: count models
    assert unknown.filter(pl.col("gpu") == "GPU 0")["used"].to_list() == [1, 2, 1]
    assert unknown["percent"].is_null().all()


def test_request_outcomes_rates_stack_and_cold_starts():
    rows = [req(i, "success", arrival=i * 10 * MS, cold=i == 0) for i in range(50)]        # 0.0 .. 0.49 s
    rows += [req(100 + i, s, arrival=600 * MS) for i, s in enumerate(["timeout", "dropped", "dropped"])]
    out = A.request_outcomes(rows_to_frame(rows, "request"), T0)
    width = out["t_end"][0] - out["t"][0]
    assert width == pytest.approx(A.outcome_bin_s(0.6 + 0.002))
    total = out.filter(pl.col("outcome") != "cold starts").select((pl.col("rate") * width).sum()).item()
    assert total == pytest.approx(53)
    assert out.filter(pl.col("outcome") == "cold starts")["n"].sum() == 1
    last = out.filter(pl.col("t") == out["t"].max()).sort("bottom")
    assert last["outcome"].to_list() == ["timeout", "dropped"]             # fixed stacking order
    assert last["bottom"][1] == pytest.approx(last["top"][0])
    s = A.request_summary(rows_to_frame(rows, "request"))
    assert (s["success"], s["timeout"], s["dropped"], s["cold_starts"]) == (50, 1, 2, 1)
    assert s["slo_attainment"] == pytest.approx(50 / 53) and s["p50_ms"] == pytest.approx(2.0)


def test_empty_frames_give_empty_aggregates_with_the_chart_columns():
    acts, reqs = A.empty_actions(), A.empty_requests()
    for df in (A.latency_histogram(acts), A.latency_percentiles(acts), A.prediction_error_cdf(acts),
               A.timeline(acts, 0, 0), A.cache_occupancy(acts, 0), A.request_outcomes(reqs, 0)):
        assert df.height == 0 and df.width > 0
    assert A.request_summary(reqs)["requests"] == 0


def test_chart_rows_are_json_safe():
    df = pl.DataFrame({"a": [1.0, math.nan, math.inf], "b": ["x", "y", "z"]})
    assert C.rows(df) == [{"a": 1.0, "b": "x"}, {"a": None, "b": "y"}, {"a": None, "b": "z"}]


@pytest.mark.parametrize("build", [C.latency_histogram, C.prediction_error_cdf, C.timeline, C.request_outcomes,
                                   lambda: C.cache_occupancy(True), lambda: C.cache_occupancy(False)])
def test_specs_read_the_named_data_source(build):
    spec = build()
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    assert '"name": "table"' in __import__("json").dumps(spec)
    assert "datasets" not in spec          # data arrives through the widget's values, never inlined


def test_infer_series_group_by_the_compiled_batch_size():
    rows = [act(i, "INFER", b=b) for i, b in enumerate([1, 2, 3, 4, 5, 8, 9, 16])]
    h = A.latency_histogram(rows_to_frame(rows, "action"), {0: "mlp"})
    by = {s: n for s, n in h.group_by("series").agg(pl.col("n").sum()).iter_rows()}
    assert by == {"mlp b1": 1, "mlp b2": 1, "mlp b4": 2, "mlp b8": 2, "mlp b16": 2}
