"""Exact decisions on estimates of a 0/1 target, made on the integer counts behind them.

A memorization or influence estimate of correctness is a difference of two ratios of counts,
a / n - (T - a) / (t - n) = (a t - n T) / (n (t - n)), with a = correct "in" runs, n = "in" runs,
T = correct runs in all, t = runs. Deciding `estimate >= 0.15` on a float of it puts every pair whose
estimate is exactly 3/20 on whichever side the rounding of that float falls (float32 and float64 and
the order of the operations disagree), so every output that selects by a threshold uses `at_least`:
the threshold is read as the decimal the user wrote (0.15 is 3/20) and compared in integers.

`order_key` is the estimate as a float64 computed with one correctly rounded division of exact
integers: equal estimates get equal keys, and distinct ones distinct keys ordered as the estimates
while 1 / (n (t - n))^2 > 2^-52, i.e. up to about 16,000 runs (the paper uses 4,000); beyond that,
estimates closer than about 1e-16 are ranked as ties (by the smaller training id).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

# (a t - n T) q and p n (t - n) must stay exact in int64
_INT64_SAFE = 2**62


def fraction(threshold: float) -> Fraction:
    """The threshold as the decimal it was written as: 0.15 is 3/20, not the binary float nearest it."""
    return Fraction(repr(float(threshold)))


def exact_ok(runs: int, threshold: float) -> bool:
    """Whether `at_least` can decide in int64 for this many runs and this threshold."""
    f = fraction(threshold)
    return runs * runs * (abs(f.numerator) + f.denominator) < _INT64_SAFE


def at_least(a, n, total, runs: int, threshold: float) -> np.ndarray:
    """a / n - (total - a) / (runs - n) >= threshold, exactly; False where n == 0 or n == runs.

    a, n, total: integer counts (any numeric dtype holding integers; they broadcast)."""
    f = fraction(threshold)
    p, q = f.numerator, f.denominator
    a = np.asarray(a).astype(np.int64)
    n = np.asarray(n).astype(np.int64)
    total = np.asarray(total).astype(np.int64)
    t = int(runs)
    if not exact_ok(t, threshold):  # Python integers: slow, but never wrong
        a, n, total = (x.astype(object) for x in (a, n, total))
    # multiply the inequality by q n (t - n) > 0
    out = (a * t - n * total) * q >= p * n * (t - n)
    return np.asarray(out & (n > 0) & (n < t), dtype=bool)


def need_at_least(n, total, runs: int, threshold: float) -> np.ndarray:
    """The smallest integer a with a / n - (total - a) / (runs - n) >= threshold (for 0 < n < runs):
    ceil(n (p (t - n) + q T) / (t q)). int64, exact while `exact_ok`."""
    f = fraction(threshold)
    p, q = f.numerator, f.denominator
    n = np.asarray(n, dtype=np.int64)
    total = np.asarray(total, dtype=np.int64)
    t = int(runs)
    r = n * (p * (t - n) + q * total)
    return -((-r) // (t * q))


def order_key(a, n, total, runs: int) -> np.ndarray:
    """The estimate (a t - n T) / (n (t - n)) as float64, NaN where undefined (see the module text)."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    den = n * (runs - n)
    out = np.full(np.broadcast(a, n, total).shape, np.nan)
    np.divide(a * runs - n * total, den, out=out, where=den > 0)
    return out
