"""Graphs written by ``torch.onnx.export`` from a BNN written the usual way import (issue 22,
item 6): weights binarized in the graph (``Where(W >= 0, 1, -1)``, ``Transpose``), ``Identity``
aliases of deduplicated initializers, ``ones_like`` / ``x.view(x.size(0), -1)`` computed from
``Shape`` / ``ConstantOfShape`` / ``Gather`` / ``Concat`` with a dynamic batch; and a graph that
computes something else from the batch size is refused naming the node."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_tol.data import to_float

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from _onnx_graphs import G, export_torch, probe_images  # noqa: E402
from _public_bnns import BinarySignSTE as SignSTE  # noqa: E402

from bnn_tol.interop.onnx import OnnxError, import_onnx  # noqa: E402


def _agrees(net, model) -> None:
    """The imported model predicts what ``net`` predicts on 300 probe images, its scores
    within float32 rounding of ``net``'s."""
    x = to_float(probe_images(n=300))
    with torch.no_grad():
        ref, got = net(x), model(x)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-5)


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


def _export(net, path, dynamo: bool, optimize: bool = True):
    return export_torch(net, path, to_float(probe_images(n=4)), dynamo, optimize)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("make", [Mlp, Cnn])
@pytest.mark.parametrize("dynamo", [False, "unoptimized", True])
def test_torch_exported_bnn_imports_with_the_models_own_scores(tmp_path, make, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")  # the dynamo exporter needs it
    torch.manual_seed(0)
    # a BatchNorm left at its initial parameters: deduplicated into Identity aliases
    # (TorchScript exporter); the dynamo exporter's optimizer folds BatchNorms into the layers'
    # weights (+-s per output channel), where a threshold exactly on a reachable
    # pre-activation would round either way: hidden BatchNorms random there
    net = _trained_looking(make(), fresh_bn=("scale",) if dynamo else ("scale", "bn2"))
    path = _export(net, tmp_path / "t.onnx", bool(dynamo), optimize=dynamo is True)
    if not dynamo:  # what this test is about
        assert {"Shape", "ConstantOfShape", "Where", "Identity"} <= _ops(path)
    model = import_onnx(path)
    _agrees(net, model)


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


def _fused(net: Mlp) -> G:
    """``net`` as torch's dynamo exporter writes it after its optimizer: each BatchNorm folded
    into the layer before it (weights +-s per output channel, a bias), the sign a Where."""
    g = G().flatten()
    for k, (fc, bn) in enumerate(((net.fc1, net.bn1), (net.fc2, net.bn2))):
        with torch.no_grad():
            s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).float()
            c = (bn.bias - bn.running_mean * s).float()
            w = torch.where(fc.weight >= 0, 1.0, -1.0) * s[:, None]
        g.node("Gemm", g.const(w.numpy(), "W"), g.const(c.numpy(), "C"), transB=1)
        if k == 0:
            g.where_sign()
    return g


def test_batchnorms_folded_into_the_weights_import_as_the_original_bnn(tmp_path):
    torch.manual_seed(1)
    net = _trained_looking(Mlp(), seed=1)
    model = import_onnx(_fused(net).save(tmp_path / "f.onnx"))
    assert all(set(b.layer.weight.unique().tolist()) == {-1.0, 1.0} for b in model.blocks)
    _agrees(net, model)


def test_a_per_channel_weight_scale_before_a_batchnorm_is_folded_into_it(tmp_path):
    # XNOR-Net style: weights alpha_o sign(W_o), then a BatchNorm
    g = G().flatten()
    alpha = g.rng.uniform(0.05, 0.5, 24).astype(np.float32)
    g.node("Gemm", g.const(g.pm(24, 64) * alpha[:, None], "W"), transB=1)
    g.bn(24, 4.0 * float(alpha.mean())).sign().gemm(24, 10)
    path = g.save(tmp_path / "x.onnx")
    model = import_onnx(path)
    from _onnx_graphs import ort_run, session

    x = to_float(probe_images(n=300))
    with torch.no_grad():
        np.testing.assert_array_equal(ort_run(session(path), x.numpy()).argmax(1),
                                      model(x).argmax(1).numpy())


def test_weights_with_more_than_one_magnitude_per_channel_are_refused(tmp_path):
    g = G().flatten()
    w = g.pm(24, 64)
    w[3, 5] *= 2.0
    g.node("Gemm", g.const(w, "W"), transB=1).bn(24, 4.0).sign().gemm(24, 10)
    with pytest.raises(OnnxError, match="Gemm node .*weights are not \\+-1 \\(nor \\+-s") as e:
        import_onnx(g.save(tmp_path / "w.onnx"))
    assert "\n" not in str(e.value)
