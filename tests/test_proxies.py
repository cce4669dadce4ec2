"""Training-dynamics proxies (estimators/proxies.py): definitions on hand-built trajectories, agreement
statistics against plain references, and the order-free sums behind the agreement curve."""

import numpy as np
import pytest
from scipy import stats as sps

from estimators import proxies as px


def test_learning_time_and_forgetting_on_a_hand_built_trajectory():
    # rows: epochs 0..4; columns: examples
    correct = np.array([[1, 0, 1, 0, 1, 0],
                        [1, 1, 0, 0, 1, 1],
                        [1, 1, 1, 0, 0, 0],
                        [1, 1, 0, 0, 1, 1],
                        [1, 1, 1, 0, 1, 0]], bool)
    # 0 always right; 1 right from epoch 1; 2 wrong at 1 and 3: stays right from 4; 3 never right;
    # 4 wrong at 2 only; 5 right at 1 and 3, wrong at the end
    assert px.learning_time(correct).tolist() == [0, 1, 4, 5, 3, 5]
    assert px.forgetting_events(correct).tolist() == [0, 0, 2, 0, 1, 2]
    proxy = px.forgetting_proxy(px.forgetting_events(correct), px.learning_time(correct), epochs=5)
    # the never-learned example ranks above every other (Toneva et al.), the others keep their counts
    assert proxy.tolist() == [0, 0, 2, 5, 1, 2]


def test_agreement_statistics_against_plain_references():
    rng = np.random.default_rng(1)
    mem = rng.random(2000)
    proxy = mem + rng.normal(0, 0.3, 2000)
    proxy[:50] = proxy[50:100]  # ties
    s = px.statistics(proxy, mem)
    assert s["spearman"] == pytest.approx(sps.spearmanr(proxy, mem)[0], abs=1e-12)
    assert s["pearson"] == pytest.approx(sps.pearsonr(proxy, mem)[0], abs=1e-12)
    assert s["cosine"] == pytest.approx(proxy @ mem / np.linalg.norm(proxy) / np.linalg.norm(mem), abs=1e-12)
    for share, key in ((0.01, "top1"), (0.05, "top5")):
        k = round(share * 2000)
        want = len(set(np.argsort(-proxy)[:k]) & set(np.argsort(-mem)[:k])) / k
        assert s[key] == pytest.approx(want)
    # known values: a monotone transform agrees perfectly in rank, a reversal disagrees perfectly
    m = np.arange(200.0)
    assert px.statistics(m ** 3, m)["spearman"] == pytest.approx(1.0)
    assert px.statistics(m ** 3, m)["top5"] == 1.0
    assert px.statistics(-m, m)["spearman"] == pytest.approx(-1.0)
    assert px.statistics(-m, m)["top1"] == 0.0
    # ties at the cut count in expectation over random tie-breaking: a constant proxy is chance (= share),
    # a proxy that puts the true top 10 and 10 others at one value gets half of the top 10 right
    assert px.top_overlap(np.ones(200), m, 0.05) == pytest.approx(0.05)
    tied = np.zeros(200)
    tied[190:] = 1
    tied[:10] = 1
    assert px.top_overlap(tied, m, 0.05) == pytest.approx(0.5)


def test_bootstrap_interval_covers_the_truth_and_is_tight():
    """Proxy = memorization + noise of known size: the population Pearson correlation is
    1 / sqrt(1 + sigma^2 / var(mem)); the 95% interval from 3,000 examples must contain it and be
    narrower than 0.06 (the sampling sd of r here is about 0.006: an interval ten times too wide fails)."""
    rng = np.random.default_rng(2)
    mem = rng.random(3000)  # var 1/12
    sigma = 0.2
    truth = 1 / np.sqrt(1 + sigma ** 2 * 12)
    a = px.agreement(mem + rng.normal(0, sigma, 3000), mem, bootstrap=200, seed=0)
    assert a.ci_low["pearson"] <= truth <= a.ci_high["pearson"]
    assert a.ci_high["pearson"] - a.ci_low["pearson"] < 0.06
    assert a.ci_low["spearman"] < a.value["spearman"] < a.ci_high["spearman"]
    # NaNs (examples without a proxy) are left out, not counted as zero
    p = mem + rng.normal(0, sigma, 3000)
    p[::2] = np.nan
    assert px.agreement(p, mem, bootstrap=0).examples == 1500


