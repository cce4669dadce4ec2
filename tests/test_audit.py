"""`longtail audit`: targets of three kinds, a campaign run never scored against itself, foreign data refused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from planted import learner_campaign

from estimators import privacy as pv
from orchestrator.features.audit import AuditError, load_target, open_for_audit, score
from orchestrator.cli import main


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return learner_campaign(tmp_path_factory.mktemp("audit") / "c", runs=160, leaky=tuple(range(0, 30, 3)),
                            spread=2.0)


def test_audit_of_held_out_runs_prints_and_writes_the_attacks_side_by_side(campaign, tmp_path):
    out = tmp_path / "audit"
    result = CliRunner().invoke(main, ["audit", str(campaign.paths.root), "--runs", "140:160", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "membership known for 20 targets" in result.output
    for attack in ("online", "offline", "threshold"):
        assert f"\n{attack} " in result.output
    report = json.loads((out / "audit.json").read_text())
    m = report["metrics"]
    assert m["members"] + m["non_members"] == 20 * 30
    # ten planted examples leak their membership through the margin; the others only through their twin's:
    # the likelihood ratio, which knows each example's own in and out fits, beats one global threshold
    assert m["online"]["auc"] > m["threshold"]["auc"] + 0.05
    assert m["online"]["tpr_at_fpr_0.01"] > m["threshold"]["tpr_at_fpr_0.01"]
    scores = pq.read_table(out / "run-000150.parquet").to_pandas()
    agg = open_for_audit(str(campaign.paths.root))
    data = agg.read(150)
    np.testing.assert_allclose(scores["statistic"], data.train_values["margin"])
    np.testing.assert_array_equal(scores["member"], data.mask)


def test_a_campaign_run_is_taken_out_but_a_table_of_the_same_outputs_is_not(campaign, tmp_path):
    agg = open_for_audit(str(campaign.paths.root))
    data = agg.read(7)
    x = agg.risk_statistic(data)
    as_run = score(agg, load_target(agg, str(campaign.paths.shard(7))), global_variance=False)
    path = tmp_path / "mine.csv"
    pcsv.write_csv(pa.table({"example": np.arange(30)[::-1], "statistic": x[::-1], "member": data.mask[::-1]}), path)
    as_table = score(agg, load_target(agg, str(path)), global_variance=False)
    assert as_table.target.kind == "table" and as_run.target.kind == "run"
    full = pv.fit(agg.risk, global_variance=False)
    without = pv.fit(pv.without_run(agg.risk, data.mask, x), global_variance=False)
    np.testing.assert_allclose(as_table.online, pv.online_score(full, x), rtol=1e-12)
    np.testing.assert_allclose(as_run.online, pv.online_score(without, x), rtol=1e-12)
    np.testing.assert_allclose(as_run.offline, pv.offline_score(without, x), rtol=1e-12)
    assert not np.allclose(as_run.online, as_table.online)  # the run's own contribution did matter
    np.testing.assert_array_equal(as_table.target.members, data.mask)  # rows were mapped by example id


def test_a_logits_table_gives_the_campaigns_statistic(campaign, tmp_path):
    agg = open_for_audit(str(campaign.paths.root))
    x = agg.risk_statistic(agg.read(3))
    y = campaign.labels["train_labels"]
    logits = np.zeros((30, 2))
    logits[np.arange(30), y] = x  # margin = correct logit - the other
    path = tmp_path / "logits.parquet"
    pq.write_table(pa.table({"example": np.arange(30), "logit_0": logits[:, 0], "logit_1": logits[:, 1],
                             "label": y}), path)
    t = load_target(agg, str(path))
    np.testing.assert_allclose(t.statistic, x, rtol=1e-12)
    assert t.members is None


def test_a_shard_of_another_campaign_on_the_same_dataset_is_scored_with_its_own_membership(campaign, tmp_path):
    other = learner_campaign(tmp_path / "other", name="other", seed=9, runs=3, leaky=tuple(range(0, 30, 3)),
                             spread=2.0)
    agg = open_for_audit(str(campaign.paths.root))
    t = load_target(agg, str(other.paths.shard(2)))
    assert t.kind == "shard" and t.run is None
    np.testing.assert_array_equal(t.members, other.plan.mask(2))


def test_audit_refuses_a_target_from_a_different_dataset(campaign, tmp_path):
    other = learner_campaign(tmp_path / "elsewhere", name="elsewhere", n_test=12, runs=2)
    result = CliRunner().invoke(main, ["audit", str(campaign.paths.root), str(other.paths.shard(0)),
                                       "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "another dataset" in result.output and "fingerprint" in result.output
    assert "Traceback" not in result.output
    # a table whose labels are not the campaign's is refused too
    agg = open_for_audit(str(campaign.paths.root))
    bad = tmp_path / "bad.csv"
    pcsv.write_csv(pa.table({"example": np.arange(30), "statistic": np.zeros(30),
                             "label": 1 - campaign.labels["train_labels"]}), bad)
    with pytest.raises(AuditError, match="30 of its labels differ"):
        load_target(agg, str(bad))
