"""Training-dynamics proxies of memorization, and how well they agree with a campaign's estimate.

Pure numpy: no Ray, no I/O. Three per-example proxies come from one training run, measured on the
batches the run trains on (workers/training.py, workers/ensemble.py record them):

- loss_sum     the cumulative training loss: the sum over epochs of the example's loss in its batch
               (Ravikumar et al., ICML 2025);
- learn_epoch  the learning time: the first epoch (0-based) from which the example is correctly
               classified in its batch through the last epoch; `epochs` if it is wrong in the last one;
- forgets      forgetting events (Toneva et al., ICLR 2019): correct -> incorrect transitions between
               consecutive epochs. As in Toneva et al., an example that was never correct counts as
               forgotten more often than any other: its proxy value is epochs (one more than the most
               transitions possible, epochs // 2).

All three grow with how hard the example is to fit, as memorization does, so agreement is measured
with the proxy as is (no sign flips). A campaign gives, per example, each proxy averaged over the runs
that trained on it; `Dynamics` keeps those averages as additive sums, also over the first 1, 2, 4, ...
runs of the campaign, so that agreement can be shown against how many runs are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROXIES = ("loss_sum", "learn_epoch", "forgets")
STATISTICS = ("spearman", "pearson", "cosine", "top1", "top5")


# --------------------------------------------------------------------------------------------------
#  One run: a trajectory of per-epoch correctness
# --------------------------------------------------------------------------------------------------

def learning_time(correct: np.ndarray) -> np.ndarray:
    """First epoch from which each example stays correct through the end; epochs if wrong at the end.
    correct: (epochs, n) bool, the example's correctness in its batch at each epoch."""
    correct = np.asarray(correct, bool)
    epochs = correct.shape[0]
    wrong = ~correct
    # last epoch at which the example was wrong, + 1 (0 if never wrong)
    last_wrong = np.where(wrong.any(0), epochs - np.argmax(wrong[::-1], axis=0), 0)
    return last_wrong.astype(np.int64)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Correct -> incorrect transitions between consecutive epochs. correct: (epochs, n) bool."""
    correct = np.asarray(correct, bool)
    return (correct[:-1] & ~correct[1:]).sum(0).astype(np.int64)


def forgetting_proxy(forgets: np.ndarray, learn_epoch: np.ndarray, epochs: int) -> np.ndarray:
    """Forgetting events as a proxy: examples never correct (no forgetting and wrong at the end) get
    `epochs`, more than any example that was ever learned can have (Toneva et al.'s "infinite")."""
    forgets = np.asarray(forgets, np.float64)
    never = (forgets == 0) & (np.asarray(learn_epoch) >= epochs)
    return np.where(never, float(epochs), forgets)


# --------------------------------------------------------------------------------------------------
#  Agreement of a proxy with memorization
# --------------------------------------------------------------------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks), as scipy.stats.rankdata(method='average')."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends - 1) / 2.0
    out = np.empty(len(x))
    out[order] = avg[group]
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(a), _ranks(b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _top_weights(x: np.ndarray, k: int) -> np.ndarray:
    """Membership of each example in the top k of x, ties at the cut shared: the examples above the k-th
    value count 1, those equal to it split the remaining places evenly (random tie-breaking, in expectation)."""
    cut = np.partition(x, len(x) - k)[len(x) - k]
    above, tied = x > cut, x == cut
    return above + tied * ((k - above.sum()) / tied.sum())


def top_overlap(a: np.ndarray, b: np.ndarray, share: float) -> float:
    """|top(a) ∩ top(b)| / k with k = max(1, round(share * n)): the share of the k highest of b (the
    memorization) that are also among the k highest of a (the proxy). Ties at the cut are broken at random,
    in expectation (a proxy with few distinct values, such as forgetting events, is not ranked by position):
    a constant proxy overlaps by share, as chance does."""
    k = max(1, int(round(share * len(a))))
    return float((_top_weights(a, k) * _top_weights(b, k)).sum() / k)


def statistics(proxy: np.ndarray, mem: np.ndarray) -> dict[str, float]:
    """Every agreement statistic of STATISTICS between a proxy and memorization (same examples)."""
    return {"spearman": spearman(proxy, mem), "pearson": pearson(proxy, mem), "cosine": cosine(proxy, mem),
            "top1": top_overlap(proxy, mem, 0.01), "top5": top_overlap(proxy, mem, 0.05)}


@dataclass
class Agreement:
    proxy: str
    runs: int  # runs of the campaign whose dynamics are averaged (the first `runs`)
    examples: int  # examples with both a proxy value and a memorization estimate
    mean_averaged: float  # runs averaged per example, on average
    value: dict[str, float]
    ci_low: dict[str, float]
    ci_high: dict[str, float]


def agreement(proxy: np.ndarray, mem: np.ndarray, *, name: str = "", runs: int = 0, averaged: float = float("nan"),
              bootstrap: int = 200, seed: int = 0) -> Agreement:
    """Agreement of `proxy` with `mem` over the examples where both are finite, with percentile bootstrap
    95% intervals from `bootstrap` resamples of the examples (seeded: the same inputs give the same
    intervals). The bootstrap treats examples as independent draws; their errors are not quite (every
    example shares the runs), so the interval is the sampling error over examples, not over runs."""
    ok = np.isfinite(proxy) & np.isfinite(mem)
    p, m = np.asarray(proxy, np.float64)[ok], np.asarray(mem, np.float64)[ok]
    nan = {s: float("nan") for s in STATISTICS}
    if len(p) < 3:
        return Agreement(name, runs, len(p), averaged, dict(nan), dict(nan), dict(nan))
    value = statistics(p, m)
    low, high = dict(nan), dict(nan)
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = {s: [] for s in STATISTICS}
        for _ in range(bootstrap):
            i = rng.integers(0, len(p), len(p))
            for s, v in statistics(p[i], m[i]).items():
                draws[s].append(v)
        for s, v in draws.items():
            v = np.asarray(v)
            v = v[np.isfinite(v)]
            if len(v):
                low[s], high[s] = float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))
    return Agreement(name, runs, len(p), averaged, value, low, high)


