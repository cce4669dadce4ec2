"""Exact memorization and influence of the self-test learner (workers/selftest_learner.py) under the
fixed design: subsets of exactly m of n training examples, drawn uniformly.

The learner: every (run, example) has a latent score s ~ N(mu, 1) and is predicted right iff s > 0 (s is
also its margin). Training example i gets mu_in[i] when the run trains on it; left out, its mean depends
on its twin t(i) = i XOR 1: mu_hi when the twin is in the subset, mu_lo when not; an example's own
difficulty offset o[i] is added to all three (it shifts in and out alike). Test example j is a
copy of training example src(j) = j mod n: nu_hi when src(j) is in the subset, nu_lo when not.

Under the fixed design, given that i is out, the twin is in with probability m / (n - 1); given that i is
in, another example is in with probability (m - 1) / (n - 1). So, with Phi the normal CDF,

    acc_in[i]  = Phi(mu_in[i] + o[i])
    acc_out[i] = q Phi(mu_hi + o[i]) + (1 - q) Phi(mu_lo + o[i]),        q = m / (n - 1)
    infl[i, j] = Phi(nu_hi) - Phi(nu_lo)                    if i = src(j)
               = -(Phi(nu_hi) - Phi(nu_lo)) / (n - 1)       otherwise

(the small negative influence of every other example is the sampling-without-replacement dependence:
when i takes a place in the subset, src(j) is a little less likely to get one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr


def twins(n: int) -> np.ndarray:
    if n % 2:
        raise ValueError(f"the self-test learner pairs examples into twins: n_train must be even, found {n}")
    return np.arange(n) ^ 1


def sources(n_train: int, n_test: int) -> np.ndarray:
    return np.arange(n_test) % n_train


@dataclass(frozen=True)
class Truth:
    acc_in: np.ndarray  # (n,)
    acc_out: np.ndarray
    mem: np.ndarray
    infl: np.ndarray  # (n, n_test)


def selftest_truth(n_train: int, n_test: int, m: int, mu_in: np.ndarray, mu_hi: float, mu_lo: float,
                   nu_hi: float, nu_lo: float, offset: np.ndarray | float = 0.0) -> Truth:
    if not 1 <= m <= n_train - 1:
        raise ValueError(f"subset size m must be in 1..{n_train - 1}, found {m}")
    twins(n_train)
    q = m / (n_train - 1)
    o = np.broadcast_to(np.asarray(offset, np.float64), (n_train,))
    acc_in = ndtr(np.broadcast_to(np.asarray(mu_in, np.float64), (n_train,)) + o)
    acc_out = q * ndtr(mu_hi + o) + (1 - q) * ndtr(mu_lo + o)
    gap = ndtr(nu_hi) - ndtr(nu_lo)
    infl = np.full((n_train, n_test), -gap / (n_train - 1))
    infl[sources(n_train, n_test), np.arange(n_test)] = gap
    return Truth(acc_in=acc_in, acc_out=acc_out, mem=acc_in - acc_out, infl=infl)
