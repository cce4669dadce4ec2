"""Every GPU feature, exercised on a CPU wherever PyTorch allows (issue 13): the recipes through real
campaigns on generated files in the real on-disk formats, bf16 autocast (the dtype inside the model),
channels_last, torch.compile in a campaign, data-parallel training (gloo), and the worker that reserved
a GPU but finds none. What only a GPU can show (speed, cuDNN, CUDA bf16) is in benchmarks/gpu.sh.

Sizes are tiny (one short epoch, tens of images): these tests check that each path runs and computes
what it should, not accuracy."""

from __future__ import annotations

import pickle
import struct
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.driver import run_campaign
from workers import training
from workers.errors import LongtailError
from workers.models import model_factory
from workers.recipes import recipe_names, recipe_sections
from workers.training import DeviceData, train_run

from gpu_paths_data import CNN_DIGITS_SPEC

TRAIN = dict(epochs=1, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="constant", label_smoothing=0.0, eval_batch_size=64)
CNN = {"name": "cnn", "channels": [8, 16], "hidden": 16}
AIRBENCH = {"name": "airbench", "widths": [8, 16], "stem_channels": 8}  # convolutions from its first layer on


def images(n=96, classes=4, shape=(3, 8, 8), seed=0) -> DeviceData:
    """Learnable images: a class template plus noise; 2/3 train, 1/3 test."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + 0.5 * torch.randn(n, *shape, generator=g)
    k = 2 * n // 3
    return DeviceData(x[:k], y[:k], x[k:], y[k:], classes, shape)


@pytest.fixture(scope="module")
def small():
    return images()


def hooked(section: dict, record: list, layer=torch.nn.Conv2d):
    """A model builder whose `layer`s append (input, output) of every forward call to `record`."""
    build = model_factory(section)

    def make(num_classes, input_shape):
        model = build(num_classes, input_shape)
        for m in model.modules():
            if isinstance(m, layer):
                m.register_forward_hook(lambda mod, inp, out: record.append((inp[0], out)))
        return model
    return make


# --------------------------------------------------------------------------------------------------
#  Reduced precision
# --------------------------------------------------------------------------------------------------

def test_bf16_autocast_is_active_inside_the_model_on_cpu(small):
    """The convolutions' outputs are bfloat16 in training and in evaluation when precision = "bf16",
    float32 otherwise; the run's numbers differ from fp32's by bf16 rounding only."""
    runs = {}
    for precision in ("fp32", "bf16"):
        seen: list = []
        runs[precision] = train_run(hooked(CNN, seen), small, np.arange(64), 0, {**TRAIN, "precision": precision})
        dtypes = {out.dtype for _, out in seen}
        assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}, (precision, dtypes)
        assert len(seen) == 2 * (2 + 2)  # 2 conv layers x (2 training steps + 1 eval batch of train + 1 of test)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert not np.array_equal(fp32.train_values["margin"], bf16.train_values["margin"])
    # bf16 keeps 8 significant bits: margins of order 1 agree to a few hundredths after one short epoch
    np.testing.assert_allclose(bf16.train_values["margin"], fp32.train_values["margin"], atol=0.1)
    assert (bf16.train_pred == fp32.train_pred).mean() > 0.9


def test_bf16_warns_where_autocast_cannot_apply(small, monkeypatch):
    """A device type without bf16 autocast trains in fp32 (same numbers) and says so, once."""
    monkeypatch.setattr(training, "_warned", set())
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    build = model_factory(CNN)
    fp32 = train_run(build, small, np.arange(64), 0, TRAIN)
    with pytest.warns(RuntimeWarning, match=r"precision = 'bf16' cannot apply on cpu .* runs train in fp32"):
        bf16 = train_run(build, small, np.arange(64), 0, {**TRAIN, "precision": "bf16"})
    np.testing.assert_array_equal(fp32.train_values["margin"], bf16.train_values["margin"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not twice
        train_run(build, small, np.arange(64), 0, {**TRAIN, "precision": "bf16"})


# --------------------------------------------------------------------------------------------------
#  channels_last
# --------------------------------------------------------------------------------------------------

def test_channels_last_equals_the_contiguous_layout_up_to_rounding(small):
    seen: list = []
    nhwc = train_run(hooked(AIRBENCH, seen), small, np.arange(64), 3,
                     {**TRAIN, "channels_last": True, "augment": "flip"})
    stem_inputs = [x for x, _ in seen if x.shape[1] == 3]  # (batch, 3, 8, 8): the layouts differ
    assert len(stem_inputs) == 4 and all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                                         for x in stem_inputs), "NHWC was not applied"
    plain = train_run(model_factory(AIRBENCH), small, np.arange(64), 3, {**TRAIN, "augment": "flip"})
    # same initialisation, batches and flips; convolutions summed in another order: float32 rounding
    np.testing.assert_allclose(nhwc.train_values["margin"], plain.train_values["margin"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(nhwc.test_pred, plain.test_pred)


def test_channels_last_on_vectors_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(training, "_warned", set())
    g = torch.Generator().manual_seed(0)
    data = DeviceData(torch.randn(60, 5, generator=g), torch.arange(60) % 3, torch.randn(20, 5, generator=g),
                      torch.arange(20) % 3, 3, (5,))
    build = model_factory({"name": "mlp", "hidden": [8]})
    plain = train_run(build, data, np.arange(60), 0, TRAIN)
    with pytest.warns(RuntimeWarning, match=r"channels_last = true cannot apply on cpu: .* not images"):
        nhwc = train_run(build, data, np.arange(60), 0, {**TRAIN, "channels_last": True})
    np.testing.assert_array_equal(plain.train_values["margin"], nhwc.train_values["margin"])


# --------------------------------------------------------------------------------------------------
#  A worker that reserved a GPU and finds none
# --------------------------------------------------------------------------------------------------

def test_worker_that_reserved_a_gpu_without_cuda_refuses_to_start(monkeypatch):
    from workers.datasets import dataset_fingerprint, load_dataset
    from workers.worker import NoGPUError, RunWorker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    spec = specs.loads(DIGITS_SPEC.format(name="nogpu", extra="[resources]\ngpus_per_worker = 1\n"), "t.toml").to_dict()
    fp = dataset_fingerprint(load_dataset(spec["dataset"]))
    with pytest.raises(NoGPUError, match=r"reserved a GPU \(\[resources\] gpus_per_worker = 1.0\) but torch finds no "
                                         r"CUDA device .* refuses to train on the CPU .* set gpus_per_worker = 0"):
        RunWorker(spec, "nogpu", "hash", fp, use_gpu=True)
    assert issubclass(NoGPUError, LongtailError)  # the CLI prints it as one line, no traceback
    assert RunWorker(spec, "nogpu", "hash", fp, use_gpu=False).device == "cpu"


# --------------------------------------------------------------------------------------------------
#  Data-parallel: ranks see disjoint parts of every batch; gradients equal one process's
# --------------------------------------------------------------------------------------------------

def test_data_parallel_ranks_split_every_batch_and_average_to_one_process(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    from gpu_paths_data import dp_run  # a light module: each spawned process imports it

    procs = [ctx.Process(target=dp_run, args=(r, 2, init, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (s, g)) for r, s, g in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    single = ctx.Queue()
    dp_run(0, 1, "", single)
    _, one_seen, one_grads = single.get(timeout=10)
    (seen0, grads0), (seen1, grads1) = got[0], got[1]
    assert len(one_seen) == len(seen0) == len(seen1) == 3  # 48 examples, batches of 16
    for b, whole in enumerate(one_seen):
        assert len(whole) == 16
        assert not set(seen0[b]) & set(seen1[b]), f"batch {b}: ranks saw the same examples"
        assert sorted(seen0[b] + seen1[b]) == whole, f"batch {b}: the ranks' parts are not the whole batch"
    # DDP averages the ranks' gradients (each the mean over 8 examples): the mean over the 16, as one
    # process computes it; after three equal steps, float32 rounding apart
    for g0, g1, g in zip(grads0, grads1, one_grads):
        np.testing.assert_array_equal(g0, g1)  # all-reduced: identical on both ranks
        np.testing.assert_allclose(g0, g, rtol=1e-4, atol=1e-6)
        assert np.abs(g).max() > 1e-3  # a real gradient, not zeros


# --------------------------------------------------------------------------------------------------
#  torch.compile in a campaign
# --------------------------------------------------------------------------------------------------

DIGITS_SPEC = CNN_DIGITS_SPEC.replace("{runs}", "4").replace("{seed}", "3")


def shard_values(root) -> pd.DataFrame:
    frames = []
    for f in sorted((root / "runs").glob("run-*.parquet")):
        t = pq.read_table(f).to_pandas()
        t["run"] = int(f.stem.split("-")[1])
        frames.append(t)
    return pd.concat(frames).sort_values(["run", "split", "example"]).reset_index(drop=True)


def test_compiled_campaign_estimates_equal_eager(ray_session, tmp_path):
    """[train] compile = true in a campaign (the workers compile with aot_eager, set for the test
    session's Ray in tests/conftest.py: inductor would generate C++ for minutes on CI's CPU) gives the
    estimates of the eager campaign up to float rounding."""
    roots = {}
    for mode in ("eager", "compiled"):
        extra = "compile = true" if mode == "compiled" else ""
        c = create_or_open(specs.loads(DIGITS_SPEC.format(name=mode, extra=extra), "t.toml"), tmp_path / mode)
        report = run_campaign(c, progress=False)
        assert report.trained == 4 and report.complete, report
        roots[mode] = tmp_path / mode
    eager, compiled = (shard_values(roots[m]) for m in ("eager", "compiled"))
    assert eager.correct[eager.split == "test"].mean() > 0.5  # well above chance (0.1): no near-ties everywhere
    assert (eager.pred == compiled.pred).mean() > 0.99
    np.testing.assert_allclose(compiled.margin.astype(float), eager.margin.astype(float), atol=2e-3)  # float16 steps
    mem = {m: pq.read_table(roots[m] / "estimates" / "memorization.parquet").to_pandas().sort_values("example")
           for m in roots}
    np.testing.assert_allclose(mem["compiled"].mem, mem["eager"].mem, atol=1 / 2 + 1e-9)  # at most a flipped call
    same = np.isclose(mem["compiled"].mem.to_numpy(), mem["eager"].mem.to_numpy(), rtol=0, atol=0, equal_nan=True)
    assert same.mean() > 0.99  # NaN where an example is in every run or in none (4 runs)


# --------------------------------------------------------------------------------------------------
#  Every built-in recipe: one short epoch through a real campaign, on files in the real formats
# --------------------------------------------------------------------------------------------------

def _pattern_images(n: int, classes: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, side, side, 3): a class colour plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    colours = rng.integers(40, 215, (classes, 3))
    x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 25, (n, side, side, 3)), 0, 255).astype(np.uint8)
    return x, y


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # as the official batches


def write_cifar(root, dataset: str, n_train=60, n_test=20) -> None:
    """CIFAR python batches (the official archives' layout): rows of 3,072 bytes, R then G then B planes."""
    classes = 10 if dataset == "cifar10" else 100
    (x, y), (xt, yt) = _pattern_images(n_train, classes, 32, 0), _pattern_images(n_test, classes, 32, 1)

    def rows(a):
        return a.transpose(0, 3, 1, 2).reshape(len(a), 3072)

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        for b, part in enumerate(np.array_split(np.arange(n_train), 5)):
            _dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5", "data": rows(x[part]),
                                                   "labels": y[part].tolist(), "filenames": [f"{i}.png" for i in part]})
        _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": rows(xt), "labels": yt.tolist(),
                                      "filenames": [f"t{i}.png" for i in range(n_test)]})
        _dump(folder / "batches.meta", {"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": 12,
                                        "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir()
        for name, a, lab in (("train", x, y), ("test", xt, yt)):
            _dump(folder / name, {"filenames": [f"{i}.png" for i in range(len(a))], "batch_label": name,
                                  "fine_labels": lab.tolist(), "coarse_labels": (lab // 5).tolist(), "data": rows(a)})
        _dump(folder / "meta", {"fine_label_names": [f"f{k}" for k in range(100)],
                                "coarse_label_names": [f"c{k}" for k in range(20)]})


def write_mnist(root, n_train=60, n_test=20) -> None:
    """MNIST idx files under root/MNIST/raw (torchvision's layout)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = _pattern_images(n, 10, 28, seed)
        for suffix, a in (("images-idx3-ubyte", x[..., 0]), ("labels-idx1-ubyte", y.astype(np.uint8))):
            header = struct.pack(">HBB", 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
            (raw / f"{prefix}-{suffix}").write_bytes(header + np.ascontiguousarray(a, np.uint8).tobytes())


def write_folders(root, n_train=48, n_test=16) -> None:
    """Class folders of PNGs (ImageNet's train/ and val/ layout), 4 classes, 20x16 pixels."""
    for split, n, seed in (("train", n_train, 0), ("val", n_test, 1)):
        x, y = _pattern_images(n, 4, 20, seed)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[:16]).save(d / f"{i:03d}.png")


# recipe -> (dataset section, writer); ResNets at 32 (CIFAR) and 8 pixels (imagefolder): one epoch of a
# ResNet-50 on a CPU costs seconds at these sizes
RECIPE_DATA = {
    "mnist-mlp": ('name = "mnist"\nroot = "{root}"', write_mnist),
    "cifar10-airbench": ('name = "gpu_paths_data:cifar10"\nroot = "{root}"', lambda r: write_cifar(r, "cifar10")),
    "cifar100-resnet50": ('name = "gpu_paths_data:cifar100"\nroot = "{root}"\nlimit_train = 16\nlimit_test = 8',
                          lambda r: write_cifar(r, "cifar100")),
    "imagenet-resnet50": ('name = "imagefolder"\ntrain_dir = "{root}/train"\ntest_dir = "{root}/val"\nimage_size = 8',
                          write_folders),
}


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_trains_one_short_epoch_through_a_campaign(ray_session, tmp_path, name):
    """The recipe's own [model] and [train] (bf16 and channels_last included: both apply on a CPU),
    shortened to one epoch of small batches; compile is off here (test_compiled_campaign_estimates_equal_eager
    checks it: tracing a ResNet-50 would cost this test a minute), and the 32-pixel ResNet-50 trains in
    fp32 (bf16 autocast is checked inside the model by test_bf16_autocast_is_active_inside_the_model_on_cpu
    and here by the other recipes)."""
    assert set(RECIPE_DATA) == set(recipe_names()), "a new recipe needs its generated data here"
    dataset, write = RECIPE_DATA[name]
    write(tmp_path)
    sections = recipe_sections(name)
    train = dict(sections["train"])
    over = {"epochs": 1, "batch_size": 16, "compile": False, "eval_batch_size": 64,
            # the linear scaling rule and the recipe's share of warm-up, at 16 images per step and one epoch
            "lr": train["lr"] * 16 / train["batch_size"],
            "warmup_epochs": train.get("warmup_epochs", 0.0) / train["epochs"]}
    if name == "cifar100-resnet50":  # 32-pixel ResNet-50: emulated bf16 would cost this test half a minute
        over["precision"] = "fp32"
    train.update(over)
    text = (f'[campaign]\nname = "{name}"\nruns = 2\nseed = 1\n[dataset]\n{dataset.format(root=tmp_path)}\n'
            + toml_section("model", sections["model"]) + toml_section("train", train)
            + "[resources]\ncpus_per_worker = 1\n")
    c = create_or_open(specs.loads(text, f"{name}.toml"), tmp_path / "c")
    report = run_campaign(c, progress=False)
    assert report.trained == 2 and report.complete and not report.failed, report
    t = shard_values(tmp_path / "c")
    n_train, n_test = c.dataset.n_train, c.dataset.n_test
    assert len(t) == 2 * (n_train + n_test) and np.isfinite(t.margin.astype(float)).all()
    resolved = c.spec.to_dict()["train"]
    for key in ("precision", "channels_last", "augment", "optimizer", "schedule"):  # the recipe's own settings ran
        if key in train:
            assert resolved[key] == train[key], key
    mem = pq.read_table(tmp_path / "c" / "estimates" / "memorization.parquet").to_pandas()
    assert len(mem) == n_train


def toml_section(name: str, values: dict) -> str:
    from orchestrator.spec import _toml_value

    return f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
