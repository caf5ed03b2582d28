"""Check results and the report that gathers them: text, HTML, JSON and a polars frame.

Statuses, worst first: ``fail`` (the workbench will misbehave: exit code 1), ``warn`` (predictability or capacity
suffers), ``unavailable`` (could not be checked here, with the reason), ``pass``.
"""
from __future__ import annotations

import html
import json
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

STATUSES = ("fail", "warn", "unavailable", "pass")   # worst first
_SEVERITY = {s: i for i, s in enumerate(reversed(STATUSES))}   # pass 0 .. fail 3
_ICON = {"pass": "✔", "warn": "!", "fail": "✘", "unavailable": "?"}
_COLOR = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e", "unavailable": "#6e7781"}


@dataclass
class Check:
    """One checked setting. ``found``/``wanted`` are short human strings; ``data`` holds the raw values (JSON-able)."""
    name: str
    status: str
    found: str
    wanted: str
    why: str
    fix: str = ""            # the exact command (or edit) that fixes it; "" when nothing needs fixing
    group: str = "os"        # os | cuda-env | kernel | driver | gpu0, gpu1, ... | devices | floors
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status {self.status!r} is not one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "status": self.status, "found": self.found,
                "wanted": self.wanted, "why": self.why, "fix": self.fix, "data": _jsonable(self.data)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Check":
        return cls(**{k: d[k] for k in ("name", "status", "found", "wanted", "why", "fix", "group", "data")})

    def __str__(self) -> str:
        s = f"[{self.status:^11}] {self.group}/{self.name}: {self.found} (wanted {self.wanted})"
        if self.status != "pass" and self.fix:
            s += f"\n              fix: {self.fix}"
        return s


def unavailable(name: str, reason: str, why: str, group: str = "os", wanted: str = "", **data: Any) -> Check:
    """A check that could not be made here: never a crash, always the reason."""
    return Check(name, "unavailable", reason, wanted or "-", why, "", group, data)


def worst(statuses: Iterable[str]) -> str:
    return max(statuses, key=_SEVERITY.__getitem__, default="pass")


@dataclass
class CheckReport:
    checks: list[Check]
    floors: Any = None       # workbench.env.floors.Floors when measured
    host: str = field(default_factory=socket.gethostname)
    created: float = field(default_factory=time.time)
    platform: str = field(default_factory=platform.platform)

    # --- queries ---------------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """The worst status of any check (``unavailable`` ranks below ``warn``: a CPU-only machine is not broken)."""
        return worst(c.status for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 unless a check fails."""
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in reversed(STATUSES)}

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def get(self, name: str, group: str | None = None) -> Check:
        """The check called ``name`` (in ``group`` if given); KeyError names the checks that exist."""
        for c in self.checks:
            if c.name == name and (group is None or c.group == group):
                return c
        raise KeyError(f"no check {name!r}{'' if group is None else f' in group {group!r}'}; "
                       f"have: {sorted({f'{c.group}/{c.name}' for c in self.checks})}")

    def __getitem__(self, name: str) -> Check:
        group, _, n = name.rpartition("/")
        return self.get(n, group or None)

    def __iter__(self):
        return iter(self.checks)

    def __len__(self) -> int:
        return len(self.checks)

    # --- renderings ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "platform": self.platform, "created": self.created,
                "status": self.status, "exit_code": self.exit_code, "counts": self.counts(),
                "checks": [c.to_dict() for c in self.checks],
                "floors": None if self.floors is None else self.floors.to_dict()}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_frame(self):
        """One row per check (polars): group, name, status, found, wanted, why, fix."""
        import polars as pl
        cols = ("group", "name", "status", "found", "wanted", "why", "fix")
        return pl.DataFrame({k: [getattr(c, k) for c in self.checks] for k in cols},
                            schema={k: pl.String for k in cols})

    def summary(self) -> str:
        c = self.counts()
        return (f"{self.status.upper()}: {c['pass']} pass, {c['warn']} warn, {c['fail']} fail, "
                f"{c['unavailable']} unavailable ({self.host})")

    def to_text(self) -> str:
        lines = [f"Clockwork Workbench environment check: {self.summary()}"]
        group = None
        for c in self.checks:
            if c.group != group:
                group = c.group
                lines.append(f"-- {group}")
            lines.append(f"{_ICON[c.status]} {c.status:<11} {c.name:<28} {c.found}")
            if c.status != "pass":
                lines.append(f"  {'':<39} wanted: {c.wanted}")
                lines.append(f"  {'':<39} why: {c.why}")
                if c.fix:
                    lines.append(f"  {'':<39} fix: {c.fix}")
        if self.floors is not None:
            lines += ["", self.floors.to_text()]
        return "\n".join(lines)

    __str__ = to_text

    def __repr__(self) -> str:
        return f"<CheckReport {self.summary()}>"

    def to_markdown(self) -> str:
        esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")   # noqa: E731
        lines = [f"# Environment check: {self.summary()}", "",
                 f"platform: {self.platform}", "",
                 "| group | check | status | found | wanted | fix |", "| --- | --- | --- | --- | --- | --- |"]
        for c in self.checks:
            fix = f"`{esc(c.fix)}`" if c.fix and c.status != "pass" else ""
            lines.append(f"| {c.group} | {c.name} | {c.status} | {esc(c.found)} | {esc(c.wanted)} | {fix} |")
        lines += ["", "## Why each check matters", ""]
        lines += [f"- **{c.group}/{c.name}**: {esc(c.why)}" for c in self.checks]
        if self.floors is not None:
            lines += ["", self.floors.to_markdown()]
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        e = html.escape
        rows = []
        for c in self.checks:
            fix = f"<code>{e(c.fix)}</code>" if c.fix and c.status != "pass" else ""
            rows.append(
                f"<tr title='{e(c.why)}'><td>{e(c.group)}</td><td>{e(c.name)}</td>"
                f"<td style='color:{_COLOR[c.status]};font-weight:bold'>{_ICON[c.status]} {c.status}</td>"
                f"<td>{e(c.found)}</td><td>{e(c.wanted)}</td><td>{e(c.why)}</td><td>{fix}</td></tr>")
        floors = "" if self.floors is None else self.floors._repr_html_()
        return (f"<div><b style='color:{_COLOR[self.status]}'>{e(self.summary())}</b>"
                "<table><thead><tr><th>group</th><th>check</th><th>status</th><th>found</th><th>wanted</th>"
                f"<th>why</th><th>fix</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{floors}</div>")


def _jsonable(v: Any) -> Any:
    """Plain JSON values (NVML returns bytes, ctypes ints, tuples)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)
