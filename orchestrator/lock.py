"""One driver per campaign: a lock file that names its holder and goes stale when the holder is gone.

The lock is created with O_EXCL. A lock whose holder is a dead process on this host, or whose
heartbeat (the file's mtime, touched at every checkpoint) is older than `stale_seconds`, is taken
over with a note; any other lock refuses the second driver with a message that names the first.
"""

from __future__ import annotations

import json
import os
import socket
import time

from workers.errors import LongtailError
from workers.storage import StorageError, atomic_write_text, is_local, makedirs


class LockedError(LongtailError, RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverLock:
    def __init__(self, path, stale_seconds: float = 600.0):
        self.path = path
        self.stale_seconds = stale_seconds
        self.held = False
        self.note = ""

    def holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None  # a lock file edited into anything else is unreadable

    def stale_reason(self, holder: dict | None) -> str:
        """Why the lock's holder no longer runs ("" while it may): what run, resume and status all decide by."""
        return self._is_stale(holder)

    def _is_stale(self, holder: dict | None) -> str:
        if holder is None:
            return "unreadable"
        try:
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            return "it names no process"
        if holder.get("host") == socket.gethostname() and not _alive(pid):
            return f"its driver (pid {holder.get('pid')}) is no longer running"
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "it vanished"
        if age > self.stale_seconds:
            return f"its heartbeat is {age:.0f} s old"
        return ""

    def acquire(self) -> None:
        makedirs(self.path.parent)
        if not is_local(self.path):
            return self._acquire_on_object_store()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            except OSError as e:
                raise StorageError(e.errno, f"cannot write {self.path}: {e.strerror}") from None
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                self.held = True
                return
            holder = self.holder()
            why = self._is_stale(holder)
            if not why:
                raise LockedError(
                    f"another driver is running this campaign: pid {holder.get('pid')} on host "
                    f"{holder.get('host')}, started {holder.get('started')} (lock {self.path}). Stop it first "
                    f"(longtail status shows its progress), or wait for it to finish.")
            self.note = f"took over the lock {self.path}: {why}"
            self.path.unlink(missing_ok=True)
        raise LockedError(f"could not take the lock {self.path}: another driver keeps taking it")

    def _acquire_on_object_store(self) -> None:
        """Object stores have no exclusive create: write the lock if it is absent or stale, then read it
        back after a moment and give way if another driver's write landed last. This narrows the race
        to two drivers starting within a second of each other; docs/cluster.md says so."""
        holder = self.holder()
        if holder is not None:
            why = self._is_stale(holder)
            if not why:
                raise LockedError(
                    f"another driver is running this campaign: pid {holder.get('pid')} on host {holder.get('host')}, "
                    f"started {holder.get('started')} (lock {self.path}). Stop it first, or wait for it to finish.")
            self.note = f"took over the lock {self.path}: {why}"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "token": os.urandom(8).hex()}
        atomic_write_text(self.path, json.dumps(me))
        time.sleep(1.0)
        if (self.holder() or {}).get("token") != me["token"]:
            raise LockedError(f"another driver took the lock {self.path} at the same moment; try again")
        self.held = True

    def heartbeat(self) -> None:
        if not self.held:
            return
        if is_local(self.path):
            os.utime(self.path)
        else:  # rewriting the object refreshes its modification time
            atomic_write_text(self.path, self.path.read_text())

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "DriverLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
