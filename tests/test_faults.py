"""Faults: kill the driver, kill a worker, remove and add a node, corrupt shards, fill the disk, make
it read-only, run two drivers, feed bad input. Each test checks that no run is lost or folded twice
and that the estimates equal those of an undisturbed campaign (1-nearest-neighbour is deterministic,
so "equal" means bit-identical files). docs/reliability.md tabulates these tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.driver import run_campaign
from workers.shard import read_shard

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
[campaign]
name = "faults"
seed = 7
runs = {runs}
subset_ratio = 0.5
[dataset]
name = "fault_plugins:blobs"
n_train = 40
n_test = 20
{dataset}
[model]
name = "mlp"
[train]
trainer = "fault_plugins:knn"
[resources]
max_failures = {max_failures}
[estimates]
checkpoint_seconds = 0.3
block_runs = 8
influence = "dense"
"""


def spec_text(runs=60, dataset="", max_failures=0.1):
    return SPEC.format(runs=runs, dataset=dataset, max_failures=max_failures)


def write_spec(path: Path, **kw) -> Path:
    path.write_text(spec_text(**kw))
    return path


def undisturbed(tmp_path_factory, runs: int) -> Path:
    """An uninterrupted campaign of the same runs (no sleeps: they do not change any prediction)."""
    root = tmp_path_factory.mktemp("undisturbed") / "c"
    run_campaign(create_or_open(specs.loads(spec_text(runs=runs), "u.toml"), root), progress=False)
    return root


def assert_same_estimates(root: Path, reference: Path) -> None:
    for name in ("memorization.parquet", "influence.npy", "influence_se.npy", "high_influence_pairs.parquet"):
        a, b = root / "estimates" / name, reference / "estimates" / name
        if name.endswith(".npy"):
            assert np.load(a).tobytes() == np.load(b).tobytes(), name
        else:
            assert pq.read_table(a).equals(pq.read_table(b)), name


def assert_every_run_once(root: Path, runs: int) -> None:
    shards = sorted((root / "runs").glob("run-*.parquet"))
    assert len(shards) == runs  # nothing lost
    with np.load(root / "state" / "fold.npz") as z:
        assert z["folded"].sum() == runs and int(z["group0.runs"]) == runs  # each folded exactly once
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]  # nothing half-written left


def driver(spec: Path, out: Path, address: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples"), str(ROOT / "tests")]))
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--out", str(out),
                             "--address", address, "--no-progress", "--top", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shard_count(out: Path) -> int:
    return len(list((out / "runs").glob("run-*.parquet"))) if (out / "runs").exists() else 0


@pytest.fixture(scope="module")
def address(ray_session):
    return ray_session.get_runtime_context().gcs_address


def test_driver_sigkilled_at_random_points(address, tmp_path, tmp_path_factory):
    """12 SIGKILLs of the driver process: during start-up, at random numbers of finished runs spread
    over the campaign (with a random sub-second jitter, so that kills land in dispatch, folding and
    checkpoint writing alike), and after the last shard, while the estimates are written."""
    runs = 160
    spec = write_spec(tmp_path / "s.toml", runs=runs, dataset="sleep = 0.05")
    out = tmp_path / "c"
    rng = random.Random(1)
    targets = [0] + sorted(rng.sample(range(5, runs - 30), 10)) + [runs]
    kills = []
    for target in targets:
        p = driver(spec, out, address)
        if target:  # every driver but the first is killed after it made some progress of its own
            target = min(runs, max(target, shard_count(out) + 3))
        deadline = time.time() + 120
        while shard_count(out) < target and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5) if target else rng.uniform(0.5, 2.5))
        if p.poll() is not None:  # it finished before the kill
            break
        p.kill()  # SIGKILL: no handler runs, the lock and temporary files stay behind
        p.wait()
        kills.append(shard_count(out))
    p = driver(spec, out, address)
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log
    print(f"\nkilled the driver {len(kills)} times, with {kills} shards on disk; runs lost: 0")
    assert len(kills) >= 10 and sum(0 < k < runs for k in kills) >= 8, kills
    assert_every_run_once(out, runs)
    assert_same_estimates(out, undisturbed(tmp_path_factory, runs))


