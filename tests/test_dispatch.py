"""The one dispatcher (orchestrator/dispatch.py), in this process and without Ray: packing, retries of
runs whose worker died (a suspect alone), the retry limit, the failure budget, fatal storage errors,
and the lock heartbeat; and `longtail utility` through the same Dispatcher (its two drifted behaviours,
issue 10: it never heartbeat its lock, and it packed a suspect with its pack-mates)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from orchestrator import spec as specs
from orchestrator.campaign import CampaignError, create_or_open
from orchestrator.dispatch import Dispatcher, InProcessExecutor, Job, Work, WorkerDied
from orchestrator.failures import first_reason, write_failure
from orchestrator.lock import DriverLock, LockedError
from workers.results import RunFailure, WorkerResult


def ok(run: int) -> WorkerResult:
    return WorkerResult(run=run, seed=run, host="in-process", node="", pid=0, device="cpu", train_seconds=0.0,
                        test_acc=1.0, train_acc_in=1.0, train_acc_out=1.0, final_loss=0.0, finished_at=0.0)


def trainer(kills=(), fails=(), sleep=0.0, each=None):
    """A worker's run_many in this process: a call holding a run of `kills` kills its worker; runs of
    `fails` fail on their own; `each(run)` is called before every run."""

    def run_many(calls):
        if any(c[0] in kills for c in calls):
            raise WorkerDied
        out = []
        for c in calls:
            if each is not None:
                each(c[0])
            time.sleep(sleep)
            out.append(RunFailure(c[0], f"RuntimeError: run {c[0]} fails", "Traceback ...", "in-process")
                       if c[0] in fails else ok(c[0]))
        return out

    return run_many


class Runs(Work):
    def __init__(self, failed_dir):
        self.failed_dir = failed_dir
        self.resume = "try again"
        self.accepted: list[int] = []

    def accept(self, job, result):
        assert result.run == job.key
        self.accepted.append(job.key)

    def record(self, job, reason, detail, host, attempts):
        write_failure(self.failure_path(job.key), {"run": job.key}, reason, detail, host, attempts=attempts)

    def failure_path(self, key):
        return self.failed_dir / f"run-{key}.json"

    def finished(self):
        return len(self.accepted)


def dispatch(tmp_path, n, run_many, pack=4, workers=2, max_retries=1, max_failures=100, lock=None, **kw):
    ex = InProcessExecutor(run_many, workers=workers)
    work = Runs(tmp_path / "failed")
    d = Dispatcher(ex, work, pack=pack, max_in_flight=0, max_retries=max_retries, max_failures=max_failures,
                   planned=n, say=lambda msg: None, lock=lock, **kw)
    d.start([Job(r, (r, None, r, ""), f"run {r}") for r in range(n)])
    return d, ex, work


def test_every_run_is_packed_and_taken_in_once(tmp_path):
    d, ex, work = dispatch(tmp_path, 10, trainer(), pack=4)
    d.run()
    assert sorted(work.accepted) == list(range(10)) and not d.failed and d.retried == 0
    assert [runs for _, runs in ex.calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_run_that_kills_its_worker_does_not_spend_its_pack_mates_retries(tmp_path):
    d, ex, work = dispatch(tmp_path, 8, trainer(kills={2}), pack=4, max_retries=1)
    d.run()
    # its pack-mates were charged one attempt each (any of them may have been the cause), then retried
    # alone and succeeded; the killer was retried alone, killed that worker too, and failed
    assert d.failed == [2] and sorted(work.accepted) == [0, 1, 3, 4, 5, 6, 7]
    assert [runs for runs in (r for _, r in ex.calls) if 2 in runs] == [[0, 1, 2, 3], [2]]
    assert all(len(runs) == 1 for _, runs in ex.calls[2:] if set(runs) & {0, 1, 2, 3})
    reason = first_reason(work.failure_path(2))
    assert "its worker died 2 times (the last on in-process); [resources] max_retries = 1" == reason
    assert len([s for s in ex.slots if s.dead]) == 2 and len(ex.live()) == 2  # each dead worker was replaced


def test_a_run_that_keeps_killing_workers_fails_after_max_retries(tmp_path):
    d, ex, work = dispatch(tmp_path, 3, trainer(kills={1}), pack=1, workers=1, max_retries=3)
    d.run()
    assert d.failed == [1] and sorted(work.accepted) == [0, 2]
    assert [runs for _, runs in ex.calls].count([1]) == 4  # the first try and max_retries = 3 retries
    # run 2, in flight on the first dead worker too, was charged once and succeeded on its retry
    assert d.attempts == {1: 4, 2: 1} and d.retried == 5
    assert "its worker died 4 times" in first_reason(work.failure_path(1))


def test_the_failure_budget_stops_the_dispatch(tmp_path):
    d, ex, work = dispatch(tmp_path, 40, trainer(fails=set(range(40))), pack=1, max_failures=0.1)
    with pytest.raises(CampaignError, match=re.escape(
            "5 runs failed in this session, more than the failure budget ([resources] max_failures = 0.1, i.e. "
            "4 runs); stopped. Reasons are in ") + r".*\(first: RuntimeError: run 0 fails\)\. Fix the cause, "
            r"then: try again"):
        d.run()
    assert len(ex.calls) < 40 and not work.accepted
    # within the budget, failed runs are recorded and the others taken in
    d, _, work = dispatch(tmp_path / "b", 40, trainer(fails={3, 17}), pack=1, max_failures=3)
    d.run()
    assert d.failed == [3, 17] and len(work.accepted) == 38


def test_an_exception_in_the_worker_code_fails_each_run_of_the_call_and_storage_trouble_stops(tmp_path):
    def broken(calls):
        raise ValueError("the worker's own code raised")

    d, _, work = dispatch(tmp_path, 4, broken, pack=2)
    d.run()
    assert sorted(d.failed) == [0, 1, 2, 3] and first_reason(work.failure_path(0)).startswith("ValueError: the")

    def full_disk(calls):
        return [RunFailure(c[0], "StorageError: No space left on device", "", "node-1", fatal=True) for c in calls]

    d, _, _ = dispatch(tmp_path / "b", 4, full_disk)
    with pytest.raises(CampaignError, match=r"run 0 could not be stored on node-1: StorageError: No space left "
                                            r"on device\. Nothing half-written is visible; fix the cause, then: try"):
        d.run()


def second_driver(path, stale_seconds):
    """What a second command that wants the lock finds: refused, or the lock taken over."""
    try:
        other = DriverLock(path, stale_seconds=stale_seconds)
        other.acquire()
    except LockedError:
        return "refused"
    other.held = False  # leave the file to its first holder
    return other.note


def test_the_dispatcher_heartbeats_its_lock(tmp_path):
    """A lock is stale after stale_seconds without a heartbeat: with it made tiny, a second driver that
    comes long after that, while the dispatch still runs, is refused."""
    lock = DriverLock(tmp_path / "driver.lock", stale_seconds=0.3)
    lock.acquire()
    seen = []

    def each(run):
        if run == 30:  # 0.6 s after the start: twice the stale age
            seen.append(second_driver(lock.path, 0.3))

    d, _, work = dispatch(tmp_path, 40, trainer(sleep=0.02, each=each), pack=1, lock=lock)
    d.run()
    assert seen == ["refused"] and len(work.accepted) == 40
    lock.release()


# --- `longtail utility` through the same Dispatcher -------------------------------------------------

UTILITY_SPEC = """
[campaign]
name = "dispatch"
seed = 3
runs = 4
[dataset]
name = "fault_plugins:blobs"
n_train = 40
n_test = 20
[model]
name = "mlp"
[train]
trainer = "fault_plugins:knn"
[resources]
pack = 4
max_retries = 1
max_failures = 100
"""


@pytest.fixture
def follow_ups(tmp_path):
    """A campaign (not trained: the utility's runs need only its spec and data), and its follow-up runs
    (3 conditions x `reps`)."""
    from orchestrator.features import utility

    c = create_or_open(specs.loads(UTILITY_SPEC, "s.toml"), tmp_path / "c")
    mem = np.zeros(c.n_train)
    mem[:5] = 0.9
    conds = utility.conditions(mem, [0.5], None)
    runs_dir = c.paths.utility.runs_dir
    runs_dir.mkdir(parents=True)
    return c, lambda reps: utility.follow_up_runs(conds, reps, c.plan.campaign_seed, c.n_train, c.paths.utility)


def train_follow_ups(c, todo, run_many, lock):
    """`longtail utility`'s own training step, on workers in this process."""
    from orchestrator.features import utility

    report = utility.UtilityReport(rows=[], info={})
    outcomes: dict = {}
    executor = InProcessExecutor(run_many, workers=2)
    utility._train(c, todo, len(todo), None, False, np.zeros(0, np.int64), outcomes, report, lock, executor)
    return report, outcomes, executor


def in_process_worker(c):
    from workers.results import WorkerConfig
    from workers.worker import RunWorker

    return RunWorker(WorkerConfig(c.spec.to_dict(), c.name, c.spec.result_hash(), c.fingerprint))


def test_utility_does_not_spend_pack_mates_retries_on_a_run_that_kills_its_worker(follow_ups):
    c, runs = follow_ups
    todo = runs(3)[:8]
    worker, killer = in_process_worker(c), todo[1]

    def run_many(calls):
        if any(call[0] == killer.run_id for call in calls):
            raise WorkerDied
        return worker.run_many(calls)

    lock = DriverLock(c.paths.utility.lock)
    with lock:
        report, outcomes, executor = train_follow_ups(c, todo, run_many, lock)
    assert report.failed == [killer.name] and report.trained == len(todo) - 1
    assert sum(len(v) for v in outcomes.values()) == len(todo) - 1
    record = first_reason(c.paths.utility.failure(killer.name))
    assert "its worker died 2 times" in record and "max_retries = 1" in record
    # the first call held four runs ([resources] pack = 4); after its worker died each ran alone
    assert len(executor.calls[0][1]) == 4
    retried = {todo[i].run_id for i in range(4)}
    assert all(len(runs) == 1 for _, runs in executor.calls[1:] if set(runs) & retried)


def test_utility_heartbeats_its_lock(follow_ups):
    """Issue 10: a second `longtail utility` started after the lock's stale age, while the first still
    trains, is refused (the stale age made tiny here; 600 s in use)."""
    c, runs = follow_ups
    todo = runs(8)  # 24 runs: 6 calls of 4
    worker, seen, start = in_process_worker(c), [], time.monotonic()
    lock = DriverLock(c.paths.utility.lock, stale_seconds=0.3)

    def run_many(calls):
        time.sleep(0.1)  # a slow model: the whole dispatch takes 0.6 s, twice the stale age
        if time.monotonic() - start > 0.4 and not seen:
            seen.append(second_driver(lock.path, 0.3))
        return worker.run_many(calls)

    with lock:
        report, _, _ = train_follow_ups(c, todo, run_many, lock)
    assert seen == ["refused"] and report.trained == len(todo) and not report.failed
