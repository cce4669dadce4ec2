"""At the paper's scale: the fold and the influence selection at a CIFAR-100 shape (50,000 x 10,000) with
synthetic outcomes, side by side with the GEMM time of the same shapes, and the driver's shard rate.

Outcomes are drawn with known probabilities from a real bit-packed plan (orchestrator.plan, design
"fixed", ratio 0.7): test example j is right with probability p_j in every run, except for `planted`
test examples, each tied to one training example i: right with probability 0.95 when i was trained
on and 0.35 otherwise (true influence 0.6). The split halves' pairs are sought among a random
10% of the training examples (as if memorized). Recovered = the planted i is the top-1 influencer of j
and (i, j) is among the pairs >= 0.15.

--slice N measures only the first N training examples (every test example, every run) and
extrapolates to n_train linearly (every phase is linear in the training examples); the printout
says which figures are measured and which extrapolated.

    python benchmarks/scale.py --runs 200                       # CIFAR-100 shape, measured whole
    python benchmarks/scale.py --runs 4000 --slice 2500         # 4,000 runs on a measured slice
    python benchmarks/scale.py --n-train 1281167 --n-test 50000 --runs 2000 --slice 2500   # ImageNet
    python benchmarks/scale.py --shards 40                      # + write 40 real shards, time reading them
    python benchmarks/scale.py --only-shards --shards 200 --fold-actors 2   # the live driver, with and without
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from estimators import influence as inf
from estimators import stats as st
from orchestrator.plan import Plan, make_plan


class Clock:
    """Wall and CPU seconds of a phase. On a shared machine the wall time follows the load; the CPU time
    (this process, all threads) is what the phase costs, and CPU / threads is its wall time alone."""

    def __enter__(self):
        self.wall, self.user, self.sys = time.perf_counter(), *_cpu()
        return self

    def __exit__(self, *exc):
        user, sys_ = _cpu()
        self.wall = time.perf_counter() - self.wall
        self.user, self.sys = user - self.user, sys_ - self.sys  # sys: page faults of fresh memory, mostly

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def _cpu() -> tuple[float, float]:
    """User and kernel CPU seconds of this process, all threads, from one clock (getrusage, in us): two
    clocks of different resolution (process_time, os.times' 10 ms ticks) made short phases' user time
    negative."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def ratio(a: float, b: float) -> str:
    """a / b to two decimals; "n/a" where b is no time at all (a tiny smoke-test shape: the kernel
    splits a process's CPU time into user and system by clock ticks, so a short phase can show none)."""
    return f"{a / b:.2f}" if b > 0 else "n/a"


def fastest(a: "Clock | None", b: "Clock") -> "Clock":
    """The faster of two timings of the same phase (by wall time)."""
    return b if a is None or b.wall < a.wall else a


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cached_plan(cache: str, seed: int, n_train: int, runs: int):
    path = Path(cache) / f"plan-{seed}-{n_train}-{runs}.npy" if cache else None
    if path is not None and path.exists():
        masks = np.load(path, allow_pickle=False)
        return Plan("fixed", seed, n_train, (0.7,), masks, np.arange(runs, dtype=np.int64),
                    np.zeros(runs, np.int8))
    plan = make_plan("fixed", seed, n_train, (0.7,), runs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, plan.masks, allow_pickle=False)
    return plan


def outcomes(plan, n_train: int, n_test: int, runs: int, planted: int, seed: int):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.2, 0.9, n_test)
    x = rng.random((runs, n_test)) < p[None, :]
    tests = rng.choice(n_test, planted, replace=False)
    trains = rng.choice(n_train, planted, replace=False)
    m = plan.columns(np.arange(runs), trains)
    u = rng.random((runs, planted))
    x[:, tests] = np.where(m, u < 0.95, u < 0.35)
    return x, trains, tests


