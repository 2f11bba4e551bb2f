"""How a layer's weights are stored in memory: one codec per layer (issue 11, Stutz et al.).

A codec turns real weights into integer *codes* of ``m = bits_per_weight`` stored bits and
back. The memory image of a layer is the bit stream :meth:`Codec.to_bits` of its codes:
``numel * m`` bits, weight-major, least significant bit first (bit ``i = j m + b`` is bit ``b``
of weight ``j``, flat index ``j`` in ``weight.reshape(-1)``). Fault maps flip these stored bits
(:mod:`bnn_tol.errors`): a stored 0 flips with ``p01``, a stored 1 with ``p10``.

Two codecs:

* :class:`SignCodec` -- the BNN case, ``m = 1``: ``code = 1{w >= 0}``, ``decode(c) = 2 c - 1``.
  The stored bit of weight ``+1`` is 1, of ``-1`` is 0 (DESIGN.md).
* :class:`FixedPointCodec` -- ``m``-bit fixed point (``2 <= m <= 8``) with step ``Delta``:

  - ``"symmetric"`` (two's complement): ``Delta = r / (2^(m-1) - 1)`` with ``r = max|w|``,
    ``q = round(w / Delta)`` in ``[-(2^(m-1) - 1), 2^(m-1) - 1]``, ``code = q mod 2^m``,
    ``decode = q Delta``. Flipping the MSB changes ``q`` by ``-+2^(m-1)`` (a sign change).
  - ``"asymmetric"`` (unsigned with offset): ``Delta = (max w - min w) / (2^m - 1)``,
    ``code = round((w - min w) / Delta)`` in ``[0, 2^m - 1]``, ``decode = min w + code Delta``.
    Flipping bit ``b`` changes the weight by ``+-2^b Delta`` (the paper's robust quantization).
  - ``"asymmetric-signed"`` (the paper's "+asymmetric" step: an asymmetric range, still two's
    complement): ``Delta = (max w - min w) / (2^m - 2)``, ``q = round((w - min w) / Delta) -
    (2^(m-1) - 1)`` in ``[-(2^(m-1) - 1), 2^(m-1) - 1]``, ``code = q mod 2^m``, ``decode =
    min w + (q + 2^(m-1) - 1) Delta``; the MSB is a sign bit as in ``"symmetric"``.

  ``granularity="layer"`` uses one range per layer, ``"channel"`` one per output channel
  (row of the weight), ``"network"`` one range for every such layer of the model (the paper's
  global quantization, set by :func:`share_ranges`). ``rounding="nearest"`` rounds to nearest
  (half away from zero), the paper's choice; ``"truncate"`` rounds toward zero (the float ->
  int conversion of the paper's "Normal" baseline).

  The paper's ladder (Stutz et al., MLSys 2021, 4.1): Normal = ``symmetric`` + ``network`` +
  ``truncate``; +asymmetric = ``asymmetric-signed``; +unsigned = ``asymmetric``; +rounding =
  ``nearest`` (RQuant, with per-layer ranges).

The range (``lo``, ``hi``) is a buffer of the codec, saved with the layer's state dict: it is
set by :meth:`FixedPointCodec.encode` from the weights (the range is stored in reliable memory,
as in the paper; only the codes are exposed to bit errors), so :meth:`Codec.decode` needs the
codes alone.

>>> import torch
>>> c = FixedPointCodec(4, "asymmetric")
>>> w = torch.tensor([[-0.5, 0.0, 0.25, 1.0]])
>>> codes = c.encode(w)
>>> (c.decode(codes) - w).abs().max() <= c.step() / 2
tensor(True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bnn_tol.exceptions import InvalidArgument, require_int

__all__ = ["Codec", "SignCodec", "FixedPointCodec", "make", "flip_bits", "share_ranges",
           "SCHEMES", "GRANULARITIES", "ROUNDINGS"]

SCHEMES = ("symmetric", "asymmetric", "asymmetric-signed")
GRANULARITIES = ("layer", "channel", "network")
ROUNDINGS = ("nearest", "truncate")


class _StraightThrough(torch.autograd.Function):
    """Forward ``q``; backward the gradient passes to ``w`` unchanged."""

    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor) -> Tensor:  # noqa: D102
        return q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


def flip_bits(codes: Tensor, idx: Tensor, m: int) -> Tensor:
    """``m``-bit integer words with the stored bits at flat memory-image indices ``idx``
    flipped: ``code_j ^= 2^b`` for each ``i = j m + b`` (the layout of :meth:`Codec.to_bits`;
    ``idx`` int64 unique). ``codes``: int64 words ``0 <= c < 2^m`` of any shape; a new tensor.

    The one implementation of a stored-bit flip on multi-bit words (weights of fixed-point
    layers, BN thresholds and parameter words of :mod:`bnn_tol.faults.params`).
    """
    out = codes.clone()
    flat = out.view(-1)
    idx = idx.to(flat.device)
    j = torch.div(idx, m, rounding_mode="floor")
    flat ^= torch.zeros_like(flat).index_add_(0, j, 1 << (idx % m))
    return out


class Codec(nn.Module):
    """Base class: maps weights to ``m``-bit integer codes and back.

    Attributes:
        bits_per_weight: ``m``, stored bits per weight.
        is_sign: ``True`` only for :class:`SignCodec` (the BNN case, weights in {-1, +1}).
    """

    bits_per_weight: int = 1
    is_sign: bool = False

    def encode(self, w: Tensor) -> Tensor:
        """Integer codes in ``[0, 2^m)``, int64, shape of ``w`` (no gradient)."""
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        """Float32 weights of the shape of ``codes``, from the codes (and the stored range)."""
        raise NotImplementedError

    def quantize(self, w: Tensor) -> Tensor:
        """``decode(encode(w))`` forward, straight-through gradient ``dL/dw = dL/dq`` backward."""
        q = self.decode(self.encode(w.detach())).to(w.dtype)
        return _StraightThrough.apply(w, q)

    def to_bits(self, codes: Tensor) -> Tensor:
        """Memory image: uint8 ``(numel * m,)``, bit ``j m + b`` = bit ``b`` of code ``j``.

        Args:
            codes: int64 codes of any shape (flattened in C order).
        """
        m = self.bits_per_weight
        flat = codes.reshape(-1).to(torch.int64)
        shifts = torch.arange(m, device=flat.device, dtype=torch.int64)
        return ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)

    def from_bits(self, bits: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Inverse of :meth:`to_bits`: codes int64 of ``shape`` from ``numel * m`` bits (0/1)."""
        m = self.bits_per_weight
        b = bits.reshape(-1, m).to(torch.int64)
        weights = 1 << torch.arange(m, device=b.device, dtype=torch.int64)
        return (b * weights).sum(1).reshape(shape)

    def flip(self, codes: Tensor, idx: Tensor) -> Tensor:
        """Codes with the stored bits at flat memory-image indices ``idx`` flipped
        (:func:`flip_bits` with ``m = bits_per_weight``); a new tensor."""
        return flip_bits(codes, idx, self.bits_per_weight)

    def place_values(self) -> Tensor:
        """``(m,)`` float64: change of the integer level when stored bit ``b`` goes 0 -> 1.

        The decoded weight changes by ``place_values()[b] * step()``.
        """
        raise NotImplementedError

    def step(self) -> Tensor:
        """Quantization step ``Delta``: ``()`` (per layer) or ``(C_out,)`` float32."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able description; :func:`make` rebuilds the codec from it."""
        raise NotImplementedError


