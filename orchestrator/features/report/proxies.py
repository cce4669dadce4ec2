"""The report's section on training-dynamics proxies and triage (report/__init__.py lists it).

A scatter of each proxy (averaged over the runs that trained on the example) against memorization, the
agreement curve (Spearman with 95% bootstrap intervals against the number of first runs averaged), the
agreement table, and the triage counts of the memorized examples.
"""

from __future__ import annotations

from estimators import proxies as px
from estimators import triage as tr

from orchestrator.estimates_files import as_columns, read_table, runs_of
from orchestrator.features import proxies
from orchestrator.features.proxies import NO_DYNAMICS
from orchestrator.features.report.figures import PROXY_LABELS, draw_proxy_curve, draw_proxy_scatter
from orchestrator.features.report.page import _figure_html, _note, _num, _section, _table, esc, no_estimates


def section(inp) -> str:
    title = "Training-dynamics proxies and triage"
    intro = ("Cheap proxies of memorization from single training runs (cumulative training loss, learning time, "
             "forgetting events), measured on the batches each run trained on, checked against this campaign's "
             "memorization; and the triage of memorized examples by what the runs that did not train on them "
             "predict (docs/proxies-and-triage.md).")
    if inp.mem is None:
        return _section("proxies", title, intro, _note(no_estimates(inp)))
    paths = inp.c.paths
    body = []
    rows = proxies.read_agreement(paths)
    table = read_table(paths.proxies)
    root = esc(str(paths.root))
    if table is None:
        body.append(_note(esc(NO_DYNAMICS) + f"; then <code>longtail estimate {root}</code> and "
                          f"<code>longtail report {root}</code>"))
    else:
        runs = runs_of(table)
        body.append(_figure_html(draw_proxy_scatter(as_columns(table), inp.mem["mem"], runs),
                                 f"Each proxy, averaged over the runs that trained on the example, against "
                                 f"memorization ({inp.mem_runs:,} runs)."))
    if table is not None and rows is None:
        body.append(_note("the agreement statistics are computed with the final estimates: at the end of the "
                          f"campaign, or by <code>longtail estimate {root}</code>"))
    elif rows is not None:
        runs = max(r["runs"] for r in rows)
        body.append(_figure_html(draw_proxy_curve(rows), "Spearman correlation of each proxy, averaged over the "
                                 "first 1, 2, 4, ... runs of the campaign, with the memorization of all runs."))
        head = ["proxy", "runs", "examples"] + [s for s in px.STATISTICS]
        trows = []
        for r in rows:
            if r["runs"] not in (1, runs):
                continue
            cells = [f"{_num(r[s])} [{_num(r[s + '_low'], 2)}, {_num(r[s + '_high'], 2)}]" for s in px.STATISTICS]
            trows.append([PROXY_LABELS[r["proxy"]], str(r["runs"]), f"{r['examples']:,}"] + cells)
        body.append(_figure_html(_table(head, trows), "Agreement with memorization from one run and from all "
                                 "runs: Spearman, Pearson, cosine, and the share of the top 1% / 5% memorized "
                                 "examples also in the proxy's top 1% / 5%, with 95% bootstrap intervals."))
    tri = (inp.summary or {}).get("triage")
    if tri:
        counts = ", ".join(f"{tri.get(c, 0):,} {c}" for c in tr.CATEGORIES)
        body.append(_note(f"Triage of the examples with memorization ≥ {tri['mem_threshold']:g}: {counts} "
                          f"(mislabeled: the out-of-subset models' mode is another class with share ≥ "
                          f"{tri['agree']:g}; ambiguous: label and one other class each ≥ {tri['split']:g}; "
                          f"counting: {esc(tri['counting'])}). Each example's triage is in the gallery above."))
    return _section("proxies", title, intro, "".join(body))
