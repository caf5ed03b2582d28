"""Small HTML renderings (tables, status lines) for widgets and report fallbacks; no dependencies."""
from __future__ import annotations

import html
from typing import Any, Callable

import polars as pl

STYLE = ("border-collapse:collapse;font-size:12px;font-family:var(--jp-code-font-family,monospace);"
         "margin:4px 0")
CELL = "padding:2px 8px;border-bottom:1px solid #ddd;text-align:right"
HEAD = "padding:2px 8px;border-bottom:2px solid #999;text-align:right"


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "–"
        a = abs(v)
        return f"{v:.0f}" if a >= 1000 else f"{v:.3g}" if a >= 100 else f"{v:.3f}" if a >= 0.01 or a == 0 else f"{v:.2e}"
    return str(v)


def html_table(df: pl.DataFrame, max_rows: int = 40, caption: str = "",
               cell_style: Callable[[str, Any], str] | None = None) -> str:
    """`df` as a compact HTML table (first `max_rows` rows, a note if more)."""
    e = html.escape
    head = "".join(f"<th style='{HEAD}'>{e(c)}</th>" for c in df.columns)
    body = []
    for row in df.head(max_rows).iter_rows(named=True):
        cells = []
        for c, v in row.items():
            extra = cell_style(c, v) if cell_style else ""
            cells.append(f"<td style='{CELL};{extra}'>{e(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = (f"<div style='font-size:11px;color:#666'>… {df.height - max_rows} more rows</div>"
            if df.height > max_rows else "")
    cap = f"<caption style='text-align:left;font-weight:bold'>{e(caption)}</caption>" if caption else ""
    if not df.height:
        body.append(f"<tr><td colspan='{max(1, df.width)}' style='{CELL};text-align:left;color:#666'>"
                    "no data yet</td></tr>")
    return f"<table style='{STYLE}'>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def message(text: str, kind: str = "info") -> str:
    """A one-line status message (info | ok | warn | error) for HTML widgets."""
    color = {"info": "#555", "ok": "#1a7f37", "warn": "#9a6700", "error": "#cf222e"}[kind]
    return f"<div style='color:{color};font-size:13px;white-space:pre-wrap'>{html.escape(text)}</div>"
