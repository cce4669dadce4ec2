"""The campaign's driver: train every planned run that has no shard yet, fold shards as they arrive.

run_campaign takes the lock, sweeps what a crash left, folds the shards the checkpoint lacks, and hands
the missing runs to the Dispatcher (orchestrator/dispatch.py) on Ray's long-lived workers
(orchestrator/pool.py), with CampaignRuns saying what to do with each finished run: verify its shard,
pass it through the accuracy gate into the fold, checkpoint every `checkpoint_seconds`, stop early at
the target precision. Retries of runs whose worker died, failure records (failed/) and the failure
budget are the Dispatcher's.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from workers.errors import LongtailError
from workers.shard import ShardError
from workers.results import WorkerResult
from workers.storage import atomic_write_bytes

from orchestrator.fold import Aggregator
from orchestrator.campaign import Campaign, CampaignError
from orchestrator.dispatch import Dispatcher, Job, Work
from orchestrator.failures import record_failure, reject_shard
from orchestrator.lock import DriverLock
from orchestrator.estimates_files import write_estimates
from cluster.dashboard import TASK_BAR_NOTE, url_line
from orchestrator.progress import Progress


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
                reject_shard(campaign, r, error, _say)
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
                reject_shard(campaign, r, why, _say)
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
    """Train `todo` on Ray workers, folding each run as it arrives (orchestrator/dispatch.py)."""
    from orchestrator.pool import ray_workers

    with ray_workers(campaign, address, campaign.paths.state_dir, _say, dashboard_host) as (pool, url):
        report.dashboard_url = url
        train(campaign, pool, agg, todo, done, report, show_progress, lock, gate,
              job_driver=bool(os.environ.get("RAY_ADDRESS")) and not address)


def train(campaign: Campaign, executor, agg: Aggregator, todo: list[int], done: set[int], report: RunReport,
          show_progress: bool, lock: DriverLock | None, gate: "AccuracyGate", job_driver: bool = False,
          metrics: bool = True) -> None:
    """The campaign's runs through the Dispatcher on `executor`'s workers: each shard is verified and
    offered to the accuracy gate as it arrives; the fold is checkpointed every checkpoint_seconds."""
    from orchestrator.pool import runs_per_call

    res, plan, paths = campaign.spec.resources, campaign.plan, campaign.paths
    runs = CampaignRuns(campaign, agg, done, report, gate, show_progress, metrics)
    dispatcher = Dispatcher(executor, runs, pack=runs_per_call(campaign.spec), max_in_flight=res.max_in_flight,
                            max_retries=res.max_retries, max_failures=res.max_failures, planned=plan.runs,
                            say=_say, lock=lock, failed=report.failed_now)
    workers = dispatcher.start([Job(r, (r, plan.masks[r], int(plan.seeds[r]), str(paths.shard(r))), f"run {r}")
                                for r in todo])
    _say(f"campaign {campaign.name!r}: {len(todo)} runs to train on {workers} workers "
         f"({len(done)} of {plan.runs} already done)"
         + (f"; {url_line(report.dashboard_url)}" if report.dashboard_url else ""))
    if job_driver:
        _say(f"note: {TASK_BAR_NOTE}")  # a job's driver: this goes to the log its job page shows
    first_dispatch = time.monotonic()
    try:
        dispatcher.run(runs.bar_for(len(done)))
        runs.finish(dispatcher)
    finally:
        runs.close()
        report.retried = dispatcher.retried
    report.training_seconds = time.monotonic() - first_dispatch


def task_name(campaign: str, runs: list[int]) -> str:
    """`longtail:<campaign>:runs 32-47` (or `run 5`, or `runs 3,9,12`): one call's runs, as the
    dashboard's task table and `ray list tasks` show them."""
    if len(runs) == 1:
        return f"longtail:{campaign}:run {runs[0]}"
    if runs == list(range(runs[0], runs[0] + len(runs))):
        return f"longtail:{campaign}:runs {runs[0]}-{runs[-1]}"
    return f"longtail:{campaign}:runs " + ",".join(map(str, runs))


