"""Finalize sufficient statistics into estimates with standard errors and confidence intervals.

Conventions (docs/estimators.md): influence is train-major, shape (n_train, n_test), like the paper's
released per-class blocks. An estimate whose "in" or "out" side has no runs is undefined and is
NaN, never a silently invented 0; the counts n_in and n_out always say how many runs stand behind it.

Uncertainty: for 0/1 targets, `se` is the plug-in standard error of a difference of two binomial
proportions and the 95% interval is Agresti-Caffo's (add one success and one failure to each side),
which keeps its coverage when a proportion is near 0 or 1, where the plug-in interval collapses to a
point. For soft targets (margins), `se` uses the two sample variances and the interval is normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimators import rational
from estimators.stats import CORRECT, Stats

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Difference:
    """mean_in - mean_out, elementwise, with its uncertainty. Arrays of any (broadcast) shape."""

    est: np.ndarray
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray


def _div(num, den, dtype):
    num = np.asarray(num, dtype=dtype)
    den = np.asarray(den, dtype=dtype)
    out = np.full(np.broadcast(num, den).shape, np.nan, dtype=dtype)
    np.divide(num, den, out=out, where=den > 0)
    return out


def difference(sum_in, n_in, sum_out, n_out, sq_in=None, sq_out=None, binary: bool = True,
               z: float = Z95, dtype=np.float64, intervals: bool = True) -> Difference:
    """The difference of the mean over "in" runs and the mean over "out" runs, from sums and counts.

    n_in, n_out broadcast against the sums (e.g. shape (n, 1) against (n, n_test)). Soft targets
    need the sums of squares sq_in, sq_out. intervals=False leaves ci_low and ci_high None (for
    millions of pairs that keep only the estimate and its standard error).
    """
    mean_in = _div(sum_in, n_in, dtype)
    mean_out = _div(sum_out, n_out, dtype)
    est = mean_in - mean_out
    n_in = np.asarray(n_in, dtype=dtype)
    n_out = np.asarray(n_out, dtype=dtype)
    if binary:
        se = np.sqrt(_div(mean_in * (1 - mean_in), n_in, dtype) + _div(mean_out * (1 - mean_out), n_out, dtype))
    else:
        var_in = _div(np.asarray(sq_in, dtype) - n_in * mean_in**2, n_in - 1, dtype)
        var_out = _div(np.asarray(sq_out, dtype) - n_out * mean_out**2, n_out - 1, dtype)
        se = np.sqrt(np.maximum(var_in, 0) / n_in + np.maximum(var_out, 0) / n_out)
    if not intervals:
        return Difference(est=est, se=se.astype(dtype), ci_low=None, ci_high=None, mean_in=mean_in, mean_out=mean_out)
    if binary:
        # Agresti-Caffo: one pseudo-success and one pseudo-failure on each side
        p_in = (np.asarray(sum_in, dtype) + 1) / (n_in + 2)
        p_out = (np.asarray(sum_out, dtype) + 1) / (n_out + 2)
        centre = p_in - p_out
        half = z * np.sqrt(p_in * (1 - p_in) / (n_in + 2) + p_out * (1 - p_out) / (n_out + 2))
        undefined = np.isnan(est)
        low = np.where(undefined, np.nan, np.clip(centre - half, -1, 1)).astype(dtype)
        high = np.where(undefined, np.nan, np.clip(centre + half, -1, 1)).astype(dtype)
    else:
        low, high = est - z * se, est + z * se
    return Difference(est=est, se=se.astype(dtype), ci_low=low, ci_high=high, mean_in=mean_in, mean_out=mean_out)


@dataclass(frozen=True)
class Memorization:
    mem: np.ndarray  # mean_in - mean_out of the target on training example i
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    acc_in: np.ndarray  # for correctness: accuracy of the runs that trained on i; else the mean target
    acc_out: np.ndarray  # held-out accuracy (the C-score component at this subset ratio)


def memorization(stats: Stats, target: str = CORRECT) -> Memorization:
    s = stats.targets[target]
    sq_out = None if s.binary else s.train_sq - s.train_sq_in
    d = difference(s.train_in, stats.n_in, s.train - s.train_in, stats.n_out, s.train_sq_in, sq_out, s.binary)
    return Memorization(mem=d.est, se=d.se, ci_low=d.ci_low, ci_high=d.ci_high, n_in=stats.n_in.copy(),
                        n_out=stats.n_out.copy(), acc_in=d.mean_in, acc_out=d.mean_out)


def influence(stats: Stats, target: str = CORRECT, rows: slice = slice(None)) -> Difference:
    """Dense influence of the train rows `rows` on every test example, from the folded dense sums.

    infl[i, j] = A_in[i, j] / n_in[i] - (T[j] - A_in[i, j]) / n_out[i], in float32.
    """
    s = stats.targets[target]
    if s.infl_in is None:
        raise ValueError("influence: these statistics were folded without dense influence sums")
    a_in = s.infl_in[rows].astype(np.float32, copy=False)  # soft sums are exact float64: the epilogue is float32
    n_in = stats.n_in[rows][:, None]
    n_out = (stats.runs - stats.n_in[rows])[:, None]
    a_out = s.test.astype(np.float32)[None, :] - a_in
    sq_in = sq_out = None
    if not s.binary:
        sq_in = s.infl_sq_in[rows].astype(np.float32)
        sq_out = s.test_sq.astype(np.float32)[None, :] - sq_in
    return difference(a_in, n_in, a_out, n_out, sq_in, sq_out, s.binary, dtype=np.float32)


def influence_into(stats: Stats, target: str, out_est: np.ndarray, out_se: np.ndarray,
                   rows_per_block: int | None = None) -> None:
    """Dense influence and its standard error written into `out_est`, `out_se` (n_train, n_test) float32
    arrays (e.g. memory-mapped .npy files), a block of rows at a time and in place, so that this
    epilogue after the GEMM stays a small fraction of it in time and needs one block of extra memory.
    Intervals are not materialised for whole matrices; `influence` gives them for any rows."""
    s = stats.targets[target]
    if s.infl_in is None:
        raise ValueError("influence_into: these statistics were folded without dense influence sums")
    total = s.test.astype(np.float32)[None, :]
    total_sq = None if s.binary else s.test_sq.astype(np.float32)[None, :]
    # blocks of ~2**18 cells (1 MB per float32 array) keep the dozen passes below in cache (measured
    # on 2 cores: 1.1 s for 200 M pairs, against 2.4 s with blocks of 4,096 rows of 10,000)
    rows_per_block = rows_per_block or max(1, 2**18 // max(stats.n_test, 1))
    for r0 in range(0, stats.n_train, rows_per_block):
        r1 = min(r0 + rows_per_block, stats.n_train)
        epilogue_into(s.infl_in[r0:r1].astype(np.float32, copy=False), stats.n_in[r0:r1], stats.runs, total,
                      out_est[r0:r1], out_se[r0:r1],
                      None if s.binary else s.infl_sq_in[r0:r1].astype(np.float32), total_sq)


def epilogue_into(a: np.ndarray, n_in: np.ndarray, runs: int, total: np.ndarray, est: np.ndarray,
                  var: np.ndarray, q_in: np.ndarray | None = None, total_sq: np.ndarray | None = None) -> None:
    """Influence estimates and standard errors of a block, in place and in float32: `a` (rows, cols) the
    in-sums, `n_in` (rows,) the in-counts of `runs`, `total` (1, cols) the sums over all runs; for a soft
    target `q_in` and `total_sq` the same of squares. Writes `est` and `var` (which ends as the standard
    error); NaN where a side has no runs (or, soft, fewer than 2)."""
    n_in = np.asarray(n_in, np.float32).reshape(-1, 1)
    n_out = runs - n_in
    inv_in = _div(1.0, n_in, np.float32)
    inv_out = _div(1.0, n_out, np.float32)
    np.multiply(a, inv_in, out=est)  # mean in
    np.subtract(total, a, out=var)
    var *= inv_out  # mean out
    if q_in is None:
        tmp = est * est
        np.subtract(est, tmp, out=tmp)
        tmp *= inv_in  # p_in (1 - p_in) / n_in
        est -= var  # the estimate
        sq = var * var
        np.subtract(var, sq, out=var)
        var *= inv_out
        var += tmp
    else:
        tmp = q_in * inv_in - est * est  # E[x^2] - mean^2 over in runs, times n_in / (n_in - 1) below
        tmp *= n_in * _div(1.0, n_in - 1, np.float32) * inv_in
        sq = (total_sq - q_in) * inv_out - var * var
        sq *= n_out * _div(1.0, n_out - 1, np.float32) * inv_out
        est -= var
        np.add(np.maximum(tmp, 0, out=tmp), np.maximum(sq, 0, out=sq), out=var)
    np.sqrt(var, out=var)


@dataclass(frozen=True)
class Pairs:
    train: np.ndarray  # int64 train example ids
    test: np.ndarray  # int64 test example ids
    infl: np.ndarray
    mem: np.ndarray
    se: np.ndarray | None = None  # of the influence, when known


@dataclass(frozen=True)
class Counts:
    """The integer counts behind dense 0/1 influence, so that thresholds are decided exactly
    (estimators/rational.py): a[i, j] correct in-runs, n_in[i], total[j] correct runs, runs."""

    a: np.ndarray
    n_in: np.ndarray
    total: np.ndarray
    runs: int


# float32 estimates are within a few 1e-7 of the exact value: candidates are taken this far below a
# threshold and the counts decide
_CANDIDATE_MARGIN = 1e-4


def high_influence_pairs(mem: np.ndarray, infl: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray,
                         mem_threshold: float = 0.25, infl_threshold: float = 0.15, same_class: bool = True,
                         infl_se: np.ndarray | None = None, memorized: np.ndarray | None = None,
                         counts: Counts | None = None) -> Pairs:
    """The paper's selection from a dense matrix: mem(i) >= mem_threshold, infl(i, j) >= infl_threshold,
    y_i == y'_j. Sorted by decreasing influence. NaN estimates never pass a threshold.

    `memorized` (bool per training example) and `counts` make both decisions exact for a 0/1 target
    (memorized, rational.at_least); without them the floats decide."""
    rows = np.flatnonzero(mem >= mem_threshold if memorized is None else memorized)
    sub = infl[rows]
    keep = sub >= (infl_threshold if counts is None else infl_threshold - _CANDIDATE_MARGIN)
    if same_class:
        keep &= train_labels[rows][:, None] == test_labels[None, :]
    r, j = np.nonzero(keep)
    if counts is not None:
        ok = rational.at_least(counts.a[rows[r], j], counts.n_in[rows[r]], counts.total[j], counts.runs,
                               infl_threshold)
        r, j = r[ok], j[ok]
    return select_pairs(rows[r], j, sub[r, j], mem, None if infl_se is None else infl_se[rows][r, j])


def select_pairs(train: np.ndarray, test: np.ndarray, infl: np.ndarray, mem: np.ndarray,
                 se: np.ndarray | None = None) -> Pairs:
    """Pairs (train[k], test[k]) ordered by decreasing influence, then train id, then test id."""
    order = np.lexsort((test, train, -infl))
    return Pairs(train=np.asarray(train)[order].astype(np.int64), test=np.asarray(test)[order].astype(np.int64),
                 infl=np.asarray(infl)[order], mem=mem[np.asarray(train)[order]],
                 se=None if se is None else np.asarray(se)[order])


def candidate_pairs(train: np.ndarray, test: np.ndarray, infl: np.ndarray, mem: np.ndarray,
                    se: np.ndarray | None = None) -> Pairs:
    """Pairs in the order given, for `filter_pairs`, which orders what it keeps: sorting millions of
    candidates that the filter then drops costs more than the filter."""
    train = np.asarray(train)
    return Pairs(train=train, test=np.asarray(test), infl=np.asarray(infl), mem=mem[train], se=se)


def filter_pairs(pairs: Pairs, mem: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray,
                 mem_threshold: float, infl_threshold: float | None, same_class: bool,
                 memorized: np.ndarray | None = None) -> Pairs:
    """The paper's selection applied to candidate pairs (e.g. all pairs above a lower threshold).

    infl_threshold None: the candidates were already decided exactly (influence.top_k, per_class);
    `memorized` (bool per training example, memorized) decides the memorization exactly."""
    keep = mem[pairs.train] >= mem_threshold if memorized is None else memorized[pairs.train]
    if infl_threshold is not None:
        keep &= pairs.infl >= infl_threshold
    if same_class:
        keep &= train_labels[pairs.train] == test_labels[pairs.test]
    return select_pairs(pairs.train[keep], pairs.test[keep], pairs.infl[keep], mem,
                        None if pairs.se is None else pairs.se[keep])


def table1(pairs: Pairs, n_test: int) -> dict:
    """The paper's Table 1 counts for a set of selected pairs."""
    per_test = np.bincount(pairs.test, minlength=n_test)
    return {"pairs": int(len(pairs.train)), "test_examples": int((per_test > 0).sum()),
            "test_examples_with_one_influencer": int((per_test == 1).sum())}


