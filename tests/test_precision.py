"""estimators/precision.py: the precision and storage numbers that `plan`, `validate`, `utility` and the
estimates share, each checked against a case whose value is known (a formula, a simulation, the plan
itself or bytes actually written)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from estimators import precision as pr
from estimators.estimates import error_bound


def test_expected_se_of_bernoulli_means():
    # p = 1/2 in and out, q = 1/2: V = 0.25 / 0.5 + 0.25 / 0.5 = 1, so se(100 runs) = sqrt(1 / 100) = 0.1
    assert pr.variance_per_run(0.5, 0.5, 0.5) == 1.0
    assert pr.expected_se(pr.variance_per_run(0.5, 0.5, 0.5), 100) == pytest.approx(0.1)
    # certain outcomes have no variance
    assert pr.variance_per_run(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.7).tolist() == [0.0, 0.0]
    # a simulation: t runs, q t of them trained on the example (correct with p_in), the others not (p_out);
    # the spread of mean(in) - mean(out) over many campaigns is the expected standard error
    rng = np.random.default_rng(0)
    t, q, p_in, p_out = 200, 0.7, 0.9, 0.4
    n_in = round(q * t)
    mem = rng.binomial(n_in, p_in, 40_000) / n_in - rng.binomial(t - n_in, p_out, 40_000) / (t - n_in)
    assert mem.std() == pytest.approx(float(pr.expected_se(pr.variance_per_run(p_in, p_out, q), t)), rel=0.02)


@pytest.mark.parametrize("v,target", [(1.0, 0.1), (0.37, 0.05), (2.5, 0.035), (0.01, 0.2), (0.8, 0.01)])
def test_runs_for_se_inverts_expected_se(v, target):
    t = pr.runs_for_se(v, target)
    assert pr.expected_se(v, t) <= target
    assert t == 2 or pr.expected_se(v, t - 1) > target  # the smallest such t (a campaign has at least 2)
    assert pr.runs_for_se(v, 0.0) > 10 ** 15  # no finite campaign reaches 0


@pytest.mark.parametrize("target,ratio", [(0.05, 0.7), (0.1, 0.5), (0.035, 0.7), (0.2, 0.3)])
def test_runs_for_bound_is_the_smallest_t_under_the_bound(target, ratio):
    t = pr.runs_for_bound(target, ratio)
    assert error_bound(t, ratio) <= target < error_bound(t - 1, ratio)


def test_in_share():
    assert pr.in_share("fixed", 0.7) == 0.7 and pr.in_share("bernoulli", 0.3) == 0.3
    assert pr.in_share("paired", 0.7) == 0.5  # each example is in exactly one run of every pair


@pytest.mark.parametrize("design", ["fixed", "bernoulli", "balanced", "paired"])
@pytest.mark.parametrize("ratios,runs", [((0.7,), 12), ((0.3, 0.7), 12), ((0.2, 0.5, 0.8), 24), ((0.5, 0.7), 16)])
def test_main_ratio_runs_counts_the_runs_of_the_plan(design, ratios, runs):
    from orchestrator.plan import make_plan

    plan = make_plan(design, 3, 40, ratios, runs)
    for k in range(len(ratios)):
        assert pr.main_ratio_runs(runs, design, len(ratios), k) == len(plan.runs_of_ratio(k))


def test_mean_se_and_drop():
    m, se = pr.mean_se([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and se == pytest.approx(0.2 / math.sqrt(3))  # sd 0.2 with ddof 1
    assert pr.mean_se([0.8, 0.8, 0.8]) == (0.8, 0.0)  # a deterministic learner: exactly no spread
    assert np.isnan(pr.mean_se([0.4])[1]) and np.isnan(pr.mean_se([])[0]) and pr.mean_se([np.nan, 0.4])[0] == 0.4
    d, dse = pr.drop((0.9, 0.03), (0.8, 0.04))
    assert d == pytest.approx(0.1) and dse == pytest.approx(0.05)  # a 3-4-5 triangle


def test_split_half_agreement():
    a = np.array([0.0, 0.1, 0.25, 0.6, np.nan, 0.9])
    same = pr.split_half_agreement(a, a.copy(), (0.25, 0.5))
    assert same == {"memorization_correlation": pytest.approx(1.0), "memorization_mean_abs_difference": 0.0,
                    "memorized_jaccard_0.25": 1.0, "memorized_jaccard_0.5": 1.0}
    b = np.array([0.0, 0.3, 0.1, 0.6, 0.5, 0.2])
    got = pr.split_half_agreement(a, b, (0.25,))
    both = np.isfinite(a)
    assert got["memorization_mean_abs_difference"] == pytest.approx(np.abs(a - b)[both].mean())
    assert got["memorization_correlation"] == pytest.approx(np.corrcoef(a[both], b[both])[0, 1])
    assert got["memorized_jaccard_0.25"] == pytest.approx(1 / 5)  # {2, 3, 5} and {1, 3, 4} share {3}: at or above
    flat = pr.split_half_agreement(a, np.full(6, 0.5), (0.25,))
    assert flat["memorization_correlation"] is None  # a constant half has no correlation


# --- storage: the model against bytes that longtail itself lays out or writes ---------------------


DIGITS = """
[campaign]
name = "sizes"
runs = {runs}
[dataset]
name = "digits"
[model]
name = "mlp"
[train]
store = ["margin"]
[estimates]
influence = "{influence}"
soft = {soft}
"""


@pytest.fixture(scope="module")
def digits():
    from workers.datasets import load_dataset

    return load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})


def _spec(runs=10, influence="dense", soft="[]"):
    from orchestrator import spec as specs

    return specs.loads(DIGITS.format(runs=runs, influence=influence, soft=soft))


def test_plan_bytes_are_the_plans_arrays():
    from orchestrator.plan import make_plan

    for n, runs, ratios in ((40, 12, (0.7,)), (1001, 7, (0.3, 0.6, 0.9)), (8, 3, (0.5,))):
        plan = make_plan("fixed", 0, n, ratios, runs)
        laid_out = plan.masks.nbytes + plan.seeds.nbytes + plan.ratio_of_run.nbytes
        assert pr.plan_bytes(runs, n) == laid_out
        assert pr.plan_bytes(runs, n, examples_bytes=123) == laid_out + 123


def test_shard_model_is_close_to_a_shard_workers_write(tmp_path):
    """The size `validate` assumes before a pilot measured one, against a shard written by
    workers/shard.py for a run of a small campaign (90% of train and 80% of test examples right)."""
    from workers import shard

    rng = np.random.default_rng(0)
    n, nt, k = 5000, 1000, 10
    y, yt = rng.integers(0, k, n), rng.integers(0, k, nt)
    pred = np.where(rng.random(n) < 0.9, y, rng.integers(0, k, n))
    pred_t = np.where(rng.random(nt) < 0.8, yt, rng.integers(0, k, nt))
    margins = (rng.standard_normal(n) * 3, rng.standard_normal(nt) * 3)
    table = shard.build_table(rng.random(n) < 0.7, pred, pred_t, y, yt, k, {"campaign": "sizes", "run": 0},
                              {"margin": margins})
    path = tmp_path / "run-000000.parquet"
    shard.write_shard(path, table)
    assert path.stat().st_size == pytest.approx(pr.shard_bytes(n, nt), rel=0.25)


def test_dense_checkpoint_and_influence_terms_match_the_fold(digits):
    """The dense sums the size model counts are the ones the fold's checkpoint holds: the checkpoint of
    a dense campaign is larger than that of the same campaign without dense influence by exactly those
    matrices (plus the archive's headers for them)."""
    from orchestrator.fold import fixed_sizes

    n, nt = digits.n_train, digits.n_test
    for soft, k in (("[]", 0), ('["margin"]', 1)):
        dense = fixed_sizes(_spec(influence="dense", soft=soft), digits)["checkpoint"]
        none = fixed_sizes(_spec(influence="topk", soft=soft), digits)["checkpoint"]
        model = pr.checkpoint_bytes("dense", n, nt, 0, k, 0) - pr.checkpoint_bytes("topk", n, nt, 0, k, 0)
        assert model == pr.dense_matrix_bytes(n, nt) * (1 + 4 * k)  # soft sums: float64 values and squares
        assert 0 <= (dense - none) - model < 2000


def test_checkpoint_bytes_grow_with_runs_as_the_checkpoint_does(digits):
    """What the checkpoint adds per planned run (test outcomes and the run's record) and per doubling of the
    runs (a level of the training-dynamics sums), against the checkpoint's exact size (fixed_sizes). On
    digits, 128 -> 2000 runs grow the checkpoint by 226,576 bytes: the model now says 226,544; before it
    counted 45 bytes a run (84,240), leaving out each run's 33-byte record and the dynamics levels."""
    from orchestrator.fold import fixed_sizes

    n, nt = digits.n_train, digits.n_test
    size = {t: fixed_sizes(_spec(runs=t), digits)["checkpoint"] for t in (64, 128, 2000)}
    for a, b in ((64, 128), (128, 2000)):
        model = pr.checkpoint_bytes("dense", n, nt, b, 0, 0) - pr.checkpoint_bytes("dense", n, nt, a, 0, 0)
        assert model == pytest.approx(size[b] - size[a], rel=0.02), (a, b, model, size[b] - size[a])


def test_influence_mode_resolves_auto_at_the_memory_the_dense_matrices_need():
    n, nt = 1000, 250
    need = pr.dense_influence_memory(n, nt, soft=1)
    assert need == 3 * 3 * 4 * n * nt  # three matrices for the 0/1 target and for the soft one, plus its squares
    assert pr.influence_mode("auto", need / 1e9, n, nt, 1) == "dense"
    assert pr.influence_mode("auto", need / 1e9 * 0.999, n, nt, 1) == "topk"
    assert pr.influence_mode("per-class", 1e-9, n, nt, 1) == "per-class"  # an explicit mode is kept


def test_storage_bytes_adds_its_parts():
    parts = pr.storage_bytes("dense", 50, 20, 400, 1, 10, 0, per_shard=1000.0, examples=300, memorization=200,
                             fold_per_example=100)
    assert parts["shards"] == 400_000
    assert parts["plan"] == 400 * (7 + 9) + 300
    assert parts["estimates"] == 2 * 4 * 50 * 20 * 2 + 200  # estimate and standard error, two targets
    # dense sums: float32 counts of the 0/1 target, float64 values and squares of the soft one (1 + 4 matrices)
    # per planned run: bit-packed and float16 test outcomes, and its record (left out before: a figure this
    # test pinned without them); the training-dynamics sums at log2 levels of the runs
    assert parts["checkpoint"] == 4 * 50 * 20 * 5 + 400 * (3 + 2 * 20 + 33) + 50 * (10 + 1) * 14 + 100
    assert pr.storage_bytes("dense", 50, 20, 400, 1, 10, 0, 1000.0, 300, 200, 100, checkpoint=7)["checkpoint"] == 7
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    topk = pr.storage_bytes("topk", 50, 20, 400, 0, 10, 0, 1000.0, 300, 200, 100)
    assert topk["estimates"] == pr.TOPK_ROW_BYTES * 20 * 10 + 200
