"""One compiled view of a model: the facts every engine, metric and fault map needs.

A :class:`~bnn_tol.models.BNN` (or an m-bit network built the same way) is a flat list of
blocks ``[flatten] -> layer -> BN -> act -> [pool]``. :func:`compile_model` reads it once into
:class:`Stage` s -- block, layer, qualified name, position among the stored layers, kind
(first/hidden/output), conv or linear, fan-in, codec, activation, input scaling, folded
threshold -- and :func:`check_bnn` is the single validation with one error type,
:class:`UnsupportedModel`, naming the block and why.

Input scaling (one constant): pixels ``p`` enter as ``x = (p - INPUT_SCALE) / INPUT_SCALE``
(:func:`bnn_tol.data.to_float`), so first-layer pre-activations of sign weights lie on the grid
``a = k / INPUT_SCALE`` with integer ``k``; later layers of a BNN see +-1 and have scale 1.

Stored layers (:func:`stored_layers`) are all binary/quantized layers of any module, in forward
order; a layer's *position* among them seeds its fault map (:func:`bnn_tol.errors.layer_seed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from bnn_tol.core.layers import BinaryConv2d, BinaryLayer, FoldedThreshold, fold_threshold
from bnn_tol.data import INPUT_SCALE
from bnn_tol.exceptions import InvalidArgument

__all__ = ["INPUT_SCALE", "UnsupportedModel", "Stage", "CompiledModel", "compile_model",
           "check_bnn", "stored_layers", "positions", "eval_mode"]


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
        index: block index ``k``; ``name``: the layer's qualified name; ``position``: its
            position among the stored layers.
        kind: ``"first"``, ``"hidden"`` or ``"output"`` (the last block: class scores).
        conv: a convolution (``padding``, stride 1, no groups) or a linear layer.
        fan_in: weights per output unit; ``scale``: ``INPUT_SCALE`` for the first block, else 1.
        activation: ``"sign"``/``"relu"`` for hidden blocks, ``None`` for the output block.
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
    _folded: FoldedThreshold | None = field(default=None, repr=False)

    @property
    def codec(self):
        """The layer's codec (:mod:`bnn_tol.codec`)."""
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

    @cached_property
    def folded(self) -> FoldedThreshold:
        """Integer comparator of ``sign(BN(a))`` on the grid ``a = k / scale`` (sign blocks)."""
        if self.activation != "sign":
            raise UnsupportedModel(f"{self.name}: a {self.activation} block has no threshold")
        return fold_threshold(self.block.bn, scale=self.scale)


@dataclass
class CompiledModel:
    """The compiled view: ``stages`` in forward order plus model-level facts."""

    model: nn.Module
    stages: list[Stage]

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


def compile_model(model: nn.Module) -> CompiledModel:
    """Read ``model`` (``.blocks`` of ``layer``/``bn``/``preact``/``post``) into a view.

    Raises:
        UnsupportedModel: no ``.blocks``, a block without a binary/quantized layer or without
            BatchNorm, a hidden block with real outputs before the last one, or a last block
            with binary outputs (names the block).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise UnsupportedModel(f"{type(model).__name__} is not a bnn_tol BNN (no .blocks); build "
                               "it with bnn_tol.models.build or BNN([BinaryBlock(...), ...])")
    pos = positions(model)
    names = {id(m): n for n, m in stored_layers(model).items()}
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
        stages.append(Stage(
            index=k, name=name, position=pos[name], block=b, layer=layer,
            kind="output" if last else ("first" if k == 0 else "hidden"), conv=conv,
            padding=layer.padding if conv else 0, fan_in=int(layer.fan_in),
            scale=INPUT_SCALE if k == 0 else 1,
            activation=getattr(b, "activation", "sign") if hidden else None,
            pool=b.pool, flatten=bool(b.flatten),
            bits_per_weight=int(layer.codec.bits_per_weight),
            n_stored_bits=int(layer.n_stored_bits)))
    return CompiledModel(model, stages)


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
