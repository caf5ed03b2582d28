"""Widgets in-process: every comm message recorded (no kernel, no browser), including writes from threads."""
from __future__ import annotations

import threading
import time

import ipywidgets as W
import polars as pl
import pytest

from workbench.telemetry.recorder import Recorder
from workbench.ui.pump import Pump
from workbench.ui.snapshot import Snapshot
from workbench.ui.testing import CommRecorder
from workbench.ui.vega import VegaChart, VegaLib, vega_lib
from workbench.ui.views import CacheView, LatencyView, OutcomesView, TimelineView
from workbench.ui.widgets import Dashboard, EnvView

MS = 1_000_000


@pytest.fixture
def comms():
    with CommRecorder() as rec:
        yield rec


def _produce(rec: Recorder, stop: threading.Event, worker: int, counter: list[int]) -> None:
    """Add request + action rows as fast as possible (a controller under load)."""
    i = 0
    while not stop.is_set():
        t = time.monotonic_ns()
        aid = worker * 10_000_000 + i
        rec.add_action(action_id=aid, gpu=worker % 2, type="INFER", model_id=worker % 3, batch_size=1,
                       earliest=t, latest=t + 5 * MS, sent=t, planned_begin=t, planned_end=t + MS,
                       predicted_duration=MS, completed=t + MS, measured_begin=t, measured_end=t + MS,
                       measured_duration=MS + (i % 50) * 1000, status=0, status_name="SUCCESS")
        rec.add_request(request_id=aid, model_id=worker % 3, model="mlp", gpu=worker % 2, batch_size=1, arrival=t,
                        deadline=t + 10 * MS, completion=t + MS, slo=10 * MS, status="success", latency=MS)
        i += 1
        counter[worker] += 1


def test_charts_share_one_vega_library(comms):
    charts = [VegaChart({"mark": "point", "data": {"name": "table"}}) for _ in range(3)]
    lib = vega_lib()
    assert isinstance(lib, VegaLib) and len(lib.bundle) > 100_000        # Vega itself, once per kernel
    assert all(c.lib == f"IPY_MODEL_{lib.model_id}" for c in charts)
    assert all(len(c._esm) < 10_000 for c in charts)                      # each chart: a small loader only
    opened = comms.opened("AnyModel")
    assert sum(len(s.get("bundle", "")) > 100_000 for s in opened) <= 1
    charts[0].values = [{"x": 1}]
    assert comms.updates("values", charts[0].comm.comm_id) == [[{"x": 1}]]


def test_pump_bounds_the_update_rate_and_is_the_only_writer(comms):
    rec = Recorder()
    views = [OutcomesView(), LatencyView(), TimelineView(), CacheView()]
    for v in views:
        v.widget()
    t0 = time.monotonic_ns()
    pump = Pump(lambda: Snapshot.of(rec.requests(), rec.actions(), t0=t0, now=time.monotonic_ns()), max_hz=4.0)
    for v in views:
        pump.add(v)
    stop, counts = threading.Event(), [0] * 4
    producers = [threading.Thread(target=_produce, args=(rec, stop, w, counts)) for w in range(4)]
    start = time.monotonic()
    for p in producers:
        p.start()

    def poker():   # producers poke on every row, as the session's telemetry hook does
        while not stop.is_set():
            pump.poke()
    pk = threading.Thread(target=poker)
    pk.start()
    time.sleep(1.5)
    stop.set()
    for p in (*producers, pk):
        p.join()
    elapsed = time.monotonic() - start
    assert pump.flush(timeout=10)
    pump.close()
    total = sum(counts)
    assert total > 1000                                                  # flat-out producers: many rows

    chart = views[0]._chart
    sent = comms.updates("values", chart.comm.comm_id, with_meta=True)
    assert 2 <= len(sent) <= 4.0 * (elapsed + 1.0) + 2                  # bounded by max_hz, not by the row rate
    assert {thread for _, thread, _ in sent} == {"workbench-ui-pump"}   # one writer
    for v in views[1:]:
        for c in v.charts:
            assert {th for _, th, _ in comms.updates("values", c.comm.comm_id, with_meta=True)} \
                <= {"workbench-ui-pump"}
    # the final frame holds every row: aggregates, not a sample
    last = sent[-1][2]
    per_bin = sum(r["n"] for r in last if r["outcome"] == "goodput")
    assert per_bin == total
    hist = comms.updates("values", views[1]._hist.comm.comm_id)[-1]
    assert sum(r["n"] for r in hist) == min(total, views[1].window)
    assert len(hist) < 200                                              # a few hundred rows at most
    assert pump.stats()["ticks"] >= 2 and not pump.stats()["errors"]


