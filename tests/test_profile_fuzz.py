"""Fuzzing profile archives (issue 20, "Done when"): whatever a profile file holds, loading it
gives a one-line library error or exactly the profile the file describes -- never another
exception, never a value changed by a cast, never memory proportional to a declared size.

Mutations of a valid archive (hypothesis): lossless re-encodings (compression, member order,
dtypes that hold the same values; these must load, equal to the original), member dtypes,
shapes and values, forged ``.npy`` headers (declared shape / dtype / order / version against
the data), missing, extra, duplicate and renamed members, byte flips, truncation and junk
anywhere in the zip, forged zip records (declared sizes, CRC, method, flags, offsets, entry
counts), other compression methods, and files that are no archive at all.

Oracle: when a load succeeds, every member as written (parsed independently by
``numpy.lib.format.read_array(allow_pickle=False)``) must be of a kind its field allows and
equal the loaded value exactly; after byte-level damage the loaded profile must equal the
original. Memory: the traced peak of every load stays below :data:`MEMORY_BOUND` (the
archives are a few KB; headers may declare up to 2^64 elements).
"""

from __future__ import annotations

import gzip
import io
import tracemalloc
import warnings
import zipfile
from dataclasses import dataclass

import _profile_archives as pa
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnn_tol.exceptions import BnnTolError
from bnn_tol.faults import chip

#: Traced allocations one load of a fuzzed archive may reach.
MEMORY_BOUND = 8 * 2**20

_BASES = (chip.synthetic_profile(rows=2, cols=4, n_arrays=2, v_mean=0.9, seed=0,
                                 voltages=(1.0, 0.95, 0.9, 0.85)),
          chip.Profile(np.array([1.2, 1.0, 0.8]), 3, 2, 1,
                       np.array([0.9, -np.inf, 1.1, 0.7, 0.95, -np.inf], np.float32),
                       np.array([0, 1, 1, 0, 1, 0], np.uint8), np.array([1.5, 1.0, 0.7])),
          # version 2: flip probabilities by direction, with and without v_min
          chip.calibrated_profile(rows=2, cols=4, n_arrays=2, voltages=(1.0, 0.9, 0.8), seed=1,
                                  flaky=0.5, two_way=0.5),
          chip.Profile(np.array([1.2, 1.0, 0.8]), 3, 2, 1,
                       np.array([0.9, -np.inf, 1.1, 0.7, 0.95, -np.inf], np.float32), None,
                       np.array([1.5, 1.0, 0.7]),
                       p01=np.array([0.5, 1, 0, 0.25, 1, 0], np.float32),
                       p10=np.array([0, 0.125, 1, 1, 0.75, 0], np.float32)))

#: Encodings of each field that hold the same values (a loader must accept them).
_LOSSLESS = {
    "version": ["<i4", "<u1", "<f8"], "rows": ["<i1", "<u2", ">i8", "<f4"],
    "cols": ["<i2", "<u8", "<f8"], "n_arrays": ["<i4", "<u1"],
    "voltages": [">f8"], "energy": [">f8"], "v_fail": ["<f8", ">f4", ">f8"],
    "flip_to": ["|b1", "<i8", ">u2", "<f4", "<f2"], "format": [">U15", "<U40"],
    "p01": ["<f8", ">f4"], "p10": ["<f8", ">f4"], "v_min": ["<f4", "<i8", ">f8"],
}
_DTYPES = ["|b1", "|i1", "|u1", "<i2", ">u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", ">f4",
           "<f8", "<c8", "<c16", "<f16", "<U8", "|S8", "<M8[s]", "<m8[s]", "|V4", "|O"]
_SPECIAL = [0, 1, -1, 2, -256, 255, 256, 1.4, 0.5, 64.7, 1e30, -1e30, 2**31, 2**53 + 1, 2**63,
            float("nan"), float("inf"), float("-inf"), 1e-45, -0.0, 16777217]
_DESCRS = ["<f4", ">f4", "<f8", "<i8", "|u1", "|b1", "<c8", "|O", "<U15", "<U0", "|S4", "|V4",
           [("a", "<f4")], ("<f4", (2,)), "<f16", "x", 42, "<M8[s]", "<U100000"]
