"""The engine interface, its registry and what the +-1 engines share.

An engine evaluates one model on one dataset under many flip sets, exactly: for every flip
set it returns the accuracy of ``model(x).argmax(1)`` of the faulty model, bit for bit. A flip
set is ``{layer name: int64 flat indices into layer.stored_bits()}`` (the one currency of
:mod:`bnn_tol.faults`), the same keys for every engine.

The registry is the single source of engine names: :func:`engines` lists them in ``"auto"``
preference order, the CLI and study files take their choices from it, and
:func:`pick_engine` chooses (``engine="auto"``: the first registered engine, by
:attr:`Engine.rank`, that supports the model and is :meth:`Engine.preferred` on this machine).
Adding an engine is one module with a class decorated by :func:`register_engine`, imported
in :mod:`bnn_tol.engines`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.compiled import CompiledModel, UnsupportedModel, check_bnn, compile_model
from bnn_tol.core.graph import GraphBNN
from bnn_tol.core.inference import resolve_device
from bnn_tol.core.layers import apply_folded
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.apply import FlipSet
from bnn_tol.faults.maps import select_layers
from bnn_tol.faults.protect import Protection
from bnn_tol.faults.registry import ErrorModel, error_model

__all__ = ["Engine", "SignEngine", "register_engine", "engines", "pick_engine",
           "MEMORY_BUDGET", "FlipSet", "CHAINS_ONLY"]

#: Rough upper bound (bytes) on the activations held per data chunk; sets the default chunk size.
MEMORY_BUDGET = 2**28

#: Most flip sets of one map :meth:`Engine.accuracies_of_map` passes to one
#: :meth:`Engine.evaluate` (each holds its faulty layers' weights while the group runs).
MAP_GROUP = 16

#: Why an engine built on compiled chains of blocks refuses a residual graph.
CHAINS_ONLY = ("it evaluates chains of blocks, not a residual graph (bnn_tol.core.graph); "
               "'fp32' and 'reference' sweep graphs")


class Engine:
    """Base of the sweep engines. Every engine is exact: for each flip set it returns the
    accuracy of ``model(x).argmax(1)`` of the faulty model, bit for bit.

    Class attributes declare what an engine supports; :func:`pick_engine` asks each registered
    engine, in order of :attr:`rank` (fastest first), whether it supports a model.

    Attributes:
        name: the ``engine=`` value.
        rank: order of preference for ``"auto"`` (lower first).
        targets: fault targets it evaluates (``weights`` / ``activations`` / ``thresholds``).
    """

    name = ""
    rank = 100
    targets: frozenset = frozenset({"weights"})
    #: The sweep evaluates one fault map at all its BERs in a row (:meth:`accuracies_of_map`)
    #: instead of all maps at one BER: for engines whose cost falls when consecutive flip sets
    #: are nested (the packed engine's first linear layer).
    map_major = False

    @classmethod
    def unsupported(cls, cm: CompiledModel | GraphBNN | None, device: torch.device,
                    targets: tuple) -> str | None:
        """Why this engine cannot evaluate the compiled model ``cm`` (``None``: it can;
        ``cm`` is the :class:`~bnn_tol.core.graph.GraphBNN` itself for a residual graph and
        ``None`` for any other module that is not a block model)."""
        if not {t.partition(":")[0] for t in targets} <= cls.targets:
            return f"it evaluates {sorted(cls.targets)} errors only"
        return None

    @classmethod
    def preferred(cls, cm: CompiledModel | GraphBNN, device: torch.device) -> bool:
        """Whether ``"auto"`` should pick it when supported (e.g. int8 only with VNNI)."""
        return True

    @classmethod
    def for_model(cls, cm: CompiledModel | GraphBNN | None) -> type[Engine]:
        """The class that evaluates ``cm`` under this engine's name (itself; the ``fp32``
        engine has its own class for residual graphs)."""
        return cls

    def __init__(self, model: nn.Module, data: BNNDataset, *, layers, device: torch.device,
                 batch_size: int | None, maps_per_step: int | None, targets: tuple,
                 error: str | ErrorModel | None = None, protect: Protection | None = None
                 ) -> None:
        self.model, self.data, self.layers, self.device = model, data, layers, device
        self.targets, self.labels = targets, data.labels
        self.error = error_model(error)
        self.protect = protect or {}  # engines given maps get them protected already
        self.chosen = select_layers(model, layers)
        self.batch_size = batch_size or 2048
        self.g = maps_per_step or 1
        self._clean: float | None = None

    def clean_accuracy(self) -> float:
        """Accuracy without errors (cached)."""
        if self._clean is None:
            self._clean = self.evaluate([{}])[0]
        return self._clean

    def flips(self, fmap: dict, p01: float, p10: float) -> FlipSet:
        """The flip set of chip ``fmap`` (``{layer name: map}`` of any error model,
        :func:`bnn_tol.faults.draw_maps`) at ``(p01, p10)``, for the layers this engine
        evaluates with errors."""
        raise NotImplementedError

    def evaluate(self, flips: list[FlipSet]) -> list[float]:
        """Accuracies of the given flip sets (``[{}]``: clean)."""
        raise NotImplementedError

    def accuracies(self, maps, seeds, p01, p10, bar) -> list[float]:
        """Accuracies of fault maps ``maps`` (an iterable, consumed in order; or seeds, for
        engines that draw them) at one BER; maps that flip nothing reuse the clean accuracy.
        At most ``maps_per_step`` maps and their flips are held at a time."""
        return self._stream((self.flips(fm, p01, p10) for fm in maps), self.g, bar)

    def accuracies_of_map(self, fmap, rates: list[tuple[float, float]], bar) -> list[float]:
        """Accuracies of one chip ``fmap`` at each ``(p01, p10)`` of ``rates`` (results in that
        order), evaluated in order of rising ``p01 + p10`` in groups of up to
        :data:`MAP_GROUP` flip sets: for a :attr:`map_major` engine, consecutive sets of one
        persistent map differ by the bits that start to flip between the two rates."""
        order = sorted(range(len(rates)), key=lambda i: sum(rates[i]))
        accs = self._stream((self.flips(fmap, *rates[i]) for i in order), MAP_GROUP, bar)
        out = [0.0] * len(rates)
        for i, a in zip(order, accs, strict=True):
            out[i] = a
        return out

    def _stream(self, flip_sets, size: int, bar) -> list[float]:
        """Accuracies of an iterable of flip sets, :meth:`evaluate` d ``size`` at a time; sets
        that flip nothing reuse the clean accuracy."""
        results: list[float | None] = []
        group: list[tuple[int, FlipSet]] = []

        def flush() -> None:
            for (i, _), a in zip(group, self.evaluate([f for _, f in group]), strict=True):
                results[i] = a
            bar.update(len(group))
            group.clear()

        for i, f in enumerate(flip_sets):
            if all(v.numel() == 0 for v in f.values()):
                results.append(self.clean_accuracy())
                bar.update(1)
                continue
            results.append(None)
            group.append((i, f))
            if len(group) == size:
                flush()
        if group:
            flush()
        return results  # type: ignore[return-value]


_ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator adding a sweep engine to the registry under ``cls.name``."""
    if not cls.name:
        raise InvalidArgument(f"{cls.__name__} has no name")
    _ENGINES[cls.name] = cls
    return cls


