"""The `longtail` command as a user types it (click's runner, in-process, on the session's Ray)."""

import json

import pandas as pd
import pyarrow.parquet as pq
from click.testing import CliRunner

from orchestrator.cli import main

SPEC = """
[campaign]
name = "cli"
runs = 6
[dataset]
name = "digits"
[model]
name = "mlp"
hidden = [16]
[train]
epochs = 1
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_validate_prints_resolved_spec_and_size(tmp_path):
    (tmp_path / "s.toml").write_text(SPEC)
    r = invoke("validate", tmp_path / "s.toml")
    assert r.exit_code == 0, r.output
    assert "subset_ratio = 0.7" in r.output and "checkpoint_seconds = 30.0" in r.output
    assert "6 runs x 1797 examples = 10,782 predictions; each run trains on 1007 examples" in r.output
    assert "of shards" in r.output and "error bound" in r.output
    assert not (tmp_path / "campaigns").exists()


def test_validate_errors_exit_2_with_the_reason(tmp_path, monkeypatch):
    (tmp_path / "s.toml").write_text(SPEC.replace("runs = 6", "runz = 6"))
    r = invoke("validate", tmp_path / "s.toml")
    assert r.exit_code == 2 and "error: [campaign] in" in r.output and "unknown key(s) runz" in r.output
    (tmp_path / "m.toml").write_text(SPEC.replace('name = "mlp"', 'name = "plugins:nope"'))
    r = invoke("validate", tmp_path / "m.toml")
    assert r.exit_code == 2 and "module 'plugins' has no callable 'nope'" in r.output
    import plugins
    import torch

    monkeypatch.setattr(plugins, "three_inputs", lambda s, k, shape: torch.nn.Linear(3, k), raising=False)
    (tmp_path / "shape.toml").write_text(SPEC.replace('name = "mlp"\nhidden = [16]', 'name = "plugins:three_inputs"'))
    r = invoke("validate", tmp_path / "shape.toml")
    assert r.exit_code == 2 and "model 'plugins:three_inputs' cannot take inputs of shape (2, 1, 8, 8)" in r.output


def test_run_status_estimate(ray_session, tmp_path):
    (tmp_path / "s.toml").write_text(SPEC)
    out = tmp_path / "camp"
    r = invoke("run", tmp_path / "s.toml", "--out", out, "--no-progress", "--top", 3)
    assert r.exit_code == 0, r.output
    assert "6/6 runs folded" in r.output and "the 3 most memorized training examples" in r.output
    assert "trained 6 runs" in r.output
    r = invoke("status", out, "--json")
    info = json.loads(r.output)
    assert info["runs_finished"] == 6 and info["runs_folded"] == 6 and info["complete"] and info["driver"] is None
    before = pq.read_table(out / "estimates" / "memorization.parquet").to_pandas()
    (out / "estimates" / "memorization.parquet").unlink()
    r = invoke("estimate", out, "--top", 0)
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(pq.read_table(out / "estimates" / "memorization.parquet").to_pandas(), before)
    r = invoke("run", tmp_path / "s.toml", "--out", out, "--no-progress", "--top", 0)
    assert "trained 0 runs" in r.output and "6 were already done" in r.output


def test_resume_of_a_missing_campaign(tmp_path):
    r = invoke("status", tmp_path)
    assert r.exit_code == 2 and "is not a campaign directory" in r.output and "longtail run SPEC" in r.output
