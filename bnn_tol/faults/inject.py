"""Injection: run a model on one chip at one bit error rate, under any error model.

``inject`` is the replay of a sweep row: the maps it draws are those of
:func:`~bnn_tol.faults.registry.draw_sites` for chip ``seed`` -- the same the sweep driver
draws -- so ``inject(model, p, seed=row.seed, error=...)`` + ``accuracy`` gives the row's
accuracy exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from bnn_tol.core.compiled import compile_model
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults import params
from bnn_tol.faults.apply import attach, negate
from bnn_tol.faults.maps import (
    BER,
    FaultMap,
    PersistentFlip,
    TransientFlip,
    layer_seed,
    rates,
    select_layers,
)
from bnn_tol.faults.protect import check_protection, protect_maps
from bnn_tol.faults.registry import (
    STREAMS,
    ErrorModel,
    Site,
    draw_sites,
    error_model,
    model_sites,
)

__all__ = ["inject"]


@contextlib.contextmanager
def inject(
    model: nn.Module,
    ber: BER,
    seed: int = 0,
    *,
    layers: Sequence[str | int] | str | None = None,
    mode: str = "persistent",
    targets: Sequence[str] | str = ("weights",),
    threshold_bits: int | None = None,
    error: str | ErrorModel | None = None,
    protect: Mapping[str, object] | None = None,
) -> Iterator[dict[str, object]]:
    """Context manager: run ``model`` on chip ``seed`` at bit error rate ``ber``.

    ``mode="persistent"``: the stored bits of each selected layer fail as the error model
    ``error`` says for chip ``seed`` (default ``"bernoulli"``: bit ``i`` of binary layer ``k``
    flips iff ``u_i < p10`` (stored +1) or ``u_i < p01`` (stored -1), with the ``u_i`` of
    :func:`~bnn_tol.faults.registry.draw_maps`) -- the same map on every run, nested across
    BERs, and exactly the map of the sweep row with this ``seed`` and error model.
    ``mode="transient"`` (Bernoulli only): a fresh draw on every forward pass
    (:class:`~bnn_tol.faults.maps.TransientFlip`, what bit flip training uses), seeded by
    ``layer_seed(seed, k)``.

    The weights themselves are never modified: the context sets each selected layer's
    ``fault`` and restores the previous one on exit, also when the block raises.

    Args:
        model: a module with binary layers (a :class:`~bnn_tol.models.BNN` for the activation,
            threshold and BN targets).
        ber: ``p`` or ``(p01, p10)``.
        seed: the chip.
        layers: see :func:`~bnn_tol.faults.maps.select_layers` (``None``: all, ``"hidden"``:
            all but first/last).
        mode: ``"persistent"`` or ``"transient"``.
        targets: any of ``"weights"``, ``"activations"`` (binary outputs of the selected
            layers' blocks; a persistent map over the per-sample activation buffer: the same
            positions flip on every sample), ``"thresholds[:m]"`` / ``"bn[:m]"`` (the stored
            BatchNorm of the selected blocks as ``m``-bit words, :mod:`bnn_tol.faults.params`).
            Activations/thresholds/bn are persistent only.
        threshold_bits: width of the threshold words (as ``"thresholds:m"``).
        error: an error model name of :func:`~bnn_tol.faults.registry.models` (or an
            instance); default ``"bernoulli"``.
        protect: stored weight bits kept error-free, ``{layer name: bool mask or bit
            indices}`` (:mod:`bnn_tol.faults.protect`); persistent weight errors only.

    Yields:
        ``{layer name: fault}`` of the weight faults (``PersistentFlip`` / ``TransientFlip``).

    Raises:
        InvalidArgument: bad rates, unknown layer names, targets or error models, a target the
            error model does not model, no binary layers.
    """
    if ber is None:
        raise InvalidArgument("inject needs a bit error rate: ber=p or ber=(p01, p10), got None")
    p01, p10 = rates(ber)
    seed = require_int(seed, "seed", minimum=0)
    if mode not in ("persistent", "transient"):
        raise InvalidArgument(f"mode must be 'persistent' or 'transient', got {mode!r}")
    want = params.parse_targets(targets)
    if threshold_bits is not None and "thresholds" in want and want["thresholds"] is None:
        want["thresholds"] = threshold_bits
    em = error_model(error)
    em.check_rates(p01, p10)
    for kind in want:
        em.check_stream(STREAMS[kind])
    if mode == "transient" and em.spec() != "bernoulli":
        raise InvalidArgument("mode='transient' draws fresh Bernoulli flips on every pass; "
                              f"error model {em.spec()!r} is persistent only")
    chosen = select_layers(model, layers)
    shield = check_protection(model, protect)
    if shield and (mode != "persistent" or set(want) != {"weights"}):
        raise InvalidArgument("protect= keeps stored weight bits error-free: persistent "
                              "weight errors only")
    cap = max(p01, p10)
    faults: dict[str, object] = {}
    if "weights" in want:
        sites = model_sites(model, layers)
        if mode == "persistent":
            maps = protect_maps(draw_sites(sites, seed, cap, error=em), shield)
            faults = {n: PersistentFlip(maps[n], p01, p10) for n in sites}
        else:
            for n, site in sites.items():
                dev = chosen[n].weight.device
                tgen = torch.Generator(device=dev).manual_seed(layer_seed(seed, site.position))
                faults[n] = TransientFlip((p01, p10), tgen)
    handles: list = []
    try:
        with attach(chosen, faults):
            if set(want) - {"weights"}:
                if mode != "persistent":
                    raise InvalidArgument("activation/threshold/bn errors are persistent only")
                handles += _hook_blocks(model, chosen, seed, p01, p10, want, em)
            yield faults
    finally:
        for h in handles:
            h.remove()


def _hook_blocks(model, chosen, seed, p01, p10, want: dict, em: ErrorModel) -> list:
    """Forward hooks of the activation / threshold / BN targets of the selected blocks."""
    if getattr(model, "blocks", None) is None:
        raise InvalidArgument("activation/threshold/bn errors need a bnn_tol BNN (model.blocks)")
    handles = []
    cap = max(p01, p10)
    try:
        for st in compile_model(model).stages:
            if st.name not in chosen:
                continue
            block, name = st.block, st.name
            if "bn" in want:
                site = params.bn_site(block, name, st.position, want["bn"])
                fmap = draw_sites([site], seed, cap, error=em)[name]
                hook = params.bn_hook(block, name, fmap, p01, p10, want["bn"])[0]
                handles.append(block.bn.register_forward_hook(hook))
            if not block.binary_output or not set(want) & {"thresholds", "activations"}:
                continue
            if getattr(block, "activation", "sign") != "sign":
                raise InvalidArgument(f"{name}: activation/threshold errors need sign "
                                      "activations (binary outputs and a BN threshold); this "
                                      f"block uses {block.activation}")
            if "thresholds" in want:
                site = params.threshold_site(st, want["thresholds"])
                fmap = draw_sites([site], seed, cap, error=em)[name]
                hook = params.threshold_hook(st, fmap, p01, p10, want["thresholds"])[0]
                handles.append(block.bn.register_forward_hook(hook))
            if "activations" in want:
                site = Site(name, st.position, _out_numel(model, st), STREAMS["activations"])
                fmap = draw_sites([site], seed, cap, error=em)[name]
                if not isinstance(fmap, FaultMap):
                    raise InvalidArgument(f"activation errors need per-bit uniforms (a FaultMap);"
                                          f" error model {em.spec()!r} draws {type(fmap).__name__}")
                handles.append(block.register_forward_hook(_activation_hook(fmap, p01, p10)))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


def _activation_hook(fmap: FaultMap, p01: float, p10: float):
    """Forward hook negating the block outputs at the map's positions (the same positions on
    every sample: the activation buffer is one stored tensor)."""
    def hook(module: nn.Module, inputs, out: Tensor) -> Tensor:
        flat = out.reshape(out.shape[0], -1)
        if p01 == p10:
            mask = torch.zeros(flat.shape[1], dtype=torch.bool, device=out.device)
            mask[fmap.flips(flat[0], p01, p10)] = True
            mask = mask.expand_as(flat)
        else:  # asymmetric: the stored value differs per sample
            u = torch.full((fmap.numel,), 2.0, dtype=torch.float64, device=out.device)
            u[fmap.idx.to(out.device)] = fmap.u.to(out.device)
            mask = u[None, :] < torch.where(flat > 0, p10, p01)
        return negate(flat, mask).view_as(out)

    return hook


def _out_numel(model, st) -> int:
    """Values of one sample's block output: the compiled geometry, else a probe."""
    if st.out_shape is not None:
        return math.prod(st.out_shape)
    k = st.index
    x = torch.zeros(1, *model.in_shape, device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for block in model.blocks[: k + 1]:
                x = block(x)
    finally:
        model.train(was)
    return int(x[0].numel())
