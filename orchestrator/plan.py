"""The run plan: which training examples run r trains on, at which subset ratio, with which seed.

Run r's training seed, and its subset in every design but "balanced", are pure functions of
(campaign seed, r): the seed sequence [campaign_seed, r] spawns one stream for the subset and one
for the training seed, so any run can be rebuilt from its index and two campaigns with different
seeds never share subsets. With several subset ratios, run r uses ratio r mod K (pairs of runs in
the paired design share one), so any prefix of the runs covers the ratios evenly.

Designs:
    fixed      uniform subsets of exactly m = round(ratio * n) examples (the paper's)
    bernoulli  each example kept independently with probability ratio
    paired     run 2k is a fixed subset, run 2k+1 trains on its complement
    balanced   each example is in exactly round(ratio * t_k) of the t_k runs of its ratio: the plan
               is drawn as a whole from (seed, runs), so it cannot grow afterwards

The plan is also written to plan/ so that a reader needs no code to know which examples each run saw:

    plan/masks.npy   uint8 (runs, ceil(n_train / 8)): np.unpackbits(masks, axis=1, count=n_train)
    plan/seeds.npy   int64 (runs,): the training seed of each run
    plan/ratios.npy  int8 (runs,): index into plan.json's "ratios" of each run's subset ratio
    plan/plan.json   design, ratios, n_train, runs, campaign seed, sha256 of the arrays
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from workers.errors import LongtailError
from workers.storage import atomic_write_bytes, atomic_write_text

from orchestrator.paths import CampaignPaths

DESIGNS = ("fixed", "bernoulli", "balanced", "paired")


class PlanError(LongtailError, ValueError):
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


def bernoulli_mask(campaign_seed: int, run: int, n: int, ratio: float) -> np.ndarray:
    rng, _ = run_streams(campaign_seed, run)
    return rng.random(n) < ratio


def ratio_index(design: str, run: int, k: int) -> int:
    return (run // 2) % k if design == "paired" else run % k


def balanced_masks(campaign_seed: int, runs: np.ndarray, n: int, ratio: float, k: int) -> np.ndarray:
    """(len(runs), n) masks in which every example is in exactly round(ratio * len(runs)) runs.

    Each example's runs are a uniform draw without replacement, column by column: the rank of
    uniform keys down a column is a uniform permutation of the runs."""
    t = len(runs)
    c = int(round(ratio * t))
    rng = np.random.default_rng(np.random.SeedSequence([campaign_seed, 2**32 + k]))
    out = np.empty((t, n), bool)
    step = max(1, 2**22 // max(t, 1))
    for j in range(0, n, step):
        keys = rng.random((t, min(step, n - j)))
        ranks = keys.argsort(axis=0).argsort(axis=0)
        out[:, j:j + keys.shape[1]] = ranks < c
    return out


@dataclass(frozen=True)
class Plan:
    design: str
    campaign_seed: int
    n_train: int
    ratios: tuple[float, ...]
    masks: np.ndarray  # (runs, ceil(n_train / 8)) uint8, bit-packed (numpy's default big-endian bit order)
    seeds: np.ndarray  # (runs,) int64
    ratio_of_run: np.ndarray  # (runs,) int8 index into ratios

    @property
    def runs(self) -> int:
        return len(self.seeds)

    def mask(self, run: int) -> np.ndarray:
        return np.unpackbits(self.masks[run], count=self.n_train).astype(bool)

    def dense(self, runs=slice(None)) -> np.ndarray:
        return np.unpackbits(self.masks[runs], axis=1, count=self.n_train).astype(bool)

    def columns(self, runs: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """(len(runs), len(idx)) bool: the masks of training examples `idx` in runs `runs`, read from the
        packed bits without unpacking whole rows (what tiled influence needs at any scale)."""
        idx = np.asarray(idx, dtype=np.int64)
        runs = np.asarray(runs)
        if len(idx) > 1 and idx[-1] - idx[0] == len(idx) - 1 and (np.diff(idx) == 1).all():
            # a contiguous range (what tiles ask for): unpack whole bytes, then trim
            first = idx[0] >> 3
            bits = np.unpackbits(self.masks[runs, first:(idx[-1] >> 3) + 1], axis=1)
            return bits[:, idx[0] - 8 * first: idx[0] - 8 * first + len(idx)].astype(bool)
        packed = self.masks[np.ix_(runs, idx >> 3)]  # not masks[runs] first: that copies the whole plan
        return ((packed >> (7 - (idx & 7)).astype(np.uint8)) & 1).astype(bool)

    def runs_of_ratio(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.ratio_of_run == k)

    def subset_sizes(self) -> np.ndarray:
        return np.unpackbits(self.masks, axis=1, count=self.n_train).sum(axis=1)


def validate_design(design: str, ratios: tuple[float, ...], n_train: int, runs: int, where: str) -> None:
    if design not in DESIGNS:
        raise PlanError(f"{where}: unknown design {design!r}; expected one of {', '.join(DESIGNS)}")
    k = len(ratios)
    if design in ("fixed", "paired"):
        for r in ratios:
            check_subset_size(r, n_train, f"{where} subset_ratio")
    if design == "paired" and runs % (2 * k):
        raise PlanError(f"{where}: the paired design needs runs to be a multiple of {2 * k} (2 x {k} ratios) so "
                        f"that every run has its complement at the same ratio; found runs = {runs}")
    if design == "balanced":
        for i, r in enumerate(ratios):
            t = len(range(i, runs, k))
            c = int(round(r * t))
            if not 1 <= c <= t - 1:
                raise PlanError(f"{where}: the balanced design puts every example in round({r} x {t}) = {c} of "
                                f"the {t} runs of ratio {r}; it must be between 1 and {t - 1}: add runs")


def _rows(design: str, seed: int, n: int, ratios: tuple[float, ...], runs: range) -> tuple[np.ndarray, ...]:
    k = len(ratios)
    masks = np.empty((len(runs), (n + 7) // 8), np.uint8)
    seeds = np.empty(len(runs), np.int64)
    which = np.empty(len(runs), np.int8)
    for i, r in enumerate(runs):
        which[i] = ratio_index(design, r, k)
        ratio = ratios[which[i]]
        if design == "fixed":
            mask = fixed_mask(seed, r, n, subset_size(ratio, n))
        elif design == "bernoulli":
            mask = bernoulli_mask(seed, r, n, ratio)
        elif design == "paired":
            first = fixed_mask(seed, r - r % 2, n, subset_size(ratio, n))
            mask = first if r % 2 == 0 else ~first
        else:
            raise PlanError(f"design {design!r} cannot draw runs one at a time")
        masks[i] = np.packbits(mask)
        seeds[i] = run_streams(seed, r)[1]
    return masks, seeds, which


def make_plan(design: str, campaign_seed: int, n_train: int, ratios, runs: int) -> Plan:
    ratios = tuple(np.atleast_1d(ratios).tolist())
    validate_design(design, ratios, n_train, runs, "[campaign]")
    if design != "balanced":
        masks, seeds, which = _rows(design, campaign_seed, n_train, ratios, range(runs))
        return Plan(design, campaign_seed, n_train, ratios, masks, seeds, which)
    k = len(ratios)
    which = np.array([ratio_index(design, r, k) for r in range(runs)], np.int8)
    masks = np.empty((runs, (n_train + 7) // 8), np.uint8)
    for i, ratio in enumerate(ratios):
        group = np.flatnonzero(which == i)
        masks[group] = np.packbits(balanced_masks(campaign_seed, group, n_train, ratio, i), axis=1)
    seeds = np.array([run_streams(campaign_seed, r)[1] for r in range(runs)], np.int64)
    return Plan(design, campaign_seed, n_train, ratios, masks, seeds, which)


def extend_plan(plan: Plan, runs: int) -> Plan:
    """The same plan with `runs` runs; runs already planned keep their subsets and seeds."""
    if runs <= plan.runs:
        return plan
    if plan.design == "balanced":
        raise PlanError(f"a balanced plan is drawn for its number of runs ({plan.runs}) and cannot grow to {runs}; "
                        f"start a new campaign to have more runs")
    validate_design(plan.design, plan.ratios, plan.n_train, runs, "[campaign]")
    masks, seeds, which = _rows(plan.design, plan.campaign_seed, plan.n_train, plan.ratios, range(plan.runs, runs))
    return Plan(plan.design, plan.campaign_seed, plan.n_train, plan.ratios, np.concatenate([plan.masks, masks]),
                np.concatenate([plan.seeds, seeds]), np.concatenate([plan.ratio_of_run, which]))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


_ARRAYS = (("masks", "plan_masks"), ("seeds", "plan_seeds"), ("ratio_of_run", "plan_ratios"))


def write_plan(paths: CampaignPaths, plan: Plan) -> None:
    info = {"design": plan.design, "campaign_seed": plan.campaign_seed, "n_train": plan.n_train,
            "ratios": list(plan.ratios), "runs": plan.runs, "bit_order": "big"}
    for field, path_name in _ARRAYS:
        blob = _npy_bytes(getattr(plan, field))
        atomic_write_bytes(getattr(paths, path_name), blob)
        info[f"{path_name}_sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_text(paths.plan_info, json.dumps(info, indent=2) + "\n")


def read_plan(paths: CampaignPaths) -> Plan:
    try:
        info = json.loads(paths.plan_info.read_text())
        arrays = {}
        for field, path_name in _ARRAYS:
            path = getattr(paths, path_name)
            blob = path.read_bytes()
            if hashlib.sha256(blob).hexdigest() != info.get(f"{path_name}_sha256"):
                raise PlanError(f"{path} does not match the checksum in {paths.plan_info}: the plan was modified "
                                f"or corrupted")
            arrays[field] = np.load(io.BytesIO(blob), allow_pickle=False)
        return Plan(info["design"], info["campaign_seed"], info["n_train"], tuple(info["ratios"]), **arrays)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"cannot read the plan in {paths.plan_dir}: {type(e).__name__}: {e}; if its files were "
                        f"deleted rather than changed, `longtail resume {paths.root}` rebuilds them") from None
