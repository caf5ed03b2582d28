"""Several workloads at once (e.g. Clockwork's `slo-exp-2`: a latency-sensitive open loop plus a background
closed loop). Each part keeps its own seed, SLO and statistics."""
from __future__ import annotations

from typing import Any, Sequence

from workbench.clock import Clock
from workbench.workload.base import Controller, Workload


class Mix(Workload):
    kind = "mix"

    def __init__(self, parts: Sequence[Workload], **kw: Any):
        super().__init__(**kw)
        if not parts:
            raise ValueError("mix: no workloads given")
        self.parts = list(parts)

    def start(self, controller: Controller, clock: Clock, *, t0: int | None = None,
              duration_s: float | None = None) -> "Mix":
        t0 = clock.now() if t0 is None else t0
        for p in self.parts:
            p.start(controller, clock, t0=t0, duration_s=duration_s)
        self.controller, self.clock, self.t0 = controller, clock, t0
        return self

    def stop(self) -> None:
        for p in self.parts:
            p.stop()

    @property
    def submitted(self) -> int:   # type: ignore[override]
        return sum(p.submitted for p in getattr(self, "parts", []))

    @submitted.setter
    def submitted(self, v: int) -> None:
        pass

    @property
    def completed(self) -> int:   # type: ignore[override]
        return sum(p.completed for p in getattr(self, "parts", []))

    @completed.setter
    def completed(self, v: int) -> None:
        pass

    def stats(self) -> dict:
        return {"name": self.name, "kind": self.kind, "submitted": self.submitted, "completed": self.completed,
                "parts": [p.stats() for p in self.parts]}
