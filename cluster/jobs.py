"""A campaign as a Ray job on a real cluster: submit, status, logs, stop.

`submit` stages the resolved spec (and the user's plug-in modules) in a working directory that
Ray's job API uploads with the job; the job's entrypoint is `longtail run campaign.toml --out DIR`
on the head node, so the driver there is the same driver as on a laptop, and resubmitting after a
stop resumes the same campaign directory under a new submission id (Ray refuses to reuse one).

Ray 2.60 protects the job API with a token only (no TLS, no users): the client sends the token when
RAY_AUTH_MODE=token; `client()` sets that when a token is available, since without it every request
fails with 401 (docs/cluster.md).
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from workers.errors import LongtailError

from orchestrator import spec as specs

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 120.0  # a head under load took over a minute to start its job agent


class JobError(LongtailError, RuntimeError):
    """A job-API call that failed: unreachable address, authentication, unknown submission id."""


def client(address: str):
    from cluster.connect import send_token_if_available

    send_token_if_available()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:
        hint = ""
        if "401" in str(e) or "Authentication" in str(e):
            hint = (" The cluster wants Ray's token: copy the head's ~/.ray/auth_token to this machine (or set "
                    "RAY_AUTH_TOKEN) and set RAY_AUTH_MODE=token.")
        raise JobError(f"cannot reach the Ray job API at {address}: {str(e).splitlines()[0]}.{hint}") from None


def _plugin_paths(spec: specs.Spec) -> list[Path]:
    """Local files or packages of the plug-ins the spec names, to ship with the job."""
    names = [spec.dataset.name, spec.model.name, spec.train.trainer]
    out = []
    for name in names:
        if ":" not in name:
            continue
        top = name.partition(":")[0].split(".")[0]
        found = importlib.util.find_spec(top)
        if found is None or found.origin in (None, "built-in"):
            raise JobError(f"plug-in {name!r}: cannot find module {top!r} here to ship it with the job; run "
                           f"`longtail submit` from the directory that holds it, or install it on the cluster")
        if "site-packages" in (found.origin or ""):
            continue  # installed: the cluster is expected to have it installed as well
        locations = list(found.submodule_search_locations or [])
        out.append(Path(locations[0]) if locations else Path(found.origin))
    return sorted(set(out))


def job_entrypoint(args: str) -> str:
    """A shell command that runs `longtail ARGS` with the first Python on the head that can import longtail:
    its PATH's python3 or python, else this machine's interpreter (the same path on a one-machine cluster or
    on nodes built from one image). A head started as `.venv/bin/ray start --head`, without the venv on its
    PATH, has only a bare python there, which lacks longtail."""
    candidates = " ".join(shlex.quote(p) for p in ("python3", "python", sys.executable))
    # the probe imports what the driver needs (pyarrow, numpy, ray), not only the CLI, whose light imports
    # succeed on a bare python that has click (seen: a head's python3 took the job and lacked pyarrow)
    return (f"for py in {candidates}; do if \"$py\" -c 'import orchestrator.driver, ray' 2>/dev/null; then "
            f"exec \"$py\" -m orchestrator.cli {args}; fi; done; "
            f"echo 'longtail: no Python on the head can import longtail (tried {candidates}); install longtail "
            f"there, or start the head from its virtual environment (docs/cluster.md)' >&2; exit 2")


STAGED_SPEC = "campaign.toml"  # the spec in the job's working directory (a temporary one, not a campaign's)


def submit(spec: specs.Spec, address: str, out: str, extra_modules: list[str] = ()) -> str:
    """Submit the campaign; returns the submission id."""
    c = client(address)
    stage = Path(tempfile.mkdtemp(prefix="longtail-submit-"))
    try:
        (stage / STAGED_SPEC).write_text(specs.dumps(spec))
        for path in _plugin_paths(spec) + [Path(m) for m in extra_modules]:
            target = stage / path.name
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, target)
        submission_id = f"longtail-{spec.campaign.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        entrypoint = job_entrypoint(f"run {STAGED_SPEC} --out {out} --top 10")  # unquoted: ~ expands on the head
        return submit_entrypoint(address, entrypoint, submission_id, working_dir=str(stage),
                                 metadata={"longtail_campaign": spec.campaign.name, "longtail_out": out}, c=c)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def submit_entrypoint(address: str, entrypoint: str, submission_id: str, metadata: dict, env: dict | None = None,
                      working_dir: str | None = None, c=None) -> str:
    """Submit one job, waiting for the job agent of a head that just started; returns the submission id."""
    c = c or client(address)
    runtime_env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **(env or {})}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                metadata=metadata)
        except Exception as e:
            # a head that just started has no job agent yet ("try again later"): wait for it
            if "try again later" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise JobError(f"the cluster at {address} refused the job: {str(e).splitlines()[0]}") from None


def info(address: str, submission_id: str):
    try:
        return client(address).get_job_info(submission_id)
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"no job {submission_id!r} at {address}: {str(e).splitlines()[0]}") from None


def logs(address: str, submission_id: str) -> str:
    info(address, submission_id)
    return client(address).get_job_logs(submission_id)


def follow(address: str, submission_id: str):
    """Yield log chunks until the job ends."""
    import asyncio

    c = client(address)
    info(address, submission_id)
    agen = c.tail_job_logs(submission_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(address: str, submission_id: str, wait: float = 60.0) -> str:
    """Stop the job and wait until Ray says it ended; returns its final status."""
    c = client(address)
    info(address, submission_id)
    c.stop_job(submission_id)
    deadline = time.monotonic() + wait
    status = str(c.get_job_status(submission_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(c.get_job_status(submission_id).value)
    return status


def stop_nowait(address: str, submission_id: str) -> None:
    """Ask Ray to stop the job (SIGTERM to its driver) and return at once."""
    client(address).stop_job(submission_id)


def last_progress(log_text: str) -> str:
    """The driver's last progress line ("runs 120/1000 ...") in a job's log."""
    lines = [line for line in log_text.splitlines() if line.startswith("runs ") or line.startswith("trained ")]
    return lines[-1] if lines else ""
