"""`longtail compare`: paired differences for campaigns that share seed, design and ratio; unpaired otherwise;
a released-format file as B round-trips with longtail's own export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from planted import learner_campaign

from orchestrator.cli import main
from orchestrator.features.compare import CompareError, _compare_unpaired, compare, open_folded


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    return {
        "a": learner_campaign(root / "a", name="a", leaky=()),
        "same": learner_campaign(root / "same", name="same", leaky=()),  # the identical recipe
        "leaky": learner_campaign(root / "leaky", name="leaky", leaky=(3, 8, 21)),  # another recipe, same seed
        "reseeded": learner_campaign(root / "reseeded", name="reseeded", leaky=(3, 8, 21), seed=5),
    }


def test_identical_recipes_with_the_same_seed_give_zero_difference(campaigns):
    comp, _ = compare(str(campaigns["a"].paths.root), str(campaigns["same"].paths.root), test_ids=[0, 4])
    assert comp.paired
    np.testing.assert_array_equal(comp.mem_diff, 0.0)
    np.testing.assert_array_equal(comp.mem_se, 0.0)
    np.testing.assert_array_equal(comp.out_diff, 0.0)
    np.testing.assert_array_equal(comp.infl_diff, 0.0)
    np.testing.assert_array_equal(comp.mem_a, comp.mem_b)


def test_paired_errors_are_smaller_than_unpaired_ones_and_the_difference_is_right(campaigns):
    a, b = campaigns["a"], campaigns["leaky"]
    comp, _ = compare(str(a.paths.root), str(b.paths.root), test_ids=[1, 2, 3])
    assert comp.paired and "same campaign seed" in comp.why
    A, B = open_folded(str(a.paths.root)), open_folded(str(b.paths.root))
    unpaired = _compare_unpaired(A, B, np.array([1, 2, 3]), "test")
    # the same point estimate either way (both sides use all 120 runs, which are the common runs) ...
    np.testing.assert_allclose(comp.mem_diff, unpaired.mem_diff, atol=1e-12)
    # ... but only the leaky examples differ run by run: elsewhere the paired error is 0, there it is smaller
    others = np.setdiff1d(np.arange(30), [3, 8, 21])
    np.testing.assert_array_equal(comp.mem_se[others], 0.0)
    assert (unpaired.mem_se[others] > 0.05).all()
    assert (comp.mem_se[[3, 8, 21]] < 0.8 * unpaired.mem_se[[3, 8, 21]]).all()
    # the planted examples' memorization rose in B: they lead the "decreased most" list of A - B
    assert (comp.mem_diff[[3, 8, 21]] < -0.1).all()
    # a plain recomputation of the paired standard error from the per-run differences
    masks = a.plan.dense()
    da = np.stack([A.read(r).train_correct for r in range(120)]).astype(float)
    db = np.stack([B.read(r).train_correct for r in range(120)]).astype(float)
    d = da - db
    for i in (3, 8, 21):
        x_in, x_out = d[masks[:, i], i], d[~masks[:, i], i]
        se = np.sqrt(x_in.var(ddof=1) / len(x_in) + x_out.var(ddof=1) / len(x_out))
        assert comp.mem_se[i] == pytest.approx(se, rel=1e-10)
        assert comp.mem_diff[i] == pytest.approx(x_in.mean() - x_out.mean(), abs=1e-12)


def test_different_seeds_are_compared_unpaired_and_the_output_says_so(campaigns, tmp_path):
    a, b = campaigns["a"], campaigns["reseeded"]
    result = CliRunner().invoke(main, ["compare", str(a.paths.root), str(b.paths.root), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("UNPAIRED comparison: campaign seed differs (0 in A, 5 in B)")
    summary = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert summary["paired"] is False
    assert (tmp_path / "c" / "index.html").read_text().count("<img") == 1


def test_a_released_format_file_round_trips_with_export(campaigns, tmp_path):
    from orchestrator.estimates_files import export_fz

    a = campaigns["leaky"]
    agg = open_folded(str(a.paths.root))
    matrix, _ = export_fz(agg, tmp_path / "fz")
    comp, _ = compare(str(a.paths.root), str(matrix), test_ids=[0, 5])
    assert not comp.paired
    np.testing.assert_allclose(comp.mem_diff, 0.0, atol=1e-6)  # float32 in the file
    np.testing.assert_allclose(comp.infl_diff[np.isfinite(comp.infl_b)], 0.0, atol=1e-6)
    y_tr, y_te = a.labels["train_labels"], a.labels["test_labels"]
    same_class = y_tr[:, None] == y_te[[0, 5]][None]  # the released blocks hold same-class pairs only
    np.testing.assert_array_equal(np.isfinite(comp.infl_b), same_class)
    # a file in another example order, with its index map, gives the same
    rng = np.random.default_rng(0)
    perm = rng.permutation(30)  # file position k holds campaign example perm[k]
    with np.load(matrix, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    inverse = np.argsort(perm)
    arrays["tr_mem"] = arrays["tr_mem"][perm]
    arrays["tr_labels"] = arrays["tr_labels"][perm]
    for k in [k for k in arrays if k.startswith("tr_classidx_")]:
        arrays[k] = inverse[arrays[k]]
    np.savez(tmp_path / "shuffled.npz", **arrays)
    np.save(tmp_path / "map.npy", perm)
    comp2, _ = compare(str(a.paths.root), str(tmp_path / "shuffled.npz"), test_ids=[0, 5],
                       index_map=str(tmp_path / "map.npy"))
    np.testing.assert_allclose(comp2.mem_diff, 0.0, atol=1e-6)
    np.testing.assert_array_equal(np.isfinite(comp2.infl_b), np.isfinite(comp.infl_b))
    # without the map the labels disagree, and compare says so
    with pytest.raises(CompareError, match="tr_labels differ"):
        compare(str(a.paths.root), str(tmp_path / "shuffled.npz"))


def test_campaigns_on_different_datasets_are_refused(campaigns, tmp_path):
    other = learner_campaign(tmp_path / "other", name="other", n_test=12, runs=4)
    result = CliRunner().invoke(main, ["compare", str(campaigns["a"].paths.root), str(other.paths.root)])
    assert result.exit_code == 2
    assert "different datasets" in result.output and "Traceback" not in result.output
