"""Bit errors of a profiled chip, per supply voltage, and the energy they buy (Stutz et al.).

**Profile file** (``.npz``: a zip of ``<field>.npy`` members, as ``numpy.savez`` writes)::

    format     ()        str      "bnn_tol.profile"
    version    ()        int      1 (optional: 1 if absent) or 2
    voltages   (V,)      float64  supply voltages > 0, strictly decreasing (any unit; the
                                  synthetic profiles use V / V_min, V_min = 1)
    rows, cols ()        int      geometry of one SRAM array (e.g. 512 x 64 cells)
    n_arrays   ()        int      number of arrays; n_cells = n_arrays * rows * cols
    v_fail     (n_cells,) float32 the cell fails at every voltage V < v_fail
                                  (-inf: never fails)
    flip_to    (n_cells,) uint8   version 1: the value a failed cell reads: 0 corrupts a
                                  stored 1 (a 1 -> 0 flip, p10), 1 corrupts a stored 0 (p01)
    energy     (V,)      float64  optional: energy per access at each voltage
                                  (default E ~ V^2, see :func:`energy`)

Version 2 describes a failed cell by its flip probabilities per direction instead of
``flip_to`` (a stuck cell is ``p01, p10 = 1, 0`` or ``0, 1``; a cell that flips both ways has
both > 0), and may declare the voltage unit::

    p01        (n_cells,) float32 probability in [0, 1] that a failed cell flips a stored 0
    p10        (n_cells,) float32 the same for a stored 1
    v_min      ()        float64  optional: V_min, the lowest error-free voltage in the unit
                                  of ``voltages`` (1.0 for V / V_min); energy is (V / v_min)^2

A version 1 file has ``flip_to`` and none of these; a version 2 file ``p01`` and ``p10`` and
no ``flip_to``. :func:`save_profile` writes version 1 for a profile version 1 can hold
(stuck cells, no ``v_min``: byte for byte the members it always wrote), else version 2.

At most :data:`MAX_CELLS` cells and :data:`MAX_VOLTAGES` voltages (the :class:`Profile`
constructor, :func:`synthetic_profile` and :func:`load_profile` all refuse more).

**Reading a file** (:func:`load_profile`) trusts nothing in it and never runs code: members are
parsed here, not by ``numpy.load``; object arrays are refused, nothing is unpickled. Before any
member's data is decompressed it checks, from the zip's records and each member's ``.npy``
header: a regular file; a zip whose central directory has at most :data:`MAX_MEMBERS` entries
in at most :data:`MAX_DIRECTORY_BYTES`; the members named above, each once, nothing else;
stored or deflated (``savez`` / ``savez_compressed``), not encrypted; a header of at most
:data:`MAX_HEADER_BYTES`; a dtype of the field's kind (integer or float numbers, booleans too
for ``flip_to``, ``p01``, ``p10``, a string for ``format``; never complex, object, structured
or wider than 8 bytes); the field's number of dimensions; at most :data:`MAX_VOLTAGES` voltages
and :data:`MAX_CELLS` cells; and that the zip's declared size of the member is exactly its
header plus its data, and that the directory holds as many entries as the end record declares
(a damaged record can hide a member). The scalars are read next, and the version's members are
checked (those of the other version refused), and ``n_arrays * rows * cols`` is compared with
the declared lengths of ``v_fail`` and ``flip_to`` (``p01``, ``p10``) before those are read.
Every member's CRC is verified. Values are checked before they are cast to the field's dtype,
and a cast must change no value: an integer field holds an integer (``64.0`` is ``64``;
``64.7`` and ``True`` are refused), ``flip_to`` 0 or 1 (``-256`` and ``1.4`` are refused),
``p01`` and ``p10`` in ``[0, 1]``, ``v_min`` finite and > 0, a real field values its dtype
holds exactly (a float64 ``v_fail`` is read if every value is a float32; NaN never). Every
failure is one :class:`InvalidArgument` line naming the file and the member. Memory is bounded
by the limits, never by what a file declares.

A bit stored in a failed cell flips iff it differs from ``flip_to`` (version 1); with
probabilities (version 2), a stored 0 in failed cell ``c`` flips iff ``r0_c < p01_c`` and a
stored 1 iff ``r1_c < p10_c``, with the read's uniforms ``r_c`` of :func:`read_uniforms` (one
per chip seed, cell and direction: the same at every voltage of that seed). Failures are nested
across voltages by construction (a cell that fails at V fails below V), so the flips at a lower
voltage include those at a higher one for the same stored bits and seed.

**Synthetic chips.** :func:`calibrated_profile` is the default (version 2): Figure 1 of Stutz
et al. in units of V / V_min, errors along columns, 0 -> 1 flips about 4 times as likely as
1 -> 0 (their chips 2 and 3), a voltage grid in steps of 0.1 % bit error rate
(:func:`voltage_grid`), ``v_min = 1``. :func:`synthetic_profile` is the generator of issue 11
(version 1, 1 -> 0 biased, 0.02 V grid), unchanged: the published chip sweep and the golden
files use it. Energy is normalized to :func:`energy_reference`: ``v_min`` where the profile
declares it, else (version 1) the lowest error-free voltage of its grid, as before.

**Error model** ``chip:<profile.npz>`` (:class:`ChipErrors`, in the registry of
:mod:`bnn_tol.faults.registry`). A chip is a stuck-at memory whose stuck cells and values are
measured instead of drawn (:class:`~bnn_tol.faults.stuck_at.StuckMap`): cell ``c`` reads
``flip_to_c`` once it fails (version 2: one entry per direction the cell flips in at that
read). The axes of a sweep (``evaluate.sweep(..., error="chip:x.npz")``,
``bnn-tol sweep --error chip:x.npz``) map onto the chip as follows:

* **rate = fraction of failing cells.** Each cell gets its failure rank
  ``u_c = #{c' : v_fail_c' > v_fail_c} / n_cells`` (``u_c = 1``, never failing, where
  ``v_fail_c = -inf``); at rate ``p`` the cells with ``u_c < p`` have failed. Lowering the
  voltage to ``V`` fails exactly the cells with ``u_c < p(V)``,
  ``p(V) = #{c : v_fail_c > V} / n_cells`` (:func:`voltage_rate`; the ``failing`` column of
  :meth:`Profile.cell_error_rate`), so a sweep over ``p(V)`` is the voltage sweep, and any
  ``p`` in ``[0, 1]`` is the chip at the voltage where a fraction ``p`` of its cells fail
  (nested across ``p``). The realized BER is lower: a bit flips only where it differs from what
  its failed cell reads. One rate ``p`` only (the direction is the profile's). A voltage is a
  finite number > 0 everywhere (NaN would fail no cell and pass for a clean chip).
* **map = placement.** Chip seed ``s`` places the model at bit offset ``s mod n_cells`` of the
  memory (the layout below; weight memory image only), so the sweep's maps are random
  placements of the model on the one profiled chip, and :func:`profile_sweep`'s row
  ``(V, offset)`` is the sweep row ``(p(V), seed = offset)``:
  ``inject(model, voltage_rate(profile, V), seed=offset, error=ChipErrors(profile))``.
  Offsets are integers in ``[0, MAX_OFFSET]`` (:data:`MAX_OFFSET`: the map seeds' range).

**Layout** (weight-to-memory): the model's memory image is the concatenation, in forward order,
of every layer's stored bits (:meth:`~bnn_tol.layers.BinaryLayer.stored_bits`: ``numel * m``
bits, weight-major, LSB first). Bit ``k`` of that stream at ``offset`` ``o`` (in bits) is bit
``j = (k + o) mod cols`` of word ``w = (k + o) // cols``; words are interleaved across arrays
(array ``w mod n_arrays``, row ``(w // n_arrays) mod rows``), so cell
``c = a rows cols + r cols + j``. The layout repeats every ``n_cells`` bits, so an offset acts
modulo ``n_cells``. A model with more bits than the chip wraps around (the chip's pattern
repeats, as when a profiled chip is tiled over a larger memory). Different ``offset`` values
place the model at different addresses of the same chip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import numbers
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from statistics import NormalDist
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from bnn_tol.exceptions import BnnTolError, InvalidArgument, require_int
from bnn_tol.faults.maps import select_layers
from bnn_tol.faults.registry import ErrorModel, Site, draw_sites, model_sites, register_error
from bnn_tol.faults.seeds import derive
from bnn_tol.faults.stuck_at import StuckMap
from bnn_tol.files import atomic_write

__all__ = ["Profile", "load_profile", "save_profile", "synthetic_profile", "calibrated_profile",
           "voltage_grid", "cells", "profile_flips", "energy", "energy_reference", "FORMAT",
           "ChipErrors", "failure_rank", "voltage_rate", "read_uniforms", "FIGURE1",
           "MAX_CELLS", "MAX_VOLTAGES", "MAX_OFFSET", "MAX_HEADER_BYTES", "MAX_MEMBERS",
           "MAX_DIRECTORY_BYTES"]

FORMAT = "bnn_tol.profile"

#: Most cells a profile may describe (``n_arrays * rows * cols``): 2^26, 64 times the 2^20
#: cells Stutz et al. profiled (32 arrays of 512 x 64). Such a profile takes 320 MiB
#: (float32 ``v_fail`` + ``flip_to``; 768 MiB with float32 ``p01``, ``p10``) and about
#: 1.5 GiB more while its failure ranks are computed; a larger one is refused before
#: anything is allocated.
MAX_CELLS = 2**26
#: Most voltages of a profile (and of one profile sweep): measured grids have tens of points,
#: and each voltage is a row per model and placement of the sweep's table.
MAX_VOLTAGES = 4096
#: Largest placement offset (chip seed): the range of the map seeds (63 bits) and of the
#: ``offset`` column (int64); an offset acts modulo ``n_cells`` anyway.
MAX_OFFSET = 2**63 - 1
#: Largest ``.npy`` header of a member: numpy's own default ``max_header_size``; a profile's
#: headers take 128 bytes.
MAX_HEADER_BYTES = 10_000
#: Most entries in a profile file's zip directory: a profile has at most 10 members; zipfile
#: parses the whole directory when it opens a file, so it is checked from the end record first.
MAX_MEMBERS = 16
#: Largest zip central directory of a profile file, in bytes: 10 entries take about 1 KB.
MAX_DIRECTORY_BYTES = 64 * 1024


@dataclass(frozen=True)
class _Field:
    """What a member of a profile file may be: dtype ``kinds`` (numpy ``dtype.kind``) before
    conversion, ``ndim``, most elements, whether the file must have it."""

    kinds: str
    ndim: int
    limit: int = 1
    required: bool = True


_FIELDS = {
    "format": _Field("U", 0),
    "version": _Field("iuf", 0, required=False),
    "voltages": _Field("iuf", 1, MAX_VOLTAGES),
    "rows": _Field("iuf", 0),
    "cols": _Field("iuf", 0),
    "n_arrays": _Field("iuf", 0),
    "v_fail": _Field("iuf", 1, MAX_CELLS),
    "flip_to": _Field("biuf", 1, MAX_CELLS, required=False),
    "energy": _Field("iuf", 1, MAX_VOLTAGES, required=False),
    "p01": _Field("biuf", 1, MAX_CELLS, required=False),
    "p10": _Field("biuf", 1, MAX_CELLS, required=False),
    "v_min": _Field("iuf", 0, required=False),
}
#: The members of each format version besides the common ones: version 1 describes stuck
#: cells (``flip_to``), version 2 per-cell flip probabilities by direction and ``V_min``.
_VERSION_FIELDS = {1: ("flip_to",), 2: ("p01", "p10", "v_min")}
#: The per-cell members (length ``n_cells``).
_CELL_FIELDS = ("v_fail", "flip_to", "p01", "p10")
_V2 = _VERSION_FIELDS[2]
#: Widest element of a numeric member (float64 / int64; longdouble and complex are refused).
_MAX_ITEMSIZE = 8
#: Longest ``format`` string (in characters; "bnn_tol.profile" has 15).
_MAX_FORMAT_CHARS = 64
_KIND_NAMES = {"b": "boolean", "i": "integer", "u": "integer", "f": "float",
               "c": "complex", "U": "string", "S": "bytes", "O": "object", "V": "structured",
               "M": "datetime", "m": "timedelta"}
#: What zipfile, zlib and numpy's header parser raise on a damaged archive or member.
_DAMAGED = (zipfile.BadZipFile, zlib.error, struct.error, EOFError, OSError, ValueError,
            TypeError, OverflowError, KeyError, IndexError, UnicodeDecodeError,
            NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Profile:
    """A profiled (or synthetic) chip; see the module docstring for the fields.

    A cell is described either as stuck (``flip_to``, format version 1) or by its flip
    probabilities per direction once it fails (``p01`` and ``p10``, version 2; then
    ``flip_to`` is ``None``). ``v_min`` (version 2, optional) is the voltage the energy is
    normalized to (``V_min``: 1.0 for profiles in units of ``V / V_min``).

    The arrays are taken as given (lists become arrays, no dtype is cast). Validated on
    construction: real arrays (no complex, object or string values; ``flip_to``, ``p01`` and
    ``p10`` may be boolean), voltages finite, > 0 and strictly decreasing (at most
    :data:`MAX_VOLTAGES`), integer ``rows``, ``cols``, ``n_arrays`` >= 1 with at most
    :data:`MAX_CELLS` cells, ``v_fail`` finite or ``-inf``, ``flip_to`` 0 or 1 -- or ``p01``
    and ``p10`` in ``[0, 1]`` --, ``energy`` positive, one per voltage, ``v_min`` finite > 0.
    """

    voltages: np.ndarray
    rows: int
    cols: int
    n_arrays: int
    v_fail: np.ndarray
    flip_to: np.ndarray | None
    energy: np.ndarray | None = None
    p01: np.ndarray | None = None
    p10: np.ndarray | None = None
    v_min: float | None = None

    @property
    def n_cells(self) -> int:
        """``n_arrays * rows * cols``."""
        return self.n_arrays * self.rows * self.cols

    @property
    def version(self) -> int:
        """The file format version that holds this profile: 1 (stuck cells, no ``v_min``) or
        2 (flip probabilities by direction, or a declared ``v_min``)."""
        return 1 if self.p01 is None and self.v_min is None else 2

    def flip_probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``(p01, p10)``, each ``(n_cells,)``: the probability that a failed cell
        flips a stored 0 (reads 1) and a stored 1 (reads 0); ``(flip_to, 1 - flip_to)`` for
        stuck cells."""
        if self.p01 is not None:
            return np.asarray(self.p01, np.float64), np.asarray(self.p10, np.float64)
        one = np.asarray(self.flip_to, np.float64)
        return one, 1.0 - one

    def failing(self, voltage: float) -> np.ndarray:
        """Boolean ``(n_cells,)``: the cells that fail at ``voltage`` (``voltage < v_fail``).

        Raises:
            InvalidArgument: ``voltage`` is not a number > 0 (NaN would fail no cell; ``+inf``
                is taken: no cell fails there).
        """
        return _voltage(voltage, finite=False) < self.v_fail

    def cell_error_rate(self) -> pd.DataFrame:
        """Per voltage the fraction of failing cells and of cells failing to 0 / to 1 (for
        flip probabilities: the expected fraction of cells that flip a stored 1 / a stored 0;
        ``ber``: the expected flipped share of a memory holding as many 0s as 1s)."""
        rows = []
        if self.p01 is not None:
            p01, p10 = self.flip_probabilities()
        for v in self.voltages:
            f = self.failing(float(v))
            if self.p01 is None:
                to_0 = float((f & (self.flip_to == 0)).mean())
                to_1 = float((f & (self.flip_to == 1)).mean())
                rows.append({"voltage": float(v), "failing": float(f.mean()),
                             "to_0": to_0, "to_1": to_1})
            else:
                to_0 = float(np.where(f, p10, 0.0).mean())
                to_1 = float(np.where(f, p01, 0.0).mean())
                rows.append({"voltage": float(v), "failing": float(f.mean()),
                             "to_0": to_0, "to_1": to_1, "ber": (to_0 + to_1) / 2})
        return pd.DataFrame(rows)

    def __post_init__(self) -> None:
        for name in ("voltages", "v_fail", "flip_to", "energy", "p01", "p10"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, np.ndarray):
                object.__setattr__(self, name, np.asarray(value))
        _validate(self)
        if self.v_min is not None:
            object.__setattr__(self, "v_min", float(self.v_min))


