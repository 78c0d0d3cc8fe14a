"""An exclusive lock on an output: a lock file held with flock for as long as a run writes there.

Kept free of torch and numpy so that commands which only move bytes (import-gguf) start light.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import BusyError, OutputError

LOCK_FILE = ".streamrom.lock"


class OutputLock:
    """A non-blocking flock on `folder`/.streamrom.lock (or on `lock_path`), released by the OS even on
    SIGKILL. The lock file is removed when the holder leaves, so that no run, refused or finished,
    leaves it behind in a user's folder."""

    def __init__(self, folder: Path | str, lock_path: Path | str | None = None):
        self.path = Path(lock_path) if lock_path is not None else Path(folder) / LOCK_FILE
        self._handle = None

    def __enter__(self) -> "OutputLock":
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+")
            except OSError as exc:  # a read-only file system, no permission
                raise OutputError(f"cannot write in {self.path.parent}: {exc.strerror}") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise BusyError(f"another streamrom run is writing {self.path.parent} (lock {self.path})") from None
            # The previous holder removes the file as it leaves: if it did so after we opened it, we hold
            # a lock on a file nobody else will see. Lock the file that is there now instead.
            try:
                here, there = os.fstat(handle.fileno()), os.stat(self.path)
                if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                    self._handle = handle
                    return self
            except FileNotFoundError:
                pass
            handle.close()

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            try:
                self.path.unlink()  # still ours: removed while the lock is held
            except OSError:
                pass
            self._handle.close()
            self._handle = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_dead_holders(parent: Path, prefix: str) -> None:
    """Removes the folders `private_folder` made under `parent` whose process died without removing them
    (SIGKILL, the OOM killer): its name says this host and a pid that is gone, and its lock is free (a live
    holder in another pid namespace of this host still holds the lock)."""
    host = socket.gethostname()
    for folder in parent.glob(f"{prefix}*"):
        parts = folder.name[len(prefix):].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        try:
            with OutputLock(folder):
                shutil.rmtree(folder, ignore_errors=True)
        except (BusyError, OutputError):
            continue


@contextmanager
def private_folder(parent: Path | str | None, prefix: str) -> Iterator[Path]:
    """A new folder under `parent` (default: the system's temporary folder) for one process's scratch
    files, held by a lock while the process lives and removed when it leaves. Those a killed process of
    this host left behind are removed first, so that a crash leaves no lost files past the next run."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_holders(parent, prefix)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}.{os.getpid()}.", dir=parent))
    try:
        with OutputLock(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
