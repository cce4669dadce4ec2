"""Write what an Aggregator holds as files: estimates/ while and after a campaign runs, and exports;
and read every estimates file back (the readers at the end: the report and the commands use them).

estimates/ (docs/campaign-directory.md):
    memorization.parquet          per training example, main subset ratio, 0/1 and soft targets
    cscore.parquet                with several subset ratios: held-out accuracy per ratio and the C-score
    influence.npy, influence_se.npy            dense mode (train-major, float32)
    influence_per_class.npz                    per-class mode (the paper's released layout)
    influence_topk.parquet, influence_pairs.parquet   topk mode
    (the same with a _<target> suffix for every soft target)
    high_influence_pairs.parquet  the paper's selection, with standard errors
    proxies.parquet, proxy_agreement.parquet, triage.parquet, pred_probs.npy   orchestrator/features/proxies.py
    summary.json                  counts, accuracies, Table 1, split-half consistency, stopping

Intermediate writes (while runs are still arriving) skip the work that is heavy at scale: tiled
influence and the split-half check run only when `final` is set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from estimators import estimates as est
from estimators import influence as inf
from estimators import precision
from estimators import privacy as pv
from estimators.stats import CORRECT
from workers.storage import arrow_source, atomic_path, atomic_write_text, is_local, makedirs, open_input

from orchestrator.fold import Aggregator
from orchestrator.paths import ExportPaths

MEM_THRESHOLDS = (0.1, 0.25, 0.5, 0.75)


def write_parquet(path: Path, table: pa.Table, runs: int) -> None:
    table = table.replace_schema_metadata({b"longtail": json.dumps({"runs": runs}).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_dense_influence(agg: Aggregator, target: str, est_path, se_path, use) -> None:
    """Write the dense influence and standard-error matrices straight into memory-mapped .npy files
    (which become est_path, se_path whole, by rename or upload), calling `use(infl, se)` on them
    first: the matrices are never held in memory twice."""
    shape = (agg.c.n_train, agg.c.n_test)
    with atomic_path(est_path) as tmp_est, atomic_path(se_path) as tmp_se:
        out_est = np.lib.format.open_memmap(tmp_est, mode="w+", dtype=np.float32, shape=shape)
        out_se = np.lib.format.open_memmap(tmp_se, mode="w+", dtype=np.float32, shape=shape)
        est.influence_into(agg.stats, target, out_est, out_se)
        use(out_est, out_se)
        out_est.flush()
        out_se.flush()
        del out_est, out_se


def write_npz(path: Path, arrays: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def suffix(target: str) -> str:
    return "" if target == CORRECT else f"_{target}"


def _budget(agg: Aggregator) -> float:
    return agg.c.spec.estimates.memory_gb * 1e9 / 2


def memorization_table(agg: Aggregator) -> tuple[pa.Table, dict[str, est.Memorization]]:
    c = agg.c
    mems = {t: est.memorization(agg.stats, t) for t in agg.targets}
    cols = {"example": np.arange(c.n_train, dtype=np.int32), "label": c.labels["train_labels"].astype(np.int32)}
    if "train_groups" in c.labels:
        cols["group"] = c.labels["train_groups"].astype(np.int32)
    for t, m in mems.items():
        s = suffix(t)
        cols.update({f"mem{s}": m.mem, f"se{s}": m.se, f"ci_low{s}": m.ci_low, f"ci_high{s}": m.ci_high})
        if t == CORRECT:
            cols.update(n_in=m.n_in, n_out=m.n_out, acc_in=m.acc_in, acc_out=m.acc_out)
        else:
            cols.update({f"mean_in{s}": m.acc_in, f"mean_out{s}": m.acc_out})
    if len(c.plan.ratios) > 1:
        cols["cscore"] = est.cscore([est.memorization(g).acc_out for g in agg.groups])
    return pa.table(cols), mems


def cscore_table(agg: Aggregator) -> pa.Table:
    c = agg.c
    cols = {"example": np.arange(c.n_train, dtype=np.int32), "label": c.labels["train_labels"].astype(np.int32)}
    held_out = []
    for ratio, g in zip(c.plan.ratios, agg.groups):
        m = est.memorization(g)
        held_out.append(m.acc_out)
        cols[f"acc_out_{ratio:g}"] = m.acc_out
        cols[f"n_out_{ratio:g}"] = m.n_out
    cols["cscore"] = est.cscore(held_out)
    return pa.table(cols)


def _pairs_table(pairs: est.Pairs, test_labels: np.ndarray) -> pa.Table:
    cols = {"train": pairs.train.astype(np.int32), "test": pairs.test.astype(np.int32),
            "label": test_labels[pairs.test].astype(np.int32), "infl": pairs.infl.astype(np.float32),
            "mem": pairs.mem.astype(np.float32)}
    if pairs.se is not None:
        cols["infl_se"] = pairs.se.astype(np.float32)
    return pa.table(cols)


def _memorized(agg: Aggregator, stats, target: str = CORRECT) -> np.ndarray:
    """mem >= [estimates] mem_threshold, decided exactly on the counts (estimators/rational.py)."""
    return est.memorized(stats, agg.c.spec.estimates.mem_threshold, target)


def _halves(agg: Aggregator, runs: np.ndarray) -> inf.Halves | None:
    """The split halves of the main ratio's folded `runs`, for a top-k pass that also finds each half's
    pairs (among the training examples memorized in that half), or None without a split-half check."""
    if not agg.c.spec.estimates.split_half or min(h.runs for h in agg.halves) < 2:
        return None
    return inf.Halves(half=agg.position[runs] % 2, rows=tuple(_memorized(agg, h) for h in agg.halves),
                      threshold=agg.c.spec.estimates.infl_threshold)


def _half_sets(agg: Aggregator, top: inf.TopK) -> list[set]:
    """Each half's high-influence pairs (memorization was decided in `_halves`) as sets of (train, test)."""
    y_tr, y_te = agg.c.labels["train_labels"], agg.c.labels["test_labels"]
    sets = []
    for tr, te in top.half_pairs:
        keep = y_tr[tr] == y_te[te] if agg.c.spec.estimates.same_class else np.ones(len(tr), bool)
        sets.append(set(zip(tr[keep].tolist(), te[keep].tolist())))
    return sets