def _voltage(value: object, name: str = "voltage", *, finite: bool = True) -> float:
    """``value`` as a float if it is a real number (not a bool or string) > 0, finite unless
    ``finite=False`` (then ``+inf``, a voltage at which no cell fails, is taken); never NaN."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise InvalidArgument(f"{name} must be a number > 0, got {value!r}")
    v = float(value)
    if not v > 0 or (finite and not math.isfinite(v)):
        raise InvalidArgument(f"{name} must be a {'finite ' if finite else ''}number > 0, "
                              f"got {v!r}")
    return v


def _offset(value: object) -> int:
    """A placement: an integer in ``[0, MAX_OFFSET]``."""
    out = require_int(value, "offset", minimum=0)
    if out > MAX_OFFSET:
        raise InvalidArgument(f"offset must be <= {MAX_OFFSET} (2^63 - 1, the map seeds' "
                              f"range; placements act modulo the chip's cells), got {out}")
    return out


def _real(value: object, name: str) -> float:
    """``value`` as a float if it is a finite real number (not a bool or string)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _real_array(values: object, name: str) -> np.ndarray:
    """``values`` as float64 if they are real numbers float64 holds exactly (no cast first)."""
    a = np.asarray(values)
    _kind(a, name, "iuf")
    return _exact(a, np.float64, name)


