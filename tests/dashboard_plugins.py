"""Plug-ins for the dashboard and metrics tests: a campaign whose pace the test controls.
Dataset keys reach the trainer through Dataset.info: `sleep` (seconds per run), `pause_file` (runs
wait while that file exists, so that the campaign's progress holds still while it is read from the
dashboard and from `longtail status`), `fail_every` (runs whose seed is a multiple of it raise)."""

from __future__ import annotations

import os
import time

import numpy as np

import plugins
from workers.datasets import Dataset

KEYS = ("sleep", "pause_file", "fail_every")


def blobs(section: dict) -> Dataset:
    d = plugins.gaussian_blobs(section)
    return Dataset(d.name, d.x_train, d.y_train, d.x_test, d.y_test, d.num_classes,
                   info={k: section[k] for k in KEYS if k in section})


def paced_knn(dataset: Dataset, train_indices: np.ndarray, seed: int):
    info = dataset.info
    while info.get("pause_file") and os.path.exists(info["pause_file"]):
        time.sleep(0.1)
    time.sleep(info.get("sleep", 0))
    if info.get("fail_every") and seed % info["fail_every"] == 0:
        raise RuntimeError(f"seed {seed} is a multiple of fail_every = {info['fail_every']}")
    return plugins.nearest_neighbour(dataset, train_indices, seed)
