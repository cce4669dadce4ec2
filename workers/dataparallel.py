"""Runs that need several devices: each trains through Ray Train (data-parallel, DDP) while the
campaign schedules it like any other run.

The driver's pool holds `DataParallelWorker` coordinators instead of `RunWorker`s when
`[resources] devices_per_run > 1`. A coordinator takes the same calls as a RunWorker
(`ping`, `run_many`); for each run it starts a TorchTrainer whose `devices_per_run` processes each
hold the dataset, train their share of every batch of the same run (training.train_run with
`data_parallel`), and whose rank 0 evaluates every example and writes the run's shard exactly as a
RunWorker would. A TorchTrainer costs seconds to start (ray.md: ~15 s on a 2-core CPU), which only
runs that need several GPUs can afford.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
import traceback

import numpy as np

from workers.results import RunFailure, WorkerConfig, WorkerResult


def _train_loop(config: dict) -> None:
    """One process of one data-parallel run (inside Ray Train). Rank 0 hands the run's summary (and the
    shard's bytes, when it cannot see the campaign directory) to the coordinator through a Ray queue:
    Ray Train V2 keeps no metrics that come without a checkpoint."""
    import ray.train
    import ray.train.torch

    from workers.worker import RunWorker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_config: WorkerConfig = config["worker"]
    worker = RunWorker(dataclasses.replace(
        worker_config, device=str(ray.train.torch.get_device()) if worker_config.use_gpu else "cpu"))
    summary = worker.run_data_parallel(config["run"], np.asarray(config["mask"], np.uint8), config["seed"],
                                       config["path"], (rank, world, ray.train.torch.prepare_model))
    if summary is not None:
        config["mailbox"].put(summary)


class DataParallelWorker:
    """Coordinator of data-parallel runs: the pool's worker when a run spans several devices."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        res = config.spec["resources"]
        self.devices = int(res["devices_per_run"])
        self.resources = {"CPU": res["cpus_per_worker"]}
        if config.use_gpu:
            self.resources["GPU"] = res["gpus_per_worker"]
        self.host = socket.gethostname()

    def ping(self) -> dict:
        return {"host": self.host, "pid": os.getpid(), "direct": True, "data_parallel": self.devices}

    def run_many(self, calls: list[tuple[int, np.ndarray, int, str]]) -> list[WorkerResult | RunFailure]:
        return [self.run(*c) for c in calls]

    def run(self, run: int, packed_mask: np.ndarray, seed: int, shard_path: str) -> WorkerResult | RunFailure:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        start = time.perf_counter()
        mailbox = Queue(maxsize=1)
        config = dict(worker=self.config, run=run, mask=np.asarray(packed_mask).tolist(), seed=seed,
                      path=shard_path, mailbox=mailbox)
        try:
            with tempfile.TemporaryDirectory(prefix="longtail-train-") as storage:
                trainer = TorchTrainer(
                    _train_loop, train_loop_config=config,
                    scaling_config=ScalingConfig(num_workers=self.devices, use_gpu=self.config.use_gpu,
                                                 resources_per_worker=self.resources),
                    run_config=RunConfig(name=f"{self.config.campaign}-run-{run}", storage_path=storage))
                trainer.fit()
            summary: WorkerResult = mailbox.get(timeout=60)
        except Exception as e:  # recorded by the driver like any failed run
            return RunFailure.of(run, e, traceback.format_exc(), self.host)
        finally:
            mailbox.shutdown()
        return dataclasses.replace(summary, seconds=round(time.perf_counter() - start, 4), devices=self.devices)
