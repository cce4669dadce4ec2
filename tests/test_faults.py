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
from orchestrator.fold import Aggregator
from orchestrator.driver import RunReport, fold_existing, run_campaign
from orchestrator.estimates_files import write_estimates
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
        else:  # byte for byte, column by column (NaN, an estimate without runs, equals NaN)
            ta, tb = pq.read_table(a), pq.read_table(b)
            assert ta.schema.equals(tb.schema) and ta.num_rows == tb.num_rows, name
            for col in ta.column_names:
                x, y = ta[col].to_numpy(zero_copy_only=False), tb[col].to_numpy(zero_copy_only=False)
                assert x.tobytes() == y.tobytes() if x.dtype.kind in "fiub" else (x == y).all(), (name, col)


def assert_every_run_once(root: Path, runs: int) -> None:
    shards = sorted((root / "runs").glob("run-*.parquet"))
    assert len(shards) == runs  # nothing lost
    with np.load(root / "state" / "fold.npz") as z:
        assert z["folded"].sum() == runs and int(z["group0.runs"]) == runs  # each folded exactly once
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]  # nothing half-written left


def reference_of_runs(reference: Path, keep, tmp: Path) -> Path:
    """The estimates an undisturbed campaign gives from the runs `keep` alone: its directory copied,
    the other runs' shards and the checkpoint removed, the rest folded again."""
    root = tmp / "subset"
    shutil.copytree(reference, root)
    (root / "state" / "fold.npz").unlink()
    for shard in (root / "runs").glob("run-*.parquet"):
        if int(shard.stem[4:]) not in set(keep):
            shard.unlink()
    c = create_or_open(None, root)
    agg = Aggregator(c)
    fold_existing(c, agg, RunReport(planned=c.plan.runs, already_done=0))
    write_estimates(agg, complete=False, final=True)
    return root


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
    assert_every_run_once(out, runs)  # no temporary file left, every run folded once
    assert not (out / "state" / "driver.lock").exists()  # nor the lock
    assert_same_estimates(out, undisturbed(tmp_path_factory, runs))


def test_worker_killed_mid_run(ray_session, tmp_path, tmp_path_factory):
    marker = tmp_path / "died"
    c = create_or_open(specs.loads(spec_text(runs=40, dataset=f'die_marker = "{marker}"'), "s.toml"), tmp_path / "c")
    report = run_campaign(c, progress=False)
    # the dead worker held up to two runs (max_in_flight = 2 per worker): both went back in the queue
    assert marker.exists() and 1 <= report.retried <= 2 and report.complete and not report.failed
    assert_every_run_once(c.paths.root, 40)
    assert_same_estimates(c.paths.root, undisturbed(tmp_path_factory, 40))


def test_a_dead_writers_temporary_shard_is_removed_when_its_run_is_redone(ray_session, tmp_path, tmp_path_factory,
                                                                          capfd):
    """A worker killed while writing leaves runs/.run-N.parquet.tmp-*; it is removed when run N is
    dispatched again (not only by the next driver), so the campaign completes with no temporary file."""
    root = tmp_path / "c"
    c = create_or_open(specs.loads(spec_text(runs=40, dataset=f'die_writing = "{root}"'), "s.toml"), root)
    report = run_campaign(c, progress=False)
    err = capfd.readouterr().err
    assert (root / "died").exists() and report.retried >= 1 and report.complete
    assert "removed the temporary shard of run" in err and ".tmp-0123456789ab" in err, err
    (root / "died").unlink()
    assert_every_run_once(root, 40)
    assert_same_estimates(root, undisturbed(tmp_path_factory, 40))


