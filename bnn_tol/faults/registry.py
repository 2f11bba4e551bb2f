"""Error models: a registry users can extend.

An **error model** says how the stored bits of a chip fail. Whatever the model, it answers in
the one currency of :mod:`bnn_tol.faults`: per stored tensor a set of flat indices of the bits
that read wrong, so every engine, :func:`~bnn_tol.faults.inject.inject`, the sweep driver and
the numpy deploy evaluate it the same way. Its interface has two steps:

* ``draw(site, seed, cap)``: the persistent state of chip ``seed`` for one stored tensor
  (:class:`Site`), answering every rate ``<= cap`` -- drawn once per chip and reused across
  rates (a sweep caches it, so nested models stay nested);
* that state's ``flips(stored, p01, p10)``: the int64 flat indices that flip at rates
  ``(p01, p10)`` given the stored bits (``stored > 0``: a stored 1; +-1 or 0/1 values, shape
  ``(n_bits,)`` or any shape with ``n_bits`` elements).

So a sweep row ``(p, map seed s)`` is replayed by ``inject(model, p, seed=s, error=name)``.
Models are chosen by name everywhere (``inject(..., error=)``, ``evaluate.sweep(..., error=)``,
``bnn-tol sweep --error``, study files ``[eval] error``); :func:`models` lists them. A model
that takes an argument is named ``name:argument`` (``chip:<profile.npz>``).

Adding one is a class and a decorator, in any module (a test, a notebook)::

    @register_error
    class Burst(ErrorModel):
        name = "burst"
        def draw(self, site, seed, cap):
            g = self.generator(site, seed)     # seeds.derive(seed, position[, stream])
            ...                                # return an object with .flips(stored, p01, p10)

Seeds. Chip ``seed``'s stored tensor at ``site`` draws from
``torch.Generator().manual_seed(layer_seed(seed, site.position, site.stream))``
(:func:`~bnn_tol.faults.maps.layer_seed`, i.e. :func:`~bnn_tol.faults.seeds.derive`); models
that need more streams derive them from that seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from bnn_tol.core.compiled import positions
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults.maps import layer_seed, rates, select_layers

__all__ = ["ErrorModel", "Site", "BitMap", "register_error", "models", "error_model",
           "model_sites", "draw_sites", "draw_maps", "map_nbytes", "check_rates", "DEFAULT",
           "STREAMS"]

#: The default error model (today's persistent nested Bernoulli maps).
DEFAULT = "bernoulli"

#: Stored tensors of a block by stream number (the third key of a site's seed): 0 its weights,
#: 1 its binary activations, 2 its folded BN thresholds, 3 its BN scale/shift words.
STREAMS = {"weights": 0, "activations": 1, "thresholds": 2, "bn": 3}


@dataclass(frozen=True)
class Site:
    """One stored tensor whose bits can fail.

    Attributes:
        name: the qualified name of the layer it belongs to (``"blocks.1.layer"``).
        position: that layer's position among all stored layers of the model (forward order).
        n_bits: number of stored bits (weights: ``numel * m``).
        stream: what it stores (:data:`STREAMS`; 0: the weights).
        address: weights: index of its first bit in the model's weight memory image (every
            stored layer's bits concatenated in forward order); ``-1`` for other streams.
    """

    name: str
    position: int
    n_bits: int
    stream: int = 0
    address: int = -1


class BitMap(Protocol):
    """What :meth:`ErrorModel.draw` returns: one chip's state of one stored tensor."""

    def flips(self, stored: Tensor, p01: float, p10: float) -> Tensor:
        """int64 ``(F,)`` unique flat indices of the bits that read wrong at ``(p01, p10)``."""
        ...


