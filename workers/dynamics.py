"""Training dynamics of a run, recorded on the batches it trains on (no extra forward passes).

Per example the run trains on: the cumulative training loss (its loss in its batch, summed over epochs),
the learning time (first epoch from which it is correct in its batch through the last epoch; `epochs`
if wrong in the last one) and the forgetting events (correct -> incorrect between consecutive epochs);
estimators/proxies.py defines them on a trajectory and turns them into proxies of memorization.

The recorder keeps K models' state on the device as (K, n_train + 1) tensors: column n_train is where
padding (ensemble.py's short batches) writes, so no step needs a boolean mask and a device sync. The
per-example loss is the caller's (ensemble.py has it) or computed from the step's detached logits with
the run's label smoothing (train_run): the optimisation itself is untouched, so a run computes exactly
what it did without the recorder.
Cost: the batches' logits are kept and processed together at each epoch's end (benchmarks/dynamics.py).
"""

from __future__ import annotations

import numpy as np
import torch


class Recorder:
    """Training dynamics of K models trained together (K = 1 for train_run).

    A step only keeps a reference to its detached logits, example indices (and losses, if the caller has
    them). Whole epochs are processed together, as few kernels over the concatenated batches of many
    epochs, once FLUSH_ELEMENTS logits are held or when the result is asked for: per step, or even per
    epoch, a dozen small kernels would cost a small model's run several percent of its time. An epoch
    whose logits alone pass FLUSH_ELEMENTS (large datasets) is processed in parts as it goes."""

    FLUSH_ELEMENTS = 1 << 18  # logits held before they are processed (1 MB in float32: stays in cache)

    def __init__(self, models: int, labels: torch.Tensor, label_smoothing: float):
        self.n, self.smoothing = len(labels), label_smoothing
        device = labels.device
        self.labels = torch.cat([labels, labels.new_zeros(1)])  # padding's spare column gets label 0
        shape = (models, self.n + 1)
        self.loss = torch.zeros(shape, dtype=torch.float32, device=device)
        self.before = torch.zeros(shape, dtype=torch.bool, device=device)  # correct in the last processed epoch
        self.forgets = torch.zeros(shape, dtype=torch.int32, device=device)
        self.learned = torch.zeros(shape, dtype=torch.int32, device=device)  # 1 + last epoch it was wrong
        self.rows = torch.arange(models, device=device)[:, None]
        self.epoch = 0  # epochs ended
        self.processed = 0  # epochs folded into before / forgets / learned
        self._held: list[tuple] = []  # batches of the current epoch
        self._epochs: list[list[tuple]] = []  # ended epochs not yet processed
        self._elements = 0
        self._partial = None  # (K, n + 1) correctness of the current epoch, when processed in parts

    def batch(self, logits: torch.Tensor, examples: torch.Tensor, loss: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> None:
        """logits (K, C, B) (or (B, C) for K = 1) of examples (K, B) / (B,): their indices into `labels`,
        -1 for padding. Packed callers give `loss` (K, B), each example's loss, and `labels` (K, B), the
        examples' labels, which they have already: then the correctness is computed here, on the step's
        small cache-hot logits (3 kernels), and only (K, B) tensors are kept; on the concatenated logits
        of many steps the same kernels cost 3x more of a packed MLP's run (measured)."""
        if labels is not None and logits.dim() == 3:
            lg = logits.detach()  # detached: no autograd bookkeeping, no no_grad context per step
            ok = lg.gather(1, labels.unsqueeze(1)).squeeze(1) >= lg.amax(1)
            self._held.append((ok, examples, loss.detach()))
            self._elements += ok.numel()
        else:
            self._held.append((logits.detach(), examples, None if loss is None else loss.detach()))
            self._elements += logits.numel()
        if self._elements >= self.FLUSH_ELEMENTS:
            self._process_epochs()
            if self._elements >= self.FLUSH_ELEMENTS:  # the current epoch alone is that large
                self._process_part()

    def end_epoch(self) -> None:
        if self._partial is not None:
            self._process_part()
            self._advance(self._partial[None])
            self._partial = None
        else:
            self._epochs.append(self._held)
        self._held = []
        self.epoch += 1

    def result(self, k: int, train_idx: np.ndarray) -> dict[str, np.ndarray]:
        """Model k's dynamics over its training examples `train_idx` (indices into `labels`), in that order."""
        self._process_epochs()
        idx = torch.as_tensor(np.asarray(train_idx), dtype=torch.long, device=self.loss.device)
        return {"loss_sum": self.loss[k, idx].cpu().numpy().astype(np.float32),
                "learn_epoch": self.learned[k, idx].cpu().numpy().astype(np.int32),
                "forgets": self.forgets[k, idx].cpu().numpy().astype(np.int32)}

    # --- processing -------------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, held: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(columns, losses, correct), each (K, N), of the concatenated batches `held`."""
        if held[0][0].dtype == torch.bool:  # correctness computed per step (packed callers)
            ok = torch.cat([h[0] for h in held], dim=1)
            col = torch.cat([h[1] for h in held], dim=1)
            return torch.where(col >= 0, col, self.n), torch.cat([h[2] for h in held], dim=1).float(), ok
        elif held[0][0].dim() == 2:  # train_run: (B, C) of one model, kept in that layout (classes contiguous)
            logits = torch.cat([h[0] for h in held]).float()
            col = torch.cat([h[1] for h in held])
            col = torch.where(col >= 0, col, self.n)
            y = self.labels[col]
            own, top = logits.gather(1, y[:, None])[:, 0], logits.amax(1)
            loss = torch.cat([h[2] for h in held]) if held[0][2] is not None else self._loss(logits, own, 1)
            col, own, top, loss = col[None], own[None], top[None], loss[None]
        else:  # (K, C, B) without labels
            logits = torch.cat([h[0] for h in held], dim=2).float()
            col = torch.cat([h[1] for h in held], dim=1)
            col = torch.where(col >= 0, col, self.n)
            y = self.labels[col]
            own, top = logits.gather(1, y[:, None, :])[:, 0], logits.amax(1)
            loss = torch.cat([h[2] for h in held], dim=1) if held[0][2] is not None else self._loss(logits, own, 1)
        # correct: the label's logit is the largest (an exact tie counts as correct; argmax would pick
        # the lower class). amax, not argmax: argmax over the class axis of (K, C, B) is 100x slower on a CPU
        return col, loss.float(), own >= top

    def _loss(self, logits: torch.Tensor, own: torch.Tensor, dim: int) -> torch.Tensor:
        """Cross-entropy with label smoothing e, as F.cross_entropy computes it per example:
        (1 - e) (lse - own) + e (lse - mean of the logits). Written out: F.cross_entropy(reduction="none")
        over (N, C) took 16 ms for 20,000 rows on a CPU, a logsumexp 0.3 ms."""
        lse = torch.logsumexp(logits, dim)
        if not self.smoothing:
            return lse - own
        return lse - (1 - self.smoothing) * own - self.smoothing * logits.mean(dim)

    @torch.no_grad()
    def _process_epochs(self) -> None:
        """Fold the ended epochs in `_epochs` into the state, all at once."""
        epochs, self._epochs = self._epochs, []
        self._elements = sum(h[0].numel() for h in self._held)
        epochs = [e for e in epochs if e] or []
        if not epochs:
            return
        col, loss, ok = self._score([h for e in epochs for h in e])
        width = torch.as_tensor([sum(h[1].shape[-1] for h in e) for e in epochs], device=col.device)
        which = torch.repeat_interleave(torch.arange(len(epochs), device=col.device), width)  # epoch of each column
        flat = self._flat(col)
        self.loss.view(-1).scatter_add_(0, flat, loss.reshape(-1))
        # flat scatters: 1-D scatter is several times faster on a CPU than index_put with 2-3 index tensors
        correct = torch.zeros((len(epochs), *self.loss.shape), dtype=torch.uint8, device=col.device)
        offset = (which * self.loss.numel()).repeat(col.shape[0])  # epoch e's block of the flattened tensor
        correct.view(-1).scatter_(0, flat + offset, ok.reshape(-1).to(torch.uint8))
        self._advance(correct.bool())

    def _advance(self, correct: torch.Tensor) -> None:
        """Fold the correctness (E, K, n + 1) of the next E epochs into forgetting events and learning time."""
        e = correct.shape[0]
        prev = torch.cat([self.before[None], correct[:-1]]) if self.processed else \
            torch.cat([correct[:1], correct[:-1]])  # no transition into the first epoch
        self.forgets += (prev & ~correct).sum(0, dtype=torch.int32)
        stamp = torch.arange(self.processed + 1, self.processed + e + 1, dtype=torch.int32,
                             device=correct.device)[:, None, None]
        self.learned = torch.maximum(self.learned, ((~correct) * stamp).amax(0))
        self.before = correct[-1]
        self.processed += e

    @torch.no_grad()
    def _process_part(self) -> None:
        """Fold the current epoch's batches held so far (a large epoch, in parts)."""
        if not self._held:
            return
        col, loss, ok = self._score(self._held)
        self._held, self._elements = [], 0
        flat = self._flat(col)
        self.loss.view(-1).scatter_add_(0, flat, loss.reshape(-1))
        if self._partial is None:
            self._partial = torch.zeros_like(self.before)
        self._partial.view(-1)[flat] = ok.reshape(-1)

    def _flat(self, col: torch.Tensor) -> torch.Tensor:
        """(K, N) columns as indices into the flattened (K, n + 1) state, model-major."""
        return (self.rows * (self.n + 1) + col).reshape(-1)
