"""How precise a campaign's estimates are, and what precision costs: pure numbers, written once.

The size model of a campaign's storage, the standard error a number of runs reaches, the runs a
target standard error or error bound needs, and the precision of follow-up measurements. No Ray,
no storage: every command that states a cost or a precision (plan, validate, utility, the report)
calls these.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from estimators.estimates import error_bound, jaccard
from estimators.proxies import levels

# --- the precision of memorization estimates, and the runs it needs -------------------------------


def main_ratio_runs(runs: int, design: str, n_ratios: int, primary: int) -> int:
    """How many of `runs` use the main subset ratio, whose runs give memorization and influence: run r
    uses ratio r mod K, except in the paired design, where both runs of a pair use ratio (r // 2) mod K
    (orchestrator/plan.py's ratio_index)."""
    r = np.arange(runs)
    which = (r // 2) % n_ratios if design == "paired" else r % n_ratios
    return int((which == primary).sum())


def in_share(design: str, ratio: float) -> float:
    """Expected share q of the main ratio's runs that train on a given example: the ratio, except in
    the paired design, where every example is in exactly one run of each pair."""
    return 0.5 if design == "paired" else ratio


def variance_per_run(acc_in, acc_out, share: float):
    """V_i such that the plug-in standard error of mem(i) after t runs is sqrt(V_i / t):
    V_i = p_in(1 - p_in) / q + p_out(1 - p_out) / (1 - q), since n_in = q t and n_out = (1 - q) t."""
    return acc_in * (1 - acc_in) / share + acc_out * (1 - acc_out) / (1 - share)


def expected_se(v, runs: float):
    """The standard error sqrt(v / runs) that `runs` runs reach, for per-run variance v."""
    return np.sqrt(v / runs)


def runs_for_se(v: float, target: float) -> int:
    """Main-ratio runs for sqrt(v / t) <= target (at least 2: a campaign's minimum): expected_se's
    inverse, rounded up."""
    return max(2, math.ceil(v / (target * target))) if target > 0 else sys.maxsize


def runs_for_bound(target: float, ratio: float) -> int:
    """Smallest t with error_bound(t, ratio) <= target; the bound falls monotonically in t."""
    if target <= 0:
        return sys.maxsize
    hi = 2
    while error_bound(hi, ratio) > target:
        hi *= 2
    lo = hi // 2
    while lo + 1 < hi:  # invariant: bound(lo) > target >= bound(hi), or lo is below the first probe
        mid = (lo + hi) // 2
        if error_bound(mid, ratio) <= target:
            hi = mid
        else:
            lo = mid
    return max(2, hi)


def degenerate_share(acc_in: np.ndarray, acc_out: np.ndarray) -> float:
    """Share of examples whose in- and out-accuracies are both exactly 0 or 1: their estimated per-run
    variance is 0, so a short pilot makes the standard errors (and runs needed) look smaller than they are."""
    if not len(acc_in):
        return 1.0
    return float(np.mean(np.isin(acc_in, (0.0, 1.0)) & np.isin(acc_out, (0.0, 1.0))))


# --- the precision of follow-up measurements (`longtail utility`) ---------------------------------


def mean_se(values) -> tuple[float, float]:
    """Mean and its standard error (sample sd with ddof 1 / sqrt(k)); NaN where undefined."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    if np.ptp(v) == 0:  # identical outcomes (a deterministic learner): exactly no spread, not rounding noise
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def drop(base: tuple[float, float], other: tuple[float, float]) -> tuple[float, float]:
    """base mean - other mean, and its standard error sqrt(se_base^2 + se_other^2): the two conditions'
    models are trained independently (different seeds, and for random removal different draws)."""
    (m0, s0), (m1, s1) = base, other
    return m0 - m1, float(np.sqrt(s0 * s0 + s1 * s1))


# --- how well two independent halves of the runs agree (the split-half check) ----------------------


def split_half_agreement(a: np.ndarray, b: np.ndarray, thresholds) -> dict:
    """Agreement of the memorization estimates `a` and `b` of the even and the odd runs, over the
    examples both define: their correlation (None where either is constant or too few examples), the
    mean absolute difference, and for each threshold the Jaccard index of the examples at or above it."""
    both = np.isfinite(a) & np.isfinite(b)
    varies = both.sum() > 2 and a[both].std() > 0 and b[both].std() > 0
    out = {"memorization_correlation": float(np.corrcoef(a[both], b[both])[0, 1]) if varies else None,
           "memorization_mean_abs_difference": float(np.abs(a[both] - b[both]).mean()) if both.any() else None}
    for thr in thresholds:
        out[f"memorized_jaccard_{thr:g}"] = jaccard(set(np.flatnonzero(a >= thr)), set(np.flatnonzero(b >= thr)))
    return out


# --- the size of a campaign's storage: one model for `validate`, `plan` and the fold ----------------

FLOAT32 = 4
SHARD_BYTES_PER_ROW = 2.9  # a shard before any pilot measured one: 2.6-2.9 bytes per example row (docs/performance.md)
TOPK_ROW_BYTES = 26  # test int32, rank int16, train int32, infl/se/ci_low/ci_high float32 (uncompressed)
DENSE_FOLD_MATRICES = 3  # the fold's dense influence: sums, estimate and standard error (soft targets: + squares)


def shard_bytes(n_train: int, n_test: int) -> float:
    """A run's shard before a pilot measured one: one row per train and test example."""
    return (n_train + n_test) * SHARD_BYTES_PER_ROW


def dense_matrix_bytes(n_train: int, n_test: int) -> int:
    """One float32 n_train x n_test matrix (a dense influence estimate, its standard error, a fold sum)."""
    return FLOAT32 * n_train * n_test


def dense_influence_memory(n_train: int, n_test: int, soft: int) -> int:
    """Memory the fold and the estimates need for dense influence, in float32 matrices: per 0/1 target its
    sums, estimate and standard error (3); per soft target two float64 sums (values and squares: 4) and
    its estimate and standard error (2), 6 = 3 x 2."""
    return DENSE_FOLD_MATRICES * (1 + 2 * soft) * dense_matrix_bytes(n_train, n_test)


def influence_mode(influence: str, memory_gb: float, n_train: int, n_test: int, soft: int) -> str:
    """[estimates] influence with 'auto' resolved: dense if its matrices fit memory_gb, else topk."""
    if influence != "auto":
        return influence
    return "dense" if dense_influence_memory(n_train, n_test, soft) <= memory_gb * 1e9 else "topk"


def plan_bytes(runs: int, n_train: int, examples_bytes: int = 0) -> int:
    """plan/: bit-packed masks, int64 seeds, int8 ratio index per run, and examples.parquet."""
    return runs * ((n_train + 7) // 8 + 8 + 1) + examples_bytes


def influence_bytes(mode: str, n_train: int, n_test: int, targets: int, same_class_cells: int, top_k: int) -> int:
    """estimates/ influence files: dense = estimate and standard error, float32, per target; per-class the
    same over same-class (train, test) cells; topk = top_k rows per test example (upper bound, uncompressed)."""
    if mode == "dense":
        return 2 * dense_matrix_bytes(n_train, n_test) * targets
    if mode == "per-class":
        return 2 * FLOAT32 * same_class_cells * targets
    if mode == "topk":
        return TOPK_ROW_BYTES * n_test * top_k * targets
    return 0


RUN_RECORD_BYTES = 4 * 8 + 1  # per planned run: test_acc, train_acc_in/out, train_seconds (float64), folded (bool)
DYNAMICS_CELL_BYTES = 3 * 4 + 2  # training-dynamics sums per example and agreement level: 3 float32 + 1 uint16


def dynamics_bytes(n_train: int, main_runs: int) -> int:
    """The training-dynamics sums in the checkpoint: n_train x (agreement levels + 1) cells
    (estimators/proxies.py Dynamics), the levels 1, 2, 4, ... up to the main ratio's runs."""
    return n_train * (len(levels(main_runs)) + 1) * DYNAMICS_CELL_BYTES


def checkpoint_bytes(mode: str, n_train: int, n_test: int, runs: int, soft: int, per_example: int,
                     main_runs: int | None = None) -> int:
    """state/fold.npz: dense sums M^T X (float32 counts; soft targets exact float64 sums and their squares,
    4 float32 matrices each) when influence is dense,
    every planned run's test outcomes (bit-packed 0/1, float16 soft values) and its record (RUN_RECORD_BYTES),
    the training-dynamics sums (their size grows with log2 of the main ratio's runs), and the other
    per-example sums (`per_example`). `longtail plan` states the exact size instead (the checkpoint of an
    empty fold of the campaign has the size of a full one: orchestrator/fold.py fixed_sizes); this model
    keeps its per-run and per-level growth (tests/test_precision.py checks it against fixed_sizes)."""
    dense = dense_matrix_bytes(n_train, n_test) * (1 + 4 * soft) if mode == "dense" else 0
    per_run = (n_test + 7) // 8 + 2 * n_test * soft + RUN_RECORD_BYTES
    return dense + runs * per_run + dynamics_bytes(n_train, runs if main_runs is None else main_runs) + per_example


def storage_bytes(mode: str, n_train: int, n_test: int, runs: int, soft: int, top_k: int, same_class_cells: int,
                  per_shard: float, examples: int, memorization: int, fold_per_example: int,
                  checkpoint: int | None = None) -> dict[str, float]:
    """A campaign's directory, part by part: shards, plan/, estimates/ and state/fold.npz, and their total.
    `per_shard`, `examples`, `memorization` and `fold_per_example` are what a pilot measured (or
    `shard_bytes` before one); `checkpoint`, where given, is the checkpoint's exact size (fixed_sizes)."""
    parts = {
        "shards": per_shard * runs,
        "plan": plan_bytes(runs, n_train, examples),
        "estimates": influence_bytes(mode, n_train, n_test, 1 + soft, same_class_cells, top_k) + memorization,
        "checkpoint": (checkpoint if checkpoint is not None
                       else checkpoint_bytes(mode, n_train, n_test, runs, soft, fold_per_example)),
    }
    parts["total"] = sum(parts.values())
    return parts


# --- how the memorization estimates settle as runs accumulate (the report's convergence figure) -----


def running_memorization(inside: np.ndarray, correct: np.ndarray, ks) -> np.ndarray:
    """Memorization of each example (column) from the first k runs (rows) of `inside` (the run trained
    on it) and `correct` (the run got it right), for every k in `ks`: (len(ks), examples), NaN where
    the first k runs hold no run with or no run without the example."""
    inside, correct = np.asarray(inside, bool), np.asarray(correct, bool)
    n_in = np.cumsum(inside, axis=0, dtype=np.int32)
    c_in = np.cumsum(inside & correct, axis=0, dtype=np.int32)
    c_all = np.cumsum(correct, axis=0, dtype=np.int32)
    out = np.empty((len(ks), inside.shape[1]))
    for row, k in enumerate(ks):
        ni, no = n_in[k - 1], k - n_in[k - 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[row] = np.where((ni > 0) & (no > 0), c_in[k - 1] / ni - (c_all[k - 1] - c_in[k - 1]) / no, np.nan)
    return out


def memorization_convergence(inside: np.ndarray, correct: np.ndarray, points: int = 10):
    """How far the estimate from the first k runs is from the one from all t runs, at k = 10%, 20%, ...,
    100% of t (k >= 2): (ks, mean |difference|, RMS difference) over the examples defined at both."""
    t = len(inside)
    ks = np.unique(np.round(np.linspace(1 / points, 1.0, points) * t).astype(int))
    ks = ks[ks >= 2]
    final = running_memorization(inside, correct, [t])[0]
    mean_abs, rms = [], []
    for d in running_memorization(inside, correct, ks) - final:
        d = d[np.isfinite(d)]
        mean_abs.append(float(np.abs(d).mean()) if len(d) else np.nan)
        rms.append(float(np.sqrt((d ** 2).mean())) if len(d) else np.nan)
    return ks, np.array(mean_abs), np.array(rms)