class ErrorModel:
    """Base class of the error models (see the module docstring).

    Class attributes:
        name: the registry name.
        argument: what follows ``name:`` for models that need one (e.g. ``"profile.npz"``);
            ``None``: the model takes none.
        streams: stored tensors it can corrupt (:data:`STREAMS` values); default weights only.
        symmetric: the model takes one rate ``p`` only (not ``(p01, p10)``).
    """

    name: ClassVar[str] = ""
    argument: ClassVar[str | None] = None
    streams: ClassVar[frozenset[int]] = frozenset({0})
    symmetric: ClassVar[bool] = False

    def draw(self, site: Site, seed: int, cap: float) -> BitMap:
        """Chip ``seed``'s state of ``site``, answering rates ``<= cap``."""
        raise NotImplementedError

    def check_rates(self, p01: float, p10: float) -> None:
        """Refuse rates this model cannot answer (one line)."""
        if self.symmetric and p01 != p10:
            raise InvalidArgument(f"error model {self.spec()!r} takes one rate p, not "
                                  f"(p01, p10) = ({p01}, {p10})")

    def check_stream(self, stream: int) -> None:
        """Refuse a stored tensor this model does not model (one line)."""
        if stream not in self.streams:
            what = next(k for k, v in STREAMS.items() if v == stream)
            can = [k for k, v in STREAMS.items() if v in self.streams]
            raise InvalidArgument(f"error model {self.spec()!r} corrupts {', '.join(can)} only,"
                                  f" not {what}")

    @staticmethod
    def site_seed(site: Site, seed: int) -> int:
        """The stream of chip ``seed`` at ``site``: ``layer_seed(seed, site.position,
        site.stream)`` (:func:`bnn_tol.faults.seeds.derive`)."""
        return layer_seed(seed, site.position, site.stream)

    @classmethod
    def generator(cls, site: Site, seed: int) -> torch.Generator:
        """A CPU ``torch.Generator`` on the stream of chip ``seed`` at ``site``
        (``manual_seed(site_seed(site, seed))``), for error models that draw with torch."""
        return torch.Generator().manual_seed(cls.site_seed(site, seed))

    def spec(self) -> str:
        """The name that selects this model (``name`` or ``name:argument``)."""
        return self.name

    def settings(self) -> dict[str, Any]:
        """What defines this model's maps (recorded in a sweep's sidecar; JSON-able)."""
        return {"name": self.spec()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"


_MODELS: dict[str, Callable[..., ErrorModel]] = {}


def register_error(cls: type[ErrorModel]) -> type[ErrorModel]:
    """Class decorator adding an error model to the registry under ``cls.name``.

    Raises:
        InvalidArgument: no name, or a name with ``:`` (it separates the argument).
    """
    if not cls.name or ":" in cls.name:
        raise InvalidArgument(f"{cls.__name__} needs a name without ':', got {cls.name!r}")
    _MODELS[cls.name] = cls
    return cls


def models() -> list[str]:
    """Names of the registered error models (``name:<argument>`` for those that take one),
    the default first."""
    names = sorted(_MODELS, key=lambda n: (n != DEFAULT, n))
    return [n if _MODELS[n].argument is None else f"{n}:<{_MODELS[n].argument}>"  # type: ignore
            for n in names]


def error_model(spec: str | ErrorModel | None = None) -> ErrorModel:
    """The error model named ``spec`` (``None``: :data:`DEFAULT`); an instance passes through.

    Raises:
        InvalidArgument: an unknown name (lists :func:`models`), a missing or unexpected
            argument.
    """
    if isinstance(spec, ErrorModel):
        return spec
    if spec is None:
        spec = DEFAULT
    if not isinstance(spec, str):
        raise InvalidArgument(f"an error model is a name, one of {', '.join(models())}; "
                              f"got {spec!r}")
    name, sep, arg = spec.partition(":")
    cls = _MODELS.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown error model {spec!r}; choose one of "
                              f"{', '.join(models())}")
    want = getattr(cls, "argument", None)
    if want is None and sep:
        raise InvalidArgument(f"error model {name!r} takes no argument, got {spec!r}")
    if want is not None and not arg:
        raise InvalidArgument(f"error model {name!r} needs an argument: {name}:<{want}>")
    return cls(arg) if want is not None else cls()


def model_sites(model: nn.Module, layers: Sequence[str | int] | str | None = None
                ) -> dict[str, Site]:
    """The weight sites of the selected stored layers (:func:`select_layers`), forward order.

    Positions and addresses count *every* stored layer, so selecting fewer layers does not move
    the others.
    """
    chosen = select_layers(model, layers)
    pos = positions(model)
    out, address = {}, 0
    for name, layer in select_layers(model).items():
        if name in chosen:
            out[name] = Site(name, pos[name], layer.n_stored_bits, 0, address)
        address += layer.n_stored_bits
    return out


def draw_sites(sites: dict[str, Site] | Sequence[Site], seed: int, cap: float, *,
               error: str | ErrorModel | None = None) -> dict[str, BitMap]:
    """Chip ``seed``'s maps of the given sites (``{site name: map}``), answering rates ``<= cap``.

    The one drawing entry point: :func:`draw_maps`, :func:`~bnn_tol.faults.inject.inject`,
    the sweep driver and the numpy deploy all draw through it.
    """
    seed = require_int(seed, "seed", minimum=0)
    if not 0.0 <= cap <= 1.0:
        raise InvalidArgument(f"cap {cap} is outside [0, 1]")
    em = error_model(error)
    items = sites.values() if isinstance(sites, dict) else sites
    out = {}
    for site in items:
        em.check_stream(site.stream)
        out[site.name] = em.draw(site, seed, cap)
    return out


def draw_maps(
    model: nn.Module,
    seed: int,
    cap: float,
    *,
    layers: Sequence[str | int] | str | None = None,
    error: str | ErrorModel | None = None,
) -> dict[str, BitMap]:
    """Maps of the stored weight bits of the selected layers for chip ``seed``.

    Bernoulli (the default): layer ``k`` (position among all binary/quantized layers) uses
    ``torch.Generator().manual_seed(layer_seed(seed, k))`` over its ``numel * m`` stored bits
    (:func:`~bnn_tol.faults.maps.fault_map`; ``m = 1`` for a BNN).

    Returns:
        ``{layer name: map}`` in forward order; ``map.flips(stored, p01, p10)`` gives the
        flat indices that flip.
    """
    return draw_sites(model_sites(model, layers), seed, cap, error=error)


def map_nbytes(fmap: object) -> int:
    """Bytes held by the tensors of a map (its ``nbytes`` if it defines one)."""
    n = getattr(fmap, "nbytes", None)
    if n is not None:
        return int(n() if callable(n) else n)
    return sum(t.numel() * t.element_size() for t in vars(fmap).values()
               if isinstance(t, Tensor))


def check_rates(error: ErrorModel, bers: Sequence) -> list[tuple[float, float]]:
    """``[(p01, p10)]`` of ``bers``, each refused with one line if ``error`` cannot answer it."""
    out = []
    for b in bers:
        p01, p10 = rates(b)
        error.check_rates(p01, p10)
        out.append((p01, p10))
    return out
