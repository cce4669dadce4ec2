"""Out-of-subset predictions of each training example, and the triage of memorized examples.

Pure numpy: no Ray, no I/O. The runs that did not train on example i predict a label for it; their
distribution tells why i is memorized (the models that saw it get it right, those that did not, not):

- "mislabeled"  the out-of-subset models agree on another class: the mode is not the label and holds at
                least `agree` of the predictions;
- "ambiguous"   they split between the label and another class: the label and the best other class each
                hold at least `split` of them, and all the other classes together at most `split`;
- "rare"        anything else: no class dominates (a rare sub-population, an atypical example).

The rule is applied in that order, to examples with memorization >= [estimates] triage_mem only.

Counting the predictions. A dense table of counts per (example, class) is exact and simple, and at
ImageNet scale (1.28 M x 1,000 classes) it is 2.56 GB even as uint16. `OutOfSubset` therefore keeps the
dense table only when it fits a byte budget and otherwise a Misra-Gries summary of `slots` (class,
count) pairs per example, folded one run at a time (vectorised over examples). Its guarantee, for every
example i with N_i out-of-subset predictions folded and every class c with true count f:

    f - (N_i - sum of the kept counts of i) / (slots + 1)  <=  kept count of c  <=  f

so any class holding more than N_i / (slots + 1) of the predictions is kept, and the mode share, the
label share and the best other share (what the triage reads) are exact up to that bound. Entropy is
computed from the kept counts plus one lumped "other" bin for the rest: exact in dense mode, a lower
bound of the true entropy in summary mode. Dense counts are order-free; a summary's kept counts depend
on the order runs are folded in (the driver's arrival order, `longtail estimate`'s run order), always
within the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CATEGORIES = ("mislabeled", "ambiguous", "rare")
NOT_MEMORIZED = ""


class OutOfSubset:
    """Counts of out-of-subset predicted labels per training example, dense or as a Misra-Gries summary."""

    def __init__(self, n: int, classes: int, budget_bytes: float, slots: int = 8):
        self.n, self.classes = n, classes
        self.dense = n * classes * 2 <= budget_bytes or classes <= slots
        self.slots = classes if self.dense else slots
        self.total = np.zeros(n, np.uint32)  # out-of-subset predictions folded per example
        if self.dense:
            self.counts = np.zeros((n, classes), np.uint16)
            self.labels = None
        else:
            self.counts = np.zeros((n, slots), np.uint16)
            self.labels = np.full((n, slots), -1, np.int32)

    def nbytes(self) -> int:
        return self.total.nbytes + self.counts.nbytes + (0 if self.labels is None else self.labels.nbytes)

    def add(self, out_of_subset: np.ndarray, pred: np.ndarray) -> None:
        """Fold one run: its predicted label `pred` (n,) of every example where out_of_subset (n,) is set."""
        idx = np.flatnonzero(out_of_subset)
        p = np.asarray(pred)[idx].astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.classes):
            raise ValueError(f"predicted labels must lie in [0, {self.classes}), found {p.min()}..{p.max()}")
        self.total[idx] += 1
        if self.dense:
            self.counts[idx, p] += 1  # one prediction per example per run: no repeated index
            return
        lab, cnt = self.labels[idx], self.counts[idx]
        hit = lab == p[:, None]
        has = hit.any(1)
        r = np.flatnonzero(has)
        cnt[r, hit[r].argmax(1)] += 1
        free = cnt == 0
        r = np.flatnonzero(~has & free.any(1))
        s = free[r].argmax(1)
        lab[r, s], cnt[r, s] = p[r], 1
        r = np.flatnonzero(~has & ~free.any(1))  # no slot: every counter of the example loses one
        cnt[r] -= 1
        self.labels[idx], self.counts[idx] = lab, cnt

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, counts), both (n, slots): in dense mode labels are 0..classes-1 for every row."""
        if self.dense:
            return np.broadcast_to(np.arange(self.classes), self.counts.shape), self.counts
        return self.labels, self.counts

    def bound(self) -> np.ndarray:
        """(n,) the most any kept count can be below its true count (0 in dense mode)."""
        if self.dense:
            return np.zeros(self.n)
        return (self.total - self.counts.sum(1, dtype=np.int64)) / (self.slots + 1)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"total": self.total, "counts": self.counts, "classes": np.asarray(self.classes)}
        if self.labels is not None:
            out["labels"] = self.labels
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "OutOfSubset":
        self = cls.__new__(cls)
        self.total, self.counts, self.classes = a["total"], a["counts"], int(a["classes"])
        self.n = len(self.total)
        self.labels = a.get("labels")
        self.dense = self.labels is None
        self.slots = self.counts.shape[1]
        return self

    def pred_probs(self) -> np.ndarray:
        """(n, classes) float32, rows summing to 1: the out-of-subset predicted-label frequencies, the
        out-of-sample `pred_probs` cleanlab's find_label_issues takes. In summary mode the mass not kept
        is spread evenly over the classes; an example with no out-of-subset run gets the uniform row."""
        out = np.zeros((self.n, self.classes), np.float32)
        lab, cnt = self.table()
        rows = np.repeat(np.arange(self.n), lab.shape[1])
        keep = lab.ravel() >= 0
        np.add.at(out, (rows[keep], lab.ravel()[keep]), cnt.ravel()[keep].astype(np.float32))
        rest = self.total.astype(np.float32) - out.sum(1)
        out += (rest / self.classes)[:, None]
        empty = self.total == 0
        out[empty] = 1.0
        out /= out.sum(1, keepdims=True)
        return out


