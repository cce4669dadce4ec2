"""User plug-ins named by import path, "package.module:function" (datasets, models, trainers)."""

from __future__ import annotations

import importlib

from workers.data import DatasetError


def resolve(path: str, what: str):
    """Import 'package.module:function' and return the function, or say exactly what failed."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DatasetError(f"{what} {path!r}: cannot import module {module_name!r} ({e}); "
                           f"is its package installed or on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DatasetError(f"{what} {path!r}: module {module_name!r} has no callable {attr!r}")
    return fn
