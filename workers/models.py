"""Models: built-ins chosen by name, or a user's factory named by import path.

A factory is `fn(section: dict, num_classes: int, input_shape: tuple) -> torch.nn.Module`; the module
maps a batch of inputs (batch, *input_shape) to logits (batch, num_classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .options import option



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


MODEL_OPTIONS = {"mlp": MLPOptions, "cnn": CNNOptions}


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


_BUILTIN_FACTORIES = {"mlp": make_mlp, "cnn": make_cnn}


def model_factory(section: dict):
    """A zero-knowledge builder: `build(num_classes, input_shape) -> nn.Module` for the [model] section."""
    name = section["name"]
    if ":" in name:
        from .datasets import resolve

        fn = resolve(name, "model factory")
        return lambda num_classes, input_shape: fn(section, num_classes, input_shape)
    options = {k: v for k, v in section.items() if k != "name"}
    fn = _BUILTIN_FACTORIES[name]
    return lambda num_classes, input_shape: fn(options, num_classes, input_shape)
