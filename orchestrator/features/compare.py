"""`longtail compare A B`: per-example differences between two campaigns on the same dataset (numeric core in
estimators/comparison.py, docs/compare-and-selftest.md).

A is a campaign directory; B is one too, or a file in Feldman & Zhang's released .npz layout (what
`longtail export --format fz` writes: tr_mem, tr_labels, tt_labels, per-class influence blocks), with an
optional index map when the file's example order differs from the loader's.

Paired when A and B share the campaign seed, design and subset ratios (run r then trains on the same
subset in both; the plans are checked to agree): differences of memorization, held-out accuracy and
influence use the per-run differences over the runs both have folded, with paired standard errors.
Otherwise unpaired, sqrt(se_a^2 + se_b^2), and the output says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from estimators import comparison as cmp
from estimators import estimates as est
from estimators import privacy as pv
from estimators.stats import CORRECT
from workers.errors import LongtailError
from workers.storage import atomic_write_text

from orchestrator.fold import Aggregator
from orchestrator.paths import ComparePaths

BLOCK_RUNS = 256


class CompareError(LongtailError, ValueError):
    """Two things that cannot be compared; the message says why."""


@dataclass
class Released:
    """A Feldman-Zhang .npz file, mapped to the loader's example ids."""

    path: Path
    mem: np.ndarray  # (n_train,) in the campaign's example order
    tr_labels: np.ndarray
    tt_labels: np.ndarray | None
    infl: dict[tuple[int, int], float]  # (train, test) -> influence, for the chosen test set only


@dataclass
class Comparison:
    paired: bool
    why: str  # why paired or not
    runs: tuple[int, int] | int  # runs behind A and B (or the common runs when paired)
    labels: np.ndarray
    mem_a: np.ndarray
    mem_b: np.ndarray
    mem_diff: np.ndarray
    mem_se: np.ndarray
    out_a: np.ndarray | None
    out_b: np.ndarray | None
    out_diff: np.ndarray | None
    out_se: np.ndarray | None
    test_ids: np.ndarray
    infl_a: np.ndarray | None = None  # (n_train, k)
    infl_b: np.ndarray | None = None
    infl_diff: np.ndarray | None = None
    infl_se: np.ndarray | None = None


def open_folded(campaign_dir: str) -> Aggregator:
    from orchestrator.features.audit import open_folded as _open

    return _open(campaign_dir)


