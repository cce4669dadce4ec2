"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Data goes to a temporary name beside the target (same directory, hence same filesystem), is flushed
and fsynced, then renamed over the target. A crash leaves at most a temporary file, which
`is_temporary` recognises so that the driver can sweep it on resume.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

TMP_MARKER = ".tmp-"


class StorageError(OSError):
    """A write that failed for a reason outside longtail (disk full, permissions); names the path."""


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARKER in name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem supports it, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
