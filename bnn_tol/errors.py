"""Bit error model for binary weights stored in approximate memory.

A weight ``w_b = +1`` is stored as bit 1, ``w_b = -1`` as bit 0. Each stored bit flips
independently:

    P(0 -> 1) = p01   (weight -1 -> +1)
    P(1 -> 0) = p10   (weight +1 -> -1)

A symmetric bit error rate (BER) ``p`` means ``p01 = p10 = p``; asymmetric rates model RRAM.

Transient errors (:class:`TransientFlip`) draw a fresh set of flips on every forward pass;
this is what bit flip training uses. All randomness comes from an explicit
``torch.Generator``.

Sampling at low BER does not draw one uniform per bit: the positions of a Bernoulli(p)
process over ``n`` bits are drawn as geometric gaps,

    G_k = floor(log(U_k) / log(1 - p)),  position_k = sum_{i<=k} (G_i + 1) - 1,

which needs about ``n p`` uniforms instead of ``n`` and has exactly the Bernoulli law.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BER",
    "rates",
    "bernoulli_indices",
    "flip_binary",
    "TransientFlip",
    "DENSE_ABOVE",
]

#: Above this rate one dense uniform per bit is cheaper than geometric gaps.
DENSE_ABOVE = 0.2

BER = float | tuple[float, float] | Sequence[float]


def rates(ber: BER) -> tuple[float, float]:
    """Normalize a BER spec to ``(p01, p10)``.

    Args:
        ber: ``p`` (symmetric) or ``(p01, p10)``.

    Raises:
        ValueError: a rate outside ``[0, 1]``, NaN, or a tuple not of length 2.
    """
    if isinstance(ber, int | float):
        p01 = p10 = float(ber)
    else:
        vals = list(ber)
        if len(vals) != 2:
            raise ValueError(f"a BER is a number p or a pair (p01, p10), got {ber!r}")
        p01, p10 = float(vals[0]), float(vals[1])
    for label, p in (("p01", p01), ("p10", p10)):
        if not (0.0 <= p <= 1.0):  # also rejects NaN
            raise ValueError(f"bit error rate {label}={p} is outside [0, 1]")
    return p01, p10


def bernoulli_indices(
    n: int,
    p: float,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Sorted flat indices ``i`` in ``[0, n)`` of independent Bernoulli(p) successes.

    Uses geometric gaps (about ``n p`` float64 uniforms) for ``p <= DENSE_ABOVE`` and one
    float32 uniform per position (``u < p``) above. Both are draws from ``generator``
    (which must live on ``device``).

    Returns:
        int64 tensor ``(K,)`` on ``device`` with ``K ~ Binomial(n, p)``.
    """
    if n <= 0 or p <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if p >= 1.0:
        return torch.arange(n, device=device)
    if p > DENSE_ABOVE:
        u = torch.rand(n, generator=generator, device=device)
        return torch.nonzero(u < p).flatten()
    log1mp = math.log1p(-p)
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)
    out: list[Tensor] = []
    offset = -1  # position of the last success so far
    while True:
        u = torch.rand(chunk, generator=generator, device=device, dtype=torch.float64)
        # 1 - u lies in (0, 1]: log is finite. G = floor(log(1-u)/log(1-p)) >= 0.
        gaps = torch.floor(torch.log1p(-u) / log1mp).clamp_(max=float(n)).to(torch.int64) + 1
        pos = offset + torch.cumsum(gaps, 0)
        inside = pos < n
        if not bool(inside[-1]):
            out.append(pos[inside])
            break
        out.append(pos)
        offset = int(pos[-1])
    return torch.cat(out)


def flip_binary(
    wb: Tensor,
    p01: float,
    p10: float,
    *,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Flip stored bits of a {-1, +1} tensor at rates ``p01`` (-1 -> +1), ``p10`` (+1 -> -1).

    Candidates are drawn at ``p_max = max(p01, p10)``; a candidate at a stored value whose
    rate is lower is kept with probability ``p_v / p_max`` (exact thinning).

    Args:
        wb: tensor with values in {-1, +1}, any shape.
        p01, p10: rates in [0, 1].
        generator: source of randomness, on ``wb.device``.

    Returns:
        ``(flipped, idx)``: the flipped tensor (same shape/dtype) and the int64 flat
        indices that flipped.
    """
    p_max = max(p01, p10)
    flat = wb.detach().reshape(-1)
    idx = bernoulli_indices(flat.numel(), p_max, generator=generator, device=wb.device)
    if p01 != p10 and idx.numel():
        stored_one = flat[idx] > 0
        keep_p = torch.where(stored_one, p10 / p_max, p01 / p_max)
        u = torch.rand(idx.numel(), generator=generator, device=wb.device, dtype=torch.float64)
        idx = idx[u < keep_p]
    out = flat.clone()
    out[idx] = -out[idx]
    return out.view_as(wb), idx


class TransientFlip:
    """Layer fault: a fresh bit flip draw on every forward pass (bit flip training).

    Forward: ``w' = flip(sign(w))``. Backward: straight through the flips, as if they were
    not there: ``dL/dw_b = dL/dw'`` at the same position.

    Args:
        ber: ``p`` or ``(p01, p10)``.
        generator: ``torch.Generator`` on the layer's device.

    Attributes:
        last_flips: indices flipped by the last call (for tests and statistics).
    """

    def __init__(self, ber: BER, generator: torch.Generator) -> None:
        self.p01, self.p10 = rates(ber)
        self.generator = generator
        self.last_flips: Tensor | None = None

    def __call__(self, wb: Tensor) -> Tensor:  # noqa: D102
        flipped, self.last_flips = flip_binary(wb, self.p01, self.p10, generator=self.generator)
        return wb + (flipped - wb).detach()

    def __repr__(self) -> str:
        return f"TransientFlip(p01={self.p01}, p10={self.p10})"


def select_layers(model: torch.nn.Module, layers: Sequence[str | int] | str | None = None) -> dict:
    """Binary layers of ``model`` chosen by name or position.

    Args:
        model: a module containing :class:`~bnn_tol.layers.BinaryLayer` s.
        layers: ``None`` or ``"all"`` for every binary layer; ``"hidden"`` for all but the
            first and the last (hardware often keeps those in reliable memory); otherwise a
            sequence of qualified names (``"blocks.1.layer"``) or positions in forward order
            (negative counts from the end).

    Returns:
        ``{name: layer}`` in forward order.

    Raises:
        ValueError: the model has no binary layers, or a name/position does not exist
            (the message lists the valid names).
    """
    from .layers import BinaryLayer

    found = {n: m for n, m in model.named_modules() if isinstance(m, BinaryLayer)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no binary layers (BinaryLinear/BinaryConv2d)")
    names = list(found)
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return found
    if isinstance(layers, str) and layers == "hidden":
        return {n: found[n] for n in names[1:-1]}
    if isinstance(layers, str):
        layers = [layers]
    chosen: dict = {}
    for key in layers:
        if isinstance(key, int) and not isinstance(key, bool):
            if not -len(names) <= key < len(names):
                raise ValueError(f"layer position {key} out of range: the model has "
                                 f"{len(names)} binary layers ({', '.join(names)})")
            name = names[key]
        elif isinstance(key, str) and key in found:
            name = key
        elif isinstance(key, str) and key.isdigit():
            name = names[int(key)] if int(key) < len(names) else key
            if name not in found:
                raise ValueError(f"layer position {key} out of range ({', '.join(names)})")
        else:
            raise ValueError(f"unknown layer {key!r}; binary layers are: {', '.join(names)}")
        chosen[name] = found[name]
    return {n: chosen[n] for n in names if n in chosen}
