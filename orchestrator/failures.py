"""Failure records and quarantine, one implementation for every command that trains runs.

A run that failed gets a JSON record (why, its traceback, its host) in a failed/ directory: the
campaign's failed/run-N.json, the utility's utility/failed/<condition>-r<rep>.json. A file that cannot
be trusted (a shard that fails verification, a follow-up shard trained on another set) is never
deleted: it is moved aside (rejected/, utility/stale/) with a note saying why. Paths come from
orchestrator/paths.py.
"""

from __future__ import annotations

import json
import time

from workers.storage import atomic_write_text, makedirs, move

from orchestrator.paths import note, stamp


def write_failure(path, who: dict, reason: str, detail: str = "", host: str = "", **extra) -> None:
    """Write the failure record `path`: `who` names the run (its keys come first), then why it failed."""
    makedirs(path.parent)
    atomic_write_text(path, json.dumps({
        **who, "reason": reason, "traceback": detail, "host": host, **extra,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


def record_failure(campaign, run: int, reason: str, detail: str = "", host: str = "",
                   attempts: int | None = None) -> None:
    """A campaign run failed: failed/run-N.json (the next `longtail resume` trains it again)."""
    write_failure(campaign.paths.failure(run), {"run": run}, reason, detail, host, attempts=attempts)


def first_reason(path) -> str:
    """The reason recorded in the failure record `path`, for a message that names the first failure."""
    try:
        return json.loads(path.read_text())["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def failure_limit(max_failures: float, planned: int) -> int:
    """[resources] max_failures as a number of runs: from 1 a count, below 1 a share of `planned` (at least 1)."""
    return int(max_failures) if max_failures >= 1 else max(1, int(max_failures * planned))


def quarantine(path, target, why: str):
    """Move `path` to `target` (never delete data) and write the note saying why next to it; returns target."""
    makedirs(target.parent)
    move(path, target)
    atomic_write_text(note(target), why + "\n")
    return target


def reject_shard(campaign, run: int, why: str, say) -> None:
    """Move an untrustworthy shard to rejected/ with a note saying why; the run is redone."""
    target = quarantine(campaign.paths.shard(run), campaign.paths.rejected(run, stamp()), why)
    say(f"rejected the shard of run {run}: {why}; moved to {target}, the run will be trained again")
