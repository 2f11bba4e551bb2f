"""The fp32 engine: any BNN, CPU or CUDA, ``maps_per_step`` fault maps batched per step.

Maps ride in the batch/group dimension of stacked +-1 weights (``bmm``, grouped conv); every
pre-activation is rounded to the exact integer it equals (float rounding of any GEMM/conv
algorithm stays far below 1/2 on these values), then compared with the folded thresholds.
Residual graphs (:class:`~bnn_tol.core.graph.GraphBNN`) get their own class,
:class:`GraphFp32Engine`: the same batching of maps, node by node.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.compiled import Stage, UnsupportedModel, stored_layers
from bnn_tol.core.graph import GraphBNN
from bnn_tol.core.layers import apply_folded
from bnn_tol.data import grid_of
from bnn_tol.engines.base import (
    MEMORY_BUDGET,
    Engine,
    SignEngine,
    fp32_prefix,
    register_engine,
)
from bnn_tol.faults.apply import negate_

__all__ = ["Fp32Engine", "GraphFp32Engine", "graph_issue"]

#: Integers up to this magnitude are exact in float32.
_EXACT_F32 = 2**24


def _fp32_forward(
    stages: list[Stage], out_bn: nn.Module, x: Tensor, ws: list[Tensor], start: int = 0
) -> Tensor:
    """Predictions ``(G, B)`` of ``G`` fault maps at once.

    ``x``: ``(B, ...)`` input of stage ``start`` shared by all maps (float, exact values);
    ``ws[k]``: ``(G, *weight.shape)`` per-map ±1 weights, or ``weight.shape`` when shared.
    Maps ride in the batch/group dimension: a shared input meets stacked weights
    (``(G out, in)`` / ``(G C_out, C_in, k, k)``), per-map inputs use ``bmm`` / grouped conv.
    Pre-activations are rounded to the exact integers ``scale a`` they equal in exact
    arithmetic (float rounding errors of any GEMM/conv algorithm are far below 1/2), then
    compared with the folded thresholds; the last layer's float BatchNorm gets the exact ``a``.
    """
    h, shared, g = x, True, None
    for k in range(start, len(stages)):
        st, w = stages[k], ws[k]
        per_map = w.dim() == st.wb.dim() + 1
        if per_map:
            g = w.shape[0]
        if st.flatten:
            h = h.flatten(1) if shared else h.flatten(2)
        if not st.conv:
            if shared and per_map:
                a = (h @ w.reshape(-1, w.shape[-1]).t()).view(h.shape[0], g, -1).transpose(0, 1)
            elif shared:
                a = h @ w.t()
            elif per_map:
                a = torch.bmm(h, w.transpose(1, 2))
            else:
                a = h @ w.t()
        else:
            pad = st.block.layer.padding
            if shared and per_map:
                a = F.conv2d(h, w.reshape(-1, *w.shape[2:]), padding=pad)
                a = a.view(a.shape[0], g, -1, *a.shape[2:]).transpose(0, 1)
            elif shared:
                a = F.conv2d(h, w, padding=pad)
            elif per_map:
                gb = h.shape[1]
                hh = h.transpose(0, 1).reshape(gb, -1, *h.shape[3:])
                a = F.conv2d(hh, w.reshape(-1, *w.shape[2:]), padding=pad, groups=g)
                a = a.view(gb, g, -1, *a.shape[2:]).transpose(0, 1)
            else:
                a = F.conv2d(h.reshape(-1, *h.shape[2:]), w, padding=pad)
                a = a.view(h.shape[0], h.shape[1], *a.shape[1:])
        shared = shared and not per_map
        ai = torch.round(a * st.scale)  # exact integer scale * a
        cdim = 1 if shared else 2
        if st.hidden:
            h = apply_folded(ai, st.folded, channel_dim=cdim).to(x.dtype)
            if st.pool:
                lead = h.shape[: cdim]
                h = F.max_pool2d(h.reshape(-1, *h.shape[cdim:]), st.pool)
                h = h.view(*lead, *h.shape[1:])
        else:
            a = ai / st.scale
            z = out_bn(a.reshape(-1, a.shape[-1]))
            return z.argmax(1).view(a.shape[:-1])
    raise AssertionError("unreachable: the last stage returns")


@register_engine
class Fp32Engine(SignEngine):
    """``maps_per_step`` maps batched through stacked +-1 weights / ``bmm`` / grouped conv,
    pre-activations rounded to their exact integers (any BNN, CPU or CUDA)."""

    name, rank = "fp32", 1

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        if isinstance(cm, GraphBNN):  # the targets check of Engine, then the graph's own
            return super(SignEngine, cls).unsupported(cm, device, targets) or graph_issue(cm)
        return super().unsupported(cm, device, targets)

    @classmethod
    def for_model(cls, cm):  # noqa: D102
        return GraphFp32Engine if isinstance(cm, GraphBNN) else cls

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        super().__init__(model, data, batch_size=batch_size, maps_per_step=maps_per_step or 8,
                         **kw)
        self.batch_size = batch_size or max(64, min(len(data), MEMORY_BUDGET //
                                                    (self.cm.max_width * 12 * self.g)))
        self.w_dev = [st.wb.to(self.device) for st in self.stages]

    def _input(self, images):  # noqa: D102
        return self.cm.input.to_float(images.to(self.device))

    def _prefix_of(self, h):  # noqa: D102
        return fp32_prefix(self.stages, h, self.w_dev, self.start) if self.start > 0 else h

    def evaluate(self, flips):  # noqa: D102
        n = len(self.data)
        ws = list(self.w_dev)
        flips = [self.by_index(f) for f in flips]
        for k in self.faulty:
            w = self.stages[k].wb.expand(len(flips), *self.stages[k].wb.shape).clone()
            for g, f in enumerate(flips):
                idx = f.get(k)
                if idx is not None:
                    negate_(w[g], idx)
            ws[k] = w.to(self.device)
        correct = torch.zeros(len(flips), dtype=torch.int64, device=self.device)
        for h, y in self._chunks():
            pred = _fp32_forward(self.stages, self.out_bn, h, ws, self.start)
            pred = pred if pred.dim() == 2 else pred.expand(len(flips), -1)
            correct += (pred == y[None, :]).sum(1)
        return [int(c) / n for c in correct.cpu()]


def graph_issue(model: GraphBNN) -> str | None:
    """Why :class:`GraphFp32Engine` cannot sweep the residual graph ``model`` exactly, or
    ``None``: a binary layer reading real values (its float sum would depend on the
    summation order; :meth:`~bnn_tol.core.graph.GraphBNN.value_kinds`), or one whose integer
    pre-activations ``|k| <= q_max fan_in`` (``q_max = 1`` on +-1 inputs) could reach
    ``2^24``, beyond float32's exact integers."""
    kinds, grid = model.value_kinds(), grid_of(model)
    for node in model.nodes:
        if node["op"] != "binary":
            continue
        src = node["inputs"][0]
        if kinds[src] == "real":
            return (f"graph node {node['name']} (binary) reads real values ({src}), whose "
                    "float sums depend on the summation order; it needs +-1 (sign) or input "
                    "grid values")
        bound = (grid.q_max if kinds[src] == "grid" else 1) * model.ops[node["name"]].fan_in
        if bound >= _EXACT_F32:
            return (f"graph node {node['name']}: its pre-activations |k| <= {bound} may pass "
                    f"2^24, beyond float32's exact integers")
    return None


