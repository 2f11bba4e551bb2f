"""Building (and breaking) profile archives byte by byte, for the profile-file tests.

A profile file is a zip of ``<field>.npy`` members (:mod:`bnn_tol.faults.chip`). These
helpers write members with any header (declared shape, dtype, order) and any data, and zips
with any members, names, duplicates and compression methods, so a test can build exactly the
file a hostile or careless user would.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile

import numpy as np

from bnn_tol.faults import chip

#: The members of a profile (version 1, then the members version 2 adds), in the order
#: save_profile writes them.
FIELDS = ("format", "version", "voltages", "rows", "cols", "n_arrays", "v_fail", "flip_to",
          "energy", "p01", "p10", "v_min")


def members(profile: chip.Profile) -> dict[str, np.ndarray]:
    """The arrays :func:`bnn_tol.faults.chip.save_profile` writes for ``profile``: version 1
    for stuck cells without ``v_min``, else version 2."""
    out = {"format": np.array(chip.FORMAT), "version": np.array(profile.version),
           "voltages": np.asarray(profile.voltages, np.float64),
           "rows": np.array(profile.rows), "cols": np.array(profile.cols),
           "n_arrays": np.array(profile.n_arrays),
           "v_fail": np.asarray(profile.v_fail, np.float32)}
    if profile.version == 1:
        out["flip_to"] = np.asarray(profile.flip_to, np.uint8)
    if profile.energy is not None:
        out["energy"] = np.asarray(profile.energy, np.float64)
    if profile.version == 2:
        p01, p10 = profile.flip_probabilities()
        out["p01"], out["p10"] = p01.astype(np.float32), p10.astype(np.float32)
        if profile.v_min is not None:
            out["v_min"] = np.array(float(profile.v_min))
    return out


def npy(arr: np.ndarray) -> bytes:
    """``arr`` as ``.npy`` bytes (object arrays pickled, as ``np.save`` would)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=True)
    return buf.getvalue()


def npy_forged(descr: object, shape: object, data: bytes, *, fortran: object = False,
               version: tuple[int, int] = (1, 0)) -> bytes:
    """An ``.npy`` member whose header says ``descr``/``shape``/``fortran`` whatever ``data``
    holds (the header is written verbatim, as its ``repr``)."""
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"
    header = header + " " * ((-len(header) - 11) % 64) + "\n"
    raw = header.encode("latin1")
    if version == (1, 0):
        prefix = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw))
    else:
        prefix = b"\x93NUMPY" + bytes(version) + struct.pack("<I", len(raw))
    return prefix + raw + data


def npz(entries: dict[str, bytes] | list[tuple[str, bytes]], *,
        compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``(name, bytes)`` entries (names as given: ``"v_fail.npy"``), duplicates kept."""
    items = entries.items() if isinstance(entries, dict) else entries
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, data in items:
                zf.writestr(name, data)
    return buf.getvalue()


def archive(arrays: dict[str, np.ndarray], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A profile-shaped archive of ``arrays`` (``{field: array}``)."""
    return npz({f"{k}.npy": npy(v) for k, v in arrays.items()}, compression=compression)


def member_data_offset(data: bytes, name: str) -> int:
    """Offset in the zip ``data`` of the first byte of member ``name``'s (stored) contents."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    start = info.header_offset
    n_name, n_extra = struct.unpack("<HH", data[start + 26:start + 30])
    return start + 30 + n_name + n_extra


def central_entries(data: bytes) -> list[int]:
    """Offsets of the central-directory records of the zip ``data``."""
    out, i = [], data.find(b"PK\x01\x02")
    while i >= 0:
        out.append(i)
        i = data.find(b"PK\x01\x02", i + 4)
    return out
