"""What recording training dynamics ([train] store = [..., "dynamics"]) costs, measured side by side.

    .venv/bin/python benchmarks/dynamics.py [--k 16] [--repeats 5] [--packed-pairs 4] [--threads 1] [--device cpu] [--aa]

The demo recipe on digits (MLP 64-128-10, 20 epochs, batch 128, SGD, 70% fixed subsets). Alone: K
train_run calls without and K with dynamics; packed: --packed-pairs train_runs calls of K without and as many
with. The two variants are timed back to back for every call, in alternating order (so drifts in machine
load hit both alike), each after a garbage collection (so one variant's garbage is not collected in the
other's time), and the overhead is the median of the per-pair ratios, with their quartiles. Time is this
thread's CPU time over the whole call (time.thread_time: torch runs on this one thread at --threads 1,
and CPU time is far less disturbed than wall time by other processes on a shared machine; on a GPU use
wall time, --wall). It includes the evaluation of every example (about 2% of a demo run), which the
dynamics do not touch. Goal: <= 5%.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import numpy as np
import torch

from workers.datasets import load_dataset
from workers.ensemble import train_runs
from workers.models import model_factory
from workers.training import DeviceData, train_run

MODEL = {"name": "mlp", "hidden": [128]}
TRAIN = dict(epochs=20, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
             schedule="constant", label_smoothing=0.0, eval_batch_size=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=16, help="runs per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--packed-pairs", type=int, default=4, help="packed calls per repetition (each timed twice)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--wall", action="store_true", help="wall time (with a device sync) instead of CPU time")
    ap.add_argument("--aa", action="store_true", help="an A/A check: both variants without dynamics, so the "
                    "printed 'overhead' and its quartiles are the pairing's own noise")
    a = ap.parse_args()
    clock = time.perf_counter if a.wall else time.thread_time
    torch.set_num_threads(a.threads)
    data = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    dd = DeviceData.from_dataset(data, torch.device(a.device))
    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.choice(data.n_train, round(0.7 * data.n_train), replace=False)) for _ in range(a.k)]
    seeds = list(range(a.k))
    build = model_factory(MODEL)
    variants = {"off": {**TRAIN, "store": ["margin"]}, "on": {**TRAIN, "store": ["margin", "dynamics"]}}
    if a.aa:
        variants["on"] = variants["off"]

    def timed(call):
        def run(train):
            gc.collect()
            start = clock()
            call(train)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            return clock() - start
        return run

    def alone(train, k):  # one run: the k-th subset and seed
        return timed(lambda t: train_run(build, dd, subsets[k], seeds[k], t))(train)

    def packed(train, k):  # one call of all K runs (k: which pair, unused)
        return timed(lambda t: train_runs(MODEL, dd, subsets, seeds, t))(train)

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} thread(s), "
          f"device {a.device}; {a.k} runs, {a.repeats} repetitions, {'wall' if a.wall else 'CPU'} time; "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, fn, calls in (("alone", alone, a.k), ("packed", packed, a.packed_pairs)):
        fn(variants["off"], 0), fn(variants["on"], 0)  # warm-up
        ratios, totals = [], {"off": [], "on": []}
        for r in range(a.repeats):
            t = {"off": 0.0, "on": 0.0}
            for k in range(calls):  # each call timed without and with, back to back, in alternating order
                pair = {}
                for v in (("off", "on") if (r + k) % 2 == 0 else ("on", "off")):
                    pair[v] = fn(variants[v], k)
                    t[v] += pair[v]
                ratios.append(pair["on"] / pair["off"])
            for v in t:
                totals[v].append(t[v])
        q = np.quantile(ratios, [0.25, 0.5, 0.75])
        inside = _time_inside_recorder(lambda fn=fn, calls=calls: [fn(variants["on"], k) for k in range(calls)], clock)
        per = 1 if name == "alone" else 1 / calls  # the time of K runs: one repetition alone, one call packed
        print(f"{name:>6}: {a.k} runs without dynamics {per * statistics.median(totals['off']):.3f} s, with "
              f"{per * statistics.median(totals['on']):.3f} s (medians of {a.repeats}); overhead, median of {len(ratios)} "
              f"back-to-back pairs: {100 * (q[1] - 1):+.1f}% "
              f"(quartiles {100 * (q[0] - 1):+.1f}%, {100 * (q[2] - 1):+.1f}%); time inside the recorder's "
              f"calls {100 * inside:.1f}% of the rest (a separate pass; the direct cost, far less noisy under load)")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


def _time_inside_recorder(call, clock) -> float:
    """Time spent inside the Recorder's methods during `call()`, over the rest of its time: the direct
    cost of the dynamics, without what they cost the training code around them (cache, allocator)."""
    from workers import dynamics

    spent, saved = [0.0], {}
    for name in ("__init__", "batch", "end_epoch", "result"):
        saved[name] = method = getattr(dynamics.Recorder, name)

        def timed(*args, _method=method, **kw):
            start = clock()
            try:
                return _method(*args, **kw)
            finally:
                spent[0] += clock() - start
        setattr(dynamics.Recorder, name, timed)
    try:
        start = clock()
        call()
        total = clock() - start
    finally:
        for name, method in saved.items():
            setattr(dynamics.Recorder, name, method)
    return spent[0] / (total - spent[0])


if __name__ == "__main__":
    main()
