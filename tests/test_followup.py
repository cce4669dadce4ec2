"""`longtail utility` (orchestrator/features/utility.py): the paper's Fig. 2 and Sec. 3.3 follow-up experiments,
end to end on a small 1-nearest-neighbour campaign whose memorized examples are planted.

The dataset `twins` (below, imported by the workers as `test_followup:twins`) has three far-apart
classes of typical examples and, beside each class, rare subpopulations labelled as another class:
"singles" (one training example and its test twin) and "doubles" (two training copies and a test
twin). 1-NN gets a single's twin right exactly when the single is trained on, so a single's
memorization and its influence on its twin are 1, a double copy's about 1/2, a typical example's 0.
Removing the memorized examples therefore costs the rare test twins; removing as many random ones
rarely does. 1-NN is deterministic given the training set, so every accuracy is checked exactly.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.cli import main
from orchestrator.driver import run_campaign
from orchestrator.features.utility import (FULL, MEMORIZED, PAIRS, RANDOM, UtilityError, conditions, drop, mean_se,
                                   memorized, parse_thresholds, utility_run_id, utility_streams)
from workers.datasets import Dataset

SINGLES, DOUBLES = 6, 3  # rare subpopulations, two singles and one double beside each class


def twins(section: dict) -> Dataset:
    rng = np.random.default_rng(section.get("seed", 0))
    classes, dim = 3, 10
    centres = 20.0 * np.eye(classes, dim)
    xs, ys, xt, yt = [], [], [], []
    for c in range(classes):  # typical examples: a tight cluster per class
        xs.append(centres[c] + rng.normal(0, 1, (15, dim)))
        ys += [c] * 15
        xt.append(centres[c] + rng.normal(0, 1, (8, dim)))
        yt += [c] * 8
    # Rare subpopulations 6 units from a class centre along their own axis (3..5, so they are at least
    # 8.5 apart), labelled as the next class: left out, their nearest neighbour is a typical example.
    for k in range(SINGLES + DOUBLES):
        c, axis = k % classes, 3 + k // classes
        loc = centres[c] + 6.0 * np.eye(dim)[axis]
        copies = 1 if k < SINGLES else 2
        xs.append(loc + rng.normal(0, 0.01, (copies, dim)))
        ys += [(c + 1) % classes] * copies
        xt.append(loc + rng.normal(0, 0.01, (1, dim)))
        yt.append((c + 1) % classes)
    return Dataset("twins", np.vstack(xs).astype(np.float32), np.array(ys), np.vstack(xt).astype(np.float32),
                   np.array(yt), classes)


SPEC = """
[campaign]
name = "twins"
seed = 3
runs = 40
subset_ratio = 0.5
[dataset]
name = "test_followup:twins"
[model]
name = "mlp"
[train]
trainer = "plugins:nearest_neighbour"
[estimates]
influence = "dense"
checkpoint_seconds = 60
"""


def one_nn_accuracy(data: Dataset, keep: np.ndarray) -> np.ndarray:
    """Test correctness of 1-NN trained on the examples where `keep` is True, computed here directly."""
    x = data.x_train[keep]
    d = ((data.x_test[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return data.y_train[keep][d.argmin(axis=1)] == data.y_test


@pytest.fixture(scope="module")
def campaign(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("utility") / "c"
    c = create_or_open(specs.loads(SPEC, "twins.toml"), root)
    run_campaign(c, progress=False)
    return c


def invoke(*args):
    # through the `longtail` group: its one handler prints user errors (orchestrator/cli.py)
    return CliRunner().invoke(main, ["utility", *map(str, args)], catch_exceptions=False)


# --- pure parts -----------------------------------------------------------------------------------


def test_parse_thresholds():
    assert parse_thresholds("0.5, 0.25,0.5") == [0.25, 0.5]
    for bad, why in (("0.25,,0.5", "empty item"), ("a", "'a' is not a number"), ("0", "(0, 1]"), ("1.5", "(0, 1]"),
                     ("", "empty item")):
        with pytest.raises(UtilityError, match=re.escape(why)):
            parse_thresholds(bad)


def test_conditions_skip_nothing_and_refuse_everything():
    mem = np.array([0.9, 0.3, 0.0, np.nan, 0.6])
    notes = []
    conds = conditions(mem, [0.25, 0.95], np.array([4, 4, 0]), notes.append)
    assert [(c.name, c.kind, c.removed) for c in conds] == [
        ("full", FULL, 0), ("memorized-0.25", MEMORIZED, 3), ("random-0.25", RANDOM, 3), ("pairs", PAIRS, 2)]
    assert conds[1].fixed.tolist() == [0, 1, 4] and conds[3].fixed.tolist() == [0, 4]
    assert len(notes) == 1 and "threshold 0.95 removes nothing" in notes[0] and "largest estimate is 0.900" in notes[0]
    with pytest.raises(UtilityError, match="removes all 3 training examples"):
        conditions(np.array([0.5, 0.6, 0.7]), [0.5], None)
    assert memorized(mem, 0.6).tolist() == [0, 4]  # NaN never qualifies


def test_statistics_and_seeds():
    m, se = mean_se([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and se == pytest.approx(0.2 / np.sqrt(3))
    assert np.isnan(mean_se([0.4])[1]) and np.isnan(mean_se([])[0])
    d, dse = drop((0.9, 0.03), (0.8, 0.04))
    assert d == pytest.approx(0.1) and dse == pytest.approx(0.05)
    rng_a, seed_a = utility_streams(3, "random-0.25", 1)
    rng_b, seed_b = utility_streams(3, "random-0.25", 1)
    assert seed_a == seed_b and rng_a.integers(1 << 30) == rng_b.integers(1 << 30)
    assert len({utility_streams(3, c, r)[1] for c in ("full", "random-0.25") for r in range(3)}) == 6
    assert utility_streams(4, "full", 0)[1] != utility_streams(3, "full", 0)[1]
    assert utility_run_id("full", 0) == utility_run_id("full", 0) != utility_run_id("full", 1)


# --- end to end -----------------------------------------------------------------------------------


def test_utility_end_to_end(campaign, tmp_path):
    c = campaign
    data = twins({})
    root = c.paths.root
    r = invoke(root, "--thresholds", "0.25,0.75", "--runs", 3, "--no-progress")
    assert r.exit_code == 0, r.output
    table = pd.read_parquet(root / "utility" / "utility.parquet").set_index("name")
    summary = json.loads((root / "utility" / "summary.json").read_text())
    mem = pd.read_parquet(c.paths.memorization).sort_values("example")["mem"].to_numpy()
    pairs = pd.read_parquet(c.paths.pairs)
    n, nt = c.n_train, c.n_test

    # the planted structure came out as designed: singles memorized fully
    rare = np.arange(45, n)  # singles, then the doubles' copies
    assert (mem[45:45 + SINGLES] == 1).all() and (mem[:45] <= 0).all()

    full = one_nn_accuracy(data, np.ones(n, bool)).mean()
    # 1-NN is deterministic: every model of a condition with a fixed removed set gets the same accuracy
    assert table.loc["full", "acc_mean"] == pytest.approx(full) and table.loc["full", "acc_se"] == 0
    assert table.loc["full", "runs"] == 3 and table.loc["full", "removed"] == 0

    for t in (0.25, 0.75):
        gone = np.flatnonzero(mem >= t)
        assert set(range(45, 45 + SINGLES)) <= set(gone) and set(gone) <= set(rare)
        keep = np.ones(n, bool)
        keep[gone] = False
        row = table.loc[f"memorized-{t:g}"]
        assert (row["removed"], row["removed_share"], row["threshold"]) == (len(gone), len(gone) / n, t)
        assert row["acc_mean"] == pytest.approx(one_nn_accuracy(data, keep).mean()) and row["acc_se"] == 0
        assert row["drop"] == pytest.approx(full - row["acc_mean"]) and row["drop_se"] == 0
        # random removal: as many examples, a fresh uniform draw per model, accuracies recomputed here
        rand = table.loc[f"random-{t:g}"]
        accs, masks = [], []
        for rep in range(3):
            shard = pd.read_parquet(root / "utility" / "runs" / f"random-{t:g}-r{rep}.parquet")
            train = shard[shard.split == "train"].sort_values("example")
            mask = train.in_subset.to_numpy(bool)
            assert (~mask).sum() == len(gone)
            masks.append(mask)
            accs.append(one_nn_accuracy(data, mask).mean())
        assert len({m.tobytes() for m in masks}) == 3
        assert rand["removed"] == len(gone) and rand["acc_mean"] == pytest.approx(np.mean(accs))
        assert rand["acc_se"] == pytest.approx(np.std(accs, ddof=1) / np.sqrt(3))
        assert rand["drop"] == pytest.approx(full - np.mean(accs))
        assert rand["drop_se"] == pytest.approx(rand["acc_se"])  # the baseline's se is 0
        # the paper's finding, robust here: at most 2 of ~10 random removals hit a rare example
        assert row["drop"] > rand["drop"] + 0.1

    # the pairs experiment: S minus the training examples of the high-influence pairs
    assert len(pairs) >= SINGLES
    s_h = np.unique(pairs["train"])
    influenced = np.unique(pairs["test"])
    keep = np.ones(n, bool)
    keep[s_h] = False
    p = table.loc["pairs"]
    right = one_nn_accuracy(data, keep)
    base_right = one_nn_accuracy(data, np.ones(n, bool))
    assert p["removed"] == len(s_h) and p["acc_mean"] == pytest.approx(right.mean())
    assert p["acc_influenced_mean"] == right[influenced].mean() == 0  # every rare twin lost its neighbour
    assert table.loc["full", "acc_influenced_mean"] == base_right[influenced].mean() == 1
    assert p["drop_influenced"] == 1 and p["drop"] == pytest.approx(base_right.mean() - right.mean())
    assert summary["pairs"]["influenced_test_examples"] == len(influenced)
    assert summary["pairs"]["influenced_share_of_drop"] == pytest.approx(len(influenced) / nt)
    assert "the influenced test examples account for" in r.output and "S minus S_h" in r.output
    assert "memorized-0.25" in r.output and "trained 18 follow-up runs now, 0 were already done" in r.output
    assert summary["runs_per_condition"] == 3 and summary["estimates_runs"] == 40

    # rerunning trains nothing and changes no result
    shards = sorted((root / "utility" / "runs").iterdir())
    stamps = [s.stat().st_mtime_ns for s in shards]
    again = invoke(root, "--thresholds", "0.25,0.75", "--runs", 3, "--no-progress")
    assert again.exit_code == 0 and "trained 0 follow-up runs now, 18 were already done" in again.output
    assert [s.stat().st_mtime_ns for s in shards] == stamps
    assert pd.read_parquet(root / "utility" / "utility.parquet").set_index("name").equals(table)

    # a shard that trained on another set (here: another condition's) is moved aside and that model retrained
    runs_dir = root / "utility" / "runs"
    os.replace(runs_dir / "memorized-0.25-r0.parquet", runs_dir / "random-0.25-r1.parquet")
    third = invoke(root, "--thresholds", "0.25,0.75", "--runs", 3, "--no-progress")
    assert third.exit_code == 0, third.output
    assert "trained 2 follow-up runs now, 16 were already done" in third.output
    assert "random-0.25-r1.parquet is not usable" in third.output
    assert len(list((root / "utility" / "stale").glob("random-0.25-r1.parquet.*.why.txt"))) == 1
    assert pd.read_parquet(root / "utility" / "utility.parquet").set_index("name").equals(table)


def test_utility_errors(campaign, tmp_path):
    r = invoke(campaign.paths.root, "--thresholds", "0.25;0.5")
    assert r.exit_code == 2 and "'0.25;0.5' is not a number" in r.output
    r = invoke(tmp_path / "nowhere", "--thresholds", "0.25")
    assert r.exit_code == 2 and "is not a campaign directory" in r.output
    fresh = create_or_open(specs.loads(SPEC, "twins.toml"), tmp_path / "fresh")  # planned, nothing run yet
    r = invoke(fresh.paths.root, "--thresholds", "0.25")
    assert r.exit_code == 2 and "no estimates yet" in r.output and "longtail resume" in r.output
    assert not (tmp_path / "fresh" / "utility").exists()
