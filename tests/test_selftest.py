"""`longtail selftest`: the closed form against a Monte Carlo simulation of the learner itself, the self-test
passing on a healthy system, and failing when its estimates are corrupted."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from estimators.closed_form import selftest_truth
from orchestrator.features import selftest as stm
from orchestrator.cli import main
from workers.selftest_learner import dataset, fit_predict, mu_in


def test_closed_form_matches_a_monte_carlo_simulation_of_the_learner():
    """40,000 uniform subsets of 4 of 8 examples, each trained by the learner: the empirical in and out
    accuracies and influences sit within 4.5 standard errors of the closed form. A wrong conditional
    probability of the twin being in (m / n instead of m / (n - 1)) moves acc_out by 0.024, 7 standard
    errors; dropping the -gap / (n - 1) influence of the other examples moves it by 0.076."""
    n, nt, m, draws = 8, 4, 4, 40_000
    d = dataset({"n_train": n, "n_test": nt, "leaky": [2], "spread": 1.5})
    rng = np.random.default_rng(7)
    masks = np.zeros((draws, n), bool)
    tr = np.zeros((draws, n), bool)
    te = np.zeros((draws, nt), bool)
    for r in range(draws):
        idx = rng.choice(n, m, replace=False)
        masks[r, idx] = True
        a, b, _, _ = fit_predict(d, idx, r)
        tr[r], te[r] = a == d.y_train, b == d.y_test
    p = d.info["learner"]
    truth = selftest_truth(n, nt, m, mu_in(d.info, n), p["mu_hi"], p["mu_lo"], p["nu_hi"], p["nu_lo"], p["offset"])

    def close(emp, k, true):
        se = np.sqrt(np.maximum(true * (1 - true), 1e-4) / k)
        assert (np.abs(emp - true) <= 4.5 * se).all(), (emp, true, se)

    n_in = masks.sum(0)
    close((tr & masks).sum(0) / n_in, n_in, truth.acc_in)
    close((tr & ~masks).sum(0) / (draws - n_in), draws - n_in, truth.acc_out)
    in_side = masks.T.astype(float) @ te / n_in[:, None]
    out_side = (~masks).T.astype(float) @ te / (draws - n_in)[:, None]
    se = np.sqrt(0.25 / n_in[:, None] + 0.25 / (draws - n_in)[:, None])
    assert (np.abs(in_side - out_side - truth.infl) <= 4.5 * se).all()
    assert np.ptp(truth.acc_in) > 0.3  # the offsets and the leaky example really vary the truth


@pytest.fixture(scope="module")
def healthy(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("selftest") / "campaign"
    checks, root = stm.run_selftest(out=str(root), runs=300, say=lambda *_: None)  # 300: CI time
    return checks, root


def test_selftest_passes_on_a_healthy_system(healthy):
    checks, _ = healthy
    assert [c.name for c in checks] == ["runs", "shards verified", "nodes", "fold", "estimates", "memorization",
                                        "influence", "privacy risk"]
    failed = [(c.name, c.detail) for c in checks if not c.ok]
    assert not failed, failed


def _corrupt(src, dst, what: str):
    shutil.copytree(src, dst)
    est = dst / "estimates"
    if what == "memorization":
        t = pq.read_table(est / "memorization.parquet")
        shifted = pa.array(t.column("mem").to_numpy() + 0.15)
        low = pa.array(t.column("ci_low").to_numpy() + 0.15)
        high = pa.array(t.column("ci_high").to_numpy() + 0.15)
        for name, col in (("mem", shifted), ("ci_low", low), ("ci_high", high)):
            t = t.set_column(t.schema.get_field_index(name), name, col)
        pq.write_table(t, est / "memorization.parquet")
    else:
        infl = np.load(est / "influence.npy")
        np.save(est / "influence.npy", infl[:, ::-1].copy())  # every test example's column moved to another


@pytest.mark.parametrize("what", ["memorization", "influence"])
def test_selftest_fails_when_the_estimates_are_corrupted(healthy, tmp_path, what):
    _, root = healthy
    bad = tmp_path / "bad"
    _corrupt(root, bad, what)
    checks = {c.name: c for c in stm.check(bad)}
    assert not checks["estimates"].ok  # estimates/ no longer equals what the shards give ...
    assert not checks[what].ok  # ... and no longer sits within its intervals around the exact values
    assert checks["fold"].ok and checks["runs"].ok


def test_the_command_prints_pass_or_what_failed(healthy, tmp_path, monkeypatch):
    checks, root = healthy
    monkeypatch.setattr(stm, "run_selftest", lambda address, out, runs: (checks, root))
    result = CliRunner().invoke(main, ["selftest", "--out", str(root)])
    assert result.exit_code == 0 and result.output.rstrip().endswith("PASS"), result.output
    bad = tmp_path / "bad"
    _corrupt(root, bad, "memorization")
    monkeypatch.setattr(stm, "run_selftest", lambda address, out, runs: (stm.check(bad), bad))
    result = CliRunner().invoke(main, ["selftest", "--out", str(bad)])
    assert result.exit_code == 1
    assert "FAIL estimates" in result.output and "selftest FAILED (estimates, memorization)" in result.output
