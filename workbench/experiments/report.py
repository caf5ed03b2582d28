"""The experiment's HTML report: one self-contained page (Vega/Vega-Lite/vega-embed and every chart's data
inlined, so it opens offline) with the run table, Altair charts and the configuration and environment.

Charts: goodput and SLO attainment across the sweep (Clockwork Fig. 5 style) or per run; goodput, throughput,
latency and cold starts over time (Fig. 6 / Fig. 9 style); latency CDFs; prediction- and completion-error CDFs
per action type (Fig. 10 style); weights-cache occupancy over time.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from workbench.telemetry.recorder import read_telemetry

WIDTH, HEIGHT = 560, 220
MAX_POINTS = 400   # per run and series: keeps the page small for long runs


def _rows(df: pl.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in df.to_dicts()]


def _chart(df: pl.DataFrame) -> alt.Chart:
    return alt.Chart(alt.Data(values=_rows(df)))


def _color(n: int) -> alt.Color:
    return alt.Color("run:N", title="run", legend=alt.Legend(columns=1 if n <= 12 else 2, labelLimit=260))


def sweep_charts(summary: dict) -> list[tuple[str, Any]]:
    runs = [r for r in summary["runs"] if r["summary"].get("requests")]
    if not runs:
        return []
    rows = []
    for r in runs:
        s = r["summary"]
        row = {"run": r["label"], "policy": r["policy"], "goodput_rps": s.get("goodput_rps"),
               "slo_attainment": s.get("slo_attainment"), "p99_ms": (s.get("latency_ms") or {}).get("p99")}
        for k, v in r["params"].items():
            row[_field(k)] = v
        rows.append(row)
    df = pl.DataFrame(rows, infer_schema_length=None)
    numeric = [_field(k) for k in runs[0]["params"]
               if all(isinstance(r["params"].get(k), (int, float)) and not isinstance(r["params"].get(k), bool)
                      for r in runs)]
    out = []
    if numeric:
        x = numeric[0]
        others = [_field(k) for k in runs[0]["params"] if _field(k) != x]
        series = alt.Color(f"{others[0]}:N", title=others[0]) if others else alt.value("#1f77b4")
        scale = alt.Scale(type="log") if df[x].min() > 0 and df[x].max() / max(df[x].min(), 1e-12) >= 20 else \
            alt.Scale(zero=False)
        base = _chart(df).encode(x=alt.X(f"{x}:Q", title=x, scale=scale), color=series,
                                 tooltip=["run:N", "goodput_rps:Q", "slo_attainment:Q", "p99_ms:Q"])
        out.append((f"Goodput vs {x}", base.mark_line(point=True).encode(
            y=alt.Y("goodput_rps:Q", title="goodput (requests/s meeting the SLO)")).properties(
            width=WIDTH, height=HEIGHT)))
        out.append((f"SLO attainment vs {x}", base.mark_line(point=True).encode(
            y=alt.Y("slo_attainment:Q", title="SLO attainment", scale=alt.Scale(domain=[0, 1]))).properties(
            width=WIDTH, height=HEIGHT)))
    else:
        base = _chart(df).encode(y=alt.Y("run:N", title=None, sort=None),
                                 tooltip=["run:N", "goodput_rps:Q", "slo_attainment:Q", "p99_ms:Q"])
        out.append(("Goodput per run", base.mark_bar().encode(x=alt.X("goodput_rps:Q", title="goodput (r/s)"))
                    .properties(width=WIDTH, height=max(60, 22 * len(runs)))))
        out.append(("SLO attainment per run", base.mark_bar(color="#2ca02c").encode(
            x=alt.X("slo_attainment:Q", title="SLO attainment", scale=alt.Scale(domain=[0, 1])))
            .properties(width=WIDTH, height=max(60, 22 * len(runs)))))
    return out


def _field(key: str) -> str:
    """A sweep key as a chart field name (Vega-Lite reads dots as nesting): "workload.slo_ms" -> "slo_ms",
    "policy.name" -> "policy"."""
    parts = key.split(".")
    name = parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    return name.replace("[", "_").replace("]", "")


def _thin(df: pl.DataFrame, by: str = "run") -> pl.DataFrame:
    """At most MAX_POINTS rows per run (evenly spaced)."""
    parts = []
    for (_,), g in df.group_by(by, maintain_order=True):
        step = max(1, math.ceil(g.height / MAX_POINTS))
        parts.append(g.gather_every(step) if step > 1 else g)
    return pl.concat(parts) if parts else df


def run_charts(out: Path, summary: dict) -> list[tuple[str, Any]]:
    runs = summary["runs"]
    n = len(runs)
    ts, lat, err, occ = [], [], [], []
    for r in runs:
        d = out / "runs" / r["label"]
        if (d / "timeseries.parquet").is_file():
            t = pl.read_parquet(d / "timeseries.parquet")
            dur = (r.get("summary") or {}).get("window", {}).get("end_ns")
            if dur is not None and t.height:   # buckets that end after the workload stopped are partial
                width = float(r.get("bucket_s", 0.0))
                end_s = (dur - r["t0_ns"]) / 1e9
                t = t.filter(pl.col("t_s") + width <= end_s + 1e-9)
            ts.append(t.with_columns(pl.lit(r["label"]).alias("run")))
        if (d / "prediction_errors.parquet").is_file():
            e = pl.read_parquet(d / "prediction_errors.parquet")
            if e.height:
                err.append(e.with_columns(pl.lit(r["label"]).alias("run")))
        if (d / "cache.parquet").is_file():
            c = pl.read_parquet(d / "cache.parquet")
            if c.height:
                occ.append(c.with_columns(pl.lit(r["label"]).alias("run"),
                                          pl.format("w{}/gpu{}", "worker", "gpu").alias("gpu_name")))
        try:
            req, _ = read_telemetry(d)
        except FileNotFoundError:
            continue
        okl = np.sort(req.filter(pl.col("status") == "success")["latency"].to_numpy()) / 1e6
        if okl.size:
            q = np.linspace(0, 1, min(MAX_POINTS, okl.size))
            lat.append(pl.DataFrame({"run": r["label"], "latency_ms": np.quantile(okl, q), "cdf": q}))
    charts: list[tuple[str, Any]] = []
    color = _color(n)
    if ts:
        t = _thin(pl.concat(ts, how="diagonal_relaxed"))
        long = t.unpivot(index=["run", "t_s"], on=["goodput_rps", "throughput_rps"], variable_name="series",
                         value_name="rps")
        charts.append(("Goodput and throughput over time", _chart(long).mark_line().encode(
            x=alt.X("t_s:Q", title="time (s)"), y=alt.Y("rps:Q", title="requests/s"), color=color,
            strokeDash=alt.StrokeDash("series:N", title=None), tooltip=["run:N", "series:N", "t_s:Q", "rps:Q"])
            .properties(width=WIDTH, height=HEIGHT)))
        latl = t.unpivot(index=["run", "t_s"], on=["latency_p50_ms", "latency_p99_ms"], variable_name="series",
                         value_name="ms").drop_nulls("ms")
        if latl.height:
            charts.append(("Latency over time (successful requests)", _chart(latl).mark_line().encode(
                x=alt.X("t_s:Q", title="time (s)"), y=alt.Y("ms:Q", title="latency (ms)"), color=color,
                strokeDash=alt.StrokeDash("series:N", title=None), tooltip=["run:N", "series:N", "t_s:Q", "ms:Q"])
                .properties(width=WIDTH, height=HEIGHT)))
        if t["cold_starts"].sum() > 0:
            charts.append(("Cold starts over time", _chart(t.select("run", "t_s", "cold_starts", "cold_models"))
                           .mark_line().encode(x=alt.X("t_s:Q", title="time (s)"),
                                               y=alt.Y("cold_starts:Q", title="cold starts per bucket"),
                                               color=color, tooltip=["run:N", "t_s:Q", "cold_starts:Q",
                                                                     "cold_models:Q"])
                           .properties(width=WIDTH, height=HEIGHT)))
        if t["mean_batch"].drop_nulls().len():
            charts.append(("Mean batch size over time (request-weighted)", _chart(
                t.select("run", "t_s", "mean_batch").drop_nulls()).mark_line().encode(
                x=alt.X("t_s:Q", title="time (s)"), y=alt.Y("mean_batch:Q", title="Σb²/Σb"), color=color)
                .properties(width=WIDTH, height=HEIGHT)))
    if lat:
        charts.append(("Latency CDF (successful requests)", _chart(pl.concat(lat)).mark_line().encode(
            x=alt.X("latency_ms:Q", title="latency (ms)"), y=alt.Y("cdf:Q", title="CDF"), color=color,
            tooltip=["run:N", "latency_ms:Q", "cdf:Q"]).properties(width=WIDTH, height=HEIGHT)))
    if err:
        e = pl.concat(err)
        charts.append(("Prediction error CDFs: predicted − measured (negative = under-predicted)",
                       _chart(e).mark_line().encode(
                           x=alt.X("error_ms:Q", title="error (ms)"), y=alt.Y("cdf:Q", title="CDF"), color=color,
                           tooltip=["run:N", "type:N", "metric:N", "error_ms:Q", "cdf:Q"])
                       .properties(width=WIDTH // 2, height=HEIGHT // 1.5)
                       .facet(row=alt.Row("type:N", title=None), column=alt.Column("metric:N", title=None))
                       .resolve_scale(x="independent")))
    if occ:
        o = _thin(pl.concat(occ))
        charts.append(("Weights cache occupancy (pages)", _chart(o.select("run", "gpu_name", "t_s", "pages", "models"))
                       .mark_line(interpolate="step-after").encode(
                           x=alt.X("t_s:Q", title="time (s)"), y=alt.Y("pages:Q", title="pages in use"),
                           color=color, detail="gpu_name:N",
                           tooltip=["run:N", "gpu_name:N", "t_s:Q", "pages:Q", "models:Q"])
                       .properties(width=WIDTH, height=HEIGHT)))
    return charts


def _bundle() -> str:
    """Vega + Vega-Lite + vega-embed as one script (built by vl-convert, cached on disk)."""
    import vl_convert as vlc
    try:
        from altair.utils._importers import vl_version_for_vl_convert
        version = vl_version_for_vl_convert()
    except Exception:  # noqa: BLE001
        version = None
    key = hashlib.sha256(f"{vlc.__version__}|{version}|global".encode()).hexdigest()[:16]
    try:
        from workbench.ui.paths import cache_dir
        path = cache_dir("experiments") / f"vega-bundle-{key}.js"
        return path.read_text()
    except (ImportError, OSError):
        pass
    js = vlc.javascript_bundle(vl_version=version)
    try:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(js)
        os.replace(tmp, path)
    except (OSError, NameError):
        pass
    return js


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = []
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            if isinstance(v, float):
                v = "–" if not math.isfinite(v) else f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
            cells.append(f"<td>{html.escape('–' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def run_table(summary: dict) -> str:
    rows = []
    for r in summary["runs"]:
        s = r["summary"]
        lat = s.get("latency_ms") or {}
        rows.append({"run": r["label"], "policy": r["policy"], "requests": s.get("requests"),
                     "att": s.get("slo_attainment"), "goodput": s.get("goodput_rps"),
                     "thr": s.get("throughput_rps"), "p50": lat.get("p50"), "p99": lat.get("p99"),
                     "p9999": lat.get("p99_99"), "cold": s.get("cold_starts"),
                     "status": ", ".join(f"{k} {v}" for k, v in (s.get("by_status") or {}).items()),
                     "wall": r.get("wall_s"), "note": "interrupted" if r.get("interrupted") else (r.get("error") or "")})
    return _table(rows, [("run", "run"), ("policy", "policy"), ("requests", "requests"),
                         ("att", "SLO attainment"), ("goodput", "goodput r/s"), ("thr", "throughput r/s"),
                         ("p50", "p50 ms"), ("p99", "p99 ms"), ("p9999", "p99.99 ms"), ("cold", "cold starts"),
                         ("status", "statuses"), ("wall", "wall s"), ("note", "")])


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}pre{background:#f7f7f7;padding:8px;overflow:auto;
font-size:12px;max-height:420px}.warn{color:#b35900;font-weight:bold}h2{margin-top:28px}.chart{margin:10px 0 22px}"""