def _exact_counts(agg: Aggregator, target: str) -> est.Counts | None:
    s = agg.stats.targets[target]
    return est.Counts(s.infl_in, agg.stats.n_in, s.test, agg.stats.runs) if s.binary else None


def _class_pairs(blocks: list[inf.ClassBlock], with_se: bool):
    """The above-threshold cells of per-class blocks as (train, test, infl, se) arrays."""
    cand = [[], [], [], []]
    for b in blocks:
        r, j = b.pairs
        for lst, v in zip(cand, (b.train[r], b.test[j], b.infl[r, j], b.se[r, j])):
            lst.append(v)
    cand = [np.concatenate(v) if v else np.array([]) for v in cand]
    return cand[0].astype(np.int64), cand[1].astype(np.int64), cand[2], cand[3] if with_se else None


def write_influence(agg: Aggregator, mems: dict[str, est.Memorization], final: bool,
                    half_sets: list | None = None) -> est.Pairs | None:
    """Influence of every target in the campaign's mode; returns the paper's pairs (0/1 target).

    Every threshold is decided exactly on the counts, identically here and in the exports. In top-k
    mode the split halves' pairs come from the same pass and are appended to `half_sets`."""
    c, e = agg.c, agg.c.spec.estimates
    paths, mode = c.paths, agg.mode
    y_tr, y_te = c.labels["train_labels"], c.labels["test_labels"]
    if mode == "none" or agg.stats.runs == 0 or (mode != "dense" and not final):
        return None
    runs = agg.main_runs()
    pairs = None
    for target in agg.targets:
        mem = mems[target].mem
        memorized = _memorized(agg, agg.stats, target)
        if mode == "dense":
            selected = []
            write_dense_influence(agg, target, paths.influence_file("dense", target),
                                  paths.influence_file("dense_se", target),
                                  lambda infl, se, mem=mem, m=memorized, t=target: selected.append(
                                      est.high_influence_pairs(mem, infl, y_tr, y_te, e.mem_threshold,
                                                               e.infl_threshold, e.same_class, se, m,
                                                               _exact_counts(agg, t))))
            found = selected[0]
        elif mode == "per-class":
            blocks = inf.per_class(agg.mask_columns(runs), agg.outcomes(target, runs), y_tr, y_te, _budget(agg),
                                   e.infl_threshold)
            arrays = {}
            for b in blocks:
                arrays.update({f"infl_matrix_class{b.label}": b.infl, f"infl_se_class{b.label}": b.se,
                               f"tr_classidx_{b.label}": b.train, f"tt_classidx_{b.label}": b.test})
            write_npz(paths.influence_file("per-class", target), arrays)
            tr, te, infl, se = _class_pairs(blocks, with_se=True)
            found = est.filter_pairs(est.candidate_pairs(tr, te, infl, mem, se), mem, y_tr, y_te, e.mem_threshold,
                                     None, same_class=True, memorized=memorized)
        else:  # topk
            halves = _halves(agg, runs) if target == CORRECT and half_sets is not None else None
            top = inf.top_k(agg.mask_columns(runs), agg.outcomes(target, runs), c.n_train, e.top_k,
                            e.infl_threshold, _budget(agg), n_in=agg.stats.n_in, halves=halves)
            if halves is not None:
                half_sets.extend(_half_sets(agg, top))
            n_test, k = top.train.shape
            write_parquet(paths.influence_file("topk", target), pa.table({
                "test": np.repeat(np.arange(n_test, dtype=np.int32), k), "rank": np.tile(np.arange(k, dtype=np.int16),
                                                                                        n_test),
                "train": top.train.ravel().astype(np.int32), "infl": top.infl.ravel(), "se": top.se.ravel(),
                "ci_low": top.ci_low.ravel(), "ci_high": top.ci_high.ravel()}), len(runs))
            write_parquet(paths.influence_file("topk_pairs", target), pa.table({
                "train": top.pairs_train.astype(np.int32), "test": top.pairs_test.astype(np.int32),
                "infl": top.pairs_infl, "se": top.pairs_se}), len(runs))
            found = est.filter_pairs(est.candidate_pairs(top.pairs_train, top.pairs_test, top.pairs_infl, mem,
                                                      top.pairs_se), mem, y_tr, y_te, e.mem_threshold,
                                     None, e.same_class, memorized)
        if target == CORRECT:
            pairs = found
            write_parquet(paths.pairs, _pairs_table(found, y_te), len(runs))
    return pairs


