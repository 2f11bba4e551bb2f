"""Protection: stored bits kept in reliable memory, never hit by the error model.

A **protection** is ``{layer name: bool (n_stored_bits,)}`` over a model's memory image
(``True``: the bit sits in reliable memory). It is an option of the fault path: every map an
error model draws is wrapped (:class:`ProtectedMap`) so that a protected bit never flips, in
:func:`~bnn_tol.faults.inject.inject` and :func:`bnn_tol.evaluate.sweep` alike (``protect=``);
the chip is the same, only the protected cells are spared, so a protected sweep row replays
with ``inject(model, ber, seed=row.map_seed, protect=...)`` and at 0 % protection equals the
unprotected row.

Units of protection (:func:`units`): a **neuron** is an output row of a stored layer (a conv
output channel) -- all its incoming weights, i.e. the stored bits ``[o F m, (o + 1) F m)`` of
layer ``L`` (``F`` the fan-in, ``m`` bits per weight); a **weight** is its ``m`` stored bits
``[j m, (j + 1) m)``. :func:`protection` protects units in a given order until a fraction of
all stored bits is reached, so rankings compare at equal memory cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bnn_tol.core.compiled import stored_layers
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.registry import map_nbytes

__all__ = ["Protection", "ProtectedMap", "check_protection", "protect_maps", "digest",
           "Unit", "units", "protection", "protected_fraction", "UNITS"]

#: ``{layer name: bool (n_stored_bits,)}``, ``True`` = protected.
Protection = dict[str, Tensor]

#: The units of protection.
UNITS = ("neuron", "weight")


def check_protection(model: nn.Module, protect: Mapping[str, object] | None) -> Protection:
    """``protect`` as bool masks over each named layer's stored bits (CPU).

    Each value is a bool mask of ``n_stored_bits`` entries or int64 flat indices into
    ``layer.stored_bits()`` (protected bits). Layers not named are unprotected.

    Raises:
        InvalidArgument: an unknown layer, a mask of another length, an index out of range.
    """
    if not protect:
        return {}
    layers = stored_layers(model)
    out: Protection = {}
    for name, val in protect.items():
        if name not in layers:
            raise InvalidArgument(f"protect: unknown layer {name!r}; layers: {', '.join(layers)}")
        n = layers[name].n_stored_bits
        t = torch.as_tensor(val).detach().cpu().reshape(-1)
        if t.dtype == torch.bool:
            if t.numel() != n:
                raise InvalidArgument(f"protect: the mask of {name} has {t.numel()} entries, "
                                      f"its memory image {n} bits")
            out[name] = t.clone()
            continue
        if t.is_floating_point() or t.is_complex():
            raise InvalidArgument(f"protect: {name} needs a bool mask or integer bit indices, "
                                  f"got {t.dtype}")
        t = t.to(torch.int64)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise InvalidArgument(f"protect: {name}: a bit index is outside its {n} stored bits")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[t] = True
        out[name] = mask
    return out


@dataclass(frozen=True)
class ProtectedMap:
    """A map whose protected bits never flip: ``flips = base.flips(...)`` minus the bits with
    ``mask[i]`` (``mask`` bool ``(n_bits,)`` on CPU)."""

    base: object
    mask: Tensor

    def flips(self, stored: Tensor, p01: float, p10: float) -> Tensor:
        """The base map's flips at ``(p01, p10)`` without the protected bits (same order)."""
        idx = self.base.flips(stored, p01, p10)
        if idx.numel() == 0:
            return idx
        keep = ~self.mask[idx.cpu()]
        return idx[keep.to(idx.device)]

    def nbytes(self) -> int:
        """Bytes held (the base map's and the mask)."""
        return map_nbytes(self.base) + self.mask.numel()


def protect_maps(maps: Mapping[str, object], protect: Protection) -> dict[str, object]:
    """``maps`` with the protected layers' maps wrapped in :class:`ProtectedMap`."""
    return {n: ProtectedMap(m, protect[n]) if n in protect else m for n, m in maps.items()}


def digest(protect: Protection) -> str | None:
    """sha256 over the protected layers' names and masks (``None`` without protection): what
    a sweep's sidecar records, so a resume never mixes protections."""
    if not protect:
        return None
    h = hashlib.sha256()
    for name in sorted(protect):
        h.update(f"{name}|".encode())
        h.update(np.packbits(protect[name].numpy()).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Unit:
    """One unit of protection: stored bits ``[start, stop)`` of layer ``layer``; ``index`` the
    neuron (output row) or weight (flat) index in that layer."""

    layer: str
    index: int
    start: int
    stop: int


def units(model: nn.Module, unit: str = "neuron") -> list[Unit]:
    """Every unit of every stored layer, in forward order (layer, then index).

    Raises:
        InvalidArgument: an unknown unit.
    """
    if unit not in UNITS:
        raise InvalidArgument(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    out = []
    for name, layer in stored_layers(model).items():
        m = int(layer.codec.bits_per_weight)
        if unit == "neuron":
            width = int(layer.fan_in) * m
            rows = int(layer.weight.shape[0])
            out += [Unit(name, o, o * width, (o + 1) * width) for o in range(rows)]
        else:
            out += [Unit(name, j, j * m, (j + 1) * m) for j in range(layer.weight.numel())]
    return out


def protection(model: nn.Module, order: Sequence[Unit], fraction: float) -> Protection:
    """Protect the units of ``order`` from the first on while the protected bits stay within
    ``fraction`` of all stored bits (the longest such prefix; ``fraction = 1`` protects all).

    Raises:
        InvalidArgument: ``fraction`` outside ``[0, 1]``.
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise InvalidArgument(f"a protected fraction is in [0, 1], got {fraction!r}")
    layers = stored_layers(model)
    total = sum(lay.n_stored_bits for lay in layers.values())
    budget = float(fraction) * total
    masks = {n: torch.zeros(lay.n_stored_bits, dtype=torch.bool) for n, lay in layers.items()}
    used = 0
    for u in order:
        size = u.stop - u.start
        if used + size > budget:
            break
        masks[u.layer][u.start:u.stop] = True
        used += size
    return {n: m for n, m in masks.items() if bool(m.any())}


def protected_fraction(model: nn.Module, protect: Protection) -> float:
    """Protected stored bits / all stored bits of ``model``."""
    total = sum(lay.n_stored_bits for lay in stored_layers(model).values())
    return sum(int(m.sum()) for m in protect.values()) / total if total else 0.0
