"""Datasets: built-ins chosen by name, or a user's loader named by import path.

A loader returns a `Dataset` (workers/data.py, with its checks and fingerprint) with train and test
inputs and labels in the dataset's original order: that order defines the example ids used everywhere
downstream (shards, estimates, exports). The generated datasets are here, the ones read from files in
workers/realdata.py; both fill the registry below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers import realdata
from workers.data import Dataset, DatasetError, check_dataset, dataset_fingerprint, stratified_split
from workers.errors import call_plugin
from workers.options import option
from workers.plugins import resolve

# the names plug-ins and callers import from here (Dataset for a loader's return value)
__all__ = ["DATASET_OPTIONS", "Dataset", "DatasetError", "check_dataset", "dataset_fingerprint", "load_dataset",
           "resolve", "stratified_split"]


# --- digits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsOptions:
    test_fraction: float = option(0.2, "share of the 1,797 images held out as the test set (stratified by class)",
                                lambda v: 0.05 <= v <= 0.5, "a number in [0.05, 0.5]")
    split_seed: int = option(0, "seed of the fixed stratified train/test split", lambda v: v >= 0, "an integer >= 0")


def load_digits_dataset(options: dict) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), pixels scaled to [0, 1].

    The split is stratified and fixed by split_seed; example ids are positions in the train and test
    parts, which keep the order of sklearn's file. info["source_index"] maps them back to it.
    """
    from sklearn.datasets import load_digits

    opts = DigitsOptions(**options)
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, opts.test_fraction, opts.split_seed)
    return Dataset(
        name="digits", x_train=x[train_idx], y_train=y[train_idx], x_test=x[test_idx], y_test=y[test_idx],
        num_classes=10, info={"source_train_index": train_idx.tolist(), "source_test_index": test_idx.tolist(),
                              "image_shape": [8, 8]},
    )


# --- longtail-mixture ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MixtureOptions:
    n_train: int = option(2000, "training examples", lambda v: v >= 10, "an integer >= 10")
    n_test: int = option(1000, "test examples", lambda v: v >= 1, "an integer >= 1")
    classes: int = option(10, "number of classes", lambda v: v >= 2, "an integer >= 2")
    subpopulations: int = option(400, "subpopulations (clusters), each with one class", lambda v: v >= 2,
                               "an integer >= 2")
    zipf_exponent: float = option(1.0, "subpopulation k has frequency proportional to 1 / k**zipf_exponent",
                                lambda v: v >= 0, "a number >= 0")
    dim: int = option(32, "input dimension", lambda v: v >= 2, "an integer >= 2")
    spread: float = option(0.35, "within-subpopulation noise relative to the distance between subpopulations",
                         lambda v: v >= 0, "a number >= 0")
    mislabeled: int = option(0, "training examples whose label is replaced by a wrong one (planted memorization)",
                           lambda v: v >= 0, "an integer >= 0")
    seed: int = option(0, "generator seed", lambda v: v >= 0, "an integer >= 0")


def make_longtail_mixture(options: dict) -> Dataset:
    """A Feldman-style long-tailed mixture: many subpopulations with Zipf frequencies.

    Each subpopulation has a random centre on the unit sphere (scaled so that centres sit about 1
    apart) and a random class; an example is its centre plus isotropic noise. Rare subpopulations
    have one or two training examples (singletons exist by construction), so a model can classify
    their test examples only by memorizing those few training examples: the long tail in miniature.
    `mislabeled` training examples, chosen among frequent subpopulations, get a wrong label; their
    ids are in info["mislabeled"].
    """
    o = MixtureOptions(**options)
    if o.mislabeled >= o.n_train:
        raise DatasetError(f"longtail-mixture: mislabeled ({o.mislabeled}) must be below n_train ({o.n_train})")
    rng = np.random.default_rng(o.seed)
    k = o.subpopulations
    centres = rng.standard_normal((k, o.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres *= 1 / np.sqrt(2)  # unit-norm random vectors in high dimension are about sqrt(2) apart
    sub_class = rng.integers(0, o.classes, size=k)
    sub_class[: o.classes] = np.arange(o.classes)  # the most frequent subpopulations cover every class
    freq = 1.0 / np.arange(1, k + 1) ** o.zipf_exponent
    freq /= freq.sum()

    def draw(n):
        groups = rng.choice(k, size=n, p=freq)
        noise = rng.standard_normal((n, o.dim)) * (o.spread / np.sqrt(o.dim))
        return (centres[groups] + noise).astype(np.float32), sub_class[groups].astype(np.int64), groups

    x_train, y_train, g_train = draw(o.n_train)
    x_test, y_test, g_test = draw(o.n_test)
    mislabeled = np.array([], dtype=np.int64)
    if o.mislabeled:
        # Plant wrong labels on examples of frequent subpopulations: their neighbours say otherwise, so a
        # model gets them "right" only when it trained on them.
        sizes = np.bincount(g_train, minlength=k)
        frequent = np.flatnonzero(sizes[g_train] >= 5)
        pool = frequent if len(frequent) >= o.mislabeled else np.arange(o.n_train)
        mislabeled = np.sort(rng.choice(pool, size=o.mislabeled, replace=False))
        shift = rng.integers(1, o.classes, size=o.mislabeled)
        y_train = y_train.copy()
        y_train[mislabeled] = (y_train[mislabeled] + shift) % o.classes
    counts = np.bincount(g_train, minlength=k)
    return Dataset(
        name="longtail-mixture", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=o.classes, train_groups=g_train, test_groups=g_test,
        info={"mislabeled": mislabeled.tolist(),
              "singleton_subpopulations": int((counts == 1).sum()),
              "subpopulations_in_train": int((counts > 0).sum())},
    )


# --- registry -----------------------------------------------------------------------------------

# Real datasets (MNIST, CIFAR, class folders, mnist-5k) live in realdata.py.
DATASET_OPTIONS = {"digits": DigitsOptions, "longtail-mixture": MixtureOptions,
                   "mnist": realdata.MnistOptions, "cifar10": realdata.CifarOptions,
                   "cifar100": realdata.CifarOptions, "imagefolder": realdata.ImageFolderOptions,
                   "mnist-5k": realdata.Mnist5kOptions}
_BUILTIN_LOADERS = {"digits": load_digits_dataset, "longtail-mixture": make_longtail_mixture,
                    "mnist": realdata.load_mnist, "cifar10": realdata.load_cifar10,
                    "cifar100": realdata.load_cifar100, "imagefolder": realdata.load_imagefolder,
                    "mnist-5k": realdata.load_mnist5k}


def load_dataset(section: dict) -> Dataset:
    """Load the dataset a resolved [dataset] section names, and check what the loader returned."""
    name = section["name"]
    options = {k: v for k, v in section.items() if k != "name"}
    if ":" in name:
        data = call_plugin("dataset loader", name, resolve(name, "dataset loader"), section)
        if not isinstance(data, Dataset):
            raise DatasetError(f"dataset loader {name!r} returned {type(data).__name__}; expected "
                               f"workers.datasets.Dataset")
    else:
        data = _BUILTIN_LOADERS[name](options)
    return check_dataset(data, name)
