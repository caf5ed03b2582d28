"""Polars aggregates of the telemetry frames: what the live charts draw.

Charts never see raw rows: every function here reduces the request/action frames (schemas in
`workbench.telemetry.schema`) to a few hundred rows at most, so a chart update stays small whatever the run's
length. Times in the outputs are seconds since `t0` (the session's start) and durations are milliseconds.
"""
from __future__ import annotations

import collections
import math

import polars as pl

from workbench.telemetry.schema import ACTION_SCHEMA, REQUEST_SCHEMA

NS = 1e9
# Short names of the action kinds the charts show (the action rows carry contract.ActionType names).
KIND = {"LOAD_WEIGHTS": "LOAD", "INFER": "INFER", "EVICT_WEIGHTS": "EVICT"}
OUTCOMES = ("success", "timeout", "dropped", "rejected", "error")
MAX_SERIES = 12          # INFER series beyond this many (model, batch) pairs are lumped into "other"
QUANTILES = tuple(i / 100 for i in range(1, 100))


def empty_requests() -> pl.DataFrame:
    return pl.DataFrame(schema=REQUEST_SCHEMA)


def empty_actions() -> pl.DataFrame:
    return pl.DataFrame(schema=ACTION_SCHEMA)


def model_names(requests: pl.DataFrame, known: dict[int, str] | None = None) -> dict[int, str]:
    """model_id -> name: what the caller knows, completed from the request rows (which carry the name)."""
    names = dict(known or {})
    if requests.height:
        for mid, name in requests.filter(pl.col("model") != "").select("model_id", "model").unique().iter_rows():
            names.setdefault(mid, name)
    return names


def padded(batch: pl.Expr) -> pl.Expr:
    """The compiled batch size an INFER of `batch` requests ran at: the next power of two (the workbench's and
    Clockwork's batch sizes), so "mlp b3" and "mlp b4" both count as the b4 kernel."""
    return pl.when(batch <= 1).then(1).otherwise(
        (2 ** (batch.cast(pl.Float64).log(2).ceil())).cast(pl.Int64))


def series(actions: pl.DataFrame, names: dict[int, str] | None = None) -> pl.DataFrame:
    """Successful LOAD / INFER / EVICT rows with `kind`, `series` ("mlp b4", "LOAD") and `ms` columns (INFER
    series by model name and compiled batch size). The latency functions take this frame too (computed once)."""
    return _series(actions, names or {})


def _series(actions: pl.DataFrame, names: dict[int, str]) -> pl.DataFrame:
    if "series" in actions.columns and "ms" in actions.columns:     # already reduced
        return actions
    ok = actions.filter((pl.col("status") == 0) & pl.col("type").is_in(list(KIND)) & (pl.col("measured_duration") > 0))
    if ok.height == 0:
        return ok.with_columns(kind=pl.lit(""), series=pl.lit(""), ms=pl.lit(0.0))
    model = pl.col("model_id").replace_strict(names, default=None, return_dtype=pl.Utf8) if names else pl.lit(None)
    model = pl.coalesce(model, pl.format("model {}", pl.col("model_id")))
    kind = pl.col("type").replace_strict(KIND, return_dtype=pl.Utf8)
    series = pl.when(pl.col("type") == "INFER").then(pl.format("{} b{}", model, padded(pl.col("batch_size")))) \
        .otherwise(kind)
    df = ok.with_columns(kind=kind, series=series, ms=pl.col("measured_duration") / 1e6)
    top = (df.filter(pl.col("kind") == "INFER").group_by("series").len().sort("len", descending=True)
           .head(MAX_SERIES)["series"].to_list())
    return df.with_columns(series=pl.when((pl.col("kind") != "INFER") | pl.col("series").is_in(top))
                           .then(pl.col("series")).otherwise(pl.lit("INFER other")))


def latency_histogram(actions: pl.DataFrame, names: dict[int, str] | None = None,
                      bins_per_decade: int = 16) -> pl.DataFrame:
    """Measured duration histograms per series on log-spaced bins: kind, series, lo, hi (ms), n."""
    df = _series(actions, names or {})
    if df.height == 0:
        return pl.DataFrame(schema={"kind": pl.Utf8, "series": pl.Utf8, "lo": pl.Float64, "hi": pl.Float64,
                                    "n": pl.UInt32})
    b = float(bins_per_decade)
    return (df.with_columns(k=(pl.col("ms").log10() * b).floor())
            .group_by("kind", "series", "k").agg(n=pl.len())
            .with_columns(lo=10 ** (pl.col("k") / b), hi=10 ** ((pl.col("k") + 1) / b))
            .select("kind", "series", "lo", "hi", "n").sort("kind", "series", "lo"))


