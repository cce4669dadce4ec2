"""Where a campaign lives, and atomic writes there: a reader sees the old file or the whole new one.

A campaign directory is a local path (a local disk or a shared filesystem) or a URI that pyarrow.fs
understands (s3://bucket/prefix, gs://bucket/prefix, hdfs://...). `location` turns either into an
object with the small part of pathlib's API that longtail uses, so that the rest of the code is the
same for both.

Local files are written to a temporary name beside the target (same directory, hence same
filesystem), fsynced, then renamed over it: a crash leaves at most a temporary file, which
`is_temporary` recognises so that the driver can sweep it on resume. Object stores have no rename,
but an object appears whole or not at all when its upload completes, so a write there uploads a
finished local temporary file to the final key.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from workers.errors import LongtailError

TMP_MARKER = ".tmp-"


class StorageError(LongtailError, OSError):
    """A write that failed for a reason outside longtail (disk full, permissions); names the path."""


@dataclass(frozen=True)
class _Stat:
    st_mtime: float
    st_size: int


class FsPath:
    """A path on a pyarrow.fs filesystem, with the pathlib methods longtail needs."""

    def __init__(self, fs, path: str, scheme: str):
        self.fs = fs
        self.path = path.rstrip("/") or "/"
        self.scheme = scheme

    def __truediv__(self, name: str) -> "FsPath":
        return FsPath(self.fs, posixpath.join(self.path, str(name)), self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"FsPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FsPath) and (self.path, self.scheme) == (other.path, other.scheme)

    def __hash__(self) -> int:
        return hash((self.path, self.scheme))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "FsPath":
        return FsPath(self.fs, posixpath.dirname(self.path), self.scheme)

    def with_name(self, name: str) -> "FsPath":
        return self.parent / name

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type != FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return _Stat(st_mtime=mtime, st_size=info.size or 0)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except (FileNotFoundError, OSError):
            if not missing_ok or self.exists():
                raise

    def iterdir(self):
        from pyarrow.fs import FileSelector

        for info in self.fs.get_file_info(FileSelector(self.path, allow_not_found=True)):
            yield FsPath(self.fs, info.path, self.scheme)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=parents)


CampaignLocation = Path | FsPath


def location(root) -> CampaignLocation:
    """A local path, or a pyarrow.fs URI (s3://, gs://, hdfs://, ...); file:// URIs are local paths."""
    if isinstance(root, (Path, FsPath)):
        return root
    root = str(root)
    if root.startswith("file://"):
        return Path(root[len("file://"):])
    if "://" not in root:
        return Path(os.path.expanduser(root))
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(root)
    except Exception as e:
        raise StorageError(None, f"cannot open the campaign location {root}: {e}") from None
    return FsPath(filesystem, path, root.split("://", 1)[0])


def is_local(path) -> bool:
    return not isinstance(path, FsPath)


def open_input(path):
    """A seekable binary file for reading (np.load of an .npz needs seeking)."""
    path = location(path)
    return open(path, "rb") if is_local(path) else path.fs.open_input_file(path.path)


def arrow_source(path) -> tuple[str, object]:
    """(path, filesystem) arguments for pyarrow readers."""
    path = location(path)
    return (str(path), None) if is_local(path) else (path.path, path.fs)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARKER in name


@contextlib.contextmanager
def atomic_path(path: CampaignLocation):
    """Yield a local temporary path to write; on success it becomes `path` whole (rename or upload)."""
    path = location(path)
    if not is_local(path):
        yield from _upload_when_done(path)
        return
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


def _upload_when_done(path: FsPath):
    fd, name = tempfile.mkstemp(prefix="longtail-upload-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as src, path.fs.open_output_stream(path.path) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except OSError as e:
        raise StorageError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: CampaignLocation, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: CampaignLocation, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def move(src: CampaignLocation, dst: CampaignLocation) -> None:
    """Move a file within one campaign location (object stores copy, then delete)."""
    try:
        if is_local(src):
            shutil.move(str(src), str(dst))
        else:
            src.fs.move(src.path, dst.path)
    except OSError as e:
        raise StorageError(e.errno, f"cannot move {src} to {dst}: {e.strerror or e}") from e


def makedirs(path: CampaignLocation) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(e.errno, f"cannot create {path}: {e.strerror or e}") from None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem supports it, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
