"""Every path of a campaign directory, and of the directories its commands write, built in one place.

A run's files are named by its index; every other module asks this one for a name and never spells one
(tests/test_architecture.py checks it). The layout is documented in docs/campaign-directory.md.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from workers.storage import CampaignLocation, location, makedirs

_SHARD_RE = re.compile(r"^run-(\d{6,})\.parquet$")
_FAILURE_RE = re.compile(r"^run-(\d{6,})\.json$")
_PROBE = ".probe-"
_NOTE = ".why.txt"


def stamp() -> str:
    """The time stamp that makes a moved-aside file's name unique (rejected/, utility/stale/)."""
    return time.strftime("%Y%m%dT%H%M%S")


def note(moved: CampaignLocation) -> CampaignLocation:
    """The note saying why a file was moved aside, next to it: <name>.why.txt."""
    return moved.with_name(moved.name + _NOTE)


def is_note(name: str) -> bool:
    return name.endswith(_NOTE)


def probe(directory: CampaignLocation) -> CampaignLocation:
    """A file the driver writes and every worker must read: proof that workers see the directory."""
    return directory / f"{_PROBE}{os.getpid()}-{time.time_ns()}"


def is_probe(name: str) -> bool:
    return name.startswith(_PROBE)


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

    @property
    def results_record(self) -> CampaignLocation:
        """The result-changing keys the campaign was created with (orchestrator/campaign.py)."""
        return self.plan_dir / "results.json"

    # one shard per finished run
    @property
    def runs_dir(self) -> CampaignLocation:
        return self.root / "runs"

    def shard(self, run: int) -> CampaignLocation:
        return self.runs_dir / f"run-{run:06d}.parquet"

    @staticmethod
    def of_shard(shard) -> CampaignPaths:
        """The campaign a shard file belongs to (the inverse of shard(): <root>/runs/run-NNNNNN.parquet)."""
        return CampaignPaths(location(shard).parent.parent)

    @staticmethod
    def run_of_shard(name: str) -> int | None:
        m = _SHARD_RE.match(name)
        return int(m.group(1)) if m else None

    SHARD_GLOB = "run-*.parquet"  # what a listing of runs_dir matches

    # shards that failed verification, moved aside with the reason
    @property
    def rejected_dir(self) -> CampaignLocation:
        return self.root / "rejected"

    def rejected(self, run: int, when: str) -> CampaignLocation:
        """Where the shard of `run` is moved when it fails verification at time stamp `when` (see stamp());
        note(rejected(...)) says why."""
        return self.rejected_dir / f"{self.shard(run).name}.{when}"

    # why a run failed
    @property
    def failed_dir(self) -> CampaignLocation:
        return self.root / "failed"

    def failure(self, run: int) -> CampaignLocation:
        return self.failed_dir / f"run-{run:06d}.json"

    FAILURE_GLOB = "run-*.json"  # what a listing of failed_dir matches

    @staticmethod
    def run_of_failure(name: str) -> int | None:
        """The run a failure record's file name belongs to (the inverse of failure()); None for other files."""
        m = _FAILURE_RE.match(name)
        return int(m.group(1)) if m else None

    # the fold checkpoint and the driver's lock
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

    # influence of one target ("correct": the 0/1 target; a soft target adds its name) in one layout
    INFLUENCE_LAYOUTS = {"dense": ".npy", "dense_se": "_se.npy", "per-class": "_per_class.npz",
                         "topk": "_topk.parquet", "topk_pairs": "_pairs.parquet"}

    def influence_file(self, layout: str, target: str = "correct") -> CampaignLocation:
        suffix = "" if target == "correct" else f"_{target}"
        return self.estimates_dir / f"influence{suffix}{self.INFLUENCE_LAYOUTS[layout]}"

    @property
    def cscore(self) -> CampaignLocation:
        return self.estimates_dir / "cscore.parquet"

    @property
    def privacy_risk(self) -> CampaignLocation:
        return self.estimates_dir / "privacy_risk.parquet"

    # `longtail proxies` / triage (orchestrator/features/proxies.py), in estimates/
    @property
    def triage(self) -> CampaignLocation:
        return self.estimates_dir / "triage.parquet"

    @property
    def pred_probs(self) -> CampaignLocation:
        return self.estimates_dir / "pred_probs.npy"

    @property
    def proxies(self) -> CampaignLocation:
        return self.estimates_dir / "proxies.parquet"

    @property
    def proxy_agreement(self) -> CampaignLocation:
        return self.estimates_dir / "proxy_agreement.parquet"

    # `longtail utility`: follow-up runs and their results (orchestrator/features/utility.py)
    @property
    def utility(self) -> UtilityPaths:
        return UtilityPaths(self.utility_dir)

    @property
    def utility_dir(self) -> CampaignLocation:
        return self.root / "utility"

    @property
    def utility_results(self) -> CampaignLocation:
        return self.utility.results

    # `longtail report`
    @property
    def report_dir(self) -> CampaignLocation:
        return self.root / "report"

    @property
    def report(self) -> CampaignLocation:
        return self.report_dir / "index.html"

    # default output directories of the commands that write outside estimates/ (each has --out / --dest)
    @property
    def export_dir(self) -> CampaignLocation:
        return self.root / "export"

    @property
    def audit_dir(self) -> CampaignLocation:
        return self.root / "audit"

    def compare_dir(self, other: str) -> CampaignLocation:
        """`longtail compare A B` writes to A/compare/<name of B>."""
        return self.root / "compare" / other

    @staticmethod
    def default_root(name: str) -> Path:
        """Where `longtail run` puts a campaign named `name` unless --out says otherwise."""
        return Path("campaigns") / name

    @staticmethod
    def default_cluster_root(name: str) -> str:
        """The same on a cluster's head node (`longtail submit`); ~ expands there."""
        return f"~/longtail-campaigns/{name}"

    def relative(self, path: CampaignLocation) -> str:
        """`path` as it reads inside the campaign directory, for messages: "state/fold.npz"."""
        if isinstance(self.root, Path):
            return Path(path).relative_to(self.root).as_posix()
        return str(path)[len(str(self.root)):].lstrip("/")

    @property
    def created_dirs(self) -> tuple[CampaignLocation, ...]:
        """The directories a new campaign starts with."""
        return (self.plan_dir, self.runs_dir, self.failed_dir, self.state_dir, self.estimates_dir)

    @property
    def created_files(self) -> tuple[CampaignLocation, ...]:
        """What creating a campaign writes before campaign.toml, the last file it writes."""
        return (self.examples, self.plan_masks, self.plan_seeds, self.plan_ratios, self.plan_info,
                self.results_record)

    def make_dirs(self) -> None:
        for d in (self.root, *self.created_dirs):
            makedirs(d)


