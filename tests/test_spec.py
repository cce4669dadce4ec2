"""Spec loading: every error names the key and the expected form; the resolved spec round-trips."""

import pytest

from orchestrator import spec as specs

MINIMAL = """
[campaign]
name = "t"
runs = 10
[dataset]
name = "digits"
[model]
name = "mlp"
"""


def load(text):
    return specs.loads(text, "test.toml")


def with_line(section, line):
    return MINIMAL.replace(f"[{section}]", f"[{section}]\n{line}", 1) if f"[{section}]" in MINIMAL \
        else MINIMAL + f"\n[{section}]\n{line}\n"


def test_minimal_spec_resolves_defaults():
    s = load(MINIMAL)
    assert s.campaign.subset_ratio == 0.7 and s.campaign.design == "fixed" and s.campaign.seed == 0
    assert s.dataset.options == {"test_fraction": 0.2, "split_seed": 0}
    assert s.model.options["hidden"] == [128]
    assert s.train.epochs > 0 and s.estimates.mem_threshold == 0.25 and s.estimates.infl_threshold == 0.15


def test_round_trip_through_toml():
    s = load(with_line("model", "hidden = [64, 32]"))
    again = load(specs.dumps(s))
    assert again == s and again.result_hash() == s.result_hash()


@pytest.mark.parametrize("section,line,match", [
    ("train", "epochz = 3", r"\[train\] in test.toml: unknown key\(s\) epochz. Valid keys:\n  epochs = 30"),
    ("campaign", "seed = -1", r"key 'seed' must be an integer >= 0, found -1"),
    ("campaign", "subset_ratio = 1.0", r"'subset_ratio' must be a number strictly between 0 and 1, or a list"),
    ("campaign", "subset_ratio = 0", r"'subset_ratio' must be a number strictly between 0 and 1.*, found 0"),
    ("campaign", "subset_ratio = [0.5, 0.5]", r"a list of up to 100 distinct such numbers, found \[0.5, 0.5\]"),
    ("campaign", "subset_ratio = \"half\"", r"'subset_ratio' must be a number or a list of a number, found 'half'"),
    ("campaign", "design = \"stratified\"", r"'design' must be one of: fixed, bernoulli, balanced, paired"),
    ("train", "store = [\"logit\"]", r"'store' must be a list of distinct values from: margin, probability, logits"),
    ("estimates", "soft = [\"logits\"]", r"'soft' must be a list of distinct values from: margin, probability,"),
    ("train", "lr = \"fast\"", r"key 'lr' must be a number, found 'fast' \(str\)"),
    ("train", "nesterov = 1", r"key 'nesterov' must be true or false, found 1"),
    ("train", "epochs = 2.5", r"key 'epochs' must be an integer, found 2.5"),
    ("resources", "gpus_per_worker = -0.5", r"'gpus_per_worker' must be a number >= 0"),
    ("estimates", "influence = \"sparse\"", r"'influence' must be one of: auto, dense, per-class, topk, none, found 'sparse'"),
    ("model", "hidden = [0]", r"\[model\] in test.toml \(name = 'mlp'\): key 'hidden' must be a non-empty list"),
    ("model", "depth = 3", r"unknown key\(s\) depth. Valid keys:\n  hidden = \[128\]"),
    ("dataset", "test_fraction = 0.9", r"'test_fraction' must be a number in \[0.05, 0.5\]"),
])
def test_bad_values_name_key_and_expected_form(section, line, match):
    with pytest.raises(specs.SpecError, match=match):
        load(with_line(section, line))


def test_cross_section_checks():
    with pytest.raises(specs.SpecError, match=r"soft = \['probability'\] needs \['probability'\] in \[train\] store"):
        load(with_line("estimates", 'soft = ["probability"]'))
    with pytest.raises(specs.SpecError, match=r"ratio = 0.5 is not one of \[campaign\] subset_ratio \[0.7\]"):
        load(with_line("estimates", "ratio = 0.5"))
    s = load(MINIMAL.replace("runs = 10", "runs = 10\nsubset_ratio = [0.3, 0.7]") + "\n[estimates]\nratio = 0.7\n")
    assert s.campaign.ratios == (0.3, 0.7) and s.primary_ratio == 0.7


def test_runs_below_two_is_refused():
    with pytest.raises(specs.SpecError, match=r"'runs' must be an integer >= 2, found 1"):
        load(MINIMAL.replace("runs = 10", "runs = 1"))


def test_missing_required_key_and_section():
    with pytest.raises(specs.SpecError, match=r"missing required key 'runs'"):
        load(MINIMAL.replace("runs = 10", ""))
    with pytest.raises(specs.SpecError, match=r"missing section \[model\]"):
        load(MINIMAL.replace('[model]\nname = "mlp"', ""))


def test_unknown_section_lists_valid_ones():
    with pytest.raises(specs.SpecError, match=r"unknown section\(s\) \[trainer\]; valid sections: \[campaign\]"):
        load(MINIMAL + "\n[trainer]\nx = 1\n")


def test_unknown_dataset_and_model_names():
    with pytest.raises(specs.SpecError, match=r"\[dataset\] in test.toml: unknown name 'mnist-typo'; expected one "
                                              r"of cifar10, cifar100, digits, imagefolder, longtail-mixture, mnist, mnist-5k or a plug-in"):
        load(MINIMAL.replace('name = "digits"', 'name = "mnist-typo"'))
    with pytest.raises(specs.SpecError, match=r"unknown name 'resnet9000'"):
        load(MINIMAL.replace('name = "mlp"', 'name = "resnet9000"'))


def test_plugin_names_must_be_import_paths_and_pass_options_through():
    s = load(MINIMAL.replace('name = "mlp"', 'name = "plugins:tiny_mlp"\nwidth = 7'))
    assert s.model.is_plugin and s.model.options == {"width": 7}
    with pytest.raises(specs.SpecError, match=r"is not an import path"):
        load(MINIMAL.replace('name = "mlp"', 'name = "my model:"'))


def test_malformed_toml_says_where():
    with pytest.raises(specs.SpecError, match=r"test.toml: not valid TOML: .*line 3"):
        load("[campaign]\nname = 't'\nruns = = 3\n")


def test_bad_campaign_name():
    with pytest.raises(specs.SpecError, match=r"'name' must be 1-64 characters from"):
        load(MINIMAL.replace('name = "t"', 'name = "a b/c"'))


def test_result_hash_ignores_resources_and_runs_but_not_training():
    base = load(MINIMAL)
    assert load(with_line("resources", "workers = 7")).result_hash() == base.result_hash()
    assert load(MINIMAL.replace("runs = 10", "runs = 20")).result_hash() == base.result_hash()
    assert load(with_line("train", "lr = 0.01")).result_hash() != base.result_hash()
    assert load(with_line("dataset", "split_seed = 3")).result_hash() != base.result_hash()
    diffs = specs.differences(base, load(with_line("train", "lr = 0.01")))
    assert diffs == [("train.lr", 0.1, 0.01)]


def test_spec_file_not_found(tmp_path):
    with pytest.raises(specs.SpecError, match=r"cannot read spec .*nope.toml"):
        specs.load(tmp_path / "nope.toml")
