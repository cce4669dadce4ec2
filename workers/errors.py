"""The root of every error a user can cause: bad spec, bad campaign directory, refused action, missing
data, unreachable cluster. The CLI catches this one class and prints its message as one line (exit 2);
anything else that escapes is a bug in longtail and keeps its traceback.

A leaf module (imports nothing from the project) so that workers/, orchestrator/ and cluster/ can all
derive from it without import cycles."""

from __future__ import annotations

import traceback


class LongtailError(Exception):
    """A user-facing error: its message says what was expected, what was found, where, and what to run
    next."""

    exit_code = 2


class PluginError(LongtailError):
    """A user's plug-in (dataset loader, model factory, trainer) raised, or returned the wrong thing.

    The message names the plug-in and says what it did; `plugin_traceback` keeps the plug-in's own
    traceback for its author (the CLI prints it under a "plug-in traceback:" header)."""

    def __init__(self, message: str, plugin_traceback: str = ""):
        super().__init__(message)
        self.plugin_traceback = plugin_traceback


def call_plugin(what: str, path: str, fn, *args):
    """Call plug-in `fn` (named `path`, a `what` such as "dataset loader"); an exception it raises becomes
    a PluginError naming it, with its traceback kept. A LongtailError it raises passes unchanged."""
    try:
        return fn(*args)
    except LongtailError:
        raise
    except Exception as e:
        tb = traceback.format_exc()
        first = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise PluginError(f"{what} {path!r} raised {first}; the fault is in the plug-in (its traceback follows)",
                          tb) from None
