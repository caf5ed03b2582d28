"""Live views of the telemetry: latency distributions, action timeline, cache occupancy, request outcomes.

Every view follows the same rules:
- `update(snapshot)` is called by ONE thread (the session's pump, or the caller for a static snapshot); it
  reduces the frames to aggregates and writes the view's widgets (if built) under the view's lock;
- `.widget()` builds the ipywidgets once (from the latest aggregates), so views can be composed;
- `text()` / `_repr_mimebundle_` give a plain-text and HTML rendering for headless use and reports.
"""
from __future__ import annotations

import html
import threading
from typing import Any

import polars as pl

from workbench.ui import aggregates as A
from workbench.ui import charts as C
from workbench.ui.snapshot import Snapshot
from workbench.ui.tables import fmt, html_table, message


class View:
    title = "view"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._widget = None
        self._state: dict[str, Any] | None = None
        self.updates = 0        # how many snapshots this view has drawn
        self.active = True      # on screen; the dashboard clears it for hidden tabs (the pump then skips it)

    # subclasses: compute (any thread, pure), build (widgets from state), write (state -> widgets), text
    def compute(self, snap: Snapshot) -> dict[str, Any]:
        raise NotImplementedError

    def build(self, state: dict[str, Any] | None):
        raise NotImplementedError

    def write(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError

    def html(self) -> str:
        return f"<pre>{html.escape(self.text())}</pre>"

    def update(self, snap: Snapshot) -> None:
        state = self.compute(snap)
        with self._lock:
            self._state = state
            self.updates += 1
            if self._widget is not None:
                self.write(state)

    def widget(self):
        with self._lock:
            if self._widget is None:
                self._widget = self.build(self._state)
            return self._widget

    @property
    def state(self) -> dict[str, Any] | None:
        return self._state

    @property
    def charts(self) -> list:
        """The view's VegaChart widgets (after `.widget()`)."""
        return [w for w in (getattr(self, "_chart", None), getattr(self, "_hist", None), getattr(self, "_cdf", None))
                if w is not None]

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = dict(self.widget()._repr_mimebundle_())
        bundle["text/plain"] = self.text()
        bundle["text/html"] = self.html()
        return bundle

    def __repr__(self) -> str:
        return self.text()

    @classmethod
    def of(cls, requests: pl.DataFrame | None = None, actions: pl.DataFrame | None = None, **kw: Any) -> "View":
        """The view of recorded frames (e.g. an experiment's telemetry), drawn once."""
        snap_kw = {k: kw.pop(k) for k in ("t0", "now", "models", "pages", "cache_pages") if k in kw}
        view = cls(**kw)
        view.update(Snapshot.of(requests, actions, **snap_kw))
        return view


def _chart(spec: dict, df: pl.DataFrame | None):
    from workbench.ui.vega import VegaChart
    return VegaChart(spec, C.rows(df) if df is not None else [])


def _html(value: str = ""):
    import ipywidgets as W
    return W.HTML(value)


# ------------------------------------------------------------------------------------------------- latency
class LatencyView(View):
    """Per-action latency distributions (LOAD, INFER by model and batch size, EVICT), percentiles, and
    predicted vs measured (error CDF). Uses the last `window` actions (None: all; the default for `.of`)."""
    title = "Latency"

    def __init__(self, window: int | None = 20_000):
        super().__init__()
        self.window = window

    @classmethod
    def of(cls, requests=None, actions=None, **kw: Any) -> "LatencyView":
        kw.setdefault("window", None)
        return super().of(requests, actions, **kw)

    def compute(self, snap: Snapshot) -> dict[str, Any]:
        acts = snap.actions if self.window is None else snap.actions.tail(self.window)
        ser = A.series(acts, snap.models)
        return {"hist": A.latency_histogram(ser), "cdf": A.prediction_error_cdf(ser), "pct": A.latency_percentiles(ser)}

    def build(self, state):
        import ipywidgets as W
        s = state or {}
        self._hist = _chart(C.latency_histogram(), s.get("hist"))
        self._cdf = _chart(C.prediction_error_cdf(), s.get("cdf"))
        self._table = _html(self._table_html(s.get("pct")))
        return W.VBox([self._hist, self._table, self._cdf])

    def write(self, state) -> None:
        self._hist.values = C.rows(state["hist"])
        self._cdf.values = C.rows(state["cdf"])
        self._table.value = self._table_html(state["pct"])

    def _table_html(self, pct: pl.DataFrame | None) -> str:
        pct = pct if pct is not None else A.latency_percentiles(A.empty_actions())
        return html_table(pct, caption="measured durations (ms) vs the controller's predictions")

    def text(self) -> str:
        pct = (self._state or {}).get("pct")
        if pct is None or pct.height == 0:
            return "LatencyView: no completed actions yet"
        lines = ["LatencyView: measured durations (ms)"]
        for r in pct.iter_rows(named=True):
            lines.append(f"  {r['series']:<24} n={r['n']:<7} p50={fmt(r['p50'])} p99={fmt(r['p99'])} "
                         f"max={fmt(r['max'])} predicted p50={fmt(r['predicted p50'])} "
                         f"error p50={fmt(r['error p50 (us)'])} us")
        return "\n".join(lines)

    def html(self) -> str:
        return self._table_html((self._state or {}).get("pct"))


# ------------------------------------------------------------------------------------------------ timeline
class TimelineView(View):
    """LOAD and INFER spans per GPU over the last `window_s` seconds: planned vs actual, slack in tooltips."""
    title = "Timeline"

    def __init__(self, window_s: float = 1.0, max_actions: int = 150):
        super().__init__()
        self.window_s, self.max_actions = window_s, max_actions

    def compute(self, snap: Snapshot) -> dict[str, Any]:
        spans = A.timeline(snap.actions, snap.t0, snap.now, self.window_s, self.max_actions, snap.models)
        actual = spans.filter(pl.col("which") == "actual")
        late = actual.filter(pl.col("slack_ms") < 0).height
        span_ms = (spans["end"].max() - spans["begin"].min()) * 1e3 if spans.height else 0.0
        return {"spans": spans, "n": actual.height, "late": late, "span_ms": span_ms,
                "slack_p50": actual["slack_ms"].median() if actual.height else None}

    def build(self, state):
        import ipywidgets as W
        s = state or {}
        self._chart = _chart(C.timeline(), s.get("spans"))
        self._caption = _html(message(self._caption_text(s)))
        return W.VBox([self._chart, self._caption])

    def write(self, state) -> None:
        self._chart.values = C.rows(state["spans"])
        self._caption.value = message(self._caption_text(state))

    def _caption_text(self, s: dict) -> str:
        if not s or not s.get("n"):
            return f"no LOAD/INFER in the last {self.window_s:g} s"
        return (f"the last {s['n']} LOAD/INFER actions (at most {self.max_actions}, within {self.window_s:g} s), "
                f"spanning {fmt(s['span_ms'])} ms; slack (latest - actual begin) p50 {fmt(s['slack_p50'])} ms; "
                f"{s['late']} started after their window")

    def text(self) -> str:
        return "TimelineView: " + self._caption_text(self._state or {})


# --------------------------------------------------------------------------------------------------- cache
class CacheView(View):
    """Weights-cache occupancy per GPU over time (pages; % when the cache size is known)."""
    title = "Cache"

    def compute(self, snap: Snapshot) -> dict[str, Any]:
        occ = A.cache_occupancy(snap.actions, snap.t0, snap.pages, snap.cache_pages, now=snap.now)
        now = occ.group_by("gpu").agg(pl.col("used").last(), pl.col("percent").last()).sort("gpu")
        return {"occ": occ, "now": now, "percent": bool(snap.cache_pages), "paged": bool(snap.pages)}

    def build(self, state):
        import ipywidgets as W
        s = state or {}
        self._percent = bool(s.get("percent"))
        self._chart = _chart(C.cache_occupancy(self._percent), s.get("occ"))
        self._caption = _html(message(self._caption_text(s)))
        return W.VBox([self._chart, self._caption])

    def write(self, state) -> None:
        if state["percent"] != self._percent:     # cache size became known: switch the y axis
            self._percent = state["percent"]
            self._chart.spec = C.cache_occupancy(self._percent)
        self._chart.values = C.rows(state["occ"])
        self._caption.value = message(self._caption_text(state))

    def _caption_text(self, s: dict) -> str:
        now = s.get("now") if s else None
        if now is None or now.height == 0:
            return "no weights loaded yet"
        unit = "pages" if s.get("paged") else "models"
        parts = [f"{r['gpu']}: {r['used']} {unit}" + (f" ({r['percent']:.1f}%)" if r["percent"] is not None else "")
                 for r in now.iter_rows(named=True)]
        return "weights cache now: " + ", ".join(parts)

    def text(self) -> str:
        return "CacheView: " + self._caption_text(self._state or {})


# ------------------------------------------------------------------------------------------------ outcomes
class OutcomesView(View):
    """Request outcomes over time (goodput, timeouts, drops, rejections, errors) and cold starts."""
    title = "Requests"

    recent = 20_000      # latency percentiles in the caption: over the last this many requests

    def __init__(self) -> None:
        super().__init__()
        self._seen, self._acc = 0, None     # rows already counted (the request frame only grows)

    def compute(self, snap: Snapshot) -> dict[str, Any]:
        reqs = snap.requests
        if self._acc is None or reqs.height < self._seen or snap.t0 != self._acc.t0:   # (another source)
            self._seen, self._acc = 0, A.OutcomeCounts(snap.t0)
        self._acc.add(reqs.slice(self._seen))    # only the new rows: a tick stays cheap however long the run
        self._seen = reqs.height
        return {"series": self._acc.frame(), "summary": self._acc.summary(reqs.tail(self.recent))}

    def build(self, state):
        import ipywidgets as W
        s = state or {}
        self._chart = _chart(C.request_outcomes(), s.get("series"))
        self._caption = _html(message(self._caption_text(s)))
        return W.VBox([self._chart, self._caption])

    def write(self, state) -> None:
        self._chart.values = C.rows(state["series"])
        self._caption.value = message(self._caption_text(state))

    @staticmethod
    def _caption_text(s: dict) -> str:
        m = s.get("summary") if s else None
        if not m or not m["requests"]:
            return "no requests yet"
        att = f"{m['slo_attainment'] * 100:.1f}%" if m["slo_attainment"] is not None else "–"
        return (f"{m['requests']} requests: {m['success']} ok, {m['timeout']} timeout, {m['dropped']} dropped, "
                f"{m['rejected']} rejected, {m['error']} error; {m['cold_starts']} cold starts; "
                f"SLO attainment {att}; goodput {fmt(m['goodput_per_s'])}/s; "
                f"latency p50 {fmt(m['p50_ms'])} ms, p99 {fmt(m['p99_ms'])} ms")

    def text(self) -> str:
        return "OutcomesView: " + self._caption_text(self._state or {})


# ------------------------------------------------------------------------------------------------- status
class StatusLine(View):
    """One line about the session (device, GPUs, models, counts), refreshed by the pump."""
    title = "Status"

    def __init__(self, describe=None):
        super().__init__()
        self.describe = describe or (lambda: "")
        self._seen, self._counts = 0, {}

    def compute(self, snap: Snapshot) -> dict[str, Any]:
        if snap.actions.height < self._seen:
            self._seen, self._counts = 0, {}
        new = snap.actions.slice(self._seen)          # count only the rows added since the last tick
        self._seen = snap.actions.height
        for k, n in A.action_counts(new).items():
            self._counts[k] = self._counts.get(k, 0) + n
        acts = A.action_summary(self._counts)
        return {"line": f"{self.describe()} | {snap.requests.height} requests, "
                        f"{acts['INFER']['n']} INFER, {acts['LOAD']['n']} LOAD, {acts['EVICT']['n']} EVICT"
                        f" ({sum(a['failed'] for a in acts.values())} actions failed)"}

    def build(self, state):
        return _html(message((state or {}).get("line", self.describe())))

    def write(self, state) -> None:
        self._widget.value = message(state["line"])

    def text(self) -> str:
        return (self._state or {}).get("line", self.describe())
