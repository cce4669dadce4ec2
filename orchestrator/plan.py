"""The run plan: which training examples run r trains on, and with which seed.

Both are pure functions of (campaign seed, r): the seed sequence [campaign_seed, r] spawns one
stream for the subset and one for the training seed, so any run can be rebuilt from its index and
two campaigns with different seeds never share subsets. The plan is also written to plan/ so that a
reader needs no code to know which examples each run saw:

    plan/masks.npy   uint8 (runs, ceil(n_train / 8)): np.unpackbits(masks, axis=1, count=n_train)
    plan/seeds.npy   int64 (runs,): the training seed of each run
    plan/plan.json   design, n_train, subset size, runs, campaign seed, sha256 of the two arrays
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from workers.storage import atomic_write_bytes, atomic_write_text

from .paths import CampaignPaths


class PlanError(ValueError):
    pass


def subset_size(ratio: float, n: int) -> int:
    return int(round(ratio * n))


def check_subset_size(ratio: float, n: int, where: str) -> int:
    m = subset_size(ratio, n)
    if not 1 <= m <= n - 1:
        raise PlanError(f"{where}: subset_ratio {ratio} gives subsets of {m} of the {n} training examples; "
                        f"every subset must leave at least one example in and one out (1 <= m <= {n - 1})")
    return m


def run_streams(campaign_seed: int, run: int) -> tuple[np.random.Generator, int]:
    """(subset generator, training seed) of run `run`."""
    subset_ss, train_ss = np.random.SeedSequence([campaign_seed, run]).spawn(2)
    return np.random.default_rng(subset_ss), int(train_ss.generate_state(1)[0] & 0x7FFFFFFF)


def fixed_mask(campaign_seed: int, run: int, n: int, m: int) -> np.ndarray:
    """The paper's design: a uniform subset of exactly m of n examples, without replacement."""
    rng, _ = run_streams(campaign_seed, run)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, size=m, replace=False)] = True
    return mask


@dataclass(frozen=True)
class Plan:
    design: str
    campaign_seed: int
    n_train: int
    subset_size: int
    masks: np.ndarray  # (runs, ceil(n_train / 8)) uint8, bit-packed (numpy's default big-endian bit order)
    seeds: np.ndarray  # (runs,) int64

    @property
    def runs(self) -> int:
        return len(self.seeds)

    def mask(self, run: int) -> np.ndarray:
        return np.unpackbits(self.masks[run], count=self.n_train).astype(bool)

    def dense(self, runs=slice(None)) -> np.ndarray:
        return np.unpackbits(self.masks[runs], axis=1, count=self.n_train).astype(bool)


def _rows(design: str, campaign_seed: int, n_train: int, m: int, runs: range) -> tuple[np.ndarray, np.ndarray]:
    if design != "fixed":
        raise PlanError(f"unknown design {design!r}; expected 'fixed'")
    masks = np.empty((len(runs), (n_train + 7) // 8), np.uint8)
    seeds = np.empty(len(runs), np.int64)
    for k, r in enumerate(runs):
        masks[k] = np.packbits(fixed_mask(campaign_seed, r, n_train, m))
        seeds[k] = run_streams(campaign_seed, r)[1]
    return masks, seeds


def make_plan(design: str, campaign_seed: int, n_train: int, ratio: float, runs: int) -> Plan:
    m = check_subset_size(ratio, n_train, "[campaign] subset_ratio")
    masks, seeds = _rows(design, campaign_seed, n_train, m, range(runs))
    return Plan(design, campaign_seed, n_train, m, masks, seeds)


def extend_plan(plan: Plan, runs: int) -> Plan:
    """The same plan with `runs` runs; runs already planned keep their subsets and seeds."""
    if runs <= plan.runs:
        return plan
    masks, seeds = _rows(plan.design, plan.campaign_seed, plan.n_train, plan.subset_size, range(plan.runs, runs))
    return Plan(plan.design, plan.campaign_seed, plan.n_train, plan.subset_size,
                np.concatenate([plan.masks, masks]), np.concatenate([plan.seeds, seeds]))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_plan(paths: CampaignPaths, plan: Plan) -> None:
    masks, seeds = _npy_bytes(plan.masks), _npy_bytes(plan.seeds)
    atomic_write_bytes(paths.plan_masks, masks)
    atomic_write_bytes(paths.plan_seeds, seeds)
    info = {"design": plan.design, "campaign_seed": plan.campaign_seed, "n_train": plan.n_train,
            "subset_size": plan.subset_size, "runs": plan.runs, "bit_order": "big",
            "masks_sha256": hashlib.sha256(masks).hexdigest(), "seeds_sha256": hashlib.sha256(seeds).hexdigest()}
    atomic_write_text(paths.plan_info, json.dumps(info, indent=2) + "\n")


def read_plan(paths: CampaignPaths) -> Plan:
    try:
        info = json.loads(paths.plan_info.read_text())
        masks_bytes = paths.plan_masks.read_bytes()
        seeds_bytes = paths.plan_seeds.read_bytes()
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read the plan in {paths.plan_dir}: {e}") from None
    for name, blob in (("masks", masks_bytes), ("seeds", seeds_bytes)):
        if hashlib.sha256(blob).hexdigest() != info.get(f"{name}_sha256"):
            raise PlanError(f"{paths.plan_dir}/{name}.npy does not match the checksum in plan.json: the plan "
                            f"was modified or corrupted")
    masks = np.load(io.BytesIO(masks_bytes), allow_pickle=False)
    seeds = np.load(io.BytesIO(seeds_bytes), allow_pickle=False)
    return Plan(info["design"], info["campaign_seed"], info["n_train"], info["subset_size"], masks, seeds)
