"""`longtail plan` (orchestrator/features/cost.py): a pilot campaign on the session's Ray (2 CPUs), and the
numbers derived from it, checked for consistency with each other and with what the pilot measured."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from estimators.estimates import error_bound
from orchestrator import spec as specs
from orchestrator.cli import main
from orchestrator.features.cost import (expected_se, main_ratio_runs, pilot_spec, runs_for_bound, runs_for_se,
                                variance_per_run)

SPEC = """
[campaign]
name = "planned"
seed = 1
runs = 400
subset_ratio = 0.6
[dataset]
name = "fault_plugins:blobs"
n_train = 50
n_test = 20
{extra}
[model]
name = "mlp"
[train]
trainer = "fault_plugins:knn"
[estimates]
influence = "dense"
target_se = 0.1
"""


def invoke(*args):
    # through the `longtail` group: its one handler prints user errors (orchestrator/cli.py)
    return CliRunner().invoke(main, ["plan", *map(str, args)], catch_exceptions=False)


def pilot_dir(output: str) -> Path:
    return Path(re.search(r"pilot: \d+ runs of '\w+' in (\S+) \(removed afterwards\)", output).group(1))


def test_numbers():
    # the bound's inverse: the smallest t that reaches the target
    for target, ratio in ((0.05, 0.7), (0.1, 0.5), (0.035, 0.7)):
        t = runs_for_bound(target, ratio)
        assert error_bound(t, ratio) <= target < error_bound(t - 1, ratio)
    assert runs_for_bound(0.035, 0.7) == pytest.approx(4000, rel=0.05)  # the paper's 0.035 at t = 4,000
    # se(t) = sqrt(V / t): V from in/held-out accuracies and the share q of runs an example is in
    v = variance_per_run(np.array([0.9, 1.0]), np.array([0.5, 1.0]), 0.7)
    assert v[0] == pytest.approx(0.09 / 0.7 + 0.25 / 0.3) and v[1] == 0
    se = expected_se(v, 1000)
    assert se[0] == pytest.approx(math.sqrt(0.09 / 700 + 0.25 / 300))
    t = runs_for_se(v[0], 0.05)
    assert expected_se(v[0], t) <= 0.05 < expected_se(v[0], t - 1)
    assert runs_for_se(0.0, 0.05) == 2
    assert main_ratio_runs(10, "fixed", 2, 0) == 5 and main_ratio_runs(12, "paired", 2, 1) == 6
    spec = specs.loads(SPEC.format(extra="").replace('runs = 400', 'runs = 400\ndesign = "paired"'), "p.toml")
    assert pilot_spec(spec, 5).campaign.runs == 6  # whole pairs
    ps = pilot_spec(spec, 8)
    assert ps.campaign.name == "planned-pilot" and ps.estimates.influence == "none" and ps.estimates.target_se == 0
    assert ps.train == spec.train and ps.resources == spec.resources and ps.dataset == spec.dataset


def test_plan_end_to_end(ray_session, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SPEC.format(extra="sleep = 0.05"))
    r = invoke(path, "--pilot", 8, "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert not pilot_dir(r.output).exists() and p["pilot"]["directory_removed"]
    pl = p["pilot"]
    assert pl["trained"] == 8 and pl["failed"] == 0 and 1 <= pl["workers_used"] <= 2
    assert p["cluster"]["workers"] == 2 and p["cluster"]["cpus"] == 2  # the session's Ray, 1 CPU per worker
    # seconds per run: each run sleeps 0.05 s; one worker's share of the pilot's training time
    assert 0.05 <= p["seconds_per_run"] < 2
    assert p["seconds_per_run"] == pytest.approx(pl["training_seconds"] * pl["workers_used"] / 8)
    assert p["runs_per_second"] == pytest.approx(2 / p["seconds_per_run"])
    assert p["wall_seconds"] == pytest.approx(400 / p["runs_per_second"] + p["startup_seconds"])
    assert p["startup_seconds"] > 0 and p["cpu_core_hours"] == pytest.approx(p["wall_seconds"] / 3600 * 2)
    # storage: the pilot's shard size times the planned runs, plus plan, dense influence, checkpoint
    st = p["storage_bytes"]
    assert 100 < pl["bytes_per_shard"] < 10_000 and st["shards"] == pytest.approx(pl["bytes_per_shard"] * 400)
    assert p["influence_mode"] == "dense" and st["estimates"] == 2 * 4 * 50 * 20 + pl["memorization_bytes"]
    assert st["checkpoint"] >= 4 * 50 * 20 + 400 * 3 and st["plan"] >= 400 * (7 + 9)
    assert st["total"] == pytest.approx(st["shards"] + st["plan"] + st["estimates"] + st["checkpoint"])
    # precision at the planned runs
    assert p["main_ratio_runs"] == 400 and p["error_bound_rms"] == pytest.approx(error_bound(400, 0.6))
    se = p["expected_se"]
    assert se["t"] == 400 and se["q"] == 0.6 and 0 < se["examples"] <= 50
    assert 0 <= se["median"] <= se["p90"] <= se["p99"] <= se["worst_case"]
    assert se["worst_case"] == pytest.approx(math.sqrt(0.25 / 240 + 0.25 / 160))
    need = {row["target_se"]: row for row in p["runs_needed"]}
    assert set(need) == {0.05, 0.1}  # the default target and the spec's [estimates] target_se
    for target, row in need.items():
        assert row["runs_bound"] == runs_for_bound(target, 0.6)
        assert 2 <= row["runs_median"] <= row["runs_p90"] <= row["runs_p99"] <= row["runs_bound"]
    assert need[0.1]["target_share"] == 0.95 and need[0.1]["runs_target_share"] >= need[0.1]["runs_p90"]

    text = invoke(path, "--pilot", 4, "--no-progress")
    assert text.exit_code == 0, text.output
    for line in ("plan for campaign 'planned': 400 runs", "seconds per run", "throughput", "wall time",
                 "CPU core-hours", "storage", "error bound", "memorization se", "90% of examples"):
        assert line in text.output, line
    # 4 runs: most in/out accuracies are exactly 0 or 1, whose variance estimate is 0 (issue 12, item 16)
    assert "caveat: with 4 pilot runs" in text.output and "underestimates" in text.output, text.output
    assert not pilot_dir(text.output).exists()


def test_plan_pilot_failure(ray_session, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SPEC.format(extra="fail_always = true"))
    r = invoke(path, "--pilot", 4, "--no-progress")
    assert r.exit_code == 2
    assert "error: the pilot campaign failed" in r.output and "this trainer always fails" in r.output
    assert not pilot_dir(r.output).exists()


def test_plan_predictions_hold_for_the_real_campaign(ray_session, tmp_path):
    """What `longtail plan` predicts from an 8-run pilot, against the campaign itself (80 runs):
    shard storage (the same shards: within 5%) and the memorization standard errors (the median at
    the planned runs against the campaign's, within 30%). Not its training time: from an 8-run pilot
    it overestimated the campaign's by 1.8x to 3.1x on the loaded 2-core machine (the pilot's few
    runs carry the workers' warm-up), too unstable for a test yet; printed with -s."""
    from orchestrator.campaign import create_or_open
    from orchestrator.driver import run_campaign

    path = tmp_path / "s.toml"
    path.write_text(SPEC.format(extra="sleep = 0.05").replace("runs = 400", "runs = 80"))
    r = invoke(path, "--pilot", 8, "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    c = create_or_open(specs.load(path), tmp_path / "real")
    report = run_campaign(c, progress=False)
    assert report.complete
    shards = sum(c.paths.shard(k).stat().st_size for k in range(80))
    assert p["storage_bytes"]["shards"] == pytest.approx(shards, rel=0.05)
    predicted = 80 / p["runs_per_second"]
    print(f"\ntraining time: predicted {predicted:.1f} s, took {report.training_seconds:.1f} s")
    import pyarrow.parquet as pq

    se = pq.read_table(c.paths.estimates_dir / "memorization.parquet")["se"].to_numpy()
    assert p["expected_se"]["median"] == pytest.approx(float(np.nanmedian(se)), rel=0.3), p["expected_se"]