def gemm_seconds(mask_columns, out: inf.Outcomes, n_train: int, halves: inf.Halves, budget: float, k: int) -> Clock:
    """The GEMMs of one top-k pass with split halves, alone, at the pass's own tile shapes (its first
    tiles are narrow: influence.topk_tiles): the whole's in-sums of every tile, and each half's for the
    training examples whose pairs it wants."""
    rows, cols = inf.tile_shape(n_train, out.x.shape[1], budget, inf.TOPK_BYTES_PER_CELL)
    groups = [np.flatnonzero(halves.half == h) for h in range(2)]
    xs = [np.asarray(out.x[g], np.float32) for g in groups]
    # into one reused buffer and train-major, as top_k computes them; faulted in before the clock starts,
    # so that the clock sees the GEMMs alone
    buf = np.empty(rows * min(cols, out.x.shape[1]), np.float32)
    buf[:] = 0
    clock = Clock().__enter__()
    for r0, r1 in inf.topk_tiles(n_train, rows, k):  # the pass's own tiles
        ids = np.arange(r0, r1)
        m = mask_columns(ids).astype(np.float32)
        mh = [np.ascontiguousarray(m[np.ix_(g, np.flatnonzero(halves.rows[h][ids]))]) for h, g in enumerate(groups)]
        for c0 in range(0, out.x.shape[1], cols):
            c = slice(c0, min(c0 + cols, out.x.shape[1]))
            w = c.stop - c.start
            for mm, x in ((m, out.x), (mh[0], xs[0]), (mh[1], xs[1])):
                np.matmul(mm.T, x[:, c], out=buf[:mm.shape[1] * w].reshape(mm.shape[1], w))
    clock.__exit__()
    return clock


def class_gemm_seconds(mask_columns, out: inf.Outcomes, labels_tr, labels_te, budget: float) -> Clock:
    """The GEMMs of the per-class mode alone (one per class and tile)."""
    xt = np.ascontiguousarray(out.x.T)
    with Clock() as clock:
        for k in np.unique(labels_tr):
            tr, te = np.flatnonzero(labels_tr == k), np.flatnonzero(labels_te == k)
            for rows, cols in inf.tiles(len(tr), len(te), budget):
                _ = mask_columns(tr[rows]).astype(np.float32).T @ xt[te[cols]].T
    return clock


