"""Safe file writes: the one home of "check the destination, write a temporary file or
directory, then rename".

Every file the library writes goes through this module:

* :func:`check_output` decides whether a path may be written, and is called before any work
  (and again by the writers below): never one of the command's ``inputs`` (the same path, a
  symlink or hard link to it, or an existing file inside an input directory), never an
  existing directory or special file (``/dev/null``, a fifo), never below a path that is not a
  directory, and an existing file only where ``replace`` allows it: ``True`` (the caller owns
  it: a file inside a checkpoint or study directory it claimed, or ``--overwrite``), a
  *recognizer* (a predicate saying the file is one the library wrote, e.g. :func:`starts_with`
  a table's header, :func:`sniff` for a figure) or ``False`` (new files only).
* :func:`atomic_write` / :func:`write_text` write a whole file (temporary file beside it,
  then ``os.replace``), :func:`atomic_dir` a whole directory (export bundles): an interrupted
  write leaves the previous file or directory or none, never a torn one.
* :func:`claim_dir` makes a directory a command's own (a marker file in a new or empty
  directory; later runs accept only directories that carry it; the marker is created in
  place, never replaced, so it can serve as a lock file), :func:`locked` holds an
  exclusive ``flock`` so that a second writer is refused (:class:`FileInUse`). Appending
  writers (sweep CSVs) lock and repair instead (:mod:`bnn_tol.engines.sweep_file`) and wrap
  their writes in :func:`writing`.
* Any ``OSError`` while writing (a read-only file system, a full disk, a file size limit, no
  permission) becomes an :class:`~bnn_tol.exceptions.OutputError` that names the path and the
  reason, so the ``bnn-tol`` command ends in one line; the previous file is left as it was.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from bnn_tol.exceptions import BnnTolError, FileInUse, OutputError, ResultsMismatch

__all__ = ["Recognizer", "check_output", "input_of", "atomic_write", "write_text", "atomic_dir",
           "writing", "ensure_dir", "claim_dir", "check_claim", "locked", "sniff", "starts_with",
           "first_line"]

#: A predicate saying that an existing file was written by the library (may be replaced).
Recognizer = Callable[[Path], bool]
PathLike = str | os.PathLike
#: Entries of an input directory compared with an output (hard links); checkpoints hold two.
_MAX_SCAN = 10_000


def _real(p: PathLike) -> str:
    return os.path.realpath(os.fspath(p))


def input_of(path: PathLike, inputs: Iterable[PathLike]) -> str | None:
    """The input that writing ``path`` would destroy, or ``None``.

    ``path`` hits an input when both resolve to the same path (symlinks followed), when both
    exist and are the same file (a hard link), or when the input is a directory and ``path``
    is an existing entry inside it or a hard link of one of its files (the files of a
    checkpoint directory are its inputs).
    """
    out = _real(path)
    try:
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    for inp in inputs:
        if inp is None:
            continue
        rin = _real(inp)
        if out == rin:
            return os.fspath(inp)
        if ident is None:
            continue
        if os.path.isdir(rin):
            if out.startswith(rin.rstrip(os.sep) + os.sep):
                return os.fspath(inp)
            try:
                with os.scandir(rin) as entries:
                    for n, e in enumerate(entries):
                        if n >= _MAX_SCAN:
                            break
                        s = e.stat()
                        if (s.st_dev, s.st_ino) == ident:
                            return os.path.join(os.fspath(inp), e.name)
            except OSError:
                pass
        else:
            try:
                s = os.stat(rin)
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == ident:
                return os.fspath(inp)
    return None


def _recognized(replace: bool | Recognizer, path: Path) -> bool:
    if replace is True:
        return True
    if replace is False or replace is None:
        return False
    try:
        return bool(replace(path))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def check_output(path: PathLike, *, inputs: Iterable[PathLike] = (),
                 replace: bool | Recognizer = False, option: str = "--out") -> Path:
    """Refuse an output path that would lose data; writes nothing.

    Args:
        path: the file to write.
        inputs: the files and directories the command reads.
        replace: may an existing file be replaced? ``True``, ``False`` or a recognizer.
        option: how the user named the path (for the message).

    Raises:
        ResultsMismatch: ``path`` is an input (:func:`input_of`; even with ``--overwrite``),
            an existing directory or special file, lies below an existing path that is not a
            directory, or exists and ``replace`` does not allow replacing it.
    """
    p = Path(path)
    hit = input_of(p, inputs)
    if hit is not None:
        same = "" if _real(hit) == _real(p) else f", read from {hit}"
        raise ResultsMismatch(f"{p} is an input of this command{same}; refusing to write over "
                              f"it: choose another {option}")
    for parent in p.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ResultsMismatch(f"cannot write {p}: {parent} is not a directory; choose "
                                      f"another {option}")
            break
    if not os.path.lexists(p):
        return p
    try:
        mode = os.stat(p).st_mode
    except OSError:  # a dangling symlink
        mode = stat.S_IFREG
    if stat.S_ISDIR(mode):
        raise ResultsMismatch(f"{p} is a directory; {option} names a file: choose another "
                              f"{option}")
    if not stat.S_ISREG(mode):
        raise ResultsMismatch(f"{p} is not a regular file (a device, fifo or socket); refusing "
                              f"to replace it: choose another {option}")
    if not _recognized(replace, p):
        why = "was not written by bnn_tol" if callable(replace) else "exists"
        raise ResultsMismatch(f"{p} {why}; refusing to replace it: pass --overwrite "
                              f"(overwrite=True) to replace it, or choose another {option}")
    return p


@contextmanager
def writing(path: PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into :class:`OutputError` naming ``path``
    (library errors pass unchanged)."""
    try:
        yield
    except BnnTolError:
        raise
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise OutputError(f"cannot write {path}: {why}; it was left as it was (free space, "
                          "make it writable or choose another output)") from e


