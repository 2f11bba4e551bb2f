"""The library's user-facing error types.

Every error that a user's input can cause (a bad argument, a missing or corrupt file, a
checkpoint that does not match its config, a results file made with other settings) is a
:class:`BnnTolError`. The ``bnn-tol`` command prints such errors as one line and exits
non-zero; anything else is a bug and keeps its traceback.

The concrete types also derive from the built-in type a caller would expect
(``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import numbers

__all__ = ["BnnTolError", "InvalidArgument", "ResultsMismatch", "FileInUse", "OutputError",
           "require_int"]


class BnnTolError(Exception):
    """Base class of every error caused by the user's input (not by a bug)."""


class InvalidArgument(BnnTolError, ValueError):
    """An argument or configuration value is out of range, of the wrong type or unknown."""


class ResultsMismatch(BnnTolError, ValueError):
    """An existing results file was made with other settings, or is not ours to modify."""


class FileInUse(BnnTolError, RuntimeError):
    """Another process holds the lock of an output file."""


class OutputError(BnnTolError, OSError):
    """An output could not be written: a read-only file system, a full disk, a file size
    limit, no permission (:mod:`bnn_tol.files` raises it naming the path; what was there
    before is left as it was)."""


def require_int(value: object, name: str, *, minimum: int | None = None,
                strict: bool = False) -> int:
    """``value`` as an ``int``, refusing bools, non-integral numbers and values below ``minimum``.

    ``numpy`` integers and (unless ``strict``) integral floats such as ``2.0`` are accepted;
    ``1.5``, ``True``, ``"3"`` and ``None`` raise :class:`InvalidArgument` naming ``name``.
    """
    ok = isinstance(value, numbers.Integral) or (
        not strict and isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok:
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    out = int(value)  # type: ignore[arg-type]
    if minimum is not None and out < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {out}")
    return out