def latency_percentiles(actions: pl.DataFrame, names: dict[int, str] | None = None) -> pl.DataFrame:
    """Per series: count, measured p50/p99/p99.9/max and predicted p50 (ms), median error (us), % underpredicted."""
    df = _series(actions, names or {})
    schema = {"kind": pl.Utf8, "series": pl.Utf8, "n": pl.UInt32, "p50": pl.Float64, "p99": pl.Float64,
              "p99.9": pl.Float64, "max": pl.Float64, "predicted p50": pl.Float64, "p99/p50": pl.Float64,
              "error p50 (us)": pl.Float64, "under-predicted %": pl.Float64}
    if df.height == 0:
        return pl.DataFrame(schema=schema)
    pred = pl.col("predicted_duration")
    err = pl.when(pred > 0).then((pl.col("measured_duration") - pred) / 1e3)
    out = (df.group_by("kind", "series")
           .agg(n=pl.len(), p50=pl.col("ms").quantile(0.5, "linear"), p99=pl.col("ms").quantile(0.99, "linear"),
                **{"p99.9": pl.col("ms").quantile(0.999, "linear")}, max=pl.col("ms").max(),
                **{"predicted p50": pl.when(pred > 0).then(pred / 1e6).median(),
                   "error p50 (us)": err.median(),
                   "under-predicted %": (pl.when(pred > 0).then(pl.col("measured_duration") > pred)).mean() * 100})
           .with_columns(**{"p99/p50": pl.col("p99") / pl.col("p50")})
           .select(list(schema)).sort("kind", "series"))
    return out.cast(schema)


def prediction_error_cdf(actions: pl.DataFrame) -> pl.DataFrame:
    """CDF of measured - predicted duration (us) per action kind at 99 quantiles: kind, q, error_us."""
    df = _series(actions, {}).filter(pl.col("predicted_duration") > 0)
    if df.height == 0:
        return pl.DataFrame(schema={"kind": pl.Utf8, "q": pl.Float64, "error_us": pl.Float64})
    err = (pl.col("measured_duration") - pl.col("predicted_duration")) / 1e3
    wide = df.group_by("kind").agg([err.quantile(q, "linear").alias(f"{q:.2f}") for q in QUANTILES])
    return (wide.unpivot(index="kind", variable_name="q", value_name="error_us")
            .with_columns(pl.col("q").cast(pl.Float64)).sort("kind", "q"))


def timeline(actions: pl.DataFrame, t0: int, now: int, window_s: float = 2.0, max_actions: int = 300,
             names: dict[int, str] | None = None) -> pl.DataFrame:
    """LOAD and INFER spans of the last `window_s` seconds of activity (ending at `now`, or at the last action's
    end if that is earlier: an idle session keeps showing its last activity) per GPU, planned and actual.

    One row per span: gpu ("GPU 0"), kind, which (planned | actual), begin/end (s since t0), model, batch,
    status, slack_ms (latest - actual begin: how much later the action could have started).
    """
    schema = {"gpu": pl.Utf8, "kind": pl.Utf8, "which": pl.Utf8, "begin": pl.Float64, "end": pl.Float64,
              "model": pl.Utf8, "batch": pl.Int64, "status": pl.Utf8, "slack_ms": pl.Float64}
    spans = actions.filter(pl.col("type").is_in(["LOAD_WEIGHTS", "INFER"]) & (pl.col("gpu") >= 0))
    if spans.height:
        now = min(now, int(spans.select(pl.max_horizontal("measured_end", "planned_end").max()).item()))
    lo = now - int(window_s * NS)
    df = spans.filter(pl.max_horizontal("measured_end", "planned_end") >= lo)
    if df.height == 0:
        return pl.DataFrame(schema=schema)
    df = df.sort("measured_end").tail(max_actions)
    names = names or {}
    model = pl.col("model_id").replace_strict(names, default=None, return_dtype=pl.Utf8) if names else pl.lit(None)
    base = df.with_columns(
        gpu=pl.format("GPU {}", pl.col("gpu")), kind=pl.col("type").replace_strict(KIND, return_dtype=pl.Utf8),
        model=pl.coalesce(model, pl.format("model {}", pl.col("model_id"))),
        batch=pl.col("batch_size"), status=pl.col("status_name"),
        slack_ms=pl.when(pl.col("measured_begin") > 0).then((pl.col("latest") - pl.col("measured_begin")) / 1e6))
    keep = ["gpu", "kind", "model", "batch", "status", "slack_ms"]
    planned = base.filter(pl.col("planned_end") > 0).select(
        *keep, which=pl.lit("planned"), begin=(pl.col("planned_begin") - t0) / NS, end=(pl.col("planned_end") - t0) / NS)
    actual = base.filter(pl.col("measured_end") > 0).select(
        *keep, which=pl.lit("actual"), begin=(pl.col("measured_begin") - t0) / NS, end=(pl.col("measured_end") - t0) / NS)
    return pl.concat([planned, actual]).select(list(schema)).cast(schema)


