"""K MLP runs trained one by one (training.train_run) against one batched call (ensemble.train_runs),
measured side by side in one process.

    .venv/bin/python benchmarks/ensemble.py [--k 16] [--repeats 3] [--threads 1] [--design fixed]

The demo recipe on digits: MLP 64-128-10, 20 epochs, batch 128, SGD lr 0.1, Nesterov momentum 0.9,
weight decay 5e-4, each run on its own fixed 70% subset (1,007 of 1,438 examples, 8 steps per epoch;
--design bernoulli draws each example with probability 0.7 instead: 8 or 9 steps), then every train and
test example predicted. Each repetition times K sequential train_run calls and
one train_runs call of K, back to back (wall time of the whole call, evaluation included), after one
untimed warm-up of each; the report gives the median over repetitions (min-max in brackets) and the
ratio of the medians (goal >= 2x on a CPU). Both ways train the same subsets with the same seeds, so
their accuracies agree to rounding (printed as a check).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from workers.datasets import load_dataset
from workers.ensemble import train_runs
from workers.models import model_factory
from workers.training import DeviceData, train_run

MODEL = {"hidden": [128], "dropout": 0.0}
TRAIN = dict(epochs=20, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="constant", label_smoothing=0.0, eval_batch_size=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=16, help="runs per comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--design", choices=("fixed", "bernoulli"), default="fixed", help="how subsets are drawn")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    dd = DeviceData.from_dataset(data, torch.device("cpu"))
    rng = np.random.default_rng(0)
    m = round(0.7 * data.n_train)
    if a.design == "fixed":
        subsets = [np.sort(rng.choice(data.n_train, m, replace=False)) for _ in range(a.k)]
    else:
        subsets = [np.flatnonzero(rng.random(data.n_train) < 0.7) for _ in range(a.k)]
    sizes = f"{m} of {data.n_train}" if a.design == "fixed" else \
        f"{min(map(len, subsets))}-{max(map(len, subsets))} of {data.n_train}"
    seeds = list(range(a.k))
    build = model_factory({"name": "mlp", **MODEL})

    def sequential():
        return [train_run(build, dd, s, seed, TRAIN) for s, seed in zip(subsets, seeds)]

    def batched():
        return train_runs(MODEL, dd, subsets, seeds, TRAIN)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    sequential(), batched()  # warm-up: allocator, kernels, lazy imports
    times: dict[str, list[float]] = {"sequential": [], "batched": []}
    outs = {}
    for _ in range(a.repeats):
        for name, fn in (("sequential", sequential), ("batched", batched)):
            seconds, outs[name] = timed(fn)
            times[name].append(seconds)

    def acc(outputs):
        return np.mean([(o.test_pred == data.y_test).mean() for o in outputs])

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"ensemble benchmark: torch {torch.__version__}, {platform.machine()}, {a.threads} thread(s), "
          f"K={a.k}, median of {a.repeats}")
    print(f"recipe: digits MLP 64-128-10, {TRAIN['epochs']} epochs, batch {TRAIN['batch_size']}, sgd lr 0.1 "
          f"nesterov 0.9, wd 5e-4, {a.design} 70% subsets ({sizes})")
    print("| mode | K runs, median s (min-max) | runs/s | ms/run | mean test accuracy |")
    print("|---|---|---|---|---|")
    for name, label in (("sequential", "sequential train_run"), ("batched", "one train_runs call")):
        ts = times[name]
        print(f"| {label} | {med[name]:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {a.k / med[name]:.1f} | "
              f"{1000 * med[name] / a.k:.0f} | {acc(outs[name]):.4f} |")
    print(f"speed-up (median sequential / median batched): {med['sequential'] / med['batched']:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
