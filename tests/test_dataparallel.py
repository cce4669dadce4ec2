"""Runs that span several devices train data-parallel through Ray Train, scheduled like any other run.
Here the devices are two CPU processes (gloo); on a cluster they are GPUs (gpus_per_worker = 1)."""

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from orchestrator import spec as specs
from orchestrator.campaign import create_or_open
from orchestrator.driver import run_campaign
from workers.models import model_factory
from workers.training import DeviceData, train_run

SPEC = """
[campaign]
name = "ddp"
runs = 2
seed = 4
[dataset]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[train]
epochs = 1
batch_size = 64
[resources]
devices_per_run = 2
cpus_per_worker = 0.5  # two runs of two 0.5-CPU processes at once on the session's 2 CPUs
"""


def test_data_parallel_runs_match_single_process_training(ray_session, tmp_path):
    c = create_or_open(specs.loads(SPEC, "ddp.toml"), tmp_path / "ddp")
    report = run_campaign(c, progress=False)
    assert report.trained == 2 and report.complete, report
    # Two processes each take half of every batch and average their gradients: the same steps as one
    # process on the whole batch, up to float rounding, so the predictions agree almost everywhere.
    d = c.dataset
    data = DeviceData.from_dataset(d, torch.device("cpu"))
    build = model_factory(c.spec.model.as_dict())
    for r in range(2):
        table = pq.read_table(c.paths.shard(r)).to_pandas()
        pred = table[table.split == "train"].sort_values("example").pred.to_numpy()
        single = train_run(build, data, np.flatnonzero(c.plan.mask(r)), int(c.plan.seeds[r]), c.spec.to_dict()["train"])
        assert (pred == single.train_pred).mean() > 0.99
        meta = json.loads(pq.read_schema(c.paths.shard(r)).metadata[b"longtail"])
        assert meta["run"] == r


class _Seen(torch.nn.Module):
    """Wraps a model as Ray Train's prepare_model would, and records the inputs of every training step."""

    def __init__(self, model):
        super().__init__()
        self.model, self.steps = model, []

    def forward(self, x):
        self.steps.append(sorted(row.tobytes() for row in x.detach().reshape(len(x), -1).cpu().numpy()))
        return self.model(x)


def test_each_rank_trains_on_its_own_share_of_every_batch():
    """Were both processes to see the whole batch, the averaged gradient would be the same and the test
    above would pass: here each rank's inputs are recorded, step by step. The ranks' shares of a step
    are disjoint and together are exactly the batch one process takes at that step."""
    from workers.datasets import load_dataset

    d = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0})
    data = DeviceData.from_dataset(d, torch.device("cpu"))
    build = model_factory({"name": "mlp", "hidden": [8]})
    spec = specs.loads(SPEC, "ddp.toml")
    train = spec.to_dict()["train"]
    subset = np.arange(0, d.n_train, 2)
    wrappers = {}

    def wrap_for(rank):
        def wrap(model):
            wrappers[rank] = _Seen(model)
            return wrappers[rank]
        return wrap

    train_run(build, data, subset, 3, train, data_parallel=(0, 1, wrap_for("single")))
    for rank in (0, 1):
        train_run(build, data, subset, 3, train, data_parallel=(rank, 2, wrap_for(rank)))
    single, r0, r1 = wrappers["single"].steps, wrappers[0].steps, wrappers[1].steps
    assert len(r0) == len(r1) == len(single) > 1
    for whole, a, b in zip(single, r0, r1):
        assert not set(a) & set(b)  # no example in both shares
        assert sorted(a + b) == whole  # together, the whole batch
        assert abs(len(a) - len(b)) <= 1
