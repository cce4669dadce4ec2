"""The Ray driver: train every planned run that has no shard yet, fold shards as they arrive.

Ray stays at this edge. Long-lived `RunWorker` actors (one per `cpus_per_worker`/`gpus_per_worker`
slot) keep the dataset resident; the driver keeps at most `max_in_flight` runs dispatched, consumes
them in completion order with `ray.wait`, verifies and folds each shard, checkpoints the fold every
`checkpoint_seconds`, and records every failed run in failed/. A run whose worker or node dies goes
back in the queue and is retried on another worker (`max_retries`, see orchestrator/pool.py); a
run that fails on its own is recorded once and the campaign goes on, within a failure budget.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from workers.shard import ShardError
from workers.storage import atomic_write_bytes, atomic_write_text, makedirs, move

from .aggregate import Aggregator
from .campaign import Campaign, CampaignError
from .lock import DriverLock
from .outputs import write_estimates
from .progress import Progress


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CampaignInterrupted(RuntimeError):
    pass


@dataclass
class RunReport:
    planned: int
    already_done: int
    trained: int = 0
    failed: list[int] = field(default_factory=list)  # runs in failed/ at the end
    failed_now: list[int] = field(default_factory=list)  # runs that failed in this session
    retried: int = 0  # runs put back in the queue after their worker died
    rejected: list[int] = field(default_factory=list)
    seconds: float = 0.0  # the whole call, Ray start-up included
    training_seconds: float = 0.0  # from the first dispatch to the last result
    summary: dict = field(default_factory=dict)
    dashboard_url: str | None = None
    stopped_early: bool = False
    stop_reason: str = ""

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))


def _say(msg: str) -> None:
    print(f"longtail: {msg}", file=sys.stderr, flush=True)


def record_failure(campaign: Campaign, run: int, reason: str, detail: str = "", host: str = "",
                   attempts: int | None = None) -> None:
    makedirs(campaign.paths.failed_dir)
    atomic_write_text(campaign.paths.failure(run), json.dumps({
        "run": run, "reason": reason, "traceback": detail, "host": host, "attempts": attempts,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


def reject_shard(campaign: Campaign, run: int, why: str) -> None:
    """Move an untrustworthy shard aside (never delete data) with a note saying why; the run is redone."""
    paths = campaign.paths
    makedirs(paths.rejected_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = paths.rejected_dir / f"{paths.shard(run).name}.{stamp}"
    move(paths.shard(run), target)
    atomic_write_text(target.with_name(target.name + ".why.txt"), why + "\n")
    _say(f"rejected the shard of run {run}: {why}; moved to {target}, the run will be trained again")


def fold_existing(campaign: Campaign, agg: Aggregator, report: RunReport) -> set[int]:
    """Fold finished shards the checkpoint does not contain; reject bad ones. Returns the runs done."""
    done = campaign.finished_runs()
    for r in sorted(done - agg.folded_runs()):
        try:
            agg.add(r, agg.read(r))
        except ShardError as e:
            reject_shard(campaign, r, str(e))
            report.rejected.append(r)
            done.discard(r)
    return done


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def ray_init(address: str | None, local_cpus: int = 0, dashboard_host: str = "127.0.0.1"):
    """Join the cluster at `address` (or a Ray job's), or start the embedded one; returns (ray, whether
    this call started it, the dashboard URL)."""
    if address:
        from .jobs import send_token_if_available

        send_token_if_available()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray, False, None
    if not address and os.environ.get("RAY_ADDRESS"):
        # a Ray job's driver (longtail submit): join the job's cluster; the job's runtime environment
        # (the shipped working directory) already reaches every worker
        ctx = ray.init(log_to_driver=False, logging_level="WARNING")
        return ray, True, getattr(ctx, "dashboard_url", None)
    # Workers import the driver's plug-ins: they see its import path (a cluster whose nodes lack
    # these paths needs the code installed there, see docs/plugins.md).
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    if address:
        ctx = ray.init(address=address, log_to_driver=False, logging_level="WARNING", runtime_env=runtime_env)
    else:
        cpus = local_cpus or None
        # The embedded cluster binds the dashboard to loopback: it is protected by nothing but Ray's token.
        if dashboard_host not in LOOPBACK:
            _say("WARNING " + "!" * 60)
            _say(f"WARNING: the Ray dashboard and job API will listen on {dashboard_host}, reachable from the "
                 f"network, and protected by nothing but Ray's token (~/.ray/auth_token). Anyone with the token "
                 f"can run code on this machine. Prefer the default 127.0.0.1 and an SSH tunnel.")
            _say("WARNING " + "!" * 60)
        ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host=dashboard_host,
                       log_to_driver=False, logging_level="WARNING", runtime_env=runtime_env)
    url = getattr(ctx, "dashboard_url", None)
    return ray, True, (f"http://{url}" if url and not url.startswith("http") else url)


def run_campaign(campaign: Campaign, address: str | None = None, progress: bool = True,
                 dashboard_host: str = "127.0.0.1") -> RunReport:
    """Train what is missing, fold everything exactly once, write estimates/. Resumable at any point."""
    start = time.monotonic()
    lock = DriverLock(campaign.paths.lock)
    with lock:
        if lock.note:
            _say(lock.note)
        for p in campaign.sweep_temporaries():
            _say(f"removed a temporary file left by a crash: {p}")
        agg = Aggregator(campaign)
        for note in agg.notes:
            _say(note)
        report = RunReport(planned=campaign.plan.runs, already_done=0)
        done = fold_existing(campaign, agg, report)
        report.already_done = len(done)
        todo = [r for r in range(campaign.plan.runs) if r not in done]
        if todo and _target_reached(campaign, agg, report):
            todo = []
        try:
            if todo:
                _dispatch(campaign, agg, todo, done, report, address, progress, lock, dashboard_host)
        except KeyboardInterrupt:
            agg.save_checkpoint()
            write_estimates(agg, complete=False, final=False)
            raise CampaignInterrupted(
                f"interrupted; {int(agg.folded.sum())} of {campaign.plan.runs} runs are folded and saved. "
                f"Continue with: longtail resume {campaign.paths.root}") from None
        agg.save_checkpoint()
        for r in agg.folded_runs() & campaign.failed_runs():
            campaign.paths.failure(r).unlink(missing_ok=True)  # a failure later redone successfully
        report.failed = sorted(campaign.failed_runs())
        complete = bool(agg.folded.all()) or report.stopped_early
        report.seconds = time.monotonic() - start
        extra = {"failed_runs": len(report.failed), "failure_reasons": campaign.failure_reasons(),
                 "retried_runs": report.retried}
        if report.stopped_early:
            extra["stopped_early"] = report.stop_reason
        report.summary = write_estimates(agg, complete=complete, final=True, extra=extra)
    return report


def _target_reached(campaign: Campaign, agg: Aggregator, report: RunReport) -> bool:
    """Adaptive stopping: has the wanted share of estimates reached [estimates] target_se?"""
    e = campaign.spec.estimates
    share = agg.share_at_target()
    if share is None or share < e.target_share:
        return False
    report.stopped_early = True
    report.stop_reason = (f"{share:.1%} of the memorization estimates reached a standard error <= {e.target_se} "
                          f"(wanted {e.target_share:.0%}) after {agg.stats.runs} runs of the main ratio")
    _say(f"stopping early: {report.stop_reason}")
    return True


def _dispatch(campaign: Campaign, agg: Aggregator, todo: list[int], done: set[int], report: RunReport,
              address: str | None, show_progress: bool, lock: DriverLock, dashboard_host: str) -> None:
    from .metrics import CampaignMetrics
    from .pool import WorkerPool, runs_per_call

    ray, owned, report.dashboard_url = ray_init(address, campaign.spec.resources.local_cpus, dashboard_host)
    res, e = campaign.spec.resources, campaign.spec.estimates
    plan, paths = campaign.plan, campaign.paths
    pack = runs_per_call(campaign.spec)
    probe = paths.state_dir / f".probe-{os.getpid()}-{time.time_ns()}"
    atomic_write_text(probe, "a worker that can read this file sees the campaign directory\n")
    pool = WorkerPool(ray, campaign, _say, str(probe))
    queue = deque(todo)
    attempts: dict[int, int] = {}  # worker deaths per run
    in_flight: dict = {}  # ObjectRef -> (run, slot)
    try:
        pool.grow_to(min(pool.fit(), len(queue)))
        pool.wait_ready()
        _say(f"campaign {campaign.name!r}: {len(todo)} runs to train on {len(pool.live())} workers "
             f"({len(done)} of {plan.runs} already done)"
             + (f"; Ray dashboard at {report.dashboard_url}" if report.dashboard_url else ""))
        bar = Progress(total=plan.runs, done=len(done), enabled=show_progress)
        metrics = CampaignMetrics(campaign.name)
        share = None
        last_checkpoint = last_resize = first_dispatch = time.monotonic()
        try:
            while queue or in_flight:
                pool.poll()
                ready_slots = pool.ready()
                calls = max(1, (res.max_in_flight // pack if res.max_in_flight else 2 * len(ready_slots))
                            // max(1, len(ready_slots)))
                for slot in ready_slots:
                    while queue and slot.load < calls and not slot.isolated:
                        if queue[0] in attempts:  # a suspect runs alone: if its worker dies, it is the cause
                            if slot.load:
                                break
                            slot.isolated = True
                            group = [queue.popleft()]
                        else:
                            group = []
                            while queue and len(group) < pack and queue[0] not in attempts:
                                group.append(queue.popleft())
                        # one task name per kind, so that the dashboard and `ray summary tasks` group them
                        ref = slot.actor.run_many.options(name=f"longtail:{campaign.name}:runs").remote(
                            [(r, plan.masks[r], int(plan.seeds[r]), str(paths.shard(r))) for r in group])
                        in_flight[ref] = (group, slot)
                        slot.load += 1
                if not in_flight and not pool.live():
                    raise CampaignError("no worker is left to run the campaign; see the messages above")
                finished, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0) if in_flight else ([], [])
                for ref in finished:
                    group, slot = in_flight.pop(ref)
                    slot.load -= 1
                    slot.isolated = False
                    for r, outcome in zip(group, _collect(ray, ref, group, campaign, agg, report)):
                        if outcome == "folded":
                            done.add(r)
                        elif outcome == "worker died":
                            _worker_died(pool, slot, r, attempts, queue, campaign, report)
                _check_failure_budget(campaign, report)
                running = sum(len(g) for g, _ in in_flight.values())
                bar.update(len(done), len(report.failed_now), running)
                metrics.update(report.trained, len(report.failed_now), report.retried, running, bar.rate(),
                               len(done) / plan.runs, share)
                now = time.monotonic()
                if now - last_resize >= RESIZE_SECONDS and queue:  # nodes that joined get work too
                    started = pool.grow_to(min(pool.fit(), len(pool.live()) + len(queue)))
                    if started:
                        _say(f"starting {started} more workers: the cluster has room for them")
                    last_resize = now
                if now - last_checkpoint >= e.checkpoint_seconds:
                    agg.save_checkpoint()
                    write_estimates(agg, complete=False, final=False)
                    lock.heartbeat()
                    last_checkpoint = now
                    share = agg.share_at_target()
                    if queue and _target_reached(campaign, agg, report):
                        queue.clear()  # runs in flight finish and are folded; nothing new is dispatched
            report.training_seconds = time.monotonic() - first_dispatch
        finally:
            bar.close()
            pool.shutdown()
    finally:
        probe.unlink(missing_ok=True)
        if owned:
            ray.shutdown()


RESIZE_SECONDS = 2.0


def _worker_died(pool, slot, run: int, attempts: dict, queue: deque, campaign: Campaign, report: RunReport):
    """Retry the run elsewhere (bounded), and replace the worker once.

    Every run the dead worker held is charged one attempt, since any of them may have killed it; a
    charged run is retried alone on an idle worker, so that a run that keeps killing workers uses up
    its attempts while the runs that merely shared its worker succeed on their retry."""
    limit = campaign.spec.resources.max_retries
    attempts[run] = attempts.get(run, 0) + 1
    report.retried += 1
    if attempts[run] > limit:
        record_failure(campaign, run, f"its worker died {attempts[run]} times (the last on {slot.info.get('host')}); "
                       f"[resources] max_retries = {limit}", attempts=attempts[run])
        report.failed_now.append(run)
    else:
        queue.appendleft(run)
    if not slot.dead:
        pool.kill(slot)
        _say(f"worker {slot.name} on {slot.info.get('host', '?')} died; run {run} goes back in the queue "
             f"(attempt {attempts[run]} of {limit + 1}); starting a replacement")
        pool.grow_to(len(pool.live()) + 1)


def _check_failure_budget(campaign: Campaign, report: RunReport) -> None:
    budget = campaign.spec.resources.max_failures
    limit = int(budget) if budget >= 1 else max(1, int(budget * campaign.plan.runs))
    if len(report.failed_now) > limit:
        raise CampaignError(
            f"{len(report.failed_now)} runs failed in this session, more than the failure budget ([resources] "
            f"max_failures = {budget:g}, i.e. {limit} runs); the campaign stopped. Reasons are in "
            f"{campaign.paths.failed_dir}/ (first: {_first_reason(campaign, report.failed_now)}). Fix the cause, "
            f"then: longtail resume {campaign.paths.root}")


def _first_reason(campaign: Campaign, runs: list[int]) -> str:
    try:
        return json.loads(campaign.paths.failure(runs[0]).read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def _collect(ray, ref, runs: list[int], campaign: Campaign, agg: Aggregator, report: RunReport) -> list[str]:
    """Take one finished call: for each of its runs, fold its shard ("folded"), record why it failed
    ("failed"), or report that its worker died ("worker died")."""
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    try:
        results = ray.get(ref)
    except (RayActorError, WorkerCrashedError):
        return ["worker died"] * len(runs)
    except RayTaskError as e:  # the worker code itself raised (run_many() returns failures as data)
        cause = e.cause if getattr(e, "cause", None) is not None else e
        for run in runs:
            record_failure(campaign, run, f"{type(cause).__name__}: {cause}".splitlines()[0][:500],
                           _ANSI.sub("", getattr(e, "traceback_str", "") or str(e)))
            report.failed_now.append(run)
        return ["failed"] * len(runs)
    return [_collect_one(result, run, campaign, agg, report) for run, result in zip(runs, results)]


def _collect_one(result: dict, run: int, campaign: Campaign, agg: Aggregator, report: RunReport) -> str:
    if result.get("fatal"):
        raise CampaignError(f"run {run} could not be stored on {result['host']}: {result['reason']}. Nothing "
                            f"half-written is visible; fix the cause, then: longtail resume {campaign.paths.root}")
    if result.get("failed"):
        record_failure(campaign, run, result["reason"], result["traceback"], host=result["host"])
        report.failed_now.append(run)
        return "failed"
    if "shard" in result:  # a worker that cannot see the campaign directory sent the shard's bytes
        atomic_write_bytes(campaign.paths.shard(run), result.pop("shard"))
    try:
        data = agg.read(run)
    except ShardError as e:
        reject_shard(campaign, run, str(e))
        report.rejected.append(run)
        record_failure(campaign, run, f"its shard failed verification: {e}", host=result.get("host", ""))
        report.failed_now.append(run)
        return "failed"
    floor = _accuracy_floor(campaign, agg)
    if floor is not None and result["test_acc"] < floor:
        why = (f"test accuracy {result['test_acc']:.3f} is far below the campaign's median "
               f"({floor / campaign.spec.estimates.min_accuracy:.3f}; [estimates] min_accuracy = "
               f"{campaign.spec.estimates.min_accuracy})")
        reject_shard(campaign, run, why)
        record_failure(campaign, run, why, host=result.get("host", ""))
        report.failed_now.append(run)
        return "failed"
    agg.add(run, data)
    report.trained += 1
    return "folded"


def _accuracy_floor(campaign: Campaign, agg: Aggregator) -> float | None:
    """A run whose test accuracy is below min_accuracy x the median of the folded runs is a failure
    (diverged, collapsed to one class): folding it would bias every estimate. Needs 10 runs first."""
    share = campaign.spec.estimates.min_accuracy
    acc = agg.run_info["test_acc"][agg.folded]
    acc = acc[np.isfinite(acc)]
    if not share or len(acc) < 10:
        return None
    return share * float(np.median(acc))
