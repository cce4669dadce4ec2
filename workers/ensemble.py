"""K MLP runs trained at once in one process, on stacked weights and batched matrix multiplies.

`train_runs(options, data, train_indices, seeds, train)` returns what K calls of
`training.train_run(make_mlp, data, train_indices[k], seeds[k], train)` would return, with model k's
weights, biases and optimizer state stored as slice k of tensors with a leading model axis:

    W_l: (K, out, in)    b_l: (K, out, 1)    h_l = relu(baddbmm(b_l, W_l, h_{l-1}))    h_l: (K, out, batch)

so that one baddbmm computes all K models' layer l: model k multiplies its own (out, in) weights
(nn.Linear's layout) by its own (in, batch) inputs. Activations are kept feature-major, (K, features,
batch), because then softmax and cross-entropy reduce over a middle axis with the batch axis
contiguous, which PyTorch's CPU kernels vectorise (over a last axis of only 10 classes, cross-entropy
forward and backward took 5x longer). On a CPU this replaces K small matrix multiplies and K sets of
optimizer, autograd and Python overheads per step with one of each; benchmarks/ensemble.py measures
the speed-up.

What is the same as `train_run` with seed k (not only in distribution: the same numbers):
- initialisation: model k's weights come from a generator seeded with seeds[k], drawn in nn.Linear's
  order with its default (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
  weights and biases), so they equal what `torch.manual_seed(seed); make_mlp(...)` builds;
- shuffling: torch.Generator seeded with seeds[k] + 1, one randperm of the subset per epoch, the same
  batches of batch_size (the last one smaller);
- the loss: mean cross-entropy over the batch, with the same label smoothing;
- the optimizer: SGD (momentum, Nesterov, coupled L2 weight decay) or AdamW (decoupled weight decay,
  betas 0.9/0.999, eps 1e-8), written out below with torch.optim's update rules, and
- the learning-rate schedule, evaluated on model k's own step count and total step count.
Without dropout, model k therefore follows train_run's trajectory up to floating-point rounding
(batched and unbatched matrix multiplies sum in different orders); tests/test_ensemble.py checks it.
With dropout the masks come from one generator shared by the K models (seeded from all seeds), drawn
independently per model, example and unit: the same distribution as train_run, other numbers, and
model k's numbers then depend on which runs share its call.

Uneven subsets ("pad and mask"). Subsets differ in size (bernoulli designs), so model k takes
S_k = ceil(m_k / batch_size) steps per epoch. The K models walk through their epochs in lock step:
each shared epoch has max_k S_k steps, and in its last max_k S_k - S_k of them model k is *inactive*:
its batch is empty, and the optimizer leaves its weights, momentum/Adam moments and step count
untouched (slice k is copied before the update and put back), so the lock step changes nothing for
it. Its share of compute is wasted on those steps (70% bernoulli subsets of digits take 8 or 9 steps
per epoch: at most 1 in 9; with the 'fixed' design all subsets have one size and nothing is wasted).
Batches are padded the same way: a short last batch is filled with example 0 at weight 0, and each
model's loss is divided by its own count of real examples.

Independent of pack-mates: model k's numbers are bit for bit the same whichever runs share its call
(without dropout, on a given machine and thread count), so a run regrouped after a crash or a retry
gives the shard it would have given undisturbed. What could couple the models is the shape of the
shared operations: every batch is therefore batch_size wide, padded even when no model needs all its
columns (a last batch of width max_k count_k made a matrix product's blocking, and so its summation
order, depend on the widest pack-mate: margins moved by ~1e-6). Padding columns carry weight 0 and
their gradients are exact zeros; the number of models K only changes the batch axis of bmm, over
which nothing is summed. tests/test_designs.py checks packs of 1, 4 and 16.

One optimizer for all: the K per-model mean losses are summed before backward. Model k's loss
depends on its own slice only, so d(sum)/d(W[k]) = d(loss_k)/d(W[k]): the gradients stay per
model. torch.optim cannot give every slice of one tensor its own learning rate (schedules run on each
model's own step count) or skip the inactive slices, so the update is written out below for the
stacked tensors, with per-model learning rates and Adam bias corrections of shape (K, 1, 1).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from workers.models import MLPOptions
from workers.results import RunFailed, RunOutput
from workers.training import DeviceData

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults, as train_run uses them


class EnsembleRunFailed(RunFailed):
    """Some of the K runs failed. `failed` maps a run's position in the call to its message (which names
    its seed); `outputs` holds the RunOutput of every run that succeeded and None for the failed ones."""

    def __init__(self, message: str, failed: dict[int, str], outputs: list):
        super().__init__(message)
        self.failed, self.outputs = failed, outputs


def _init(hidden: list[int], d_in: int, num_classes: int, seeds: list[int], device) -> list[torch.Tensor]:
    """[W_1, b_1, ..., W_L, b_L] stacked over models: W (K, out, in), b (K, out, 1), as nn.Linear draws them."""
    widths = [d_in, *hidden, num_classes]
    per_model = []
    for seed in seeds:
        g = torch.Generator(device="cpu").manual_seed(seed)  # what torch.manual_seed(seed) seeds in train_run
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            w = torch.empty(fan_out, fan_in)  # nn.Linear's layout and its reset_parameters, draw for draw
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
            bound = 1 / math.sqrt(fan_in)
            b = torch.empty(fan_out).uniform_(-bound, bound, generator=g)
            layers += [w, b[:, None]]
        per_model.append(layers)
    return [torch.stack(ts).to(device).contiguous().requires_grad_() for ts in zip(*per_model)]


def _forward(params, x: torch.Tensor, dropout: float, gen) -> torch.Tensor:
    """Logits (K, C, B) of inputs x (K, B, d), or x (B, d) shared by all models; gen=None: eval mode."""
    h = x.transpose(-1, -2)  # (K, d, B) or (d, B): a strided view, which the BLAS reads transposed
    if h.dim() == 2:
        h = h.expand(params[0].shape[0], *h.shape)
    for i in range(0, len(params), 2):
        h = torch.baddbmm(params[i + 1], params[i], h)  # W_k @ h_k + b_k for every model k at once
        if i + 2 < len(params):
            h = h.relu_()  # in place: baddbmm does not need its output for backward
            if dropout and gen is not None:  # inverted dropout, an independent mask per model, example, unit
                h = h * (torch.empty_like(h).bernoulli_(1 - dropout, generator=gen) / (1 - dropout))
    return h


class _StackedOptimizer:
    """torch.optim.SGD / AdamW's update rules for stacked parameters, with per-model learning rates and an
    optional list of inactive models, which keep their weights and state."""

    def __init__(self, params, train: dict):
        self.params, self.adam, self.wd = params, train["optimizer"] == "adam", train["weight_decay"]
        self.mu, self.nesterov = train["momentum"], train["nesterov"] and train["momentum"] > 0
        n_state = 2 if self.adam else (1 if self.mu > 0 else 0)
        self.state = [[torch.zeros_like(p) for _ in range(n_state)] for p in params]

    @torch.no_grad()
    def step(self, grads, lr: torch.Tensor, bc1: torch.Tensor, bc2_sqrt: torch.Tensor, inactive: torch.Tensor | None):
        """lr: (K, 1, 1) learning rate of each model; bc1, bc2_sqrt: Adam's bias corrections 1 - b1^t and
        sqrt(1 - b2^t) at each model's own 1-based step count t; inactive: indices of the models to leave
        as they are (or None)."""
        for p, g, state in zip(self.params, grads, self.state):
            old = None if inactive is None else [t[inactive] for t in (p, *state)]  # copies of their slices
            if self.adam:
                m, v = state
                p.mul_(1 - lr * self.wd)  # AdamW: decoupled decay, p <- p (1 - lr wd)
                m.lerp_(g, 1 - BETA1)  # m <- b1 m + (1 - b1) g
                v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)  # v <- b2 v + (1 - b2) g^2
                # p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
                denom = (v.sqrt() / bc2_sqrt).add_(EPS)
                p.addcdiv_(m * (lr / bc1), denom, value=-1)
            else:
                d = g.add(p, alpha=self.wd) if self.wd else g  # SGD: coupled L2, d = g + wd p
                if self.mu > 0:
                    buf = state[0]  # buf <- mu buf + d (zero at the start: the same as torch's buf = d)
                    buf.mul_(self.mu).add_(d)
                    d = d.add(buf, alpha=self.mu) if self.nesterov else buf  # Nesterov: d + mu buf
                p.sub_(d * lr)  # p <- p - lr d
            if old is not None:  # inactive models: put their slices back, exactly
                for t, before in zip((p, *state), old):
                    t[inactive] = before


def _lr_factors(schedule: str, step: np.ndarray, total: np.ndarray) -> np.ndarray:
    """training._lr_factor, for arrays of per-model step counts."""
    if schedule == "cosine":
        return 0.5 * (1 + np.cos(np.pi * step / total))
    if schedule == "linear":
        return 1 - step / total
    return np.ones_like(step, dtype=np.float64)


def train_runs(options: dict, data: DeviceData, train_indices: list[np.ndarray], seeds: list[int],
               train: dict) -> list[RunOutput]:
    """Train K = len(seeds) MLPs ([model] section `options`: hidden, dropout) at once, model k on examples
    train_indices[k] with seed seeds[k], and evaluate every train and test example with each.

    Returns K RunOutputs as train_run's; train_seconds is the wall time of the shared loop divided by K.
    When model k's loss stops being finite (checked, as train_run does, on its last batch of each
    epoch), model k is frozen and the others train on to the end; then EnsembleRunFailed (a RunFailed)
    is raised, naming the failed seeds, with the others' RunOutputs in its `outputs`.
    """
    if len(seeds) != len(train_indices) or not seeds:
        raise ValueError(f"need one subset per seed and at least one of each; found {len(train_indices)} "
                         f"subsets, {len(seeds)} seeds")
    o = MLPOptions(**{k: v for k, v in options.items() if k != "name"})
    device, K, bs, epochs = data.x_train.device, len(seeds), train["batch_size"], train["epochs"]
    x_all = data.x_train.reshape(len(data.x_train), -1)  # nn.Flatten
    params = _init(list(o.hidden), x_all.shape[1], data.num_classes, seeds, device)
    opt = _StackedOptimizer(params, train)

    # The step plan, known in advance: model k takes S_k steps per epoch, of counts[b, k] real examples.
    sizes = np.array([len(i) for i in train_indices])
    steps = np.maximum(1, -(-sizes // bs))  # S_k = ceil(m_k / bs), at least 1 as in train_run
    S = int(steps.max())
    b_of = np.arange(S)[:, None]
    active = b_of < steps  # (S, K)
    counts = np.clip(sizes - b_of * bs, 0, bs)  # (S, K)
    denom = torch.as_tensor(np.where(active, counts, 1), dtype=torch.float32, device=device)  # 0 -> NaN, as train_run
    alive = np.ones(K, dtype=bool)  # models whose loss is still finite
    t = np.arange(epochs)[:, None, None] * steps + b_of  # (E, S, K) 0-based step of model k at (epoch, b)
    lr_all = torch.as_tensor(train["lr"] * _lr_factors(train["schedule"], t, epochs * steps),
                             dtype=torch.float32, device=device).view(epochs, S, K, 1, 1)
    bc1_all, bc2_all = (torch.as_tensor(a, dtype=torch.float32, device=device).view(epochs, S, K, 1, 1)
                        for a in (1 - BETA1 ** (t + 1.0), np.sqrt(1 - BETA2 ** (t + 1.0))))  # in float64 first

    subsets = [torch.as_tensor(i, dtype=torch.long, device=device) for i in train_indices]
    shuffles = [torch.Generator(device="cpu").manual_seed(s + 1) for s in seeds]
    gen = None
    if o.dropout:
        gen = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1)[0]))
    epoch_losses = torch.zeros(S, K, device=device)
    last_step = (torch.as_tensor(steps - 1, device=device), torch.arange(K, device=device))
    failed: dict[int, str] = {}
    rec = None
    if "dynamics" in train.get("store", ()):  # training dynamics of each model (workers/dynamics.py)
        from workers.dynamics import Recorder

        rec = Recorder(K, data.y_train, train["label_smoothing"])
    start = time.perf_counter()
    for epoch in range(epochs):
        # This epoch's batches: order[k, b, j] = the j-th example of model k's b-th batch, -1 = padding.
        order = torch.full((K, S * bs), -1, dtype=torch.long, device=device)
        for k in range(K):
            order[k, :sizes[k]] = subsets[k][torch.randperm(int(sizes[k]), generator=shuffles[k]).to(device)]
        order = order.view(K, S, bs)
        for b in range(S):
            idx = order[:, b]  # (K, batch_size): always the full width, see "independent of pack-mates"
            weight = (idx >= 0).float()
            padded = idx  # -1 = padding, as the recorder takes it
            idx = idx.clamp(min=0)
            logits = _forward(params, x_all[idx], o.dropout, gen)  # (K, C, B)
            yb = data.y_train[idx]
            ce = F.cross_entropy(logits, yb, reduction="none",  # (K, B): per example
                                 label_smoothing=train["label_smoothing"])
            if rec is not None:
                rec.batch(logits, padded, ce, yb)
            loss = (ce * weight).sum(1) / denom[b]  # (K,) each model's mean loss over its real examples
            grads = torch.autograd.grad(loss.sum(), params)  # the sum keeps the gradients per model
            frozen = np.flatnonzero(~(active[b] & alive))
            opt.step(grads, lr_all[epoch, b], bc1_all[epoch, b], bc2_all[epoch, b],
                     torch.as_tensor(frozen, device=device) if len(frozen) else None)
            epoch_losses[b] = loss.detach()
        if rec is not None:
            rec.end_epoch()
        last = epoch_losses[last_step].cpu().numpy()  # each model's last batch, as train_run checks
        for k in np.flatnonzero(alive & ~np.isfinite(last)):
            alive[k] = False
            failed[k] = (f"run with seed {seeds[k]}: training loss became {last[k]} in epoch {epoch + 1}/{epochs}; "
                         f"lower [train] lr (now {train['lr']}) or check the data")
            with torch.no_grad():  # freeze it at zero: finite numbers keep the shared kernels on their fast path
                for p, state in zip(params, opt.state):
                    for tensor in (p, *state):
                        tensor[k].zero_()
    train_seconds = (time.perf_counter() - start) / K
    final_loss = epoch_losses[last_step].cpu().numpy()

    train_out = _evaluate_all(params, x_all, data.y_train, train["eval_batch_size"])
    test_out = _evaluate_all(params, data.x_test.reshape(len(data.x_test), -1), data.y_test, train["eval_batch_size"])
    return pack_outputs(train_out, test_out, alive, failed, seeds, train_seconds, final_loss, rec, train_indices)


def pack_outputs(train_out, test_out, alive, failed: dict[int, str], seeds, train_seconds: float, losses, rec,
                 train_indices) -> list:
    """The RunOutputs of K runs trained together, from their evaluations (pred, margin, probability), each
    (K, n); a run with NaN or infinite logits joins `failed`, and any failure raises EnsembleRunFailed with
    the others' outputs. Shared by the packed MLPs here and the packed convnets (workers/packed.py)."""
    K = len(alive)
    outputs: list = [None] * K
    for k in np.flatnonzero(alive):
        (tr_pred, tr_margin, tr_prob), (te_pred, te_margin, te_prob) = (
            [a[k] for a in train_out], [a[k] for a in test_out])
        if not (np.isfinite(tr_margin).all() and np.isfinite(te_margin).all()):
            failed[k] = f"run with seed {seeds[k]}: evaluation produced NaN or infinite logits"
            continue
        outputs[k] = RunOutput(tr_pred, te_pred, {"margin": tr_margin, "probability": tr_prob},
                               {"margin": te_margin, "probability": te_prob}, train_seconds, float(losses[k]),
                               None if rec is None else rec.result(k, train_indices[k]))
    if failed:
        raise EnsembleRunFailed(f"{len(failed)} of {K} runs failed ({'; '.join(failed[k] for k in sorted(failed))}); "
                                f"the other runs finished and are in .outputs", failed, outputs)
    return outputs


@torch.no_grad()
def _evaluate_all(params, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[np.ndarray, ...]:
    """training.evaluate for all K models at once, in eval mode (no dropout): predictions (K, n) int64,
    margins (K, n) float32 (correct-class logit minus the best other) and correct-class probabilities."""
    preds, margins, probs = [], [], []
    for s in range(0, len(y), batch_size):
        logits = _forward(params, x[s:s + batch_size], 0.0, None).float()  # (K, C, B)
        yb = y[s:s + batch_size][None, None, :].expand(logits.shape[0], 1, -1)  # (K, 1, B)
        own = logits.gather(1, yb)[:, 0]
        others = logits.scatter(1, yb, float("-inf")).amax(dim=1)
        preds.append(logits.argmax(dim=1))
        margins.append(own - others)
        probs.append(torch.softmax(logits, dim=1).gather(1, yb)[:, 0])
    return (torch.cat(preds, 1).cpu().numpy(), torch.cat(margins, 1).cpu().numpy().astype(np.float32),
            torch.cat(probs, 1).cpu().numpy().astype(np.float32))
