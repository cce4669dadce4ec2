"""Plug-ins that are wrong on purpose, for tests/test_redteam.py: a trainer whose predictions are out of
range, a loader and a model factory that raise or return the wrong type."""

from __future__ import annotations

import time

import numpy as np

import fault_plugins
import plugins
from workers.datasets import Dataset

_blobs = fault_plugins.blobs  # before a test replaces it by slow_blobs

def label_99(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """Predicts label 99 for everything: integers of the right shape, but no class of the dataset."""
    return np.full(dataset.n_train, 99), np.full(dataset.n_test, 99)


def odd_seeds_fail(dataset: Dataset, train_indices: np.ndarray, seed: int):
    if seed % 2:
        raise RuntimeError(f"seed {seed} is odd")
    return plugins.nearest_neighbour(dataset, train_indices, seed)


def slow_blobs(section: dict) -> Dataset:
    """fault_plugins.blobs after a 1 s pause: a dataset that takes time to load."""
    time.sleep(1.0)
    return _blobs(section)


def loader_raises(section: dict) -> Dataset:
    return _helper_that_fails(section)


def _helper_that_fails(section: dict):
    raise KeyError("n_pixels")


def loader_returns_dict(section: dict):
    return {"x_train": []}


def factory_raises(section: dict, num_classes: int, input_shape: tuple):
    raise ValueError(f"cannot build a model for {num_classes} classes")


def factory_returns_none(section: dict, num_classes: int, input_shape: tuple):
    return None


def blobs_4d(section: dict) -> Dataset:
    """Gaussian blobs whose inputs are 4-D (1 x 2 x 2 x 2): no built-in image model takes them."""
    d = plugins.gaussian_blobs({**section, "dim": 8})
    return Dataset(d.name, d.x_train.reshape(-1, 1, 2, 2, 2), d.y_train, d.x_test.reshape(-1, 1, 2, 2, 2),
                   d.y_test, d.num_classes)
