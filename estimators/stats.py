"""Additive sufficient statistics of a campaign, and the fold that accumulates them.

Every estimate longtail reports is a difference of two means over runs, so a campaign is summarised
exactly by per-example sums. A *target* is a value every run produces for every example: its
correctness (0/1, always) or a soft score such as the margin. For t runs with masks M (t x n,
1 = trained on it) and a target X_tr (t x n), X_te (t x n_test):

    n_in[i]        = sum_r M[r, i]
    train[i]       = sum_r X_tr[r, i]           train_in[i] = sum_r M[r, i] X_tr[r, i]
    test[j]        = sum_r X_te[r, j]
    infl_in[i, j]  = sum_r M[r, i] X_te[r, j]   = (M^T X_te)[i, j], one GEMM per block of runs

and, for soft targets, the same sums of squares (for standard errors). The "out" sums follow by
subtraction (n_out = t - n_in, ...), so folding is order-free, exact, and mergeable: the statistics
of two disjoint sets of runs add.

Exact for soft targets too: a soft value is folded as a fixed-point number (clipped to +-SOFT_LIMIT,
rounded to a multiple of SOFT_QUANTUM; its square to a multiple of SQUARE_QUANTUM), so that every
partial sum of up to MAX_SOFT_RUNS runs is an integer multiple of the quantum below 2**53, which
float64 adds without rounding in any order. The soft estimates of a campaign then do not depend on
which runs were folded together (a crash, a resume, a fold actor, when checkpoints fell), bit for bit.
The rounding is far below a float32 margin's own precision (below 2**-4 in magnitude only; |x| >= 2**-4
is a multiple of SOFT_QUANTUM already).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# infl_in of 0/1 targets is accumulated in float32: integer counts are exact there up to 2**24 runs.
MAX_EXACT_RUNS = 2**24
# soft targets: |sum| <= runs * SOFT_LIMIT and |sum of squares| <= runs * SOFT_LIMIT**2, in quanta of
# 2**-27 and 2**-21: 20 + 6 + 27 = 53 and 20 + 12 + 21 = 53 bits, float64's significand
MAX_SOFT_RUNS = 2**20
SOFT_LIMIT = 2.0**6
SOFT_QUANTUM = 2.0**-27
SQUARE_QUANTUM = 2.0**-21
CORRECT = "correct"


def fixed_point(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft values and their squares as the fold adds them (float64, exact multiples of the quanta)."""
    q = np.clip(np.asarray(x, dtype=np.float64), -SOFT_LIMIT, SOFT_LIMIT)
    q = np.round(q / SOFT_QUANTUM) * SOFT_QUANTUM
    return q, np.round(q * q / SQUARE_QUANTUM) * SQUARE_QUANTUM


@dataclass
class TargetSums:
    binary: bool  # 0/1 values: squares equal values, so no square sums are kept
    train: np.ndarray  # (n,) float64
    train_in: np.ndarray
    test: np.ndarray  # (n_test,)
    train_sq: np.ndarray | None = None
    train_sq_in: np.ndarray | None = None
    test_sq: np.ndarray | None = None
    infl_in: np.ndarray | None = None  # (n, n_test), when dense influence is kept: float32 counts for
    # 0/1 targets, float64 fixed-point sums for soft ones
    infl_sq_in: np.ndarray | None = None  # soft targets: M^T X_te^2

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}


@dataclass
class Stats:
    runs: int
    n_in: np.ndarray  # (n_train,) int64
    targets: dict[str, TargetSums] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return self.n_in.shape[0]

    @property
    def n_test(self) -> int:
        return self.targets[CORRECT].test.shape[0]

    @property
    def n_out(self) -> np.ndarray:
        return self.runs - self.n_in

    @property
    def dense(self) -> bool:
        return self.targets[CORRECT].infl_in is not None

    def arrays(self) -> dict[str, np.ndarray]:
        """Plain named arrays (for a checkpoint file); inverse of `Stats.from_arrays`."""
        out = {"runs": np.asarray(self.runs, dtype=np.int64), "n_in": self.n_in,
               "binary_targets": np.array([k for k, v in self.targets.items() if v.binary], dtype=str),
               "soft_targets": np.array([k for k, v in self.targets.items() if not v.binary], dtype=str)}
        for name, sums in self.targets.items():
            out.update(sums.arrays(f"target.{name}"))
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "Stats":
        targets = {}
        for kind in ("binary_targets", "soft_targets"):
            for name in np.atleast_1d(arrays[kind]).tolist():
                prefix = f"target.{name}."
                fields = {k[len(prefix):]: np.asarray(arrays[k]) for k in arrays if k.startswith(prefix)}
                if kind == "soft_targets":  # checkpoints before exact soft sums kept float32 matrices
                    fields = {k: v.astype(np.float64, copy=False) for k, v in fields.items()}
                targets[name] = TargetSums(binary=kind == "binary_targets", **fields)
        return cls(runs=int(arrays["runs"]), n_in=np.asarray(arrays["n_in"], np.int64), targets=targets)


def zeros(n_train: int, n_test: int, dense: bool = True, soft: tuple[str, ...] = ()) -> Stats:
    """The statistics of no runs at all, for correctness and the given soft targets."""

    def target(binary: bool) -> TargetSums:
        sq = None if binary else np.zeros
        return TargetSums(
            binary=binary, train=np.zeros(n_train), train_in=np.zeros(n_train), test=np.zeros(n_test),
            train_sq=sq and sq(n_train), train_sq_in=sq and sq(n_train), test_sq=sq and sq(n_test),
            infl_in=np.zeros((n_train, n_test), np.float32 if binary else np.float64) if dense else None,
            infl_sq_in=np.zeros((n_train, n_test)) if dense and not binary else None)

    targets = {CORRECT: target(True)}
    targets.update({name: target(False) for name in soft})
    return Stats(runs=0, n_in=np.zeros(n_train, np.int64), targets=targets)


