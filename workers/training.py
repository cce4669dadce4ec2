"""The seeded training recipe of one run, and the evaluation of every example afterwards.

`train_run` is a plain function of (data on a device, subset, seed, [train] options): no Ray, no
files. It returns the predicted label and the margin (correct-class logit minus the best other
logit) of every train and test example, computed in eval mode.

The fast paths ([train] augment, precision, channels_last, compile, warmup_epochs) follow airbench's
recipe for many small runs (docs/recipes.md): the data stays resident on the device, and batches are
augmented there with whole-batch tensor ops (no DataLoader, no per-example Python). Each of them is
off by default, and with all of them off a run computes exactly what it did before they existed.

Randomness of run `seed`, each from its own stream so that turning one feature on does not change
the others' draws: initial weights from torch.manual_seed(seed), batch order from a CPU generator
seeded seed + 1, augmentation from a generator on the data's device seeded from (seed, 2). On the
CPU a run is therefore deterministic; on a GPU up to cuDNN's non-deterministic kernels.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.options import SetupError, defaults, parse_section
from workers.results import RunFailed, RunOutput
from workers.train_options import TrainOptions, warmup_problem

# [train] keys added with the fast paths, at their defaults (declared in workers/train_options.py): callers
# that build the [train] dict by hand (tests, benchmarks, ensemble.py's callers) may leave them out.
FAST_KEYS = ("augment", "crop_padding", "precision", "channels_last", "compile", "warmup_epochs")
FAST_DEFAULTS = defaults(TrainOptions, FAST_KEYS)

# torch.compile's backend: this (tests swap in a counting backend to check that runs reuse the compiled
# graphs), else $LONGTAIL_COMPILE_BACKEND (e.g. "aot_eager": Dynamo and AOTAutograd without inductor's
# code generation, which the CPU test suite uses), else "inductor"
_COMPILE_BACKEND = None


def compile_backend(device: torch.device) -> str:
    """The backend torch.compile uses on `device`; inductor on a CPU needs a C++ compiler: without one the
    worker warns and uses "aot_eager" (the same graphs, run by eager kernels) instead of failing the run."""
    backend = _COMPILE_BACKEND or os.environ.get("LONGTAIL_COMPILE_BACKEND", "") or "inductor"
    if backend == "inductor" and device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")
                                                               or shutil.which("clang++")):
        _warn_once("compile-cpu", "[train] compile = true: inductor needs a C++ compiler on a CPU worker and none "
                   "is on PATH (g++, c++, clang++); compiling with backend 'aot_eager' instead (no speed-up); "
                   "install g++ or set LONGTAIL_COMPILE_BACKEND")
        return "aot_eager"
    return backend


@dataclass
class DeviceData:
    """A dataset resident on one device, converted once per worker."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple

    @classmethod
    def from_dataset(cls, data, device: torch.device) -> "DeviceData":
        def put(a, dtype):
            return torch.as_tensor(np.array(a), dtype=dtype, device=device)  # np.array: copy out of read-only memory

        return cls(put(data.x_train, torch.float32), put(data.y_train, torch.long), put(data.x_test, torch.float32),
                   put(data.y_test, torch.long), data.num_classes, data.input_shape)


