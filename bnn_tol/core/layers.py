"""Binarized layers: sign with straight-through estimator, binary linear/conv, BN thresholds.

Conventions (DESIGN.md section 2):

* ``sign(x) = +1 if x >= 0 else -1`` -- never 0.
* Straight-through estimator (hardtanh STE): ``d sign(x) / dx = 1 if |x| <= 1 else 0``.
* A binary layer keeps real *latent* weights for training; the deployed weight is
  ``sign(w)``. A ``fault`` callable attached to the layer (set by :mod:`bnn_tol.errors`:
  bit flip training or a persistent fault map) transforms the binarized weight before use.
* A hidden unit computes ``y = sign(BN(a))`` from its pre-activation ``a``; that equals a
  comparison of ``a`` with a threshold ``tau`` (:func:`bn_threshold`), folded into an exact
  integer comparator for integer ``a`` (:func:`fold_threshold`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.codec import Codec, FixedPointCodec, SignCodec
from bnn_tol.core.codec import _StraightThrough as _Through
from bnn_tol.exceptions import InvalidArgument

__all__ = [
    "sign",
    "SignSTE",
    "BinaryLinear",
    "BinaryConv2d",
    "BinaryLayer",
    "QuantLinear",
    "QuantConv2d",
    "Threshold",
    "bn_threshold",
    "FoldedThreshold",
    "fold_threshold",
    "apply_folded",
]

Fault = Callable[[Tensor], Tensor]


#: float32 bit patterns: ``-1.0`` is ``0xBF800000``; xor with ``1 << 31`` gives ``+1.0``.
_MINUS_ONE_BITS = -0x40800000
#: the float32 just above 1: ``|x| > 1`` iff ``x >= _ABOVE_ONE`` or ``x <= -_ABOVE_ONE``.
_ABOVE_ONE = 1.0 + 2.0**-23


def _plus_minus_one(positive: Tensor, like: Tensor | None = None) -> Tensor:
    """``+1.0`` where ``positive``, ``-1.0`` elsewhere, dtype and layout of ``like`` (default:
    float32, contiguous).

    The values of ``torch.where(positive, 1.0, -1.0).to(like.dtype)``; for float32 written as
    bit patterns (``0xBF800000 ^ (positive << 31)``), three light passes instead of ``where``
    (measured 3x cheaper on CPU; other devices and dtypes use ``where``).
    """
    dtype = like.dtype if like is not None else torch.float32
    if dtype != torch.float32 or positive.device.type != "cpu":
        return torch.where(positive, 1.0, -1.0).to(dtype)
    out = torch.empty_like(like) if like is not None else torch.empty(positive.shape)
    bits = out.view(torch.int32)
    bits.copy_(positive)
    bits.bitwise_left_shift_(31).bitwise_xor_(_MINUS_ONE_BITS)
    return out


def _ste_grad(x: Tensor, grad: Tensor) -> Tensor:
    """``grad.masked_fill(|x| > 1, 0)``, the hardtanh STE, bit for bit.

    Cheaper forms of the same values: where ``x`` is inside ``[-1, 1]`` (the clipped latent
    weights) the gradient passes unchanged; for float32 without NaN it is one pass of
    ``hardtanh_backward`` on the open window ``(-a, a)``, ``a`` the float32 just above 1 (no
    float32 lies strictly between 1 and ``a``; masked entries get ``+0.0`` as ``masked_fill``).
    NaN (which ``masked_fill`` lets through), other dtypes and devices take ``masked_fill``.
    """
    if x.device.type == "cpu" and x.numel() and x.dtype == torch.float32 \
            and grad.dtype == torch.float32 and x.shape == grad.shape:
        lo, hi = (float(v) for v in torch.aminmax(x))
        if lo >= -1.0 and hi <= 1.0:
            return grad
        if lo == lo and hi == hi:  # no NaN
            return torch.ops.aten.hardtanh_backward(grad, x, -_ABOVE_ONE, _ABOVE_ONE)
    return grad.masked_fill(x.abs() > 1, 0.0)


class SignSTE(torch.autograd.Function):
    """``sign`` forward (sign(0) = +1), hardtanh straight-through gradient backward.

    ``flip`` (optional, used by :meth:`BinaryLayer.binary_weight`): a callable that flips the
    stored bits ``x >= 0`` (a bool tensor, True = stored 1 = ``+1``) in place before they are
    turned into +-1; the gradient passes straight through the flips.
    """

    @staticmethod
    def forward(ctx, x: Tensor,  # noqa: D102
                flip: Callable[[Tensor], object] | None = None) -> Tensor:
        ctx.save_for_backward(x)
        positive = x >= 0
        if flip is not None:
            positive = positive.contiguous()  # flat indices are in C order
            flip(positive)
        return _plus_minus_one(positive, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        (x,) = ctx.saved_tensors
        return _ste_grad(x, grad), None


def sign(x: Tensor) -> Tensor:
    """Binarize ``x`` to {-1, +1} with ``sign(0) = +1``; STE gradient ``1{|x| <= 1}``.

    Args:
        x: tensor of any shape.

    Returns:
        Tensor of the same shape and dtype with values in {-1, +1}.
    """
    return SignSTE.apply(x)


class _SignPool2(torch.autograd.Function):
    """``max_pool2d(sign(x), 2)`` of a contiguous float32 ``(N, C, H, W)``, ``H``, ``W`` even,
    without the +-1 tensor of ``sign(x)``, bit for bit (values and gradients).

    Max-pooling +-1 values gives +1 iff a window holds an ``x >= 0``; the max-pool gradient
    goes to the window's first maximum in row-major order (``max_pool2d``'s rule: the first
    ``x >= 0``, else the window's first element). The bits ``x >= 0`` of a window row are two
    adjacent bytes, read as one int16 (``top = a + 256 b`` for the upper row ``a b``, ``bot =
    c + 256 d`` for the lower). Backward turns them into ``max_pool2d``'s indices, applies the
    STE at those positions only (every other input gets 0 either way) and scatters with
    ``max_pool2d_with_indices_backward`` (``0 + g``, as the composite).
    """

    @staticmethod
    def _rows(positive: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = positive.shape
        pairs = positive.view(torch.uint8).view(torch.int16).view(n, c, h // 2, 2, w // 2)
        return pairs[:, :, :, 0], pairs[:, :, :, 1]

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        positive = x >= 0
        top, bot = _SignPool2._rows(positive)
        ctx.save_for_backward(x, positive)
        return _plus_minus_one((top | bot) != 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        x, positive = ctx.saved_tensors
        n, c, h, w = x.shape
        top, bot = _SignPool2._rows(positive)
        upper_empty = top == 0
        row = upper_empty & (bot != 0)  # first maximum in the lower row: c or d
        col = (top == 256) | (upper_empty & (bot == 256))  # b (a not set) or d (a, b, c not)
        corner = (torch.arange(h // 2, device=x.device)[:, None] * (2 * w)
                  + torch.arange(w // 2, device=x.device)[None, :] * 2)
        idx = row.to(torch.int64).mul_(w).add_(col).add_(corner)  # max_pool2d's indices
        at = x.view(n, c, h * w).gather(2, idx.reshape(n, c, -1)).view(idx.shape)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            _ste_grad(at, grad), x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def sign_pool(x: Tensor, k: int) -> Tensor:
    """``max_pool2d(sign(x), k)`` (kernel = stride = ``k``) with the STE of :func:`sign`.

    For ``k = 2`` on a contiguous float32 CPU ``(N, C, H, W)`` with even ``H``, ``W`` one fused
    step (:class:`_SignPool2`, the same values and gradients bit for bit, without the full-size
    +-1 tensor and with cheaper indices); otherwise the composite.
    """
    if k == 2 and x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu" \
            and x.is_contiguous() and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 \
            and x.numel() > 0 and sys.byteorder == "little":  # int16 = two bytes, low first
        return _SignPool2.apply(x)
    return F.max_pool2d(sign(x), k)


def _through(x: Tensor, value: Tensor) -> Tensor:
    """``value`` forward (exactly), gradient to ``x`` backward."""
    return _Through.apply(x, value)


class BinaryLayer(nn.Module):
    """Mixin for layers whose weights are stored through a codec (:mod:`bnn_tol.codec`).

    The BNN case (``codec`` a :class:`~bnn_tol.codec.SignCodec`, the default): the deployed
    weight is ``sign(latent weight)``. A fixed-point codec deploys ``decode(encode(w))``
    (quantization-aware: straight-through rounding).

    Attributes:
        codec: how the weight is stored (``bits_per_weight`` bits per weight).
        fault: optional callable applied on every forward pass (bit flip training, fault-map
            injection). It flips entries of a tensor in the *+-1 stored-bit convention*
            (stored 1 -> +1, stored 0 -> -1). For the sign codec that tensor is the binarized
            weight itself; for a fixed-point codec it is ``2 to_bits(encode(w)) - 1`` of
            ``numel * m`` bits (see :meth:`deployed_weight`). ``None`` = error free.
    """

    weight: nn.Parameter
    fault: Fault | None
    codec: Codec

    def binary_weight(self) -> Tensor:
        """Deployed weight: ``fault(sign(w))``, values in {-1, +1}, shape of ``weight``.

        For a fixed-point codec this is :meth:`deployed_weight`.
        """
        if not self.codec.is_sign:
            return self.deployed_weight()
        flip_ = getattr(self.fault, "flip_stored_", None)
        if flip_ is not None:  # the library's transient faults: flip the sign bits in place
            return SignSTE.apply(self.weight, flip_)
        wb = sign(self.weight)
        if self.fault is not None:
            wb = self.fault(wb)
        return wb

    def deployed_weight(self) -> Tensor:
        """The weight the layer computes with, faults included, shape of ``weight``.

        Sign codec: ``fault(sign(w))``. Fixed point: ``q = quantize(w)``; with a fault, the
        stored bits it flips (for the library's faults ``fault.indices(to_bits(codes))``, the
        same draws as calling it on ``2 to_bits(codes) - 1``, the +-1 convention; any other
        callable is called on that tensor) give ``q' = decode(codes with those bits
        flipped)``; the result is exactly ``q'`` forward and passes the gradient straight
        through the flips to ``q`` backward.
        """
        if self.codec.is_sign:
            return self.binary_weight()
        if self.fault is None:
            return self.codec.quantize(self.weight)
        codes = self.codec.encode(self.weight)
        q = _through(self.weight, self.codec.decode(codes).to(self.weight.dtype))  # = quantize
        bits = self.codec.to_bits(codes)
        indices = getattr(self.fault, "indices", None)
        if indices is not None:  # the library's faults: flip the codes directly
            bad = self.codec.flip(codes, indices(bits))
        else:  # any other fault callable: on the +-1 bit tensor
            flipped = self.fault(bits.to(q.dtype) * 2 - 1).detach() > 0
            bad = self.codec.from_bits(flipped, self.weight.shape)
        return _through(q, self.codec.decode(bad).to(q.dtype))

    def stored_bits(self) -> Tensor:
        """The layer's memory image: uint8 ``(numel * m,)`` (:meth:`Codec.to_bits`), no faults."""
        return self.codec.to_bits(self.codec.encode(self.weight.detach()))

    @property
    def n_stored_bits(self) -> int:
        """``numel * bits_per_weight``."""
        return int(self.weight.numel()) * int(self.codec.bits_per_weight)

    @property
    def fan_in(self) -> int:
        """Number of weights feeding one output unit."""
        return int(self.weight[0].numel())


