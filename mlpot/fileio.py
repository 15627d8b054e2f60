"""Safe file output: atomic writes, stale temporary files, outputs that would replace inputs.

Atomic write: the content goes to a temporary file ``.<name>.<random>.tmp`` in the target's
folder (same file system, so the rename is atomic), is flushed and fsync'ed, gets the mode a
plain ``open(path, "w")`` would give (``0o666 & ~umask``; ``mkstemp`` alone gives 0600), and
is renamed over the target. On any failure the temporary file is removed and the target is
left as it was. A reader therefore sees either the old file or the complete new one.

Every file mlpot writes goes through :func:`atomic_path` (for writers that want a path:
``ase.io.write``, h5py, matplotlib) or :func:`atomic_open` (for a file handle).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlpot.errors import ConfigError

__all__ = ["atomic_path", "atomic_open", "atomic_write_text", "file_mode", "remove_stale_temps",
           "check_not_input"]


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed over
    ``path`` (mode from the umask), on failure removed. ``suffix`` is for writers that choose
    a format by the extension (matplotlib: ``suffix=".png"``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """``open``-like context manager (modes ``"w"``, ``"wb"``) that writes atomically."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes only ('w', 'wb'), got mode {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def remove_stale_temps(folder, name: str) -> list[Path]:
    """Delete temporary files ``.<name>.*.tmp`` left in ``folder`` by a killed writer."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f"{_tmp_prefix(Path(name))}*"):
        if p.is_file() and p.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def check_not_input(output, *inputs, what: str = "output") -> None:
    """Refuse an ``output`` path that is one of the ``inputs`` (same file, links included)."""
    out = Path(output)
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        same = out.resolve() == inp.resolve()
        if not same and out.exists() and inp.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, inp)
        if same:
            raise ConfigError(f"{what} {out} is the input file {inp}; refusing to overwrite an input")
