"""The learner of `longtail selftest`: a plug-in dataset and trainer whose memorization and influence are
known exactly (estimators/closed_form.py derives them; tests/test_selftest.py checks that against a Monte
Carlo simulation of this very code). It lives in the workers package so that every Ray worker that can
run a campaign can import it.

[dataset] options: n_train (even), n_test, leaky (training examples the learner memorizes strongly:
their in-subset mean is mu_leak instead of mu_in), spread (examples differ in difficulty: offsets spread
evenly over [-spread, spread], in a fixed shuffled order, shift each one's in and out means). The
learner's constants travel in Dataset.info, so the trainer and the closed form read the same numbers.
"""

from __future__ import annotations

import numpy as np

from estimators.closed_form import sources, twins

from workers.datasets import Dataset

PARAMS = {"mu_in": 1.0, "mu_leak": 3.0, "mu_hi": 1.0, "mu_lo": 0.0, "nu_hi": 1.0, "nu_lo": -0.5}


def dataset(section: dict) -> Dataset:
    n, nt = int(section.get("n_train", 60)), int(section.get("n_test", 30))
    twins(n)
    leaky = sorted(int(i) for i in section.get("leaky", []))
    spread = float(section.get("spread", 0.0))
    rng = np.random.default_rng(0)  # inputs are only there for shape checks: the learner ignores them
    offset = spread * rng.permutation(np.linspace(-1, 1, n))
    y = (np.arange(n) // 2 % 2).astype(np.int64)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    src = sources(n, nt)
    return Dataset(name="selftest", x_train=x, y_train=y, x_test=x[src].copy(), y_test=y[src].copy(), num_classes=2,
                   info={"learner": {**PARAMS, "leaky": leaky, "offset": offset.tolist()}})


def mu_in(info: dict, n: int) -> np.ndarray:
    p = info["learner"]
    mu = np.full(n, p["mu_in"])
    mu[p["leaky"]] = p["mu_leak"]
    return mu


def fit_predict(data: Dataset, train_indices: np.ndarray, seed: int):
    """(train_pred, test_pred, train_margin, test_margin): right iff the latent score is > 0."""
    p = data.info["learner"]
    n, nt, k = data.n_train, data.n_test, data.num_classes
    mask = np.zeros(n, bool)
    mask[train_indices] = True
    rng = np.random.default_rng(seed)
    mu = np.where(mask, mu_in(data.info, n), np.where(mask[twins(n)], p["mu_hi"], p["mu_lo"])) + p["offset"]
    s = mu + rng.standard_normal(n)
    nu = np.where(mask[sources(n, nt)], p["nu_hi"], p["nu_lo"])
    t = nu + rng.standard_normal(nt)
    train_pred = np.where(s > 0, data.y_train, (data.y_train + 1) % k)
    test_pred = np.where(t > 0, data.y_test, (data.y_test + 1) % k)
    return train_pred, test_pred, s.astype(np.float32), t.astype(np.float32)
