"""A campaign directory filled with synthetic shards: every estimate can then be checked against the
reference without training anything (and without Ray)."""

from __future__ import annotations

import numpy as np

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from workers.shard import build_table, write_shard

# thresholds that no ratio of small counts hits exactly, so float32 vs float64 cannot flip a pair
MEM, INFL = 0.1013, 0.1017

SPEC = """
[campaign]
name = "synth"
seed = {seed}
runs = {runs}
subset_ratio = {ratio}
design = "{design}"
[dataset]
name = "plugins:gaussian_blobs"
n_train = {n_train}
n_test = {n_test}
classes = 3
[model]
name = "mlp"
[train]
store = ["margin", "probability"]
[estimates]
influence = "{mode}"
soft = {soft}
block_runs = 7
mem_threshold = {mem}
infl_threshold = {infl}
top_k = 3
memory_gb = {memory_gb}
"""


def make_campaign(root, design="fixed", runs=40, ratio="0.6", mode="dense", soft='["margin"]', n_train=30,
                  n_test=12, seed=0, memory_gb=1.0, thresholds=(MEM, INFL)):
    text = SPEC.format(design=design, runs=runs, ratio=ratio, mode=mode, soft=soft, n_train=n_train,
                       n_test=n_test, seed=seed, memory_gb=memory_gb, mem=thresholds[0], infl=thresholds[1])
    c = create_or_open(specs.loads(text, "synth.toml"), root)
    rng = np.random.default_rng(seed + 100)
    d = c.dataset
    masks = c.plan.dense()
    p_out = rng.random(d.n_train)
    arrays = {"mask": masks, "train_correct": [], "test_correct": [], "train_margin": [], "test_margin": [],
              "train_probability": [], "test_probability": []}
    for r in range(c.plan.runs):
        m = masks[r]
        right = rng.random(d.n_train) < np.where(m, 0.9, p_out)
        # test example j is more often right when training example j (a "near duplicate") was trained on
        t_right = rng.random(d.n_test) < np.where(m[:d.n_test], 0.85, 0.4)
        train_pred = np.where(right, d.y_train, (d.y_train + 1) % d.num_classes)
        test_pred = np.where(t_right, d.y_test, (d.y_test + 1) % d.num_classes)
        values = {"margin": (rng.normal(np.where(right, 2, -1), 1).astype(np.float16).astype(np.float32),
                             rng.normal(np.where(t_right, 2, -1), 1).astype(np.float16).astype(np.float32)),
                  "probability": (rng.random(d.n_train).astype(np.float16).astype(np.float32),
                                  rng.random(d.n_test).astype(np.float16).astype(np.float32))}
        meta = {"campaign": c.name, "spec_hash": c.spec.result_hash(), "run": r, "n_train": d.n_train,
                "n_test": d.n_test, "test_acc": float(t_right.mean())}
        write_shard(c.paths.shard(r), build_table(m, train_pred, test_pred, d.y_train, d.y_test, d.num_classes,
                                                  meta, values))
        arrays["train_correct"].append(right)
        arrays["test_correct"].append(t_right)
        for name in ("margin", "probability"):
            arrays[f"train_{name}"].append(values[name][0])
            arrays[f"test_{name}"].append(values[name][1])
    return c, {k: np.array(v) for k, v in arrays.items()}
