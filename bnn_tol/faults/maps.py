"""Drawing bit errors: the Bernoulli law, persistent nested fault maps, transient flips.

The error models built on these draws are :mod:`bnn_tol.faults.registry` entries (the default,
:mod:`bnn_tol.faults.bernoulli`, is the persistent map below); injection is
:func:`bnn_tol.faults.inject.inject`.

Each layer stores its weights through a codec (:mod:`bnn_tol.codec`): ``m`` bits per weight,
the memory image ``codec.to_bits(codec.encode(w))`` of ``numel * m`` bits. In the BNN case
(``m = 1``) a weight ``w_b = +1`` is stored as bit 1, ``w_b = -1`` as bit 0. Each stored bit
flips independently:

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

Persistent fault maps (:func:`fault_map`; per model :func:`~bnn_tol.faults.registry.draw_maps`)
model one chip:
every stored bit ``i`` gets one uniform ``u_i ~ U(0, 1)`` and flips iff ``u_i < p`` (iff
``u_i < p01`` for a stored 0, ``u_i < p10`` for a stored 1). Maps are therefore nested across
BERs (the flips at 1 % are a subset of those at 2 % for the same seed) and identical on every
run and every device (they are always drawn on CPU). Only the ``u_i`` below a cap are ever
materialized (see :func:`fault_map`), so low BERs cost about ``n p`` draws, not ``n``.

Seed -> map of the ``bernoulli`` error model (what ``inject`` and :func:`bnn_tol.evaluate.sweep`
both use, so any sweep row can be replayed with ``inject(model, ber, seed=row.seed)``)::

    layer_seed(seed, k) = SeedSequence(seed, spawn_key=(k,)).generate_state(1, uint64) & (2**63-1)
    map of binary layer k = fault_map(layer.n_stored_bits, cap,   # numel * m stored bits
                                      generator=torch.Generator().manual_seed(layer_seed(seed, k)))

with ``k`` the position of the layer among *all* binary layers of the model (forward order), so
selecting fewer layers does not change the other layers' maps. The map does not depend on the
cap (it only decides how many ``u_i`` are materialized).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bnn_tol.core import kernels
from bnn_tol.core.compiled import stored_layers
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults import draw
from bnn_tol.faults.apply import negate, negate_
from bnn_tol.faults.draw import BAND_EDGES, DENSE_ABOVE
from bnn_tol.faults.seeds import derive, spawn

__all__ = [
    "BER",
    "rates",
    "bernoulli_indices",
    "flip_binary",
    "flip_indices",
    "TransientFlip",
    "flip_mask",
    "DENSE_ABOVE",
    "select_layers",
    "FaultMap",
    "fault_map",
    "layer_seed",
    "map_seeds",
    "PersistentFlip",
    "BAND_EDGES",
]


BER = float | tuple[float, float] | Sequence[float]


def rates(ber: BER) -> tuple[float, float]:
    """Normalize a BER spec to ``(p01, p10)``.

    Args:
        ber: ``p`` (symmetric) or ``(p01, p10)``.

    Raises:
        ValueError: a rate outside ``[0, 1]``, NaN, or a tuple not of length 2.
    """

    def num(v: object) -> float:
        if isinstance(v, bool | str | bytes) or v is None:
            raise InvalidArgument(f"a BER is a number p or a pair (p01, p10), got {ber!r}")
        try:
            return float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"a BER is a number p or a pair (p01, p10), got {ber!r}") from None

    if isinstance(ber, numbers.Real) and not isinstance(ber, bool):
        p01 = p10 = float(ber)
    else:
        if isinstance(ber, str | bytes) or not hasattr(ber, "__iter__"):
            raise InvalidArgument(f"a BER is a number p or a pair (p01, p10), got {ber!r}")
        vals = list(ber)
        if len(vals) != 2:
            raise InvalidArgument(f"a BER is a number p or a pair (p01, p10), got {ber!r}")
        p01, p10 = num(vals[0]), num(vals[1])
    for label, p in (("p01", p01), ("p10", p10)):
        if not (0.0 <= p <= 1.0):  # also rejects NaN
            raise InvalidArgument(f"bit error rate {label}={p} is outside [0, 1]")
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
    kernel = _gap_kernel(chunk, device)
    while True:
        u = torch.rand(chunk, generator=generator, device=device, dtype=torch.float64)
        if kernel is not None:  # the same operations fused in one pass (see gap_positions)
            pos = torch.empty(chunk, dtype=torch.int64)
            k, offset = kernel(u.neg_().log1p_().numpy(), log1mp, n, offset, pos.numpy())
            out.append(pos[:k])
            if k < chunk:
                break
            continue
        # 1 - u lies in (0, 1]: log is finite. G = floor(log(1-u)/log(1-p)) >= 0.
        # In place, the values of floor(log1p(-u) / log1mp).clamp(max=n).to(int64): the
        # quotient is >= 0, where the int64 cast (truncation) is the floor.
        gaps = u.neg_().log1p_().div_(log1mp).clamp_(max=float(n)).to(torch.int64)
        pos = torch.cumsum(gaps.add_(1), 0).add_(offset)
        last = int(pos[-1])
        if last >= n:
            # gaps >= 1: pos is strictly increasing, the positions < n are a prefix
            out.append(pos[: int(torch.searchsorted(pos, n))])
            break
        out.append(pos)
        offset = last
    return out[0] if len(out) == 1 else torch.cat(out)


#: Draws of at least this many gaps on CPU use the fused numba kernel (when numba is present).
_KERNEL_FROM = 1 << 15


def _gap_kernel(chunk: int, device: torch.device | str):
    """:func:`bnn_tol.kernels.gap_positions` for a large CPU draw, else ``None`` (torch ops;
    small draws do not pay numba's import). Both give the same positions."""
    if chunk < _KERNEL_FROM or torch.device(device).type != "cpu":
        return None

    return kernels.gap_positions if kernels.AVAILABLE else None


def flip_indices(stored: Tensor, p01: float, p10: float, *, generator: torch.Generator) -> Tensor:
    """Flat indices of the stored bits that flip (the draws of :func:`flip_binary`).

    Candidates at ``p_max = max(p01, p10)`` (geometric gaps), thinned by ``p_v / p_max`` by
    stored value ``v`` (``stored > 0`` is a stored 1: +1 weights or bits 1).

    Returns:
        int64 ``(F,)`` sorted unique flat indices on ``stored.device``.
    """
    p_max = max(p01, p10)
    flat = stored.reshape(-1)
    idx = bernoulli_indices(flat.numel(), p_max, generator=generator, device=stored.device)
    if p01 != p10 and idx.numel():
        stored_one = flat[idx] > 0
        keep_p = torch.where(stored_one, p10 / p_max, p01 / p_max)
        u = torch.rand(idx.numel(), generator=generator, device=stored.device,
                       dtype=torch.float64)
        idx = idx[u < keep_p]
    return idx


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
    flat = wb.detach().reshape(-1)
    idx = flip_indices(flat, p01, p10, generator=generator)
    return negate_(flat.clone(), idx).view_as(wb), idx


#: From this rate on, transient flips use one random byte per bit (:func:`flip_mask`); below,
#: geometric gaps are cheaper (measured on fc: 12 ms vs 15 ms per step at p = 0.1).
BYTES_ABOVE = 0.125


def flip_mask(
    wb: Tensor,
    p01: float,
    p10: float,
    *,
    generator: torch.Generator,
) -> Tensor:
    """Boolean mask of the stored bits of a {-1, +1} tensor that flip (dense, exact law).

    One random byte ``r`` per bit (eight bytes from each 64-bit draw of ``generator``, a
    quarter of the generator calls of one float per bit). With ``256 p = k + f``
    (``k`` integer, ``0 <= f < 1``) the bit flips iff ``r < k``, or ``r == k`` and a second
    uniform is below ``f`` (about one bit in 256 needs it), so ``P(flip) = k/256 + f/256 = p``
    exactly; ``p = p10`` where the stored weight is +1, ``p01`` where it is -1.

    Args:
        wb: tensor with values in {-1, +1}, any shape; p01, p10: rates in [0, 1].
        generator: on ``wb.device``.

    Returns:
        bool tensor of the shape of ``wb``.
    """
    n = wb.numel()
    raw = torch.empty((n + 7) // 8, dtype=torch.int64, device=wb.device)
    raw = raw.random_(-(2**63), None, generator=generator).view(torch.uint8)[:n].view(wb.shape)
    (k01, f01), (k10, f10) = (divmod(256.0 * p, 1.0) for p in (p01, p10))
    if p01 == p10:
        k, f = int(k01), f01
        if k >= 256:
            return torch.ones_like(raw, dtype=torch.bool)
        mask = raw < k
        tie = raw == k if f > 0 else None
        frac = None
    else:
        thr = torch.where(wb > 0, int(k10), int(k01)).to(torch.int16)
        r16 = raw.to(torch.int16)
        mask = r16 < thr
        tie = r16 == thr if max(f01, f10) > 0 else None
        frac = (f10, f01)
    if tie is not None:
        where = tie.reshape(-1).nonzero().flatten()
        u = torch.rand(where.numel(), generator=generator, device=wb.device, dtype=torch.float64)
        if frac is None:
            keep = u < f
        else:
            keep = u < torch.where(wb.reshape(-1)[where] > 0, frac[0], frac[1])
        mask.view(-1)[where[keep]] = True
    return mask


class TransientFlip:
    """Layer fault: a fresh bit flip draw on every forward pass (bit flip training).

    Forward: ``w' = flip(sign(w))``. Backward: straight through the flips, as if they were
    not there: ``dL/dw_b = dL/dw'`` at the same position.

    The draw is :func:`flip_mask` (a random byte per bit) when ``max(p01, p10) >=
    BYTES_ABOVE`` and geometric gaps (:func:`flip_binary`) below; both have exactly the
    Bernoulli law. Sign-coded binary layers call :meth:`flip_stored_` (the same draws, applied
    in place to the sign bits), fixed-point ones :meth:`indices`.

    Args:
        ber: ``p`` or ``(p01, p10)``.
        generator: ``torch.Generator`` on the layer's device.

    Attributes:
        last_flips: flat indices flipped by the last call (for tests and statistics).
    """

    def __init__(self, ber: BER, generator: torch.Generator) -> None:
        self.p01, self.p10 = rates(ber)
        self.generator = generator
        self._last: Tensor | None = None

    @property
    def last_flips(self) -> Tensor | None:  # noqa: D102
        if self._last is None or self._last.dtype != torch.bool:
            return self._last
        return self._last.reshape(-1).nonzero().flatten()

    def indices(self, stored: Tensor) -> Tensor:
        """Flat indices of the stored bits (``stored > 0``: a stored 1) that flip in this draw:
        the same draws as :meth:`__call__` on the +-1 tensor of the same bits."""
        if max(self.p01, self.p10) >= BYTES_ABOVE:
            self._last = flip_mask(stored, self.p01, self.p10, generator=self.generator)
            return self._last.reshape(-1).nonzero().flatten()
        self._last = flip_indices(stored, self.p01, self.p10, generator=self.generator)
        return self._last

    def flip_stored_(self, stored: Tensor) -> Tensor:
        """Flip the stored bits of a bool tensor (True = stored 1 = ``+1``) in place; the same
        draws as :meth:`__call__` on ``where(stored, 1, -1)``. Returns ``stored``.

        What binary layers use in training (:meth:`~bnn_tol.layers.BinaryLayer.binary_weight`):
        the flips are applied to the sign bits before they become +-1, without a copy of the
        binarized weight.
        """
        if max(self.p01, self.p10) >= BYTES_ABOVE:
            self._last = flip_mask(stored, self.p01, self.p10, generator=self.generator)
            return negate_(stored, self._last)
        self._last = flip_indices(stored, self.p01, self.p10, generator=self.generator)
        return negate_(stored, self._last)

    def __call__(self, wb: Tensor) -> Tensor:  # noqa: D102
        w = wb.detach()
        if max(self.p01, self.p10) >= BYTES_ABOVE:
            self._last = flip_mask(w, self.p01, self.p10, generator=self.generator)
        else:
            self._last = flip_indices(w, self.p01, self.p10, generator=self.generator)
        return negate(wb, self._last)

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

    found = stored_layers(model)
    if not found:
        raise InvalidArgument(
            f"{type(model).__name__} has no binary layers (BinaryLinear/BinaryConv2d)")
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
                raise InvalidArgument(f"layer position {key} out of range: the model has "
                                 f"{len(names)} binary layers ({', '.join(names)})")
            name = names[key]
        elif isinstance(key, str) and key in found:
            name = key
        elif isinstance(key, str) and key.isdigit():
            name = names[int(key)] if int(key) < len(names) else key
            if name not in found:
                raise InvalidArgument(f"layer position {key} out of range ({', '.join(names)})")
        else:
            raise InvalidArgument(f"unknown layer {key!r}; binary layers are: {', '.join(names)}")
        chosen[name] = found[name]
    return {n: chosen[n] for n in names if n in chosen}


# ---------------------------------------------------------------------------------------------
# Persistent, nested fault maps
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaultMap:
    """Per-bit uniforms of one stored tensor, materialized below a cap.

    Bit ``i`` (flat index) flips at rate ``p`` iff ``u_i < p``; only the ``u_i < cap`` are
    stored, so the map answers every query with ``p <= cap``.

    Attributes:
        numel: number of stored bits.
        idx: int64 ``(K,)`` unique flat indices with ``u_i < cap`` (CPU), ordered by band
            (increasing within a band).
        u: float64 ``(K,)`` their uniforms.
        cap: the largest rate the map can answer (a band edge, see :data:`BAND_EDGES`).
    """

    numel: int
    idx: Tensor
    u: Tensor
    cap: float

    def flips(self, stored: Tensor, p01: float, p10: float) -> Tensor:
        """Flat indices that flip: ``u_i < p10`` where ``stored_i > 0``, ``u_i < p01`` else.

        Args:
            stored: the stored {-1, +1} values, any shape with ``numel`` elements (any device).
            p01, p10: rates ``<= cap``.

        Returns:
            int64 ``(F,)`` unique flat indices on ``stored.device``.
        """
        out = draw.flips(draw.MapArrays(self.numel, self.idx.numpy(), self.u.numpy(), self.cap),
                         _cpu_values(stored) if p01 != p10 else None, p01, p10)
        return _tensor(out).to(stored.device)


def _tensor(a) -> Tensor:
    """A numpy array as a CPU tensor sharing its memory (an empty one with ordinary strides:
    numpy may give size-0 arrays stride 0, which some tensor views refuse)."""
    return torch.from_numpy(a) if a.size else torch.empty(0, dtype=torch.from_numpy(a).dtype)


def _cpu_values(stored: Tensor):
    """The stored values as a CPU numpy array (flat), for the asymmetric comparison."""
    return stored.detach().reshape(-1).cpu().numpy()


def fault_map(numel: int, cap: float, *, seed: int) -> FaultMap:
    """Draw the per-bit uniforms ``u_i < cap`` of ``numel`` bits (all ``u_i`` iid U(0, 1)).

    The range ``[0, 1)`` is cut into the bands of :data:`BAND_EDGES`. Band ``j = [b_j, b_{j+1})``
    draws independent "hits" at rate ``r_j = (b_{j+1} - b_j) / (1 - b_j)`` (geometric gaps)
    and a uniform value in the band for each hit; ``u_i`` is the value of bit ``i``'s first
    hit. Then ``P(first hit in band j) = prod_{l<j}(1 - r_l) r_j = b_{j+1} - b_j`` and ``u_i``
    is uniform inside its band: exactly one U(0, 1) per bit. Bands are drawn in a fixed order
    and stop at the first band edge ``>= cap``, so a smaller cap yields a prefix of the same
    draws: the map of a bit does not depend on the cap. Cost: about ``max(2 cap, 2^-7) numel``
    uniforms.

    The draw is :func:`bnn_tol.faults.draw.fault_map` (numpy only, the code ``deploy`` and the
    export bundles use too) on the stream of ``torch.Generator().manual_seed(seed)``.

    Args:
        numel: number of bits ``n``.
        cap: largest rate to be answered, in ``[0, 1]``.
        seed: the stream (e.g. :func:`layer_seed` of a chip and a stored tensor).

    Returns:
        :class:`FaultMap` with ``cap`` rounded up to a band edge (CPU tensors).
    """
    m = draw.fault_map(numel, cap, draw.generator(seed))
    return FaultMap(m.numel, _tensor(m.idx), _tensor(m.u), m.cap)


def layer_seed(seed: int, position: int, stream: int = 0) -> int:
    """Seed of one stored tensor's map on chip ``seed``: :func:`~bnn_tol.faults.seeds.derive`
    with key ``(position,)`` for the weights of the stored layer at ``position``, ``(position,
    stream)`` for its other tensors (1: activations, 2: BN thresholds)."""
    return derive(seed, position) if stream == 0 else derive(seed, position, stream)


def map_seeds(seed: int, n_maps: int) -> list[int]:
    """The chips of a sweep: ``spawn(seed, n_maps)`` (:mod:`bnn_tol.faults.seeds`); each is a
    63-bit int usable as ``inject(..., seed=s)``."""
    n_maps = require_int(n_maps, "n_maps", minimum=0)
    return spawn(seed, n_maps)


class PersistentFlip:
    """Layer fault: the flips of one persistent map (any error model's) at rates ``(p01, p10)``.

    ``fmap`` is what an error model draws for the layer's stored bits
    (:meth:`bnn_tol.faults.registry.ErrorModel.draw`, e.g. a :class:`FaultMap`): its
    ``flips(stored, p01, p10)`` names the flat indices that flip given the stored bits.
    Forward: ``w' = negate(w, flips(w))`` on the binarized weight it is called with; backward:
    straight through. Fixed-point layers ask :meth:`indices` and flip their codes.
    """

    def __init__(self, fmap, p01: float, p10: float) -> None:
        self.fmap = fmap
        self.p01, self.p10 = p01, p10
        self.last_flips: Tensor | None = None

    def indices(self, stored: Tensor) -> Tensor:
        """Flat indices of the stored bits (``stored > 0``: a stored 1) that flip."""
        self.last_flips = self.fmap.flips(stored, self.p01, self.p10)
        return self.last_flips

    def __call__(self, wb: Tensor) -> Tensor:  # noqa: D102
        return negate(wb, self.indices(wb.detach()))

    def __repr__(self) -> str:
        return f"PersistentFlip({self.fmap!r}, p01={self.p01}, p10={self.p10})"
