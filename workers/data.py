"""What a dataset is, whoever loads it: the `Dataset` a loader returns, the checks every dataset passes,
its fingerprint, and the stratified split the built-ins use.

This is the leaf of the data modules: workers.datasets (the registry and the generated datasets) and
workers.realdata (files on disk) both import it at the top, and it imports neither.
A loader returns train and test inputs and labels in the dataset's original order: that order defines
the example ids used everywhere downstream (shards, estimates, exports).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from workers.options import SetupError


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