class GraphFp32Engine(Engine):
    """The ``fp32`` engine on a residual graph (:class:`~bnn_tol.core.graph.GraphBNN`):
    ``maps_per_step`` fault maps ``G`` per step, node by node, no copy of the model per map.

    A node whose value depends on a faulty layer holds ``(B G, ...)`` values, sample-major
    (row ``b G + g``: sample ``b`` under map ``g``); the others hold ``(B, ...)``, shared by
    all maps and computed once per data chunk (the clean prefix). A faulty binary layer has
    per-map +-1 weights ``(G, *weight.shape)``: on a shared input it is one conv/GEMM with
    the ``G C_out`` stacked filters, whose ``(B, G C_out, ...)`` output *is* ``(B G, C_out,
    ...)``; on a per-map input a grouped conv (``groups = G`` over ``(B, G C_in, ...)``) or a
    ``bmm`` per map. Every binary pre-activation is rounded to the exact ``k / scale`` it equals
    (the graph docstring, :mod:`bnn_tol.core.graph`: ``scale`` is the input grid's for a layer
    reading the input, 1 on +-1 values), an ``add`` of a per-map and a shared value broadcasts
    the shared one, and every other node is :meth:`GraphBNN.node_value` -- the model's own
    elementwise ops on contiguous tensors, whose value per element does not depend on the
    batch -- so each map's predictions are ``model(x).argmax(1)`` of the faulty model on the
    same device, bit for bit, with the same flips as the ``reference`` engine for the same chip
    (weight faults). Tested on CPU; on CUDA the model's own forward may use a convolution
    algorithm that is not exact (see the graph module docstring).
    """

    name, rank = "fp32", Fp32Engine.rank

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        super().__init__(model, data, batch_size=batch_size, maps_per_step=maps_per_step or 8,
                         **kw)
        if not isinstance(model, GraphBNN):
            raise UnsupportedModel(f"the graph fp32 engine needs a GraphBNN, got "
                                   f"{type(model).__name__}")
        why = graph_issue(model)
        if why:
            raise UnsupportedModel(f"the fp32 engine cannot evaluate this graph: {why}")
        self.net = copy.deepcopy(model).to(self.device).eval()
        self.nodes, self.grid = self.net.nodes, grid_of(model)
        qual = {id(m): n for n, m in stored_layers(model).items()}
        kinds = model.value_kinds()
        self.layer_of: dict[str, str] = {}  # binary node -> stored layer name
        self.scale: dict[str, int] = {}  # binary node -> grid of its pre-activations
        self.wb: dict[str, Tensor] = {}  # stored layer name -> its +-1 weights (CPU)
        for node in self.nodes:
            if node["op"] == "binary":
                layer = model.ops[node["name"]]
                name = qual[id(layer)]
                self.layer_of[node["name"]] = name
                self.scale[node["name"]] = (self.grid.scale if kinds[node["inputs"][0]] ==
                                            "grid" else 1)
                self.wb[name] = (layer.stored_bits().to(torch.float32) * 2 - 1).view(
                    layer.weight.shape)
        self.w_dev = {n: self.wb[lay].to(self.device) for n, lay in self.layer_of.items()}
        self.faulty = [n for n in self.chosen if n in self.wb]
        faulty_nodes = {n for n, lay in self.layer_of.items() if lay in self.faulty}
        self.varies: set[str] = set()  # nodes whose value depends on the map
        for node in self.nodes:
            if node["name"] in faulty_nodes or any(i in self.varies for i in node["inputs"]):
                self.varies.add(node["name"])
        last = self.nodes[-1]["name"]
        self.keep = {i for node in self.nodes if node["name"] in self.varies
                     for i in node["inputs"] if i not in self.varies}
        if last not in self.varies:
            self.keep.add(last)
        self.last_use = {i: k for k, node in enumerate(self.nodes) for i in node["inputs"]}
        with torch.no_grad():
            _, vals = self.net.run(torch.zeros(1, *model.in_shape, device=self.device),
                                   capture=["x", *(n["name"] for n in self.nodes)])
        width = max(v.numel() for v in vals.values())
        self.batch_size = batch_size or max(64, min(len(data), MEMORY_BUDGET //
                                                    (width * 16 * self.g)))
        self._prefix: list[tuple[dict[str, Tensor], Tensor]] | None = None

    def flips(self, fmap, p01, p10):  # noqa: D102
        return {n: fmap[n].flips(self.wb[n], p01, p10) for n in self.faulty}

    def _binary(self, node: dict, h: Tensor, per_map: bool, w: Tensor | None, g: int) -> Tensor:
        """Pre-activations of binary ``node``, rounded to its grid: ``(B G, ...)`` when the
        input ``h`` (``per_map``: ``(B G, ...)``, else ``(B, ...)``) or the weights ``w``
        (``(G, *weight.shape)``; ``None``: the clean weights) depend on the map."""
        conv = node["type"] == "conv"
        if not conv and h.dim() > 2:
            h = h.flatten(1)
        pad = self.net.ops[node["name"]].padding if conv else 0
        # conv outputs are made contiguous (NCHW): torch may return channels-last for a
        # one-channel input, and GraphBNN.node_value keeps every value contiguous too
        if w is None:  # clean weights on any input
            w = self.w_dev[node["name"]]
            a = (F.conv2d(h, w, padding=pad) if conv else h @ w.t()).contiguous()
        elif not per_map:  # shared input, G stacked filter banks: (B, G C_out, ...)
            a = (F.conv2d(h, w.reshape(-1, *w.shape[2:]), padding=pad) if conv
                 else h @ w.reshape(-1, w.shape[-1]).t()).contiguous()
            a = a.view(h.shape[0] * g, w.shape[1], *a.shape[2:])
        elif conv:  # per-map input (B, G C_in, H, W), one group per map
            b = h.shape[0] // g
            a = F.conv2d(h.view(b, g * h.shape[1], *h.shape[2:]), w.reshape(-1, *w.shape[2:]),
                         padding=pad, groups=g).contiguous()
            a = a.view(b * g, w.shape[1], *a.shape[2:])
        else:  # per-map input (B, G, in): one GEMM per map
            b = h.shape[0] // g
            a = torch.bmm(h.view(b, g, -1).transpose(0, 1), w.transpose(1, 2))
            a = a.transpose(0, 1).reshape(b * g, -1)
        scale = self.scale[node["name"]]  # a power of two: a * scale and / scale are exact
        return a.mul_(scale).round_().div_(scale) if scale != 1 else a.round_()

    def _chunks(self) -> list[tuple[dict[str, Tensor], Tensor]]:
        """Per data chunk: the shared values the map-dependent nodes read (computed once)
        and the labels."""
        if self._prefix is None:
            self._prefix = []
            for x, y in self.data.batches(self.batch_size, device=self.device, grid=self.grid):
                env = {"x": x}
                for node in self.nodes:
                    if node["name"] in self.varies:
                        continue
                    args = [env[i] for i in node["inputs"]]
                    env[node["name"]] = (self._binary(node, args[0], False, None, 1)
                                         if node["op"] == "binary"
                                         else self.net.node_value(node, args))
                self._prefix.append(({n: env[n] for n in self.keep}, y))
        return self._prefix

    def _predict(self, shared: dict[str, Tensor], ws: dict[str, Tensor], g: int) -> Tensor:
        """Predictions ``(G, B)`` of the ``G`` maps of ``ws`` (per-map weights by node) on
        one chunk (its shared values)."""
        env = dict(shared)
        last = self.nodes[-1]["name"]
        if last not in self.varies:
            return env[last].argmax(1).expand(g, -1)
        for k, node in enumerate(self.nodes):
            name = node["name"]
            if name not in self.varies:
                continue
            args = [env[i] for i in node["inputs"]]
            per = [i in self.varies for i in node["inputs"]]
            if node["op"] == "binary":
                v = self._binary(node, args[0], per[0], ws.get(name), g)
            elif node["op"] == "add" and not all(per):  # broadcast the shared summand
                rest = (args[0] if per[0] else args[1]).shape[1:]
                a, b = (t.view(-1, g, *rest) if p else t.unsqueeze(1)
                        for t, p in zip(args, per, strict=True))
                v = (a + b).view(-1, *rest)
            else:
                v = self.net.node_value(node, args)
            env[name] = v
            for i in node["inputs"]:
                if self.last_use[i] == k:
                    env.pop(i, None)
        return env[last].argmax(1).view(-1, g).t()

    @torch.no_grad()
    def evaluate(self, flips):  # noqa: D102
        g = len(flips)
        ws = {}
        for node, lay in self.layer_of.items():
            if lay not in self.faulty:
                continue
            w = self.wb[lay].expand(g, *self.wb[lay].shape).clone()
            for j, f in enumerate(flips):
                idx = f.get(lay)
                if idx is not None:
                    negate_(w[j], idx)
            ws[node] = w.to(self.device)
        correct = torch.zeros(g, dtype=torch.int64, device=self.device)
        for shared, y in self._chunks():
            correct += (self._predict(shared, ws, g) == y[None, :]).sum(1)
        return [int(c) / len(self.data) for c in correct.cpu()]
