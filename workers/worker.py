"""The long-lived worker: one per process, for the whole campaign.

Starting Python and importing torch costs seconds and a small run costs less, so a worker loads the
dataset onto its device once and then trains run after run. It is a plain class; the driver makes it
a Ray actor. `run` trains one run and writes its shard atomically; it returns only a small summary,
or, when the run fails on its own, why, as data. torch is imported only by workers that train
torch models.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import traceback

import numpy as np

from workers import shard as shard_format
from workers.datasets import Dataset, DatasetError, dataset_fingerprint, load_dataset, resolve
from workers.errors import LongtailError, PluginError, call_plugin
from workers.models import convnet_pack, ensemble_options, model_factory
from workers.options import SetupError
from workers.results import RunFailed, RunFailure, RunOutput, WorkerConfig, WorkerResult, run_plugin_trainer
from workers.storage import StorageError


class NoGPUError(LongtailError):
    """A worker that reserved a GPU finds no CUDA device: it refuses to start rather than train on the CPU."""


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import pyarrow

    out = {"python": platform.python_version(), "numpy": np.__version__, "pyarrow": pyarrow.__version__}
    for package in ("longtail", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # pragma: no cover
            out[package] = "unknown"
    return out


def _node_id() -> str:
    """The Ray node this worker runs on, when it runs in Ray (recorded in every shard)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # pragma: no cover - outside Ray or an older API
        return ""


