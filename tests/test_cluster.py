"""A real Ray cluster on loopback: a head started with `ray start --head` (token authentication on,
dashboard on 127.0.0.1) and a second node; `longtail submit` a campaign, watch it through the
dashboard's REST API and `longtail status`, `longtail stop` it midway, submit it again, and check that
it completes with every run folded once. Everything this test starts is stopped by process id (the
processes carry this test's private RAY_TMPDIR in their environment), never with `ray stop`, which
would kill every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPEC = """
[campaign]
name = "onhead"
seed = 3
runs = 60
subset_ratio = 0.5
[dataset]
name = "fault_plugins:blobs"
n_train = 40
n_test = 20
sleep = 0.25
[model]
name = "mlp"
[train]
trainer = "fault_plugins:knn"
[estimates]
checkpoint_seconds = 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="lt-head-"))
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # the head is started as `.venv/bin/ray start --head`, without the venv on its PATH (issue 12, item 13):
    # the job must still find a Python that has longtail
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    env.update(HOME=str(home), RAY_TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               PATH=os.pathsep.join(path))
    gcs, dash, metrics = free_port(), free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]

    def agent_ports():  # Ray's fixed defaults collide with any other Ray on the machine (the test session's)
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port())]
    # the head declares one (pretend) GPU, so that fractional-GPU packing is exercised without one
    try:
        # a head with RAY_AUTH_MODE=token needs a token first (docs/cluster.md)
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                       timeout=60)
        subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dash), "--metrics-export-port", str(metrics),
                        "--ray-client-server-port", str(free_port()), "--num-gpus", "1", *common, *agent_ports()],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", *common, *agent_ports()],
                       env=env, check=True, capture_output=True, timeout=120)
        token = (home / ".ray" / "auth_token").read_text().strip()
        yield {"env": env, "api": f"http://127.0.0.1:{dash}", "metrics": f"http://127.0.0.1:{metrics}/metrics",
               "token": token, "home": home, "tmp": tmp, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        for pid in processes_with(str(tmp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def longtail(cluster, *args, timeout=180):
    """The CLI as a user runs it on their machine: a token file in ~/.ray and nothing else set."""
    env = dict(cluster["env"])
    env.pop("RAY_AUTH_MODE")  # longtail must find the token and send it by itself
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "examples")])
    return subprocess.run([str(BIN / "longtail"), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT / "tests")


def rest(cluster, path):
    req = urllib.request.Request(cluster["api"] + path, headers={"Authorization": f"Bearer {cluster['token']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def wait_for(predicate, timeout=120, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def test_submit_watch_stop_resubmit(cluster, tmp_path):
    # without the token the job API refuses (Ray 2.60 token authentication is on)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(cluster["api"] + "/api/jobs/", timeout=10)
    assert refused.value.code == 401
    (tmp_path / "s.toml").write_text(SPEC)
    out = tmp_path / "campaign"  # on the head (this machine): a path, as on a shared filesystem
    r = longtail(cluster, "submit", tmp_path / "s.toml", "--address", cluster["api"], "--out", out,
                 "--module", ROOT / "examples" / "plugins.py")
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.stdout.split("as job ")[1].split()[0]
    assert f"longtail logs {first} --address {cluster['api']} --follow" in r.stdout

    # the dashboard's REST API and `longtail status` show it running, with the driver's progress lines
    wait_for(lambda: json.loads(rest(cluster, f"/api/jobs/{first}"))["status"] == "RUNNING")
    wait_for(lambda: len(list((out / "runs").glob("*.parquet"))) >= 12 if (out / "runs").exists() else False)
    logs = wait_for(lambda: (lambda t: t if "runs " in t else "")(
        json.loads(rest(cluster, f"/api/jobs/{first}/logs"))["logs"]))
    assert "/60 (" in logs and "runs/s" in logs
    st = longtail(cluster, "status", first, "--address", cluster["api"])
    assert st.returncode == 0 and f"job {first}: RUNNING" in st.stdout and "runs " in st.stdout, st.stdout
    # tasks and actors carry names that say campaign and role
    actors = json.loads(rest(cluster, "/api/v0/actors?limit=100"))["data"]["result"]["result"]
    assert any(a.get("name", "").startswith("longtail:onhead:worker-") for a in actors)
    tasks = json.loads(rest(cluster, "/api/v0/tasks?limit=1000"))["data"]["result"]["result"]
    assert any(re.fullmatch(r"longtail:onhead:runs? [0-9,-]+", t.get("name", "")) for t in tasks)

    stopped = longtail(cluster, "stop", first, "--address", cluster["api"])
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    time.sleep(2)  # a worker of the stopped job may still finish the shard it was writing
    # the job's SIGTERM reached longtail's handler, not Ray's (which exits with a stack dump, unsaved)
    stop_log = longtail(cluster, "logs", first, "--address", cluster["api"]).stdout
    assert "runs are folded and saved" in stop_log and "SIGTERM received" not in stop_log, stop_log
    before = {f.name: f.stat().st_mtime_ns for f in (out / "runs").glob("*.parquet")}
    done_at_stop = len(before)
    assert 0 < done_at_stop < 60

    r = longtail(cluster, "submit", tmp_path / "s.toml", "--address", cluster["api"], "--out", out,
                 "--module", ROOT / "examples" / "plugins.py")
    second = r.stdout.split("as job ")[1].split()[0]
    assert second != first
    wait_for(lambda: json.loads(rest(cluster, f"/api/jobs/{second}"))["status"] in ("SUCCEEDED", "FAILED"),
             timeout=240)
    final = longtail(cluster, "status", second, "--address", cluster["api"], "--json")
    info = json.loads(final.stdout)
    assert info["status"] == "SUCCEEDED", longtail(cluster, "logs", second, "--address", cluster["api"]).stdout
    log = longtail(cluster, "logs", second, "--address", cluster["api"]).stdout
    # resubmitting trains only the missing runs: it says so, and no shard of the first job is rewritten
    assert f"{60 - done_at_stop} runs to train" in log and f"({done_at_stop} of 60 already done)" in log, log
    assert {n: (out / "runs" / n).stat().st_mtime_ns for n in before} == before

    # every run folded once; both nodes trained
    shards = sorted((out / "runs").glob("*.parquet"))
    assert len(shards) == 60
    with np.load(out / "state" / "fold.npz") as z:
        assert z["folded"].sum() == 60 and int(z["group0.runs"]) == 60
    nodes = {json.loads(pq.read_schema(f).metadata[b"longtail"])["node"] for f in shards}
    assert len(nodes) == 2
    # the campaign's counters reached the head's Prometheus endpoint
    metrics = wait_for(lambda: (lambda t: t if "ray_longtail_runs_done_total" in t else "")(
        urllib.request.urlopen(cluster["metrics"], timeout=10).read().decode()), timeout=60)
    assert 'campaign="onhead"' in metrics
    failed = longtail(cluster, "status", "no-such-job", "--address", cluster["api"])
    assert failed.returncode == 2 and "no job 'no-such-job'" in failed.stderr


def test_fractional_gpus_pack_workers(cluster, tmp_path):
    """gpus_per_worker = 0.5 puts two workers on the head's one GPU (a pretend one: Ray's resources are
    logical, and the workers fall back to the CPU without CUDA), as on a real GPU node."""
    spec = SPEC.replace("sleep = 0.25", "sleep = 0.05").replace('name = "onhead"', 'name = "halves"')
    spec += "[resources]\ncpus_per_worker = 0.5\ngpus_per_worker = 0.5\n"
    (tmp_path / "s.toml").write_text(spec)
    r = longtail(cluster, "run", tmp_path / "s.toml", "--out", tmp_path / "c", "--address", cluster["gcs"],
                 "--no-progress", "--top", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "60 runs to train on 2 workers" in r.stderr, r.stderr
    metas = [json.loads(pq.read_schema(f).metadata[b"longtail"]) for f in (tmp_path / "c" / "runs").glob("*")]
    assert len(metas) == 60 and len({m["node"] for m in metas}) == 1 and len({m["pid"] for m in metas}) == 2


def test_submit_without_out_and_follow_its_log(cluster, tmp_path):
    """`longtail submit SPEC` without --out puts the campaign in ~/longtail-campaigns/<name> on the head (the
    head's HOME is the fixture's, inside its temporary directory), and `longtail logs ID --follow` streams
    the running job's log as it is written and returns, exit 0, when the job ends."""
    import threading

    name = "athome"
    spec = SPEC.replace('name = "onhead"', f'name = "{name}"').replace("runs = 60", "runs = 24")
    (tmp_path / "s.toml").write_text(spec)
    assert not (Path.home() / "longtail-campaigns" / name).exists()
    r = longtail(cluster, "submit", tmp_path / "s.toml", "--address", cluster["api"],
                 "--module", ROOT / "examples" / "plugins.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"campaign directory on the cluster: ~/longtail-campaigns/{name}" in r.stdout, r.stdout
    job = r.stdout.split("as job ")[1].split()[0]

    env = dict(cluster["env"])
    env.pop("RAY_AUTH_MODE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "examples")])
    follow = subprocess.Popen([str(BIN / "longtail"), "logs", job, "--address", cluster["api"], "--follow"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT / "tests")
    lines = []  # (seconds, line) as the follower prints them

    def read():
        for line in follow.stdout:
            lines.append((time.monotonic(), line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        root = cluster["home"] / "longtail-campaigns" / name
        # streamed: the driver's first lines arrive while the job is still running, before its last shard
        wait_for(lambda: any("runs to train" in line for _, line in lines), timeout=120, every=0.1)
        status = json.loads(rest(cluster, f"/api/jobs/{job}"))["status"]
        shards = len(list((root / "runs").glob("*.parquet"))) if (root / "runs").exists() else 0
        assert status == "RUNNING" and shards < 24, (status, shards)
        # ... and the follower ends by itself when the job does
        assert follow.wait(timeout=120) == 0, follow.stderr.read()
        reader.join(timeout=10)
    finally:
        if follow.poll() is None:
            follow.kill()
    info = json.loads(rest(cluster, f"/api/jobs/{job}"))
    assert info["status"] == "SUCCEEDED", info
    followed = "".join(line for _, line in lines)
    whole = longtail(cluster, "logs", job, "--address", cluster["api"]).stdout
    assert followed.strip() and whole.strip().endswith(followed.strip().splitlines()[-1]), (followed, whole)
    assert "24 runs" in followed, followed
    # the campaign is on the head's home, complete
    with np.load(root / "state" / "fold.npz") as z:
        assert z["folded"].sum() == 24
    assert len(list((root / "runs").glob("*.parquet"))) == 24
    assert not (Path.home() / "longtail-campaigns" / name).exists()
