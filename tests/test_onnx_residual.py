"""Residual BNNs through ONNX (issue 22): a binary ResNet or Bi-Real-Net written the usual way,
exported by either torch exporter, imports as a :class:`~bnn_tol.core.graph.GraphBNN` (the
graph read as a torch module and mapped by :func:`bnn_tol.adapt`), predicting what the original
predicts on real Fashion-MNIST images; without the input convention the import names the way.
The evaluation order of a branching graph is checked (cycles, nodes off the path)."""

from __future__ import annotations

import _public_bnns as P
import pytest
import torch

from bnn_tol import errors, evaluate
from bnn_tol.core.graph import GraphBNN
from bnn_tol.data import Normalize, grid_of

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from _onnx_graphs import export_torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from bnn_tol.interop.onnx import OnnxError, import_onnx  # noqa: E402

TF = Normalize(0.5, 0.5)


@pytest.fixture(scope="module")
def fmnist():
    return P.fashion_mnist(1, 600)[1]


@pytest.mark.parametrize("make", [P.BiRealNet, lambda: P.BinaryResNet(check_range=False)],
                         ids=["bireal", "resnet_binary"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_torch_exported_residual_bnn_imports_as_a_graph_with_its_predictions(
        make, dynamo, fmnist, tmp_path):
    if dynamo:
        pytest.importorskip("onnxscript")  # the dynamo exporter needs it
    user = P.calibrate(make(), TF.to_float(fmnist.images[:512]))
    path = export_torch(user, tmp_path / "res.onnx", TF.to_float(fmnist.images[:4]), dynamo)
    assert sum(n.op_type == "Add" for n in onnx.load(str(path)).graph.node) >= 1
    with pytest.raises(OnnxError, match="residual BNN.*--normalize MEAN,STD") as e:
        import_onnx(path)
    assert "\n" not in str(e.value)
    model = import_onnx(path, transform=TF)
    assert isinstance(model, GraphBNN) and "add" in [n["op"] for n in model.nodes]
    assert model.meta["imported_by"] == "adapt" and "verified_with" in model.meta
    with torch.no_grad():
        got = model(grid_of(model).to_float(fmnist.images)).argmax(1)
        assert torch.equal(got, user(TF.to_float(fmnist.images)).argmax(1))
    small = fmnist.subset(100)
    df = evaluate.sweep(model, small, bers=[0.05], n_maps=1, seed=0, progress=False)
    with errors.inject(model, 0.05, seed=int(df.map_seed.iloc[-1])):
        assert evaluate.accuracy(model, small) == df.accuracy.iloc[-1]


def _graph(nodes, path, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    g = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_branch_off_the_path_to_the_output_is_refused_naming_its_node(tmp_path):
    """``x`` feeds a Relu (the output path, with a shortcut Add) and a dangling Neg."""
    path = _graph([helper.make_node("Relu", ["x"], ["a"], name="r"),
                   helper.make_node("Add", ["a", "x"], ["y"], name="sum"),
                   helper.make_node("Neg", ["x"], ["dead"], name="dangling")], tmp_path / "g.onnx")
    with pytest.raises(OnnxError, match="dangling.*not on a path"):
        import_onnx(path, transform=TF, in_shape=(1, 2, 2))


def test_an_operator_of_a_residual_graph_that_is_not_supported_is_named(tmp_path):
    path = _graph([helper.make_node("Relu", ["x"], ["a"], name="r"),
                   helper.make_node("Add", ["a", "x"], ["y"], name="sum")], tmp_path / "g.onnx")
    with pytest.raises(OnnxError, match="Relu.*not supported"):
        import_onnx(path, transform=TF, in_shape=(1, 2, 2))


def test_bnn_tol_import_reads_a_residual_graph_with_normalize(fmnist, tmp_path):
    import json

    from click.testing import CliRunner

    import bnn_tol
    from bnn_tol.cli import main

    user = P.calibrate(P.BiRealNet(), TF.to_float(fmnist.images[:512]))
    path = export_torch(user, tmp_path / "res.onnx", TF.to_float(fmnist.images[:4]), False)
    runner = CliRunner()
    ok = runner.invoke(main, ["import", str(path), "--out", str(tmp_path / "m"),
                              "--normalize", "0.5,0.5"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output.strip().splitlines()[-1])["nodes"] > 0
    model = bnn_tol.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(grid_of(model).to_float(fmnist.images)).argmax(1),
                           user(TF.to_float(fmnist.images)).argmax(1))
    for bad in ("0.5", "0.5,0.5,0.5", "0.5/x,0.5"):
        res = runner.invoke(main, ["import", str(path), "--out", str(tmp_path / "b"),
                                   "--normalize", bad])
        assert res.exit_code != 0 and "--normalize" in res.output, (bad, res.output)
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    two = runner.invoke(main, ["import", str(path), "--out", str(tmp_path / "c"),
                               "--normalize", "0.5/0.5,0.5/0.5"])  # 2 channels for 1
    assert two.exit_code != 0 and "Traceback" not in two.output, two.output
    assert len(two.output.strip().splitlines()) == 1