class BinaryLinear(nn.Linear, BinaryLayer):
    """Linear layer with binary weights: ``a = x @ sign(W).T`` (no bias by default).

    Shapes: input ``(N, in_features)``, weight ``(out_features, in_features)``,
    output ``(N, out_features)``. With inputs in {-1, +1} the output is an integer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 codec: Codec | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.fault = None
        self.codec = codec if codec is not None else SignCodec()

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.linear(x, self.binary_weight(), self.bias)


class BinaryConv2d(nn.Conv2d, BinaryLayer):
    """2-D convolution with binary weights: ``a = conv2d(x, sign(W))`` (no bias by default).

    Shapes: input ``(N, C_in, H, W)``, weight ``(C_out, C_in, k, k)``, output
    ``(N, C_out, H', W')``. Zero padding contributes 0 to the sum.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        bias: bool = False,
        *,
        codec: Codec | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.fault = None
        self.codec = codec if codec is not None else SignCodec()

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(x, self.binary_weight(), self.bias)


def _fixed(bits: int, quant: str, granularity: str, rounding: str, channels: int) -> Codec:
    return FixedPointCodec(bits, quant, granularity, rounding, channels=channels)


class QuantLinear(BinaryLinear):
    """Linear layer with ``m``-bit fixed-point weights: ``a = x @ decode(encode(W)).T``.

    Shapes as :class:`BinaryLinear`. Args: ``bits`` (2..8), ``quant`` (``"symmetric"`` /
    ``"asymmetric"``), ``granularity`` (``"layer"`` / ``"channel"``), ``rounding``
    (``"nearest"`` / ``"truncate"``); see :class:`~bnn_tol.codec.FixedPointCodec`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8,
                 quant: str = "symmetric", granularity: str = "layer",
                 rounding: str = "nearest", bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias,
                         codec=_fixed(bits, quant, granularity, rounding, out_features))


class QuantConv2d(BinaryConv2d):
    """2-D convolution with ``m``-bit fixed-point weights (see :class:`QuantLinear`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 1, bits: int = 8, quant: str = "symmetric",
                 granularity: str = "layer", rounding: str = "nearest",
                 bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding, bias,
                         codec=_fixed(bits, quant, granularity, rounding, out_channels))


