"""Brevitas' own BNN-PYNQ 1W1A models (``brevitas_examples.bnn_pynq``: TFC, SFC, LFC, CNV),
taken as the package ships them, adapt unchanged (issue 22): their ``2.0 * x - 1`` and input
quantizer become the input grid, their ``TensorNorm`` the output BatchNorm; the adapted model
predicts what Brevitas predicts, sweeps exactly, and exports to a numpy bundle with the same
predictions. Skipped where brevitas is not installed (``pip install 'bnn_tol[brevitas]'``)."""

from __future__ import annotations

import warnings

import _public_bnns as P
import numpy as np
import pytest
import torch

import bnn_tol
from bnn_tol import data, errors, evaluate
from bnn_tol.data import Normalize, grid_of
from bnn_tol.interop import deploy

bnn_pynq = pytest.importorskip("brevitas_examples.bnn_pynq.models")


def _images(name: str) -> torch.Tensor:
    if name.startswith("cnv"):  # CIFAR-shaped: 3 x 32 x 32 pixels
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (300, 3, 32, 32), generator=g, dtype=torch.uint8)
    try:
        return data.load("fashion-mnist", "test").subset(300).images
    except data.DatasetNotFound:  # pragma: no cover - depends on the machine
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (300, 1, 28, 28), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", ["tfc_1w1a", "sfc_1w1a", "lfc_1w1a", "cnv_1w1a"])
def test_brevitas_bnn_pynq_models_adapt_unchanged(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = bnn_pynq.model_with_cfg(name, pretrained=False)
    imgs = _images(name)
    tf = Normalize()  # bnn_pynq trains on ToTensor() inputs; 2x - 1 is in the model
    torch.manual_seed(0)
    user = P.calibrate(net, tf.to_float(imgs))
    model = bnn_tol.adapt(user, tf.to_float(imgs[:128]), transform=tf)
    grid = grid_of(model)
    with torch.no_grad():
        ref = user(tf.to_float(imgs))
        ref = (ref.value if hasattr(ref, "value") else ref).argmax(1)
        assert torch.equal(model(grid.to_float(imgs)).argmax(1), ref)
    labels = ref  # the model's own predictions: clean accuracy 1
    ds = data.BNNDataset(imgs[:100], labels[:100])
    df = evaluate.sweep(model, ds, bers=[0, 0.01], n_maps=2, seed=0, progress=False)
    assert df.query("ber == 0")["accuracy"].eq(1.0).all()
    with errors.inject(model, 0.01, seed=int(df.map_seed.iloc[-1])):
        assert evaluate.accuracy(model, ds) == df.accuracy.iloc[-1]
    bundle = bnn_tol.export(model, tmp_path / name)
    assert np.array_equal(deploy.predict(bundle, imgs.numpy()), ref.numpy())


@pytest.mark.parametrize("name", ["tfc_1w1a", "cnv_1w1a"])
def test_brevitas_qonnx_exports_import_through_adapt(name, tmp_path):
    """Brevitas' QONNX export (BipolarQuant weights and activations, an 8-bit ``Quant`` input
    quantizer for CNV, ``2x - 1`` and TensorNorm as elementwise nodes, a fixed batch of 1)
    imports with ``transform=``: read as a module, adapted, predictions checked against
    onnxruntime and equal to Brevitas' own."""
    pytest.importorskip("onnxoptimizer")
    pytest.importorskip("onnxruntime")
    from brevitas.export import export_qonnx

    from bnn_tol.interop.onnx import import_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = bnn_pynq.model_with_cfg(name, pretrained=False)
        imgs = _images(name)
        tf = Normalize()
        torch.manual_seed(0)
        user = P.calibrate(net, tf.to_float(imgs))
        path = tmp_path / f"{name}.onnx"
        export_qonnx(user, torch.rand(1, *imgs.shape[1:]), export_path=str(path))
    model = import_onnx(path, transform=tf)
    assert model.meta["imported_by"] == "adapt" and "verified_with" in model.meta
    with torch.no_grad():
        ref = user(tf.to_float(imgs))
        ref = (ref.value if hasattr(ref, "value") else ref).argmax(1)
        assert torch.equal(model(grid_of(model).to_float(imgs)).argmax(1), ref)


def test_bnn_tol_import_reads_a_brevitas_qonnx_export_with_normalize(tmp_path):
    pytest.importorskip("onnxoptimizer")
    pytest.importorskip("onnxruntime")
    import json

    from brevitas.export import export_qonnx
    from click.testing import CliRunner

    from bnn_tol.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = bnn_pynq.model_with_cfg("tfc_1w1a", pretrained=False)
        imgs = _images("tfc_1w1a")
        user = P.calibrate(net, Normalize().to_float(imgs))
        path = tmp_path / "tfc.onnx"
        export_qonnx(user, torch.rand(1, 1, 28, 28), export_path=str(path))
    runner = CliRunner()
    plain = runner.invoke(main, ["import", str(path), "--out", str(tmp_path / "a")])
    assert plain.exit_code != 0 and "Reshape" in plain.output and "Traceback" not in plain.output
    assert "--normalize MEAN,STD" in plain.output and len(plain.output.strip().splitlines()) == 1
    bad = runner.invoke(main, ["import", str(path), "--out", str(tmp_path / "b"),
                               "--normalize", "0.5"])
    assert bad.exit_code != 0 and "MEAN,STD" in bad.output
    ok = runner.invoke(main, ["import", str(path), "--out", str(tmp_path / "c"),
                              "--normalize", "0,1"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output.strip().splitlines()[-1])["verified_with"].startswith(
        "onnxruntime")
    model = bnn_tol.load(tmp_path / "c")
    with torch.no_grad():
        ref = user(Normalize().to_float(imgs))
        ref = (ref.value if hasattr(ref, "value") else ref).argmax(1)
        assert torch.equal(model(grid_of(model).to_float(imgs)).argmax(1), ref)
