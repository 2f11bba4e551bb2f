"""Shared plumbing of the metrics: model/data validation and the compiled view they read
(per-layer constants live on :class:`bnn_tol.core.compiled.Stage`).

Private: the public functions live in :mod:`.margin`, :mod:`.importance`, :mod:`.flipprob`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bnn_tol.core.compiled import CompiledModel, Stage, check_bnn, positions
from bnn_tol.core.layers import BinaryConv2d, BinaryLinear
from bnn_tol.core.models import check_data as check_model_data
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument

#: Largest histogram (entries) kept per layer by the margin pass (int64: 1 GiB).
MAX_HIST = 2**27


def compiled(model: nn.Module) -> CompiledModel:
    """The compiled view of a BNN the metrics read (:func:`bnn_tol.core.compiled.check_bnn`:
    sign weights and activations, BatchNorm with running statistics after every layer).

    Raises:
        UnsupportedModel: naming the first block that does not fit, and why.
    """
    return check_bnn(model, what="each tolerance metric")


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks of a BNN, validated by :func:`compiled`."""
    return [s.block for s in compiled(model).stages]


def hidden_layers(model: nn.Module) -> list[Stage]:
    """The compiled hidden stages (all blocks but the last): each carries ``tau``,
    ``direction``, ``bn_scale`` and the folded comparator on its grid.

    Raises:
        UnsupportedModel: see :func:`compiled`.
    """
    return compiled(model).hidden


def check_data(model: nn.Module, data: BNNDataset) -> None:
    """Raise ``ValueError`` for an empty dataset or one whose images do not fit the model."""
    if not isinstance(data, BNNDataset):
        raise TypeError(f"data must be a bnn_tol.data.BNNDataset, got {type(data).__name__}; "
                        "wrap tensors with BNNDataset(images_uint8, labels)")
    if len(data) == 0:
        raise InvalidArgument(f"dataset {data.name!r} is empty: the metrics average over samples, "
                         "pass at least one sample")
    check_model_data(model, data)
    first = compiled(model).stages[0]
    blocks, name = [first.block], first.name
    expected = None
    try:
        expected = tuple(model.in_shape)
    except (AttributeError, KeyError, TypeError):
        pass
    if expected is not None and tuple(data.shape) != expected:
        raise InvalidArgument(
            f"{name} expects inputs of shape {expected} but dataset {data.name!r} "
                         f"has images of shape {tuple(data.shape)}; evaluate the model on the "
                         "dataset it was trained for")
    layer = blocks[0].layer
    if isinstance(layer, BinaryLinear) and math.prod(data.shape) != layer.in_features:
        raise InvalidArgument(f"{name} has {layer.in_features} inputs but images of shape "
                         f"{tuple(data.shape)} have {math.prod(data.shape)} values")
    if isinstance(layer, BinaryConv2d) and data.shape[0] != layer.in_channels:
        raise InvalidArgument(f"{name} expects {layer.in_channels} input channels, images have "
                         f"{data.shape[0]}")


def device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def run_block(fn, x: Tensor, name: str) -> Tensor:
    """Call ``fn(x)``, turning shape errors into a ``ValueError`` that names the layer."""
    try:
        return fn(x)
    except RuntimeError as e:
        raise InvalidArgument(
            f"{name}: cannot apply to input of shape {tuple(x.shape)} ({e})") from e


def binary_weight(layer: nn.Module) -> Tensor:
    """Deployed {-1, +1} weight (faults included), detached."""
    return layer.binary_weight().detach()


class GraphUnits(NamedTuple):
    """The binary neurons of a residual graph (:meth:`bnn_tol.core.graph.GraphBNN.units`), one
    entry per unit: its ``sign`` nodes, BatchNorm module and input node, binary layer module,
    qualified layer name, ``layer_index`` (the layer's position among the stored layers) and
    ``kind`` (``"first"`` for a layer reading the input)."""

    sign: list[tuple[str, ...]]
    bn: list[nn.Module]
    inputs: list[str]
    layers: list[nn.Module]
    names: list[str]
    index: list[int]
    kind: list[str]


def is_graph(model: nn.Module) -> bool:
    """A residual graph model (:class:`bnn_tol.core.graph.GraphBNN`)."""
    return callable(getattr(model, "units", None)) and callable(getattr(model, "run", None))


def graph_units(model: nn.Module, layers: list[int] | None = None) -> GraphUnits:
    """The units of a graph model to measure (``layers``: their ``layer_index`` values).

    Raises:
        InvalidArgument: no unit, or ``layers`` naming none of them.
    """
    pos = positions(model)  # layer name -> position among the stored layers
    qual = {id(m): n for n, m in model.named_modules()}
    by = {n["name"]: n for n in model.nodes}
    out = GraphUnits([], [], [], [], [], [], [])
    for u in model.units():
        layer = model.ops[u["layer"]]
        k = pos[qual[id(layer)]]
        if layers is not None and k not in set(layers):
            continue
        bn = model.ops[u["bn"]]
        if bn.running_mean is None:
            raise InvalidArgument(f"{qual[id(bn)]}: a BatchNorm without running statistics")
        out.sign.append(tuple(u["signs"]))
        out.bn.append(bn)
        out.inputs.append(u["input"])
        out.layers.append(layer)
        out.names.append(qual[id(layer)])
        out.index.append(k)
        out.kind.append("first" if by[u["layer"]]["inputs"] == ["x"] else "hidden")
    if not out.sign:
        raise InvalidArgument("the graph has no binary neuron to measure (a sign reading a "
                              "BatchNorm)" + (f" in layers {layers}" if layers else ""))
    return out


def per_image(v: Tensor) -> Tensor:
    """``(B, C[, H, W])`` -> ``(B, C)``: the mean over output positions (conv)."""
    return v.flatten(2).mean(2) if v.dim() > 2 else v
