"""ONNX out (exact predictions in onnxruntime) and in (another framework's BNN graph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import small_bnn
from click.testing import CliRunner

import bnn_tol
from bnn_tol import evaluate
from bnn_tol.data import BNNDataset, to_float

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bnn_tol.interop.onnx import OnnxError, export_onnx, import_onnx  # noqa: E402


def _model(arch, kw, seed=1):
    return small_bnn(arch, kw, seed)


def _images(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(("arch", "kw"), [("fc", {"hidden": (40, 30)}),
                                          ("vgg3", {"channels": ((8,), (6,)), "fc_width": 20})])
def test_exported_graph_reproduces_scores_in_onnxruntime(tmp_path, arch, kw):
    model = _model(arch, kw)
    path = export_onnx(model, tmp_path / "m.onnx")
    x = to_float(_images())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)
    assert np.array_equal(scores, ref.numpy())  # bit for bit: comparators + exact score table


def _foreign_graph(path, w1, bn1, w2, bn2):
    """A BNN graph as another framework writes it: Gemm(transB) + BatchNormalization + Sign."""
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    nodes = [helper.make_node("Flatten", ["input"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W1"], ["a1"], transB=1)]
    for k, bn in ((1, bn1), (2, bn2)):
        names = [f"s{k}", f"b{k}", f"m{k}", f"v{k}"]
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(names, bn,
                                                                                   strict=True)]
        nodes.append(helper.make_node("BatchNormalization", [f"a{k}", *names], [f"n{k}"],
                                      epsilon=1e-4))
        if k == 1:
            nodes += [helper.make_node("Sign", ["n1"], ["h1"]),
                      helper.make_node("Gemm", ["h1", "W2"], ["a2"], transB=1)]
    nodes.append(helper.make_node("LogSoftmax", ["n2"], ["out"], axis=1))
    graph = helper.make_graph(nodes, "foreign",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                             ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                             ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_import_a_foreign_graph_then_sweep(tmp_path):
    g = np.random.default_rng(0)
    w1 = np.where(g.random((24, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
    w2 = np.where(g.random((10, 24)) < 0.5, -1.0, 1.0).astype(np.float32)
    bn1 = (g.uniform(0.5, 1.5, 24), g.normal(0, 0.3, 24), g.normal(0, 0.2, 24),
           g.uniform(0.5, 2, 24))
    bn2 = (g.uniform(0.5, 1.5, 10), g.normal(0, 0.3, 10), g.normal(0, 2, 10),
           g.uniform(1, 4, 10))
    _foreign_graph(tmp_path / "f.onnx", w1, bn1, w2, bn2)
    x = to_float(_images(300))
    model = import_onnx(tmp_path / "f.onnx", verify=x)
    assert [b.layer.weight.shape for b in model.blocks] == [(24, 64), (10, 24)]
    ds = BNNDataset(_images(300), model(x).argmax(1))
    df = evaluate.sweep(model, ds, bers=[0.05], n_maps=2, seed=0, progress=False)
    assert len(df) == 2
    # the CLI writes an ordinary checkpoint
    r = CliRunner().invoke(bnn_tol.cli.main, ["import", str(tmp_path / "f.onnx"), "--out",
                                              str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert torch.equal(bnn_tol.load(tmp_path / "run")(x), model(x))


def test_import_refuses_non_binary_graphs(tmp_path):
    g = np.random.default_rng(1)
    w1 = g.normal(size=(24, 64)).astype(np.float32)  # real weights: not a BNN
    w2 = np.ones((10, 24), np.float32)
    bn = tuple(np.ones(24) for _ in range(4))
    _foreign_graph(tmp_path / "f.onnx", w1, bn, w2, tuple(np.ones(10) for _ in range(4)))
    with pytest.raises(OnnxError, match="not \\+-1"):
        import_onnx(tmp_path / "f.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(OnnxError, match="not a readable ONNX"):
        import_onnx(tmp_path / "junk.onnx")
