"""Errors in the stored parameters besides the weights (Stutz et al.: "every parameter").

A deployed BNN stores, per block, its weight bits and its BatchNorm in one of two forms. Both
are fixed-point words of a stated width whose bits fail like the weights' (any error model that
models the stream, e.g. ``bernoulli`` or ``stuck-at``), chosen by a *target* of
:func:`~bnn_tol.faults.inject.inject` / ``evaluate.sweep(..., targets=)`` (``"name:m"`` states
the width ``m``):

* ``"thresholds"`` (hidden blocks): the folded integer threshold ``t_c`` of each channel
  (:func:`~bnn_tol.core.layers.fold_threshold`), clamped to the reachable range
  ``|scale a| <= R`` (``R = fan_in``; the first block on the input grid ``a = k / scale``,
  :attr:`bnn_tol.core.compiled.Stage.scale`: ``R = scale fan_in``) and stored as ``m``-bit
  two's complement (default: the fewest bits holding ``+-(R + 1)``); the comparator reads the
  corrupted ``t'``. Exact: at BER 0 the block equals the float model bit for bit.
* ``"bn"`` (every selected block, the output block included): the deployed affine form of
  BatchNorm, ``y_c = s_c a_c + b_c`` with

      s_c = gamma_c / sqrt(var_c + eps),     b_c = beta_c - mu_c s_c,

  each tensor (``s``, ``b``) stored as ``m``-bit symmetric two's complement with one step
  ``Delta = max_c |x_c| / (2^(m-1) - 1)`` (``Delta = 1`` for an all-zero tensor), kept in
  reliable memory: ``q_c = round(x_c / Delta)`` (half away from zero), word
  ``q_c mod 2^m``, value ``q_c' Delta`` (float64, then float32). Default ``m = 16``
  (:data:`BN_BITS`). The block computes ``F.batch_norm(a, 0, 1, s', b', eps=0)`` -- exactly
  what a BatchNorm with ``running_mean = 0``, ``running_var = 1``, ``eps = 0``,
  ``weight = s'``, ``bias = b'`` computes -- so at BER 0 it is the network with ``m``-bit BN
  words (equal to the float one up to ``Delta / 2`` per word), not the float network.

Bit layout (what a map of the site flips): word ``j`` of ``W`` words of ``m`` bits occupies
stored bits ``j m .. j m + m - 1``, LSB first (the codec's layout,
:func:`~bnn_tol.core.codec.flip_bits`); the ``"bn"`` words are ``s_0 .. s_{C-1}, b_0 ..
b_{C-1}``. Seeds: the site of block layer at position ``k`` is stream 2 (thresholds) or 3
(bn) of chip ``seed`` (:func:`~bnn_tol.faults.maps.layer_seed`).

``targets=("weights", "bn")`` corrupts every stored parameter of the network (Stutz et al.);
only the reference engine evaluates parameter targets (``inject`` + the model's forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.codec import flip_bits
from bnn_tol.core.compiled import Stage
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.registry import STREAMS, Site

__all__ = ["TARGETS", "BN_BITS", "parse_targets", "threshold_bits", "encode_words",
           "decode_words", "word_bits", "bn_words", "threshold_hook", "threshold_site",
           "bn_hook", "bn_site"]

#: Targets of :func:`~bnn_tol.faults.inject.inject`; ``thresholds`` and ``bn`` take ``:m``.
TARGETS = ("weights", "activations", "thresholds", "bn")

#: Default width of a BN scale/shift word.
BN_BITS = 16

_MAX_BITS = 62


def parse_targets(targets: Sequence[str] | str) -> dict[str, int | None]:
    """``("weights", "bn:8")`` -> ``{"weights": None, "bn": 8}`` (``None``: default width).

    Raises:
        InvalidArgument: an unknown target, a bad width, a target twice, or ``thresholds``
            with ``bn`` (two storage forms of the same BatchNorm).
    """
    items = (targets,) if isinstance(targets, str) else tuple(targets)
    out: dict[str, int | None] = {}
    for t in items:
        if not isinstance(t, str):
            raise InvalidArgument(f"a target is a name, one of {', '.join(TARGETS)}; got {t!r}")
        kind, sep, width = t.partition(":")
        if kind not in TARGETS:
            raise InvalidArgument(f"unknown targets [{t!r}]; use {', '.join(TARGETS)} "
                                  "(thresholds:m and bn:m state the word width m)")
        bits = None
        if sep:
            if kind not in ("thresholds", "bn") or not width.isdigit() \
                    or not 2 <= int(width) <= _MAX_BITS:
                raise InvalidArgument(f"target {t!r}: only thresholds:m and bn:m take a width,"
                                      f" 2 <= m <= {_MAX_BITS}")
            bits = int(width)
        if kind in out:
            raise InvalidArgument(f"target {kind!r} given twice")
        out[kind] = bits
    if not out:
        raise InvalidArgument(f"no targets given; use {', '.join(TARGETS)}")
    if "thresholds" in out and "bn" in out:
        raise InvalidArgument("thresholds and bn are two storage forms of the same BatchNorm: "
                              "choose one")
    return out


def threshold_bits(reach: int) -> int:
    """Bits of a two's complement integer holding ``[-reach - 1, reach + 1]``."""
    return int(reach + 1).bit_length() + 1


def encode_words(q: Tensor, m: int) -> Tensor:
    """Signed integers ``q`` (int64, ``|q| < 2^(m-1)``) -> ``m``-bit two's complement words."""
    return q.to(torch.int64) & ((1 << m) - 1)


