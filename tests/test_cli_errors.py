"""Issue 9, clean errors: every user error of a `bnn-tol` command is one line, never a traceback.

Each case asserts the exact behaviour: exit code != 0, exactly one line on stderr of the form
``Error: <message>`` naming the problem, no "Traceback", and for file cases the file is
byte-identical afterwards.
"""

import json
import math
import resource

import pytest
import torch
from click.testing import CliRunner

import bnn_tol
from bnn_tol import data, errors, models, train
from bnn_tol.cli import main
from bnn_tol.exceptions import BnnTolError, InvalidArgument
from bnn_tol.interop import checkpoint as io


def _one_line(r, *needles: str, code: int | None = None) -> str:
    """The one ``Error: ...`` line of a failed call; asserts it contains every needle."""
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code, (r.exit_code, r.stderr)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A tiny untrained fc checkpoint for digits (8x8 inputs)."""
    d = tmp_path_factory.mktemp("ck") / "fc"
    bnn_tol.save(models.build("fc", hidden=(8,), in_shape=(1, 8, 8), seed=0), d)
    return d


# -- 1. the error framework ------------------------------------------------------------------------


def test_library_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    r = _run("train", "--model", "resnet", "--dataset", "digits", "--out", tmp_path / "o")
    _one_line(r, "unknown model 'resnet'", "fc", "vgg3", code=2)
    r = CliRunner().invoke(main, ["--debug", "train", "--model", "resnet", "--dataset", "digits",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and isinstance(r.exception, InvalidArgument)
    assert not (tmp_path / "o").exists()


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "fit", boom)
    r = _run("train", "--dataset", "digits", "--hidden", "4", "--out", tmp_path / "o")
    assert r.exit_code != 0 and isinstance(r.exception, ZeroDivisionError)


# -- 2. train ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["--model", "resnet"], ["unknown model 'resnet'", "vgg7"]),
    (["--dataset", "foo"], ["unknown dataset 'foo'", "digits"]),
    (["--flip-ber", "1.5"], ["outside [0, 1]"]),
    (["--flip-ber", "nan"], ["outside [0, 1]"]),
    (["--flip-ber", "-0.1"], ["outside [0, 1]"]),
    (["--hidden", "0,16"], ["hidden widths", "(0, 16)"]),
    (["--model", "vgg3", "--hidden", "16"], ["hidden", "vgg3"]),
    (["--epochs", "-1"], ["--epochs", "-1"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--train-subset", "-1"], ["--train-subset", "-1"]),
    (["--train-subset", "0"], ["--train-subset", "0"]),
    (["--flip-warmup", "-2"], ["--flip-warmup", "-2"]),
    (["--lr", "0"], ["--lr", "0"]),
    (["--lr", "-1e-3"], ["--lr"]),
    (["--threads", "0"], ["--threads", "0"]),
])
def test_train_bad_input_is_one_line(tmp_path, args, needles):
    out = tmp_path / "o"
    r = _run("train", "--dataset", "digits", "--hidden", "4", "--epochs", "1", "--quiet",
             "--out", out, *args) if "--hidden" not in args and "--model" not in args else \
        _run("train", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", out, *args)
    _one_line(r, *needles, code=2)
    assert not out.exists()


def test_train_refuses_an_existing_checkpoint_unless_overwrite(tmp_path, ck):
    out = tmp_path / "ck"
    bnn_tol.save(models.build("fc", hidden=(16,), in_shape=(1, 8, 8), seed=0), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    base = ["train", "--dataset", "digits", "--hidden", "4", "--epochs", "1", "--quiet",
            "--train-subset", "64", "--device", "cpu", "--out", out]
    _one_line(_run(*base), str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = _run(*base, "--overwrite")
    assert r.exit_code == 0, r.output
    assert bnn_tol.load(out).config["kwargs"]["hidden"] == [4]


def test_train_refuses_a_nonempty_directory_that_is_not_a_checkpoint(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"keep me")
    for extra in ([], ["--overwrite"]):
        r = _run("train", "--dataset", "digits", "--hidden", "4", "--epochs", "1", "--quiet",
                 "--out", out, *extra)
        _one_line(r, str(out), "not a bnn_tol checkpoint")
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        assert (out / "notes.txt").read_bytes() == b"keep me"
    f = tmp_path / "file"
    f.write_bytes(b"x")
    _one_line(_run("train", "--dataset", "digits", "--out", f), str(f))
    assert f.read_bytes() == b"x"


def test_train_threads_are_set_and_recorded(tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "o"
    r = _run("train", "--dataset", "digits", "--hidden", "4", "--epochs", "1", "--quiet",
             "--train-subset", "64", "--device", "cpu", "--threads", "1", "--out", out)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["meta"]["training"]["threads"] == 1
    assert torch.get_num_threads() == before  # restored afterwards


def test_fit_records_threads_and_validates_its_arguments():
    tr = data.load("digits", "train").subset(64)
    m = models.build("fc", hidden=(4,), in_shape=(1, 8, 8), seed=0)
    train.fit(m, tr, epochs=1, batch_size=32, progress=False, threads=1)
    assert m.meta["training"]["threads"] == 1
    for kw, needle in [({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr"),
                       ({"lr": math.nan}, "lr"), ({"flip_warmup": -2}, "flip_warmup"),
                       ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
                       ({"epochs": 2.5}, "epochs"), ({"threads": 0}, "threads"),
                       ({"lr_step": 0}, "lr_step")]:
        with pytest.raises(InvalidArgument, match=needle):
            train.fit(m, tr, epochs=kw.pop("epochs", 1), progress=False, **kw)


def test_fit_with_threads_trains_the_same_weights_as_without_at_that_thread_count():
    tr = data.load("digits", "train").subset(64)
    old = torch.get_num_threads()
    a = models.build("fc", hidden=(4,), in_shape=(1, 8, 8), seed=0)
    b = models.build("fc", hidden=(4,), in_shape=(1, 8, 8), seed=0)
    torch.set_num_threads(1)
    try:
        train.fit(a, tr, epochs=1, batch_size=32, progress=False, seed=3, flip_ber=0.1)
    finally:
        torch.set_num_threads(old)
    train.fit(b, tr, epochs=1, batch_size=32, progress=False, seed=3, flip_ber=0.1, threads=1)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_build_refuses_options_of_another_model():
    with pytest.raises(InvalidArgument, match="vgg3.*hidden"):
        models.build("vgg3", hidden=(16,))
    with pytest.raises(InvalidArgument, match="fc_width"):
        models.build("vgg3", fc_width=0, in_shape=(1, 8, 8))
    with pytest.raises(InvalidArgument, match="seed"):
        models.build("fc", seed=1.5)


# -- 3. metrics, report, plot margins ------------------------------------------------------------


def test_metrics_bad_checkpoint_dataset_subset_and_shape(tmp_path, ck):
    out = tmp_path / "m.csv"
    _one_line(_run("metrics", tmp_path, "--dataset", "digits", "--out", out),
              "not a bnn_tol checkpoint")
    _one_line(_run("metrics", ck, "--dataset", "foo", "--out", out), "unknown dataset 'foo'")
    for n in ("-5", "0"):
        _one_line(_run("metrics", ck, "--dataset", "digits", "--subset", n, "--out", out),
                  "--subset")
    big = tmp_path / "big"
    bnn_tol.save(models.build("fc", hidden=(8,), in_shape=(1, 28, 28), seed=0), big)
    _one_line(_run("metrics", big, "--dataset", "digits", "--out", out),
              "(1, 28, 28)", "(1, 8, 8)")
    _one_line(_run("metrics", ck, ck, "--dataset", "digits", "--out", out), "fc", "same")
    assert not out.exists()


def test_metrics_on_a_corrupt_idx_file_is_one_line(tmp_path, ck):
    d = tmp_path / "data"
    d.mkdir()
    (d / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    _one_line(_run("metrics", ck, "--dataset", "mnist", "--data-dir", d, "--out",
                   tmp_path / "m.csv"), "truncated")


def test_check_data_names_both_shapes(ck):
    m = bnn_tol.load(ck)
    big = data.load("digits", "test")
    models.check_data(m, big)
    wrong = data.BNNDataset(torch.zeros(3, 1, 9, 9, dtype=torch.uint8), torch.zeros(3).long())
    with pytest.raises(InvalidArgument, match=r"\(1, 9, 9\).*\(1, 8, 8\)"):
        models.check_data(m, wrong)
    with pytest.raises(InvalidArgument, match=r"\(1, 9, 9\)"):
        bnn_tol.metrics.margin(m, wrong)


def test_report_n_boot_and_plot_margins_on_a_sweep_csv(tmp_path):
    (tmp_path / "r").mkdir()
    _one_line(_run("report", tmp_path / "r", "--n-boot", "-5"), "--n-boot")
    csv = tmp_path / "sweep.csv"
    csv.write_text("model,ber,map,seed,accuracy\nfc,0.0,0,1,0.9\n")
    before = csv.read_bytes()
    out = tmp_path / "m.png"
    _one_line(_run("plot", "margins", csv, "--out", out), "mean_margin_norm", str(csv))
    assert csv.read_bytes() == before and not out.exists()


# -- 4. checkpoint shapes are checked before any allocation --------------------------------------


def test_load_checks_shapes_against_the_header_before_allocating(tmp_path, ck):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes())
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["kwargs"]["hidden"] = [200000, 200000]
    (bad / "config.json").write_text(json.dumps(cfg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(io.CheckpointError, match="wrong shape"):
        bnn_tol.load(bad)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500  # the 160 GB model is never allocated
    r = _run("metrics", bad, "--dataset", "digits", "--out", tmp_path / "m.csv")
    _one_line(r, "wrong shape")


# -- 5. data ---------------------------------------------------------------------------------------


def test_a_given_data_dir_must_exist_and_hold_the_dataset(tmp_path):
    with pytest.raises(data.DatasetNotFound, match="does not exist"):
        data.load("mnist", "test", data_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetNotFound) as e:
        data.load("mnist", "test", data_dir=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value) and "/usr/share" not in str(e.value)
    _one_line(_run("train", "--dataset", "mnist", "--data-dir", tmp_path / "nope", "--out",
                   tmp_path / "o"), "does not exist")


def test_subset_refuses_n_below_one():
    ds = data.load("digits", "test")
    assert ds.subset(None) is ds
    for n in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument, match="subset"):
            ds.subset(n)


# -- 6. errors -------------------------------------------------------------------------------------


def test_inject_and_map_seeds_name_the_bad_argument():
    m = models.build("fc", hidden=(4,), in_shape=(1, 8, 8), seed=0)
    with pytest.raises(InvalidArgument, match="ber"):
        with errors.inject(m, None):
            pass
    for kw, needle in [({"seed": 1.5}, "seed"), ({"seed": True}, "seed")]:
        with pytest.raises(InvalidArgument, match=needle):
            with errors.inject(m, 0.1, **kw):
                pass
    for args, needle in [((1.5, 2), "seed"), ((0, 2.5), "n_maps"), ((0, True), "n_maps"),
                         ((False, 2), "seed")]:
        with pytest.raises(InvalidArgument, match=needle):
            errors.map_seeds(*args)
    with pytest.raises(InvalidArgument, match="seed"):
        errors.draw_maps(m, 2.5, 0.1)
    with pytest.raises(InvalidArgument, match="BER"):
        errors.rates("0.1")
    assert issubclass(InvalidArgument, BnnTolError)