@dataclass(frozen=True)
class UtilityPaths:
    """utility/ inside a campaign: the follow-up models of `longtail utility` and their results."""
    root: CampaignLocation

    @property
    def runs_dir(self) -> CampaignLocation:
        return self.root / "runs"

    def shard(self, condition: str, rep: int) -> CampaignLocation:
        """The shard of follow-up model `rep` of `condition`."""
        return self.runs_dir / f"{condition}-r{rep}.parquet"

    @property
    def failed_dir(self) -> CampaignLocation:
        return self.root / "failed"

    def failure(self, name: str) -> CampaignLocation:
        """Why follow-up run `name` (<condition>-r<rep>) failed."""
        return self.failed_dir / f"{name}.json"

    # shards that failed verification, moved aside with note() saying why
    @property
    def stale_dir(self) -> CampaignLocation:
        return self.root / "stale"

    def stale(self, shard: CampaignLocation, when: str) -> CampaignLocation:
        return self.stale_dir / f"{shard.name}.{when}"

    @property
    def lock(self) -> CampaignLocation:
        return self.root / "utility.lock"

    @property
    def results(self) -> CampaignLocation:
        return self.root / "utility.parquet"

    @property
    def summary(self) -> CampaignLocation:
        return self.root / "summary.json"


@dataclass(frozen=True)
class ExportPaths:
    """What `longtail export` writes into its directory (CampaignPaths.export_dir unless --dest)."""
    root: Path

    # --format fz: the paper's released layouts (Feldman & Zhang 2020)
    def fz_matrix(self, name: str) -> Path:
        return self.root / f"{name}_infl_matrix.npz"

    def fz_pairs(self, name: str, infl_threshold: float, mem_threshold: float) -> Path:
        return self.root / f"{name}_high_infl_pairs_infl{infl_threshold:g}_mem{mem_threshold:g}.npz"

    # --format parquet: tables keyed by example id
    @property
    def train(self) -> Path:
        return self.root / "train.parquet"

    @property
    def test(self) -> Path:
        return self.root / "test.parquet"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.parquet"


@dataclass(frozen=True)
class AuditPaths:
    """What `longtail audit` writes into its directory (CampaignPaths.audit_dir unless --out)."""
    root: Path

    def scores(self, target: str) -> Path:
        return self.root / f"{target}.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "audit.json"


@dataclass(frozen=True)
class ComparePaths:
    """What `longtail compare` writes into its directory (CampaignPaths.compare_dir unless --out)."""
    root: Path

    @property
    def table(self) -> Path:
        return self.root / "compare.parquet"

    @property
    def influence(self) -> Path:
        return self.root / "influence.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "compare.json"

    @property
    def page(self) -> Path:
        return self.root / "index.html"
