"""The sweep driver: accuracy under persistent bit errors for every (model, BER, fault map).

>>> from bnn_tol import errors, evaluate
>>> with errors.inject(model, ber=0.05, seed=3):      # doctest: +SKIP
...     acc = evaluate.accuracy(model, test)
>>> df = evaluate.sweep(model, test, bers=[0, .01, .05], n_maps=50, seed=0)  # doctest: +SKIP
>>> evaluate.summarize(df)                             # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from bnn_tol import schema
from bnn_tol.core.compiled import stored_layers
from bnn_tol.core.inference import check_batch_size, resolve_device
from bnn_tol.data import BNNDataset
from bnn_tol.engines.base import MEMORY_BUDGET, engine_class, pick_engine
from bnn_tol.engines.sweep_file import _KEY, COLUMNS, SweepFile, settings
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults.apply import check_flips
from bnn_tol.faults.maps import map_seeds, select_layers
from bnn_tol.faults.params import parse_targets
from bnn_tol.faults.protect import check_protection, digest, protect_maps
from bnn_tol.faults.registry import (
    ErrorModel,
    check_rates,
    draw_maps,
    error_model,
    map_nbytes,
)

__all__ = ["sweep", "accuracy_under_flips", "summarize", "MAX_MAPS", "MAX_ROWS"]

#: Most fault maps per BER of one sweep (the chips' seeds are drawn at once).
MAX_MAPS = 100_000
#: Most rows (models x BERs x maps) of one sweep: the returned table is held in memory
#: (~100 bytes a row), so a sweep never grows past a few hundred MB whatever its counts.
MAX_ROWS = 2_000_000


def _ber_list(bers, error) -> list[tuple[float, float]]:
    if isinstance(bers, int | float):
        bers = [bers]
    out = check_rates(error, list(bers))
    if not out:
        raise InvalidArgument("bers is empty: give at least one BER, e.g. bers=[0, 0.01, 0.05]")
    return out


def _storage(model: nn.Module) -> dict:
    """``bits_per_weight`` (stored bits / weights of all stored layers: ``m`` when uniform)
    and ``memory_bits`` of a model: the columns that make equal-memory comparisons a groupby."""
    layers = stored_layers(model).values()
    bits = sum(lay.n_stored_bits for lay in layers)
    weights = sum(lay.weight.numel() for lay in layers)
    return {"bits_per_weight": bits / weights if weights else math.nan, "memory_bits": bits}


def _ber_value(p01: float, p10: float) -> float:
    return p01 if p01 == p10 else 0.5 * (p01 + p10)



def _check_shape(label: str, model: nn.Module, data: BNNDataset) -> None:
    """The dataset's image shape ``(C, H, W)`` must be the model's ``in_shape``."""
    try:
        want = tuple(int(v) for v in model.config["kwargs"]["in_shape"])  # type: ignore[index]
    except (AttributeError, KeyError, TypeError, ValueError):
        want = None
    have = tuple(data.shape)
    if want is None:  # no config: the first binary linear layer's fan-in, if it is one
        first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        if first is None or first.in_features == math.prod(have):
            return
        want = (first.in_features,)
    elif want == have:
        return
    raise InvalidArgument(f"the dataset {data.name!r} has images of shape {have} but model "
                          f"{label!r} expects {want}: use the dataset the model was trained on")


def sweep(
    models,
    data: BNNDataset,
    *,
    bers,
    n_maps: int = 20,
    seed: int = 0,
    layers=None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    engine: str = "auto",
    targets=("weights",),
    out=None,
    resume: bool = False,
    maps_per_step: int | None = None,
    error: str | ErrorModel | None = None,
    protect: Mapping[str, object] | None = None,
) -> pd.DataFrame:
    """Accuracy under persistent bit errors for every (model, BER, fault map).

    Map ``m`` has seed ``s_m = errors.map_seeds(seed, n_maps)[m]`` (the chip, the row's
    ``map_seed``); its flips at BER ``(p01, p10)`` are those of ``errors.inject(model, (p01,
    p10), seed=s_m, layers=layers, error=error)`` (identical on every run; nested across BERs
    for the built-in error models), so any row can be replayed alone and gives exactly the same
    accuracy. The error model (``error``, :func:`bnn_tol.errors.models`) draws each chip once
    and answers every BER from it.

    Engines (a registry, :func:`engines`; all exact: they reproduce ``model(x).argmax(1)`` of
    the faulty model bit for bit). ``engine="auto"`` takes the first that supports the model:

    * ``"packed"`` (any stride-1 BNN, fc or conv, on CPU with numba): +-1 values as bits,
      XNOR/popcount dot products (:mod:`bnn_tol.packed`); the first conv as an int32 kernel
      on ``q = p - 128``, a first linear layer updated from its cached clean output. ``auto``
      takes it for conv BNNs, and for fc ones unless the CPU has AMX (:func:`bnn_tol.engines.
      int8.int8_has_amx`).
    * ``"int8"`` (fully connected BNNs on a CPU with VNNI/AMX, :func:`int8_is_fast`; ``auto``
      takes it before ``packed`` only with AMX, or where numba is missing):
      ``torch._int_mm`` int8 x int8 -> int32 on +-1 weights, folded integer thresholds,
      bit activations; the clean prefix before the first faulty layer is computed once.
    * ``"fp32"`` (any BNN, also CUDA): ``maps_per_step`` maps batched through stacked weights /
      ``bmm`` / grouped conv. Also residual graphs (:mod:`bnn_tol.core.graph`), which
      ``auto`` sweeps with it (:class:`~bnn_tol.engines.fp32.GraphFp32Engine`).
    * ``"fixed"`` (any codec, e.g. m-bit fixed point, and ReLU or sign activations): flips the
      stored bits in cached codes, decodes, and runs the model's own ops from the clean prefix
      (:class:`FixedPointEngine`).
    * ``"reference"``: ``inject`` + :func:`accuracy` per map (needed for activation and
      threshold ``targets``).

    Args:
        models: a BNN, or ``{label: BNN}``.
        data: test set (streamed in chunks of ``batch_size``; default from a ~256 MiB budget).
        bers: list of ``p`` or ``(p01, p10)``.
        n_maps: fault maps (chips) per BER; ``seed``: the sweep's seed.
        layers: layers with errors (:func:`bnn_tol.errors.select_layers`); default all.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        progress: tqdm bar over (model, BER, map).
        targets: see :func:`bnn_tol.errors.inject`.
        error: the error model, a name of :func:`bnn_tol.errors.models` (default
            ``"bernoulli"``: persistent nested Bernoulli maps) or an
            :class:`~bnn_tol.faults.registry.ErrorModel`.
        protect: stored weight bits kept error-free in every model, ``{layer name: bool mask
            or bit indices}`` (:mod:`bnn_tol.faults.protect`): the same chips with those cells
            spared; recorded in the sidecar (a digest), so a resume never mixes protections.
        out: CSV path; rows of each finished (model, BER) are appended in one write. The file
            is locked (``flock``) for the whole sweep; the sidecar ``<out>.meta.json`` records
            what defines the rows (per model a sha256 of its state dict and its faulty layers;
            dataset name, split, size and sha256 of images + labels; targets) and provenance
            (library, git commit, torch, python, CPU model, threads).
        resume: with ``out``: skip the (model, BER, map) rows already in the file. Only a file
            recognized as ours (sidecar + header) made with the same settings is continued
            (BERs, maps and models may be added); a torn last line is cut off first.

    Returns:
        One row per (model, BER, map), the ``sweep`` table of :mod:`bnn_tol.schema`:
        ``model, ber, p01, p10, map, map_seed, accuracy, rerr, bits_per_weight,
        memory_bits`` (``model`` the label of ``models``; ``ber = p`` for symmetric rates,
        ``(p01 + p10) / 2`` otherwise; ``map_seed`` the map's seed ``s_m``; ``rerr = 1 -
        accuracy``; ``memory_bits`` the model's stored weight bits, ``bits_per_weight`` those
        per weight). With ``out`` the returned frame holds the file's rows of this sweep too.

    Raises:
        InvalidArgument: BER outside [0, 1], empty ``bers``, unknown layers, models without
            binary layers, a dataset whose image shape is not the model's ``in_shape``,
            ``n_maps``/``seed``/``batch_size`` not integers (>= 1, >= 0, >= 1), ``n_maps``
            above :data:`MAX_MAPS` or more than :data:`MAX_ROWS` rows, ``resume`` without
            ``out``, an existing ``out`` without ``resume``.
        ResultsMismatch: ``resume`` into a file that is not a valid sweep CSV of ours, or that
            was made with other settings (names the difference; the file is left untouched).
        FileInUse: another process is writing ``out``.
    """
    if isinstance(models, nn.Module):
        models = {str(getattr(models, "config", {}).get("name", "model")): models}
    if not models:
        raise InvalidArgument("no models given")
    err = error_model(error)
    ber_list = _ber_list(bers, err)
    n_maps = require_int(n_maps, "n_maps", minimum=1, strict=True)
    if n_maps > MAX_MAPS:
        raise InvalidArgument(f"n_maps must be <= {MAX_MAPS} (fault maps per BER), got {n_maps}")
    if len(models) * len(ber_list) * n_maps > MAX_ROWS:
        raise InvalidArgument(f"{len(models)} model(s) x {len(ber_list)} BER(s) x {n_maps} maps "
                              f"is more than {MAX_ROWS} rows; sweep fewer at a time")
    seed = require_int(seed, "seed", minimum=0, strict=True)
    batch_size = check_batch_size(batch_size, optional=True)
    if maps_per_step is not None:
        maps_per_step = require_int(maps_per_step, "maps_per_step", minimum=1, strict=True)
    if len(data) == 0:
        raise InvalidArgument("cannot evaluate on an empty dataset")
    if engine != "auto":
        engine_class(engine)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    parse_targets(targets)  # validates names and word widths
    if resume and out is None:
        raise InvalidArgument("resume=True needs out= (--out): the file to continue")
    dev = resolve_device(device)
    shields = {}
    for label, model in models.items():
        select_layers(model, layers)  # validates names and that there are binary layers
        _check_shape(str(label), model, data)
        shields[label] = check_protection(model, protect)
    if protect and set(targets) != {"weights"}:
        raise InvalidArgument("protect= keeps stored weight bits error-free: weight targets only")
    seeds = map_seeds(seed, n_maps)
    done: set = set()
    old = pd.DataFrame(columns=COLUMNS)
    file = None
    if out is not None:
        file = SweepFile(out, resume=resume)
        try:
            old = file.open_rows(settings(models, data, layers, targets, error=err.settings(),
                                          protect={lb: digest(sh) for lb, sh in shields.items()}))
        except BaseException:
            file.close()
            raise
        done = set(zip(*(old[c] for c in _KEY), strict=True))
    cap = max(max(p) for p in ber_list)
    total = len(models) * len(ber_list) * n_maps
    bar = tqdm(total=total, desc="sweep", unit="map", disable=not progress)
    frames: list[pd.DataFrame] = []
    maps = _MapCache()
    map_layout = None
    try:
        for label, model in models.items():
            shield = shields[label]
            runner = pick_engine(model, engine=engine, device=dev, targets=targets)(
                model, data, layers=layers, device=dev, batch_size=batch_size,
                maps_per_step=maps_per_step, targets=targets, error=err, protect=shield)
            # maps depend on (seed, layer position, stored bits) only: share them between
            # models of the same memory layout (the same chips)
            layout = (tuple((n, lay.n_stored_bits) for n, lay in select_layers(model).items()),
                      tuple(select_layers(model, layers)))
            if layout != map_layout:
                maps, map_layout = _MapCache(), layout
            storage = _storage(model)
            if runner.map_major:  # one chip at all its BERs in a row (nested flip sets)
                for m in range(n_maps):
                    todo = [r for r in ber_list if (str(label), *r, m, seeds[m]) not in done]
                    bar.update(len(ber_list) - len(todo))
                    if not todo:
                        continue
                    fmap = protect_maps(maps.get(m, lambda m=m, model=model: draw_maps(
                        model, seeds[m], cap, layers=layers, error=err)), shield)
                    accs = runner.accuracies_of_map(fmap, todo, bar)
                    frames.append(_rows(label, todo, [m] * len(todo), seeds, accs, storage,
                                        file))
                continue
            for p01, p10 in ber_list:
                todo = [m for m in range(n_maps)
                        if (str(label), p01, p10, m, seeds[m]) not in done]
                bar.update(n_maps - len(todo))
                if runner.name == "reference":  # draws its own maps from the seeds
                    fmaps = (None for _ in todo)
                else:
                    fmaps = (protect_maps(maps.get(m, lambda m=m, model=model: draw_maps(
                        model, seeds[m], cap, layers=layers, error=err)), shield) for m in todo)
                accs = runner.accuracies(fmaps, [seeds[m] for m in todo], p01, p10, bar)
                frames.append(_rows(label, [(p01, p10)] * len(todo), todo, seeds, accs,
                                    storage, file))
        frames = [f for f in frames if len(f)]
        df = (pd.concat(frames, ignore_index=True) if frames
              else pd.DataFrame(columns=COLUMNS))
        if len(old):
            keys = {(str(lb), p01, p10) for lb in models for p01, p10 in ber_list}
            mask = [(m, a, b) in keys and s == seeds[k] if k < n_maps else False
                    for m, a, b, k, s in zip(old["model"], old["p01"], old["p10"], old["map"],
                                             old["map_seed"], strict=True)]
            df = pd.concat([old[mask], df], ignore_index=True)
        order_m = {str(lb): i for i, lb in enumerate(models)}
        order_b = {b: i for i, b in enumerate(ber_list)}
        df = df.assign(_m=df["model"].map(order_m),
                       _b=[order_b[(a, b)] for a, b in zip(df["p01"], df["p10"], strict=True)])
        df = df.sort_values(["_m", "_b", "map"]).drop(columns=["_m", "_b"]).reset_index(drop=True)
        df = df.astype({c: "int64" for c in ("map", "map_seed", "memory_bits")}
                       | {c: "float64" for c in ("ber", "p01", "p10", "accuracy", "rerr",
                                                 "bits_per_weight")})
        df = schema.validate(df, "sweep", what="the sweep")
        if file is not None:
            file.finish(df)
    finally:
        bar.close()
        if file is not None:
            file.close()
    return df


def _rows(label, rates: list[tuple[float, float]], maps: list[int], seeds, accs: list[float],
          storage: dict, file: SweepFile | None) -> pd.DataFrame:
    """Sweep rows of ``label``: one per (rate, map number, accuracy), appended to ``file``."""
    rows = pd.DataFrame({
        "model": str(label), "ber": [_ber_value(a, b) for a, b in rates],
        "p01": [a for a, _ in rates], "p10": [b for _, b in rates], "map": maps,
        "map_seed": [seeds[m] for m in maps], "accuracy": accs,
        "rerr": [1.0 - a for a in accs], **storage}, columns=COLUMNS)
    if len(rows) and file is not None:
        file.append(rows)
    return rows


class _MapCache:
    """Fault maps of a sweep by map number, kept while they fit in ``budget`` bytes.

    Maps are reused across BERs (the same chip); those beyond the budget are drawn again from
    their seed when needed (bit-identical), so a sweep's memory for maps stays below
    ``budget`` plus the ``maps_per_step`` maps in use, whatever ``n_maps`` is.
    """

    def __init__(self, budget: int = MEMORY_BUDGET) -> None:
        self.budget, self.used, self.maps = budget, 0, {}

    def get(self, m: int, draw):
        """Map ``m``: cached, or ``draw()`` (kept if it fits)."""
        if m in self.maps:
            return self.maps[m]
        fm = draw()
        size = sum(map_nbytes(f) for f in fm.values())
        if self.used + size <= self.budget:
            self.maps[m] = fm
            self.used += size
        return fm



def accuracy_under_flips(model: nn.Module, data: BNNDataset, flip_sets: list[dict], *,
                         engine: str = "auto", device: str | torch.device = "auto",
                         batch_size: int | None = None) -> list[float]:
    """Accuracy with explicit stored-bit flips, one value per flip set.

    Args:
        flip_sets: ``[{layer name: int64 flat indices into layer.stored_bits()}, ...]``.
        engine: as :func:`sweep` (``"auto"``: the fastest exact engine for the model).

    Raises:
        InvalidArgument: an unknown layer name or an index outside a layer's memory image.
    """
    dev = resolve_device(device)
    batch_size = check_batch_size(batch_size, optional=True)
    impl = pick_engine(model, engine=engine, device=dev)(
        model, data, layers=None, device=dev, batch_size=batch_size, maps_per_step=None,
        targets=("weights",))
    layers = stored_layers(model)
    return impl.evaluate([check_flips(layers, fs) for fs in flip_sets])


def summarize(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Mean, std and a ``level`` confidence interval of the accuracy per (model, ber).

    ``ci = mean +- t_{(1+level)/2, n-1} std / sqrt(n)`` (Student t over the fault maps; with
    ``n = 1`` the interval collapses to the mean and ``std`` is NaN).

    Returns:
        One row per (model, ber, p01, p10): ``model, ber, p01, p10, mean, std, ci_low,
        ci_high, n`` (also ``rerr_mean = 1 - mean``).
    """
    need = {"model", "ber", "p01", "p10", "accuracy"}
    if not need <= set(df.columns):
        raise InvalidArgument(f"summarize needs a sweep frame with columns {sorted(need)}")
    g = df.groupby(["model", "ber", "p01", "p10"], sort=False)["accuracy"]
    s = g.agg(mean="mean", std="std", n="count").reset_index()
    tq = stats.t.ppf(0.5 + level / 2, (s["n"] - 1).clip(lower=1))
    half = (tq * s["std"] / s["n"].pow(0.5)).where(s["n"] > 1, 0.0)
    s["ci_low"] = s["mean"] - half
    s["ci_high"] = s["mean"] + half
    s["rerr_mean"] = 1.0 - s["mean"]
    return s[["model", "ber", "p01", "p10", "mean", "std", "ci_low", "ci_high", "n",
              "rerr_mean"]]
