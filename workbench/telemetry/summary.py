"""Summaries of telemetry frames: goodput, SLO attainment, latency percentiles, cold starts, per-minute series,
prediction-error CDFs and cache occupancy over time.

Definitions (Clockwork's, clockwork.md §4.9 / §5.5):
- a request *meets its SLO* (counts toward goodput) when status == "success" and completion <= deadline;
- SLO attainment = requests meeting their SLO / requests that arrived in the window (every status counts);
- goodput = requests meeting their SLO per second of the window; throughput = successful requests per second;
- prediction error = predicted - measured duration of an action (negative = under-predicted, the harmful
  side); completion error = planned end - measured end.
All inputs are polars frames with the columns of `workbench.telemetry.schema`; times are ns.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import polars as pl

PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)
NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


def _met() -> pl.Expr:
    return (pl.col("status") == "success") & (pl.col("completion") <= pl.col("deadline"))


def window(requests: pl.DataFrame, start: int | None = None, end: int | None = None,
           warmup_ns: int = 0) -> tuple[pl.DataFrame, int, int]:
    """Requests that arrived in [start + warmup_ns, end) (defaults: first and last arrival), and the bounds."""
    if requests.height == 0:
        s = int(start or 0)
        return requests, s, int(end if end is not None else s)
    lo = int(requests["arrival"].min()) if start is None else int(start)
    hi = int(requests["arrival"].max()) + 1 if end is None else int(end)
    lo += int(warmup_ns)
    return requests.filter((pl.col("arrival") >= lo) & (pl.col("arrival") < hi)), lo, hi


def latency_percentiles(latencies_ns: pl.Series | np.ndarray, percentiles=PERCENTILES) -> dict[str, float]:
    """{"p50": ms, ..., "max": ms, "mean": ms} (NaN when empty)."""
    a = np.asarray(latencies_ns, dtype=np.float64)
    if a.size == 0:
        return {**{_pname(p): math.nan for p in percentiles}, "max": math.nan, "mean": math.nan}
    out = {_pname(p): float(np.percentile(a, p)) / NS_PER_MS for p in percentiles}
    out["max"] = float(a.max()) / NS_PER_MS
    out["mean"] = float(a.mean()) / NS_PER_MS
    return out


def _pname(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_") if p % 1 else f"{int(p)}")


def request_stats(requests: pl.DataFrame, duration_ns: int) -> dict:
    """Counts, goodput, SLO attainment, latency percentiles and cold starts of a (windowed) request frame."""
    n = requests.height
    by_status = {s: int(c) for s, c in requests.group_by("status").len().iter_rows()} if n else {}
    met = int(requests.select(_met().sum()).item()) if n else 0
    ok = requests.filter(pl.col("status") == "success")
    dur_s = max(duration_ns, 1) / NS_PER_S
    return {
        "requests": n,
        "by_status": dict(sorted(by_status.items())),
        "success": int(ok.height),
        "slo_met": met,
        "slo_attainment": (met / n) if n else math.nan,
        "goodput_rps": met / dur_s,
        "throughput_rps": ok.height / dur_s,
        "offered_rps": n / dur_s,
        "cold_starts": int(requests["cold_start"].sum()) if n else 0,
        "latency_ms": latency_percentiles(ok["latency"].to_numpy()),
        "latency_all_ms": latency_percentiles(
            requests.filter(pl.col("completion") > 0)["latency"].to_numpy()),
    }


def per_model(requests: pl.DataFrame, by: str = "model", duration_ns: int | None = None) -> pl.DataFrame:
    """One row per model (name, or `by="model_id"` for each instance): counts, attainment, goodput, latency."""
    if duration_ns is None:
        duration_ns = _span(requests)
    dur_s = max(duration_ns, 1) / NS_PER_S
    ok_lat = pl.when(pl.col("status") == "success").then(pl.col("latency"))
    return (requests.group_by(by).agg(
        pl.len().alias("requests"),
        (pl.col("status") == "success").sum().alias("success"),
        _met().sum().alias("slo_met"),
        pl.col("cold_start").sum().alias("cold_starts"),
        (ok_lat.quantile(0.5, "linear") / NS_PER_MS).alias("latency_p50_ms"),
        (ok_lat.quantile(0.99, "linear") / NS_PER_MS).alias("latency_p99_ms"),
        (ok_lat.max() / NS_PER_MS).alias("latency_max_ms"),
    ).with_columns(
        (pl.col("slo_met") / pl.col("requests")).alias("slo_attainment"),
        (pl.col("slo_met") / dur_s).alias("goodput_rps"),
    ).sort(by))


def _span(requests: pl.DataFrame) -> int:
    if requests.height == 0:
        return 0
    return int(requests["arrival"].max()) - int(requests["arrival"].min()) + 1


def action_stats(actions: pl.DataFrame) -> dict:
    """Per action type: count, failures by status name, prediction-error percentiles (ms)."""
    out: dict = {}
    for (typ,), g in actions.group_by("type", maintain_order=True):
        ok = g.filter(pl.col("status") == 0)
        failed = g.filter(pl.col("status") != 0)
        d = {"count": g.height, "success": ok.height,
             "failures": {s: int(c) for s, c in failed.group_by("status_name").len().sort("status_name")
                          .iter_rows()}}
        timed = ok.filter(pl.col("measured_duration") > 0)
        if timed.height and (timed["predicted_duration"] > 0).any():
            err = (timed["predicted_duration"] - timed["measured_duration"]).to_numpy().astype(np.float64)
            d["prediction_error_ms"] = {
                "p1": float(np.percentile(err, 1)) / NS_PER_MS,
                "p50": float(np.percentile(err, 50)) / NS_PER_MS,
                "p99": float(np.percentile(err, 99)) / NS_PER_MS,
                "abs_p99": float(np.percentile(np.abs(err), 99)) / NS_PER_MS,
                "under_predicted_fraction": float((err < 0).mean()),
            }
            d["measured_duration_ms"] = {
                "p50": float(timed["measured_duration"].quantile(0.5, "linear")) / NS_PER_MS,
                "p99": float(timed["measured_duration"].quantile(0.99, "linear")) / NS_PER_MS,
            }
        out[str(typ)] = d
    return dict(sorted(out.items()))


def summarize(requests: pl.DataFrame, actions: pl.DataFrame | None = None, *, start: int | None = None,
              end: int | None = None, warmup_ns: int = 0, by_model: str = "model") -> dict:
    """The headline numbers of one run as a JSON-able dict."""
    win, lo, hi = window(requests, start, end, warmup_ns)
    out = {"window": {"start_ns": lo, "end_ns": hi, "duration_s": (hi - lo) / NS_PER_S,
                      "warmup_s": warmup_ns / NS_PER_S}}
    out.update(request_stats(win, hi - lo))
    if win.height:
        pm = per_model(win, by=by_model, duration_ns=hi - lo)
        if pm.height <= 64:   # thousands of instances would swamp the JSON; per_model() has them all
            out["per_model"] = {str(r[by_model]): {k: _jsonable(v) for k, v in r.items() if k != by_model}
                                for r in pm.iter_rows(named=True)}
        out["models_seen"] = int(win["model_id"].n_unique())
    if actions is not None:
        out["actions"] = action_stats(actions)
    return out


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def per_minute(requests: pl.DataFrame, actions: pl.DataFrame | None = None, *, bucket_s: float = 60.0,
               start: int | None = None) -> pl.DataFrame:
    """Time series in buckets of `bucket_s`, by completion time (Clockwork's t = departure; dropped and timed
    out requests count when their status was known): throughput, goodput, SLO attainment, latency p50/p99/max,
    cold starts, distinct cold models and the request-weighted mean batch size Σb²/Σb of INFER actions."""
    bucket = int(bucket_s * NS_PER_S)
    done = requests.filter(pl.col("completion") > 0)
    if start is None:
        start = int(requests["arrival"].min()) if requests.height else 0
    b = ((pl.col("completion") - start) // bucket).alias("bucket")
    ok_lat = pl.when(pl.col("status") == "success").then(pl.col("latency"))
    series = (done.with_columns(b).group_by("bucket").agg(
        pl.len().alias("completed"),
        (pl.col("status") == "success").sum().alias("success"),
        _met().sum().alias("slo_met"),
        pl.col("cold_start").sum().alias("cold_starts"),
        pl.col("model_id").filter(pl.col("cold_start")).n_unique().alias("cold_models"),
        (ok_lat.quantile(0.5, "linear") / NS_PER_MS).alias("latency_p50_ms"),
        (ok_lat.quantile(0.99, "linear") / NS_PER_MS).alias("latency_p99_ms"),
        (ok_lat.max() / NS_PER_MS).alias("latency_max_ms"),
    ).with_columns(
        (pl.col("success") / bucket_s).alias("throughput_rps"),
        (pl.col("slo_met") / bucket_s).alias("goodput_rps"),
        (pl.col("slo_met") / pl.col("completed")).alias("slo_attainment"),
    ))
    if actions is not None and actions.height:
        inf = actions.filter((pl.col("type") == "INFER") & (pl.col("status") == 0) & (pl.col("completed") > 0))
        batches = inf.with_columns(((pl.col("completed") - start) // bucket).alias("bucket")).group_by(
            "bucket").agg(((pl.col("batch_size") ** 2).sum() / pl.col("batch_size").sum())
                          .cast(pl.Float64).alias("mean_batch"))
        series = series.join(batches, on="bucket", how="left")
    else:
        series = series.with_columns(pl.lit(None, pl.Float64).alias("mean_batch"))
    return series.with_columns((pl.col("bucket") * bucket_s).alias("t_s")).sort("bucket")


def prediction_errors(actions: pl.DataFrame, types: tuple[str, ...] = ("INFER", "LOAD_WEIGHTS")) -> pl.DataFrame:
    """One row per successful timed action: type, prediction_error_ns (predicted - measured duration) and
    completion_error_ns (planned end - measured end; null when the action had no planned end)."""
    ok = actions.filter(pl.col("type").is_in(list(types)) & (pl.col("status") == 0)
                        & (pl.col("measured_duration") > 0) & (pl.col("predicted_duration") > 0))
    return ok.select(
        "type", "action_id", "model_id", "batch_size",
        (pl.col("predicted_duration") - pl.col("measured_duration")).alias("prediction_error_ns"),
        pl.when((pl.col("planned_end") > 0) & (pl.col("measured_end") > 0))
        .then(pl.col("planned_end") - pl.col("measured_end")).alias("completion_error_ns"),
    )


def error_cdf(actions: pl.DataFrame, types: tuple[str, ...] = ("INFER", "LOAD_WEIGHTS"),
              points: int = 201) -> pl.DataFrame:
    """CDFs of prediction and completion error per action type: long frame (type, metric, error_ms, cdf) with
    `points` rows per (type, metric): the quantiles (linear interpolation) at evenly spaced probabilities."""
    errs = prediction_errors(actions, types)
    rows: list[pl.DataFrame] = []
    for typ in types:
        g = errs.filter(pl.col("type") == typ)
        for metric, col in (("prediction", "prediction_error_ns"), ("completion", "completion_error_ns")):
            v = g[col].drop_nulls().to_numpy().astype(np.float64)
            if v.size == 0:
                continue
            q = np.linspace(0.0, 1.0, points)
            rows.append(pl.DataFrame({"type": typ, "metric": metric,
                                      "error_ms": np.quantile(v, q) / NS_PER_MS, "cdf": q}))
    if not rows:
        return pl.DataFrame(schema={"type": pl.Utf8, "metric": pl.Utf8, "error_ms": pl.Float64,
                                    "cdf": pl.Float64})
    return pl.concat(rows)


def error_tails(actions: pl.DataFrame, types: tuple[str, ...] = ("INFER", "LOAD_WEIGHTS"),
                nines: int = 5) -> pl.DataFrame:
    """Clockwork Fig. 10's view: over- and under-predictions separately, magnitude (ms) at log-spaced tail
    quantiles 0.5, 0.9, 0.99, ... (as many nines as the sample supports)."""
    errs = prediction_errors(actions, types)
    rows = []
    for typ in types:
        g = errs.filter(pl.col("type") == typ)
        for metric, col in (("prediction", "prediction_error_ns"), ("completion", "completion_error_ns")):
            v = g[col].drop_nulls().to_numpy().astype(np.float64)
            for side, mag in (("over", v[v > 0]), ("under", -v[v < 0])):
                if mag.size == 0:
                    continue
                for k in range(0, nines + 1):
                    q = 1 - 0.5 * 10.0 ** -k if k == 0 else 1 - 10.0 ** -k
                    if k and mag.size < 10 ** k:
                        break
                    rows.append((typ, metric, side, q, float(np.quantile(mag, q)) / NS_PER_MS, mag.size))
    return pl.DataFrame(rows, schema={"type": pl.Utf8, "metric": pl.Utf8, "side": pl.Utf8,
                                      "quantile": pl.Float64, "error_ms": pl.Float64, "n": pl.Int64},
                        orient="row")


def cache_occupancy(actions: pl.DataFrame, pages: int | Mapping[int, int] | Callable[[int], int]) -> pl.DataFrame:
    """Weights-cache occupancy per (worker, gpu) after every successful LOAD_WEIGHTS / EVICT_WEIGHTS /
    CLEAR_CACHE: columns worker, gpu, t (ns), pages, models. A load occupies its pages from when it began on the
    worker (measured_begin, else the controller's `completed`); an eviction frees them when it ended
    (measured_end, else `completed`). `pages` is the page count of every model, or a map/function of model_id."""
    page_of = _pages_fn(pages)
    ev = actions.filter((pl.col("status") == 0)
                        & pl.col("type").is_in(["LOAD_WEIGHTS", "EVICT_WEIGHTS", "CLEAR_CACHE"]))
    t_load = pl.when(pl.col("measured_begin") > 0).then(pl.col("measured_begin")).otherwise(pl.col("completed"))
    t_free = pl.when(pl.col("measured_end") > 0).then(pl.col("measured_end")).otherwise(pl.col("completed"))
    ev = ev.with_columns(pl.when(pl.col("type") == "LOAD_WEIGHTS").then(t_load).otherwise(t_free).alias("t"))
    ev = ev.sort(["t", "action_id"])
    state: dict[tuple[int, int], dict[int, int]] = {}
    out_w, out_g, out_t, out_p, out_m = [], [], [], [], []
    for w, g, typ, m, t in ev.select("worker", "gpu", "type", "model_id", "t").iter_rows():
        if typ == "CLEAR_CACHE":   # clears every GPU of the worker
            keys = [k for k in state if k[0] == w]
            for k in keys:
                state[k].clear()
        else:
            keys = [(w, g)]
            cache = state.setdefault((w, g), {})
            if typ == "LOAD_WEIGHTS":
                cache[m] = page_of(m)
            else:
                cache.pop(m, None)
        for k in keys:
            out_w.append(k[0]); out_g.append(k[1]); out_t.append(t)
            out_p.append(sum(state[k].values())); out_m.append(len(state[k]))
    return pl.DataFrame({"worker": out_w, "gpu": out_g, "t": out_t, "pages": out_p, "models": out_m},
                        schema={"worker": pl.Int64, "gpu": pl.Int64, "t": pl.Int64, "pages": pl.Int64,
                                "models": pl.Int64})


def _pages_fn(pages) -> Callable[[int], int]:
    if isinstance(pages, int):
        return lambda m: pages
    if callable(pages):
        return pages
    mapping = dict(pages)
    return lambda m: int(mapping.get(m, 0))
