"""ONNX in and out (optional extra ``pip install 'bnn_tol[onnx]'``: ``onnx``, ``onnxruntime``).

:func:`export_onnx` writes a float graph that reproduces the model's predictions exactly:
binarized weights as +-1 initializers (``MatMul`` / ``Conv``), each hidden BatchNorm + sign as
its folded integer comparator (``z = d * (s a) - d t``, ``Where(z >= 0, 1, -1)``: exact in
float32 for integer ``s a < 2^24``), max-pooling, and the output BatchNorm as a ``GatherElements``
into the table of its float32 values for every reachable integer pre-activation (the scores are
torch's, bit for bit). Input ``x``: float32 ``(N, C, H, W)`` in the library's scaling
``(p - 128) / 128``; output ``scores`` ``(N, classes)``.

:func:`import_onnx` reads graphs of another framework: ``MatMul``/``Gemm``/``Conv`` with +-1 weight
initializers (optional bias), ``BatchNormalization``, a sign pattern (``Sign``, or ``Where``
over ``GreaterOrEqual``/``Greater``, optionally after ``Clip``/``HardTanh``), ``MaxPool``
(stride = kernel), ``Flatten``/``Reshape``; the last layer may be followed by ``BatchNormalization``
and ``Softmax``/``LogSoftmax``. It returns a :class:`~bnn_tol.models.BNN`; ``verify=`` an
example input checks the predictions against onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_tol.core.compiled import UnsupportedModel, check_bnn
from bnn_tol.core.models import build
from bnn_tol.interop.bundle import _score_table

__all__ = ["export_onnx", "import_onnx", "OnnxError"]


class OnnxError(UnsupportedModel):
    """A graph that cannot be imported, or ``onnx`` missing (one line naming why)."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise OnnxError("ONNX support needs the optional extra: pip install 'bnn_tol[onnx]' "
                        "(onnx, onnxruntime)") from None
    return onnx, helper, numpy_helper


