"""Datasets: built-ins chosen by name, or a user's loader named by import path.

A loader returns a `Dataset` with train and test inputs and labels in the dataset's original order:
that order defines the example ids used everywhere downstream (shards, estimates, exports).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field

import numpy as np

from workers.errors import call_plugin
from workers.options import SetupError, option


class DatasetError(SetupError):
    """A dataset that cannot be used (wrong shapes or labels), or a plug-in path that does not resolve."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (n_train, *input_shape) float32
    y_train: np.ndarray  # (n_train,) int64 in [0, num_classes)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    # Optional per-example group ids (e.g. the subpopulation of a generated mixture), for tests and reports.
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    # Free-form facts about the data, JSON-serialisable (e.g. which training labels were planted wrong).
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)


# --- digits -------------------------------------------------------------------------------------



@dataclass(frozen=True)
class DigitsOptions:
    test_fraction: float = option(0.2, "share of the 1,797 images held out as the test set (stratified by class)",
                                lambda v: 0.05 <= v <= 0.5, "a number in [0.05, 0.5]")
    split_seed: int = option(0, "seed of the fixed stratified train/test split", lambda v: v >= 0, "an integer >= 0")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, each sorted, with round(test_fraction * n_k) test examples of each class k."""
    rng = np.random.default_rng(seed)
    test = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        test.append(rng.choice(idx, size=int(round(test_fraction * len(idx))), replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


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


# --- registry and plug-ins ----------------------------------------------------------------------

# Real datasets (MNIST, CIFAR, class folders, mnist-5k) live in realdata.py; it imports nothing from
# this module at import time, so there is no cycle.
from workers import realdata  # noqa: E402

DATASET_OPTIONS = {"digits": DigitsOptions, "longtail-mixture": MixtureOptions,
                   "mnist": realdata.MnistOptions, "cifar10": realdata.CifarOptions,
                   "cifar100": realdata.CifarOptions, "imagefolder": realdata.ImageFolderOptions,
                   "mnist-5k": realdata.Mnist5kOptions}
_BUILTIN_LOADERS = {"digits": load_digits_dataset, "longtail-mixture": make_longtail_mixture,
                    "mnist": realdata.load_mnist, "cifar10": realdata.load_cifar10,
                    "cifar100": realdata.load_cifar100, "imagefolder": realdata.load_imagefolder,
                    "mnist-5k": realdata.load_mnist5k}


def resolve(path: str, what: str):
    """Import 'package.module:function' and return the function, or say exactly what failed."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DatasetError(f"{what} {path!r}: cannot import module {module_name!r} ({e}); "
                           f"is its package installed or on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DatasetError(f"{what} {path!r}: module {module_name!r} has no callable {attr!r}")
    return fn


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


def check_dataset(data: Dataset, where: str) -> Dataset:
    """Coerce dtypes and verify shapes and labels; errors name the field, the expected and the found."""
    x_train = np.ascontiguousarray(data.x_train, dtype=np.float32)
    x_test = np.ascontiguousarray(data.x_test, dtype=np.float32)
    y_train = np.asarray(data.y_train)
    y_test = np.asarray(data.y_test)
    for label, y in (("y_train", y_train), ("y_test", y_test)):
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"dataset {where!r}: {label} must be a 1-D integer array, found shape "
                               f"{y.shape} dtype {y.dtype}")
        if len(y) and (y.min() < 0 or y.max() >= data.num_classes):
            raise DatasetError(f"dataset {where!r}: {label} must lie in [0, {data.num_classes}), found "
                               f"values {y.min()}..{y.max()}")
    if x_train.shape[0] != len(y_train) or x_test.shape[0] != len(y_test):
        raise DatasetError(f"dataset {where!r}: inputs and labels disagree: x_train {x_train.shape} vs "
                           f"y_train {y_train.shape}, x_test {x_test.shape} vs y_test {y_test.shape}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"dataset {where!r}: train inputs {x_train.shape[1:]} and test inputs "
                           f"{x_test.shape[1:]} have different shapes")
    if len(y_train) < 2 or len(y_test) < 1:
        raise DatasetError(f"dataset {where!r}: need at least 2 training and 1 test example, found "
                           f"{len(y_train)} and {len(y_test)}")
    if not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise DatasetError(f"dataset {where!r}: inputs contain NaN or infinite values")
    return Dataset(name=data.name, x_train=x_train, y_train=y_train.astype(np.int64), x_test=x_test,
                   y_test=y_test.astype(np.int64), num_classes=int(data.num_classes),
                   train_groups=data.train_groups, test_groups=data.test_groups, info=dict(data.info))


def dataset_fingerprint(data: Dataset) -> str:
    """Labels in full plus shapes and a strided sample of the inputs: cheap even for large datasets."""
    h = hashlib.sha256()
    for a in (data.y_train, data.y_test):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    for x in (data.x_train, data.x_test):
        h.update(str(x.shape).encode())
        step = max(1, len(x) // 1000)
        h.update(np.ascontiguousarray(x[::step], np.float32).tobytes())
    return h.hexdigest()[:16]
