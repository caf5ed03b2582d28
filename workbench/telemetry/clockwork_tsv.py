"""Clockwork's telemetry TSVs (clockwork.md §5.1 / §5.2), both ways: export our frames with Clockwork's columns
(to compare with Clockwork's own analysis scripts and logs), and read Clockwork's logs back into our schema (to
run our summaries on them).

Where our rows do not carry a Clockwork column, the value is derived and said so here:
- request log: `user_id` 0; `arrival_count`/`departure_count` 0/1 for a cold start, 1/1 otherwise (so that
  Clockwork's `is_coldstart = departure_count > arrival_count && arrival_count == 0` holds);
- action log: `expected_gpu_clock` and `worker_gpu_clock_before` fall back to `gpu_clock`;
  `worker_copy_output_complete` = `worker_exec_complete`; `worker_action_received` / `worker_result_sent`
  0 / `worker_exec_complete`; `goodput` needs the request rows' `action_id` (else -1).
"""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from workbench.telemetry.schema import ACTION_COLUMNS, REQUEST_COLUMNS, REQUIRED

REQUEST_LOG = "clockwork_request_log.tsv"
ACTION_LOG = "clockwork_action_log.tsv"

REQUEST_LOG_COLUMNS = ("t", "request_id", "result", "user_id", "model_id", "slo_factor", "latency", "deadline",
                       "deadline_met", "arrival_count", "departure_count", "is_coldstart")
ACTION_LOG_COLUMNS = ("t", "action_id", "action_type", "status", "worker_id", "gpu_id", "model_id", "batch_size",
                      "expected_exec_duration", "worker_exec_duration", "expected_exec_complete",
                      "worker_exec_complete", "expected_gpu_clock", "worker_gpu_clock_before", "worker_gpu_clock",
                      "worker_copy_output_complete", "worker_action_received", "worker_result_sent",
                      "controller_result_enqueue", "controller_action_duration", "goodput", "requests_queued",
                      "copies_loaded")

# Our request statuses <-> Clockwork's client-facing result codes (§2.2).
RESULT_CODE = {"success": 0, "error": 1, "timeout": 4, "rejected": 6, "dropped": 8}
STATUS_OF_CODE = {0: "success", 1: "error", 4: "timeout", 5: "rejected", 6: "rejected", 7: "dropped",
                  8: "dropped"}
ACTION_TYPE_CODE = {"LOAD_MODEL_FROM_DISK": 0, "LOAD_WEIGHTS": 1, "INFER": 2, "EVICT_WEIGHTS": 3,
                    "CLEAR_CACHE": 4, "GET_WORKER_STATE": 5}
ACTION_TYPE_OF_CODE = {v: k for k, v in ACTION_TYPE_CODE.items()}


def request_log(requests: pl.DataFrame) -> pl.DataFrame:
    """Our request rows with Clockwork's request-log columns, in order (t = departure)."""
    unknown = set(requests["status"].unique().to_list()) - set(RESULT_CODE)
    if unknown:
        raise ValueError(f"request statuses {sorted(unknown)} have no Clockwork result code "
                         f"(known: {sorted(RESULT_CODE)})")
    return requests.select(
        pl.col("completion").alias("t"),
        "request_id",
        pl.col("status").replace_strict(RESULT_CODE, return_dtype=pl.Int64).alias("result"),
        pl.lit(0, pl.Int64).alias("user_id"),
        "model_id",
        pl.col("slo_factor"),
        pl.col("latency"),
        pl.when(pl.col("slo") > 0).then(pl.col("slo")).otherwise(-1).alias("deadline"),
        ((pl.col("status") == "success") & (pl.col("completion") <= pl.col("deadline"))).cast(pl.Int64)
        .alias("deadline_met"),
        pl.when(pl.col("cold_start")).then(0).otherwise(1).cast(pl.Int64).alias("arrival_count"),
        pl.lit(1, pl.Int64).alias("departure_count"),
        pl.col("cold_start").cast(pl.Int64).alias("is_coldstart"),
    )


