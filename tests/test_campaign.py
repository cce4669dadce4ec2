"""Whole campaigns on the session's Ray: estimates equal the reference computed from the campaign's own
shards, a finished campaign trains nothing when run again, and planted memorization is found."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from estimators.reference import reference_influence, reference_memorization
from orchestrator import spec as specs
from orchestrator.campaign import SpecMismatchError, create_or_open
from orchestrator.driver import run_campaign

DIGITS = """
[campaign]
name = "{name}"
seed = 5
runs = {runs}
[dataset]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[train]
epochs = 2
batch_size = 64
[resources]
cpus_per_worker = 1
[estimates]
block_runs = 5
checkpoint_seconds = 0.5
"""


def digits_spec(name="t", runs=12, extra=""):
    return specs.loads(DIGITS.format(name=name, runs=runs) + extra, "test.toml")


def stack_shards(root):
    """Masks and correctness of every shard, read with plain pyarrow: the campaign's own oracle."""
    files = sorted((root / "runs").glob("run-*.parquet"))
    masks, trc, tec = [], [], []
    for f in files:
        t = pq.read_table(f).to_pandas()
        tr = t[t.split == "train"].sort_values("example")
        te = t[t.split == "test"].sort_values("example")
        masks.append(tr.in_subset.to_numpy(bool))
        trc.append(tr.correct.to_numpy(bool))
        tec.append(te.correct.to_numpy(bool))
    return np.array(masks), np.array(trc), np.array(tec)


def assert_estimates_match_shards(root):
    masks, trc, tec = stack_shards(root)
    ref = reference_memorization(masks, trc)
    mem = pq.read_table(root / "estimates" / "memorization.parquet").to_pandas().sort_values("example")
    for key in ("mem", "se", "n_in", "n_out", "acc_in", "acc_out"):
        np.testing.assert_allclose(mem[key].to_numpy(float), ref[key], rtol=1e-10, atol=1e-12, err_msg=key)
    infl = np.load(root / "estimates" / "influence.npy", allow_pickle=False)
    np.testing.assert_allclose(infl, reference_influence(masks, tec), rtol=0, atol=3e-6)
    return masks


def test_campaign_estimates_equal_reference(ray_session, tmp_path):
    c = create_or_open(digits_spec(runs=12), tmp_path / "c")
    report = run_campaign(c, progress=False)
    assert report.trained == 12 and report.complete and not report.failed
    masks = assert_estimates_match_shards(tmp_path / "c")
    np.testing.assert_array_equal(masks, c.plan.dense())  # each run trained on its planned subset
    summary = json.loads((tmp_path / "c" / "estimates" / "summary.json").read_text())
    assert summary["runs"] == {"planned": 12, "folded": 12}
    assert summary["counts"]["n_in"]["min"] + summary["counts"]["n_out"]["max"] == 12
    assert 0.3 < summary["test_accuracy"]["mean"] <= 1
    assert (tmp_path / "c" / "state" / "fold.npz").exists()
    assert not list((tmp_path / "c").rglob(".*.tmp-*"))


def test_rerun_of_a_finished_campaign_trains_nothing(ray_session, tmp_path, monkeypatch):
    run_campaign(create_or_open(digits_spec(runs=6), tmp_path / "c"), progress=False)
    shards = sorted((tmp_path / "c" / "runs").glob("*.parquet"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    import orchestrator.driver as driver

    monkeypatch.setattr(driver, "_dispatch", lambda *a, **k: pytest.fail("dispatched work for a finished campaign"))
    report = run_campaign(create_or_open(digits_spec(runs=6), tmp_path / "c"), progress=False)
    assert report.trained == 0 and report.already_done == 6 and report.complete
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards} == before


def test_growing_a_campaign_trains_only_the_new_runs(ray_session, tmp_path):
    run_campaign(create_or_open(digits_spec(runs=5), tmp_path / "c"), progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / "runs").glob("*.parquet")}
    c = create_or_open(digits_spec(runs=9), tmp_path / "c")
    assert any("extended the plan from 5 to 9 runs" in n for n in c.notes)
    report = run_campaign(c, progress=False)
    assert report.trained == 4 and report.already_done == 5
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / "runs").glob("*.parquet")}
    assert all(after[k] == v for k, v in first.items())
    assert_estimates_match_shards(tmp_path / "c")


