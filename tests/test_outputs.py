"""Issue 20, the writers: no command writes over its own inputs, over a file it did not create
(without ``--overwrite``), or into a directory another process is writing; every case ends in
one ``Error:`` line and leaves every file as it was."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import bnn_tol
from bnn_tol import models
from bnn_tol.cli import main
from bnn_tol.study import runner as study

TINY = {"train": {"seeds": [0], "bers": [0.0, 0.1], "epochs": 1},
        "eval": {"bers": [0.0, 0.1], "n_maps": 1}}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(r, *needles: str) -> str:
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = _text_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _text_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` without tqdm's progress bars (the demo trains with them)."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and "%|" not in ln and not ln.strip().startswith("\x1b")]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes (symlinks by their target)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = (f"-> {os.readlink(p)}" if p.is_symlink() else
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "m1"
    bnn_tol.save(models.build("fc", hidden=(8,), in_shape=(1, 8, 8), seed=0), d)
    return d


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "S"
    study.run("tiny", out, overrides=TINY, echo=None)
    return out


# -- item 3: a command never writes over its inputs -----------------------------------------------


@pytest.mark.parametrize("args", [
    ["--out", "{ck}/config.json"],
    ["--out", "{ck}/model.safetensors"],
    ["--out", "{tmp}/m.csv", "--summary", "{ck}/model.safetensors"],
    ["--out", "{tmp}/m.csv", "--summary", "{ck}/config.json", "--overwrite"],
    ["--out", "{tmp}/link.csv"],  # a symlink to the checkpoint's config
])
def test_metrics_never_writes_over_its_checkpoint(tmp_path, ck, args):
    (tmp_path / "link.csv").symlink_to(ck / "config.json")
    before = snapshot(ck)
    args = [a.format(ck=ck, tmp=tmp_path) for a in args]
    _one_line(_run("metrics", ck, "--dataset", "digits", "--no-importance", *args),
              "input of this command")
    assert snapshot(ck) == before and not (tmp_path / "m.csv").exists()


def test_metrics_refuses_a_foreign_file_unless_overwrite_and_replaces_its_own(tmp_path, ck):
    out, summ = tmp_path / "m.csv", tmp_path / "s.csv"
    out.write_text("my,own\n1,2\n")
    base = ["metrics", ck, "--dataset", "digits", "--no-importance", "--out", out]
    _one_line(_run(*base), str(out), "--overwrite")
    assert out.read_text() == "my,own\n1,2\n"
    assert _run(*base, "--overwrite").exit_code == 0
    first = out.read_bytes()
    assert first.startswith(b"model,layer,")
    r = _run(*base, "--summary", summ)  # its own table is rewritten without --overwrite
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == first and summ.read_bytes().startswith(b"model,layer,")
    assert _run(*base, "--summary", summ).exit_code == 0
    _one_line(_run(*base[:-1], summ, "--summary", summ), "same file")


def test_report_never_writes_over_the_tables_it_reads(tmp_path, results):
    before = snapshot(results)
    for name in ("sweeps.csv", "models.csv", "metrics.csv", "study.json"):
        for extra in ([], ["--overwrite"]):
            _one_line(_run("report", results, "--out", results / name, "--n-boot", "10",
                           *extra), "input of this command")
    _one_line(_run("report", results, "--out", results / "summary.md", "--n-boot", "10"),
              "summary.md")
    assert snapshot(results) == before


def test_report_refuses_foreign_files_where_it_writes_unless_overwrite(tmp_path, results):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "summary.md").write_text("# my own notes\n")
    _one_line(_run("report", results, "--out", d / "r.html", "--n-boot", "10"),
              "summary.md", "--overwrite")
    assert sorted(os.listdir(d)) == ["summary.md"]
    assert _run("report", results, "--out", d / "r.html", "--n-boot", "10",
                "--overwrite").exit_code == 0
    r = _run("report", results, "--out", d / "r.html", "--n-boot", "10")  # its own now
    assert r.exit_code == 0, r.output
    assert (d / "summary.md").read_text().startswith("# Study")


@pytest.mark.parametrize("cmd", ["sweep", "margins"])
def test_plot_never_writes_over_its_table_or_a_foreign_image(tmp_path, ck, cmd):
    csv = tmp_path / "t.csv"
    if cmd == "sweep":
        assert _run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1", "--maps", "2",
                    "--quiet", "--out", csv).exit_code == 0
    else:
        assert _run("metrics", ck, "--dataset", "digits", "--no-importance", "--out",
                    csv).exit_code == 0
    before = snapshot(tmp_path)
    _one_line(_run("plot", cmd, csv, "--out", csv), "input of this command")
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n my holiday photo")
    before = snapshot(tmp_path)
    _one_line(_run("plot", cmd, csv, "--out", png), "photo.png", "--overwrite")
    assert snapshot(tmp_path) == before
    assert _run("plot", cmd, csv, "--out", png, "--overwrite").exit_code == 0
    assert _run("plot", cmd, csv, "--out", png).exit_code == 0  # its own figure now


def test_save_refuses_a_directory_with_someone_elses_config(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["Bert"]}')
    m = models.build("fc", hidden=(8,), in_shape=(1, 8, 8), seed=0)
    with pytest.raises(bnn_tol.exceptions.ResultsMismatch, match="not written by bnn_tol"):
        bnn_tol.save(m, d)
    assert sorted(os.listdir(d)) == ["config.json"]
    for extra in ([], ["--overwrite"]):
        _one_line(_run("train", "--dataset", "digits", "--hidden", "4", "--epochs", "1",
                       "--quiet", "--out", d, *extra), "not a bnn_tol checkpoint")
    assert sorted(os.listdir(d)) == ["config.json"]


# -- item 5: a sweep's sidecar that the library did not write is never replaced ------------------


def _sweep(ck, out, *extra):
    return _run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1", "--maps", "2", "--quiet",
                "--out", out, *extra)


@pytest.mark.parametrize("sidecar", ["foreign", "directory", "empty-csv"])
def test_a_foreign_sidecar_is_never_replaced(tmp_path, ck, sidecar):
    out = tmp_path / "s.csv"
    meta = tmp_path / "s.csv.meta.json"
    if sidecar == "directory":
        meta.mkdir()
    else:
        meta.write_text('{"mine": "my notes about s.csv"}\n')
    if sidecar == "empty-csv":
        out.write_bytes(b"")
    before = snapshot(tmp_path)
    _one_line(_sweep(ck, out), "s.csv.meta.json")
    _one_line(_sweep(ck, out, "--resume"), "s.csv.meta.json")
    assert snapshot(tmp_path) == before and meta.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["s.csv.meta.json"]
                                                  + (["s.csv"] if out.exists() else []))


@pytest.mark.parametrize("settings", ['"x"', "{}", '{"dataset": "x", "models": "y"}',
                                      '{"dataset": {}, "models": {"m1": 3}, "targets": "w"}',
                                      '{"dataset": {"name": []}, "models": {}, "targets": []}',
                                      "null", "[1, 2]"])
def test_a_sidecar_with_malformed_settings_is_one_line_and_untouched(tmp_path, ck, settings):
    out = tmp_path / "s.csv"
    assert _sweep(ck, out).exit_code == 0
    meta = tmp_path / "s.csv.meta.json"
    text = meta.read_text()
    start = text.index('"settings": ') + len('"settings": ')
    end = text.index(',\n  "provenance"')
    meta.write_text(text[:start] + settings + text[end:])
    before = snapshot(tmp_path)
    _one_line(_run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1,0.2", "--maps", "2",
                   "--quiet", "--out", out, "--resume"), "s.csv", "sidecar")
    assert snapshot(tmp_path) == before


def test_a_sweep_never_writes_into_its_checkpoint(tmp_path, ck):
    before = snapshot(ck)
    for name in ("config.json", "model.safetensors"):
        for extra in ([], ["--resume"]):
            _one_line(_sweep(ck, ck / name, *extra), "input of this command")
    assert snapshot(ck) == before


# -- item 1: a study's directory is locked, claimed, and never mixes settings ----------------------

STUDY_ARGS = ["study", "--preset", "tiny", "--epochs", "1", "--seeds", "0", "--train-bers", "0",
              "--eval-bers", "0,0.1", "--maps", "1", "--no-report"]


@pytest.fixture(scope="module")
def done_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "S"
    r = _run(*STUDY_ARGS, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_a_second_study_into_a_directory_in_use_is_one_line_and_changes_nothing(done_study):
    from bnn_tol.files import locked

    before = snapshot(done_study)
    with locked(done_study / study.MARKER, what="the first study"):  # a study is running there
        for extra in ([], ["--epochs", "3"]):
            _one_line(_run(*STUDY_ARGS, "--out", done_study, *extra), "in use")
    assert snapshot(done_study) == before


def test_resuming_a_study_with_other_settings_is_refused(tmp_path, done_study):
    before = snapshot(done_study)
    for extra, needle in ([["--epochs", "3"], "[train] epochs"], [["--maps", "2"], "[eval] n_maps"],
                          [["--eval-bers", "0,0.2"], "[eval] bers"],
                          [["--threads", "2"], "[run] threads"]):
        _one_line(_run(*STUDY_ARGS, "--out", done_study, *extra), needle, "another --out")
    assert snapshot(done_study) == before
    r = _run(*STUDY_ARGS, "--out", done_study)  # the same settings: every task cached
    assert r.exit_code == 0 and "1/1 fc_ber0_s0: cached" in r.output, r.output


def test_a_study_extends_its_grid_without_touching_finished_tasks(tmp_path, done_study):
    out = tmp_path / "S"
    import shutil

    shutil.copytree(done_study, out)
    before = snapshot(out / "models")
    args = [a if a != "0" or i != STUDY_ARGS.index("--seeds") + 1 else "0,1"
            for i, a in enumerate(STUDY_ARGS)]
    r = _run(*args, "--out", out)
    assert r.exit_code == 0, r.output
    after = snapshot(out / "models")
    assert {k: v for k, v in after.items() if k in before} == before


SMALL_TOML = """
[data]
dataset = "digits"
metric_subset = 50
[train]
bers = [0.0]
epochs = 1
[eval]
bers = [0.0]
n_maps = 1
[[models]]
label = "fc"
name = "fc"
hidden = [8]
"""


@pytest.mark.parametrize("kind", ["foreign", "file", "study-file-inside"])
def test_a_study_never_writes_into_a_directory_it_did_not_make(tmp_path, kind):
    out = tmp_path / "mine"
    if kind == "file":
        out.write_text("notes")
        args = ["--out", out]
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep")
        args = ["--out", out]
    if kind == "study-file-inside":
        (out / "s.toml").write_text(SMALL_TOML)
        args = ["study", out / "s.toml", "--out", out]
        before = snapshot(tmp_path)
        _one_line(_run(*args), "not written by")
    else:
        before = snapshot(tmp_path)
        _one_line(_run(*STUDY_ARGS, *args), str(out))
    assert snapshot(tmp_path) == before


# -- item 15: every writer on a read-only or full disk ends in one line ---------------------------


def _fail_under(monkeypatch, root: Path, err: int, *, at: str) -> None:
    """Make writes below ``root`` fail with ``err``: ``at="create"`` any file or directory
    creation (a read-only file system), ``at="rename"`` the final rename of an atomic write
    (a disk that fills up while writing)."""
    import builtins
    import io

    top = os.path.realpath(root)

    def under(p) -> bool:
        try:
            return os.path.realpath(os.fspath(p)).startswith(top)
        except TypeError:  # a file descriptor
            return False

    def boom(p):
        raise OSError(err, os.strerror(err), os.fspath(p))

    if at == "create":
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

        def fake_open(file, mode="r", *a, **k):
            if isinstance(file, str | bytes | os.PathLike) and set(mode) & set("wax+") \
                    and under(file):
                boom(file)
            return real_open(file, mode, *a, **k)

        def fake_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
                boom(path)
            return real_os_open(path, flags, *a, **k)

        def fake_mkdir(path, *a, **k):
            if under(path):
                boom(path)
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
    real_replace, real_rename = os.replace, os.rename

    def fake_replace(src, dst, *a, **k):
        if under(dst):
            boom(dst)
        return real_replace(src, dst, *a, **k)

    def fake_rename(src, dst, *a, **k):
        if under(dst):
            boom(dst)
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(os, "rename", fake_rename)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, ck):
    d = tmp_path_factory.mktemp("tables")
    assert _run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1", "--maps", "2", "--quiet",
                "--out", d / "s.csv").exit_code == 0
    assert _run("metrics", ck, "--dataset", "digits", "--no-importance", "--out",
                d / "m.csv").exit_code == 0
    return d


def _writers(ck, tables, results, d: Path) -> dict[str, list]:
    """Every writer of the CLI, writing into ``d`` (inputs elsewhere)."""
    return {
        "sweep": ["sweep", ck, "--dataset", "digits", "--bers", "0,0.1", "--maps", "2",
                  "--quiet", "--out", d / "s.csv"],
        "train": ["train", "--dataset", "digits", "--hidden", "4", "--epochs", "1", "--quiet",
                  "--train-subset", "64", "--out", d / "ck"],
        "metrics": ["metrics", ck, "--dataset", "digits", "--no-importance", "--out",
                    d / "m.csv"],
        "study": [*STUDY_ARGS, "--out", d / "S"],
        "plot sweep": ["plot", "sweep", tables / "s.csv", "--out", d / "p.png"],
        "plot margins": ["plot", "margins", tables / "m.csv", "--out", d / "h.svg"],
        "report": ["report", results, "--out", d / "r.html", "--n-boot", "10"],
        "demo": ["demo", "--dataset", "digits", "--epochs", "1", "--study", "none", "--maps",
                 "1", "--out", d / "demo"],
    }


def _no_temporary_files(d: Path) -> None:
    import re

    left = [str(p) for p in d.rglob("*") if re.fullmatch(r"\..+\.[a-z0-9_]{8}", p.name)]
    assert not left, left


@pytest.mark.parametrize("at,err", [("create", "EROFS"), ("rename", "ENOSPC"),
                                    ("rename", "EFBIG")])
@pytest.mark.parametrize("writer", ["sweep", "train", "metrics", "study", "plot sweep",
                                    "plot margins", "report", "demo"])
def test_every_writer_on_a_read_only_or_full_disk_is_one_line(tmp_path, monkeypatch, ck, tables,
                                                              results, writer, at, err):
    import errno

    d = tmp_path / "out"
    d.mkdir()
    inputs = {p: snapshot(p) for p in (ck, tables, results)}
    args = _writers(ck, tables, results, d)[writer]
    _fail_under(monkeypatch, d, getattr(errno, err), at=at)
    _one_line(_run(*args), "cannot write", os.strerror(getattr(errno, err)))
    monkeypatch.undo()
    _no_temporary_files(d)
    assert {p: snapshot(p) for p in inputs} == inputs
    if at == "create":
        assert os.listdir(d) == []


_FSIZE_DRIVER = """
import json, resource, signal, sys
from click.testing import CliRunner
from bnn_tol.cli import main
commands = json.loads(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
out = {}
for name, args in commands.items():
    r = CliRunner().invoke(main, args)
    out[name] = [r.exit_code, r.stderr, repr(r.exception)]
print(json.dumps(out))
"""


def test_every_writer_past_a_file_size_limit_is_one_line(tmp_path, ck, tables, results):
    """A real EFBIG: the writers run in a process whose files may not grow past 100 bytes
    (RLIMIT_FSIZE), so every write of the library meets the limit where it happens."""
    import json
    import subprocess
    import sys

    d = tmp_path / "out"
    d.mkdir()
    cmds = {k: [str(a) for a in v] for k, v in _writers(ck, tables, results, d).items()}
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-c", _FSIZE_DRIVER, json.dumps(cmds)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for name, (code, stderr, exc) in res.items():
        lines = _text_lines(stderr)
        assert code != 0 and "SystemExit" in exc, (name, code, exc, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("Error: cannot write"), (name, stderr)
        assert "File too large" in lines[0], (name, lines[0])
    _no_temporary_files(d)


def test_resume_refuses_rows_of_a_model_its_sidecar_does_not_record(tmp_path, ck):
    out = tmp_path / "s.csv"
    assert _sweep(ck, out).exit_code == 0
    lines = out.read_text().split("\n")
    lines.insert(1, "x" + lines[1][len("m1"):])  # a row of another sweep pasted in
    out.write_text("\n".join(lines))
    before = snapshot(tmp_path)
    _one_line(_run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1,0.2", "--maps", "2",
                   "--quiet", "--out", out, "--resume"), "'x'", "sidecar")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("line,needle", [
    ("m1,0,0.5,0,1,{seed},{acc},{rerr},1,{mem}", "ber"),  # ber is not that of p01/p10
    ("m1,0.5,0,0,1,{seed},{acc},{rerr},1,{mem}", "ber"),
    ("m1,0,0,0,1,{seed},{acc},0.5,1,{mem}", "rerr"),  # rerr is not 1 - accuracy
    ("m1,0,0,0,1,999999999999999999999999999,{acc},{rerr},1,{mem}", "map_seed"),
    ("m1,0,0,0,-1,{seed},{acc},{rerr},1,{mem}", "map"),
    ("m1,0,0,0,1,{seed},{acc},{rerr},1,99999999999999999999999", "memory_bits"),
])
def test_a_sweep_row_that_contradicts_itself_is_refused(tmp_path, ck, line, needle):
    out = tmp_path / "s.csv"
    assert _sweep(ck, out).exit_code == 0
    lines = out.read_text().split("\n")
    f = lines[2].split(",")
    lines[2] = line.format(seed=f[5], acc=f[6], rerr=f[7], mem=f[9])
    out.write_text("\n".join(lines))
    before = snapshot(tmp_path)
    with pytest.raises(bnn_tol.exceptions.ResultsMismatch, match=f"line 3.*{needle}"):
        bnn_tol.evaluate.read_sweep(out)
    _one_line(_run("sweep", ck, "--dataset", "digits", "--bers", "0,0.1,0.2", "--maps", "2",
                   "--quiet", "--out", out, "--resume"), "line 3", needle)
    _one_line(_run("plot", "sweep", out, "--out", tmp_path / "p.png"), "line 3", needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name,text", [("study.json", "{not json"), ("study.json", "[1, 2]"),
                                       ("environment.json", "\xff"), ("status.csv", '"a\n')])
def test_report_of_a_results_directory_with_a_malformed_file_is_one_line(tmp_path, results,
                                                                         name, text):
    import shutil

    d = tmp_path / "S"
    shutil.copytree(results, d)
    (d / name).write_text(text, encoding="latin-1")
    before = snapshot(d)
    _one_line(_run("report", d, "--out", tmp_path / "r.html", "--n-boot", "10"), name)
    assert snapshot(d) == before and not (tmp_path / "r.html").exists()
