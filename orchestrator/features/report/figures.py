"""The report's figures: matplotlib drawing only, each returned as an inline PNG <img>. Every number a
figure shows is handed to it; nothing here reads a file or estimates anything."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from estimators import proxies as px
from estimators.estimates import error_bound

SCATTER_LIMIT = 5000  # above this many examples the in/held-out plot is a 2-D histogram
PROXY_LABELS = {"loss_sum": "cumulative training loss", "learn_epoch": "learning time (epoch)",
                "forgets": "forgetting events"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def draw_memorization_histogram(mem: np.ndarray, runs: int, threshold: float) -> str:
    fig, ax = _figure(5.0, 3.5)
    bins = np.linspace(-1, 1, 81)
    # most examples of a real dataset sit near 0: a log scale keeps the tail visible beside that peak
    log = np.histogram(mem, bins)[0].max() > 30
    ax.hist(mem, bins=bins, color="#4c72b0", log=log)
    ax.axvline(threshold, color="#c44e52", ls="--", lw=1)
    ax.text(threshold + 0.02, 0.95, f"≥ {threshold:g}: {int((mem >= threshold).sum()):,}", color="#c44e52",
            transform=ax.get_xaxis_transform(), va="top")
    ax.set_xlim(min(-0.1, float(mem.min()) - 0.05), 1.02)
    ax.set_xlabel("memorization estimate")
    ax.set_ylabel("training examples" + (" (log scale)" if log else ""))
    ax.set_title(f"memorization of {len(mem):,} training examples, {runs:,} runs", fontsize=10)
    return _png(fig, "histogram of memorization estimates")


def draw_in_vs_heldout(acc_in: np.ndarray, acc_out: np.ndarray, runs: int, threshold: float) -> str:
    fig, ax = _figure(4.6, 3.5)
    if len(acc_in) > SCATTER_LIMIT:  # a scatter of 50,000 points is one blot; counts per cell show density
        from matplotlib.colors import LogNorm

        _, _, _, im = ax.hist2d(acc_out, acc_in, bins=50, range=[[0, 1], [0, 1]], norm=LogNorm(), cmap="viridis")
        fig.colorbar(im, ax=ax, label="examples")
    else:
        ax.scatter(acc_out, acc_in, s=6, alpha=0.5, color="#4c72b0", linewidths=0)
    ax.plot([0, 1], [0, 1], color="grey", lw=1)
    ax.plot([0, 1 - threshold], [threshold, 1], color="#c44e52", ls="--", lw=1,
            label=f"memorization = {threshold:g}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("held-out accuracy (runs without the example)")
    ax.set_ylabel("in-accuracy (runs with it)")
    ax.set_title(f"{len(acc_in):,} training examples, {runs:,} runs", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, "in-accuracy against held-out accuracy")


def draw_convergence(conv, ratio: float) -> str:
    """`conv`: a report.inputs.Convergence."""
    fig, ax = _figure(6.4, 3.8)
    k, last = conv.runs[:-1], conv.runs[-1]  # the last point is 0 by construction: not on a log scale
    ax.plot(k, conv.mean_abs[:-1], "o-", color="#4c72b0", label="mean |estimate after k runs − final|")
    ax.plot(k, conv.rms[:-1], "s:", color="#55a868", ms=4, label="RMS of the same difference")
    grid = np.geomspace(max(2, k[0] if len(k) else 2), last, 60)
    ax.plot(grid, [error_bound(int(t), ratio) for t in grid], color="#c44e52", ls="--",
            label="paper's bound on the RMS error (Lemma 2.1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("runs k")
    ax.set_ylabel("memorization difference")
    ax.set_title(f"{len(conv.followed):,} training examples followed over {last:,} runs", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig, "convergence of memorization estimates as runs accumulate")


def draw_accuracy_histogram(acc: np.ndarray) -> str:
    fig, ax = _figure(5.8, 3.4)
    values = np.unique(acc)
    if 1 < len(values) <= 40:  # accuracies are multiples of 1/n_test: one bar per value, no empty gaps
        step = float(np.diff(values).min())
        bins = np.r_[values[0] - step / 2, (values[1:] + values[:-1]) / 2, values[-1] + step / 2]
    else:
        bins = min(40, max(5, len(acc) // 5))
    ax.hist(acc, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.5)
    ax.axvline(float(acc.mean()), color="#c44e52", lw=1)
    ax.set_xlabel("test accuracy of one run")
    ax.set_ylabel("runs")
    ax.set_title(f"{len(acc):,} runs: {acc.mean():.3f} ± {acc.std():.3f} (mean ± sd)", fontsize=10)
    return _png(fig, "distribution of per-run test accuracy")


def draw_utility(rows: dict[str, np.ndarray]) -> str:
    """The paper's Fig. 2: test-accuracy drop when memorized vs random examples are removed."""
    fig, ax = _figure(6.2, 3.4)
    kinds = rows["kind"].astype(str)
    for kind, color, shift in (("memorized", "#c44e52", -0.08), ("random", "#4c72b0", 0.08)):
        sel = kinds == kind
        if sel.any():
            order = np.argsort(rows["threshold"][sel])
            x = rows["removed_share"][sel][order] * 100
            ax.errorbar(x + shift, rows["drop"][sel][order] * 100, yerr=1.96 * rows["drop_se"][sel][order] * 100,
                        marker="o", capsize=3, color=color, label=f"{kind} examples removed")
    ax.axhline(0, color="#999", lw=0.8)
    ax.set_xlabel("share of the training set removed (%)")
    ax.set_ylabel("test accuracy drop (points)")
    ax.set_title("removing memorized vs random examples (95% intervals)", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig, "marginal utility: accuracy drop against the share of the training set removed")