def _lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Learning-rate multiplier at 0-based `step` of `total`: a linear ramp to 1 over the first `warmup`
    steps (reaching 1 at step warmup - 1), then `schedule` over the remaining total - warmup steps. With
    warmup = 0 this is `schedule` over all steps, as before warm-up existed."""
    if step < warmup:
        return (step + 1) / warmup
    step, total = step - warmup, total - warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if schedule == "linear":
        return 1 - step / total
    return 1.0


def fast_options(train: dict) -> dict:
    """The fast-path keys of a [train] dict, defaults filled in and checked as the spec checks them (a
    hand-built dict bypasses the spec's validation, so the message says what was expected)."""
    o = {k: train.get(k, v) for k, v in FAST_DEFAULTS.items()}
    parse_section(TrainOptions, o, "[train] (as given to the worker)")
    problem = warmup_problem(o["warmup_epochs"], train["epochs"])
    if problem:
        raise SetupError(f"[train]: {problem}")
    return o


# --------------------------------------------------------------------------------------------------
#  Mixed precision and memory format: wherever PyTorch supports them, with a warning where not
# --------------------------------------------------------------------------------------------------

_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    """A RuntimeWarning, once per worker process and kind: a setting that cannot apply where the worker is."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _autocast(device: torch.device, precision: str):
    """bf16 autocast on the run's device: CUDA, and the CPU too (PyTorch's CPU autocast runs convolutions
    and matrix multiplies in bfloat16, fast on CPUs with AVX512-BF16 or AMX, emulated and slower than
    fp32 elsewhere). On a device type without bf16 autocast the run trains in fp32 (its results are
    those of precision = "fp32") and a warning says so once per worker process."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    _warn_once(f"bf16-{device.type}", f"[train] precision = 'bf16' cannot apply on {device.type} (no bf16 autocast "
               f"there in torch {torch.__version__}); runs train in fp32 (their results are those of "
               f"precision = 'fp32')")
    return contextlib.nullcontext()


def _memory_format(device: torch.device, channels_last: bool, image: bool = True):
    """channels_last (NHWC) where asked: cuDNN's convolutions and tensor cores prefer it, and oneDNN's CPU
    convolutions support it too; results equal the default layout's up to float rounding. Inputs that
    are not images (batch, C, H, W) have no such layout: a warning says the setting does nothing."""
    if channels_last and not image:
        _warn_once("channels_last", f"[train] channels_last = true cannot apply on {device.type}: the dataset's "
                   f"inputs are not images (batch, channels, height, width); runs keep the default layout")
    return torch.channels_last if channels_last and image else torch.contiguous_format


def _to_format(x: torch.Tensor, fmt) -> torch.Tensor:
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


# --------------------------------------------------------------------------------------------------
#  Augmentation: whole batches, on the device
# --------------------------------------------------------------------------------------------------

def augment_batch(x: torch.Tensor, kind: str, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip ("flip"), then a random crop of the batch zero-padded by `padding`
    pixels on each side ("flip-crop": the image moves by up to `padding` pixels, as in the CIFAR
    pipeline of Feldman & Zhang's code), drawn per example from `gen`. x: (batch, C, H, W)."""
    if kind == "none":
        return x
    b, _, h, w = x.shape
    dev = x.device
    flip = torch.rand(b, generator=gen, device=dev) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if kind == "flip-crop" and padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=dev)
        rows = dy[:, None, None] + torch.arange(h, device=dev)[None, :, None]  # (b, h, 1)
        cols = dx[:, None, None] + torch.arange(w, device=dev)[None, None, :]  # (b, 1, w)
        # one gather for the whole batch: advanced indices around the channel slice give (b, h, w, C)
        x = padded[torch.arange(b, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    return x


def _augment_generator(seed: int, device: torch.device) -> torch.Generator:
    # its own stream (not seed + 2, which may be another run's seed): SeedSequence mixes (seed, 2)
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, 2]).generate_state(1)[0]))


# --------------------------------------------------------------------------------------------------
#  torch.compile: one compiled module per worker process, reused by every run
# --------------------------------------------------------------------------------------------------
#
#  Compiling takes tens of seconds; a run of a small model takes a second. Compiling each run's fresh
#  model would recompile every run (and Dynamo gives up and runs eagerly after a few recompiles).
#  So the worker keeps ONE module and its compiled wrapper (the cache below: the module object, its
#  parameter and buffer tensors, and Dynamo's compiled graphs for it); every run still starts from
#  its own seeded initialisation: the run builds a fresh model exactly as without compile
#  (torch.manual_seed(seed), then the factory) and copies its parameters and buffers into the cached
#  module's tensors in place, so the compiled graphs, which read those tensors, stay valid. The
#  optimizer, its momentum and the schedule are new in every run. A different factory, class count,
#  input shape, device or memory format replaces the cached module.

