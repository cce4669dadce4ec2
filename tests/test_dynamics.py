"""Training dynamics recorded by the torch runs (workers/dynamics.py), packed and alone, and kept in shards."""

import json

import numpy as np
import pytest
import torch

from estimators import proxies as px
from orchestrator import spec as specs
from workers import shard as shard_format
from workers.datasets import load_dataset
from workers.dynamics import Recorder
from workers.ensemble import train_runs
from workers.models import model_factory
from workers.results import RunFailed, run_plugin_trainer
from workers.training import DeviceData, train_run

TRAIN = dict(epochs=6, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="constant", label_smoothing=0.0, eval_batch_size=4096, store=["margin", "dynamics"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    return d, DeviceData.from_dataset(d, torch.device("cpu"))


@pytest.mark.parametrize("flush, slot_bytes", [(Recorder.FLUSH_ELEMENTS, Recorder.SLOT_BYTES),
                                               (1, Recorder.SLOT_BYTES), (Recorder.FLUSH_ELEMENTS, 1), (20, Recorder.SLOT_BYTES)])
def test_recorder_counts_a_hand_built_trajectory(flush, slot_bytes, monkeypatch):
    """Logits built so that each example's batch correctness follows a known trajectory: the recorder's
    learning time, forgetting events and cumulative loss equal the pure definitions', whether the batches
    are scored together at the end (small runs), each as it comes (flush = 1: large batches) or in groups
    spanning an epoch boundary (flush = 20), and whether all epochs are folded together or each as it
    ends (slot_bytes = 1: large datasets)."""
    monkeypatch.setattr(Recorder, "FLUSH_ELEMENTS", flush)
    monkeypatch.setattr(Recorder, "SLOT_BYTES", slot_bytes)
    correct = np.array([[0, 1, 1, 0, 1],  # epoch 0 (examples 0..4)
                        [1, 1, 0, 0, 1],
                        [1, 0, 1, 0, 0],
                        [1, 1, 1, 0, 1]], bool)
    epochs, n = correct.shape
    y = torch.tensor([0, 1, 2, 0, 1])
    rec = Recorder(1, y, 0.0)
    want_loss = np.zeros(n)
    for e in range(epochs):
        logits = torch.zeros(n, 3)
        target = torch.where(torch.as_tensor(correct[e]), y, (y + 1) % 3)
        logits[torch.arange(n), target] = 2.0
        for batch in (torch.tensor([3, 0]), torch.tensor([4, 1, 2])):  # two batches, shuffled
            rec.batch(logits[batch], batch)
        want_loss += torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
        rec.end_epoch()
    got = rec.result(0, np.arange(n))
    assert got["learn_epoch"].tolist() == px.learning_time(correct).tolist() == [1, 3, 2, 4, 3]
    assert got["forgets"].tolist() == px.forgetting_events(correct).tolist() == [0, 1, 1, 0, 1]
    np.testing.assert_allclose(got["loss_sum"], want_loss, rtol=1e-6)
    # with label smoothing, the loss is the one the run optimises (F.cross_entropy's)
    rec = Recorder(1, y, 0.1)
    logits = torch.randn(n, 3)
    rec.batch(logits, torch.arange(n))
    rec.end_epoch()
    np.testing.assert_allclose(rec.result(0, np.arange(n))["loss_sum"], torch.nn.functional.cross_entropy(
        logits, y, reduction="none", label_smoothing=0.1).numpy(), rtol=1e-5)


def test_packed_dynamics_equal_runs_trained_alone(digits):
    """Three runs trained together (ensemble.py) record the dynamics each records trained alone, up to
    float rounding: the loss sums to 1e-4 relative (float32 sums over 6 epochs of batched vs unbatched
    matrix products differ near 1e-6); learning time and forgetting events exactly."""
    d, dd = digits
    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.choice(d.n_train, 1000, replace=False)) for _ in range(3)]
    seeds = [11, 12, 13]
    packed = train_runs({"name": "mlp", "hidden": [64]}, dd, subsets, seeds, TRAIN)
    build = model_factory({"name": "mlp", "hidden": [64]})
    for s, seed, p in zip(subsets, seeds, packed):
        alone = train_run(build, dd, s, seed, TRAIN)
        assert alone.dynamics is not None and p.dynamics is not None
        assert p.dynamics["loss_sum"].shape == (1000,)
        np.testing.assert_allclose(p.dynamics["loss_sum"], alone.dynamics["loss_sum"], rtol=1e-4)
        np.testing.assert_array_equal(p.dynamics["learn_epoch"], alone.dynamics["learn_epoch"])
        np.testing.assert_array_equal(p.dynamics["forgets"], alone.dynamics["forgets"])
        # the values are those of a trajectory: in range, and not all the same
        assert 0 <= p.dynamics["learn_epoch"].min() and p.dynamics["learn_epoch"].max() <= TRAIN["epochs"]
        assert len(np.unique(p.dynamics["learn_epoch"])) > 2
        # recording changes nothing about the run itself
        plain = train_run(build, dd, s, seed, {**TRAIN, "store": ["margin"]})
        assert plain.dynamics is None
        np.testing.assert_array_equal(plain.train_pred, alone.train_pred)
        np.testing.assert_array_equal(plain.train_values["margin"], alone.train_values["margin"])


