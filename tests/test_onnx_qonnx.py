"""QONNX graphs (issue 22, item 6): ``BipolarQuant(X, scale) = scale * (X >= 0 ? 1 : -1)`` on
weights and activations, as Brevitas' QONNX export writes 1-bit models, import; what cannot be
read is refused in one line naming the node. The graphs are built with ``onnx.helper`` following
the QONNX operator definition; the oracle is that definition computed in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from _onnx_graphs import probe_images  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bnn_tol.data import to_float  # noqa: E402
from bnn_tol.interop.onnx import OnnxError, import_onnx  # noqa: E402

DOMAIN = "qonnx.custom_op.general"


def bipolar(x, scale):
    """The QONNX definition."""
    return scale * torch.where(x >= 0, 1.0, -1.0)


def _bn(x, p):
    gamma, beta, mean, var = (torch.from_numpy(v) for v in p)
    return (x - mean) / torch.sqrt(var + 1e-5) * gamma + beta


class Qonnx:
    """Flatten -> BipolarQuant(W1, w_scale) MatMul -> BN -> BipolarQuant(., act_scale) ->
    BipolarQuant(W2, w_scale) MatMul -> BN, on 1x8x8 inputs (latent real weights in the file)."""

    def __init__(self, seed=0, w_scale=1.0, act_scale=1.0, opset=11, op="BipolarQuant"):
        r = np.random.default_rng(seed)
        self.w = [r.normal(0, 1, (64, 24)).astype(np.float32),
                  r.normal(0, 1, (24, 10)).astype(np.float32)]
        self.w[0][:3, 0] = 0.0  # latent weights exactly 0: +1, as bnn_tol's sign
        self.bn = [(r.uniform(0.5, 1.5, c).astype(np.float32), r.normal(0, 0.3, c).astype(
            np.float32), r.normal(0, s, c).astype(np.float32), r.uniform(0.5, 2, c).astype(
            np.float32) * s * s) for c, s in ((24, 4.0 * w_scale), (10, 3.0 * w_scale))]
        self.w_scale, self.act_scale = np.float32(w_scale), np.float32(act_scale)
        inits = [numpy_helper.from_array(self.w[0], "W1"), numpy_helper.from_array(self.w[1], "W2"),
                 numpy_helper.from_array(self.w_scale, "ws"),
                 numpy_helper.from_array(self.act_scale, "as")]
        for k, p in enumerate(self.bn):
            inits += [numpy_helper.from_array(v, f"{n}{k}") for n, v in zip("sbmv", p,
                                                                           strict=True)]
        q = dict(domain=DOMAIN)
        nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
                 helper.make_node(op, ["W1", "ws"], ["W1q"], name="w1_quant", **q),
                 helper.make_node("MatMul", ["f", "W1q"], ["a1"], name="fc1"),
                 helper.make_node("BatchNormalization", ["a1", "s0", "b0", "m0", "v0"], ["n1"],
                                  name="bn1"),
                 helper.make_node("BipolarQuant", ["n1", "as"], ["h1"], name="act_quant", **q),
                 helper.make_node("BipolarQuant", ["W2", "ws"], ["W2q"], name="w2_quant", **q),
                 helper.make_node("MatMul", ["h1", "W2q"], ["a2"], name="fc2"),
                 helper.make_node("BatchNormalization", ["a2", "s1", "b1", "m1", "v1"], ["y"],
                                  name="bn2")]
        graph = helper.make_graph(
            nodes, "qonnx", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           ["N", 1, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
        self.proto = helper.make_model(graph, opset_imports=[
            helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])

    def save(self, path):
        onnx.save(self.proto, str(path))
        return path

    def __call__(self, x):
        """The graph computed per the QONNX definition."""
        h = x.flatten(1)
        for k in range(2):
            h = h @ bipolar(torch.from_numpy(self.w[k]), float(self.w_scale))
            h = _bn(h, self.bn[k])
            if k == 0:
                h = bipolar(h, float(self.act_scale))
        return h


@pytest.mark.parametrize("w_scale", [1.0, 0.1])  # 0.1: Brevitas' default binary weight scale
def test_a_qonnx_bnn_imports_with_its_predictions(tmp_path, w_scale):
    g = Qonnx(w_scale=w_scale)
    model = import_onnx(g.save(tmp_path / "q.onnx"))
    for b, w in zip(model.blocks, g.w, strict=True):  # the quantized weights, +-1
        assert torch.equal(b.layer.weight.detach(), torch.where(torch.from_numpy(w.T) >= 0,
                                                                1.0, -1.0))
    x = to_float(probe_images(n=300))
    with torch.no_grad():
        ref, got = g(x), model(x)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-4)


def _refused(path, match):
    with pytest.raises(OnnxError, match=match) as e:
        import_onnx(path)
    assert "\n" not in str(e.value)


def test_what_a_qonnx_graph_cannot_say_is_refused_naming_the_node(tmp_path):
    _refused(Qonnx(act_scale=0.5).save(tmp_path / "a.onnx"),
             "BipolarQuant node 'act_quant': an activation quantizer with a scale other than 1")
    _refused(Qonnx(op="Quant").save(tmp_path / "q.onnx"),  # Quant takes 4 inputs
             "Quant node 'w1_quant': Quant is read with constant scale, zero point and bit "
             "width")
    g = Qonnx()
    g.proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.float32(-1.0), "ws"))
    _refused(g.save(tmp_path / "s.onnx"), "w1_quant': its scale must be positive")
    g = Qonnx(opset=10)
    _refused(g.save(tmp_path / "o.onnx"), "opset 11 or later")
