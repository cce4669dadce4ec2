"""Finalize sufficient statistics into memorization, influence and high-influence pairs.

Conventions (docs/estimators.md): influence is train-major, shape (n_train, n_test), like the paper's
released per-class blocks. An estimate whose "in" or "out" side has no runs is undefined and is
NaN, never a silently invented 0; the counts n_in and n_out always say how many runs stand behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import Stats


@dataclass(frozen=True)
class Memorization:
    mem: np.ndarray  # acc_in - acc_out
    se: np.ndarray  # standard error of mem (two independent binomial proportions)
    n_in: np.ndarray
    n_out: np.ndarray
    acc_in: np.ndarray  # accuracy on i of the runs that trained on i
    acc_out: np.ndarray  # held-out accuracy on i (the C-score component at this subset ratio)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def difference_se(p_in: np.ndarray, n_in: np.ndarray, p_out: np.ndarray, n_out: np.ndarray) -> np.ndarray:
    """Standard error of p_in - p_out for independent binomial proportions."""
    return np.sqrt(_ratio(p_in * (1 - p_in), n_in) + _ratio(p_out * (1 - p_out), n_out))


def memorization(stats: Stats) -> Memorization:
    acc_in = _ratio(stats.train_correct_in, stats.n_in)
    acc_out = _ratio(stats.train_correct_out, stats.n_out)
    return Memorization(
        mem=acc_in - acc_out,
        se=difference_se(acc_in, stats.n_in, acc_out, stats.n_out),
        n_in=stats.n_in.copy(),
        n_out=stats.n_out.copy(),
        acc_in=acc_in,
        acc_out=acc_out,
    )


def influence(stats: Stats, rows: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
    """Dense influence infl[i, j] for the train rows `rows`, float32.

    infl = A_in / n_in - (T - A_in) / n_out = A_in * (1/n_in + 1/n_out) - T / n_out, evaluated in
    float32 and in place so that the epilogue after the GEMM stays a small fraction of its cost.
    """
    if stats.infl_in is None:
        raise ValueError("influence: these statistics were folded without influence sums")
    a_in = stats.infl_in[rows]
    n_in = stats.n_in[rows].astype(np.float64)
    n_out = (stats.runs - stats.n_in[rows]).astype(np.float64)
    inv_in = _ratio(1.0, n_in)
    inv_out = _ratio(1.0, n_out)
    scale = (inv_in + inv_out).astype(np.float32)[:, None]
    shift = inv_out.astype(np.float32)[:, None]
    t = stats.test_correct.astype(np.float32)[None, :]
    if out is None:
        out = np.empty(a_in.shape, np.float32)
    np.multiply(a_in, scale, out=out)
    out -= shift * t
    return out


@dataclass(frozen=True)
class Pairs:
    train: np.ndarray  # int64 train example ids
    test: np.ndarray  # int64 test example ids
    infl: np.ndarray
    mem: np.ndarray


def high_influence_pairs(
    mem: np.ndarray,
    infl: np.ndarray,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    mem_threshold: float = 0.25,
    infl_threshold: float = 0.15,
    same_class: bool = True,
) -> Pairs:
    """The paper's selection: mem(i) >= mem_threshold, infl(i, j) >= infl_threshold, y_i == y'_j.

    Sorted by decreasing influence. NaN estimates never pass a threshold.
    """
    rows = np.flatnonzero(mem >= mem_threshold)
    sub = infl[rows]
    keep = sub >= infl_threshold
    if same_class:
        keep &= train_labels[rows][:, None] == test_labels[None, :]
    r, j = np.nonzero(keep)
    i = rows[r]
    values = sub[r, j]
    order = np.lexsort((j, i, -values))
    return Pairs(train=i[order].astype(np.int64), test=j[order].astype(np.int64),
                 infl=values[order], mem=mem[i[order]])


def error_bound(runs: int, subset_ratio: float) -> float:
    """The paper's bound on the RMS error of one estimate after `runs` runs (Feldman & Zhang, Lemma 2.1).

    E[(est - true)^2] <= 1/(p t) + 1/((1-p) t) + exp(-p t / 16) / 2,  p = min(ratio, 1 - ratio).
    """
    p = min(subset_ratio, 1 - subset_ratio)
    t = float(runs)
    if t <= 0:
        return float("inf")
    return float(np.sqrt(1 / (p * t) + 1 / ((1 - p) * t) + np.exp(-p * t / 16) / 2))
