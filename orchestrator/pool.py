"""The campaign's workers on Ray: long-lived actors, replaced when they die, added when nodes join.

Actors are created without Ray's own restarts or task retries: when one dies (its process killed,
its node gone), every run it held comes back to the driver as an error, is put back at the front of
the queue and retried on another worker, at most `max_retries` times, and a replacement actor is
started wherever Ray finds room. A run is therefore retried exactly when, and as often as, the
driver decides, and the decision is visible in its log.

WorkerPool is the dispatcher's executor on Ray (orchestrator/dispatch.py's Executor): it submits a call
of runs to an actor, waits for the next call to finish, and turns a dead actor into a worker death and
an exception in the worker's own code into a RunFailure per run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import time

from workers.results import RunFailure, WorkerConfig, WorkerResult, failure_reason
from workers.storage import atomic_write_text

from orchestrator.campaign import Campaign, CampaignError
from orchestrator.dispatch import Slot
from orchestrator.paths import probe

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in a Ray traceback; failure records keep plain text


def runs_per_call(spec) -> int:
    """[resources] pack, or its automatic value: 16 runs per call where workers train them together in
    one vectorized step (MLPs the ensemble trainer reproduces exactly), else one."""
    from workers.models import ensemble_options

    if spec.resources.devices_per_run > 1:
        return 1  # one data-parallel run at a time per coordinator
    if spec.resources.pack:
        return spec.resources.pack
    packable = not spec.train.trainer and ensemble_options(spec.model.as_dict(), spec.to_dict()["train"]) is not None
    if packable:
        return 16
    from workers.models import convnet_pack  # built-in convnets: packed on GPU workers (workers/packed.py)

    d = spec.to_dict()
    return convnet_pack(d["model"], d["train"], d["resources"]) or 1


# Constructor failures tolerated (a bad node, a transient error) before the campaign is stopped.
MAX_START_FAILURES = 3


@contextlib.contextmanager
def ray_workers(campaign: Campaign, address: str | None, probe_dir, say, dashboard_host: str = "127.0.0.1"):
    """Ray (joined at `address`, or started here) and an empty WorkerPool whose workers check that they see
    the campaign directory by reading a probe file in `probe_dir`; yields (pool, dashboard URL). On exit
    every worker is stopped, the probe removed, and Ray shut down if it was started here."""
    from cluster.connect import ray_init

    ray, owned, url = ray_init(address, campaign.spec.resources.local_cpus, dashboard_host)
    probe_file = probe(probe_dir)
    try:
        atomic_write_text(probe_file, "a worker that can read this file sees the campaign directory\n")
        pool = WorkerPool(ray, campaign, say, str(probe_file))
        try:
            yield pool, url
        finally:
            pool.shutdown()
    finally:
        probe_file.unlink(missing_ok=True)
        if owned:
            ray.shutdown()


class WorkerPool:
    def __init__(self, ray, campaign: Campaign, say, probe: str = ""):
        from workers.dataparallel import DataParallelWorker
        from workers.worker import RunWorker

        self.ray = ray
        self.c = campaign
        self.say = say
        self.res = campaign.spec.resources
        # runs over several devices are coordinated by a resource-free actor; Ray Train holds the devices
        self.data_parallel = self.res.devices_per_run > 1
        self.actor_cls = ray.remote(DataParallelWorker if self.data_parallel else RunWorker)
        res = self.res
        self.config = WorkerConfig(campaign.spec.to_dict(), campaign.name, campaign.spec.result_hash(),
                                   campaign.fingerprint, threads=max(1, int(res.cpus_per_worker)),
                                   use_gpu=res.gpus_per_worker > 0, probe=probe, ship=res.ship_shards)
        self.slots: list[Slot] = []
        self.probe = probe
        self.indirect_hosts: set[str] = set()
        self.start_failures: list[str] = []
        self._ids = itertools.count()

    # --- size -------------------------------------------------------------------------------------

    def fit(self) -> int:
        """How many workers the cluster's current resources hold ([resources] workers, or as many as fit)."""
        res = self.res
        total = self.ray.cluster_resources()
        # the live fold's actors ([resources] fold_actors) hold one CPU each, not available to workers
        cpus = total.get("CPU", 0) - res.fold_actors
        fit = int(max(cpus, 0) // res.cpus_per_worker) if res.cpus_per_worker else 1
        if res.gpus_per_worker:
            gpus = total.get("GPU", 0)
            if gpus == 0:
                raise CampaignError(f"[resources] gpus_per_worker = {res.gpus_per_worker} but the cluster has no "
                                    f"GPU; set gpus_per_worker = 0 to train on CPUs")
            fit = min(fit, int(gpus // res.gpus_per_worker))
        if self.data_parallel:  # a "worker" is then one run's worth of devices
            fit //= res.devices_per_run
        if fit == 0:
            raise CampaignError(f"the cluster ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs) cannot fit "
                                f"one run of {res.devices_per_run} x ({res.cpus_per_worker:g} CPUs, "
                                f"{res.gpus_per_worker:g} GPUs)"
                                + (f" beside its {res.fold_actors} fold actors" if res.fold_actors else "")
                                + "; lower [resources]")
        return res.workers or fit

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.dead]

    def ready(self) -> list[Slot]:
        return [s for s in self.slots if not s.dead and s.ping is None]

    def grow_to(self, target: int) -> int:
        """Start actors until `target` are alive (starting or ready); returns how many were started."""
        started = 0
        while len(self.live()) < target:
            k = next(self._ids)
            name = f"longtail:{self.c.name}:worker-{k}"
            cpus, gpus = (0, 0) if self.data_parallel else (self.res.cpus_per_worker, self.res.gpus_per_worker)
            actor = self.actor_cls.options(
                name=name, num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
            ).remote(self.config)
            self.slots.append(Slot(actor=actor, name=name, ping=actor.ping.remote()))
            started += 1
        return started

    # --- calls ------------------------------------------------------------------------------------

    def submit(self, slot: Slot, calls: list[tuple], name: str):
        """One call of `calls` on `slot`'s actor; `name` is the call's row in the dashboard's task table."""
        return slot.actor.run_many.options(name=name).remote(calls)

    def finished(self, handles: list, timeout: float) -> list:
        """Every call that has ended now; if none has, wait (at most `timeout`) for the first."""
        done, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
        if not done:
            done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def results(self, handle, runs: list[int]) -> list[WorkerResult | RunFailure] | None:
        """The call's results, one per run; None when its actor died (killed, its node gone)."""
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        try:
            return self.ray.get(handle)
        except (RayActorError, WorkerCrashedError):
            return None
        except RayTaskError as e:  # the worker code itself raised (run_many() returns failures as data)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            detail = _ANSI.sub("", getattr(e, "traceback_str", "") or str(e))
            return [RunFailure(run, failure_reason(cause), detail) for run in runs]

    # --- life cycle -------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> None:
        """Move actors whose start-up finished to ready; drop (and report) those that failed to start."""
        starting = {s.ping: s for s in self.slots if not s.dead and s.ping is not None}
        if not starting:
            return
        done, _ = self.ray.wait(list(starting), num_returns=len(starting), timeout=timeout)
        for ref in done:
            slot = starting[ref]
            try:
                slot.info = self.ray.get(ref)
                slot.ping = None
                host = slot.info.get("host", "?")
                if not slot.info.get("direct", True) and host not in self.indirect_hosts:
                    self.indirect_hosts.add(host)
                    if self.res.ship_shards == "auto":
                        self.say(f"workers on {host} cannot see {self.c.paths.root}: their shards travel through "
                                 f"Ray's object store and the driver writes them")
            except Exception as e:  # its constructor failed (no dataset on that node, an import error, ...)
                cause = getattr(e, "cause", None) or e
                why = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
                self.kill(slot)
                self.start_failures.append(why)
                starting_left = any(not s.dead and s.ping is not None for s in self.slots)
                if len(self.start_failures) >= MAX_START_FAILURES or not (self.ready() or starting_left):
                    raise CampaignError(f"the workers could not start: {why}") from None
                self.say(f"a worker could not start ({why}); replacing it")

    def wait_ready(self) -> None:
        """Block until at least one worker is ready (the first start imports torch and loads the data)."""
        while not self.ready():
            self.poll(timeout=1.0)

    def kill(self, slot: Slot) -> None:
        slot.dead = True
        try:
            self.ray.kill(slot.actor)
        except Exception:  # already gone
            pass

    def shutdown(self, wait_seconds: float = 10.0) -> None:
        """Kill every live worker and wait (bounded) until each is gone: ray.kill returns before the process
        has died, and a worker still writing could leave a temporary shard after the driver swept them."""
        killed = [slot for slot in self.slots if not slot.dead]
        for slot in killed:
            self.kill(slot)
        deadline = time.monotonic() + wait_seconds
        for slot in killed:
            try:  # a call queued behind the kill fails once the actor is dead
                self.ray.get(slot.actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # RayActorError (dead, as wanted) or a time-out: nothing more to wait for
                pass
        # Ray may call an actor dead before its process has stopped (seen under load: a killed worker's
        # temporary shard appeared after the sweep); on this machine, wait for the processes themselves
        for slot in self.slots:
            if slot.info.get("host") == socket.gethostname() and slot.info.get("pid"):
                while _running(int(slot.info["pid"])) and time.monotonic() < deadline:
                    time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has stopped: it writes nothing more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:  # no /proc (not Linux): fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
