"""An embedded campaign as a Ray job: `longtail run` without --address.

The Ray dashboard shows a driver's log only for jobs submitted through the job API ("Driver logs
are only available when submitting jobs via the Job Submission API"), so an embedded campaign does
what a submitted one does: this process starts a local head (without connecting to it as a driver,
so that the Jobs page lists one job, the campaign's), submits `longtail resume DIR` to it as a job,
and prints the job's log here as it grows. The campaign's progress lines are then on the terminal
and on the dashboard's job page alike. Ctrl-C (or SIGTERM) stops the job, which saves the fold as
an interrupted in-process run does; the head goes down with this process.
"""

from __future__ import annotations

import os
import logging
import queue
import re
import shlex
import socket
import sys
import threading
import time

from workers.errors import LongtailError

from cluster import dashboard
from orchestrator.campaign import Campaign

INTERRUPTED = 130
STARTED_AT = "LONGTAIL_STARTED_AT"  # the embedding command's start (time.time()), for the job's "in all"


def wanted(address: str | None) -> bool:
    """True where a campaign would start its own Ray: no address, not inside a Ray job, and no Ray
    already initialized in this process (tests that share one Ray session keep running in-process)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    return not (ray is not None and ray.is_initialized())


def start_head(num_cpus: int | None, dashboard_host: str, dashboard_port: int):
    """Start the embedded head the way ray.init() does (token authentication on by default, the token
    written to ~/.ray/auth_token if there is none), but without joining it as a driver."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    from cluster.connect import quiet_token_auth

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_token_auth()  # Ray's default (token on), without its warning on every command
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    params = RayParams(num_cpus=num_cpus, include_dashboard=True, dashboard_host=dashboard_host,
                       dashboard_port=dashboard_port, dashboard_agent_listen_port=_agent_port())
    # shutdown_at_exit: the head's processes end with this one; the reaper covers a SIGKILL
    return Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)


def _agent_port(default: int = 52365) -> int:
    """The dashboard sends job submissions to the job agent on this port. Ray's default (52365) taken by
    another Ray on this machine sends them to that Ray's agent, so that the campaign would run on the
    other cluster (measured): take a free port then."""
    with socket.socket() as s:
        try:  # the agent listens on loopback and the node's address: test the wildcard, which clashes with both
            s.bind(("", default))
            return default
        except OSError:
            s.bind(("", 0))
            return s.getsockname()[1]


DEFAULT_DASHBOARD_PORT = 8265


def free_dashboard_port(host: str, port: int, say) -> int:
    """The dashboard's port: the one asked for when it is free; Ray's default taken (another campaign or
    another Ray on this machine) gives a free one instead, said aloud; another port taken is a user error."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            if port != DEFAULT_DASHBOARD_PORT:
                raise LongtailError(
                    f"--dashboard-port {port}: expected a free port on {host}, found it in use; pick another "
                    f"(or leave the option out: a free port is then chosen)") from None
    with socket.socket() as s:
        s.bind((host, 0))
        free = s.getsockname()[1]
    say(f"port {port} is in use (another Ray on this machine?): the dashboard gets port {free}")
    return free


def entrypoint(campaign: Campaign, progress: bool, top: int, gcs_address: str) -> str:
    """The job's command: resume the (already created) campaign with this interpreter, from this
    directory, so that relative paths and the user's plug-ins resolve as they would here.

    It names the head's address itself: Ray's job supervisor gives the driver the cluster recorded in
    <temp dir>/ray_current_cluster, which only `ray start` writes, or else *any* Ray found running on
    the machine (measured: with another Ray on the machine the campaign's driver joined that one)."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "resume", str(campaign.paths.root), "--top", str(top),
           "--progress" if progress else "--no-progress"]
    return (f"cd {shlex.quote(os.getcwd())} && RAY_ADDRESS={shlex.quote(gcs_address)} exec "
            + " ".join(shlex.quote(c) for c in cmd))


def run_as_job(campaign: Campaign, progress: bool, top: int, dashboard_host: str, dashboard_port: int,
               say, started_at: float | None = None) -> int:
    """Run the campaign as a job on an embedded head; returns the exit status of its driver.
    started_at: when the command began (time.time()), so that the job's "in all" is the command's."""
    started_at = time.time() if started_at is None else started_at
    from cluster import jobs
    from cluster.connect import warn_if_exposed

    warn_if_exposed(dashboard_host, say)
    node = start_head(campaign.spec.resources.local_cpus or None, dashboard_host, dashboard_port)
    try:
        url = f"http://{node.webui_url}"
        path = os.pathsep.join(dict.fromkeys([os.getcwd()] + [p for p in sys.path if p]))
        submission_id = jobs.submit_entrypoint(
            url, entrypoint(campaign, progress, top, node.gcs_address), f"longtail-{campaign.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            env={"PYTHONPATH": path, STARTED_AT: repr(started_at)},
            metadata={"longtail_campaign": campaign.name, "longtail_out": str(campaign.paths.root)})
        for line in dashboard.where_to_look(url, submission_id, campaign.name):
            say(line)
        code = follow(url, submission_id, say)
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)
    # the job's "in all" was printed before the head went down: the whole command, said last
    say(f"{time.time() - started_at:.1f} s in all for this command, the embedded Ray head's start and shutdown "
        f"included")
    return code


def follow(url: str, submission_id: str, say, stop_wait: float = 120.0) -> int:
    """Print the job's log (stdout and stderr of its driver, merged: on stderr, where the driver's
    messages go in-process) until it ends; on Ctrl-C stop the job (its driver saves the fold) and go
    on printing until it has ended. Returns the driver's exit status.

    The log is read in a thread: a Ctrl-C that lands inside the job client's asyncio stream would
    leave it half-consumed (and Python prints a traceback when it collects it)."""
    from cluster import jobs

    # the job client logs "WebSocket closed ..." at INFO when the log ends: noise on a user's terminal
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    chunks: queue.Queue = queue.Queue()

    def pump():
        try:
            for chunk in jobs.follow(url, submission_id):
                chunks.put(chunk)
        except Exception as e:  # noqa: BLE001 - handed to the main thread, which raises it
            chunks.put(e)
        chunks.put(None)

    threading.Thread(target=pump, name="job-log", daemon=True).start()
    interrupted, deadline = False, float("inf")
    while time.monotonic() < deadline:
        try:
            item = chunks.get(timeout=1.0)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted, deadline = True, time.monotonic() + stop_wait
            say(f"stopping job {submission_id}: the campaign saves what it folded (Ctrl-C again to quit at once)")
            jobs.stop_nowait(url, submission_id)
            continue
        if item is None:
            break
        if isinstance(item, Exception):
            raise item
        sys.stderr.write(_without_ray_chatter(item))
        sys.stderr.flush()
    info = jobs.info(url, submission_id)
    code = getattr(info, "driver_exit_code", None)
    if interrupted or _status(info) == "STOPPED":  # stopped here, by `ray job stop` or on the dashboard
        return INTERRUPTED
    if code is None:
        return 0 if _status(info) == "SUCCEEDED" else 1
    return int(code)


# Ray's job manager writes its own INFO lines into the job's log ("Runtime env is setting up."): not the
# campaign's, and on the terminal they read as if longtail logged them. The dashboard keeps them.
_RAY_INFO = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+INFO \w+\.py:\d+ -- ")


def _without_ray_chatter(chunk: str) -> str:
    return "".join(line for line in chunk.splitlines(keepends=True) if not _RAY_INFO.match(line))


def _status(info) -> str:
    return str(getattr(info.status, "value", info.status))