def test_a_run_that_keeps_killing_its_worker_fails_after_max_retries(ray_session, tmp_path, tmp_path_factory):
    text = spec_text(runs=6, max_failures=6).replace('"fault_plugins:knn"', '"fault_plugins:knn_dies_always"')
    c = create_or_open(specs.loads(text + "\n", "s.toml").replace(
        resources=specs.ResourcesSection(max_retries=1, max_failures=6)), tmp_path / "c")
    report = run_campaign(c, progress=False)
    odd = [r for r in range(6) if c.plan.seeds[r] % 2]
    assert odd and report.failed == odd and report.trained == 6 - len(odd)
    reason = json.loads(c.paths.failure(odd[0]).read_text())["reason"]
    assert "its worker died 2 times" in reason and "max_retries = 1" in reason
    reasons = json.loads(c.paths.summary.read_text())["failure_reasons"]
    # grouped as one reason, shown with its values (issue 12: a "#" hid them)
    assert list(reasons.values()) == [len(odd)] and "its worker died 2 times" in next(iter(reasons))
    survivors = [r for r in range(6) if r not in odd]
    with np.load(c.paths.checkpoint) as z:
        assert np.flatnonzero(z["folded"]).tolist() == survivors  # the failed runs are not folded
    assert_same_estimates(c.paths.root, reference_of_runs(undisturbed(tmp_path_factory, 6), survivors, tmp_path))


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
    assert result["retried"] >= 1, result  # the runs on the dead node went back in the queue
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
    assert not c.paths.shard(0).exists() and result.shard[:4] == b"PAR1"


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


def test_a_second_driver_is_refused_and_a_dead_ones_lock_taken_over(address, tmp_path, tmp_path_factory):
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
    assert_same_estimates(out, undisturbed(tmp_path_factory, 40))


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
    # no estimate to compare: nothing was folded, and no shard exists that could be folded later
    assert not list(c.paths.runs_dir.glob("run-*.parquet"))
    assert not c.paths.checkpoint.exists() or not np.load(c.paths.checkpoint)["folded"].any()


def test_collapsed_runs_are_failed_not_folded(ray_session, tmp_path, tmp_path_factory):
    """Every collapsed run is refused, those among the first ten too (they arrive before a median of
    ten accuracies exists and are held until it does); the estimates are those of the good runs alone."""
    c = create_or_open(specs.loads(spec_text(runs=60, dataset="garbage_every = 7", max_failures=60), "s.toml"),
                       tmp_path / "c")
    bad = {r for r in range(60) if c.plan.seeds[r] % 7 == 0}
    assert bad & set(range(10)), "the test needs collapsed runs among the first ten"
    report = run_campaign(c, progress=False)
    assert set(report.failed) == bad  # all collapsed runs, and only those
    with np.load(c.paths.checkpoint) as z:
        assert set(np.flatnonzero(z["folded"]).tolist()) == set(range(60)) - bad
    reasons = [json.loads(p.read_text())["reason"] for p in c.paths.failed_dir.glob("*.json")]
    assert len(reasons) == len(bad) and all("far below the campaign's median" in r for r in reasons)
    summary = json.loads(c.paths.summary.read_text())
    assert summary["runs"]["folded"] == 60 - len(bad) and summary["failed_runs"] == len(bad)
    # bit for bit: the fold of the good runs' shards alone, in a campaign that never saw a collapsed one
    ref = create_or_open(c.spec, tmp_path_factory.mktemp("good") / "c")
    ref.paths.runs_dir.mkdir(parents=True, exist_ok=True)
    for r in set(range(60)) - bad:
        shutil.copy(c.paths.shard(r), ref.paths.shard(r))
    agg = Aggregator(ref)
    fold_existing(ref, agg, RunReport(planned=60, already_done=0))
    write_estimates(agg, complete=False, final=True)
    assert_same_estimates(c.paths.root, ref.paths.root)


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


# --- packed MLP campaigns under faults -----------------------------------------------------------------

PACKED = """
[campaign]
name = "packed"
seed = 3
runs = 32
subset_ratio = 0.7
design = "{design}"
[dataset]
name = "digits"
[model]
name = "mlp"
hidden = [16]
[train]
epochs = {epochs}
[resources]
pack = 8
cpus_per_worker = 1
[estimates]
checkpoint_seconds = 0.3
influence = "dense"
soft = ["margin"]
"""


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (the Ray of this test session is started by this process: its raylet
    and workers are below it, so no other Ray on the machine is touched)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def kill_a_worker_mid_call(campaign: str, deadline: float, driver_process) -> int | None:
    """SIGKILL a worker while it is inside a packed call (Ray titles the process after the task it runs,
    "ray::longtail:<campaign>:runs <first>-<last>"); returns its pid, or None if none was seen."""
    title = f"ray::longtail:{campaign}:runs "
    while time.time() < deadline and driver_process.poll() is None:
        busy = [p for p in _descendants(os.getpid()) if _title(p).startswith(title)]
        if busy:
            time.sleep(0.15)  # well into its call (one call here takes about a second)
            if _title(busy[0]).startswith(title):
                os.kill(busy[0], 9)
                return busy[0]
        time.sleep(0.01)
    return None


