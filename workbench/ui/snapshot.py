"""`Snapshot`: the telemetry the views draw from at one instant (one per pump tick, shared by every view)."""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from workbench.ui import aggregates as A


@dataclass(frozen=True)
class Snapshot:
    requests: pl.DataFrame
    actions: pl.DataFrame
    t0: int                                                  # ns, time zero of the charts (session start)
    now: int                                                 # ns, when the snapshot was taken (same clock)
    models: dict[int, str] = field(default_factory=dict)     # model_id -> name
    pages: dict[int, int] = field(default_factory=dict)      # model_id -> weights pages
    cache_pages: dict[int, int] = field(default_factory=dict)  # gpu -> pages in its weights cache

    @classmethod
    def of(cls, requests: pl.DataFrame | None = None, actions: pl.DataFrame | None = None, *,
           t0: int | None = None, now: int | None = None, models: dict[int, str] | None = None,
           pages: dict[int, int] | None = None, cache_pages: dict[int, int] | None = None) -> "Snapshot":
        """A snapshot of recorded frames (e.g. an experiment's telemetry): t0/now default to the data's span."""
        requests = A.empty_requests() if requests is None else requests
        actions = A.empty_actions() if actions is None else actions
        starts = [x for x in (requests["arrival"].min() if requests.height else None,
                              actions["sent"].filter(actions["sent"] > 0).min() if actions.height else None)
                  if x is not None]
        ends = [x for x in (requests["completion"].max() if requests.height else None,
                            actions["measured_end"].max() if actions.height else None,
                            actions["completed"].max() if actions.height else None) if x is not None]
        t0 = t0 if t0 is not None else (min(starts) if starts else 0)
        now = now if now is not None else (max(ends) if ends else t0)
        return cls(requests, actions, int(t0), int(now), A.model_names(requests, models), dict(pages or {}),
                   dict(cache_pages or {}))
