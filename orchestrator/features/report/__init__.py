"""`longtail report DIR`: one self-contained HTML page, DIR/report/index.html, that shows what a
campaign has found so far (docs/report.md says how to read every section).

The page is built from what the campaign directory holds and nothing else: estimates/ (memorization,
influence, pairs, summary.json), the shards in runs/ (convergence, per-run accuracy), state/fold.npz
(per-run accuracy), failed/ and plan/. Every image is inline (base64 PNG drawn with matplotlib), so
the file can be mailed or archived alone and opens without a network. It can be written at any time:
while a campaign runs it says "in progress" and shows the estimates of the runs folded so far.

Nothing read from the campaign directory is unpickled (np.load with allow_pickle=False only), and a
section that cannot be drawn says why on the page instead of failing the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from estimators.estimates import error_bound
from workers.storage import arrow_source, atomic_write_text, is_local, makedirs, open_input

from orchestrator.campaign import Campaign, create_or_open, read_examples
from orchestrator.features.report.page import (SCATTER_LIMIT, _figure, _figure_html, _note, _num, _pct, _png, _runs_of, _section,
                          _table, esc, no_estimates)
from orchestrator.features.report.proxies import section as proxies_section

GALLERY_SIZE = 24  # most memorized training examples shown
PAIR_ROWS = 10  # test examples shown with their influencers (the paper's MNIST figure has 10 rows)
INFLUENCERS = 4  # training examples shown beside each test example (as in the paper's figure)
MAX_SHARDS = 2000  # the convergence figure reads at most this many shards, spread evenly over the runs
CONVERGENCE_EXAMPLES = 1000  # training examples whose estimates the convergence figure follows
MAX_IMAGE_GB = 8.0  # a dataset larger than this in memory is not loaded for ~75 thumbnails: tables instead
# The paper's Table 1 (Feldman & Zhang 2020), shown beside this campaign's counts for scale.
PAPER_TABLE1 = [("MNIST", 35, 33, 10_000, 31), ("CIFAR-100", 1015, 888, 10_000, 774),
                ("ImageNet", 1641, 1462, 50_000, 1298)]


# --- what the sections read -----------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything the sections read, loaded once."""
    c: Campaign
    meta: dict  # plan/examples.parquet metadata: dataset, num_classes, input_shape, info
    summary: dict | None  # estimates/summary.json, None before the first checkpoint
    mem: dict[str, np.ndarray] | None  # memorization.parquet as columns
    mem_runs: int  # runs behind memorization.parquet (the main subset ratio's)
    pairs: dict[str, np.ndarray] | None  # high_influence_pairs.parquet as columns
    pictures: "Pictures | None"  # display pixels, None for vector inputs or when loading failed
    picture_note: str  # why there are no pictures
    notes: list[str] = field(default_factory=list)  # sections that could not be drawn

    def label(self, k: int) -> str:
        names = self.meta.get("info", {}).get("classes")
        return f"{k} ({names[k]})" if names and 0 <= k < len(names) else str(k)


def _read_table(path) -> pa.Table | None:
    if not path.exists():
        return None
    source, filesystem = arrow_source(path)
    return pq.read_table(source, filesystem=filesystem)


def _columns(table: pa.Table | None) -> dict[str, np.ndarray] | None:
    if table is None:
        return None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def load_inputs(campaign_dir) -> Inputs:
    c = create_or_open(None, campaign_dir, load_data=False)  # the frozen spec; the data only if images
    meta, _ = read_examples(c.paths.examples)
    summary = json.loads(c.paths.summary.read_text()) if c.paths.summary.exists() else None
    mem_table = _read_table(c.paths.memorization)
    pictures, note = load_pictures(c, meta)
    return Inputs(c=c, meta=meta, summary=summary, mem=_columns(mem_table), mem_runs=_runs_of(mem_table),
                  pairs=_columns(_read_table(c.paths.pairs)), pictures=pictures, picture_note=note)


# --- pictures of examples -------------------------------------------------------------------------


def image_shape(meta: dict) -> tuple[int, int, int] | None:
    """(channels, height, width) to display an input as, or None when inputs are not images."""
    shape = tuple(meta.get("input_shape") or ())
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape
    if len(shape) == 2:
        return (1, *shape)
    hw = meta.get("info", {}).get("image_shape")  # flattened images that say their shape
    if len(shape) == 1 and hw and len(hw) == 2 and hw[0] * hw[1] == shape[0]:
        return (1, *hw)
    return None


