"""Every path of a campaign directory, built in one place. A run's files are named by its index."""

from __future__ import annotations

import re
from dataclasses import dataclass

from workers.storage import CampaignLocation, location, makedirs

_SHARD_RE = re.compile(r"^run-(\d{6,})\.parquet$")


@dataclass(frozen=True)
class CampaignPaths:
    root: CampaignLocation  # a local Path, or an FsPath on an object store (workers/storage.py)

    def __init__(self, root):
        object.__setattr__(self, "root", location(root))

    # the frozen, resolved spec
    @property
    def spec(self) -> CampaignLocation:
        return self.root / "campaign.toml"

    # the plan: which examples each run trains on, and its training seed
    @property
    def plan_dir(self) -> CampaignLocation:
        return self.root / "plan"

    @property
    def plan_masks(self) -> CampaignLocation:
        return self.plan_dir / "masks.npy"

    @property
    def plan_seeds(self) -> CampaignLocation:
        return self.plan_dir / "seeds.npy"

    @property
    def plan_ratios(self) -> CampaignLocation:
        return self.plan_dir / "ratios.npy"

    @property
    def examples(self) -> CampaignLocation:
        return self.plan_dir / "examples.parquet"

    @property
    def plan_info(self) -> CampaignLocation:
        return self.plan_dir / "plan.json"

    # one shard per finished run
    @property
    def runs_dir(self) -> CampaignLocation:
        return self.root / "runs"

    def shard(self, run: int) -> CampaignLocation:
        return self.runs_dir / f"run-{run:06d}.parquet"

    @staticmethod
    def run_of_shard(name: str) -> int | None:
        m = _SHARD_RE.match(name)
        return int(m.group(1)) if m else None

    # shards that failed verification, moved aside with the reason
    @property
    def rejected_dir(self) -> CampaignLocation:
        return self.root / "rejected"

    # why a run failed
    @property
    def failed_dir(self) -> CampaignLocation:
        return self.root / "failed"

    def failure(self, run: int) -> CampaignLocation:
        return self.failed_dir / f"run-{run:06d}.json"

    # the aggregate checkpoint and the driver's lock
    @property
    def state_dir(self) -> CampaignLocation:
        return self.root / "state"

    @property
    def checkpoint(self) -> CampaignLocation:
        return self.state_dir / "fold.npz"

    @property
    def lock(self) -> CampaignLocation:
        return self.state_dir / "driver.lock"

    # estimates
    @property
    def estimates_dir(self) -> CampaignLocation:
        return self.root / "estimates"

    @property
    def memorization(self) -> CampaignLocation:
        return self.estimates_dir / "memorization.parquet"

    @property
    def influence(self) -> CampaignLocation:
        return self.estimates_dir / "influence.npy"

    @property
    def pairs(self) -> CampaignLocation:
        return self.estimates_dir / "high_influence_pairs.parquet"

    @property
    def summary(self) -> CampaignLocation:
        return self.estimates_dir / "summary.json"

    # `longtail utility`: follow-up runs and their results (orchestrator/followup.py owns the inside)
    @property
    def utility_dir(self) -> CampaignLocation:
        return self.root / "utility"

    @property
    def utility_results(self) -> CampaignLocation:
        return self.utility_dir / "utility.parquet"

    @property
    def report(self) -> CampaignLocation:
        return self.root / "report" / "index.html"

    def make_dirs(self) -> None:
        for d in (self.root, self.plan_dir, self.runs_dir, self.failed_dir, self.state_dir, self.estimates_dir):
            makedirs(d)
