"""Named training recipes: a [model] and a [train] section that reproduce a known setup.

One readable file per recipe (mnist_mlp.py, cifar_airbench.py, cifar100_resnet.py,
imagenet_resnet50.py). Each says at its top what accuracy to expect, where that figure comes
from and on what hardware it was measured (or that it was not), and exposes `SPEC`, a TOML
string with the [model] and [train] sections, and `spec()` returning it. A campaign uses a
recipe by pasting those two sections into its spec beside [campaign] and [dataset]; the files
under examples/ do exactly that. docs/recipes.md describes them.

Nothing here imports torch: recipes are data.
"""

from __future__ import annotations

import sys

from workers.recipes import cifar100_resnet, cifar_airbench, imagenet_resnet50, mnist_mlp

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_RECIPES = {module.NAME: module for module in (mnist_mlp, cifar_airbench, cifar100_resnet, imagenet_resnet50)}


def recipe_names() -> list[str]:
    """The recipes' names, in the order of docs/recipes.md (cheapest first)."""
    return list(_RECIPES)


def _module(name: str):
    if name not in _RECIPES:
        raise KeyError(f"unknown recipe {name!r}; expected one of: {', '.join(_RECIPES)}")
    return _RECIPES[name]


def recipe_spec(name: str) -> str:
    """Recipe `name`'s [model] and [train] sections as TOML, to be combined with [campaign] and [dataset]."""
    return _module(name).spec()


def recipe_sections(name: str) -> dict:
    """Recipe `name`'s sections parsed: {"model": {...}, "train": {...}}."""
    return tomllib.loads(recipe_spec(name))


def recipe_dataset(name: str) -> str:
    """The built-in dataset the recipe was written for (its example spec uses it)."""
    return _module(name).DATASET
