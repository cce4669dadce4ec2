"""K convnet runs trained together in one step: one fused model per worker call.

The MLP runs are packed by workers/ensemble.py (stacked weight matrices, written-out updates). The
built-in convnets ("cnn", "airbench": nn.Sequential of plain layers) are packed here by the HFTA
construction: the K freshly initialised models become one module whose convolutions run over K x C
channels in K groups, whose batch norm keeps each model's statistics over its own batch, and whose
linear layers are one batched matrix multiply (`_Fused`). torchvision's ResNets are not packed.

Model k computes what `training.train_run` computes for its seed, operation for operation:
- initialisation: torch.manual_seed(seed_k), then the factory (the module is built K times and its
  tensors concatenated), so the weights are train_run's bit for bit;
- batches: a CPU generator seeded seed_k + 1, one randperm of the subset per epoch, batches of
  batch_size in that order (the last one smaller);
- augmentation: training.augment_batch with training's per-run generator, on model k's batch alone;
- the loss: mean cross-entropy (with label smoothing) over model k's batch; the K losses are summed
  before backward, which leaves each model's gradient its own (d sum / d W_k = d loss_k / d W_k);
- the optimizer: torch.optim's SGD / AdamW on the fused tensors. Their updates are elementwise, and
  all K models share one learning-rate schedule (see below), so the update of slice k is train_run's.

Why packs need subsets of one size: batch norm normalises over the batch, so a short batch cannot be
padded to its pack-mates' width (the padding would enter the statistics), and a model with fewer
steps per epoch would need its own schedule. `train_packed` therefore takes K subsets of one size
(the "fixed" design, the paper's, gives every run the same size); `pack_groups` splits a worker
call into such groups.

Independence from pack-mates. On a CUDA device the fused model uses cuDNN's grouped convolutions
(fast); a run's numbers then depend on its pack only through float rounding. On a CPU it uses
kernels that compute slice k the same way whatever K is, so that a run's numbers are bit-identical
in any pack (and a resumed campaign rewrites identical shards): convolution as im2col + one batched
GEMM (`_ExactConv`), batch norm one model at a time, GELU padded out of SIMD remainder loops, a pack
of one trained as two (measured, PyTorch's grouped convolution and K x C-channel batch norm differ in
the last bits between packs of 2 and 3). tests/test_packed_cnn.py checks both properties, with one
torch thread per worker (the default: more threads split kernels at K-dependent boundaries).

Not packed: torch.compile (a compiled campaign trains one run per call). channels_last applies to
the fused image layout; bf16 autocast as in train_run.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from workers.ensemble import EnsembleRunFailed, pack_outputs
from workers.results import RunFailed, RunOutput
from workers.training import (DeviceData, _augment_generator, _autocast, _lr_factor, augment_batch, batch_scores,
                       fast_options)

def pack_groups(sizes: list[int]) -> list[list[int]]:
    """Positions of a call's runs grouped by subset size (in first-seen order): each group can be packed."""
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(sizes):
        groups.setdefault(int(m), []).append(i)
    return list(groups.values())


