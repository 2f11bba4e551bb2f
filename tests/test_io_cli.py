import json

import pytest
import torch
from click.testing import CliRunner

import bnn_tol
from bnn_tol import data, models, train
from bnn_tol.cli import main
from bnn_tol.interop import checkpoint as io


def _trained(tmp_path):
    m = models.build("fc", hidden=(32,), in_shape=(1, 8, 8), seed=1)
    train.fit(m, data.load("digits", "train").subset(256), epochs=1, batch_size=64, seed=2,
              flip_ber=0.1, progress=False)
    return m


def test_save_load_roundtrip_is_exact_with_config(tmp_path):
    m = _trained(tmp_path)
    bnn_tol.save(m, tmp_path / "ck", note="hello")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model"] == {"name": "fc", "kwargs": {"hidden": [32], "in_shape": [1, 8, 8],
                                                     "n_classes": 10}}
    assert cfg["meta"]["training"]["flip_ber"] == [0.1, 0.1] and cfg["meta"]["note"] == "hello"
    assert "torch" in cfg["versions"] and len(cfg["meta"]["history"]) == 1
    m2 = bnn_tol.load(tmp_path / "ck")
    assert not m2.training
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = next(data.load("digits", "test").batches(100))[0]
    assert torch.equal(m.eval()(x), m2(x))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(io.CheckpointError, match="config.json is missing"):
        bnn_tol.load(tmp_path)
    m = _trained(tmp_path)
    ck = bnn_tol.save(m, tmp_path / "ck")
    (ck / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(io.CheckpointError, match="unreadable weights"):
        bnn_tol.load(ck)
    bnn_tol.save(m, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["kwargs"]["hidden"] = [64]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(io.CheckpointError, match="wrong shape"):
        bnn_tol.load(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(io.CheckpointError, match="unreadable config"):
        bnn_tol.load(ck)


def test_checkpoint_weights_file_is_plain_safetensors(tmp_path):
    ck = bnn_tol.save(_trained(tmp_path), tmp_path / "ck")
    assert (ck / "model.safetensors").read_bytes()[8:9] == b"{"  # JSON header, no pickle


def test_cli_train_writes_checkpoint_and_reports(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--model", "fc", "--hidden", "32", "--dataset",
                                    "digits", "--epochs", "1", "--flip-ber", "0.02,0.1",
                                    "--seed", "3", "--out", str(out), "--quiet",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["flip_ber"] == [0.02, 0.1] and 0 <= report["test_acc"] <= 1
    m = bnn_tol.load(out)
    assert m.meta["training"]["seed"] == 3


def test_cli_help_explains_options():
    res = CliRunner().invoke(main, ["train", "--help"])
    assert res.exit_code == 0
    for opt in ("--flip-ber", "--device", "--epochs", "--seed", "--out", "p01,p10"):
        assert opt in res.output
    bad = CliRunner().invoke(main, ["train", "--flip-ber", "x", "--out", "o", "--dataset",
                                    "digits"])
    assert bad.exit_code != 0 and "not a number" in bad.output


def test_demo_runs_end_to_end_and_writes_its_tables(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--dataset", "digits", "--epochs", "1", "--maps", "2",
                                    "--study", "none", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    sw = pd.read_csv(tmp_path / "sweeps.csv")
    assert len(sw) == 2 * 5 * 2 and set(sw["model"]) == {"fc", "fc-bft0.1"}
    # BER 0 is the clean accuracy printed for the trained model
    clean = sw[sw["ber"] == 0].groupby("model")["accuracy"].mean()
    for label in ("fc", "fc-bft0.1"):
        m = bnn_tol.load(tmp_path / label)
        assert clean[label] == pytest.approx(
            bnn_tol.evaluate.accuracy(m, data.load("digits", "test")))
    met = pd.read_csv(tmp_path / "metrics.csv")
    assert list(met.columns) == ["model", "mean_margin_norm", "mean_margin_norm_se",
                                 "importance_variance", "importance_variance_se",
                                 "importance_variance_plugin", "importance_noise_share"]
    assert (met["mean_margin_norm_se"] > 0).all()
    assert met["importance_noise_share"].between(0, 1).all()
    # a second run rewrites the demo's own directory (its marker is there)
    res = CliRunner().invoke(main, ["demo", "--dataset", "digits", "--epochs", "1", "--maps", "2",
                                    "--study", "none", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "acc_vs_ber.png").stat().st_size > 1000