def _kind(a: np.ndarray, name: str, kinds: str) -> None:
    """Refuse an array whose dtype is not of one of ``kinds`` (before any cast)."""
    if a.dtype.kind not in kinds or a.dtype.itemsize > _MAX_ITEMSIZE:
        raise InvalidArgument(f"{name} must hold {_allowed(kinds)} numbers, got "
                              f"{_KIND_NAMES.get(a.dtype.kind, 'other')} values ({a.dtype})")


def _allowed(kinds: str) -> str:
    return " or ".join(dict.fromkeys(_KIND_NAMES[k] for k in kinds))


def _validate(p: Profile) -> None:
    v = p.voltages
    _kind(v, "profile voltages", "iuf")
    if v.ndim != 1 or not 1 <= v.size <= MAX_VOLTAGES:
        raise InvalidArgument(f"profile voltages must be a 1-d array of 1 to {MAX_VOLTAGES} "
                              f"numbers, got shape {v.shape}")
    if not np.all(np.isfinite(v)) or not np.all(v > 0):
        raise InvalidArgument("profile voltages must be finite numbers > 0")
    if v.size > 1 and not np.all(np.diff(v) < 0):
        raise InvalidArgument("profile voltages must be strictly decreasing (nominal first)")
    for name in ("rows", "cols", "n_arrays"):
        require_int(getattr(p, name), f"profile {name}", minimum=1)
    n = _n_cells(int(p.n_arrays), int(p.rows), int(p.cols))
    if (p.flip_to is None) == (p.p01 is None) or (p.p01 is None) != (p.p10 is None):
        raise InvalidArgument("a profile describes its cells by flip_to (stuck cells) or by "
                              "p01 and p10 (flip probabilities by direction), not both or "
                              "neither")
    _kind(p.v_fail, "profile v_fail", "iuf")
    cell = ("flip_to",) if p.flip_to is not None else ("p01", "p10")
    for name in cell:
        _kind(getattr(p, name), f"profile {name}", "biuf")
    shapes = [getattr(p, f).shape for f in ("v_fail", *cell)]
    if any(s != (n,) for s in shapes):
        raise InvalidArgument(f"profile v_fail and {' and '.join(cell)} must have n_arrays * "
                              f"rows * cols = {n} entries, got "
                              f"{' and '.join(str(s) for s in shapes)}")
    if np.isnan(p.v_fail).any() or np.isposinf(p.v_fail).any():
        raise InvalidArgument("profile v_fail must be finite or -inf (never fails)")
    if p.flip_to is not None:
        _zero_or_one(p.flip_to, "profile flip_to")
    else:
        for name in cell:
            _probability(getattr(p, name), f"profile {name}")
    if p.v_min is not None:
        _voltage(p.v_min, "profile v_min")
    if p.energy is not None:
        e = p.energy
        _kind(e, "profile energy", "iuf")
        if e.shape != v.shape or not np.all(np.isfinite(e)) or np.any(e <= 0):
            raise InvalidArgument("profile energy must be positive, one value per voltage")


