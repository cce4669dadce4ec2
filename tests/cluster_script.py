"""Run a campaign on a three-node Ray cluster on this machine, remove a node mid-campaign (SIGKILL),
add a bigger one later, and print what happened as JSON. Run in its own process by
tests/test_faults.py: a process can hold only one Ray cluster, and the test session already has one.

    python tests/cluster_script.py SPEC OUT
"""

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "tests")]
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="lt-cl-"))  # Cluster.add_node needs it (ray.md)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from orchestrator import spec as specs  # noqa: E402
from orchestrator.campaign import create_or_open  # noqa: E402
from orchestrator.driver import run_campaign  # noqa: E402


def shards(out: Path) -> int:
    return len(list((out / "runs").glob("run-*.parquet")))


def main(spec_path: str, out: str) -> None:
    out = Path(out)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    campaign = create_or_open(specs.load(spec_path), out)
    result = {}

    def drive():
        try:
            r = run_campaign(campaign, progress=False)
            result.update(trained=r.trained, retried=r.retried, failed=r.failed, complete=r.complete)
        except Exception as e:  # reported, and the test fails on it
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=drive)
    thread.start()
    events = []
    while thread.is_alive() and shards(out) < 15:
        time.sleep(0.1)
    events.append({"removed_node_at_shard": shards(out)})
    cluster.remove_node(doomed, allow_graceful=False)
    while thread.is_alive() and shards(out) < 30:
        time.sleep(0.1)
    added = cluster.add_node(num_cpus=2)
    events.append({"added_node_at_shard": shards(out), "added_node": added.node_id})
    thread.join()
    result.update(events=events, removed_node=doomed.node_id, added_node=added.node_id)
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
