"""Privacy risk (estimators/privacy.py and its fold in orchestrator/fold.py): each number is checked
against a plain recomputation or a case whose true value is known."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.special import ndtr
from planted import learner_campaign
from synthetic import make_campaign

from estimators import privacy as pv
from orchestrator.fold import Aggregator
from orchestrator.driver import RunReport, fold_existing


def _folded(c, from_scratch=True):
    agg = Aggregator(c, from_scratch=from_scratch)
    fold_existing(c, agg, RunReport(planned=c.plan.runs, already_done=0))
    agg.flush()
    return agg


def _plain_fits(masks, x):
    """Per example: mean and sample variance (ddof 1) over in runs and over out runs, by a loop."""
    n = masks.shape[1]
    out = {k: np.empty(n) for k in ("mu_in", "var_in", "mu_out", "var_out")}
    for i in range(n):
        a, b = x[masks[:, i], i], x[~masks[:, i], i]
        out["mu_in"][i], out["var_in"][i] = a.mean(), a.var(ddof=1)
        out["mu_out"][i], out["var_out"][i] = b.mean(), b.var(ddof=1)
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_campaign(tmp_path_factory.mktemp("risk") / "c", runs=40)


def test_fitted_statistics_equal_a_plain_recomputation_from_the_shards(synth):
    c, raw = synth
    agg = _folded(c)
    assert agg.risk_source == "probability"  # stored beside the margin: log(p / (1 - p)) is preferred
    p = np.clip(raw["train_probability"].astype(np.float64), 2**-12, 1 - 2**-12)
    x = np.log(p / (1 - p))
    plain = _plain_fits(raw["mask"], x)
    f = pv.fit(agg.risk, global_variance=False)
    np.testing.assert_allclose(f.mu_in, plain["mu_in"], rtol=1e-10)
    np.testing.assert_allclose(f.mu_out, plain["mu_out"], rtol=1e-10)
    np.testing.assert_allclose(f.sd_in**2, plain["var_in"], rtol=1e-9)
    np.testing.assert_allclose(f.sd_out**2, plain["var_out"], rtol=1e-9)
    np.testing.assert_array_equal(f.n_in, raw["mask"].sum(axis=0))
    # the global variance: squared deviations pooled over every example, over their degrees of freedom
    g = pv.fit(agg.risk, global_variance=True)
    n_in = raw["mask"].sum(axis=0)
    pooled_in = ((n_in - 1) * plain["var_in"]).sum() / (n_in - 1).sum()
    np.testing.assert_allclose(g.sd_in**2, pooled_in, rtol=1e-9)
    np.testing.assert_allclose(g.mu_in, plain["mu_in"], rtol=1e-10)
    # and the checkpoint round-trips them
    agg.save_checkpoint()
    again = Aggregator(c)
    np.testing.assert_array_equal(again.risk.sq_out, agg.risk.sq_out)


def test_removing_a_run_equals_refitting_without_it(synth):
    c, raw = synth
    agg = _folded(c)
    r = 17
    data = agg.read(r)
    taken_out = pv.without_run(agg.risk, data.mask, agg.risk_statistic(data))
    refit = pv.zeros(c.n_train)
    for k in range(c.plan.runs):
        if k != r:
            d = agg.read(k)
            pv.fold_scores(refit, d.mask[None], agg.risk_statistic(d)[None])
    for name in ("count_in", "count_out", "sum_in", "sum_out", "sq_in", "sq_out"):
        np.testing.assert_allclose(getattr(taken_out, name), getattr(refit, name), rtol=1e-12, atol=1e-9)
    assert taken_out.count_in.sum() == agg.risk.count_in.sum() - data.mask.sum()  # it really was taken out
    # audit takes a campaign run out before scoring it
    from orchestrator.features.audit import load_target, score

    s = score(agg, load_target(agg, str(c.paths.shard(r))), global_variance=False)
    ref = pv.fit(refit, global_variance=False)
    np.testing.assert_allclose(s.fits.mu_in, ref.mu_in, rtol=1e-10)
    np.testing.assert_allclose(s.online, pv.online_score(ref, agg.risk_statistic(data)), rtol=1e-9)


def test_auc_of_two_normals_and_its_standard_error_against_monte_carlo():
    # known value: N(1, 1) against N(0, 1) separate with AUC Phi(1 / sqrt(2))
    f = pv.Fits(mu_in=np.array([1.0, 0.0]), mu_out=np.array([0.0, 0.0]), sd_in=np.ones(2), sd_out=np.ones(2),
                n_in=np.full(2, 1e12), n_out=np.full(2, 1e12), global_variance=False)
    np.testing.assert_allclose(pv.risk(f).auc, [ndtr(1 / np.sqrt(2)), 0.5], rtol=1e-12)
    # standard error: 4,000 replicate "examples", each fitted from 70 in and 30 out draws; the spread of the
    # estimated AUC over replicates must match the mean delta-method SE within 8% (the SE of a standard
    # deviation from 4,000 replicates is 1.1%; leaving out the variance term makes it 22% too small here)
    rng = np.random.default_rng(1)
    reps, n_in, n_out = 4000, 70, 30
    a = rng.normal(2.5, 1.0, (n_in, reps))
    b = rng.normal(0.0, 1.5, (n_out, reps))
    sums = pv.ScoreSums(count_in=np.full(reps, n_in, float), count_out=np.full(reps, n_out, float),
                        sum_in=a.sum(0), sum_out=b.sum(0), sq_in=(a**2).sum(0), sq_out=(b**2).sum(0))
    r = pv.risk(pv.fit(sums, global_variance=False))
    true_auc = ndtr(2.5 / np.sqrt(1 + 1.5**2))
    assert abs(r.auc.mean() - true_auc) < 4 * r.auc.std() / np.sqrt(reps) + 0.002
    assert abs(r.se.mean() / r.auc.std() - 1) < 0.08, (r.se.mean(), r.auc.std())


def test_roc_auc_and_tpr_at_fpr_equal_brute_force():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 30, 400).astype(float)  # many ties
    members = rng.random(400) < 0.4 + scores / 100
    pos, neg = scores[members], scores[~members]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert pv.roc_auc(scores, members) == pytest.approx(brute, abs=1e-12)
    for fpr in (0.0, 0.01, 0.1, 0.5):
        best = 0.0
        for c in np.r_[np.unique(scores), -np.inf]:
            if (neg > c).mean() <= fpr:
                best = max(best, (pos > c).mean())
        assert pv.tpr_at_fpr(scores, members, fpr) == pytest.approx(best, abs=1e-12), fpr


def test_statistic_from_logits_is_log_odds_of_the_softmax():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 4, (50, 7))
    y = rng.integers(0, 7, 50)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(pv.statistic_from_logits(z, y), np.log(py / (1 - py)), rtol=1e-9, atol=1e-9)
    assert np.isfinite(pv.statistic_from_logits(np.array([[800.0, 0.0]]), np.array([0]))).all()


def test_planted_leaky_examples_rank_highest_by_risk(tmp_path):
    from orchestrator.estimates_files import write_estimates

    c = learner_campaign(tmp_path / "leaky")
    agg = _folded(c)
    summary = write_estimates(agg, complete=True)
    risk = pq.read_table(c.paths.estimates_dir / "privacy_risk.parquet").to_pandas().sort_values("example")
    top3 = set(np.argsort(-risk["risk"].to_numpy())[:3].tolist())
    assert top3 == {3, 8, 21}
    # the others' in and out statistics differ only through the twin's membership: risk well below the leaky
    assert risk["risk"].drop(index=[3, 8, 21]).max() < risk["risk"].iloc[[3, 8, 21]].min() - 0.1
    assert summary["privacy_risk"]["statistic"] == "margin"
    assert summary["privacy_risk"]["spearman_with_memorization"] > 0
    from orchestrator.features.report import render

    page, inp = render(c.paths.root)
    section = page[page.index('<section id="privacy">'):]
    section = section[:section.index("</section>")]
    assert "<img" in section and not inp.notes
    assert "120 runs" in section  # every figure says how many runs stand behind it


def test_an_old_checkpoint_without_risk_sums_is_refolded(synth, tmp_path):
    import shutil

    c, _ = synth
    root = tmp_path / "old"
    shutil.copytree(c.paths.root, root)
    from orchestrator.campaign import create_or_open

    old = create_or_open(None, root, load_data=False)
    agg = _folded(old)
    want = agg.risk.sum_in.copy()
    agg.save_checkpoint()
    with np.load(old.paths.checkpoint, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("risk.")}
    with open(old.paths.checkpoint, "wb") as f:
        np.savez(f, **arrays)
    reopened = Aggregator(old)
    assert any("privacy-risk" in n and "refolding" in n for n in reopened.notes), reopened.notes
    assert reopened.stats.runs == 0  # nothing taken from that checkpoint: every shard is folded again
    fold_existing(old, reopened, RunReport(planned=old.plan.runs, already_done=0))
    reopened.flush()
    np.testing.assert_allclose(reopened.risk.sum_in, want, rtol=1e-12)