def cache_occupancy(actions: pl.DataFrame, t0: int, pages: dict[int, int] | None = None,
                    cache_pages: dict[int, int] | None = None, max_points: int = 200,
                    now: int | None = None) -> pl.DataFrame:
    """Weights-cache use per GPU over time, from successful LOAD_WEIGHTS (+) and EVICT_WEIGHTS (-) actions.

    `pages` maps model_id -> pages it occupies (unknown models count 1: the unit is then models); with
    `cache_pages` (gpu -> total pages) the `percent` column is filled; with `now`, each GPU's last value is
    repeated at `now` (the step line reaches the present). Columns: gpu, t (s), used, percent.
    """
    schema = {"gpu": pl.Utf8, "t": pl.Float64, "used": pl.Int64, "percent": pl.Float64}
    ev = actions.filter((pl.col("status") == 0) & pl.col("type").is_in(["LOAD_WEIGHTS", "EVICT_WEIGHTS"])
                        & (pl.col("gpu") >= 0))
    if ev.height == 0:
        return pl.DataFrame(schema=schema)
    size = (pl.col("model_id").replace_strict(pages, default=1, return_dtype=pl.Int64) if pages
            else pl.lit(1, dtype=pl.Int64))
    when = pl.when(pl.col("measured_end") > 0).then(pl.col("measured_end")).otherwise(pl.col("completed"))
    df = (ev.with_columns(delta=pl.when(pl.col("type") == "LOAD_WEIGHTS").then(size).otherwise(-size),
                          t=(when - t0) / NS)
          .sort("t").with_columns(used=pl.col("delta").cum_sum().over("gpu")))
    span = max(df["t"].max() - df["t"].min(), 1e-9)
    width = span / max_points
    df = (df.with_columns(bin=(pl.col("t") / width).floor()).group_by("gpu", "bin", maintain_order=True)
          .agg(pl.col("t").last(), pl.col("used").last())).drop("bin")
    if now is not None:
        last = df.group_by("gpu").agg(pl.col("used").last()).with_columns(t=pl.lit((now - t0) / NS))
        df = pl.concat([df, last.select(df.columns)]).filter(pl.col("t") <= max((now - t0) / NS, df["t"].max()))
        df = df.unique(subset=["gpu", "t"], keep="first", maintain_order=True).sort("gpu", "t")
    total = pl.col("gpu").replace_strict(cache_pages, default=None, return_dtype=pl.Float64) if cache_pages \
        else pl.lit(None, dtype=pl.Float64)
    return (df.with_columns(percent=pl.col("used") * 100.0 / total, gpu=pl.format("GPU {}", pl.col("gpu")))
            .select(list(schema)).cast(schema).sort("gpu", "t"))


NICE_BINS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def outcome_bin_s(span_s: float, max_bins: int = 120) -> float:
    """The smallest 'nice' bin width that cuts `span_s` into at most `max_bins` bins."""
    for b in NICE_BINS_S:
        if span_s / b <= max_bins:
            return b
    return math.ceil(span_s / max_bins / 3600.0) * 3600.0


BASE_BIN_S = 0.1       # outcome counts are kept at this resolution (coarsened for long runs), re-binned to show
MAX_BASE_BINS = 20_000
ORDER = ("goodput", *OUTCOMES[1:], "cold starts")   # stacking order; cold starts are a line, not stacked
OUTCOME_SCHEMA = {"t": pl.Float64, "t_end": pl.Float64, "outcome": pl.Utf8, "rate": pl.Float64, "n": pl.UInt32,
                  "bottom": pl.Float64, "top": pl.Float64}


