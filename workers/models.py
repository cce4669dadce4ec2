"""Models: built-ins chosen by name, or a user's factory named by import path.

A factory is `fn(section: dict, num_classes: int, input_shape: tuple) -> torch.nn.Module`; the module
maps a batch of inputs (batch, *input_shape) to logits (batch, num_classes).

Built-ins: "mlp" and "cnn" (small, for quick campaigns), "mnist-mlp" (the Feldman & Zhang MNIST
demo's 784-512-256-10 MLP), "airbench" (an airbench94-style CIFAR net) and "resnet18" / "resnet50"
(torchvision's architectures, optionally with a CIFAR stem). torch and torchvision are imported
inside the factories only, so that this module (and spec validation) works without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.options import SetupError, defaults, option
from workers.plugins import resolve
from workers.train_options import TrainOptions


def _widths_ok(v) -> bool:
    return len(v) >= 1 and all(w > 0 for w in v)


@dataclass(frozen=True)
class MLPOptions:
    hidden: list[int] = option([128], "hidden layer widths, e.g. [512, 256]", _widths_ok,
                             "a non-empty list of positive integers")
    dropout: float = option(0.0, "dropout after each hidden layer", lambda v: 0 <= v < 1, "a number in [0, 1)")


@dataclass(frozen=True)
class CNNOptions:
    channels: list[int] = option([16, 32], "channels of each 3x3 conv block (conv, batch norm, ReLU, 2x2 max-pool "
                               "while the image is larger than 2x2)", _widths_ok,
                               "a non-empty list of positive integers")
    hidden: int = option(64, "width of the dense layer before the classifier", lambda v: v > 0, "an integer > 0")


@dataclass(frozen=True)
class MnistMLPOptions:
    dropout: float = option(0.0, "dropout after each hidden layer (the paper's demo has none)", lambda v: 0 <= v < 1,
                            "a number in [0, 1)")


MNIST_MLP_HIDDEN = [512, 256]  # google-research/heldout-influence-estimation mnist-example: 784-512-256-10


@dataclass(frozen=True)
class AirbenchOptions:
    widths: list[int] = option([64, 256, 256], "output channels of each conv group (two 3x3 convs with batch norm "
                               "and GELU, and a 2x2 max-pool after the first); airbench94 uses three groups of "
                               "64, 256, 256", _widths_ok, "a non-empty list of positive integers")
    stem_channels: int = option(24, "channels of the 2x2 stem convolution (airbench94 initialises it by whitening "
                                "the data's 2x2 patches; here it is learned, followed by batch norm)",
                                lambda v: v > 0, "an integer > 0")
    logit_scale: float = option(1 / 9, "factor on the logits (airbench94: 1/9); a fixed temperature that keeps the "
                                "early, large-learning-rate steps from saturating the softmax",
                                lambda v: v > 0, "a number > 0")


@dataclass(frozen=True)
class ResNetOptions:
    small_input: bool = option(False, "replace the 7x7 stride-2 stem and its max-pool with a 3x3 stride-1 stem, "
                               "for 32x32 (CIFAR) or 64x64 inputs, which the ImageNet stem would shrink to 8x8 or "
                               "16x16 before the first block")
    zero_init_residual: bool = option(False, "start each residual block's last batch-norm weight at 0, so that "
                                      "every block starts as the identity (torchvision's option)")


MODEL_OPTIONS = {"mlp": MLPOptions, "cnn": CNNOptions, "mnist-mlp": MnistMLPOptions, "airbench": AirbenchOptions,
                 "resnet18": ResNetOptions, "resnet50": ResNetOptions}


def make_mlp(options: dict, num_classes: int, input_shape: tuple):
    import torch.nn as nn

    o = MLPOptions(**options)
    layers: list = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in o.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if o.dropout:
            layers.append(nn.Dropout(o.dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def make_cnn(options: dict, num_classes: int, input_shape: tuple):
    import torch.nn as nn

    o = CNNOptions(**options)
    if len(input_shape) == 1:  # vectors are treated as one-channel 1 x d images
        input_shape = (1, 1, input_shape[0])
    elif len(input_shape) == 2:  # (H, W) images get a channel axis
        input_shape = (1, *input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn': expected inputs of shape (channels, height, width), found {input_shape}")
    c, h, w = input_shape
    layers: list = [nn.Unflatten(1, (c, h, w))]
    for ch in o.channels:
        layers += [nn.Conv2d(c, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU()]
        if h >= 4 and w >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = ch
    layers += [nn.Flatten(), nn.Linear(c * h * w, o.hidden), nn.ReLU(), nn.Linear(o.hidden, num_classes)]
    # Flatten first so that the network accepts (batch, *input_shape) whatever the rank of input_shape.
    return nn.Sequential(nn.Flatten(), *layers)


def make_mnist_mlp(options: dict, num_classes: int, input_shape: tuple):
    """The Feldman & Zhang MNIST demo's MLP: inputs flattened, 512 and 256 ReLU units, a linear head."""
    o = MnistMLPOptions(**options)
    return make_mlp({"hidden": list(MNIST_MLP_HIDDEN), "dropout": o.dropout}, num_classes, input_shape)