def test_unfolded_shards_are_folded_once_on_resume(ray_session, tmp_path):
    run_campaign(create_or_open(digits_spec(runs=6), tmp_path / "c"), progress=False)
    (tmp_path / "c" / "state" / "fold.npz").unlink()  # as if the driver died before its first checkpoint
    report = run_campaign(create_or_open(None, tmp_path / "c"), progress=False)
    assert report.trained == 0
    assert_estimates_match_shards(tmp_path / "c")
    with np.load(tmp_path / "c" / "state" / "fold.npz") as z:
        assert int(z["group0.runs"]) == 6 and z["folded"].all()


def test_a_spec_that_changes_results_is_refused(ray_session, tmp_path):
    create_or_open(digits_spec(runs=4), tmp_path / "c")
    changed = digits_spec(runs=4, extra="").replace(train=specs.parse_section(
        specs.TrainSection, {"epochs": 3, "batch_size": 64}, "x"))
    with pytest.raises(SpecMismatchError, match=r"train.epochs: 2 in .*campaign.toml, 3 in the new spec"):
        create_or_open(changed, tmp_path / "c")
    with pytest.raises(SpecMismatchError, match="can grow but not shrink"):
        create_or_open(digits_spec(runs=3), tmp_path / "c")
    # what only changes how the work is done is accepted and recorded
    c = create_or_open(digits_spec(runs=4, extra="").replace(resources=specs.ResourcesSection(workers=1)),
                       tmp_path / "c")
    assert "workers = 1" in (tmp_path / "c" / "campaign.toml").read_text()
    assert any("[resources]" in n for n in c.notes)


def test_refuses_a_non_campaign_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("x")
    from orchestrator.campaign import CampaignError

    with pytest.raises(CampaignError, match="is not empty and holds no campaign.toml"):
        create_or_open(digits_spec(), tmp_path / "c")


MIXTURE = """
[campaign]
name = "mix"
runs = 30
[dataset]
name = "longtail-mixture"
n_train = 400
n_test = 200
subpopulations = 100
mislabeled = 4
[model]
name = "mlp"
hidden = [256]
[train]
optimizer = "adam"
lr = 0.01
epochs = 30
batch_size = 64
weight_decay = 0.0
"""


def test_planted_mislabeled_examples_are_memorized(ray_session, tmp_path):
    c = create_or_open(specs.loads(MIXTURE, "mix.toml"), tmp_path / "mix")
    run_campaign(c, progress=False)
    mem = pq.read_table(tmp_path / "mix" / "estimates" / "memorization.parquet").to_pandas().set_index("example")
    planted = c.dataset.info["mislabeled"]
    assert len(planted) == 4
    # A planted label is predicted only by models that trained on it: mem ~ 1. With 30 runs (~9 out,
    # ~21 in per example) the standard error is below 0.15, so 0.6 leaves a wide margin.
    assert (mem.loc[planted, "mem"] > 0.6).all(), mem.loc[planted]
    others = mem.drop(index=planted)
    assert others["mem"].median() < 0.1
    # memorized examples are rarer than planted ones score: the planted ones rank near the top
    assert (mem["mem"].rank(ascending=False).loc[planted] <= 0.25 * len(mem)).all()
    assert "group" in mem.columns