class Threshold(NamedTuple):
    """Real batch-norm threshold per channel (see :func:`bn_threshold`).

    Attributes:
        tau: ``(C,)`` float64, the real threshold; ``nan`` where ``gamma == 0``.
        direction: ``(C,)`` int8: +1 (``y = sign(a - tau)``), -1 (``y = sign(tau - a)``),
            0 for dead neurons (``gamma == 0``: constant output ``sign(beta)``).
    """

    tau: Tensor
    direction: Tensor


def _bn_params(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, ...]:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise InvalidArgument("BatchNorm without running statistics (track_running_stats=False)")
    c = bn.num_features
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(c)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(c)
    return bn.running_mean.double(), bn.running_var.double(), gamma.cpu(), beta.cpu()


def bn_threshold(bn: nn.modules.batchnorm._BatchNorm) -> Threshold:
    """Threshold form of ``sign(BN(a))`` in eval mode, per channel.

    With running mean ``mu``, running variance ``s2``, ``eps``, scale ``gamma``, shift
    ``beta``::

        y = sign(gamma * (a - mu) / sqrt(s2 + eps) + beta)
          = sign(a - tau)   if gamma > 0
          = sign(tau - a)   if gamma < 0
          = sign(beta)      if gamma == 0  (dead neuron, infinite margin)
        tau = mu - beta * sqrt(s2 + eps) / gamma

    Exact arithmetic (float64); ties ``a == tau`` give +1. For the comparator that matches
    the float32 forward pass bit for bit on integer inputs use :func:`fold_threshold`.

    Returns:
        :class:`Threshold` with ``tau`` ``(C,)`` float64 (on CPU) and ``direction`` ``(C,)`` int8.
    """
    mu, s2, gamma, beta = (t.cpu() for t in _bn_params(bn))
    std = torch.sqrt(s2 + bn.eps)
    direction = torch.sign(gamma).to(torch.int8)
    safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
    tau = mu - beta * std / safe
    tau = torch.where(gamma == 0, torch.full_like(tau, math.nan), tau)
    return Threshold(tau, direction)