def test_pump_survives_a_failing_view_and_source(comms):
    calls = []

    class Broken:
        def update(self, snap):
            raise RuntimeError("boom")

    class Good:
        def update(self, snap):
            calls.append(snap)

    flaky = iter([RuntimeError("source down"), 1, 2, 3])

    def source():
        v = next(flaky)
        if isinstance(v, Exception):
            raise v
        return v
    pump = Pump(source, max_hz=10)
    pump.add(Broken())
    pump.add(Good())
    assert pump.flush() and pump.flush()
    pump.close()
    assert calls and not pump.alive
    assert any("source down" in e for e in pump.errors) and any("boom" in e for e in pump.errors)
    with pytest.raises(ValueError, match="2-5 times a second"):
        Pump(source, max_hz=100)


def test_views_of_recorded_frames_render_text_html_and_widgets(comms):
    rec = Recorder()
    stop, counts = threading.Event(), [0]
    th = threading.Thread(target=_produce, args=(rec, stop, 0, counts))
    th.start()
    time.sleep(0.2)
    stop.set()
    th.join()
    d = Dashboard.of(rec.requests(), rec.actions(), models={0: "mlp"})
    bundle = d._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert f"{counts[0]} requests" in bundle["text/plain"] and "mlp b1" in bundle["text/plain"]
    assert "<table" in bundle["text/html"]
    tab = d.widget().children[-1]
    assert isinstance(tab, W.Tab) and tab.titles == ("Requests", "Latency", "Timeline", "Cache")
    assert d.views["Requests"]._chart.values and d.views["Latency"]._hist.values
    assert LatencyView.of(rec.requests(), rec.actions()).state["pct"]["n"].sum() == counts[0]


def test_env_view_shows_checks_with_fixes(comms):
    view = EnvView(gpu=True, devices=False)
    w = view.widget()                             # builds, then checks on a thread
    view._thread.join(timeout=60)
    rep = view.report
    assert rep is not None and len(rep) > 5
    frame = view.frame()
    assert isinstance(frame, pl.DataFrame) and {"status", "fix"} <= set(frame.columns)
    shown = view._html.value
    assert rep.summary().split(":")[0] in shown
    for c in rep.checks:
        if c.status != "pass" and c.fix:
            assert c.fix.split()[0] in shown      # each failing check's fix is on screen
    assert isinstance(w, W.VBox)
    assert "Clockwork Workbench environment check" in view.text()


def test_hidden_views_wait_for_a_forced_tick():
    class Counting:
        def __init__(self):
            self.active, self.updates = True, 0

        def update(self, snap):
            self.updates += 1

    shown, hidden = Counting(), Counting()
    pump = Pump(lambda: None, max_hz=10)
    pump.add(shown)
    pump.add(hidden)
    assert pump.flush()
    assert shown.updates >= 1 and hidden.updates >= 1
    hidden.active = False
    before = (shown.updates, hidden.updates)
    ticks = pump.ticks
    pump.poke()
    deadline = time.monotonic() + 10
    while pump.ticks == ticks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shown.updates > before[0] and hidden.updates == before[1]   # a plain tick skips the hidden view
    assert pump.flush()
    assert hidden.updates == before[1] + 1                             # flush redraws everything
    pump.close()


def test_incremental_views_match_a_one_shot_aggregate():
    from workbench.ui import aggregates as A
    from workbench.ui.views import StatusLine

    rec = Recorder()
    stop, counts = threading.Event(), [0, 0]
    th = [threading.Thread(target=_produce, args=(rec, stop, w, counts)) for w in range(2)]
    for t in th:
        t.start()
    time.sleep(0.3)
    stop.set()
    for t in th:
        t.join()
    reqs, acts = rec.requests(), rec.actions()
    t0 = int(reqs["arrival"].min())
    live, status = OutcomesView(), StatusLine(lambda: "s")
    for end in (0, 7, reqs.height // 3, reqs.height // 2, reqs.height):    # the frames grow tick by tick
        snap = Snapshot.of(reqs.head(end), acts.head(end), t0=t0)
        live.update(snap)
        status.update(snap)
    once = A.request_outcomes(reqs, t0)
    assert live.state["series"].equals(once)
    assert live.state["summary"]["requests"] == reqs.height == sum(counts)
    assert live.state["summary"]["success"] == A.request_summary(reqs)["success"]
    assert f"{acts.height} INFER" in status.text()
