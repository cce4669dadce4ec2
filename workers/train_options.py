"""[train]: the options of the seeded training recipe, declared once, where the workers that consume
them live.

orchestrator.spec checks a spec's [train] table against `TrainOptions` (its TrainSection adds the
cross-key check and the spec's error class); workers/training.py derives the defaults of the keys a
hand-built [train] dict may leave out from it, and workers/models.py the values at which the ensemble
trainer's missing features change nothing. Changing a default here changes the spec hash of every
campaign that left the key out: tests/test_spec_hash.py pins them.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.options import nonnegative as _nonnegative
from workers.options import option
from workers.options import positive as _positive

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")
AUGMENTS = ("none", "flip", "flip-crop")
PRECISIONS = ("fp32", "bf16")
STORABLE = ("margin", "probability", "logits", "dynamics")


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = option(30, "passes over the run's subset", _positive, "an integer > 0")
    batch_size: int = option(128, "examples per optimizer step", _positive, "an integer > 0")
    optimizer: str = option("sgd", "'sgd' (with momentum) or 'adam'", lambda v: v in OPTIMIZERS,
                            "'sgd' or 'adam'")
    lr: float = option(0.1, "learning rate", _positive, "a number > 0")
    momentum: float = option(0.9, "SGD momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
    nesterov: bool = option(True, "Nesterov momentum (SGD)")
    weight_decay: float = option(5e-4, "L2 weight decay", _nonnegative, "a number >= 0")
    schedule: str = option("constant", "learning-rate schedule: 'constant', 'cosine' or 'linear' (decay to 0)",
                           lambda v: v in SCHEDULES, "'constant', 'cosine' or 'linear'")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)")
    # The fast paths (docs/recipes.md). Each default is the behaviour from before they existed.
    warmup_epochs: float = option(0.0, "epochs of linear learning-rate warm-up from 0 to lr, after which the schedule "
                                  "runs over the remaining steps; 0 = none. Must be below epochs", _nonnegative,
                                  "a number >= 0 (and < epochs)", neutral_default=True)
    augment: str = option("none", "augmentation of each training batch, on the device: 'none', 'flip' (random "
                          "horizontal flip) or 'flip-crop' (flip, then a random crop of the image zero-padded by "
                          "crop_padding pixels); images only; evaluation is never augmented",
                          lambda v: v in AUGMENTS, "'none', 'flip' or 'flip-crop'", neutral_default=True)
    crop_padding: int = option(4, "pixels of zero padding on each side for augment = 'flip-crop' (the image moves "
                               "by up to this many pixels)", _nonnegative, "an integer >= 0", neutral_default=True)
    precision: str = option("fp32", "'fp32' or 'bf16' (bfloat16 autocast, on CUDA only: runs on a CPU train in "
                            "fp32 and a warning says so)", lambda v: v in PRECISIONS, "'fp32' or 'bf16'",
                            neutral_default=True)
    channels_last: bool = option(False, "convolutions in the channels-last (NHWC) memory layout, on CUDA only; "
                                 "faster for convnets with bf16", affects_results=False)
    compile: bool = option(False, "torch.compile the model once per worker and reuse it across runs (each run "
                           "still starts from its own seeded initialisation); pays off over many runs of a "
                           "convnet on a GPU", affects_results=False)
    store: list[str] = option(["margin"], "per-example values written to every shard besides the prediction, "
                              "when the learner produces them: 'margin' (correct-class logit minus the best "
                              "other, float16), 'probability' (softmax probability of the correct class), "
                              "'logits' (every logit, float16: 2 bytes per class per example, opt-in), "
                              "'dynamics' (training dynamics of the examples trained on: cumulative loss, "
                              "learning time, forgetting events; under 4 bytes per trained row, docs/proxies-and-"
                              "triage.md)",
                              lambda v: set(v) <= set(STORABLE) and len(set(v)) == len(v),
                              "a list of distinct values from: " + ", ".join(STORABLE))
    eval_batch_size: int = option(4096, "examples per forward pass when every example is evaluated", _positive,
                                  "an integer > 0", affects_results=False)
    trainer: str = option("", "optional plug-in 'package.module:function' replacing the torch recipe: "
                          "fn(dataset, train_indices, seed) -> (train_pred, test_pred)",
                          lambda v: v == "" or ":" in v, "'' or 'package.module:function'")


def warmup_problem(warmup_epochs: float, epochs: int) -> str | None:
    """Why these warm-up epochs cannot be used with `epochs`, or None: the warm-up is part of the epochs."""
    if warmup_epochs >= epochs:
        return (f"warmup_epochs = {warmup_epochs} must be below epochs = {epochs} (the warm-up is part of the "
                f"epochs); lower warmup_epochs or raise epochs")
    return None
