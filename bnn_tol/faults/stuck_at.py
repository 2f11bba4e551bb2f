"""``stuck-at``: memory cells stuck at a value (``stuck-at-0`` / ``stuck-at-1`` variants).

Each stored bit ``i`` of chip ``seed`` is stuck with probability ``p``; a stuck bit reads its
stuck value ``v_i`` whatever was written, so it flips only where the stored bit differs:

    stuck_i  iff  u_i < p,        flip_i  iff  stuck_i  and  stored_i != v_i,

with the chip's per-bit uniforms ``u_i`` -- the same ``u_i`` as the ``bernoulli`` map of that
chip (:func:`~bnn_tol.faults.maps.fault_map` on the site's stream), so the stuck cells at
``p`` are the cells the Bernoulli model flips at ``p`` (a weak cell is weak whatever its
failure mode) and they are nested across rates: the stuck bits at ``p`` are a subset of those
at ``p' > p``, with the same stuck values. The stuck value is ``v_i = 0`` or ``1`` with equal
chance for ``stuck-at`` (``v_i = 0`` for ``stuck-at-0``, ``1`` for ``stuck-at-1``), drawn
independently of the ``u_i`` and of the cap:

    v_i = bit (i mod 64) of word floor(i / 64) of W,
    W = torch.empty(ceil(n / 64), int64).random_(-2^63, None,
                                                generator=manual_seed(derive(s_site, 1)))

(``s_site = layer_seed(seed, position, stream)``, :func:`~bnn_tol.faults.seeds.derive`). So a
sweep row ``(p, map seed s)`` is replayed by ``inject(model, p, seed=s, error="stuck-at")``.
Expected flips: ``p / 2`` of all bits (``stuck-at``), ``p`` of the stored 1s and none of the
stored 0s (``stuck-at-0``), the reverse for ``stuck-at-1``. One rate ``p`` only (not
``(p01, p10)``); weights, BN thresholds and BN words (not activations: their stored value
changes per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bnn_tol.core.kernels import serial
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults import draw
from bnn_tol.faults.maps import fault_map, layer_seed
from bnn_tol.faults.registry import STREAMS, ErrorModel, Site, register_error
from bnn_tol.faults.seeds import derive

__all__ = ["StuckMap", "StuckAt", "StuckAt0", "StuckAt1", "stuck_values"]


@dataclass(frozen=True)
class StuckMap:
    """One chip's stuck cells of one stored tensor, materialized below a cap.

    Attributes:
        numel: stored bits ``n``.
        idx: int64 ``(K,)`` the bits with ``u_i < cap`` (CPU).
        u: float64 ``(K,)`` their uniforms; the bit is stuck at rate ``p`` iff ``u_i < p``.
        value: bool ``(K,)`` their stuck values (True: stuck at 1).
        cap: the largest rate the map answers.
    """

    numel: int
    idx: Tensor
    u: Tensor
    value: Tensor
    cap: float

    def stuck(self, p: float) -> tuple[Tensor, Tensor]:
        """``(idx, value)`` of the bits stuck at rate ``p`` (``u_i < p``)."""
        if p > self.cap:
            raise InvalidArgument(f"this stuck-at map was drawn up to p={self.cap}; it cannot "
                                  f"answer p={p}: draw it with a larger cap")
        keep = self.u < p
        return self.idx[keep], self.value[keep]

    def flips(self, stored: Tensor, p01: float, p10: float) -> Tensor:
        """Flat indices of the stuck bits whose stored value (``stored > 0``: 1) differs from
        the stuck value; ``p01 == p10`` is the stuck rate.

        Returns:
            int64 ``(F,)`` unique flat indices on ``stored.device``.
        """
        if p01 != p10:
            raise InvalidArgument(f"stuck-at takes one rate p, not (p01, p10) = ({p01}, {p10})")
        with serial():
            idx, value = self.stuck(p01)
            idx, value = idx.to(stored.device), value.to(stored.device)
            return idx[(stored.reshape(-1)[idx] > 0) != value]


def stuck_values(n: int, idx: Tensor, seed: int) -> Tensor:
    """Stuck values (bool) of the bits ``idx`` of a tensor of ``n`` bits: bit ``i mod 64`` of
    word ``i // 64`` of ``ceil(n / 64)`` random int64 words of the stream ``seed``
    (:func:`bnn_tol.faults.draw.random64`, torch's ``random_(-2**63, None)``)."""
    words = torch.from_numpy(draw.random64(draw.generator(seed), math.ceil(n / 64)))
    return ((words[idx // 64] >> (idx % 64)) & 1).bool()


@register_error
class StuckAt(ErrorModel):
    """Bits stuck at 0 or 1 with equal chance at rate ``p`` (module docstring)."""

    name = "stuck-at"
    symmetric = True
    streams = frozenset(v for k, v in STREAMS.items() if k != "activations")
    #: The stuck value of every stuck bit (0 or 1); ``None``: a fair coin per bit.
    value: int | None = None

    def draw(self, site: Site, seed: int, cap: float) -> StuckMap:
        """The chip's uniforms of ``site`` below ``cap`` and their stuck values."""
        fm = fault_map(site.n_bits, cap, seed=self.site_seed(site, seed))
        if self.value is None:
            s = derive(layer_seed(seed, site.position, site.stream), 1)
            value = stuck_values(site.n_bits, fm.idx, s)
        else:
            value = torch.full((fm.idx.numel(),), bool(self.value))
        return StuckMap(site.n_bits, fm.idx, fm.u, value, fm.cap)


@register_error
class StuckAt0(StuckAt):
    """Bits stuck at 0 at rate ``p``: stored 1s flip (``p`` of them), stored 0s never."""

    name = "stuck-at-0"
    value = 0


@register_error
class StuckAt1(StuckAt):
    """Bits stuck at 1 at rate ``p``: stored 0s flip (``p`` of them), stored 1s never."""

    name = "stuck-at-1"
    value = 1