class FoldedThreshold(NamedTuple):
    """Integer comparator equal to the float ``sign(BN(a))`` on integer ``a``.

    ``y = +1`` iff ``a >= t`` (direction +1), iff ``a <= t`` (direction -1); for
    direction 0 the output is the constant ``const``.

    Attributes:
        t: ``(C,)`` int64 integer threshold.
        direction: ``(C,)`` int8 in {-1, 0, +1}.
        const: ``(C,)`` int8, the constant output of dead neurons (+1/-1), 0 elsewhere.
    """

    t: Tensor
    direction: Tensor
    const: Tensor


def _eval_bn(bn: nn.modules.batchnorm._BatchNorm, a: Tensor) -> Tensor:
    """Evaluate ``bn`` in eval mode on ``a`` of shape ``(K, C)``; float32 result ``(K, C)``."""
    p = next(iter(bn.buffers()))
    x = a.to(device=p.device, dtype=torch.float32)
    if isinstance(bn, nn.BatchNorm2d):
        x = x[:, :, None, None]
    w = bn.weight.detach() if bn.weight is not None else None
    b = bn.bias.detach() if bn.bias is not None else None
    y = F.batch_norm(x, bn.running_mean, bn.running_var, w, b, False, 0.0, bn.eps)
    return y.reshape(a.shape).cpu()


