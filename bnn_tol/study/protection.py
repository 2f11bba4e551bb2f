"""Metric-guided protection: which stored bits should sit in reliable memory?

The causal test of a tolerance metric inside one network: rank the units of protection
(neurons or single weights, :func:`bnn_tol.faults.protect.units`) by the metric, keep the
top-ranked ones error-free up to a fraction of all stored bits, and sweep the rest under bit
errors. A metric that measures what matters keeps more accuracy than random protection of the
same memory. :func:`protection` gives the curves (tidy rows of the ``protection`` table of
:mod:`bnn_tol.schema`), :func:`protection_auc` their area relative to random, with an interval.

Rankings (``rank=``; a unit's score, higher = protected first; units a ranking does not score
come last, in forward order, so every ranking reaches 100 %):

* ``importance[:estimator]`` -- the neuron's importance ``I_j`` (:func:`bnn_tol.metrics.
  importance`, default estimator ``accuracy``); hidden neurons;
* ``margin`` -- ``-mean_margin_norm``: a small normalized margin is fragile
  (:func:`bnn_tol.metrics.margin`); hidden neurons, dead ones last;
* ``flip_probability`` -- the neuron's analytic output-flip probability at the largest BER of
  the curve (:func:`bnn_tol.metrics.flip_probability`); hidden layers with binary inputs;
* ``magnitude`` -- ``|w|`` of the latent weight (neurons: the mean over the row);
* ``gradient`` -- ``2 |dL/dw_b|``, the first-order loss change of flipping the deployed weight
  ``w_b`` (sign layers; neurons: the sum over the row), from one pass over the ranking data;
* ``random:<seed>`` -- a seeded random order (the baseline; give several seeds for its band).

Per-neuron rankings applied to ``unit="weight"`` give every weight its neuron's score.
Rankings are computed on ``rank_data`` (default: ``data``); use held-out images to avoid
ranking on the images that are then evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bnn_tol import engines, metrics, schema
from bnn_tol.core.compiled import check_bnn, compile_model, eval_mode, stored_layers
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults import protect as shield
from bnn_tol.faults.maps import rates

__all__ = ["RANKINGS", "UNITS", "check_ranking", "scores", "order", "protection",
           "protection_auc"]

#: The rankings (``random`` and ``importance`` take ``:<seed>`` / ``:<estimator>``).
RANKINGS = ("importance", "margin", "flip_probability", "magnitude", "gradient", "random")


#: Units of protection (:data:`bnn_tol.faults.protect.UNITS`).
UNITS = shield.UNITS


def check_ranking(rank: str) -> tuple[str, str | None]:
    """``(kind, argument)`` of a ranking name (``"random:3"`` -> ``("random", "3")``).

    Raises:
        InvalidArgument: an unknown ranking or importance estimator, or a random seed that is
            not an integer >= 0.
    """
    kind, _, arg = str(rank).partition(":")
    if kind not in RANKINGS:
        raise InvalidArgument(f"unknown ranking {rank!r}; choose from {', '.join(RANKINGS)} "
                              "(random:<seed>, importance:<estimator>)")
    if kind == "random":
        require_int(int(arg) if arg.isdigit() else arg or 0, "random:<seed>", minimum=0)
    if kind == "importance" and arg and arg not in metrics.estimators.names():
        raise InvalidArgument(f"unknown importance estimator in {rank!r}; choose from "
                              f"{', '.join(metrics.estimators.names())}")
    return kind, arg or None


def _per_neuron(model: nn.Module, table: pd.DataFrame, column: str, sign: float) -> dict:
    """``{layer name: (rows,) float64}`` from a per-(layer, neuron) metric table; neurons the
    table lacks (other layers) get ``-inf``."""
    out = {}
    for name, layer in stored_layers(model).items():
        v = np.full(int(layer.weight.shape[0]), -np.inf)
        rows = table[table["layer"] == name]
        if len(rows):
            vals = sign * rows[column].to_numpy(np.float64)
            v[rows["neuron"].to_numpy(np.int64)] = np.where(np.isfinite(vals), vals, -np.inf)
        out[name] = v
    return out


def _gradient(model: nn.Module, data: BNNDataset, batch_size: int) -> dict:
    """``2 |dL/dw_b|`` per deployed weight (mean cross-entropy over ``data``)."""
    cm = check_bnn(model, what="the gradient ranking")
    leaves = {s.name: s.layer.binary_weight().detach().clone().requires_grad_(True)
              for s in cm.stages}
    saved = {s.name: s.layer.fault for s in cm.stages}
    grads = {n: torch.zeros_like(w) for n, w in leaves.items()}
    try:
        for s in cm.stages:
            s.layer.fault = (lambda w, leaf=leaves[s.name]: leaf)  # compute with the leaf
        with eval_mode(model), torch.enable_grad():
            dev = next(model.parameters()).device
            for x, y in data.batches(batch_size, device=dev, grid=cm.input):
                loss = F.cross_entropy(model(x), y, reduction="sum") / len(data)
                for n, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values())),
                                strict=True):
                    grads[n] += g
    finally:
        for s in cm.stages:
            s.layer.fault = saved[s.name]
    return {n: (2 * g.abs()).detach().cpu().double() for n, g in grads.items()}


def scores(model: nn.Module, data: BNNDataset, rank: str, *, unit: str = "neuron",
           ber: float = 0.1, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """The scores of ranking ``rank``: ``{layer name: (rows,)}`` for ``unit="neuron"``,
    ``(numel,)`` (flat weight order) for ``unit="weight"``; higher = protected first, ``-inf``
    for units the ranking does not score.

    Raises:
        InvalidArgument: an unknown ranking or unit.
    """
    kind, arg = check_ranking(rank)
    layers = stored_layers(model)
    per_weight: dict | None = None
    if kind == "importance":
        imp = metrics.importance(model, data, estimator=arg or "accuracy", batch_size=batch_size)
        neuron = _per_neuron(model, imp, "importance", 1.0)
    elif kind == "margin":
        neuron = _per_neuron(model, metrics.margin(model, data, batch_size=batch_size),
                             "mean_margin_norm", -1.0)
    elif kind == "flip_probability":
        fp = metrics.flip_probability(model, data, ber=rates(ber)[0], batch_size=batch_size)
        neuron = _per_neuron(model, fp, "flip_prob", 1.0)
    elif kind == "magnitude":
        per_weight = {n: lay.weight.detach().abs().double().cpu() for n, lay in layers.items()}
    elif kind == "gradient":
        per_weight = _gradient(model, data, batch_size)
    else:  # random
        g = torch.Generator().manual_seed(int(arg or 0))
        per_weight = {n: torch.rand(lay.weight.shape, generator=g, dtype=torch.float64)
                      for n, lay in layers.items()}
    if per_weight is not None:
        if unit == "weight":
            return {n: w.reshape(-1).numpy() for n, w in per_weight.items()}
        reduce = "sum" if kind == "gradient" else "mean"
        return {n: getattr(w.reshape(w.shape[0], -1), reduce)(1).numpy()
                for n, w in per_weight.items()}
    if unit == "weight":
        return {n: np.repeat(v, int(layers[n].fan_in)) for n, v in neuron.items()}
    return neuron


def order(model: nn.Module, score: dict[str, np.ndarray], unit: str = "neuron"
          ) -> list[shield.Unit]:
    """The units of ``model`` by decreasing score (a stable sort: ties and unscored units in
    forward order)."""
    all_units = shield.units(model, unit)
    flat = np.concatenate([np.asarray(score[n], np.float64) for n in stored_layers(model)])
    if flat.size != len(all_units):
        raise InvalidArgument(f"{flat.size} scores for {len(all_units)} units of {unit}s")
    idx = np.argsort(-flat, kind="stable")
    return [all_units[i] for i in idx]


def protection(
    model: nn.Module,
    data: BNNDataset,
    *,
    rank: str | Sequence[str] = ("importance", "margin", "random:0", "random:1", "random:2"),
    fractions: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
    bers: Sequence = (0.05, 0.1, 0.2),
    n_maps: int = 20,
    seed: int = 0,
    unit: str = "neuron",
    rank_data: BNNDataset | None = None,
    label: str = "model",
    engine: str = "auto",
    error=None,
    batch_size: int = 1000,
    progress: bool = True,
) -> pd.DataFrame:
    """Accuracy under bit errors with the top-ranked units of each ranking protected.

    For each ranking ``r`` and fraction ``f``: the longest prefix of ``order(scores(r))``
    whose stored bits stay within ``f`` of all stored bits is kept error-free
    (:func:`bnn_tol.faults.protect.protection`), and :func:`bnn_tol.evaluate.sweep` runs on
    the same chips (``seed``) with those bits spared -- so at ``f = 0`` the rows are the
    unprotected sweep's, at ``f = 1`` the clean accuracy, and every row replays with
    ``errors.inject(model, ber, seed=row.map_seed, protect=...)``.

    Returns:
        The ``protection`` table: ``model, ranking, protected_fraction, ber, p01, p10, map,
        map_seed, accuracy, rerr`` plus ``fraction`` (the asked fraction; ``protected_fraction``
        is the one reached, at most ``f``) and ``unit``.

    Raises:
        InvalidArgument: unknown rankings or unit, fractions outside [0, 1], bad BERs.
    """
    ranks = [rank] if isinstance(rank, str) else list(rank)
    if not ranks:
        raise InvalidArgument("no ranking given")
    for r in ranks:
        check_ranking(r)
    fracs = [float(f) for f in fractions]
    if not fracs or any(not 0.0 <= f <= 1.0 for f in fracs):
        raise InvalidArgument(f"fractions must be in [0, 1], got {list(fractions)}")
    if unit not in shield.UNITS:
        raise InvalidArgument(f"unit must be one of {', '.join(shield.UNITS)}, got {unit!r}")
    compile_model(model)  # a block model: refuse others before the ranking work
    ber_max = max(max(rates(b)) for b in bers) if len(bers) else 0.0
    rows = []
    bar = tqdm(total=len(ranks) * len(fracs), desc="protection", unit="curve point",
               disable=not progress)
    try:
        for r in ranks:
            ordered = order(model, scores(model, rank_data or data, r, unit=unit, ber=ber_max,
                                          batch_size=batch_size), unit)
            for f in fracs:
                prot = shield.protection(model, ordered, f)
                df = engines.sweep({label: model}, data, bers=bers, n_maps=n_maps, seed=seed,
                                   engine=engine, error=error, protect=prot, progress=False)
                rows.append(df.assign(ranking=r, fraction=f, unit=unit,
                                      protected_fraction=shield.protected_fraction(model, prot)))
                bar.update(1)
    finally:
        bar.close()
    out = pd.concat(rows, ignore_index=True)
    cols = ["model", "ranking", "unit", "fraction", "protected_fraction", "ber", "p01", "p10",
            "map", "map_seed", "accuracy", "rerr"]
    return schema.validate(out[cols], "protection", what="the protection curve")


def protection_auc(curve: pd.DataFrame, *, baseline: str = "random", n_boot: int = 2000,
                   level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Area under each ranking's protection curve relative to random protection, per BER.

    ``auc(r) = trapz_f mean_maps accuracy(r, f)`` over the fractions of the curve (the same
    grid for every ranking), ``gain(r) = auc(r) - mean_s auc(random:s)``, divided by the span
    of fractions (so it is a mean accuracy gain). The interval resamples the fault maps (the
    same resample for every ranking: they share the chips) and the random seeds, ``n_boot``
    times (percentile bootstrap).

    Returns:
        One row per (model, unit, ber, ranking): ``auc, gain, gain_low, gain_high,
        better_than_baseline`` (the interval above 0) and ``n_maps``, ``n_baseline``.

    Raises:
        InvalidArgument: no baseline ranking in the curve, or a curve that is not one.
    """
    curve = schema.conform(curve, "protection", what="the protection curve")
    need = {"ranking", "fraction", "ber", "map", "accuracy", "model", "unit"}
    if not need <= set(curve.columns):
        raise InvalidArgument(f"protection_auc needs the columns {sorted(need)}")
    rng = np.random.default_rng(seed)
    out = []
    for (model, unit, ber), g in curve.groupby(["model", "unit", "ber"], sort=False):
        base = sorted(r for r in g["ranking"].unique() if str(r).split(":")[0] == baseline)
        if not base:
            raise InvalidArgument(f"the curve has no {baseline!r} ranking to compare with")
        fracs = np.sort(g["fraction"].unique())
        maps = np.sort(g["map"].unique())
        span = fracs[-1] - fracs[0] if len(fracs) > 1 else 1.0
        acc = {r: (h.pivot_table(index="map", columns="fraction", values="accuracy")
                   .reindex(index=maps, columns=fracs).to_numpy())
               for r, h in g.groupby("ranking", sort=False)}

        def auc(a: np.ndarray, rows: np.ndarray, fracs=fracs, span=span) -> float:
            if len(fracs) == 1:
                return float(a[rows].mean())
            return float(np.trapezoid(a[rows].mean(0), fracs) / span)

        all_rows = np.arange(len(maps))
        base_auc = np.mean([auc(acc[b], all_rows) for b in base])
        boot_rows = rng.integers(0, len(maps), (n_boot, len(maps)))
        boot_base = rng.integers(0, len(base), (n_boot, len(base)))
        base_reps = np.array([[auc(acc[b], rows) for b in base] for rows in boot_rows])
        base_boot = np.take_along_axis(base_reps, boot_base, 1).mean(1)
        for r, a in acc.items():
            reps = np.array([auc(a, rows) for rows in boot_rows]) - base_boot
            lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
            gain = auc(a, all_rows) - base_auc
            out.append({"model": model, "unit": unit, "ber": ber, "ranking": r,
                        "auc": auc(a, all_rows), "gain": gain, "gain_low": float(lo),
                        "gain_high": float(hi), "better_than_baseline": bool(lo > 0),
                        "n_maps": len(maps), "n_baseline": len(base)})
    return schema.validate(pd.DataFrame(out), "protection_auc", what="the protection AUC")
