"""Fold actors (orchestrator/foldpool.py): the merge of actors' shares, and, on several Ray nodes on
one machine, `longtail estimate --fold-actors` and live campaigns with `[resources] fold_actors`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from synthetic import make_campaign
from test_cluster import processes_with

ROOT = Path(__file__).resolve().parents[1]


def test_merged_shares_equal_one_fold(tmp_path):
    """Aggregator.merge of two fold actors' shares (partial()) equals one Aggregator folding every run:
    bit for bit for 0/1 targets and every per-run row, to rounding for soft sums; a share whose runs the
    fold already holds is refused whole."""
    import numpy as np

    from orchestrator.campaign import CampaignError
    from orchestrator.fold import Aggregator

    c, _ = make_campaign(tmp_path / "m", runs=20, mode="dense", soft='["margin"]')
    whole, merged = Aggregator(c, from_scratch=True), Aggregator(c, from_scratch=True)
    shares = [Aggregator(c, from_scratch=True) for _ in range(2)]
    for r in range(c.plan.runs):
        whole.add(r, whole.read(r))
        if r == 19:  # a run the driver folds itself (as a dead actor's), in no share
            merged.add(r, merged.read(r))
        else:
            shares[r % 2].add(r, shares[r % 2].read(r))
    parts = [s.partial() for s in shares]
    assert merged.merge(parts[0]) == 10 and merged.merge(parts[1]) == 9
    whole.flush()
    merged.flush()
    a, b = whole.checkpoint_arrays(), merged.checkpoint_arrays()
    assert sorted(a) == sorted(b)
    for k in a:
        soft = ".margin." in k or k.startswith("risk.")
        assert (np.allclose(a[k], b[k], rtol=1e-6, equal_nan=True) if soft
                else np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")), k
    before = merged.checkpoint_arrays()
    with pytest.raises(CampaignError, match="already holds"):
        merged.merge(parts[0])
    after = merged.checkpoint_arrays()
    assert all(np.array_equal(before[k], after[k], equal_nan=before[k].dtype.kind == "f") for k in before)


def test_summary_counts_of_shares_are_counted_by_the_driver(tmp_path, monkeypatch):
    """Out-of-subset predictions counted by a Misra-Gries summary (which two actors cannot merge): a
    share keeps each run's predictions and the merge counts them in the driver's summary, exactly as
    the driver counting those runs in that order."""
    import numpy as np

    import synthetic
    from orchestrator.fold import Aggregator

    monkeypatch.setattr(synthetic, "SPEC", synthetic.SPEC + "triage_slots = 2\n")
    c, _ = make_campaign(tmp_path / "mg", runs=12, mode="topk", soft="[]", memory_gb=1e-7)
    merged, ordered, share = (Aggregator(c, from_scratch=True) for _ in range(3))
    assert not merged.proxies.oos.dense
    share.defer_summary_counts()
    for r in range(c.plan.runs):
        share.add(r, share.read(r))
        ordered.add(r, ordered.read(r))
    assert merged.merge(share.partial()) == 12
    ordered.flush()
    a, b = ordered.proxies.oos.arrays(), merged.proxies.oos.arrays()
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert int(a["total"].sum()) > 0


@pytest.fixture(scope="module")
def on_three_nodes(tmp_path_factory):
    """tests/foldpool_live.py once, on one three-node cluster: the refold checks of
    tests/foldpool_cluster.py, a live campaign with fold actors, and one whose driver is SIGKILLed
    while its actors hold unmerged runs, then resumed. The cluster runs in its own process (this
    session already holds a Ray), with a private RAY_TMPDIR; whatever it leaves is killed by process id."""
    work = tmp_path_factory.mktemp("fold-nodes")
    c, _ = make_campaign(work / "fp", runs=24, mode="topk", soft="[]")
    damaged = c.paths.shard(5)
    damaged.write_bytes(damaged.read_bytes()[:300])  # truncated: must be left out, by name
    ray_tmp = tempfile.mkdtemp(prefix="lt-fp-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]))
    try:
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "foldpool_live.py"), str(work / "live"),
                            str(c.paths.root)], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    finally:
        for pid in processes_with(ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in out.items() if k != "refold"}))  # shown when a test fails (or with -s)
    return out, r.stderr


@pytest.mark.slow
def test_fold_actors_on_three_nodes(on_three_nodes):
    """`longtail estimate --fold-actors 3`: the refold equals the in-process one exactly, a damaged
    shard is left out and named, and every run is folded exactly once however often the actors send it."""
    result, stderr = on_three_nodes
    out = result["refold"]
    assert out["cli_exit"] == 0, out["cli_output"]
    assert "23/24 runs folded" in out["cli_output"] and "left out" in out["cli_output"] + stderr
    assert out["nodes"] == 3 and out["actor_nodes"] == 3
    assert out["equal"] and out["folded"] == 23 and out["rejected"] == [5]
    assert out["read_again"] == 23 and out["added_again"] == 0
    assert out["folded_after"] == 23 and out["runs_after"] == 23


@pytest.mark.slow
def test_live_fold_actors_fold_as_the_driver_does(on_three_nodes):
    """A live campaign with [resources] fold_actors = 3 on three nodes (resumed after a SIGKILL, next
    test): the actors read, verify and fold every shard that arrives (the driver reads only the
    shards its checkpoint lacked), a truncated shard is rejected and recorded as a failure, and
    state/fold.npz and estimates/ equal the driver's own fold: bit for bit for 0/1 targets, to
    rounding for soft ones."""
    out, stderr = on_three_nodes
    assert out["nodes"] == 3
    assert "3 fold actors on 3 nodes" in stderr
    assert out["driver_reads"] == out["shards_at_kill"] - out["folded_at_kill"]
    assert out["rejected"] == [20] and out["failed"] == [20]
    assert out["fold"]["differ"] == [] and out["fold"]["compared"] > 20, out["fold"]
    assert out["estimates_differ"] == []


@pytest.mark.slow
def test_resume_after_a_sigkilled_driver_with_fold_actors(on_three_nodes):
    """The driver is SIGKILLed while its fold actors hold runs not yet merged: the checkpoint lacks them,
    the next driver (fold actors on) refolds them from their shards, and every run is folded once."""
    out, _ = on_three_nodes
    assert out["child_rc"] == -signal.SIGKILL, out["child"]
    assert out["child"]["folded_in_actors"], out["child"]  # the actors had folded runs the driver never merged
    assert 0 < out["folded_at_kill"] < out["shards_at_kill"]  # merged work was saved, unmerged work lost
    assert out["resumed_already_done"] == out["shards_at_kill"]
    assert out["resumed_trained"] == 24 - out["shards_at_kill"] - 1  # run 20's shard was rejected
    assert out["folded"] == 23 and out["runs_counted"] == 23
    assert out["fold"]["differ"] == [], out["fold"]
