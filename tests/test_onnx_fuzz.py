"""Fuzz the ONNX import (issue 20, "Done when"): mutated graphs are imported with predictions
equal to onnxruntime's, or refused with one line -- never another exception, never a silent
difference.

The graphs: BNNs written with ``onnx.helper`` as other tools write them (fc with Gemm/MatMul,
Sign and Where-signs, Clip, a bias Add, a conv net with max-pooling, a flat graph input) and
graphs exported by the library (``export_onnx``: re-imported from their metadata record while the
graph is exactly the export, else refused). The mutations:
attribute values (changed, added, removed), initializer contents and dims, node order, extra
nodes (dangling or spliced into the chain), rewired inputs, ops swapped for similar ones,
initializers turned into ``Constant`` nodes, other graph input dims and ``in_shape``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from _helpers import small_bnn  # noqa: E402
from _onnx_graphs import G, conv_graph, fc_graph, ort_run, probe_images, session  # noqa: E402
from onnx import AttributeProto, helper, numpy_helper  # noqa: E402

from bnn_tol.core.compiled import compile_model  # noqa: E402
from bnn_tol.data import to_float  # noqa: E402
from bnn_tol.exceptions import BnnTolError  # noqa: E402
from bnn_tol.interop.onnx import export_onnx, import_onnx  # noqa: E402


def _bases() -> dict[str, tuple[bytes, tuple[int, ...] | None]]:
    """Valid graphs (serialized) and the in_shape they import with."""
    out = {}
    out["fc-gemm-sign"] = (fc_graph(seed=1).model(), None)
    out["fc-matmul-where"] = (fc_graph(seed=2, sign="where", layer="matmul", head="").model(),
                              None)
    g = G(seed=3).flatten().gemm(64, 20, bias=True).bn(20, 4.0).clip().sign()
    g.matmul(20, 15)
    g.node("Add", g.const(g.rng.normal(0, 1, 15).astype(np.float32), "B"))
    g.where_sign().gemm(15, 10)
    out["fc-bias-clip"] = (g.model(), None)
    out["conv"] = (conv_graph(seed=4).model(), None)
    g = G(("N", 64), seed=5).gemm(64, 16).bn(16, 4.0).sign().gemm(16, 10).bn(10, 3.0)
    out["flat-input"] = (g.model(), (1, 8, 8))
    with tempfile.TemporaryDirectory() as d:
        for arch, kw in (("fc", {"hidden": (16, 12)}),
                         ("vgg3", {"channels": ((4,), (4,)), "fc_width": 12})):
            path = export_onnx(small_bnn(arch, kw), Path(d) / f"{arch}.onnx")
            out[f"export-{arch}"] = (onnx.load(str(path)), None)
    return {k: (m.SerializeToString(), s) for k, (m, s) in out.items()}


BASES = _bases()

SWAPS = {
    "Sign": ["Relu", "Tanh", "Softsign", "HardSigmoid", "Neg", "Identity", "Abs", "Sigmoid"],
    "GreaterOrEqual": ["Greater", "Less", "LessOrEqual", "Equal"],
    "Greater": ["GreaterOrEqual", "Less"],
    "Gemm": ["MatMul"], "MatMul": ["Gemm"],
    "MaxPool": ["AveragePool", "LpPool"],
    "Softmax": ["LogSoftmax", "Hardmax", "Sigmoid"], "LogSoftmax": ["Softmax"],
    "BatchNormalization": ["InstanceNormalization"],
    "Flatten": ["Identity"], "Clip": ["Identity", "Relu"], "Where": ["Max"],
    "Conv": ["ConvTranspose"], "Add": ["Sub", "Mul"], "Mul": ["Add", "Div"],
    "Cast": ["Identity"], "GatherElements": ["Gather"],
}
KNOWN_ATTRS = {
    "Gemm": ["alpha", "beta", "transA", "transB"],
    "Conv": ["dilations", "group", "strides", "pads", "auto_pad", "kernel_shape"],
    "MaxPool": ["kernel_shape", "strides", "pads", "dilations", "ceil_mode", "auto_pad",
                "storage_order"],
    "BatchNormalization": ["epsilon", "momentum", "training_mode"],
    "Flatten": ["axis"], "Softmax": ["axis"], "LogSoftmax": ["axis"],
}
FLOATS = [0.0, 1.0, -1.0, 2.0, 0.5, 1e-5, 0.7, math.nan, math.inf]
INTS = [0, 1, 2, -1, 3, -2]
LISTS = [[1, 1], [2, 2], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [3, 3], [1], [], [2, 1]]
STRINGS = [b"NOTSET", b"SAME_UPPER", b"SAME_LOWER", b"VALID", b"x"]


def _value(data, kind):
    if kind == AttributeProto.FLOAT:
        return data.draw(st.sampled_from(FLOATS))
    if kind == AttributeProto.INT:
        return data.draw(st.sampled_from(INTS))
    if kind == AttributeProto.INTS:
        return data.draw(st.sampled_from(LISTS))
    return data.draw(st.sampled_from(STRINGS))


def _kind_of(name):
    if name in ("alpha", "beta", "epsilon", "momentum"):
        return AttributeProto.FLOAT
    if name in ("dilations", "strides", "pads", "kernel_shape"):
        return AttributeProto.INTS
    if name == "auto_pad":
        return AttributeProto.STRING
    return AttributeProto.INT


def _tensors(g) -> list[str]:
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    return names + [o for n in g.node for o in n.output if o]


def m_attr_value(g, data):
    nodes = [n for n in g.node if n.attribute]
    if not nodes:
        return
    n = data.draw(st.sampled_from(nodes))
    a = data.draw(st.sampled_from(list(n.attribute)))
    if a.type in (AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.INTS,
                  AttributeProto.STRING):
        a.CopyFrom(helper.make_attribute(a.name, _value(data, a.type), attr_type=a.type))


def m_attr_add_or_remove(g, data):
    n = data.draw(st.sampled_from(list(g.node)))
    if n.attribute and data.draw(st.booleans()):
        del n.attribute[data.draw(st.integers(0, len(n.attribute) - 1))]
        return
    name = data.draw(st.sampled_from(KNOWN_ATTRS.get(n.op_type, []) + ["foo"]))
    kind = _kind_of(name)
    value = _value(data, kind)
    for i, a in enumerate(n.attribute):
        if a.name == name:
            del n.attribute[i]
            break
    n.attribute.append(helper.make_attribute(name, value, attr_type=kind))


def m_init_values(g, data):
    t = data.draw(st.sampled_from(list(g.initializer)))
    try:
        arr = numpy_helper.to_array(t).copy()
    except Exception:  # noqa: BLE001
        return
    if arr.dtype.kind not in "fi" or arr.size == 0:
        return
    how = data.draw(st.sampled_from(["neg", "scale", "elem", "flip", "zeros", "normal"]))
    flat = arr.reshape(-1)
    if how == "neg":
        flat *= -1
    elif how == "scale":
        flat *= data.draw(st.sampled_from([2, 0, 3]))
    elif how in ("elem", "flip"):
        i = data.draw(st.integers(0, flat.size - 1))
        flat[i] = -flat[i] if how == "flip" else (
            data.draw(st.sampled_from([0, -1, 1, 2])) if arr.dtype.kind == "i"
            else data.draw(st.sampled_from([0.0, 0.5, -1.0, math.nan, math.inf, 1e30])))
    elif how == "zeros":
        flat[:] = 0
    else:
        flat[:] = np.random.default_rng(data.draw(st.integers(0, 9))).normal(0, 2, flat.size)
    t.CopyFrom(numpy_helper.from_array(flat.reshape(arr.shape), t.name))


def m_init_dims(g, data):
    t = data.draw(st.sampled_from(list(g.initializer)))
    dims = list(t.dims)
    how = data.draw(st.sampled_from(["swap", "add1", "drop", "plus1", "huge", "reshape"]))
    if how == "swap" and len(dims) >= 2:
        dims[0], dims[1] = dims[1], dims[0]
    elif how == "add1":
        dims = [1, *dims]
    elif how == "drop" and dims:
        dims = dims[1:]
    elif how == "plus1" and dims:
        dims[-1] += 1
    elif how == "huge":
        dims = [100000, 100000]
    elif how == "reshape" and dims and math.prod(dims) % 2 == 0:
        dims = [2, math.prod(dims) // 2]
    del t.dims[:]
    t.dims.extend(dims)


def m_node_order(g, data):
    if len(g.node) < 2:
        return
    i = data.draw(st.integers(0, len(g.node) - 1))
    j = data.draw(st.integers(0, len(g.node) - 1))
    a, b = onnx.NodeProto(), onnx.NodeProto()
    a.CopyFrom(g.node[i])
    b.CopyFrom(g.node[j])
    g.node[i].CopyFrom(b)
    g.node[j].CopyFrom(a)


def m_extra_node(g, data):
    src = data.draw(st.sampled_from(_tensors(g)))
    op = data.draw(st.sampled_from(["Identity", "Neg", "Relu", "Sign", "Flatten", "MatMul",
                                    "Add", "Abs"]))
    out = f"extra_{len(g.node)}"
    ins = [src]
    if op in ("MatMul", "Add"):
        c = f"extra_c_{len(g.initializer)}"
        arr = np.ones((1,), np.float32) if op == "Add" else np.ones((24, 10), np.float32)
        g.initializer.append(numpy_helper.from_array(arr, c))
        ins.append(c)
    node = helper.make_node(op, ins, [out], name=out)
    pos = data.draw(st.integers(0, len(g.node)))
    if data.draw(st.booleans()):  # splice into the chain: the old consumers read the new node
        for n in g.node:
            for k, i in enumerate(n.input):
                if i == src:
                    n.input[k] = out
        for o in g.output:
            if o.name == src:
                o.name = out
    g.node.insert(pos, node)


def m_rewire(g, data):
    nodes = [n for n in g.node if n.input]
    n = data.draw(st.sampled_from(nodes))
    k = data.draw(st.integers(0, len(n.input) - 1))
    n.input[k] = data.draw(st.sampled_from(_tensors(g) + [""]))


def m_swap_op(g, data):
    nodes = [n for n in g.node if n.op_type in SWAPS]
    if not nodes:
        return
    n = data.draw(st.sampled_from(nodes))
    n.op_type = data.draw(st.sampled_from(SWAPS[n.op_type]))
    if data.draw(st.booleans()):
        del n.attribute[:]


def m_constant_node(g, data):
    t = data.draw(st.sampled_from(list(g.initializer)))
    try:  # a tensor broken by an earlier mutation goes into the Constant as it is
        arr = numpy_helper.to_array(t) if math.prod(t.dims) < 10**6 else None
    except ValueError:
        arr = None
    if arr is not None and arr.size == 1 and arr.dtype == np.float32 and data.draw(st.booleans()):
        node = helper.make_node("Constant", [], [t.name], value_float=float(arr.reshape(-1)[0]))
    else:
        node = helper.make_node("Constant", [], [t.name], value=t)
    g.initializer.remove(t)
    g.node.insert(0, node)


def m_input_dims(g, data):
    dims = g.input[0].type.tensor_type.shape.dim
    k = data.draw(st.integers(0, len(dims) - 1))
    how = data.draw(st.sampled_from(["symbolic", "value"]))
    if how == "symbolic":
        dims[k].dim_param = "d"
    else:
        dims[k].dim_value = data.draw(st.sampled_from([1, 2, 7, 9, 64, 100000]))


#: Value mutations are drawn more often: they leave more graphs importable, which exercises the
#: verification against onnxruntime rather than the structural refusals.
MUTATIONS = [m_init_values, m_init_values, m_init_values, m_attr_value, m_attr_value,
             m_attr_add_or_remove, m_init_dims, m_node_order, m_extra_node, m_rewire, m_swap_op,
             m_constant_node, m_constant_node, m_input_dims]
IN_SHAPES = [None, (1, 8, 8), (1, 4, 16), (2, 4, 8), (1, 8, 9), (64,), (0, 8, 8)]


def _scores_name(g) -> str:
    out = g.output[0].name
    for n in g.node:
        if out in n.output and n.op_type in ("Softmax", "LogSoftmax") and n.input:
            return n.input[0]
    return out


def _check(data, workdir: Path) -> str:
    """One mutated graph: refused in one line, or equal to onnxruntime. Returns the outcome."""
    name = data.draw(st.sampled_from(sorted(BASES)))
    blob, in_shape = BASES[name]
    proto = onnx.ModelProto.FromString(blob)
    for mutate in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        mutate(proto.graph, data)
    if data.draw(st.integers(0, 9)) == 0:
        in_shape = data.draw(st.sampled_from(IN_SHAPES))
    path = workdir / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    try:
        model = import_onnx(path, in_shape=in_shape)
    except BnnTolError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        event(f"{name}: refused")
        return "refused"
    compile_model(model)  # the library can use what it imported
    x = to_float(probe_images(model.in_shape, n=64, seed=11))
    ref = ort_run(session(proto, _scores_name(proto.graph)), x.numpy())
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert ref.shape[0] == len(pred)
    # the imported prediction is onnxruntime's best class (tie-tolerant)
    np.testing.assert_array_equal(ref[np.arange(len(pred)), pred], ref.max(1))
    event(f"{name}: imported")
    return "imported"


_FUZZ = dict(deadline=None, derandomize=True, database=None,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                    HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(max_examples=200, **_FUZZ)
@given(data=st.data())
def test_mutated_graphs_import_exactly_or_are_refused_in_one_line(data, workdir):
    _check(data, workdir)


@pytest.mark.slow
@settings(max_examples=3000, **_FUZZ)
@given(data=st.data())
def test_mutated_graphs_import_exactly_or_are_refused_in_one_line_long(data, workdir):
    _check(data, workdir)


def test_the_unmutated_bases_import(workdir):
    for name, (blob, in_shape) in BASES.items():
        path = workdir / f"{name}.onnx"
        path.write_bytes(blob)
        model = import_onnx(path, in_shape=in_shape)
        proto = onnx.ModelProto.FromString(blob)
        x = to_float(probe_images(model.in_shape, n=64, seed=11))
        ref = ort_run(session(proto, _scores_name(proto.graph)), x.numpy())
        with torch.no_grad():
            np.testing.assert_array_equal(ref.argmax(1), model(x).argmax(1).numpy())

