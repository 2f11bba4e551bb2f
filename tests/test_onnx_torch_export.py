"""Graphs written by ``torch.onnx.export`` from a BNN written the usual way import (issue 22,
item 6): weights binarized in the graph (``Where(W >= 0, 1, -1)``, ``Transpose``), ``Identity``
aliases of deduplicated initializers, ``ones_like`` / ``x.view(x.size(0), -1)`` computed from
``Shape`` / ``ConstantOfShape`` / ``Gather`` / ``Concat`` with a dynamic batch; and a graph that
computes something else from the batch size is refused naming the node."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_tol.data import to_float

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from _onnx_graphs import G, probe_images  # noqa: E402

from bnn_tol.interop.onnx import OnnxError, import_onnx  # noqa: E402


class SignSTE(torch.autograd.Function):
    """sign with a straight-through gradient, +1 at 0."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        return g


class BinLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, SignSTE.apply(self.weight), self.bias)


class BinConv(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, SignSTE.apply(self.weight), self.bias)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = BinLinear(64, 32, bias=False), nn.BatchNorm1d(32)
        self.fc2, self.bn2 = BinLinear(32, 10, bias=False), nn.BatchNorm1d(10)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = SignSTE.apply(self.bn1(self.fc1(x)))
        return self.bn2(self.fc2(x))


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1 = BinConv(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.bn2 = BinLinear(6 * 4 * 4, 20, bias=False), nn.BatchNorm1d(20)
        self.fc2, self.scale = BinLinear(20, 10, bias=False), nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.pool(SignSTE.apply(self.bn1(self.conv(x))))
        x = x.view(x.size(0), -1)
        x = SignSTE.apply(self.bn2(self.fc1(x)))
        return self.scale(self.fc2(x))


def _trained_looking(net, seed=0, fresh_bn=()):
    """Random BatchNorm statistics; the BatchNorms named in ``fresh_bn`` keep their initial
    parameters, so the exporter deduplicates them into ``Identity`` aliases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in fresh_bn:
                m.running_mean.normal_(0, 2.0, generator=g)
                m.running_var.uniform_(1.0, 9.0, generator=g)
                m.weight.uniform_(0.3, 1.5, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
    return net.eval()


OPT = False


def _export(net, path, dynamo: bool):
    x = to_float(probe_images(n=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"], optimize=OPT,
                              external_data=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("N")}})
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"],
                              output_names=["scores"],
                              dynamic_axes={"x": {0: "N"}, "scores": {0: "N"}})
    return path


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("make", [Mlp, Cnn])
@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_exported_bnn_imports_with_the_models_own_scores(tmp_path, make, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")  # the dynamo exporter needs it
    torch.manual_seed(0)
    net = _trained_looking(make(), fresh_bn=("scale", "bn2"))
    path = _export(net, tmp_path / "t.onnx", dynamo)
    if not dynamo:  # what this test is about
        assert {"Shape", "ConstantOfShape", "Where", "Identity"} <= _ops(path)
    model = import_onnx(path)
    x = to_float(probe_images(n=300))
    with torch.no_grad():
        ref, got = net(x), model(x)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_a_value_computed_from_the_batch_size_is_refused_naming_its_node(tmp_path):
    # Reshape(x, [N * 64]) flattens the whole batch into one row: not a flatten to (N, -1)
    g = G()
    shape = g.name("shape")
    g.nodes.append(onnx.helper.make_node("Shape", ["input"], [shape], name=shape))
    n64 = g.const(np.array([64], np.int64), "k")
    first = g.const(np.array([0], np.int64), "i")
    gathered, prod = g.name("gather"), g.name("mul")
    g.nodes += [onnx.helper.make_node("Gather", [shape, first], [gathered], name=gathered),
                onnx.helper.make_node("Mul", [gathered, n64], [prod], name=prod)]
    g.node("Reshape", prod)
    g.gemm(64, 10)
    with pytest.raises(OnnxError, match="Reshape node 'reshape.*batch size") as e:
        import_onnx(g.save(tmp_path / "b.onnx", out_dims=("N", 10)))
    assert "\n" not in str(e.value)


def test_a_shape_that_cannot_be_inferred_is_refused_naming_the_shape_node(tmp_path):
    # the shape of NonZero's output depends on the data's values
    g = G(("N", 1, 8, 8))
    nz, shape = g.name("nonzero"), g.name("shape")
    g.nodes += [onnx.helper.make_node("NonZero", ["input"], [nz], name=nz),
                onnx.helper.make_node("Shape", [nz], [shape], name=shape)]
    g.flatten().gemm(64, 10)
    with pytest.raises(OnnxError, match=f"Shape node '{shape}'.*not known") as e:
        import_onnx(g.save(tmp_path / "s.onnx"))
    assert "\n" not in str(e.value)


def test_an_unforeseen_failure_reading_a_node_is_one_line_naming_it(tmp_path, monkeypatch):
    from _onnx_graphs import fc_graph

    from bnn_tol.interop import onnx as onnx_io

    def broken(gr, n, b):
        raise KeyError("scale.running_mean")

    monkeypatch.setattr(onnx_io, "_batchnorm", broken)
    with pytest.raises(OnnxError, match="BatchNormalization node .*KeyError") as e:
        import_onnx(fc_graph().save(tmp_path / "f.onnx"))
    assert "\n" not in str(e.value)


def test_a_conv_with_a_bias_input_imports(tmp_path):
    # Conv's bias (C,) is per output channel, not numpy-broadcast onto (N, C, H, W)
    from _onnx_graphs import ort_run, session

    g = G()
    g.node("Conv", g.const(g.pm(6, 1, 3, 3), "W"),
           g.const(g.rng.normal(0, 0.5, 6).astype(np.float32), "B"), pads=[1, 1, 1, 1])
    g.bn(6, 3.0).sign().maxpool().flatten().gemm(96, 10)
    path = g.save(tmp_path / "c.onnx")
    model = import_onnx(path)
    assert model.blocks[0].layer.bias is not None
    x = to_float(probe_images(n=300))
    with torch.no_grad():
        np.testing.assert_array_equal(ort_run(session(path), x.numpy()).argmax(1),
                                      model(x).argmax(1).numpy())
