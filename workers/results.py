"""What one run produces, and the checks on a user's trainer: no torch here, so that workers driving a
plug-in learner never import it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


class RunFailed(RuntimeError):
    """A run that failed on its own (NaN loss, a plug-in that returned garbage): recorded, never folded."""


# --- the worker <-> driver boundary: what a worker is started with, what each run sends back ----------


@dataclass(frozen=True)
class WorkerConfig:
    """What a RunWorker (or a data-parallel coordinator) is started with; orchestrator/pool.py builds it
    and Ray carries it to the actor. The field order is the old positional order, so that
    WorkerConfig(spec, campaign, spec_hash, fingerprint) reads like the call it replaced."""

    spec: dict  # Spec.to_dict(): every section, [train] and [estimates] soft read by the worker
    campaign: str
    spec_hash: str  # stamped into every shard; readers refuse a shard of another spec
    fingerprint: str  # of the dataset the campaign was created with; a worker seeing other data refuses
    threads: int = 1  # torch threads
    use_gpu: bool = False
    probe: str = ""  # a file the driver just wrote: a worker that cannot see it ships its shards' bytes
    ship: str = "auto"  # [resources] ship_shards
    device: str | None = None  # a torch device chosen by Ray Train (data-parallel ranks); None: cpu or cuda


@dataclass(frozen=True)
class WorkerResult:
    """A run that finished: its shard is written (or, when its worker cannot see the campaign directory,
    its bytes are in `shard` for the driver to write). The fields up to `finished_at` are also the
    shard's metadata (workers/worker.py writes them there)."""

    run: int
    seed: int
    host: str
    node: str
    pid: int
    device: str
    train_seconds: float
    test_acc: float
    train_acc_in: float
    train_acc_out: float
    final_loss: float
    finished_at: float
    seconds: float = 0.0  # the whole call for this run: training, evaluation, writing
    devices: int = 1  # > 1: trained data-parallel (workers/dataparallel.py)
    shard: bytes | None = None
    failed: ClassVar[bool] = False


@dataclass(frozen=True)
class RunFailure:
    """Why a run failed on its own, as data: the driver records it in failed/ and goes on (within the
    failure budget), unless `fatal`: storage trouble (a full disk, permissions), which is not the
    run's fault and stops the command."""

    run: int
    reason: str  # one line: "ExceptionType: message"
    traceback: str = ""
    host: str = ""
    fatal: bool = False
    failed: ClassVar[bool] = True

    @classmethod
    def of(cls, run: int, error: BaseException, detail: str = "", host: str = "", fatal: bool = False) -> "RunFailure":
        return cls(run, failure_reason(error), detail, host, fatal)


def failure_reason(error: BaseException) -> str:
    """The one-line reason a failure record keeps: the exception's type and the first line of its message."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]


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
