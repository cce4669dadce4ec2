"""The plan: a pure function of (campaign seed, run index), written to plan/ and checked when read."""

import numpy as np
import pytest

from orchestrator import plan as planning
from orchestrator.paths import CampaignPaths


def test_subsets_have_exact_size_and_are_deterministic():
    p = planning.make_plan("fixed", 7, 101, 0.7, 20)
    q = planning.make_plan("fixed", 7, 101, 0.7, 20)
    np.testing.assert_array_equal(p.masks, q.masks)
    np.testing.assert_array_equal(p.seeds, q.seeds)
    dense = p.dense()
    assert dense.shape == (20, 101)
    assert (dense.sum(axis=1) == round(0.7 * 101)).all()
    assert len({row.tobytes() for row in dense}) == 20  # distinct subsets
    assert len(set(p.seeds.tolist())) == 20


def test_run_depends_only_on_seed_and_index():
    long = planning.make_plan("fixed", 3, 50, 0.5, 30)
    short = planning.make_plan("fixed", 3, 50, 0.5, 10)
    np.testing.assert_array_equal(long.masks[:10], short.masks)
    np.testing.assert_array_equal(planning.fixed_mask(3, 17, 50, 25), long.mask(17))
    other = planning.make_plan("fixed", 4, 50, 0.5, 10)
    assert not any(np.array_equal(a, b) for a in other.dense() for b in long.dense())


def test_inclusion_frequency_is_the_subset_ratio():
    p = planning.make_plan("fixed", 0, 200, 0.7, 400)
    share = p.dense().mean(axis=0)
    # each example is in Binomial(400, 0.7) runs: sd of the share is 0.023; 5 sd of slack
    assert np.abs(share - 0.7).max() < 5 * np.sqrt(0.7 * 0.3 / 400)


def test_plan_round_trip_and_extension(tmp_path):
    paths = CampaignPaths(tmp_path)
    paths.make_dirs()
    p = planning.make_plan("fixed", 1, 33, 0.6, 5)
    planning.write_plan(paths, p)
    q = planning.read_plan(paths)
    np.testing.assert_array_equal(p.masks, q.masks)
    assert (q.design, q.n_train, q.ratios, q.runs) == ("fixed", 33, (0.6,), 5)
    assert (q.subset_sizes() == 20).all()
    bits = np.unpackbits(np.load(paths.plan_masks), axis=1, count=33).astype(bool)  # readable without longtail
    np.testing.assert_array_equal(bits, p.dense())
    grown = planning.extend_plan(q, 9)
    np.testing.assert_array_equal(grown.masks[:5], p.masks)
    np.testing.assert_array_equal(grown.masks, planning.make_plan("fixed", 1, 33, 0.6, 9).masks)


def test_tampered_plan_is_detected(tmp_path):
    paths = CampaignPaths(tmp_path)
    paths.make_dirs()
    planning.write_plan(paths, planning.make_plan("fixed", 1, 16, 0.5, 4))
    masks = np.load(paths.plan_masks)
    masks[0, 0] ^= 1
    np.save(paths.plan_masks, masks)
    with pytest.raises(planning.PlanError, match="does not match the checksum"):
        planning.read_plan(paths)


def test_subset_must_leave_examples_in_and_out():
    with pytest.raises(planning.PlanError, match=r"subsets of 3 of the 3 training examples"):
        planning.make_plan("fixed", 0, 3, 0.9, 2)