class RunWorker:
    def __init__(self, config: WorkerConfig | dict, *args, **kwargs):
        """Load the dataset the spec names (each worker reads it where it runs: no copy of the data
        travels through the driver) and check that it is the one the campaign was created with.

        `config.probe` is a file the driver just wrote in the campaign directory: a worker that cannot
        see it (a node whose disk is not the driver's) returns its shards' bytes for the driver to
        write, so that no shard is ever written where the driver will not find it.

        RunWorker(spec, campaign, spec_hash, fingerprint, ...) (WorkerConfig's fields) still works, for
        scripts and tests that build a worker by hand."""
        if not isinstance(config, WorkerConfig):
            config = WorkerConfig(config, *args, **kwargs)
        spec, fingerprint, device = config.spec, config.fingerprint, config.device
        dataset = load_dataset(spec["dataset"])
        found = dataset_fingerprint(dataset)
        if found != fingerprint:
            raise DatasetError(f"worker on {socket.gethostname()}: dataset {spec['dataset']['name']!r} has "
                               f"fingerprint {found}, the campaign expects {fingerprint}; every node must see "
                               f"the same data")
        self.dataset = dataset
        self.campaign = config.campaign
        self.spec_hash = config.spec_hash
        self.train = dict(spec["train"])
        self.soft = list(spec["estimates"]["soft"])
        trainer = self.train.get("trainer", "")
        self.trainer = resolve(trainer, "trainer") if trainer else None
        self.device = "cpu"
        if self.trainer is None:
            import torch

            from workers.training import DeviceData

            torch.set_num_threads(max(1, config.threads))
            if config.use_gpu and not torch.cuda.is_available() and (device is None or device.startswith("cuda")):
                raise NoGPUError(
                    f"worker on {socket.gethostname()} (pid {os.getpid()}) reserved a GPU ([resources] "
                    f"gpus_per_worker = {spec['resources']['gpus_per_worker']}) but torch finds no CUDA device "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); it refuses to train on the CPU "
                    f"instead. Check the node's driver with nvidia-smi and that torch is a CUDA build, or set "
                    f"gpus_per_worker = 0 to train on CPUs")
            device = torch.device(device or ("cuda" if config.use_gpu else "cpu"))
            self.device = str(device)
            self.data = DeviceData.from_dataset(dataset, device)
            self.build = model_factory(spec["model"])
        # MLPs whose recipe the vectorized trainer reproduces train several runs in one step
        # (workers/ensemble.py); anything else one at a time
        self.ensemble = None if self.trainer else ensemble_options(spec["model"], spec["train"])
        # built-in convnets, when packing is on: every run of the campaign (a group of one included)
        # trains through workers/packed.py, so that its numbers never depend on its pack-mates
        self.packed = False
        if self.trainer is None and self.ensemble is None and convnet_pack(spec["model"], spec["train"],
                                                                           spec["resources"]) > 1:
            from workers.packed import fusable

            self.packed = fusable(self.build, dataset.num_classes, dataset.input_shape) == ""
        self.host = socket.gethostname()
        self.node = _node_id()
        self.versions = library_versions()
        self.direct = config.ship != "driver" and (not config.probe or os.path.exists(config.probe))
        self._warm_up()

    def _warm_up(self) -> None:
        """Build and serialize one throw-away shard in memory: the first shard a process builds imports
        pandas (pyarrow's numpy conversion; 0.35-0.5 s) and caches the columns every shard shares, which
        then happens at start-up rather than in the first run (benchmarks/overhead.py). A failure here is
        left for the first run to report, as data."""
        ds = self.dataset
        try:
            table = shard_format.build_table(np.zeros(ds.n_train, bool), ds.y_train, ds.y_test, ds.y_train,
                                             ds.y_test, ds.num_classes, {})
            shard_format.shard_bytes(table)
        except Exception:  # pragma: no cover - the first run meets it again and records why
            pass

    def ping(self) -> dict:
        return {"host": self.host, "node": self.node, "pid": os.getpid(), "direct": self.direct}

    def _failure(self, run: int, e: BaseException, detail: str) -> RunFailure:
        """A run that failed on its own, as data: the driver records it in failed/."""
        # storage trouble (disk full, permissions) is not the run's fault: the driver stops
        return RunFailure.of(run, e, detail, self.host, fatal=isinstance(e, StorageError))

    def run(self, run: int, packed_mask: np.ndarray, seed: int, shard_path: str) -> WorkerResult | RunFailure:
        """Train run `run` and write its shard; a run that fails on its own returns why, as data."""
        start = time.perf_counter()
        try:
            mask = self._mask(packed_mask)
            return self._finish(run, mask, seed, shard_path, self._train(mask, seed), start)
        except Exception as e:  # worker deaths are the driver's to retry
            return self._failure(run, e, traceback.format_exc())

    def run_many(self, calls: list[tuple[int, np.ndarray, int, str]]) -> list[WorkerResult | RunFailure]:
        """Several runs (run, packed mask, seed, shard path) in one call: trained together in one
        vectorized step where the model allows (the builtin MLP; the builtin convnets when packing is on),
        else one after the other."""
        if self.packed:
            from workers.packed import pack_groups

            results: list = [None] * len(calls)
            sizes = [int(self._mask(c[1]).sum()) for c in calls]
            for group in pack_groups(sizes):  # a pack needs subsets of one size (batch norm)
                for i, r in zip(group, self._run_packed([calls[i] for i in group])):
                    results[i] = r
            return results
        if self.ensemble is None:
            return [self.run(*c) for c in calls]
        # one run alone too (a retried suspect, the last of a queue): train_run would give other
        # float roundings than the ensemble, and a run's shard must not depend on its company
        return self._run_packed(calls)

    def _run_packed(self, calls: list) -> list[WorkerResult | RunFailure]:
        """Runs trained together: MLPs by workers/ensemble.py, built-in convnets by workers/packed.py."""
        from workers.ensemble import EnsembleRunFailed, train_runs

        start = time.perf_counter()
        masks = [self._mask(c[1]) for c in calls]
        failed: dict[int, str] = {}
        try:
            subsets, seeds = [np.flatnonzero(m) for m in masks], [c[2] for c in calls]
            if self.packed:
                from workers.packed import train_packed

                outputs = train_packed(self.build, self.data, subsets, seeds, self.train)
            else:
                outputs = train_runs(self.ensemble, self.data, subsets, seeds, self.train)
        except EnsembleRunFailed as e:
            outputs, failed = e.outputs, e.failed
        except Exception as e:
            detail = traceback.format_exc()
            return [self._failure(c[0], e, detail) for c in calls]
        results = []
        for k, ((run, _, seed, path), mask, out) in enumerate(zip(calls, masks, outputs)):
            if out is None:
                results.append(self._failure(run, RunFailed(failed.get(k, "no output")), ""))
                continue
            try:
                results.append(self._finish(run, mask, seed, path, out, start))
            except Exception as e:
                results.append(self._failure(run, e, traceback.format_exc()))
        return results

    def run_data_parallel(self, run: int, packed_mask: np.ndarray, seed: int, shard_path: str,
                          data_parallel: tuple) -> WorkerResult | None:
        """This process's share of a run trained by several (workers/dataparallel.py); rank 0 writes the
        shard and returns the summary, the others None. Failures raise: Ray Train fails the run."""
        from workers.training import train_run

        start = time.perf_counter()
        mask = self._mask(packed_mask)
        out = train_run(self.build, self.data, np.flatnonzero(mask), seed, self.train, data_parallel=data_parallel)
        return self._finish(run, mask, seed, shard_path, out, start) if data_parallel[0] == 0 else None

    def _mask(self, packed_mask: np.ndarray) -> np.ndarray:
        return np.unpackbits(np.asarray(packed_mask, np.uint8), count=self.dataset.n_train).astype(bool)

    def _train(self, mask: np.ndarray, seed: int) -> RunOutput:
        train_idx = np.flatnonzero(mask)
        if self.trainer is not None:
            return run_plugin_trainer(self.trainer, self.dataset, train_idx, seed, self.train["trainer"])
        from workers.training import train_run

        return train_run(self.build, self.data, train_idx, seed, self.train)

    def _finish(self, run: int, mask: np.ndarray, seed: int, shard_path: str, out: RunOutput,
                start: float) -> WorkerResult:
        """Write run `run`'s shard (or return its bytes) and its summary."""
        ds = self.dataset
        train_ok = out.train_pred == ds.y_train
        summary = {
            "run": run, "seed": seed, "host": self.host, "node": self.node, "pid": os.getpid(),
            "device": self.device, "train_seconds": round(out.train_seconds, 4),
            "test_acc": float((out.test_pred == ds.y_test).mean()),
            "train_acc_in": float(train_ok[mask].mean()),
            "train_acc_out": float(train_ok[~mask].mean()),
            "final_loss": out.final_loss,
            "finished_at": round(time.time(), 3),
        }
        meta = {"campaign": self.campaign, "spec_hash": self.spec_hash, "n_train": ds.n_train,
                "n_test": ds.n_test, "versions": self.versions, **summary}
        values = {name: (out.train_values[name], out.test_values[name]) for name in self.train["store"]
                  if name in out.train_values}
        missing = sorted(set(self.soft) - set(values))
        if missing:  # values [train] store lists but the learner lacks are simply absent, unless needed
            raise RunFailed(f"[estimates] soft needs {missing} but the learner produced only "
                            f"{sorted(out.train_values) or 'predictions'}")
        table = shard_format.build_table(mask, out.train_pred, out.test_pred, ds.y_train, ds.y_test,
                                         ds.num_classes, meta, values,
                                         out.dynamics if "dynamics" in self.train["store"] else None)
        shipped = None
        if self.direct:
            shard_format.write_shard(shard_path, table)
        else:
            shipped = shard_format.shard_bytes(table)
        return WorkerResult(**summary, seconds=round(time.perf_counter() - start, 4), shard=shipped)


