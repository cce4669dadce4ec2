"""The fast fold against the plain reference, and against values known in closed form."""

import numpy as np
import pytest

from estimators import estimates as est
from estimators import stats as st
from estimators.reference import reference_influence, reference_memorization, reference_pairs


def random_runs(t=40, n=30, n_test=12, p=0.6, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((t, n)) < p
    # correctness depends on membership, as it does for a model that memorizes
    train_correct = rng.random((t, n)) < np.where(masks, 0.95, rng.random(n))
    test_correct = rng.random((t, n_test)) < rng.random(n_test)
    return masks, train_correct, test_correct


def fold_all(masks, train_correct, test_correct, blocks):
    stats = st.zeros(masks.shape[1], test_correct.shape[1])
    for b in blocks:
        st.fold(stats, masks[b], train_correct[b], test_correct[b])
    return stats


def test_fold_equals_reference():
    masks, trc, tec = random_runs()
    stats = fold_all(masks, trc, tec, [slice(None)])
    mem = est.memorization(stats)
    ref = reference_memorization(masks, trc)
    for key in ("mem", "se", "n_in", "n_out", "acc_in", "acc_out"):
        np.testing.assert_allclose(getattr(mem, key), ref[key], rtol=1e-12, atol=1e-12, err_msg=key)
    # float32 epilogue: counts are exact, the divisions round at float32 precision
    np.testing.assert_allclose(est.influence(stats), reference_influence(masks, tec), rtol=0, atol=2e-6)


@pytest.mark.parametrize("seed", range(5))
def test_fold_is_order_and_partition_invariant(seed):
    masks, trc, tec = random_runs(t=50, seed=seed)
    rng = np.random.default_rng(seed)
    whole = fold_all(masks, trc, tec, [slice(None)])
    perm = rng.permutation(50)
    cuts = np.sort(rng.choice(np.arange(1, 50), size=6, replace=False))
    parts = np.split(perm, cuts)
    shuffled = fold_all(masks, trc, tec, parts)
    for k, v in whole.arrays().items():
        np.testing.assert_array_equal(v, shuffled.arrays()[k], err_msg=k)
    # merge of independently folded halves is the same again
    a = fold_all(masks, trc, tec, parts[:3])
    b = fold_all(masks, trc, tec, parts[3:])
    merged = st.merge(a, b)
    for k, v in whole.arrays().items():
        np.testing.assert_array_equal(v, merged.arrays()[k], err_msg=k)


def test_empty_side_is_nan_not_zero():
    masks = np.array([[1, 0], [1, 0], [1, 1]], bool)  # example 0 is never out
    trc = np.ones((3, 2), bool)
    tec = np.ones((3, 1), bool)
    stats = fold_all(masks, trc, tec, [slice(None)])
    mem = est.memorization(stats)
    assert np.isnan(mem.mem[0]) and mem.n_out[0] == 0
    assert mem.mem[1] == 0.0
    assert np.isnan(est.influence(stats)[0, 0])
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
    assert est.influence(stats)[0, 0] == pytest.approx(0.5 - 0.25)


def test_pairs_equal_loop_reference():
    masks, trc, tec = random_runs(t=60, n=40, n_test=25, seed=3)
    stats = fold_all(masks, trc, tec, [slice(None)])
    mem = est.memorization(stats).mem
    infl = est.influence(stats)
    rng = np.random.default_rng(1)
    y_tr, y_te = rng.integers(0, 3, 40), rng.integers(0, 3, 25)
    for same_class in (True, False):
        pairs = est.high_influence_pairs(mem, infl, y_tr, y_te, 0.1, 0.1, same_class)
        expected = reference_pairs(mem, infl, y_tr, y_te, 0.1, 0.1, same_class)
        assert set(zip(pairs.train.tolist(), pairs.test.tolist())) == expected
        assert len(expected) > 0
        assert np.all(np.diff(pairs.infl) <= 0)  # sorted by decreasing influence
        np.testing.assert_array_equal(pairs.mem, mem[pairs.train])


def test_fold_rejects_wrong_shapes():
    stats = st.zeros(5, 3)
    with pytest.raises(ValueError, match=r"shape \(runs, 5\)"):
        st.fold(stats, np.ones((2, 4), bool), np.ones((2, 4), bool), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"test_correct of shape \(2, 3\)"):
        st.fold(stats, np.ones((2, 5), bool), np.ones((2, 5), bool), np.ones((2, 4), bool))


def test_stats_round_trip_through_arrays():
    masks, trc, tec = random_runs()
    stats = fold_all(masks, trc, tec, [slice(None)])
    back = st.Stats.from_arrays(stats.arrays())
    for k, v in stats.arrays().items():
        np.testing.assert_array_equal(v, back.arrays()[k])


def test_error_bound_matches_the_paper():
    # paper.md: 0.049 RMS at t = 2,000 and 0.035 at t = 4,000, subset ratio 0.7
    assert est.error_bound(2000, 0.7) == pytest.approx(np.sqrt(0.00238), abs=5e-4)
    assert est.error_bound(4000, 0.7) == pytest.approx(0.0345, abs=5e-4)
    assert est.error_bound(4000, 0.3) == est.error_bound(4000, 0.7)


def test_estimators_stay_pure():
    # house rule: no Ray, storage or I/O imports in estimators/
    import pathlib
    import re

    for path in pathlib.Path(est.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(ray|pyarrow|pandas|fsspec|workers|orchestrator)\b", text, re.M), path
