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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from estimators import rational
from estimators.estimates import Difference, difference, epilogue_into

MaskColumns = Callable[[np.ndarray], np.ndarray]
BYTES_PER_CELL = 4 * 12  # float32 A, the out sums, and the temporaries of `difference`
TOPK_BYTES_PER_CELL = 4 * 5  # top-k: the GEMM tile, the halves' (one buffer for both), the mask, slack


@contextmanager
def _written_once():
    """Arrays allocated inside are written once and read once (the pairs noise lets through: millions at
    few runs): without numpy's madvise(MADV_HUGEPAGE), which on a fragmented or ballooned machine makes
    the kernel compact memory for every fresh 2 MB page (measured here: 15 ms a 2 MB page, against 1.5 us
    a 4 kB page; a 200 MB array 2.9 s against 0.07 s). Reused buffers keep huge pages (a GEMM into them
    runs 15% faster). numpy's switch is private; where it is missing nothing changes."""
    from numpy._core import multiarray

    switch = getattr(multiarray, "_set_madvise_hugepage", None)
    previous = switch(False) if switch else None
    try:
        yield
    finally:
        if switch:
            switch(previous)


def tile_shape(n_rows: int, n_cols: int, budget_bytes: float, bytes_per_cell: int = BYTES_PER_CELL
               ) -> tuple[int, int]:
    """Rows and columns per tile so that a tile's temporaries stay within `budget_bytes`."""
    cells = max(1, int(budget_bytes // bytes_per_cell))
    cols = max(1, min(n_cols, cells // 8))  # whole test rows where possible: top-k merges stay cheap
    # (at least 1: an empty side, e.g. a class with no test example, gives no tile, not a zero step)
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
    pairs: tuple[np.ndarray, np.ndarray] | None = None  # (rows, cols) into the block with infl >= threshold


def per_class(mask_columns: MaskColumns, out: Outcomes, train_labels: np.ndarray, test_labels: np.ndarray,
              budget_bytes: float = 2**30, threshold: float | None = None) -> list[ClassBlock]:
    """Influence within each class only: the blocks the paper's same-class selection needs.

    With `threshold`, each block also lists its cells with infl >= threshold, decided exactly on the
    counts for a 0/1 target (estimators/rational.py)."""
    blocks = []
    exact = out.binary and threshold is not None
    # the test examples grouped by class, so that a class is a range of columns a GEMM reads in place:
    # one gather along the rows (0.12 s at 4,000 x 10,000, against 0.25 s for a transposed copy)
    by_class = np.argsort(test_labels, kind="stable")
    xs = np.take(out.x, by_class, axis=1)
    sorted_labels = np.asarray(test_labels)[by_class]
    total, total_sq = out.total.astype(np.float32), None if out.binary else out.total_sq.astype(np.float32)
    for k in np.union1d(np.unique(train_labels), np.unique(test_labels)):
        tr = np.flatnonzero(train_labels == k)
        te = np.flatnonzero(test_labels == k)
        start = np.searchsorted(sorted_labels, k)  # te's columns in xs (it ascends, as the stable sort keeps it)
        # no NaN fill: the tiles cover the block (and an empty block has no cells)
        infl, se = np.empty((len(tr), len(te)), np.float32), np.empty((len(tr), len(te)), np.float32)
        found_r, found_j = [], []
        if len(tr) and len(te):
            for rows, cols in tiles(len(tr), len(te), budget_bytes):
                m = mask_columns(tr[rows]).astype(np.float32)  # (runs, len(rows))
                x = xs[:, start + cols[0]:start + cols[-1] + 1]
                a_in = m.T @ x
                n_in = m.sum(axis=0, dtype=np.float64)
                block = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
                est_view, se_view = infl[block], se[block]
                epilogue_into(a_in, n_in, out.runs, total[te[cols]][None, :], est_view, se_view,
                              None if out.binary else m.T @ (x * x),
                              None if out.binary else total_sq[te[cols]][None, :])
                if threshold is None:
                    continue
                # float32 is within ~1e-6 of the exact estimate: the counts decide near the threshold
                r, j = np.divmod(np.flatnonzero(est_view >= (threshold - 1e-4 if exact else threshold)),
                                 est_view.shape[1])
                if exact:
                    ok = rational.at_least(a_in[r, j], n_in[r], out.total[te[cols]][j], out.runs, threshold)
                    r, j = r[ok], j[ok]
                found_r.append(rows[r])
                found_j.append(cols[j])
        pairs = None if threshold is None else (
            np.concatenate(found_r) if found_r else np.zeros(0, np.int64),
            np.concatenate(found_j) if found_j else np.zeros(0, np.int64))
        blocks.append(ClassBlock(int(k), tr, te, infl, se, pairs))
    return blocks


@dataclass
class TopK:
    """The k most influential training examples of every test example, and all pairs above a threshold."""

    train: np.ndarray  # (n_test, k) int64 train ids, best first (ties: smaller id); -1 where undefined
    infl: np.ndarray  # (n_test, k) float32
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    pairs_train: np.ndarray  # int32: every (i, j) with infl >= threshold (int32 halves the bytes of the
    pairs_test: np.ndarray  # millions that noise lets through at few runs)
    pairs_infl: np.ndarray
    pairs_se: np.ndarray
    half_pairs: list | None = None  # with `halves`: per half, int32 (train ids, test ids) with infl >= threshold


@dataclass
class Halves:
    """Split-half influence computed in the same pass as the whole: `half[r]` (0 or 1) is the half of the
    r-th run in use, `rows[h]` (bool, n_train) the training examples whose pairs are wanted in half h
    (e.g. those memorized in that half), `threshold` the influence their pairs must reach. Each half
    adds a GEMM over its wanted training examples only (half the runs, a few of the columns)."""

    half: np.ndarray
    rows: tuple[np.ndarray, np.ndarray]
    threshold: float


def counts_in(mask_columns: MaskColumns, n_train: int, runs: int, budget_bytes: float,
              groups: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """n_in of every training example over all runs in use, then over each run subset in `groups`."""
    step = max(8, int(budget_bytes // (2 * max(runs, 1))))
    out = [np.zeros(n_train, np.int64) for _ in range(1 + len(groups or []))]
    for r0 in range(0, n_train, step):
        m = mask_columns(np.arange(r0, min(r0 + step, n_train)))
        out[0][r0:r0 + m.shape[1]] = m.sum(axis=0)
        for g, runs_g in enumerate(groups or []):
            out[g + 1][r0:r0 + m.shape[1]] = m[runs_g].sum(axis=0)
    return out


def row_order(row: np.ndarray, key: np.ndarray, n_rows: int) -> np.ndarray:
    """The order of a stable lexsort((-key, row)): row ascending, then key descending, then position.

    From one (vectorised) sort of 64-bit integers packing the row, the key's leading bits (its float64
    bits made order-preserving) and the position: lexsort's stable sort of the float key was most of
    the top-k merge's time (0.23 s at 200 noisy runs; this, 0.08 s).
    Keys that differ only in the bits left out land in one bucket in position order; the rare buckets
    that this leaves out of key order are sorted again exactly."""
    n = len(row)
    row_bits, pos_bits = max(1, int(n_rows - 1).bit_length()), max(1, (n - 1).bit_length())
    key_bits = 64 - row_bits - pos_bits
    if key_bits < 16:  # too few to bucket well: the plain sort
        return np.lexsort((-key, row))
    b = (np.asarray(key, np.float64) + 0.0).view(np.uint64)  # + 0.0: -0.0 sorts with +0.0
    desc = b ^ (((b >> np.uint64(63)) - np.uint64(1)) >> np.uint64(1))  # descending in key, as unsigned:
    # negative keys keep their bits, others have all but the sign bit flipped
    v = np.asarray(row, np.uint64) << np.uint64(64 - row_bits)
    v |= (desc >> np.uint64(64 - key_bits)) << np.uint64(pos_bits)
    v |= np.arange(n, dtype=np.uint64)
    v.sort()
    order = (v & np.uint64(2**pos_bits - 1)).astype(np.intp)
    bucket = v >> np.uint64(pos_bits)
    same = bucket[1:] == bucket[:-1]
    ks = key[order]
    bad = same & (ks[1:] > ks[:-1])
    if bad.any():
        run = np.r_[0, np.cumsum(~same)]
        sel = np.flatnonzero(np.isin(run, run[1:][bad]))
        sub = order[sel]
        order[sel] = sub[np.lexsort((sub, -key[sub], run[sel]))]
    return order


class _Best:
    """The running top k of every test example: estimate keys (float64, exact order), ids, in-sums."""

    def __init__(self, n_test: int, k: int):
        self.k = k
        self.key = np.full((n_test, k), -np.inf)
        self.id = np.full((n_test, k), -1, np.int64)
        self.a = np.zeros((n_test, k))
        self.count = np.zeros(n_test, np.int64)

    def merge(self, j: np.ndarray, ids: np.ndarray, key: np.ndarray, a: np.ndarray) -> None:
        """Merge candidates (test j, train id, key, in-sum) in: higher key first, ties to the smaller id."""
        if len(j) == 0:
            return
        k = self.k
        # Ties go to the smaller id. Every candidate's id is larger than every kept one's (tiles come in
        # increasing id order), and the kept cells of a row are in (-key, id) order already: with the
        # candidates put in id order after them, a stable sort by (row, -key) needs no third key.
        by_id = np.argsort(ids, kind="stable")
        j, ids, key, a = j[by_id], ids[by_id], key[by_id], a[by_id]
        touched = np.bincount(j, minlength=len(self.count))
        rows = np.flatnonzero(touched)
        cj = np.concatenate([np.repeat(rows, k), j])
        ck = np.concatenate([self.key[rows].ravel(), key])
        cid = np.concatenate([self.id[rows].ravel(), ids])
        ca = np.concatenate([self.a[rows].ravel(), a])
        order = row_order(cj, ck, len(self.count))  # empty slots (key -inf) last
        cj = cj[order]
        starts = np.searchsorted(cj, rows)
        rank = np.arange(len(cj)) - np.repeat(starts, np.diff(np.r_[starts, len(cj)]))
        keep = rank < k
        tj, tr, o = cj[keep], rank[keep], order[keep]
        self.key[tj, tr] = ck[o]
        self.id[tj, tr] = cid[o]
        self.a[tj, tr] = ca[o]
        self.count[rows] = np.minimum(k, self.count[rows] + touched[rows])


class _Rule:
    """Which cells of a tile can matter, as per-test-row thresholds on the in-sums `a` of one group of
    training examples that share n_in (within it an estimate is increasing in `a`): exact integer
    thresholds for 0/1 targets (see estimators/rational.py), float ones with a small margin for soft
    targets, whose candidates the exact float64 key then decides."""

    def __init__(self, out: Outcomes, threshold: float | None):
        self.t = out.runs
        self.threshold = threshold
        self.exact = out.binary and self.t <= 40_000 and (threshold is None or rational.exact_ok(self.t, threshold))
        self.total = out.total.astype(np.int64) if self.exact else out.total

    def key(self, a, n, total):
        if self.exact:
            return rational.order_key(a, n, total, self.t)
        t = self.t
        return (np.asarray(a, np.float64) * t - n * total) / (n * (t - n))

    def pair_need(self, total: np.ndarray) -> Callable[[int], np.ndarray]:
        """n -> the smallest in-sum whose estimate reaches the threshold, per test row of `total` (float64).

        Called for every group of every tile (about 60 groups a tile at 200 runs), so what does not
        depend on n is computed once. Exact integers held in float64 while they stay below 2^53, with
        one correctly rounded division (see `_float_exact`)."""
        t = self.t
        if self.threshold is None:
            never = np.full(total.shape, np.inf)
            return lambda n: never
        if not self.exact:
            ntotal = np.asarray(total, np.float64) / t

            return lambda n: _below(self.threshold * n * (t - n) / t + n * ntotal)
        f = rational.fraction(self.threshold)
        p, q = f.numerator, f.denominator
        if not self._float_exact(t * t * (abs(p) + q)):  # n p (t - n) + n q T
            return lambda n: rational.need_at_least(n, total, t, self.threshold).astype(np.float64)
        q_total = q * np.asarray(total, np.float64)
        return lambda n: np.ceil((n * p * (t - n) + n * q_total) / (t * q))

    def top_need(self, total: np.ndarray, best: _Best, c: slice, n_in: np.ndarray) -> Callable[[int], np.ndarray]:
        """n -> per test row, the smallest in-sum whose estimate is strictly above the running k-th best
        (negative where fewer than k are kept). Strictly: tiles are visited in increasing train id, so
        a later cell never wins a tie against a kept one (ties go to the smaller id)."""
        t = self.t
        filled = best.count[c] >= best.k
        if not self.exact:
            kth = np.where(filled, best.key[c, -1], 0) / t
            ntotal = np.asarray(total, np.float64) / t

            return lambda n: np.where(filled, _below(kth * (n * (t - n)) + n * ntotal), -np.inf)
        # key > kth  <=>  a t den > (ka t - kn T) n (t - n) + n T den, with the k-th best's in-sum ka,
        # count kn and den = kn (t - kn); rows not yet full get a bound no in-sum is below
        kn = np.where(filled, n_in[np.maximum(best.id[c, -1], 0)], 1).astype(np.int64)
        den = np.where(filled, kn * (t - kn), 1)
        total = np.asarray(total, np.int64)
        lead = np.where(filled, best.a[c, -1].astype(np.int64) * t - kn * total, 0)
        tail = np.where(filled, total * den, -(2**40))
        if not self._float_exact(t**4):  # |lead n (t - n)| and |n tail| are below t^4 / 4 each
            return lambda n: (lead * (n * (t - n)) + n * tail) // (t * den) + 1
        lead, tail, div = lead.astype(np.float64), tail.astype(np.float64), (t * den).astype(np.float64)
        return lambda n: np.floor((lead * (n * (t - n)) + n * tail) / div) + 1

    @staticmethod
    def _float_exact(largest: int) -> bool:
        """Whether a bound's integers, at most `largest` in size, can be computed in float64: exact below
        2^53, and then floor(fl(r / d)) = floor(r / d), since a quotient that is not an integer is at
        least 1 / d from one and rounding moves it by at most |r / d| 2^-53 < 1 / d."""
        return largest < 2**52


def _below(need: np.ndarray) -> np.ndarray:
    """A soft target's float bound, lowered by a margin: the cells it lets through are decided by their
    exact float64 key, so rounding in the bound never drops one."""
    return need - 1e-6 * (np.abs(need) + 1)


def topk_tiles(n_train: int, rows: int, k: int) -> Iterator[tuple[int, int]]:
    """The training-id ranges top_k visits, in order: every cell of the first tile is a candidate, so it
    is small (2k columns), and each next one 4x wider up to `rows`, so the k-th best is soon a tight bound."""
    pos, width = 0, min(rows, max(2 * k, 16))
    while pos < n_train:
        yield pos, min(pos + width, n_train)
        pos += width
        width = min(rows, 4 * width)


def top_k(mask_columns: MaskColumns, out: Outcomes, n_train: int, k: int, threshold: float | None,
          budget_bytes: float = 2**30, n_in: np.ndarray | None = None, halves: Halves | None = None) -> TopK:
    """Stream tiles of influence, keeping only the running top-k of every test example and the pairs
    >= threshold (and, with `halves`, the pairs of each half, from the same GEMMs).

    Selection costs about as much as reading the GEMM's output once, whatever the noise: within a
    tile the training examples are grouped by n_in, and within a group an estimate is increasing in
    the in-sum a, so "reaches the threshold" and "beats the k-th best so far" are one comparison of a
    against a per-test-row bound (exact integers for 0/1 targets); only the few cells that pass are
    looked at again. Tiles are contiguous ranges of training ids (the plan's fast path); they start
    small and grow, so the k-th best is soon a tight bound, and since they come in increasing id
    order a later cell never wins a tie (ties go to the smaller id). Estimates are never formed for
    a whole tile; standard errors and intervals are computed at the end for what was kept.
    Memory: one tile plus the O(n_test k) running state."""
    n_test = out.x.shape[1]
    t = out.runs
    k = min(k, n_train)
    groups = None if halves is None else [np.flatnonzero(halves.half == h) for h in range(2)]
    counts = counts_in(mask_columns, n_train, t, budget_bytes, groups) if n_in is None or halves else None
    n_in = counts[0] if n_in is None else np.asarray(n_in, np.int64)
    defined = (n_in > 0) & (n_in < t)
    rule = _Rule(out, threshold)
    rows, cols = tile_shape(n_train, n_test, budget_bytes, TOPK_BYTES_PER_CELL)
    best = _Best(n_test, k)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if halves is not None:
        # copied once and read by every tile's GEMM, which packs them: huge pages bought nothing there
        # (ImageNet slice: 9.05 s user CPU with, 9.07 s without) and cost 2.2 s of kernel time
        with _written_once():
            half_out = [Outcomes(out.x[g], out.binary) for g in groups]
        half_rule = [_Rule(h, halves.threshold) for h in half_out]
        half_n = counts[1:]
        half_found: list[list] = [[], []]
    # Every tile's GEMM writes into one buffer, and every comparison into one mask: a fresh output per
    # tile is page-faulted in anew (with transparent huge pages, measured on this VM at 10x the GEMM).
    # The tile is computed train-major, (w, cols): a group of equal n_in is then a contiguous block of
    # rows, compared in one pass and scanned by flatnonzero (4x faster than nonzero over a column slice).
    buf = np.empty(min(cols, n_test) * rows, np.float32)
    hbuf = np.empty(len(buf) if halves is not None else 0, np.float32)
    mask_buf = np.empty(len(buf) + 8, bool)  # + 8: _passing reads the mask as 8-byte words
    for start, stop in topk_tiles(n_train, rows, k):
        ids = np.arange(start, stop)  # a contiguous range: the plan's fast path
        keep = np.flatnonzero(defined[ids])
        keep = keep[np.argsort(n_in[ids[keep]], kind="stable")]  # stable: ids ascend within a group
        if not len(keep):
            continue
        idx = ids[keep]
        idx32 = idx.astype(np.int32)  # the pairs' ids are int32 (TopK)
        m = mask_columns(ids)[:, keep].astype(np.float32)  # (runs, w), columns grouped by n_in
        n_tile = n_in[idx]
        cut = np.flatnonzero(np.diff(n_tile)) + 1
        segments = list(zip(np.r_[0, cut], np.r_[cut, len(idx)]))
        # a half's pairs need its in-sums only for the training examples wanted there (those it
        # memorized: few), so each half adds a GEMM over those columns alone, grouped by the half's n_in
        half_cols = [] if halves is None else [_wanted(halves.rows[h][idx], half_n[h][idx], half_out[h].runs)
                                                for h in range(2)]
        m_half = [np.ascontiguousarray(m[np.ix_(groups[h], sel)]) for h, sel in enumerate(half_cols)]
        for c0 in range(0, n_test, cols):
            c = slice(c0, min(c0 + cols, n_test))
            width_c = c.stop - c.start
            # (w, cols): sums over in-runs, exact integers for 0/1 targets
            a = np.matmul(m.T, out.x[:, c], out=buf[:len(idx) * width_c].reshape(len(idx), width_c))
            total = rule.total[c]
            pair_bound, top_bound = rule.pair_need(total), rule.top_need(total, best, c, n_in)
            cands = [_select(a[lo:hi], idx32[lo:hi], int(n_tile[lo]), total, c, rule, pair_bound, top_bound, found,
                             mask_buf) for lo, hi in segments]
            # one merge per tile: the bounds of its later groups are a little looser, but each merge
            # sorts the k kept cells of every test example it touches
            tj, tid, key, ta = (np.concatenate(v) for v in zip(*cands))
            best.merge(tj + c0, tid, key, ta)
            for h, sel in enumerate(half_cols):
                if len(sel):
                    ah = np.matmul(m_half[h].T, half_out[h].x[:, c],
                                   out=hbuf[:len(sel) * width_c].reshape(len(sel), width_c))
                    _half_pairs(ah, idx32[sel], half_n[h][idx[sel]], half_rule[h], c, half_found[h], mask_buf)
    del buf, hbuf, mask_buf
    b = _estimates(mask_columns, out, n_in, best.id, np.arange(n_test)[:, None], best.a)
    with _written_once():
        pairs_train, pairs_test, pairs_a = (np.concatenate(v) if found else np.zeros(0, dt)
                                            for v, dt in zip(zip(*found) if found else ((), (), ()),
                                                             (np.int32, np.int32, np.float32)))
        found.clear()
        pairs_infl = np.empty(len(pairs_a), np.float32)
        pairs_se = np.empty(len(pairs_a), np.float32)
        n_in32 = n_in.astype(np.float32)  # exact: counts below 2^24
        # in chunks of 2**18: millions of pairs at 200 runs; a chunk's temporaries (1 MB) are reused
        for s0 in range(0, len(pairs_a), 2**18):
            s1 = s0 + 2**18
            p = _estimates(mask_columns, out, n_in32, pairs_train[s0:s1], pairs_test[s0:s1], pairs_a[s0:s1],
                           intervals=False)
            pairs_infl[s0:s1], pairs_se[s0:s1] = p.est, p.se
        hp = None
        if halves is not None:
            hp = [tuple(np.concatenate([x[i] for x in f]) if f else np.zeros(0, np.int32) for i in range(2))
                  for f in half_found]
    missing = best.id < 0
    for arr in (b.est, b.se, b.ci_low, b.ci_high):
        arr[missing] = np.nan
    return TopK(train=best.id, infl=b.est, se=b.se, ci_low=b.ci_low, ci_high=b.ci_high,
                pairs_train=pairs_train, pairs_test=pairs_test, pairs_infl=pairs_infl, pairs_se=pairs_se, half_pairs=hp)


def _estimates(mask_columns: MaskColumns, out: Outcomes, n_in: np.ndarray, ids, tests, a,
               intervals: bool = True) -> Difference:
    """Estimates, standard errors and intervals of kept cells (train ids, test ids, in-sums)."""
    n = n_in[np.maximum(ids, 0)].astype(np.float32, copy=False)
    a = np.asarray(a, np.float32)
    total = out.total.astype(np.float32)[tests]
    sq_in = sq_out = None
    if not out.binary:
        sq_in = _square_sums(mask_columns, out, ids, tests)
        sq_out = out.total_sq.astype(np.float32)[tests] - sq_in
    return difference(a, n, total - a, out.runs - n, sq_in, sq_out, out.binary, dtype=np.float32,
                      intervals=intervals)


def _passing(a: np.ndarray, need: np.ndarray, exact: bool, mask_buf: np.ndarray, values: bool = True):
    """(train position, test row, value or None) of the cells of `a` (w, cols; contiguous) >= need (per
    test row).

    The mask is scanned 8 cells at a time first: flatnonzero over a sparse mask costs a mispredicted
    branch a hit (~20 ns), over the 8-byte words that hold a hit and then over those words' bytes it is
    dense and branch-free (1.3-1.6x faster at 2-5% of cells passing, the noise of a 200-run campaign)."""
    n = a.size
    pad = -n % 8
    mask = mask_buf[:n + pad]
    np.greater_equal(a, need[None, :].astype(np.float32) if exact else need[None, :],
                     out=mask[:n].reshape(a.shape))
    mask[n:] = False
    words = mask.view(np.uint64)
    hit_words = np.flatnonzero(words != 0)
    if len(hit_words) > len(words) // 2:  # dense: flatnonzero is branch-free already
        flat = np.flatnonzero(mask)
    else:
        within = np.flatnonzero(words[hit_words].view(bool))
        flat = hit_words[within >> 3] * 8 + (within & 7)
    vals = a.ravel()[flat] if values else None  # float32: compared with float64 bounds exactly
    i = flat // a.shape[1]
    flat -= i * a.shape[1]  # now the test row
    return i, flat, vals


def _select(a, ids, n, total, c, rule: _Rule, pair_bound, top_bound, found, mask_buf):
    """The cells of one group of training examples (equal n_in = n; `a` is (len(ids), cols)) that reach
    the threshold (appended to `found`) or may enter the running top k (returned: test row, train id,
    order key, in-sum)."""
    pair_need, top_need = pair_bound(n), top_bound(n)
    i, j, vals = _passing(a, np.minimum(pair_need, top_need), rule.exact, mask_buf)
    cand = ids[i]
    is_pair = vals >= pair_need[j]
    if is_pair.any():
        found.append((cand[is_pair], (j[is_pair] + c.start).astype(np.int32), vals[is_pair]))
    top = vals >= top_need[j]
    tj, ta = j[top], vals[top]
    return tj, cand[top], rule.key(ta, n, total[tj]), ta


def _wanted(wanted: np.ndarray, n_half: np.ndarray, runs: int) -> np.ndarray:
    """Positions of the wanted, defined columns of a tile, grouped by n_in (ids ascending within)."""
    sel = np.flatnonzero(wanted & (n_half > 0) & (n_half < runs))
    return sel[np.argsort(n_half[sel], kind="stable")]


def _half_pairs(a, ids, n_half, rule: _Rule, c, found, mask_buf) -> None:
    """Pairs of one half that reach the threshold: `a` (len(ids), cols) holds the half's in-sums of
    training examples `ids`, grouped by their n_in in this half (`n_half`)."""
    if rule.threshold is None:
        return
    total = rule.total[c]
    pair_bound = rule.pair_need(total)
    cut = np.flatnonzero(np.diff(n_half)) + 1
    for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(ids)]):
        n = int(n_half[lo])
        i, j, vals = _passing(a[lo:hi], pair_bound(n), rule.exact, mask_buf, values=not rule.exact)
        if not rule.exact and len(j):
            ok = rule.key(vals, n, total[j]) >= rule.threshold
            i, j = i[ok], j[ok]
        found.append((ids[lo + i], (j + c.start).astype(np.int32)))


def _square_sums(mask_columns: MaskColumns, out: Outcomes, ids: np.ndarray, tests: np.ndarray) -> np.ndarray:
    """sum over in-runs of x^2 for the kept (train id, test) cells of a soft target (one dot product of
    length `runs` per cell, in chunks): cheaper than a second GEMM over every tile."""
    ids_b, tests_b = np.broadcast_arrays(ids, tests)
    flat_i, flat_j = ids_b.ravel(), tests_b.ravel()
    res = np.zeros(flat_i.shape, np.float32)
    step = max(1, 2**22 // max(out.runs, 1))
    for s in range(0, len(flat_i), step):
        i, j = flat_i[s:s + step], flat_j[s:s + step]
        m = mask_columns(np.maximum(i, 0))  # (runs, chunk) bool
        x = out.x[:, j]
        res[s:s + step] = np.where(m, x * x, 0).sum(axis=0, dtype=np.float32)
    return res.reshape(ids_b.shape)