def preflight(spec: dict, dataset: Dataset) -> None:
    """Fail before any compute if the model or trainer cannot be built or run on this dataset."""
    trainer = spec["train"].get("trainer", "")
    if trainer:
        resolve(trainer, "trainer")
        return
    import torch

    name = spec["model"]["name"]
    build = model_factory(spec["model"])
    if ":" in name:  # a user's factory: its exception is the plug-in's
        model = call_plugin("model factory", name, build, dataset.num_classes, dataset.input_shape)
    else:
        try:
            model = build(dataset.num_classes, dataset.input_shape)
        except ValueError as e:  # a built-in that does not fit the data (e.g. cnn on flat inputs)
            raise SetupError(f"model {name!r} does not fit dataset {spec['dataset']['name']!r}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise PluginError(f"model factory {name!r} returned {type(model).__name__}; expected a torch.nn.Module "
                          f"(docs/plugins.md)")
    x = torch.as_tensor(np.array(dataset.x_train[:2]))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        raise SetupError(f"model {spec['model']['name']!r} cannot take inputs of shape {tuple(x.shape)} from "
                         f"dataset {spec['dataset']['name']!r}: {type(e).__name__}: {e}") from None
    if tuple(out.shape) != (2, dataset.num_classes):
        raise SetupError(f"model {spec['model']['name']!r} returned shape {tuple(out.shape)} for 2 inputs; "
                         f"expected (2, {dataset.num_classes}) logits")