def draw_risk_vs_memorization(risk: np.ndarray, mem: np.ndarray, runs: int, rho: float) -> str:
    fig, ax = _figure(4.8, 3.6)
    ax.scatter(mem, risk, s=5, alpha=0.35, color="#4c72b0", linewidths=0)
    ax.axhline(0.5, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("memorization estimate")
    ax.set_ylabel("membership risk (AUC of the in/out fits)")
    ax.set_ylim(0.3, 1.02)
    ax.set_title(f"{len(risk):,} training examples, {runs:,} runs; Spearman {rho:.2f}", fontsize=10)
    return _png(fig, "membership risk against memorization")


def draw_proxy_scatter(table: dict, mem: np.ndarray, runs: int) -> str:
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
        ax.set_xlabel(f"{PROXY_LABELS[name]}, mean over runs")
        ax.set_ylabel("memorization")
        ax.set_title(f"{int(ok.sum()):,} examples, {runs:,} runs", fontsize=10)
    return _png(fig, "each proxy against memorization")


def draw_proxy_curve(rows: list[dict]) -> str:
    fig, ax = _figure(5.6, 3.6)
    for name, color in zip(px.PROXIES, ("#4c72b0", "#55a868", "#c44e52")):
        r = [x for x in rows if x["proxy"] == name]
        if not r:
            continue
        k = np.array([x["runs"] for x in r])
        v = np.array([x["spearman"] for x in r], float)
        lo = np.array([np.nan if x["spearman_low"] is None else x["spearman_low"] for x in r], float)
        hi = np.array([np.nan if x["spearman_high"] is None else x["spearman_high"] for x in r], float)
        ax.plot(k, v, "o-", color=color, label=PROXY_LABELS[name], ms=4)
        has = np.isfinite(lo) & np.isfinite(hi)  # intervals at the first run and at all runs
        ax.errorbar(k[has], v[has], yerr=[v[has] - lo[has], hi[has] - v[has]], fmt="none", ecolor=color, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("first runs of the campaign averaged")
    ax.set_ylabel("Spearman with memorization")
    ax.set_title("agreement against the runs averaged (95% bootstrap intervals)", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig, "agreement of the proxies with memorization against the number of runs averaged")
