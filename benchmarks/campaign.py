"""Campaign throughput: `longtail` on the embedded Ray against a plain sequential loop of the same
recipe in one process, measured side by side in one run.

    .venv/bin/python benchmarks/campaign.py [--runs 400]

The recipe is the demo's (digits, MLP 64-128-10, 20 epochs, 70% subsets). The sequential loop is what
users write by hand: `for r in range(runs): train_run(...)`, one torch thread (faster than two for a
model this small, perf.md section 5), predictions kept in memory, nothing written. longtail's figure
is runs / (first dispatch .. last result), i.e. with shards written, verified and folded, but
without Ray's start-up, which is reported separately. Goal: >= 3x on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from importlib import resources

import numpy as np
import torch

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.driver import run_campaign
from orchestrator.plan import make_plan
from workers.datasets import load_dataset
from workers.models import model_factory
from workers.training import DeviceData, train_run


def sequential(spec: specs.Spec, runs: int) -> float:
    torch.set_num_threads(1)
    data = load_dataset(spec.dataset.as_dict())
    device_data = DeviceData.from_dataset(data, torch.device("cpu"))
    build = model_factory(spec.model.as_dict())
    plan = make_plan("fixed", spec.campaign.seed, data.n_train, spec.campaign.ratios, runs)
    train = spec.to_dict()["train"]
    outputs = []
    start = time.perf_counter()
    for r in range(runs):
        outputs.append(train_run(build, device_data, np.flatnonzero(plan.mask(r)), int(plan.seeds[r]), train))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=400)
    a = ap.parse_args()
    text = resources.files("orchestrator").joinpath("demo.toml").read_text()
    spec = specs.loads(text, "demo.toml")
    spec = spec.replace(campaign=__import__("dataclasses").replace(spec.campaign, runs=a.runs, name="bench"))
    seq = sequential(spec, a.runs)
    out = tempfile.mkdtemp(prefix="lt-bench-")
    try:
        t0 = time.perf_counter()
        report = run_campaign(create_or_open(spec, f"{out}/c"), progress=False)
        whole = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lt = report.training_seconds
    print(f"campaign throughput, digits MLP (demo recipe), {a.runs} runs, {torch.get_num_threads()} torch thread(s) "
          f"in the loop, {__import__('os').cpu_count()} CPUs")
    print("| | seconds | runs/s |")
    print("|---|---|---|")
    print(f"| sequential loop, one process | {seq:.1f} | {a.runs / seq:.1f} |")
    print(f"| longtail, first dispatch to last result | {lt:.1f} | {a.runs / lt:.1f} |")
    print(f"| longtail, whole call (Ray start-up, workers, estimates) | {whole:.1f} | {a.runs / whole:.1f} |")
    print(f"speed-up: {seq / lt:.2f}x while running (goal >= 3x); {seq / whole:.2f}x including start-up")


if __name__ == "__main__":
    main()
