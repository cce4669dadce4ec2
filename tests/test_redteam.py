"""The red-team report (issue 12): each way a user got a traceback, a hang, a wrong state or silent garbage,
tried again as the user did, through the CLI (click's runner in-process on the session's Ray, or a
subprocess where the terminal output or the exit status of a real process is the point). Every test here
failed on the code it was written against; docs/reliability.md ("Bad inputs tried") lists them.

The campaigns are 1-nearest-neighbour on 40 + 20 Gaussian blobs (deterministic: a recomputed estimate is
bit-identical to the undisturbed one), a fraction of a second per run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
[campaign]
name = "redteam"
seed = 5
runs = {runs}
subset_ratio = 0.5
[dataset]
name = "fault_plugins:blobs"
n_train = 40
n_test = 20
[model]
name = "mlp"
[train]
trainer = "{trainer}"
[resources]
max_failures = {max_failures}
[estimates]
checkpoint_seconds = 0.3
block_runs = 8
influence = "dense"
"""


def spec_file(tmp_path: Path, runs=6, trainer="fault_plugins:knn", max_failures=0.1, name="s.toml") -> Path:
    path = tmp_path / name
    path.write_text(SPEC.format(runs=runs, trainer=trainer, max_failures=max_failures))
    return path


def invoke(*args):
    """The CLI as a user types it; an exception that is not a user error escapes (a bug: the test fails)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(r, code=2) -> str:
    """The error a user sees: exactly one `error:` line on stderr, no traceback, the given exit status."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory) -> Path:
    """A complete 6-run campaign nobody touches (tests copy it)."""
    tmp = tmp_path_factory.mktemp("finished")
    r = invoke("run", spec_file(tmp), "--out", tmp / "c", "--no-progress", "--top", 0)
    assert r.exit_code == 0, r.output
    return tmp / "c"


