"""Paths a user takes that no other test runs, run as a user runs them: the CLI in a subprocess where
the process boundary matters (signals, exit codes, environment variables, an embedded Ray started by
the command itself), in-process where only the behaviour matters."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from orchestrator import spec as specs
from orchestrator.campaign import CampaignError, create_or_open
from orchestrator.cli import main
from orchestrator.driver import run_campaign

ROOT = Path(__file__).resolve().parents[1]
LONGTAIL = str(Path(sys.executable).with_name("longtail"))


def knn_spec(runs=30, dataset="", resources="") -> str:
    """The fault tests' 1-NN campaign (tests/test_faults.py), with extra [resources] keys."""
    from test_faults import spec_text

    return spec_text(runs=runs, dataset=dataset).replace("[resources]", "[resources]\n" + resources)


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples"), str(ROOT / "tests")]))
    for k in ("RAY_ADDRESS", "LONGTAIL_RAY_ADDRESS"):
        e.pop(k, None)
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def address(ray_session):
    return ray_session.get_runtime_context().gcs_address


def folded(root: Path) -> int:
    with np.load(root / "state" / "fold.npz", allow_pickle=False) as z:
        return int(z["folded"].sum())


def test_embedded_ray_sigint_resume_and_status(address, tmp_path):
    """`longtail run` with no cluster starts its own Ray (once in this suite: seconds), warns when the
    dashboard is exposed, uses [resources] local_cpus, and on Ctrl-C (SIGINT) saves the fold and exits
    130 naming the resume command; `longtail resume` (joining a cluster named by LONGTAIL_RAY_ADDRESS)
    finishes the campaign; `longtail status DIR` tells a person what is there."""
    spec = tmp_path / "s.toml"
    spec.write_text(knn_spec(runs=40, dataset="sleep = 0.2", resources="local_cpus = 1\nmax_in_flight = 1"))
    out = tmp_path / "c"
    ray_tmp = tempfile.mkdtemp(prefix="lt-emb-")  # its own Ray: short socket paths, nothing shared
    try:
        p = subprocess.Popen([LONGTAIL, "run", str(spec), "--out", str(out), "--no-progress", "--top", "0",
                              "--dashboard-host", "0.0.0.0", "--dashboard-port", "0"],
                             env=env(RAY_TMPDIR=ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while p.poll() is None and time.time() < deadline and not (
                (out / "runs").exists() and len(list((out / "runs").glob("run-*.parquet"))) >= 14):
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert "WARNING: the Ray dashboard and job API will listen on 0.0.0.0" in stderr
    assert "40 runs to train on 1 workers" in stderr  # local_cpus = 1: an embedded Ray of one CPU
    assert f"Continue with: longtail resume {out}" in stderr
    saved = folded(out)
    # the fold was saved at the interruption (but for runs still held by the accuracy gate, which
    # needs 10 accuracies first: their shards are on disk and are folded on resume)
    assert 14 - 10 <= saved < 40, saved
    shards = len(list((out / "runs").glob("run-*.parquet")))

    st = subprocess.run([LONGTAIL, "status", str(out)], env=env(), capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stderr
    assert f"runs: {shards}/40 finished" in st.stdout and "driver: none running" in st.stdout, st.stdout
    assert f"continue with: longtail resume {out}" in st.stdout

    r = subprocess.run([LONGTAIL, "resume", str(out), "--no-progress", "--top", "3"],
                       env=env(LONGTAIL_RAY_ADDRESS=address), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"({shards} of 40 already done)" in r.stderr, r.stderr
    assert "Ray dashboard at" not in r.stderr  # it joined the cluster the variable names, started none
    assert folded(out) == 40
    st = subprocess.run([LONGTAIL, "status", str(out)], env=env(), capture_output=True, text=True, timeout=120)
    assert "runs: 40/40 finished, 40 folded" in st.stdout, st.stdout


def test_demo_command(address, tmp_path):
    """`longtail demo` (what `make demo` runs), in a subprocess, here on this session's cluster through
    RAY_ADDRESS and with fewer runs; run again, it trains nothing and prints the same table."""
    out = tmp_path / "demo"
    cmd = [LONGTAIL, "demo", "--out", str(out), "--runs", "24", "--no-progress"]
    first = subprocess.run(cmd, env=env(RAY_ADDRESS=address), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "the 10 most memorized training examples" in first.stdout, first.stdout
    assert "24/24 runs folded" in first.stdout
    again = subprocess.run(cmd, env=env(RAY_ADDRESS=address), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    table = lambda s: s[s.index("the 10 most memorized"):]  # noqa: E731
    assert table(again.stdout) == table(first.stdout)
    assert "(24 of 24 already done)" in again.stdout + again.stderr or "trained 0 runs" in again.stdout + again.stderr


def test_gpu_asked_of_a_cluster_without_one(address, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(knn_spec(resources="gpus_per_worker = 1"))
    r = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "c"), "--address", address,
                                  "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert "gpus_per_worker = 1.0 but the cluster has no GPU; set gpus_per_worker = 0" in r.output
    assert "Traceback" not in r.output


def test_dataset_that_differs_at_the_worker(ray_session, tmp_path):
    """A worker whose node sees other data than the driver did refuses to start, naming both fingerprints."""
    flag = tmp_path / "shifted"
    c = create_or_open(specs.loads(knn_spec(dataset=f'shift_if = "{flag}"'), "s.toml"), tmp_path / "c")
    flag.write_text("the data changed under the campaign")
    with pytest.raises(CampaignError, match=r"the workers could not start: .*has fingerprint \w+, the campaign "
                                            r"expects " + c.fingerprint + "; every node must see the same data"):
        run_campaign(c, progress=False)
    assert not list(c.paths.runs_dir.glob("run-*.parquet"))


def test_locks_of_another_host(ray_session, tmp_path):
    """A lock held by a driver on another host is honoured while its heartbeat is fresh (its pid means
    nothing here) and taken over once the heartbeat is older than 10 minutes."""
    c = create_or_open(specs.loads(knn_spec(runs=10), "s.toml"), tmp_path / "c")
    c.paths.lock.write_text(json.dumps({"pid": os.getpid() + 10**6, "host": "elsewhere", "started": "then"}))
    r = CliRunner().invoke(main, ["resume", str(c.paths.root), "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 2 and "another driver is running this campaign: pid" in r.output
    assert "on host elsewhere" in r.output
    old = time.time() - 700
    os.utime(c.paths.lock, (old, old))
    report = run_campaign(create_or_open(None, c.paths.root), progress=False)
    assert report.complete and folded(c.paths.root) == 10 and not c.paths.lock.exists()


def test_plugin_model_four_value_trainer_and_resource_options(ray_session, tmp_path):
    """A plug-in model factory (examples/plugins.py:tiny_mlp) trained by longtail's torch loop with
    pack, max_in_flight, split_half = false and soft = ["probability"]; and a trainer returning four
    values (labels and margins), whose margins reach the shards."""
    text = knn_spec(runs=12).replace('trainer = "fault_plugins:knn"', 'epochs = 2\nstore = ["probability"]').replace(
        'name = "mlp"', 'name = "plugins:tiny_mlp"').replace("[resources]", "[resources]\npack = 3\nmax_in_flight = 3")
    text = text.replace("[estimates]", '[estimates]\nsplit_half = false\nsoft = ["probability"]')
    c = create_or_open(specs.loads(text, "s.toml"), tmp_path / "m")
    report = run_campaign(c, progress=False)
    assert report.complete and folded(c.paths.root) == 12
    summary = json.loads(c.paths.summary.read_text())
    assert "split_half" not in summary  # split_half = false: no split-half check computed
    mem = pq.read_table(c.paths.estimates_dir / "memorization.parquet")
    assert any(name.endswith("_probability") for name in mem.column_names), mem.column_names
    assert (c.paths.estimates_dir / "influence_probability.npy").exists()

    four = knn_spec(runs=10).replace('"fault_plugins:knn"', '"fault_plugins:knn_with_margins"')
    four = four.replace("[estimates]", '[estimates]\nsoft = ["margin"]')
    c4 = create_or_open(specs.loads(four, "s.toml"), tmp_path / "four")
    assert run_campaign(c4, progress=False).complete
    from workers.shard import read_shard

    data = read_shard(c4.paths.shard(0), campaign="faults", spec_hash=c4.spec.result_hash(), run=0, n_train=40,
                      n_test=20)
    import fault_plugins

    want = fault_plugins.knn_with_margins(c4.dataset, np.flatnonzero(c4.plan.mask(0)), int(c4.plan.seeds[0]))
    # shards keep soft values as float16 (docs/campaign-directory.md): the trainer's margins, so rounded
    np.testing.assert_array_equal(data.test_values["margin"], want[3].astype(np.float16).astype(np.float32))


def test_ray_token_variables(monkeypatch, tmp_path):
    """RAY_AUTH_TOKEN or a file at RAY_AUTH_TOKEN_PATH (else ~/.ray/auth_token) make longtail's Ray client
    present the token (RAY_AUTH_MODE=token); without any, it presents none; an explicit mode is kept."""
    from cluster.connect import send_token_if_available

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    send_token_if_available()
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    send_token_if_available()
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / "token").write_text("secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    send_token_if_available()
    assert os.environ.pop("RAY_AUTH_MODE") == "token"
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    send_token_if_available()
    assert os.environ.pop("RAY_AUTH_MODE") == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    send_token_if_available()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_a_trainer_plugin_needs_no_model_section(ray_session, tmp_path):
    """docs/plugins.md: [model] is not used when [train] trainer is set, so it may be left out."""
    text = knn_spec(runs=6)
    text = text[:text.index("[model]")] + text[text.index("[train]"):]
    assert "[model]" not in text
    c = create_or_open(specs.loads(text, "s.toml"), tmp_path / "c")
    assert run_campaign(c, progress=False).complete and folded(c.paths.root) == 6
    with pytest.raises(specs.SpecError, match=r"missing section \[model\]; \[model\] may be left out only when"):
        specs.loads(text.replace('trainer = "fault_plugins:knn"', ""), "s.toml")
