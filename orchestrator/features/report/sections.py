"""The report's sections that summarize the campaign: the header, memorization, Table 1 and the
split-half check, convergence, the runs, marginal utility and privacy risk. Each builds its HTML from
report.inputs.Inputs and the estimates files' readers; the examples and the dynamics sections are in
examples.py and proxies.py."""

from __future__ import annotations

import time

import numpy as np

from estimators.estimates import error_bound

from orchestrator.estimates_files import as_columns, read_privacy_risk, read_utility, runs_of
from orchestrator.features.report.figures import (draw_accuracy_histogram, draw_convergence, draw_in_vs_heldout,
                                                  draw_memorization_histogram, draw_risk_vs_memorization,
                                                  draw_utility)
from orchestrator.features.report.inputs import Inputs, convergence, run_accuracies
from orchestrator.features.report.page import (_figure_html, _note, _num, _pct, _section, _table, esc,
                                               no_estimates)
from orchestrator.paths import is_note

# The paper's Table 1 (Feldman & Zhang 2020), shown beside this campaign's counts for scale.
PAPER_TABLE1 = [("MNIST", 35, 33, 10_000, 31), ("CIFAR-100", 1015, 888, 10_000, 774),
                ("ImageNet", 1641, 1462, 50_000, 1298)]


def header(inp: Inputs) -> str:
    c, s = inp.c, inp.summary or {}
    runs = s.get("runs", {})
    planned = runs.get("planned", c.plan.runs)
    folded = runs.get("folded", 0)
    shards = len(c.finished_runs())
    if not s:
        status = f"no estimates yet: {shards:,} of {planned:,} runs have a shard"
    elif s.get("complete"):
        status = "complete" + (f" (stopped early: {esc(str(s['stopped_early']))})" if s.get("stopped_early") else "")
    else:
        status = f"in progress: {folded:,} of {planned:,} runs"
    ratio = c.spec.primary_ratio
    ratios = ", ".join(f"{r:g}" for r in c.plan.ratios)
    acc = s.get("test_accuracy")
    bound = s.get("error_bound_rms")
    main_planned = int((c.plan.ratio_of_run == c.plan.ratios.index(ratio)).sum())
    facts = [
        ("runs folded / planned", f"{folded:,} / {planned:,} ({shards:,} shards on disk)"),
        ("design", esc(c.plan.design)),
        ("subset ratio", f"{ratio:g}" + (f" (of {ratios})" if len(c.plan.ratios) > 1 else "")),
        ("dataset", f"{esc(str(inp.meta.get('dataset', c.spec.dataset.name)))}: {c.n_train:,} training, "
                    f"{c.n_test:,} test examples, {inp.meta.get('num_classes', '?')} classes, inputs "
                    f"{esc(str(tuple(inp.meta.get('input_shape') or ())))}"),
        ("test accuracy", f"{acc['mean']:.3f} ± {acc['std']:.3f} (mean ± sd over runs)" if acc else "—"),
        ("paper's error bound", (f"RMS ≤ {bound:.3f} per estimate at {inp.mem_runs:,} runs" if bound else "—")
         + f"; {error_bound(main_planned, ratio):.3f} at the {main_planned:,} planned"),
        ("influence", esc(str(s.get("influence_mode", c.spec.estimates.influence)))),
        ("updated", esc(str(s.get("updated_at", "—"))) + f"; report written {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    behind = (f"Memorization and influence figures stand on the <b>{inp.mem_runs:,} runs</b> at subset ratio "
              f"{ratio:g} folded into estimates/; the convergence and per-run figures read the shards and "
              f"say how many. Every figure names its number of runs." if inp.summary else no_estimates(inp))
    badge = "done" if s.get("complete") else "running"
    return (f'<header><h1>{esc(c.name)}</h1><p class="status {badge}">{status}</p><dl>{dl}</dl>'
            f'<p class="behind">{behind}</p></header>')


def memorization_section(inp: Inputs) -> str:
    intro = ("mem(i) = accuracy on training example i of the runs that trained on it minus that of the runs "
             "that did not. Near 0: the example is learned from the others; near 1: only the runs that saw "
             "it get it right, i.e. it is memorized.")
    if inp.mem is None:
        return _section("memorization", "Memorization", intro, _note(no_estimates(inp)))
    m = inp.mem
    ok = np.isfinite(m["mem"])
    if not ok.any():
        return _section("memorization", "Memorization", intro,
                        _note("no estimate is defined yet: every example needs runs with and runs without it"))
    thr = inp.c.spec.estimates.mem_threshold
    runs = inp.mem_runs
    hist = _figure_html(draw_memorization_histogram(m["mem"][ok], runs, thr),
                        f"Histogram of the {int(ok.sum()):,} defined estimates ({runs:,} runs). Mean standard error "
                        f"{_num(float(np.nanmean(m['se'])))}; dashed: the paper's threshold {thr:g}.")
    scatter = _figure_html(draw_in_vs_heldout(m["acc_in"][ok], m["acc_out"][ok], runs, thr),
                           f"Each training example's accuracy in the runs that trained on it against the runs "
                           f"that did not ({runs:,} runs). Its height above the diagonal is its memorization; "
                           f"held-out accuracy is its C-score at this subset ratio.")
    return _section("memorization", "Memorization", intro, f'<div class="row">{hist}{scatter}</div>')


def table1_section(inp: Inputs) -> str:
    title = "Table 1, memorization shares and consistency"
    intro = ("The paper's Table 1 counts for this campaign (the paper's own rows for scale), the share of "
             "training examples above each memorization threshold, and the split-half check: the same "
             "estimates from the even and from the odd runs, and how well they agree.")
    s = inp.summary
    if s is None:
        return _section("table1", title, intro, _note(no_estimates(inp)))
    runs = inp.mem_runs
    parts = []
    hp = s.get("high_influence_pairs")
    if hp:
        n_test = s.get("n_test") or inp.c.n_test
        rows = [[f"<b>{esc(inp.c.name)}</b> ({runs:,} runs)", f"{hp['pairs']:,}",
                 f"{hp['test_examples']:,} ({_pct(hp['test_examples'] / n_test)})",
                 f"{hp['test_examples_with_one_influencer']:,}"]]
        rows += [[f'<span class="dim">paper: {name}</span>', f'<span class="dim">{p:,}</span>',
                  f'<span class="dim">{t:,} ({_pct(t / n)})</span>', f'<span class="dim">{one:,}</span>']
                 for name, p, t, n, one in PAPER_TABLE1]
        parts.append(_figure_html(
            _table(["campaign", "high-influence pairs", "distinct test examples (% of test set)",
                    "test examples with a single influencer"], rows),
            f"Pairs with mem ≥ {hp['mem_threshold']:g}, infl ≥ {hp['infl_threshold']:g}"
            f"{', same class' if hp.get('same_class') else ''}; {runs:,} runs."))
    else:
        parts.append(_note("no Table-1 counts yet: influence in this mode is selected when the campaign ends "
                           "(or the campaign's influence mode is none)"))
    mem = s.get("memorization") or {}
    shares = mem.get("share_at_least") or {}
    defined = mem.get("defined") or 0
    if shares:
        rows = [[f"≥ {k}", _pct(v), f"{round(v * defined):,}" if v is not None else "—"] for k, v in shares.items()]
        parts.append(_figure_html(_table(["memorization", "share of training examples", "examples"], rows),
                                  f"Of {defined:,} defined estimates, {runs:,} runs (the paper: 36% of CIFAR-100 "
                                  f"≥ 0.25 with ResNet-50, very few on MNIST)."))
    sh = s.get("split_half")
    if sh:
        rows = [["runs in each half", " / ".join(f"{r:,}" for r in sh.get("runs", []))],
                ["correlation of memorization", _num(sh.get("memorization_correlation"))],
                ["mean |difference| of memorization", _num(sh.get("memorization_mean_abs_difference"))]]
        rows += [[f"Jaccard of the memorized sets, mem ≥ {k.rsplit('_', 1)[1]}", _num(v)]
                 for k, v in sh.items() if k.startswith("memorized_jaccard_")]
        if "pairs" in sh:
            rows += [["pairs selected in each half", " / ".join(f"{p:,}" for p in sh["pairs"])],
                     ["Jaccard of the selected pairs", _num(sh.get("pairs_jaccard"))]]
        parts.append(_figure_html(_table(["split-half consistency", "value"], rows),
                                  "Two independent halves of the runs (the paper found a pair Jaccard ≥ 0.7 between "
                                  "two 2,000-run CIFAR-100 campaigns). Each half has half the runs, so this "
                                  "understates how well two full campaigns would agree."))
    else:
        parts.append(_note("split-half consistency: not computed (it is written when the campaign ends, with "
                           "<code>[estimates] split_half = true</code>)"))
    # Table 1 across the page; the shares and the split-half check side by side below it
    return _section("table1", title, intro, parts[0] + f'<div class="row">{"".join(parts[1:])}</div>')


def convergence_section(inp: Inputs) -> str:
    title = "Convergence"
    intro = ("How much the memorization estimates still move as runs accumulate: a fixed sample of training "
             "examples, estimated from the first k runs, compared with the estimate from all runs read. Compare "
             "its fall with the paper's bound (about 1/√k); it reaches 0 at the last point by construction, "
             "where both are the same estimate, so the last steps understate the remaining error.")
    conv = convergence(inp.c)
    if conv is None:
        return _section("convergence", title, intro, _note("fewer than 10 shards of the main subset ratio yet"))
    ratio = inp.c.spec.primary_ratio
    rows = [[f"{k:,}", _num(a, 4), _num(r, 4), _num(error_bound(int(k), ratio), 4)]
            for k, a, r in zip(conv.runs, conv.mean_abs, conv.rms)]
    cap = (f"; {conv.available:,} shards on disk, {conv.shards:,} read, spread evenly over them"
           if conv.available > conv.shards + conv.unreadable else "")
    bad = f"; {conv.unreadable} unreadable shards left out" if conv.unreadable else ""
    fig = _figure_html(draw_convergence(conv, ratio), f"{len(conv.followed):,} training examples, "
                                                      f"{conv.shards:,} runs read from the shards{cap}{bad}.")
    table = _figure_html(_table(["runs k", "mean |Δ|", "RMS Δ", "bound (RMS)"], rows, "narrow"),
                         "The same numbers.")
    return _section("convergence", title, intro, f'<div class="row">{fig}{table}</div>')


def runs_section(inp: Inputs) -> str:
    c = inp.c
    acc, source = run_accuracies(c)
    title = "Runs: accuracy and failures"
    intro = ("The test accuracy of each run: a narrow peak means the runs are comparable; a tail of low "
             "accuracies points to runs that did not train properly. Failed runs are retried when the "
             "campaign resumes; their reasons are in failed/.")
    parts = []
    if len(acc):
        parts.append(_figure_html(draw_accuracy_histogram(acc),
                                  f"Test accuracy of {len(acc):,} runs (from {source}); min {acc.min():.3f}, "
                                  f"max {acc.max():.3f}."))
    else:
        parts.append(_note("no finished run yet"))
    reasons = c.failure_reasons()
    rejected = 0
    if c.paths.rejected_dir.exists():
        rejected = sum(1 for p in c.paths.rejected_dir.iterdir() if not is_note(p.name))
    s = inp.summary or {}
    facts = f"{len(c.failed_runs()):,} runs with a failure record in failed/"
    if s.get("retried_runs"):
        facts += f"; {s['retried_runs']:,} retried in the last session"
    if rejected:
        facts += f"; {rejected:,} shards rejected by verification (rejected/)"
    if reasons:
        rows = [[esc(reason), f"{n:,}"] for reason, n in reasons.items()]
        parts.append(_figure_html(_table(["reason (numbers replaced by #)", "runs"], rows), facts + "."))
    else:
        parts.append(_figure_html(_table(["failures", "runs"], [["none recorded", "0"]], "narrow"), facts + "."))
    return _section("runs", title, intro, f'<div class="row">{"".join(parts)}</div>')


def utility_section(inp: Inputs) -> str:
    title = "Marginal utility of memorized examples"
    path = inp.c.paths.utility_results
    rows = as_columns(read_utility(inp.c.paths))
    if rows is None:
        return _section("utility", title, "The paper's Fig. 2 experiment has not been run for this campaign.",
                        _note(f"run <code>longtail utility {esc(str(inp.c.paths.root))} --thresholds 0.25,0.5</code> "
                              f"to add it"))
    intro = ("Models retrained on the full training set minus the examples memorized at or above each threshold, "
             "and minus as many random examples (Feldman &amp; Zhang, Fig. 2): if memorized examples matter for "
             "the test set, removing them costs more accuracy than removing random ones.")
    table_rows = []
    for i in range(len(rows["name"])):
        drop_se = rows["drop_se"][i]
        infl = rows.get("acc_influenced_mean")
        table_rows.append([esc(str(rows["name"][i])), f"{int(rows['removed'][i]):,}",
                           _pct(rows["removed_share"][i]), f"{int(rows['runs'][i])}",
                           f"{_num(rows['acc_mean'][i])} ± {_num(rows['acc_se'][i])}",
                           "—" if not np.isfinite(drop_se) else f"{100 * rows['drop'][i]:.2f} ± {100 * drop_se:.2f}",
                           "—" if infl is None else _num(infl[i])])
    table = _table(["condition", "removed", "share", "runs", "test accuracy (± se)", "drop, points (± se)",
                    "accuracy on influenced test examples"], table_rows)
    parts = [_figure_html(draw_utility(rows), "Points at each threshold's share of removed examples; bars are "
                                               "95% intervals of the drop.")] if (rows["kind"] == "random").any() else []
    parts.append(_figure_html(table, f"From {esc(str(path))}."))
    return _section("utility", title, intro, f'<div class="row">{"".join(parts)}</div>')


def privacy_section(inp: Inputs) -> str:
    from estimators.privacy import rank_correlation

    intro = ("Membership risk of each training example from the campaign's own runs (the likelihood-ratio "
             "attack, Carlini et al. 2022): Gaussian fits of a per-model statistic over the runs that trained on "
             "it and those that did not, and the AUC of the two fits: 0.5 = its membership cannot be told from "
             "the models' outputs, 1 = it always can. <code>longtail audit</code> scores a target model "
             "(docs/audit.md).")
    table = read_privacy_risk(inp.c.paths)
    if table is None:
        return _section("privacy", "Privacy risk", intro,
                        _note(f"no {inp.c.paths.privacy_risk.name}: the shards store no margin, probability or logits"))
    t = as_columns(table)
    ok = np.isfinite(t["risk"]) & np.isfinite(t["mem"])
    if not ok.any():
        return _section("privacy", "Privacy risk", intro, _note("no risk is defined yet: every example needs runs "
                                                                "with and runs without it"))
    rho = rank_correlation(t["risk"], t["mem"])
    runs = runs_of(table)
    info = (inp.summary or {}).get("privacy_risk") or {}
    fig = _figure_html(draw_risk_vs_memorization(t["risk"][ok], t["mem"][ok], runs, rho),
                       f"Risk against memorization ({runs:,} runs, statistic {esc(str(info.get('statistic', '?')))}, "
                       f"{'global' if info.get('global_variance') else 'per-example'} variance). Spearman rank "
                       f"correlation {_num(rho)}; mean risk {_num(float(np.mean(t['risk'][ok])))}, "
                       f"{_pct(float(np.mean(t['risk'][ok] >= 0.9)))} of the examples at 0.9 or above.")
    top = np.flatnonzero(ok)[np.argsort(-t["risk"][ok], kind="stable")[:10]]
    rows = [[int(i), inp.label(int(t["label"][i])), f"{t['risk'][i]:.3f} ± {t['risk_se'][i]:.3f}",
             _num(float(t["mem"][i])), f"{int(t['n_in'][i])}/{int(t['n_out'][i])}"] for i in top]
    return _section("privacy", "Privacy risk", intro,
                    fig + _table(["example", "label", "risk ± se", "memorization", "runs in/out"], rows))