class SignCodec(Codec):
    """One bit per weight: ``code = 1{w >= 0}``, ``decode(c) = 2 c - 1`` (float32).

    No state: a layer with a sign codec has exactly the state dict of a plain BNN layer.
    """

    bits_per_weight = 1
    is_sign = True

    def encode(self, w: Tensor) -> Tensor:  # noqa: D102
        return (w.detach() >= 0).to(torch.int64)

    def decode(self, codes: Tensor) -> Tensor:  # noqa: D102
        return codes.to(torch.float32) * 2.0 - 1.0

    def place_values(self) -> Tensor:  # noqa: D102
        return torch.tensor([2.0], dtype=torch.float64)

    def step(self) -> Tensor:  # noqa: D102
        return torch.tensor(1.0)

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {"kind": "sign"}

    def extra_repr(self) -> str:  # noqa: D102
        return "bits=1"


class FixedPointCodec(Codec):
    """``m``-bit fixed point, symmetric (two's complement) or asymmetric (unsigned + offset).

    See the module docstring for the formulas. The range buffers ``lo``, ``hi`` (``(1,)`` per
    layer or ``(C_out,)`` per channel, float32) are updated by :meth:`encode` unless
    ``frozen`` is set (then the stored range is used and weights outside it saturate); a
    ``"network"`` codec is always frozen: its range is the model's, set by
    :func:`share_ranges`.

    Args:
        bits: ``m`` in ``2..8``.
        scheme: ``"symmetric"`` or ``"asymmetric"``.
        granularity: ``"layer"`` or ``"channel"``.
        rounding: ``"nearest"`` or ``"truncate"``.
        channels: number of output channels (needed for ``granularity="channel"``).

    Raises:
        InvalidArgument: bits outside ``2..8`` or an unknown option (listing the valid ones).
    """

    is_sign = False

    def __init__(self, bits: int, scheme: str = "symmetric", granularity: str = "layer",
                 rounding: str = "nearest", channels: int = 1) -> None:
        super().__init__()
        bits = require_int(bits, "weight bits", minimum=2, strict=True)
        if bits > 8:
            raise InvalidArgument(f"weight bits must be 1 (sign) or 2..8, got {bits}")
        for name, value, allowed in (("scheme", scheme, SCHEMES),
                                     ("granularity", granularity, GRANULARITIES),
                                     ("rounding", rounding, ROUNDINGS)):
            if value not in allowed:
                raise InvalidArgument(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        channels = require_int(channels, "channels", minimum=1)
        self.bits_per_weight = bits
        self.scheme, self.granularity, self.rounding = scheme, granularity, rounding
        n = channels if granularity == "channel" else 1
        self.register_buffer("lo", torch.full((n,), -1.0))
        self.register_buffer("hi", torch.full((n,), 1.0))
        self._frozen = False

    @property
    def frozen(self) -> bool:
        """Encode with the stored range (always for ``granularity="network"``)."""
        return self._frozen or self.granularity == "network"

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)

    # -- range ----------------------------------------------------------------------------

    def _view(self, t: Tensor, w: Tensor) -> Tensor:
        """Range tensor ``(n,)`` broadcast against ``w`` ``(C_out, ...)``."""
        if self.granularity != "channel":
            return t.reshape([1] * w.dim())
        return t.reshape([-1] + [1] * (w.dim() - 1))

    def range_of(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` of ``w`` for this scheme, per row (``channel``) or of all of it:
        ``(-max|w|, max|w|)`` symmetric, ``(min w, max w)`` asymmetric."""
        flat = w.detach().reshape(w.shape[0], -1) if self.granularity == "channel" \
            else w.detach().reshape(1, -1)
        if self.scheme == "symmetric":
            r = flat.abs().amax(1).float()
            return -r, r
        return flat.amin(1).float(), flat.amax(1).float()

    def _observe(self, w: Tensor) -> None:
        lo, hi = self.range_of(w)
        if lo.numel() != self.lo.numel():
            raise InvalidArgument(f"per-channel codec for {self.lo.numel()} channels got a "
                                  f"weight with {lo.numel()} rows")
        self.lo.copy_(lo)
        self.hi.copy_(hi)

    def _levels(self) -> tuple[int, int]:
        """Integer levels ``(q_min, q_max)``."""
        m = self.bits_per_weight
        if self.scheme == "asymmetric":
            return 0, 2**m - 1
        return -(2 ** (m - 1) - 1), 2 ** (m - 1) - 1

    def step(self) -> Tensor:
        """``Delta = r / (2^(m-1) - 1)`` (symmetric), ``(hi - lo) / (2^m - 1)`` (asymmetric)
        or ``(hi - lo) / (2^m - 2)`` (asymmetric-signed); a zero range gets ``Delta = 1``
        (all codes decode to the single value)."""
        qmin, qmax = self._levels()
        width = self.hi if self.scheme == "symmetric" else self.hi - self.lo
        denom = qmax if self.scheme == "symmetric" else qmax - qmin
        d = width / denom
        d = torch.where(d > 0, d, torch.ones_like(d))
        return d if self.granularity == "channel" else d[0]

    # -- codes ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, w: Tensor) -> Tensor:
        """Integer codes in ``[0, 2^m)``, int64, shape of ``w``; sets the range from ``w``
        unless ``frozen``.

        Raises:
            InvalidArgument: a weight that is NaN or inf (naming the first one; it would
                otherwise be stored as code 0 or saturate), or, when ``frozen``, a stored
                range that is not finite with ``lo <= hi``. Nothing is changed then.
        """
        bad = ~torch.isfinite(w)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise InvalidArgument(f"cannot encode weights that are NaN or inf: weight {where} is "
                                  f"{float(w[where])} (weights must be finite numbers)")
        if not self.frozen:
            self._observe(w)
        elif not (bool(torch.isfinite(self.lo).all()) and bool(torch.isfinite(self.hi).all())
                  and bool((self.lo <= self.hi).all())):
            raise InvalidArgument("the frozen range of a fixed-point codec must be finite with "
                                  f"lo <= hi, got lo={self.lo.tolist()}, hi={self.hi.tolist()}")
        w = w.detach().float()
        d = self._view(self.step().reshape(-1), w)
        qmin, qmax = self._levels()
        if self.scheme == "symmetric":
            x = w / d
        else:
            x = (w - self._view(self.lo, w)) / d
            x = x + qmin if self.scheme == "asymmetric-signed" else x
        q = torch.trunc(x) if self.rounding == "truncate" else torch.sign(x) * torch.floor(
            x.abs() + 0.5)
        q = q.clamp(qmin, qmax).to(torch.int64)
        return q if self.scheme == "asymmetric" else q % (2**self.bits_per_weight)

    def decode(self, codes: Tensor) -> Tensor:  # noqa: D102
        m = self.bits_per_weight
        c = codes.to(torch.int64)
        d = self._view(self.step().reshape(-1), c)
        if self.scheme == "asymmetric":
            return self._view(self.lo, c) + c.to(torch.float32) * d
        q = torch.where(c >= 2 ** (m - 1), c - 2**m, c)
        if self.scheme == "symmetric":
            return q.to(torch.float32) * d
        return self._view(self.lo, c) + (q - self._levels()[0]).to(torch.float32) * d

    def place_values(self) -> Tensor:  # noqa: D102
        m = self.bits_per_weight
        v = 2.0 ** torch.arange(m, dtype=torch.float64)
        if self.scheme != "asymmetric":  # two's complement: the MSB is the sign
            v[-1] = -v[-1]
        return v

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {"kind": "fixed", "bits": self.bits_per_weight, "scheme": self.scheme,
                "granularity": self.granularity, "rounding": self.rounding,
                "channels": int(self.lo.numel())}

    def extra_repr(self) -> str:  # noqa: D102
        return (f"bits={self.bits_per_weight}, scheme={self.scheme}, "
                f"granularity={self.granularity}, rounding={self.rounding}")


def share_ranges(model: nn.Module) -> int:
    """Global quantization: one range for every layer of ``model`` whose codec has
    ``granularity="network"`` -- per scheme, ``(-r, r)`` with ``r = max |w|`` over all those
    layers (symmetric) or ``(min w, max w)`` over all of them (asymmetric schemes). Called by
    :func:`bnn_tol.models.build` and after every training step; call it after changing weights
    by hand (a network codec encodes with its stored range, saturating outside it).

    Returns:
        The number of layers whose range was set.
    """
    layers = [m for m in model.modules() if isinstance(getattr(m, "codec", None),
                                                      FixedPointCodec)
              and m.codec.granularity == "network" and isinstance(getattr(m, "weight", None),
                                                                   Tensor)]
    by_scheme: dict[str, list] = {}
    for layer in layers:
        by_scheme.setdefault(layer.codec.scheme, []).append(layer)
    with torch.no_grad():
        for group in by_scheme.values():
            ranges = [layer.codec.range_of(layer.weight) for layer in group]
            lo = torch.stack([r[0].reshape(()) for r in ranges]).min()
            hi = torch.stack([r[1].reshape(()) for r in ranges]).max()
            for layer in group:
                layer.codec.lo.fill_(float(lo))
                layer.codec.hi.fill_(float(hi))
    return len(layers)


def make(spec: Mapping[str, Any] | None = None) -> Codec:
    """A codec from :meth:`Codec.config` output (``None`` or ``{"kind": "sign"}``: sign).

    Raises:
        InvalidArgument: ``spec`` not a mapping, an unknown kind or bad options.
    """
    if spec is None or spec == "sign":  # the default, or the bare name of the sign codec
        return SignCodec()
    if not isinstance(spec, Mapping):
        raise InvalidArgument("a codec spec is a mapping such as {'kind': 'fixed', 'bits': 4} "
                              f"(Codec.config()), got {spec!r}")
    if spec.get("kind", "sign") == "sign":
        return SignCodec()
    if spec.get("kind") != "fixed":
        raise InvalidArgument(f"unknown codec kind {spec.get('kind')!r}; use 'sign' or 'fixed'")
    opts = {k: v for k, v in spec.items() if k != "kind"}
    try:
        return FixedPointCodec(**opts)
    except TypeError as e:
        raise InvalidArgument(f"bad codec options {opts}: {e}") from None
