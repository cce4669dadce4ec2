"""The fast fold and the tiled influence against the plain reference, and against known values."""

import numpy as np
import pytest

from estimators import estimates as est
from estimators import influence as inf
from estimators import stats as st
from estimators.reference import reference_influence, reference_memorization, reference_pairs, reference_top_k


def random_runs(t=40, n=30, n_test=12, p=0.6, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((t, n)) < p
    # correctness depends on membership, as it does for a model that memorizes
    train_correct = rng.random((t, n)) < np.where(masks, 0.95, rng.random(n))
    test_correct = rng.random((t, n_test)) < rng.random(n_test)
    train_margin = rng.normal(np.where(masks, 3.0, 1.0), 2.0)
    test_margin = rng.normal(1.0, 2.0, (t, n_test)) + masks[:, :1]
    return masks, train_correct, test_correct, train_margin, test_margin


def fold_all(masks, trc, tec, blocks, trm=None, tem=None, dense=True):
    soft = ("margin",) if trm is not None else ()
    stats = st.zeros(masks.shape[1], tec.shape[1], dense=dense, soft=soft)
    for b in blocks:
        train = {"correct": trc[b]}
        test = {"correct": tec[b]}
        if soft:
            train["margin"], test["margin"] = trm[b], tem[b]
        st.fold(stats, masks[b], train, test)
    return stats


def assert_same(fast, ref, atol=1e-12, keys=("est", "se", "ci_low", "ci_high")):
    for key in keys:
        np.testing.assert_allclose(getattr(fast, key), ref[key], rtol=1e-5 if atol > 1e-9 else 1e-12,
                                   atol=atol, err_msg=key)


def test_memorization_equals_reference_for_correctness_and_margins():
    masks, trc, tec, trm, tem = random_runs()
    stats = fold_all(masks, trc, tec, [slice(None)], trm, tem)
    for target, values, binary in (("correct", trc, True), ("margin", trm, False)):
        mem = est.memorization(stats, target)
        ref = reference_memorization(masks, values, binary)
        # margins fold as fixed point (values to 2**-28, squares to 2**-22: up to ~2e-8 on a standard
        # error near 0.5); one run more or less moves these by ~1e-2
        tol = 1e-10 if binary else 5e-8
        for key in ("mem", "se", "ci_low", "ci_high", "n_in", "n_out", "acc_in", "acc_out"):
            np.testing.assert_allclose(getattr(mem, key), ref[key], rtol=tol, atol=tol, err_msg=f"{target}.{key}")


def test_dense_influence_equals_reference_for_correctness_and_margins():
    masks, trc, tec, trm, tem = random_runs()
    stats = fold_all(masks, trc, tec, [slice(0, 17), slice(17, None)], trm, tem)
    # float32 epilogue: counts are exact, the divisions round at float32 precision
    assert_same(est.influence(stats, "correct"), reference_influence(masks, tec, True, full=True), atol=2e-6)
    assert_same(est.influence(stats, "margin"), reference_influence(masks, tem, False, full=True), atol=2e-4)


def test_in_place_dense_epilogue_equals_the_generic_one():
    masks, trc, tec, trm, tem = random_runs(t=60, n=37, n_test=23, seed=4)
    masks[:, 0] = True  # example 0 is never out: its row is undefined
    stats = fold_all(masks, trc, tec, [slice(None)], trm, tem)
    for target in ("correct", "margin"):
        out_est, out_se = np.empty((37, 23), np.float32), np.empty((37, 23), np.float32)
        est.influence_into(stats, target, out_est, out_se, rows_per_block=5)
        d = est.influence(stats, target)
        np.testing.assert_allclose(out_est, d.est, atol=1e-6)
        np.testing.assert_allclose(out_se, d.se, atol=1e-6)
        assert np.isnan(out_est[0]).all() and np.isnan(out_se[0]).all()


@pytest.mark.parametrize("seed", range(5))
def test_fold_is_order_and_partition_invariant(seed):
    """Bit for bit, soft sums included: margins as shards hold them (float32, magnitudes from 1e-6 to
    ~20) fold to the same bytes in any order and grouping, and through a merge of two parts. Float
    sums (float64 or a float32 GEMM, as before exact soft sums) differ in the last bits here."""
    masks, trc, tec, trm, tem = random_runs(t=50, seed=seed)
    trm = (trm * 10.0 ** np.random.default_rng(seed).integers(-6, 1, trm.shape)).astype(np.float32)
    tem = (tem * 10.0 ** np.random.default_rng(seed + 1).integers(-6, 1, tem.shape)).astype(np.float32)
    rng = np.random.default_rng(seed)
    whole = fold_all(masks, trc, tec, [slice(None)], trm, tem)
    perm = rng.permutation(50)
    cuts = np.sort(rng.choice(np.arange(1, 50), size=6, replace=False))
    parts = np.split(perm, cuts)
    shuffled = fold_all(masks, trc, tec, parts, trm, tem)
    for k, v in whole.arrays().items():
        np.testing.assert_array_equal(v, shuffled.arrays()[k], err_msg=k)
    # merge of independently folded halves is the same again
    merged = st.merge(fold_all(masks, trc, tec, parts[:3], trm, tem), fold_all(masks, trc, tec, parts[3:], trm, tem))
    for k, v in whole.arrays().items():
        np.testing.assert_array_equal(v, merged.arrays()[k], err_msg=k)


def test_soft_values_fold_as_bounded_fixed_point():
    """The fold's fixed point: within half a quantum of the value (|x| <= 2**-4 only; larger float32
    values are multiples of the quantum already), clipped at +-SOFT_LIMIT, and refused past the run
    count whose sums would exceed float64's 53 bits."""
    x = np.array([1e-9, -3e-5, 0.0625, 1.5, -19.75, 100.0, -np.inf], np.float32)
    q, sq = st.fixed_point(x)
    assert np.all(np.abs(q[:2] - x[:2].astype(np.float64)) <= st.SOFT_QUANTUM / 2)
    assert np.array_equal(q[2:5], x[2:5].astype(np.float64))
    assert q[5] == st.SOFT_LIMIT and q[6] == -st.SOFT_LIMIT
    assert np.all(np.abs(sq - q * q) <= st.SQUARE_QUANTUM / 2)
    assert np.all(q / st.SOFT_QUANTUM == np.round(q / st.SOFT_QUANTUM))
    stats = st.zeros(3, 2, soft=("margin",))
    stats.runs = st.MAX_SOFT_RUNS
    with pytest.raises(ValueError, match="exactly in float64"):
        st.fold(stats, np.ones((1, 3), bool), {"correct": np.ones((1, 3), bool), "margin": np.ones((1, 3))},
                {"correct": np.ones((1, 2), bool), "margin": np.ones((1, 2))})


def test_empty_side_is_nan_not_zero():
    masks = np.array([[1, 0], [1, 0], [1, 1]], bool)  # example 0 is never out
    trc = np.ones((3, 2), bool)
    tec = np.ones((3, 1), bool)
    stats = fold_all(masks, trc, tec, [slice(None)])
    mem = est.memorization(stats)
    assert np.isnan(mem.mem[0]) and np.isnan(mem.ci_low[0]) and mem.n_out[0] == 0
    assert mem.mem[1] == 0.0
    assert np.isnan(est.influence(stats).est[0, 0])
    assert np.isnan(reference_memorization(masks, trc)["mem"][0])


def test_known_values():
    # Example 0: always right when trained on, right 1 time in 4 otherwise -> mem = 1 - 1/4.
    masks = np.array([[1], [1], [0], [0], [0], [0]], bool)
    trc = np.array([[1], [1], [1], [0], [0], [0]], bool)
    tec = np.array([[1], [0], [0], [0], [1], [0]], bool)
    stats = fold_all(masks, trc, tec, [slice(None)])
    mem = est.memorization(stats)
    assert mem.mem[0] == pytest.approx(0.75)
    assert mem.se[0] == pytest.approx(np.sqrt(0.25 * 0.75 / 4))
    # Agresti-Caffo: (2+1)/(2+2) - (1+1)/(4+2) = 0.75 - 1/3
    half = est.Z95 * np.sqrt(0.75 * 0.25 / 4 + (1 / 3) * (2 / 3) / 6)
    assert mem.ci_low[0] == pytest.approx(0.75 - 1 / 3 - half)
    assert est.influence(stats).est[0, 0] == pytest.approx(0.5 - 0.25)


def test_interval_does_not_collapse_at_zero_and_one():
    # in always right, out always wrong: the plug-in se is 0, the interval is not a point
    masks = np.array([[1], [1], [1], [0], [0]], bool)
    trc = masks.copy()
    mem = est.memorization(fold_all(masks, trc, np.ones((5, 1), bool), [slice(None)]))
    assert mem.mem[0] == 1 and mem.se[0] == 0
    assert mem.ci_low[0] < 0.9 and mem.ci_high[0] == pytest.approx(1.0, abs=0.2)


def mask_columns_of(masks):
    return lambda idx: masks[:, idx]


@pytest.mark.parametrize("budget", [200 * inf.BYTES_PER_CELL, 2**30])
def test_tiled_dense_and_per_class_equal_reference(budget):
    masks, trc, tec, trm, tem = random_runs(t=60, n=37, n_test=23, seed=4)
    for values, binary in ((tec, True), (tem, False)):
        ref = reference_influence(masks, values, binary, full=True)
        infl, se = inf.dense(mask_columns_of(masks), inf.Outcomes(values, binary), 37, budget)
        np.testing.assert_allclose(infl, ref["est"], atol=2e-4)
        np.testing.assert_allclose(se, ref["se"], atol=2e-4)
        rng = np.random.default_rng(0)
        y_tr, y_te = rng.integers(0, 4, 37), rng.integers(0, 4, 23)
        blocks = inf.per_class(mask_columns_of(masks), inf.Outcomes(values, binary), y_tr, y_te, budget)
        assert sorted(b.label for b in blocks) == [0, 1, 2, 3]
        for b in blocks:
            np.testing.assert_array_equal(y_tr[b.train], b.label)
            np.testing.assert_allclose(b.infl, ref["est"][np.ix_(b.train, b.test)], atol=2e-4)
            np.testing.assert_allclose(b.se, ref["se"][np.ix_(b.train, b.test)], atol=2e-4)


@pytest.mark.parametrize("budget", [150 * inf.BYTES_PER_CELL, 2**30])
def test_top_k_and_threshold_pairs_equal_reference(budget):
    masks, trc, tec, _, _ = random_runs(t=80, n=45, n_test=19, seed=5)
    out = inf.Outcomes(tec, True)
    top = inf.top_k(mask_columns_of(masks), out, 45, k=4, threshold=0.1017, budget_bytes=budget)
    infl = reference_influence(masks, tec)
    expected = reference_top_k(infl, 4)
    for j in range(19):
        assert top.train[j].tolist() == expected[j], j
        np.testing.assert_allclose(top.infl[j], infl[expected[j], j], atol=2e-6)
    full = reference_influence(masks, tec, full=True)
    np.testing.assert_allclose(top.se, full["se"][top.train, np.arange(19)[:, None]], atol=2e-6)
    np.testing.assert_allclose(top.ci_low, full["ci_low"][top.train, np.arange(19)[:, None]], atol=2e-6)
    np.testing.assert_allclose(top.pairs_se, full["se"][top.pairs_train, top.pairs_test], atol=2e-6)
    got = set(zip(top.pairs_train.tolist(), top.pairs_test.tolist()))
    assert got == {(i, j) for i, j in zip(*np.nonzero(infl >= 0.1017))}  # no count ratio hits 0.1017
    assert len(got) > 0


def test_tiles_respect_the_budget():
    rows, cols = inf.tile_shape(1_281_167, 50_000, 2**30)
    assert rows * cols * inf.BYTES_PER_CELL <= 2**30 and rows >= 1 and cols >= 1


def test_pairs_equal_loop_reference():
    masks, trc, tec, _, _ = random_runs(t=60, n=40, n_test=25, seed=3)
    stats = fold_all(masks, trc, tec, [slice(None)])
    mem = est.memorization(stats).mem
    d = est.influence(stats)
    rng = np.random.default_rng(1)
    y_tr, y_te = rng.integers(0, 3, 40), rng.integers(0, 3, 25)
    for same_class in (True, False):
        pairs = est.high_influence_pairs(mem, d.est, y_tr, y_te, 0.1, 0.1, same_class, d.se)
        expected = reference_pairs(mem, d.est, y_tr, y_te, 0.1, 0.1, same_class)
        assert set(zip(pairs.train.tolist(), pairs.test.tolist())) == expected
        assert len(expected) > 0
        assert np.all(np.diff(pairs.infl) <= 0)  # sorted by decreasing influence
        np.testing.assert_array_equal(pairs.mem, mem[pairs.train])
        np.testing.assert_array_equal(pairs.se, d.se[pairs.train, pairs.test])
        # the same selection from candidate pairs (what top-k mode does)
        r, j = np.nonzero(d.est >= 0.05)
        cand = est.select_pairs(r, j, d.est[r, j], mem)
        again = est.filter_pairs(cand, mem, y_tr, y_te, 0.1, 0.1, same_class)
        np.testing.assert_array_equal(again.train, pairs.train)
        np.testing.assert_array_equal(again.test, pairs.test)


def test_fold_rejects_wrong_shapes():
    stats = st.zeros(5, 3)
    with pytest.raises(ValueError, match=r"mask of shape \(runs, 5\)"):
        st.fold(stats, np.ones((2, 4), bool), {"correct": np.ones((2, 4))}, {"correct": np.ones((2, 3))})
    with pytest.raises(ValueError, match=r"test values of 'correct' of shape \(2, 3\)"):
        st.fold(stats, np.ones((2, 5), bool), {"correct": np.ones((2, 5))}, {"correct": np.ones((2, 4))})
    with pytest.raises(ValueError, match=r"expected values of targets \['correct'\]"):
        st.fold(stats, np.ones((2, 5), bool), {"margin": np.ones((2, 5))}, {"margin": np.ones((2, 3))})


def test_stats_round_trip_through_arrays():
    masks, trc, tec, trm, tem = random_runs()
    for dense in (True, False):
        stats = fold_all(masks, trc, tec, [slice(None)], trm, tem, dense=dense)
        back = st.Stats.from_arrays(stats.arrays())
        assert back.targets["margin"].binary is False and back.targets["correct"].binary is True
        for k, v in stats.arrays().items():
            np.testing.assert_array_equal(v, back.arrays()[k])


def test_cscore_and_table1():
    a = np.array([0.2, np.nan, 0.6])
    b = np.array([0.4, np.nan, np.nan])
    np.testing.assert_allclose(est.cscore([a, b]), [0.3, np.nan, 0.6])
    pairs = est.Pairs(train=np.array([0, 1, 2]), test=np.array([5, 5, 7]), infl=np.ones(3), mem=np.ones(3))
    assert est.table1(pairs, 10) == {"pairs": 3, "test_examples": 2, "test_examples_with_one_influencer": 1}


def test_error_bound_matches_the_paper():
    # paper.md: 0.049 RMS at t = 2,000 and 0.035 at t = 4,000, subset ratio 0.7
    assert est.error_bound(2000, 0.7) == pytest.approx(np.sqrt(0.00238), abs=5e-4)
    assert est.error_bound(4000, 0.7) == pytest.approx(0.0345, abs=5e-4)
    assert est.error_bound(4000, 0.3) == est.error_bound(4000, 0.7)


def test_estimators_stay_pure():
    # house rule: no Ray, storage or I/O imports in estimators/, nor any other room of the project
    # (module-level and function-level imports alike; tests/test_architecture.py checks the other rooms)
    import pathlib
    import re

    for path in pathlib.Path(est.__file__).parent.glob("*.py"):
        text = path.read_text()
        rooms = "ray|pyarrow|pandas|fsspec|s3fs|gcsfs|workers|orchestrator|cluster"
        assert not re.search(rf"^\s*(import|from)\s+({rooms})\b", text, re.M), path
