"""The one fault path: how a set of stored-bit flips reaches a model.

Every error model (:mod:`bnn_tol.faults.registry`) yields the same thing, a **flip set**
``{layer name: int64 flat indices into layer.stored_bits()}``; this module applies it. The
flip of a stored bit has one implementation per representation that needs its own:

* +-1 values (a sign-coded weight, the +-1 stored-bit convention ``2 bit - 1``) and bool bits
  in torch: :func:`negate` (out of place, gradient straight through) and :func:`negate_`
  (in place; bool tensors on CPU use the bulk numba kernel :func:`bnn_tol.core.kernels.negate_at`
  for large index sets);
* ``m``-bit integer codes: :func:`bnn_tol.core.codec.flip_bits` (the codec's bit layout,
  bit ``i = j m + b`` is bit ``b`` of word ``j``), what fixed-point layers, BN thresholds and
  parameter words use;
* packed ``uint64`` words: the packed engine's and the numpy deploy's own concern (XOR of the
  same indices in their layouts).

:func:`apply` sets each layer's ``fault`` to the fixed flips of a flip set for the duration of a
``with`` block (:func:`attach` does it for any fault objects), restoring the previous faults on
exit, also when the block raises. The weights themselves are never written.

>>> with apply(model, {"blocks.1.layer": torch.tensor([0, 17])}):  # doctest: +SKIP
...     acc = accuracy(model, test)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from bnn_tol.core import kernels
from bnn_tol.core.codec import _StraightThrough
from bnn_tol.core.compiled import stored_layers
from bnn_tol.exceptions import InvalidArgument

__all__ = ["FlipSet", "negate", "negate_", "FixedFlips", "attach", "apply", "check_flips",
           "BULK_FROM"]

#: ``{layer name: int64 (F,) unique flat indices into layer.stored_bits()}``.
FlipSet = dict[str, Tensor]

#: Index sets of at least this many bits go through the numba kernel (bool tensors on CPU).
BULK_FROM = 1 << 15


def negate_(values: Tensor, idx: Tensor) -> Tensor:
    """Flip the stored bits at flat indices ``idx`` of ``values`` in place; returns ``values``.

    ``values`` is a contiguous tensor in the +-1 convention (``v_i -> -v_i``; any numeric
    dtype) or of bool bits (``b_i -> not b_i``); ``idx`` int64 ``(F,)`` unique flat indices,
    or a bool mask of ``values``' shape (dense draws). Large bool flips on CPU run in the numba
    kernel :func:`~bnn_tol.core.kernels.negate_at` (same result).
    """
    flat = values.view(-1)
    if idx.dtype == torch.bool:
        mask = idx.reshape(-1).to(flat.device)
        if flat.dtype == torch.bool:
            flat.bitwise_xor_(mask)
        else:
            flat.copy_(torch.where(mask, -flat, flat))
        return values
    if idx.numel() == 0:
        return values
    idx = idx.to(flat.device)
    if flat.dtype == torch.bool:
        if idx.numel() >= BULK_FROM and flat.device.type == "cpu" and kernels.AVAILABLE:
            kernels.negate_at(flat.numpy(), idx.numpy())
        else:
            flat.scatter_(0, idx, flat.gather(0, idx).logical_not_())
        return values
    flat[idx] = -flat[idx]
    return values


def negate(values: Tensor, idx: Tensor) -> Tensor:
    """``values`` (+-1 convention, any shape) with the entries at flat ``idx`` (int64, or a
    bool mask of ``values``' shape) negated.

    A new tensor (``values`` is not written); forward exactly the flipped values, backward the
    gradient passes straight through to ``values`` (as if the flips were not there).
    """
    if idx.dtype == torch.bool:
        v = values.detach()
        flipped = torch.where(idx.view_as(v), -v, v)
    elif idx.numel() == 0:
        return values
    else:
        flipped = negate_(values.detach().reshape(-1).clone(), idx).view_as(values)
    return _StraightThrough.apply(values, flipped) if values.requires_grad else flipped


class FixedFlips:
    """Layer fault: the fixed stored-bit flips ``idx`` (flat indices into ``stored_bits()``).

    Sign codec: ``fault(w_b) = negate(w_b, idx)``; fixed point: the layer asks
    :meth:`indices` and flips its codes (:meth:`~bnn_tol.core.layers.BinaryLayer.deployed_weight`).
    """

    def __init__(self, idx: Tensor) -> None:
        self.idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        self.last_flips = self.idx

    def indices(self, stored: Tensor) -> Tensor:
        """The flipped indices (the same whatever is stored)."""
        return self.idx.to(stored.device)

    def __call__(self, wb: Tensor) -> Tensor:  # noqa: D102
        return negate(wb, self.idx)

    def __repr__(self) -> str:
        return f"FixedFlips({self.idx.numel()} bits)"


@contextlib.contextmanager
def attach(layers: Mapping[str, nn.Module], faults: Mapping[str, object]) -> Iterator[None]:
    """Context manager: ``layers[n].fault = faults[n]`` for every ``n`` in ``faults``; the
    previous faults of those layers come back on exit (also when the block raises)."""
    saved = {n: layers[n].fault for n in faults}
    try:
        for n, f in faults.items():
            layers[n].fault = f
        yield
    finally:
        for n, f in saved.items():
            layers[n].fault = f


@contextlib.contextmanager
def apply(model: nn.Module, flips: Mapping[str, Tensor]) -> Iterator[FlipSet]:
    """Context manager: run ``model`` with the stored bits of ``flips`` flipped.

    Every stored layer of ``model`` gets a :class:`FixedFlips` fault (layers absent from
    ``flips`` get none flipped: a flip set is the whole truth about the model's errors); the
    previous faults come back on exit.

    Args:
        model: a module with binary / quantized layers.
        flips: ``{layer name: int64 flat indices into layer.stored_bits()}`` (any int
            sequence; unique indices).

    Yields:
        The flip set as int64 tensors, keyed by layer name.

    Raises:
        InvalidArgument: an unknown layer name or an index outside a layer's stored bits.
    """
    layers = stored_layers(model)
    checked = check_flips(layers, flips)
    full = {n: checked.get(n, torch.empty(0, dtype=torch.int64)) for n in layers}
    with attach(layers, {n: FixedFlips(i) for n, i in full.items()}):
        yield checked


def check_flips(layers: Mapping[str, nn.Module], flips: Mapping[str, object]) -> FlipSet:
    """``flips`` as int64 tensors, every name a layer of ``layers`` and every index inside its
    ``n_stored_bits``.

    Raises:
        InvalidArgument: names the unknown layer or the layer whose index is out of range.
    """
    out: FlipSet = {}
    for name, idx in flips.items():
        if name not in layers:
            raise InvalidArgument(f"unknown layer {name!r}; layers: {', '.join(layers)}")
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        n_bits = layers[name].n_stored_bits
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_bits):
            raise InvalidArgument(f"{name}: a flip index is outside its {n_bits} stored bits")
        out[name] = idx
    return out
