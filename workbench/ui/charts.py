"""Altair chart specs for the aggregates in `workbench.ui.aggregates`.

Each builder returns a Vega-Lite spec (a dict, built and validated once) whose data is the named source
`DATA_NAME`; the live views only swap that source's rows. `static(spec, df)` inlines rows for a plain chart
(reports, PNG/SVG export with vl-convert).
"""
from __future__ import annotations

from functools import lru_cache

import altair as alt
import polars as pl

from workbench.ui.vega import DATA_NAME

OUTCOME_COLORS = {"goodput": "#2ca02c", "timeout": "#ff7f0e", "dropped": "#d62728", "rejected": "#7f7f7f",
                  "error": "#9467bd"}
KIND_COLORS = {"INFER": "#1f77b4", "LOAD": "#ff7f0e", "EVICT": "#8c564b"}
WIDTH = 520


def _data() -> alt.Data:
    return alt.Data(name=DATA_NAME)


@lru_cache(maxsize=None)
def latency_histogram() -> dict:
    """Measured duration per series (log-spaced bins), one row of panels per action kind."""
    bars = alt.Chart().mark_bar(opacity=0.75).encode(
        x=alt.X("lo:Q", scale=alt.Scale(type="log"), title="measured duration (ms)"),
        x2="hi:Q",
        y=alt.Y("n:Q", stack=None, title="actions"), y2=alt.datum(0),
        color=alt.Color("series:N", title="series"),
        tooltip=["series:N", alt.Tooltip("lo:Q", format=".3f"), alt.Tooltip("hi:Q", format=".3f"), "n:Q"])
    return (bars.properties(width=WIDTH, height=110)
            .facet(row=alt.Row("kind:N", title=None), data=_data())
            .resolve_scale(x="independent", y="independent")
            .properties(title="Action latency distributions").to_dict())


@lru_cache(maxsize=None)
def prediction_error_cdf() -> dict:
    """CDF of measured - predicted duration per action kind (Clockwork Fig. 10-style)."""
    base = alt.Chart(_data())
    line = base.mark_line(point=False).encode(
        x=alt.X("error_us:Q", title="measured - predicted (us)"),
        y=alt.Y("q:Q", title="CDF", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("kind:N", scale=alt.Scale(domain=list(KIND_COLORS), range=list(KIND_COLORS.values()))),
        tooltip=["kind:N", alt.Tooltip("q:Q", format=".2f"), alt.Tooltip("error_us:Q", format=".1f")])
    zero = alt.Chart(_data()).mark_rule(color="#999", strokeDash=[4, 4]).encode(x=alt.datum(0))
    return alt.layer(line, zero).properties(width=WIDTH, height=180, title="Prediction error").to_dict()


@lru_cache(maxsize=None)
def timeline() -> dict:
    """LOAD and INFER spans per GPU: planned (faint) above actual (solid); failed actions outlined red."""
    return alt.Chart(_data()).mark_bar(height={"band": 0.9}).encode(
        x=alt.X("begin:Q", title="time since session start (s)", scale=alt.Scale(zero=False)),
        x2="end:Q",
        y=alt.Y("gpu:N", title=None),
        yOffset=alt.YOffset("which:N", sort=["planned", "actual"]),
        color=alt.Color("kind:N", scale=alt.Scale(domain=list(KIND_COLORS), range=list(KIND_COLORS.values()))),
        opacity=alt.Opacity("which:N", sort=["planned", "actual"], scale=alt.Scale(domain=["planned", "actual"], range=[0.35, 1.0]),
                            legend=alt.Legend(title="span")),
        stroke=alt.value("#d62728"),
        strokeWidth=alt.condition(alt.datum.status != "SUCCESS", alt.value(2), alt.value(0)),
        tooltip=["gpu:N", "kind:N", "which:N", "model:N", "batch:Q", "status:N",
                 alt.Tooltip("begin:Q", format=".4f"), alt.Tooltip("end:Q", format=".4f"),
                 alt.Tooltip("slack_ms:Q", title="slack (ms)", format=".2f")],
    ).properties(width=WIDTH, height={"step": 28}, title="Action timeline per GPU"
                 ).configure_legend(symbolStrokeWidth=0).to_dict()


@lru_cache(maxsize=None)
def cache_occupancy(percent: bool) -> dict:
    """Weights-cache use per GPU over time (pages, or % of the cache when its size is known)."""
    y = alt.Y("percent:Q", title="cache used (%)", scale=alt.Scale(domain=[0, 100])) if percent \
        else alt.Y("used:Q", title="cache used (pages)")
    return alt.Chart(_data()).mark_line(interpolate="step-after", point=True).encode(
        x=alt.X("t:Q", title="time since session start (s)", scale=alt.Scale(zero=False)), y=y,
        color=alt.Color("gpu:N"),
        tooltip=["gpu:N", alt.Tooltip("t:Q", format=".3f"), "used:Q", alt.Tooltip("percent:Q", format=".1f")],
    ).properties(width=WIDTH, height=180, title="Weights-cache occupancy").to_dict()


@lru_cache(maxsize=None)
def request_outcomes() -> dict:
    """Requests per second by outcome (stacked) with cold starts as a line."""
    base = alt.Chart(_data()).encode(x=alt.X("t:Q", title="time since session start (s)",
                                             scale=alt.Scale(zero=False)))
    bars = base.transform_filter(alt.datum.outcome != "cold starts").mark_bar(opacity=0.85).encode(
        x2="t_end:Q", y=alt.Y("top:Q", title="requests / s"), y2="bottom:Q",
        color=alt.Color("outcome:N", scale=alt.Scale(domain=list(OUTCOME_COLORS), range=list(OUTCOME_COLORS.values()))),
        tooltip=[alt.Tooltip("t:Q", format=".1f"), "outcome:N", alt.Tooltip("rate:Q", format=".1f"), "n:Q"])
    cold = base.transform_filter(alt.datum.outcome == "cold starts").mark_line(color="black", point=True).encode(
        y="rate:Q", tooltip=[alt.Tooltip("t:Q", format=".1f"), alt.Tooltip("rate:Q", title="cold starts / s")])
    return alt.layer(bars, cold).properties(width=WIDTH, height=180, title="Request outcomes").to_dict()


def rows(df: pl.DataFrame, digits: int = 6) -> list[dict]:
    """JSON-safe rows for a chart: NaN/inf become null (Vega skips them, JSON has no NaN) and floats keep
    `digits` significant digits (a chart needs no more, and the comm message shrinks by half)."""
    floats = [c for c, t in df.schema.items() if t in (pl.Float32, pl.Float64)]
    if floats:
        df = df.with_columns([pl.when(pl.col(c).is_finite()).then(pl.col(c).round_sig_figs(digits))
                              for c in floats])
    return df.to_dicts()


def static(spec: dict, df: pl.DataFrame) -> alt.Chart:
    """A plain Altair chart of `spec` with `df` inlined (for `chart.save(...)`, vl-convert, html renderers)."""
    return alt.Chart.from_dict({**spec, "datasets": {DATA_NAME: rows(df)}})
