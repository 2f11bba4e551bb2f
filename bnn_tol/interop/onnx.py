"""ONNX in and out (optional extra ``pip install 'bnn_tol[onnx]'``: ``onnx``, ``onnxruntime``).

:func:`export_onnx` writes a float graph that reproduces the model's predictions exactly:
binarized weights as +-1 initializers (``MatMul`` / ``Conv``), each hidden BatchNorm + sign as
its folded integer comparator (``z = d * (s a) - d t``, ``Where(z >= 0, 1, -1)``: exact in
float32 for integer ``s a < 2^24``), max-pooling, and the output BatchNorm as a ``GatherElements``
into the table of its float32 values for every reachable integer pre-activation (the scores are
torch's, bit for bit). Input ``x``: float32 ``(N, C, H, W)`` in the library's scaling
``(p - 128) / 128``; output ``scores`` ``(N, classes)``.

:func:`import_onnx` reads graphs of another framework by following their data flow from the
graph input to the output (one chain: no branches, no node off the path; nodes are matched by
their inputs and outputs, not by their order in the file):

    [Flatten | Reshape(N, -1)] -> Gemm | MatMul | Conv with +-1 weights [-> Add bias]
        [-> BatchNormalization] [-> Clip(min < 0 < max)] -> sign [-> MaxPool]    (hidden block)
    [Flatten | Reshape(N, -1)] -> Gemm | MatMul [-> Add bias] [-> BatchNormalization]
        [-> Softmax | LogSoftmax]                                                 (output block)

where sign is ``Sign`` or ``Where(GreaterOrEqual(x, 0), 1, -1)`` (``Greater``: 0 -> -1), and
Identity/Dropout may sit anywhere. Before that, what torch's exporters compute besides the layers
is evaluated: nodes on constants (weights binarized in the graph, ``Transpose``, ``Identity``
aliases of deduplicated initializers) and on the data's shape (``Shape``, ``ConstantOfShape``,
``Expand``, ``Gather``, ``Concat``: ``ones_like(x)``, ``x.view(x.size(0), -1)`` with a dynamic
batch), see :func:`_fold`. Layer weights may be +-1 or +-s with one scale ``s > 0`` per output
channel (a BatchNorm folded into the layer by torch's dynamo exporter, XNOR-Net's
``alpha_o``): the scale is folded into the block's BatchNorm (:func:`_absorb_scale`; exact in
real arithmetic, the scores verified to a stated float32 tolerance). QONNX's 1-bit
``BipolarQuant`` (Brevitas' QONNX export) is read on weights and, with scale 1, as the sign
activation (:func:`_qonnx`). A graph written by
:func:`export_onnx` re-imports as the exported model (its metadata record, see there). Every
attribute is honoured or refused naming the node and attribute, shapes are checked before
anything is built, and the result is verified against onnxruntime when it is installed (see
:func:`import_onnx`). It returns a
:class:`~bnn_tol.models.BNN` or raises :class:`OnnxError` in one line.
"""

from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from bnn_tol.core.compiled import UnsupportedModel, check_bnn, compile_model
from bnn_tol.core.models import BNN, build
from bnn_tol.data import INPUT, grid_of
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.interop.adapt import _LIBRARY, adapt
from bnn_tol.interop.bundle import _score_table

__all__ = ["export_onnx", "import_onnx", "OnnxError"]

#: The metadata key under which :func:`export_onnx` records the model's block spec and
#: BatchNorm state, so that :func:`import_onnx` gives back the same model (a score table and
#: folded comparators do not determine the BatchNorm parameters).
_META = "bnn_tol.model"


class OnnxError(UnsupportedModel):
    """A graph that cannot be imported, or ``onnx`` missing (one line naming why)."""


class _Branching(OnnxError):
    """The data flow branches (a tensor feeds several nodes): not a chain of blocks."""


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

    The file also records the model's block spec and BatchNorm state in its metadata
    (``metadata_props["bnn_tol.model"]``), so that :func:`import_onnx` gives back the same
    model: weights, BatchNorms, scores and sweeps bit for bit. The record is used only while the
    graph is exactly what this function writes for it (the +-1 weights are read from the
    graph); a file edited otherwise (or written before the record existed) is refused by
    :func:`import_onnx` in one line.

    Raises:
        UnsupportedModel: what :func:`bnn_tol.bundle.export` refuses (m-bit, biases, strides).
    """
    onnx, _, _ = _onnx()
    proto = _export_proto(model, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _spec(model) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``models.build("custom", blocks=...)`` spec of an exportable BNN and the state of its
    BatchNorms (float32 values as exact Python floats), as recorded in an export's metadata."""
    spec, bns = [], []
    for st in check_bnn(model, what="ONNX export", need_integer=True).stages:
        layer, bn = st.block.layer, st.block.bn
        d: dict[str, Any] = {"type": "conv" if st.conv else "linear",
                             "in": int(layer.weight.shape[1]), "out": int(layer.weight.shape[0]),
                             "bias": False, "flatten": bool(st.flatten),
                             "bn_eps": float(bn.eps), "bn_affine": bool(bn.affine)}
        if st.conv:
            pad = layer.padding
            d.update(kernel=int(layer.weight.shape[-1]),
                     padding=int(pad if isinstance(pad, int) else pad[0]))
        if st.pool:
            d["pool"] = int(st.pool)
        if not st.hidden:
            d["binary_output"] = False
        spec.append(d)
        state = {"running_mean": bn.running_mean, "running_var": bn.running_var}
        if bn.affine:
            state.update(weight=bn.weight, bias=bn.bias)
        bns.append({k: [float(v) for v in t.detach().cpu().float().reshape(-1).tolist()]
                    for k, t in state.items()})
    return spec, bns


def _export_proto(model, opset: int) -> Any:
    """The ONNX ModelProto :func:`export_onnx` writes (see there)."""
    onnx, helper, numpy_helper = _onnx()
    spec, bn_state = _spec(model)
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
    record = {"format": 1, "in_shape": list(model.in_shape), "blocks": spec, "bn": bn_state}
    if grid_of(model) != INPUT:  # the graph's input x = q / scale on the model's own grid
        record["input_grid"] = grid_of(model).config()
    helper.set_model_props(proto, {_META: json.dumps(record)})
    onnx.checker.check_model(proto)
    return proto


# -- import ------------------------------------------------------------------------------------

#: The most values one sample may have in any tensor of an imported graph (input, activations),
#: and the most values one onnxruntime run may take when the graph fixes its batch size.
MAX_VALUES = 2**20
#: float32 holds every integer below 2^24 exactly: the bound on ``|k|`` of a pre-activation on
#: its grid (the first layer: ``k = scale a``), so the layers' sums are exact in every runtime.
_EXACT = 2**24
#: Constants larger than this (values) are refused before their data is read.
_MAX_CONST = 2**28
#: The oldest opset whose operators mean what this module assumes (Gemm without ``broadcast``).
_MIN_OPSET = 7
#: The operators an imported graph may contain and the attributes each may carry.
_OPS: dict[str, frozenset[str]] = {
    "Gemm": frozenset({"alpha", "beta", "transA", "transB"}),
    "MatMul": frozenset(),
    "Conv": frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}),
    "Add": frozenset(),
    "BatchNormalization": frozenset({"epsilon", "momentum", "spatial", "training_mode"}),
    "Clip": frozenset({"min", "max"}),
    "Sign": frozenset(), "GreaterOrEqual": frozenset(), "Greater": frozenset(),
    "Where": frozenset(),
    "MaxPool": frozenset({"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads",
                          "storage_order", "strides"}),
    "Flatten": frozenset({"axis"}), "Reshape": frozenset({"allowzero"}),
    "Softmax": frozenset({"axis"}), "LogSoftmax": frozenset({"axis"}),
    "Identity": frozenset(), "Dropout": frozenset({"ratio", "seed"}),
}
_LAYERS = ("Gemm", "MatMul", "Conv")
#: What a sign pattern gives at exactly 0 (the library's sign gives +1).
_AT_ZERO = {"Sign": 0, "Greater": -1, "GreaterOrEqual": 1}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class _Node:
    """One graph node with its label (``Gemm node 'fc1'`` or ``Gemm node #3``) and attributes."""

    def __init__(self, proto: Any, index: int) -> None:
        from onnx import helper

        self.proto = proto
        self.op = proto.op_type
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.label = f"{self.op} node {proto.name!r}" if proto.name else f"{self.op} node #{index}"
        self.attrs: dict[str, Any] = {}
        for a in proto.attribute:
            try:
                v = helper.get_attribute_value(a)
            except Exception as e:  # noqa: BLE001 -- a malformed attribute is the file's fault
                raise OnnxError(f"{self.label}: attribute {a.name!r} cannot be read "
                                f"({_first_line(e)})") from None
            self.attrs[a.name] = v.decode(errors="replace") if isinstance(v, bytes) else v

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def _array(t: Any, what: str) -> np.ndarray:
    """A TensorProto as an array, its dims and data checked before anything is allocated."""
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL or t.external_data:
        raise OnnxError(f"{what} keeps its data in an external file, which is not read: save "
                        "the graph with its data inside")
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims) or math.prod(dims) > _MAX_CONST:
        raise OnnxError(f"{what}: dims {dims} are negative or too large (more than 2^28 values)")
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # noqa: BLE001 -- any decoding failure is the file's fault
        raise OnnxError(f"{what}: its data does not match its dims {dims} and type "
                        f"({_first_line(e)})") from None
    if tuple(arr.shape) != tuple(dims):
        raise OnnxError(f"{what}: {arr.size} values do not fill its dims {dims}")
    return arr


def _constant(n: _Node) -> np.ndarray:
    """The value of a ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``)."""
    if len(n.attrs) != 1 or len(n.outputs) != 1:
        raise OnnxError(f"{n.label}: a Constant needs exactly one value attribute and one output")
    (name, v), = n.attrs.items()
    if name == "value":
        return _array(v, f"{n.label} value")
    if name in ("value_float", "value_floats"):
        return np.asarray(v, dtype=np.float32)
    if name in ("value_int", "value_ints"):
        return np.asarray(v, dtype=np.int64)
    raise OnnxError(f"{n.label}: a Constant with {name} is not supported")


@dataclass
class _Block:
    """One block read from the graph: the layer, its parameters and the nodes after it."""

    layer: _Node
    conv: bool
    w: np.ndarray  # (out, in) or (out, in, k, k), +-1 float32
    preact: tuple[int, ...]  # per sample, the layer's output
    padding: int = 0
    bias: np.ndarray | None = None
    bn: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # scale, B, mean, var
    eps: float = 0.0
    clipped: bool = False
    compare: _Node | None = None  # a GreaterOrEqual/Greater waiting for its Where
    sign: str | None = None  # "Sign", "Greater", "GreaterOrEqual"; None: the output block
    sign_node: _Node | None = None
    post: list[_Node] = field(default_factory=list)  # the nodes from the layer output to the sign
    pool: int | None = None
    layer_bias: np.ndarray | None = None  # the layer's own bias input (Gemm C, Conv B)
    wscale: np.ndarray | None = None  # weights +-s per output channel: s (> 0)

    @property
    def pre(self) -> str:
        """The layer's output tensor (the input of the nodes after it)."""
        return self.layer.outputs[0]


@dataclass
class _Io:
    """The graph input: its name, its per-sample shape in the graph, the library's ``in_shape``
    and a fixed batch size (``None`` when the batch dimension is free)."""

    name: str
    shape: tuple[int, ...]
    in_shape: tuple[int, int, int]
    batch: int | None