def fold_threshold(
    bn: nn.modules.batchnorm._BatchNorm, window: int = 3, *, scale: int = 1
) -> FoldedThreshold:
    """Fold eval-mode ``sign(BN(a))`` into an exact integer comparator.

    The float forward pass rounds (with ``tau = 5`` exactly, BN can return ``-6e-8`` at
    ``a = 5``), so the integer threshold is found from the float BN itself: it is
    evaluated at the integers around the real ``tau`` (float ops are monotone, so
    ``{a : BN(a) >= 0}`` is an integer half-line) and ``t`` is its end point::

        gamma > 0:  t = min{k integer : BN(k) >= 0},   y = +1  iff  a >= t
        gamma < 0:  t = max{k integer : BN(k) >= 0},   y = +1  iff  a <= t

    With ``scale > 1`` the pre-activations live on the grid ``a = k / scale`` (the first
    layer: inputs ``(p - 128) / 128``, ``scale = 128``) and ``t`` is a threshold on the
    integer ``k = scale * a``.

    Args:
        bn: a BatchNorm1d/2d module with running statistics.
        scale: grid of the pre-activations, ``a = k / scale`` with integer ``k``.
        window: initial half-width of the bracket around ``tau`` (widened by doubling until
            the boundary is inside it, then bisected: ``O(C)`` memory, ``O(log |tau|)``
            evaluations of the float BN whatever ``tau`` is).

    Returns:
        :class:`FoldedThreshold` with ``(C,)`` tensors on CPU.
    """
    thr = bn_threshold(bn)
    c = thr.tau.numel()
    direction = thr.direction
    dead = direction == 0
    _, _, _, beta = _bn_params(bn)
    const = torch.where(dead, torch.where(beta >= 0, 1, -1), 0).to(torch.int8)
    center = torch.where(dead, torch.zeros_like(thr.tau), thr.tau * scale).clamp(-2**52, 2**52)
    center = torch.floor(center).to(torch.int64)
    up = direction > 0

    def positive(k: Tensor) -> Tensor:  # BN(k / scale) >= 0 per channel, k int64 (C,)
        return _eval_bn(bn, (k.double() / scale)[None, :])[0] >= 0

    # bracket the boundary: below it BN < 0 (gamma > 0) / >= 0 (gamma < 0), above the reverse;
    # widen each side by doubling steps (O(C) memory, O(log |tau|) evaluations)
    lo, hi = center - window, center + window
    for side, sign in ((0, -1), (1, 1)):
        step = torch.full((c,), window, dtype=torch.int64)
        while True:
            k = lo if side == 0 else hi
            p = positive(k)
            outside = (p == up) if side == 0 else (p != up)  # still on the wrong side
            outside &= ~dead
            if not bool(outside.any()):
                break
            if bool((step[outside] > 2**52).any()):
                raise InvalidArgument("could not fold BatchNorm threshold: non-finite "
                                      "parameters?")
            step = torch.where(outside, step * 2, step)
            moved = k + sign * step
            if side == 0:
                lo = torch.where(outside, moved, lo)
            else:
                hi = torch.where(outside, moved, hi)
    # bisect: keep lo on the "below" side, hi on the "above" side of the boundary
    while True:
        gap = (hi - lo) > 1
        gap &= ~dead
        if not bool(gap.any()):
            break
        mid = lo + (hi - lo) // 2
        p = positive(mid)
        above = p == up  # gamma > 0: BN >= 0 is above; gamma < 0: BN < 0 is above
        hi = torch.where(gap & above, mid, hi)
        lo = torch.where(gap & ~above, mid, lo)
    # gamma > 0: the first k with BN >= 0 (hi); gamma < 0: the last k with BN >= 0 (lo)
    t = torch.where(dead, torch.zeros_like(lo), torch.where(up, hi, lo))
    return FoldedThreshold(t, direction, const)


def apply_folded(a: Tensor, folded: FoldedThreshold, channel_dim: int = 1) -> Tensor:
    """Apply an integer comparator to pre-activations.

    Args:
        a: integer-valued pre-activations (any dtype), channels along ``channel_dim``.
        folded: from :func:`fold_threshold`.
        channel_dim: axis of ``a`` holding the channels.

    Returns:
        Tensor like ``a`` (dtype of ``a``) with values in {-1, +1}.
    """
    shape = [1] * a.dim()
    shape[channel_dim] = -1
    t = folded.t.to(a.device).view(shape)
    d = folded.direction.to(a.device).view(shape)
    const = folded.const.to(a.device).view(shape)
    t = t.to(a.dtype) if a.is_floating_point() else t
    pos = torch.where(d > 0, a >= t, a <= t)
    out = torch.where(pos, 1, -1)
    out = torch.where(d == 0, const.to(out.dtype), out)
    return out.to(a.dtype)