def _shard(d, mask, dynamics):
    pred = d.y_train.copy()
    meta = {"campaign": "c", "spec_hash": "h", "run": 0, "n_train": d.n_train, "n_test": d.n_test}
    return shard_format.build_table(mask, pred, d.y_test.copy(), d.y_train, d.y_test, d.num_classes, meta,
                                    {"margin": (np.zeros(d.n_train), np.zeros(d.n_test))}, dynamics)


def test_shard_keeps_dynamics_and_old_shards_have_none(digits, tmp_path):
    d, _ = digits
    mask = np.zeros(d.n_train, bool)
    mask[::3] = True
    m = int(mask.sum())
    dyn = {"loss_sum": np.linspace(0, 30, m, dtype=np.float32), "learn_epoch": np.arange(m, dtype=np.int32) % 7,
           "forgets": np.arange(m, dtype=np.int32) % 3}
    kw = dict(campaign="c", spec_hash="h", run=0, n_train=d.n_train, n_test=d.n_test)
    shard_format.write_shard(tmp_path / "new.parquet", _shard(d, mask, dyn))
    got = shard_format.read_shard(tmp_path / "new.parquet", **kw).dynamics
    for name in dyn:
        assert np.isnan(got[name][~mask]).all()
        np.testing.assert_allclose(got[name][mask], dyn[name], rtol=1e-3)  # float16 loss, exact integers
    shard_format.write_shard(tmp_path / "old.parquet", _shard(d, mask, None))
    assert shard_format.read_shard(tmp_path / "old.parquet", **kw).dynamics is None
    # bytes the dynamics add per trained row (docs/campaign-directory.md): the float16 loss sum (2 bytes,
    # incompressible here) and two small counts, with their null bitmaps: at most 4
    extra = (tmp_path / "new.parquet").stat().st_size - (tmp_path / "old.parquet").stat().st_size
    assert 2 < extra / m <= 4.0


def test_plugin_trainer_may_return_dynamics(digits):
    d, _ = digits
    idx = np.arange(0, d.n_train, 2)

    def good(dataset, train_idx, seed):
        k = len(train_idx)
        return (dataset.y_train.copy(), dataset.y_test.copy(),
                {"loss_sum": np.ones(k), "learn_epoch": np.zeros(k, int), "forgets": np.zeros(k, int)})

    out = run_plugin_trainer(good, d, idx, 0, "x:good")
    assert out.dynamics["loss_sum"].shape == (len(idx),)

    def bad(dataset, train_idx, seed):
        return dataset.y_train.copy(), dataset.y_test.copy(), {"loss_sum": np.ones(3)}

    with pytest.raises(RunFailed, match="dynamics must be a dict with keys"):
        run_plugin_trainer(bad, d, idx, 0, "x:bad")


