"""Sweep output files (issue 9): recognized before touched, settings recorded and compared on
resume, locked against a second writer, validated by every reader; argument validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import bnn_tol
from bnn_tol import data, evaluate, models, train
from bnn_tol.cli import _parse_bers
from bnn_tol.exceptions import BnnTolError, FileInUse, InvalidArgument, ResultsMismatch

KW = dict(bers=[0, 0.05], n_maps=2, seed=0, progress=False)


@pytest.fixture(scope="module")
def fc():
    m = models.build("fc", seed=0, hidden=(32,), in_shape=(1, 8, 8))
    train.fit(m, data.load("digits", "train").subset(400), epochs=1, batch_size=64,
              progress=False)
    return m.eval()


def _bytes(path) -> bytes:
    return Path(path).read_bytes()


def _cli_error(r) -> str:
    """The one-line message of a failed CLI call (library error or click usage error)."""
    assert r.exit_code != 0, r.output
    exc = r.exception
    if exc is not None and not isinstance(exc, SystemExit):  # the CLI prints it as one line
        assert isinstance(exc, BnnTolError), repr(exc)
    msg = r.output if exc is None or isinstance(exc, SystemExit) else str(exc)
    assert len(msg.strip().splitlines()) >= 1
    assert "Traceback" not in msg
    return msg


# -- 1. a file that is not ours is never modified ------------------------------------------------


@pytest.mark.parametrize("content", [b"my notes\nline two, no newline at the end",
                                     b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4])
def test_resume_never_modifies_a_file_it_does_not_recognize(fc, digits, tmp_path, content):
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    with pytest.raises(ResultsMismatch, match="not recognized"):
        evaluate.sweep(fc, digits, out=out, resume=True, **KW)
    assert _bytes(out) == content
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_torn_line_of_a_foreign_file_with_our_header_is_left_alone(fc, digits, tmp_path):
    """Our header but no sidecar: not ours either, so not even the torn tail is cut."""
    out = tmp_path / "s.csv"
    content = (",".join(evaluate.COLUMNS) + "\nfc,0,0,0,0,1,0.5").encode()
    out.write_bytes(content)
    with pytest.raises(ResultsMismatch, match="sidecar"):
        evaluate.sweep(fc, digits, out=out, resume=True, **KW)
    assert _bytes(out) == content


# -- 2. resume only into a file made with the same settings --------------------------------------


def test_sidecar_records_what_defines_the_sweep_and_provenance(fc, digits, tmp_path):
    out = tmp_path / "s.csv"
    evaluate.sweep({"a": fc}, digits.subset(300), out=out, layers=[1], **KW)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    s = meta["settings"]
    assert set(s["models"]) == {"a"} and len(s["models"]["a"]["digest"]) == 64
    assert s["dataset"]["name"] == "digits" and s["dataset"]["split"] == "test"
    assert s["dataset"]["n_samples"] == 300 and len(s["dataset"]["digest"]) == 64
    assert s["targets"] == ["weights"]
    assert s["models"]["a"]["layers"] == ["blocks.1.layer"]
    prov = meta["provenance"]
    for key in ("bnn_tol", "git_commit", "torch", "python", "cpu", "cpu_flags", "torch_threads"):
        assert key in prov


def test_resume_refuses_other_settings_and_names_the_difference(fc, digits, tmp_path):
    out = tmp_path / "s.csv"
    evaluate.sweep({"fc": fc}, digits.subset(100), out=out, **KW)
    before = _bytes(out)
    retrained = models.build("fc", seed=1, hidden=(32,), in_shape=(1, 8, 8)).eval()
    other_name = data.BNNDataset(digits.images, digits.labels, name="other", split="test")
    cases = [
        (dict(models={"fc": fc}, data=digits), "n_samples=100, now n_samples=360"),
        (dict(models={"fc": fc}, data=digits.subset(100), layers="hidden"), "layers"),
        (dict(models={"fc": fc}, data=digits.subset(100), targets=("activations",)), "targets"),
        (dict(models={"fc": fc}, data=other_name.subset(100)), "dataset"),
        (dict(models={"fc": retrained}, data=digits.subset(100)), "model 'fc'"),
    ]
    for kw, what in cases:
        with pytest.raises(ResultsMismatch, match=what) as ei:
            evaluate.sweep(kw.pop("models"), kw.pop("data"), out=out, resume=True, **kw, **KW)
        assert "another" in str(ei.value) and "\n" not in str(ei.value)
        assert _bytes(out) == before
    # the same settings (another engine and batch size: results are exact) resume fine
    df = evaluate.sweep({"fc": fc}, digits.subset(100), out=out, resume=True, engine="fp32",
                        batch_size=7, **KW)
    assert len(df) == 4 and _bytes(out) == before


def test_resume_adds_a_new_model_and_records_it(fc, digits, tmp_path):
    out = tmp_path / "s.csv"
    evaluate.sweep({"a": fc}, digits, out=out, **KW)
    df = evaluate.sweep({"a": fc, "b": fc}, digits, out=out, resume=True, **KW)
    assert len(df) == 8 and len(evaluate.read_sweep(out)) == 8
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert set(meta["settings"]["models"]) == {"a", "b"}


def test_cli_resume_with_another_subset_is_refused(fc, tmp_path):
    run = tmp_path / "fcrun"
    bnn_tol.save(fc, run)
    out = tmp_path / "sw.csv"
    base = ["sweep", str(run), "--dataset", "digits", "--bers", "0,0.05", "--maps", "2",
            "--out", str(out), "--quiet"]
    r = CliRunner().invoke(bnn_tol.cli.main, [*base, "--subset", "100"])
    assert r.exit_code == 0, r.output
    before = _bytes(out)
    msg = _cli_error(CliRunner().invoke(bnn_tol.cli.main, [*base, "--resume"]))
    assert "n_samples=100" in msg and _bytes(out) == before


# -- 3. one writer at a time; readers accept only valid files -----------------------------------

CHILD = """
import sys, time
from pathlib import Path
import bnn_tol
from bnn_tol import data, evaluate
release = Path(sys.argv[3])
calls = []
def slowed(orig):
    def slow(self, *a, **k):
        if calls:  # the first BER (or map, for map-major engines) is on disk: wait for go
            while not release.exists():
                time.sleep(0.05)
        calls.append(1)
        return orig(self, *a, **k)
    return slow