def _n_cells(n_arrays: int, rows: int, cols: int) -> int:
    """``n_arrays * rows * cols``, refused above :data:`MAX_CELLS` (naming the size)."""
    n = n_arrays * rows * cols
    if n > MAX_CELLS:
        raise InvalidArgument(
            f"a chip of {n_arrays} arrays x {rows} rows x {cols} cols = {n} cells "
            f"(~{_bytes(n * 5)} as float32 v_fail + uint8 flip_to) is larger than MAX_CELLS = "
            f"{MAX_CELLS} (2^26, 64 times the chip of Stutz et al.)")
    return n


def _geometry(rows: int, cols: int, n_arrays: int) -> tuple[int, int, int]:
    """``(rows, cols, n_arrays)`` checked: integers >= 1, at most :data:`MAX_CELLS` cells."""
    rows = require_int(rows, "rows", minimum=1)
    cols = require_int(cols, "cols", minimum=1)
    n_arrays = require_int(n_arrays, "n_arrays", minimum=1)
    _n_cells(n_arrays, rows, cols)
    return rows, cols, n_arrays


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _zero_or_one(a: np.ndarray, name: str) -> None:
    """Refuse values of ``a`` other than 0 and 1 (booleans read as their stored byte)."""
    b = a.view(np.uint8) if a.dtype.kind == "b" else a
    bad = (b != 0) & (b != 1)
    if bad.any():
        raise InvalidArgument(f"{name} must hold 0 or 1 per cell, got {b[bad][0].item()!r}")


def _probability(a: np.ndarray, name: str) -> None:
    """Refuse values of ``a`` outside ``[0, 1]`` (NaN included; booleans are 0 and 1)."""
    b = a.view(np.uint8) if a.dtype.kind == "b" else a
    bad = ~((b >= 0) & (b <= 1))
    if bad.any():
        raise InvalidArgument(f"{name} must hold a probability in [0, 1] per cell, got "
                              f"{b[bad][0].item()!r}")


def _exact(a: np.ndarray, dtype: type[np.generic], name: str) -> np.ndarray:
    """``a`` cast to ``dtype``, refused if the cast would change a value (NaN refused)."""
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise InvalidArgument(f"{name} must not hold NaN")
    with np.errstate(all="ignore"):
        out = a.astype(dtype)
        back = out.astype(a.dtype)
    bad = back != a
    if bad.any():
        kind = np.dtype(dtype).name
        raise InvalidArgument(f"{name} holds {a[bad][0].item()!r}, which {kind} cannot represent "
                              f"exactly (the format stores {name.split()[-1]} as {kind})")
    return out