def copy_of(finished: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(finished, tmp_path / "c")
    return tmp_path / "c"


def memorization(root: Path):
    return pq.read_table(root / "estimates" / "memorization.parquet").to_pandas()


# --- wrong or misleading results --------------------------------------------------------------------


def test_1_out_of_range_predictions_fail_the_runs(ray_session, tmp_path):
    r = invoke("run", spec_file(tmp_path, trainer="redteam_plugins:label_99"), "--out", tmp_path / "c",
               "--no-progress", "--top", 0)
    line = one_line_error(r)
    assert "must hold labels in [0, 3), found values 99..99" in line and "failure budget" in line
    assert not list((tmp_path / "c" / "runs").glob("run-*.parquet"))  # nothing was folded


def test_2_hand_edited_frozen_spec_is_refused_not_retrained(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    toml = root / "campaign.toml"
    text = toml.read_text()
    assert re.search(r"^epochs = 30$", text, re.M)
    toml.write_text(re.sub(r"^epochs = 30$", "epochs = 9", text, flags=re.M))
    before = sorted(p.name for p in (root / "runs").iterdir())
    r = invoke("resume", root, "--no-progress", "--top", 0)
    line = one_line_error(r)
    assert "train.epochs = 30 when the campaign was created, 9 now" in line
    assert "restore train.epochs = 30" in line and "longtail run SPEC --out" in line
    assert sorted(p.name for p in (root / "runs").iterdir()) == before and not (root / "rejected").exists()
    toml.write_text(text)  # undone: the campaign is whole again
    assert invoke("resume", root, "--no-progress", "--top", 0).exit_code == 0


def test_3_estimate_keeps_a_complete_campaign_complete(finished, tmp_path):
    root = copy_of(finished, tmp_path)  # 6 runs < block_runs = 8: the fold's buffer is not yet flushed
    r = invoke("estimate", root, "--top", 0)
    assert r.exit_code == 0, r.output
    info = json.loads(invoke("status", root, "--json").output)
    assert info["complete"] is True and info["state"] == "complete"
    assert json.loads((root / "estimates" / "summary.json").read_text())["complete"] is True


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_5_status_sees_a_dead_driver(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    (root / "runs" / "run-000003.parquet").unlink()  # the campaign is unfinished
    (root / "state" / "driver.lock").write_text(json.dumps(
        {"pid": dead_pid(), "host": socket.gethostname(), "started": "2026-12-01T10:00:00+0000"}))
    r = invoke("status", root)
    assert r.exit_code == 0, r.output
    assert "driver: none running (the lock names pid" in r.output and "is no longer running" in r.output
    assert f"continue with: longtail resume {root}" in r.output
    info = json.loads(invoke("status", root, "--json").output)
    assert info["driver"] is None and "no longer running" in info["stale_lock"]["why"]


def test_6_truncated_shard_of_a_folded_run(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    shard = root / "runs" / "run-000002.parquet"
    shard.write_bytes(shard.read_bytes()[:-40])
    # estimate, a recompute, reads the campaign and says what it left out; it moves nothing
    r = invoke("estimate", root, "--top", 0)
    assert r.exit_code == 0, r.output
    assert "left out the shard of run 2" in r.stderr and "`longtail resume" in r.stderr
    assert shard.exists() and not (root / "rejected").exists()
    # resume checks the shards the fold relies on, sets the bad one aside and trains that run again
    r = invoke("resume", root, "--no-progress", "--top", 0)
    assert r.exit_code == 0, r.output
    assert "rejected the shard of run 2" in r.stderr and "trained 1 runs" in r.output
    assert len(list((root / "rejected").glob("run-000002.parquet.*.why.txt"))) == 1
    assert memorization(root).equals(memorization(finished))


# --- tracebacks and hangs where a user expected one line ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_7_run_to_an_address_where_nothing_listens(tmp_path):
    start = time.monotonic()
    r = invoke("run", spec_file(tmp_path), "--out", tmp_path / "c", "--address", f"127.0.0.1:{free_port()}")
    line = one_line_error(r)
    assert "nothing answers at the Ray address 127.0.0.1:" in line and "nothing was written" in line
    assert time.monotonic() - start < 30  # a connection refused is immediate; the old code waited for good
    assert not (tmp_path / "c").exists()


def test_8_status_of_a_campaign_interrupted_before_its_first_run(ray_session, tmp_path, monkeypatch):
    import orchestrator.driver as driver

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_dispatch", ctrl_c)
    r = invoke("run", spec_file(tmp_path), "--out", tmp_path / "c", "--no-progress")
    assert "interrupted; 0 of 6 runs are folded" in one_line_error(r, 130)
    r = invoke("status", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "0/6 finished" in r.output and "incomplete" in r.output and "memorization: mean" not in r.output


@pytest.mark.parametrize("damage", ["truncated", "not a zip"])
def test_9_corrupt_fold_checkpoint_is_refolded_from_the_shards(finished, tmp_path, damage):
    root = copy_of(finished, tmp_path)
    fold = root / "state" / "fold.npz"
    fold.write_bytes(fold.read_bytes()[:1000] if damage == "truncated" else b"\x80\x04garbage")
    r = invoke("resume", root, "--no-progress", "--top", 0)
    assert r.exit_code == 0, r.output
    assert "allow_pickle" not in r.output and "unreadable" in r.stderr and "refolding every shard" in r.stderr
    assert "trained 0 runs" in r.output and "6/6 runs folded" in r.output
    assert memorization(root).equals(memorization(finished))


def test_10_ctrl_c_during_plan(ray_session, tmp_path, monkeypatch):
    import orchestrator.driver as driver

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_dispatch", ctrl_c)
    spec = spec_file(tmp_path)
    r = invoke("plan", spec, "--pilot", 4, "--no-progress")
    line = one_line_error(r, 130)
    assert "nothing to resume" in line and f"longtail plan {spec}" in line and "longtail resume" not in line
    removed = re.search(r"directory (\S+) is removed", line).group(1)
    assert not Path(removed).exists()


def test_11_out_is_a_regular_file(tmp_path):
    (tmp_path / "f").write_text("mine")
    line = one_line_error(invoke("run", spec_file(tmp_path), "--out", tmp_path / "f"))
    assert f"{tmp_path / 'f'} is a file, expected a campaign directory" in line
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("lost", ["examples.parquet", "masks.npy"])
def test_12_missing_plan_file_is_named_and_rebuilt_by_resume(finished, tmp_path, lost):
    root = copy_of(finished, tmp_path)
    (root / "plan" / lost).unlink()
    for command in (("status", root), ("estimate", root, "--top", 0)):
        line = one_line_error(invoke(*command))
        assert f"plan/{lost}" in line and "missing" in line and f"`longtail resume {root}` rebuilds it" in line
    r = invoke("resume", root, "--no-progress", "--top", 0)
    assert r.exit_code == 0, r.output
    assert "rebuilt the missing" in r.stderr and "trained 0 runs" in r.output
    assert (root / "plan" / lost).read_bytes() == (finished / "plan" / lost).read_bytes()


# --- status and messages ----------------------------------------------------------------------------


def test_14_status_in_words_failure_values_and_no_raw_none(ray_session, tmp_path):
    spec = spec_file(tmp_path, runs=6, trainer="redteam_plugins:odd_seeds_fail", max_failures=6)
    r = invoke("run", spec, "--out", tmp_path / "c", "--no-progress", "--top", 0)
    assert r.exit_code == 3, r.output  # item 15: ended incomplete, within the failure budget
    assert "the campaign ended incomplete" in r.stderr and "exit status 3" in r.stderr
    r = invoke("status", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert f"campaign 'redteam' in {tmp_path / 'c'}: incomplete" in r.output
    odd = sorted(json.loads(p.read_text())["reason"] for p in (tmp_path / "c" / "failed").glob("*.json"))
    assert odd and all(re.fullmatch(r"RuntimeError: seed \d+ is odd", w) for w in odd)
    assert "#" not in r.output and re.search(r"\d+ x RuntimeError: seed \d+ is odd", r.output)
    assert "None" not in r.output


def test_14_status_while_running_has_a_pace(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    (root / "runs" / "run-000005.parquet").unlink()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - 100))
    (root / "state" / "driver.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                            "started": started}))
    for shard in (root / "runs").iterdir():  # 5 runs finished in the driver's 100 s: 0.05 runs/s, 20 s left
        os.utime(shard, (time.time() - 50, time.time() - 50))
    r = invoke("status", root)
    assert r.exit_code == 0, r.output
    assert ": running" in r.output and f"pid {os.getpid()}" in r.output
    pace = re.search(r"pace: ([\d.]+) runs/s over 5 runs since the driver started, about (\d+) ?s left", r.output)
    assert pace and abs(float(pace.group(1)) - 0.05) < 0.005 and 15 <= int(pace.group(2)) <= 25, r.output
    assert "continue with" not in r.output


def test_split_half_without_a_value_says_why(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    summary = json.loads((root / "estimates" / "summary.json").read_text())
    summary["split_half"] = {"runs": [3, 3], "memorization_correlation": None, "memorized_jaccard_0.25": None}
    (root / "estimates" / "summary.json").write_text(json.dumps(summary))
    r = invoke("status", root)
    assert r.exit_code == 0, r.output
    assert "memorization correlation n/a (too few runs), memorized-set Jaccard (>= 0.25) n/a" in r.output


def test_16_validate_counts_the_example_table_and_the_checkpoint(finished, tmp_path):
    r = invoke("validate", spec_file(tmp_path))
    assert r.exit_code == 0, r.output

    def claimed(what, path, overhead=0):
        """The printed size agrees with the file to the printed precision (half its last digit)."""
        value, unit = re.search(rf"([\d.]+) (B|KB|MB) {what}", r.output).groups()
        scale = {"B": 1, "KB": 1e3, "MB": 1e6}[unit]
        decimals = len(value.partition(".")[2])
        assert abs(float(value) * scale - path.stat().st_size) <= 0.5 * 10 ** -decimals * scale + overhead, r.output

    claimed("example table", finished / "plan" / "examples.parquet")
    claimed("fold checkpoint", finished / "state" / "fold.npz")


def test_16_a_short_pilot_comes_with_a_caveat():
    from orchestrator.features.cost import DEGENERATE_CAVEAT, degenerate_share

    acc_in = np.array([1.0, 1.0, 0.5, 0.0])
    acc_out = np.array([0.0, 1.0, 1.0, 0.0])
    assert degenerate_share(acc_in, acc_out) == 0.75 > DEGENERATE_CAVEAT
    assert degenerate_share(np.array([0.5, 0.75]), np.array([0.25, 1.0])) == 0.0


# --- the general rule: plug-ins, one handler ---------------------------------------------------------


@pytest.mark.parametrize("section,plugin,says", [
    ("dataset", "redteam_plugins:loader_raises", "dataset loader 'redteam_plugins:loader_raises' raised "
                                                 "KeyError: 'n_pixels'"),
    ("dataset", "redteam_plugins:loader_returns_dict", "dataset loader 'redteam_plugins:loader_returns_dict' "
                                                       "returned dict; expected workers.datasets.Dataset"),
    ("model", "redteam_plugins:factory_raises", "model factory 'redteam_plugins:factory_raises' raised "
                                                "ValueError: cannot build a model for 3 classes"),
    ("model", "redteam_plugins:factory_returns_none", "model factory 'redteam_plugins:factory_returns_none' "
                                                      "returned NoneType; expected a torch.nn.Module"),
])
def test_a_plugin_fault_is_framed_as_the_plugins(tmp_path, section, plugin, says):
    text = SPEC.format(runs=4, trainer="fault_plugins:knn", max_failures=0.1)
    if section == "dataset":
        text = text.replace('"fault_plugins:blobs"', f'"{plugin}"')
    else:  # a model factory is used when there is no trainer
        text = text.replace('trainer = "fault_plugins:knn"', "").replace('name = "mlp"', f'name = "{plugin}"')
    (tmp_path / "s.toml").write_text(text)
    for command in (("validate", tmp_path / "s.toml"), ("run", tmp_path / "s.toml", "--out", tmp_path / "c")):
        r = CliRunner().invoke(main, [str(a) for a in command], catch_exceptions=False)
        assert r.exit_code == 2, r.output
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and says in errors[0], r.stderr
        if "raised" in says:  # the plug-in's own frames, under their own header, for its author
            tail = r.stderr.split("plug-in traceback", 1)[1]
            assert "redteam_plugins.py" in tail and ("_helper_that_fails" in tail or "factory_raises" in tail)
        assert not (tmp_path / "c").exists()


def test_every_user_error_class_derives_from_the_one_root():
    from orchestrator.campaign import CampaignError, SpecMismatchError
    from orchestrator.driver import CampaignInterrupted
    from orchestrator.features.utility import UtilityError
    from cluster.jobs import JobError
    from orchestrator.lock import LockedError
    from orchestrator.features.cost import PilotError
    from orchestrator.plan import PlanError
    from orchestrator.spec import SpecError
    from orchestrator.features.tune import TuneError
    from workers.datasets import DatasetError
    from workers.errors import LongtailError, PluginError
    from workers.options import SetupError
    from workers.shard import ShardError
    from workers.storage import StorageError

    for cls in (CampaignError, SpecMismatchError, CampaignInterrupted, UtilityError, JobError, LockedError,
                PilotError, PlanError, SpecError, TuneError, DatasetError, PluginError, SetupError, ShardError,
                StorageError):
        assert issubclass(cls, LongtailError), cls
    assert issubclass(StorageError, OSError) and issubclass(SpecError, ValueError)  # still caught as before
    assert CampaignInterrupted.exit_code == 130 and LongtailError.exit_code == 2


# --- as a process: exit status, Ray's warnings, timing -----------------------------------------------


@pytest.mark.slow
def test_15_16_a_real_process_ends_incomplete_with_3_and_no_token_warning(tmp_path):
    """One `longtail run` process, as from a terminal: no RAY_AUTH_MODE, a fresh HOME (no token yet)."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="lt-rt-")  # short: Ray's socket paths must stay under 107 characters
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]))
    (tmp_path / "home").mkdir()
    spec = spec_file(tmp_path, runs=4, trainer="redteam_plugins:odd_seeds_fail", max_failures=4)
    text = spec.read_text().replace("[resources]", "[resources]\nlocal_cpus = 1")
    spec.write_text(text)
    try:  # --in-process: the driver starts its Ray itself (the job mode's head is started the same way)
        p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--out", str(tmp_path / "c"),
                            "--no-progress", "--top", "0", "--in-process"],
                           env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "Token authentication is enabled" not in p.stderr and "RAY_AUTH_MODE=disabled" not in p.stderr
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()  # token auth is on, as Ray's default


def test_16_in_all_is_the_commands_time(finished, tmp_path, monkeypatch):
    """A second run of a finished campaign trains nothing, but loading its data still takes time."""
    import fault_plugins
    import redteam_plugins

    root = copy_of(finished, tmp_path)
    monkeypatch.setattr(fault_plugins, "blobs", redteam_plugins.slow_blobs)  # in this process only
    start = time.monotonic()
    r = invoke("run", spec_file(tmp_path), "--out", root, "--no-progress", "--top", 0)
    wall = time.monotonic() - start
    assert r.exit_code == 0, r.output
    said = float(re.search(r", ([\d.]+) s in all", r.output).group(1))
    assert 1.0 <= said <= wall + 0.05, (said, wall)  # the loader alone sleeps 1 s


def test_16_report_hints_name_this_campaign(finished, tmp_path):
    """The report's hints are commands to paste: they name the campaign's directory, not a literal DIR."""
    from orchestrator.features.report import load_inputs, memorization_section, utility_section

    root = copy_of(finished, tmp_path)
    inp = load_inputs(root)
    assert f"longtail utility {root} --thresholds 0.25,0.5" in utility_section(inp)
    (root / "estimates" / "memorization.parquet").unlink()
    html = memorization_section(load_inputs(root))
    assert f"longtail estimate {root}" in html and " DIR" not in html


def test_16_the_dashboard_url_is_a_url(monkeypatch):
    """Ray reports the dashboard as host:port (a Ray job's driver printed it so); longtail prints a URL."""
    import cluster.connect as driver

    monkeypatch.setattr(driver, "_ray_init", lambda *a: (None, True, "127.0.0.1:8265"))
    assert driver.ray_init(None)[2] == "http://127.0.0.1:8265"
    monkeypatch.setattr(driver, "_ray_init", lambda *a: (None, True, "https://head:8265"))
    assert driver.ray_init(None)[2] == "https://head:8265"


def test_a_builtin_model_that_does_not_fit_the_data(tmp_path):
    text = SPEC.format(runs=4, trainer="fault_plugins:knn", max_failures=0.1)
    text = text.replace('trainer = "fault_plugins:knn"', "").replace('"mlp"', '"cnn"')
    (tmp_path / "s.toml").write_text(text.replace('"fault_plugins:blobs"', '"redteam_plugins:blobs_4d"'))
    line = one_line_error(invoke("validate", tmp_path / "s.toml"))
    assert "model 'cnn' does not fit dataset 'redteam_plugins:blobs_4d': model 'cnn': expected inputs of shape" in line


def test_13_the_job_finds_a_python_with_longtail(tmp_path):
    """A head started as `.venv/bin/ray start --head` has no venv on PATH: a bare `python -m orchestrator.cli`
    there fails with ModuleNotFoundError. The job's command finds an interpreter that has longtail (the
    whole submit / stop / resubmit cycle on such a head: tests/test_cluster.py)."""
    from cluster.jobs import job_entrypoint

    bin_dir = Path(sys.executable).parent.resolve()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != bin_dir)
    env = {"PATH": path, "HOME": str(tmp_path)}  # no PYTHONPATH: the job's working dir holds only the spec
    p = subprocess.run(["sh", "-c", job_entrypoint("--help")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "Usage:" in p.stdout and "resume" in p.stdout, p.stdout + p.stderr


def test_a_dashboard_port_in_use_is_one_line_and_writes_nothing(tmp_path):
    """An explicit --dashboard-port that is taken (another Ray, another campaign): Ray's own ValueError
    traceback before; now one line, exit 2, no campaign directory. (Ray's default port taken gives a free
    one instead: run as a subprocess, since this process may hold the tests' Ray session.)"""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec_file(tmp_path)), "--out",
                            str(tmp_path / "c"), "--dashboard-port", str(port)], capture_output=True, text=True,
                           timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                           cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"--dashboard-port {port}" in errors[0] and "in use" in errors[0], r.stderr
    assert not (tmp_path / "c").exists()