class _Fused(torch.nn.Module):
    """K identically built nn.Sequential models as one module (the HFTA construction). Its input is
    the K models' batches, `(K, B, *input_shape)`, or one batch `(B, *input_shape)` shared by all; its
    output the K models' logits `(K, B, classes)`. Between layers the activations of all K models are
    held in one of two layouts:
      image   (B, K*C, H, W): model k's channels are block k, so a convolution with groups = K (times
              its own groups) is the K convolutions, batch norm over K*C channels is K batch norms with
              each model's statistics over its own batch, pooling and activations act per channel;
      vector  (K, B, F): linear layers are one batched matrix multiply, W_k x_k + b_k for every k.
    Parameters are the K models' tensors concatenated (convolution, batch norm: along the channel
    axis) or stacked (linear: (K, out, in)), so model k's slice starts as model k's initialisation."""

    ELEMENTWISE = ("ReLU", "GELU", "Identity", "Scale", "SiLU", "Tanh")
    APPROXIMATE = ("GELU", "SiLU", "Tanh")  # vectorized and scalar code paths round differently
    POOLS = ("MaxPool2d", "AvgPool2d", "AdaptiveMaxPool2d", "AdaptiveAvgPool2d")

    def __init__(self, models: list, channels_last: bool = False, exact: bool = True):
        super().__init__()
        self.K = len(models)
        self.exact = exact
        # NHWC for the image layout where asked ([train] channels_last): on a CPU it is also the faster
        # layout for pooling and the grouped convolutions of a pack (benchmarks/packed_cnn.py)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.steps = torch.nn.ModuleList()
        self.kinds: list[str] = []
        for layers in zip(*[list(m.children()) for m in models]):
            kind, layer = self._fuse(list(layers))
            self.kinds.append(kind)
            self.steps.append(layer)

    @staticmethod
    def supports(model, input_shape: tuple) -> str:
        """'' when `model` can be fused, else why not."""
        if type(model) is not torch.nn.Sequential:
            return f"a {type(model).__name__}, not an nn.Sequential of plain layers"
        children = list(model.children())
        if not children or (type(children[0]).__name__ != "Flatten" and len(input_shape) != 3):
            return f"inputs of shape {tuple(input_shape)} (needs (channels, height, width) or a leading Flatten)"
        known = (*_Fused.ELEMENTWISE, *_Fused.POOLS, "Conv2d", "BatchNorm2d", "Linear", "Flatten", "Unflatten")
        for c in children:
            name = type(c).__name__
            if name not in known:
                return f"layer {name} (packs only {', '.join(known)})"
            if name == "Conv2d" and (c.groups != 1 or c.padding_mode != "zeros" or isinstance(c.padding, str)):
                return "a convolution with groups, non-zero or named padding"
            if name == "BatchNorm2d" and not c.track_running_stats:
                return "batch norm without running statistics"
            if name == "Flatten" and (c.start_dim, c.end_dim) != (1, -1):
                return "a Flatten other than Flatten(1, -1)"
            if name == "Unflatten" and c.dim != 1:
                return "an Unflatten other than of dimension 1"
        return ""

    def _fuse(self, layers: list) -> tuple:
        nn, first, K = torch.nn, layers[0], self.K
        name = type(first).__name__
        with torch.no_grad():
            if name == "Conv2d" and self.exact:
                return "image", _ExactConv(layers)
            if name == "Conv2d":
                c = first
                fused = nn.Conv2d(c.in_channels * K, c.out_channels * K, c.kernel_size, c.stride, c.padding,
                                  c.dilation, c.groups * K, c.bias is not None, c.padding_mode,
                                  device=c.weight.device, dtype=c.weight.dtype)
                fused.weight.copy_(torch.cat([m.weight for m in layers]))
                fused.weight.requires_grad_(c.weight.requires_grad)
                if c.bias is not None:
                    fused.bias.copy_(torch.cat([m.bias for m in layers]))
                    fused.bias.requires_grad_(c.bias.requires_grad)
                return "image", fused
            if name == "BatchNorm2d":
                b = first
                fused = nn.BatchNorm2d(b.num_features * K, b.eps, b.momentum, b.affine, True,
                                       device=b.running_mean.device)
                for attr in ("running_mean", "running_var", *(("weight", "bias") if b.affine else ())):
                    getattr(fused, attr).copy_(torch.cat([getattr(m, attr) for m in layers]))
                    if attr in ("weight", "bias"):
                        getattr(fused, attr).requires_grad_(getattr(b, attr).requires_grad)
                fused.num_batches_tracked.copy_(b.num_batches_tracked)
                return "image", fused
            if name == "Linear":
                mod = nn.Module()
                mod.weight = nn.Parameter(torch.stack([m.weight for m in layers]),  # (K, out, in)
                                          first.weight.requires_grad)
                mod.bias = (nn.Parameter(torch.stack([m.bias for m in layers])[:, None, :],  # (K, 1, out)
                                         first.bias.requires_grad) if first.bias is not None else None)
                return "linear", mod
        if name in self.POOLS:
            return "image", first
        if name in self.ELEMENTWISE:
            return "any", first
        return name.lower(), first  # flatten, unflatten: layout changes, no parameters

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        K = self.K
        if shared:  # one batch (B, *shape) for all K models
            x = x[None].expand(K, *x.shape)
        B = x.shape[1]
        h, layout = x, "stacked"  # (K, B, *input_shape) until a layer needs another layout
        for kind, layer in zip(self.kinds, self.steps):
            if kind == "flatten":
                h, layout = self._vector(h, layout, B), "vector"
            elif kind == "unflatten":
                size = tuple(layer.unflattened_size)
                h = self._vector(h, layout, B).transpose(0, 1).reshape(B, K * size[0], *size[1:])
                h = h.contiguous(memory_format=self.fmt)
                layout = "image"
            elif kind == "linear":
                h, layout = self._vector(h, layout, B), "vector"
                h = torch.bmm(h, layer.weight.transpose(1, 2))
                if layer.bias is not None:
                    h = h + layer.bias
            elif kind == "image":
                if layout != "image":
                    h, layout = self._image(h, layout, B), "image"
                h = _batch_norm(layer, h, K) if self.exact and isinstance(layer, torch.nn.BatchNorm2d) else layer(h)
            elif self.exact and type(layer).__name__ in self.APPROXIMATE:
                h = _padded(layer, h)
            else:
                h = layer(h)
        return self._vector(h, layout, B)

    def _vector(self, h: torch.Tensor, layout: str, B: int) -> torch.Tensor:
        if layout == "image":  # (B, K*C, H, W) -> (K, B, C*H*W): model k's features in its own (c, h, w) order
            return h.reshape(B, self.K, -1).transpose(0, 1)
        return h.reshape(self.K, B, -1)

    def _image(self, h: torch.Tensor, layout: str, B: int) -> torch.Tensor:
        if layout == "stacked":  # (K, B, C, H, W) -> (B, K*C, H, W)
            return h.transpose(0, 1).reshape(B, -1, *h.shape[3:]).contiguous(memory_format=self.fmt)
        raise ValueError("a convolution after a linear layer needs an Unflatten in between")


