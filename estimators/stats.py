"""Additive sufficient statistics of a campaign, and the fold that accumulates them.

Every estimate longtail reports is a difference of two means over runs, so a campaign is summarised
exactly by per-example sums. For t runs with masks M (t x n, 1 = trained on it) and correctness
C_tr (t x n), C_te (t x n_test):

    n_in[i]            = sum_r M[r, i]
    train_correct[i]   = sum_r C_tr[r, i]
    train_correct_in[i]= sum_r M[r, i] C_tr[r, i]
    test_correct[j]    = sum_r C_te[r, j]
    infl_in[i, j]      = sum_r M[r, i] C_te[r, j]          (= M^T C_te, one GEMM per block of runs)

The "out" sums follow by subtraction (n_out = t - n_in, ...), so folding is order-free, exact and
mergeable: the statistics of two disjoint sets of runs add.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# infl_in is accumulated in float32: integer counts are exact there up to 2**24 runs.
MAX_EXACT_RUNS = 2**24


@dataclass
class Stats:
    runs: int
    n_in: np.ndarray  # (n_train,) int64
    train_correct: np.ndarray  # (n_train,) int64
    train_correct_in: np.ndarray  # (n_train,) int64
    test_correct: np.ndarray  # (n_test,) int64
    infl_in: np.ndarray | None  # (n_train, n_test) float32, or None when influence is not kept

    @property
    def n_train(self) -> int:
        return self.n_in.shape[0]

    @property
    def n_test(self) -> int:
        return self.test_correct.shape[0]

    @property
    def n_out(self) -> np.ndarray:
        return self.runs - self.n_in

    @property
    def train_correct_out(self) -> np.ndarray:
        return self.train_correct - self.train_correct_in

    def arrays(self) -> dict[str, np.ndarray]:
        """Plain named arrays (for a checkpoint file); inverse of `Stats.from_arrays`."""
        out = {
            "runs": np.asarray(self.runs, dtype=np.int64),
            "n_in": self.n_in,
            "train_correct": self.train_correct,
            "train_correct_in": self.train_correct_in,
            "test_correct": self.test_correct,
        }
        if self.infl_in is not None:
            out["infl_in"] = self.infl_in
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "Stats":
        return cls(
            runs=int(arrays["runs"]),
            n_in=np.asarray(arrays["n_in"], dtype=np.int64),
            train_correct=np.asarray(arrays["train_correct"], dtype=np.int64),
            train_correct_in=np.asarray(arrays["train_correct_in"], dtype=np.int64),
            test_correct=np.asarray(arrays["test_correct"], dtype=np.int64),
            infl_in=np.asarray(arrays["infl_in"], dtype=np.float32) if "infl_in" in arrays else None,
        )


def zeros(n_train: int, n_test: int, influence: bool = True) -> Stats:
    """The statistics of no runs at all."""
    return Stats(
        runs=0,
        n_in=np.zeros(n_train, np.int64),
        train_correct=np.zeros(n_train, np.int64),
        train_correct_in=np.zeros(n_train, np.int64),
        test_correct=np.zeros(n_test, np.int64),
        infl_in=np.zeros((n_train, n_test), np.float32) if influence else None,
    )


def fold(stats: Stats, mask: np.ndarray, train_correct: np.ndarray, test_correct: np.ndarray) -> Stats:
    """Add a block of runs to `stats` in place and return it.

    mask, train_correct: (b, n_train) bool; test_correct: (b, n_test) bool. The influence sums of the
    whole block are one GEMM: accumulating run by run would read and write the n_train x n_test
    matrix once per run and be memory-bound.
    """
    mask = np.asarray(mask, dtype=bool)
    train_correct = np.asarray(train_correct, dtype=bool)
    test_correct = np.asarray(test_correct, dtype=bool)
    b = mask.shape[0]
    if mask.ndim != 2 or mask.shape != train_correct.shape or mask.shape[1] != stats.n_train:
        raise ValueError(
            f"fold: expected mask and train_correct of shape (runs, {stats.n_train}), "
            f"found {mask.shape} and {train_correct.shape}"
        )
    if test_correct.shape != (b, stats.n_test):
        raise ValueError(f"fold: expected test_correct of shape ({b}, {stats.n_test}), found {test_correct.shape}")
    if stats.runs + b >= MAX_EXACT_RUNS:
        raise ValueError(f"fold: more than {MAX_EXACT_RUNS} runs cannot be counted exactly in float32")
    if b == 0:
        return stats
    stats.runs += b
    stats.n_in += mask.sum(axis=0)
    stats.train_correct += train_correct.sum(axis=0)
    stats.train_correct_in += (mask & train_correct).sum(axis=0)
    stats.test_correct += test_correct.sum(axis=0)
    if stats.infl_in is not None:
        m = mask.astype(np.float32)
        c = test_correct.astype(np.float32)
        stats.infl_in += m.T @ c
    return stats


def merge(a: Stats, b: Stats) -> Stats:
    """Statistics of the union of two disjoint sets of runs (a new object)."""
    if (a.n_train, a.n_test) != (b.n_train, b.n_test):
        raise ValueError(f"merge: shapes differ: {(a.n_train, a.n_test)} vs {(b.n_train, b.n_test)}")
    infl = None
    if a.infl_in is not None and b.infl_in is not None:
        infl = a.infl_in + b.infl_in
    return Stats(
        runs=a.runs + b.runs,
        n_in=a.n_in + b.n_in,
        train_correct=a.train_correct + b.train_correct,
        train_correct_in=a.train_correct_in + b.train_correct_in,
        test_correct=a.test_correct + b.test_correct,
        infl_in=infl,
    )