def _is_profile(path: Path) -> bool:
    """Is ``path`` a profile archive this module wrote (its ``format`` member says so)?"""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "format.npy" in npz.zip.namelist() and str(npz["format"][()]) == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def save_profile(profile: Profile, path: str | os.PathLike) -> Path:
    """Write ``profile`` as a documented ``.npz`` (no pickle), atomically
    (:func:`bnn_tol.files.atomic_write`: a failed write leaves the previous file or none).
    An existing file is replaced only if it is a profile archive (any other file is refused).

    Raises:
        InvalidArgument: a field the format's dtype cannot hold exactly (``v_fail`` values
            that are not float32), or ``path`` cannot be written (its directory does not
            exist, no space, read-only), naming the path and why.
        ResultsMismatch: ``path`` exists and is not a profile archive (left untouched).
    """
    path = Path(path)
    version = profile.version
    arrays = {"format": np.array(FORMAT), "version": np.array(version),
              "voltages": _exact(profile.voltages, np.float64, "profile voltages"),
              "rows": np.array(int(profile.rows)), "cols": np.array(int(profile.cols)),
              "n_arrays": np.array(int(profile.n_arrays)),
              "v_fail": _exact(profile.v_fail, np.float32, "profile v_fail")}
    if version == 1:
        arrays["flip_to"] = np.asarray(profile.flip_to).astype(np.uint8)
    if profile.energy is not None:
        arrays["energy"] = _exact(profile.energy, np.float64, "profile energy")
    if version == 2:  # stuck cells with a declared v_min: probabilities 0 and 1, exactly
        p01, p10 = (profile.p01, profile.p10) if profile.p01 is not None \
            else profile.flip_probabilities()
        arrays["p01"] = _exact(np.asarray(p01), np.float32, "profile p01")
        arrays["p10"] = _exact(np.asarray(p10), np.float32, "profile p10")
        if profile.v_min is not None:
            arrays["v_min"] = np.array(float(profile.v_min))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    if not path.parent.is_dir():
        raise InvalidArgument(f"cannot write the profile {path}: the directory {path.parent} "
                              "does not exist")
    try:
        atomic_write(path, write, replace=_is_profile)
    except OSError as e:
        if isinstance(e, BnnTolError):
            raise
        raise InvalidArgument(f"cannot write the profile {path}: {e.strerror or e}") from None
    return path


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file, trusting nothing in it (the module docstring lists
    the checks and limits: sizes from the headers before any data is decompressed, values
    before they are cast).

    Raises:
        InvalidArgument: not a profile file, a damaged one, or invalid fields; one line
            naming the file and the member.
    """
    try:
        # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InvalidArgument(f"{path} is not a bnn_tol profile: {e.strerror or e}; make one "
                              "with `bnn-tol profile synth` or profile.save_profile") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{path} is not a bnn_tol profile: not a regular file")
    with os.fdopen(fd, "rb") as fh:
        try:
            return _read_profile(fh)
        except InvalidArgument as e:
            raise InvalidArgument(_one_line(f"{path}: {e}")) from None
        except _DAMAGED as e:
            raise InvalidArgument(_one_line(f"{path}: damaged profile archive "
                                            f"({type(e).__name__}: {e})")) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_profile(fh: BinaryIO) -> Profile:
    """The profile in the open file ``fh`` (module docstring: order of the checks)."""
    # zipfile's own reader of the end record (private, unchanged since Python 2): the number
    # of entries and the size of the central directory, before ZipFile parses the directory
    end = zipfile._EndRecData(fh)
    if end is None:
        raise InvalidArgument("not a bnn_tol profile (a .npz archive); make one with "
                              "`bnn-tol profile synth` or profile.save_profile")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > MAX_MEMBERS or size > MAX_DIRECTORY_BYTES:
        raise InvalidArgument(f"the archive declares {entries} entries in a {size}-byte "
                              f"directory; a profile has at most {len(_FIELDS)} members "
                              f"(limits: MAX_MEMBERS = {MAX_MEMBERS}, MAX_DIRECTORY_BYTES = "
                              f"{MAX_DIRECTORY_BYTES})")
    fh.seek(0)
    with zipfile.ZipFile(fh) as zf:
        listed = zf.infolist()
        if len(listed) != entries:  # a damaged record swallowed (or invented) entries
            raise InvalidArgument(f"damaged profile archive: its end record declares {entries} "
                                  f"entries, its central directory holds {len(listed)}")
        infos = _members(listed)
        headers = {f: _member_header(zf, info, f) for f, info in infos.items()}
        values = {f: _member_data(zf, infos[f], headers[f], f)
                  for f in infos if _FIELDS[f].ndim == 0}
        if str(values["format"][()]) != FORMAT:
            raise InvalidArgument(f"not a bnn_tol profile (format {str(values['format'][()])!r}"
                                  f", expected {FORMAT!r})")
        version = require_int(values["version"][()].item(), "profile version") \
            if "version" in values else 1
        if version not in _VERSION_FIELDS:
            raise InvalidArgument(f"unknown profile version {version} (this bnn_tol reads "
                                  f"versions {', '.join(map(str, _VERSION_FIELDS))})")
        _version_members(version, infos)
        rows, cols, n_arrays = (require_int(values[f][()].item(), f"profile {f}", minimum=1)
                                for f in ("rows", "cols", "n_arrays"))
        n = _n_cells(n_arrays, rows, cols)
        for f in _CELL_FIELDS:
            if f in headers and headers[f][0] != (n,):
                raise InvalidArgument(f"member {f} declares shape {headers[f][0]}; "
                                      f"n_arrays * rows * cols = {n} cells")
        v_min = _real_member(values["v_min"], "profile v_min") if "v_min" in values else None
        for f in infos:
            if _FIELDS[f].ndim == 1:
                values[f] = _member_data(zf, infos[f], headers[f], f)
    if version == 1:
        flip_to = values["flip_to"]  # kinds were checked from the headers; values before a
        if flip_to.dtype != np.uint8:  # cast (uint8 is the format's: the constructor checks it)
            _zero_or_one(flip_to, "profile flip_to")
        flip_to = (flip_to.view(np.uint8) if flip_to.dtype.kind == "b" else flip_to
                   ).astype(np.uint8)
        p01 = p10 = None
    else:
        flip_to = None
        p01, p10 = (_probabilities(values[f], f"profile {f}") for f in ("p01", "p10"))
    return Profile(_exact(values["voltages"], np.float64, "profile voltages"), rows, cols,
                   n_arrays, _exact(values["v_fail"], np.float32, "profile v_fail"), flip_to,
                   _exact(values["energy"], np.float64, "profile energy")
                   if "energy" in values else None, p01, p10, v_min)


def _version_members(version: int, infos: dict[str, zipfile.ZipInfo]) -> None:
    """Refuse the members of another format version, and a missing cell description."""
    other = [f for v, fields in _VERSION_FIELDS.items() if v != version for f in fields
             if f in infos and f not in _VERSION_FIELDS[version]]
    if other:
        raise InvalidArgument(f"a version {version} profile has no member "
                              f"{', '.join(other)} (version 1: flip_to; version 2: p01, p10 "
                              "and optionally v_min)")
    need = ("flip_to",) if version == 1 else ("p01", "p10")
    missing = [f for f in need if f not in infos]
    if missing:
        raise InvalidArgument(f"not a bnn_tol profile: no member {', '.join(missing)} (a "
                              f"version {version} profile has {', '.join(need)})")


def _real_member(a: np.ndarray, name: str) -> float:
    """A scalar member as a finite voltage > 0, exactly as a float64."""
    value = _exact(a, np.float64, name)[()].item()
    return _voltage(value, name)


def _probabilities(a: np.ndarray, name: str) -> np.ndarray:
    """A probability member as float32, its values in ``[0, 1]`` checked before the cast."""
    _probability(a, name)
    return _exact(a.view(np.uint8) if a.dtype.kind == "b" else a, np.float32, name)


def _members(infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """``{field: zip entry}``: the required members, each known member once, nothing else."""
    names = [i.filename for i in infos]
    missing = [f for f, spec in _FIELDS.items() if spec.required and f"{f}.npy" not in names]
    if missing:
        raise InvalidArgument(f"not a bnn_tol profile: no member {', '.join(missing)} (a "
                              f"profile has {', '.join(f for f in _FIELDS if f not in _V2)}; "
                              "version 2: p01, p10 instead of flip_to, and v_min)")
    out: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        field = info.filename[:-4] if info.filename.endswith(".npy") else None
        if field not in _FIELDS:
            raise InvalidArgument(f"unexpected member {info.filename!r} (a profile has "
                                  f"{', '.join(f'{f}.npy' for f in _FIELDS)})")
        if field in out:
            raise InvalidArgument(f"member {info.filename} appears twice (duplicate entries)")
        out[field] = info
    return out


_Header = tuple[tuple[int, ...], bool, np.dtype, int]  # shape, fortran order, dtype, offset


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, field: str) -> _Header:
    """Check a member's zip entry and ``.npy`` header against ``_FIELDS[field]`` and the
    limits, reading only the header (at most 12 + MAX_HEADER_BYTES decompressed bytes)."""
    spec = _FIELDS[field]
    what = f"member {field}"
    if info.flag_bits & 0x1:
        raise InvalidArgument(f"{what} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InvalidArgument(f"{what} uses zip compression method {info.compress_type}; a "
                              "profile is stored or deflated (numpy.savez / savez_compressed)")
    with _open(zf, info, what) as f:
        magic = _read_exact(f, 8, what)
        if magic[:6] != b"\x93NUMPY" or magic[6:] not in (b"\x01\x00", b"\x02\x00"):
            raise InvalidArgument(f"{what} is not an .npy array (format 1.0 or 2.0)")
        raw_len = _read_exact(f, 2 if magic[6] == 1 else 4, what)
        header_len = int.from_bytes(raw_len, "little")
        if header_len > MAX_HEADER_BYTES:
            raise InvalidArgument(f"{what} declares a {header_len}-byte .npy header (limit "
                                  f"MAX_HEADER_BYTES = {MAX_HEADER_BYTES})")
        header = _read_exact(f, header_len, what)
    buf = io.BytesIO(magic + raw_len + header)
    read = np.lib.format.read_array_header_1_0 if magic[6] == 1 \
        else np.lib.format.read_array_header_2_0
    np.lib.format.read_magic(buf)
    try:
        shape, fortran, dtype = read(buf, max_header_size=MAX_HEADER_BYTES)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise InvalidArgument(f"{what} has an invalid .npy header ({e})") from None
    if dtype.kind not in spec.kinds or (dtype.kind != "U" and dtype.itemsize > _MAX_ITEMSIZE) \
            or (dtype.kind == "U" and not 0 < dtype.itemsize <= 4 * _MAX_FORMAT_CHARS):
        raise InvalidArgument(f"{what} must hold {_allowed(spec.kinds)} values, its header "
                              f"declares {_KIND_NAMES.get(dtype.kind, 'other')} {dtype.str}")
    if len(shape) != spec.ndim or any(d < 0 for d in shape):
        raise InvalidArgument(f"{what} must be {spec.ndim}-d, its header declares shape "
                              f"{shape}")
    count = math.prod(shape)
    if count > spec.limit:
        limit = "MAX_CELLS" if spec.limit == MAX_CELLS else "MAX_VOLTAGES"
        raise InvalidArgument(f"{what} declares {count} elements ({_bytes(count * dtype.itemsize)}"
                              f"); the limit is {limit} = {spec.limit}")
    offset = len(magic) + len(raw_len) + header_len
    if info.file_size != offset + count * dtype.itemsize:
        raise InvalidArgument(f"{what} is {info.file_size} bytes in the zip directory, but "
                              f"its .npy header declares {offset + count * dtype.itemsize}")
    return tuple(int(d) for d in shape), bool(fortran), dtype, offset


def _member_data(zf: zipfile.ZipFile, info: zipfile.ZipInfo, header: _Header,
                 field: str) -> np.ndarray:
    """The array of a member whose header :func:`_member_header` accepted (its CRC checked)."""
    shape, fortran, dtype, offset = header
    what = f"member {field}"
    with _open(zf, info, what) as f:
        _read_exact(f, offset, what)
        data = _read_exact(f, math.prod(shape) * dtype.itemsize, what)
        if f.read(1):  # also reaches the end of the member, where zipfile checks its CRC
            raise InvalidArgument(f"{what} has bytes after its array")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


@contextmanager
def _open(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> Iterator[BinaryIO]:
    """The member's stream; zip, zlib and CRC failures become one line naming the member."""
    try:
        with zf.open(info) as f:
            yield f
    except InvalidArgument:
        raise
    except _DAMAGED as e:
        raise InvalidArgument(f"{what} is damaged ({type(e).__name__}: {e})") from None


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    """``n`` bytes of ``f`` (a request of at most ``n``: decompression stops there)."""
    data = f.read(n)
    if len(data) != n:
        raise InvalidArgument(f"{what} ends early ({len(data)} of {n} bytes)")
    return data


