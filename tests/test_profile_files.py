"""Profile files from hostile or careless hands (issue 20, items 7, 13, 15): sizes are checked
from the headers before anything is decompressed or allocated, values are checked before they
are cast, every failure is one line; valid profiles load exactly as before."""

from __future__ import annotations

import os
import tracemalloc
import zipfile
from pathlib import Path

import _profile_archives as pa
import numpy as np
import pytest
from click.testing import CliRunner

import bnn_tol
from bnn_tol import evaluate, models
from bnn_tol.cli import main
from bnn_tol.exceptions import BnnTolError, InvalidArgument
from bnn_tol.faults import chip

#: What a load of a small hostile archive may allocate (the archives are a few KB; anything
#: near a declared size of gigabytes would be far above).
MEMORY_BOUND = 16 * 2**20


@pytest.fixture(scope="module")
def small() -> chip.Profile:
    return chip.synthetic_profile(rows=4, cols=8, n_arrays=2, v_mean=0.85, seed=3)


def _write(tmp_path: Path, data: bytes, name: str = "p.npz") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refused(path: os.PathLike, match: str) -> str:
    """Load ``path``; it must fail with a one-line library error matching ``match``, within
    :data:`MEMORY_BOUND` of traced allocations."""
    tracemalloc.start()
    try:
        with pytest.raises(BnnTolError, match=match) as info:
            chip.load_profile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip(), msg
    assert peak < MEMORY_BOUND, f"loading allocated {peak / 2**20:.0f} MiB"
    return msg