def split_half(agg: Aggregator, half_sets: list | None = None) -> dict | None:
    """Estimates from the even and from the odd runs of the main ratio, and how well they agree.

    The halves' high-influence pairs are `half_sets` when the top-k pass found them; otherwise one
    pass computes both halves (their GEMMs together cost one of the whole)."""
    c = agg.c
    halves = [est.memorization(h) for h in agg.halves]
    if min(h.runs for h in agg.halves) < 2:
        return None
    out = {"runs": [h.runs for h in agg.halves],
           **precision.split_half_agreement(halves[0].mem, halves[1].mem, MEM_THRESHOLDS)}
    if agg.mode != "none":
        found = half_sets
        if not found:
            runs = agg.main_runs()
            top = inf.top_k(agg.mask_columns(runs), agg.outcomes(CORRECT, runs), c.n_train, 1, None, _budget(agg),
                            n_in=agg.stats.n_in, halves=_halves(agg, runs))
            found = _half_sets(agg, top)
        out["pairs"] = [len(f) for f in found]
        out["pairs_jaccard"] = est.jaccard(found[0], found[1])
    return out


def summary(agg: Aggregator, mem: est.Memorization, pairs: est.Pairs | None, complete: bool) -> dict:
    c, e = agg.c, agg.c.spec.estimates
    t = agg.stats.runs
    acc = agg.run_info["test_acc"][agg.folded]
    finite = np.isfinite(mem.mem)

    def spread(a):
        a = np.asarray(a)
        return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())} if len(a) else None

    groups = []
    for ratio, g in zip(c.plan.ratios, agg.groups):
        groups.append({"subset_ratio": ratio, "runs": g.runs, "n_in": spread(g.n_in), "n_out": spread(g.n_out)})
    out = {
        "campaign": c.name,
        "complete": complete,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": {"planned": c.plan.runs, "folded": int(agg.folded.sum())},
        "design": c.plan.design,
        "subset_ratio": c.spec.primary_ratio,
        "ratios": groups,
        "n_train": c.n_train,
        "n_test": c.n_test,
        "influence_mode": agg.mode,
        "counts": {"n_in": spread(mem.n_in), "n_out": spread(mem.n_out)},
        "error_bound_rms": est.error_bound(t, c.spec.primary_ratio) if t else None,
        "test_accuracy": {"mean": float(np.nanmean(acc)), "std": float(np.nanstd(acc))} if len(acc) else None,
        "memorization": {
            "defined": int(finite.sum()),
            "mean": float(np.nanmean(mem.mem)) if finite.any() else None,
            "mean_se": float(np.nanmean(mem.se)) if finite.any() else None,
            "held_out_accuracy_mean": float(np.nanmean(mem.acc_out)) if finite.any() else None,
            "share_at_least": {f"{thr:g}": float((mem.mem[finite] >= thr).mean()) if finite.any() else None
                               for thr in MEM_THRESHOLDS},
        },
    }
    if pairs is not None:
        out["high_influence_pairs"] = {"mem_threshold": e.mem_threshold, "infl_threshold": e.infl_threshold,
                                       "same_class": e.same_class, **est.table1(pairs, c.n_test)}
    if e.target_se:
        out["target_se"] = {"target": e.target_se, "wanted_share": e.target_share,
                            "share": agg.share_at_target()}
    return out


