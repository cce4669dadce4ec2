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
