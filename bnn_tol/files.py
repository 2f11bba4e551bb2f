"""Safe file writes: the one home of "write to a temporary file or directory, then rename".

Every file the library writes whole (checkpoints, sweep sidecars, study tables, reports)
goes through :func:`atomic_write`, every directory written as a unit (export bundles) through
:func:`atomic_dir`, so an interrupted write leaves the previous file or directory or none,
never a torn one. Appending writers (sweep CSVs) lock and repair instead
(:mod:`bnn_tol.engines.sweep_file`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "write_text", "atomic_dir"]


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


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty directory beside ``path``; when the block succeeds it replaces
    ``path`` (the old directory, if any, is removed only after the new one is complete and
    renamed into place), when it raises it is removed and ``path`` is untouched.

    Deciding whether an existing ``path`` may be replaced (is it ours? was ``--overwrite``
    given?) is the caller's, before entering.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700 directories
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / "d")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "d", path)  # put the previous directory back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
