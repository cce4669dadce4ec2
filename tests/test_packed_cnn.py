"""K convnet runs trained together in one fused model (workers/packed.py): each run equals the run
trained alone up to float rounding, its numbers do not depend on its pack-mates (bit for bit on the
CPU), and a resumed campaign with packing on writes bit-identical shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.driver import run_campaign
from orchestrator.pool import runs_per_call
from workers.models import convnet_pack, model_factory
from workers.packed import fusable, pack_groups, train_packed
from workers.training import DeviceData, train_run

from gpu_paths_data import CNN_DIGITS_SPEC

TRAIN = dict(epochs=1, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="cosine", label_smoothing=0.1, eval_batch_size=48, augment="flip-crop", crop_padding=2,
             warmup_epochs=0.5)
MODELS = {"cnn": {"name": "cnn", "channels": [8, 16], "hidden": 16},
          "airbench": {"name": "airbench", "widths": [8, 16], "stem_channels": 8}}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (120,), generator=g)
    x = templates[y] + 0.5 * torch.randn(120, 3, 8, 8, generator=g)
    return DeviceData(x[:90], y[:90], x[90:], y[90:], 4, (3, 8, 8))


def subsets(n_runs: int, n: int = 90, m: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, m, replace=False)) for _ in range(n_runs)]


def assert_same(a, b) -> None:
    for key in ("margin", "probability"):
        np.testing.assert_array_equal(a.train_values[key], b.train_values[key])
        np.testing.assert_array_equal(a.test_values[key], b.test_values[key])
    np.testing.assert_array_equal(a.train_pred, b.train_pred)
    assert a.final_loss == b.final_loss


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("optimizer,exact", [("sgd", True), ("adam", True), ("sgd", False)])
def test_each_packed_run_equals_the_run_trained_alone(data, model, optimizer, exact):
    """Same initialisation, batches, augmentation and schedule as train_run: the kernels differ (im2col and
    batched matmul against oneDNN's convolution), so the sums round differently; margins and probabilities
    of order 1 agree to 1e-4 (AdamW turns last-bit gradient differences into ~1e-5 ones; a wrong seed,
    batch order or augmentation stream moves them by ~1e-1). exact = False: the grouped convolutions and
    channel-wide batch norm a GPU worker uses, here on the CPU."""
    build = model_factory(MODELS[model])
    train = {**TRAIN, "optimizer": optimizer, "lr": 0.05 if optimizer == "sgd" else 0.003}
    subs, seeds = subsets(3), [11, 12, 13]
    packed = train_packed(build, data, subs, seeds, train, exact=exact)
    for out, sub, seed in zip(packed, subs, seeds):
        alone = train_run(build, data, sub, seed, train)
        np.testing.assert_allclose(out.train_values["margin"], alone.train_values["margin"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.test_values["probability"], alone.test_values["probability"], atol=1e-4)
        assert (out.train_pred == alone.train_pred).mean() > 0.98
        assert out.final_loss == pytest.approx(alone.final_loss, rel=1e-4)
    # and the runs are different runs (their own seeds and subsets), not copies of one
    assert not np.array_equal(packed[0].train_values["margin"], packed[1].train_values["margin"])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_run_does_not_depend_on_its_pack_mates(data, model):
    """The same run (subset, seed) in packs of 1, 2 and 4 with different mates: bit-identical outputs."""
    build = model_factory(MODELS[model])
    subs = subsets(5)
    seeds = [21, 22, 23, 24, 25]
    alone = train_packed(build, data, subs[:1], seeds[:1], TRAIN)[0]
    in_two = train_packed(build, data, [subs[3], subs[0]], [seeds[3], seeds[0]], TRAIN)[1]
    in_four = train_packed(build, data, [subs[1], subs[2], subs[0], subs[4]], [seeds[1], seeds[2], seeds[0], seeds[4]],
                           TRAIN)[2]
    assert_same(alone, in_two)
    assert_same(alone, in_four)


def test_pack_groups_and_argument_errors(data):
    assert pack_groups([40, 41, 40, 39, 41]) == [[0, 2], [1, 4], [3]]
    build = model_factory(MODELS["cnn"])
    with pytest.raises(ValueError, match=r"subsets of one size .* found sizes \[39, 40\]"):
        train_packed(build, data, [np.arange(40), np.arange(39)], [1, 2], TRAIN)
    assert fusable(build, 4, (3, 8, 8)) == ""
    assert "not an nn.Sequential" in fusable(model_factory({"name": "resnet18", "small_input": True}), 4, (3, 8, 8))


def test_packing_is_chosen_where_it_pays_and_overridable():
    model, train = {"name": "cnn"}, {"compile": False}
    assert convnet_pack(model, train, {"gpus_per_worker": 0.0}) == 1  # CPUs: measured no faster
    assert convnet_pack(model, train, {"gpus_per_worker": 0.25}) == 8  # GPU workers: packed
    assert convnet_pack(model, train, {"gpus_per_worker": 0.0, "pack": 4}) == 4  # [resources] pack
    assert convnet_pack(model, {"compile": True}, {"gpus_per_worker": 1.0}) == 0
    assert convnet_pack({"name": "resnet50"}, train, {"gpus_per_worker": 1.0}) == 0
    spec = specs.loads(spec_text("p", 4, 0, "gpus_per_worker = 0.5"), "t.toml")
    assert runs_per_call(spec) == 8


def spec_text(name: str, runs: int, pack: int, extra: str = "") -> str:
    extra = f'augment = "flip"\n[resources]\npack = {pack}\n{extra}'
    return CNN_DIGITS_SPEC.format(name=name, runs=runs, seed=5, extra=extra)


def shard_table(path):
    t = pq.read_table(path).to_pandas().sort_values(["split", "example"]).reset_index(drop=True)
    return t.drop(columns=[c for c in t.columns if c in ("seconds",)])


def test_resumed_campaign_with_packing_writes_bit_identical_shards(ray_session, tmp_path):
    """Runs 0-5 trained in packs of 4 ([0-3], [4, 5]); then runs 1, 2 and 5 are lost and retrained
    on resume in one pack of 3: their shards hold the same bytes of predictions and margins."""
    c = create_or_open(specs.loads(spec_text("pk", 6, 4), "t.toml"), tmp_path / "c")
    assert runs_per_call(c.spec) == 4
    report = run_campaign(c, progress=False)
    assert report.trained == 6 and report.complete, report
    before = {r: shard_table(c.paths.shard(r)) for r in range(6)}
    for r in (1, 2, 5):
        c.paths.shard(r).unlink()
    (tmp_path / "c" / "state" / "fold.npz").unlink()  # as if the aggregate had never seen them
    report = run_campaign(create_or_open(None, tmp_path / "c"), progress=False)
    assert report.trained == 3, report
    for r in range(6):
        after = shard_table(c.paths.shard(r))
        for col in ("pred", "margin", "in_subset", "correct"):
            np.testing.assert_array_equal(after[col].to_numpy(), before[r][col].to_numpy(), err_msg=f"run {r} {col}")
