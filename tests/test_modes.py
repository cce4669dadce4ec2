"""Every influence mode, subset design and soft target equals the plain reference, computed from
synthetic shards through the real fold, checkpoint and output code (no training, no Ray)."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from estimators.reference import reference_influence, reference_memorization, reference_pairs, reference_top_k
from orchestrator.fold import Aggregator
from orchestrator.cli import main
from orchestrator.driver import RunReport, fold_existing
from orchestrator.estimates_files import write_estimates
from synthetic import INFL, MEM, make_campaign

ATOL = 3e-6  # float32 influence epilogue


def estimate(c, from_scratch=True):
    agg = Aggregator(c, from_scratch=from_scratch)
    fold_existing(c, agg, RunReport(planned=c.plan.runs, already_done=0))
    agg.save_checkpoint()
    return agg, write_estimates(agg, complete=True, final=True)


def check_memorization(c, arr, runs):
    mem = pd.read_parquet(c.paths.memorization)
    ref = reference_memorization(arr["mask"][runs], arr["train_correct"][runs])
    for key in ("mem", "se", "ci_low", "ci_high", "n_in", "n_out", "acc_in", "acc_out"):
        np.testing.assert_allclose(mem[key], ref[key], rtol=1e-9, atol=1e-12, err_msg=key)
    soft = reference_memorization(arr["mask"][runs], arr["train_margin"][runs], binary=False)
    for key, col in (("mem", "mem_margin"), ("se", "se_margin"), ("ci_low", "ci_low_margin")):
        np.testing.assert_allclose(mem[col], soft[key], rtol=1e-6, atol=1e-6, err_msg=col)
    return mem


@pytest.mark.parametrize("design", ["fixed", "bernoulli", "balanced", "paired"])
def test_dense_mode_and_every_design(tmp_path, design):
    c, arr = make_campaign(tmp_path / design, design=design, ratio="0.5")
    agg, summary = estimate(c)
    mem = check_memorization(c, arr, slice(None))
    ref = reference_influence(arr["mask"], arr["test_correct"], full=True)
    np.testing.assert_allclose(np.load(c.paths.estimates_dir / "influence.npy"), ref["est"], atol=ATOL)
    np.testing.assert_allclose(np.load(c.paths.estimates_dir / "influence_se.npy"), ref["se"], atol=ATOL)
    soft = reference_influence(arr["mask"], arr["test_margin"], binary=False)
    np.testing.assert_allclose(np.load(c.paths.estimates_dir / "influence_margin.npy"), soft, atol=2e-4)
    pairs = pd.read_parquet(c.paths.pairs)
    expected = reference_pairs(mem["mem"].to_numpy(), ref["est"], c.labels["train_labels"],
                               c.labels["test_labels"], MEM, INFL, True)
    assert set(zip(pairs.train, pairs.test)) == expected and expected
    np.testing.assert_allclose(pairs.infl_se, ref["se"][pairs.train, pairs.test], atol=ATOL)
    counts = arr["mask"].sum(axis=0)
    assert summary["counts"]["n_in"] == {"min": int(counts.min()), "median": float(np.median(counts)),
                                         "max": int(counts.max())}
    if design == "balanced":
        assert summary["counts"]["n_in"]["min"] == summary["counts"]["n_in"]["max"] == 20
    assert summary["high_influence_pairs"]["pairs"] == len(expected)


def test_per_class_mode(tmp_path):
    c, arr = make_campaign(tmp_path / "pc", mode="per-class")
    estimate(c)
    ref = reference_influence(arr["mask"], arr["test_correct"], full=True)
    z = np.load(c.paths.estimates_dir / "influence_per_class.npz")
    y_tr, y_te = c.labels["train_labels"], c.labels["test_labels"]
    for k in range(3):
        tr, te = z[f"tr_classidx_{k}"], z[f"tt_classidx_{k}"]
        np.testing.assert_array_equal(tr, np.flatnonzero(y_tr == k))
        np.testing.assert_array_equal(te, np.flatnonzero(y_te == k))
        np.testing.assert_allclose(z[f"infl_matrix_class{k}"], ref["est"][np.ix_(tr, te)], atol=ATOL)
        np.testing.assert_allclose(z[f"infl_se_class{k}"], ref["se"][np.ix_(tr, te)], atol=ATOL)
    mem = pd.read_parquet(c.paths.memorization)["mem"].to_numpy()
    pairs = pd.read_parquet(c.paths.pairs)
    assert set(zip(pairs.train, pairs.test)) == reference_pairs(mem, ref["est"], y_tr, y_te, MEM, INFL, True)


@pytest.mark.parametrize("memory_gb", [1e-5, 1.0])  # 1e-5 GB: tiles of ~200 cells, many of them
def test_topk_mode(tmp_path, memory_gb):
    c, arr = make_campaign(tmp_path / "tk", mode="topk", memory_gb=memory_gb)
    estimate(c)
    ref = reference_influence(arr["mask"], arr["test_correct"], full=True)
    top = pd.read_parquet(c.paths.estimates_dir / "influence_topk.parquet")
    expected = reference_top_k(ref["est"], 3)
    for j in range(c.n_test):
        rows = top[top.test == j].sort_values("rank")
        assert rows.train.tolist() == expected[j]
        np.testing.assert_allclose(rows.infl, ref["est"][expected[j], j], atol=ATOL)
        np.testing.assert_allclose(rows.se, ref["se"][expected[j], j], atol=ATOL)
    above = pd.read_parquet(c.paths.estimates_dir / "influence_pairs.parquet")
    assert set(zip(above.train, above.test)) == set(zip(*np.nonzero(ref["est"] >= INFL)))
    soft = pd.read_parquet(c.paths.estimates_dir / "influence_margin_topk.parquet")
    soft_ref = reference_influence(arr["mask"], arr["test_margin"], binary=False)
    assert soft[soft.test == 0].sort_values("rank").train.tolist() == reference_top_k(soft_ref, 3)[0]


def test_auto_mode_follows_the_memory_budget(tmp_path):
    small, _ = make_campaign(tmp_path / "a", mode="auto", memory_gb=1.0)
    tiny, _ = make_campaign(tmp_path / "b", mode="auto", memory_gb=1e-6)
    assert estimate(small)[1]["influence_mode"] == "dense"
    assert estimate(tiny)[1]["influence_mode"] == "topk"


def test_several_ratios_and_the_cscore(tmp_path):
    c, arr = make_campaign(tmp_path / "cs", ratio="[0.3, 0.6, 0.9]", runs=45)
    _, summary = estimate(c)
    which = c.plan.ratio_of_run
    check_memorization(c, arr, which == 0)  # the first ratio is the main one
    cs = pd.read_parquet(c.paths.estimates_dir / "cscore.parquet")
    held_out = [reference_memorization(arr["mask"][which == k], arr["train_correct"][which == k])["acc_out"]
                for k in range(3)]
    for k, ratio in enumerate((0.3, 0.6, 0.9)):
        np.testing.assert_allclose(cs[f"acc_out_{ratio:g}"], held_out[k], rtol=1e-12)
    np.testing.assert_allclose(cs["cscore"], np.nanmean(np.vstack(held_out), axis=0), rtol=1e-12)
    assert [g["runs"] for g in summary["ratios"]] == [15, 15, 15]


def test_split_half_consistency(tmp_path):
    c, arr = make_campaign(tmp_path / "sh", runs=60)
    _, summary = estimate(c)
    sh = summary["split_half"]
    assert sh["runs"] == [30, 30]
    even, odd = arr["mask"][0::2], arr["mask"][1::2]
    a = reference_memorization(even, arr["train_correct"][0::2])["mem"]
    b = reference_memorization(odd, arr["train_correct"][1::2])["mem"]
    ok = np.isfinite(a) & np.isfinite(b)
    assert sh["memorization_correlation"] == pytest.approx(np.corrcoef(a[ok], b[ok])[0, 1])
    sets = [set(zip(*np.nonzero((reference_influence(m, arr["test_correct"][s]) >= INFL)
                                & (mm[:, None] >= MEM)
                                & (c.labels["train_labels"][:, None] == c.labels["test_labels"][None, :]))))
            for m, s, mm in ((even, slice(0, None, 2), a), (odd, slice(1, None, 2), b))]
    assert sh["pairs"] == [len(sets[0]), len(sets[1])]
    assert sh["pairs_jaccard"] == pytest.approx(len(sets[0] & sets[1]) / len(sets[0] | sets[1]))


def test_checkpoint_resume_equals_from_scratch(tmp_path):
    c, arr = make_campaign(tmp_path / "ck", runs=30)
    agg = Aggregator(c, from_scratch=True)
    for r in range(13):  # fold part, checkpoint, then reopen and fold the rest
        agg.add(r, agg.read(r))
    agg.save_checkpoint()
    resumed, _ = estimate(c, from_scratch=False)
    scratch, _ = estimate(c, from_scratch=True)
    for k, v in scratch.stats.arrays().items():
        if "margin" in k:  # float sums: the order of additions differs, so rounding may
            np.testing.assert_allclose(v, resumed.stats.arrays()[k], rtol=1e-6, err_msg=k)
        else:  # counts: exact
            np.testing.assert_array_equal(v, resumed.stats.arrays()[k], err_msg=k)


def test_exports(tmp_path):
    c, arr = make_campaign(tmp_path / "ex", mode="topk")
    estimate(c)
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(c.paths.root), "--format", "fz"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    z = np.load(c.paths.root / "export" / "synth_infl_matrix.npz")
    ref = reference_influence(arr["mask"], arr["test_correct"])
    mem = reference_memorization(arr["mask"], arr["train_correct"])["mem"]
    np.testing.assert_allclose(z["tr_mem"], mem, atol=1e-6)
    np.testing.assert_array_equal(z["tr_labels"], c.labels["train_labels"])
    tr, te = z["tr_classidx_1"], z["tt_classidx_1"]
    np.testing.assert_allclose(z["infl_matrix_class1"], ref[np.ix_(tr, te)], atol=ATOL)
    p = np.load(c.paths.root / "export" / f"synth_high_infl_pairs_infl{INFL:g}_mem{MEM:g}.npz")
    assert sorted(p.files) == ["infl", "mem", "tr_idx", "tt_idx"]
    assert set(zip(p["tr_idx"], p["tt_idx"])) == reference_pairs(mem, ref, c.labels["train_labels"],
                                                                 c.labels["test_labels"], MEM, INFL, True)
    r = runner.invoke(main, ["export", str(c.paths.root), "--format", "parquet", "--dest", str(tmp_path / "pq")],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    test = pd.read_parquet(tmp_path / "pq" / "test.parquet")
    np.testing.assert_allclose(test.accuracy, arr["test_correct"].mean(axis=0))
    best = [reference_top_k(ref, 1)[j][0] for j in range(c.n_test)]
    assert test.top_train.tolist() == best
    train = pd.read_parquet(tmp_path / "pq" / "train.parquet")
    assert train.example.tolist() == list(range(c.n_train))
    assert json.loads((c.paths.summary).read_text())["influence_mode"] == "topk"
