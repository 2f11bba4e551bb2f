"""`bnn-tol demo` writes only into its own directory."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bnn_tol.cli import main
from bnn_tol.exceptions import InvalidArgument, ResultsMismatch
from bnn_tol.study import demo


def test_demo_refuses_a_foreign_non_empty_directory_and_leaves_it_unchanged(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"my notes\n")
    with pytest.raises(ResultsMismatch, match="not written by `bnn-tol demo`"):
        demo.run(tmp_path, study=None)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_bytes() == b"my notes\n"
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert res.output.count("Error:") == 1


def test_demo_claims_an_empty_directory_and_accepts_its_own_again(tmp_path, monkeypatch):
    out = tmp_path / "d"

    def stop(*a, **k):
        raise RuntimeError("stop after the directory check")

    monkeypatch.setattr(demo.train, "fit", stop)
    for _ in range(2):  # the second run finds its own marker
        with pytest.raises(RuntimeError, match="stop after"):
            demo.run(out, study=None, dataset="digits")
        assert (out / demo.MARKER).is_file()


@pytest.mark.parametrize("args,needle", [
    (["--study", "nope"], "'nope' is neither a study file nor a preset"),
    (["--epochs", "0"], "--epochs"),
    (["--maps", "0"], "--maps"),
    (["--maps", "1000000000"], "--maps"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
])
def test_demo_validates_everything_before_training(tmp_path, monkeypatch, args, needle):
    def no_training(*a, **k):
        raise AssertionError("trained before validating")

    monkeypatch.setattr(demo.train, "fit", no_training)
    out = tmp_path / "d"
    res = CliRunner().invoke(main, ["demo", "--dataset", "digits", "--out", str(out), *args])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], res.stderr
    assert not out.exists()
    with pytest.raises(InvalidArgument):
        demo.run(out, epochs=0, study=None)