def fold(stats: Stats, mask: np.ndarray, train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> Stats:
    """Add a block of b runs to `stats` in place and return it.

    mask: (b, n_train) bool; train[name]: (b, n_train) and test[name]: (b, n_test) values of every
    target `stats` keeps (bool for correctness). The influence sums of the whole block are one GEMM:
    accumulating run by run would read and write the n_train x n_test matrix once per run.
    """
    mask = np.asarray(mask, dtype=bool)
    b = mask.shape[0]
    if mask.ndim != 2 or mask.shape[1] != stats.n_train:
        raise ValueError(f"fold: expected a mask of shape (runs, {stats.n_train}), found {mask.shape}")
    if set(train) != set(stats.targets) or set(test) != set(stats.targets):
        raise ValueError(f"fold: expected values of targets {sorted(stats.targets)}, found train "
                         f"{sorted(train)} and test {sorted(test)}")
    for name in stats.targets:
        if np.shape(train[name]) != mask.shape:
            raise ValueError(f"fold: expected train values of '{name}' of shape {mask.shape}, found "
                             f"{np.shape(train[name])}")
        if np.shape(test[name]) != (b, stats.n_test):
            raise ValueError(f"fold: expected test values of '{name}' of shape ({b}, {stats.n_test}), found "
                             f"{np.shape(test[name])}")
    if stats.runs + b >= MAX_EXACT_RUNS:
        raise ValueError(f"fold: more than {MAX_EXACT_RUNS} runs cannot be counted exactly in float32")
    if stats.runs + b > MAX_SOFT_RUNS and any(not t.binary for t in stats.targets.values()):
        raise ValueError(f"fold: soft values of more than {MAX_SOFT_RUNS} runs cannot be summed exactly in "
                         f"float64; found {stats.runs + b} runs")
    if b == 0:
        return stats
    stats.runs += b
    stats.n_in += mask.sum(axis=0)
    m32 = mask.astype(np.float32) if stats.dense else None
    for name, sums in stats.targets.items():
        if sums.binary:  # counts of bools: no float copies of the block (the driver's per-shard cost)
            b_tr = np.asarray(train[name], dtype=bool)
            b_te = np.asarray(test[name], dtype=bool)
            sums.train += np.count_nonzero(b_tr, axis=0)
            sums.train_in += np.count_nonzero(b_tr & mask, axis=0)
            sums.test += np.count_nonzero(b_te, axis=0)
            if sums.infl_in is not None:
                _accumulate_gemm(sums.infl_in, m32, b_te.astype(np.float32))
            continue
        x_tr, sq_tr = fixed_point(train[name])
        x_te, sq_te = fixed_point(test[name])
        sums.train += x_tr.sum(axis=0)
        sums.train_in += np.where(mask, x_tr, 0.0).sum(axis=0)
        sums.test += x_te.sum(axis=0)
        sums.train_sq += sq_tr.sum(axis=0)
        sums.train_sq_in += np.where(mask, sq_tr, 0.0).sum(axis=0)
        sums.test_sq += sq_te.sum(axis=0)
        if sums.infl_in is not None:
            m64 = mask.astype(np.float64)
            _accumulate_gemm(sums.infl_in, m64, x_te)
            _accumulate_gemm(sums.infl_sq_in, m64, sq_te)
    return stats


def _accumulate_gemm(acc: np.ndarray, m: np.ndarray, x: np.ndarray) -> None:
    """acc += m^T x in place, as one BLAS call with beta = 1: numpy's `acc += m.T @ x` would first
    materialise the n_train x n_test product and then add it (measured 0.53 s against 0.78 s for a
    20,000 x 10,000 block of 256 runs). acc is C-ordered, so acc.T is the Fortran array BLAS updates.
    float32 (0/1 counts) or float64 (fixed-point soft sums), as acc is."""
    from scipy.linalg.blas import dgemm, sgemm

    gemm = sgemm if acc.dtype == np.float32 else dgemm
    out = gemm(1.0, x.astype(acc.dtype, copy=False), m.astype(acc.dtype, copy=False), beta=1.0, c=acc.T,
               trans_a=1, overwrite_c=1)
    if not np.shares_memory(out, acc):  # BLAS had to copy (acc not C-contiguous): put the result back
        acc[...] = out.T


def merge(a: Stats, b: Stats) -> Stats:
    """Statistics of the union of two disjoint sets of runs (a new object)."""
    if (a.n_train, a.n_test) != (b.n_train, b.n_test) or set(a.targets) != set(b.targets):
        raise ValueError(f"merge: statistics of different shapes or targets: {(a.n_train, a.n_test)} "
                         f"{sorted(a.targets)} vs {(b.n_train, b.n_test)} {sorted(b.targets)}")

    def add(x, y):
        return None if x is None or y is None else x + y

    targets = {}
    for name, s in a.targets.items():
        o = b.targets[name]
        targets[name] = TargetSums(binary=s.binary, **{k: add(v, getattr(o, k)) for k, v in s.__dict__.items()
                                                       if k != "binary"})
    return Stats(runs=a.runs + b.runs, n_in=a.n_in + b.n_in, targets=targets)
