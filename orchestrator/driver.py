"""The Ray driver: train every planned run that has no shard yet, fold shards as they arrive.

Ray stays at this edge. Long-lived `RunWorker` actors (one per `cpus_per_worker`/`gpus_per_worker`
slot) keep the dataset resident; the driver keeps at most `max_in_flight` runs dispatched, consumes
them in completion order with `ray.wait`, verifies and folds each shard, checkpoints the fold every
`checkpoint_seconds`, and records every failed run in failed/. Worker or node deaths are retried by
Ray (`max_retries`); a run that fails on its own is recorded once and the campaign goes on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from workers.shard import ShardError
from workers.storage import atomic_write_text

from .aggregate import Aggregator
from .outputs import write_estimates
from .campaign import Campaign, CampaignError
from .lock import DriverLock
from .progress import Progress


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CampaignInterrupted(RuntimeError):
    pass


@dataclass
class RunReport:
    planned: int
    already_done: int
    trained: int = 0
    failed: list[int] = field(default_factory=list)
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
    campaign.paths.failed_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(campaign.paths.failure(run), json.dumps({
        "run": run, "reason": reason, "traceback": detail, "host": host, "attempts": attempts,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


def reject_shard(campaign: Campaign, run: int, why: str) -> None:
    """Move an untrustworthy shard aside (never delete data) with a note saying why; the run is redone."""
    paths = campaign.paths
    paths.rejected_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = paths.rejected_dir / f"{paths.shard(run).name}.{stamp}"
    shutil.move(str(paths.shard(run)), target)
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


def _ray_init(address: str | None, campaign: Campaign):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray, False, None
    if address:
        ctx = ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    else:
        cpus = campaign.spec.resources.local_cpus or None
        # The embedded cluster binds the dashboard to loopback: it is protected by nothing but Ray's token.
        ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       log_to_driver=False, logging_level="WARNING",
                       runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    url = getattr(ctx, "dashboard_url", None)
    return ray, True, (f"http://{url}" if url and not url.startswith("http") else url)


def _worker_count(ray, campaign: Campaign, todo: int) -> int:
    res = campaign.spec.resources
    total = ray.cluster_resources()
    fit = int(total.get("CPU", 0) // res.cpus_per_worker) if res.cpus_per_worker else todo
    if res.gpus_per_worker:
        gpus = total.get("GPU", 0)
        if gpus == 0:
            raise CampaignError(f"[resources] gpus_per_worker = {res.gpus_per_worker} but the cluster has no GPU; "
                                f"set gpus_per_worker = 0 to train on CPUs")
        fit = min(fit, int(gpus // res.gpus_per_worker))
    if fit == 0:
        raise CampaignError(f"the cluster ({total.get('CPU', 0):g} CPUs) cannot fit one worker of "
                            f"{res.cpus_per_worker:g} CPUs; lower [resources] cpus_per_worker")
    n = res.workers or fit
    return max(1, min(n, todo))


def run_campaign(campaign: Campaign, address: str | None = None, progress: bool = True) -> RunReport:
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
                _dispatch(campaign, agg, todo, done, report, address, progress, lock)
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
        extra = {"failed_runs": len(report.failed)}
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
              address: str | None, show_progress: bool, lock: DriverLock) -> None:
    from workers.worker import RunWorker

    ray, owned, report.dashboard_url = _ray_init(address, campaign)
    res = campaign.spec.resources
    try:
        n_workers = _worker_count(ray, campaign, len(todo))
        actor_cls = ray.remote(RunWorker)
        spec_dict = campaign.spec.to_dict()
        workers = [
            actor_cls.options(
                name=f"longtail:{campaign.name}:worker-{k}", num_cpus=res.cpus_per_worker,
                num_gpus=res.gpus_per_worker, max_restarts=res.max_retries, max_task_retries=res.max_retries,
            ).remote(spec_dict, campaign.name, campaign.spec.result_hash(), campaign.fingerprint,
                     max(1, int(res.cpus_per_worker)), res.gpus_per_worker > 0)
            for k in range(n_workers)
        ]
        try:
            ray.get([w.ping.remote() for w in workers])
        except Exception as e:  # an actor whose constructor failed: every run would fail the same way
            cause = getattr(e, "cause", None) or e
            raise CampaignError(f"the workers could not start: {str(cause).strip().splitlines()[-1]}") from None
        _say(f"campaign {campaign.name!r}: {len(todo)} runs to train on {n_workers} workers "
             f"({len(done)} of {campaign.plan.runs} already done)"
             + (f"; Ray dashboard at {report.dashboard_url}" if report.dashboard_url else ""))
        per_worker = max(1, (res.max_in_flight or 2 * n_workers) // n_workers)
        queue = deque(todo)
        in_flight: dict = {}  # ObjectRef -> (run, worker index)
        load = [0] * n_workers
        failed_now = 0
        bar = Progress(total=campaign.plan.runs, done=len(done), enabled=show_progress)
        plan, paths = campaign.plan, campaign.paths

        def submit(w: int) -> None:
            r = queue.popleft()
            ref = workers[w].run.remote(r, plan.masks[r], int(plan.seeds[r]), str(paths.shard(r)))
            in_flight[ref] = (r, w)
            load[w] += 1

        for w in range(n_workers):
            while queue and load[w] < per_worker:
                submit(w)
        last_checkpoint = first_dispatch = time.monotonic()
        try:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    r, w = in_flight.pop(ref)
                    load[w] -= 1
                    if _collect(ray, ref, r, campaign, agg, report):
                        done.add(r)
                    else:
                        failed_now += 1
                    while queue and load[w] < per_worker:
                        submit(w)
                bar.update(len(done), failed_now, len(in_flight))
                if time.monotonic() - last_checkpoint >= campaign.spec.estimates.checkpoint_seconds:
                    agg.save_checkpoint()
                    write_estimates(agg, complete=False, final=False)
                    lock.heartbeat()
                    last_checkpoint = time.monotonic()
                    if queue and _target_reached(campaign, agg, report):
                        queue.clear()  # runs in flight finish and are folded; nothing new is dispatched
            report.training_seconds = time.monotonic() - first_dispatch
        finally:
            bar.close()
            for a in workers:
                ray.kill(a)
    finally:
        if owned:
            ray.shutdown()


def _collect(ray, ref, run: int, campaign: Campaign, agg: Aggregator, report: RunReport) -> bool:
    """Take one finished call: fold its shard, or record why the run failed. True if folded."""
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    try:
        result = ray.get(ref)
    except RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        record_failure(campaign, run, f"{type(cause).__name__}: {cause}".splitlines()[0][:500],
                       _ANSI.sub("", getattr(e, "traceback_str", "") or str(e)), host=getattr(e, "ip", ""))
        return False
    except (RayActorError, WorkerCrashedError) as e:
        record_failure(campaign, run, f"worker died {campaign.spec.resources.max_retries + 1} times: "
                       f"{type(e).__name__}", str(e), attempts=campaign.spec.resources.max_retries + 1)
        return False
    if result.get("fatal"):
        raise CampaignError(f"run {run} could not be stored on {result['host']}: {result['reason']}. Nothing "
                            f"half-written is visible; fix the cause, then: longtail resume {campaign.paths.root}")
    if result.get("failed"):
        record_failure(campaign, run, result["reason"], result["traceback"], host=result["host"])
        return False
    try:
        agg.add(run, agg.read(run))
    except ShardError as e:
        reject_shard(campaign, run, str(e))
        report.rejected.append(run)
        record_failure(campaign, run, f"its shard failed verification: {e}", host=result.get("host", ""))
        return False
    report.trained += 1
    return True