class _Graph:
    """A loaded graph: constants (initializers and Constant nodes) as checked arrays, the other
    nodes, the consumers of every tensor, the data input and the output."""

    def __init__(self, proto: Any, where: str) -> None:
        self.where = where
        self.at: _Node | None = None  # the node being read (named by an unforeseen failure)
        self.batch_first: set[str] = set()  # Reshape shapes [N, ...] computed from the data
        self.proto = proto
        opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
        if not opsets or opsets[0] < _MIN_OPSET:
            raise OnnxError(f"{where}: ONNX opset {opsets[0] if opsets else 'missing'}; "
                            f"import needs opset {_MIN_OPSET} or later")
        self.opset = int(opsets[0])
        g = proto.graph
        self.const: dict[str, np.ndarray] = {
            t.name: _array(t, f"initializer {t.name!r}") for t in g.initializer}
        self.nodes: list[_Node] = []
        for i, p in enumerate(g.node):
            n = _Node(p, i)
            if p.domain not in ("", "ai.onnx"):
                raise OnnxError(f"{n.label}: operator domain {p.domain!r} is not supported "
                                "(standard ONNX operators only)")
            if n.op == "Constant":
                self.const[n.outputs[0]] = _constant(n)
            else:
                self.nodes.append(n)
        _fold(self)
        self.consumers: dict[str, list[_Node]] = {}
        for n in self.nodes:
            for name in dict.fromkeys(i for i in n.inputs if i):
                self.consumers.setdefault(name, []).append(n)
        data = [i for i in g.input if i.name not in self.const]
        if len(data) != 1:
            raise OnnxError(f"{where}: the graph needs exactly one data input, has {len(data)} "
                            f"({', '.join(repr(i.name) for i in data) or 'none'})")
        self.input = data[0]
        if len(g.output) != 1:
            raise OnnxError(f"{where}: the graph needs exactly one output (the class scores), "
                            f"has {len(g.output)}")
        self.output = g.output[0]

    def input_name(self, n: _Node, k: int, what: str) -> str:
        """The name of input ``k`` of ``n``, a constant (refused if missing)."""
        if len(n.inputs) <= k or n.inputs[k] not in self.const:
            raise OnnxError(f"{n.label}: its {what} (input {k}) is missing")
        return n.inputs[k]

    def f32(self, n: _Node, name: str, what: str) -> np.ndarray:
        """Constant ``name`` (an input of ``n``) as finite float32."""
        if name not in self.const:
            raise OnnxError(f"{n.label}: its {what} {name!r} is not a constant")
        arr = self.const[name]
        if arr.dtype != np.float32:
            raise OnnxError(f"{n.label}: {what} {name!r} is {arr.dtype}; the graph computes in "
                            "float32")
        if not np.isfinite(arr).all():
            raise OnnxError(f"{n.label}: {what} {name!r} holds NaN or infinite values")
        return arr

    def chain(self) -> tuple[list[_Node], str]:
        """The nodes from the data input to the output, following the data flow: each tensor
        feeds exactly one node, whose other inputs are constants; every node is on the path."""
        cur, chain, seen = self.input.name, [], set()
        while cur != self.output.name:
            users = self.consumers.get(cur, [])
            after = f" (the output of {chain[-1].label})" if chain else " (the graph input)"
            if not users:
                raise OnnxError(f"tensor {cur!r}{after} feeds no node and is not the graph "
                                f"output {self.output.name!r}")
            if len(users) > 1:
                raise _Branching(f"tensor {cur!r}{after} feeds {len(users)} nodes "
                                f"({', '.join(u.label for u in users[:3])}): only a chain of "
                                "layers can be imported (no branches)")
            n = users[0]
            if id(n) in seen:
                raise OnnxError(f"{n.label}: the graph has a cycle")
            seen.add(id(n))
            chain.append(n)
            if n.inputs.count(cur) != 1:
                raise OnnxError(f"{n.label}: uses the data tensor {cur!r} more than once")
            for i in n.inputs:
                if i and i != cur and i not in self.const:
                    raise OnnxError(f"{n.label}: input {i!r} is neither the data flowing "
                                    "through the chain nor a constant (initializer or Constant)")
            self._one_output(n)
            cur = n.outputs[0]
        if self.consumers.get(cur):
            raise OnnxError(f"the output {cur!r} also feeds {self.consumers[cur][0].label}")
        off = [n for n in self.nodes if id(n) not in seen]
        if off:
            raise OnnxError(f"{off[0].label} is not on the path from the input "
                            f"{self.input.name!r} to the output {self.output.name!r}")
        return chain, cur

    def _one_output(self, n: _Node) -> None:
        """``n`` has a first output and no other output that is read."""
        if not n.outputs or not n.outputs[0]:
            raise OnnxError(f"{n.label}: has no output")
        for o in n.outputs[1:]:
            if o and (o in self.consumers or o == self.output.name):
                raise OnnxError(f"{n.label}: its second output {o!r} is used; only the "
                                "first output of a node can be imported")

    def dag(self) -> list[_Node]:
        """The nodes in an evaluation order, for a data flow that branches and joins (a
        residual BNN: a tensor read by a layer and by a shortcut ``Add``): every non-constant
        input of a node is the data input or the first output of another node, no cycle, every
        node on a path from the data input to the output, no second output used."""
        made, order = {self.input.name}, []
        for n in self.nodes:
            self._one_output(n)
        produced = {n.outputs[0] for n in self.nodes}
        pending = list(self.nodes)
        while pending:
            ready = [n for n in pending
                     if all(i in made or i in self.const for i in n.inputs if i)]
            if not ready:
                n = pending[0]
                i = next(i for i in n.inputs if i and i not in made and i not in self.const)
                raise OnnxError(f"{n.label}: the graph has a cycle" if i in produced else
                                f"{n.label}: input {i!r} is neither the data, a node's output "
                                "nor a constant (initializer or Constant)")
            for n in ready:
                order.append(n)
                made.add(n.outputs[0])
                pending.remove(n)
        if self.output.name not in made:
            raise OnnxError(f"the output {self.output.name!r} is not computed from the input "
                            f"{self.input.name!r}")
        needed, reached = {self.output.name}, {self.input.name}
        for n in reversed(order):  # backwards from the output
            if n.outputs[0] in needed:
                needed.update(i for i in n.inputs if i and i not in self.const)
        for n in order:  # forwards from the input
            if any(i in reached for i in n.inputs if i):
                reached.add(n.outputs[0])
        for n in order:
            if n.outputs[0] not in needed or n.outputs[0] not in reached:
                raise OnnxError(f"{n.label} is not on a path from the input "
                                f"{self.input.name!r} to the output {self.output.name!r}")
        return order


#: Operators evaluated at import when all their inputs are constants, or shapes of the data:
#: what torch's exporters write for a BNN besides its layers (weights binarized in the graph,
#: ``Identity`` aliases of deduplicated initializers, ``ones_like``/``x.view(x.size(0), -1)``
#: computed from ``Shape``). Other operators on constants are left to the chain (and refused
#: there by name).
_FOLD = frozenset({
    "Identity", "Cast", "Transpose", "Neg", "Abs", "Sign", "Not", "Reshape", "Unsqueeze",
    "Squeeze", "Concat", "Gather", "Slice", "Flatten", "GreaterOrEqual", "Greater", "Less",
    "LessOrEqual", "Equal", "Where", "Mul", "Add", "Sub", "Div", "ConstantOfShape", "Expand",
    "Shape", "Size", "CastLike"})
#: The foldable operators whose output takes the broadcast shape of their inputs.
_BROADCAST = frozenset({"Where", "Mul", "Add", "Sub", "Div", "GreaterOrEqual", "Greater", "Less",
                        "LessOrEqual", "Equal"})


def _dims(t: Any) -> list[int] | None:
    """The dims of a tensor TypeProto, ``None`` unless all are known."""
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = t.tensor_type.shape.dim
    return [int(d.dim_value) for d in dims] if all(d.HasField("dim_value") for d in dims) \
        else None


