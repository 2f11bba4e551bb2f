"""Shared plumbing of the metrics: model/data validation, per-layer constants, clean forward.

Private: the public functions live in :mod:`.margin`, :mod:`.importance`, :mod:`.flipprob`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnn_tol.core.compiled import check_bnn
from bnn_tol.core.layers import (
    BinaryConv2d,
    BinaryLinear,
    FoldedThreshold,
    bn_threshold,
    fold_threshold,
)
from bnn_tol.core.models import check_data as check_model_data
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument

#: Largest histogram (entries) kept per layer by the margin pass (int64: 1 GiB).
MAX_HIST = 2**27


@dataclass
class LayerInfo:
    """Constants of one hidden block ``k`` (a binary layer followed by BN and sign).

    Attributes:
        index: block index ``k`` (``layer_index`` in the tables).
        name: qualified name of the binary layer (``"blocks.0.layer"``).
        kind: ``"first"`` (real-valued inputs) or ``"hidden"`` ({-1, +1} inputs).
        conv: the layer is a :class:`BinaryConv2d`.
        fan_in: weights per output unit (conv: ``C_in * kh * kw``, the full kernel).
        tau: ``(C,)`` float64 real BN threshold (nan for dead neurons).
        direction: ``(C,)`` int8 in {+1, -1, 0}.
        scale: ``(C,)`` float64 ``|gamma| / sqrt(s2 + eps)`` (BN-scaled margin factor).
        folded: integer comparator equal to the float BN + sign (hidden layers).
    """

    index: int
    name: str
    block: nn.Module
    kind: str
    conv: bool
    fan_in: int
    tau: Tensor
    direction: Tensor
    scale: Tensor
    folded: FoldedThreshold


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks of a BNN, validated by :func:`bnn_tol.compiled.check_bnn` (sign weights and
    activations, BatchNorm with running statistics after every layer).

    Raises:
        UnsupportedModel: naming the first block that does not fit, and why.
    """
    return [s.block for s in check_bnn(model, what="each tolerance metric").stages]


def layer_names(model: nn.Module) -> dict[int, str]:
    """``id(layer) -> qualified name`` for every module of ``model``."""
    return {id(m): n for n, m in model.named_modules()}


def hidden_layers(model: nn.Module) -> list[LayerInfo]:
    """:class:`LayerInfo` of every hidden block (all blocks but the last), from the compiled
    view (:mod:`bnn_tol.compiled`).

    Raises:
        UnsupportedModel: see :func:`blocks_of`.
    """
    out = []
    for s in check_bnn(model, what="each tolerance metric").stages:
        if not s.hidden:
            continue
        bn = s.block.bn
        thr = bn_threshold(bn)
        gamma = (bn.weight.detach().double().cpu() if bn.weight is not None
                 else torch.ones(bn.num_features, dtype=torch.float64))
        scale = gamma.abs() / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
        out.append(LayerInfo(s.index, s.name, s.block, s.kind, s.conv, s.fan_in, thr.tau,
                             thr.direction, scale, fold_threshold(bn)))
    return out


def check_data(model: nn.Module, data: BNNDataset) -> None:
    """Raise ``ValueError`` for an empty dataset or one whose images do not fit the model."""
    if not isinstance(data, BNNDataset):
        raise TypeError(f"data must be a bnn_tol.data.BNNDataset, got {type(data).__name__}; "
                        "wrap tensors with BNNDataset(images_uint8, labels)")
    if len(data) == 0:
        raise InvalidArgument(f"dataset {data.name!r} is empty: the metrics average over samples, "
                         "pass at least one sample")
    check_model_data(model, data)
    blocks = blocks_of(model)
    name = layer_names(model).get(id(blocks[0].layer), "blocks.0.layer")
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
