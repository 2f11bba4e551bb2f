"""The compiled model: the one view of a model that engines, metrics, export, deploy and adapt
read.

A :class:`~bnn_tol.core.models.BNN` (or an m-bit network built the same way) is a flat list of
blocks ``[flatten] -> layer -> BN -> act -> [pool]``. :func:`compile_model` reads it once into
a :class:`CompiledModel` of :class:`Stage` s. Per stage: block, layer, qualified name, position
among the stored layers, kind (first/hidden/output), conv or linear, geometry (input, layer
output and block output shapes per sample), fan-in, codec, activation, the stored +-1 weights
:attr:`Stage.wb`, and for sign blocks the BatchNorm threshold in both forms -- the real ``tau``
with its ``direction`` and BN scale (margins), and the exact integer comparator
:attr:`Stage.folded` (engines, export). :func:`check_bnn` is the single validation, with one
error type, :class:`UnsupportedModel`, naming the block and why.

**One grid.** Pixels ``p`` enter as ``x = (p - offset) / scale`` (:attr:`CompiledModel.input`,
the library's :data:`bnn_tol.data.INPUT` unless the model declares another ``input_grid``), so
the first stage's pre-activations of +-1 weights lie on ``a = k / scale`` with integer
``k = sum_i w_i q_i``, ``q = p - offset``; later stages of a BNN see +-1 and have scale 1.
:attr:`Stage.scale` is that grid and every folded threshold is on it: the first stage's
comparator reads ``k`` (``scale a``), the others ``a``.

Stored layers (:func:`stored_layers`) are all binary/quantized layers of any module, in forward
order; a layer's *position* among them seeds its fault map (:func:`bnn_tol.faults.seeds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from bnn_tol.core.layers import (
    BinaryConv2d,
    BinaryLayer,
    FoldedThreshold,
    bn_threshold,
    fold_threshold,
)
from bnn_tol.data import INPUT, InputGrid, grid_of
from bnn_tol.exceptions import InvalidArgument

__all__ = ["UnsupportedModel", "Stage", "CompiledModel", "compile_model", "check_bnn",
           "stored_layers", "positions", "eval_mode"]


class UnsupportedModel(InvalidArgument):
    """A model (or one of its blocks) that a function cannot handle; names the block and why."""


def stored_layers(model: nn.Module) -> dict[str, BinaryLayer]:
    """Binary/quantized layers of any module by qualified name, in forward (registration) order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryLayer)}


def positions(model: nn.Module) -> dict[str, int]:
    """``{layer name: position}`` among :func:`stored_layers` (seeds the fault maps)."""
    return {n: k for k, n in enumerate(stored_layers(model))}


@dataclass
class Stage:
    """One block, compiled.

    Attributes:
        index: block index ``k``; ``name``: the layer's qualified name (``"blocks.0.layer"``
            for the library's models, any name for others); ``position``: its position among
            the stored layers (seeds its fault map).
        kind: ``"first"``, ``"hidden"`` or ``"output"`` (the last block: class scores).
        conv: a convolution (``kernel``, ``padding``) or a linear layer.
        fan_in: weights per output unit (conv: ``C_in kh kw``).
        scale: the grid of the pre-activations the folded threshold compares: the input
            grid's scale for the first stage (``a = k / scale``), 1 for later ones.
        activation: ``"sign"``/``"relu"`` for hidden blocks, ``None`` for the output block.
        pool: max-pool kernel after the activation (or ``None``); ``flatten``: the block
            flattens its input first.
        in_shape, preact_shape, out_shape: per-sample shapes of the layer's input (after
            ``flatten``), of its output (before pooling) and of the block's output; ``None``
            when the model does not declare an ``in_shape``.
        bits_per_weight, n_stored_bits: from the layer's codec.
    """

    index: int
    name: str
    position: int
    block: nn.Module
    layer: BinaryLayer
    kind: str
    conv: bool
    padding: tuple[int, ...] | int
    fan_in: int
    scale: int
    activation: str | None
    pool: int | None
    flatten: bool
    bits_per_weight: int
    n_stored_bits: int
    kernel: tuple[int, int] | None = None
    in_shape: tuple[int, ...] | None = None
    preact_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    _folded: FoldedThreshold | None = field(default=None, repr=False)

    @property
    def codec(self):
        """The layer's codec (:mod:`bnn_tol.core.codec`)."""
        return self.layer.codec

    @property
    def hidden(self) -> bool:
        """Not the output block."""
        return self.kind != "output"

    @property
    def sign_codec(self) -> bool:
        """Weights stored as one sign bit (the BNN case)."""
        return bool(self.layer.codec.is_sign)

    @cached_property
    def wb(self) -> Tensor:
        """The stored +-1 weights (sign of the latent weight, ``sign(0) = +1``, no faults):
        float32 on CPU, the shape of ``layer.weight``."""
        with torch.no_grad():
            return torch.where(self.layer.weight.detach() >= 0, 1.0, -1.0).cpu()

    def _sign_block(self) -> None:
        if self.activation != "sign":
            raise UnsupportedModel(f"{self.name}: a {self.activation} block has no threshold")

    @cached_property
    def folded(self) -> FoldedThreshold:
        """Integer comparator of ``sign(BN(a))`` on the grid ``a = k / scale`` (sign blocks):
        ``+1`` iff ``k >= t`` (direction +1), ``k <= t`` (direction -1), ``const`` for dead
        neurons; equal to the float forward pass on every reachable ``k``, ties included
        (:func:`~bnn_tol.core.layers.fold_threshold`)."""
        self._sign_block()
        return fold_threshold(self.block.bn, scale=self.scale)

    @cached_property
    def _threshold(self):
        self._sign_block()
        return bn_threshold(self.block.bn)

    @property
    def tau(self) -> Tensor:
        """``(C,)`` float64 real BN threshold ``tau = mu - beta sqrt(s2 + eps) / gamma`` on the
        grid of ``a`` (not ``k``); ``nan`` for dead neurons (``gamma = 0``). For margins."""
        return self._threshold.tau

    @property
    def direction(self) -> Tensor:
        """``(C,)`` int8 ``sign(gamma)``: +1 ``y = sign(a - tau)``, -1 ``sign(tau - a)``, 0
        dead."""
        return self._threshold.direction

    @cached_property
    def bn_scale(self) -> Tensor:
        """``(C,)`` float64 ``|gamma| / sqrt(s2 + eps)``: the factor of the BN-scaled margin."""
        bn = self.block.bn
        gamma = (bn.weight.detach().double().cpu() if bn.weight is not None
                 else torch.ones(bn.num_features, dtype=torch.float64))
        return gamma.abs() / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)


