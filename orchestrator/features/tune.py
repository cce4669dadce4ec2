"""`longtail tune`: search the recipe's learning rate, weight decay and epochs at the campaign's subset
ratio with Ray Tune (ASHA), and write the best recipe into a new spec.

What is tuned is what a campaign will train: models on random subsets of `subset_ratio` of the
training set. Each trial trains on the same subset (drawn from the campaign seed, as run 0 of the
plan) and is scored after every epoch on the training examples outside it: the held-out accuracy
that memorization estimates are made against. The test set is never looked at, so the campaign's
influence estimates on it are not tuned to. ASHA stops poor trials after a few epochs; actors are
reused between trials, since starting a process and importing torch costs more than a small trial
(ray.md section 5: 0.5 trials/s without reuse, 15 with).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile

import numpy as np

from workers.errors import LongtailError

from orchestrator import spec as specs
from orchestrator.plan import make_plan


class TuneError(LongtailError, ValueError):
    pass


def search_space(spec: specs.Spec) -> dict:
    """Learning rate within 10x of the spec's (log-uniform), weight decay from 1e-6 to 1e-2 (log-uniform)."""
    from ray import tune

    lr = spec.train.lr
    return {"lr": tune.loguniform(lr / 10, lr * 10), "weight_decay": tune.loguniform(1e-6, 1e-2)}


def _trainable(config: dict, spec_dict: dict, seed: int, ratio: float, design: str):
    """One trial: train on the campaign's first subset, report held-out accuracy after every epoch."""
    import torch
    from ray import tune

    from workers.datasets import load_dataset
    from workers.models import model_factory
    from workers.training import DeviceData, evaluate, train_run

    torch.set_num_threads(1)
    data = load_dataset(spec_dict["dataset"])
    device = torch.device("cuda" if torch.cuda.is_available() and spec_dict["resources"]["gpus_per_worker"] > 0
                          else "cpu")
    device_data = DeviceData.from_dataset(data, device)
    plan = make_plan(design, seed, data.n_train, ratio, 1)
    mask = plan.mask(0)
    held_out = torch.as_tensor(np.flatnonzero(~mask), device=device)
    train = dict(spec_dict["train"], lr=config["lr"], weight_decay=config["weight_decay"], epochs=config["epochs"])

    def score(epoch: int, model) -> None:
        pred, _ = evaluate(model, device_data.x_train[held_out], device_data.y_train[held_out],
                           train["eval_batch_size"])
        acc = float((pred == data.y_train[~mask]).mean())
        tune.report({"heldout_accuracy": acc, "epoch": epoch + 1})

    train_run(model_factory(spec_dict["model"]), device_data, np.flatnonzero(mask), int(plan.seeds[0]), train,
              on_epoch=score)


def tune_recipe(spec: specs.Spec, samples: int, max_epochs: int, address: str | None = None) -> dict:
    """Run the search; returns {"lr", "weight_decay", "epochs", "heldout_accuracy", "trials"}."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.train.trainer:
        raise TuneError("[train] trainer is a plug-in learner: `longtail tune` tunes the torch recipe "
                        "([train] lr, weight_decay, epochs), which a plug-in does not use")
    from cluster.connect import ray_init

    _, owned, _ = ray_init(address, spec.resources.local_cpus)
    c = spec.campaign
    trainable = tune.with_parameters(_trainable, spec_dict=spec.to_dict(), seed=c.seed, ratio=spec.primary_ratio,
                                     design="bernoulli" if c.design == "bernoulli" else "fixed")
    resources = {"cpu": spec.resources.cpus_per_worker, "gpu": spec.resources.gpus_per_worker}
    space = dict(search_space(spec), epochs=max_epochs)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=max(1, max_epochs // 8),
                              reduction_factor=3)
    storage = tempfile.mkdtemp(prefix="longtail-tune-")
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources), param_space=space,
            tune_config=tune.TuneConfig(metric="heldout_accuracy", mode="max", scheduler=scheduler,
                                        num_samples=samples, reuse_actors=True,
                                        # the search's points come from the campaign seed: reproducible
                                        search_alg=BasicVariantGenerator(random_state=c.seed)),
            run_config=tune.RunConfig(name=f"tune-{c.name}", storage_path=storage, verbose=0))
        grid = tuner.fit()
        if grid.num_errors == len(grid) or len(grid) == 0:
            raise TuneError(f"every trial failed; the first error: {grid.errors[0] if grid.errors else 'unknown'}")
        best_acc, best = -1.0, None
        for result in grid:  # the best (trial, epoch) over every reported epoch, not only the last
            if result.error is not None or result.metrics_dataframe is None:
                continue
            df = result.metrics_dataframe
            i = int(df["heldout_accuracy"].idxmax())
            if df["heldout_accuracy"][i] > best_acc:
                best_acc, best = float(df["heldout_accuracy"][i]), (result.config, int(df["epoch"][i]))
        config, epochs = best
        return {"lr": float(config["lr"]), "weight_decay": float(config["weight_decay"]), "epochs": epochs,
                "heldout_accuracy": best_acc, "trials": len(grid), "failed_trials": grid.num_errors}
    finally:
        import shutil

        shutil.rmtree(storage, ignore_errors=True)
        if owned:
            ray.shutdown()


def tuned_spec(spec: specs.Spec, best: dict) -> specs.Spec:
    train = dataclasses.replace(spec.train, lr=_round(best["lr"]), weight_decay=_round(best["weight_decay"]),
                                epochs=best["epochs"])
    return spec.replace(train=train)


def _round(x: float) -> float:
    """Three significant digits: a recipe is not more precise than its search."""
    return float(f"{x:.3g}") if x and math.isfinite(x) else x
