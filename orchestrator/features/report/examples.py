"""The report's sections that show examples: the gallery of the most memorized training examples and
the paper's figure of high-influence pairs (each test example beside its strongest influencers), as
thumbnails when the inputs are images and as tables otherwise."""

from __future__ import annotations

import numpy as np

from orchestrator.estimates_files import Influencer, runs_in, strongest_tests, top_influencers
from orchestrator.features.report.inputs import Inputs
from orchestrator.features.report.page import _figure_html, _note, _num, _section, _table, esc, no_estimates

GALLERY_SIZE = 24  # most memorized training examples shown
PAIR_ROWS = 10  # test examples shown with their influencers (the paper's MNIST figure has 10 rows)
INFLUENCERS = 4  # training examples shown beside each test example (as in the paper's figure)


def gallery_section(inp: Inputs) -> str:
    intro = ("The training examples with the highest memorization estimates: atypical, ambiguous or "
             "mislabeled examples that the models fit only when they train on them.")
    title = "Most memorized training examples"
    if inp.mem is None:
        return _section("gallery", title, intro, _note(no_estimates(inp)))
    m = inp.mem
    finite = np.flatnonzero(np.isfinite(m["mem"]))
    top = finite[np.argsort(-m["mem"][finite], kind="stable")][:GALLERY_SIZE]
    planted = set(inp.meta.get("info", {}).get("mislabeled") or [])
    from orchestrator.features.proxies import describe, read_triage

    triage = read_triage(inp.c.paths)  # None before triage existed
    caption = (f"The {len(top)} highest of {len(finite):,} estimates, {inp.mem_runs:,} runs: estimate ± standard "
               f"error, runs with / without the example (n_in / n_out) and the accuracy of each"
               + ("; triage by the runs that did not train on it: category, their most predicted class and its "
                  "share." if triage is not None else "."))
    if inp.pictures is None:
        head = ["example", "label"] + (["group"] if "group" in m else []) + \
               ["memorization", "95% interval", "n_in / n_out", "in-acc", "held-out acc"] + \
               (["triage"] if triage is not None else [])
        rows = []
        for i in top:
            row = [f"{int(m['example'][i])}" + (" (planted wrong label)" if int(i) in planted else ""),
                   esc(inp.label(int(m["label"][i])))]
            if "group" in m:
                row.append(str(int(m["group"][i])))
            row += [f"{m['mem'][i]:.3f} ± {m['se'][i]:.3f}", f"[{_num(m['ci_low'][i])}, {_num(m['ci_high'][i])}]",
                    f"{int(m['n_in'][i])} / {int(m['n_out'][i])}", _num(m["acc_in"][i]), _num(m["acc_out"][i])]
            if triage is not None:
                row.append(esc(describe(triage, int(m["example"][i]))))
            rows.append(row)
        body = _note(esc(inp.picture_note)) + _figure_html(_table(head, rows), caption)
        return _section("gallery", title, intro, body)
    cards = []
    for i in top:
        ex = int(m["example"][i])
        mark = '<br><span class="warn">planted wrong label</span>' if ex in planted else ""
        cards.append(f'<div class="card">{inp.pictures.img("train", ex, f"training example {ex}")}'
                     f'<div class="cap"><b>#{ex}</b> label {esc(inp.label(int(m["label"][i])))}<br>'
                     f'mem {m["mem"][i]:.3f} ± {m["se"][i]:.3f}<br>'
                     f'n_in/n_out {int(m["n_in"][i])}/{int(m["n_out"][i])}<br>'
                     f'acc {m["acc_in"][i]:.2f} / {m["acc_out"][i]:.2f}{mark}'
                     + (f'<br>{esc(describe(triage, ex))}' if triage is not None else "") + '</div></div>')
    return _section("gallery", title, intro, _figure_html(f'<div class="gallery">{"".join(cards)}</div>', caption))


