"""The report's page parts shared by its sections (orchestrator/report.py and orchestrator/report_proxies.py):
matplotlib figures as inline PNGs, HTML fragments, and the run count an estimates table records. A leaf:
it imports nothing from the report, so a section module needs no import back into report.py."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
import pyarrow as pa

SCATTER_LIMIT = 5000  # above this many examples the in/held-out plot is a 2-D histogram


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


esc = html.escape


def _num(x, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{esc(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _section(sid: str, title: str, intro: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2><p class="intro">{intro}</p>{body}</section>'


def _figure_html(content: str, caption: str) -> str:
    return f"<figure>{content}<figcaption>{caption}</figcaption></figure>"


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def no_estimates(inp) -> str:
    """The note where estimates are missing, with the command to run on this campaign."""
    return ("no estimates yet: they are written at the first checkpoint of a running campaign, or by "
            f"<code>longtail estimate {esc(str(inp.c.paths.root))}</code>")


def _runs_of(table: pa.Table | None) -> int:
    meta = (table.schema.metadata or {}) if table is not None else {}
    return int(json.loads(meta.get(b"longtail", b"{}")).get("runs", 0))
