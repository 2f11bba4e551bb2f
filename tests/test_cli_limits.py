"""Issue 20, items 15-18 of the writers and the CLI: inputs that ended in a traceback, an
out-of-memory kill or a silently ignored option now end in one ``Error:`` line, before any
work and without writing anything."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest
from click.testing import CliRunner

import bnn_tol
from bnn_tol import engines, models
from bnn_tol.cli import main
from bnn_tol.core import codec
from bnn_tol.engines import driver
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.interop import checkpoint


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(r, *needles: str) -> str:
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "m1"
    bnn_tol.save(models.build("fc", hidden=(8,), in_shape=(1, 8, 8), seed=0), d)
    return d


# -- item 15 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["--hidden", "1000000000"], ["memory"]),
    (["--hidden", "1000000,1000000"], ["memory"]),
    (["--model", "vgg3", "--fc-width", "1000000000"], ["memory"]),
    (["--seed", "99999999999999999999999"], ["--seed"]),
    (["--seed", "-1"], ["--seed"]),
])
def test_train_refuses_what_cannot_run_before_allocating(tmp_path, args, needles):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = tmp_path / "o"
    base = ["train", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", out]
    if "--hidden" not in args and "--model" not in args:
        base += ["--hidden", "4"]
    _one_line(_run(*base, *args), *needles)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 500
    assert not out.exists()


@pytest.mark.parametrize("edit,needle", [
    ({"format": "x"}, "format"),
    ({"format": None}, "format"),
    ({"format": 1.5}, "format"),
    ({"format": 99}, "newer"),
    ({"meta": "x"}, "meta"),
    ({"model": "fc"}, "model"),
    ({"model": {"name": 3, "kwargs": {}}}, "model"),
])
def test_a_malformed_checkpoint_config_is_one_line(tmp_path, ck, edit, needle):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes())
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match=needle):
        checkpoint.load(d)
    _one_line(_run("metrics", d, "--dataset", "digits", "--out", tmp_path / "m.csv"), needle)
    _one_line(_run("sweep", d, "--dataset", "digits", "--bers", "0", "--maps", "1"), needle)
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("name", ["x.json", "x", "x.csv", "x.PNGX"])
def test_plot_refuses_a_file_name_that_is_not_a_figure_format(tmp_path, ck, name):
    csv = tmp_path / "s.csv"
    assert _run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1", "--maps", "2",
                "--quiet", "--out", csv).exit_code == 0
    _one_line(_run("plot", "sweep", csv, "--out", tmp_path / name), ".png")
    assert sorted(os.listdir(tmp_path)) == ["s.csv", "s.csv.meta.json"]


def test_codec_make_of_a_bare_name_is_one_line():
    for spec in ("fixed", "nope", 5):
        with pytest.raises(InvalidArgument):
            codec.make(spec)
    assert codec.make("sign").config()["kind"] == "sign"


# -- item 17: counts are bounded before anything grows with them ---------------------------------


def test_sweep_with_a_billion_maps_is_refused_at_once(tmp_path, ck, digits):
    t = time.perf_counter()
    out = tmp_path / "s.csv"
    _one_line(_run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1", "--maps",
                   "1000000000", "--out", out), "--maps", str(driver.MAX_MAPS))
    assert time.perf_counter() - t < 20 and not out.exists()
    with pytest.raises(InvalidArgument, match="n_maps"):
        engines.sweep(bnn_tol.load(ck), digits, bers=[0.0], n_maps=10**9, progress=False)
    n = driver.MAX_MAPS
    with pytest.raises(InvalidArgument, match="rows"):  # maps x BERs x models
        engines.sweep(bnn_tol.load(ck), digits, bers=[i / 1000 for i in range(1000)],
                      n_maps=n, progress=False)


@pytest.mark.parametrize("over,needle", [
    ({"eval": {"n_maps": 10**9}}, "[eval] n_maps"),
    ({"train": {"seeds": list(range(20_000))}}, "tasks"),
    ({"run": {"workers": 10**6}}, "[run] workers"),
    ({"run": {"threads": 10**6}}, "[run] threads"),
    ({"train": {"epochs": 10**12}}, "[train] epochs"),
])
def test_study_counts_are_bounded_when_the_config_is_read(over, needle):
    from bnn_tol.study import runner

    with pytest.raises(InvalidArgument, match=needle.replace("[", r"\[").replace("]", r"\]")):
        runner.load_config("tiny", over)


@pytest.mark.parametrize("args", [["--threads", "1000000"], ["--batch-size", "0"]])
def test_train_counts_are_bounded(tmp_path, args):
    _one_line(_run("train", "--dataset", "digits", "--hidden", "4", "--epochs", "1", "--quiet",
                   "--out", tmp_path / "o", *args), args[0])


# -- item 18: misleading or ignored options ------------------------------------------------------


@pytest.mark.parametrize("arch", ["fc", "vgg3"])
def test_an_unknown_target_is_named(tmp_path, arch):
    d = tmp_path / arch
    kw = {"hidden": (8,)} if arch == "fc" else {"channels": ((4,), (4,)), "fc_width": 8}
    bnn_tol.save(models.build(arch, in_shape=(1, 8, 8), seed=0, **kw), d)
    _one_line(_run("sweep", d, "--dataset", "digits", "--bers", "0", "--maps", "1",
                   "--targets", "foo"), "unknown targets", "foo")


@pytest.mark.parametrize("args,needle", [
    (["--voltages", "0.9"], "--voltages"),
    (["--offsets", "0,64"], "--offsets"),
    (["--profile", "{p}", "--resume", "--out", "{o}"], "--resume"),
    (["--profile", "{p}", "--bers", "0,0.1", "--out", "{o}"], "--bers"),
    (["--profile", "{p}", "--maps", "3", "--out", "{o}"], "--maps"),
    (["--profile", "{p}", "--error", "stuck-at", "--out", "{o}"], "--error"),
])
def test_options_of_the_other_kind_of_sweep_are_refused_not_ignored(tmp_path, ck, args,
                                                                      needle):
    p = tmp_path / "p.npz"
    p.write_bytes(b"not read: refused before")
    args = [a.format(p=p, o=tmp_path / "o.csv") for a in args]
    _one_line(_run("sweep", ck, "--dataset", "digits", *args), needle)
    assert not (tmp_path / "o.csv").exists()


def test_the_cli_bounds_are_the_librarys():
    from bnn_tol import cli, train

    assert (cli._MAX_SEED, cli._MAX_THREADS, cli._MAX_MAPS) == (train.MAX_SEED, train.MAX_THREADS,
                                                             driver.MAX_MAPS)
