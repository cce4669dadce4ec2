"""What one run produces, and the checks on a user's trainer: no torch here, so that workers driving a
plug-in learner never import it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


class RunFailed(RuntimeError):
    """A run that failed on its own (NaN loss, a plug-in that returned garbage): recorded, never folded."""


@dataclass
class RunOutput:
    train_pred: np.ndarray  # (n_train,) int
    test_pred: np.ndarray  # (n_test,) int
    train_values: dict[str, np.ndarray]  # "margin", "probability": (n_train,) float32, where the learner has them
    test_values: dict[str, np.ndarray]
    train_seconds: float  # the optimisation loop alone
    final_loss: float
    # training dynamics (workers/dynamics.py) of the examples trained on, in ascending example order:
    # DYNAMICS -> (subset size,) arrays; None when not recorded
    dynamics: dict[str, np.ndarray] | None = None


DYNAMICS = ("loss_sum", "learn_epoch", "forgets")


def check_dynamics(d, n_indices: int, where: str) -> dict[str, np.ndarray]:
    """A plug-in trainer's dynamics: a dict of DYNAMICS arrays, each (len(train_indices),) in the order
    of train_indices; RunFailed saying what was expected otherwise."""
    if not isinstance(d, dict) or set(d) != set(DYNAMICS):
        raise RunFailed(f"trainer {where!r}: dynamics must be a dict with keys {list(DYNAMICS)}, found "
                        f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
    out = {}
    for name in DYNAMICS:
        a = np.asarray(d[name])
        if a.shape != (n_indices,):
            raise RunFailed(f"trainer {where!r}: dynamics[{name!r}] must have shape ({n_indices},) (one value per "
                            f"training index, in their order), found {a.shape}")
        out[name] = a.astype(np.float32 if name == "loss_sum" else np.int32)
    return out


def run_plugin_trainer(fn, dataset, train_idx: np.ndarray, seed: int, where: str) -> RunOutput:
    """Call a user trainer `fn(dataset, train_indices, seed)` and check what it returned."""
    start = time.perf_counter()
    out = fn(dataset, train_idx, seed)
    seconds = time.perf_counter() - start
    dynamics = None
    if isinstance(out, tuple) and len(out) in (3, 5) and isinstance(out[-1], dict):  # dynamics last
        dynamics, out = check_dynamics(out[-1], len(train_idx), where), out[:-1]
    if not isinstance(out, tuple) or len(out) not in (2, 4):
        raise RunFailed(f"trainer {where!r} must return (train_pred, test_pred) or "
                        f"(train_pred, test_pred, train_margin, test_margin), optionally followed by a dict "
                        f"of training dynamics; found {type(out).__name__}")
    arrays = [None if a is None else np.asarray(a) for a in out]
    expected = [dataset.n_train, dataset.n_test] * (len(out) // 2)
    for name, a, n in zip(("train_pred", "test_pred", "train_margin", "test_margin"), arrays, expected):
        if a is not None and a.shape != (n,):
            raise RunFailed(f"trainer {where!r}: {name} must have shape ({n},), found {a.shape}")
    for name, a in zip(("train_pred", "test_pred"), arrays[:2]):
        if not np.issubdtype(a.dtype, np.integer):
            raise RunFailed(f"trainer {where!r}: {name} must hold integer labels, found dtype {a.dtype}")
        if len(a) and (a.min() < 0 or a.max() >= dataset.num_classes):
            raise RunFailed(f"trainer {where!r}: {name} must hold labels in [0, {dataset.num_classes}), found "
                            f"values {a.min()}..{a.max()}")
    train_values, test_values = {}, {}
    if len(arrays) == 4 and arrays[2] is not None and arrays[3] is not None:
        train_values["margin"], test_values["margin"] = arrays[2].astype(np.float32), arrays[3].astype(np.float32)
    return RunOutput(arrays[0], arrays[1], train_values, test_values, seconds, float("nan"), dynamics)
