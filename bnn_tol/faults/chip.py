"""Bit errors of a profiled chip, per supply voltage, and the energy they buy (Stutz et al.).

**Profile file** (``.npz``, loaded with ``allow_pickle=False``)::

    format     ()        str      "bnn_tol.profile"
    version    ()        int      1
    voltages   (V,)      float64  supply voltages, strictly decreasing (any unit; the
                                  synthetic profiles use V / V_min, V_min = 1)
    rows, cols ()        int      geometry of one SRAM array (e.g. 512 x 64 cells)
    n_arrays   ()        int      number of arrays; n_cells = n_arrays * rows * cols
    v_fail     (n_cells,) float32 the cell fails at every voltage V < v_fail
                                  (-inf: never fails)
    flip_to    (n_cells,) uint8   the value a failed cell reads: 0 corrupts a stored 1
                                  (a 1 -> 0 flip, p10), 1 corrupts a stored 0 (p01)
    energy     (V,)      float64  optional: energy per access at each voltage
                                  (default E ~ V^2, see :func:`energy`)

A bit stored in a failed cell flips iff it differs from ``flip_to``. Failures are nested
across voltages by construction (a cell that fails at V fails below V), so the flips at a lower
voltage include those at a higher one for the same stored bits.

**Error model** ``chip:<profile.npz>`` (:class:`ChipErrors`, in the registry of
:mod:`bnn_tol.faults.registry`). A chip is a stuck-at memory whose stuck cells and values are
measured instead of drawn (:class:`~bnn_tol.faults.stuck_at.StuckMap`): cell ``c`` reads
``flip_to_c`` once it fails. The axes of a sweep (``evaluate.sweep(..., error="chip:x.npz")``,
``bnn-tol sweep --error chip:x.npz``) map onto the chip as follows:

* **rate = fraction of failing cells.** Each cell gets its failure rank
  ``u_c = #{c' : v_fail_c' > v_fail_c} / n_cells`` (``u_c = 1``, never failing, where
  ``v_fail_c = -inf``); at rate ``p`` the cells with ``u_c < p`` have failed. Lowering the
  voltage to ``V`` fails exactly the cells with ``u_c < p(V)``,
  ``p(V) = #{c : v_fail_c > V} / n_cells`` (:func:`voltage_rate`; the ``failing`` column of
  :meth:`Profile.cell_error_rate`), so a sweep over ``p(V)`` is the voltage sweep, and any
  ``p`` in ``[0, 1]`` is the chip at the voltage where a fraction ``p`` of its cells fail
  (nested across ``p``). The realized BER is lower: a bit flips only where it differs from what
  its failed cell reads. One rate ``p`` only (the direction is the profile's).
* **map = placement.** Chip seed ``s`` places the model at bit offset ``s mod n_cells`` of the
  memory (the layout below; weight memory image only), so the sweep's maps are random
  placements of the model on the one profiled chip, and :func:`profile_sweep`'s row
  ``(V, offset)`` is the sweep row ``(p(V), seed = offset)``:
  ``inject(model, voltage_rate(profile, V), seed=offset, error=ChipErrors(profile))``.

**Layout** (weight-to-memory): the model's memory image is the concatenation, in forward order,
of every layer's stored bits (:meth:`~bnn_tol.layers.BinaryLayer.stored_bits`: ``numel * m``
bits, weight-major, LSB first). Bit ``k`` of that stream at ``offset`` ``o`` (in bits) is bit
``j = (k + o) mod cols`` of word ``w = (k + o) // cols``; words are interleaved across arrays
(array ``w mod n_arrays``, row ``(w // n_arrays) mod rows``), so cell
``c = a rows cols + r cols + j``. A model with more bits than the chip wraps around (the chip's
pattern repeats, as when a profiled chip is tiled over a larger memory). Different ``offset``
values place the model at different addresses of the same chip.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults.maps import select_layers
from bnn_tol.faults.registry import ErrorModel, Site, draw_sites, model_sites, register_error
from bnn_tol.faults.stuck_at import StuckMap

__all__ = ["Profile", "load_profile", "save_profile", "synthetic_profile", "cells",
           "profile_flips", "energy", "FORMAT", "ChipErrors", "failure_rank", "voltage_rate"]

FORMAT = "bnn_tol.profile"


@dataclass(frozen=True)
class Profile:
    """A profiled (or synthetic) chip; see the module docstring for the fields."""

    voltages: np.ndarray
    rows: int
    cols: int
    n_arrays: int
    v_fail: np.ndarray
    flip_to: np.ndarray
    energy: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        """``n_arrays * rows * cols``."""
        return self.n_arrays * self.rows * self.cols

    def failing(self, voltage: float) -> np.ndarray:
        """Boolean ``(n_cells,)``: the cells that fail at ``voltage`` (``voltage < v_fail``)."""
        return voltage < self.v_fail

    def cell_error_rate(self) -> pd.DataFrame:
        """Per voltage the fraction of failing cells and of cells failing to 0 / to 1."""
        rows = []
        for v in self.voltages:
            f = self.failing(float(v))
            rows.append({"voltage": float(v), "failing": float(f.mean()),
                         "to_0": float((f & (self.flip_to == 0)).mean()),
                         "to_1": float((f & (self.flip_to == 1)).mean())})
        return pd.DataFrame(rows)

    def __post_init__(self) -> None:
        _validate(self)


def _validate(p: Profile) -> None:
    v = np.asarray(p.voltages)
    if v.ndim != 1 or v.size < 1 or not np.all(np.isfinite(v)):
        raise InvalidArgument("profile voltages must be a non-empty 1-d array of finite numbers")
    if v.size > 1 and not np.all(np.diff(v) < 0):
        raise InvalidArgument("profile voltages must be strictly decreasing (nominal first)")
    for name in ("rows", "cols", "n_arrays"):
        require_int(getattr(p, name), f"profile {name}", minimum=1)
    n = p.n_arrays * p.rows * p.cols
    if p.v_fail.shape != (n,) or p.flip_to.shape != (n,):
        raise InvalidArgument(f"profile v_fail and flip_to must have n_arrays * rows * cols = {n} "
                              f"entries, got {p.v_fail.shape} and {p.flip_to.shape}")
    if np.isnan(p.v_fail).any() or np.isposinf(p.v_fail).any():
        raise InvalidArgument("profile v_fail must be finite or -inf (never fails)")
    if not np.isin(p.flip_to, (0, 1)).all():
        raise InvalidArgument("profile flip_to must hold 0 or 1 per cell")
    if p.energy is not None:
        e = np.asarray(p.energy)
        if e.shape != v.shape or not np.all(np.isfinite(e)) or np.any(e <= 0):
            raise InvalidArgument("profile energy must be positive, one value per voltage")


def save_profile(profile: Profile, path: str | os.PathLike) -> Path:
    """Write ``profile`` as a documented ``.npz`` (no pickle)."""
    path = Path(path)
    arrays = {"format": np.array(FORMAT), "version": np.array(1),
              "voltages": np.asarray(profile.voltages, np.float64),
              "rows": np.array(profile.rows), "cols": np.array(profile.cols),
              "n_arrays": np.array(profile.n_arrays),
              "v_fail": np.asarray(profile.v_fail, np.float32),
              "flip_to": np.asarray(profile.flip_to, np.uint8)}
    if profile.energy is not None:
        arrays["energy"] = np.asarray(profile.energy, np.float64)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file.

    Raises:
        InvalidArgument: not a profile file, or invalid fields (names the field).
    """

    if not zipfile.is_zipfile(path):
        raise InvalidArgument(f"{path} is not a bnn_tol profile (a .npz archive); make one with "
                              "`bnn-tol profile synth` or profile.save_profile")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            need = {"format", "voltages", "rows", "cols", "n_arrays", "v_fail", "flip_to"}
            if not need <= files or str(z["format"]) != FORMAT:
                raise InvalidArgument(f"{path} is not a bnn_tol profile (.npz with "
                                      f"{', '.join(sorted(need))})")
            version = int(z["version"]) if "version" in files else 1
            if version != 1:
                raise InvalidArgument(f"{path}: unknown profile version {version}")
            return Profile(np.asarray(z["voltages"], np.float64), int(z["rows"]),
                           int(z["cols"]), int(z["n_arrays"]),
                           np.asarray(z["v_fail"], np.float32),
                           np.asarray(z["flip_to"], np.uint8),
                           np.asarray(z["energy"], np.float64) if "energy" in files else None)
    except (OSError, ValueError) as e:
        if isinstance(e, InvalidArgument):
            raise
        raise InvalidArgument(f"{path}: cannot read the profile ({e})") from None


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
    """A realistic synthetic chip (documented parameters; same seed, same chip).

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
    """
    seed = require_int(seed, "seed", minimum=0)
    for name, val in (("v_sd", v_sd), ("row_sd", row_sd), ("col_sd", col_sd)):
        if not (math.isfinite(val) and val >= 0):
            raise InvalidArgument(f"{name} must be a finite number >= 0, got {val!r}")
    if not 0.0 <= to_one <= 1.0:
        raise InvalidArgument(f"to_one must be in [0, 1], got {to_one!r}")
    rows = require_int(rows, "rows", minimum=1)
    cols = require_int(cols, "cols", minimum=1)
    n_arrays = require_int(n_arrays, "n_arrays", minimum=1)
    rng = np.random.default_rng(seed)
    cell = rng.standard_normal((n_arrays, rows, cols))
    row = rng.standard_normal((n_arrays, rows, 1))
    col = rng.standard_normal((n_arrays, 1, cols))
    v_fail = (v_mean + v_sd * cell + row_sd * row + col_sd * col).astype(np.float32).reshape(-1)
    flip_to = (rng.random(v_fail.size) < to_one).astype(np.uint8)
    volts = np.round(np.linspace(1.0, 0.8, 11), 10) if voltages is None \
        else np.asarray(voltages, np.float64)
    return Profile(volts, rows, cols, n_arrays, v_fail, flip_to)


