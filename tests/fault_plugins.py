"""Plug-ins that misbehave on purpose, for the fault tests. The dataset section's keys reach the
trainer through Dataset.info: `sleep` (seconds per run), `die_marker` (a path: the first run to see it
missing creates it and SIGKILLs its own worker process), `garbage_every` (runs whose seed is a
multiple of it return random predictions), `fail_always`."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

import plugins
from workers.datasets import Dataset

KEYS = ("sleep", "die_marker", "garbage_every", "fail_always")


def blobs(section: dict) -> Dataset:
    d = plugins.gaussian_blobs(section)
    return Dataset(d.name, d.x_train, d.y_train, d.x_test, d.y_test, d.num_classes,
                   info={k: section[k] for k in KEYS if k in section})


def knn(dataset: Dataset, train_indices: np.ndarray, seed: int):
    info = dataset.info
    time.sleep(info.get("sleep", 0))
    marker = info.get("die_marker")
    if marker and not os.path.exists(marker):
        try:  # exclusive create: of two workers racing here, exactly one dies
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    if info.get("fail_always"):
        raise RuntimeError("this trainer always fails")
    if info.get("garbage_every") and seed % info["garbage_every"] == 0:
        rng = np.random.default_rng(seed)
        return (rng.integers(0, dataset.num_classes, dataset.n_train),
                (dataset.y_test + 1) % dataset.num_classes)  # every test prediction wrong
    return plugins.nearest_neighbour(dataset, train_indices, seed)


def bad_labels(section: dict) -> Dataset:
    """A loader whose training labels run past num_classes."""
    d = plugins.gaussian_blobs(section)
    y = d.y_train.copy()
    y[0] = d.num_classes
    return Dataset(d.name, d.x_train, y, d.x_test, d.y_test, d.num_classes)


def knn_dies_always(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """Kills its own worker process on every run whose seed is odd."""
    if seed % 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return plugins.nearest_neighbour(dataset, train_indices, seed)