def engines() -> list[str]:
    """Names of the registered engines, in ``"auto"`` preference order."""
    return [c.name for c in sorted(_ENGINES.values(), key=lambda c: c.rank)]


def engine_class(name: str) -> type[Engine]:
    """The registered engine ``name``.

    Raises:
        InvalidArgument: an unknown name (lists the registered ones).
    """
    if name not in _ENGINES:
        raise InvalidArgument(f"engine must be auto or one of {', '.join(engines())}, "
                              f"got {name!r}")
    return _ENGINES[name]


def pick_engine(model: nn.Module, *, engine: str = "auto",
                device: str | torch.device = "auto",
                targets: tuple[str, ...] | str = ("weights",)) -> type[Engine]:
    """The engine that evaluates ``model``: the named one (refused with the reason when it
    cannot), or for ``"auto"`` the first supported and preferred engine in rank order (its
    :meth:`Engine.for_model` class: residual graphs get the fp32 engine's graph class).

    Raises:
        InvalidArgument: an unknown engine name.
        UnsupportedModel: the named engine cannot evaluate this model (says why).
    """
    if engine != "auto":
        engine_class(engine)
    dev = resolve_device(device)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    try:
        cm = compile_model(model)
    except UnsupportedModel:
        # a residual graph (its own view), or not a block model: only the reference engine
        # (inject + forward) applies
        cm = model if isinstance(model, GraphBNN) else None
    if engine != "auto":
        cls = _ENGINES[engine]
        why = cls.unsupported(cm, dev, targets)
        if why:
            raise UnsupportedModel(f"engine={engine!r} cannot evaluate this model: {why}")
        return cls.for_model(cm)
    for cls in sorted(_ENGINES.values(), key=lambda c: c.rank):
        if cls.unsupported(cm, dev, targets) is None and cls.preferred(cm, dev):
            return cls.for_model(cm)
    raise UnsupportedModel("no sweep engine supports this model")  # reference supports all


