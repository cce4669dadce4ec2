"""Run by tests/test_foldpool.py in its own process (the test session already holds a Ray): a
three-node Ray cluster on this machine (ray.cluster_utils.Cluster, one CPU a node), then
`longtail estimate DIR --address ... --fold-actors 3`, and the exactly-once checks through the API.
Prints one JSON line. Usage: python foldpool_cluster.py CAMPAIGN_DIR"""

from __future__ import annotations

import json
import socket
import sys

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args() -> dict:  # Ray's fixed agent ports would collide with the test session's Ray
    return {"num_cpus": 1, "dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
            "runtime_env_agent_port": free_port()}


def start_cluster():
    """A head and two more nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**node_args(), "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(**node_args())
    cluster.wait_for_nodes()
    return cluster


def main(root: str) -> None:
    import ray

    cluster = start_cluster()
    try:
        print(json.dumps(checks(root, cluster)))
    finally:
        ray.shutdown()
        cluster.shutdown()


def checks(root: str, cluster) -> dict:
    """`longtail estimate --fold-actors 3` on the cluster (this process is not yet connected to it), then
    the exactly-once checks through the API; leaves this process connected."""
    import ray
    from click.testing import CliRunner

    from orchestrator.fold import Aggregator
    from orchestrator.campaign import create_or_open
    from orchestrator.cli import main as cli
    from orchestrator.driver import RunReport, fold_existing
    from orchestrator.foldpool import FoldPool

    out = {}
    r = CliRunner().invoke(cli, ["estimate", root, "--top", "0", "--address", cluster.address,
                                 "--fold-actors", "3"], catch_exceptions=False)
    out["cli_exit"], out["cli_output"] = r.exit_code, r.output
    out["nodes"] = sum(n["Alive"] for n in ray.nodes())
    c = create_or_open(None, root, load_data=False)
    pool = FoldPool(ray, c.paths.root, 3, batch=2)
    # three one-CPU actors on three one-CPU nodes: one per node
    out["actor_nodes"] = len(set(ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                                          for a in pool.actors])))
    spread = Aggregator(c, from_scratch=True)
    report = RunReport(planned=c.plan.runs, already_done=0)
    fold_existing(c, spread, report, reject=False, pool=pool)
    here = Aggregator(c, from_scratch=True)
    fold_existing(c, here, RunReport(planned=c.plan.runs, already_done=0), reject=False)
    spread.flush()
    here.flush()
    a, b = spread.checkpoint_arrays(), here.checkpoint_arrays()
    out["equal"] = sorted(a) == sorted(b) and all(
        np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)  # NaN: runs never folded
    out["folded"] = int(spread.folded.sum())
    out["rejected"] = report.rejected
    # exactly once: the pool offers every run again, and twice in one call; nothing is added
    runs = sorted(spread.folded_runs()) + sorted(spread.folded_runs())[:3]
    seen = list(pool.read(runs))
    out["read_again"] = len(seen)
    out["added_again"] = sum(spread.add(r, d) for r, d, _ in seen if d is not None)
    spread.flush()
    out["folded_after"] = int(spread.folded.sum())
    out["runs_after"] = int(spread.stats.runs)
    pool.shutdown()
    return out


if __name__ == "__main__":
    main(sys.argv[1])
