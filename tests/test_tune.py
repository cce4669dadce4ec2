"""`longtail tune` end to end on digits: Ray Tune with ASHA, scored on held-out training examples."""

from click.testing import CliRunner

from orchestrator import spec as specs
from orchestrator.cli import main

SPEC = """
[campaign]
name = "tune-digits"
runs = 100
[dataset]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[train]
epochs = 4
lr = 0.05
"""


def test_tune_writes_a_better_recipe(ray_session, tmp_path):
    (tmp_path / "s.toml").write_text(SPEC)
    r = CliRunner().invoke(main, ["tune", str(tmp_path / "s.toml"), "--samples", "6", "--max-epochs", "6"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "6 trials" in r.output and "best held-out accuracy" in r.output
    tuned = specs.load(tmp_path / "s.tuned.toml")
    # only the three tuned keys change; they stay in the search space
    assert 0.005 <= tuned.train.lr <= 0.5 and 1e-6 <= tuned.train.weight_decay <= 1e-2
    assert 1 <= tuned.train.epochs <= 6
    assert tuned.replace(train=specs.load(tmp_path / "s.toml").train) == specs.load(tmp_path / "s.toml")
    acc = float(r.output.split("best held-out accuracy ")[1].split()[0])
    assert acc > 0.8  # digits at 70%: an MLP should reach this with any reasonable recipe


def test_tune_refuses_a_plugin_learner(tmp_path):
    (tmp_path / "s.toml").write_text(SPEC.replace("[train]", '[train]\ntrainer = "plugins:nearest_neighbour"'))
    r = CliRunner().invoke(main, ["tune", str(tmp_path / "s.toml")], catch_exceptions=False)
    assert r.exit_code == 2 and "plug-in learner" in r.output
