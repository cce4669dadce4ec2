"""Differences between two campaigns' estimates, paired or unpaired (numeric core of `longtail compare`).

Paired: when two campaigns share the campaign seed, design and subset ratio, run r trains on the same
subset in both, so for every run the per-example difference d_r(i) = a_r(i) - b_r(i) of the two models'
outcomes exists, and a difference of memorization is a difference of means of d over the same in and
out runs:

    delta_mem(i) = mean_{r in in(i)} d_r(i) - mean_{r in out(i)} d_r(i)
    se^2         = var_in(d) / n_in + var_out(d) / n_out          (sample variances of d)

Whatever the two campaigns share run by run (the subset, and through the seed much of the training
noise) cancels in d, so the paired error is smaller than the unpaired sqrt(se_a^2 + se_b^2), often by
far. Held-out accuracy is the "out" mean alone; influence on test example j uses d_r(j) of the test
outcomes in place of d_r(i). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from estimators.estimates import Difference, difference


def paired_influence(mask: np.ndarray, d: np.ndarray) -> Difference:
    """Paired difference of influence of every training example on k test examples: mask (t, n) bool,
    d (t, k) the per-run differences of the two campaigns' test outcomes. Result shape (n, k)."""
    m = np.asarray(mask, np.float64)
    d = np.asarray(d, np.float64)
    n_in = m.sum(axis=0)[:, None]
    n_out = len(m) - n_in
    s_in, q_in = m.T @ d, m.T @ (d * d)
    return difference(s_in, n_in, d.sum(axis=0) - s_in, n_out, q_in, (d * d).sum(axis=0) - q_in, binary=False)


def influence_of(mask: np.ndarray, x: np.ndarray) -> Difference:
    """One campaign's influence on k test examples from its runs' masks (t, n) and 0/1 test outcomes (t, k)."""
    m = np.asarray(mask, np.float64)
    x = np.asarray(x, np.float64)
    n_in = m.sum(axis=0)[:, None]
    s_in = m.T @ x
    return difference(s_in, n_in, x.sum(axis=0) - s_in, len(m) - n_in, binary=True)


def unpaired(est_a, se_a, est_b, se_b) -> tuple[np.ndarray, np.ndarray]:
    """a - b and its standard error for independent estimates (sqrt(se_a^2 + se_b^2); a missing se counts 0)."""
    se_a = np.nan_to_num(np.asarray(se_a, np.float64)) if se_a is not None else 0.0
    se_b = np.nan_to_num(np.asarray(se_b, np.float64)) if se_b is not None else 0.0
    return np.asarray(est_a, np.float64) - np.asarray(est_b, np.float64), np.sqrt(se_a**2 + se_b**2)


def most_changed(delta: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k largest increases and the k largest decreases (NaN never selected)."""
    x = np.asarray(delta, np.float64)
    ok = np.flatnonzero(np.isfinite(x))
    order = ok[np.argsort(x[ok], kind="stable")]
    return order[::-1][:k], order[:k]