def _image_shape(name: str, input_shape: tuple, min_side: int = 1) -> tuple[int, int, int]:
    """(channels, height, width) of image inputs; (H, W) images get one channel."""
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise SetupError(f"model {name!r}: expected image inputs of shape (channels, height, width), found "
                         f"{tuple(input_shape)}; use model 'mlp' for vectors")
    if min(shape[1:]) < min_side:
        raise SetupError(f"model {name!r}: expected images of at least {min_side}x{min_side} pixels, found "
                         f"{shape[1]}x{shape[2]}; use fewer [model] widths or a larger image_size")
    return shape  # type: ignore[return-value]


def _add_channel_if_2d(input_shape: tuple) -> list:
    """A leading module that turns (batch, H, W) into (batch, 1, H, W) where the dataset's images have no
    channel axis; nothing otherwise."""
    import torch.nn as nn

    return [nn.Unflatten(1, (1, input_shape[0]))] if len(input_shape) == 2 else []


# =====================================================================================================
#  airbench: the CIFAR-10 speed-record network (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single
#  GPU", arXiv 2404.00498), written from its description:
#
#    stem     2x2 conv (no padding) -> batch norm -> GELU          32x32 -> 31x31
#    group k  3x3 conv -> 2x2 max-pool -> BN -> GELU -> 3x3 conv -> BN -> GELU    (three groups:
#             31 -> 15 -> 7 -> 3 pixels; 64, 256, 256 channels)
#    head     global max-pool -> linear (no bias) -> x logit_scale (1/9)
#
#  What differs from airbench94, and why: its stem is initialised by whitening the training images'
#  2x2 patches, which needs the data at build time (a factory sees only the shapes), so here the stem
#  is learned and followed by batch norm; airbench94 also trains with lookahead EMA, per-group
#  learning rates (BN biases x64) and flip/translate test-time augmentation, which train_run does not
#  do. As in airbench94, batch-norm weights are frozen at 1 (only biases learn) and every 3x3 conv
#  starts with identity (Dirac) filters in its first input-channel-many outputs, so the deep net
#  starts close to a shallow one.
# =====================================================================================================

def make_airbench(options: dict, num_classes: int, input_shape: tuple):
    import torch
    import torch.nn as nn

    o = AirbenchOptions(**options)
    # the 2x2 stem takes one pixel off, then each group halves the side: at least 1 pixel must remain
    c, h, w = _image_shape("airbench", input_shape, min_side=2 ** len(o.widths) + 1)

    def norm(ch: int) -> nn.BatchNorm2d:
        # momentum 0.4 (PyTorch's convention, 0.1 by default): runs last a few hundred steps, so the
        # running statistics used in evaluation must follow the moving weights closely
        bn = nn.BatchNorm2d(ch, momentum=0.4)
        bn.weight.requires_grad_(False)  # fixed at 1: BN's scale is redundant before a GELU + conv
        return bn

    def conv(c_in: int, c_out: int) -> nn.Conv2d:
        layer = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        with torch.no_grad():
            n = min(c_in, c_out)
            nn.init.dirac_(layer.weight[:n])  # output i starts as a copy of input i (for i < n)
        return layer

    layers: list = [*_add_channel_if_2d(tuple(input_shape)),
                    nn.Conv2d(c, o.stem_channels, 2, padding=0, bias=False), norm(o.stem_channels), nn.GELU()]
    width = o.stem_channels
    for out in o.widths:
        layers += [conv(width, out), nn.MaxPool2d(2), norm(out), nn.GELU(),
                   conv(out, out), norm(out), nn.GELU()]
        width = out
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width, num_classes, bias=False),
               _Scale(o.logit_scale)]
    return nn.Sequential(*layers)


def _Scale(factor: float):
    return _layer_classes()["Scale"](factor)


_LAYERS: dict = {}


def _layer_classes() -> dict:
    """Small nn.Module classes of the built-ins, defined on first use so that importing this module needs
    no torch; registered under this module's name so that pickle (torch.save, Ray) finds them."""
    if not _LAYERS:
        import torch.nn as nn

        class Scale(nn.Module):
            """Multiplies its input by a fixed factor (a constant, not a parameter)."""

            def __init__(self, factor: float):
                super().__init__()
                self.factor = factor

            def forward(self, x):
                return x * self.factor

            def extra_repr(self) -> str:
                return f"factor={self.factor:.6g}"

        for cls in (Scale,):
            cls.__module__, cls.__qualname__ = __name__, cls.__name__
            _LAYERS[cls.__name__] = cls
    return _LAYERS


def __getattr__(name: str):  # PEP 562: `workers.models.Scale` resolves (for unpickling) without torch at import
    if name == "Scale":
        return _layer_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# =====================================================================================================
