"""The report's section on training-dynamics proxies and triage (orchestrator/report.py lists it).

A scatter of each proxy (averaged over the runs that trained on the example) against memorization, the
agreement curve (Spearman with 95% bootstrap intervals against the number of first runs averaged), the
agreement table, and the triage counts of the memorized examples.
"""

from __future__ import annotations

import numpy as np

from estimators import proxies as px
from estimators import triage as tr

from orchestrator.features import proxies
from orchestrator.features.proxies import NO_DYNAMICS
from orchestrator.features.report.page import (SCATTER_LIMIT, _figure, _figure_html, _note, _num, _png, _runs_of, _section, _table,
                          esc, no_estimates)

LABELS = {"loss_sum": "cumulative training loss", "learn_epoch": "learning time (epoch)",
          "forgets": "forgetting events"}


def draw_scatter(table: dict, mem: np.ndarray, runs: int) -> str:
    fig = _figure(11.5, 3.4)[0]
    fig.clear()
    axes = fig.subplots(1, len(px.PROXIES))
    for ax, name in zip(axes, px.PROXIES):
        x = table[f"{name}_mean"]
        ok = np.isfinite(x) & np.isfinite(mem)
        if ok.sum() > SCATTER_LIMIT:
            from matplotlib.colors import LogNorm

            ax.hist2d(x[ok], mem[ok], bins=50, norm=LogNorm(), cmap="viridis")
        else:
            ax.scatter(x[ok], mem[ok], s=6, alpha=0.5, color="#4c72b0", linewidths=0)
        ax.set_xlabel(f"{LABELS[name]}, mean over runs")
        ax.set_ylabel("memorization")
        ax.set_title(f"{int(ok.sum()):,} examples, {runs:,} runs", fontsize=10)
    return _png(fig, "each proxy against memorization")


def draw_curve(rows: list[dict]) -> str:
    fig, ax = _figure(5.6, 3.6)
    for name, color in zip(px.PROXIES, ("#4c72b0", "#55a868", "#c44e52")):
        r = [x for x in rows if x["proxy"] == name]
        if not r:
            continue
        k = np.array([x["runs"] for x in r])
        v = np.array([x["spearman"] for x in r], float)
        lo = np.array([np.nan if x["spearman_low"] is None else x["spearman_low"] for x in r], float)
        hi = np.array([np.nan if x["spearman_high"] is None else x["spearman_high"] for x in r], float)
        ax.plot(k, v, "o-", color=color, label=LABELS[name], ms=4)
        has = np.isfinite(lo) & np.isfinite(hi)  # intervals at the first run and at all runs
        ax.errorbar(k[has], v[has], yerr=[v[has] - lo[has], hi[has] - v[has]], fmt="none", ecolor=color, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("first runs of the campaign averaged")
    ax.set_ylabel("Spearman with memorization")
    ax.set_title("agreement against the runs averaged (95% bootstrap intervals)", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig, "agreement of the proxies with memorization against the number of runs averaged")


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
    table = proxies._read(paths.estimates_dir / "proxies.parquet")
    root = esc(str(paths.root))
    if table is None:
        body.append(_note(esc(NO_DYNAMICS) + f"; then <code>longtail estimate {root}</code> and "
                          f"<code>longtail report {root}</code>"))
    else:
        cols = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
        runs = _runs_of(table)
        body.append(_figure_html(draw_scatter(cols, inp.mem["mem"], runs),
                                 f"Each proxy, averaged over the runs that trained on the example, against "
                                 f"memorization ({inp.mem_runs:,} runs)."))
    if table is not None and rows is None:
        body.append(_note("the agreement statistics are computed with the final estimates: at the end of the "
                          f"campaign, or by <code>longtail estimate {root}</code>"))
    elif rows is not None:
        runs = max(r["runs"] for r in rows)
        body.append(_figure_html(draw_curve(rows), "Spearman correlation of each proxy, averaged over the "
                                 "first 1, 2, 4, ... runs of the campaign, with the memorization of all runs."))
        head = ["proxy", "runs", "examples"] + [s for s in px.STATISTICS]
        trows = []
        for r in rows:
            if r["runs"] not in (1, runs):
                continue
            cells = [f"{_num(r[s])} [{_num(r[s + '_low'], 2)}, {_num(r[s + '_high'], 2)}]" for s in px.STATISTICS]
            trows.append([LABELS[r["proxy"]], str(r["runs"]), f"{r['examples']:,}"] + cells)
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