def shard_rate(n_train: int, n_test: int, shards: int, seed: int) -> dict:
    """Write `shards` real shards of n_train + n_test rows, then read, verify and fold them as the
    driver does (top-k mode: no dense sums)."""
    from workers.shard import build_table, read_shard, write_shard

    rng = np.random.default_rng(seed)
    plan = make_plan("fixed", seed, n_train, (0.7,), shards)
    y_tr, y_te = rng.integers(0, 100, n_train), rng.integers(0, 100, n_test)
    with tempfile.TemporaryDirectory() as d:
        paths = [Path(d) / f"run-{r:06d}.parquet" for r in range(shards)]
        for r, path in enumerate(paths):
            m = plan.mask(r)
            tr = np.where(rng.random(n_train) < 0.8, y_tr, (y_tr + 1) % 100)
            te = np.where(rng.random(n_test) < 0.5, y_te, (y_te + 1) % 100)
            write_shard(path, build_table(m, tr, te, y_tr, y_te, 100, {"campaign": "scale", "spec_hash": "h",
                                                                         "run": r, "n_train": n_train,
                                                                         "n_test": n_test}))
        stats = st.zeros(n_train, n_test, dense=False)
        bits = np.zeros((shards, (n_test + 7) // 8), np.uint8)
        clock = Clock().__enter__()
        block = []
        for r, path in enumerate(paths):
            data = read_shard(path, campaign="scale", spec_hash="h", run=r, n_train=n_train, n_test=n_test,
                              mask=plan.mask(r))
            bits[r] = np.packbits(data.test_correct)
            block.append(data)
            if len(block) == 64 or r == shards - 1:
                st.fold(stats, np.stack([b.mask for b in block]), {"correct": np.stack([b.train_correct for b in block])},
                        {"correct": np.stack([b.test_correct for b in block])})
                block = []
        clock.__exit__()
    return {"shards": shards, "wall": clock.wall, "cpu": clock.cpu}


DRIVER_SPEC = """
[campaign]
name = "scale17"
seed = {seed}
runs = {runs}
subset_ratio = 0.7
design = "fixed"
[dataset]
name = "longtail-mixture"
n_train = {n_train}
n_test = {n_test}
classes = 100
subpopulations = 5000
[model]
name = "mlp"
[train]
store = {store}
[estimates]
influence = "topk"
"""


def driver_rate(n_train: int, n_test: int, shards: int, actors: int, seed: int, store: str) -> dict:
    """The live driver's fold, both ways side by side on the same real shards of a campaign directory:
    the driver reading, verifying and folding every shard itself (the Aggregator), and `actors` fold
    actors on a local Ray doing it (orchestrator/foldpool.py LiveFold: the driver hands out run numbers
    in batches of 16, as results arrive, and merges the actors' sums at the end). CPU is this process's
    (the driver's), wall the whole; the two folds must be equal."""
    import ray

    from orchestrator import spec as specs
    from orchestrator.campaign import create_or_open
    from orchestrator.fold import Aggregator
    from orchestrator.foldpool import LiveFold, Verified
    from workers.shard import build_table, write_shard

    rng = np.random.default_rng(seed)
    out = {"shards": shards, "actors": actors, "store": store}
    with tempfile.TemporaryDirectory() as d:
        text = DRIVER_SPEC.format(seed=seed, runs=shards, n_train=n_train, n_test=n_test, store=store)
        c = create_or_open(specs.loads(text, "scale17.toml"), Path(d) / "c", load_data=True)
        y_tr, y_te = c.labels["train_labels"], c.labels["test_labels"]
        stored = specs.loads(text, "scale17.toml").train.store
        for r in range(shards):
            tr = np.where(rng.random(n_train) < 0.8, y_tr, (y_tr + 1) % 100)
            te = np.where(rng.random(n_test) < 0.5, y_te, (y_te + 1) % 100)
            values = {k: (rng.random(n_train).astype(np.float16).astype(np.float32),
                          rng.random(n_test).astype(np.float16).astype(np.float32)) for k in stored}
            meta = {"campaign": c.name, "spec_hash": c.spec.result_hash(), "run": r, "n_train": n_train,
                    "n_test": n_test, "test_acc": float((te == y_te).mean())}
            write_shard(c.paths.shard(r), build_table(c.plan.mask(r), tr, te, y_tr, y_te, 100, meta, values))
        here = Aggregator(c, from_scratch=True)
        with Clock() as clock:
            for r in range(shards):
                here.add(r, here.read(r))
            here.flush()
        out["driver"] = {"wall": clock.wall, "cpu": clock.cpu}
        if actors:
            ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
            try:
                spread = Aggregator(c, from_scratch=True)
                t = time.perf_counter()
                live = LiveFold(ray, c, spread, actors, print)
                out["actor_start_seconds"] = time.perf_counter() - t
                with Clock() as clock:
                    for start in range(0, shards, 16):
                        for r in range(start, min(shards, start + 16)):
                            live.submit(r)
                        for r, acc, error, _ in live.verified():
                            assert not error, error
                            live.add(r, Verified({"test_acc": acc}))
                    for r, acc, error, _ in live.verified(wait=True):
                        assert not error, error
                        live.add(r, Verified({"test_acc": acc}))
                    live.merge()
                out["actors_fold"] = {"wall": clock.wall, "cpu": clock.cpu, "merge_wall": live.seconds["merge"]}
                a, b = here.checkpoint_arrays(), spread.checkpoint_arrays()
                out["equal"] = sorted(a) == sorted(b) and all(
                    np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") if not k.startswith("risk.")
                    else np.allclose(a[k], b[k], rtol=1e-12) for k in a)
                live.shutdown()
            finally:
                ray.shutdown()
    return out


def _fold_scores_where(sums, mask, x):
    """estimators/privacy.py fold_scores before issue 17 (np.where per sum), for the side-by-side timing."""
    out = ~mask
    sums.count_in += mask.sum(axis=0)
    sums.count_out += out.sum(axis=0)
    sums.sum_in += np.where(mask, x, 0.0).sum(axis=0)
    sums.sum_out += np.where(out, x, 0.0).sum(axis=0)
    sums.sq_in += np.where(mask, x * x, 0.0).sum(axis=0)
    sums.sq_out += np.where(out, x * x, 0.0).sum(axis=0)


def fold_scores_rate(n_train: int, seed: int) -> None:
    """CPU per run of the privacy-risk fold, old and new interleaved (best of 3), and of the statistic."""
    from estimators import privacy as pv

    rng = np.random.default_rng(seed)
    print(f"privacy-risk fold at {n_train:,} training examples; load average {os.getloadavg()[0]:.1f}")
    for b in (1, 256):
        mask, x = rng.random((b, n_train)) < 0.7, rng.normal(size=(b, n_train))
        new, old = pv.fold_scores(pv.zeros(n_train), mask, x), pv.zeros(n_train)
        _fold_scores_where(old, mask, x)
        same = all(np.array_equal(getattr(new, k), getattr(old, k)) for k in pv.ScoreSums.__dataclass_fields__)
        best = {"np.where (before)": [], "mask products (now)": []}
        for _ in range(3):
            for name, f in (("np.where (before)", _fold_scores_where), ("mask products (now)", pv.fold_scores)):
                sums, k = pv.zeros(n_train), max(2, 400 // b)
                t = time.process_time()
                for _ in range(k):
                    f(sums, mask, x)
                best[name].append((time.process_time() - t) / k / b)
        print(f"  block of {b:3d} runs: " + ", ".join(f"{k} {1e3 * min(v):.2f} ms CPU a run" for k, v in best.items())
              + f"; bit for bit the same: {same}")
    p = rng.random(n_train).astype(np.float16)
    t = time.process_time()
    for _ in range(200):
        pv.statistic_from_probability(p)
    print(f"  the statistic (log-odds of a probability): {1e3 * (time.process_time() - t) / 200:.2f} ms CPU a run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--slice", type=int, default=0, help="measure this many training examples, extrapolate")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--planted", type=int, default=200)
    ap.add_argument("--budget-gb", type=float, default=1.0, help="tile memory ([estimates] memory_gb / 2)")
    ap.add_argument("--shards", type=int, default=0, help="also time reading, verifying and folding real shards")
    ap.add_argument("--fold-actors", type=int, default=0, help="with --shards: also time the live driver's fold "
                    "with this many fold actors on a local Ray, side by side with the driver folding alone")
    ap.add_argument("--store", default="[]", help="with --fold-actors: [train] store of the campaign whose shards "
                    "are folded (e.g. '[\"probability\"]' adds the privacy-risk sums)")
    ap.add_argument("--only-shards", action="store_true", help="skip the selection benchmark")
    ap.add_argument("--fold-scores", action="store_true", help="with --only-shards: time the privacy-risk fold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="time each phase this many times, keep the fastest")
    ap.add_argument("--cache", default="", help="directory to keep the plan in between runs (it takes minutes "
                    "at the ImageNet shape)")
    a = ap.parse_args()
    if a.only_shards:
        return shards_main(a)
    budget = a.budget_gb * 1e9
    n = a.slice or a.n_train
    scale = a.n_train / n
    t0 = time.perf_counter()
    plan = cached_plan(a.cache, a.seed, a.n_train, a.runs)
    t_plan = time.perf_counter() - t0
    x, trains, tests = outcomes(plan, n, a.n_test, a.runs, a.planted, a.seed)  # planted within the slice
    runs = np.arange(a.runs)
    mask_columns = lambda idx: plan.columns(runs, idx)  # noqa: E731
    out = inf.Outcomes(x, binary=True)
    halves = runs % 2
    # the halves' pairs are wanted for the examples memorized in each half: 10% of them here (the
    # 200-run CIFAR-shape campaign of docs/performance.md has fewer)
    rows = tuple(np.random.default_rng(a.seed + h).random(n) < 0.1 for h in range(2))
    with Clock() as t_counts:
        n_in = inf.counts_in(mask_columns, n, a.runs, budget)[0]
    split = inf.Halves(half=halves, rows=rows, threshold=0.15)
    # Each phase is timed --repeats times, alternating, and its fastest time kept: a phase that touches
    # fresh memory first pays the kernel's page faults (with huge pages, seconds on this VM), and
    # whichever phase ran first would carry them.
    labels_tr = np.random.default_rng(1).integers(0, 100, n)
    labels_te = np.random.default_rng(2).integers(0, 100, a.n_test)
    t_gemm = t_topk = t_pc = t_pc_gemm = None
    for _ in range(a.repeats):
        t_gemm = fastest(t_gemm, gemm_seconds(mask_columns, out, n, split, budget, a.k))
        with Clock() as t:
            top = inf.top_k(mask_columns, out, n, a.k, 0.15, budget, n_in=n_in, halves=split)
        t_topk = fastest(t_topk, t)
        with Clock() as t:
            blocks = inf.per_class(mask_columns, out, labels_tr, labels_te, budget, 0.15)
        t_pc = fastest(t_pc, t)
        del blocks
        t_pc_gemm = fastest(t_pc_gemm, class_gemm_seconds(mask_columns, out, labels_tr, labels_te, budget))
    got = set(zip(top.pairs_train.tolist(), top.pairs_test.tolist()))
    recovered = sum(int(top.train[j, 0] == i and (i, j) in got) for i, j in zip(trains, tests))
    flops = 2.0 * a.runs * n * a.n_test
    what = "measured" if scale == 1 else f"measured on {n:,} of {a.n_train:,} training examples, x {scale:.1f}"
    print(f"shape {a.n_train:,} x {a.n_test:,} x {a.runs:,} runs; {what}; tiles of {a.budget_gb:g} GB; fastest of "
          f"{a.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  plan (bit-packed, whole)     {t_plan:8.2f} s wall{' (from the cache)' if a.cache else ''}")
    print(f"  {'phase':28s} {'wall s':>8s} {'CPU s':>8s} {'kernel s':>8s}" + ("" if scale == 1 else f" {'CPU s, whole':>13s}"))
    for name, c in (("n_in counts", t_counts), ("GEMMs of the pass (halves)", t_gemm),
                    ("top-k + pairs + halves", t_topk), ("per-class (100 classes)", t_pc),
                    ("GEMMs of per-class", t_pc_gemm)):
        ext = "" if scale == 1 else f" {c.cpu * scale:13.1f}"
        print(f"  {name:28s} {c.wall:8.2f} {c.cpu:8.2f} {c.sys:8.2f}{ext}")
    # the kernel's share is listed apart: on this VM a fresh 2 MB page can cost 15 ms to fault in, and
    # how many a phase meets depends on what ran before it (docs/performance.md)
    gflops = flops / max(t_gemm.cpu, 1e-9) / 1e9
    for name, p, g in (("selection pass / its GEMMs", t_topk, t_gemm), ("per-class / its GEMMs", t_pc, t_pc_gemm)):
        print(f"  {name:28s} {ratio(p.wall, g.wall):>8s} wall, {ratio(p.cpu, g.cpu)} CPU, "
              f"{ratio(p.user, g.user)} user CPU" + (f"  ({gflops:.0f} GFLOP per CPU second in the GEMMs)"
                                                      if p is t_topk else ""))
    print(f"  pairs >= 0.15: {len(top.pairs_train):,} (halves {len(top.half_pairs[0][0]):,}, "
          f"{len(top.half_pairs[1][0]):,}); planted influences recovered: {recovered} of {a.planted}")
    print(f"  peak memory {peak_mb():.0f} MB")
    shards_main(a)


def shards_main(a) -> None:
    if a.fold_scores:
        fold_scores_rate(a.n_train, a.seed)
    if a.shards and not a.fold_actors:
        r = shard_rate(a.n_train, a.n_test, a.shards, a.seed)
        print(f"  shards read + verified + folded: {r['shards']} in {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU = "
              f"{r['shards'] / r['wall']:.0f} shards/s wall, {r['shards'] / r['cpu']:.0f} per CPU second")
    if a.shards and a.fold_actors:
        load = os.getloadavg()[0]
        r = driver_rate(a.n_train, a.n_test, a.shards, a.fold_actors, a.seed, a.store)
        print(f"live driver's fold, {a.shards} shards of {a.n_train + a.n_test:,} rows, [train] store = {a.store}, "
              f"top-k mode; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
              f"{os.cpu_count()} CPUs")
        print(f"  {'':32s} {'wall s':>7s} {'driver CPU s':>12s} {'shards/s wall':>13s} {'per driver CPU s':>16s} "
              f"{'driver CPU ms/shard':>19s}")
        for name, t in (("driver folds alone", r["driver"]), (f"{a.fold_actors} fold actors", r["actors_fold"])):
            print(f"  {name:32s} {t['wall']:7.2f} {t['cpu']:12.3f} {a.shards / t['wall']:13.0f} "
                  f"{a.shards / t['cpu']:16.0f} {1e3 * t['cpu'] / a.shards:19.2f}")
        print(f"  fold actors: started in {r['actor_start_seconds']:.1f} s (not counted), final merge "
              f"{r['actors_fold']['merge_wall']:.2f} s wall; folds equal: {r['equal']}")


if __name__ == "__main__":
    main()
