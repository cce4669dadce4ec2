"""How a command reaches Ray: join a cluster (presenting its token) or start the embedded one.

Ray 2.60 protects the dashboard and job API with a token and nothing else: the embedded cluster binds
them to loopback, and `warn_if_exposed` says so loudly when a user binds elsewhere (docs/cluster.md).
The token must be in place before `ray` is first imported (Ray reads the auth mode once), so every
command reaches Ray through `ray_init` here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from workers.errors import LongtailError


class ClusterError(LongtailError, RuntimeError):
    """No Ray cluster where one was named; nothing was written."""


def _say(msg: str) -> None:
    print(f"longtail: {msg}", file=sys.stderr, flush=True)


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def send_token_if_available() -> None:
    """Make this process's Ray client present the token (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]).

    Ray's clients send it only when RAY_AUTH_MODE=token, which Ray reads once, when it is first
    imported: call this before importing ray. Without it every call to a token-protected cluster fails
    (401 over HTTP, InvalidAuthToken over gRPC)."""
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"



LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before anything is written, when nothing listens at a Ray address (ray.init
    would wait for good). "auto" and other forms without host:port are left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"nothing answers at the Ray address {address} ({e.strerror or e}), expected a Ray head's port (6379 "
            f"for `ray start --head`, 10001 for ray://); nothing was written. Check the address (`ray status "
            f"--address {address}` on the head), or leave out --address to run on an embedded local Ray") from None


def warn_if_exposed(dashboard_host: str, say=_say) -> None:
    if dashboard_host not in LOOPBACK:
        say("WARNING " + "!" * 60)
        say(f"WARNING: the Ray dashboard and job API will listen on {dashboard_host}, reachable from the "
            f"network, and protected by nothing but Ray's token (~/.ray/auth_token). Anyone with the token "
            f"can run code on this machine. Prefer the default 127.0.0.1 and an SSH tunnel.")
        say("WARNING " + "!" * 60)


def quiet_token_auth() -> None:
    """Token authentication for a cluster longtail starts itself, as Ray's own default, without Ray's
    warning on every command (which also suggests RAY_AUTH_MODE=disabled, never wanted here). Ray reads
    the mode when it is first imported, so this does what Ray's default does: sets it and refreshes Ray's
    config. An explicit RAY_AUTH_MODE is respected (Ray warns about none then either)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


_SIGTERM_INTERRUPTS = False  # set by the CLI: SIGTERM ends a campaign as Ctrl-C does


def interrupt_on_sigterm() -> None:
    """`ray job stop` and `kill` send SIGTERM: make it a KeyboardInterrupt, so that the fold is saved and the
    command exits 130 as on Ctrl-C. ray.init() installs a handler of its own (a bare exit, with Ray's
    stack dump in the job log), so ray_init installs this one again after it."""
    import signal
    import threading

    global _SIGTERM_INTERRUPTS

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
        _SIGTERM_INTERRUPTS = True


def ray_init(address: str | None, local_cpus: int = 0, dashboard_host: str = "127.0.0.1"):
    ray, started, url = _ray_init(address, local_cpus, dashboard_host)
    if started and _SIGTERM_INTERRUPTS:
        interrupt_on_sigterm()
    if url and "://" not in url:  # Ray reports host:port; a terminal makes a link only of a URL
        url = f"http://{url}"
    return ray, started, url


def _ray_init(address: str | None, local_cpus: int = 0, dashboard_host: str = "127.0.0.1"):
    """Join the cluster at `address` (or a Ray job's), or start the embedded one; returns (ray, whether
    this call started it, the dashboard URL)."""
    if address:
        check_ray_address(address)
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
        warn_if_exposed(dashboard_host)
        quiet_token_auth()  # longtail manages the token of the cluster it starts (docs/cluster.md)
        ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host=dashboard_host,
                       log_to_driver=False, logging_level="WARNING", runtime_env=runtime_env)
    url = getattr(ctx, "dashboard_url", None)
    return ray, True, (f"http://{url}" if url and not url.startswith("http") else url)