class SignEngine(Engine):
    """Shared plumbing of the +-1 engines: the compiled stages (their ``wb`` and ``folded``),
    the output BatchNorm on the engine's device, the clean prefix per data chunk."""

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        if isinstance(cm, GraphBNN):
            return CHAINS_ONLY
        if cm is None:
            return "it needs a bnn_tol block model (.blocks)"
        if not cm.is_bnn:
            return "it needs sign (1-bit) weights and sign activations; use 'fixed' or 'reference'"
        return cm.integer_issue()

    def __init__(self, model, data, **kw) -> None:
        super().__init__(model, data, **kw)
        self.cm = check_bnn(model, what="this sweep engine")
        self.stages = self.cm.stages
        self.index = {st.name: st.index for st in self.stages}
        # the output BatchNorm where the engine computes (eval mode)
        self.out_bn = copy.deepcopy(self.stages[-1].block.bn).to(self.device).eval()
        self.faulty = [k for k, st in enumerate(self.stages) if st.name in self.chosen]
        # first stage that differs between maps (the last one if no layer is faulty)
        self.start = min(self.faulty[0] if self.faulty else len(self.stages),
                         len(self.stages) - 1)
        self._prefix: list[tuple[Tensor, Tensor]] | None = None

    def by_index(self, flips: FlipSet) -> dict[int, Tensor]:
        """A flip set keyed by stage index (what the kernels address)."""
        return {self.index[name]: idx for name, idx in flips.items()}

    def flips(self, fmap, p01, p10):  # noqa: D102
        return {self.stages[k].name: fmap[self.stages[k].name].flips(self.stages[k].wb, p01, p10)
                for k in self.faulty}

    def _input(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _prefix_of(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def _chunks(self):
        """Clean prefix (input of the first faulty stage) per data chunk, computed once."""
        if self._prefix is None:
            self._prefix = []
            imgs, labels = self.data.images, self.data.labels
            for i in range(0, len(self.data), self.batch_size):
                h = self._prefix_of(self._input(imgs[i: i + self.batch_size]))
                self._prefix.append((h, labels[i: i + self.batch_size].to(self.device)))
        return self._prefix


def fp32_prefix(stages, x: Tensor, ws: list[Tensor], stop: int) -> Tensor:
    """Clean, shared output of stages ``0 .. stop-1`` (input of stage ``stop``): float
    GEMM/conv on exact values, pre-activations rounded to the integers ``scale a`` they equal,
    folded thresholds, max pooling."""
    h = x
    for k in range(stop):
        st = stages[k]
        if st.flatten:
            h = h.flatten(1)
        a = h @ ws[k].t() if not st.conv else F.conv2d(h, ws[k], padding=st.block.layer.padding)
        ai = torch.round(a * st.scale)
        h = apply_folded(ai, st.folded).to(x.dtype)
        if st.pool:
            h = F.max_pool2d(h, st.pool)
    return h