def cells(n_bits: int, profile: Profile, offset: int = 0) -> np.ndarray:
    """Cell index ``(n_bits,)`` int64 of each bit of a memory image (see the module docstring)."""
    offset = require_int(offset, "offset", minimum=0)
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
    offset = require_int(offset, "offset", minimum=0)
    p = voltage_rate(profile, voltage)
    maps = draw_sites(model_sites(model), offset, p, error=ChipErrors(profile))
    return {n: maps[n].flips(lay.stored_bits(), p, p) for n, lay in _stored_layers(model).items()}


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
    return int(profile.failing(float(voltage)).sum()) / profile.n_cells


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
        return StuckMap(site.n_bits, torch.from_numpy(idx.astype(np.int64)),
                        torch.from_numpy(u[idx]),
                        torch.from_numpy(self.profile.flip_to[where][idx].astype(bool)), cap)

    def spec(self) -> str:  # noqa: D102
        return f"chip:{self.path}" if self.path else "chip:<Profile>"

    def settings(self) -> dict[str, Any]:
        """The name and a sha256 of the profile's contents (not its path)."""
        h = hashlib.sha256()
        p = self.profile
        for a in (p.voltages, np.array([p.rows, p.cols, p.n_arrays]), p.v_fail, p.flip_to):
            h.update(np.ascontiguousarray(a).tobytes())
        return {"name": "chip", "profile_sha256": h.hexdigest()}
