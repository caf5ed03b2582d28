"""Telemetry: one row per request and per action (`Recorder`), Parquet files, Clockwork's TSV columns, and
summaries (goodput, SLO attainment, latency percentiles, per-minute series, prediction-error CDFs, cache
occupancy).

The names below load on first use, so the controller can import `workbench.telemetry.row_writer` without polars
(the GPU machine runs the controller without it)."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Recorder": "recorder", "TelemetryError": "recorder", "read_telemetry": "recorder",
          "rows_to_frame": "recorder", "REQUEST_FIELDS": "recorder", "ACTION_FIELDS": "recorder",
          "REQUEST_COLUMNS": "schema", "ACTION_COLUMNS": "schema", "REQUEST_SCHEMA": "schema",
          "ACTION_SCHEMA": "schema"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'workbench.telemetry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"workbench.telemetry.{_WHERE[name]}"), name)
