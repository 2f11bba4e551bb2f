"""The one home of safe writes (bnn_tol.files): whole files and whole directories replace the
previous ones only when complete."""

from __future__ import annotations

import os

import pytest

from bnn_tol.files import atomic_dir, atomic_write, write_text


def test_atomic_write_replaces_only_a_complete_file(tmp_path):
    f = tmp_path / "t.txt"
    write_text(f, "old")
    with pytest.raises(RuntimeError):
        atomic_write(f, lambda p: (open(p, "w").write("half"), _fail()))
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]
    write_text(f, "new", fsync=True)
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