def test_storing_dynamics_keeps_the_spec_hash():
    """[train] store = [..., 'dynamics'] changes no prediction: old campaigns stay resumable with it."""
    base = specs.loads('[campaign]\nname = "x"\nruns = 4\n[dataset]\nname = "digits"\n[model]\nname = "mlp"\n')
    with_dyn = base.replace(train=__import__("dataclasses").replace(base.train, store=["margin", "dynamics"]))
    assert with_dyn.result_hash() == base.result_hash()
    with_prob = base.replace(train=__import__("dataclasses").replace(base.train, store=["margin", "probability"]))
    assert with_prob.result_hash() != base.result_hash()


MIXTURE = """
[campaign]
name = "{name}"
runs = {runs}
[dataset]
name = "longtail-mixture"
n_train = 300
n_test = 100
subpopulations = 60
mislabeled = 15
[model]
name = "mlp"
hidden = [256]
[train]
optimizer = "adam"
lr = 0.01
epochs = {epochs}
batch_size = 64
weight_decay = 0.0
store = {store}
[estimates]
influence = "none"
block_runs = 4
"""


def mixture_spec(name, runs, store, epochs=30):
    return specs.loads(MIXTURE.format(name=name, runs=runs, store=store, epochs=epochs), "test.toml")


def _table(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def test_campaign_writes_proxies_triage_and_pred_probs_for_cleanlab(ray_session, tmp_path):
    """A campaign with dynamics on a mixture with 15 planted wrong labels: the proxies are averaged over
    exactly the runs that trained on each example, the out-of-subset counts cover exactly the others,
    pred_probs goes through cleanlab and finds the planted labels, `longtail proxies` prints the table,
    and `longtail estimate` (from the shards) rewrites the same files as the driver's checkpointed fold."""
    from cleanlab.filter import find_label_issues
    from click.testing import CliRunner

    from orchestrator.campaign import create_or_open
    from orchestrator.cli import main
    from orchestrator.driver import run_campaign

    root = tmp_path / "c"
    c = create_or_open(mixture_spec("dyn", 16, '["margin", "dynamics"]'), root)
    run_campaign(c, progress=False)
    est = root / "estimates"
    mem, prox = _table(est / "memorization.parquet"), _table(est / "proxies.parquet")
    tri = _table(est / "triage.parquet")
    np.testing.assert_array_equal(prox["runs"], mem["n_in"])
    np.testing.assert_array_equal(tri["out_predictions"], mem["n_out"])
    assert prox["learn_epoch_mean"].between(0, 30).all() and (prox["loss_sum_mean"] > 0).all()
    pred_probs = np.load(est / "pred_probs.npy", allow_pickle=False)
    assert pred_probs.shape == (300, 10)
    np.testing.assert_allclose(pred_probs.sum(1), 1, rtol=1e-5)
    planted = np.zeros(300, bool)
    planted[c.dataset.info["mislabeled"]] = True
    issues = find_label_issues(c.labels["train_labels"], pred_probs)
    # out-of-subset models predict a planted example's true class: cleanlab finds nearly all of them
    assert issues.shape == (300,) and (issues & planted).sum() >= 12
    # planted wrong labels are memorized (tests/test_campaign.py) and triaged mislabeled
    assert (tri.loc[planted, "triage"] == "mislabeled").sum() >= 12
    summary = json.loads((est / "summary.json").read_text())
    assert summary["proxies"]["runs_with_dynamics"] == 16
    assert summary["triage"]["mislabeled"] == int((tri["triage"] == "mislabeled").sum())
    out = CliRunner().invoke(main, ["proxies", str(root)])
    assert out.exit_code == 0 and "loss_sum" in out.output and "spearman" in out.output
    before = {f: _table(est / f) for f in ("proxies.parquet", "triage.parquet", "proxy_agreement.parquet")}
    out = CliRunner().invoke(main, ["estimate", str(root), "--top", "3"])
    assert out.exit_code == 0, out.output
    assert "proxy agreement with memorization" in out.output and "mislabeled (mode" in out.output
    for f, t in before.items():
        after = _table(est / f)
        assert t.equals(after), f


def test_old_campaign_without_dynamics_resumes_estimates_and_reports(ray_session, tmp_path):
    """A campaign whose shards have no dynamics and whose checkpoint predates the proxy sums: it resumes
    (refolding, with a note), estimates and reports, the new sections say what is missing and how to get
    it; adding "dynamics" to [train] store keeps the spec hash, so it resumes with more runs that have them."""
    from click.testing import CliRunner

    from orchestrator.fold import Aggregator
    from orchestrator.campaign import create_or_open
    from orchestrator.cli import main
    from orchestrator.driver import run_campaign
    from orchestrator.features.report import write_report

    root = tmp_path / "old"
    run_campaign(create_or_open(mixture_spec("old", 6, '["margin"]', epochs=3), root), progress=False)
    # the checkpoint as an older longtail wrote it: no proxy. arrays
    with np.load(root / "state" / "fold.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("proxy.")}
    with open(root / "state" / "fold.npz", "wb") as f:
        np.savez(f, **arrays)
    agg = Aggregator(create_or_open(None, root, load_data=False))
    assert any("out-of-subset" in n and "refolding" in n for n in agg.notes)
    out = CliRunner().invoke(main, ["proxies", str(root)])
    assert out.exit_code == 2 and "dynamics" in out.output and "Traceback" not in out.output
    summary = json.loads((root / "estimates" / "summary.json").read_text())
    assert summary["proxies"]["runs_with_dynamics"] == 0 and "[train] store" in summary["proxies"]["missing"]
    assert (root / "estimates" / "triage.parquet").exists()  # predictions alone give the triage
    path, _ = write_report(root)
    html = path.read_text()
    assert "no run of this campaign recorded training dynamics" in html
    # the same campaign with dynamics turned on and more runs: accepted, and the new runs have them
    c = create_or_open(mixture_spec("old", 10, '["margin", "dynamics"]', epochs=3), root)
    run_campaign(c, progress=False)
    summary = json.loads((root / "estimates" / "summary.json").read_text())
    assert summary["proxies"]["runs_with_dynamics"] == 4


def test_packed_convnet_dynamics_equal_runs_trained_alone():
    """The fused convnets of workers/packed.py record the dynamics train_run records for the same run:
    loss sums to 1e-4 relative (other kernels, see tests/test_packed_cnn.py), the counts equal on all
    but at most 2% of the examples (a logit tie broken differently by rounding flips one epoch)."""
    from workers.packed import train_packed

    g = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (120,), generator=g)
    x = templates[y] + 0.8 * torch.randn(120, 3, 8, 8, generator=g)
    data = DeviceData(x[:90], y[:90], x[90:], y[90:], 4, (3, 8, 8))
    train = dict(epochs=4, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 schedule="cosine", label_smoothing=0.1, eval_batch_size=48, augment="flip", store=["dynamics"])
    build = model_factory({"name": "cnn", "channels": [8, 16], "hidden": 16})
    rng = np.random.default_rng(0)
    subs = [np.sort(rng.choice(90, 40, replace=False)) for _ in range(2)]
    for out, sub, seed in zip(train_packed(build, data, subs, [11, 12], train), subs, [11, 12]):
        alone = train_run(build, data, sub, seed, train).dynamics
        np.testing.assert_allclose(out.dynamics["loss_sum"], alone["loss_sum"], rtol=1e-4)
        for key in ("learn_epoch", "forgets"):
            assert (out.dynamics[key] == alone[key]).mean() >= 0.98, (key, out.dynamics[key], alone[key])
        assert len(np.unique(alone["learn_epoch"])) > 1