def decode_words(codes: Tensor, m: int) -> Tensor:
    """``m``-bit two's complement words -> signed int64 (``c - 2^m`` where ``c >= 2^(m-1)``)."""
    c = codes.to(torch.int64)
    return torch.where(c >= 1 << (m - 1), c - (1 << m), c)


def word_bits(codes: Tensor, m: int) -> Tensor:
    """Stored bits of ``W`` words: uint8 ``(W m,)``, bit ``j m + b`` = bit ``b`` of word ``j``."""
    flat = codes.reshape(-1).to(torch.int64)
    return ((flat[:, None] >> torch.arange(m)) & 1).to(torch.uint8).reshape(-1)


def _flipped_words(codes: Tensor, m: int, fmap, p01: float, p10: float) -> Tensor:
    """The words with the bits ``fmap`` flips (given the stored bits) flipped."""
    idx = fmap.flips(word_bits(codes, m).to(torch.float32) * 2 - 1, p01, p10)
    return flip_bits(codes, idx, m)


def _check_bn(name: str, block: nn.Module) -> nn.modules.batchnorm._BatchNorm:
    bn = getattr(block, "bn", None)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        raise InvalidArgument(f"{name}: parameter errors need a BatchNorm with running "
                              "statistics after the layer")
    return bn


def bn_words(bn: nn.modules.batchnorm._BatchNorm, m: int) -> tuple[Tensor, Tensor]:
    """The stored form of a BatchNorm: ``(codes, steps)``.

    ``codes`` int64 ``(2 C,)``: the ``m``-bit words of ``s`` then ``b`` (module docstring);
    ``steps`` float64 ``(2,)``: ``Delta`` of ``s`` and of ``b``.
    """
    c = bn.num_features
    mu = bn.running_mean.detach().double().cpu()
    var = bn.running_var.detach().double().cpu()
    ones = torch.ones(c, dtype=torch.float64)
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else ones
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else 0 * ones
    s = gamma / torch.sqrt(var + bn.eps)
    b = beta - mu * s
    top = (1 << (m - 1)) - 1
    codes, steps = [], []
    for x in (s, b):
        r = float(x.abs().max()) if x.numel() else 0.0
        step = r / top if r > 0 else 1.0
        q = torch.sign(x) * torch.floor((x / step).abs() + 0.5)
        codes.append(encode_words(q.clamp(-top, top).to(torch.int64), m))
        steps.append(step)
    return torch.cat(codes), torch.tensor(steps, dtype=torch.float64)


def threshold_hook(st: Stage, fmap, p01: float, p10: float, m: int | None):
    """Forward hook on ``block.bn`` replacing ``sign(bn(a))`` by the comparator with corrupted
    ``m``-bit integer thresholds (the map ``fmap`` of the site, see the module docstring).

    Returns:
        ``(hook, t_bad)``: the hook and the corrupted thresholds int64 ``(C,)``.
    """
    _check_bn(st.name, st.block)
    scale = st.scale
    folded = st.folded
    reach = st.fan_in * scale
    nb = m or threshold_bits(reach)
    if nb < threshold_bits(reach):
        raise InvalidArgument(f"BN thresholds of this layer need {threshold_bits(reach)} bits "
                              f"(|a| <= {reach}); threshold_bits={nb} is too small")
    t = folded.t.clamp(-reach - 1, reach + 1)
    t_bad = decode_words(_flipped_words(encode_words(t, nb), nb, fmap, p01, p10), nb)
    d = folded.direction.to(torch.int64)
    const = folded.const.to(torch.float32)

    def hook(module: nn.Module, inputs, out: Tensor) -> Tensor:
        a = inputs[0] * scale
        shape = [1, -1] + [1] * (a.dim() - 2)
        tt = t_bad.to(a.device, a.dtype).view(shape)
        dd = d.to(a.device).view(shape)
        y = torch.where(dd > 0, a - tt, tt - a)
        y = torch.where(dd == 0, const.to(a.device, a.dtype).view(shape), y)
        return torch.where(y >= 0, 1.0, -1.0).to(out.dtype)

    return hook, t_bad


def threshold_site(st: Stage, m: int | None) -> Site:
    """The site of a stage's threshold words (stream 2)."""
    bn = _check_bn(st.name, st.block)
    nb = m or threshold_bits(st.fan_in * st.scale)
    return Site(st.name, st.position, bn.num_features * nb, STREAMS["thresholds"])


def bn_site(block: nn.Module, name: str, position: int, m: int | None) -> Site:
    """The site of a block's BN scale/shift words (stream 3)."""
    bn = _check_bn(name, block)
    return Site(name, position, 2 * bn.num_features * (m or BN_BITS), STREAMS["bn"])


def bn_hook(block: nn.Module, name: str, fmap, p01: float, p10: float, m: int | None):
    """Forward hook on ``block.bn`` computing the BatchNorm from its corrupted ``m``-bit scale
    and shift words (module docstring).

    Returns:
        ``(hook, scale, shift)``: the hook and the corrupted float32 ``s'``, ``b'`` ``(C,)``.
    """
    bn = _check_bn(name, block)
    nb = m or BN_BITS
    codes, steps = bn_words(bn, nb)
    q = decode_words(_flipped_words(codes, nb, fmap, p01, p10), nb).view(2, -1)
    vals = (q.to(torch.float64) * steps[:, None]).to(torch.float32)
    s, b = vals[0].contiguous(), vals[1].contiguous()
    zero, one = torch.zeros_like(s), torch.ones_like(s)

    def hook(module: nn.Module, inputs, out: Tensor) -> Tensor:
        a = inputs[0]
        dev = a.device
        return F.batch_norm(a, zero.to(dev), one.to(dev), s.to(dev, a.dtype), b.to(dev, a.dtype),
                            False, 0.0, 0.0)

    return hook, s, b
