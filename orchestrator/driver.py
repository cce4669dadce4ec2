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

from workers.errors import LongtailError
from workers.shard import ShardError
from workers.storage import atomic_write_bytes, atomic_write_text, makedirs, move

from orchestrator.fold import Aggregator
from orchestrator.campaign import Campaign, CampaignError
from orchestrator.lock import DriverLock
from orchestrator.estimates_files import write_estimates
from cluster.connect import ray_init
from cluster.dashboard import TASK_BAR_NOTE, url_line
from orchestrator.progress import Progress


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CampaignInterrupted(LongtailError):
    """Ctrl-C or SIGTERM: the fold is saved; the message says how to continue."""

    exit_code = 130


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
    estimate_seconds: float = 0.0  # the final write of estimates/ (influence, pairs, split halves)
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


def fold_existing(campaign: Campaign, agg: Aggregator, report: RunReport,
                  gate: "AccuracyGate | None" = None, reject: bool = True, pool=None) -> set[int]:
    """Fold finished shards the checkpoint does not contain (through the driver's accuracy gate, as if
    they had just arrived; without one, all of them); reject unreadable ones (reject=False, for a
    read-only recompute: leave them in place, say so, list them in report.rejected). Returns the runs
    done (those the gate still holds included). With a `pool` (orchestrator/foldpool.py), fold actors on
    the cluster read and verify the shards; the fold stays here."""
    done = campaign.finished_runs()
    todo = sorted(done - agg.folded_runs())
    for r, data, error in (pool.read(todo) if pool is not None else (_read(agg, r) for r in todo)):
        if data is None:  # the shard failed verification
            if reject:
                reject_shard(campaign, r, error)
            else:
                _say(f"left out the shard of run {r}: {error}")
            report.rejected.append(r)
            done.discard(r)
            continue
        if gate is None:
            agg.add(r, data)
        else:
            done -= gate.offer(r, data, report)
    return done


def _read(agg: Aggregator, run: int) -> tuple[int, object, str]:
    try:
        return run, agg.read(run), ""
    except ShardError as e:
        return run, None, str(e)


def damaged_folded(campaign: Campaign, agg: Aggregator) -> list[tuple[int, str]]:
    """Runs the checkpoint holds whose shard is gone or fails a cheap check (its Parquet footer and row
    count): the fold counts them, but the campaign can no longer show them. Resume relies on these
    shards, so it checks them first (one footer read each: milliseconds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.storage import arrow_source

    rows = campaign.n_train + campaign.n_test
    bad = []
    for r in sorted(agg.folded_runs()):
        path = campaign.paths.shard(r)
        if not path.exists():
            bad.append((r, f"{path}: missing"))
            continue
        source, filesystem = arrow_source(path)
        try:
            found = pq.read_metadata(source, filesystem=filesystem).num_rows
        except (OSError, pa.ArrowException) as e:
            bad.append((r, f"{path}: unreadable Parquet footer ({e}); the file is truncated or corrupt"))
            continue
        if found != rows:
            bad.append((r, f"{path}: {found} rows, expected {rows}"))
    return bad


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
        damaged = damaged_folded(campaign, agg)
        for r, why in damaged:  # the fold holds them but their shards are no longer evidence: redo them
            if campaign.paths.shard(r).exists():
                reject_shard(campaign, r, why)
            else:
                _say(f"the shard of folded run {r} is missing ({why}); the run will be trained again")
        if damaged:
            _say(f"refolding every shard: the checkpoint holds {len(damaged)} runs whose shard is damaged or gone")
            agg = Aggregator(campaign, from_scratch=True)
        report = RunReport(planned=campaign.plan.runs, already_done=0)
        gate = AccuracyGate(campaign, agg)
        done = fold_existing(campaign, agg, report, gate)
        report.already_done = len(done)
        todo = [r for r in range(campaign.plan.runs) if r not in done]
        if todo and _target_reached(campaign, agg, report):
            todo = []
        try:
            if todo:
                try:
                    _dispatch(campaign, agg, todo, done, report, address, progress, lock, dashboard_host, gate)
                except BaseException:
                    # stopped (full disk, failure budget, Ctrl-C): the pool's workers are dead by now, so a
                    # temporary shard of an unfinished run is one a worker left mid-write; nothing outlives it
                    campaign.sweep_run_temporaries([r for r in todo if r not in done])
                    raise
        except KeyboardInterrupt:
            agg.save_checkpoint()
            write_estimates(agg, complete=False, final=False)
            raise CampaignInterrupted(
                f"interrupted; {int(agg.folded.sum())} of {campaign.plan.runs} runs are folded and saved"
                + (f" ({len(gate.held)} more are on disk, waiting for the accuracy check)" if gate.held else "")
                + ". "
                f"Continue with: longtail resume {campaign.paths.root}") from None
        gate.release_all()  # fewer than MIN_RUNS runs in all: no median to judge them by
        agg.save_checkpoint()
        # No worker is left; a temporary shard now is one a worker died writing (its run was redone).
        for p in campaign.sweep_run_temporaries(range(campaign.plan.runs)):
            _say(f"removed a temporary file left by a worker that died while writing it: {p}")
        for r in agg.folded_runs() & campaign.failed_runs():
            campaign.paths.failure(r).unlink(missing_ok=True)  # a failure later redone successfully
        report.failed = sorted(campaign.failed_runs())
        complete = bool(agg.folded.all()) or report.stopped_early
        report.seconds = time.monotonic() - start
        extra = {"failed_runs": len(report.failed), "failure_reasons": campaign.failure_reasons(),
                 "retried_runs": report.retried}
        if report.stopped_early:
            extra["stopped_early"] = report.stop_reason
        estimates_start = time.monotonic()
        report.summary = write_estimates(agg, complete=complete, final=True, extra=extra)
        report.estimate_seconds = time.monotonic() - estimates_start
        report.seconds = time.monotonic() - start  # the caller may widen it to the whole command
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
              address: str | None, show_progress: bool, lock: DriverLock, dashboard_host: str,
              gate: "AccuracyGate") -> None:
    from orchestrator.metrics import CampaignMetrics
    from orchestrator.pool import WorkerPool, runs_per_call

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
             + (f"; {url_line(report.dashboard_url)}" if report.dashboard_url else ""))
        if os.environ.get("RAY_ADDRESS") and not address:
            _say(f"note: {TASK_BAR_NOTE}")  # a job's driver: this goes to the log its job page shows
        bar = Progress(total=plan.runs, done=len(done), enabled=show_progress, campaign=campaign.name)
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
                            # its dead worker may have left a temporary shard: nobody writes it any more
                            for p in campaign.sweep_run_temporaries(group):
                                _say(f"removed the temporary shard of run {group[0]} that its dead worker left: {p}")
                        else:
                            group = []
                            while queue and len(group) < pack and queue[0] not in attempts:
                                group.append(queue.popleft())
                        # the dashboard's task table then says which runs each call trains
                        ref = slot.actor.run_many.options(name=task_name(campaign.name, group)).remote(
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
                    for r, outcome in zip(group, _collect(ray, ref, group, campaign, agg, report, gate)):
                        if outcome == "folded":
                            done.add(r)
                        elif isinstance(outcome, set):  # judged later: the runs the gate refused now
                            done.add(r)
                            done -= outcome
                        elif outcome == "worker died":
                            _worker_died(pool, slot, r, attempts, queue, campaign, report)
                _check_failure_budget(campaign, report)
                running = sum(len(g) for g, _ in in_flight.values())
                bar.update(len(done), len(report.failed_now), running, retried=report.retried)
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


def task_name(campaign: str, runs: list[int]) -> str:
    """`longtail:<campaign>:runs 32-47` (or `run 5`, or `runs 3,9,12`): one call's runs, as the
    dashboard's task table and `ray list tasks` show them."""
    if len(runs) == 1:
        return f"longtail:{campaign}:run {runs[0]}"
    if runs == list(range(runs[0], runs[0] + len(runs))):
        return f"longtail:{campaign}:runs {runs[0]}-{runs[-1]}"
    return f"longtail:{campaign}:runs " + ",".join(map(str, runs))


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


