"""Shard reading spread over several Ray nodes on one machine (orchestrator/foldpool.py): the refold
equals the in-process one exactly, a damaged shard is left out and named, and every run is folded
exactly once however often the actors send it. The cluster runs in its own process (this session
already holds a Ray), with a private RAY_TMPDIR; whatever it leaves is killed by process id."""

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


@pytest.mark.slow
def test_fold_actors_on_three_nodes(tmp_path):
    c, _ = make_campaign(tmp_path / "fp", runs=24, mode="topk", soft="[]")
    damaged = c.paths.shard(5)
    damaged.write_bytes(damaged.read_bytes()[:300])  # truncated: must be left out, by name
    ray_tmp = tempfile.mkdtemp(prefix="lt-fp-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]))
    try:
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "foldpool_cluster.py"), str(c.paths.root)],
                           env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    finally:
        for pid in processes_with(ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cli_exit"] == 0, out["cli_output"]
    assert "23/24 runs folded" in out["cli_output"] and "left out" in out["cli_output"] + r.stderr
    assert out["nodes"] == 3 and out["actor_nodes"] == 3
    assert out["equal"] and out["folded"] == 23 and out["rejected"] == [5]
    assert out["read_again"] == 23 and out["added_again"] == 0
    assert out["folded_after"] == 23 and out["runs_after"] == 23
