"""Residual BNNs: a model that is a small graph of named operations instead of a chain of blocks.

Binary ResNets and Bi-Real-Net add a real-valued shortcut around binary convolutions, so the
activations between blocks are real and a block's output is not a sign. :class:`GraphBNN`
holds such a network as a list of nodes (JSON, saved in ``config.json`` like any model), each
reading earlier nodes by name (the input is ``"x"``)::

    {"name": "n3", "op": "binary", "inputs": ["n2"], "type": "conv", "in": 8, "out": 8,
     "kernel": 3, "padding": 1}              # BinaryConv2d / BinaryLinear (its input as given)
    {"op": "bn", "features": 8, "conv": true, "eps": 1e-5, "affine": true}
    {"op": "sign"}                           # the library's sign: +1 where x >= 0
    {"op": "hardtanh", "min": -1.0, "max": 1.0}
    {"op": "add", "inputs": [a, b]}          # the shortcut: a real-valued sum
    {"op": "pool", "kernel": 2}              # max-pooling, stride = kernel
    {"op": "flatten"}

The last node gives the class scores. Its binary layers are stored layers like any other
(:func:`bnn_tol.core.compiled.stored_layers`, in node order), so fault injection, replay and
the ``reference`` sweep engine (faults + the model's own forward) are exact on it; the ``fp32``
sweep engine evaluates it too, many fault maps at once, with the same results bit for bit
(:class:`bnn_tol.engines.fp32.GraphFp32Engine`); margins and the negation importance are
defined for its binary neurons (:meth:`GraphBNN.units`); export and the numpy deploy take it
as a graph bundle (:mod:`bnn_tol.interop.bundle`); what assumes a chain of sign blocks (the
packed/int8/fixed engines, flip probability, predicted accuracy, ONNX export) refuses it by
name (:func:`bnn_tol.core.compiled.compile_model`).

**What is exact.** A binary layer reading ``+-1`` values (a ``sign`` node, pooled or
flattened) or the input on the model's grid ``x = q / scale`` (``scale`` a power of two,
:class:`bnn_tol.data.InputGrid`) has pre-activations ``a = k / scale`` with an integer
``k = sum_i w_i q_i``; every partial sum of any summation order is such a multiple of
``1 / scale`` below ``2^24 / scale`` in magnitude (``q_max fan_in < 2^24``), so float32
GEMMs and direct convolutions compute ``a`` exactly, whatever the blocking or thread count.
Everything else acts on each value alone -- ``sign``, ``hardtanh`` and max-pooling compare,
``add`` is one correctly rounded float32 addition, eval-mode BatchNorm is ``v alpha_c +
beta_c`` with per-channel constants, computed by torch's CPU kernel with the same vector
expression on every element of one sample's channel plane (contiguous NCHW; BatchNorm1d: of
one sample's row; its threads split the batch into whole planes/rows) -- so a value does not
depend on the batch it is computed in, nor on the thread count. :meth:`GraphBNN.node_value`
keeps every value contiguous (a conv on one input channel may answer channels-last, whose
BatchNorm kernel is another loop). That is why :meth:`GraphBNN.run` needs no rounding, and
why the ``fp32`` engine, which puts fault maps into the batch dimension and rounds its
pre-activations to the exact ``k / scale``, predicts what ``model(x)`` predicts on every map
(:meth:`GraphBNN.value_kinds` tells which binary layers read such values; the engine refuses a
graph where one does not). On CUDA, cuDNN may pick a convolution algorithm that is not a sum
of products (Winograd, FFT) for the model's own forward; the engine rounds, the forward does
not, so there the two agree only when the forward's algorithm is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.layers import BinaryConv2d, BinaryLinear, sign
from bnn_tol.core.models import BNN, register
from bnn_tol.data import InputGrid
from bnn_tol.exceptions import InvalidArgument, require_int

__all__ = ["GraphBNN", "OPS"]

#: Node operations and the fields each takes (besides ``name``, ``op``, ``inputs``).
OPS = {
    "binary": {"type", "in", "out", "kernel", "padding"},
    "bn": {"features", "conv", "eps", "affine"},
    "sign": set(),
    "hardtanh": {"min", "max"},
    "add": set(),
    "pool": {"kernel"},
    "flatten": set(),
}


class GraphBNN(BNN):
    """A BNN as a graph of named nodes (see the module docstring).

    Attributes:
        nodes: the validated node specs, in evaluation order.
        ops: ``nn.ModuleDict`` of the nodes with parameters (binary layers, BatchNorms), keyed
            by node name.
    """

    def __init__(self, nodes: Sequence[dict], config: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        self.config = dict(config)
        self.meta: dict[str, Any] = {}
        self.nodes = _validate(nodes)
        self.ops = nn.ModuleDict()
        for node in self.nodes:
            module = _module(node)
            if module is not None:
                self.ops[node["name"]] = module

    def forward(self, x: Tensor) -> Tensor:
        """Class scores ``(N, n_classes)`` for inputs ``(N, *in_shape)`` on the model's grid."""
        return self.run(x)[0]

    def run(self, x: Tensor, capture: Sequence[str] = (),
            edit: Callable[[str, Tensor], Tensor] | None = None) -> tuple[Tensor, dict]:
        """The class scores and the values of the nodes named in ``capture`` (``"x"`` the
        input); ``edit(name, value)``, when given, replaces each node's value as it is
        computed (the metrics negate one binary neuron's output this way)."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise InvalidArgument(f"graph expects inputs of shape (N, {self.in_shape}), got "
                                  f"{tuple(x.shape)}")
        env = {"x": x}
        for node in self.nodes:
            value = self.node_value(node, [env[i] for i in node["inputs"]])
            env[node["name"]] = value if edit is None else edit(node["name"], value)
        return env[self.nodes[-1]["name"]], {k: env[k] for k in capture}

    def node_value(self, node: dict, args: Sequence[Tensor]) -> Tensor:
        """The value of ``node`` (one of :attr:`nodes`) from the values ``args`` of its
        inputs, with the model's own ops: a ``binary`` node its layer (current fault
        included; a linear layer flattens its input), ``bn`` its BatchNorm module, ``sign``
        the library's :func:`~bnn_tol.core.layers.sign` (``+1`` where ``v >= 0``, else ``-1``;
        straight-through gradient), ``hardtanh`` a clamp, ``add`` ``a + b``, ``pool`` max-pooling,
        ``flatten``; the value is made contiguous (NCHW). Every op but ``binary`` acts on each
        value alone (BatchNorm in eval mode: ``v alpha_c + beta_c`` per channel), so it takes
        any leading batch size: the ``fp32`` sweep engine evaluates all nodes but the binary
        ones through it, on many fault maps at once."""
        op = node["op"]
        if op in ("binary", "bn"):
            h = args[0]
            if op == "binary" and node["type"] == "linear" and h.dim() > 2:
                h = h.flatten(1)
            v = self.ops[node["name"]](h)
        elif op == "sign":
            v = sign(args[0])
        elif op == "hardtanh":
            v = F.hardtanh(args[0], node["min"], node["max"])
        elif op == "add":
            v = args[0] + args[1]
        elif op == "pool":
            v = F.max_pool2d(args[0], node["kernel"])
        else:  # flatten
            v = args[0].flatten(1)
        # contiguous (NCHW) whatever format an op chose (a conv on one input channel may
        # answer channels-last): every BatchNorm then runs torch's contiguous kernel
        return v.contiguous()

    def value_kinds(self) -> dict[str, str]:
        """What each node's values are, for every sample: ``"pm1"`` (all in {-1, +1}: a
        ``sign`` node, and max-pooling, flattening or a ``hardtanh`` with ``min <= -1 <= 1 <=
        max`` of one), ``"grid"`` (the input ``"x"``, on the model's input grid ``q / scale``,
        and max-pooling or flattening of it) or ``"real"`` (anything else). A binary layer
        reading ``pm1`` or ``grid`` values has exact pre-activations ``k / scale`` (integer
        ``k``; module docstring)."""
        kinds = {"x": "grid"}
        for node in self.nodes:
            op, src = node["op"], kinds[node["inputs"][0]]
            if op == "sign":
                kind = "pm1"
            elif op in ("pool", "flatten"):
                kind = src
            elif op == "hardtanh":
                kind = "pm1" if src == "pm1" and node["min"] <= -1 and node["max"] >= 1 \
                    else "real"
            else:
                kind = "real"
            kinds[node["name"]] = kind
        return kinds

    def units(self) -> list[dict]:
        """The binary neurons: every ``sign`` node reading a BatchNorm node directly or through
        ``hardtanh`` nodes whose range contains 0 (``sign(hardtanh(v)) = sign(v)``), so that
        ``sign(BN(v))`` with ``v`` the BatchNorm's input: a binary layer's pre-activation
        ``a``, or ``a + r`` where a shortcut ``r`` is added before the BatchNorm (the
        shortcut shifts the unit's threshold per sample: ``a >= tau - r``).

        Returns:
            Per unit (one per BatchNorm; several sign nodes may read it): ``signs``, ``bn``,
            ``input`` (the BatchNorm's input node), ``layer`` (the binary node giving ``a``:
            the BatchNorm's input, or the binary input of the ``add`` there), in node order.
        """
        by = {n["name"]: n for n in self.nodes}
        out: dict[str, dict] = {}
        for n in self.nodes:
            if n["op"] != "sign":
                continue
            src = by.get(n["inputs"][0])
            while src is not None and src["op"] == "hardtanh" and src["min"] < 0 < src["max"]:
                src = by.get(src["inputs"][0])
            if src is None or src["op"] != "bn":
                continue
            inp = by.get(src["inputs"][0])
            layer = inp if inp is not None and inp["op"] == "binary" else None
            if inp is not None and inp["op"] == "add":
                cands = [by.get(i) for i in inp["inputs"]]
                layer = next((c for c in cands if c is not None and c["op"] == "binary"), None)
            if layer is None:
                continue
            unit = out.setdefault(src["name"], {"signs": [], "bn": src["name"],
                                                "input": src["inputs"][0],
                                                "layer": layer["name"]})
            unit["signs"].append(n["name"])
        return list(out.values())


def _validate(nodes: Sequence[dict]) -> list[dict]:
    """Node specs checked: known ops and fields, unique names, inputs defined earlier."""
    if isinstance(nodes, str) or not isinstance(nodes, Sequence) or not nodes:
        raise InvalidArgument("graph: nodes must be a non-empty list of node specs")
    seen, out = {"x"}, []
    for k, node in enumerate(nodes):
        if not isinstance(node, dict) or node.get("op") not in OPS:
            raise InvalidArgument(f"graph: node {k} needs op one of {', '.join(OPS)}, got "
                                  f"{node!r}")
        name, op, inputs = node.get("name"), node["op"], node.get("inputs")
        if not isinstance(name, str) or not name.isidentifier() or name in seen:
            raise InvalidArgument(f"graph: node {k} needs a new identifier as name, got "
                                  f"{name!r}")
        want = 2 if op == "add" else 1
        if not isinstance(inputs, list) or len(inputs) != want or not all(
                isinstance(i, str) and i in seen for i in inputs):
            raise InvalidArgument(f"graph: node {name} ({op}) needs {want} input(s) among the "
                                  f"nodes before it, got {inputs!r}")
        extra = set(node) - {"name", "op", "inputs"} - OPS[op]
        missing = OPS[op] - set(node) - ({"kernel", "padding"} if node.get("type") == "linear"
                                         else set())
        if extra or missing:
            raise InvalidArgument(f"graph: node {name} ({op}) "
                                  + (f"has unknown fields {sorted(extra)}" if extra else
                                     f"lacks {sorted(missing)}"))
        out.append(dict(node))
        seen.add(name)
    return out


def _module(node: dict) -> nn.Module | None:
    name = node["name"]
    if node["op"] == "binary":
        i = require_int(node["in"], f"{name} in", minimum=1)
        o = require_int(node["out"], f"{name} out", minimum=1)
        if node["type"] == "conv":
            return BinaryConv2d(i, o, require_int(node["kernel"], f"{name} kernel", minimum=1),
                                require_int(node["padding"], f"{name} padding", minimum=0))
        if node["type"] != "linear":
            raise InvalidArgument(f"graph: node {name} type must be linear or conv")
        return BinaryLinear(i, o)
    if node["op"] == "bn":
        c = require_int(node["features"], f"{name} features", minimum=1)
        kind = nn.BatchNorm2d if node["conv"] else nn.BatchNorm1d
        return kind(c, eps=float(node["eps"]), affine=bool(node["affine"]))
    return None


@register("graph")
def graph(
    nodes: Sequence[dict],
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    n_classes: int = 10,
    input_grid: dict | None = None,
) -> GraphBNN:
    """A residual BNN from node specs (what :func:`bnn_tol.adapt` produces for binary ResNets
    and Bi-Real-style models; see the module docstring). ``input_grid``: as for ``custom``."""
    shape = tuple(require_int(v, "in_shape", minimum=1) for v in in_shape)
    if len(shape) != 3:
        raise InvalidArgument(f"in_shape must be (channels, height, width), got {in_shape!r}")
    grid = None if input_grid is None else InputGrid.from_config(input_grid)
    cfg: dict[str, Any] = {"name": "graph", "kwargs": {
        "nodes": [dict(n) for n in nodes], "in_shape": list(shape), "n_classes": int(n_classes)}}
    if grid is not None:
        cfg["kwargs"]["input_grid"] = grid.config()
    model = GraphBNN(nodes, cfg)
    if grid is not None:
        model.input_grid = grid
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *shape))
    model.train()
    if out.dim() != 2 or out.shape[1] != n_classes:
        raise InvalidArgument(f"graph: the last node gives {tuple(out.shape[1:])} per sample, "
                              f"not {n_classes} class scores")
    return model
