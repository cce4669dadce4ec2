"""Orchestration overhead, on the embedded Ray, with learners that take a known time.

    .venv/bin/python benchmarks/overhead.py [--runs 40] [--trivial 2000]

1. CPU-bound runs of 1 s each (a learner that keeps its core busy for 1 s of CPU time, so that the
   driver's own CPU competes with the runs as it does with training): overhead = (wall x workers -
   sum of the runs' own times) / sum of the runs' own times, over the window from the first dispatch
   to the last result (shards written, verified, folded, checkpoints included; Ray's start-up
   excluded and printed). One worker per CPU, so the driver has no core of its own. Goal: <= 5%.
2. Trivial runs (a learner that returns at once): runs per second the whole machinery sustains,
   shards and folding included, with 64 runs per worker call (`[resources] pack = 64`; with the
   default of 1 run per call for plug-in learners the rate is lower, printed too). Goal: >= 500 runs/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import pyarrow.parquet as pq

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.driver import run_campaign

SPEC = """
[campaign]
name = "{name}"
runs = {runs}
subset_ratio = 0.5
[dataset]
name = "bench_plugins:blobs"
[model]
name = "mlp"
[train]
trainer = "bench_plugins:{trainer}"
[resources]
pack = {pack}
[estimates]
checkpoint_seconds = 5
influence = "none"
split_half = false
"""


def campaign(root: str, name: str, runs: int, trainer: str, pack: int):
    spec = specs.loads(SPEC.format(name=name, runs=runs, trainer=trainer, pack=pack), "bench.toml")
    c = create_or_open(spec, f"{root}/{name}")
    t0 = time.perf_counter()
    report = run_campaign(c, progress=False)
    return c, report, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--trivial", type=int, default=2000)
    a = ap.parse_args()
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    workers = int(ray.cluster_resources()["CPU"])
    root = tempfile.mkdtemp(prefix="lt-overhead-")
    try:
        c, report, whole = campaign(root, "second", a.runs, "one_cpu_second", 1)
        measured = sum(json.loads(pq.read_schema(c.paths.shard(r)).metadata[b"longtail"])["train_seconds"]
                       for r in range(a.runs))
        # each run needs exactly 1 s of CPU: time it spent waiting for a core (the driver's work) is
        # overhead, so the runs' own time is 1 s each, not their measured wall time
        own = float(a.runs)
        print(f"  (the runs' measured wall times sum to {measured:.1f} s for {own:.0f} s of CPU)")
        wall = report.training_seconds
        overhead = (wall * workers - own) / own
        print(f"orchestration overhead, {a.runs} CPU-bound runs of 1 s on {workers} workers")
        print(f"  sum of the runs' own times {own:.1f} s; first dispatch to last result {wall:.2f} s; whole call "
              f"{whole:.1f} s")
        print(f"  overhead (wall x workers - own) / own = {overhead:.1%} (goal <= 5%)")
        c, report, whole = campaign(root, "trivial", a.trivial, "trivial", 64)
        rate = a.trivial / report.training_seconds
        print(f"trivial runs, pack = 64: {a.trivial} in {report.training_seconds:.2f} s = {rate:.0f} runs/s "
              f"(goal >= 500; shards written, verified and folded)")
        n1 = max(100, a.trivial // 5)
        c, report, whole = campaign(root, "trivial1", n1, "trivial", 1)
        print(f"trivial runs, pack = 1 (the default for plug-in learners): {n1} in {report.training_seconds:.2f} s "
              f"= {n1 / report.training_seconds:.0f} runs/s")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
