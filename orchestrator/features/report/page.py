"""The report's page: the HTML fragments every section is built of, the stylesheet, the content security
policy, and the page itself. A leaf of the report: it imports nothing from its sections, which are
handed to `render`."""

from __future__ import annotations

import html

import numpy as np

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


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #222;
       margin: 0 auto; max-width: 1220px; padding: 16px 24px 48px; }
h1 { margin: 0 0 4px; font-size: 26px; } h2 { margin: 28px 0 6px; font-size: 20px; border-bottom: 1px solid #ddd; }
.status { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600; margin: 4px 0 10px; }
.status.done { background: #e3f2e1; color: #1e6b24; } .status.running { background: #fff1d6; color: #8a5a00; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dt { color: #666; } dd { margin: 0; }
.behind, .intro { color: #444; max-width: 1000px; } .note { color: #8a5a00; }
figure { margin: 8px 0; max-width: 100%; }
/* width 0 + min-width 100%: the caption wraps to its figure's width instead of widening it */
figcaption { color: #555; font-size: 12.5px; width: 0; min-width: 100%; margin-top: 4px; }
#influence figcaption, #gallery figcaption { width: auto; max-width: 760px; }
.row { display: flex; flex-wrap: wrap; gap: 16px 28px; align-items: flex-start; }
img.plot { max-width: 100%; height: auto; display: block; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(128px, 1fr)); gap: 10px; }
.card { display: inline-block; vertical-align: top; width: 128px; font-size: 11.5px; line-height: 1.3; }
.card .cap { margin-top: 3px; } img.thumb { width: 96px; height: 96px; display: block; border: 2px solid #eee; }
img.thumb.pixelated { image-rendering: pixelated; }
.card.selected img.thumb { border-color: #c44e52; } .card.test img.thumb { border-color: #4c72b0; }
/* two rows of the paper's figure side by side on a wide screen, one on a narrow one */
.pairs { display: grid; grid-template-columns: repeat(auto-fill, minmax(550px, 1fr)); column-gap: 16px; }
.pairrow { display: flex; gap: 5px; padding: 8px 0; border-bottom: 1px solid #f0f0f0; }
.pairrow .card { width: 108px; font-size: 11px; } .pairrow img.thumb { width: 80px; height: 80px; }
.pairrow .card.test { width: 92px; margin-right: 6px; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; min-width: 340px; }
th, td { text-align: left; padding: 3px 10px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f6f6f6; } .dim { color: #888; } .warn { color: #c44e52; }
code { background: #f4f4f4; padding: 0 3px; }
"""

# the page may load nothing from anywhere: only its own inline style and data: images
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render(inp, header, sections) -> str:
    """The page of `inp` (report.inputs.Inputs): `header(inp)`, then each (id, build) of `sections`;
    a section that fails says why in its place and in inp.notes instead of taking the others down."""
    body = [header(inp)]
    for sid, build in sections:
        try:
            body.append(build(inp))
        except Exception as ex:  # one broken section must not take the others down; say what happened
            inp.notes.append(f"section {sid}: {type(ex).__name__}: {ex}")
            body.append(f'<section id="{sid}"><h2>{esc(sid)}</h2>'
                        f'{_note("this section could not be drawn: " + esc(f"{type(ex).__name__}: {ex}"))}</section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="generator" content="longtail report">'
            f"<title>{esc(inp.c.name)}: longtail report</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
