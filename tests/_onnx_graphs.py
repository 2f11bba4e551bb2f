"""BNN graphs written with ``onnx.helper`` the way other tools write them, and onnxruntime as
the oracle (the ONNX import tests and the ONNX fuzz test)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from bnn_tol.data import INPUT


class G:
    """A graph under construction: a chain of nodes from ``input`` with +-1 weights.

    Every builder method appends one pattern to the chain and returns ``self``;
    :meth:`model` returns the ``ModelProto``. BatchNorm statistics are drawn so that about half
    of the neurons fire (``spread`` ~ the pre-activation's standard deviation), with one
    ``gamma < 0`` channel.
    """

    def __init__(self, in_dims=("N", 1, 8, 8), *, seed: int = 0, opset: int = 17) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.rng = np.random.default_rng(seed)
        self.h = "input"
        self.in_dims = list(in_dims)
        self.opset = opset
        self.k = 0

    def name(self, prefix: str) -> str:
        self.k += 1
        return f"{prefix}{self.k}"

    def const(self, arr, prefix: str = "c") -> str:
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def node(self, op: str, *consts: str, data_at: int = 0, **attrs) -> G:
        ins = list(consts)
        ins.insert(data_at, self.h)
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        self.h = out
        return self

    def pm(self, *shape: int) -> np.ndarray:
        return np.where(self.rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)

    def flatten(self, **attrs) -> G:
        return self.node("Flatten", axis=1, **attrs)

    def gemm(self, n_in: int, n_out: int, *, bias: bool = False, **attrs) -> G:
        extra = [self.const(self.rng.normal(0, 1, n_out).astype(np.float32), "C")] if bias else []
        return self.node("Gemm", self.const(self.pm(n_out, n_in), "W"), *extra,
                         **{"transB": 1, **attrs})

    def matmul(self, n_in: int, n_out: int) -> G:
        return self.node("MatMul", self.const(self.pm(n_in, n_out), "W"))

    def conv(self, c_in: int, c_out: int, k: int = 3, **attrs) -> G:
        return self.node("Conv", self.const(self.pm(c_out, c_in, k, k), "W"),
                         **{"pads": [1, 1, 1, 1], **attrs})

    def bn(self, c: int, spread: float, eps: float = 1e-5) -> G:
        r = self.rng
        gamma = r.uniform(0.5, 1.5, c)
        gamma[0] = -gamma[0]
        params = (gamma, r.normal(0, 0.3, c), r.normal(0, 0.5 * spread, c),
                  r.uniform(0.5, 2.0, c) * spread ** 2)
        names = [self.const(v.astype(np.float32), p) for v, p in zip(params, "sbmv", strict=True)]
        return self.node("BatchNormalization", *names, epsilon=eps)

    def sign(self) -> G:
        return self.node("Sign")

    def where_sign(self, thr: float = 0.0, op: str = "GreaterOrEqual", hi: float = 1.0,
                   lo: float = -1.0) -> G:
        self.node(op, self.const(np.float32(thr), "t"))
        return self.node("Where", self.const(np.float32(hi), "one"),
                         self.const(np.float32(lo), "minus"))

    def clip(self, lo: float = -1.0, hi: float = 1.0) -> G:
        return self.node("Clip", self.const(np.float32(lo), "lo"), self.const(np.float32(hi), "hi"))

    def maxpool(self, k: int = 2, **attrs) -> G:
        return self.node("MaxPool", **{"kernel_shape": [k, k], "strides": [k, k], **attrs})

    def model(self, out_dims=("N", 10)) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, self.in_dims)],
            [helper.make_tensor_value_info(self.h, TensorProto.FLOAT, list(out_dims))],
            self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])

    def save(self, path, **kw) -> str:
        onnx.save(self.model(**kw), str(path))
        return str(path)


def fc_graph(*, seed: int = 0, sign: str = "sign", head: str = "LogSoftmax",
             layer: str = "gemm") -> G:
    """Flatten -> 64-24 -> BN -> sign -> 24-10 -> BN -> head (a foreign fc BNN on 1x8x8)."""
    g = G(seed=seed).flatten()
    g.gemm(64, 24) if layer == "gemm" else g.matmul(64, 24)
    g.bn(24, 4.0)
    g.sign() if sign == "sign" else g.where_sign()
    g.gemm(24, 10) if layer == "gemm" else g.matmul(24, 10)
    g.bn(10, 5.0)
    if head:
        g.node(head, axis=1)
    return g


def conv_graph(*, seed: int = 0) -> G:
    """Conv 1->6 (pad 1) -> BN -> Clip -> Where(x >= 0, 1, -1) -> MaxPool 2 -> Conv 6->8 -> BN
    -> Sign -> MaxPool 2 -> Flatten -> Gemm 32->10 -> BN -> Softmax."""
    g = G(seed=seed).conv(1, 6).bn(6, 3.0).clip().where_sign().maxpool()
    g.conv(6, 8).bn(8, 8.0).sign().maxpool().flatten().gemm(32, 10).bn(10, 4.0)
    return g.node("Softmax", axis=1)


def probe_images(shape=(1, 8, 8), n: int = 300, seed: int = 7) -> torch.Tensor:
    """uint8 images spanning the pixel range: random, dark, bright, black, white, mid-gray."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    imgs[: n // 8] //= 8  # dark
    imgs[n // 8: n // 4] = 255 - imgs[n // 8: n // 4] // 8  # bright
    imgs[-3], imgs[-2], imgs[-1] = 0, 255, INPUT.offset
    return imgs


def session(model_or_path, scores: str | None = None) -> ort.InferenceSession:
    """An onnxruntime session that runs the graph as written (no graph optimizations); with
    ``scores``, that tensor (e.g. the input of a trailing softmax) is the output."""
    proto = onnx.load(str(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) \
        else model_or_path
    if scores is not None:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        del proto.graph.output[:]
        proto.graph.output.append(helper.make_tensor_value_info(scores, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Run ``sess`` on ``x`` reshaped to the graph input's rank (in batches of a fixed size if
    the graph fixes one)."""
    inp = sess.get_inputs()[0]
    x = x.reshape(len(x), -1) if len(inp.shape) == 2 else x
    if isinstance(inp.shape[0], int) and inp.shape[0] > 0:  # a fixed batch: pad the last one
        b = inp.shape[0]
        n = len(x)
        x = np.concatenate([x, np.repeat(x[-1:], -n % b, 0)])
        return np.concatenate([sess.run(None, {inp.name: x[i:i + b]})[0]
                               for i in range(0, len(x), b)])[:n]
    return sess.run(None, {inp.name: x})[0]


def export_torch(net, path, x, dynamo: bool, optimize: bool = True):
    """``torch.onnx.export`` of ``net`` on the example ``x`` with a dynamic batch: the dynamo
    exporter (``optimize``: its graph optimizer) or the TorchScript one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"],
                              optimize=optimize, external_data=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("N")}})
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"],
                              output_names=["scores"],
                              dynamic_axes={"x": {0: "N"}, "scores": {0: "N"}})
    return path