@dataclass
class CompiledModel:
    """The compiled view: ``stages`` in forward order plus model-level facts.

    Attributes:
        model: the module it was compiled from.
        stages: one :class:`Stage` per block, forward order.
        input: the input grid ``x = (p - offset) / scale`` the model expects.
        in_shape: per-sample input shape ``(C, H, W)`` (``None`` if the model declares none).
    """

    model: nn.Module
    stages: list[Stage]
    input: InputGrid = INPUT
    in_shape: tuple[int, ...] | None = None

    @property
    def is_bnn(self) -> bool:
        """Sign weights everywhere and sign activations in every hidden block."""
        return all(s.sign_codec for s in self.stages) and all(
            s.activation == "sign" for s in self.stages if s.hidden)

    @property
    def all_linear(self) -> bool:
        """No convolutions."""
        return not any(s.conv for s in self.stages)

    @property
    def codecs(self) -> set[str]:
        """``{"sign"}``, ``{"fixed"}`` or both."""
        return {"sign" if s.sign_codec else "fixed" for s in self.stages}

    @property
    def memory_bits(self) -> int:
        """Stored weight bits of the whole model."""
        return sum(s.n_stored_bits for s in self.stages)

    @property
    def hidden(self) -> list[Stage]:
        """The hidden stages (all but the output stage)."""
        return [s for s in self.stages if s.hidden]

    @property
    def max_width(self) -> int:
        """The largest per-sample activation (input or block output) in values; sizes data
        chunks from a memory budget."""
        shapes = [self.in_shape, *(s.out_shape for s in self.stages)]
        if any(sh is None for sh in shapes):
            raise UnsupportedModel("the model declares no in_shape: activation sizes unknown")
        return max(math.prod(sh) for sh in shapes)

    def by_name(self) -> dict[str, Stage]:
        """``{layer name: stage}``."""
        return {s.name: s for s in self.stages}

    def integer_issue(self) -> str | None:
        """Why the integer arithmetic of a BNN (exact pre-activations compared with folded
        thresholds: the engines, export, deploy) cannot express this model, or ``None``: a
        layer bias, or a convolution that is strided, grouped or dilated."""
        for st in self.stages:
            lay = st.layer
            if lay.bias is not None:
                return f"{st.name} has a bias (integer thresholds need bias-free layers)"
            if st.conv and (lay.stride != (1, 1) or lay.groups != 1 or lay.dilation != (1, 1)):
                return f"{st.name}: only stride-1, ungrouped convolutions"
        return None


def _declared_in_shape(model: nn.Module) -> tuple[int, ...] | None:
    try:
        shape = tuple(int(v) for v in model.in_shape)  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return shape or None


