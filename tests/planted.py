"""Campaigns of the self-test learner (workers/selftest_learner.py) with shards written in-process, without
Ray: a learner with known memorization that memorizes a planted `leaky` set strongly."""

from __future__ import annotations

import numpy as np

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from workers.selftest_learner import fit_predict
from workers.shard import build_table, write_shard

SPEC = """
[campaign]
name = "{name}"
seed = {seed}
runs = {runs}
subset_ratio = 0.5
[dataset]
name = "workers.selftest_learner:dataset"
n_train = {n_train}
n_test = {n_test}
leaky = {leaky}
spread = {spread}
[model]
name = "mlp"
[train]
trainer = "workers.selftest_learner:fit_predict"
[estimates]
influence = "dense"
"""


def learner_campaign(root, name="leaky", runs=120, leaky=(3, 8, 21), seed=0, n_train=30, n_test=10, train=None,
                     spread=0.0):
    spec = specs.loads(SPEC.format(name=name, seed=seed, runs=runs, leaky=list(leaky), n_train=n_train,
                                   n_test=n_test, spread=spread), f"{name}.toml")
    c = create_or_open(spec, root)
    d = c.dataset
    for r in range(runs if train is None else train):
        m = c.plan.mask(r)
        tr, te, mtr, mte = fit_predict(d, np.flatnonzero(m), int(c.plan.seeds[r]))
        meta = {"campaign": c.name, "spec_hash": c.spec.result_hash(), "run": r, "n_train": d.n_train,
                "n_test": d.n_test, "test_acc": float((te == d.y_test).mean())}
        write_shard(c.paths.shard(r), build_table(m, tr, te, d.y_train, d.y_test, d.num_classes, meta,
                                                  {"margin": (mtr, mte)}))
    return c
