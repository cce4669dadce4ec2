"""Fold throughput against this machine's GEMM rate, measured side by side in one run.

    .venv/bin/python benchmarks/fold.py [--n 20000] [--n-test 10000] [--runs 4000] [--block 256]

Prints: the float32 GEMM rate of numpy at the fold's shape (n x block) @ (block x n_test); the fold's
rate over `runs` runs (the same GEMM plus the bool->float conversions and per-example sums) as a
share of it (goal >= 50%); and the dense epilogue (influence and standard error for every pair) as
a share of the fold's GEMM time (goal <= 25%). 4,000 runs is the paper's CIFAR-100 campaign; the
train set is cut to 20,000 examples so that the run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from estimators import estimates as est
from estimators import stats as st


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--block", type=int, default=256)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    masks = rng.random((a.runs, a.n)) < 0.7
    train = rng.random((a.runs, a.n)) < 0.9
    test = rng.random((a.runs, a.n_test)) < 0.8

    m32 = masks[: a.block].astype(np.float32)
    c32 = test[: a.block].astype(np.float32)
    out = np.empty((a.n, a.n_test), np.float32)
    gemm = best_of(lambda out=out: np.matmul(m32.T, c32, out=out))
    flop_block = 2.0 * a.n * a.n_test * a.block
    machine = flop_block / gemm
    del out

    stats = st.zeros(a.n, a.n_test)
    t0 = time.perf_counter()
    for b in range(0, a.runs, a.block):
        sl = slice(b, b + a.block)
        st.fold(stats, masks[sl], {"correct": train[sl]}, {"correct": test[sl]})
    fold_s = time.perf_counter() - t0
    fold_rate = flop_block * (a.runs / a.block) / fold_s
    gemm_total = gemm * a.runs / a.block

    est_out = np.empty((a.n, a.n_test), np.float32)
    se_out = np.empty_like(est_out)
    epilogue = best_of(lambda: est.influence_into(stats, "correct", est_out, se_out), repeats=2)

    print(f"shape: {a.n} train x {a.n_test} test, {a.runs} runs in blocks of {a.block}")
    print(f"machine GEMM (numpy float32, {a.n}x{a.block} @ {a.block}x{a.n_test}): {machine / 1e9:.1f} GFLOP/s")
    print(f"fold: {fold_s:.2f} s, {fold_rate / 1e9:.1f} GFLOP/s = {fold_rate / machine:.0%} of the machine GEMM "
          f"(goal >= 50%)")
    print(f"epilogue (influence + standard error, {a.n * a.n_test / 1e6:.0f} M pairs): {epilogue:.2f} s = "
          f"{epilogue / gemm_total:.0%} of the GEMM time of {a.runs} runs ({gemm_total:.2f} s) (goal <= 25%)")


if __name__ == "__main__":
    main()
