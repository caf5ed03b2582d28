"""Telemetry row schemas: one request row per request, one action row per action (docs in the team brief).

Columns marked optional have defaults, so a caller passes only what it knows. Times are nanoseconds on the
controller's clock unless the name says `measured_*` (worker clock; the same clock on one machine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

REQUIRED: Any = object()  # marker: the column has no default


@dataclass(frozen=True)
class Column:
    name: str
    dtype: type[pl.DataType] | pl.DataType
    default: Any = REQUIRED
    doc: str = ""


REQUEST_COLUMNS: tuple[Column, ...] = (
    Column("request_id", pl.Int64, REQUIRED, "the controller's request id"),
    Column("model_id", pl.Int64, REQUIRED, "model instance id"),
    Column("model", pl.Utf8, "", "model name (all copies share it)"),
    Column("worker", pl.Int64, -1, "worker that ran it (-1 if never ran)"),
    Column("gpu", pl.Int64, -1, "GPU that ran it (-1 if never ran)"),
    Column("batch_size", pl.Int64, 0, "batch it ran in (0 if never ran)"),
    Column("arrival", pl.Int64, REQUIRED, "ns, when submit() was called"),
    Column("deadline", pl.Int64, 0, "ns, arrival + slo"),
    Column("completion", pl.Int64, 0, "ns, when the final status was known"),
    Column("slo", pl.Int64, 0, "ns"),
    Column("status", pl.Utf8, REQUIRED, "success | timeout | dropped | rejected | error"),
    Column("latency", pl.Int64, 0, "ns, completion - arrival"),
    Column("cold_start", pl.Boolean, False, "the model had to be loaded for it"),
    Column("message", pl.Utf8, "", "why it failed"),
    # Additions beyond the brief's row (optional; the Clockwork TSV export uses them when given):
    Column("action_id", pl.Int64, -1, "the INFER action it ran in (-1 if none)"),
    Column("slo_factor", pl.Float64, 0.0, "the SLO factor the client asked for (0 if an absolute SLO)"),
)

ACTION_COLUMNS: tuple[Column, ...] = (
    Column("action_id", pl.Int64, REQUIRED),
    Column("worker", pl.Int64, 0),
    Column("gpu", pl.Int64, -1),
    Column("type", pl.Utf8, REQUIRED, "LOAD_WEIGHTS | INFER | EVICT_WEIGHTS | LOAD_MODEL_FROM_DISK | ..."),
    Column("model_id", pl.Int64, -1),
    Column("batch_size", pl.Int64, 0),
    Column("earliest", pl.Int64, 0),
    Column("latest", pl.Int64, 0),
    Column("sent", pl.Int64, 0, "controller clock when the action left"),
    Column("planned_begin", pl.Int64, 0),
    Column("planned_end", pl.Int64, 0),
    Column("predicted_duration", pl.Int64, 0),
    Column("completed", pl.Int64, 0, "controller clock when the result arrived"),
    Column("measured_begin", pl.Int64, 0),
    Column("measured_end", pl.Int64, 0),
    Column("measured_duration", pl.Int64, 0),
    Column("gpu_clock", pl.Int64, 0, "MHz, SM clock after exec"),
    Column("status", pl.Int64, 0, "contract.Status code"),
    Column("status_name", pl.Utf8, ""),
    # Additions beyond the brief's row (optional):
    Column("gpu_clock_before", pl.Int64, 0, "MHz, SM clock before exec"),
    Column("requests_queued", pl.Int64, -1, "requests queued for the model when the action was made"),
    Column("copies_loaded", pl.Int64, -1, "GPUs holding the model when the action was made"),
    Column("message", pl.Utf8, ""),
)

REQUEST_SCHEMA: dict[str, Any] = {c.name: c.dtype for c in REQUEST_COLUMNS}
ACTION_SCHEMA: dict[str, Any] = {c.name: c.dtype for c in ACTION_COLUMNS}

REQUEST_STATUSES = ("success", "timeout", "dropped", "rejected", "error")