def ensure_dir(path: PathLike) -> Path:
    """``mkdir -p path`` (:class:`OutputError` if it cannot be created)."""
    p = Path(path)
    with writing(p):
        p.mkdir(parents=True, exist_ok=True)
    return p


def atomic_write(path: PathLike, write: Callable[[str], None], *,
                 inputs: Iterable[PathLike] = (), replace: bool | Recognizer = False) -> None:
    """Check ``path`` (:func:`check_output`), call ``write(tmp)`` on a temporary file beside
    it, then rename it over ``path``.

    The temporary file lives in the same directory (so the rename is atomic on POSIX), gets
    mode ``0644`` (``mkstemp`` creates ``0600``) and is removed if anything fails; ``path``
    is then unchanged. The parent directory is created if needed.

    Raises:
        ResultsMismatch: see :func:`check_output` (nothing is written).
        OutputError: the file system refused the write (read-only, full, too large).
    """
    path = check_output(path, inputs=inputs, replace=replace)
    tmp = None
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_text(path: PathLike, text: str, *, fsync: bool = False,
               inputs: Iterable[PathLike] = (), replace: bool | Recognizer = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`; ``fsync`` before the
    rename if asked."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())

    atomic_write(path, write, inputs=inputs, replace=replace)


@contextmanager
def atomic_dir(path: PathLike, *, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a new empty directory beside ``path``; when the block succeeds it replaces
    ``path`` (the old directory, if any, is removed only after the new one is complete and
    renamed into place), when it raises it is removed and ``path`` is untouched.

    Deciding whether an existing ``path`` may be replaced (is it ours? was ``--overwrite``
    given?) is the caller's, before entering; ``inputs`` are refused here too (a directory
    that is or holds an input). ``OSError`` becomes :class:`OutputError`.
    """
    path = Path(path)
    for inp in inputs:
        if inp is not None and (_real(inp) == _real(path)
                                or _real(inp).startswith(_real(path).rstrip(os.sep) + os.sep)):
            raise ResultsMismatch(f"{path} holds {inp}, an input of this command; refusing to "
                                  "replace it: choose another --out")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        with writing(path):
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


def claim_dir(path: PathLike, marker: str, *, note: str, what: str,
              recognize: Callable[[Path], bool] | None = None, option: str = "--out") -> Path:
    """Make ``path`` a directory of one command (``what``): accepted when it does not exist,
    is empty, holds ``marker`` or (``recognize``) is recognized as one the command wrote
    before markers existed; then created and marked (``marker`` holds ``note``).

    Raises:
        ResultsMismatch: ``path`` is a file, or a non-empty directory of something else
            (nothing is written into it).
        OutputError: the directory or its marker cannot be written.
    """
    p = Path(path)
    check_claim(p, marker, what=what, recognize=recognize, option=option)
    new = not os.path.lexists(p)
    had_marker = (p / marker).is_file()
    ensure_dir(p)
    try:
        with writing(p / marker), open(p / marker, "ab") as fh:  # never replaced: a lock file
            if fh.tell() == 0:
                fh.write(note.encode("utf-8"))
    except OutputError:  # a full disk: leave nothing behind that was not there
        if not had_marker:
            (p / marker).unlink(missing_ok=True)
        if new:
            shutil.rmtree(p, ignore_errors=True)
        raise
    return p


def check_claim(path: PathLike, marker: str, *, what: str,
                recognize: Callable[[Path], bool] | None = None, option: str = "--out") -> None:
    """The checks of :func:`claim_dir` alone (writes nothing)."""
    p = Path(path)
    check_output(p / marker, replace=True, option=option)  # an ancestor that is a file
    if not os.path.lexists(p):
        return
    if not p.is_dir():
        raise ResultsMismatch(f"{p} exists and is not a directory; choose another {option}")
    if (p / marker).is_file():
        return
    try:
        empty = not any(p.iterdir())
    except OSError as e:
        raise ResultsMismatch(f"cannot read {p} ({e.strerror}); choose another {option}") from None
    if empty or (recognize is not None and _recognized(recognize, p)):
        return
    raise ResultsMismatch(f"{p} is not empty and was not written by {what} (no {marker} "
                          f"marker); refusing to write into it: choose a new or empty {option}")


@contextmanager
def locked(path: PathLike, *, what: str) -> Iterator[IO[bytes]]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (created if missing) for the
    block; a second holder gets :class:`FileInUse` naming ``what``."""
    with writing(path):
        fh = open(path, "ab")  # noqa: SIM115 -- closed below
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FileInUse(f"{what} is in use by another bnn-tol process (it holds {path}'s "
                            "lock); wait for it to finish or use another --out") from None
        yield fh
    finally:
        fh.close()


def sniff(path: PathLike, *markers: bytes, head: int = 4096, tail: int = 4096) -> bool:
    """Whether any of ``markers`` occurs in the first ``head`` or last ``tail`` bytes of the
    file (``False`` if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            start = fh.read(head)
            size = os.fstat(fh.fileno()).st_size
            end = b""
            if tail and size > head:
                fh.seek(max(head, size - tail))
                end = fh.read(tail)
    except OSError:
        return False
    return any(m in start or m in end for m in markers)


def first_line(path: PathLike, limit: int = 65536) -> str | None:
    """The first line of a text file (without the newline), ``None`` if unreadable."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit)
        return raw.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def starts_with(*prefixes: str) -> Recognizer:
    """A recognizer: the file's first line starts with one of ``prefixes`` (e.g. the header
    of a table the library writes)."""

    def recognize(path: Path) -> bool:
        line = first_line(path)
        return line is not None and any(line.startswith(p) for p in prefixes)

    return recognize