_compiled: dict = {}


def _compiled_model(build, fresh: torch.nn.Module, key: tuple):
    """(module to train, the same module uncompiled) for a run whose freshly initialised model is `fresh`."""
    entry = _compiled.get("entry")
    if entry is not None and entry[0] == key:
        _, module, compiled = entry
        src, dst = fresh.state_dict(keep_vars=True), module.state_dict(keep_vars=True)
        if list(src) == list(dst) and all(src[k].shape == dst[k].shape for k in src):
            with torch.no_grad():
                for k, t in dst.items():
                    t.copy_(src[k])
            for p in module.parameters():
                p.grad = None
            return compiled, module
    _compiled.clear()  # hold one model at most: a worker trains one model kind
    compiled = torch.compile(fresh, backend=compile_backend(key[3]))
    _compiled["entry"] = (key, fresh, compiled)
    return compiled, fresh


# --------------------------------------------------------------------------------------------------
#  One run
# --------------------------------------------------------------------------------------------------

def train_run(build, data: DeviceData, train_idx: np.ndarray, seed: int, train: dict, on_epoch=None,
              data_parallel: tuple | None = None) -> RunOutput:
    """Train a fresh model from `build(num_classes, input_shape)` on examples `train_idx`, then evaluate all.

    `on_epoch(epoch, model)`, if given, is called after every epoch with the model (for recipe tuning,
    which scores it on held-out examples and may stop the run early).

    `data_parallel = (rank, world, wrap)` trains this process's share of one run trained by `world`
    processes (workers/dataparallel.py): every process draws the same shuffle, takes every world-th
    example of each batch, and `wrap(model)` (DistributedDataParallel) averages the gradients, so one
    step is one step of the global batch; a last batch smaller than `world` is skipped by all alike."""
    fast = fast_options(train)
    device = data.x_train.device
    fmt = _memory_format(device, fast["channels_last"], data.x_train.dim() == 4)
    if fast["augment"] != "none" and data.x_train.dim() != 4:
        raise RunFailed(f"[train] augment = {fast['augment']!r} needs image inputs (channels, height, width); "
                        f"the dataset's inputs have shape {tuple(data.input_shape)}; set augment = 'none'")
    torch.manual_seed(seed)  # weight initialisation
    shuffle = torch.Generator(device="cpu").manual_seed(seed + 1)
    model = build(data.num_classes, data.input_shape).to(device, memory_format=fmt)
    trained, plain = model, model
    if fast["compile"]:
        key = (build, data.num_classes, tuple(data.input_shape), device, fmt)
        trained, plain = _compiled_model(build, model, key)
    rank, world = 0, 1
    if data_parallel is not None:
        rank, world, wrap = data_parallel
        trained = wrap(trained)
    aug = _augment_generator(seed, device) if fast["augment"] != "none" else None
    params = [p for p in plain.parameters() if p.requires_grad]
    if train["optimizer"] == "adam":
        opt = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"],
                              nesterov=train["nesterov"] and train["momentum"] > 0,
                              weight_decay=train["weight_decay"])
    idx = torch.as_tensor(train_idx, dtype=torch.long, device=device)
    x, y = data.x_train[idx], data.y_train[idx]
    m, bs = len(idx), train["batch_size"]
    steps_per_epoch = max(1, math.ceil(m / bs))
    total = train["epochs"] * steps_per_epoch
    warmup = round(fast["warmup_epochs"] * steps_per_epoch)
    step = 0
    loss = torch.zeros(())
    # training dynamics (workers/dynamics.py), over the subset's positions; a data-parallel process sees
    # a share of each batch only, so those runs record none
    rec = None
    if "dynamics" in train.get("store", ()) and world == 1:
        from workers.dynamics import Recorder

        rec = Recorder(1, y, train["label_smoothing"])
    start = time.perf_counter()
    trained.train()
    for epoch in range(train["epochs"]):
        order = torch.randperm(m, generator=shuffle).to(device)
        for b in range(steps_per_epoch):
            batch = order[b * bs:(b + 1) * bs]
            if world > 1:
                if len(batch) < world:  # every process must step together: skip alike
                    continue
                batch = batch[rank::world]
            for group in opt.param_groups:
                group["lr"] = train["lr"] * _lr_factor(train["schedule"], step, total, warmup)
            xb = x[batch]
            if aug is not None:
                xb = augment_batch(xb, fast["augment"], fast["crop_padding"], aug)
            with _autocast(device, fast["precision"]):
                logits = trained(_to_format(xb, fmt))
                loss = F.cross_entropy(logits.float(), y[batch], label_smoothing=train["label_smoothing"])
            if rec is not None:
                rec.batch(logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if rec is not None:
            rec.end_epoch()
        if not torch.isfinite(loss):  # also waits for the device: train_seconds below is real time
            raise RunFailed(f"training loss became {loss.item()} in epoch {epoch + 1}/{train['epochs']}; "
                            f"lower [train] lr (now {train['lr']}) or check the data")
        if on_epoch is not None:
            on_epoch(epoch, plain)
            trained.train()
    train_seconds = time.perf_counter() - start
    # evaluated uncompiled: one forward per example is a small share of a run, and a compiled eval
    # graph would add a compile (and one more per new batch size) for little gain
    kw = {"precision": fast["precision"], "channels_last": fast["channels_last"],
          "keep_logits": "logits" in train.get("store", ())}
    train_pred, train_values = evaluate(plain, data.x_train, data.y_train, train["eval_batch_size"], **kw)
    test_pred, test_values = evaluate(plain, data.x_test, data.y_test, train["eval_batch_size"], **kw)
    dynamics = rec.result(0, np.arange(m)) if rec is not None else None
    return RunOutput(train_pred, test_pred, train_values, test_values, train_seconds, float(loss.item()), dynamics)


def batch_scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted label, margin (correct-class logit minus the best other) and correct-class probability of
    float32 logits (..., B, C) for labels y (B,); leading axes (packed models) are kept."""
    yb = y.expand(*logits.shape[:-1])[..., None]
    own = logits.gather(-1, yb)[..., 0]
    others = logits.scatter(-1, yb, float("-inf")).amax(dim=-1)
    return logits.argmax(dim=-1), own - others, torch.softmax(logits, dim=-1).gather(-1, yb)[..., 0]


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, precision: str = "fp32",
             channels_last: bool = False, keep_logits: bool = False) -> tuple[np.ndarray, dict]:
    """Predicted labels, margins and correct-class probabilities of every example, in eval mode
    (batch norm and dropout frozen), never augmented; `precision` and `channels_last` as in training;
    margins and probabilities computed from float32 logits. With keep_logits, also every
    logit as float16 (n, classes): 2 bytes per class per example, so only when [train] store asks."""
    model.eval()
    fmt = _memory_format(x.device, channels_last, x.dim() == 4)
    preds, margins, probs, kept = [], [], [], []
    for s in range(0, len(y), batch_size):
        with _autocast(x.device, precision):
            logits = model(_to_format(x[s:s + batch_size], fmt)).float()
        pred, margin, prob = batch_scores(logits, y[s:s + batch_size])
        preds.append(pred)
        margins.append(margin)
        probs.append(prob)
        if keep_logits:
            kept.append(logits.clamp(-65504, 65504).half().cpu())
    pred = torch.cat(preds).cpu().numpy()
    margin = torch.cat(margins).cpu().numpy().astype(np.float32)
    if not np.isfinite(margin).all():
        raise RunFailed("evaluation produced NaN or infinite logits")
    values = {"margin": margin, "probability": torch.cat(probs).cpu().numpy().astype(np.float32)}
    if keep_logits:
        values["logits"] = torch.cat(kept).numpy()
    return pred, values
