"""Top-k influence at a scaled ImageNet shape: time, and peak memory against the budget.

    .venv/bin/python benchmarks/topk.py [--n 200000] [--n-test 10000] [--runs 1000] [--k 10] [--budget-gb 1]

The masks are a real fixed-design plan (bit-packed, as the campaign stores them) and the test
outcomes random 0/1; the tiles are sized from --budget-gb. Peak memory is what numpy allocated
during the top-k pass (tracemalloc), besides the inputs.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from estimators import influence as inf
from orchestrator import plan as planning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--budget-gb", type=float, default=1.0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    plan = planning.make_plan("fixed", 0, a.n, 0.7, a.runs)
    runs = np.arange(a.runs)
    outcomes = inf.Outcomes(np.random.default_rng(1).random((a.runs, a.n_test)) < 0.75, binary=True)
    setup = time.perf_counter() - t0
    budget = a.budget_gb * 1e9
    rows, cols = inf.tile_shape(a.n, a.n_test, budget, inf.TOPK_BYTES_PER_CELL)
    tracemalloc.start()
    t0 = time.perf_counter()
    top = inf.top_k(lambda idx: plan.columns(runs, idx), outcomes, a.n, a.k, 0.15, budget)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    flop = 2.0 * a.n * a.n_test * a.runs
    inputs = plan.masks.nbytes + outcomes.x.nbytes
    print(f"shape: {a.n} train x {a.n_test} test x {a.runs} runs, top {a.k}; tiles of {rows} x {cols}")
    print(f"setup (plan + outcomes): {setup:.1f} s; inputs held: {inputs / 1e9:.2f} GB")
    print(f"top-k: {seconds:.1f} s ({flop / seconds / 1e9:.1f} GFLOP/s over {flop / 1e12:.1f} TFLOP), "
          f"{len(top.pairs_train)} pairs >= 0.15")
    print(f"peak memory of the top-k pass: {peak / 1e9:.2f} GB, budget {a.budget_gb:.2f} GB "
          f"({'within' if peak <= budget else 'OVER'} budget)")


if __name__ == "__main__":
    main()
