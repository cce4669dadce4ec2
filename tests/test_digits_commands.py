"""`longtail utility` and `longtail plan` end to end on digits with the real torch recipe (CI-sized:
a handful of small MLPs), beside the 1-nearest-neighbour tests of test_followup.py and test_pilot.py
that check their numbers exactly."""

import json

import pandas as pd
from click.testing import CliRunner

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.cli import main
from orchestrator.driver import run_campaign

SPEC = """
[campaign]
name = "digits-small"
runs = 24
[dataset]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[train]
epochs = 8
[estimates]
mem_threshold = 0.25
"""


def test_utility_on_digits(ray_session, tmp_path):
    c = create_or_open(specs.loads(SPEC, "digits.toml"), tmp_path / "c")
    run_campaign(c, progress=False)
    r = CliRunner().invoke(main, ["utility", str(c.paths.root), "--thresholds", "0.25", "--runs", "2",
                                  "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    table = pd.read_parquet(c.paths.root / "utility" / "utility.parquet").set_index("name")
    assert {"full", "memorized-0.25", "random-0.25"} <= set(table.index)
    mem = pd.read_parquet(c.paths.memorization)
    removed = int((mem["mem"] >= 0.25).sum())
    assert table.loc["memorized-0.25", "removed"] == table.loc["random-0.25", "removed"] == removed > 0
    assert 0.85 < table.loc["full", "acc_mean"] <= 1  # the full set trains a good digits MLP
    summary = json.loads((c.paths.root / "utility" / "summary.json").read_text())
    assert summary and "full" in r.output


def test_plan_on_digits(ray_session, tmp_path):
    from estimators.estimates import error_bound

    (tmp_path / "s.toml").write_text(SPEC.replace("runs = 24", "runs = 2000"))
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "s.toml"), "--pilot", "16", "--json", "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["pilot"]["trained"] == 16 and p["pilot"]["failed"] == 0 and p["pilot"]["directory_removed"]
    assert 0 < p["seconds_per_run"] < 5 and p["wall_seconds"] > 2000 / p["runs_per_second"]
    assert p["influence_mode"] == "dense" and p["storage_bytes"]["shards"] > 2000 * 1000  # ~1,797 rows a shard
    assert p["error_bound_rms"] == error_bound(2000, 0.7)
    assert 0 <= p["expected_se"]["p99"] <= p["expected_se"]["worst_case"] < 0.05