def _batch_norm(bn, h: torch.Tensor, K: int) -> torch.Tensor:
    """bn(h) for h (B, K*C, H, W), one call per model: PyTorch's CPU batch norm vectorizes across channels
    where h is (or, at H = W = 1, looks) channels-last, and the remainder of that loop then falls on the
    last model's channels at a position that depends on K (measured: last-bit differences between packs
    of 2 and 3). K calls on model k's channels alone compute the same whatever K is; the running
    statistics are updated in place through views of the fused buffers."""
    factor = 0.0
    if bn.training:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    C = h.shape[1] // K
    fmt = torch.channels_last if (h.dim() == 4 and not h.is_contiguous()) else torch.contiguous_format
    outs = []
    for k in range(K):
        s = slice(k * C, (k + 1) * C)
        out = F.batch_norm(h[:, s].contiguous(memory_format=fmt), bn.running_mean[s], bn.running_var[s],
                           None if bn.weight is None else bn.weight[s], None if bn.bias is None else bn.bias[s],
                           bn.training, factor, bn.eps)
        outs.append(_DenseGrad.apply(out, fmt) if out.requires_grad else out)
    return torch.cat(outs, 1)


class _DenseGrad(torch.autograd.Function):
    """The identity, whose backward hands on a dense gradient: torch.cat's backward gives model k a
    strided slice of the pack's gradient (a dense one when K = 1), and batch norm's backward rounds
    differently on strided gradients."""

    @staticmethod
    def forward(ctx, x, fmt):
        ctx.fmt = fmt
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.fmt), None


def _padded(layer, h: torch.Tensor) -> torch.Tensor:
    """layer(h) for an elementwise layer whose SIMD loop and scalar remainder loop differ in the last bit
    (GELU's vectorized erf is an approximation): the remainder would fall on the last model's last
    elements, at a position that depends on K. Applied to h with 64 elements appended, every real
    element is computed by the SIMD loop, whatever K is (one thread: no chunk boundaries)."""
    nhwc = h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
    dense = h.permute(0, 2, 3, 1) if nhwc else h.contiguous()  # memory order, so that reshape is a view
    flat = F.pad(dense.reshape(-1), (0, 64))
    out = layer(flat)[:dense.numel()].view(dense.shape)
    return out.permute(0, 3, 1, 2) if nhwc else out


