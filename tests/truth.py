"""Exact subsampled memorization and influence of 1-nearest-neighbour, the deterministic learner of
examples/plugins.py, under the fixed design (uniform subsets of exactly m of n training examples).

1-NN always gets its own training examples right, so acc_in = 1. Left out, example i is classified
by its nearest neighbour in the subset: the k-th nearest of the n - 1 others is that neighbour when
the k - 1 nearer ones are out and it is in, with probability C(n-1-k, m-1) / C(n-1, m). Influence
conditions a test example's nearest neighbour on i being in or out of the subset the same way.
"""

from __future__ import annotations

from math import comb

import numpy as np


def _order(x_train: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.argsort(((x_train - q) ** 2).sum(axis=1), kind="stable")


def p_correct_out(order: np.ndarray, i: int, label: int, y: np.ndarray, m: int) -> float:
    """P(1-NN right on a point whose neighbours are `order`) over m-subsets of the others of i."""
    others = [o for o in order if o != i]
    n1 = len(others)
    return sum(comb(n1 - k, m - 1) for k, o in enumerate(others, 1) if y[o] == label) / comb(n1, m)


def p_correct_in(order: np.ndarray, i: int, label: int, y: np.ndarray, m: int) -> float:
    """The same over m-subsets that contain i."""
    n1 = len(order) - 1
    total = 0.0
    for k, o in enumerate(order, 1):
        if o == i:  # every nearer point is out: i is the nearest
            return total + (y[i] == label) * comb(n1 - (k - 1), m - 1) / comb(n1, m - 1)
        if y[o] == label:
            total += comb(n1 - k, m - 2) / comb(n1, m - 1)
    raise AssertionError("i not in order")


def exact(x_train, y_train, x_test, y_test, m, sides: bool = False):
    """(mem (n,), infl (n, n_test)) of 1-NN at subset size m; with sides=True also the in- and out-
    probabilities of test correctness (n, n_test) whose difference is infl."""
    n = len(y_train)
    mem = np.array([1.0 - p_correct_out(_order(x_train, x_train[i]), i, y_train[i], y_train, m) for i in range(n)])
    p_in = np.empty((n, len(y_test)))
    p_out = np.empty_like(p_in)
    for j in range(len(y_test)):
        order = _order(x_train, x_test[j])
        for i in range(n):
            p_in[i, j] = p_correct_in(order, i, y_test[j], y_train, m)
            p_out[i, j] = p_correct_out(order, i, y_test[j], y_train, m)
    return (mem, p_in - p_out, p_in, p_out) if sides else (mem, p_in - p_out)
