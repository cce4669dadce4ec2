"""Training dynamics of a run, recorded on the batches it trains on (no extra forward passes).

Per example the run trains on: the cumulative training loss (its loss in its batch, summed over epochs),
the learning time (first epoch from which it is correct in its batch through the last epoch; `epochs`
if wrong in the last one) and the forgetting events (correct -> incorrect between consecutive epochs);
estimators/proxies.py defines them on a trajectory and turns them into proxies of memorization.

The recorder keeps K models' state on the device as (K, n_train + 1) tensors: column n_train is where
padding (ensemble.py's short batches) writes, so no step needs a boolean mask and a device sync. The
per-example loss is the caller's (ensemble.py and packed.py have it) or computed from the step's
detached logits with the run's label smoothing (train_run): the optimisation itself is untouched, so a
run computes exactly what it did without the recorder.
Cost: a step runs no kernel; the held batches are scored together, a few times per run (benchmarks/
dynamics.py, docs/proxies-and-triage.md "Cost of recording the dynamics").
"""

from __future__ import annotations

import numpy as np
import torch


class Recorder:
    """Training dynamics of K models trained together (K = 1 for train_run).

    A step only keeps references to its detached logits, example indices (and losses and labels, if the
    caller has them): no kernel per step. Once `flush_elements` logits are held (or when the result is
    asked for) they are scored together, a dozen kernels over the concatenated batches: each example's
    loss is added to the state, its correctness written into its epoch's slot of `correct`. When every
    slot holds an ended epoch (or at the result), those epochs are folded into forgetting events and
    learning time at once. Per step, the three kernels of the correctness alone cost a packed MLP's run
    2-3% (small kernels between the forward and the backward run cold); scored per few steps, a tenth.
    Packed, fewer logits are held: what is held takes cache from the K models' weights and optimizer
    state, and a packed step then slows by more than the scoring costs (demo recipe, K = 16: +8% with
    2**18 logits held, +4-5% with 2**16; benchmarks/dynamics.py).

    Memory: FLUSH_ELEMENTS logits (1 MB in float32; a quarter packed) plus `slots` bools of
    K x (n_train + 1), the slots bounded by SLOT_BYTES (a large dataset folds every epoch)."""

    FLUSH_ELEMENTS = 1 << 18  # logits of one model held before they are scored (1 MB in float32)
    FLUSH_ELEMENTS_PACKED = 1 << 16  # the same for K > 1 models (256 kB: see the class)
    SLOT_BYTES = 1 << 22  # at most this many bytes of per-epoch correctness held before it is folded

    def __init__(self, models: int, labels: torch.Tensor, label_smoothing: float):
        self.n, self.smoothing = len(labels), label_smoothing
        self.flush_elements = self.FLUSH_ELEMENTS if models == 1 else self.FLUSH_ELEMENTS_PACKED
        device = labels.device
        self.labels = torch.cat([labels, labels.new_zeros(1)])  # padding's spare column gets label 0
        shape = (models, self.n + 1)
        self.loss = torch.zeros(shape, dtype=torch.float32, device=device)
        self.before = torch.zeros(shape, dtype=torch.bool, device=device)  # correct in the last folded epoch
        self.forgets = torch.zeros(shape, dtype=torch.int32, device=device)
        self.learned = torch.zeros(shape, dtype=torch.int32, device=device)  # 1 + last epoch it was wrong
        slots = min(max(1, self.SLOT_BYTES // (models * (self.n + 1))), 32)
        self.correct = torch.zeros((slots, *shape), dtype=torch.bool, device=device)  # epoch processed + s
        self.epoch = 0  # epochs ended
        self.processed = 0  # epochs folded into before / forgets / learned
        self._held: list[tuple] = []  # batches not yet scored
        self._ends: list[int] = []  # where in _held each epoch ended since the first held batch's
        self._elements = 0  # logits held
        self._result = None  # the state as numpy arrays, once asked for

    def batch(self, logits: torch.Tensor, examples: torch.Tensor, loss: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> None:
        """logits (K, C, B) (or (B, C) for K = 1) of examples (K, B) / (B,): their indices into `labels`,
        -1 for padding. Packed callers give `loss` (K, B), each example's loss, and `labels` (K, B), the
        examples' labels, which they have already. Nothing is computed here (see the class)."""
        self._held.append((logits.detach(), examples, loss if loss is None else loss.detach(), labels))
        self._elements += logits.numel()
        if self._elements >= self.flush_elements:
            self._score()

    def end_epoch(self) -> None:
        self._ends.append(len(self._held))
        self.epoch += 1
        if self.epoch - self.processed >= len(self.correct):  # every slot holds an ended epoch
            self._score()
            self._fold()

    def result(self, k: int, train_idx: np.ndarray) -> dict[str, np.ndarray]:
        """Model k's dynamics over its training examples `train_idx` (indices into `labels`), in that order.
        Asked for after the last end_epoch; the state is copied to the host once, for all K models."""
        if self._result is None:
            self._score()
            self._fold()
            self._result = (self.loss.cpu().numpy(), self.learned.cpu().numpy(), self.forgets.cpu().numpy())
        loss, learned, forgets = self._result
        idx = np.asarray(train_idx)
        return {"loss_sum": loss[k, idx].astype(np.float32, copy=False),
                "learn_epoch": learned[k, idx].astype(np.int32, copy=False),
                "forgets": forgets[k, idx].astype(np.int32, copy=False)}

    # --- processing -------------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self) -> None:
        """Add the held batches' losses to the state and write their correctness into their epochs' slots."""
        held, ends = self._held, self._ends
        self._held, self._ends, self._elements = [], [], 0
        if not held:
            return
        self._result = None
        if held[0][0].dim() == 2:  # train_run: (B, C) of one model, scored as (1, C, N): classes outermost,
            logits = torch.cat([h[0].T for h in held], 1)[None]  # so every reduction below runs along N
            col = torch.cat([h[1] for h in held])[None]
        else:  # (K, C, B)
            logits = torch.cat([h[0] for h in held], 2)
            col = torch.cat([h[1] for h in held], 1)
        logits = logits.float()  # a no-op for float32 logits
        col = torch.where(col >= 0, col, self.n)
        y = self.labels[col] if held[0][3] is None else torch.cat([h[3] for h in held], -1).view(col.shape)
        own = logits.gather(1, y[:, None])  # (K, 1, N)
        top = logits.amax(1, keepdim=True)
        # correct: the label's logit is the largest (an exact tie counts as correct; argmax would pick
        # the lower class). amax, not argmax: argmax over the class axis of (K, C, B) is 100x slower on a CPU
        ok = (own >= top)[:, 0]
        if held[0][2] is not None:
            loss = torch.cat([h[2] for h in held], -1).view(col.shape).float()
        else:
            loss = self._loss(logits, own, top)[:, 0]
        self.loss.scatter_add_(1, col, loss)
        # one scatter per epoch the held batches span (one or two, or all of a small run's)
        slot, first, start = self.epoch - len(ends) - self.processed, 0, 0  # the first held batch's epoch
        for last in [*ends, len(held)]:
            width = sum(h[1].shape[-1] for h in held[first:last])
            if width:
                self.correct[slot].scatter_(1, col[:, start:start + width], ok[:, start:start + width])
            slot, first, start = slot + 1, last, start + width

    def _loss(self, logits: torch.Tensor, own: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing e of logits (K, C, N), as F.cross_entropy computes it per
        example: (1 - e) (lse - own) + e (lse - mean of the logits), (K, 1, N). Written out: F.cross_entropy(
        reduction="none") over (N, C) took 16 ms for 20,000 rows on a CPU; these five kernels along N, 0.3 ms."""
        lse = (logits - top).exp_().sum(1, keepdim=True).log_().add_(top)
        if not self.smoothing:
            return lse - own
        return lse - (1 - self.smoothing) * own - self.smoothing * logits.mean(1, keepdim=True)

    @torch.no_grad()
    def _fold(self) -> None:
        """Fold the ended epochs' correctness (in slots 0 .. e - 1) into forgetting events and learning time."""
        e = self.epoch - self.processed
        if e <= 0:
            return
        correct = self.correct[:e]
        wrong = ~correct
        prev = torch.cat([self.before[None], correct[:-1]]) if self.processed else \
            torch.cat([correct[:1], correct[:-1]])  # no transition into the first epoch
        self.forgets += (prev & wrong).sum(0, dtype=torch.int32)
        stamp = torch.arange(self.processed + 1, self.processed + e + 1, dtype=torch.int32,
                             device=correct.device)[:, None, None]
        self.learned = torch.maximum(self.learned, (wrong * stamp).amax(0))
        self.before = correct[-1].clone()
        correct.zero_()
        self.processed += e
        self._result = None