def synthetic_profile(
    *,
    rows: int = 512,
    cols: int = 64,
    n_arrays: int = 32,
    voltages: Sequence[float] | None = None,
    v_mean: float = 0.70,
    v_sd: float = 0.05,
    row_sd: float = 0.01,
    col_sd: float = 0.01,
    to_one: float = 0.3,
    seed: int = 0,
) -> Profile:
    """The synthetic chip of issue 11 (format version 1: stuck cells; same seed, same chip),
    kept unchanged: the published chip sweep and the golden files use it. The default chip is
    :func:`calibrated_profile` (Figure 1 of Stutz et al., 0 -> 1 biased, errors along columns);
    this one is biased 1 -> 0 (``to_one = 0.3``) and, in units of ``V / V_min``, fails less
    than Figure 1 (0.41 ... 0.09 of its rate from 0.75 to 0.92).

    Each cell's failure voltage is ``v_fail = v_mean + v_sd z_cell + row_sd z_row +
    col_sd z_col`` with independent standard normals per cell, per (array, row) and per
    (array, column): cells of a weak row or column fail together (spatial correlation along
    rows and columns). A failing cell reads 1 with probability ``to_one`` (else 0), so
    ``p01 != p10`` unless ``to_one = 0.5``. Voltages are in units of ``V_min`` (1.0 = the
    nominal, error-free operating point); the default grid is 1.00, 0.98, ..., 0.80, where
    the failing-cell fraction is about ``P(z > (V - v_mean) / sd)``: ~1e-9 at 1.0 and ~2.3 %
    at 0.80 for the defaults (bit error rates about half that: a bit only flips when it differs
    from what the cell reads).

    Args:
        rows, cols, n_arrays: geometry (the paper profiled 32 arrays of 512 x 64).
        voltages: decreasing grid (default above).
        v_mean, v_sd, row_sd, col_sd: failure-voltage distribution.
        to_one: fraction of failing cells that read 1.
        seed: ``numpy.random.default_rng(seed)``.

    Raises:
        InvalidArgument: a parameter out of range, or more than :data:`MAX_CELLS` cells
            (refused before anything is allocated, naming the size).
    """
    seed = require_int(seed, "seed", minimum=0)
    v_mean = _real(v_mean, "v_mean")
    for name, val in (("v_sd", v_sd), ("row_sd", row_sd), ("col_sd", col_sd)):
        if _real(val, name) < 0:
            raise InvalidArgument(f"{name} must be a finite number >= 0, got {val!r}")
    if not 0.0 <= _real(to_one, "to_one") <= 1.0:
        raise InvalidArgument(f"to_one must be in [0, 1], got {to_one!r}")
    rows, cols, n_arrays = _geometry(rows, cols, n_arrays)  # before allocating
    volts = np.round(np.linspace(1.0, 0.8, 11), 10) if voltages is None \
        else _real_array(voltages, "voltages")
    rng = np.random.default_rng(seed)
    cell = rng.standard_normal((n_arrays, rows, cols))
    row = rng.standard_normal((n_arrays, rows, 1))
    col = rng.standard_normal((n_arrays, 1, cols))
    v_fail = (v_mean + v_sd * cell + row_sd * row + col_sd * col).astype(np.float32).reshape(-1)
    flip_to = (rng.random(v_fail.size) < to_one).astype(np.uint8)
    return Profile(volts, rows, cols, n_arrays, v_fail, flip_to)


#: Stutz et al. (MLSys 2021), Figure 1 (32 arrays of 512 x 64 cells, 14 nm SRAM), read from
#: the published figure: ``{V / V_min: bit error rate}``.
FIGURE1 = {0.75: 0.206, 0.79: 0.056, 0.83: 0.011, 0.875: 0.0013, 0.92: 0.000069,
           0.96: 0.000002}