def write_report(out: str | os.PathLike, cfg: Any, summary: dict, env: dict) -> Path:
    """Write out/report.html; returns its path."""
    out = Path(out)
    alt.data_transformers.disable_max_rows()
    charts = sweep_charts(summary) + run_charts(out, summary)
    parts = [f"<h1>{html.escape(summary['experiment'])}</h1>"]
    if summary.get("description"):
        parts.append(f"<p>{html.escape(summary['description'])}</p>")
    if summary.get("interrupted"):
        parts.append("<p class='warn'>Interrupted: the results below hold what was recorded until then.</p>")
    parts.append(f"<p>{summary['runs_done']} of {summary['runs_planned']} run(s) complete; wall time "
                 f"{summary['wall_s']:.1f} s. Checker: {html.escape(str(summary.get('checks_summary')))}</p>")
    parts.append("<h2>Runs</h2>" + run_table(summary))
    scripts = []
    parts.append("<h2>Charts</h2>")
    for i, (title, chart) in enumerate(charts):
        parts.append(f"<h3>{html.escape(title)}</h3><div class='chart' id='c{i}'></div>")
        spec = chart.to_dict()
        scripts.append(f"vegaEmbed('#c{i}', {json.dumps(spec)}, {{actions: false, renderer: 'svg'}})"
                       f".catch(e => document.getElementById('c{i}').textContent = 'chart failed: ' + e);")
    if not charts:
        parts.append("<p>No requests were recorded.</p>")
    parts.append("<h2>Configuration</h2><pre>" + html.escape(cfg.text or json.dumps(cfg.raw, indent=1)) + "</pre>")
    pk = env.get("packages", {})
    parts.append("<h2>Environment</h2>" + _table(
        [{"k": k, "v": v} for k, v in [("host", env.get("host")), ("platform", env.get("platform")),
                                       ("python", (env.get("python") or "").split()[0]),
                                       ("git commit", env.get("git_commit")),
                                       ("clocksource", (env.get("clocks") or {}).get("clocksource")),
                                       ("device", json.dumps(env.get("device"))),
                                       ("emulation profile", (env.get("emulation_profile") or {}).get("device"))]
         + [(p, v) for p, v in pk.items() if v]],
        [("k", "what"), ("v", "value")]))
    parts.append("<p>Files: <code>summary.json</code>, <code>environment.json</code>, <code>config.json</code>, "
                 "<code>runs/&lt;run&gt;/requests.parquet</code>, <code>actions.parquet</code>, "
                 "<code>timeseries.parquet</code>, <code>prediction_errors.parquet</code>, "
                 "<code>cache.parquet</code>.</p>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(summary["experiment"]) +
            "</title><style>" + CSS + "</style><script>" + _bundle() + "</script></head><body>" +
            "\n".join(parts) + "<script>" + "\n".join(scripts) + "</script></body></html>")
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


def rebuild_report(out: str | os.PathLike) -> Path:
    """(Re)write report.html of an experiment output directory from its files (summary.json, environment.json,
    config.toml/config.json, runs/): e.g. for results run elsewhere with --no-report."""
    from types import SimpleNamespace

    out = Path(out)
    if not (out / "summary.json").is_file():
        raise FileNotFoundError(f"{out}: no summary.json (not an experiment output directory)")
    summary = json.loads((out / "summary.json").read_text())
    env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").is_file() else {}
    text = (out / "config.toml").read_text() if (out / "config.toml").is_file() else ""
    raw = json.loads((out / "config.json").read_text()).get("experiment", {}) if (out / "config.json").is_file() \
        else {}
    return write_report(out, SimpleNamespace(text=text, raw=raw), summary, env)
