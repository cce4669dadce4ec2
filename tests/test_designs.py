"""Subset designs and several subset ratios in one plan."""

import numpy as np
import pytest

from orchestrator import plan as planning


def test_bernoulli_keeps_each_example_with_probability_ratio():
    p = planning.make_plan("bernoulli", 1, 300, 0.3, 400)
    dense = p.dense()
    share = dense.mean(axis=0)
    assert np.abs(share - 0.3).max() < 5 * np.sqrt(0.3 * 0.7 / 400)
    assert dense.sum(axis=1).std() > 0  # sizes vary, unlike the fixed design
    np.testing.assert_array_equal(planning.make_plan("bernoulli", 1, 300, 0.3, 10).masks, p.masks[:10])


def test_balanced_puts_every_example_in_exactly_round_p_t_runs():
    p = planning.make_plan("balanced", 2, 97, 0.7, 30)
    counts = p.dense().sum(axis=0)
    assert (counts == 21).all()
    assert len({row.tobytes() for row in p.dense()}) == 30
    with pytest.raises(planning.PlanError, match="cannot grow"):
        planning.extend_plan(p, 40)
    with pytest.raises(planning.PlanError, match=r"round\(0.99 x 10\) = 10 of the 10 runs"):
        planning.make_plan("balanced", 0, 10, 0.99, 10)


def test_paired_runs_are_complements():
    p = planning.make_plan("paired", 3, 51, 0.5, 20)
    d = p.dense()
    for k in range(10):
        np.testing.assert_array_equal(d[2 * k + 1], ~d[2 * k])
    assert (d[0::2].sum(axis=1) == round(0.5 * 51)).all()
    with pytest.raises(planning.PlanError, match="multiple of 2"):
        planning.make_plan("paired", 3, 51, 0.5, 21)


def test_several_ratios_take_turns():
    p = planning.make_plan("fixed", 0, 100, [0.2, 0.5, 0.8], 12)
    assert p.ratio_of_run.tolist() == [0, 1, 2] * 4
    np.testing.assert_array_equal(p.subset_sizes(), [20, 50, 80] * 4)
    q = planning.make_plan("paired", 0, 100, [0.2, 0.5], 8)
    assert q.ratio_of_run.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    b = planning.make_plan("balanced", 0, 100, [0.2, 0.5], 20)
    for k, c in ((0, 2), (1, 5)):
        assert (b.dense(b.runs_of_ratio(k)).sum(axis=0) == c).all()


def test_columns_read_packed_bits():
    p = planning.make_plan("fixed", 5, 77, 0.4, 9)
    idx = np.array([0, 7, 8, 76, 33, 33])
    runs = np.array([8, 0, 3])
    np.testing.assert_array_equal(p.columns(runs, idx), p.dense()[runs][:, idx])


def test_columns_of_a_contiguous_range():
    p = planning.make_plan("bernoulli", 5, 77, 0.4, 9)
    for a, b in ((0, 77), (3, 20), (8, 16), (70, 77)):
        np.testing.assert_array_equal(p.columns(np.arange(9), np.arange(a, b)), p.dense()[:, a:b])