def calibrated_profile(
    *,
    rows: int = 512,
    cols: int = 64,
    n_arrays: int = 32,
    voltages: Sequence[float] | None = None,
    col_share: float = 0.3,
    row_share: float = 0.05,
    to_one: float = 0.8,
    flaky: float = 0.1,
    two_way: float = 0.02,
    seed: int = 0,
) -> Profile:
    """The default synthetic chip (format version 2): calibrated to Figure 1 of Stutz et al.
    in units of ``V / V_min`` (``v_min = 1.0``: no cell fails there, energy ``V^2``), with
    errors along columns and the 0 -> 1 bias of their chips 2 and 3 (same seed, same chip).

    Failure voltages: a standard normal per cell,
    ``z_c = sqrt(1 - col_share - row_share) z_cell + sqrt(col_share) z_(array, column) +
    sqrt(row_share) z_(array, row)``, through the increasing map ``v_fail = g(z)`` for which
    the failing fraction ``F(V) = P(v_fail > V)`` times the mean flip probability ``m`` of a
    failed cell is :data:`FIGURE1`'s rate at its six voltages: ``g`` is piecewise linear
    between ``(Phi^-1(1 - rate_k / m), V_k)`` (extended by the end slopes) and capped just
    below 1.0. So ``col_share`` of each cell's weakness is its column's (cells of a weak
    column fail together) while the rate at each voltage is Figure 1's, for a memory holding
    as many 0s as 1s (an 8-bit network: tested within a factor 1.5 from 0.75 to 0.92).

    Directions: a cell's preferred flip is 0 -> 1 with probability ``to_one`` (else 1 -> 0);
    it flips that way with probability 1, or, for a share ``flaky`` of the cells, with a
    probability ``q_c ~ U(0, 1)`` per read (:func:`read_uniforms`); a share ``two_way`` also
    flips the other way with the same probability. Flipped stored 0s : flipped stored 1s are
    ``to_one + (1 - to_one) two_way : 1 - to_one + to_one two_way`` (3.7 : 1 by default;
    chips 2 and 3: 0.82 / 0.19 % and 1.81 / 0.48 %).

    Args:
        rows, cols, n_arrays: geometry (the paper profiled 32 arrays of 512 x 64).
        voltages: decreasing grid; default :func:`voltage_grid` of the chip from 1.0 to 0.75
            (steps of at most 0.1 % in bit error rate, 0.01 in voltage).
        col_share, row_share: shares of the failure-voltage variance along columns and rows.
        to_one, flaky, two_way: direction bias and per-cell flip probabilities (above).
        seed: ``numpy.random.default_rng(seed)``.

    Raises:
        InvalidArgument: a parameter out of range, or more than :data:`MAX_CELLS` cells
            (refused before anything is allocated, naming the size).
    """
    seed = require_int(seed, "seed", minimum=0)
    for name, val in (("col_share", col_share), ("row_share", row_share), ("to_one", to_one),
                      ("flaky", flaky), ("two_way", two_way)):
        if not 0.0 <= _real(val, name) <= 1.0:
            raise InvalidArgument(f"{name} must be in [0, 1], got {val!r}")
    if col_share + row_share > 1.0:
        raise InvalidArgument(f"col_share + row_share must be <= 1, got {col_share + row_share}")
    rows, cols, n_arrays = _geometry(rows, cols, n_arrays)  # before allocating
    rng = np.random.default_rng(seed)
    z = math.sqrt(1.0 - col_share - row_share) * rng.standard_normal((n_arrays, rows, cols))
    z += math.sqrt(col_share) * rng.standard_normal((n_arrays, 1, cols))
    z += math.sqrt(row_share) * rng.standard_normal((n_arrays, rows, 1))
    mean_flip = (1.0 - flaky / 2) * (1.0 + two_way) / 2
    knots_v = np.array(sorted(FIGURE1))
    knots_z = np.array([-NormalDist().inv_cdf(FIGURE1[v] / mean_flip) for v in knots_v])
    z = z.reshape(-1)
    v = np.interp(z, knots_z, knots_v)
    lo = (knots_v[1] - knots_v[0]) / (knots_z[1] - knots_z[0])
    hi = (knots_v[-1] - knots_v[-2]) / (knots_z[-1] - knots_z[-2])
    v = np.where(z < knots_z[0], knots_v[0] + lo * (z - knots_z[0]), v)
    v = np.where(z > knots_z[-1], knots_v[-1] + hi * (z - knots_z[-1]), v)
    v_fail = np.minimum(v, 1.0).astype(np.float32)
    v_fail[v_fail >= 1.0] = np.nextafter(np.float32(1.0), np.float32(0.0))
    n = v_fail.size
    pref_one = rng.random(n) < to_one
    q = np.where(rng.random(n) < flaky, rng.random(n), 1.0).astype(np.float32)
    other = np.where(rng.random(n) < two_way, q, np.float32(0.0)).astype(np.float32)
    p01 = np.where(pref_one, q, other).astype(np.float32)
    p10 = np.where(pref_one, other, q).astype(np.float32)
    chip = Profile(np.array([1.0, 0.75]), rows, cols, n_arrays, v_fail, None, p01=p01,
                   p10=p10, v_min=1.0)
    volts = voltage_grid(chip) if voltages is None else _real_array(voltages, "voltages")
    return dataclasses.replace(chip, voltages=volts)


def voltage_grid(profile: Profile, *, step: float = 0.001, max_gap: float = 0.01,
                 high: float | None = None, low: float | None = None) -> np.ndarray:
    """float64 voltages from ``high`` down to ``low`` (default: the profile's first and last)
    at which the chip's bit error rate rises by at most ``step`` from one to the next.

    The rate at ``V`` is the expected flipped share of a memory holding as many 0s as 1s,
    ``r(V) = sum over cells failing at V of (p01_c + p10_c) / 2 / n_cells`` (half the failing
    fraction for stuck cells). Each next voltage is the lowest failure voltage of a cell at
    which ``r`` stays within ``step`` of the previous point (the profile's own ``v_fail``
    values), so consecutive rates differ by at most ``step`` -- except where more than
    ``step`` of the rate fails at one voltage (tied ``v_fail``), which no grid resolves.
    Gaps wider than ``max_gap`` volts are filled evenly.

    Raises:
        InvalidArgument: ``step`` or ``max_gap`` not > 0, ``low >= high``, or more than
            :data:`MAX_VOLTAGES` voltages (a coarser ``step`` then).
    """
    for name, val in (("step", step), ("max_gap", max_gap)):
        if not _real(val, name) > 0:
            raise InvalidArgument(f"{name} must be a number > 0, got {val!r}")
    high = float(profile.voltages[0]) if high is None else _voltage(high, "high")
    low = float(profile.voltages[-1]) if low is None else _voltage(low, "low")
    if not low < high:
        raise InvalidArgument(f"low must be below high, got low={low}, high={high}")
    p01, p10 = profile.flip_probabilities()
    v = np.asarray(profile.v_fail, np.float64)
    order = np.argsort(-v, kind="stable")
    s = v[order]
    cum = np.concatenate([[0.0], np.cumsum((p01 + p10)[order] / 2)]) / v.size
    neg = -s

    def rate(volt: float) -> float:
        return float(cum[np.searchsorted(neg, -volt, side="left")])

    points = [high]
    while points[-1] > low:
        k = int(np.searchsorted(cum, rate(points[-1]) + step, side="right")) - 1
        nxt = float(s[k]) if k < s.size else low
        if nxt >= points[-1]:  # a tie at or above the last point: fail the tied cells
            below = s[s < points[-1]]
            nxt = float(below[0]) if below.size else low
        points.append(max(nxt, low))
        if len(points) > MAX_VOLTAGES:
            raise InvalidArgument(f"a grid of steps {step} has more than MAX_VOLTAGES = "
                                  f"{MAX_VOLTAGES} voltages; choose a larger step")
    out = [points[0]]
    for v_next in points[1:]:
        gap = out[-1] - v_next
        if gap > max_gap:
            k = math.ceil(gap / max_gap)
            out.extend(out[-1] - gap * np.arange(1, k) / k)
        out.append(v_next)
    grid = np.array(out, np.float64)
    if grid.size > MAX_VOLTAGES:
        raise InvalidArgument(f"the grid has {grid.size} voltages, more than MAX_VOLTAGES = "
                              f"{MAX_VOLTAGES}; choose a larger step or max_gap")
    return grid


