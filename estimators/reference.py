"""The plain estimator, as in the paper's own code: stack every run, compute the masked means.

Slow and memory-hungry on purpose, written from the definitions with no sufficient-statistics
tricks; it is the oracle the fast fold and the tiled influence are tested against.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

Z95 = 1.959963984540054


def _side(values: np.ndarray, mask: np.ndarray):
    """Mean, sample variance (ddof=1) and count over runs (axis 0) where mask; NaN where undefined."""
    n = mask.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, (values * mask).sum(axis=0) / np.maximum(n, 1), np.nan)
        dev = np.where(mask, values - mean, 0.0)
        var = np.where(n > 1, (dev**2).sum(axis=0) / np.maximum(n - 1, 1), np.nan)
    return mean, var, n


def _difference(values_in_out, mask, binary):
    """est, se, ci_low, ci_high, mean_in, mean_out for values (runs, k) split by mask (runs, k)."""
    m_in, v_in, n_in = _side(values_in_out, mask)
    m_out, v_out, n_out = _side(values_in_out, ~mask)
    est = m_in - m_out
    with np.errstate(invalid="ignore", divide="ignore"):
        if binary:
            se = np.sqrt(m_in * (1 - m_in) / n_in + m_out * (1 - m_out) / n_out)
            p_in = ((values_in_out * mask).sum(axis=0) + 1) / (n_in + 2)
            p_out = ((values_in_out * ~mask).sum(axis=0) + 1) / (n_out + 2)
            half = Z95 * np.sqrt(p_in * (1 - p_in) / (n_in + 2) + p_out * (1 - p_out) / (n_out + 2))
            low = np.clip(p_in - p_out - half, -1, 1)
            high = np.clip(p_in - p_out + half, -1, 1)
        else:
            se = np.sqrt(v_in / n_in + v_out / n_out)
            low, high = est - Z95 * se, est + Z95 * se
    low = np.where(np.isnan(est), np.nan, low)
    high = np.where(np.isnan(est), np.nan, high)
    return {"est": est, "se": se, "ci_low": low, "ci_high": high, "mean_in": m_in, "mean_out": m_out,
            "n_in": n_in, "n_out": n_out}


def reference_memorization(masks: np.ndarray, train_values: np.ndarray, binary: bool = True) -> dict:
    masks = np.asarray(masks, dtype=bool)
    d = _difference(np.asarray(train_values, dtype=np.float64), masks, binary)
    return {"mem": d["est"], "se": d["se"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n_in": d["n_in"],
            "n_out": d["n_out"], "acc_in": d["mean_in"], "acc_out": d["mean_out"]}


def reference_influence(masks: np.ndarray, test_values: np.ndarray, binary: bool = True, full: bool = False):
    """infl[i, j], shape (n_train, n_test), by one masked mean per training example (no GEMM, no
    subtraction trick). With full=True, a dict with se, ci_low and ci_high as well."""
    masks = np.asarray(masks, dtype=bool)
    values = np.asarray(test_values, dtype=np.float64)
    parts = [_difference(values, np.repeat(masks[:, i:i + 1], values.shape[1], axis=1), binary)
             for i in range(masks.shape[1])]
    out = {k: np.array([p[k] for p in parts]) for k in ("est", "se", "ci_low", "ci_high")}
    return out if full else out["est"]


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


def reference_top_k(infl: np.ndarray, k: int) -> list[list[int]]:
    """For every test example, the train ids of its k largest (non-NaN) influences, ties by smaller id."""
    out = []
    for j in range(infl.shape[1]):
        col = infl[:, j]
        ids = [i for i in range(len(col)) if not np.isnan(col[i])]
        ids.sort(key=lambda i: (-col[i], i))
        out.append(ids[:k])
    return out


def exact_influence(masks: np.ndarray, outcomes: np.ndarray) -> list[list[Fraction | None]]:
    """infl[i][j] of a 0/1 target from the definition, run by run, in exact fractions (None where
    undefined): the oracle for selections that must not depend on float rounding."""
    t, n_train = masks.shape
    out = []
    for i in range(n_train):
        row = []
        for j in range(outcomes.shape[1]):
            right_in = [bool(outcomes[r, j]) for r in range(t) if masks[r, i]]
            right_out = [bool(outcomes[r, j]) for r in range(t) if not masks[r, i]]
            row.append(Fraction(sum(right_in), len(right_in)) - Fraction(sum(right_out), len(right_out))
                       if right_in and right_out else None)
        out.append(row)
    return out


def exact_top_k(infl, k: int) -> list[list[int]]:
    """For every test example, the k largest exact influences, ties by the smaller train id."""
    return [sorted((i for i in range(len(infl)) if infl[i][j] is not None), key=lambda i: (-infl[i][j], i))[:k]
            for j in range(len(infl[0]))]


def exact_pairs(infl, threshold: Fraction, rows=None) -> set:
    """(i, j) with infl[i][j] >= threshold (exactly), for the training examples in `rows` if given."""
    return {(i, j) for i in range(len(infl)) for j in range(len(infl[0]))
            if infl[i][j] is not None and infl[i][j] >= threshold and (rows is None or rows[i])}
