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
from orchestrator.features.cost import (build_plan, expected_se, main_ratio_runs, pilot_spec, runs_for_bound,
                                        runs_for_se, steady_timing, variance_per_run)

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
    # seconds per run: each run sleeps 0.05 s; one warm worker's pace (its runs after its first call over
    # their time), or where no worker had two calls one worker's share of the pilot's training time
    assert 0.05 <= p["seconds_per_run"] < 2
    steady = pl["runs_per_second_per_worker"]
    assert p["seconds_per_run"] == pytest.approx(1 / steady if steady else
                                                 pl["training_seconds"] * pl["workers_used"] / 8)
    assert p["runs_per_second"] == pytest.approx(2 / p["seconds_per_run"])
    assert p["wall_seconds"] == pytest.approx(400 / p["runs_per_second"] + p["warmup_seconds"] + p["startup_seconds"])
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
    the planned runs against the campaign's, within 30%). Its training time is printed with -s, not
    asserted (test_plan_predicts_a_digits_campaign does): from an 8-run pilot the old model (seconds per
    run over the whole pilot, the workers' warm-up and staggered start included) overestimated it by 1.8x
    to 3.1x; the warm-pace model (steady_timing) said 2.9 s for 2.7 s and 3.4 s for 3.2 s (2026-12-02)."""
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


def test_steady_timing():
    # two workers, calls of 4 runs: worker a's first call ends at 1.0 s, then 8 runs in 2 s; b's 4 runs in 1 s
    finished = {"a": [0.9, 0.95, 1.0, 1.0, 1.9, 2.0, 2.0, 2.0, 2.9, 3.0, 3.0, 3.0],
                "b": [1.5, 1.5, 1.6, 1.6, 2.6, 2.6, 2.6, 2.6]}
    t = steady_timing({k: [x + 100 for x in v] for k, v in finished.items()}, 100.0, 4)
    assert t["workers_timed"] == 2 and t["runs_per_second_per_worker"] == pytest.approx(4.0)
    assert t["first_call_seconds"] == [1.0, 1.6]
    assert t["warmup_seconds"] == pytest.approx((1.0 + 1.6) / 2 - 4 / 4.0)  # the mean first call beyond a warm one
    # a third worker of the campaign's that finished nothing in the pilot: ready no sooner than its last shard
    three = steady_timing({k: [x + 100 for x in v] for k, v in finished.items()}, 100.0, 4, workers=3)
    assert three["first_call_seconds"] == [1.0, 1.6, 3.0]
    assert three["warmup_seconds"] == pytest.approx((1.0 + 1.6 + 3.0) / 3 - 1.0)
    one_call = steady_timing({"a": [1.0, 1.0]}, 0.0, 4)
    assert one_call["runs_per_second_per_worker"] is None and one_call["warmup_seconds"] == 0


DIGITS = """
[campaign]
name = "digits-cost"
runs = 128
[dataset]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[train]
epochs = 8
"""


@pytest.mark.slow  # ~50 s here: two worker pools start (the pilot's and the campaign's), each importing torch
def test_plan_predicts_a_digits_campaign(ray_session, tmp_path):
    """`longtail plan --pilot 64` (its recommended pilot here: two calls of 16 on each of the 2 workers) on a
    digits MLP campaign of 128 runs, then the campaign itself on the same Ray: its training wall time, and
    its storage (the shards within 5%, the checkpoint within 1%: it is now exact, fixed_sizes).

    Time, two ways. The model's formula fed the campaign's own pace (steady_timing of its shards, measured
    in the same window, so under the same load) gives its training time within 35% (measured: 0.89 to 1.0
    of it; counting the workers as one doubles it). And the pilot's prediction: real / predicted training
    time, divided by the load's change between the pilot and the campaign
    as the workers measured it (their training loop's seconds per run, campaign / pilot), within a factor
    of 2, not the +-35% aimed at. On this shared 2-core machine (load average 13-19 while measured,
    2026-12-02) the raw ratio over six pilot + campaign pairs was 0.69, 0.88, 0.96, 2.28 (the loop 1.7x
    slower in the campaign than in the pilot), 0.93 and 1.27, the adjusted one 0.96, 1.28, 0.75, 1.33, 1.58
    and 0.89;
    the old model (seconds per run over the whole pilot) gave raw ratios of 0.42 to 0.84 on pilots of 64.
    Other processes' load moves the raw figure more than the model errs. docs/utility-and-planning.md."""
    from workers.shard import read_meta

    from orchestrator.campaign import create_or_open
    from orchestrator.driver import run_campaign

    path = tmp_path / "s.toml"
    path.write_text(DIGITS)
    r = invoke(path, "--pilot", 64, "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["pack"] == 16 and p["recommended_pilot"] == 64 and p["pilot"]["trained"] == 64
    c = create_or_open(specs.load(path), tmp_path / "real")
    report = run_campaign(c, progress=False)
    assert report.complete
    metas = [read_meta(c.paths.shard(k)) for k in range(128)]
    loop = {"pilot": p["pilot"]["train_seconds_mean"], "campaign": float(np.mean([m["train_seconds"] for m in metas]))}
    finished = {}
    for m in metas:
        finished.setdefault(m["pid"], []).append(m["finished_at"])
    last = max(m["finished_at"] for m in metas)
    real = steady_timing(finished, last - report.training_seconds, 16, 2)  # the campaign's own pace, measured alike
    ratio = report.training_seconds / p["training_seconds"]
    # the load's change between pilot and campaign, as the workers measured it: the training loop alone per run
    adjusted = ratio / (loop["campaign"] / loop["pilot"])
    print(f"\ndigits, 128 runs: training predicted {p['training_seconds']:.2f} s, took {report.training_seconds:.2f} s: "
          f"ratio {ratio:.2f}. Warm runs/s per worker: pilot {p['pilot']['runs_per_second_per_worker']:.1f}, campaign "
          f"{real['runs_per_second_per_worker']:.1f}; first calls ended at {p['pilot']['first_call_seconds']} s in the "
          f"pilot, {real['first_call_seconds']} s in the campaign; training loop per run: pilot {loop['pilot']:.4f} s, "
          f"campaign {loop['campaign']:.4f} s (the load's change between them); load-adjusted ratio {adjusted:.2f}")
    # the model itself, fed the campaign's own pace (measured in the same window, so the load is the same):
    # its formula (warm-up, workers, packing) must give the campaign's training time within 35%
    spec = specs.load(path)
    own = build_plan(spec, {**p["pilot"], **real}, 2, {"CPU": 2}, "dense", 1438, 359, 0, np.array([0.5]),
                     np.array([0.5]))
    print(f"the model on the campaign's own pace: {own['training_seconds']:.2f} s for {report.training_seconds:.2f} s")
    assert own["training_seconds"] == pytest.approx(report.training_seconds, rel=0.35), (own["training_seconds"], real)
    # the pilot's pace against the campaign's, after the load's change: within a factor of 2
    assert 0.5 <= adjusted <= 2.0, (ratio, adjusted, p["training_seconds"], report.training_seconds, loop, real)
    st = p["storage_bytes"]
    shards = sum(c.paths.shard(k).stat().st_size for k in range(128))
    assert st["shards"] == pytest.approx(shards, rel=0.05)
    # exact (fixed_sizes): 1% is rounding room; the old model (the pilot's own checkpoint + the dense sums + 45
    # bytes a run) said 2,650,052 bytes for 2,484,306 here
    assert st["checkpoint"] == pytest.approx(c.paths.checkpoint.stat().st_size, rel=0.01)
    assert st["plan"] == pytest.approx(sum(f.stat().st_size for f in c.paths.plan_dir.iterdir()), rel=0.25)
