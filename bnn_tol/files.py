"""Safe file writes: the one home of "write to a temporary file, then rename".

Every file the library writes whole (checkpoints, sweep sidecars, study tables, reports)
goes through :func:`atomic_write`, so an interrupted write leaves the previous file or none,
never a torn one. Appending writers (sweep CSVs) lock and repair instead
(:mod:`bnn_tol.engines.sweep_file`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file lives in the same directory (so the rename is atomic on POSIX), gets
    mode ``0644`` (``mkstemp`` creates ``0600``) and is removed if ``write`` raises.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``fsync`` before the rename if asked."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())

    atomic_write(path, write)