# --------------------------------------------------------------------------------------------------
#  A campaign's dynamics: additive sums, folded run by run in any order
# --------------------------------------------------------------------------------------------------

def levels(runs: int) -> list[int]:
    """Numbers of first runs the agreement curve is drawn at: 1, 2, 4, ... below `runs`, then `runs`."""
    out = [1 << j for j in range(max(1, runs).bit_length()) if (1 << j) < runs]
    return out + [runs] if runs else []


@dataclass
class Dynamics:
    """Sums of each proxy per example over the runs that trained on it and recorded dynamics: over all of
    them (`total`), and over those among the first levels[j] runs of the main ratio (by position), for
    the agreement curve. Memory: n x (levels + 1) x (3 float32 + 1 uint16) bytes; at 1.28 M examples and
    4,000 runs (13 levels), 250 MB.

    `first` holds the proxies of the run at position 0 (the "single run" estimate) through levels[0] = 1.
    Order-free: a run at position q adds to every level above q, whichever order runs arrive in."""

    levels: list[int]
    sums: np.ndarray  # (L + 1, 3, n) float32: levels, then all runs
    counts: np.ndarray  # (L + 1, n) uint16
    epochs: int  # epochs of the recipe (for the forgetting proxy of never-learned examples); 0 = unknown
    folded: int = 0  # runs folded in

    @classmethod
    def zeros(cls, n: int, runs: int) -> "Dynamics":
        lv = levels(runs)
        return cls(lv, np.zeros((len(lv) + 1, len(PROXIES), n), np.float32),
                   np.zeros((len(lv) + 1, n), np.uint16), 0, 0)

    def add(self, position: int, in_subset: np.ndarray, values: dict[str, np.ndarray], epochs: int) -> None:
        """Fold one run at main-ratio `position`: values[proxy] is (n,) over all training examples,
        read only where in_subset."""
        self.epochs = max(self.epochs, int(epochs))
        self.folded += 1
        idx = np.flatnonzero(in_subset)
        fp = forgetting_proxy(values["forgets"][idx], values["learn_epoch"][idx], epochs)
        v = np.stack([values["loss_sum"][idx], values["learn_epoch"][idx], fp]).astype(np.float32)
        rows = [j for j, lv in enumerate(self.levels) if position < lv] + [len(self.levels)]
        for j in rows:
            self.sums[j][:, idx] += v
            self.counts[j, idx] += 1

    def mean(self, level: int | None = None) -> np.ndarray:
        """(3, n) per-example mean of each proxy over all runs (level None) or over the first levels[level]
        runs; NaN where no such run trained on the example."""
        j = len(self.levels) if level is None else level
        c = self.counts[j].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(c > 0, self.sums[j] / c, np.nan)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"levels": np.asarray(self.levels, np.int64), "sums": self.sums, "counts": self.counts,
                "epochs": np.asarray(self.epochs), "folded": np.asarray(self.folded)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "Dynamics":
        return cls(a["levels"].tolist(), a["sums"], a["counts"], int(a["epochs"]), int(a["folded"]))

    def regrown(self, runs: int) -> "Dynamics":
        """The same sums for a plan that grew to `runs` runs: the old levels keep their sums; the old
        'all runs' row becomes the new levels' sums up to the old count (runs beyond it arrive later)."""
        new = Dynamics.zeros(self.sums.shape[2], runs)
        new.epochs, new.folded = self.epochs, self.folded
        for j, lv in enumerate(new.levels):
            src = self.levels.index(lv) if lv in self.levels else len(self.levels)
            new.sums[j], new.counts[j] = self.sums[src], self.counts[src]
        new.sums[-1], new.counts[-1] = self.sums[-1], self.counts[-1]
        return new


def curve(dyn: Dynamics, mem: np.ndarray, bootstrap: int = 200) -> list[Agreement]:
    """Agreement of each proxy with `mem` over the first 1, 2, 4, ... runs (the levels below the number of
    runs folded) and over all folded runs (the last rows). Bootstrap intervals for the first run and for
    all runs only: each costs `bootstrap` x 5 statistics (sorts of n), minutes at ImageNet scale."""
    out = []
    rows = [j for j, lv in enumerate(dyn.levels) if lv < dyn.folded] + [len(dyn.levels)]
    ends = {rows[0], rows[-1]}
    for j in rows if dyn.folded else []:
        means = dyn.mean(j)
        c = dyn.counts[j]
        runs = dyn.levels[j] if j < len(dyn.levels) else dyn.folded
        averaged = float(c[c > 0].mean()) if (c > 0).any() else float("nan")
        for p, name in enumerate(PROXIES):
            out.append(agreement(means[p], mem, name=name, runs=int(runs), averaged=averaged,
                                 bootstrap=bootstrap if j in ends else 0, seed=j * len(PROXIES) + p))
    return out