def _collect(ray, ref, runs: list[int], campaign: Campaign, agg: Aggregator, report: RunReport,
             gate: "AccuracyGate") -> list:
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
    return [_collect_one(result, run, campaign, agg, report, gate) for run, result in zip(runs, results)]


def _collect_one(result: dict, run: int, campaign: Campaign, agg: Aggregator, report: RunReport,
                 gate: "AccuracyGate"):
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
    report.trained += 1
    refused = gate.offer(run, data, report, host=result.get("host", ""))
    if run in refused:
        report.trained -= 1
        return "failed"
    return refused  # the runs (held earlier) that this one's arrival let the gate judge, and refused


class AccuracyGate:
    """Collapsed runs are never folded. A run whose test accuracy is below [estimates] min_accuracy x the
    median test accuracy of the campaign's runs is a failure (diverged, collapsed to one class): folding
    it would bias every estimate. A median needs MIN_RUNS runs, so the first runs to arrive are held,
    unfolded (their shards are on disk, so a crash loses nothing: the next driver offers them again),
    until MIN_RUNS accuracies are known; then each is judged against that median, and every later run
    on arrival. A campaign of fewer runs than MIN_RUNS in all cannot tell a collapse and folds them."""

    MIN_RUNS = 10

    def __init__(self, campaign: Campaign, agg: Aggregator):
        self.c, self.agg = campaign, agg
        self.share = campaign.spec.estimates.min_accuracy
        self.held: list[tuple[int, object, float, str]] = []  # (run, shard data, test accuracy, host)

    def floor(self) -> float | None:
        acc = self.agg.run_info["test_acc"][self.agg.folded]
        acc = np.concatenate([acc[np.isfinite(acc)], [a for _, _, a, _ in self.held if np.isfinite(a)]])
        return self.share * float(np.median(acc)) if len(acc) >= self.MIN_RUNS else None

    def offer(self, run: int, data, report: RunReport, host: str = "") -> set[int]:
        """Fold `run`, hold it, or refuse it; returns the runs refused now (it, or runs held before)."""
        if not self.share:
            self.agg.add(run, data)
            return set()
        self.held.append((run, data, float(data.meta.get("test_acc", np.nan)), host))
        floor = self.floor()
        if floor is None:
            return set()
        held, self.held = self.held, []
        refused = set()
        for r, d, acc, h in held:
            if acc < floor:
                why = (f"test accuracy {acc:.3f} is far below the campaign's median ({floor / self.share:.3f}; "
                       f"[estimates] min_accuracy = {self.share})")
                reject_shard(self.c, r, why)
                record_failure(self.c, r, why, host=h)
                report.failed_now.append(r)
                refused.add(r)
            else:
                self.agg.add(r, d)
        return refused

    def release_all(self) -> None:
        for r, d, _, _ in self.held:
            self.agg.add(r, d)
        self.held = []
