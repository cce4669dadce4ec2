"""The training recipe: seeded, evaluated in eval mode, failing loudly on NaN."""

import numpy as np
import pytest
import torch

from workers.datasets import load_dataset
from workers.models import model_factory
from workers.results import RunFailed, run_plugin_trainer
from workers.training import DeviceData, evaluate, train_run

TRAIN = dict(epochs=3, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="cosine", label_smoothing=0.0, eval_batch_size=256)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    return d, DeviceData.from_dataset(d, torch.device("cpu"))


def test_same_seed_same_predictions(digits):
    d, dd = digits
    build = model_factory({"name": "mlp", "hidden": [32], "dropout": 0.0})
    idx = np.arange(0, d.n_train, 2)
    a = train_run(build, dd, idx, 11, TRAIN)
    b = train_run(build, dd, idx, 11, TRAIN)
    c = train_run(build, dd, idx, 12, TRAIN)
    np.testing.assert_array_equal(a.train_values["margin"], b.train_values["margin"])
    assert not np.array_equal(a.train_values["margin"], c.train_values["margin"])
    assert (a.test_pred == d.y_test).mean() > 0.5  # 3 epochs: far above chance (0.1), not converged
    # margin > 0 exactly when the prediction is right (ties aside)
    assert ((a.train_values["margin"] > 0) == (a.train_pred == d.y_train)).mean() > 0.999
    p = a.train_values["probability"]
    assert (0 <= p).all() and (p <= 1).all() and ((p > 0.5) <= (a.train_pred == d.y_train)).all()


def test_logits_are_kept_only_when_stored(digits):
    d, dd = digits
    build = model_factory({"name": "mlp", "hidden": [16], "dropout": 0.0})
    plain = train_run(build, dd, np.arange(300), 1, {**TRAIN, "epochs": 1})
    kept = train_run(build, dd, np.arange(300), 1, {**TRAIN, "epochs": 1, "store": ["margin", "logits"]})
    assert "logits" not in plain.train_values
    logits = kept.train_values["logits"]
    assert logits.shape == (d.n_train, 10) and logits.dtype == np.float16
    np.testing.assert_array_equal(logits.astype(np.float32).argmax(axis=1)[:50], kept.train_pred[:50])


def test_cnn_trains_and_evaluates_in_eval_mode(digits):
    d, dd = digits
    build = model_factory({"name": "cnn", "channels": [8, 16], "hidden": 32})
    out = train_run(build, dd, np.arange(400), 0, {**TRAIN, "epochs": 2})
    assert out.train_pred.shape == (d.n_train,) and out.test_values["margin"].dtype == np.float32
    # in eval mode batch norm uses running statistics: a prediction does not depend on its batch
    model = build(10, d.input_shape)
    model.train()
    model(dd.x_train[:64])  # move the running statistics away from their initial values
    p_big, _ = evaluate(model, dd.x_test, dd.y_test, 512)
    p_one, _ = evaluate(model, dd.x_test, dd.y_test, 1)
    np.testing.assert_array_equal(p_big, p_one)


def test_nan_loss_fails_the_run(digits):
    _, dd = digits
    build = model_factory({"name": "mlp", "hidden": [32], "dropout": 0.0})
    with pytest.raises(RunFailed, match=r"training loss became nan in epoch 1/3; lower \[train\] lr"):
        train_run(build, dd, np.arange(200), 0, {**TRAIN, "lr": 1e30, "schedule": "constant"})


def test_plugin_trainer_contract(digits):
    d, _ = digits
    idx = np.arange(100)
    out = run_plugin_trainer(lambda ds, i, s: (ds.y_train.copy(), ds.y_test.copy()), d, idx, 0, "t")
    assert (out.train_pred == d.y_train).all() and out.train_values == {}
    with pytest.raises(RunFailed, match=r"must return \(train_pred, test_pred\)"):
        run_plugin_trainer(lambda ds, i, s: ds.y_train, d, idx, 0, "t")
    with pytest.raises(RunFailed, match=r"test_pred must have shape \(359,\), found \(3,\)"):
        run_plugin_trainer(lambda ds, i, s: (ds.y_train, np.zeros(3, int)), d, idx, 0, "t")
    with pytest.raises(RunFailed, match=r"train_pred must hold integer labels"):
        run_plugin_trainer(lambda ds, i, s: (ds.y_train * 0.5, ds.y_test), d, idx, 0, "t")
