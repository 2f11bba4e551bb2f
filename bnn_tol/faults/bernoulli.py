"""``bernoulli``: independent, persistent, nested bit flips -- the default error model.

Every stored bit ``i`` of chip ``seed`` gets one uniform ``u_i ~ U(0, 1)``
(:func:`~bnn_tol.faults.maps.fault_map` on the site's stream) and flips iff

    u_i < p10   (stored 1, weight +1 -> -1)        u_i < p01   (stored 0, weight -1 -> +1),

so flips at a lower rate are a subset of those at a higher one (the same chip at a lower
voltage), and ``p01 = p10 = p`` is the symmetric BER. The state of a site is a
:class:`~bnn_tol.faults.maps.FaultMap`. Every stored tensor can carry these errors (weights,
activations, BN thresholds, BN words).
"""

from __future__ import annotations

from bnn_tol.faults.maps import FaultMap, fault_map
from bnn_tol.faults.registry import STREAMS, ErrorModel, Site, register_error

__all__ = ["Bernoulli"]


@register_error
class Bernoulli(ErrorModel):
    """Persistent nested Bernoulli flips at ``p`` or ``(p01, p10)`` (see the module)."""

    name = "bernoulli"
    streams = frozenset(STREAMS.values())

    def draw(self, site: Site, seed: int, cap: float) -> FaultMap:
        """``fault_map(site.n_bits, cap)`` on the site's stream."""
        return fault_map(site.n_bits, cap, seed=self.site_seed(site, seed))
