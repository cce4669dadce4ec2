"""The one dispatcher: every command that trains runs hands them to a Dispatcher.

The Dispatcher keeps a bounded number of calls in flight on the workers, packs runs into calls,
retries a run whose worker died (`[resources] max_retries`; after a death each charged run is retried
alone, so that a run that keeps killing workers uses up its own attempts and not its pack-mates'),
records failures within a failure budget (`[resources] max_failures`), replaces dead workers, starts
more when the cluster grows, heartbeats the command's lock, and updates its progress bar. What to do
with a finished run is the command's, a `Work`: the campaign verifies and folds its shard
(orchestrator/driver.py), `longtail utility` reads its outcome (orchestrator/features/utility.py).

Workers are reached through an executor: orchestrator/pool.py's WorkerPool on Ray, or
InProcessExecutor below, which runs a Python callable per call in this process (like submitit's
DebugExecutor) and can play a worker's death, so that retry, isolation, budget and heartbeat are
tested in milliseconds without Ray (tests/test_dispatch.py).
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol

from workers.results import RunFailure, WorkerResult

from orchestrator.campaign import CampaignError
from orchestrator.failures import failure_limit, first_reason

# seconds between two looks at whether the cluster holds more workers (nodes that joined get work too)
RESIZE_SECONDS = 2.0


@dataclass(frozen=True)
class Job:
    """One run to train."""

    key: Hashable  # what retries and failures are counted by: a run index, a follow-up run's name
    call: tuple  # the worker's arguments: (run number, packed mask, seed, shard path)
    label: str  # how messages name it: "run 5", "follow-up run full-r0"
    item: object = None  # the command's own description of the run, for its Work


@dataclass(eq=False)
class Slot:
    """One worker as the dispatcher sees it."""

    actor: object  # the executor's handle on the worker (a Ray actor)
    name: str
    ping: object | None  # the executor's start-up probe, None once the worker is ready
    load: int = 0  # calls in flight on it
    dead: bool = False
    isolated: bool = False  # running a run whose earlier worker died, alone, to find out if it is the cause
    info: dict = field(default_factory=dict)  # what the worker said about itself at start-up (its host)


class Executor(Protocol):
    """How the dispatcher reaches workers (orchestrator/pool.py WorkerPool; InProcessExecutor)."""

    def fit(self) -> int: ...  # how many workers the cluster holds now

    def grow_to(self, target: int) -> int: ...  # start workers until `target` live; returns how many started

    def wait_ready(self) -> None: ...  # until at least one worker is ready

    def poll(self) -> None: ...  # take in workers whose start-up finished

    def live(self) -> list[Slot]: ...

    def ready(self) -> list[Slot]: ...

    def submit(self, slot: Slot, calls: list[tuple], name: str) -> Hashable: ...  # one call of run_many

    def finished(self, handles: list, timeout: float) -> list: ...  # handles whose call has ended

    # a call's per-run results, or None: its worker died (every run it held comes back)
    def results(self, handle, runs: list[int]) -> list[WorkerResult | RunFailure] | None: ...

    def kill(self, slot: Slot) -> None: ...


class Work:
    """What a command tells the Dispatcher about its runs; subclass it and override what differs."""

    error: type = CampaignError  # the errors the dispatcher raises for this command
    noun = "run"  # "3 runs failed in this session, ..."
    no_worker = "no worker is left to train the runs; see the messages above"
    stopped = "stopped"  # what the failure budget's message says happened
    failed_dir: object = None  # where the failure records are (named in messages)
    resume = ""  # what to run once the cause is fixed

    def accept(self, job: Job, result: WorkerResult) -> str | None:
        """Take in a run that trained; None, or why it failed after all (its shard failed verification)."""
        raise NotImplementedError

    def record(self, job: Job, reason: str, detail: str, host: str, attempts: int | None) -> None:
        """Write the failure record of `job`."""
        raise NotImplementedError

    def failure_path(self, key: Hashable):
        """The failure record of the run `key`."""
        raise NotImplementedError

    def task_name(self, jobs: list[Job]) -> str:
        """A call's name in the Ray dashboard's task table."""
        return "longtail"

    def sweep(self, job: Job) -> list:
        """Remove what a dead worker left of `job` (a temporary shard); returns what was removed."""
        return []

    def finished(self) -> int:
        """Runs done so far, those done before this session included (for the progress bar)."""
        return 0

    def tick(self, dispatcher: "Dispatcher") -> None:
        """Called once a loop, after the results: checkpoints, metrics, adaptive stopping."""


class Dispatcher:
    def __init__(self, executor: Executor, work: Work, *, pack: int, max_in_flight: int, max_retries: int,
                 max_failures: float, planned: int, say: Callable[[str], None], lock=None,
                 heartbeat_seconds: float | None = None, failed: list | None = None):
        self.executor, self.work, self.say = executor, work, say
        self.pack = max(1, pack)
        self.max_in_flight = max_in_flight  # runs; 0 = two calls per worker
        self.max_retries = max_retries
        self.max_failures = max_failures
        self.limit = failure_limit(max_failures, planned)
        self.lock = lock
        if heartbeat_seconds is None:  # well inside the time after which another command takes the lock over
            heartbeat_seconds = min(60.0, lock.stale_seconds / 10) if lock is not None else math.inf
        self.heartbeat_seconds = heartbeat_seconds
        self.failed = failed if failed is not None else []  # keys of the runs that failed in this session
        self.retried = 0  # runs put back in the queue after their worker died
        self.attempts: dict[Hashable, int] = {}  # worker deaths per run
        self.queue: deque[Job] = deque()
        self.in_flight: dict = {}  # handle -> (jobs, slot)

    # --- the loop ---------------------------------------------------------------------------------

    def start(self, jobs: list[Job]) -> int:
        """Queue `jobs`, start as many workers as fit (at most one per job) and wait until one is ready;
        returns how many workers live."""
        self.queue.extend(jobs)
        ex = self.executor
        ex.grow_to(min(ex.fit(), len(self.queue)))
        ex.wait_ready()
        return len(ex.live())

    def run(self, progress=None) -> None:
        """Train every queued job (or until stop_dispatching); raises the Work's error when the failure
        budget is spent, a run cannot be stored, or no worker is left."""
        ex = self.executor
        last_resize = last_beat = time.monotonic()
        try:
            while self.queue or self.in_flight:
                ex.poll()
                self._fill()
                if not self.in_flight and not ex.live():
                    raise self.work.error(self.work.no_worker)
                # every call that has ended (not one per loop): the per-loop work below is then paid once
                for handle in ex.finished(list(self.in_flight), timeout=1.0) if self.in_flight else []:
                    self._take(handle)
                    self._check_budget()
                self._check_budget()
                if progress is not None:
                    progress.update(self.work.finished(), len(self.failed), self.running(), retried=self.retried)
                self.work.tick(self)
                now = time.monotonic()
                if now - last_resize >= RESIZE_SECONDS and self.queue:
                    started = ex.grow_to(min(ex.fit(), len(ex.live()) + len(self.queue)))
                    if started:
                        self.say(f"starting {started} more workers: the cluster has room for them")
                    last_resize = now
                if self.lock is not None and now - last_beat >= self.heartbeat_seconds:
                    self.lock.heartbeat()  # the lock stays ours while this command runs
                    last_beat = now
        finally:
            if progress is not None:
                progress.close()

    def running(self) -> int:
        return sum(len(jobs) for jobs, _ in self.in_flight.values())

    def stop_dispatching(self) -> None:
        """Dispatch nothing more; the runs in flight finish and are taken in."""
        self.queue.clear()

    def fail(self, job: Job, reason: str, detail: str = "", host: str = "", attempts: int | None = None) -> None:
        """Record that `job` failed in this session (it counts against the failure budget)."""
        self.work.record(job, reason, detail, host, attempts)
        self.failed.append(job.key)

    # --- one step ---------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Give every ready worker calls, up to its share of max_in_flight."""
        ready = self.executor.ready()
        wanted = self.max_in_flight // self.pack if self.max_in_flight else 2 * len(ready)
        calls = max(1, wanted // max(1, len(ready)))  # calls in flight per worker
        for slot in ready:
            while self.queue and slot.load < calls and not slot.isolated:
                if self.queue[0].key in self.attempts:  # a suspect runs alone: if its worker dies, it is the cause
                    if slot.load:
                        break
                    slot.isolated = True
                    group = [self.queue.popleft()]
                    # its dead worker may have left a temporary shard: nobody writes it any more
                    for p in self.work.sweep(group[0]):
                        self.say(f"removed the temporary shard of {group[0].label} that its dead worker left: {p}")
                else:
                    group = []
                    while self.queue and len(group) < self.pack and self.queue[0].key not in self.attempts:
                        group.append(self.queue.popleft())
                handle = self.executor.submit(slot, [job.call for job in group], self.work.task_name(group))
                self.in_flight[handle] = (group, slot)
                slot.load += 1

    def _take(self, handle) -> None:
        """One finished call: each of its runs is taken in, recorded as failed, or retried (worker died)."""
        group, slot = self.in_flight.pop(handle)
        slot.load -= 1
        slot.isolated = False
        results = self.executor.results(handle, [job.call[0] for job in group])
        if results is not None and not any(r.failed for r in results):
            # its worker is alive and every run trained: give it its next call before this call's runs are
            # verified and folded (milliseconds each), so that it never waits for the driver. After a death
            # or a failure nothing is dispatched until the runs are handled (retries, budget) as before.
            self._fill()
        for job, result in zip(group, results if results is not None else [None] * len(group)):
            if result is None:
                self._worker_died(slot, job)
            elif result.failed:
                if result.fatal:
                    raise self.work.error(
                        f"{job.label} could not be stored on {result.host}: {result.reason}. Nothing half-written "
                        f"is visible; fix the cause, then: {self.work.resume}")
                self.fail(job, result.reason, result.traceback, result.host)
            else:
                why = self.work.accept(job, result)
                if why is not None:
                    self.fail(job, why, host=result.host)

    def _worker_died(self, slot: Slot, job: Job) -> None:
        """Retry the run elsewhere (bounded), and replace the worker once.

        Every run the dead worker held is charged one attempt, since any of them may have killed it; a
        charged run is retried alone on an idle worker, so that a run that keeps killing workers uses up
        its attempts while the runs that merely shared its worker succeed on their retry."""
        limit = self.max_retries
        tries = self.attempts[job.key] = self.attempts.get(job.key, 0) + 1
        self.retried += 1
        if tries > limit:
            self.fail(job, f"its worker died {tries} times (the last on {slot.info.get('host')}); "
                           f"[resources] max_retries = {limit}", attempts=tries)
        else:
            self.queue.appendleft(job)
        if not slot.dead:
            self.executor.kill(slot)
            self.say(f"worker {slot.name} on {slot.info.get('host', '?')} died; {job.label} goes back in the queue "
                     f"(attempt {tries} of {limit + 1}); starting a replacement")
            self.executor.grow_to(len(self.executor.live()) + 1)

    def _check_budget(self) -> None:
        if len(self.failed) > self.limit:
            w = self.work
            raise w.error(
                f"{len(self.failed)} {w.noun}s failed in this session, more than the failure budget ([resources] "
                f"max_failures = {self.max_failures:g}, i.e. {self.limit} {w.noun}s); {w.stopped}. Reasons are in "
                f"{w.failed_dir}/ (first: {first_reason(w.failure_path(self.failed[0]))}). Fix the cause, "
                f"then: {w.resume}")


# --- workers in this process ----------------------------------------------------------------------


class WorkerDied(Exception):
    """Raised by an InProcessExecutor's callable to play the death of the worker running the call."""


class InProcessExecutor:
    """Workers in this process, for tests and debugging: `run_many(calls)` plays a worker's run_many
    (a list of (run, packed mask, seed, shard path) -> a WorkerResult or RunFailure each). A call runs
    when the dispatcher waits for it, in the order calls were submitted. If it raises WorkerDied, its
    worker is dead: that call and every other call on the same worker come back as a worker death; any
    other exception fails each run of the call, as an exception in a Ray worker's code does.

    `calls` records every call as (worker name, runs), in submission order."""

    def __init__(self, run_many: Callable[[list[tuple]], list], workers: int = 2):
        self.run_many = run_many
        self.workers = workers
        self.slots: list[Slot] = []
        self.calls: list[tuple[str, list[int]]] = []
        self._pending: dict[int, tuple[Slot, list[tuple]]] = {}
        self._done: dict[int, list | None] = {}
        self._crashed: set[str] = set()
        self._ids = itertools.count()
        self._handles = itertools.count()

    def fit(self) -> int:
        return self.workers

    def grow_to(self, target: int) -> int:
        started = 0
        while len(self.live()) < target:
            self.slots.append(Slot(actor=None, name=f"in-process-{next(self._ids)}", ping=None,
                                   info={"host": "in-process"}))
            started += 1
        return started

    def wait_ready(self) -> None:
        pass

    def poll(self) -> None:
        pass

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.dead]

    def ready(self) -> list[Slot]:
        return self.live()

    def submit(self, slot: Slot, calls: list[tuple], name: str) -> int:
        handle = next(self._handles)
        self._pending[handle] = (slot, list(calls))
        self.calls.append((slot.name, [c[0] for c in calls]))
        return handle

    def finished(self, handles: list, timeout: float) -> list:
        handle = min(handles)
        slot, calls = self._pending.pop(handle)
        if slot.dead or slot.name in self._crashed:
            self._done[handle] = None
            return [handle]
        try:
            self._done[handle] = list(self.run_many(calls))
        except WorkerDied:
            self._crashed.add(slot.name)
            self._done[handle] = None
        except Exception as e:
            detail = traceback.format_exc()
            self._done[handle] = [RunFailure.of(c[0], e, detail, slot.info["host"]) for c in calls]
        return [handle]

    def results(self, handle, runs: list[int]) -> list | None:
        return self._done.pop(handle)

    def kill(self, slot: Slot) -> None:
        slot.dead = True
