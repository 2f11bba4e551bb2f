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
(:func:`bnn_tol.core.compiled.stored_layers`, in node order), so fault injection, replay and the
``reference`` sweep engine (faults + the model's own forward) are exact on it; margins and the
negation importance are defined for its binary neurons (:meth:`GraphBNN.units`); export and the
numpy deploy take it as a graph bundle (:mod:`bnn_tol.interop.bundle`); what assumes a chain of
sign blocks (the packed/int8/fp32 engines, flip probability, predicted accuracy, ONNX export)
refuses it by name (:func:`bnn_tol.core.compiled.compile_model`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.layers import BinaryConv2d, BinaryLinear
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
            args = [env[i] for i in node["inputs"]]
            op = node["op"]
            if op in ("binary", "bn"):
                h = args[0]
                if op == "binary" and node["type"] == "linear" and h.dim() > 2:
                    h = h.flatten(1)
                env[node["name"]] = self.ops[node["name"]](h)
            elif op == "sign":
                env[node["name"]] = torch.where(args[0] >= 0, 1.0, -1.0).to(args[0].dtype)
            elif op == "hardtanh":
                env[node["name"]] = F.hardtanh(args[0], node["min"], node["max"])
            elif op == "add":
                env[node["name"]] = args[0] + args[1]
            elif op == "pool":
                env[node["name"]] = F.max_pool2d(args[0], node["kernel"])
            else:  # flatten
                env[node["name"]] = args[0].flatten(1)
            if edit is not None:
                env[node["name"]] = edit(node["name"], env[node["name"]])
        return env[self.nodes[-1]["name"]], {k: env[k] for k in capture}

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
