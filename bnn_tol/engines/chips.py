"""Profiled chips swept over supply voltage: accuracy per (model, voltage, placement) and the
energy it buys (Stutz et al.). The chip itself (profile format, layout, flips) is
:mod:`bnn_tol.faults.chip`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from bnn_tol import schema
from bnn_tol.core.inference import accuracy
from bnn_tol.core.models import memory_bits
from bnn_tol.engines.driver import accuracy_under_flips
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.chip import (
    MAX_VOLTAGES,
    Profile,
    _offset,
    _stored_layers,
    _voltage,
    energy,
    energy_reference,
    profile_flips,
)

__all__ = ["profile_sweep", "summary_energy"]


def profile_sweep(models, data, profile: Profile, *, voltages: Sequence[float] | None = None,
                  offsets: Sequence[int] = (0,), progress: bool = True) -> pd.DataFrame:
    """Accuracy of each model on the profiled chip at each voltage and placement.

    Each (voltage, offset) is the flip set of the ``chip`` error model
    (:class:`~bnn_tol.faults.chip.ChipErrors`) at rate ``voltage_rate(profile, voltage)`` and
    chip seed ``offset`` -- the row ``evaluate.sweep(..., error="chip:<profile>")`` gives for
    that rate and map seed -- evaluated by the fastest exact engine
    (:func:`bnn_tol.engines.driver.accuracy_under_flips`).

    Raises:
        InvalidArgument: a voltage that is not a finite number > 0 (NaN would fail no cell
            and read as the clean chip), more than ``MAX_VOLTAGES`` voltages, an offset that
            is not an integer in ``[0, MAX_OFFSET]``; before anything is evaluated.

    Returns:
        Tidy frame, one row per (model, voltage, offset), the ``profile`` table of
        :mod:`bnn_tol.schema`: ``model, voltage, offset, ber_realized`` (flipped / stored
        bits), ``p01_realized``, ``p10_realized`` (flips among stored 0s / 1s), ``energy``
        (relative to :func:`~bnn_tol.faults.chip.energy_reference`: the profile's ``v_min``,
        else its lowest error-free voltage), ``energy_saving = 1 - energy``, ``accuracy``,
        ``rerr``, ``clean_accuracy``, ``bits_per_weight``, ``memory_bits``.
    """
    if isinstance(models, nn.Module):
        models = {str(getattr(models, "config", {}).get("name", "model")): models}
    if isinstance(voltages, str | bytes) or isinstance(offsets, str | bytes):
        raise InvalidArgument("voltages and offsets are sequences of numbers, not strings")
    volts = list(profile.voltages) if voltages is None \
        else [_voltage(v) for v in voltages]
    if not 1 <= len(volts) <= MAX_VOLTAGES:
        raise InvalidArgument(f"give 1 to {MAX_VOLTAGES} voltages, got {len(volts)}")
    offsets = [_offset(o) for o in offsets]
    ref = energy_reference(profile)
    e_all = energy(profile.voltages, reference=ref, table=profile.energy)
    e_of = {float(v): float(e) for v, e in zip(profile.voltages, e_all, strict=True)}
    for v in volts:
        if v not in e_of and profile.energy is not None:
            raise InvalidArgument(f"voltage {v} is not in the profile's energy table")
    rows = []
    bar = tqdm(total=len(models) * len(volts) * len(offsets), desc="profile sweep",
               disable=not progress)
    try:
        for label, model in models.items():
            layers = _stored_layers(model)
            images = {n: lay.stored_bits() for n, lay in layers.items()}
            n0 = sum(int((b == 0).sum()) for b in images.values())
            n1 = sum(int((b == 1).sum()) for b in images.values())
            clean = accuracy(model, data)
            bpw = sorted({int(lay.codec.bits_per_weight) for lay in layers.values()})
            for v in volts:
                for off in offsets:
                    fl = profile_flips(model, profile, v, offset=off)
                    f01 = sum(int((images[n][i] == 0).sum()) for n, i in fl.items())
                    f10 = sum(int(i.numel()) for i in fl.values()) - f01
                    acc = accuracy_under_flips(model, data, [fl], device="cpu")[0]
                    e = e_of.get(v, float(energy([v], reference=ref)[0]))
                    rows.append({"model": str(label), "voltage": v, "offset": off,
                                 "ber_realized": (f01 + f10) / max(n0 + n1, 1),
                                 "p01_realized": f01 / max(n0, 1),
                                 "p10_realized": f10 / max(n1, 1),
                                 "energy": e, "energy_saving": 1.0 - e, "accuracy": acc,
                                 "rerr": 1.0 - acc, "clean_accuracy": clean,
                                 "bits_per_weight": float(bpw[0]) if len(bpw) == 1
                                 else float("nan"),
                                 "memory_bits": memory_bits(model)})
                    bar.update(1)
    finally:
        bar.close()
    return schema.validate(pd.DataFrame(rows, columns=schema.columns("profile")), "profile",
                           what="the profile sweep")


def summary_energy(df: pd.DataFrame, tolerance: float | Sequence[float] = 0.01
                   ) -> pd.DataFrame:
    """Per model and tolerance the lowest voltage down to which the accuracy stays within
    ``tolerance`` of the clean accuracy -- the paper's headline quantity -- and its saving.

    With ``acc(V)`` the mean accuracy over placements (offsets) at voltage ``V`` and ``A`` the
    clean accuracy, the chosen voltage is the lowest ``V*`` such that ``acc(V) >= A - tol``
    at **every** swept ``V >= V*`` (a curve that dips below and recovers at a lower voltage by
    chance does not count there); its saving is ``1 - E(V*)``.

    Args:
        df: a profile sweep (:func:`profile_sweep`): one row per model, voltage, offset.
        tolerance: the allowed accuracy loss (absolute, e.g. ``0.01`` = one point), or several.

    Returns:
        One row per model and tolerance: ``model, tolerance, clean_accuracy, voltage,
        accuracy`` (mean over placements at ``V*``), ``accuracy_sd`` (sd over placements,
        NaN with one), ``n_placements, energy, energy_saving`` (NaN voltage and saving when
        even the highest voltage loses more than ``tolerance``).
    """
    need = {"model", "voltage", "accuracy", "clean_accuracy", "energy"}
    if not need <= set(df.columns):
        raise InvalidArgument(f"summary_energy needs a profile sweep with {sorted(need)}")
    tols = [tolerance] if isinstance(tolerance, (int, float)) else list(tolerance)
    if not tols or not all(isinstance(t, (int, float)) and 0 <= t < 1 for t in tols):
        raise InvalidArgument(f"tolerance must be in [0, 1) (an accuracy loss), got "
                              f"{tolerance!r}")
    out = []
    for label, g in df.groupby("model", sort=False):
        m = g.groupby("voltage", sort=True).agg(
            accuracy=("accuracy", "mean"), accuracy_sd=("accuracy", "std"),
            n_placements=("accuracy", "count"), energy=("energy", "first"))
        m = m.sort_index(ascending=False).reset_index()  # highest voltage first
        clean = float(g["clean_accuracy"].iloc[0])
        for tol in tols:
            ok = (m["accuracy"] >= clean - float(tol)).cummin()  # every V above qualifies
            best = m[ok].iloc[-1] if bool(ok.iloc[0]) else None
            row = {"model": label, "tolerance": float(tol), "clean_accuracy": clean}
            for key in ("voltage", "accuracy", "accuracy_sd", "energy"):
                row[key] = float(best[key]) if best is not None else math.nan
            row["n_placements"] = int(best["n_placements"]) if best is not None else 0
            row["energy_saving"] = 1 - row["energy"]
            out.append(row)
    return pd.DataFrame(out)