def error_bound(runs: int, subset_ratio: float) -> float:
    """The paper's bound on the RMS error of one estimate after `runs` runs (Feldman & Zhang, Lemma 2.1).

    E[(est - true)^2] <= 1/(p t) + 1/((1-p) t) + exp(-p t / 16) / 2,  p = min(ratio, 1 - ratio).
    """
    p = min(subset_ratio, 1 - subset_ratio)
    t = float(runs)
    if t <= 0:
        return float("inf")
    return float(np.sqrt(1 / (p * t) + 1 / ((1 - p) * t) + np.exp(-p * t / 16) / 2))


def cscore(held_out_accuracy: list[np.ndarray]) -> np.ndarray:
    """C-score (Jiang et al. 2021): held-out accuracy averaged over subset ratios, ignoring undefined ones."""
    stacked = np.vstack(held_out_accuracy)
    defined = ~np.isnan(stacked)
    total = np.where(defined, stacked, 0.0).sum(axis=0)
    return _div(total, defined.sum(axis=0), np.float64)


def jaccard(a: set, b: set) -> float:
    return float(len(a & b) / len(a | b)) if a | b else 1.0


def share_at_target(se: np.ndarray, target_se: float) -> float:
    """Share of defined estimates whose standard error is at most `target_se`."""
    defined = np.isfinite(se)
    return float((se[defined] <= target_se).mean()) if defined.any() else 0.0


def memorized(stats, threshold: float, target: str = "correct") -> np.ndarray:
    """mem(i) >= threshold for every training example, decided exactly on the counts of `stats`
    (an estimators.stats.Stats); for a soft target, on the float64 estimate."""
    s = stats.targets[target]
    if s.binary:
        return rational.at_least(s.train_in, stats.n_in, s.train, stats.runs, threshold)
    with np.errstate(invalid="ignore"):
        return memorization(stats, target).mem >= threshold