def test_worker_killed_mid_run(ray_session, tmp_path, tmp_path_factory):
    marker = tmp_path / "died"
    c = create_or_open(specs.loads(spec_text(runs=40, dataset=f'die_marker = "{marker}"'), "s.toml"), tmp_path / "c")
    report = run_campaign(c, progress=False)
    # the dead worker held up to two runs (max_in_flight = 2 per worker): both went back in the queue
    assert marker.exists() and 1 <= report.retried <= 2 and report.complete and not report.failed
    assert_every_run_once(c.paths.root, 40)
    assert_same_estimates(c.paths.root, undisturbed(tmp_path_factory, 40))


def test_a_run_that_keeps_killing_its_worker_fails_after_max_retries(ray_session, tmp_path):
    text = spec_text(runs=6, max_failures=6).replace('"fault_plugins:knn"', '"fault_plugins:knn_dies_always"')
    c = create_or_open(specs.loads(text + "\n", "s.toml").replace(
        resources=specs.ResourcesSection(max_retries=1, max_failures=6)), tmp_path / "c")
    report = run_campaign(c, progress=False)
    odd = [r for r in range(6) if c.plan.seeds[r] % 2]
    assert odd and report.failed == odd and report.trained == 6 - len(odd)
    reason = json.loads(c.paths.failure(odd[0]).read_text())["reason"]
    assert "its worker died 2 times" in reason and "max_retries = 1" in reason
    reasons = json.loads(c.paths.summary.read_text())["failure_reasons"]
    assert list(reasons.values()) == [len(odd)] and "its worker died # times" in next(iter(reasons))


def test_node_removed_and_added_mid_campaign(tmp_path, tmp_path_factory):
    runs = 120
    spec = write_spec(tmp_path / "s.toml", runs=runs, dataset="sleep = 0.25")
    env = dict(os.environ)
    env.pop("RAY_TMPDIR", None)  # the script makes its own; this session's Ray must not be touched
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_script.py"), str(spec), str(tmp_path / "c")],
                       env=env, capture_output=True, text=True, timeout=400)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert "error" not in result, result
    assert result["complete"] and not result["failed"]
    print(f"\nnode removed at {result['events'][0]}, added at {result['events'][1]}, runs retried: "
          f"{result['retried']}; runs lost: 0")
    assert_every_run_once(tmp_path / "c", runs)
    nodes = [json.loads(pq.read_schema(f).metadata[b"longtail"])["node"] for f in (tmp_path / "c" / "runs").glob("*")]
    assert result["added_node"] in nodes  # the node that joined got work
    assert_same_estimates(tmp_path / "c", undisturbed(tmp_path_factory, runs))


def test_shards_shipped_through_the_driver(ray_session, tmp_path, tmp_path_factory):
    """What happens for workers on nodes that cannot see the campaign directory, forced for all."""
    text = spec_text(runs=30).replace("[resources]", '[resources]\nship_shards = "driver"')
    c = create_or_open(specs.loads(text, "s.toml"), tmp_path / "c")
    run_campaign(c, progress=False)
    assert_every_run_once(c.paths.root, 30)
    assert_same_estimates(c.paths.root, undisturbed(tmp_path_factory, 30))


def test_a_worker_that_cannot_see_the_directory_sends_its_shards(tmp_path):
    from workers.worker import RunWorker

    c = create_or_open(specs.loads(spec_text(runs=4), "s.toml"), tmp_path / "c")
    args = (c.spec.to_dict(), c.name, c.spec.result_hash(), c.fingerprint, 1, False)
    probe = tmp_path / "probe"
    assert not RunWorker(*args, probe=str(probe)).ping()["direct"]
    probe.write_text("x")
    seeing = RunWorker(*args, probe=str(probe))
    assert seeing.ping()["direct"]
    blind = RunWorker(*args, probe=str(tmp_path / "elsewhere"))
    result = blind.run(0, c.plan.masks[0], int(c.plan.seeds[0]), str(c.paths.shard(0)))
    assert not c.paths.shard(0).exists() and result["shard"][:4] == b"PAR1"