def write_estimates(agg: Aggregator, complete: bool, final: bool = True, extra: dict | None = None) -> dict:
    """Finalize the folded statistics into estimates/ and return the summary."""
    agg.flush()
    c = agg.c
    makedirs(c.paths.estimates_dir)
    runs = agg.stats.runs
    table, mems = memorization_table(agg)
    write_parquet(c.paths.memorization, table, runs)
    if len(c.plan.ratios) > 1:
        write_parquet(c.paths.cscore, cscore_table(agg), int(agg.folded.sum()))
    half_sets: list[set] = []
    pairs = write_influence(agg, mems, final, half_sets)
    out = summary(agg, mems[CORRECT], pairs, complete)
    risk = write_privacy_risk(agg, mems[CORRECT].mem)
    if risk:
        out["privacy_risk"] = risk
    if final and c.spec.estimates.split_half:
        out["split_half"] = split_half(agg, half_sets)
    if agg.stats.runs:  # training-dynamics proxies and triage (orchestrator/features/proxies.py)
        from orchestrator.features import proxies

        out.update(proxies.write(agg, mems[CORRECT].mem, write_parquet, write_npy, final))
    out.update(extra or {})
    out = json_safe(out)
    atomic_write_text(c.paths.summary, json.dumps(out, indent=2) + "\n")
    return out


def privacy_risk_table(agg: Aggregator, mem: np.ndarray) -> tuple[pa.Table, dict]:
    """Per training example: the in/out fits of the risk statistic and their AUC (estimators/privacy.py)."""
    c = agg.c
    f = pv.fit(agg.risk)
    r = pv.risk(f)
    cols = {"example": np.arange(c.n_train, dtype=np.int32), "label": c.labels["train_labels"].astype(np.int32),
            "risk": r.auc, "risk_se": r.se, "mu_in": f.mu_in, "sd_in": f.sd_in, "mu_out": f.mu_out,
            "sd_out": f.sd_out, "n_in": f.n_in.astype(np.int64), "n_out": f.n_out.astype(np.int64), "mem": mem}
    ok = np.isfinite(r.auc)
    info = {"statistic": agg.risk_source, "global_variance": f.global_variance, "defined": int(ok.sum()),
            "mean": float(r.auc[ok].mean()) if ok.any() else None,
            "share_at_least_0.9": float((r.auc[ok] >= 0.9).mean()) if ok.any() else None,
            "spearman_with_memorization": pv.rank_correlation(r.auc, mem)}
    return pa.table(cols), info


def write_privacy_risk(agg: Aggregator, mem: np.ndarray) -> dict | None:
    """The privacy-risk table (CampaignPaths.privacy_risk), when the shards keep a statistic; its summary."""
    if agg.risk_source is None or agg.risk.count_in.sum() == 0:
        return None
    table, info = privacy_risk_table(agg, mem)
    write_parquet(agg.c.paths.privacy_risk, table, int(agg.risk.count_in[0] + agg.risk.count_out[0]))
    return info


