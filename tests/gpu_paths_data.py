"""Helpers of tests/test_gpu_paths.py that other processes import: dataset plug-ins (Ray workers) and
one process of a data-parallel run (spawned processes). Light on imports: each process imports this.

Dataset plug-ins: the built-in CIFAR loaders on files a test generated.

torchvision checks the official archives' MD5 sums before it reads a CIFAR batch; generated batches
have other sums. These loaders tell torchvision to expect the sums of the files found under `root`
(its check still runs, and still reads every file), then call the built-in loader unchanged. They
are plug-ins (named "gpu_paths_data:cifar10") because Ray's worker processes, which load the data,
do not see a test's monkeypatches; tests/ is on their PYTHONPATH (tests/conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from workers.models import model_factory
from workers.training import DeviceData, train_run

# A small campaign of "cnn" runs on digits (tests/test_gpu_paths.py, tests/test_packed_cnn.py): one epoch
# of 32 steps, which takes the models well above chance (their predictions then do not hang on rounding);
# `extra` holds more [train] keys and further sections
CNN_DIGITS_SPEC = """
[campaign]
name = "{name}"
runs = {runs}
seed = {seed}
[dataset]
name = "digits"
[model]
name = "cnn"
channels = [8, 16]
hidden = 16
[train]
epochs = 1
batch_size = 32
lr = 0.1
{extra}
"""

# the data-parallel run: 48 examples in 3 batches of 16, SGD without momentum
TRAIN = dict(epochs=1, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.0, nesterov=False, weight_decay=0.0,
             schedule="cosine", label_smoothing=0.0, eval_batch_size=64)


def _trust(cls, folder: Path) -> None:
    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls.train_list = [[name, md5(name)] for name, _ in cls.train_list]
    cls.test_list = [[name, md5(name)] for name, _ in cls.test_list]
    cls.meta = {**cls.meta, "md5": md5(cls.meta["filename"])}


def _load(section: dict, name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    from workers.realdata import load_cifar10, load_cifar100

    cls, load = (CIFAR10, load_cifar10) if name == "cifar10" else (CIFAR100, load_cifar100)
    options = {k: v for k, v in section.items() if k != "name"}
    _trust(cls, Path(options["root"]) / cls.base_folder)
    return load(options)


def cifar10(section: dict):
    return _load(section, "cifar10")


def cifar100(section: dict):
    return _load(section, "cifar100")


def dp_data() -> DeviceData:
    """Vectors whose first feature is the example's index, so that a forward hook can tell who saw what."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    x[:, 0] = torch.arange(64, dtype=torch.float32)
    return DeviceData(x / torch.tensor([64.0, 1, 1, 1, 1, 1]), torch.arange(64) % 3, x[:8].clone(),
                      torch.arange(8) % 3, 3, (6,))


def dp_run(rank: int, world: int, init: str, out) -> None:
    """One process of a data-parallel run (or the single process, world = 1): the examples each step
    saw and the gradients of the last step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    seen, kept = [], []
    build = model_factory({"name": "mlp", "hidden": [8]})

    def make(num_classes, input_shape):
        model = build(num_classes, input_shape)
        def record(mod, inp):  # the indices of this step's examples (training only)
            if mod.training:
                seen.append(sorted(round(v) for v in (inp[0][:, 0] * 64).tolist()))
        model.register_forward_pre_hook(record)
        kept.append(model)
        return model

    dp = (rank, world, lambda m: DistributedDataParallel(m)) if world > 1 else None
    train_run(make, dp_data(), np.arange(48), 7, TRAIN, data_parallel=dp)
    grads = [p.grad.numpy().copy() for p in kept[0].parameters()]  # numpy: torch tensors would travel by fd
    out.put((rank, seen, grads))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