def cells(n_bits: int, profile: Profile, offset: int = 0) -> np.ndarray:
    """Cell index ``(n_bits,)`` int64 of each bit of a memory image (see the module docstring).

    The layout repeats every ``n_cells`` bits, so ``offset`` (any integer >= 0) is taken
    modulo ``n_cells`` (no int64 overflow for large offsets).
    """
    offset = require_int(offset, "offset", minimum=0) % profile.n_cells
    k = np.arange(n_bits, dtype=np.int64) + offset
    j = k % profile.cols
    w = k // profile.cols
    a = w % profile.n_arrays
    r = (w // profile.n_arrays) % profile.rows
    return (a * profile.rows + r) * profile.cols + j


def _stored_layers(model: nn.Module) -> dict[str, nn.Module]:
    return select_layers(model)


def profile_flips(model: nn.Module, profile: Profile, voltage: float, *,
                  offset: int = 0) -> dict[str, Tensor]:
    """Stored bits that flip when ``model`` sits at ``offset`` in ``profile`` at ``voltage``:
    the flips of the chip error model at rate ``voltage_rate(profile, voltage)``, chip seed
    ``offset`` (a bit whose cell fails at ``voltage`` and reads the other value).

    Returns:
        ``{layer name: int64 (F,) sorted flat indices into layer.stored_bits()}`` for every
        binary/quantized layer (forward order).
    """
    offset = _offset(offset)
    p = voltage_rate(profile, voltage)
    maps = draw_sites(model_sites(model), offset, p, error=ChipErrors(profile))
    return {n: maps[n].flips(lay.stored_bits(), p, p) for n, lay in _stored_layers(model).items()}


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: The key of a chip seed's read stream: three elements, which no site's stream key
#: (``(position,)`` or ``(position, stream)``, :func:`~bnn_tol.faults.maps.layer_seed`) has.
_READ_KEY = (0, 0, 23)


def read_uniforms(seed: int, cells: np.ndarray, direction: int) -> np.ndarray:
    """float64 uniforms in ``[0, 1)``, one per cell of ``cells``: the read of chip seed
    ``seed`` for ``direction`` (0: a stored 0 flipping to 1, 1: a stored 1 flipping to 0).

    ``r = splitmix64(derive(seed, 0, 0, 23) + (2 c + direction) * 0x9E3779B97F4A7C15) / 2^64``
    (53 bits), so a cell's uniform depends only on the seed, the cell and the direction: the same
    for every site, placement and voltage of that seed (flips nested across voltages), and
    for two bits sharing a cell. A failed cell flips a stored 0 iff ``r_0 < p01_c``.
    """
    key = np.uint64(derive(require_int(seed, "seed", minimum=0), *_READ_KEY))
    with np.errstate(over="ignore"):
        x = key + (np.asarray(cells, np.uint64) * np.uint64(2) + np.uint64(direction)) * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def failure_rank(profile: Profile) -> np.ndarray:
    """float64 ``(n_cells,)``: ``u_c = #{c' : v_fail_c' > v_fail_c} / n_cells`` (``1`` for
    cells that never fail); the cells failing at voltage ``V`` are those with
    ``u_c < voltage_rate(profile, V)``."""
    v = np.asarray(profile.v_fail, np.float64)
    n = v.size
    greater = n - np.searchsorted(np.sort(v), v, side="right")
    return np.where(np.isneginf(v), 1.0, greater / n)


def voltage_rate(profile: Profile, voltage: float) -> float:
    """The chip's rate at ``voltage``: the fraction of its cells that fail there,
    ``#{c : v_fail_c > V} / n_cells``."""
    return int(profile.failing(voltage).sum()) / profile.n_cells


def energy(voltages: Sequence[float], *, reference: float, table: Sequence[float] | None = None
           ) -> np.ndarray:
    """Energy per access relative to the ``reference`` voltage.

    Default ``E(V) = (V / V_ref)^2`` (dynamic energy ~ C V^2), ``V_ref`` the lowest error-free
    voltage (the paper normalizes to it); with ``table`` (energy per voltage, any unit) the
    values are ``table / table(V_ref)``. The energy saving is ``1 - E(V)``.
    """
    v = np.asarray(voltages, np.float64)
    if table is None:
        return (v / reference) ** 2
    t = np.asarray(table, np.float64)
    idx = np.flatnonzero(np.isclose(v, reference))
    if t.shape != v.shape or not idx.size:
        raise InvalidArgument("an energy table needs one value per voltage, reference included")
    return t / t[idx[0]]


def energy_reference(profile: Profile) -> float:
    """The voltage energy is normalized to: the profile's ``v_min`` (version 2: its unit,
    1.0 for ``V / V_min``), else (version 1 files, unchanged) the lowest voltage of its grid
    at which no cell fails.

    Raises:
        InvalidArgument: no ``v_min`` and no error-free voltage in the grid.
    """
    if profile.v_min is not None:
        return float(profile.v_min)
    free = [float(v) for v in profile.voltages if not profile.failing(float(v)).any()]
    if not free:
        raise InvalidArgument("the profile has no error-free voltage to normalize energy to")
    return min(free)


@register_error
class ChipErrors(ErrorModel):
    """``chip:<profile.npz>``: the failures of a profiled (or synthetic) chip (module
    docstring: rate = fraction of failing cells, map seed = placement).

    Args:
        profile: a :class:`Profile` or the path of a profile file.
    """

    name = "chip"
    argument = "profile.npz"
    symmetric = True

    def __init__(self, profile: Profile | str | os.PathLike) -> None:
        if isinstance(profile, Profile):
            self.profile, self.path = profile, None
        else:
            self.path = str(profile)
            self.profile = load_profile(profile)

    @cached_property
    def rank(self) -> np.ndarray:
        """:func:`failure_rank` of the profile (computed once)."""
        return failure_rank(self.profile)

    def draw(self, site: Site, seed: int, cap: float) -> StuckMap:
        """The cells of ``site``'s bits at placement ``seed mod n_cells`` that fail below
        ``cap``, with what they read."""
        if site.address < 0:
            raise InvalidArgument("a chip profile maps the weight memory image only")
        offset = seed % self.profile.n_cells + site.address
        where = cells(site.n_bits, self.profile, offset)
        u = self.rank[where]
        idx = np.flatnonzero(u < cap)
        if self.profile.p01 is None:
            value = self.profile.flip_to[where][idx].astype(bool)
        else:  # one entry per direction a failed cell flips in at this read (seed)
            c = where[idx]
            r01, r10 = (read_uniforms(seed, c, d) for d in (0, 1))
            to_one = idx[r01 < self.profile.p01[c]]
            to_zero = idx[r10 < self.profile.p10[c]]
            both = np.concatenate([to_one, to_zero])
            order = np.argsort(both, kind="stable")
            idx = both[order]
            value = np.concatenate([np.ones(to_one.size, bool),
                                    np.zeros(to_zero.size, bool)])[order]
        return StuckMap(site.n_bits, torch.from_numpy(idx.astype(np.int64)),
                        torch.from_numpy(u[idx]), torch.from_numpy(value), cap)

    def spec(self) -> str:  # noqa: D102
        return f"chip:{self.path}" if self.path else "chip:<Profile>"

    def settings(self) -> dict[str, Any]:
        """The name and a sha256 of the profile's contents (not its path)."""
        h = hashlib.sha256()
        p = self.profile
        cell = (p.flip_to,) if p.version == 1 else (
            *p.flip_probabilities(), np.array([p.v_min if p.v_min is not None else np.nan]))
        for a in (p.voltages, np.array([p.rows, p.cols, p.n_arrays]), p.v_fail, *cell):
            h.update(np.ascontiguousarray(a).tobytes())
        return {"name": "chip", "profile_sha256": h.hexdigest()}