def _plain_first_runs_mean(values, masks, positions, first):
    """Reference: mean over the runs at positions < first that trained on each example, by loops."""
    n = masks.shape[1]
    out = np.full(n, np.nan)
    for i in range(n):
        v = [values[r][i] for r in range(len(masks)) if masks[r, i] and positions[r] < first]
        if v:
            out[i] = np.mean(v)
    return out


def test_dynamics_sums_are_order_free_and_match_a_plain_reference():
    rng = np.random.default_rng(3)
    runs, n, epochs = 11, 40, 8
    masks = rng.random((runs, n)) < 0.7
    vals = [{"loss_sum": rng.random(n) * 10, "learn_epoch": rng.integers(0, epochs + 1, n),
             "forgets": rng.integers(0, 4, n)} for _ in range(runs)]
    a, b = px.Dynamics.zeros(n, runs), px.Dynamics.zeros(n, runs)
    for r in range(runs):
        a.add(r, masks[r], vals[r], epochs)
    for r in rng.permutation(runs):
        b.add(int(r), masks[r], vals[r], epochs)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-6)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.levels == [1, 2, 4, 8, 11]
    for j, first in enumerate(a.levels):
        want = _plain_first_runs_mean([v["loss_sum"] for v in vals], masks, np.arange(runs), first)
        np.testing.assert_allclose(a.mean(j)[0], want, rtol=1e-5)
    want = _plain_first_runs_mean([v["learn_epoch"] for v in vals], masks, np.arange(runs), runs)
    np.testing.assert_allclose(a.mean()[1], want, rtol=1e-6)
    # a plan that grows keeps what was folded: the new levels' sums are those of the runs folded so far
    g = px.Dynamics.zeros(n, 6)
    for r in range(6):
        g.add(r, masks[r], vals[r], epochs)
    g = g.regrown(runs)
    for r in range(6, runs):
        g.add(r, masks[r], vals[r], epochs)
    np.testing.assert_allclose(g.sums, a.sums, rtol=1e-6)
    np.testing.assert_array_equal(g.counts, a.counts)


def test_agreement_grows_with_the_runs_averaged():
    """Each run's loss is memorization plus independent noise: averaging more runs must agree better, and
    the curve has a point per level with the runs averaged per example rising."""
    rng = np.random.default_rng(4)
    runs, n = 16, 3000
    mem = rng.random(n)
    d = px.Dynamics.zeros(n, runs)
    for r in range(runs):
        mask = rng.random(n) < 0.7
        d.add(r, mask, {"loss_sum": mem + rng.normal(0, 1.0, n), "learn_epoch": np.zeros(n),
                        "forgets": np.zeros(n)}, 10)
    rows = [a for a in px.curve(d, mem, bootstrap=50) if a.proxy == "loss_sum"]
    assert [a.runs for a in rows] == [1, 2, 4, 8, 16]
    rho = [a.value["spearman"] for a in rows]
    assert all(x < y for x, y in zip(rho, rho[1:]))
    assert rows[-1].ci_low["spearman"] > rows[0].ci_high["spearman"]  # the gain is far outside the noise
    assert np.isnan(rows[2].ci_low["spearman"])  # intervals only at the ends (their cost, see curve)
    averaged = [a.mean_averaged for a in rows]
    assert averaged[0] == pytest.approx(1.0) and averaged[-1] == pytest.approx(16 * 0.7, rel=0.05)