def _same(a: chip.Profile, b: chip.Profile) -> None:
    assert (a.rows, a.cols, a.n_arrays) == (b.rows, b.cols, b.n_arrays)
    for f in ("voltages", "v_fail", "flip_to"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f
    assert (a.energy is None) == (b.energy is None)
    if a.energy is not None:
        assert np.array_equal(a.energy, b.energy)


# -- item 7: declared sizes are checked from the headers, before decompressing --------------


def test_a_member_declaring_2_31_elements_is_refused_from_its_header(tmp_path, small):
    arrays = pa.members(small)
    # a geometry that agrees with the declared size, so only the size limit can catch it
    arrays.update(rows=np.array(1024), cols=np.array(1024), n_arrays=np.array(2048))
    entries = {f"{k}.npy": pa.npy(v) for k, v in arrays.items()}
    # 2^31 float32 cells declared, 64 KiB of zeros supplied: numpy would allocate 8 GiB first
    entries["v_fail.npy"] = pa.npy_forged("<f4", (2**31,), bytes(2**16))
    path = _write(tmp_path, pa.npz(entries))
    msg = _refused(path, "v_fail")
    assert "2147483648" in msg and str(chip.MAX_CELLS) in msg


def test_the_size_limit_is_the_module_constant_and_checked_before_reading(tmp_path, small,
                                                                         monkeypatch):
    path = chip.save_profile(small, tmp_path / "p.npz")
    monkeypatch.setattr(chip, "MAX_CELLS", small.n_cells - 1)
    reads = []
    real = zipfile.ZipExtFile.read

    def spy(self, n=-1):
        reads.append(n)
        return real(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", spy)
    _refused(path, f"{small.n_cells}.*{small.n_cells - 1}")
    assert max(reads) < 1024  # headers only: no member's data was read
    monkeypatch.setattr(chip, "MAX_CELLS", small.n_cells)
    _same(chip.load_profile(path), small)


def test_a_forged_zip_size_or_header_length_is_refused_before_reading(tmp_path, small):
    arrays = pa.members(small)
    data = bytearray(pa.archive(arrays, compression=zipfile.ZIP_STORED))
    # the zip directory declares 3 GiB for v_fail.npy (its uncompressed size field)
    with zipfile.ZipFile(_write(tmp_path, bytes(data))) as zf:
        names = [i.filename for i in zf.infolist()]
    rec = pa.central_entries(bytes(data))[names.index("v_fail.npy")]
    data[rec + 24:rec + 28] = (3 * 2**30).to_bytes(4, "little")
    _refused(_write(tmp_path, bytes(data), "big.npz"), "v_fail")
    # an .npy header claiming to be 4 GiB long (format 2.0 lengths are 32-bit)
    entries = {f"{k}.npy": pa.npy(v) for k, v in arrays.items()}
    entries["flip_to.npy"] = b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{"
    _refused(_write(tmp_path, pa.npz(entries), "hdr.npz"), "flip_to")


def test_a_zip_with_a_huge_central_directory_is_refused_from_its_end_record(tmp_path, small):
    entries = [(f"{k}.npy", pa.npy(v)) for k, v in pa.members(small).items()]
    entries += [(f"x{i}", b"") for i in range(5000)]
    _refused(_write(tmp_path, pa.npz(entries)), "entries|members")


def test_other_compression_methods_are_refused(tmp_path, small):
    # bzip2 decompresses a whole 4 KiB read at once (gigabytes from a crafted stream)
    data = pa.archive(pa.members(small), compression=zipfile.ZIP_BZIP2)
    _refused(_write(tmp_path, data), "compression")


# -- item 15: a member failing its CRC, damaged archives --------------------------------------


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_member_failing_its_crc_is_one_line(tmp_path, small, compression):
    data = bytearray(pa.archive(pa.members(small), compression=compression))
    at = pa.member_data_offset(bytes(data), "v_fail.npy") + 140
    data[at] ^= 0x5A
    _refused(_write(tmp_path, bytes(data)), "v_fail")


@pytest.mark.parametrize("what", ["empty", "text", "npy", "truncated", "zip of text", "dir",
                                  "fifo", "missing"])
def test_what_is_not_a_profile_archive_is_one_line(tmp_path, small, what):
    good = pa.archive(pa.members(small))
    path = tmp_path / "p.npz"
    if what == "empty":
        path.write_bytes(b"")
    elif what == "text":
        path.write_text("voltages,rows\n1,2\n")
    elif what == "npy":
        path.write_bytes(pa.npy(small.v_fail))
    elif what == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif what == "zip of text":
        path.write_bytes(pa.npz({"voltages.npy": b"1.0, 0.9"}))
    elif what == "dir":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)  # must not block waiting for a writer
    _refused(path, "profile")


def test_object_members_are_refused_without_unpickling(tmp_path, small):
    ran = []

    class Evil:
        def __reduce__(self):
            return ran.append, ("unpickled",)

    arrays = pa.members(small)
    obj = np.empty(1, dtype=object)
    obj[0] = Evil()
    arrays["v_fail"] = obj
    _refused(_write(tmp_path, pa.archive(arrays)), "v_fail")
    assert not ran


def test_missing_unknown_and_duplicate_members_are_refused(tmp_path, small):
    arrays = pa.members(small)
    entries = [(f"{k}.npy", pa.npy(v)) for k, v in arrays.items() if k != "flip_to"]
    _refused(_write(tmp_path, pa.npz(entries), "a.npz"), "flip_to")
    entries = [(f"{k}.npy", pa.npy(v)) for k, v in arrays.items()]
    _refused(_write(tmp_path, pa.npz([*entries, ("calibration.npy", pa.npy(np.zeros(3)))]),
                    "b.npz"), "calibration")
    flipped = pa.npy(1 - arrays["flip_to"])
    _refused(_write(tmp_path, pa.npz([*entries, ("flip_to.npy", flipped)]), "c.npz"),
             "flip_to.*twice|duplicate")


# -- item 13: values are validated before they are cast ---------------------------------------


def _with(small, **changes) -> dict[str, np.ndarray]:
    arrays = pa.members(small)
    arrays.update({k: np.asarray(v) for k, v in changes.items()})
    return arrays


@pytest.mark.parametrize("field, value, match", [
    ("flip_to", lambda a: np.where(a["flip_to"] == 0, -256, 1), "flip_to.*0 or 1.*-256"),
    ("flip_to", lambda a: a["flip_to"] * 1.4, "flip_to.*0 or 1.*1.4"),
    ("flip_to", lambda a: a["flip_to"].astype(np.int64) + 256, "flip_to.*0 or 1"),
    ("rows", lambda a: np.array(64.7), "rows must be an integer, got 64.7"),
    ("rows", lambda a: np.array(True), "rows must hold integer.*boolean"),
    ("n_arrays", lambda a: np.array(2**64 - 1, np.uint64), "n_arrays|cells"),
    ("version", lambda a: np.array(1.5), "version"),
    ("v_fail", lambda a: a["v_fail"].astype(np.complex64) + 1j, "v_fail.*complex"),
    ("v_fail", lambda a: a["v_fail"].astype(np.complex64), "v_fail.*complex"),
    ("v_fail", lambda a: a["v_fail"].astype(np.float64) + 1e-9, "v_fail.*float32"),
    ("v_fail", lambda a: np.full_like(a["v_fail"], np.nan), "v_fail.*NaN"),
    ("v_fail", lambda a: np.full(a["v_fail"].size, 1e300), "v_fail.*float32"),
    ("v_fail", lambda a: a["v_fail"].astype("U8"), "v_fail"),
    ("voltages", lambda a: a["voltages"].astype(np.complex128), "voltages.*complex"),
    ("voltages", lambda a: -a["voltages"][::-1], "voltages.*> 0"),
    ("voltages", lambda a: np.array([1.0, np.nan]), "voltages"),
    ("voltages", lambda a: np.array([2**53 + 1, 2**53 - 1], np.int64), "voltages.*float64"),
    ("voltages", lambda a: a["voltages"].astype(bool), "voltages"),
    ("energy", lambda a: a["voltages"].astype(np.complex128) ** 2, "energy.*complex"),
    ("format", lambda a: np.array(b"bnn_tol.profile"), "format|not a bnn_tol profile"),
])
def test_values_are_validated_before_they_are_cast(tmp_path, small, field, value, match):
    arrays = pa.members(small)
    arrays[field] = np.asarray(value(arrays))
    _refused(_write(tmp_path, pa.archive(arrays)), match)


@pytest.mark.parametrize("field, value", [
    ("rows", lambda a: a["rows"].astype(np.int16)),
    ("cols", lambda a: a["cols"].astype(np.uint8)),
    ("n_arrays", lambda a: np.array(2.0)),  # an integral number, as require_int takes it
    ("flip_to", lambda a: a["flip_to"].astype(bool)),
    ("flip_to", lambda a: a["flip_to"].astype(">i8")),
    ("v_fail", lambda a: a["v_fail"].astype(np.float64)),  # float32 values, exactly
    ("v_fail", lambda a: a["v_fail"].astype(">f4")),
    ("voltages", lambda a: a["voltages"].astype(">f8")),
])
def test_lossless_encodings_load_the_same_profile(tmp_path, small, field, value):
    arrays = pa.members(small)
    arrays[field] = np.asarray(value(arrays))
    _same(chip.load_profile(_write(tmp_path, pa.archive(arrays))), small)


def test_valid_profiles_round_trip_exactly(tmp_path, small):
    for p in (small, chip.Profile(small.voltages, small.rows, small.cols, small.n_arrays,
                                  small.v_fail, small.flip_to, small.voltages ** 2)):
        _same(chip.load_profile(chip.save_profile(p, tmp_path / "p.npz")), p)
        for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # savez, savez_compressed
            data = pa.archive(pa.members(p), compression=compression)
            _same(chip.load_profile(_write(tmp_path, data, "q.npz")), p)


def test_the_profile_constructor_checks_kinds_values_and_limits(small):
    args = dict(voltages=small.voltages, rows=small.rows, cols=small.cols,
                n_arrays=small.n_arrays, v_fail=small.v_fail, flip_to=small.flip_to)
    for change, match in ((dict(v_fail=small.v_fail + 1j), "v_fail.*complex"),
                          (dict(flip_to=small.flip_to * 1.4), "flip_to"),
                          (dict(rows=4.5), "rows"),
                          (dict(voltages=small.voltages - 10), "> 0"),
                          (dict(voltages=list(small.voltages)), None)):
        if match is None:
            assert np.array_equal(chip.Profile(**{**args, **change}).voltages, small.voltages)
        else:
            with pytest.raises(InvalidArgument, match=match):
                chip.Profile(**{**args, **change})


def test_save_refuses_a_profile_it_could_not_store_exactly(tmp_path, small):
    p = chip.Profile(small.voltages, small.rows, small.cols, small.n_arrays,
                     small.v_fail.astype(np.float64) + 1e-9, small.flip_to)
    with pytest.raises(InvalidArgument, match="v_fail.*float32"):
        chip.save_profile(p, tmp_path / "p.npz")
    assert not list(tmp_path.iterdir())


# -- item 15: profile synth ----------------------------------------------------------------


def test_synth_refuses_a_chip_over_the_limit_before_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match=r"1000000000000 cells.*67108864") as info:
            chip.synthetic_profile(rows=100_000, cols=100_000, n_arrays=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND and "\n" not in str(info.value)
    r = CliRunner().invoke(main, ["profile", "synth", "--out", "never.npz", "--rows", "100000",
                                  "--cols", "100000", "--arrays", "100"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "1000000000000 cells" in lines[0], r.output
    assert not Path("never.npz").exists()


def test_synth_into_a_missing_directory_is_one_line(tmp_path, small):
    out = tmp_path / "nonexistent" / "p.npz"
    r = CliRunner().invoke(main, ["profile", "synth", "--out", str(out), "--rows", "4",
                                  "--cols", "4", "--arrays", "1"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), r.output
    assert "nonexistent" in lines[0] and not out.parent.exists()
    with pytest.raises(InvalidArgument, match="nonexistent"):
        chip.save_profile(small, out)


def test_save_is_atomic(tmp_path, small, monkeypatch):
    path = chip.save_profile(small, tmp_path / "p.npz")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(BnnTolError, match="No space left on device"):
        chip.save_profile(chip.synthetic_profile(rows=2, cols=2, n_arrays=1), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.npz"]


# -- item 13 / 15: sweep --profile voltages and offsets -------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("run")
    model = models.build("fc", hidden=(16,), in_shape=(1, 8, 8), n_classes=10)
    bnn_tol.save(model, d / "m")
    chip.save_profile(chip.synthetic_profile(rows=16, cols=16, n_arrays=2, v_mean=0.85),
                      d / "chip.npz")
    return d / "m", d / "chip.npz"


@pytest.mark.parametrize("option, value, match", [
    ("--voltages", "nan", "voltage.*nan"),
    ("--voltages", "0.9,inf", "voltage.*inf"),
    ("--voltages", "-0.9", "voltage.*> 0"),
    ("--offsets", "1e24", "offsets"),
    ("--offsets", str(10**24), "offset.*9223372036854775807"),
    ("--offsets", "-1", "offset"),
])
def test_sweep_profile_refuses_bad_voltages_and_offsets(run, tmp_path, option, value, match):
    m, p = run
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(main, ["sweep", str(m), "--dataset", "digits", "--profile", str(p),
                                  option, value, "--out", str(out), "--quiet"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), r.output
    assert __import__("re").search(match, lines[0]), lines[0]
    assert not out.exists()


def test_library_refuses_voltages_that_are_not_positive_finite_numbers(small, fc, digits):
    for v in (float("nan"), float("inf"), -1.0, 0.0, "0.9", True, 1 + 0j):
        if v != float("inf"):  # +inf: no cell fails there (rate 0), NaN would say the same
            with pytest.raises(InvalidArgument, match="voltage"):
                chip.voltage_rate(small, v)
        with pytest.raises(InvalidArgument, match="voltage"):
            evaluate.profile_sweep(fc, digits, small, voltages=[v], progress=False)
    assert chip.voltage_rate(small, float("inf")) == 0.0
    with pytest.raises(InvalidArgument, match="offset"):
        evaluate.profile_sweep(fc, digits, small, voltages=[0.9], offsets=[2**63],
                               progress=False)


def test_placements_are_taken_modulo_the_chip(small):
    n = small.n_cells
    for off in (0, 5, n + 5, 2**63 - 1, 2**80):
        assert np.array_equal(chip.cells(3 * n, small, off), chip.cells(3 * n, small, off % n))


def test_save_replaces_a_profile_but_never_a_foreign_file(tmp_path, small):
    path = chip.save_profile(small, tmp_path / "p.npz")
    other = chip.synthetic_profile(rows=2, cols=2, n_arrays=1)
    _same(chip.load_profile(chip.save_profile(other, path)), other)  # ours: replaced
    foreign = tmp_path / "notes.npz"
    foreign.write_bytes(b"my notes")
    with pytest.raises(BnnTolError, match="notes.npz"):
        chip.save_profile(small, foreign)
    assert foreign.read_bytes() == b"my notes"
    plain = tmp_path / "arrays.npz"
    np.savez(plain, a=np.arange(3))  # an npz, but not a profile
    before = plain.read_bytes()
    with pytest.raises(BnnTolError):
        chip.save_profile(small, plain)
    assert plain.read_bytes() == before
