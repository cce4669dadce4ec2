"""Orchestration overhead, on the embedded Ray, with learners that take a known time.

    .venv/bin/python benchmarks/overhead.py [--runs 40] [--trivial 2000]

1. Runs of exactly 1 s (a learner that sleeps): overhead = (wall x workers - sum of the runs' own
   times) / sum of the runs' own times, over the window from the first dispatch to the last result
   (shards written, verified, folded, checkpoints included; Ray's start-up excluded and printed).
   Goal: <= 5%.
2. Trivial runs (a learner that returns at once): runs per second the whole machinery sustains,
   shards and folding included, with 64 runs per worker call. Goal: >= 500 runs/s.
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
        c, report, whole = campaign(root, "second", a.runs, "one_second", 1)
        own = sum(json.loads(pq.read_schema(c.paths.shard(r)).metadata[b"longtail"])["train_seconds"]
                  for r in range(a.runs))
        wall = report.training_seconds
        overhead = (wall * workers - own) / own
        print(f"orchestration overhead, {a.runs} runs of 1 s on {workers} workers")
        print(f"  sum of the runs' own times {own:.1f} s; first dispatch to last result {wall:.2f} s; whole call "
              f"{whole:.1f} s")
        print(f"  overhead (wall x workers - own) / own = {overhead:.1%} (goal <= 5%)")
        c, report, whole = campaign(root, "trivial", a.trivial, "trivial", 64)
        rate = a.trivial / report.training_seconds
        print(f"trivial runs: {a.trivial} in {report.training_seconds:.2f} s = {rate:.0f} runs/s "
              f"(goal >= 500; shards written, verified and folded)")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
