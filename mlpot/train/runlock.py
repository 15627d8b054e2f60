"""One training run per output folder: an exclusive ``fcntl`` lock on ``<output>/.lock``.

The lock is taken before the run writes anything into the folder and held until it ends;
the kernel drops it when the process dies (``kill -9`` included), so a stale lock file never
blocks a later run. A second run into a locked folder fails at once with
:class:`~mlpot.errors.ConfigError` naming the folder and the holder's process id.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from mlpot.errors import ConfigError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLock:
    """Context manager: ``with RunLock(folder): ...`` holds the folder's lock."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ConfigError(f"cannot use output folder {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            raise ConfigError(
                f"output folder {self.folder} is in use by another run"
                + (f" (process {holder})" if holder else "")
                + "; wait for it or choose another `output`"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