@dataclass
class Distribution:
    """Per example: the out-of-subset prediction distribution summarised."""

    total: np.ndarray  # (n,) out-of-subset predictions
    mode: np.ndarray  # (n,) most predicted class (-1 with no prediction)
    mode_share: np.ndarray  # (n,) its share of the predictions (NaN with none)
    label_share: np.ndarray  # (n,) share predicting the example's label
    other: np.ndarray  # (n,) most predicted class other than the label (-1 if none)
    other_share: np.ndarray  # (n,) its share: the "likely mislabeled" score
    entropy: np.ndarray  # (n,) entropy in bits (exact in dense mode, a lower bound otherwise)
    bound: np.ndarray  # (n,) the most any share can be below the true one (0 when exact)


def distribution(labels: np.ndarray, counts: np.ndarray, total: np.ndarray, y: np.ndarray,
                 bound: np.ndarray | None = None) -> Distribution:
    """Summarise (labels, counts) (n, slots) of out-of-subset predictions, total (n,) of them, for
    examples labelled y (n,). Slots with label -1 or count 0 are empty."""
    labels = np.asarray(labels)
    counts = np.where(labels >= 0, np.asarray(counts, np.float64), 0.0)
    total = np.asarray(total, np.float64)
    n = len(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / total[:, None]
    best = counts.argmax(1)
    has = counts.max(1) > 0
    mode = np.where(has, labels[np.arange(n), best], -1)
    is_label = labels == np.asarray(y)[:, None]
    label_share = np.where(total > 0, np.where(is_label, share, 0).sum(1), np.nan)
    others = np.where(is_label, -1.0, counts)
    ob = others.argmax(1)
    other_has = others.max(1) > 0
    other = np.where(other_has, labels[np.arange(n), ob], -1)
    other_share = np.where(total > 0, np.where(other_has, share[np.arange(n), ob], 0.0), np.nan)
    rest = np.clip(total - counts.sum(1), 0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.concatenate([counts, rest[:, None]], 1) / total[:, None]
        h = -np.where(q > 0, q * np.log2(np.where(q > 0, q, 1)), 0).sum(1)
    entropy = np.where(total > 0, h, np.nan)
    mode_share = np.where(total > 0, np.where(has, share[np.arange(n), best], 0.0), np.nan)
    b = np.zeros(n) if bound is None else np.asarray(bound, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(total > 0, b / total, np.nan)
    return Distribution(total.astype(np.int64), mode.astype(np.int64), mode_share, label_share,
                        other.astype(np.int64), other_share, entropy, b)


def triage(d: Distribution, y: np.ndarray, mem: np.ndarray, *, mem_threshold: float, agree: float,
           split: float) -> np.ndarray:
    """The category of CATEGORIES of every example with mem >= mem_threshold ("" for the others and for
    examples without out-of-subset predictions), by the rule in this module's docstring."""
    out = np.full(len(mem), NOT_MEMORIZED, dtype=object)
    memorized = np.isfinite(mem) & (mem >= mem_threshold) & (d.total > 0)
    mislabeled = (d.mode != np.asarray(y)) & (d.mode >= 0) & (d.mode_share >= agree)
    rest = 1 - d.label_share - d.other_share
    ambiguous = ~mislabeled & (d.label_share >= split) & (d.other_share >= split) & (rest <= split + 1e-12)
    out[memorized & mislabeled] = "mislabeled"
    out[memorized & ambiguous] = "ambiguous"
    out[memorized & ~mislabeled & ~ambiguous] = "rare"
    return out.astype(str)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the set `positive` (bool), ties counted half (the
    Mann-Whitney U statistic / (positives x negatives)); NaN without positives or negatives."""
    from estimators.proxies import _ranks

    score = np.asarray(score, np.float64)
    positive = np.asarray(positive, bool)
    npos, nneg = int(positive.sum()), int((~positive).sum())
    if not npos or not nneg:
        return float("nan")
    r = _ranks(score)  # 0-based: U = sum of the positives' ranks - npos (npos - 1) / 2
    return float((r[positive].sum() - npos * (npos - 1) / 2) / (npos * nneg))
