"""The seeded training recipe of one run, and the evaluation of every example afterwards.

`train_run` is a plain function of (data on a device, subset, seed, [train] options): no Ray, no
files. It returns the predicted label and the margin (correct-class logit minus the best other
logit) of every train and test example, computed in eval mode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .results import RunFailed, RunOutput


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


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if schedule == "linear":
        return 1 - step / total
    return 1.0


def train_run(build, data: DeviceData, train_idx: np.ndarray, seed: int, train: dict) -> RunOutput:
    """Train a fresh model from `build(num_classes, input_shape)` on examples `train_idx`, then evaluate all."""
    device = data.x_train.device
    torch.manual_seed(seed)  # weight initialisation
    shuffle = torch.Generator(device="cpu").manual_seed(seed + 1)
    model = build(data.num_classes, data.input_shape).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
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
    step = 0
    loss = torch.zeros(())
    start = time.perf_counter()
    model.train()
    for epoch in range(train["epochs"]):
        order = torch.randperm(m, generator=shuffle).to(device)
        for b in range(steps_per_epoch):
            batch = order[b * bs:(b + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = train["lr"] * _lr_factor(train["schedule"], step, total)
            loss = F.cross_entropy(model(x[batch]), y[batch], label_smoothing=train["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if not torch.isfinite(loss):
            raise RunFailed(f"training loss became {loss.item()} in epoch {epoch + 1}/{train['epochs']}; "
                            f"lower [train] lr (now {train['lr']}) or check the data")
    train_seconds = time.perf_counter() - start
    train_pred, train_values = evaluate(model, data.x_train, data.y_train, train["eval_batch_size"])
    test_pred, test_values = evaluate(model, data.x_test, data.y_test, train["eval_batch_size"])
    return RunOutput(train_pred, test_pred, train_values, test_values, train_seconds, float(loss.item()))


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[np.ndarray, dict]:
    """Predicted labels, margins and correct-class probabilities of every example, in eval mode
    (batch norm and dropout frozen)."""
    model.eval()
    preds, margins, probs = [], [], []
    for s in range(0, len(y), batch_size):
        logits = model(x[s:s + batch_size]).float()
        yb = y[s:s + batch_size]
        own = logits.gather(1, yb[:, None])[:, 0]
        others = logits.scatter(1, yb[:, None], float("-inf")).amax(dim=1)
        preds.append(logits.argmax(dim=1))
        margins.append(own - others)
        probs.append(torch.softmax(logits, dim=1).gather(1, yb[:, None])[:, 0])
    pred = torch.cat(preds).cpu().numpy()
    margin = torch.cat(margins).cpu().numpy().astype(np.float32)
    if not np.isfinite(margin).all():
        raise RunFailed("evaluation produced NaN or infinite logits")
    return pred, {"margin": margin, "probability": torch.cat(probs).cpu().numpy().astype(np.float32)}