def test_untrustworthy_shards_are_moved_aside_and_redone(ray_session, tmp_path, tmp_path_factory):
    c = create_or_open(specs.loads(spec_text(runs=30), "s.toml"), tmp_path / "c")
    run_campaign(c, progress=False)
    (c.paths.checkpoint).unlink()  # as if the driver died before folding them
    paths = c.paths
    # truncated
    data = paths.shard(1).read_bytes()
    paths.shard(1).write_bytes(data[: len(data) // 2])
    # corrupt page
    data = bytearray(paths.shard(2).read_bytes())
    for k in range(100, 160):
        data[k] ^= 0xFF
    paths.shard(2).write_bytes(bytes(data))
    # foreign: another campaign's shard under this run's name
    t = pq.read_table(paths.shard(3))
    meta = json.loads(t.schema.metadata[b"longtail"])
    meta["campaign"] = "other"
    pq.write_table(t.replace_schema_metadata({b"longtail": json.dumps(meta).encode()}), paths.shard(3))
    # malformed: a row missing
    pq.write_table(pq.read_table(paths.shard(4)).slice(1), paths.shard(4))
    # a temporary file a crashed writer left
    (paths.runs_dir / ".run-000005.parquet.tmp-deadbeef").write_bytes(b"half")
    report = run_campaign(create_or_open(None, paths.root), progress=False)
    assert sorted(report.rejected) == [1, 2, 3, 4] and report.trained == 4
    why = sorted(p.read_text() for p in paths.rejected_dir.glob("*.why.txt"))
    assert len(why) == 4 and any("truncated or corrupt" in w for w in why)
    assert any("a shard of another campaign or spec" in w for w in why)
    assert any("rows, expected 40 train + 20 test" in w for w in why)
    assert_every_run_once(paths.root, 30)
    assert_same_estimates(paths.root, undisturbed(tmp_path_factory, 30))


def test_a_second_driver_is_refused_and_a_dead_ones_lock_taken_over(address, tmp_path):
    spec = write_spec(tmp_path / "s.toml", runs=40, dataset="sleep = 0.3")
    out = tmp_path / "c"
    first = driver(spec, out, address)
    deadline = time.time() + 60
    while not (out / "state" / "driver.lock").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = driver(spec, out, address)
    log = second.communicate(timeout=120)[0]
    assert second.returncode == 2, log
    assert f"another driver is running this campaign: pid {first.pid}" in log
    first.kill()
    first.wait()
    third = driver(spec, out, address)
    log = third.communicate(timeout=300)[0]
    assert third.returncode == 0 and "took over the lock" in log and "is no longer running" in log, log
    assert_every_run_once(out, 40)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small filesystem here ({r.stderr.strip()}): needs root with CAP_SYS_ADMIN")


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    _mount_tmpfs(mnt, "256k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_cleanly_and_resumes(ray_session, small_fs, tmp_path_factory):
    from workers.storage import StorageError
    from orchestrator.campaign import CampaignError

    runs = 120  # 120 shards of a 4 kB page each do not fit in 256 kB
    spec = specs.loads(spec_text(runs=runs), "s.toml")
    c = create_or_open(spec, small_fs / "c")
    with pytest.raises((StorageError, CampaignError), match=r"No space left on device") as info:
        run_campaign(c, progress=False)
    print(f"\nstopped with: {info.value}")
    assert str(small_fs / "c") in str(info.value)  # names the path
    for shard in (small_fs / "c" / "runs").glob("run-*.parquet"):  # what is visible is whole
        read_shard(shard, campaign="faults", spec_hash=spec.result_hash(), run=int(shard.stem[4:]), n_train=40,
                   n_test=20)
    assert not [p for p in (small_fs / "c").rglob("*") if ".tmp-" in p.name]
    assert not (small_fs / "c" / "state" / "driver.lock").exists()
    _remount(small_fs, "size=64m")
    run_campaign(create_or_open(None, small_fs / "c"), progress=False)
    assert_every_run_once(small_fs / "c", runs)
    assert_same_estimates(small_fs / "c", undisturbed(tmp_path_factory, runs))


def test_read_only_directory_stops_cleanly_and_resumes(ray_session, small_fs, tmp_path_factory):
    from workers.storage import StorageError

    _remount(small_fs, "size=64m")
    c = create_or_open(specs.loads(spec_text(runs=20), "s.toml"), small_fs / "c")
    _remount(small_fs, "ro")
    with pytest.raises(StorageError, match=r"cannot write .*driver.lock.*Read-only file system"):
        run_campaign(c, progress=False)
    _remount(small_fs, "rw")
    run_campaign(create_or_open(None, small_fs / "c"), progress=False)
    assert_every_run_once(small_fs / "c", 20)
    assert_same_estimates(small_fs / "c", undisturbed(tmp_path_factory, 20))


def test_failure_budget_stops_the_campaign(ray_session, tmp_path):
    from orchestrator.campaign import CampaignError

    c = create_or_open(specs.loads(spec_text(runs=40, dataset="fail_always = true", max_failures=3), "s.toml"),
                       tmp_path / "c")
    with pytest.raises(CampaignError, match=r"more than the failure budget \(\[resources\] max_failures = 3, i.e. "
                                            r"3 runs\).*first: RuntimeError: this trainer always fails"):
        run_campaign(c, progress=False)
    assert 4 <= len(list(c.paths.failed_dir.glob("*.json"))) < 40


def test_collapsed_runs_are_failed_not_folded(ray_session, tmp_path):
    c = create_or_open(specs.loads(spec_text(runs=60, dataset="garbage_every = 7", max_failures=60), "s.toml"),
                       tmp_path / "c")
    report = run_campaign(c, progress=False)
    bad = {r for r in range(60) if c.plan.seeds[r] % 7 == 0}
    assert bad and set(report.failed) <= bad  # only garbage runs fail
    reasons = [json.loads(p.read_text())["reason"] for p in c.paths.failed_dir.glob("*.json")]
    assert reasons and all("far below the campaign's median" in r for r in reasons)
    summary = json.loads(c.paths.summary.read_text())
    assert summary["runs"]["folded"] == 60 - len(report.failed) and summary["failed_runs"] == len(report.failed)


BAD_INPUTS = [
    ("malformed TOML", lambda s: s.replace("runs = 20", "runs = = 20"), "not valid TOML"),
    ("unknown key", lambda s: s.replace("[model]", "[model]\nwidht = 3"), None),
    ("wrong type", lambda s: s.replace("runs = 20", 'runs = "20"'), "key 'runs' must be an integer"),
    ("ratio out of range", lambda s: s.replace("subset_ratio = 0.5", "subset_ratio = 1.5"), "strictly between 0 and 1"),
    ("fewer than 2 runs", lambda s: s.replace("runs = 20", "runs = 1"), "'runs' must be an integer >= 2"),
    ("subset larger than the data", lambda s: s.replace("subset_ratio = 0.5", "subset_ratio = 0.99"),
     "gives subsets of 40 of the 40 training examples"),
    ("unknown dataset", lambda s: s.replace('"fault_plugins:blobs"', '"cifar-1000"'), "unknown name 'cifar-1000'"),
    ("unknown model", lambda s: s.replace('trainer = "fault_plugins:knn"', "").replace('"mlp"', '"vit"'),
     "unknown name 'vit'"),
    ("plug-in path that does not resolve", lambda s: s.replace('"fault_plugins:knn"', '"fault_plugins:nope"'),
     "module 'fault_plugins' has no callable 'nope'"),
    ("plug-in module that does not import", lambda s: s.replace('"fault_plugins:blobs"', '"no_such_pkg.data:load"'),
     "cannot import module 'no_such_pkg.data'"),
    ("dataset with wrong labels", lambda s: s.replace('"fault_plugins:blobs"', '"fault_plugins:bad_labels"'),
     "y_train must lie in [0, 3)"),
]


@pytest.mark.parametrize("name,edit,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, name, edit, message):
    from click.testing import CliRunner

    from orchestrator.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text(edit(spec_text(runs=20)))
    r = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "c"), "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ")
    assert (message or "unknown key(s) widht") in r.output
    assert not (tmp_path / "c").exists()


def test_resume_with_a_result_changing_spec_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    spec = write_spec(tmp_path / "s.toml", runs=20)
    create_or_open(specs.load(spec), tmp_path / "c")
    before = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    spec.write_text(spec_text(runs=20).replace("seed = 7", "seed = 8"))
    r = CliRunner().invoke(main, ["run", str(spec), "--out", str(tmp_path / "c")], catch_exceptions=False)
    assert r.exit_code == 2 and "campaign.seed: 7 in" in r.output and "8 in the new spec" in r.output
    assert {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()} == before
