"""The plain estimator, as in the paper's own code: stack every run, compute the masked means.

Slow and memory-hungry on purpose; it is the oracle the fast fold is tested against.
"""

from __future__ import annotations

import numpy as np


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over runs (axis 0) of values where mask; NaN where the mask is empty."""
    counts = mask.sum(axis=0).astype(np.float64)
    sums = (values * mask).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def reference_memorization(masks: np.ndarray, train_correct: np.ndarray) -> dict[str, np.ndarray]:
    masks = np.asarray(masks, dtype=np.float64)
    correct = np.asarray(train_correct, dtype=np.float64)
    acc_in = _masked_mean(correct, masks)
    acc_out = _masked_mean(correct, 1 - masks)
    n_in = masks.sum(axis=0)
    n_out = (1 - masks).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(acc_in * (1 - acc_in) / n_in + acc_out * (1 - acc_out) / n_out)
    return {"mem": acc_in - acc_out, "se": se, "n_in": n_in, "n_out": n_out,
            "acc_in": acc_in, "acc_out": acc_out}


def reference_influence(masks: np.ndarray, test_correct: np.ndarray) -> np.ndarray:
    """infl[i, j], shape (n_train, n_test): two masked dot products, no subtraction trick."""
    masks = np.asarray(masks, dtype=np.float64)
    correct = np.asarray(test_correct, dtype=np.float64)
    inv = 1 - masks
    n_in = masks.sum(axis=0)[:, None]
    n_out = inv.sum(axis=0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_in = np.where(n_in > 0, masks.T @ correct / np.maximum(n_in, 1), np.nan)
        mean_out = np.where(n_out > 0, inv.T @ correct / np.maximum(n_out, 1), np.nan)
    return mean_in - mean_out


def reference_pairs(mem, infl, train_labels, test_labels, mem_threshold=0.25, infl_threshold=0.15,
                    same_class=True) -> set[tuple[int, int]]:
    """The selected (train, test) pairs as a set, by explicit loops."""
    pairs = set()
    for i in range(infl.shape[0]):
        if not mem[i] >= mem_threshold:
            continue
        for j in range(infl.shape[1]):
            if infl[i, j] >= infl_threshold and (not same_class or train_labels[i] == test_labels[j]):
                pairs.add((i, j))
    return pairs