def export_onnx(model, path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Write ``model`` (a BNN) as an ONNX graph whose predictions equal ``model(x).argmax(1)``.

    Raises:
        UnsupportedModel: what :func:`bnn_tol.bundle.export` refuses (m-bit, biases, strides).
    """
    onnx, helper, numpy_helper = _onnx()
    stages = check_bnn(model, what="ONNX export", need_integer=True).stages
    inits, nodes = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    h = "x"
    one = const("one", np.float32(1.0))
    minus = const("minus_one", np.float32(-1.0))
    zero = const("zero", np.float32(0.0))
    for st in stages:
        k = st.index
        if st.flatten:
            nodes.append(helper.make_node("Flatten", [h], [f"flat{k}"], axis=1))
            h = f"flat{k}"
        wb = st.wb.numpy().astype(np.float32)
        if st.conv:
            pad = [int(v) for v in st.block.layer.padding]
            nodes.append(helper.make_node("Conv", [h, const(f"w{k}", wb)], [f"a{k}"],
                                          pads=pad + pad, strides=[1, 1]))
        else:
            nodes.append(helper.make_node("MatMul", [h, const(f"w{k}", wb.T.copy())], [f"a{k}"]))
        a = f"a{k}"
        shape = (1, -1, 1, 1) if st.conv else (1, -1)
        if st.hidden:
            f = st.folded
            d = f.direction.numpy().astype(np.float32)
            e = np.where(d == 0, np.where(f.const.numpy() > 0, 0.0, -1.0),
                         -d * f.t.numpy().astype(np.float64)).astype(np.float32)
            if np.abs(f.t.numpy()).max(initial=0) >= 2**24:
                raise UnsupportedModel(f"{st.name}: a threshold beyond 2^24 is not exact in "
                                       "float32")
            d_scaled = (d * np.float32(st.scale)).astype(np.float32)  # s a with s = 128 or 1
            nodes += [helper.make_node("Mul", [a, const(f"d{k}", d_scaled.reshape(shape))],
                                       [f"z{k}"]),
                      helper.make_node("Add", [f"z{k}", const(f"e{k}", e.reshape(shape))],
                                       [f"ze{k}"]),
                      helper.make_node("GreaterOrEqual", [f"ze{k}", zero], [f"c{k}"]),
                      helper.make_node("Where", [f"c{k}", one, minus], [f"h{k}"])]
            h = f"h{k}"
            if st.pool:
                nodes.append(helper.make_node("MaxPool", [h], [f"p{k}"],
                                              kernel_shape=[st.pool, st.pool],
                                              strides=[st.pool, st.pool]))
                h = f"p{k}"
        else:
            fan_in = int(wb.reshape(wb.shape[0], -1).shape[1])
            table = _score_table(st.block.bn, fan_in)
            nodes += [helper.make_node("Add", [a, const("offset", np.float32(fan_in))],
                                       ["idxf"]),
                      helper.make_node("Cast", ["idxf"], ["idx"], to=onnx.TensorProto.INT64),
                      helper.make_node("GatherElements", [const("scores_table", table), "idx"],
                                       ["scores"], axis=0)]
    n_classes = stages[-1].wb.shape[0]
    graph = helper.make_graph(
        nodes, "bnn_tol", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                         ["N", *model.in_shape])],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", n_classes])],
        inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="bnn_tol")
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def import_onnx(path: str | os.PathLike, *, in_shape=None, verify=None):
    """Read an ONNX BNN graph (see the module docstring) into a bnn_tol BNN.

    Args:
        path: the ``.onnx`` file.
        in_shape: ``(C, H, W)`` when the graph input is flat.
        verify: optional example input (library scaling); the imported model's predictions
            must equal onnxruntime's on it.

    Raises:
        OnnxError: naming the first node that cannot be mapped.
    """

    onnx, helper, numpy_helper = _onnx()
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 -- any parse failure is a user error here
        raise OnnxError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    g = proto.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            init[n.output[0]] = numpy_helper.to_array(_attr(n, "value"))
    inputs = [i for i in g.input if i.name not in init]
    if len(inputs) != 1:
        raise OnnxError(f"{path}: the graph needs exactly one data input, has {len(inputs)}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim][1:]
    shape = tuple(int(v) for v in (in_shape or dims))
    if len(shape) != 3 or min(shape) < 1:
        raise OnnxError(f"{path}: input shape {dims}; pass in_shape=(C, H, W)")
    spec, params = [], []
    cur = None
    flatten = False
    for n in g.node:
        op = n.op_type
        if op in ("Constant", "Identity", "Dropout"):
            continue
        if op in ("Flatten", "Reshape"):
            flatten = True
        elif op in ("MatMul", "Gemm", "Conv"):
            if cur is not None:
                raise OnnxError(f"node {n.name or op}: a layer without a sign before it")
            wname = n.input[1]
            if wname not in init:
                raise OnnxError(f"node {n.name or op}: weights are not an initializer")
            w = init[wname].astype(np.float32)
            if op == "MatMul" or (op == "Gemm" and not _attr(n, "transB", 0)):
                w = w.T
            if not np.isin(w, (-1.0, 1.0)).all():
                raise OnnxError(f"node {n.name or op}: weights are not +-1 (not a binarized "
                                "layer)")
            bias = init.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if op == "Conv":
                k = int(w.shape[-1])
                pads = _attr(n, "pads", [0, 0, 0, 0])
                if _attr(n, "strides", [1, 1]) != [1, 1] or len(set(pads)) != 1:
                    raise OnnxError(f"node {n.name or op}: only stride-1, symmetric padding")
                cur = {"type": "conv", "in": int(w.shape[1]), "out": int(w.shape[0]),
                       "kernel": k, "padding": int(pads[0])}
            else:
                cur = {"type": "linear", "in": int(w.shape[1]), "out": int(w.shape[0]),
                       "flatten": flatten}
            cur["bias"] = bias is not None
            params.append({"w": w, "b": bias, "bn": None})
            flatten = False
        elif op == "Add" and cur is not None and params[-1]["b"] is None \
                and n.input[1] in init and params[-1]["bn"] is None:
            params[-1]["b"] = init[n.input[1]].reshape(-1).astype(np.float32)
            cur["bias"] = True
        elif op == "BatchNormalization":
            if cur is None:
                raise OnnxError(f"node {n.name or op}: BatchNormalization without a layer")
            scale, b, mean, var = (init[i].astype(np.float32) for i in n.input[1:5])
            params[-1]["bn"] = (scale, b, mean, var)
            cur["bn_eps"] = float(_attr(n, "epsilon", 1e-5))
        elif op in ("Clip", "HardTanh", "HardSigmoid") and cur is not None:
            continue
        elif op in ("Sign", "Where", "GreaterOrEqual", "Greater"):
            if op in ("GreaterOrEqual", "Greater"):
                continue  # the condition of a Where-sign
            if cur is None:
                continue  # the second half of a pattern already closed
            spec.append(cur)
            cur = None
        elif op == "MaxPool":
            k = _attr(n, "kernel_shape")[0]
            if _attr(n, "strides", [k, k]) != [k, k] or any(_attr(n, "pads", [0, 0, 0, 0])):
                raise OnnxError(f"node {n.name or op}: only max-pooling with stride = kernel")
            if not spec:
                raise OnnxError(f"node {n.name or op}: max-pool before the first block")
            spec[-1]["pool"] = int(k)
        elif op in ("Softmax", "LogSoftmax"):
            continue
        else:
            raise OnnxError(f"node {n.name or op}: operator {op} is not part of a BNN pattern")
    if cur is None:
        raise OnnxError(f"{path}: the graph does not end with a layer (class scores)")
    cur["binary_output"] = False
    spec.append(cur)
    model = build("custom", blocks=spec, in_shape=shape, n_classes=int(spec[-1]["out"]))
    with torch.no_grad():
        for block, p in zip(model.blocks, params, strict=True):
            block.layer.weight.copy_(torch.from_numpy(p["w"]).reshape(block.layer.weight.shape))
            if p["b"] is not None:
                block.layer.bias.copy_(torch.from_numpy(p["b"]))
            if p["bn"] is not None:
                scale, b, mean, var = (torch.from_numpy(v) for v in p["bn"])
                block.bn.weight.copy_(scale)
                block.bn.bias.copy_(b)
                block.bn.running_mean.copy_(mean)
                block.bn.running_var.copy_(var)
    model.eval()
    model.meta = {"imported_from": str(path)}
    if verify is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = verify.detach().cpu().numpy().astype(np.float32)
        ref = sess.run(None, {inputs[0].name: x.reshape(len(x), *dims) if dims else x})[0]
        got = model(verify).argmax(1).numpy()
        if not np.array_equal(ref.argmax(1), got):
            raise OnnxError(f"{path}: the imported model's predictions differ from onnxruntime's "
                            f"on {int((ref.argmax(1) != got).sum())} of {len(got)} examples")
    assert isinstance(model, nn.Module)
    return model
