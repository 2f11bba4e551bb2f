"""The one home of safe writes (bnn_tol.files): whole files and whole directories replace the
previous ones only when complete."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bnn_tol.exceptions import BnnTolError, FileInUse, OutputError, ResultsMismatch
from bnn_tol.files import (
    atomic_dir,
    atomic_write,
    check_output,
    claim_dir,
    locked,
    sniff,
    starts_with,
    write_text,
)


def test_atomic_write_replaces_only_a_complete_file(tmp_path):
    f = tmp_path / "t.txt"
    write_text(f, "old")
    with pytest.raises(RuntimeError):
        atomic_write(f, lambda p: (open(p, "w").write("half"), _fail()), replace=True)
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]
    write_text(f, "new", fsync=True, replace=True)
    assert f.read_text() == "new" and oct(f.stat().st_mode & 0o777) == "0o644"


def test_atomic_dir_replaces_the_whole_directory_or_nothing(tmp_path):
    out = tmp_path / "bundle"
    with atomic_dir(out) as d:
        (d / "a.npy").write_text("1")
        (d / "stale.npy").write_text("old file of the previous bundle")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "a.npy").write_text("2")
            _fail()  # e.g. disk full half way
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "stale.npy"]
    assert (out / "a.npy").read_text() == "1"
    with atomic_dir(out) as d:
        (d / "a.npy").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["a.npy"]  # nothing stale survives
    assert (out / "a.npy").read_text() == "3"
    assert os.listdir(tmp_path) == ["bundle"]  # no temporary directory left behind


def _fail():
    raise RuntimeError("interrupted")


# -- the one output check: inputs, foreign files, special files ---------------------------------


def test_an_input_is_never_an_output_by_any_name(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(ck / "config.json")
    os.link(ck / "config.json", tmp_path / "hard.json")
    for out in (ck / "config.json", tmp_path / "link.json", tmp_path / "hard.json",
                tmp_path / "ck" / ".." / "ck" / "config.json"):
        for replace in (False, True):  # not even with --overwrite
            with pytest.raises(ResultsMismatch, match="input of this command"):
                check_output(out, inputs=[ck], replace=replace)
    with pytest.raises(ResultsMismatch, match="input"):
        write_text(tmp_path / "link.json", "x", inputs=[ck / "config.json"], replace=True)
    assert (ck / "config.json").read_text() == "{}"
    check_output(ck / "new.csv", inputs=[ck])  # a new file beside the inputs is fine


def test_existing_files_are_replaced_only_when_allowed_or_recognized(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("their,header\n1,2\n")
    with pytest.raises(ResultsMismatch, match="exists.*--overwrite"):
        write_text(f, "a,b\n")
    ours = starts_with("a,b")
    with pytest.raises(ResultsMismatch, match="not written by bnn_tol.*--overwrite"):
        write_text(f, "a,b\n", replace=ours)
    assert f.read_text() == "their,header\n1,2\n"
    write_text(f, "a,b\n", replace=True)  # --overwrite
    write_text(f, "a,b\n1,2\n", replace=ours)  # now ours
    assert f.read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("kind", ["dir", "fifo", "device", "below-a-file"])
def test_directories_special_files_and_paths_below_files_are_refused(tmp_path, kind):
    p = tmp_path / "out"
    if kind == "dir":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "device":
        p = tmp_path / "null"
        p.symlink_to("/dev/null")
    else:
        (tmp_path / "f").write_text("x")
        p = tmp_path / "f" / "out.csv"
    with pytest.raises(ResultsMismatch):
        write_text(p, "x", replace=True)
    assert os.path.exists("/dev/null") and not Path("/dev/null").is_file()


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EACCES])
def test_a_failing_write_is_an_output_error_and_keeps_the_old_file(tmp_path, monkeypatch, err):
    f = tmp_path / "t.txt"
    write_text(f, "old")

    def full(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=f"cannot write {f}: {os.strerror(err)}") as e:
        write_text(f, "new", replace=True)
    assert isinstance(e.value, OSError) and isinstance(e.value, BnnTolError)
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]
    with pytest.raises(OutputError):
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    assert os.listdir(tmp_path) == ["t.txt"]


def test_claim_dir_takes_new_empty_or_marked_directories_only(tmp_path):
    d = tmp_path / "d"
    claim_dir(d, ".mine", note="mine\n", what="test")
    (d / "result.csv").write_text("x")
    claim_dir(d, ".mine", note="mine\n", what="test")  # its own again
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ResultsMismatch, match="not written by test"):
        claim_dir(other, ".mine", note="", what="test")
    assert os.listdir(other) == ["notes.txt"]
    claim_dir(other, ".mine", note="", what="test", recognize=lambda p: True)
    with pytest.raises(ResultsMismatch, match="not a directory"):
        claim_dir(d / "result.csv", ".mine", note="", what="test")


def test_a_second_holder_of_a_lock_is_refused(tmp_path):
    with locked(tmp_path / ".lock", what="the study"):
        with pytest.raises(FileInUse, match="the study is in use"):
            with locked(tmp_path / ".lock", what="the study"):
                pass
    with locked(tmp_path / ".lock", what="the study"):  # released
        pass


def test_sniff_reads_the_head_and_the_tail(tmp_path):
    f = tmp_path / "f.pdf"
    f.write_bytes(b"%PDF" + b"x" * 100_000 + b"/Producer (Matplotlib)")
    assert sniff(f, b"Matplotlib") and not sniff(f, b"Inkscape")
    assert not sniff(tmp_path / "missing", b"x")


def test_a_claim_that_cannot_write_its_marker_leaves_nothing(tmp_path, monkeypatch):
    import builtins

    real = builtins.open

    def full(file, mode="r", *a, **k):
        if str(file).endswith(".mine") and "a" in mode:
            fh = real(file, mode, *a, **k)
            fh.close()  # created, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(OutputError, match="No space left"):
        claim_dir(tmp_path / "d", ".mine", note="mine\n", what="test")
    assert os.listdir(tmp_path) == []