evaluate.Engine.accuracies = slowed(evaluate.Engine.accuracies)
evaluate.Engine.accuracies_of_map = slowed(evaluate.Engine.accuracies_of_map)
model = bnn_tol.load(sys.argv[1])
evaluate.sweep({"fcrun": model}, data.load("digits", "test"), bers=[0, 0.05], n_maps=2,
               seed=0, progress=False, out=sys.argv[2])
"""


def test_second_writer_process_gets_file_in_use_and_changes_nothing(fc, digits, tmp_path):
    run = tmp_path / "fcrun"
    bnn_tol.save(fc, run)
    out, release = tmp_path / "sw.csv", tmp_path / "go"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    first = subprocess.Popen([sys.executable, str(script), str(run), str(out), str(release)],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        before = _bytes(out)
        with pytest.raises(FileInUse, match="in use"):
            evaluate.sweep({"fcrun": fc}, digits, out=out, resume=True, **KW)
        second = subprocess.run(
            [sys.executable, "-m", "bnn_tol.cli", "sweep", str(run), "--dataset", "digits",
             "--bers", "0,0.05", "--maps", "2", "--out", str(out), "--resume", "--quiet"],
            capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        assert "in use" in second.stderr
        assert _bytes(out) == before
    finally:
        release.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    df = evaluate.read_sweep(out)
    ref = evaluate.sweep({"fcrun": fc}, digits, **KW)
    pd.testing.assert_frame_equal(df, ref)


def _valid_file(fc, digits, tmp_path) -> Path:
    out = tmp_path / "s.csv"
    evaluate.sweep({"fc": fc}, digits, out=out, **KW)
    return out


CORRUPTIONS = {
    "second header": lambda t: t + t.splitlines(keepends=True)[0],
    "duplicate": lambda t: t + t.splitlines(keepends=True)[1],
    "not numeric": lambda t: t.replace("\nfc,0,0,0,0,", "\nfc,zero,0,0,0,", 1),
    "header": lambda t: t.replace("accuracy", "acc", 1),
    "empty": lambda t: "",
    "torn": lambda t: t + "fc,0.05,0.05,0.05,1",
    "missing": lambda t: _blank_field(t, 2),
}


def _blank_field(text: str, k: int) -> str:
    """Empty field ``k`` of the last row."""
    lines = text.splitlines(keepends=True)
    fields = lines[-1].split(",")
    fields[k] = ""
    return "".join(lines[:-1]) + ",".join(fields)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_readers_refuse_a_hand_corrupted_file_with_one_line(fc, digits, tmp_path, kind):
    out = _valid_file(fc, digits, tmp_path)
    text = CORRUPTIONS[kind](out.read_text())
    assert text != out.read_text()
    out.write_text(text)
    with pytest.raises(ResultsMismatch) as ei:
        evaluate.read_sweep(out)
    assert str(out) in str(ei.value) and "\n" not in str(ei.value)
    if kind not in ("torn", "empty"):  # resume repairs a torn last line, starts an empty file
        with pytest.raises(ResultsMismatch):
            evaluate.sweep({"fc": fc}, digits, out=out, resume=True, **KW)
        assert out.read_text() == text
    msg = _cli_error(CliRunner().invoke(bnn_tol.cli.main, [
        "plot", "sweep", str(out), "--out", str(tmp_path / "p.png")]))
    assert str(out) in msg
    assert not (tmp_path / "p.png").exists()


def test_read_sweep_round_trips_a_sweep(fc, digits, tmp_path):
    out = _valid_file(fc, digits, tmp_path)
    df = evaluate.read_sweep(out)
    pd.testing.assert_frame_equal(df, evaluate.sweep({"fc": fc}, digits, **KW))


def test_plot_sweep_given_a_metrics_csv_says_so(tmp_path):
    csv = tmp_path / "metrics.csv"
    pd.DataFrame({"model": ["a"], "layer": ["x"], "neuron": [0], "mean_margin": [1.0]}).to_csv(
        csv, index=False)
    msg = _cli_error(CliRunner().invoke(bnn_tol.cli.main, [
        "plot", "sweep", str(csv), "--out", str(tmp_path / "p.png")]))
    assert "not a sweep CSV" in msg


@pytest.mark.parametrize("level", ["2", "nan", "0", "1", "-0.5"])
def test_plot_sweep_level_must_be_in_open_unit_interval(fc, digits, tmp_path, level):
    out = _valid_file(fc, digits, tmp_path)
    r = CliRunner().invoke(bnn_tol.cli.main, ["plot", "sweep", str(out), "--out",
                                              str(tmp_path / "p.png"), "--level", level])
    assert r.exit_code == 2 and "--level" in r.output


# -- 4. argument validation ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "8"])
def test_batch_size_must_be_a_positive_int(fc, digits, bad):
    with pytest.raises(InvalidArgument, match="batch_size"):
        evaluate.sweep(fc, digits, batch_size=bad, **KW)
    with pytest.raises(InvalidArgument, match="batch_size"):
        evaluate.accuracy(fc, digits, batch_size=bad)
    with pytest.raises(InvalidArgument, match="batch_size"):
        evaluate.predict(fc, digits, batch_size=bad)


@pytest.mark.parametrize("arg,bad", [("n_maps", 2.5), ("n_maps", True), ("n_maps", -1),
                                     ("seed", 1.5), ("seed", True), ("seed", "0"),
                                     ("seed", -1)])
def test_n_maps_and_seed_must_be_ints(fc, digits, arg, bad):
    kw = {**KW, arg: bad}
    with pytest.raises(InvalidArgument, match=arg):
        evaluate.sweep(fc, digits, **kw)


def test_cli_batch_size_zero_and_negative_are_refused(fc, tmp_path):
    run = tmp_path / "fcrun"
    bnn_tol.save(fc, run)
    for bs in ("0", "-1"):
        msg = _cli_error(CliRunner().invoke(bnn_tol.cli.main, [
            "sweep", str(run), "--dataset", "digits", "--bers", "0", "--maps", "1",
            "--batch-size", bs, "--quiet"]))
        assert "batch_size" in msg or "--batch-size" in msg


# -- 5. BER ranges, shapes, CLI combinations ----------------------------------------------------


def test_ber_range_never_passes_stop_and_keeps_stop_despite_rounding():
    assert _parse_bers("0:0.1:0.06") == [0.0, 0.06]
    grid = _parse_bers("0:0.1:0.01")
    assert len(grid) == 11 and grid[-1] == 0.1 and grid[3] == 0.03
    assert _parse_bers("0.1:0.1:0.05") == [0.1]
    assert _parse_bers("0:0.3:0.1") == [0.0, 0.1, 0.2, 0.3]
    assert all(b <= 0.3 for b in _parse_bers("0:0.3:0.07"))


@pytest.mark.parametrize("text", ["1e308:1e309:1", "0:1.5:0.5", "0:1:1e-9", "0.2:0.1:0.01",
                                  "0:inf:0.1", "nan", "0.1,1.2", "-0.1", "0.1/nan", "0:1:0",
                                  "0:0.1", "abc", ""])
def test_bad_ber_specs_are_refused(text):
    with pytest.raises(click.BadParameter):
        _parse_bers(text)


def test_cli_resume_without_out_is_refused(fc, tmp_path):
    run = tmp_path / "fcrun"
    bnn_tol.save(fc, run)
    r = CliRunner().invoke(bnn_tol.cli.main, ["sweep", str(run), "--dataset", "digits",
                                              "--bers", "0", "--maps", "1", "--resume"])
    assert r.exit_code == 2 and "--out" in r.output


def test_dataset_shape_must_match_the_model(fc, tmp_path):
    wrong = data.BNNDataset(torch.zeros(5, 1, 28, 28, dtype=torch.uint8),
                            torch.zeros(5, dtype=torch.int64), name="big")
    out = tmp_path / "s.csv"
    with pytest.raises(InvalidArgument, match=r"\(1, 28, 28\).*\(1, 8, 8\)"):
        evaluate.sweep(fc, wrong, out=out, **KW)
    assert not out.exists()



def test_a_map_major_engine_leaves_the_file_in_the_table_order(fc, digits, tmp_path):
    """The packed engine evaluates one map at all its BERs in a row and appends its rows per
    map; the finished file holds the returned table in its order (BERs as listed, unsorted
    here), rows of an earlier sweep into the file first, and equals the reference engine."""
    out = tmp_path / "s.csv"
    first = evaluate.sweep(fc, digits, bers=[0.2], n_maps=2, seed=1, progress=False, out=out,
                           engine="packed")
    kw = dict(bers=[0.05, 0, 0.1], n_maps=3, seed=1, progress=False)
    got = evaluate.sweep(fc, digits, out=out, resume=True, engine="packed", **kw)
    assert got["ber"].tolist() == [0.05] * 3 + [0.0] * 3 + [0.1] * 3
    on_disk = evaluate.read_sweep(out)
    pd.testing.assert_frame_equal(on_disk, pd.concat([first, got], ignore_index=True),
                                  check_dtype=False)
    ref = evaluate.sweep(fc, digits, engine="reference", **kw)
    assert got["accuracy"].tolist() == ref["accuracy"].tolist()
