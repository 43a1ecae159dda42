"""Small helpers for the self-contained HTML reports (PNG plots embedded as base64, plain tables)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}"
         "th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3}"
         "table.text td{text-align:left;max-width:28em;font-size:90%}")


def png(fig: Any) -> str:
    """A matplotlib figure as base64 PNG data (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def table(rows: list[list[Any]], header: list[str], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{css_class}"' if css_class else ""
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def page(title: str, parts: list[str]) -> str:
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>{STYLE}</style></head><body>", *parts, "</body></html>"])


def use_agg() -> None:
    """Draw without a display (servers, CI)."""
    import matplotlib

    matplotlib.use("Agg")