_FIELD_KINDS = {"format": "U", "version": "iuf", "voltages": "iuf", "rows": "iuf",
                "cols": "iuf", "n_arrays": "iuf", "v_fail": "iuf", "flip_to": "biuf",
                "energy": "iuf", "p01": "biuf", "p10": "biuf", "v_min": "iuf"}


@dataclass
class Case:
    """A fuzzed file: its bytes, the members as written (``None``: the original's, damaged
    at byte level), whether it must load (a lossless re-encoding) or must fail."""

    data: bytes
    base: chip.Profile
    written: dict[str, bytes] | None
    must_load: bool = False
    must_fail: bool = False
    what: str = ""


def _cast(a: np.ndarray, dtype: str) -> np.ndarray | None:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            return a.astype(dtype)
        except (TypeError, ValueError, OverflowError):
            return None


def _holds(dtype: np.dtype, value: float) -> bool:
    """Whether ``dtype`` represents ``value`` exactly."""
    cast = _cast(np.array(value), dtype.str)
    return cast is not None and bool(np.array_equal(cast.astype(np.float64),
                                                    np.float64(value), equal_nan=True))


@st.composite
def cases(draw) -> Case:
    base = draw(st.sampled_from(_BASES))
    arrays = pa.members(base)
    fields = list(arrays)
    kind = draw(st.sampled_from(["lossless", "dtype", "shape", "value", "header", "members",
                                 "bytes", "records", "method", "junk"]))
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    members = {k: pa.npy(v) for k, v in arrays.items()}

    if kind == "lossless":
        for f in fields:
            if draw(st.booleans()):
                members[f] = pa.npy(arrays[f].astype(draw(st.sampled_from(_LOSSLESS[f]))))
        if draw(st.booleans()) and base.version == 1:  # absent: version 1
            del members["version"]
        order = draw(st.permutations(list(members)))
        data = pa.npz([(f"{k}.npy", members[k]) for k in order], compression=compression)
        return Case(data, base, None, must_load=True, what=kind)

    if kind in ("dtype", "shape", "value"):
        f = draw(st.sampled_from(fields))
        a = arrays[f]
        if kind == "dtype":
            new = _cast(a, draw(st.sampled_from(_DTYPES)))
        elif kind == "shape":
            op = draw(st.sampled_from(["2d", "col", "cut", "grow", "scalar", "vector", "empty"]))
            flat = a.reshape(-1)
            new = {"2d": lambda: flat.reshape(1, -1), "col": lambda: flat.reshape(-1, 1),
                   "cut": lambda: flat[: max(flat.size - 1, 0)],
                   "grow": lambda: np.concatenate([flat, flat[:1]]),
                   "scalar": lambda: flat[0], "vector": lambda: flat[:1],
                   "empty": lambda: flat[:0]}[op]()
        elif a.dtype.kind == "U":
            new = None
        else:  # one element set to a special value, in the member's dtype if it holds it
            value = draw(st.sampled_from(_SPECIAL))
            new = a.copy() if _holds(a.dtype, value) else a.astype(np.float64)
            flat = new.reshape(-1)
            flat[draw(st.integers(0, max(flat.size - 1, 0)))] = value
        if new is None:
            return Case(b"", base, None, must_fail=True, what="skip")
        members[f] = pa.npy(np.asarray(new))
        return Case(pa.npz({f"{k}.npy": v for k, v in members.items()},
                           compression=compression), base, members, what=f"{kind} {f}")

    if kind == "header":
        f = draw(st.sampled_from(fields))
        raw = arrays[f].tobytes()
        n = arrays[f].size
        shape = draw(st.sampled_from([(), (0,), (1,), (n,), (max(n - 1, 0),), (n + 1,), (2**31,),
                                      (2**62,), (2**64,), (-1,), (2, max(n // 2, 1)), (n, 1),
                                      (True,), "bad", (1.5,), (n, -n)]))
        descr = draw(st.one_of(st.just(arrays[f].dtype.str), st.sampled_from(_DESCRS)))
        data_len = draw(st.sampled_from(["same", "short", "long"]))
        raw = {"same": raw, "short": raw[: len(raw) // 2], "long": raw + bytes(7)}[data_len]
        version = draw(st.sampled_from([(1, 0), (1, 0), (2, 0), (3, 0), (9, 9)]))
        fortran = draw(st.sampled_from([False, True, "yes"]))
        members[f] = pa.npy_forged(descr, shape, raw, fortran=fortran, version=version)
        if draw(st.integers(0, 9)) == 0:  # a header length far beyond the header
            members[f] = members[f][:8] + b"\xff\xff" + members[f][10:]
        return Case(pa.npz({f"{k}.npy": v for k, v in members.items()},
                           compression=compression), base, members, what=f"header {f}")

    if kind == "members":
        op = draw(st.sampled_from(["drop", "extra", "duplicate", "rename"]))
        f = draw(st.sampled_from(fields))
        entries = [(f"{k}.npy", v) for k, v in members.items()]
        if op == "drop":
            entries = [e for e in entries if e[0] != f"{f}.npy"]
            written = {k: v for k, v in members.items() if k != f}
            return Case(pa.npz(entries, compression=compression), base, written,
                        must_fail=f not in ("version", "energy", "v_min"), what=f"drop {f}")
        if op == "extra":
            name = draw(st.sampled_from(["calibration.npy", "v_fail", "x/", "V_FAIL.npy",
                                         "../v_fail.npy", "v_fail.npy/"]))
            entries.insert(draw(st.integers(0, len(entries))), (name, pa.npy(np.zeros(3))))
            return Case(pa.npz(entries, compression=compression), base, None, must_fail=True,
                        what=f"extra {name!r}")
        if op == "duplicate":
            other = members[f] if draw(st.booleans()) else pa.npy(np.zeros_like(arrays[f]))
            entries.insert(draw(st.integers(0, len(entries))), (f"{f}.npy", other))
            return Case(pa.npz(entries, compression=compression), base, None, must_fail=True,
                        what=f"duplicate {f}")
        new = draw(st.sampled_from([g for g in pa.FIELDS if g != f]))
        entries = [(f"{new}.npy" if n == f"{f}.npy" else n, v) for n, v in entries]
        if new in members:
            return Case(pa.npz(entries, compression=compression), base, None, must_fail=True,
                        what=f"rename {f} to existing {new}")
        written = {(new if k == f else k): v for k, v in members.items()}
        return Case(pa.npz(entries, compression=compression), base, written,
                    what=f"rename {f} {new}")

    data = bytearray(pa.npz({f"{k}.npy": v for k, v in members.items()},
                            compression=compression))
    if kind == "bytes":
        op = draw(st.sampled_from(["flip", "set", "truncate", "append", "insert", "delete"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            for _ in range(draw(st.integers(1, 4))):
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 16))]
        return Case(bytes(data), base, None, what=f"bytes {op}")

    if kind == "records":
        central = pa.central_entries(bytes(data))
        local = [i for i in range(len(data)) if data[i:i + 4] == b"PK\x03\x04"]
        eocd = bytes(data).rfind(b"PK\x05\x06")
        where = draw(st.sampled_from(["central", "local", "end"]))
        if where == "central":
            rec = draw(st.sampled_from(central))
            off, size = draw(st.sampled_from([(8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2),
                                              (30, 2), (32, 2), (34, 2), (42, 4)]))
        elif where == "local":
            rec = draw(st.sampled_from(local))
            off, size = draw(st.sampled_from([(6, 2), (8, 2), (14, 4), (18, 4), (22, 4),
                                              (26, 2), (28, 2)]))
        else:
            rec = eocd
            off, size = draw(st.sampled_from([(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]))
        old = int.from_bytes(data[rec + off:rec + off + size], "little")
        top = 2 ** (8 * size) - 1
        value = draw(st.sampled_from([0, 1, top, top - 1, (old + 1) & top, (old - 1) & top,
                                      (old * 1000) & top, 12, 14, 99]))
        data[rec + off:rec + off + size] = value.to_bytes(size, "little")
        return Case(bytes(data), base, None, what=f"records {where}+{off}={value}")

    if kind == "method":
        method = draw(st.sampled_from([zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]))
        return Case(pa.npz({f"{k}.npy": v for k, v in members.items()}, compression=method),
                    base, None, what=f"method {method}")

    junk = draw(st.sampled_from(["random", "empty", "npy", "text", "zip of junk", "gzip"]))
    data = {"random": lambda: draw(st.binary(max_size=512)), "empty": lambda: b"",
            "npy": lambda: members["v_fail"], "text": lambda: b"format,bnn_tol.profile\n",
            "zip of junk": lambda: pa.npz({f"{k}.npy": draw(st.binary(max_size=64))
                                           for k in fields}),
            "gzip": lambda: gzip.compress(bytes(data))}[junk]()
    return Case(data, base, None, must_fail=True, what=f"junk {junk}")


def _parse(member: bytes) -> np.ndarray:
    """The reference reading of a member as written (numpy, no pickle)."""
    return np.lib.format.read_array(io.BytesIO(member), allow_pickle=False)


def _is_what_was_written(p: chip.Profile, case: Case) -> None:
    if case.written is None:  # byte-level damage: only the original may come out
        written = {k: _parse(pa.npy(v)) for k, v in pa.members(case.base).items()}
    else:
        written = {k: _parse(v) for k, v in case.written.items()}
    assert set(written) <= set(pa.FIELDS), f"loaded despite members {sorted(written)}"
    for f, ref in written.items():
        assert ref.dtype.kind in _FIELD_KINDS[f] and ref.dtype.itemsize <= (
            400 if f == "format" else 8), f"loaded {f} of dtype {ref.dtype}"
        if ref.dtype.kind == "b":
            ref = ref.view(np.uint8)
        if f == "format":
            assert ref.shape == () and str(ref[()]) == chip.FORMAT
        elif f == "version":
            assert ref.shape == () and ref[()] == p.version
        elif f in ("rows", "cols", "n_arrays", "v_min"):
            assert ref.shape == () and ref[()] == getattr(p, f), f
        else:
            got = getattr(p, f)
            assert got.shape == ref.shape and np.array_equal(got, ref), f
    assert (p.energy is None) == ("energy" not in written)
    assert (p.v_min is None) == ("v_min" not in written)
    assert (p.voltages.dtype, p.v_fail.dtype) == (np.float64, np.float32)
    if p.version == 1:
        assert p.flip_to.dtype == np.uint8 and p.p01 is None and p.v_min is None
    else:
        assert p.flip_to is None and p.p01.dtype == p.p10.dtype == np.float32


def _check(case: Case, tmp_path) -> None:
    if case.what == "skip":
        return
    path = tmp_path / "fuzz.npz"
    path.write_bytes(case.data)
    tracemalloc.start()
    try:
        try:
            p = chip.load_profile(path)
        except BnnTolError as e:
            p, err = None, str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"{case.what}: {peak / 2**20:.1f} MiB traced"
    if p is None:
        assert err.strip() and "\n" not in err, err
        assert not case.must_load, f"{case.what}: refused a lossless encoding: {err}"
        return
    assert not case.must_fail, f"{case.what}: loaded"
    _is_what_was_written(p, case)


_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


@settings(max_examples=1000, **_SETTINGS)
@given(case=cases())
def test_fuzzed_profile_archives_load_exactly_or_fail_in_one_line(case, tmp_path):
    _check(case, tmp_path)


@pytest.mark.slow
@settings(max_examples=20_000, **{**_SETTINGS, "derandomize": False})
@given(case=cases())
def test_fuzzed_profile_archives_long(case, tmp_path):
    _check(case, tmp_path)


def test_the_fuzzer_reaches_loads_and_refusals(tmp_path):
    """The mutations are not all refused (or all accepted): each kind sometimes loads."""
    seen: dict[str, set[bool]] = {}

    @settings(max_examples=500, **_SETTINGS)
    @given(case=cases())
    def run(case):
        if case.what == "skip":
            return
        path = tmp_path / "f.npz"
        path.write_bytes(case.data)
        try:
            chip.load_profile(path)
            ok = True
        except BnnTolError:
            ok = False
        seen.setdefault(case.what.split()[0], set()).add(ok)

    run()
    for kind in ("lossless", "dtype", "value", "shape", "bytes", "records"):
        assert True in seen.get(kind, set()), (kind, seen)
    for kind in ("dtype", "value", "shape", "header", "bytes", "records", "junk", "extra",
                 "duplicate", "method"):
        assert False in seen.get(kind, set()), (kind, seen)
