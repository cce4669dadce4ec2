"""What the report reads: shards only through the verified reader (a damaged or foreign shard is left
out with a note, never decoded by hand), numbers only from estimators/, estimates files only through
their readers beside their writer (orchestrator/estimates_files.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from estimators.precision import memorization_convergence, running_memorization
from estimators.reference import reference_memorization
from orchestrator import estimates_files as ef
from orchestrator.features.report import inputs, sections
from orchestrator.fold import CHECKPOINT_VERSION
from synthetic import make_campaign
from workers.shard import ShardError, read_run_meta, write_shard


def test_running_memorization_is_the_estimate_of_the_first_k_runs():
    rng = np.random.default_rng(1)
    inside = rng.random((30, 50)) < 0.5
    inside[:, 0] = True  # never held out: undefined at every k
    inside[:12, 1] = False  # trained on only from run 13 on: undefined before
    correct = rng.random((30, 50)) < np.where(inside, 0.9, 0.4)
    ks = [2, 5, 12, 13, 30]
    got = running_memorization(inside, correct, ks)
    for row, k in zip(got, ks):
        want = reference_memorization(inside[:k], correct[:k])["mem"]
        np.testing.assert_allclose(row, want, equal_nan=True)
    assert np.isnan(got[:, 0]).all() and np.isnan(got[:3, 1]).all() and np.isfinite(got[3:, 1]).all()


def test_memorization_convergence_compares_with_all_runs():
    rng = np.random.default_rng(2)
    inside = rng.random((40, 80)) < 0.6
    correct = rng.random((40, 80)) < np.where(inside, 0.9, 0.3)
    ks, mean_abs, rms = memorization_convergence(inside, correct)
    assert ks.tolist() == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    final = reference_memorization(inside, correct)["mem"]
    for k, a, r in zip(ks, mean_abs, rms):
        d = reference_memorization(inside[:k], correct[:k])["mem"] - final
        d = d[np.isfinite(d)]
        assert a == pytest.approx(np.abs(d).mean()) and r == pytest.approx(np.sqrt((d ** 2).mean()))
    assert mean_abs[-1] == 0 and rms[-1] == 0


def _rewrite(path, change):
    """The shard at `path`, rewritten with `change(table) -> table` (a valid Parquet file)."""
    write_shard(path, change(pq.read_table(path)))


def _foreign(table):
    meta = json.loads(table.schema.metadata[b"longtail"])
    return table.replace_schema_metadata({b"longtail": json.dumps({**meta, "spec_hash": "another"}).encode()})


def _other_subset(table):
    import pyarrow as pa

    inside = table.column("in_subset").to_numpy(zero_copy_only=False).copy()
    inside[0] = inside[0] != 1  # training example 0's membership no longer the plan's
    col = pa.array(inside, pa.bool_(), mask=np.r_[np.zeros(60, bool), np.ones(20, bool)])
    return table.set_column(table.schema.get_field_index("in_subset"), "in_subset", col)


@pytest.fixture
def damaged(tmp_path):
    """A 40-run campaign whose shards 3 (truncated), 7 (another spec's) and 9 (another subset) fail
    verification: the fold would reject them, and so must the report."""
    c, arrays = make_campaign(tmp_path / "c", runs=40, n_train=60, n_test=20)
    p = c.paths.shard(3)
    p.write_bytes(p.read_bytes()[:200])
    _rewrite(c.paths.shard(7), _foreign)
    _rewrite(c.paths.shard(9), _other_subset)
    return c, arrays


def test_convergence_leaves_out_shards_that_fail_verification(damaged):
    c, arrays = damaged
    conv = inputs.convergence(c)
    assert conv.unreadable == 3 and conv.shards == 37 and conv.available == 40
    kept = [r for r in range(40) if r not in (3, 7, 9)]
    f = conv.followed
    inside, correct = arrays["mask"][kept][:, f], arrays["train_correct"][kept][:, f]
    final = reference_memorization(inside, correct)["mem"]
    for k, a in zip(conv.runs, conv.mean_abs):
        d = reference_memorization(inside[:k], correct[:k])["mem"] - final
        assert a == pytest.approx(np.abs(d[np.isfinite(d)]).mean())
    html = sections.convergence_section(inputs.load_inputs(c.paths.root))
    assert "37 runs read from the shards; 3 unreadable shards left out." in html


def test_run_accuracies_trust_only_this_campaigns_checkpoint_and_shards(damaged):
    c, _ = damaged
    with open(c.paths.checkpoint, "wb") as f:  # a checkpoint of another spec: not this campaign's accuracies
        np.savez(f, version=np.asarray(CHECKPOINT_VERSION), spec_hash=np.asarray("another"),
                 folded=np.ones(40, bool), run_test_acc=np.full(40, 0.123))
    acc, source = inputs.run_accuracies(c)
    assert source == "the shards' metadata" and len(acc) == 38  # 3 (truncated) and 7 (foreign) left out
    assert 0.123 not in acc.tolist()
    with pytest.raises(ShardError, match="spec_hash"):
        read_run_meta(c.paths.shard(7), campaign=c.name, spec_hash=c.spec.result_hash(), run=7,
                      n_train=c.n_train, n_test=c.n_test)


def test_readers_say_none_before_a_file_is_written(tmp_path):
    c, _ = make_campaign(tmp_path / "c", runs=12, n_train=20, n_test=8)
    paths = c.paths
    assert ef.read_summary(paths) is None and ef.read_memorization(paths) is None and ef.read_pairs(paths) is None
    assert ef.read_utility(paths) is None and ef.read_privacy_risk(paths) is None
    assert ef.runs_in(paths.pairs) is None and ef.runs_of(None) == 0 and ef.as_columns(None) is None
    assert ef.top_influencers(paths, c.labels["test_labels"], [0, 1], 3) == {}
    assert ef.strongest_tests(paths, 5) == []
    assert ef.read_memorization_values(paths, c.n_train) is None


def test_influence_file_names_are_the_documented_ones(tmp_path):
    paths = make_campaign(tmp_path / "c", runs=4, n_train=10, n_test=4)[0].paths
    names = {(layout, t): paths.influence_file(layout, t).name for layout in paths.INFLUENCE_LAYOUTS
             for t in ("correct", "margin")}
    assert names == {("dense", "correct"): "influence.npy", ("dense", "margin"): "influence_margin.npy",
                     ("dense_se", "correct"): "influence_se.npy", ("dense_se", "margin"): "influence_margin_se.npy",
                     ("per-class", "correct"): "influence_per_class.npz",
                     ("per-class", "margin"): "influence_margin_per_class.npz",
                     ("topk", "correct"): "influence_topk.parquet", ("topk", "margin"): "influence_margin_topk.parquet",
                     ("topk_pairs", "correct"): "influence_pairs.parquet",
                     ("topk_pairs", "margin"): "influence_margin_pairs.parquet"}
    assert paths.influence_file("dense") == paths.influence


def test_json_safe():
    assert ef.json_safe({"a": np.float32(0.5), "b": [np.int64(3), float("nan")], "c": (np.inf,)}) == \
        {"a": 0.5, "b": [3, None], "c": [None]}
