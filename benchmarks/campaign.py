"""Campaign throughput: `longtail` against the loops users write instead, on the same cores, measured
side by side in one run.

    .venv/bin/python benchmarks/campaign.py [--runs 400]

The recipe is the demo's (digits, MLP 64-128-10, 20 epochs, 70% subsets). The alternatives:

1. a plain loop, one process, torch's default threads: `for r in range(runs): train_run(...)`;
2. one process per core, one torch thread each, every process training its share of the runs (how
   datamodels users run, GNU-parallel style); its wall time includes starting the processes, importing
   torch and loading the data, as a user's would.

Both keep predictions in memory and write nothing. longtail is timed twice from one call: the whole
`run_campaign` call as `longtail run` makes it (embedded Ray started by the call, workers, shards
written, verified and folded, estimates), and training only (first dispatch to last result). The
whole call's time is broken down, measured: Ray start, dataset load and preflight (create_or_open),
worker start-up and the rest, training, final estimates. Goals at 400 runs: whole call >= 2x the
per-core loop, training only >= 5x.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from importlib import resources

import numpy as np


def demo_spec(runs: int):
    from orchestrator import spec as specs

    text = resources.files("orchestrator").joinpath("demo.toml").read_text()
    spec = specs.loads(text, "demo.toml")
    return spec.replace(campaign=dataclasses.replace(spec.campaign, runs=runs, name="bench"))


def _train_share(args) -> int:
    """Train runs k, k + P, k + 2P, ... of the plan in this process; returns how many."""
    runs, k, procs, threads = args
    import torch

    from orchestrator.plan import make_plan
    from workers.datasets import load_dataset
    from workers.models import model_factory
    from workers.training import DeviceData, train_run

    if threads:
        torch.set_num_threads(threads)
    spec = demo_spec(runs)
    data = load_dataset(spec.dataset.as_dict())
    device_data = DeviceData.from_dataset(data, torch.device("cpu"))
    build = model_factory(spec.model.as_dict())
    plan = make_plan("fixed", spec.campaign.seed, data.n_train, spec.campaign.ratios, runs)
    train = spec.to_dict()["train"]
    outputs = [train_run(build, device_data, np.flatnonzero(plan.mask(r)), int(plan.seeds[r]), train)
               for r in range(k, runs, procs)]
    return len(outputs)


def plain_loop(runs: int) -> float:
    """One process (a fresh one, so that this script's imports do not help it), default threads."""
    ctx = mp.get_context("spawn")
    start = time.perf_counter()
    with ctx.Pool(1) as pool:
        assert pool.map(_train_share, [(runs, 0, 1, 0)]) == [runs]
    return time.perf_counter() - start


def per_core(runs: int, procs: int) -> float:
    ctx = mp.get_context("spawn")
    start = time.perf_counter()
    with ctx.Pool(procs) as pool:
        assert sum(pool.map(_train_share, [(runs, k, procs, 1) for k in range(procs)])) == runs
    return time.perf_counter() - start


def longtail(runs: int) -> dict:
    from orchestrator.campaign import create_or_open
    from cluster.connect import ray_init
    from orchestrator.driver import run_campaign

    out = tempfile.mkdtemp(prefix="lt-bench-")
    try:
        t0 = time.perf_counter()
        ray, _, _ = ray_init(None)  # the embedded Ray `longtail run` starts, timed on its own
        t1 = time.perf_counter()
        c = create_or_open(demo_spec(runs), f"{out}/c")
        t2 = time.perf_counter()
        report = run_campaign(c, progress=False)
        t3 = time.perf_counter()
        ray.shutdown()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"whole": t3 - t0, "ray": t1 - t0, "create": t2 - t1, "training": report.training_seconds,
            "estimates": report.estimate_seconds,
            "rest": (t3 - t2) - report.training_seconds - report.estimate_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=400)
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    loop = plain_loop(a.runs)
    parallel = per_core(a.runs, cores)
    lt = longtail(a.runs)
    r = a.runs
    print(f"campaign throughput, demo recipe (digits, MLP 64-128-10, 20 epochs), {r} runs, {cores} CPUs, "
          f"measured side by side in one run")
    print("| | seconds | runs/s |")
    print("|---|---|---|")
    print(f"| plain loop, one process, torch's default threads | {loop:.1f} | {r / loop:.1f} |")
    print(f"| one process per core ({cores}), one thread each | {parallel:.1f} | {r / parallel:.1f} |")
    print(f"| longtail, whole call | {lt['whole']:.1f} | {r / lt['whole']:.1f} |")
    print(f"| longtail, training only (first dispatch to last result) | {lt['training']:.1f} | "
          f"{r / lt['training']:.1f} |")
    print(f"whole call: {parallel / lt['whole']:.2f}x the per-core loop (goal >= 2x), {loop / lt['whole']:.2f}x the "
          f"plain loop; training only: {parallel / lt['training']:.2f}x the per-core loop (goal >= 5x), "
          f"{loop / lt['training']:.2f}x the plain loop")
    print(f"where the whole call's {lt['whole']:.1f} s go: Ray start {lt['ray']:.1f} s, dataset load and preflight "
          f"{lt['create']:.1f} s, worker start-up, folding and the rest {lt['rest']:.1f} s, training "
          f"{lt['training']:.1f} s, final estimates {lt['estimates']:.1f} s")


if __name__ == "__main__":
    main()
