"""Influence at any scale, computed in tiles from the plan's masks and the runs' test outcomes.

A dense influence matrix is n_train x n_test (1.28 M x 50 k is 256 GB in float32), but each tile
of it is one GEMM of the masks' columns against the test outcomes: A = M[:, rows]^T X[:, cols],
with the "out" sums by subtraction. Tiles are sized so that every temporary fits `budget_bytes`,
and reduced at once: kept whole (dense), kept per class (the paper's released CIFAR-100 layout), or
reduced to the top-k influencers of each test example plus every pair above a threshold.

`mask_columns(idx) -> (runs, len(idx)) bool` gives the masks of training examples `idx` for the
runs in use; `x` (runs, n_test) holds their target values on the test set (0/1 for correctness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .estimates import Difference, difference

MaskColumns = Callable[[np.ndarray], np.ndarray]
BYTES_PER_CELL = 4 * 12  # float32 A, the out sums, and the temporaries of `difference`
TOPK_BYTES_PER_CELL = 4 * 5  # top-k: the transposed GEMM tile, its estimate, a partition copy, masks


def tile_shape(n_rows: int, n_cols: int, budget_bytes: float, bytes_per_cell: int = BYTES_PER_CELL
               ) -> tuple[int, int]:
    """Rows and columns per tile so that a tile's temporaries stay within `budget_bytes`."""
    cells = max(1, int(budget_bytes // bytes_per_cell))
    cols = min(n_cols, max(1, cells // 8))  # whole test rows where possible: top-k merges stay cheap
    rows = min(n_rows, max(1, cells // cols))
    return rows, cols


@dataclass
class Outcomes:
    """The test-set values of one target over the runs in use, and their column sums."""

    x: np.ndarray  # (runs, n_test) float32
    binary: bool

    def __post_init__(self):
        self.x = np.asarray(self.x, dtype=np.float32)
        self.total = self.x.sum(axis=0, dtype=np.float64)
        self.total_sq = None if self.binary else (self.x.astype(np.float64) ** 2).sum(axis=0)

    @property
    def runs(self) -> int:
        return self.x.shape[0]


def block(mask_columns: MaskColumns, out: Outcomes, rows: np.ndarray, cols: np.ndarray) -> Difference:
    """Influence of training examples `rows` on test examples `cols`: one GEMM and its epilogue."""
    m = mask_columns(rows).astype(np.float32)  # (runs, len(rows))
    x = out.x[:, cols]
    a_in = m.T @ x
    n_in = m.sum(axis=0, dtype=np.float64)[:, None]
    n_out = out.runs - n_in
    a_out = out.total[cols].astype(np.float32)[None, :] - a_in
    sq_in = sq_out = None
    if not out.binary:
        sq_in = m.T @ (x * x)
        sq_out = out.total_sq[cols].astype(np.float32)[None, :] - sq_in
    return difference(a_in, n_in.astype(np.float32), a_out, n_out.astype(np.float32), sq_in, sq_out,
                      out.binary, dtype=np.float32)


def tiles(n_train: int, n_test: int, budget_bytes: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rows, cols = tile_shape(n_train, n_test, budget_bytes)
    for c0 in range(0, n_test, cols):
        for r0 in range(0, n_train, rows):
            yield np.arange(r0, min(r0 + rows, n_train)), np.arange(c0, min(c0 + cols, n_test))


def dense(mask_columns: MaskColumns, out: Outcomes, n_train: int, budget_bytes: float = 2**30
          ) -> tuple[np.ndarray, np.ndarray]:
    """The whole (n_train, n_test) influence matrix and its standard errors, tile by tile."""
    infl = np.empty((n_train, out.x.shape[1]), np.float32)
    se = np.empty_like(infl)
    for rows, cols in tiles(n_train, out.x.shape[1], budget_bytes):
        d = block(mask_columns, out, rows, cols)
        infl[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = d.est
        se[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = d.se
    return infl, se


@dataclass
class ClassBlock:
    label: int
    train: np.ndarray  # global train ids of the class (the paper's tr_classidx_k)
    test: np.ndarray  # global test ids of the class (tt_classidx_k)
    infl: np.ndarray  # (len(train), len(test)) float32, train-major
    se: np.ndarray


def per_class(mask_columns: MaskColumns, out: Outcomes, train_labels: np.ndarray, test_labels: np.ndarray,
              budget_bytes: float = 2**30) -> list[ClassBlock]:
    """Influence within each class only: the blocks the paper's same-class selection needs."""
    blocks = []
    for k in np.union1d(np.unique(train_labels), np.unique(test_labels)):
        tr = np.flatnonzero(train_labels == k)
        te = np.flatnonzero(test_labels == k)
        infl = np.full((len(tr), len(te)), np.nan, np.float32)
        se = np.full_like(infl, np.nan)
        if len(tr) and len(te):
            for rows, cols in tiles(len(tr), len(te), budget_bytes):
                d = block(mask_columns, out, tr[rows], te[cols])
                infl[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = d.est
                se[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = d.se
        blocks.append(ClassBlock(int(k), tr, te, infl, se))
    return blocks


@dataclass
class TopK:
    """The k most influential training examples of every test example, and all pairs above a threshold."""

    train: np.ndarray  # (n_test, k) int64 train ids, best first (ties: smaller id); -1 where undefined
    infl: np.ndarray  # (n_test, k) float32
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    pairs_train: np.ndarray  # every (i, j) with infl >= threshold
    pairs_test: np.ndarray
    pairs_infl: np.ndarray
    pairs_se: np.ndarray


def top_k(mask_columns: MaskColumns, out: Outcomes, n_train: int, k: int, threshold: float,
          budget_bytes: float = 2**30) -> TopK:
    """Stream tiles of influence, keeping only the running top-k of every test example and the pairs
    >= threshold.

    Tiles are computed transposed, (test x train), so that each test example's candidates are
    contiguous; only the estimate is computed for the whole tile (two passes), the k-th largest
    value of every test row found by partition, and standard errors and intervals computed at the
    end for the pairs kept. Memory: one tile plus the O(n_test k) running state."""
    n_test = out.x.shape[1]
    k = min(k, n_train)
    rows, cols = tile_shape(n_train, n_test, budget_bytes, TOPK_BYTES_PER_CELL)
    total = out.total.astype(np.float32)
    n_in_all = np.zeros(n_train, np.float32)
    # running state per test example: value, train id, in-sum (and in-sum of squares) of the k best
    best_val = np.full((n_test, k), -np.inf, np.float32)
    best_id = np.full((n_test, k), -1, np.int64)
    best_a = np.zeros((n_test, k), np.float32)
    best_q = None if out.binary else np.zeros((n_test, k), np.float32)
    found: dict[str, list] = {"train": [], "test": [], "a": [], "q": []}
    xt_full = out.x.T  # (n_test, runs) view
    for r0 in range(0, n_train, rows):
        idx = np.arange(r0, min(r0 + rows, n_train))
        m = mask_columns(idx).astype(np.float32)  # (runs, r)
        n_in = m.sum(axis=0)
        n_in_all[idx] = n_in
        n_out = out.runs - n_in
        inv_in, inv_out = _inv(n_in), _inv(n_out)
        defined = (n_in > 0) & (n_out > 0)
        for c0 in range(0, n_test, cols):
            c = slice(c0, min(c0 + cols, n_test))
            xt = xt_full[c]  # (cols, runs)
            a = xt @ m  # (cols, r): sums over in-runs
            q = None if out.binary else (xt * xt) @ m
            est = a * (inv_in + inv_out)[None, :]
            est -= total[c, None] * inv_out[None, :]
            est[:, ~defined] = -np.inf
            # pairs above the threshold
            j, i = np.nonzero(est >= threshold)
            found["train"].append(idx[i])
            found["test"].append(j + c0)
            found["a"].append(a[j, i])
            found["q"].append(None if q is None else q[j, i])
            # candidates for the top k: everything at least the k-th largest of the tile's row
            kk = min(k, len(idx))
            kth = np.partition(est, len(idx) - kk, axis=1)[:, len(idx) - kk]
            j, i = np.nonzero((est >= kth[:, None]) & np.isfinite(est))
            _merge(best_val, best_id, best_a, best_q, c0, j, idx[i], est[j, i], a[j, i],
                   None if q is None else q[j, i])
    outs = {}
    cat = {key: np.concatenate(v) if v and v[0] is not None else None for key, v in found.items()}
    for name, ids, tests, a, q in (("best", best_id, np.arange(n_test)[:, None], best_a, best_q),
                                   ("pairs", cat["train"], cat["test"], cat["a"], cat["q"])):
        safe = np.maximum(ids, 0)
        n_in = n_in_all[safe]
        n_out = out.runs - n_in
        sq_in = sq_out = None
        if not out.binary:
            sq_in, sq_out = q, out.total_sq.astype(np.float32)[tests] - q
        d = difference(a, n_in, total[tests] - a, n_out, sq_in, sq_out, out.binary, dtype=np.float32)
        outs[name] = d
    b, p = outs["best"], outs["pairs"]
    missing = best_id < 0
    for arr in (b.est, b.se, b.ci_low, b.ci_high):
        arr[missing] = np.nan
    return TopK(train=best_id, infl=b.est, se=b.se, ci_low=b.ci_low, ci_high=b.ci_high,
                pairs_train=cat["train"].astype(np.int64), pairs_test=cat["test"].astype(np.int64),
                pairs_infl=p.est.astype(np.float32), pairs_se=p.se.astype(np.float32))


def _inv(n: np.ndarray) -> np.ndarray:
    out = np.full(n.shape, np.nan, np.float32)
    np.divide(1.0, n, out=out, where=n > 0)
    return out


def _merge(best_val, best_id, best_a, best_q, c0, j, ids, vals, a, q) -> None:
    """Merge candidates (test j + c0, train id, value) into the running top-k, ties to the smaller id."""
    k = best_val.shape[1]
    tests = np.unique(j) + c0
    old_j = np.repeat(tests, k)
    rows = tests - c0
    cand_j = np.concatenate([old_j - c0, j])
    cand_val = np.concatenate([best_val[tests].ravel(), vals])
    cand_id = np.concatenate([best_id[tests].ravel(), ids])
    cand_a = np.concatenate([best_a[tests].ravel(), a])
    cand_q = None if best_q is None else np.concatenate([best_q[tests].ravel(), q])
    order = np.lexsort((np.where(cand_id < 0, np.iinfo(np.int64).max, cand_id), -cand_val, cand_j))
    cand_j = cand_j[order]
    starts = np.searchsorted(cand_j, rows)
    rank = np.arange(len(cand_j)) - np.repeat(starts, np.diff(np.r_[starts, len(cand_j)]))
    keep = rank < k
    tj, tr = cand_j[keep] + c0, rank[keep]
    best_val[tj, tr] = cand_val[order][keep]
    best_id[tj, tr] = cand_id[order][keep]
    best_a[tj, tr] = cand_a[order][keep]
    if best_q is not None:
        best_q[tj, tr] = cand_q[order][keep]
