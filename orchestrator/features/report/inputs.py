"""What the report reads, and nothing else: the campaign (its frozen spec, plan and labels), the
estimates files through their readers in orchestrator/estimates_files.py, and the shards through the
verified shard reader (workers/shard.py), as the fold reads them. A shard that fails verification is
left out of what it would feed and counted, never decoded by hand; every number is computed by
estimators/.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import numpy as np

from estimators.precision import memorization_convergence
from workers.shard import ShardError, read_run_meta, read_shard

from orchestrator.campaign import Campaign, create_or_open, read_examples
from orchestrator.estimates_files import as_columns, read_memorization, read_pairs, read_summary, runs_of
from orchestrator.fold import checkpoint_run_field

MAX_SHARDS = 2000  # the convergence figure reads at most this many shards, spread evenly over the runs
CONVERGENCE_EXAMPLES = 1000  # training examples whose estimates the convergence figure follows
MAX_IMAGE_GB = 8.0  # a dataset larger than this in memory is not loaded for ~75 thumbnails: tables instead


@dataclass
class Inputs:
    """Everything the sections read, loaded once."""
    c: Campaign
    meta: dict  # plan/examples.parquet metadata: dataset, num_classes, input_shape, info
    summary: dict | None  # estimates/summary.json, None before the first checkpoint
    mem: dict[str, np.ndarray] | None  # memorization.parquet as columns
    mem_runs: int  # runs behind memorization.parquet (the main subset ratio's)
    pairs: dict[str, np.ndarray] | None  # high_influence_pairs.parquet as columns
    pictures: "Pictures | None"  # display pixels, None for vector inputs or when loading failed
    picture_note: str  # why there are no pictures
    notes: list[str] = field(default_factory=list)  # sections that could not be drawn

    def label(self, k: int) -> str:
        names = self.meta.get("info", {}).get("classes")
        return f"{k} ({names[k]})" if names and 0 <= k < len(names) else str(k)


def load_inputs(campaign_dir) -> Inputs:
    c = create_or_open(None, campaign_dir, load_data=False)  # the frozen spec; the data only if images
    meta, _ = read_examples(c.paths.examples)
    mem_table = read_memorization(c.paths)
    pictures, note = load_pictures(c, meta)
    return Inputs(c=c, meta=meta, summary=read_summary(c.paths), mem=as_columns(mem_table),
                  mem_runs=runs_of(mem_table), pairs=as_columns(read_pairs(c.paths)), pictures=pictures,
                  picture_note=note)


# --- pictures of examples -------------------------------------------------------------------------


def image_shape(meta: dict) -> tuple[int, int, int] | None:
    """(channels, height, width) to display an input as, or None when inputs are not images."""
    shape = tuple(meta.get("input_shape") or ())
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape
    if len(shape) == 2:
        return (1, *shape)
    hw = meta.get("info", {}).get("image_shape")  # flattened images that say their shape
    if len(shape) == 1 and hw and len(hw) == 2 and hw[0] * hw[1] == shape[0]:
        return (1, *hw)
    return None


class Pictures:
    """Inputs as displayable images: CIFAR's per-channel normalization undone, and any image still
    outside [0, 1] stretched to it, so that no thumbnail is clipped to black or white."""

    def __init__(self, x_train: np.ndarray, x_test: np.ndarray, shape: tuple[int, int, int], info: dict):
        self.x = {"train": x_train, "test": x_test}
        self.shape = shape
        norm = info.get("normalization") or {}
        self.mean = np.array(norm.get("mean", 0.0), np.float32).reshape(-1, 1, 1)
        self.std = np.array(norm.get("std", 1.0), np.float32).reshape(-1, 1, 1)
        self._cache: dict[tuple[str, int], str] = {}

    def pixels(self, split: str, i: int) -> np.ndarray:
        x = np.asarray(self.x[split][i], np.float32).reshape(self.shape) * self.std + self.mean
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        x = np.clip(x, 0, 1)
        return x[0] if self.shape[0] == 1 else x.transpose(1, 2, 0)

    def uri(self, split: str, i: int) -> str:
        key = (split, int(i))
        if key not in self._cache:
            from matplotlib.image import imsave

            buf = io.BytesIO()
            imsave(buf, self.pixels(split, i), cmap="gray", vmin=0, vmax=1, format="png")
            self._cache[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return self._cache[key]

    def img(self, split: str, i: int, title: str) -> str:
        # small images are scaled up with hard pixel edges (8x8 digits would be a blur otherwise)
        pixelated = " pixelated" if self.shape[1] <= 64 else ""
        return f'<img class="thumb{pixelated}" src="{self.uri(split, i)}" alt="{html.escape(title)}">'


def load_pictures(c: Campaign, meta: dict) -> tuple[Pictures | None, str]:
    """The campaign's inputs as pictures, or None and why not (vectors, or a dataset that cannot be
    loaded here: the report then shows tables)."""
    from workers.datasets import dataset_fingerprint, load_dataset

    shape = image_shape(meta)
    if shape is None:
        return None, f"inputs of shape {tuple(meta.get('input_shape') or ())} are not images; tables instead"
    size_gb = (c.n_train + c.n_test) * int(np.prod(meta["input_shape"])) * 4 / 1e9
    if size_gb > MAX_IMAGE_GB:
        return None, (f"the dataset takes {size_gb:.0f} GB in memory, more than the report loads "
                      f"({MAX_IMAGE_GB:g} GB) for its thumbnails; tables instead")
    try:
        data = load_dataset(c.spec.dataset.as_dict())
        if dataset_fingerprint(data) != c.fingerprint:
            return None, (f"the dataset loaded here differs from the campaign's (fingerprint "
                          f"{dataset_fingerprint(data)}, campaign {c.fingerprint}); tables instead of images")
        return Pictures(data.x_train, data.x_test, shape, meta.get("info", {})), ""
    except Exception as e:  # a missing download, a plug-in not importable here: degrade, never fail
        return None, f"the images could not be loaded ({type(e).__name__}: {str(e)[:300]}); tables instead"


# --- what the shards say: convergence and per-run accuracy ----------------------------------------


def _spread(runs: list[int]) -> list[int]:
    """At most MAX_SHARDS of `runs`, evenly spread, in their order (so "the first k" keeps the plan's)."""
    if len(runs) <= MAX_SHARDS:
        return runs
    return [runs[i] for i in np.unique(np.linspace(0, len(runs) - 1, MAX_SHARDS).round().astype(int))]


def _expect(c: Campaign, run: int) -> dict:
    """What the fold verifies a shard of run `run` against (orchestrator/fold.py Aggregator.read)."""
    return {"campaign": c.name, "spec_hash": c.spec.result_hash(), "run": run, "n_train": c.n_train, "n_test": c.n_test}


@dataclass
class Convergence:
    runs: np.ndarray  # k: the number of runs behind each point
    mean_abs: np.ndarray  # mean |mem_k - mem_final| over the followed examples
    rms: np.ndarray
    followed: np.ndarray  # ids of the training examples followed
    shards: int  # shards read (after the cap)
    available: int  # shards of the main ratio on disk
    unreadable: int  # shards that failed verification: left out


def convergence(c: Campaign) -> Convergence | None:
    """Memorization of a fixed sample of training examples after the first k runs (k = 10%, 20%, ...,
    100% of the shards read), from the verified shards alone; None below 10 readable shards."""
    primary = c.plan.ratios.index(c.spec.primary_ratio)
    runs = sorted(r for r in c.finished_runs() if c.plan.ratio_of_run[r] == primary)
    available = len(runs)
    n = c.n_train
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, CONVERGENCE_EXAMPLES), replace=False))
    expect = _expect(c, 0)
    inside, correct, unreadable = [], [], 0
    for r in _spread(runs):
        try:
            data = read_shard(c.paths.shard(r), **{**expect, "run": r}, mask=c.plan.mask(r))
        except ShardError:
            unreadable += 1  # a shard the fold would reject: left out here too, and counted on the page
            continue
        inside.append(data.mask[sample])
        correct.append(data.train_correct[sample])
    if len(inside) < 10:
        return None
    ks, mean_abs, rms = memorization_convergence(np.array(inside), np.array(correct))
    return Convergence(ks, mean_abs, rms, sample, len(inside), available, unreadable)


def run_accuracies(c: Campaign) -> tuple[np.ndarray, str]:
    """Test accuracy of every folded run (state/fold.npz, when it is this spec's), else from the
    verified metadata of the shards."""
    acc = checkpoint_run_field(c, "test_acc")
    if acc is not None:
        return acc[np.isfinite(acc)], "the fold checkpoint"
    expect = _expect(c, 0)
    acc = []
    for r in _spread(sorted(c.finished_runs())):
        try:
            acc.append(float(read_run_meta(c.paths.shard(r), **{**expect, "run": r})["test_acc"]))
        except (ShardError, KeyError, TypeError, ValueError):
            continue
    acc = np.array(acc, float)
    return acc[np.isfinite(acc)], "the shards' metadata"
