"""Bytes per (run, example) of a shard on disk, for what [train] store keeps.

    .venv/bin/python benchmarks/shard_size.py

A CIFAR-100-shaped run (50,000 train + 10,000 test rows, 100 classes; in-subset examples right with
p = 0.995, others 0.75, realistic margins), written exactly as workers write shards. Goal: <= 3 bytes
per row for prediction + margin (the default), perf.md section 3.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from workers.shard import build_table, write_shard


def main() -> None:
    rng = np.random.default_rng(0)
    n, nt, c = 50_000, 10_000, 100
    y_tr, y_te = rng.integers(0, c, n), rng.integers(0, c, nt)
    mask = rng.random(n) < 0.7
    right_tr = rng.random(n) < np.where(mask, 0.995, 0.75)
    right_te = rng.random(nt) < 0.75
    p_tr = np.where(right_tr, y_tr, (y_tr + rng.integers(1, c, n)) % c)
    p_te = np.where(right_te, y_te, (y_te + rng.integers(1, c, nt)) % c)
    m_tr = np.where(right_tr, rng.gamma(2, 2, n), -rng.gamma(2, 1, n)).astype(np.float32)
    m_te = np.where(right_te, rng.gamma(2, 2, nt), -rng.gamma(2, 1, nt)).astype(np.float32)
    prob = (rng.random(n).astype(np.float32), rng.random(nt).astype(np.float32))
    meta = {"campaign": "bench", "spec_hash": "0", "run": 0, "n_train": n, "n_test": nt}
    cases = [("prediction only", {}), ("prediction + margin (default)", {"margin": (m_tr, m_te)}),
             ("prediction + margin + probability", {"margin": (m_tr, m_te), "probability": prob}),
             ("prediction + margin + all 100 logits", {"margin": (m_tr, m_te), "logits": (
                 rng.normal(size=(n, c)).astype(np.float32), rng.normal(size=(nt, c)).astype(np.float32))})]
    print(f"shard size, {n:,} train + {nt:,} test rows, {c} classes")
    print("| store | bytes | bytes per row | write ms |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name, values in cases:
            table = build_table(mask, p_tr, p_te, y_tr, y_te, c, meta, values)
            path = os.path.join(d, "run-000000.parquet")
            write_shard(path, table)  # warm-up
            t0 = time.perf_counter()
            for _ in range(5):
                write_shard(path, table)
            ms = (time.perf_counter() - t0) / 5 * 1000
            size = os.path.getsize(path)
            print(f"| {name} | {size:,} | {size / (n + nt):.2f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
