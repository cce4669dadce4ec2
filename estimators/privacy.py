"""Per-example membership-inference risk from a campaign's own runs (the likelihood-ratio attack, LiRA:
Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022).

A campaign is a set of shadow models with known subsets. For training example i and every run r the
per-model statistic phi_r(i) is the logit-scaled confidence log(p / (1 - p)) of the correct class (from
the logits when they are stored, else from the stored probability) or else the stored margin. The runs
that trained on i and those that did not give two Gaussian fits, N(mu_in, sd_in) and N(mu_out, sd_out),
kept as additive sufficient statistics (counts, sums, sums of squares over the in and the out runs), so
they fold like every other estimate and a run's contribution can be taken out exactly.

From the fits:
- risk (the in/out separation): the AUC of the two fitted normals, Phi((mu_in - mu_out) /
  sqrt(sd_in^2 + sd_out^2)), with a delta-method standard error. 0.5 = the example's membership cannot
  be told from the models' outputs, 1 = it always can.
- online score of a target model's statistic x: log N(x; mu_in, sd_in) - log N(x; mu_out, sd_out);
  offline score (out fit only): (x - mu_out) / sd_out, one-sided.
- global variance: with few runs per example the per-example variances are noisy; the paper then uses
  one variance per side shared by all examples (its "fixed variance" variant).

Pure numpy: no Ray, no storage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.special import ndtr

# Below this many runs on the smaller side (median over examples) the per-example variances are too
# noisy and "auto" uses the global-variance fit: Carlini et al. find the fixed variance better below
# about 64 shadow models, i.e. about 20-30 per side at the usual in/out proportions.
GLOBAL_VARIANCE_BELOW = 24
# float16 has 11 significant bits: a stored probability of 1 is anything above 1 - 2**-12
PROB_EPS = 2.0**-12


# --- the per-model statistic ------------------------------------------------------------------------

def statistic_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of the correct class, computed stably as z_y - logsumexp_{k != y} z_k."""
    z = np.asarray(logits, np.float64)
    rows = np.arange(len(z))
    zy = z[rows, labels]
    others = z.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1)
    return zy - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def statistic_from_probability(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to what float16 can tell from 0 and 1."""
    p = np.clip(np.asarray(p, np.float64), PROB_EPS, 1 - PROB_EPS)
    return np.log(p) - np.log1p(-p)


STATISTICS = ("logits", "probability", "margin")  # in order of preference


def choose_statistic(stored: list[str] | tuple[str, ...]) -> str | None:
    """Which stored value the risk statistic comes from; None when the shards keep none of them."""
    return next((s for s in STATISTICS if s in stored), None)


def statistic(values: dict[str, np.ndarray], labels: np.ndarray, source: str) -> np.ndarray | None:
    """The per-example statistic from one run's stored values (a shard's train_values); None if absent."""
    if source not in values:
        return None
    if source == "logits":
        return statistic_from_logits(values["logits"], labels)
    if source == "probability":
        return statistic_from_probability(values["probability"])
    return np.asarray(values["margin"], np.float64)


# --- additive sufficient statistics ------------------------------------------------------------------

@dataclass
class ScoreSums:
    """Per training example: count, sum and sum of squares of the statistic over in and over out runs."""

    count_in: np.ndarray  # (n,) float64 (counts, exact below 2**53)
    count_out: np.ndarray
    sum_in: np.ndarray
    sum_out: np.ndarray
    sq_in: np.ndarray
    sq_out: np.ndarray

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "ScoreSums":
        return cls(**{f.name: np.asarray(arrays[f"{prefix}{f.name}"], np.float64) for f in fields(cls)})

    def copy(self) -> "ScoreSums":
        return ScoreSums(**{f.name: getattr(self, f.name).copy() for f in fields(self)})


def zeros(n: int) -> ScoreSums:
    return ScoreSums(*(np.zeros(n) for _ in range(6)))


def fold_scores(sums: ScoreSums, mask: np.ndarray, scores: np.ndarray, sign: float = 1.0) -> ScoreSums:
    """Add (sign=1) or take out (sign=-1) b runs, in place: mask (b, n) bool, scores (b, n)."""
    mask = np.atleast_2d(np.asarray(mask, bool))
    x = np.atleast_2d(np.asarray(scores, np.float64))
    if mask.shape != x.shape or mask.shape[1] != len(sums.count_in):
        raise ValueError(f"fold_scores: expected mask and scores of shape (runs, {len(sums.count_in)}), found "
                         f"{mask.shape} and {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("fold_scores: the statistic has NaN or infinite values")
    # products with the 0/1 mask instead of np.where, "out" as the whole minus "in", and one scratch
    # block reused: the same numbers bit for bit (x * 1 = x, x * 0 = 0, x - x = 0 on a finite statistic;
    # each sum adds the same values in the same order), and less CPU (docs/performance.md, issue 17)
    m = mask.astype(np.float64)
    count_in = mask.sum(axis=0)
    sums.count_in += sign * count_in
    sums.count_out += sign * (mask.shape[0] - count_in)
    buf = np.multiply(x, m)
    sums.sum_in += sign * buf.sum(axis=0)
    np.subtract(x, buf, out=buf)
    sums.sum_out += sign * buf.sum(axis=0)
    sq = np.multiply(x, x)
    np.multiply(sq, m, out=buf)
    sums.sq_in += sign * buf.sum(axis=0)
    np.subtract(sq, buf, out=sq)
    sums.sq_out += sign * sq.sum(axis=0)
    return sums


def without_run(sums: ScoreSums, mask: np.ndarray, scores: np.ndarray) -> ScoreSums:
    """The statistics with one folded run taken out (a new object): exact, as the sums are additive."""
    return fold_scores(sums.copy(), mask, scores, sign=-1.0)


# --- Gaussian fits -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fits:
    mu_in: np.ndarray
    mu_out: np.ndarray
    sd_in: np.ndarray  # per example, or the global value broadcast to every example
    sd_out: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    global_variance: bool


def _mean_var(count, total, sq):
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        ss = np.maximum(sq - count * np.where(count > 0, mean, 0.0) ** 2, 0.0)  # float rounding can go below 0
        var = np.where(count > 1, ss / np.maximum(count - 1, 1), np.nan)
    return mean, var, ss


def fit(sums: ScoreSums, global_variance: bool | str = "auto") -> Fits:
    """Gaussian fits of the in and the out statistic of every example.

    global_variance: True uses one pooled variance per side (sum of squared deviations over all examples
    divided by their degrees of freedom); False the per-example sample variances; "auto" chooses True
    when the median count on the smaller side is below GLOBAL_VARIANCE_BELOW."""
    mu_in, var_in, ss_in = _mean_var(sums.count_in, sums.sum_in, sums.sq_in)
    mu_out, var_out, ss_out = _mean_var(sums.count_out, sums.sum_out, sums.sq_out)
    if global_variance == "auto":
        smaller = np.minimum(sums.count_in, sums.count_out)
        global_variance = bool(len(smaller) and np.median(smaller) < GLOBAL_VARIANCE_BELOW)
    if global_variance:
        def pooled(ss, count):
            dof = np.maximum(count - 1, 0).sum()
            return np.full(len(count), ss[count > 1].sum() / dof if dof > 0 else np.nan)

        var_in, var_out = pooled(ss_in, sums.count_in), pooled(ss_out, sums.count_out)
    return Fits(mu_in=mu_in, mu_out=mu_out, sd_in=np.sqrt(var_in), sd_out=np.sqrt(var_out), n_in=sums.count_in,
                n_out=sums.count_out, global_variance=bool(global_variance))


@dataclass(frozen=True)
class Risk:
    auc: np.ndarray  # AUC of the two fitted normals: P(in statistic > out statistic)
    se: np.ndarray


def risk(f: Fits) -> Risk:
    """AUC = Phi(delta), delta = (mu_in - mu_out) / s, s^2 = sd_in^2 + sd_out^2, and its delta-method
    standard error phi(delta) * se(delta), where

        var(delta) = (sd_in^2 / n_in + sd_out^2 / n_out) / s^2                    (the means)
                   + d^2 / (4 s^6) * (2 sd_in^4 / (n_in - 1) + 2 sd_out^4 / (n_out - 1))   (the variances)

    with d = mu_in - mu_out. With the global variance the variances come from every example and
    their term is dropped. Zero variance on both sides leaves the AUC undefined (NaN)."""
    d = f.mu_in - f.mu_out
    v_in, v_out = f.sd_in**2, f.sd_out**2
    s2 = v_in + v_out
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(s2 > 0, d / np.sqrt(s2), np.nan)
        var = (v_in / f.n_in + v_out / f.n_out) / s2
        if not f.global_variance:
            var = var + d**2 / (4 * s2**3) * (2 * v_in**2 / (f.n_in - 1) + 2 * v_out**2 / (f.n_out - 1))
    auc = ndtr(delta)
    se = np.exp(-0.5 * delta**2) / np.sqrt(2 * np.pi) * np.sqrt(var)
    return Risk(auc=auc, se=se)


# --- scoring a target model ----------------------------------------------------------------------------

def _log_normal(x, mu, sd):
    with np.errstate(invalid="ignore", divide="ignore"):
        return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)


def online_score(f: Fits, x: np.ndarray) -> np.ndarray:
    """Log likelihood ratio of membership: log N(x; in fit) - log N(x; out fit). Higher = member."""
    return _log_normal(x, f.mu_in, f.sd_in) - _log_normal(x, f.mu_out, f.sd_out)


def offline_score(f: Fits, x: np.ndarray) -> np.ndarray:
    """(x - mu_out) / sd_out: how far above the non-members' fit the target's statistic is; Phi of it is
    the one-sided test's confidence. Needs no model that trained on the example."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x - f.mu_out) / f.sd_out


# --- evaluation of an attack with known membership --------------------------------------------------------

def _labelled(scores, members):
    """Scores as float64 with NaN (an example whose fit is undefined) ranked lowest, never called a
    member, so that every attack is judged on the same examples; and the member / non-member counts."""
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    m = np.asarray(members, bool)
    return s, m, int(m.sum()), int((~m).sum())


def roc_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a member > score of a non-member), ties counting half
    (the Mann-Whitney statistic, from average ranks)."""
    from scipy.stats import rankdata

    s, m, n1, n0 = _labelled(scores, members)
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[m].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> float:
    """The largest true-positive rate of a threshold rule `score > c` whose false-positive rate is at
    most `fpr` (thresholds between distinct scores only: tied scores are accepted or rejected together)."""
    s, m, n1, n0 = _labelled(scores, members)
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, m = s[order], m[order]
    tp, fp = np.cumsum(m), np.cumsum(~m)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold can only fall after the last of equal scores
    tp, fp = np.r_[0, tp[last]], np.r_[0, fp[last]]
    allowed = fp <= fpr * n0
    return float(tp[allowed].max() / n1)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation over the pairs where both are finite (NaN with fewer than 3)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)
