"""Learners for the orchestration benchmarks: they take a known time (or none) and predict nothing
useful, so that what is measured is longtail's own cost around the runs."""

from __future__ import annotations

import time

import numpy as np

from workers.datasets import Dataset


def blobs(section: dict) -> Dataset:
    rng = np.random.default_rng(0)
    n, n_test = section.get("n_train", 200), section.get("n_test", 100)
    return Dataset("bench-blobs", rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 2, n),
                   rng.normal(size=(n_test, 4)).astype(np.float32), rng.integers(0, 2, n_test), num_classes=2)


def one_second(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """A 'training run' of exactly one second of wall time."""
    time.sleep(1.0)
    return trivial(dataset, train_indices, seed)


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0.0
    while time.process_time() < end:
        for _ in range(10_000):
            x = x * 0.5 + 1.0


def one_cpu_second(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """A 'training run' that keeps one core busy for one second of its own CPU time, as training does:
    the driver's CPU then competes with the runs, unlike with runs that sleep."""
    _spin(1.0)
    return trivial(dataset, train_indices, seed)


def ten_cpu_seconds(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """As one_cpu_second, for 10 s: the run length research/perf.md sets the <= 5% overhead goal for."""
    _spin(10.0)
    return trivial(dataset, train_indices, seed)


def trivial(dataset: Dataset, train_indices: np.ndarray, seed: int):
    """Returns at once: predicts the label of the first training example for everything."""
    label = dataset.y_train[train_indices[0]]
    return np.full(dataset.n_train, label), np.full(dataset.n_test, label)
