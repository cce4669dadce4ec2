"""Declared options: a dataclass field with its default, documentation and valid range.

Spec sections (orchestrator.spec) and the options of built-in datasets and models are declared with
`option`, so that validation, the list of valid keys in errors, and docs/spec.md share one source.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable

from workers.errors import LongtailError


class SetupError(LongtailError, ValueError):
    """A campaign's inputs cannot be used (a plug-in that does not import, a model that does not fit the
    data, a dataset with wrong shapes); found before any compute, the message says where and why."""


def option(default, doc: str, check: Callable[[Any], bool] | None = None, expect: str = "",
           affects_results: bool = True, neutral_default: bool = False):
    """A field: `check(value)` must hold, `expect` says in words what it accepts; `affects_results`
    marks keys whose change would change what a run produces (a resume with another value is refused).
    `neutral_default` marks keys added after campaigns existed whose default is the old behaviour: at
    their default they are left out of the spec hash, so that those campaigns still resume."""
    meta = {"doc": doc, "check": check, "expect": expect, "affects_results": affects_results,
            "neutral_default": neutral_default}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