def test_plugin_trainer_campaign_gives_exact_values(ray_session, tmp_path):
    """1-nearest-neighbour is deterministic: every estimate is a known function of the plan."""
    spec = specs.loads("""
[campaign]
name = "knn"
runs = 20
subset_ratio = 0.5
[dataset]
name = "plugins:gaussian_blobs"
n_train = 60
n_test = 30
[model]
name = "mlp"
[train]
trainer = "plugins:nearest_neighbour"
""", "knn.toml")
    c = create_or_open(spec, tmp_path / "knn")
    run_campaign(c, progress=False)
    import plugins

    d = c.dataset
    masks = c.plan.dense()
    trc = np.array([plugins.nearest_neighbour(d, np.flatnonzero(m), 0)[0] == d.y_train for m in masks])
    tec = np.array([plugins.nearest_neighbour(d, np.flatnonzero(m), 0)[1] == d.y_test for m in masks])
    mem = pq.read_table(tmp_path / "knn" / "estimates" / "memorization.parquet").to_pandas()
    np.testing.assert_allclose(mem["mem"], reference_memorization(masks, trc)["mem"])
    infl = np.load(tmp_path / "knn" / "estimates" / "influence.npy")
    np.testing.assert_allclose(infl, reference_influence(masks, tec), atol=3e-6)
    assert (mem["acc_in"] == 1).all()  # 1-NN always gets its own training examples right


def test_a_failing_run_is_recorded_and_the_campaign_goes_on(ray_session, tmp_path):
    spec = specs.loads("""
[campaign]
name = "flaky"
runs = 6
[dataset]
name = "plugins:gaussian_blobs"
[model]
name = "mlp"
[train]
trainer = "plugins:fails_on_odd_seeds"
[resources]
max_failures = 6
""", "flaky.toml")
    c = create_or_open(spec, tmp_path / "f")
    report = run_campaign(c, progress=False)
    odd = [r for r in range(6) if c.plan.seeds[r] % 2]
    assert report.failed == odd and report.trained == 6 - len(odd) and not report.complete
    record = json.loads(c.paths.failure(odd[0]).read_text())
    assert record["reason"].startswith("RuntimeError: seed") and "in fails_on_odd_seeds" in record["traceback"]
    assert record["host"] and "\x1b[" not in record["traceback"]
    summary = json.loads(c.paths.summary.read_text())
    assert summary["failed_runs"] == len(odd) and summary["runs"]["folded"] == 6 - len(odd)
    assert not os.path.exists(c.paths.shard(odd[0]))


def test_estimates_exist_before_the_last_run_ends(ray_session, tmp_path):
    import threading
    import time

    spec = specs.loads("""
[campaign]
name = "live"
runs = 24
[dataset]
name = "plugins:gaussian_blobs"
[model]
name = "mlp"
[train]
trainer = "plugins:slow_nearest_neighbour"
[estimates]
checkpoint_seconds = 0.3
""", "live.toml")
    c = create_or_open(spec, tmp_path / "live")
    thread = threading.Thread(target=run_campaign, args=(c,), kwargs={"progress": False})
    thread.start()
    seen = None
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        if c.paths.summary.exists():
            s = json.loads(c.paths.summary.read_text())
            if not s["complete"] and 0 < s["runs"]["folded"] < 24:
                seen = s
                break
        time.sleep(0.05)
    thread.join()
    assert seen is not None, "no intermediate estimates were written while the campaign ran"
    assert (tmp_path / "live" / "estimates" / "memorization.parquet").exists()
    assert json.loads(c.paths.summary.read_text())["complete"]


def test_a_creation_killed_before_campaign_toml_is_created_again(tmp_path):
    """A driver SIGKILLed while it creates a campaign leaves plan/ and empty directories but no campaign.toml
    (written last); the next `longtail run` creates the campaign again instead of refusing the directory,
    while a directory with anything else in it (a shard, a user's file) is still refused."""
    from orchestrator.campaign import CampaignError

    root = tmp_path / "c"
    first = create_or_open(digits_spec(), root)
    (root / "campaign.toml").unlink()
    (root / "plan" / ".masks.npy.tmp-x1").write_bytes(b"half")  # the killed writer's temporary
    again = create_or_open(digits_spec(), root)
    assert any("creation was interrupted" in n for n in again.notes), again.notes
    assert (root / "campaign.toml").exists() and not (root / "plan" / ".masks.npy.tmp-x1").exists()
    assert np.array_equal(again.plan.masks, first.plan.masks)

    (root / "campaign.toml").unlink()
    (root / "runs" / "run-000000.parquet").write_bytes(b"a shard")
    with pytest.raises(CampaignError, match="is not empty and holds no campaign.toml"):
        create_or_open(digits_spec(), root)
