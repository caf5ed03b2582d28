"""Telemetry: one row per request and per action (`Recorder`), Parquet files, Clockwork's TSV columns, and
summaries (goodput, SLO attainment, latency percentiles, per-minute series, prediction-error CDFs, cache
occupancy)."""
from workbench.telemetry.recorder import (ACTION_FIELDS, REQUEST_FIELDS, Recorder, TelemetryError, read_telemetry,
                                         rows_to_frame)
from workbench.telemetry.schema import ACTION_COLUMNS, ACTION_SCHEMA, REQUEST_COLUMNS, REQUEST_SCHEMA

__all__ = ["Recorder", "TelemetryError", "read_telemetry", "rows_to_frame", "REQUEST_COLUMNS", "ACTION_COLUMNS",
           "REQUEST_SCHEMA", "ACTION_SCHEMA", "REQUEST_FIELDS", "ACTION_FIELDS"]
