"""Plug-in examples: a dataset loader, a model factory and a trainer, as a spec names them:

    [dataset]
    name = "plugins:gaussian_blobs"     # package.module:function, importable where the workers run
    [model]
    name = "plugins:tiny_mlp"
    [train]
    trainer = "plugins:nearest_neighbour"   # replaces the torch recipe (then [model] is not used)

The contract is docs/plugins.md. The keys of a plug-in's section are passed to it unvalidated.
"""

from __future__ import annotations

import numpy as np

from workers.datasets import Dataset


def gaussian_blobs(section: dict) -> Dataset:
    """Loader: `fn(section) -> Dataset`, train and test in their original order."""
    rng = np.random.default_rng(section.get("seed", 0))
    classes, dim = section.get("classes", 3), section.get("dim", 5)
    n_train, n_test = section.get("n_train", 120), section.get("n_test", 60)
    centres = rng.normal(0, 3, (classes, dim))

    def draw(n):
        y = rng.integers(0, classes, n)
        return (centres[y] + rng.normal(0, 1, (n, dim))).astype(np.float32), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("gaussian-blobs", x_train, y_train, x_test, y_test, num_classes=classes)


def tiny_mlp(section: dict, num_classes: int, input_shape: tuple):
    """Model factory: `fn(section, num_classes, input_shape) -> torch.nn.Module` returning logits."""
    import math

    import torch.nn as nn

    width = section.get("width", 32)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def nearest_neighbour(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """Trainer: `fn(dataset, train_indices, seed) -> (train_pred, test_pred[, train_margin, test_margin])`.

    1-nearest-neighbour on the run's subset: deterministic, so its memorization and influence can be
    computed exactly, which the tests use as ground truth.
    """
    x = dataset.x_train[train_indices].reshape(len(train_indices), -1)
    y = dataset.y_train[train_indices]

    def predict(q):
        q = q.reshape(len(q), -1)
        d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return y[d.argmin(axis=1)]

    return predict(dataset.x_train), predict(dataset.x_test)


def fails_on_odd_seeds(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """A trainer that fails for half the runs, to show (and test) how failures are recorded."""
    if seed % 2:
        raise RuntimeError(f"seed {seed} is odd")
    return nearest_neighbour(dataset, train_indices, seed)


def slow_nearest_neighbour(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """nearest_neighbour taking a quarter of a second, like a (very) small real training run."""
    import time

    time.sleep(0.25)
    return nearest_neighbour(dataset, train_indices, seed)