#  ResNet-18 / ResNet-50: torchvision's architectures (He et al. 2016), randomly initialised.
#  small_input = true is the usual CIFAR adaptation (and FZ's `small_input` option in their ResNet):
#  a 3x3 stride-1 stem without max-pool, so 32x32 images reach the first block at 32x32, not 8x8.
#  Images with other than 3 channels get a stem of the right width.
# =====================================================================================================

def _make_resnet(arch: str, options: dict, num_classes: int, input_shape: tuple):
    import torch.nn as nn
    import torchvision.models as tvm

    o = ResNetOptions(**options)
    c, _, _ = _image_shape(arch, input_shape)
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes, zero_init_residual=o.zero_init_residual)
    if o.small_input or c != 3:
        model.conv1 = nn.Conv2d(c, 64, 3 if o.small_input else 7, stride=1 if o.small_input else 2,
                                padding=1 if o.small_input else 3, bias=False)
        # torchvision initialises its convs with He-normal (fan_out); the replaced stem as well
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if o.small_input:
        model.maxpool = nn.Identity()
    prefix = _add_channel_if_2d(tuple(input_shape))
    return nn.Sequential(*prefix, model) if prefix else model


def make_resnet18(options: dict, num_classes: int, input_shape: tuple):
    return _make_resnet("resnet18", options, num_classes, input_shape)


def make_resnet50(options: dict, num_classes: int, input_shape: tuple):
    return _make_resnet("resnet50", options, num_classes, input_shape)


_BUILTIN_FACTORIES = {"mlp": make_mlp, "cnn": make_cnn, "mnist-mlp": make_mnist_mlp, "airbench": make_airbench,
                      "resnet18": make_resnet18, "resnet50": make_resnet50}

# [train] keys that workers/ensemble.py does not implement, with the value at which they change nothing:
# their defaults, which are the behaviour from before the fast paths existed
_NOT_IN_ENSEMBLE = defaults(TrainOptions, ("augment", "precision", "compile", "warmup_epochs"))


def ensemble_options(model: dict, train: dict) -> dict | None:
    """The MLP options ({"hidden", "dropout"}) with which workers/ensemble.py's `train_runs` trains runs of
    this [model] and [train] exactly as `train_run` would, or None where it cannot: models other than
    "mlp" and "mnist-mlp" (its fixed 512-256 widths), and [train] features the ensemble lacks (augment,
    bf16, compile, warm-up) set away from their defaults. channels_last does nothing to an MLP."""
    if any(train.get(k, v) != v for k, v in _NOT_IN_ENSEMBLE.items()) or "logits" in train.get("store", ()):
        return None
    if model["name"] == "mlp":
        o = MLPOptions(**{k: v for k, v in model.items() if k != "name"})
        return {"hidden": list(o.hidden), "dropout": o.dropout}
    if model["name"] == "mnist-mlp":
        o2 = MnistMLPOptions(**{k: v for k, v in model.items() if k != "name"})
        return {"hidden": list(MNIST_MLP_HIDDEN), "dropout": o2.dropout}
    return None


# Built-in convnets that workers/packed.py trains K at a time (nn.Sequential of plain layers). The
# ResNets are not: torchvision's ResNet is not a Sequential, and its residual blocks would need their own
# fused form.
PACKED_CONVNETS = ("cnn", "airbench")
CONVNET_AUTO_PACK = 8  # runs per call on a GPU worker when [resources] pack = 0


def convnet_pack(model: dict, train: dict, resources: dict) -> int:
    """Runs per worker call for a built-in convnet that workers/packed.py can pack, else 0.

    [resources] pack where set; otherwise CONVNET_AUTO_PACK on GPU workers and 1 on CPU workers: on a
    CPU a pack is no faster than its runs one by one (their convolutions are already large enough to
    keep a core busy; docs/performance.md, benchmarks/packed_cnn.py), on a GPU the K small models
    fill the device that one of them leaves mostly idle. torch.compile is not packed (one graph per
    run), nor is a user's trainer."""
    if model["name"] not in PACKED_CONVNETS or train.get("compile", False) or train.get("trainer", ""):
        return 0
    if resources.get("devices_per_run", 1) > 1:
        return 0
    if resources.get("pack", 0):
        return int(resources["pack"])
    return CONVNET_AUTO_PACK if resources.get("gpus_per_worker", 0) > 0 else 1


def model_factory(section: dict):
    """A zero-knowledge builder: `build(num_classes, input_shape) -> nn.Module` for the [model] section."""
    name = section["name"]
    if ":" in name:
        fn = resolve(name, "model factory")
        return lambda num_classes, input_shape: fn(section, num_classes, input_shape)
    options = {k: v for k, v in section.items() if k != "name"}
    fn = _BUILTIN_FACTORIES[name]
    return lambda num_classes, input_shape: fn(options, num_classes, input_shape)