class OutcomeCounts:
    """Request outcomes counted per base bin of completion time, plus counts per status: additive, so a live view
    feeds it only the rows added since the last tick (plain Python/numpy: a tick's few hundred rows cost
    microseconds, where a polars pipeline pays its per-operation overhead ~20 times)."""

    def __init__(self, t0: int, base_s: float = BASE_BIN_S):
        self.t0, self.base_s = t0, base_s
        self.bins: collections.Counter = collections.Counter()      # (bin index, outcome) -> n
        self.status: collections.Counter = collections.Counter()    # status -> n (every request)
        self.requests = self.cold_starts = 0
        self.first_arrival: int | None = None
        self.last_completion: int | None = None

    def add(self, requests: pl.DataFrame) -> "OutcomeCounts":
        if requests.height == 0:
            return self
        self.requests += requests.height
        status = requests["status"].to_numpy()
        cold = requests["cold_start"].to_numpy()
        self.status.update(status.tolist())
        self.cold_starts += int(cold.sum())
        comp = requests["completion"].to_numpy()
        done = comp > 0
        if done.any():
            arrival = requests["arrival"].to_numpy()[done]
            comp, status, cold = comp[done], status[done], cold[done]
            lo, hi = int(arrival.min()), int(comp.max())
            self.first_arrival = lo if self.first_arrival is None else min(self.first_arrival, lo)
            self.last_completion = hi if self.last_completion is None else max(self.last_completion, hi)
            bins = ((comp - self.t0) // int(self.base_s * NS)).tolist()
            self.bins.update(zip(bins, ["goodput" if x == "success" else x for x in status.tolist()]))
            self.bins.update((b, "cold starts") for b, c in zip(bins, cold.tolist()) if c)
            while len(self.bins) > MAX_BASE_BINS:      # a long run: coarser base bins keep a tick cheap
                self._coarsen(10)
        return self

    def _coarsen(self, factor: int) -> None:
        merged: collections.Counter = collections.Counter()
        for (b, o), n in self.bins.items():
            merged[(b // factor, o)] += n
        self.bins, self.base_s = merged, self.base_s * factor

    def frame(self, max_bins: int = 120) -> pl.DataFrame:
        """Requests per second by outcome in 'nice' bins (at most `max_bins`): t / t_end (s since t0), outcome,
        rate (per s), n, and bottom / top (the outcome's band when stacked, in a fixed order)."""
        if not self.bins:
            return pl.DataFrame(schema=OUTCOME_SCHEMA)
        keys = [b for b, _ in self.bins]
        lo, hi = min(keys) * self.base_s, (max(keys) + 1) * self.base_s
        width = max(outcome_bin_s(max(hi - min(lo, 0.0), 1e-9), max_bins), self.base_s)
        agg: collections.Counter = collections.Counter()
        for (b, o), n in self.bins.items():
            agg[(math.floor(b * self.base_s / width + 1e-9), o)] += n
        rank = {o: i for i, o in enumerate(ORDER)}
        rows, top, last = [], 0.0, None
        for (k, o), n in sorted(agg.items(), key=lambda kv: (kv[0][0], rank.get(kv[0][1], len(rank)))):
            if k != last:
                top, last = 0.0, k
            rate = n / width
            bottom = top
            if o != "cold starts":
                top += rate
            rows.append((k * width, (k + 1) * width, o, rate, n, bottom, top if o != "cold starts" else bottom))
        return pl.DataFrame(rows, schema=OUTCOME_SCHEMA, orient="row")

    def summary(self, recent: pl.DataFrame | None = None) -> dict:
        """Counts per status, cold starts, SLO attainment, goodput (per s over the span) and latency p50/p99 (ms)
        of the successes among `recent` rows (default: none, percentiles None)."""
        ok = recent.filter(pl.col("status") == "success")["latency"] if recent is not None else pl.Series([])
        span = ((self.last_completion - self.first_arrival) / NS) if self.first_arrival is not None else 0.0
        n, good = self.requests, self.status.get("success", 0)
        return {"requests": n, **{s: self.status.get(s, 0) for s in OUTCOMES}, "cold_starts": self.cold_starts,
                "p50_ms": ok.quantile(0.5) / 1e6 if len(ok) else None,
                "p99_ms": ok.quantile(0.99) / 1e6 if len(ok) else None,
                "goodput_per_s": good / span if span > 0 else 0.0,
                "slo_attainment": good / n if n else None}


def request_outcomes(requests: pl.DataFrame, t0: int, max_bins: int = 120) -> pl.DataFrame:
    """Requests per second over time by outcome (goodput = success, timeout, dropped, rejected, error) plus
    cold starts, binned on completion time (columns: see `OutcomeCounts.frame`)."""
    return OutcomeCounts(t0).add(requests).frame(max_bins)


def request_summary(requests: pl.DataFrame) -> dict:
    """Counts per status, cold starts, latency p50/p99 (ms) of successes, goodput (per s over the span)."""
    return OutcomeCounts(0).add(requests).summary(requests)


def action_counts(actions: pl.DataFrame) -> dict[tuple[str, bool], int]:
    """Additive: number of actions per (type, failed)."""
    if actions.height == 0:
        return {}
    return dict(collections.Counter(zip(actions["type"].to_list(), (actions["status"].to_numpy() != 0).tolist())))


def action_summary(actions: pl.DataFrame | dict) -> dict:
    """Counts of actions per kind and how many failed (from the frame, or from `action_counts`)."""
    counts = action_counts(actions) if isinstance(actions, pl.DataFrame) else actions
    out = {}
    for kind in ("LOAD_MODEL_FROM_DISK", *KIND):
        ok, bad = counts.get((kind, False), 0), counts.get((kind, True), 0)
        out[KIND.get(kind, kind)] = {"n": ok + bad, "failed": bad}
    return out