def assert_same_shards(root: Path, reference: Path, runs: int) -> None:
    """Every run's predictions and soft values equal, bit for bit (the metadata differs: hosts, times)."""
    c = create_or_open(None, reference)
    for r in range(runs):
        a, b = (Aggregator(c, from_scratch=True).read(r) if d is reference else
                read_shard(d / "runs" / f"run-{r:06d}.parquet", campaign=c.name, spec_hash=c.spec.result_hash(),
                           run=r, n_train=c.n_train, n_test=c.n_test) for d in (root, reference))
        assert a.train_correct.tobytes() == b.train_correct.tobytes() and \
            a.test_correct.tobytes() == b.test_correct.tobytes(), f"run {r}"
        for split in ("train_values", "test_values"):
            for key, v in getattr(a, split).items():
                assert v.tobytes() == getattr(b, split)[key].tobytes(), (r, split, key)


@pytest.mark.slow
@pytest.mark.parametrize("design", ["fixed", "bernoulli", "balanced", "paired"])
def test_packed_campaign_survives_a_worker_and_a_driver_sigkill(address, tmp_path, tmp_path_factory, design):
    """A worker SIGKILLed inside a call of 8 MLP runs, then the driver (a `longtail run` process)
    SIGKILLed mid-campaign; the next driver resumes. Every run is folded exactly once; every shard is
    bit-identical to the undisturbed campaign's (the dead call's runs were retried alone, the rest
    regrouped: a run's output does not depend on its pack-mates), and so is every estimate, soft ones
    included."""
    runs = 32
    spec = tmp_path / "s.toml"
    spec.write_text(PACKED.format(design=design, epochs=40))  # 40 epochs: a call lasts about a second
    out = tmp_path / "c"
    first = driver(spec, out, address)
    killed = kill_a_worker_mid_call("packed", time.time() + 180, first)
    assert killed, "no worker was seen inside a packed call:\n" + (first.stdout.read() if first.poll() else "")
    deadline = time.time() + 120
    while shard_count(out) < 8 and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first driver finished before it could be killed:\n" + first.stdout.read()
    first.kill()
    first.wait()
    log = first.stdout.read()
    at_kill = shard_count(out)
    assert "died; run" in log and "goes back in the queue" in log, log  # the dead call's runs were retried
    assert 0 < at_kill < runs, at_kill
    t0 = time.time()
    c = create_or_open(None, out)  # the next driver, in this process (a new process costs ~20 s here)
    assert run_campaign(c, progress=False).complete
    t1 = time.time()
    print(f"\n{design}: worker {killed} killed mid-call, driver killed with {at_kill} of {runs} shards; runs lost: 0")
    assert_every_run_once(out, runs)
    assert not (out / "state" / "driver.lock").exists()
    ref = tmp_path_factory.mktemp("undisturbed") / "c"
    run_campaign(create_or_open(specs.load(spec), ref), progress=False)
    print(f"resume {t1 - t0:.1f} s, undisturbed {time.time() - t1:.1f} s")
    assert_same_shards(out, ref, runs)
    # Every estimate bit for bit: 0/1 sums are integer counts, soft (margin) sums exact fixed-point
    # float64 (estimators/stats.py), so neither depends on which runs were folded together.
    a, b = (pq.read_table(d / "estimates" / "memorization.parquet") for d in (out, ref))
    assert a.column_names == b.column_names
    for name in a.column_names:  # by bytes: a standard error with one run out is NaN in both, and NaN != NaN
        x, y = a[name].to_numpy(zero_copy_only=False), b[name].to_numpy(zero_copy_only=False)
        assert x.tobytes() == y.tobytes(), name
    for name in ("influence.npy", "influence_se.npy", "influence_margin.npy", "influence_margin_se.npy"):
        assert np.load(out / "estimates" / name).tobytes() == np.load(ref / "estimates" / name).tobytes(), name
    assert pq.read_table(out / "estimates" / "high_influence_pairs.parquet").equals(
        pq.read_table(ref / "estimates" / "high_influence_pairs.parquet"))
