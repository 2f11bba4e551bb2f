"""BNN models of the anchor work (fc, vgg3, vgg7) built from :class:`BinaryBlock` s.

Every model is a :class:`BNN`: a flat sequence of blocks, each

    [flatten] -> binary layer (a = W_b x) -> BatchNorm -> sign -> [max-pool]

The last block has no sign: its BatchNorm output is the vector of class scores. The first
block sees real-valued inputs (pixels scaled to ``(p - 128) / 128``), all others see
{-1, +1} activations, so their pre-activations ``a`` are integers.

>>> model = build("fc", hidden=(256, 256))
>>> print(summary(model))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnn_tol.core.codec import GRANULARITIES, ROUNDINGS, SCHEMES, share_ranges
from bnn_tol.core.layers import (
    BinaryConv2d,
    BinaryLayer,
    BinaryLinear,
    QuantConv2d,
    QuantLinear,
    sign,
    sign_pool,
)
from bnn_tol.data import InputGrid
from bnn_tol.exceptions import InvalidArgument, require_int

__all__ = ["BinaryBlock", "BNN", "build", "register", "available", "summary", "memory_bits",
           "fc", "vgg3", "vgg7", "custom", "ACTIVATIONS"]

#: Activations of hidden blocks: ``sign`` (binary, the BNN case) or ``relu`` (real valued, the
#: m-bit networks of Stutz et al.).
ACTIVATIONS = ("sign", "relu")


class BinaryBlock(nn.Module):
    """One hidden (or output) unit group: ``[flatten] -> layer -> bn -> [sign] -> [pool]``.

    Args:
        layer: a :class:`BinaryLinear` or :class:`BinaryConv2d`.
        bn: BatchNorm1d/2d matching the layer's outputs.
        binary_output: apply the activation after BN (hidden block) or not (output block).
        pool: max-pool kernel (conv blocks), applied after the activation; ``None`` for none.
        flatten: flatten ``(N, ...)`` to ``(N, -1)`` before the layer.
        activation: ``"sign"`` (binary outputs, the BNN case) or ``"relu"`` (real outputs).
    """

    def __init__(
        self,
        layer: BinaryLayer,
        bn: nn.modules.batchnorm._BatchNorm,
        *,
        binary_output: bool = True,
        pool: int | None = None,
        flatten: bool = False,
        activation: str = "sign",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise InvalidArgument(f"activation must be one of {', '.join(ACTIVATIONS)}, "
                                  f"got {activation!r}")
        self.layer = layer
        self.bn = bn
        self.binary_output = binary_output
        self.pool = pool
        self.flatten = flatten
        self.activation = activation

    def preact(self, x: Tensor) -> Tensor:
        """Pre-activation ``a = layer(x)`` (after flattening if configured)."""
        if self.flatten:
            x = x.flatten(1)
        return self.layer(x)

    def post(self, a: Tensor) -> Tensor:
        """Block output from the pre-activation: ``pool(act(bn(a)))`` (or ``bn(a)``)."""
        y = self.bn(a)
        if not self.binary_output:
            return y
        if self.activation == "sign" and self.pool:
            return sign_pool(y, self.pool)  # = max_pool2d(sign(y), pool), fused
        y = sign(y) if self.activation == "sign" else nn.functional.relu(y)
        if self.pool:
            y = nn.functional.max_pool2d(y, self.pool)
        return y

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.post(self.preact(x))


class BNN(nn.Module):
    """A binarized network: a sequence of :class:`BinaryBlock`.

    Attributes:
        blocks: ``nn.ModuleList`` of blocks; all but the last have binary outputs.
        config: ``{"name": ..., "kwargs": {...}}`` -- enough to rebuild the architecture.
        meta: free-form metadata (training recipe, history) saved with checkpoints.
    """

    def __init__(self, blocks: Sequence[BinaryBlock], config: dict[str, Any]) -> None:
        super().__init__()
        if not blocks:
            raise InvalidArgument("a BNN needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.config = dict(config)
        self.meta: dict[str, Any] = {}

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Input shape of one sample, e.g. ``(1, 28, 28)``."""
        return tuple(self.config["kwargs"]["in_shape"])

    def binary_layers(self) -> dict[str, BinaryLayer]:
        """Binary layers by qualified name (``"blocks.0.layer"``, ...), in forward order."""
        return {n: m for n, m in self.named_modules() if isinstance(m, BinaryLayer)}

    def forward(self, x: Tensor) -> Tensor:
        """Class scores ``(N, n_classes)`` for inputs ``(N, *in_shape)``."""
        expected = self.in_shape
        if tuple(x.shape[1:]) != expected and x[0].numel() != math.prod(expected):
            dims = ", ".join(map(str, expected))
            raise InvalidArgument(f"{self.config['name']} expects inputs of shape (N, {dims}),"
                             f" got {tuple(x.shape)}")
        if x.dim() == 2 and len(expected) == 3:
            x = x.view(-1, *expected)
        for block in self.blocks:
            x = block(x)
        return x


