"""The spec hash is a user contract: every shard carries it, and a campaign resumes only under the same
hash. These values were computed with the code as it was before the [train] defaults, the option
parser and the dataset modules were reorganised (issue 10); a refactor that changes any of them would
make existing campaigns refuse to resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import spec as specs

ROOT = Path(__file__).resolve().parents[1]

PINNED = {
    "examples/cifar10-airbench.toml": "498a2c9d4be7fb35",
    "examples/cifar100-resnet50.toml": "0ce247dcd1f2d594",
    "examples/imagenet-resnet50.toml": "f3bdbaee9017d300",
    "examples/mnist-mlp.toml": "13c01900d5593820",
    "orchestrator/demo.toml": "5ea184ae4171a692",
}

# every built-in dataset and model at its defaults: their option dataclasses feed the hash too
BUILTIN = {
    ("digits", "mlp"): "3ffbc45d6af13eb5",
    ("digits", "cnn"): "e3bb34500f0492c2",
    ("digits", "resnet18"): "7afdb10186d5e479",
    ("digits", "airbench"): "81548b73a8a34f30",
    ("digits", "mnist-mlp"): "b3388acddabc5e36",
    ("digits", "resnet50"): "5a9f8f014bf1dff3",
    ("longtail-mixture", "mlp"): "4481220b2816b742",
    ("mnist", "mlp"): "d4de2bde738d8ea1",
    ("cifar10", "mlp"): "04971add25136463",
    ("cifar100", "mlp"): "84ce24a22583f2bd",
    ("imagefolder", "mlp"): "411d054a2e04ce7c",
    ("mnist-5k", "mlp"): "3f13840de3c2f6ef",
}

HEAD = '[campaign]\nname = "h"\nruns = 4\n[dataset]\nname = "{dataset}"\n[model]\nname = "{model}"\n'


def test_every_example_spec_keeps_its_hash():
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.toml")) + ["orchestrator/demo.toml"]
    assert found == sorted(PINNED), "a new example spec: pin its hash here"
    assert {name: specs.load(ROOT / name).result_hash() for name in found} == PINNED


@pytest.mark.parametrize("dataset,model", sorted(BUILTIN))
def test_builtin_defaults_keep_their_hash(dataset, model):
    assert specs.loads(HEAD.format(dataset=dataset, model=model)).result_hash() == BUILTIN[(dataset, model)]


def test_fast_paths_away_from_their_defaults_keep_their_hash():
    # the neutral-default [train] keys enter the hash only away from their defaults; logits do, dynamics not
    text = HEAD.format(dataset="digits", model="mlp") + (
        '[train]\nwarmup_epochs = 1.0\naugment = "flip"\nprecision = "bf16"\ncrop_padding = 2\n'
        'store = ["margin", "dynamics", "logits"]\n')
    assert specs.loads(text).result_hash() == "daea38409715a644"