def action_log(actions: pl.DataFrame, requests: pl.DataFrame | None = None) -> pl.DataFrame:
    """Our action rows with Clockwork's action-log columns, in order (t = result received; the `*_complete`,
    `worker_*` and `controller_*` times relative to `sent`, clamped at 0, as Clockwork writes them)."""
    def rel(col: str) -> pl.Expr:
        return pl.when(pl.col(col) > 0).then(pl.max_horizontal(pl.col(col) - pl.col("sent"), pl.lit(0))) \
            .otherwise(0)

    df = actions
    if requests is not None and requests.height and (requests["action_id"] >= 0).any():
        frac = requests.filter(pl.col("action_id") >= 0).group_by("action_id").agg(
            ((pl.col("status") == "success") & (pl.col("completion") <= pl.col("deadline"))).mean()
            .alias("_met_fraction"))
        df = df.join(frac, on="action_id", how="left")
    else:
        df = df.with_columns(pl.lit(None, pl.Float64).alias("_met_fraction"))
    goodput = pl.when(pl.col("_met_fraction").is_not_null()) \
        .then((pl.col("measured_duration") * pl.col("_met_fraction")).round().cast(pl.Int64)).otherwise(-1)
    return df.select(
        pl.col("completed").alias("t"),
        "action_id",
        pl.col("type").replace_strict(ACTION_TYPE_CODE, default=-1, return_dtype=pl.Int64).alias("action_type"),
        "status",
        pl.col("worker").alias("worker_id"),
        pl.col("gpu").alias("gpu_id"),
        "model_id",
        "batch_size",
        pl.col("predicted_duration").alias("expected_exec_duration"),
        pl.col("measured_duration").alias("worker_exec_duration"),
        rel("planned_end").alias("expected_exec_complete"),
        rel("measured_end").alias("worker_exec_complete"),
        pl.col("gpu_clock").alias("expected_gpu_clock"),
        pl.when(pl.col("gpu_clock_before") > 0).then(pl.col("gpu_clock_before")).otherwise(pl.col("gpu_clock"))
        .alias("worker_gpu_clock_before"),
        pl.col("gpu_clock").alias("worker_gpu_clock"),
        rel("measured_end").alias("worker_copy_output_complete"),
        pl.lit(0, pl.Int64).alias("worker_action_received"),
        rel("measured_end").alias("worker_result_sent"),
        rel("completed").alias("controller_result_enqueue"),
        rel("completed").alias("controller_action_duration"),
        goodput.alias("goodput"),
        "requests_queued",
        "copies_loaded",
    )


def write_clockwork_tsv(requests: pl.DataFrame, actions: pl.DataFrame,
                        directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write `clockwork_request_log.tsv` and `clockwork_action_log.tsv` (tab-separated, header row)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = (d / REQUEST_LOG, d / ACTION_LOG)
    request_log(requests).write_csv(paths[0], separator="\t")
    action_log(actions, requests).write_csv(paths[1], separator="\t")
    return paths


def read_clockwork_request_log(path: str | os.PathLike) -> pl.DataFrame:
    """A Clockwork request log (ours or Clockwork's own) as our request schema: arrival = t - latency,
    completion = t, slo = deadline (the log's deadline is the SLO), cold_start = is_coldstart."""
    df = _read_tsv(path, REQUEST_LOG_COLUMNS)
    bad = set(df["result"].unique().to_list()) - set(STATUS_OF_CODE)
    if bad:
        raise ValueError(f"{path}: result codes {sorted(bad)} are not Clockwork request results "
                         f"(known: {sorted(STATUS_OF_CODE)})")
    arrival = pl.col("t") - pl.col("latency")
    slo = pl.when(pl.col("deadline") > 0).then(pl.col("deadline")).otherwise(0)
    out = df.select(
        "request_id", "model_id",
        pl.lit("").alias("model"),
        arrival.alias("arrival"),
        (arrival + slo).alias("deadline"),
        pl.col("t").alias("completion"),
        slo.alias("slo"),
        pl.col("result").replace_strict(STATUS_OF_CODE, return_dtype=pl.Utf8).alias("status"),
        "latency",
        (pl.col("is_coldstart") != 0).alias("cold_start"),
        pl.col("slo_factor").cast(pl.Float64),
    )
    return _conform(out, "request")


def read_clockwork_action_log(path: str | os.PathLike) -> pl.DataFrame:
    """A Clockwork action log as our action schema: sent = t - controller_action_duration, planned/measured
    end = sent + expected/worker_exec_complete."""
    df = _read_tsv(path, ACTION_LOG_COLUMNS)
    sent = pl.col("t") - pl.col("controller_action_duration")
    out = df.select(
        "action_id",
        pl.col("worker_id").alias("worker"),
        pl.col("gpu_id").alias("gpu"),
        pl.col("action_type").replace_strict(ACTION_TYPE_OF_CODE, default="UNKNOWN", return_dtype=pl.Utf8)
        .alias("type"),
        "model_id", "batch_size",
        sent.alias("sent"),
        (sent + pl.col("expected_exec_complete")).alias("planned_end"),
        pl.col("expected_exec_duration").alias("predicted_duration"),
        pl.col("t").alias("completed"),
        (sent + pl.col("worker_exec_complete")).alias("measured_end"),
        pl.col("worker_exec_duration").alias("measured_duration"),
        pl.col("worker_gpu_clock").alias("gpu_clock"),
        pl.col("worker_gpu_clock_before").alias("gpu_clock_before"),
        "status", "requests_queued", "copies_loaded",
    )
    return _conform(out, "action")


def _read_tsv(path, columns: tuple[str, ...]) -> pl.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such Clockwork log")
    with open(p) as f:
        header = f.readline().rstrip("\n").split("\t")
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{p}: not a Clockwork log: header lacks {missing} (has {header})")
    return pl.read_csv(p, separator="\t", schema_overrides={c: pl.Int64 for c in columns
                                                            if c != "slo_factor"})


def _conform(df: pl.DataFrame, kind: str) -> pl.DataFrame:
    """The schema's columns in order: cast, with each missing column or null filled with its default."""
    exprs = []
    for c in REQUEST_COLUMNS if kind == "request" else ACTION_COLUMNS:
        default = None if c.default is REQUIRED else c.default
        if c.name in df.columns:
            e = pl.col(c.name).cast(c.dtype)
            e = e if default is None else e.fill_null(default)
        else:
            e = pl.lit(default, c.dtype)
        exprs.append(e.alias(c.name))
    return df.select(exprs)