_REGISTRY: dict[str, Callable[..., BNN]] = {}


def register(name: str) -> Callable[[Callable[..., BNN]], Callable[..., BNN]]:
    """Decorator adding a model factory to the registry under ``name``."""

    def deco(fn: Callable[..., BNN]) -> Callable[..., BNN]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(_REGISTRY)


def _init(model: BNN, generator: torch.Generator) -> BNN:
    """Deterministic init from ``generator``: latent weights ~ U(-b, b), b = sqrt(6/fan_in)."""
    for layer in model.binary_layers().values():
        bound = math.sqrt(6.0 / layer.fan_in)
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.weight.clamp_(-1, 1)
    return model


def build(name: str, *, seed: int = 0, **kwargs: Any) -> BNN:
    """Build a registered model by name with deterministic initialization.

    Args:
        name: one of :func:`available` (``"fc"``, ``"vgg3"``, ``"vgg7"``).
        seed: seed of the weight initialization (same seed -> identical weights).
        **kwargs: architecture options of the factory (``in_shape``, ``n_classes``,
            widths such as ``hidden=(2048, 2048)``).

    Raises:
        InvalidArgument: unknown name (listing the known ones), an option the factory does not
            take (listing those it takes), a non-integer or negative ``seed``, or a bad width.
    """

    if not isinstance(name, str) or name.lower().replace("-", "_") not in _REGISTRY:
        raise InvalidArgument(f"unknown model {name!r}; available: {', '.join(available())}")
    key = name.lower().replace("-", "_")
    seed = require_int(seed, "seed", minimum=0)
    factory = _REGISTRY[key]
    takes = list(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
        raise InvalidArgument(f"{key} takes no option {', '.join(map(repr, unknown))}; its "
                              f"options are {', '.join(takes)}")
    model = factory(**kwargs)
    model = _init(model, torch.Generator().manual_seed(int(seed)))
    share_ranges(model)  # global quantization ranges, if any layer asks for them
    return model


def _check_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidArgument(f"in_shape must be (channels, height, width), got {in_shape!r}")
    return shape  # type: ignore[return-value]


class _Storage:
    """How a factory stores weights: ``weight_bits`` 1 (sign, the BNN) or 2..8 (fixed point).

    Only non-default options are written to the model config, so a BNN's ``config.json`` is
    the same as before codecs existed.
    """

    def __init__(self, weight_bits: int = 1, quant: str = "symmetric", granularity: str = "layer",
                 rounding: str = "nearest", activation: str | None = None) -> None:

        self.bits = require_int(weight_bits, "weight_bits", minimum=1)
        if self.bits > 8:
            raise InvalidArgument(f"weight_bits must be 1 (sign) or 2..8, got {self.bits}")
        for name, value, allowed in (("quant", quant, SCHEMES),
                                     ("granularity", granularity, GRANULARITIES),
                                     ("rounding", rounding, ROUNDINGS),
                                     ("activation", activation, (*ACTIVATIONS, None))):
            if value not in allowed:
                raise InvalidArgument(f"{name} must be one of "
                                      f"{', '.join(a for a in allowed if a)}, got {value!r}")
        if self.bits == 1 and (quant, granularity, rounding) != ("symmetric", "layer", "nearest"):
            raise InvalidArgument("quant/granularity/rounding apply to weight_bits >= 2; a 1-bit "
                                  "weight is stored as its sign")
        self.quant, self.granularity, self.rounding = quant, granularity, rounding
        self.activation = activation or ("sign" if self.bits == 1 else "relu")

    def linear(self, i: int, o: int) -> BinaryLayer:
        if self.bits == 1:
            return BinaryLinear(i, o)
        return QuantLinear(i, o, self.bits, self.quant, self.granularity, self.rounding)

    def conv(self, i: int, o: int) -> BinaryLayer:
        if self.bits == 1:
            return BinaryConv2d(i, o)
        return QuantConv2d(i, o, 3, 1, self.bits, self.quant, self.granularity, self.rounding)

    def config(self) -> dict[str, Any]:
        default = _Storage()
        out: dict[str, Any] = {}
        for key, attr in (("weight_bits", "bits"), ("quant", "quant"),
                          ("granularity", "granularity"), ("rounding", "rounding")):
            if getattr(self, attr) != getattr(default, attr):
                out[key] = getattr(self, attr)
        if self.activation != ("sign" if self.bits == 1 else "relu"):
            out["activation"] = self.activation
        return out


@register("fc")
def fc(
    hidden: Sequence[int] = (2048, 2048),
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    n_classes: int = 10,
    weight_bits: int = 1,
    quant: str = "symmetric",
    granularity: str = "layer",
    rounding: str = "nearest",
    activation: str | None = None,
) -> BNN:
    """Fully connected BNN ``784-2048-2048-10`` (hidden widths configurable).

    Blocks: ``flatten -> BinaryLinear -> BN1d -> sign`` per hidden layer, then
    ``BinaryLinear -> BN1d`` (class scores). With ``weight_bits >= 2`` the layers are
    :class:`~bnn_tol.layers.QuantLinear` (fixed point ``quant``/``granularity``/``rounding``,
    see :class:`~bnn_tol.codec.FixedPointCodec`) and the activation defaults to ``relu``.
    """
    store = _Storage(weight_bits, quant, granularity, rounding, activation)
    shape = _check_shape(in_shape)
    if isinstance(hidden, int | str) or not isinstance(hidden, Sequence):
        raise InvalidArgument(f"hidden widths must be a sequence of integers, got {hidden!r}")
    hidden = tuple(require_int(h, "a hidden width") for h in hidden)
    if not hidden or min(hidden) < 1:
        raise InvalidArgument(f"hidden widths must be positive, got {hidden!r}")
    widths = (math.prod(shape), *hidden)
    blocks = [
        BinaryBlock(store.linear(i, o), nn.BatchNorm1d(o), flatten=(k == 0),
                    activation=store.activation)
        for k, (i, o) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    ]
    blocks.append(BinaryBlock(store.linear(widths[-1], n_classes), nn.BatchNorm1d(n_classes),
                              binary_output=False))
    cfg = {"name": "fc", "kwargs": {"hidden": list(hidden), "in_shape": list(shape),
                                    "n_classes": int(n_classes), **store.config()}}
    return BNN(blocks, cfg)


def _vgg(
    name: str,
    channels: Sequence[Sequence[int]],
    fc_width: int,
    in_shape: Sequence[int],
    n_classes: int,
    store: _Storage,
) -> BNN:
    shape = _check_shape(in_shape)
    fc_width = require_int(fc_width, "fc_width", minimum=1)
    c_in, h, w = shape
    blocks: list[BinaryBlock] = []
    for stage in channels:
        for k, c_out in enumerate(stage):
            last = k == len(stage) - 1
            blocks.append(BinaryBlock(store.conv(c_in, c_out), nn.BatchNorm2d(c_out),
                                      pool=2 if last else None, activation=store.activation))
            c_in = c_out
        h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise InvalidArgument(f"input {tuple(shape)} too small for {len(channels)} pooling stages")
    blocks.append(BinaryBlock(store.linear(c_in * h * w, fc_width), nn.BatchNorm1d(fc_width),
                              flatten=True, activation=store.activation))
    blocks.append(BinaryBlock(store.linear(fc_width, n_classes), nn.BatchNorm1d(n_classes),
                              binary_output=False))
    cfg = {"name": name, "kwargs": {"channels": [list(s) for s in channels],
                                    "fc_width": int(fc_width), "in_shape": list(shape),
                                    "n_classes": int(n_classes), **store.config()}}
    return BNN(blocks, cfg)


@register("vgg3")
def vgg3(
    channels: Sequence[Sequence[int]] = ((64,), (64,)),
    fc_width: int = 2048,
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    n_classes: int = 10,
    weight_bits: int = 1,
    quant: str = "symmetric",
    granularity: str = "layer",
    rounding: str = "nearest",
    activation: str | None = None,
) -> BNN:
    """VGG3: ``64C3-MP2-64C3-MP2-2048FC-10`` (conv blocks: conv -> BN -> sign -> pool).

    Storage options as :func:`fc`."""
    return _vgg("vgg3", channels, fc_width, in_shape, n_classes,
                _Storage(weight_bits, quant, granularity, rounding, activation))


@register("vgg7")
def vgg7(
    channels: Sequence[Sequence[int]] = ((128, 128), (256, 256), (512, 512)),
    fc_width: int = 1024,
    *,
    in_shape: Sequence[int] = (3, 32, 32),
    n_classes: int = 10,
    weight_bits: int = 1,
    quant: str = "symmetric",
    granularity: str = "layer",
    rounding: str = "nearest",
    activation: str | None = None,
) -> BNN:
    """VGG7: ``2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-1024FC-10``; storage options as :func:`fc`."""
    return _vgg("vgg7", channels, fc_width, in_shape, n_classes,
                _Storage(weight_bits, quant, granularity, rounding, activation))


@register("custom")
def custom(
    blocks: Sequence[dict[str, Any]],
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    n_classes: int = 10,
    input_grid: dict | None = None,
) -> BNN:
    """A BNN from explicit block specs (what :func:`bnn_tol.adapt.adapt` produces).

    Each spec: ``type`` (``"linear"``/``"conv"``), ``in``, ``out``, ``bias`` (bool), ``flatten``
    (bool), optional ``kernel``/``padding`` (conv), ``pool`` (int), ``bn_eps`` (a BatchNorm
    after the layer; absent: an identity BatchNorm with ``eps = 0``), ``bn_affine``,
    ``binary_output`` (``False`` for the last block only). ``input_grid``: how pixels enter
    the model (:meth:`bnn_tol.data.InputGrid.config`; ``None``: the library's
    :data:`~bnn_tol.data.INPUT`), kept as ``model.input_grid``.
    """
    grid = None if input_grid is None else InputGrid.from_config(input_grid)
    shape = _check_shape(in_shape)
    if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks:
        raise InvalidArgument("custom: blocks must be a non-empty list of block specs")
    out = []
    for k, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") not in ("linear", "conv"):
            raise InvalidArgument(f"custom: block {k} needs type 'linear' or 'conv', got {b!r}")
        i, o = require_int(b.get("in"), f"block {k} in", minimum=1), \
            require_int(b.get("out"), f"block {k} out", minimum=1)
        bias = bool(b.get("bias", False))
        if b["type"] == "conv":
            layer: BinaryLayer = BinaryConv2d(i, o, int(b.get("kernel", 3)),
                                              int(b.get("padding", 1)), bias=bias)
            norm: nn.Module = nn.BatchNorm2d(o, eps=float(b.get("bn_eps", 0.0)),
                                             affine=bool(b.get("bn_affine", True)))
        else:
            layer = BinaryLinear(i, o, bias=bias)
            norm = nn.BatchNorm1d(o, eps=float(b.get("bn_eps", 0.0)),
                                  affine=bool(b.get("bn_affine", True)))
        out.append(BinaryBlock(layer, norm, binary_output=bool(b.get("binary_output", True)),
                               pool=b.get("pool"), flatten=bool(b.get("flatten", False))))
    if out[-1].binary_output or any(not b.binary_output for b in out[:-1]):
        raise InvalidArgument("custom: only the last block has binary_output=False")
    if out[-1].layer.weight.shape[0] != n_classes:
        raise InvalidArgument(f"custom: the last block has {out[-1].layer.weight.shape[0]} "
                              f"outputs but n_classes={n_classes}")
    cfg = {"name": "custom", "kwargs": {"blocks": [dict(b) for b in blocks],
                                        "in_shape": list(shape), "n_classes": int(n_classes)}}
    if grid is not None:
        cfg["kwargs"]["input_grid"] = grid.config()
    model = BNN(out, cfg)
    if grid is not None:
        model.input_grid = grid
    return model


def memory_bits(model: nn.Module) -> int:
    """Stored weight bits of all binary/quantized layers: ``sum numel * bits_per_weight``."""
    return sum(layer.n_stored_bits for layer in model.modules() if isinstance(layer, BinaryLayer))


def summary(model: BNN) -> str:
    """One line per block plus a total, like ``larq.models.summary``.

    Columns: block, layer type, output units, fan-in, weights, bits per weight, weight memory
    (bits), BN parameters (stored as 32-bit floats). A model that declares its own
    ``input_grid`` gets a last line ``input: ...`` (:meth:`bnn_tol.data.InputGrid.describe`,
    which says whether the grid is rounded and by how much).
    """
    rows = [f"{'block':<6} {'layer':<13} {'units':>6} {'fan_in':>7} {'weights':>11}"
            f" {'bits/w':>6} {'weight bits':>12} {'bn params':>10}"]
    total_w = total_bn = total_bits = 0
    for k, block in enumerate(model.blocks):
        layer = block.layer
        n_w = layer.weight.numel()
        n_bn = 2 * block.bn.num_features
        total_w += n_w
        total_bn += n_bn
        total_bits += layer.n_stored_bits
        rows.append(f"{k:<6} {type(layer).__name__:<13} {layer.weight.shape[0]:>6}"
                    f" {layer.fan_in:>7} {n_w:>11,} {layer.codec.bits_per_weight:>6}"
                    f" {layer.n_stored_bits:>12,} {n_bn:>10,}")
    bits = total_bits + 32 * total_bn
    rows.append(f"{model.config['name']}: {total_w:,} weights in {total_bits:,} stored bits"
                f" ({total_bits / 8 / 1024:.1f} KiB), {total_bn:,} BN params; total memory"
                f" {bits:,} bits ({bits / 8 / 1024:.1f} KiB)")
    grid = getattr(model, "input_grid", None)  # a declared grid (adapted models); else INPUT
    if grid is not None:
        rows.append(f"input: {grid.describe()}")
    return "\n".join(rows)


def check_data(model: nn.Module, data: Any) -> None:
    """Refuse a dataset whose samples do not fit ``model``, naming both shapes.

    ``data`` is a :class:`~bnn_tol.data.BNNDataset` (images ``(N, C, H, W)``). For a
    :class:`BNN` its ``(C, H, W)`` must equal ``model.in_shape`` and every label must be
    ``< n_classes``; other modules (no recorded input shape) are not checked.

    Raises:
        InvalidArgument: ``dataset 'x' has samples of shape (C, H, W) but <model> expects ...``.
    """
    if not isinstance(model, BNN):
        return
    shape = tuple(int(s) for s in data.images.shape[1:])
    name = getattr(data, "name", "custom")
    if shape != model.in_shape:
        raise InvalidArgument(
            f"dataset {name!r} has samples of shape {shape} but the "
            f"{model.config['name']} model expects {model.in_shape}: evaluate it on the "
            "dataset it was trained on (see its config.json)")
    n_classes = model.config["kwargs"].get("n_classes")
    labels = getattr(data, "labels", None)
    if n_classes is not None and labels is not None and len(labels) \
            and int(labels.max()) >= n_classes:
        raise InvalidArgument(f"dataset {name!r} has label {int(labels.max())} but the model has "
                              f"{n_classes} classes")