def read_released(path: Path, n_train: int, index_map: Path | None, test_ids: np.ndarray) -> Released:
    """A released-format file, its arrays put in the campaign's example order (index_map[k] = the campaign's
    id of the file's k-th training example; an .npy of integers, or an .npz with train (and test) keys)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CompareError(f"{path}: not a readable .npz file ({e}); expected the released layout (tr_mem, "
                           f"tr_labels, ...) that `longtail export --format fz` writes") from None
    missing = {"tr_mem", "tr_labels"} - set(arrays)
    if missing:
        raise CompareError(f"{path}: has no {sorted(missing)}; found keys {sorted(arrays)[:8]}; expected the released "
                           f"layout (tr_mem, tr_labels, per-class infl_matrix_class<k>, ...)")
    tr_map = te_map = None
    if index_map is not None:
        z = np.load(index_map, allow_pickle=False)
        if isinstance(z, np.ndarray):
            tr_map = z
        else:
            with z:
                tr_map, te_map = z["train"], (z["test"] if "test" in z.files else None)
        tr_map = np.asarray(tr_map, np.int64)
    m = len(arrays["tr_mem"])
    if tr_map is None:
        tr_map = np.arange(m)
    if len(tr_map) != m or m != n_train or not np.array_equal(np.sort(tr_map), np.arange(n_train)):
        raise CompareError(f"{path}: {m} training examples{' through the index map ' + str(index_map) if index_map else ''}"
                           f", expected a permutation of the campaign's {n_train}; give --index-map for a file "
                           f"whose order differs from the loader's")
    mem = np.full(n_train, np.nan)
    mem[tr_map] = arrays["tr_mem"]
    labels = np.empty(n_train, np.int64)
    labels[tr_map] = arrays["tr_labels"]
    tt = arrays.get("tt_labels")
    if tt is not None and te_map is not None:
        t2 = np.empty_like(tt)
        t2[np.asarray(te_map, np.int64)] = tt
        tt = t2
    wanted = set(test_ids.tolist())
    infl = {}
    for key in arrays:
        if key.startswith("infl_matrix_class"):
            k = key[len("infl_matrix_class"):]
            rows, cols = arrays[f"tr_classidx_{k}"], arrays[f"tt_classidx_{k}"]
            block = arrays[key]
            for jj, j in enumerate(cols):
                jm = int(te_map[j]) if te_map is not None else int(j)
                if jm in wanted:
                    for ii, i in enumerate(rows):
                        infl[(int(tr_map[i]), jm)] = float(block[ii, jj])
    return Released(path=path, mem=mem, tr_labels=labels, tt_labels=tt, infl=infl)


def pairing(a: Aggregator, b: Aggregator) -> tuple[bool, str, np.ndarray]:
    """Whether A and B are paired, why, and the common folded runs of the main ratio."""
    pa_, pb = a.c.plan, b.c.plan
    for what, x, y in (("campaign seed", pa_.campaign_seed, pb.campaign_seed), ("design", pa_.design, pb.design),
                       ("subset ratios", pa_.ratios, pb.ratios)):
        if x != y:
            return False, f"{what} differs ({x} in A, {y} in B): run r trains on different subsets", np.array([], int)
    common = np.intersect1d(a.main_runs(), b.main_runs())
    if len(common) < 2:
        return False, f"only {len(common)} runs are folded in both", common
    if not np.array_equal(pa_.masks[common], pb.masks[common]):
        return False, "the plans' subsets differ although seed, design and ratio agree", np.array([], int)
    return True, f"same campaign seed {pa_.campaign_seed}, design {pa_.design!r} and ratio: {len(common)} common runs", common


def _held_out(stats) -> tuple[np.ndarray, np.ndarray]:
    m = est.memorization(stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        return m.acc_out, np.sqrt(m.acc_out * (1 - m.acc_out) / m.n_out)


def _compare_paired(a: Aggregator, b: Aggregator, runs: np.ndarray, test_ids: np.ndarray, why: str) -> Comparison:
    n = a.c.n_train
    sums = pv.zeros(n)
    for start in range(0, len(runs), BLOCK_RUNS):
        block = runs[start:start + BLOCK_RUNS]
        da, db = [a.read(int(r)) for r in block], [b.read(int(r)) for r in block]
        mask = np.stack([d.mask for d in da])
        diff = np.stack([x.train_correct.astype(np.float64) - y.train_correct for x, y in zip(da, db)])
        pv.fold_scores(sums, mask, diff)
    d = est.difference(sums.sum_in, sums.count_in, sums.sum_out, sums.count_out, sums.sq_in, sums.sq_out, binary=False)
    mean_out, var_out, _ = pv._mean_var(sums.count_out, sums.sum_out, sums.sq_out)
    with np.errstate(invalid="ignore", divide="ignore"):
        out_se = np.sqrt(var_out / sums.count_out)
    # each side's own estimates over the same common runs
    ma, mb = _runs_memorization(a, runs), _runs_memorization(b, runs)
    comp = Comparison(paired=True, why=why, runs=len(runs), labels=a.c.labels["train_labels"], mem_a=ma.mem,
                      mem_b=mb.mem, mem_diff=d.est, mem_se=d.se, out_a=ma.acc_out, out_b=mb.acc_out,
                      out_diff=mean_out, out_se=out_se, test_ids=test_ids)
    if len(test_ids):
        xa = a.outcomes(CORRECT, runs).x[:, test_ids].astype(np.float64)
        xb = b.outcomes(CORRECT, runs).x[:, test_ids].astype(np.float64)
        masks = a.c.plan.dense(runs)
        ia, ib = cmp.influence_of(masks, xa), cmp.influence_of(masks, xb)
        di = cmp.paired_influence(masks, xa - xb)
        comp.infl_a, comp.infl_b, comp.infl_diff, comp.infl_se = ia.est, ib.est, di.est, di.se
    return comp


def _runs_memorization(agg: Aggregator, runs: np.ndarray) -> est.Memorization:
    """Memorization over a subset of the folded runs (all of them: the fold itself), from the plan and shards'
    correctness; used so that both sides of a paired comparison stand on the same runs."""
    if len(runs) == agg.stats.runs:
        return est.memorization(agg.stats)
    from estimators import stats as st

    s = st.zeros(agg.c.n_train, agg.c.n_test, dense=False)
    for start in range(0, len(runs), BLOCK_RUNS):
        data = [agg.read(int(r)) for r in runs[start:start + BLOCK_RUNS]]
        st.fold(s, np.stack([d.mask for d in data]), {CORRECT: np.stack([d.train_correct for d in data])},
                {CORRECT: np.stack([d.test_correct for d in data])})
    return est.memorization(s)


def _compare_unpaired(a: Aggregator, b: Aggregator | Released, test_ids: np.ndarray, why: str) -> Comparison:
    ma = est.memorization(a.stats)
    out_a, out_se_a = _held_out(a.stats)
    runs_a = a.main_runs()
    if isinstance(b, Released):
        mem_b, se_b, out_b, out_se_b, runs = b.mem, None, None, None, (a.stats.runs, 0)
    else:
        mb = est.memorization(b.stats)
        mem_b, se_b = mb.mem, mb.se
        out_b, out_se_b = _held_out(b.stats)
        runs = (a.stats.runs, b.stats.runs)
    diff, se = cmp.unpaired(ma.mem, ma.se, mem_b, se_b)
    comp = Comparison(paired=False, why=why, runs=runs, labels=a.c.labels["train_labels"], mem_a=ma.mem, mem_b=mem_b,
                      mem_diff=diff, mem_se=se, out_a=out_a, out_b=out_b,
                      out_diff=None if out_b is None else out_a - out_b,
                      out_se=None if out_b is None else np.sqrt(out_se_a**2 + out_se_b**2), test_ids=test_ids)
    if len(test_ids):
        ia = cmp.influence_of(a.c.plan.dense(runs_a), a.outcomes(CORRECT, runs_a).x[:, test_ids])
        if isinstance(b, Released):
            ib_est = np.full_like(ia.est, np.nan)
            for (i, j), v in b.infl.items():
                ib_est[i, np.flatnonzero(test_ids == j)] = v
            ib_se = None
        else:
            runs_b = b.main_runs()
            ib = cmp.influence_of(b.c.plan.dense(runs_b), b.outcomes(CORRECT, runs_b).x[:, test_ids])
            ib_est, ib_se = ib.est, ib.se
        comp.infl_a, comp.infl_b = ia.est, ib_est
        comp.infl_diff, comp.infl_se = cmp.unpaired(ia.est, ia.se, ib_est, ib_se)
    return comp


def compare(a_dir: str, b: str, test_ids=(), index_map: str | None = None) -> tuple[Comparison, Aggregator]:
    a = open_folded(a_dir)
    if a.stats.runs == 0:
        raise CompareError(f"A ({a_dir}) has no folded runs; run or resume it first")
    test_ids = np.asarray(sorted(set(int(t) for t in test_ids)), np.int64)
    if len(test_ids) and (test_ids.min() < 0 or test_ids.max() >= a.c.n_test):
        raise CompareError(f"--test: ids must be in 0..{a.c.n_test - 1} (A's test set), found {test_ids.min()}.."
                           f"{test_ids.max()}")
    bp = Path(b)
    if bp.is_file():
        rel = read_released(bp, a.c.n_train, Path(index_map) if index_map else None, test_ids)
        bad = int((rel.tr_labels != a.c.labels["train_labels"]).sum())
        if bad:
            raise CompareError(f"B ({b}): {bad} of its tr_labels differ from A's training labels ({a.c.paths.examples}); "
                               f"another dataset, or another example order (give --index-map)")
        return _compare_unpaired(a, rel, test_ids, "B is a released-format file: no runs to pair, and no standard "
                                                    "errors for B"), a
    if index_map:
        raise CompareError("--index-map applies to a released-format file B, not to a campaign directory")
    bagg = open_folded(b)
    if bagg.c.fingerprint != a.c.fingerprint:
        raise CompareError(f"A and B are campaigns on different datasets (fingerprint {a.c.fingerprint} in "
                           f"{a.c.paths.examples}, {bagg.c.fingerprint} in {bagg.c.paths.examples})")
    paired, why, runs = pairing(a, bagg)
    if paired:
        return _compare_paired(a, bagg, runs, test_ids, why), a
    return _compare_unpaired(a, bagg, test_ids, why), a


def summarize(comp: Comparison, k: int) -> dict:
    labels = comp.labels
    per_class = {int(c): pv.rank_correlation(comp.mem_a[labels == c], comp.mem_b[labels == c])
                 for c in np.unique(labels)}
    up, down = cmp.most_changed(comp.mem_diff, k)
    rows = lambda idx: [{"example": int(i), "label": int(labels[i]), "mem_a": comp.mem_a[i], "mem_b": comp.mem_b[i],
                         "diff": comp.mem_diff[i], "se": comp.mem_se[i]} for i in idx]  # noqa: E731
    ok = np.isfinite(comp.mem_diff)
    out = {"paired": comp.paired, "why": comp.why, "runs": comp.runs,
           "memorization": {"mean_diff": float(np.nanmean(comp.mem_diff)) if ok.any() else None,
                            "mean_se": float(np.nanmean(comp.mem_se)) if ok.any() else None,
                            "significant_at_2se": int((np.abs(comp.mem_diff[ok]) > 2 * comp.mem_se[ok]).sum()),
                            "spearman": pv.rank_correlation(comp.mem_a, comp.mem_b), "spearman_per_class": per_class},
           "increased_most": rows(up), "decreased_most": rows(down)}
    if comp.out_diff is not None:
        out["held_out_accuracy"] = {"mean_diff": float(np.nanmean(comp.out_diff)),
                                    "mean_se": float(np.nanmean(comp.out_se)),
                                    "spearman": pv.rank_correlation(comp.out_a, comp.out_b)}
    if comp.infl_diff is not None:
        out["influence"] = {"test_examples": comp.test_ids.tolist(), "mean_abs_diff": float(np.nanmean(np.abs(comp.infl_diff))),
                            "mean_se": float(np.nanmean(comp.infl_se)),
                            "spearman": pv.rank_correlation(comp.infl_a.ravel(), comp.infl_b.ravel())}
    return out


def write(comp: Comparison, summary: dict, dest: Path, a_name: str, b_name: str) -> list[Path]:
    from orchestrator.estimates_files import json_safe
    from orchestrator.features.report import _figure, _png, _table

    dest.mkdir(parents=True, exist_ok=True)
    n = len(comp.labels)
    cols = {"example": np.arange(n, dtype=np.int32), "label": comp.labels.astype(np.int32), "mem_a": comp.mem_a,
            "mem_b": comp.mem_b, "mem_diff": comp.mem_diff, "mem_se": comp.mem_se}
    if comp.out_diff is not None:
        cols.update(held_out_a=comp.out_a, held_out_b=comp.out_b, held_out_diff=comp.out_diff, held_out_se=comp.out_se)
    meta = {b"longtail": json.dumps({"paired": comp.paired, "why": comp.why, "a": a_name, "b": b_name}).encode()}
    out = ComparePaths(dest)
    files = [out.table]
    pq.write_table(pa.table(cols).replace_schema_metadata(meta), files[0], compression="zstd")
    if comp.infl_diff is not None:
        k = len(comp.test_ids)
        files.append(out.influence)
        pq.write_table(pa.table({
            "train": np.repeat(np.arange(n, dtype=np.int32), k), "test": np.tile(comp.test_ids.astype(np.int32), n),
            "infl_a": comp.infl_a.ravel(), "infl_b": comp.infl_b.ravel(), "diff": comp.infl_diff.ravel(),
            "se": comp.infl_se.ravel()}).replace_schema_metadata(meta), files[-1], compression="zstd")
    files.append(out.summary)
    atomic_write_text(files[-1], json.dumps(json_safe({"a": a_name, "b": b_name, **summary}), indent=2) + "\n")
    fig, ax = _figure(4.2, 4.0)
    ax.scatter(comp.mem_a, comp.mem_b, s=4, alpha=0.4)
    ax.plot([-1, 1], [-1, 1], color="grey", lw=0.8)
    ax.set_xlabel(f"memorization in A ({a_name})")
    ax.set_ylabel(f"memorization in B ({b_name})")
    runs = comp.runs if comp.paired else f"{comp.runs[0]} and {comp.runs[1]}"
    ax.set_title(f"{'paired' if comp.paired else 'unpaired'}, {runs} runs", fontsize=9)
    figure = _png(fig, "memorization in A against B")

    def table(rows):
        return _table(["example", "label", "mem A", "mem B", "difference ± se"],
                      [[r["example"], r["label"], f"{r['mem_a']:.3f}", f"{r['mem_b']:.3f}",
                        f"{r['diff']:+.3f} ± {r['se']:.3f}"] for r in rows])

    m = summary["memorization"]
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>longtail compare {a_name} / {b_name}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}}</style></head><body>
<h1>{a_name} against {b_name}</h1>
<p><b>{'Paired' if comp.paired else 'Unpaired'}</b>: {comp.why}. Runs behind the estimates: {runs}.</p>
<p>Memorization: mean difference (A − B) {m['mean_diff']:.4f}, mean standard error {m['mean_se']:.4f};
{m['significant_at_2se']} examples differ by more than 2 standard errors; Spearman rank correlation
{m['spearman']:.3f} overall.</p>
{figure}
<h2>Memorization increased most (A above B)</h2>{table(summary['increased_most'])}
<h2>Memorization decreased most</h2>{table(summary['decreased_most'])}
<h2>Rank correlation per class</h2>{_table(['class', 'Spearman'], [[k, f'{v:.3f}'] for k, v in m['spearman_per_class'].items()])}
</body></html>"""
    files.append(out.page)
    atomic_write_text(files[-1], html)
    return files


def parse_test_ids(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CompareError(f"--test: expected comma-separated test example ids, found {text!r}") from None
