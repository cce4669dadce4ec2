"""Built-in datasets, plug-in loading and the checks on what a loader returns."""

import numpy as np
import pytest

from workers.datasets import Dataset, DatasetError, check_dataset, load_dataset, make_longtail_mixture


def test_digits_split_is_fixed_and_stratified():
    a = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    b = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.n_train + a.n_test == 1797 and a.input_shape == (1, 8, 8)
    assert 0 <= a.x_train.min() and a.x_train.max() <= 1
    # every class holds out round(0.2 * its size)
    full = np.bincount(np.r_[a.y_train, a.y_test])
    np.testing.assert_array_equal(np.bincount(a.y_test), np.round(0.2 * full).astype(int))
    src = np.r_[a.info["source_train_index"], a.info["source_test_index"]]
    assert sorted(src.tolist()) == list(range(1797))
    c = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 1})
    assert not np.array_equal(a.y_test, c.y_test)


def test_mixture_is_long_tailed():
    d = make_longtail_mixture({"n_train": 2000, "n_test": 500, "subpopulations": 400})
    sizes = np.bincount(d.train_groups, minlength=400)
    assert d.info["singleton_subpopulations"] == int((sizes == 1).sum()) > 20  # singletons exist
    assert sizes[0] > 10 * np.median(sizes[sizes > 0])  # the head is far heavier than the typical subpopulation
    # labels are a function of the subpopulation
    for g in np.unique(d.train_groups)[:50]:
        assert len(np.unique(d.y_train[d.train_groups == g])) == 1
    assert d.train_groups.shape == (2000,) and d.test_groups.shape == (500,)


def test_mixture_plants_wrong_labels():
    clean = make_longtail_mixture({"n_train": 300, "n_test": 50, "seed": 2})
    dirty = make_longtail_mixture({"n_train": 300, "n_test": 50, "seed": 2, "mislabeled": 5})
    bad = np.array(dirty.info["mislabeled"])
    assert len(bad) == 5
    assert (dirty.y_train[bad] != clean.y_train[bad]).all()
    keep = np.setdiff1d(np.arange(300), bad)
    np.testing.assert_array_equal(dirty.y_train[keep], clean.y_train[keep])


def test_plugin_loader(monkeypatch):
    import plugins

    d = load_dataset({"name": "plugins:gaussian_blobs", "n_train": 30, "n_test": 10})
    assert (d.n_train, d.n_test, d.num_classes) == (30, 10, 3)
    with pytest.raises(DatasetError, match=r"cannot import module 'no_such_module'"):
        load_dataset({"name": "no_such_module:f"})
    with pytest.raises(DatasetError, match=r"module 'plugins' has no callable 'nope'"):
        load_dataset({"name": "plugins:nope"})
    monkeypatch.setattr(plugins, "returns_array", lambda section: np.zeros(3), raising=False)
    with pytest.raises(DatasetError, match=r"returned ndarray; expected workers.datasets.Dataset"):
        load_dataset({"name": "plugins:returns_array"})


def good():
    x = np.zeros((6, 2), np.float32)
    return dict(name="d", x_train=x, y_train=np.array([0, 1, 0, 1, 0, 1]), x_test=x[:2], y_test=np.array([0, 1]),
                num_classes=2)


@pytest.mark.parametrize("change,match", [
    (dict(y_train=np.array([0, 1, 0, 1, 0, 2])), r"y_train must lie in \[0, 2\), found values 0..2"),
    (dict(y_train=np.zeros((6, 1), int)), r"y_train must be a 1-D integer array, found shape \(6, 1\)"),
    (dict(y_test=np.array([0.5, 1.0])), r"y_test must be a 1-D integer array"),
    (dict(y_train=np.array([0, 1, 0])), r"inputs and labels disagree: x_train \(6, 2\) vs y_train \(3,\)"),
    (dict(x_test=np.zeros((2, 3), np.float32)), r"train inputs \(2,\) and test inputs \(3,\) have different shapes"),
    (dict(x_train=np.full((6, 2), np.nan, np.float32)), r"inputs contain NaN"),
])
def test_wrong_shapes_and_labels(change, match):
    with pytest.raises(DatasetError, match=match):
        check_dataset(Dataset(**{**good(), **change}), "d")
