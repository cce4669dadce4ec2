"""Plug-ins that misbehave on purpose, for the fault tests. The dataset section's keys reach the
trainer through Dataset.info: `sleep` (seconds per run), `die_marker` (a path: the first run to see it
missing creates it and SIGKILLs its own worker process), `garbage_every` (runs whose seed is a
multiple of it return random predictions), `fail_always`, `die_writing` (a campaign directory: the first
run to find `<dir>/died` missing leaves a temporary shard of its own in runs/, as a worker killed while
writing does, and SIGKILLs its worker)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

import plugins
from workers.datasets import Dataset

KEYS = ("sleep", "die_marker", "garbage_every", "fail_always", "die_writing")


def blobs(section: dict) -> Dataset:
    """gaussian_blobs, with the fault keys in info; `shift_if` (a path): while that file exists the
    inputs are shifted, i.e. this process sees other data than the campaign was created with."""
    d = plugins.gaussian_blobs(section)
    x_train = d.x_train + 1 if section.get("shift_if") and os.path.exists(section["shift_if"]) else d.x_train
    return Dataset(d.name, x_train, d.y_train, d.x_test, d.y_test, d.num_classes,
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
    root = info.get("die_writing")
    if root and not os.path.exists(os.path.join(root, "died")):
        try:
            os.close(os.open(os.path.join(root, "died"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            run = int(np.flatnonzero(np.load(os.path.join(root, "plan", "seeds.npy")) == seed)[0])
            with open(os.path.join(root, "runs", f".run-{run:06d}.parquet.tmp-0123456789ab"), "wb") as f:
                f.write(b"PAR1 half a shard")
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


def knn_with_margins(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """The four-value trainer return: labels and margins (here minus the distance to the nearest
    training example, a number the test can recompute)."""
    train_pred, test_pred = plugins.nearest_neighbour(dataset, train_indices, seed)

    def nearest(x):
        d = ((x[:, None, :] - dataset.x_train[train_indices][None]) ** 2).sum(-1)
        return -np.sqrt(d.min(axis=1))

    return train_pred, test_pred, nearest(dataset.x_train), nearest(dataset.x_test)