def _infer(gr: _Graph, n: _Node, types: dict[str, Any], values: dict[str, np.ndarray]
           ) -> dict[str, Any]:
    """The output types of a node on the data (onnx's shape inference for this one node, the
    constants it reads given by value); ``{}`` where they cannot be inferred."""
    from onnx import defs, helper, numpy_helper, shape_inference

    try:
        schema = defs.get_schema(n.op, gr.opset, "")
        ins, data = {}, {}
        for i in n.inputs:
            if not i:
                continue
            if i in values:
                arr = values[i]
                ins[i] = helper.make_tensor_type_proto(
                    helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
                if arr.size <= 64:  # shapes, axes, thresholds: the inference may read them
                    data[i] = numpy_helper.from_array(arr, i)
            elif i in types:
                ins[i] = types[i]
            else:
                return {}
        return shape_inference.infer_node_outputs(
            schema, n.proto, ins, data, opset_imports=list(gr.proto.opset_import))
    except Exception:  # noqa: BLE001 -- unknown: a Shape of it is refused by name
        return {}


def _fold_once(gr: _Graph, batch: int) -> tuple[dict[str, np.ndarray], list[_Node]]:
    """Evaluate the foldable nodes (:data:`_FOLD` on constants; ``Shape``/``Size`` of the data,
    ``CastLike`` to the data's type) in file order (topological: ``onnx.checker``), inferring
    the data's types node by node with the graph input's batch size set to ``batch``: their
    outputs and the folded nodes."""
    from onnx import TypeProto, helper
    from onnx.reference import ReferenceEvaluator

    values = dict(gr.const)
    folded: list[_Node] = []
    types: dict[str, Any] = {}
    for v in gr.proto.graph.input:
        if v.name not in values and v.type.tensor_type.shape.dim:
            t = TypeProto()
            t.CopyFrom(v.type)
            t.tensor_type.shape.dim[0].dim_value = batch
            types[v.name] = t
    for n in gr.nodes:
        ins = [i for i in n.inputs if i]
        if n.op in _FOLD and ins:
            if n.op in ("Shape", "Size") and ins[0] not in values:
                dims = _dims(types.get(ins[0]))
                if dims is None:
                    raise OnnxError(f"{n.label}: the shape of {ins[0]!r} is not known (onnx "
                                    "shape inference): cannot evaluate it")
                arr = np.array(dims, dtype=np.int64)
                values[n.outputs[0]] = np.array(math.prod(dims), dtype=np.int64) \
                    if n.op == "Size" else arr[n.attr("start", 0):n.attr("end", len(dims))]
                folded.append(n)
                continue
            like = types.get(ins[1]) if n.op == "CastLike" and len(ins) == 2 else None
            if like is not None and ins[0] in values and ins[1] not in values:
                dtype = helper.tensor_dtype_to_np_dtype(like.tensor_type.elem_type)
                values[n.outputs[0]] = values[ins[0]].astype(dtype)
                folded.append(n)
                continue
            if all(i in values for i in ins):
                values.update(_evaluate(n, [values[i] if i else None for i in n.inputs],
                                        gr.opset, ReferenceEvaluator))
                folded.append(n)
                continue
        types.update(_infer(gr, n, types, values))
    return values, folded


def _evaluate(n: _Node, args: list, opset: int, evaluator: Any) -> dict[str, np.ndarray]:
    """One node on constant inputs (onnx's reference implementation), sizes bounded first."""
    arrays = [np.asarray(a) for a in args if a is not None]
    try:
        if n.op == "ConstantOfShape":
            shape = tuple(int(v) for v in arrays[0].reshape(-1))
        elif n.op == "Expand":
            shape = np.broadcast_shapes(arrays[0].shape,
                                        tuple(int(v) for v in arrays[1].reshape(-1)))
        elif n.op in _BROADCAST:
            shape = np.broadcast_shapes(*(a.shape for a in arrays))
        else:  # no larger than all its inputs together (reshapes, concat, gather, ...)
            shape = (sum(a.size for a in arrays),)
    except (ValueError, TypeError, IndexError) as e:
        raise OnnxError(f"{n.label}: its constant inputs do not fit together "
                        f"({_first_line(e)})") from None
    if any(d < 0 for d in shape) or math.prod(shape) > _MAX_CONST:
        raise OnnxError(f"{n.label}: its result would have dims {list(shape)} (negative or more "
                        "than 2^28 values)")
    feed = {f"i{k}": a for k, a in enumerate(args) if a is not None}
    node = n.proto.__class__()
    node.CopyFrom(n.proto)
    del node.input[:], node.output[:]
    node.input.extend(f"i{k}" if a is not None else "" for k, a in enumerate(args))
    node.output.extend(f"o{k}" for k in range(len(n.outputs)))
    node.domain = ""
    try:
        out = evaluator(node, opsets={"": opset}).run(None, feed)
    except Exception as e:  # noqa: BLE001 -- the graph's constants are the file's fault
        raise OnnxError(f"{n.label}: cannot be evaluated on its constant inputs "
                        f"({_first_line(e)})") from None
    return {name: np.asarray(v) for name, v in zip(n.outputs, out, strict=False) if name}


def _fold(gr: _Graph) -> None:
    """Replace the foldable nodes by constants: evaluated with batch sizes 1 and 2, a value that
    does not depend on the batch becomes a constant; a shape ``[N, ...]`` feeding a Reshape
    becomes ``[0, ...]`` (copy the batch dimension); a fill ``(N, ...)`` of equal rows (e.g.
    ``ConstantOfShape(Shape(x))``, ``ones_like(x)``) becomes its first row, which broadcasts over
    the batch. Any other value computed from the batch size is refused naming its consumer."""
    if not any(n.op in _FOLD for n in gr.nodes):
        return
    one, folded = _fold_once(gr, 1)
    if not folded:
        return
    gone = {id(n) for n in folded}
    made = {o for n in folded for o in n.outputs if o}
    two = _fold_once(gr, 2)[0] if any(n.op in ("Shape", "Size") for n in folded) else one
    rest = [n for n in gr.nodes if id(n) not in gone]
    used = {i for n in rest for i in n.inputs if i in made}
    for name in sorted(used):
        users = [n for n in rest if name in n.inputs]
        a, b = one[name], two.get(name)
        if b is None:  # not evaluated with the other batch size: it depends on it
            b = np.empty((0,) * (a.ndim + 1))
        if a.shape == b.shape and np.array_equal(a, b):
            gr.const[name] = a
            continue
        if a.ndim == 1 and a.shape == b.shape and a.dtype == np.int64 and a[0] == 1 and \
                b[0] == 2 and np.array_equal(a[1:], b[1:]) and all(
                    u.op == "Reshape" and u.inputs[1:2] == [name] for u in users):
            gr.const[name] = np.concatenate([[0], a[1:]]).astype(np.int64)
            gr.batch_first.add(name)  # its 0 is the batch, whatever allowzero says
            continue
        if a.ndim >= 1 and b.ndim == a.ndim and a.shape[0] == 1 and b.shape[0] == 2 and \
                a.shape[1:] == b.shape[1:] and np.array_equal(b, np.concatenate([a, a])):
            gr.const[name] = a
            continue
        raise OnnxError(f"{users[0].label}: its input {name!r} is computed from the batch "
                        "size in a way that cannot be imported")
    gr.nodes = rest


#: The domains of QONNX's operators (and of FINN's, where they were defined first).
_QONNX = ("qonnx.custom_op.general", "finn.custom_op.general")


def _qonnx(proto: Any, where: str) -> Any:
    """QONNX's ``BipolarQuant(X, scale) = scale * (X >= 0 ? 1 : -1)`` (the 1-bit quantizer of
    Brevitas' QONNX export) as standard operators, ``Where(GreaterOrEqual(X, 0), 1, -1)`` and,
    for a scale other than 1, ``Mul(., scale)``, so that the rest of the import (and
    onnxruntime) reads it: on weights it is evaluated (``scale`` folded as a weight scale), on
    activations it is the sign (+1 at 0, as bnn_tol's). Refused naming the node: another QONNX
    operator, a scale that is not a positive finite float32 constant, an activation scale
    other than 1 (its +-s outputs would scale the next layer), an opset below 11."""
    from onnx import ModelProto, helper, numpy_helper

    if not any(n.domain in _QONNX for n in proto.graph.node):
        return proto
    out = ModelProto.FromString(proto.SerializeToString())
    g = out.graph
    consts: dict[str, Any] = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 \
                and n.attribute[0].name == "value" and n.output:
            consts[n.output[0]] = n.attribute[0].t
    taken = {*consts, *(o for n in g.node for o in n.output), *(i.name for i in g.input)}

    def fresh(base: str) -> str:
        k = 0
        while f"{base}__{k}" in taken:
            k += 1
        taken.add(f"{base}__{k}")
        return f"{base}__{k}"

    nodes = []
    for i, n in enumerate(g.node):
        if n.domain not in _QONNX:
            nodes.append(n)
            continue
        label = f"{n.op_type} node {n.name!r}" if n.name else f"{n.op_type} node #{i}"
        if n.op_type == "Quant":
            nodes += _quant_nodes(n, label, consts, fresh, g)
            continue
        if n.op_type != "BipolarQuant":
            raise OnnxError(f"{label}: QONNX operator {n.op_type} is not supported (only "
                            "BipolarQuant and Quant)")
        if len(n.input) != 2 or len(n.output) != 1 or n.attribute or not n.input[0]:
            raise OnnxError(f"{label}: BipolarQuant takes the inputs X, scale, one output and no "
                            "attributes")
        if n.input[1] not in consts:
            raise OnnxError(f"{label}: its scale {n.input[1]!r} is not a constant")
        scale = _array(consts[n.input[1]], f"{label} scale")
        if scale.dtype != np.float32 or scale.size > MAX_VALUES or not (
                np.isfinite(scale).all() and (scale > 0).all()):
            raise OnnxError(f"{label}: its scale must be positive finite float32 values")
        unit = bool((scale == 1).all())
        if not unit and n.input[0] not in consts:
            raise OnnxError(f"{label}: an activation quantizer with a scale other than 1 "
                            f"({float(scale.reshape(-1)[0]):g}) is not supported: its +-s "
                            "outputs scale the next layer")
        names = [fresh(f"{n.name or 'bipolarquant'}_{k}") for k in
                 ("zero", "one", "minus", "ge", "sign")]
        for name, v in zip(names[:3], (0.0, 1.0, -1.0), strict=True):
            g.initializer.append(numpy_helper.from_array(np.float32(v), name))
        sign = n.output[0] if unit else names[4]
        nodes += [helper.make_node("GreaterOrEqual", [n.input[0], names[0]], [names[3]],
                                   name=names[3]),
                  helper.make_node("Where", [names[3], names[1], names[2]], [sign],
                                   name=n.name or sign)]
        if not unit:
            nodes.append(helper.make_node("Mul", [sign, n.input[1]], [n.output[0]],
                                          name=fresh(f"{n.name or 'bipolarquant'}_mul")))
    del g.node[:]
    g.node.extend(nodes)
    std = [o for o in out.opset_import if o.domain in ("", "ai.onnx")]
    if not std or std[0].version < 11:
        raise OnnxError(f"{where}: QONNX BipolarQuant is read with ONNX opset 11 or later, the "
                        f"graph has {std[0].version if std else 'none'}")
    std[0].version = max(std[0].version, 12)  # GreaterOrEqual (opset 12 changes nothing else read)
    keep = [o for o in out.opset_import if o.domain not in _QONNX]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _quant_nodes(n: Any, label: str, consts: dict, fresh, g: Any) -> list:
    """QONNX ``Quant(X, scale, zeropt, bitwidth)`` (``rounding_mode="ROUND"``, half to even)
    as standard operators, ``Mul(Sub(Clip(Round(Add(Div(X, s), z)), lo, hi), z), s)`` with
    ``lo, hi`` from the bit width, ``signed`` and ``narrow``: an input quantizer (Brevitas'
    8-bit Q1.7 ``QuantIdentity``) becomes operations :func:`bnn_tol.adapt` reads as part of
    the input transform; on weights it is folded like any constant expression."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    mode = attrs.get("rounding_mode", b"ROUND")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(n.input) != 4 or any(i not in consts for i in n.input[1:]) or mode != "ROUND" or \
            set(attrs) - {"signed", "narrow", "rounding_mode"}:
        raise OnnxError(f"{label}: Quant is read with constant scale, zero point and bit width "
                        "and rounding_mode ROUND")
    bits = _array(consts[n.input[3]], f"{label} bitwidth").reshape(-1)
    if bits.size != 1 or not 1 <= float(bits[0]) <= 16 or float(bits[0]) != int(bits[0]):
        raise OnnxError(f"{label}: its bit width must be one integer 1..16")
    b, signed, narrow = int(bits[0]), int(attrs.get("signed", 1)), int(attrs.get("narrow", 0))
    lo = (-(2 ** (b - 1)) + narrow) if signed else 0
    hi = (2 ** (b - 1) - 1) if signed else (2**b - 1 - narrow)
    names = [fresh(f"{n.name or 'quant'}_{k}") for k in ("div", "add", "round", "lo", "hi",
                                                         "clip", "sub")]
    g.initializer.append(numpy_helper.from_array(np.float32(lo), names[3]))
    g.initializer.append(numpy_helper.from_array(np.float32(hi), names[4]))
    x, s, z = n.input[0], n.input[1], n.input[2]
    return [helper.make_node("Div", [x, s], [names[0]], name=names[0]),
            helper.make_node("Add", [names[0], z], [names[1]], name=names[1]),
            helper.make_node("Round", [names[1]], [names[2]], name=names[2]),
            helper.make_node("Clip", [names[2], names[3], names[4]], [names[5]], name=names[5]),
            helper.make_node("Sub", [names[5], z], [names[6]], name=names[6]),
            helper.make_node("Mul", [names[6], s], [n.output[0]], name=n.name or n.output[0])]


def _io(gr: _Graph, in_shape) -> _Io:
    """The input's shapes: the graph's ``(N, C, H, W)`` (``in_shape`` may fill unknown dims and
    must equal the known ones) or ``(N, features)`` with ``in_shape`` of that size."""
    from onnx import TensorProto

    t = gr.input.type.tensor_type
    if not gr.input.type.HasField("tensor_type") or t.elem_type != TensorProto.FLOAT:
        raise OnnxError(f"{gr.where}: the graph input {gr.input.name!r} must be a float32 tensor")
    if not t.HasField("shape"):
        raise OnnxError(f"{gr.where}: the graph input {gr.input.name!r} declares no shape")
    dims = [int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim]
    if len(dims) not in (2, 4) or any(d is not None and d < 1 for d in dims):
        raise OnnxError(f"{gr.where}: the graph input has dims {dims}; expected (N, C, H, W) or "
                        "(N, features)")
    given = None
    if in_shape is not None:
        try:
            given = tuple(require_int(v, "in_shape", minimum=1) for v in in_shape)
        except (TypeError, InvalidArgument):
            given = ()
        if len(given) != 3:
            raise OnnxError(f"in_shape must be three positive integers (C, H, W), got "
                            f"{in_shape!r}")
    per = dims[1:]
    if len(per) == 3:
        if given is None:
            if None in per:
                raise OnnxError(f"{gr.where}: the graph input's dims {per} are not all known: "
                                "pass in_shape=(C, H, W) (--in-shape C,H,W)")
            given = tuple(per)
        elif any(d is not None and d != v for d, v in zip(per, given, strict=True)):
            raise OnnxError(f"in_shape {given} differs from the graph input's dims "
                            f"{tuple(per)}")
        shape: tuple[int, ...] = given
    else:
        if given is None:
            raise OnnxError(f"{gr.where}: the graph input is flat ({per[0]} features): pass "
                            "in_shape=(C, H, W) (--in-shape C,H,W)")
        if per[0] is not None and math.prod(given) != per[0]:
            raise OnnxError(f"in_shape {given} holds {math.prod(given)} values; the graph input "
                            f"has {per[0]}")
        shape = (math.prod(given),)
    if math.prod(given) > MAX_VALUES:
        raise OnnxError(f"{gr.where}: the graph input has {math.prod(given)} values per sample "
                        f"({given}), more than {MAX_VALUES}")
    if dims[0] is not None and dims[0] * math.prod(given) > MAX_VALUES:
        raise OnnxError(f"{gr.where}: the graph fixes its batch size at {dims[0]}; export it with "
                        "a free (symbolic) batch dimension")
    return _Io(gr.input.name, shape, given, dims[0])  # type: ignore[arg-type]


def _broadcasts(arr: np.ndarray, shape: tuple[int, ...]) -> bool:
    """``arr`` broadcasts onto ``(N, *shape)`` without enlarging it (batch dimension 1)."""
    full = (1, *shape)
    return arr.ndim <= len(full) and all(
        a in (1, f) for a, f in zip(arr.shape[::-1], full[::-1], strict=False))


def _per_channel(gr: _Graph, n: _Node, name: str, shape: tuple[int, ...], what: str
                 ) -> np.ndarray:
    """A constant added per channel (axis 1 of ``(N, *shape)``): ``(C,)`` float32."""
    arr = gr.f32(n, name, what)
    if not _broadcasts(arr, shape):
        raise OnnxError(f"{n.label}: {what} {name!r} of shape {tuple(arr.shape)} does not "
                        f"broadcast onto (N, {', '.join(map(str, shape))})")
    full = np.broadcast_to(arr.reshape((1,) * (len(shape) + 1 - arr.ndim) + arr.shape),
                           (1, *shape))[0].reshape(shape[0], -1)
    if not (full == full[:, :1]).all():
        raise OnnxError(f"{n.label}: {what} {name!r} of shape {tuple(arr.shape)} varies within "
                        "a channel; it must hold one value per output channel")
    return np.ascontiguousarray(full[:, 0])


def _layer(gr: _Graph, n: _Node, shape: tuple[int, ...], first: bool) -> _Block:
    """A Gemm/MatMul/Conv with +-1 weights: every attribute honoured or refused, its input
    shape checked against its fan-in."""
    w = gr.f32(n, gr.input_name(n, 1, "weights"), "weights")
    bias_name = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2] else None
    padding = 0
    if n.op == "Gemm":
        if n.attr("transA", 0) != 0:
            raise OnnxError(f"{n.label}: transA={n.attr('transA')}: the data cannot be "
                            "transposed (only transA = 0)")
        if n.attr("alpha", 1.0) != 1.0:
            raise OnnxError(f"{n.label}: alpha={n.attr('alpha'):g}: only alpha = 1 (y = x W + C) "
                            "can be imported")
        if bias_name and n.attr("beta", 1.0) != 1.0:
            raise OnnxError(f"{n.label}: beta={n.attr('beta'):g} scales its bias C: only beta = 1")
        if n.attr("transB", 0) not in (0, 1):
            raise OnnxError(f"{n.label}: transB={n.attr('transB')}: must be 0 or 1")
        if w.ndim != 2:
            raise OnnxError(f"{n.label}: weights of shape {w.shape} are not 2-D")
        w = w if n.attr("transB", 0) else w.T
    elif n.op == "MatMul":
        if len(n.inputs) != 2:
            raise OnnxError(f"{n.label}: MatMul takes two inputs")
        if w.ndim != 2:
            raise OnnxError(f"{n.label}: weights of shape {w.shape} are not 2-D (in, out)")
        w = w.T
    else:
        if w.ndim != 4:
            raise OnnxError(f"{n.label}: weights of shape {w.shape} are not 4-D "
                            "(out, in, kH, kW)")
        kh, kw = int(w.shape[2]), int(w.shape[3])
        for name, ok in (("group", 1), ("dilations", [1, 1]), ("strides", [1, 1])):
            v = n.attr(name, ok)
            if v != ok and not (isinstance(v, list) and set(v) == {1} and len(v) == 2):
                raise OnnxError(f"{n.label}: {name}={v}: only ungrouped, undilated, stride-1 "
                                "convolutions can be imported")
        ks = n.attr("kernel_shape")
        if ks is not None and list(ks) != [kh, kw]:
            raise OnnxError(f"{n.label}: kernel_shape={ks} differs from the weights' {kh}x{kw}")
        if kh != kw:
            raise OnnxError(f"{n.label}: a {kh}x{kw} kernel: only square kernels")
        auto = n.attr("auto_pad", "NOTSET")
        pads = n.attr("pads")
        if auto == "NOTSET":
            pads = [0, 0, 0, 0] if pads is None else list(pads)
            if len(pads) != 4 or len(set(pads)) != 1 or pads[0] < 0:
                raise OnnxError(f"{n.label}: pads={pads}: only the same padding on every side")
            padding = int(pads[0])
        elif auto in ("VALID", "SAME_UPPER", "SAME_LOWER"):
            if pads is not None and any(pads):
                raise OnnxError(f"{n.label}: auto_pad={auto} together with pads={pads}")
            if auto != "VALID" and kh % 2 == 0:
                raise OnnxError(f"{n.label}: auto_pad={auto} with an even {kh}x{kw} kernel pads "
                                "one side more than the other: only symmetric padding")
            padding = 0 if auto == "VALID" else (kh - 1) // 2
        else:
            raise OnnxError(f"{n.label}: auto_pad={auto!r} is not an ONNX padding mode")
    wscale = None
    if not np.isin(w, (-1.0, 1.0)).all():
        # +-s_o per output channel: a scale folded into the weights (torch's exporter folds
        # the BatchNorm into the layer; XNOR-Net's alpha_o = mean |W_o|)
        mag = np.abs(w).reshape(w.shape[0], -1)
        if not ((mag == mag[:, :1]).all() and (mag[:, 0] > 0).all()):
            raise OnnxError(f"{n.label}: weights are not +-1 (nor +-s with one scale s > 0 per "
                            "output channel): not a binarized layer")
        wscale = np.ascontiguousarray(mag[:, 0])
        w = np.where(w > 0, 1.0, -1.0).astype(np.float32)
    out, fan_in = int(w.shape[0]), int(math.prod(w.shape[1:]))
    if n.op == "Conv":
        if len(shape) != 3:
            raise OnnxError(f"{n.label}: a convolution needs an (N, C, H, W) input, gets "
                            f"(N, {', '.join(map(str, shape))})")
        if shape[0] != w.shape[1]:
            raise OnnxError(f"{n.label}: its weights take {w.shape[1]} input channels, the data "
                            f"has {shape[0]}")
        hw = [s + 2 * padding - int(w.shape[2]) + 1 for s in shape[1:]]
        if min(hw) < 1:
            raise OnnxError(f"{n.label}: a {w.shape[2]}x{w.shape[3]} kernel does not fit the "
                            f"{shape[1]}x{shape[2]} input (padding {padding})")
        preact: tuple[int, ...] = (out, *hw)
    else:
        if len(shape) != 1:
            raise OnnxError(f"{n.label}: a {n.op} on an (N, {', '.join(map(str, shape))}) tensor "
                            "multiplies its last axis only: Flatten it to (N, features) first")
        if shape[0] != w.shape[1]:
            raise OnnxError(f"{n.label}: its weights expect {w.shape[1]} inputs per sample, the "
                            f"data has {shape[0]}")
        preact = (out,)
    if (INPUT.q_max if first else 1) * fan_in >= _EXACT:
        raise OnnxError(f"{n.label}: fan-in {fan_in} is too large for exact float32 sums")
    if math.prod(preact) > MAX_VALUES:
        raise OnnxError(f"{n.label}: its output has {math.prod(preact)} values per sample, more "
                        f"than {MAX_VALUES}")
    bias = None
    if bias_name is not None:
        if n.op == "Conv" and gr.const[bias_name].shape != (out,):
            raise OnnxError(f"{n.label}: its bias has shape {gr.const[bias_name].shape}, not "
                            f"({out},)")
        bias = gr.f32(n, bias_name, "bias") if n.op == "Conv" else \
            _per_channel(gr, n, bias_name, preact, "bias")
    return _Block(layer=n, conv=n.op == "Conv", w=np.ascontiguousarray(w), preact=preact,
                  padding=padding, bias=bias, layer_bias=bias, wscale=wscale)


def _batchnorm(gr: _Graph, n: _Node, b: _Block) -> None:
    if len(n.inputs) != 5:
        raise OnnxError(f"{n.label}: needs the inputs X, scale, B, mean, var")
    c = b.preact[0]
    params = []
    for name, what in zip(n.inputs[1:], ("scale", "B", "mean", "var"), strict=True):
        v = gr.f32(n, name, what)
        if v.shape != (c,):
            raise OnnxError(f"{n.label}: {what} {name!r} has shape {v.shape}, not ({c},)")
        params.append(v)
    eps = n.attr("epsilon", 1e-5)
    if n.attr("training_mode", 0) != 0 or n.attr("spatial", 1) != 1:
        raise OnnxError(f"{n.label}: training_mode/spatial: only inference with per-channel "
                        "statistics")
    if not math.isfinite(eps) or eps < 0 or bool((params[3] < 0).any()) or bool(
            ((params[3] + np.float32(eps)) <= 0).any()):
        raise OnnxError(f"{n.label}: var + epsilon must be > 0 (epsilon={eps:g})")
    b.bn = (params[0], params[1], params[2], params[3])
    b.eps = float(eps)


def _check_tau(b: _Block, scale: int) -> None:
    """A hidden block's BatchNorm threshold ``tau`` lies within float32's exact integers on its
    grid (``|scale tau| < 2^23``), where its integer comparator can be found from the float
    BatchNorm; farther, the neuron is constant on every input and cannot be folded exactly."""
    if b.bn is None:
        return
    gamma, beta, mean, var = (v.astype(np.float64) for v in b.bn)
    live = gamma != 0
    tau = mean[live] - beta[live] * np.sqrt(var[live] + b.eps) / gamma[live]
    far = np.flatnonzero(~(np.abs(tau * scale) < 2**23))
    if len(far):
        c = int(np.flatnonzero(live)[far[0]])
        raise OnnxError(f"{b.layer.label}: the BatchNorm threshold of neuron {c} "
                        f"({float(tau[far[0]]):g}) lies beyond float32's exact range on its "
                        "grid; the parameters make it constant and it cannot be folded exactly")


def _clip_range(gr: _Graph, n: _Node) -> tuple[float, float]:
    if gr.opset < 11:
        return float(n.attr("min", -np.inf)), float(n.attr("max", np.inf))
    if n.attrs:
        raise OnnxError(f"{n.label}: min/max are inputs since opset 11, not attributes")
    out = []
    for k, default in ((1, -np.inf), (2, np.inf)):
        name = n.inputs[k] if len(n.inputs) > k and n.inputs[k] else None
        if name is None:
            out.append(default)
            continue
        v = gr.const[name]
        if v.dtype != np.float32 or v.size != 1:
            raise OnnxError(f"{n.label}: its bound {name!r} must be one float32 value")
        out.append(float(v.reshape(-1)[0]))
    return out[0], out[1]


def _only(gr: _Graph, n: _Node, name: str, value: float, shape: tuple[int, ...], what: str
          ) -> None:
    """Constant input ``name`` of ``n`` equals ``value`` everywhere and keeps the data's shape."""
    v = gr.const[name]
    if v.dtype != np.float32 or not _broadcasts(v, shape):
        raise OnnxError(f"{n.label}: {what} {name!r} must be float32 and broadcast onto the data")
    if not (v == value).all():
        bad = v[v != value].reshape(-1)[0] if v.size else v
        raise OnnxError(f"{n.label}: {what} {float(bad):g}: only {value:g} can be imported")


def _blocks(gr: _Graph, chain: list[_Node], io: _Io) -> list[_Block]:
    """Read the chain into blocks (``[Flatten] layer [Add] [BN] [Clip] sign [MaxPool]``, the
    last ``[Flatten] layer [Add] [BN] [Softmax]``), checking every attribute and shape."""
    blocks: list[_Block] = []
    cur: _Block | None = None
    shape = io.shape
    may_pool = False
    ended: _Node | None = None
    for n in chain:
        gr.at = n  # named if reading it fails unforeseen (import_onnx)
        extra = set(n.attrs) - _OPS.get(n.op, frozenset())
        if n.op not in _OPS:
            raise OnnxError(f"{n.label}: operator {n.op} is not supported in an imported BNN "
                            f"(supported: {', '.join(sorted(_OPS))})")
        if extra:
            raise OnnxError(f"{n.label}: attribute {sorted(extra)[0]!r} is not supported")
        if ended is not None:
            raise OnnxError(f"{n.label}: nothing may follow {ended.label}")
        if cur is not None and cur.compare is not None and n.op != "Where":
            raise OnnxError(f"{cur.compare.label}: its result must feed a Where(c, 1, -1), not "
                            f"{n.label}")
        data = n.inputs.index(next(i for i in n.inputs if i and i not in gr.const)) \
            if any(i and i not in gr.const for i in n.inputs) else -1
        if n.op == "Identity":
            pass
        elif n.op == "Dropout":
            if len(n.inputs) > 2 and n.inputs[2] and bool(np.asarray(gr.const[n.inputs[2]]).any()):
                raise OnnxError(f"{n.label}: training_mode is set: only inference")
        elif n.op in ("Flatten", "Reshape"):
            if cur is not None:
                raise OnnxError(f"{n.label}: a reshape between a layer and its sign")
            shape = _flatten(gr, n, shape)
            may_pool = False
        elif n.op in _LAYERS:
            if cur is not None:
                raise OnnxError(f"{n.label}: follows {cur.layer.label} without a sign activation "
                                "in between")
            if data != 0:
                raise OnnxError(f"{n.label}: the data must be its first input")
            cur = _layer(gr, n, shape, first=not blocks)
            shape = cur.preact
            may_pool = False
            continue
        elif n.op == "MaxPool":
            if cur is not None:
                raise OnnxError(f"{n.label}: max-pooling between {cur.layer.label} and its sign; "
                                "only after the sign (layer -> BN -> sign -> MaxPool)")
            if not may_pool:
                raise OnnxError(f"{n.label}: max-pooling must directly follow a block's sign "
                                "(one per block)")
            blocks[-1].pool = _maxpool(n, shape)
            shape = (shape[0], shape[1] // blocks[-1].pool, shape[2] // blocks[-1].pool)
            may_pool = False
        elif cur is None:
            raise OnnxError(f"{n.label}: {n.op} outside a block (a layer -- Gemm, MatMul or "
                            "Conv -- must come first)")
        elif n.op == "Add":
            if cur.bias is not None or cur.bn is not None or cur.clipped or len(n.inputs) != 2 \
                    or any(p.op not in ("Identity", "Dropout") for p in cur.post):
                raise OnnxError(f"{n.label}: an Add is imported only as the bias directly after "
                                "a layer without one")
            const = n.inputs[1 - data]
            cur.bias = _per_channel(gr, n, const, cur.preact, "bias")
        elif n.op == "BatchNormalization":
            if cur.bn is not None or cur.clipped or data != 0 or any(
                    p.op != "Add" and p.op not in ("Identity", "Dropout") for p in cur.post):
                after = f"; it follows {cur.post[-1].label}" if cur.post else ""
                raise OnnxError(f"{n.label}: a BatchNormalization must directly follow a layer "
                                f"(and its bias){after}")
            _batchnorm(gr, n, cur)
        elif n.op == "Clip":
            lo, hi = _clip_range(gr, n)
            if data != 0 or not lo < 0 < hi:
                raise OnnxError(f"{n.label}: Clip to [{lo:g}, {hi:g}] changes signs: only a Clip "
                                "with min < 0 < max may come before the sign")
            cur.clipped = True
        elif n.op in ("GreaterOrEqual", "Greater"):
            if data != 0:
                raise OnnxError(f"{n.label}: compares a constant with the data; only "
                                f"{n.op}(x, 0) can be imported")
            _only(gr, n, gr.input_name(n, 1, "threshold"), 0.0, shape, "threshold")
            cur.compare = n
        elif n.op in ("Where", "Sign"):
            if n.op == "Where":
                if cur.compare is None or data != 0:
                    raise OnnxError(f"{n.label}: a Where is imported only as Where(x >= 0, 1, -1)")
                _only(gr, n, gr.input_name(n, 1, "X"), 1.0, shape, "Where's X")
                _only(gr, n, gr.input_name(n, 2, "Y"), -1.0, shape, "Where's Y")
                cur.sign, cur.compare = cur.compare.op, None
            else:
                cur.sign = "Sign"
            cur.post.append(n)
            cur.sign_node = n
            _absorb_scale(cur)
            _check_tau(cur, INPUT.scale if not blocks else 1)
            blocks.append(cur)
            cur = None
            may_pool = True
            continue
        else:  # Softmax, LogSoftmax
            axis = n.attr("axis", 1 if gr.opset < 13 else -1)
            if len(shape) != 1 or axis not in (1, -1):
                raise OnnxError(f"{n.label}: axis={axis}: only a softmax over the classes")
            ended = n
        if cur is not None:
            cur.post.append(n)
    if cur is not None and cur.compare is not None:
        raise OnnxError(f"{cur.compare.label}: its result must feed a Where(c, 1, -1)")
    if cur is None:
        raise OnnxError(f"{gr.where}: the graph does not end with a layer: the last block must "
                        "output class scores (Gemm/MatMul [-> BatchNormalization] [-> Softmax])")
    if cur.conv:
        raise OnnxError(f"{cur.layer.label}: the last layer is a convolution; class scores come "
                        "from a Gemm/MatMul")
    if cur.clipped:
        raise OnnxError(f"{cur.layer.label}: a Clip after the last layer changes the class scores")
    _absorb_scale(cur)
    blocks.append(cur)
    t = gr.output.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] \
        if t.HasField("shape") else None
    if dims is not None and (len(dims) != 2 or dims[1] not in (None, cur.preact[0])):
        raise OnnxError(f"{gr.where}: the graph output declares dims {dims}, the last layer "
                        f"gives (N, {cur.preact[0]})")
    return blocks


def _absorb_scale(b: _Block) -> None:
    """Weights ``s B`` (``B`` +-1, ``s > 0`` per output channel) with bias ``c`` and an optional
    BatchNorm: the library's block computes ``B x`` and one BatchNorm equal to the graph in real
    arithmetic -- ``BN(s a + c)`` with mean ``(mean - c) / s``, variance ``(var + eps) / s^2``
    and eps 0; without a BatchNorm, ``s a + c`` as a BatchNorm with gamma ``s``, beta ``c``,
    mean 0, variance 1 and eps 0. Float32 rounding may differ: see :func:`_check_probes`."""
    if b.wscale is None:
        return
    s = b.wscale.astype(np.float64)
    c = b.bias.astype(np.float64) if b.bias is not None else np.zeros_like(s)
    if b.bn is not None:
        gamma, beta, mean, var = (v.astype(np.float64) for v in b.bn)
        params = (gamma, beta, (mean - c) / s, (var + b.eps) / (s * s))
    else:
        params = (s, c, np.zeros_like(s), np.ones_like(s))
    if not all(np.isfinite(v).all() for v in params) or not (params[3] > 0).all():
        raise OnnxError(f"{b.layer.label}: its weight scale cannot be folded into the "
                        "BatchNorm (the folded parameters overflow float32)")
    b.bn = tuple(v.astype(np.float32) for v in params)  # type: ignore[assignment]
    b.eps, b.bias = 0.0, None


def _flatten(gr: _Graph, n: _Node, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flatten(axis=1) or Reshape to (N, -1): anything else is refused."""
    total = math.prod(shape)
    if n.op == "Flatten":
        axis = n.attr("axis", 1)
        if (axis + len(shape) + 1 if axis < 0 else axis) != 1:
            raise OnnxError(f"{n.label}: axis={axis}: only a flatten to (N, features), axis=1")
        return (total,)
    if len(n.inputs) != 2 or gr.const[gr.input_name(n, 1, "shape")].dtype != np.int64:
        raise OnnxError(f"{n.label}: its shape must be an int64 constant")
    s = [int(v) for v in gr.const[n.inputs[1]].reshape(-1)]
    zero_ok = not n.attr("allowzero", 0) or n.inputs[1] in gr.batch_first
    ok = len(s) == 2 and ((s[0] == 0 and zero_ok and s[1] in (-1, total)) or
                          (s[0] == -1 and s[1] == total))
    if not ok:
        raise OnnxError(f"{n.label}: shape {s}: only a reshape to (N, {total}) keeping the batch "
                        "can be imported")
    return (total,)


def _maxpool(n: _Node, shape: tuple[int, ...]) -> int:
    """The kernel of a max-pool with stride = kernel and no padding (ceil_mode only where it
    changes nothing); anything else is refused naming the attribute."""
    ks = n.attr("kernel_shape")
    if ks is None:
        raise OnnxError(f"{n.label}: MaxPool without kernel_shape")
    if len(ks) != 2 or ks[0] != ks[1] or ks[0] < 1:
        raise OnnxError(f"{n.label}: kernel_shape={ks}: only square 2-D kernels")
    k = int(ks[0])
    if len(shape) != 3:
        raise OnnxError(f"{n.label}: max-pooling needs an (N, C, H, W) input")
    if list(n.attr("strides", [1, 1])) != [k, k]:
        raise OnnxError(f"{n.label}: strides={n.attr('strides', [1, 1])}: only strides equal to "
                        f"the kernel ({k}) can be imported")
    if any(n.attr("pads", [0, 0, 0, 0])):
        raise OnnxError(f"{n.label}: pads={n.attr('pads')}: only max-pooling without padding")
    if list(n.attr("dilations", [1, 1])) != [1, 1]:
        raise OnnxError(f"{n.label}: dilations={n.attr('dilations')}: only undilated pooling")
    if n.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise OnnxError(f"{n.label}: auto_pad={n.attr('auto_pad')}: only max-pooling without "
                        "padding")
    h, w = shape[1], shape[2]
    if min(h, w) < k:
        raise OnnxError(f"{n.label}: a {k}x{k} kernel does not fit the {h}x{w} input")
    if n.attr("ceil_mode", 0) not in (0, 1) or (n.attr("ceil_mode", 0) and (h % k or w % k)):
        raise OnnxError(f"{n.label}: ceil_mode={n.attr('ceil_mode')} on a {h}x{w} input with "
                        f"kernel {k} keeps partial windows; the library floors")
    return k


def _build_model(blocks: list[_Block], in_shape: tuple[int, int, int]) -> BNN:
    """The bnn_tol BNN of ``blocks`` (weights, biases, BatchNorms copied), eval mode."""
    spec = []
    for k, b in enumerate(blocks):
        d: dict[str, Any] = {"type": "conv" if b.conv else "linear", "in": int(b.w.shape[1]),
                             "out": int(b.w.shape[0])}
        if b.conv:
            d.update(kernel=int(b.w.shape[-1]), padding=b.padding)
        else:
            d["flatten"] = k == 0 or blocks[k - 1].conv
        d["bias"] = b.bias is not None
        if b.bn is not None:
            d["bn_eps"] = b.eps
        if b.pool:
            d["pool"] = b.pool
        spec.append(d)
    spec[-1]["binary_output"] = False
    model = build("custom", blocks=spec, in_shape=in_shape, n_classes=int(spec[-1]["out"]))
    with torch.no_grad():
        for block, b in zip(model.blocks, blocks, strict=True):
            block.layer.weight.copy_(torch.tensor(b.w).reshape(block.layer.weight.shape))
            if b.bias is not None:
                block.layer.bias.copy_(torch.tensor(b.bias))
            if b.bn is not None:
                scale, beta, mean, var = (torch.tensor(v) for v in b.bn)
                block.bn.weight.copy_(scale)
                block.bn.bias.copy_(beta)
                block.bn.running_mean.copy_(mean)
                block.bn.running_var.copy_(var)
    return model.eval()


def _real(b: _Block, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The block's pre-sign value at pre-activations ``a`` ``(M, C)`` in float64 (the graph's
    float32 parameters, nearly exact arithmetic) and the float32 rounding scale of computing it."""
    z = a.astype(np.float64) + (b.bias.astype(np.float64) if b.bias is not None else 0.0)
    mag = np.abs(z)
    if b.bn is not None:
        scale, beta, mean, var = (v.astype(np.float64) for v in b.bn)
        f = scale / np.sqrt(var + b.eps)
        mag = np.abs(z * f) + np.abs(beta) + np.abs(mean * f)
        z = (z - mean) * f + beta
    return z, mag


def _grid(b: _Block, index: int, fan_in: int, t: np.ndarray, scale: int) -> np.ndarray:
    """Reachable grid points ``k`` (pre-activation ``a = k / scale``) around each channel's
    threshold ``t`` plus both extremes: ``(9, C)`` int64."""
    bound = (INPUT.q_max if index == 0 else 1) * fan_in
    pts = np.concatenate([np.full((1, t.size), -bound), np.full((1, t.size), bound),
                          t[None, :] + np.arange(-3, 4)[:, None]]).astype(np.int64)
    pts = np.clip(pts, -bound, bound)
    if index > 0 and not (b.conv and b.padding):  # +-1 inputs, all fan_in terms: a = fan_in mod 2
        pts -= (pts - fan_in) % 2
    return pts


def _check_zero_signs(blocks: list[_Block], model: BNN) -> None:
    """Refuse a Sign (0 -> 0) or Greater (0 -> -1) whose input is exactly 0 at a reachable
    pre-activation (in real arithmetic): there the library's sign gives +1."""
    cm = compile_model(model)
    for i, (b, st) in enumerate(zip(blocks[:-1], cm.stages, strict=False)):
        if _AT_ZERO.get(b.sign or "", 1) == 1:
            continue
        if b.bn is not None:
            scale, beta, mean, var = (v.astype(np.float64) for v in b.bn)
            with np.errstate(divide="ignore", invalid="ignore"):
                tau = np.where(scale != 0, mean - beta * np.sqrt(var + b.eps) / scale, 0.0)
        else:
            tau = np.zeros(b.preact[0])
        if b.bias is not None:
            tau = tau - b.bias
        center = np.floor(np.clip(tau * st.scale, -_EXACT, _EXACT)).astype(np.int64)
        k = _grid(b, i, st.fan_in, center, st.scale)
        z, _ = _real(b, k / st.scale)
        hit = np.argwhere(z == 0)
        if len(hit):
            m, c = hit[0]
            raise OnnxError(f"{b.sign_node.label}: its input is exactly 0 at the pre-activation "
                            f"{k[m, c] / st.scale:g} of neuron {c} of {b.layer.label}, where "
                            f"{b.sign} gives {_AT_ZERO[b.sign or '']} and bnn_tol's sign +1")


def _probe_pixels(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 probe images spanning the pixel range: constant images (black, white, around the
    input offset), uniform random, dark, bright, black-and-white, ramps and a checkerboard."""
    g = torch.Generator().manual_seed(0)
    c, h, w = shape
    n = max(1, min(16, 2**22 // math.prod(shape)))

    def rand(lo: int, hi: int, k: int) -> torch.Tensor:
        return torch.randint(lo, hi, (k, c, h, w), generator=g, dtype=torch.uint8)

    levels = [0, 1, 64, INPUT.offset - 1, INPUT.offset, INPUT.offset + 1, 192, 254, 255]
    ramp = (torch.arange(h * w) * 255 // max(h * w - 1, 1)).reshape(1, 1, h, w).expand(1, c, h, w)
    checker = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 255).expand(1, c, h, w)
    return torch.cat([torch.full((len(levels), c, h, w), 0, dtype=torch.uint8)
                      + torch.tensor(levels, dtype=torch.uint8).reshape(-1, 1, 1, 1),
                      rand(0, 256, n), rand(0, 32, max(1, n // 4)), rand(224, 256, max(1, n // 4)),
                      rand(0, 2, max(1, n // 4)) * 255, ramp.to(torch.uint8),
                      (255 - ramp).to(torch.uint8), checker.to(torch.uint8)])


class _Runtime:
    """onnxruntime running a graph as written (no graph optimizations, no fusions)."""

    def __init__(self, ort: Any, where: str) -> None:
        self.ort, self.where = ort, where

    def session(self, proto: Any, what: str) -> Any:
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        try:
            return self.ort.InferenceSession(proto.SerializeToString(), so,
                                             providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime refuses the graph
            raise OnnxError(f"{self.where}: onnxruntime cannot run {what} "
                            f"({_first_line(e)})") from None

    def run(self, sess: Any, name: str, x: np.ndarray, batch: int | None, what: str
            ) -> np.ndarray:
        step = batch or 16
        out = []
        try:
            for i in range(0, len(x), step):
                part = x[i:i + step]
                if batch and len(part) < batch:
                    part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), 0)])
                out.append(sess.run(None, {name: part})[0][:len(x) - i])
        except Exception as e:  # noqa: BLE001 -- onnxruntime fails on the graph
            raise OnnxError(f"{self.where}: onnxruntime fails on {what} ({_first_line(e)})"
                            ) from None
        return np.concatenate(out)


def _with_output(proto: Any, name: str) -> Any:
    from onnx import ModelProto, TensorProto, helper

    out = ModelProto.FromString(proto.SerializeToString())
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def _check_thresholds(rt: _Runtime, gr: _Graph, blocks: list[_Block], model: BNN) -> int:
    """Every hidden block without a bias: onnxruntime's own nodes from the layer output to the
    sign, run on the reachable pre-activations around each imported threshold and at both
    extremes, equal the imported integer comparator at every position. The nodes are monotone
    per channel, so this is equality on every reachable pre-activation. Returns the number of
    rounding ties tolerated (the graph's pre-sign value is within float32 rounding of 0 but not
    0, where runtimes differ among themselves and bnn_tol follows torch's rounding)."""
    from onnx import TensorProto, helper, numpy_helper

    cm = compile_model(model)
    ties = 0
    for i, (b, st) in enumerate(zip(blocks[:-1], cm.stages, strict=False)):
        if b.bias is not None:
            continue
        f = st.folded
        t, d, const = f.t.numpy(), f.direction.numpy(), f.const.numpy()
        k = _grid(b, i, st.fan_in, t, st.scale)
        lib = np.where(d > 0, k >= t, np.where(d < 0, k <= t, const > 0)).astype(np.float32) * 2 - 1
        a = (k / st.scale).astype(np.float32)
        if b.wscale is not None:  # the graph's layer output: s a (+ its own bias)
            a = a * b.wscale + (b.layer_bias if b.layer_bias is not None else np.float32(0))
        if b.conv:
            h, w = min(b.preact[1], 16), min(b.preact[2], 16)
            x = np.ascontiguousarray(np.broadcast_to(a[:, :, None, None], (*a.shape, h, w)))
        else:
            x = a
        used = sorted({j for n in b.post for j in n.inputs if j in gr.const})
        graph = helper.make_graph(
            [n.proto for n in b.post], "post",
            [helper.make_tensor_value_info(b.pre, TensorProto.FLOAT, [None] * x.ndim)],
            [helper.make_tensor_value_info(b.sign_node.outputs[0], TensorProto.FLOAT, None)],
            [numpy_helper.from_array(gr.const[j], j) for j in used])
        sub = helper.make_model(graph, opset_imports=list(gr.proto.opset_import))
        sub.ir_version = gr.proto.ir_version
        what = f"the nodes after {b.layer.label}"
        y = rt.run(rt.session(sub, what), b.pre, x, None, what)
        y = y.reshape(len(a), a.shape[1], -1)
        bad = ~(y == lib[:, :, None]).all(axis=2)
        if not bad.any():
            continue
        z, mag = _real(b, k / st.scale)
        tie = bad & (z != 0) & (np.abs(z) <= 2.0**-20 * mag)
        wrong = np.argwhere(bad & ~tie)
        if len(wrong):
            m, c = wrong[0]
            got = y[m, c][y[m, c] != lib[m, c]][0]
            raise OnnxError(f"{b.layer.label}, neuron {c}: at the pre-activation {a[m, c]:g} "
                            f"onnxruntime's {b.sign_node.label} gives {got:g}, the imported "
                            f"threshold {lib[m, c]:+g}: not imported")
        ties += int(tie.sum())
    return ties


def _check_probes(rt: _Runtime, gr: _Graph, io: _Io, blocks: list[_Block], model: BNN,
                  extra: torch.Tensor | None) -> None:
    """On probe images spanning the pixel range (through :data:`bnn_tol.data.INPUT`) and
    ``extra``: the predictions equal onnxruntime's; the class scores (before a trailing softmax)
    exactly where the arithmetic is exact (no bias, no output BatchNorm: sums of +-1), else to
    8 float32 ulps of the largest score."""
    x = INPUT.to_float(_probe_pixels(io.in_shape))
    if extra is not None:
        x = torch.cat([x, extra])
    out = blocks[-1]
    scores = out.post[-1].inputs[0] if out.post and out.post[-1].op in (
        "Softmax", "LogSoftmax") else gr.output.name
    sess = rt.session(_with_output(gr.proto, scores), "the graph")
    ref = rt.run(sess, io.name, x.numpy().reshape(len(x), *io.shape), io.batch,
                 "the probe inputs")
    with torch.no_grad():
        got = torch.cat([model(x[i:i + 16]) for i in range(0, len(x), 16)]).numpy()
    if ref.shape != got.shape or not np.isfinite(ref).all():
        raise OnnxError(f"{gr.where}: onnxruntime's scores have shape {ref.shape} (or are not "
                        f"finite), the imported model's {got.shape}")
    exact = out.bn is None and all(b.bias is None for b in blocks)
    # a weight scale folded out of the output layer: the graph rounds each of its fan-in
    # products s x and their sums, the imported model one product s a; its predictions may
    # then differ where two classes' scores tie within that rounding
    ulps = 8 + (out.w[0].size if out.wscale is not None else 0)
    tol = 0.0 if exact else ulps * float(np.finfo(np.float32).eps) * float(np.abs(ref).max())
    pred = got.argmax(1)
    differ = ref.argmax(1) != pred
    if out.wscale is not None:
        differ &= ref[np.arange(len(ref)), pred] < ref.max(1) - tol
    diff = float(np.abs(ref - got).max())
    if differ.any():
        raise OnnxError(f"{gr.where}: the imported model's predictions differ from "
                        f"onnxruntime's on {int(differ.sum())} of {len(x)} probe inputs "
                        f"(max |score diff| {diff:.3g}): not imported")
    if diff > tol:
        raise OnnxError(f"{gr.where}: the imported model's scores differ from onnxruntime's by "
                        f"up to {diff:.3g} (allowed {tol:.3g}): not imported")


def _own_export(gr: _Graph, io: _Io) -> BNN | None:
    """The model recorded in the metadata of a graph written by :func:`export_onnx`, if the graph
    is exactly what ``export_onnx`` writes for it (its +-1 weights taken from the graph): then
    the import is the exported model, BatchNorm parameters included. ``None`` when the file has
    no such record or its graph differs from the re-export (edited after export)."""
    props = {p.key: p.value for p in gr.proto.metadata_props}
    if gr.proto.producer_name != "bnn_tol" or _META not in props:
        return None
    try:
        rec = json.loads(props[_META])
        spec, state = rec["blocks"], rec["bn"]
        weights = [gr.const[f"w{k}"] for k in range(len(spec))]
        shapes = [(b["out"], b["in"], b["kernel"], b["kernel"]) if b["type"] == "conv"
                  else (b["in"], b["out"]) for b in spec]
        if len(state) != len(spec) or any(tuple(w.shape) != s for w, s in
                                          zip(weights, shapes, strict=True)):
            return None
        model = build("custom", blocks=spec, in_shape=io.in_shape,
                      n_classes=int(spec[-1]["out"]), input_grid=rec.get("input_grid"))
        with torch.no_grad():
            for block, w, bn in zip(model.blocks, weights, state, strict=True):
                w = torch.from_numpy(np.array(w, dtype=np.float32))
                block.layer.weight.copy_(w if block.layer.weight.dim() == 4 else w.T)
                for name, values in bn.items():
                    if name not in ("running_mean", "running_var", "weight", "bias"):
                        return None
                    getattr(block.bn, name).copy_(torch.tensor(values, dtype=torch.float32))
        model.eval()
        again = _export_proto(model, gr.opset)
    except Exception:  # noqa: BLE001 -- a record that does not rebuild: read the graph itself
        return None
    if again.graph.SerializeToString() != gr.proto.graph.SerializeToString():
        return None
    return model


def import_onnx(path: str | os.PathLike, *, in_shape=None, verify: torch.Tensor | None = None,
                transform=None) -> BNN:
    """Read an ONNX BNN graph (see the module docstring) into a bnn_tol BNN, checked and verified.

    A graph written by :func:`export_onnx` comes back as the exported model (BatchNorm
    parameters from its metadata record, checked by re-exporting: the graph must be exactly the
    export of the recorded model with the graph's weights) and, with onnxruntime, its scores on
    the probe images equal onnxruntime's bit for bit (``model.meta["exported_by"]``); one
    without such a record (older, or edited beyond its weights) is refused. Any other graph is
    read as follows.

    What is checked, each refused in one line naming the node, attribute or tensor:

    * the file is valid ONNX (``onnx.checker``), opset >= 7, standard operators (and QONNX's
      ``BipolarQuant``), initializers
      and ``Constant`` values whose data fills their dims (checked before reading), no external
      data;
    * the data flow: the nodes form one chain from the single data input to the single output
      (every tensor feeds one node, whose other inputs are constants; no branch, no node off the
      path), whatever the order of the nodes in the file;
    * every attribute of every operator is honoured (Gemm ``transB``, Conv ``pads``/``auto_pad``,
      MaxPool ``ceil_mode`` where it changes nothing, BatchNormalization ``epsilon``, Softmax
      ``axis``) or refused (Gemm ``alpha``/``beta``/``transA``, Conv ``dilations``/``group``/
      ``strides``/asymmetric padding, MaxPool ``strides`` other than the kernel, padding,
      dilations, ``Where``/``GreaterOrEqual`` thresholds other than 0, values other than +-1,
      a Clip that changes signs, an unknown attribute);
    * shapes: the input dims (or ``in_shape``) against the first layer's fan-in, every layer's
      fan-in against the previous output, kernels against spatial sizes, per-channel biases and
      BatchNorm parameters, the output's declared width; at most :data:`MAX_VALUES` values per
      sample in any tensor and fan-ins whose sums are exact in float32;
    * a ``Sign`` (0 -> 0) or ``Greater`` (0 -> -1) whose input is exactly 0 at a reachable
      pre-activation, where bnn_tol's sign gives +1.

    When onnxruntime is installed, the imported model is verified against it (the graph run as
    written, without graph optimizations): every hidden block's threshold on every reachable
    pre-activation (exact equality, except rounding ties where the graph's real pre-sign value is
    nonzero but within float32 rounding of 0: counted in ``model.meta["onnx_rounding_ties"]``),
    and predictions and class scores on probe images spanning the pixel range (see
    :func:`_check_probes`), recorded in ``model.meta["verified_with"]``. Without onnxruntime
    only the structural checks run.

    Args:
        path: the ``.onnx`` file.
        in_shape: ``(C, H, W)`` when the graph input is flat or its dims are symbolic; must
            equal the graph's dims where they are known.
        verify: optional example inputs ``(N, C, H, W)`` (library scaling) checked in addition
            to the probe images (needs onnxruntime).
        transform: the graph input's convention (:class:`bnn_tol.data.Normalize`, as for
            :func:`bnn_tol.adapt`). With it, a chain the block reader refuses -- operations
            before the first layer (Brevitas' ``2x - 1`` and input quantizer), a
            ``TensorNorm`` (Sub/Div/Mul/Add) after the last layer, a fixed batch size -- is
            read as a torch module and mapped by :func:`bnn_tol.adapt` (its verification,
            then onnxruntime's predictions on the probe images).

    Raises:
        OnnxError: naming the node, attribute or tensor that cannot be imported, and why.
    """
    onnx, _, _ = _onnx()
    where = str(path)
    try:
        proto = onnx.load(where, load_external_data=False)
    except Exception as e:  # noqa: BLE001 -- any parse failure is a user error here
        raise OnnxError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 -- the checker's verdict, in one line
        raise OnnxError(f"{path}: not a valid ONNX model ({_first_line(e)})") from None
    proto = _qonnx(proto, where)
    gr = _Graph(proto, where)
    io = _io(gr, in_shape)
    extra = None
    if verify is not None:
        if not isinstance(verify, torch.Tensor) or verify.dim() < 2 or \
                verify[0].numel() != math.prod(io.in_shape) or not verify.is_floating_point():
            raise OnnxError(f"verify must be a float tensor (N, {', '.join(map(str, io.in_shape))}"
                            f"), got {getattr(verify, 'shape', type(verify).__name__)}")
        extra = verify.detach().cpu().float().reshape(-1, *io.in_shape)
    model = _own_export(gr, io)
    if model is not None:
        return _verify_own(model, gr, io, extra, where)
    if proto.producer_name == "bnn_tol":
        raise OnnxError(f"{where}: written by bnn_tol's export_onnx but without a model record "
                        "that matches its graph (exported by a version before the record, or "
                        "edited beyond its weights): its folded thresholds and score table do "
                        "not determine the BatchNorms; export the model again")
    try:
        chain, _ = gr.chain()
    except _Branching as branch:  # a residual BNN: read as a module, mapped by adapt
        if transform is None:
            raise OnnxError(f"{branch}; a graph with shortcut additions (a residual BNN) is "
                            "read as a torch module and mapped by bnn_tol.adapt: pass the input "
                            "convention it was trained with, transform=bnn_tol.data.Normalize("
                            "mean, std) (bnn-tol import --normalize MEAN,STD)") from None
        try:
            return _import_by_adapt(gr, gr.dag(), io, transform, where)
        except UnsupportedModel as e:
            raise OnnxError(f"{branch}; read as a module and adapted with {transform!r}: "
                            f"{e}") from None
    try:
        blocks = _blocks(gr, chain, io)
    except OnnxError as first:
        if transform is None:  # adapt needs the input convention: the graph does not say it
            raise OnnxError(f"{first}; to read the graph as a torch module and map it with "
                            "bnn_tol.adapt instead, pass the input convention it was trained "
                            "with: transform=bnn_tol.data.Normalize(mean, std) (bnn-tol import "
                            "--normalize MEAN,STD)") from None
        try:  # an input transform, TensorNorm, ...: read as a module, mapped by adapt
            return _import_by_adapt(gr, chain, io, transform, where)
        except UnsupportedModel as e:
            raise OnnxError(f"{first}; read as a module and adapted with {transform!r}: "
                            f"{e}") from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        # a case the checks above do not foresee: still one line naming the node
        raise OnnxError(f"{gr.at.label if gr.at is not None else where}: cannot be imported "
                        f"({_first_line(e)})") from None
    model = _build_model(blocks, io.in_shape)
    _check_zero_signs(blocks, model)
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is None and extra is not None:
        raise OnnxError("verify= needs onnxruntime: pip install 'bnn_tol[onnx]'")
    model.meta = {"imported_from": str(path)}
    if ort is not None:
        rt = _Runtime(ort, where)
        ties = _check_thresholds(rt, gr, blocks, model)
        _check_probes(rt, gr, io, blocks, model, extra)
        model.meta["verified_with"] = f"onnxruntime {ort.__version__}"
        if ties:
            model.meta["onnx_rounding_ties"] = ties
    return model


class _Elementwise(torch.nn.Module):
    """An ONNX ``Add``/``Sub``/``Mul``/``Div`` of the data and a constant, operands in the
    graph's order (``Sub(c, x)`` is ``c - x``)."""

    _OPS = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}

    def __init__(self, op: str, const: np.ndarray, data_first: bool) -> None:
        super().__init__()
        self.op, self.data_first = op, data_first
        self.register_buffer("c", torch.from_numpy(np.array(const, dtype=np.float32)))

    def forward(self, x):
        fn = self._OPS[self.op]
        return fn(x, self.c) if self.data_first else fn(self.c, x)


class _OnnxSign(torch.nn.Module):
    """``Where(x >= 0, 1, -1)`` (``strict``: ``x > 0``), or ONNX ``Sign`` (0 -> 0)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "Sign":
            return torch.sign(x)
        return torch.where(x > 0 if self.kind == "Greater" else x >= 0, 1.0, -1.0)


class _Round(torch.nn.Module):
    def forward(self, x):
        return torch.round(x)


def _to_torch(gr: _Graph, nodes: list[_Node]) -> torch.nn.Module:
    """The graph as a torch module computing what it computes (for :func:`adapt`), a
    ``torch.fx.GraphModule`` with one submodule per node: Gemm/MatMul/Conv as Linear/Conv2d
    with the graph's (binarized, scaled) weights, BatchNormalization, elementwise
    Add/Sub/Mul/Div with a constant, a sign written as ``Where(x >= 0, 1, -1)`` or ``Sign``,
    Clip, MaxPool, Flatten/Reshape to ``(N, -1)``, Softmax; and ``Add``/``Sub``/``Mul`` of two
    data tensors (a residual BNN's shortcut) as the torch operator. ``nodes``: a chain
    (:meth:`_Graph.chain`) or an evaluation order (:meth:`_Graph.dag`). Refuses other operators
    naming the node."""
    root, graph = torch.nn.Module(), torch.fx.Graph()
    env = {gr.input.name: graph.placeholder("x")}
    rank = {gr.input.name: len(gr.input.type.tensor_type.shape.dim)}  # 2 after a flatten
    skip: set[int] = set()  # the Where of a sign read with its comparison
    made_by: dict[str, torch.nn.Module] = {}  # tensor -> the module computing it
    for k, n in enumerate(nodes):
        if id(n) in skip:
            continue
        gr.at = n
        data = [i for i in n.inputs if i and i not in gr.const]
        out = n.outputs[0]
        if len(data) == 2 and n.op in _JOIN:
            env[out] = graph.call_function(_JOIN[n.op], tuple(env[i] for i in data))
            rank[out] = max(rank[i] for i in data)
            continue
        if len(data) != 1:
            raise OnnxError(f"{n.label}: {n.op} of {len(data)} data tensors is not supported "
                            "(one, or the sum of two for a shortcut)")
        if n.op == "Add" and _fold_bias(gr, n, data[0], made_by.get(data[0])):
            env[out], rank[out] = env[data[0]], rank[data[0]]  # the layer's bias, added there
            continue
        mod = _node_module(gr, n, data[0], rank[data[0]])
        if n.op in ("GreaterOrEqual", "Greater"):  # read with its Where: the sign
            users = gr.consumers.get(out, [])
            if len(users) != 1 or users[0].op != "Where":
                raise OnnxError(f"{n.label}: only Where(x >= 0, 1, -1) (or x > 0) is a sign")
            _check_sign_where(gr, n, users[0], data[0])
            skip.add(id(users[0]))
            out = users[0].outputs[0]
        rank[out] = 2 if n.op in ("Flatten", "Reshape", "Gemm", "MatMul") else rank[data[0]]
        if mod is None:  # Identity, Dropout
            env[out] = env[data[0]]
            continue
        name = f"{n.op.lower()}{k}"
        root.add_module(name, mod)
        env[out] = graph.call_module(name, (env[data[0]],))
        made_by[out] = mod
    graph.output(env[gr.output.name])
    return torch.fx.GraphModule(root, graph)


def _fold_bias(gr: _Graph, n: _Node, data: str, layer: torch.nn.Module | None) -> bool:
    """Add ``n``'s constant to the bias of ``layer`` (a Linear/Conv2d whose output ``data``
    feeds only ``n``) when the constant is one value per output channel -- what the exporters
    write for a layer's bias as ``MatMul`` then ``Add`` -- so that ``adapt`` folds it as any
    bias; ``False`` (nothing changed) otherwise."""
    consts = [i for i in n.inputs if i and i in gr.const]
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or len(consts) != 1 or \
            len(gr.consumers.get(data, [])) != 1:
        return False
    c = np.asarray(gr.f32(n, consts[0], "operand"))
    out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    per_channel = (out,) if isinstance(layer, torch.nn.Linear) else (out, 1, 1)
    if c.size != 1 and c.shape not in (per_channel, (1, *per_channel)):
        return False
    c = np.broadcast_to(c.reshape(-1), (out,))
    if layer.bias is None:
        layer.bias = torch.nn.Parameter(torch.zeros(out))
    with torch.no_grad():
        layer.bias.add_(torch.from_numpy(np.array(c, dtype=np.float32)))
    return True


#: Binary operators of two data tensors: a residual BNN's shortcut (``Add``).
_JOIN = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul}


def _check_sign_where(gr: _Graph, n: _Node, where: _Node, data: str) -> None:
    """``Where(x >= 0, 1, -1)`` (``Greater``: ``x > 0``): the comparison with 0 and the two
    constants +1 / -1, refused otherwise naming the node."""
    consts = [i for i in n.inputs if i and i in gr.const]
    ok = (len(consts) == 1 and float(np.max(np.abs(gr.const[consts[0]]))) == 0.0
          and n.inputs[0] == data and len(where.inputs) == 3
          and all(i in gr.const for i in where.inputs[1:])
          and float(np.max(gr.const[where.inputs[1]])) == 1.0 == float(
              np.min(gr.const[where.inputs[1]]))
          and float(np.max(gr.const[where.inputs[2]])) == -1.0 == float(
              np.min(gr.const[where.inputs[2]])))
    if not ok:
        raise OnnxError(f"{n.label}: only Where(x >= 0, 1, -1) (or x > 0) is a sign")


def _node_module(gr: _Graph, n: _Node, data: str, rank: int) -> torch.nn.Module | None:
    """The torch module computing node ``n`` on its one data input ``data`` (of ``rank``
    dims), ``None`` for an identity (see :func:`_to_torch`)."""
    consts = [i for i in n.inputs if i and i in gr.const]
    if n.op in ("Identity", "Dropout"):
        return None
    if n.op in ("Flatten", "Reshape"):
        return torch.nn.Flatten()
    if n.op in ("Gemm", "MatMul"):
        if n.attr("transA", 0) or n.inputs[0] != data:
            raise OnnxError(f"{n.label}: the data must be its first input, not transposed")
        w = gr.f32(n, n.inputs[1], "weight")
        w = w if (n.op == "Gemm" and n.attr("transB", 0)) else w.T
        w = w * float(n.attr("alpha", 1.0))
        bias = gr.f32(n, n.inputs[2], "bias") * float(n.attr("beta", 1.0)) \
            if len(n.inputs) > 2 and n.inputs[2] else None
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            if bias is not None:
                lin.bias.copy_(torch.from_numpy(np.broadcast_to(bias, (w.shape[0],)).copy()))
        return lin
    if n.op == "Conv":
        w = gr.f32(n, n.inputs[1], "weight")
        pads = list(n.attr("pads", [0] * 4))
        if n.attr("group", 1) != 1 or any(v != 1 for v in n.attr("dilations", [1, 1])) \
                or pads[:2] != pads[2:] or pads[0] != pads[1]:
            raise OnnxError(f"{n.label}: only ungrouped, undilated convolutions with "
                            "symmetric padding")
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=tuple(
            n.attr("strides", [1, 1])), padding=pads[0], bias=len(n.inputs) > 2 and bool(
            n.inputs[2]))
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.array(gr.f32(n, n.inputs[2], "bias"))))
        return conv
    if n.op == "BatchNormalization":
        gamma, beta, mean, var = (gr.f32(n, i, w) for i, w in zip(
            n.inputs[1:5], ("scale", "bias", "mean", "variance"), strict=True))
        kind = torch.nn.BatchNorm1d if rank <= 2 else torch.nn.BatchNorm2d
        bn = kind(len(gamma), eps=float(n.attr("epsilon", 1e-5))).eval()
        with torch.no_grad():
            for t, v in ((bn.weight, gamma), (bn.bias, beta), (bn.running_mean, mean),
                         (bn.running_var, var)):
                t.copy_(torch.from_numpy(np.array(v, dtype=np.float32)))
        return bn
    if n.op in ("Add", "Sub", "Mul", "Div"):
        if len(consts) != 1:
            raise OnnxError(f"{n.label}: {n.op} of the data and one constant only")
        return _Elementwise(n.op, gr.f32(n, consts[0], "operand"), n.inputs[0] == data)
    if n.op in ("GreaterOrEqual", "Greater", "Sign"):
        return _OnnxSign(n.op)
    if n.op == "Round":  # half to even, as torch.round
        return _Round()
    if n.op == "Clip":
        lo, hi = _clip_range(gr, n)
        return torch.nn.Hardtanh(lo, hi)
    if n.op == "MaxPool":
        kern = n.attr("kernel_shape")
        if kern is None or len(set(kern)) != 1 or any(n.attr("pads", [0])) or \
                list(n.attr("strides", kern)) != list(kern):
            raise OnnxError(f"{n.label}: only square max-pooling with stride = kernel")
        return torch.nn.MaxPool2d(int(kern[0]))
    if n.op in ("Softmax", "LogSoftmax"):
        return torch.nn.Softmax(1) if n.op == "Softmax" else torch.nn.LogSoftmax(1)
    raise OnnxError(f"{n.label}: operator {n.op} is not supported")


def _import_by_adapt(gr: _Graph, nodes: list[_Node], io: _Io, transform, where: str) -> BNN:
    """A chain the block reader refuses (an input transform such as Brevitas' ``2x - 1`` and
    input quantizer, a ``TensorNorm`` after the last layer, a static batch size) or a graph
    with shortcut additions (a residual BNN, ``nodes`` from :meth:`_Graph.dag`): read as a
    torch module (:func:`_to_torch`) and mapped by :func:`bnn_tol.adapt` with the user's input
    ``transform`` (a residual one becomes a :class:`bnn_tol.core.graph.GraphBNN`); then, with
    onnxruntime, the predictions on the probe images checked against the graph run as
    written."""
    module = _to_torch(gr, nodes)
    user = transform if transform is not None else _LIBRARY
    pixels = _probe_pixels(io.in_shape)
    x = user.to_float(pixels)
    model = adapt(module, x.reshape(len(x), *io.shape), transform=transform,
                  in_shape=io.in_shape if len(io.shape) == 1 else None)
    model.meta = {"imported_from": where, "imported_by": "adapt"}
    try:
        import onnxruntime as ort
    except ImportError:
        return model
    rt = _Runtime(ort, where)
    ref = rt.run(rt.session(gr.proto, "the graph"), io.name,
                 x.numpy().reshape(len(x), *io.shape), io.batch, "the probe inputs")
    with torch.no_grad():
        got = model(grid_of(model).to_float(pixels)).argmax(1).numpy()
    if not np.array_equal(ref.argmax(1), got):
        raise OnnxError(f"{where}: onnxruntime's predictions differ from the adapted model's on "
                        f"{int((ref.argmax(1) != got).sum())} of {len(got)} probe images")
    model.meta["verified_with"] = f"onnxruntime {ort.__version__} (predictions)"
    return model


def _verify_own(model: BNN, gr: _Graph, io: _Io, extra: torch.Tensor | None, where: str) -> BNN:
    """A graph :func:`export_onnx` wrote for ``model`` (see :func:`_own_export`): the export is
    exact by construction; with onnxruntime installed, its scores on the probe images (and
    ``extra``) are checked to equal the model's bit for bit."""
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is None and extra is not None:
        raise OnnxError("verify= needs onnxruntime: pip install 'bnn_tol[onnx]'")
    model.meta = {"imported_from": where, "exported_by": "bnn_tol"}
    if ort is None:
        return model
    rt = _Runtime(ort, where)
    x = grid_of(model).to_float(_probe_pixels(io.in_shape))
    if extra is not None:
        x = torch.cat([x, extra])
    ref = rt.run(rt.session(gr.proto, "the graph"), io.name,
                 x.numpy().reshape(len(x), *io.shape), io.batch, "the probe inputs")
    with torch.no_grad():
        got = torch.cat([model(x[i:i + 16]) for i in range(0, len(x), 16)]).numpy()
    if not np.array_equal(ref, got):
        raise OnnxError(f"{where}: onnxruntime's scores differ from the exported model's "
                        "(not imported)")
    model.meta["verified_with"] = f"onnxruntime {ort.__version__}"
    return model