def influence_section(inp: Inputs) -> str:
    est_cfg = inp.c.spec.estimates
    title = "High-influence pairs"
    intro = (f"infl(i, j) = accuracy on test example j of the runs that trained on training example i minus "
             f"that of the runs that did not. The paper's pairs: mem(i) ≥ {est_cfg.mem_threshold:g}, "
             f"infl(i, j) ≥ {est_cfg.infl_threshold:g}{', same class' if est_cfg.same_class else ''}. Each row: a "
             f"test example, then its {INFLUENCERS} most influential training examples (framed: in a selected "
             f"pair), as in the paper's figures.")
    if inp.mem is None:
        return _section("influence", title, intro, _note(no_estimates(inp)))
    pairs = inp.pairs
    runs = runs_in(inp.c.paths.pairs)
    runs = inp.mem_runs if runs is None else runs
    if pairs is not None and len(pairs["test"]):
        # test examples by their strongest pair (ties: in the file's order)
        ranked = list(dict.fromkeys(pairs["test"][np.argsort(-pairs["infl"], kind="stable")].tolist()))
        tests = ranked[:PAIR_ROWS]
        lead = (f"{len(pairs['test']):,} pairs over {len(ranked):,} test examples ({runs:,} runs); the "
                f"{len(tests)} test examples with the strongest pairs:")
    else:
        tests = strongest_tests(inp.c.paths, PAIR_ROWS)
        if not tests:
            if (inp.summary or {}).get("influence_mode", inp.c.spec.estimates.influence) == "none":
                why = 'this campaign does not estimate influence (<code>[estimates] influence = "none"</code>)'
            elif pairs is None:
                why = "no influence estimates yet: top-k and per-class influence are written when the campaign ends"
            else:
                why = "no pair passes the selection"
            return _section("influence", title, intro, _note(why))
        lead = (f"No pair passes the selection; shown instead: the {len(tests)} test examples with the largest "
                f"influence of any training example ({runs:,} runs), as in the paper's MNIST figure.")
    selected = set(zip(pairs["train"].tolist(), pairs["test"].tolist())) if pairs is not None else set()
    found = top_influencers(inp.c.paths, inp.c.labels["test_labels"], tests, INFLUENCERS)
    for j in tests:  # no influence file (or not this test): the pairs themselves are the influencers
        if j not in found and pairs is not None:
            sel = np.flatnonzero(pairs["test"] == j)[:INFLUENCERS]
            found[j] = [Influencer(int(pairs["train"][s]), float(pairs["infl"][s]),
                                   float(pairs["infl_se"][s]) if "infl_se" in pairs else None) for s in sel]
    caption = (f"{runs:,} runs. Under each training example: its id, label, influence ± standard error on the "
               f"test example and its own memorization.")
    if inp.pictures is None:
        body = _note(esc(inp.picture_note)) + f"<p>{lead}</p>" + _figure_html(
            influence_table(inp, tests, found, selected), caption)
    else:
        body = f"<p>{lead}</p>" + _figure_html(influence_rows(inp, tests, found, selected), caption)
    return _section("influence", title, intro, body)


def influence_rows(inp: Inputs, tests: list[int], found: dict, selected: set) -> str:
    """The paper's figure: each test image, then its top influencing training images with their values."""
    mem, pics = inp.mem["mem"], inp.pictures
    y_tr, y_te = inp.c.labels["train_labels"], inp.c.labels["test_labels"]
    lines = []
    for j in tests:
        cards = [f'<div class="card test">{pics.img("test", j, f"test example {j}")}'
                 f'<div class="cap"><b>test #{j}</b><br>label {esc(inp.label(int(y_te[j])))}</div></div>']
        for inf in found.get(j, []):
            framed = " selected" if (inf.train, j) in selected else ""
            other = ' <span class="warn">other class</span>' if y_tr[inf.train] != y_te[j] else ""
            se = f" ± {inf.se:.3f}" if inf.se is not None else ""
            cards.append(f'<div class="card{framed}">{pics.img("train", inf.train, f"training example {inf.train}")}'
                         f'<div class="cap">#{inf.train} label {esc(inp.label(int(y_tr[inf.train])))}{other}<br>'
                         f'infl {inf.infl:.3f}{se}<br>mem {_num(float(mem[inf.train]))}</div></div>')
        lines.append(f'<div class="pairrow">{"".join(cards)}</div>')
    return f'<div class="pairs">{"".join(lines)}</div>'


def influence_table(inp: Inputs, tests: list[int], found: dict, selected: set) -> str:
    """The same as a table, for inputs that are not images."""
    mem = inp.mem["mem"]
    y_tr, y_te = inp.c.labels["train_labels"], inp.c.labels["test_labels"]
    rows = []
    for j in tests:
        cells = [f"{inf.train} (label {esc(inp.label(int(y_tr[inf.train])))}): infl {inf.infl:.3f}"
                 + (f" ± {inf.se:.3f}" if inf.se is not None else "") + f", mem {_num(float(mem[inf.train]))}"
                 + (" ●" if (inf.train, j) in selected else "") for inf in found.get(j, [])]
        rows.append([str(j), esc(inp.label(int(y_te[j]))), "<br>".join(cells)])
    return _table(["test example", "label", "top influencers (● selected pair)"], rows)