class Pictures:
    """Inputs as displayable images: CIFAR's per-channel normalization undone, and any image still
    outside [0, 1] stretched to it, so that no thumbnail is clipped to black or white."""

    def __init__(self, x_train: np.ndarray, x_test: np.ndarray, shape: tuple[int, int, int], info: dict):
        self.x = {"train": x_train, "test": x_test}
        self.shape = shape
        norm = info.get("normalization") or {}
        self.mean = np.array(norm.get("mean", 0.0), np.float32).reshape(-1, 1, 1)
        self.std = np.array(norm.get("std", 1.0), np.float32).reshape(-1, 1, 1)
        self._cache: dict[tuple[str, int], str] = {}

    def pixels(self, split: str, i: int) -> np.ndarray:
        x = np.asarray(self.x[split][i], np.float32).reshape(self.shape) * self.std + self.mean
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        x = np.clip(x, 0, 1)
        return x[0] if self.shape[0] == 1 else x.transpose(1, 2, 0)

    def uri(self, split: str, i: int) -> str:
        key = (split, int(i))
        if key not in self._cache:
            from matplotlib.image import imsave

            buf = io.BytesIO()
            imsave(buf, self.pixels(split, i), cmap="gray", vmin=0, vmax=1, format="png")
            self._cache[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return self._cache[key]

    def img(self, split: str, i: int, title: str) -> str:
        # small images are scaled up with hard pixel edges (8x8 digits would be a blur otherwise)
        pixelated = " pixelated" if self.shape[1] <= 64 else ""
        return f'<img class="thumb{pixelated}" src="{self.uri(split, i)}" alt="{html.escape(title)}">'


def load_pictures(c: Campaign, meta: dict) -> tuple[Pictures | None, str]:
    """The campaign's inputs as pictures, or None and why not (vectors, or a dataset that cannot be
    loaded here: the report then shows tables)."""
    from workers.datasets import dataset_fingerprint, load_dataset

    shape = image_shape(meta)
    if shape is None:
        return None, f"inputs of shape {tuple(meta.get('input_shape') or ())} are not images; tables instead"
    size_gb = (c.n_train + c.n_test) * int(np.prod(meta["input_shape"])) * 4 / 1e9
    if size_gb > MAX_IMAGE_GB:
        return None, (f"the dataset takes {size_gb:.0f} GB in memory, more than the report loads "
                      f"({MAX_IMAGE_GB:g} GB) for its thumbnails; tables instead")
    try:
        data = load_dataset(c.spec.dataset.as_dict())
        if dataset_fingerprint(data) != c.fingerprint:
            return None, (f"the dataset loaded here differs from the campaign's (fingerprint "
                          f"{dataset_fingerprint(data)}, campaign {c.fingerprint}); tables instead of images")
        return Pictures(data.x_train, data.x_test, shape, meta.get("info", {})), ""
    except Exception as e:  # a missing download, a plug-in not importable here: degrade, never fail
        return None, f"the images could not be loaded ({type(e).__name__}: {str(e)[:300]}); tables instead"


# --- drawing --------------------------------------------------------------------------------------


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


def draw_convergence(conv: "Convergence", ratio: float) -> str:
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


# --- sections -------------------------------------------------------------------------------------


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


@dataclass
class Influencer:
    train: int
    infl: float
    se: float | None


def top_influencers(inp: Inputs, tests: list[int], k: int) -> dict[int, list[Influencer]]:
    """The k training examples with the largest influence on each test example, from whichever
    influence file the campaign's mode wrote; {} when there is none."""
    d = inp.c.paths.estimates_dir
    out: dict[int, list[Influencer]] = {}
    if not tests:
        return out
    dense, dense_se = d / "influence.npy", d / "influence_se.npy"
    if dense.exists():
        infl = _load_npy(dense)
        se = _load_npy(dense_se) if dense_se.exists() else None
        cols = np.asarray(infl[:, tests])  # one pass over the train-major rows for every test at once
        se_cols = np.asarray(se[:, tests]) if se is not None else None
        for n, j in enumerate(tests):
            order = np.argsort(-cols[:, n], kind="stable")[:k]  # ties: the smaller train id, as in topk
            out[j] = [Influencer(int(i), float(cols[i, n]), float(se_cols[i, n]) if se_cols is not None else None)
                      for i in order]
        return out
    topk = d / "influence_topk.parquet"
    if topk.exists():
        source, filesystem = arrow_source(topk)
        t = pq.read_table(source, filesystem=filesystem, columns=["test", "rank", "train", "infl", "se"],
                          filters=[("test", "in", [int(j) for j in tests])]).to_pandas()
        for j, rows in t.sort_values(["test", "rank"]).groupby("test"):
            out[int(j)] = [Influencer(int(r.train), float(r.infl), float(r.se)) for r in rows.head(k).itertuples()]
        return out
    per_class = d / "influence_per_class.npz"
    if per_class.exists():
        y_te = inp.c.labels["test_labels"]
        with open_input(per_class) as f, np.load(f, allow_pickle=False) as z:
            for j in tests:
                cls = int(y_te[j])
                pos = np.flatnonzero(z[f"tt_classidx_{cls}"] == j)
                if not len(pos):
                    continue
                col = z[f"infl_matrix_class{cls}"][:, pos[0]]
                se = z[f"infl_se_class{cls}"][:, pos[0]]
                train = z[f"tr_classidx_{cls}"]
                order = np.argsort(-col, kind="stable")[:k]
                out[j] = [Influencer(int(train[i]), float(col[i]), float(se[i])) for i in order]
        return out
    return out


def _load_npy(path) -> np.ndarray:
    # memory-mapped when local: a CIFAR-size dense matrix is 2 GB, and we read a few columns of it
    if is_local(path):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    with open_input(path) as f:
        return np.load(f, allow_pickle=False)


def strongest_tests(inp: Inputs, count: int) -> list[int]:
    """Test examples ranked by their strongest influence, when no pair passes the selection (what the
    paper's MNIST figure shows: no memorization threshold, no class filter)."""
    d = inp.c.paths.estimates_dir
    if (d / "influence.npy").exists():
        infl = _load_npy(d / "influence.npy")
        best = np.full(infl.shape[1], -np.inf, np.float32)
        for start in range(0, infl.shape[0], 4096):  # row blocks: bounded memory on a large matrix
            best = np.maximum(best, np.asarray(infl[start:start + 4096]).max(axis=0))
        return [int(j) for j in np.argsort(-best, kind="stable")[:count]]
    if (d / "influence_topk.parquet").exists():
        source, filesystem = arrow_source(d / "influence_topk.parquet")
        t = pq.read_table(source, filesystem=filesystem, columns=["test", "rank", "infl"],
                          filters=[("rank", "==", 0)]).to_pandas()
        return [int(j) for j in t.sort_values("infl", ascending=False, kind="stable").test.head(count)]
    return []


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
    runs = _runs_of_pairs(inp)
    if pairs is not None and len(pairs["test"]):
        # test examples by their strongest pair (ties: in the file's order)
        ranked = list(dict.fromkeys(pairs["test"][np.argsort(-pairs["infl"], kind="stable")].tolist()))
        tests = ranked[:PAIR_ROWS]
        lead = (f"{len(pairs['test']):,} pairs over {len(ranked):,} test examples ({runs:,} runs); the "
                f"{len(tests)} test examples with the strongest pairs:")
    else:
        tests = strongest_tests(inp, PAIR_ROWS)
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
    found = top_influencers(inp, tests, INFLUENCERS)
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


def _runs_of_pairs(inp: Inputs) -> int:
    t = pq.read_schema(*arrow_source(inp.c.paths.pairs)) if inp.c.paths.pairs.exists() else None
    if t is not None and t.metadata and b"longtail" in t.metadata:
        return int(json.loads(t.metadata[b"longtail"]).get("runs", inp.mem_runs))
    return inp.mem_runs


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


@dataclass
class Convergence:
    runs: np.ndarray  # k: the number of runs behind each point
    mean_abs: np.ndarray  # mean |mem_k - mem_final| over the followed examples
    rms: np.ndarray
    followed: np.ndarray  # ids of the training examples followed
    shards: int  # shards read (after the cap)
    available: int  # shards of the main ratio on disk
    unreadable: int


def _train_outcomes(path, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """in_subset and correct of every training example in one shard, by example id (never row order)."""
    source, filesystem = arrow_source(path)
    t = pq.read_table(source, filesystem=filesystem, columns=["split", "example", "in_subset", "correct"])
    split = t.column("split").combine_chunks()
    if pa.types.is_dictionary(split.type):
        codes = split.indices.to_numpy(zero_copy_only=False)
        train = codes == split.dictionary.to_pylist().index("train")
    else:
        train = split.to_numpy(zero_copy_only=False) == "train"
    t = t.filter(pa.array(train))
    ex = t.column("example").to_numpy()
    inside, correct = np.zeros(n_train, bool), np.zeros(n_train, bool)
    inside[ex] = t.column("in_subset").fill_null(False).to_numpy(zero_copy_only=False)
    correct[ex] = t.column("correct").fill_null(False).to_numpy(zero_copy_only=False)
    return inside, correct


def convergence(c: Campaign) -> Convergence | None:
    """Memorization of a fixed sample of training examples after the first k runs (k = 10%, 20%, ...,
    100% of the shards read), from the shards alone."""
    primary = c.plan.ratios.index(c.spec.primary_ratio)
    runs = sorted(r for r in c.finished_runs() if c.plan.ratio_of_run[r] == primary)
    available = len(runs)
    if len(runs) > MAX_SHARDS:  # evenly spread, so "the first k" keeps the order runs were planned in
        runs = [runs[i] for i in np.unique(np.linspace(0, len(runs) - 1, MAX_SHARDS).round().astype(int))]
    n = c.n_train
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, CONVERGENCE_EXAMPLES), replace=False))
    inside, correct, unreadable = [], [], 0
    for r in runs:
        try:
            a, b = _train_outcomes(c.paths.shard(r), n)
        except (OSError, ValueError, KeyError, IndexError, pa.ArrowException):
            unreadable += 1  # a shard the driver would reject: leave it out here too
            continue
        inside.append(a[sample])
        correct.append(b[sample])
    t = len(inside)
    if t < 10:
        return None
    inside, correct = np.array(inside), np.array(correct)
    n_in = np.cumsum(inside, axis=0, dtype=np.int32)
    c_in = np.cumsum(inside & correct, axis=0, dtype=np.int32)
    c_all = np.cumsum(correct, axis=0, dtype=np.int32)

    def mem_after(k: int) -> np.ndarray:
        ni, no = n_in[k - 1], k - n_in[k - 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((ni > 0) & (no > 0), c_in[k - 1] / ni - (c_all[k - 1] - c_in[k - 1]) / no, np.nan)

    ks = np.unique(np.round(np.linspace(0.1, 1.0, 10) * t).astype(int))
    ks = ks[ks >= 2]
    final = mem_after(t)
    mean_abs, rms = [], []
    for k in ks:
        d = mem_after(int(k)) - final
        d = d[np.isfinite(d)]
        mean_abs.append(float(np.abs(d).mean()) if len(d) else np.nan)
        rms.append(float(np.sqrt((d ** 2).mean())) if len(d) else np.nan)
    return Convergence(ks, np.array(mean_abs), np.array(rms), sample, t, available, unreadable)


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


def _run_accuracies(c: Campaign) -> tuple[np.ndarray, str]:
    """Test accuracy of every folded run (state/fold.npz), else from the shards' metadata."""
    if c.paths.checkpoint.exists():
        try:
            with open_input(c.paths.checkpoint) as f, np.load(f, allow_pickle=False) as z:
                if "run_test_acc" in z.files and "folded" in z.files:
                    acc = z["run_test_acc"][z["folded"]]
                    return acc[np.isfinite(acc)], "the fold checkpoint"
        except (OSError, ValueError, KeyError):
            pass
    acc = []
    runs = sorted(c.finished_runs())
    if len(runs) > MAX_SHARDS:
        runs = [runs[i] for i in np.unique(np.linspace(0, len(runs) - 1, MAX_SHARDS).round().astype(int))]
    for r in runs:
        try:
            meta = pq.read_schema(*arrow_source(c.paths.shard(r))).metadata or {}
            acc.append(float(json.loads(meta[b"longtail"])["test_acc"]))
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            continue
    acc = np.array(acc, float)
    return acc[np.isfinite(acc)], "the shards' metadata"


def runs_section(inp: Inputs) -> str:
    title = "Runs: accuracy and failures"
    intro = ("The test accuracy of each run: a narrow peak means the runs are comparable; a tail of low "
             "accuracies points to runs that did not train properly. Failed runs are retried when the "
             "campaign resumes; their reasons are in failed/.")
    c = inp.c
    acc, source = _run_accuracies(c)
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
        rejected = sum(1 for p in c.paths.rejected_dir.iterdir() if not p.name.endswith(".why.txt"))
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


def utility_section(inp: Inputs) -> str:
    title = "Marginal utility of memorized examples"
    path = inp.c.paths.utility_results
    rows = _columns(_read_table(path))
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


# --- the page -------------------------------------------------------------------------------------


# --- privacy risk (estimators/privacy.py, docs/audit.md) ----------------------------------------------


def draw_risk_vs_memorization(risk: np.ndarray, mem: np.ndarray, runs: int, rho: float) -> str:
    fig, ax = _figure(4.8, 3.6)
    ax.scatter(mem, risk, s=5, alpha=0.35, color="#4c72b0", linewidths=0)
    ax.axhline(0.5, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("memorization estimate")
    ax.set_ylabel("membership risk (AUC of the in/out fits)")
    ax.set_ylim(0.3, 1.02)
    ax.set_title(f"{len(risk):,} training examples, {runs:,} runs; Spearman {rho:.2f}", fontsize=10)
    return _png(fig, "membership risk against memorization")


def privacy_section(inp: Inputs) -> str:
    from estimators.privacy import rank_correlation

    intro = ("Membership risk of each training example from the campaign's own runs (the likelihood-ratio "
             "attack, Carlini et al. 2022): Gaussian fits of a per-model statistic over the runs that trained on "
             "it and those that did not, and the AUC of the two fits: 0.5 = its membership cannot be told from "
             "the models' outputs, 1 = it always can. <code>longtail audit</code> scores a target model "
             "(docs/audit.md).")
    table = _read_table(inp.c.paths.estimates_dir / "privacy_risk.parquet")
    if table is None:
        return _section("privacy", "Privacy risk", intro,
                        _note("no privacy_risk.parquet: the shards store no margin, probability or logits"))
    t = _columns(table)
    ok = np.isfinite(t["risk"]) & np.isfinite(t["mem"])
    if not ok.any():
        return _section("privacy", "Privacy risk", intro, _note("no risk is defined yet: every example needs runs "
                                                                "with and runs without it"))
    rho = rank_correlation(t["risk"], t["mem"])
    runs = _runs_of(table)
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


SECTIONS = [("memorization", memorization_section), ("gallery", gallery_section),
            ("influence", influence_section), ("table1", table1_section),
            ("convergence", convergence_section), ("runs", runs_section), ("utility", utility_section),
            ("proxies", proxies_section), ("privacy", privacy_section)]

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


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render(campaign_dir) -> tuple[str, Inputs]:
    """The report page of one campaign, and what it was built from (with notes on failed sections)."""
    inp = load_inputs(campaign_dir)
    body = [header(inp)]
    for sid, build in SECTIONS:
        try:
            body.append(build(inp))
        except Exception as ex:  # one broken section must not take the others down; say what happened
            inp.notes.append(f"section {sid}: {type(ex).__name__}: {ex}")
            body.append(f'<section id="{sid}"><h2>{esc(sid)}</h2>'
                        f'{_note("this section could not be drawn: " + esc(f"{type(ex).__name__}: {ex}"))}</section>')
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            # the page may load nothing from anywhere: only its own inline style and data: images
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="generator" content="longtail report">'
            f"<title>{esc(inp.c.name)}: longtail report</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    return page, inp


def write_report(campaign_dir):
    """Write DIR/report/index.html (atomically: a reader never sees half a page); return its path and
    the notes of sections that could not be drawn."""
    page, inp = render(campaign_dir)
    path = inp.c.paths.report
    makedirs(path.parent)
    atomic_write_text(path, page)
    return path, inp.notes