def _conv_out(layer: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """Spatial output size of a conv: ``(H + 2p - d (k - 1) - 1) // s + 1`` per axis."""
    out = []
    for size, k, p, d, s in zip((h, w), layer.kernel_size, layer.padding, layer.dilation,
                                layer.stride, strict=True):
        out.append((size + 2 * int(p) - int(d) * (int(k) - 1) - 1) // int(s) + 1)
    return out[0], out[1]


def compile_model(model: nn.Module) -> CompiledModel:
    """Read ``model`` (``.blocks`` of ``layer``/``bn``/``preact``/``post``) into a view.

    Raises:
        UnsupportedModel: no ``.blocks``, a block without a binary/quantized layer or without
            BatchNorm, a hidden block with real outputs before the last one, or a last block
            with binary outputs (names the block).
    """
    if getattr(model, "nodes", None) is not None and getattr(model, "config", {}).get(
            "name") == "graph":
        raise UnsupportedModel(
            "a residual BNN (a graph with shortcut additions, bnn_tol.core.graph) is supported "
            "by errors.inject, the reference and fp32 sweep engines, accuracy, margin, "
            "importance (negation estimators), save/load, export and the numpy deploy; not by "
            "the packed, int8 and fixed engines, flip probability, predicted accuracy or ONNX "
            "export")
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise UnsupportedModel(f"{type(model).__name__} is not a bnn_tol BNN (no .blocks); build "
                               "it with bnn_tol.models.build or BNN([BinaryBlock(...), ...])")
    grid = grid_of(model)
    if not isinstance(grid, InputGrid):
        raise UnsupportedModel(f"model.input_grid must be a bnn_tol.data.InputGrid, got "
                               f"{type(grid).__name__}")
    pos = positions(model)
    names = {id(m): n for n, m in stored_layers(model).items()}
    in_shape = _declared_in_shape(model)
    shape = in_shape
    stages = []
    for k, b in enumerate(blocks):
        for attr in ("layer", "bn", "preact", "post"):
            if not hasattr(b, attr):
                raise UnsupportedModel(f"blocks.{k} ({type(b).__name__}) has no .{attr}: not a "
                                       "BinaryBlock")
        layer = b.layer
        if not isinstance(layer, BinaryLayer):
            raise UnsupportedModel(f"blocks.{k}.layer is {type(layer).__name__}, not a binary "
                                   "or quantized layer (BinaryLinear/BinaryConv2d/Quant*)")
        if not isinstance(b.bn, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModel(f"{names[id(layer)]}: binary layer is not followed by "
                                   f"BatchNorm (found {type(b.bn).__name__}); the neuron "
                                   "threshold comes from the BN running statistics")
        last = k == len(blocks) - 1
        hidden = bool(getattr(b, "binary_output", True))
        if hidden and last:
            raise UnsupportedModel("the last block must output class scores "
                                   "(binary_output=False)")
        if not hidden and not last:
            raise UnsupportedModel(f"blocks.{k}: only the last block may output real scores "
                                   "(binary_output=False)")
        conv = isinstance(layer, BinaryConv2d)
        name = names[id(layer)]
        x_shape = preact = out = None
        if shape is not None:
            x_shape = (math.prod(shape),) if b.flatten else shape
            if conv and len(x_shape) == 3:
                preact = (int(layer.out_channels), *_conv_out(layer, *x_shape[1:]))
                out = preact if not b.pool else (preact[0], preact[1] // b.pool,
                                                 preact[2] // b.pool)
            elif not conv:
                preact = out = (int(layer.out_features),)
        stages.append(Stage(
            index=k, name=name, position=pos[name], block=b, layer=layer,
            kind="output" if last else ("first" if k == 0 else "hidden"), conv=conv,
            padding=layer.padding if conv else 0, fan_in=int(layer.fan_in),
            scale=grid.scale if k == 0 else 1,
            activation=getattr(b, "activation", "sign") if hidden else None,
            pool=b.pool, flatten=bool(b.flatten),
            bits_per_weight=int(layer.codec.bits_per_weight),
            n_stored_bits=int(layer.n_stored_bits),
            kernel=tuple(int(v) for v in layer.kernel_size) if conv else None,
            in_shape=x_shape, preact_shape=preact, out_shape=out))
        shape = out
    return CompiledModel(model, stages, grid, in_shape)


def check_bnn(model: nn.Module, *, what: str = "this function", need_sign: bool = True,
              need_bn_stats: bool = True, need_integer: bool = False) -> CompiledModel:
    """Compile ``model`` and refuse what ``what`` cannot handle.

    Args:
        what: named in the message (``"margin"``, ``"the fp32 engine"``).
        need_sign: sign weights and sign activations (the BNN case) are required.
        need_bn_stats: hidden BatchNorms must track running statistics (thresholds).
        need_integer: the layers must fit the integer arithmetic
            (:meth:`CompiledModel.integer_issue`).

    Raises:
        UnsupportedModel: naming the first block that does not fit, and why.
    """
    cm = compile_model(model)
    for s in cm.stages:
        if need_sign and not s.sign_codec:
            raise UnsupportedModel(
                f"{what} needs sign (1-bit) weights; {s.name} stores "
                f"{s.bits_per_weight}-bit fixed-point weights ({s.codec.config()['scheme']})")
        if need_sign and s.hidden and s.activation != "sign":
            raise UnsupportedModel(f"{what} needs sign activations; block {s.index} uses "
                                   f"{s.activation}")
        if need_bn_stats and s.hidden and s.block.bn.running_mean is None:
            raise UnsupportedModel(f"{s.name}: its BatchNorm has no running statistics "
                                   "(track_running_stats=False); the threshold is undefined")
    why = cm.integer_issue() if need_integer else None
    if why:
        raise UnsupportedModel(f"{what}: {why}")
    return cm


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block; afterwards restore every submodule's own
    ``training`` flag (a model with mixed train/eval submodules comes back unchanged)."""
    was = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for mod, flag in was:
            mod.training = flag