def json_safe(o):
    """JSON-safe: numpy scalars become Python ones, NaN and infinities become null."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def export_fz(agg: Aggregator, dest: Path) -> list[Path]:
    """The paper's released layouts (Feldman & Zhang 2020, pluskid.github.io/influence-memorization):

    <name>_infl_matrix.npz: tr_mem, tr_labels, tt_labels, and per class k infl_matrix_class{k}
        (train-major block), tr_classidx_{k}, tt_classidx_{k} (global ids);
    <name>_high_infl_pairs_infl<t>_mem<t>.npz: tr_idx, tt_idx, infl, mem (same-class pairs).
    """
    c, e = agg.c, agg.c.spec.estimates
    dest.mkdir(parents=True, exist_ok=True)
    agg.flush()
    mem = est.memorization(agg.stats).mem
    y_tr, y_te = c.labels["train_labels"], c.labels["test_labels"]
    runs = agg.main_runs()
    blocks = inf.per_class(agg.mask_columns(runs), agg.outcomes(CORRECT, runs), y_tr, y_te, _budget(agg),
                           e.infl_threshold)
    arrays = {"tr_mem": mem.astype(np.float32), "tr_labels": y_tr, "tt_labels": y_te}
    for b in blocks:
        arrays.update({f"infl_matrix_class{b.label}": b.infl, f"tr_classidx_{b.label}": b.train,
                       f"tt_classidx_{b.label}": b.test})
    matrix = ExportPaths(dest).fz_matrix(c.name)
    write_npz(matrix, arrays)
    tr, te, infl, _ = _class_pairs(blocks, with_se=False)
    pairs = est.filter_pairs(est.candidate_pairs(tr, te, infl, mem), mem, y_tr, y_te, e.mem_threshold, None,
                             same_class=True, memorized=_memorized(agg, agg.stats))
    pairs_path = ExportPaths(dest).fz_pairs(c.name, e.infl_threshold, e.mem_threshold)
    write_npz(pairs_path, {"tr_idx": pairs.train, "tt_idx": pairs.test, "infl": pairs.infl.astype(np.float32),
                           "mem": pairs.mem.astype(np.float32)})
    return [matrix, pairs_path]


def export_parquet(agg: Aggregator, dest: Path) -> list[Path]:
    """Tables keyed by example id, in the dataset's original order: train.parquet (memorization, counts,
    intervals, C-score), test.parquet (accuracy over runs and the strongest influencer of each test
    example), pairs.parquet (the paper's high-influence pairs)."""
    c, e = agg.c, agg.c.spec.estimates
    dest.mkdir(parents=True, exist_ok=True)
    agg.flush()
    table, mems = memorization_table(agg)
    runs = agg.main_runs()
    out = ExportPaths(dest)
    train_path, test_path, pairs_path = out.train, out.test, out.pairs
    write_parquet(train_path, table, len(runs))
    y_tr, y_te = c.labels["train_labels"], c.labels["test_labels"]
    cols = {"example": np.arange(c.n_test, dtype=np.int32), "label": y_te.astype(np.int32),
            "accuracy": agg.stats.targets[CORRECT].test / max(agg.stats.runs, 1)}
    top = inf.top_k(agg.mask_columns(runs), agg.outcomes(CORRECT, runs), c.n_train, 1, e.infl_threshold,
                    _budget(agg), n_in=agg.stats.n_in)
    cols.update(top_train=top.train[:, 0].astype(np.int32), top_infl=top.infl[:, 0], top_se=top.se[:, 0])
    write_parquet(test_path, pa.table(cols), len(runs))
    mem = mems[CORRECT].mem
    pairs = est.filter_pairs(est.candidate_pairs(top.pairs_train, top.pairs_test, top.pairs_infl, mem, top.pairs_se),
                             mem, y_tr, y_te, e.mem_threshold, None, e.same_class, _memorized(agg, agg.stats))
    write_parquet(pairs_path, _pairs_table(pairs, y_te), len(runs))
    return [train_path, test_path, pairs_path]


# --- readers: the files above read back (the report, `longtail show`, `utility`, `plan`) ---------------
# Every reader returns None for a file that is not written yet (before the first checkpoint, or a mode
# that does not write it), and never unpickles (np.load with allow_pickle=False only).


def read_table(path, columns: list[str] | None = None, filters=None) -> pa.Table | None:
    if not path.exists():
        return None
    source, filesystem = arrow_source(path)
    return pq.read_table(source, filesystem=filesystem, columns=columns, filters=filters)


def as_columns(table: pa.Table | None) -> dict[str, np.ndarray] | None:
    if table is None:
        return None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def runs_of(table: pa.Table | None) -> int:
    """The runs a table stands on, as write_parquet recorded them; 0 when it records none."""
    meta = (table.schema.metadata or {}) if table is not None else {}
    return int(json.loads(meta.get(b"longtail", b"{}")).get("runs", 0))


def runs_in(path) -> int | None:
    """The runs the table at `path` stands on, from its footer alone; None when absent or unrecorded."""
    if not path.exists():
        return None
    meta = pq.read_schema(*arrow_source(path)).metadata or {}
    return int(json.loads(meta[b"longtail"]).get("runs", 0)) if b"longtail" in meta else None


def read_summary(paths) -> dict | None:
    """summary.json; None before the first checkpoint (a damaged one raises ValueError)."""
    return json.loads(paths.summary.read_text()) if paths.summary.exists() else None


def read_memorization(paths, columns: list[str] | None = None) -> pa.Table | None:
    return read_table(paths.memorization, columns)


def read_memorization_values(paths, n_train: int) -> tuple[np.ndarray, int] | None:
    """Memorization of every training example by id (NaN where undefined) and the runs behind it."""
    table = read_memorization(paths, ["example", "mem"])
    if table is None:
        return None
    mem = np.full(n_train, np.nan)
    mem[table.column("example").to_numpy()] = table.column("mem").to_numpy(zero_copy_only=False)
    return mem, runs_of(table)


def read_pairs(paths, columns: list[str] | None = None) -> pa.Table | None:
    """The paper's high-influence pairs (high_influence_pairs.parquet)."""
    return read_table(paths.pairs, columns)


def read_privacy_risk(paths) -> pa.Table | None:
    return read_table(paths.privacy_risk)


def read_utility(paths) -> pa.Table | None:
    """`longtail utility`'s results (features/utility.py writes them with write_parquet)."""
    return read_table(paths.utility_results)


@dataclass
class Influencer:
    train: int
    infl: float
    se: float | None


def _load_npy(path) -> np.ndarray:
    # memory-mapped when local: a CIFAR-size dense matrix is 2 GB, and readers want a few columns of it
    if is_local(path):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    with open_input(path) as f:
        return np.load(f, allow_pickle=False)


def top_influencers(paths, test_labels: np.ndarray, tests: list[int], k: int) -> dict[int, list[Influencer]]:
    """The k training examples with the largest influence on each test example, from whichever
    influence file the campaign's mode wrote (0/1 target); {} when there is none."""
    out: dict[int, list[Influencer]] = {}
    if not tests:
        return out
    dense, dense_se = paths.influence_file("dense"), paths.influence_file("dense_se")
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
    topk = read_table(paths.influence_file("topk"), ["test", "rank", "train", "infl", "se"],
                      [("test", "in", [int(j) for j in tests])])
    if topk is not None:
        t = topk.to_pandas()
        for j, rows in t.sort_values(["test", "rank"]).groupby("test"):
            out[int(j)] = [Influencer(int(r.train), float(r.infl), float(r.se)) for r in rows.head(k).itertuples()]
        return out
    per_class = paths.influence_file("per-class")
    if per_class.exists():
        with open_input(per_class) as f, np.load(f, allow_pickle=False) as z:
            for j in tests:
                cls = int(test_labels[j])
                pos = np.flatnonzero(z[f"tt_classidx_{cls}"] == j)
                if not len(pos):
                    continue
                col = z[f"infl_matrix_class{cls}"][:, pos[0]]
                se = z[f"infl_se_class{cls}"][:, pos[0]]
                train = z[f"tr_classidx_{cls}"]
                order = np.argsort(-col, kind="stable")[:k]
                out[j] = [Influencer(int(train[i]), float(col[i]), float(se[i])) for i in order]
    return out


def strongest_tests(paths, count: int) -> list[int]:
    """Test examples ranked by their strongest influence (dense and top-k layouts); [] for the others."""
    dense = paths.influence_file("dense")
    if dense.exists():
        infl = _load_npy(dense)
        best = np.full(infl.shape[1], -np.inf, np.float32)
        for start in range(0, infl.shape[0], 4096):  # row blocks: bounded memory on a large matrix
            best = np.maximum(best, np.asarray(infl[start:start + 4096]).max(axis=0))
        return [int(j) for j in np.argsort(-best, kind="stable")[:count]]
    top = read_table(paths.influence_file("topk"), ["test", "rank", "infl"], [("rank", "==", 0)])
    if top is not None:
        t = top.to_pandas()
        return [int(j) for j in t.sort_values("infl", ascending=False, kind="stable").test.head(count)]
    return []