class _ExactConv(torch.nn.Module):
    """K convolutions as unfold (im2col: a gather, exact) and one batched matrix multiply whose every
    slice has model k's shapes alone: slice k is computed by the same GEMM whatever K is, so its numbers
    do not depend on the pack (a grouped convolution's kernel choice depends on the total channel
    count: measured, outputs and gradients then differ in the last bits between packs of 2 and 3).
    The weight is held as a grouped convolution's, (K * out, in, kh, kw)."""

    def __init__(self, layers: list):
        super().__init__()
        c, K = layers[0], len(layers)
        self.K, self.out, self.kernel = K, c.out_channels, c.kernel_size
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        with torch.no_grad():
            self.weight = torch.nn.Parameter(torch.cat([m.weight for m in layers]), c.weight.requires_grad)
            self.bias = (torch.nn.Parameter(torch.cat([m.bias for m in layers]), c.bias.requires_grad)
                         if c.bias is not None else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, _, H, W = h.shape
        K, O = self.K, self.out
        kh, kw = self.kernel
        ho = (H + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (W + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(h, self.kernel, self.dilation, self.padding, self.stride)  # (B, K*C*kh*kw, L)
        L = cols.shape[-1]
        cols = cols.view(B, K, -1, L).permute(1, 2, 0, 3).reshape(K, -1, B * L)  # (K, C*kh*kw, B*L)
        out = torch.bmm(self.weight.view(K, O, -1), cols)  # (K, O, B*L)
        out = out.view(K, O, B, ho, wo).permute(2, 0, 1, 3, 4).reshape(B, K * O, ho, wo)
        return out if self.bias is None else out + self.bias.view(1, K * O, 1, 1)


def fusable(build, num_classes: int, input_shape: tuple) -> str:
    """'' when runs of models from `build` can be packed, else why not (in words)."""
    with torch.random.fork_rng():  # building a probe model must not move the global generator
        return _Fused.supports(build(num_classes, tuple(input_shape)), tuple(input_shape))


def train_packed(build, data: DeviceData, train_indices: list[np.ndarray], seeds: list[int],
                 train: dict, exact: bool | None = None) -> list[RunOutput]:
    """Train K = len(seeds) models from `build(num_classes, input_shape)` at once, model k on examples
    train_indices[k] (all of one size) with seed seeds[k], and evaluate every train and test example
    with each. Returns K RunOutputs as train_run's (train_seconds: the shared loop's time / K).

    A model whose loss stops being finite (checked on its last batch of each epoch, as train_run does)
    is zeroed and its pack-mates train on; then EnsembleRunFailed names its seed, with the others'
    outputs in `.outputs`. `exact`: the pack-independent kernels (default on a CPU) or PyTorch's grouped
    convolutions (default on a GPU)."""
    K = len(seeds)
    if K != len(train_indices) or not seeds:
        raise ValueError(f"need one subset per seed and at least one of each; found {len(train_indices)} "
                         f"subsets, {K} seeds")
    sizes = {len(i) for i in train_indices}
    if len(sizes) != 1:
        raise ValueError(f"packed runs need subsets of one size (batch norm cannot be padded); found sizes "
                         f"{sorted(sizes)}; group them with pack_groups")
    fast = fast_options(train)
    device = data.x_train.device
    if fast["augment"] != "none" and data.x_train.dim() != 4:
        raise RunFailed(f"[train] augment = {fast['augment']!r} needs image inputs (channels, height, width); "
                        f"the dataset's inputs have shape {tuple(data.input_shape)}; set augment = 'none'")
    exact = device.type == "cpu" if exact is None else exact
    if K == 1 and exact:
        # A pack of one is trained as a pack of two (itself twice, the copy dropped): with K = 1 some
        # strided operands of the fused layers are dense, and PyTorch takes other kernels for them
        # (measured: last-bit differences from packs of 2 or more, which all agree with each other)
        try:
            return train_packed(build, data, train_indices * 2, seeds * 2, train, exact)[:1]
        except EnsembleRunFailed as e:
            raise EnsembleRunFailed(str(e).replace("2 of 2 runs", "1 of 1 runs"), {0: e.failed[0]},
                                    e.outputs[:1]) from None
    models = []
    for seed in seeds:
        torch.manual_seed(seed)  # as train_run: the factory draws the initial weights from the global generator
        models.append(build(data.num_classes, data.input_shape).to(device))
    # exact kernels on the CPU (a run's numbers independent of its pack, bit for bit); on a GPU the
    # grouped convolution of cuDNN (fast; independent of the pack up to float rounding)
    fused = _Fused(models, fast["channels_last"], exact=exact)
    del models
    trainable = [p for p in fused.parameters() if p.requires_grad]
    if train["optimizer"] == "adam":
        opt = torch.optim.AdamW(trainable, lr=train["lr"], weight_decay=train["weight_decay"])
    else:
        opt = torch.optim.SGD(trainable, lr=train["lr"], momentum=train["momentum"],
                              nesterov=train["nesterov"] and train["momentum"] > 0, weight_decay=train["weight_decay"])

    m, bs, epochs = sizes.pop(), train["batch_size"], train["epochs"]
    steps = max(1, -(-m // bs))
    total = epochs * steps
    warmup = round(fast["warmup_epochs"] * steps)
    subsets = [torch.as_tensor(i, dtype=torch.long, device=device) for i in train_indices]
    shuffles = [torch.Generator(device="cpu").manual_seed(s + 1) for s in seeds]
    augs = [_augment_generator(s, device) for s in seeds] if fast["augment"] != "none" else None
    alive = np.ones(K, dtype=bool)
    failed: dict[int, str] = {}
    losses = torch.zeros(K)
    step = 0
    rec = None
    if "dynamics" in train.get("store", ()):  # training dynamics of each model (workers/dynamics.py)
        from workers.dynamics import Recorder

        rec = Recorder(K, data.y_train, train["label_smoothing"])
    start = time.perf_counter()
    fused.train()
    for epoch in range(epochs):
        orders = [sub[torch.randperm(m, generator=g).to(device)] for sub, g in zip(subsets, shuffles)]
        for b in range(steps):
            batches = [o[b * bs:(b + 1) * bs] for o in orders]
            xs = [data.x_train[i] for i in batches]
            if augs is not None:
                xs = [augment_batch(x, fast["augment"], fast["crop_padding"], g) for x, g in zip(xs, augs)]
            for group in opt.param_groups:
                group["lr"] = train["lr"] * _lr_factor(train["schedule"], step, total, warmup)
            yb = torch.stack([data.y_train[i] for i in batches])  # (K, B)
            with _autocast(device, fast["precision"]):
                logits = fused(torch.stack(xs))  # (K, B, C)
                ce = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none",
                                     label_smoothing=train["label_smoothing"])
                loss = ce.view(K, -1).mean(1)  # (K,): each model's mean loss over its own batch
            if rec is not None:  # (K, C, B) views: no copy per step
                rec.batch(logits.transpose(1, 2), torch.stack(batches), ce.view(K, -1), yb)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            step += 1
        if rec is not None:
            rec.end_epoch()
        losses = loss.detach().cpu()
        for k in np.flatnonzero(alive & ~np.isfinite(losses.numpy())):
            alive[k] = False
            failed[k] = (f"run with seed {seeds[k]}: training loss became {losses[k].item()} in epoch "
                         f"{epoch + 1}/{epochs}; lower [train] lr (now {train['lr']}) or check the data")
            with torch.no_grad():  # zero it: NaNs would slow the shared kernels down, and nothing reads it
                for t in (*fused.parameters(), *fused.buffers()):
                    if t.is_floating_point():
                        _slice(t, k, K).zero_()
                for state in opt.state.values():
                    for v in state.values():
                        if torch.is_tensor(v) and v.dim() > 0:
                            _slice(v, k, K).zero_()
    train_seconds = (time.perf_counter() - start) / K

    fused.eval()
    scores = [_evaluate_packed(fused, x, y, train["eval_batch_size"], fast["precision"])
              for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test))]
    return pack_outputs(*scores, alive, failed, seeds, train_seconds, losses, rec, train_indices)


def _slice(t: torch.Tensor, k: int, K: int) -> torch.Tensor:
    """Model k's part of a fused tensor: rows k of a stacked (K, ...) tensor, else block k of dimension 0."""
    n = t.shape[0] // K
    return t[k * n:(k + 1) * n]


@torch.no_grad()
def _evaluate_packed(fused, x, y, batch_size: int, precision: str) -> tuple[np.ndarray, ...]:
    """training.evaluate for K stacked models: predictions (K, n), margins and probabilities (K, n)."""
    preds, margins, probs = [], [], []
    for s in range(0, len(y), batch_size):
        with _autocast(x.device, precision):
            logits = fused(x[s:s + batch_size], shared=True).float()  # (K, B, C)
        p, mg, pr = batch_scores(logits, y[s:s + batch_size])
        preds.append(p)
        margins.append(mg)
        probs.append(pr)
    return (torch.cat(preds, 1).cpu().numpy(), torch.cat(margins, 1).cpu().numpy().astype(np.float32),
            torch.cat(probs, 1).cpu().numpy().astype(np.float32))
