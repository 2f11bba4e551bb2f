"""Export loses nothing (issue 20, items 2 and 4): a bundle is written as a unit (a failing
export leaves the previous bundle or none, never half of one; --overwrite leaves no stale
file), only our own bundles are replaced, and ``--onnx`` never writes over the checkpoint it
reads, into the bundle, or over a file that is not an ONNX graph of ours."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _bundle_helpers import IMAGES
from _helpers import small_bnn
from click.testing import CliRunner

import bnn_tol
from bnn_tol import deploy
from bnn_tol.cli import main
from bnn_tol.exceptions import BnnTolError

FC = ("fc", {"hidden": (70, 30)})
VGG = ("vgg3", {"channels": ((8,), (6,)), "fc_width": 20})


def tree(d: Path) -> dict[str, str]:
    """Every file under ``d`` (relative name -> sha256 of its bytes; links as links)."""
    out = {}
    for p in sorted(Path(d).rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = f"-> {p.readlink()}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def cli(*args) -> tuple[int, list[str]]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.output.splitlines() if ln.strip()]


def one_line_error(code: int, lines: list[str], match: str = "") -> str:
    assert code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), (code, lines)
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two checkpoints: fc (3 layers) and vgg3 (4 layers: layer3_* exist only in its bundle)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (arch, kw) in {"fc": FC, "vgg3": VGG}.items():
        bnn_tol.save(small_bnn(arch, kw), root / name)
        out[name] = root / name
    return out


@pytest.fixture
def ws(tmp_path, runs):
    """A workspace: a copy of both checkpoints in ``tmp_path``."""
    for name, src in runs.items():
        shutil.copytree(src, tmp_path / name)
    return tmp_path


# --- item 4: a bundle is written as a unit ------------------------------------------------

def _fail_on_call(monkeypatch, target: str, n: int) -> None:
    """Make the ``n``-th call of ``target`` (module:attribute) raise ENOSPC: a full disk."""
    import importlib

    mod_name, attr = target.split(":")
    mod = importlib.import_module(mod_name)
    real = getattr(mod, attr)
    calls = {"n": 0}

    def fail(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(mod, attr, fail)


@pytest.mark.parametrize("where", ["numpy:save", "shutil:copyfile", "json:dumps",
                                   "tempfile:mkdtemp"])
def test_a_failing_export_leaves_the_previous_bundle_intact(ws, monkeypatch, where):
    assert cli("export", ws / "vgg3", "--out", ws / "E")[0] == 0
    before, listing = tree(ws / "E"), sorted(p.name for p in ws.iterdir())
    _fail_on_call(monkeypatch, where, 3 if where == "numpy:save" else 1)
    code, lines = cli("export", ws / "fc", "--out", ws / "E", "--overwrite")
    one_line_error(code, lines, "no space left")
    assert tree(ws / "E") == before  # the previous bundle, byte for byte
    assert sorted(p.name for p in ws.iterdir()) == listing  # no half bundle, no temp dir left


def test_a_failing_export_into_a_new_directory_leaves_nothing(ws, monkeypatch):
    listing = sorted(p.name for p in ws.iterdir())
    _fail_on_call(monkeypatch, "numpy:save", 2)
    with pytest.raises(OSError, match="No space left") as e:
        bnn_tol.export(bnn_tol.load(ws / "fc"), ws / "E")
    assert isinstance(e.value, BnnTolError)
    assert sorted(p.name for p in ws.iterdir()) == listing


def test_a_bundle_deploy_would_refuse_is_never_installed(ws, monkeypatch):
    """export reads its bundle back with deploy before renaming it into place; a refusal
    (a bug) is one line and leaves the previous bundle."""
    assert cli("export", ws / "vgg3", "--out", ws / "E")[0] == 0
    before = tree(ws / "E")

    def refuse(path):
        raise deploy.DeployError("layer1: fan_in 60 but its input has 70 values\n(simulated)")

    monkeypatch.setattr(deploy, "load_bundle", refuse)
    one_line_error(*cli("export", ws / "fc", "--out", ws / "E", "--overwrite"), "deploy refuses")
    assert tree(ws / "E") == before


def test_overwrite_leaves_no_stale_file_of_the_old_bundle(ws):
    assert cli("export", ws / "vgg3", "--out", ws / "E")[0] == 0
    assert (ws / "E" / "layer3_weights.npy").exists()
    assert cli("export", ws / "fc", "--out", ws / "E", "--overwrite")[0] == 0
    names = {p.name for p in (ws / "E").iterdir()}
    man = json.loads((ws / "E" / "manifest.json").read_text())
    assert names == set(man["sha256"]) | {"manifest.json"}
    assert "layer3_weights.npy" not in names
    assert deploy.predict(ws / "E", IMAGES).shape == (64,)


def test_a_half_bundle_of_an_older_release_is_replaced_with_overwrite(ws):
    assert cli("export", ws / "vgg3", "--out", ws / "E")[0] == 0
    (ws / "E" / "manifest.json").unlink()  # what an interrupted export used to leave
    (ws / "E" / "layer2_t.npy").unlink()
    one_line_error(*cli("export", ws / "fc", "--out", ws / "E"), "--overwrite")
    assert cli("export", ws / "fc", "--out", ws / "E", "--overwrite")[0] == 0
    assert not (ws / "E" / "layer3_weights.npy").exists()
    assert deploy.predict(ws / "E", IMAGES).shape == (64,)


@pytest.mark.parametrize("foreign", ["notes.txt", "sub/", "layer1_t.npy.orig", ".hidden",
                                     "link->manifest.json"])
def test_a_bundle_holding_foreign_files_is_never_replaced(ws, foreign):
    assert cli("export", ws / "fc", "--out", ws / "E")[0] == 0
    if foreign.endswith("/"):
        (ws / "E" / foreign).mkdir()
        (ws / "E" / foreign / "keep.txt").write_text("keep")
    elif "->" in foreign:
        name, target = foreign.split("->")
        (ws / "E" / name).symlink_to(target)
    else:
        (ws / "E" / foreign).write_text("keep")
    before = tree(ws / "E")
    one_line_error(*cli("export", ws / "fc", "--out", ws / "E", "--overwrite"),
                   foreign.split("->")[0].rstrip("/"))
    assert tree(ws / "E") == before


def test_foreign_or_unreadable_directories_are_refused_with_one_line(ws):
    (ws / "D").mkdir()
    (ws / "D" / "notes.txt").write_text("keep")
    one_line_error(*cli("export", ws / "fc", "--out", ws / "D", "--overwrite"),
                   "not a bnn_tol export")
    assert (ws / "D" / "notes.txt").read_text() == "keep"
    for text in ("{not json", "[]", '{"format": "other"}', '"x"'):
        (ws / "M").mkdir(exist_ok=True)
        (ws / "M" / "manifest.json").write_text(text)
        one_line_error(*cli("export", ws / "fc", "--out", ws / "M", "--overwrite"),
                       "not a bnn_tol export")
        assert (ws / "M" / "manifest.json").read_text() == text
    shutil.rmtree(ws / "M")
    (ws / "M").mkdir()
    (ws / "M" / "manifest.json").mkdir()
    one_line_error(*cli("export", ws / "fc", "--out", ws / "M", "--overwrite"))
    (ws / "F").write_text("a file")
    one_line_error(*cli("export", ws / "fc", "--out", ws / "F"))
    assert (ws / "F").read_text() == "a file"


def test_an_out_that_is_a_link_or_holds_the_checkpoint_is_refused(ws):
    assert cli("export", ws / "fc", "--out", ws / "E")[0] == 0
    (ws / "L").symlink_to(ws / "E")
    before = tree(ws / "E")
    one_line_error(*cli("export", ws / "fc", "--out", ws / "L", "--overwrite"), "link")
    assert tree(ws / "E") == before and (ws / "L").is_symlink()
    before = tree(ws / "fc")
    one_line_error(*cli("export", ws / "fc", "--out", ws / "fc", "--overwrite"))
    assert tree(ws / "fc") == before


def test_an_empty_directory_and_a_new_one_are_written(ws):
    (ws / "empty").mkdir()
    assert cli("export", ws / "fc", "--out", ws / "empty")[0] == 0
    assert cli("export", ws / "fc", "--out", ws / "a" / "b")[0] == 0
    for d in (ws / "empty", ws / "a" / "b"):
        assert deploy.predict(d, IMAGES).shape == (64,)


def test_export_refuses_bad_class_names_before_writing(ws):
    model = bnn_tol.load(ws / "fc")
    with pytest.raises(ValueError, match="class names"):
        bnn_tol.export(model, ws / "E", class_names=["a", "b"])
    assert not (ws / "E").exists()


# --- item 2: --onnx never writes over what the command reads, nor into the bundle ---------

@pytest.fixture
def onnx_ok():
    pytest.importorskip("onnx")


@pytest.mark.parametrize("target", ["fc/config.json", "fc/model.safetensors",
                                    "E/layer0_weights.npy", "E/manifest.json",
                                    "E/bnn_deploy.py", "E/new.onnx", "link.onnx"])
def test_onnx_never_writes_over_the_checkpoint_or_into_the_bundle(ws, onnx_ok, target):
    assert cli("export", ws / "fc", "--out", ws / "E")[0] == 0
    (ws / "link.onnx").symlink_to(ws / "fc" / "config.json")
    before = tree(ws)
    for extra in ([], ["--overwrite"]):
        code, lines = cli("export", ws / "fc", "--out", ws / "E", "--onnx", ws / target, *extra)
        one_line_error(code, lines, "--onnx")
        assert tree(ws) == before  # nothing written: checked before the bundle is touched
    assert deploy.predict(ws / "E", IMAGES).shape == (64,)


def test_onnx_into_a_new_bundle_directory_is_refused(ws, onnx_ok):
    code, lines = cli("export", ws / "fc", "--out", ws / "E", "--onnx", ws / "E" / "m.onnx")
    one_line_error(code, lines, "--onnx")
    assert not (ws / "E").exists()


def test_onnx_replaces_only_an_onnx_graph_of_ours_and_only_with_overwrite(ws, onnx_ok):
    assert cli("export", ws / "fc", "--out", ws / "E", "--onnx", ws / "m.onnx")[0] == 0
    first = (ws / "m.onnx").read_bytes()
    assert first[0] == 8 and b"bnn_tol" in first[:16]
    one_line_error(*cli("export", ws / "vgg3", "--out", ws / "E2", "--onnx", ws / "m.onnx"),
                   "--overwrite")
    assert not (ws / "E2").exists()
    assert cli("export", ws / "vgg3", "--out", ws / "E2", "--onnx", ws / "m.onnx",
               "--overwrite")[0] == 0
    assert (ws / "m.onnx").read_bytes() != first
    for foreign in (b"my notes", b"", b"\x08\x07\x12\x05other"):
        (ws / "x.onnx").write_bytes(foreign)
        one_line_error(*cli("export", ws / "fc", "--out", ws / "E3", "--onnx", ws / "x.onnx",
                            "--overwrite"), "not an ONNX graph written by bnn_tol")
        assert (ws / "x.onnx").read_bytes() == foreign and not (ws / "E3").exists()


def test_a_failing_onnx_write_leaves_no_torn_onnx_file(ws, onnx_ok, monkeypatch):
    assert cli("export", ws / "fc", "--out", ws / "E", "--onnx", ws / "m.onnx")[0] == 0
    first = (ws / "m.onnx").read_bytes()
    _fail_on_call(monkeypatch, "onnx:save", 1)
    code, lines = cli("export", ws / "vgg3", "--out", ws / "E", "--onnx", ws / "m.onnx",
                      "--overwrite")
    one_line_error(code, lines, "no space left")
    assert (ws / "m.onnx").read_bytes() == first
    assert not [p for p in ws.iterdir() if p.name.startswith(".")]


def test_the_exported_bundle_predicts_as_before(ws):
    model = bnn_tol.load(ws / "vgg3")
    b = bnn_tol.export(model, ws / "E")
    again = bnn_tol.export(model, ws / "E", overwrite=True)
    assert again == b
    assert np.array_equal(deploy.predict(b, IMAGES), deploy.predict(again, IMAGES))