class CampaignRuns(Work):
    """What the campaign does with its runs in the Dispatcher: verify each shard, pass it through the
    accuracy gate into the fold, checkpoint, export metrics, stop early at the target precision."""

    error = CampaignError
    noun = "run"
    no_worker = "no worker is left to run the campaign; see the messages above"
    stopped = "the campaign stopped"

    def __init__(self, campaign: Campaign, agg: Aggregator, done: set[int], report: RunReport,
                 gate: "AccuracyGate", show_progress: bool = False, metrics: bool = True):
        self.c, self.agg, self.done, self.report, self.gate = campaign, agg, done, report, gate
        self.show_progress = show_progress
        self.failed_dir = campaign.paths.failed_dir
        self.resume = f"longtail resume {campaign.paths.root}"
        self.bar = None
        if metrics:
            from orchestrator.metrics import CampaignMetrics

            self.metrics = CampaignMetrics(campaign.name)
        else:
            self.metrics = None
        self.share = None
        self.last_checkpoint = time.monotonic()
        self.live = None  # [resources] fold_actors: the fold spread over actors (orchestrator/foldpool.py)
        if campaign.spec.resources.fold_actors:
            from orchestrator.foldpool import start_live_fold

            self.live = start_live_fold(campaign, agg, campaign.spec.resources.fold_actors, _say)
            if self.live is not None:
                gate.agg = self.live  # what the gate folds goes to the actors; agg gets their sums at each merge

    def bar_for(self, done: int) -> Progress:
        self.bar = Progress(total=self.c.plan.runs, done=done, enabled=self.show_progress, campaign=self.c.name)
        return self.bar

    def task_name(self, jobs: list[Job]) -> str:
        return task_name(self.c.name, [job.key for job in jobs])  # the task table says which runs a call trains

    def failure_path(self, run: int):
        return self.c.paths.failure(run)

    def record(self, job: Job, reason: str, detail: str, host: str, attempts: int | None) -> None:
        record_failure(self.c, job.key, reason, detail, host=host, attempts=attempts)

    def sweep(self, job: Job) -> list:
        return self.c.sweep_run_temporaries([job.key])

    def finished(self) -> int:
        return len(self.done)

    def accept(self, job: Job, result: WorkerResult) -> str | None:
        run = job.key
        if result.shard is not None:  # a worker that cannot see the campaign directory sent the shard's bytes
            atomic_write_bytes(self.c.paths.shard(run), result.shard)
        if self.live is not None:  # a fold actor verifies it; its verdict comes back in tick
            self.live.submit(run, (job, result.host))
            return None
        try:
            data = self.agg.read(run)
        except ShardError as e:
            reject_shard(self.c, run, str(e), _say)
            self.report.rejected.append(run)
            return f"its shard failed verification: {e}"
        self._offer(run, data, result.host)
        return None

    def _offer(self, run: int, data, host: str) -> None:
        self.report.trained += 1
        # the runs refused now: this one, or runs held earlier that its arrival let the gate judge
        refused = self.gate.offer(run, data, self.report, host=host)
        if run in refused:
            self.report.trained -= 1
        else:
            self.done.add(run)
        self.done -= refused
        for r in refused if self.live is not None else ():
            self.live.drop(r)

    def _verified(self, dispatcher: Dispatcher, wait: bool = False) -> None:
        """The fold actors' verdicts on the shards handed to them: into the gate, or failed as in accept."""
        from orchestrator.foldpool import Verified

        for run, acc, error, (job, host) in self.live.verified(wait):
            if error:
                reject_shard(self.c, run, error, _say)
                self.report.rejected.append(run)
                dispatcher.fail(job, f"its shard failed verification: {error}", host=host)
            else:
                self._offer(run, Verified({"test_acc": acc}), host)

    def finish(self, dispatcher: Dispatcher) -> None:
        """Every run is back: take the actors' last verdicts, release what the gate holds, merge."""
        if self.live is not None:
            self._verified(dispatcher, wait=True)
            self.gate.release_all()
            self.live.merge()

    def close(self) -> None:
        """Stop the fold actors; their unmerged runs are refolded from the shards by the next driver."""
        if self.live is not None:
            from orchestrator.foldpool import Verified

            self.live.shutdown()
            self.gate.agg = self.agg
            self.gate.held = [h for h in self.gate.held if not isinstance(h[1], Verified)]
            self.live = None

    def tick(self, dispatcher: Dispatcher) -> None:
        report = self.report
        if self.live is not None:
            self._verified(dispatcher)
        if self.metrics is not None:
            self.metrics.update(report.trained, len(report.failed_now), dispatcher.retried, dispatcher.running(),
                                self.bar.rate() if self.bar is not None else 0.0, len(self.done) / self.c.plan.runs,
                                self.share)
        now = time.monotonic()
        if now - self.last_checkpoint >= self.c.spec.estimates.checkpoint_seconds:
            if self.live is not None:
                self.live.merge()
            self.agg.save_checkpoint()
            write_estimates(self.agg, complete=False, final=False)
            self.last_checkpoint = now
            self.share = self.agg.share_at_target()
            if dispatcher.queue and _target_reached(self.c, self.agg, report):
                dispatcher.stop_dispatching()  # runs in flight finish and are folded; nothing new is dispatched


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
                reject_shard(self.c, r, why, _say)
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
