"""The one result schema: every table the library writes or reads, declared once.

Each table is a pandera ``DataFrameSchema`` (:data:`TABLES`) built from one vocabulary of
columns (:data:`VOCABULARY`): a name means the same thing, holds the same kind of value and
passes the same checks in every table it appears in. The rules of the vocabulary:

- ``model`` is the label a user gave a network (the checkpoint directory name of ``bnn-tol
  sweep``/``metrics``, the key of the ``models`` dict of :func:`bnn_tol.evaluate.sweep`, the
  ``[[models]] label`` of a study); ``arch`` is its architecture (``models.build`` name: ``fc``,
  ``vgg3``, ...); ``model_id`` is one trained network of a study.
- Seeds say what they seed: ``map_seed`` (a fault map: ``errors.inject(model, ber,
  seed=map_seed)`` replays a sweep row) and ``train_seed`` (a training run). There is no bare
  ``seed`` column.
- The standard error of column ``X`` is ``X_se`` (``value_se`` in long-form tables).

Tables (:func:`describe` lists the columns of one with their meaning):

=======================  ======================================================================
``sweep``                one row per (model, BER, fault map): :func:`bnn_tol.evaluate.sweep`,
                         the sweep CSV (:mod:`bnn_tol.engines.sweep_file`); a study's
                         ``sweeps.csv`` fits it too (task columns in front)
``profile``              one row per (model, voltage, placement): ``evaluate.profile_sweep``
``protection``           one row per (model, ranking, protected fraction, BER, map): protection
                         curves (:func:`bnn_tol.study.protection.protection`)
``protection_auc``       one row per (model, unit, BER, ranking): area under the curve vs
                         random (:func:`bnn_tol.study.protection.protection_auc`)
``margin``               per neuron: :func:`bnn_tol.metrics.margin`
``margin_summary``       per layer + network: :func:`bnn_tol.metrics.margin_summary`
``importance``           per (estimator, neuron): :func:`bnn_tol.metrics.importance`
``importance_variance``  per (estimator, layer) + network: ``metrics.importance_variance``
``flip_probability``     per (neuron, BER): :func:`bnn_tol.metrics.flip_probability`
``predictions``          per BER: :func:`bnn_tol.metrics.predict_accuracy`
``score_margin``         per sample: :func:`bnn_tol.metrics.score_margin`
``attack``               per (method, seed, flips so far): adversarial bit errors and their
                         random baseline (:func:`bnn_tol.faults.attack.attack`)
``attack_flips``         per flipped bit, in flip order (the same functions)
``study.models``         a study's ``models.csv``: one row per trained network
``study.sweeps``         ``sweeps.csv``: task columns + ``sweep``
``study.metrics``        ``metrics.csv``: long form, one row per (network, layer, metric, split)
``study.margins``        ``margins.csv``: task columns + ``margin``
``study.importance``     ``importance.csv``: task columns + ``importance``
``study.predictions``    ``predictions.csv``: task columns + ``predictions``
``study.protection``     ``protection.csv``: task columns + ``protection``
``study.protection_auc`` ``protection_auc.csv``: task columns + ``protection_auc``
=======================  ======================================================================

Writers call :func:`validate` on what they write; readers call :func:`read_csv` (files) or
:func:`conform` (frames a user passes). Both raise the library's one-line errors
(:class:`~bnn_tol.exceptions.ResultsMismatch` for files,
:class:`~bnn_tol.exceptions.InvalidArgument` for frames), never a pandera traceback. Extra
columns are allowed (a user's own annotations; ``bnn-tol metrics`` adds importance columns to
the margin table); the old names of the previous release are not.

**Versions.** This is schema :data:`VERSION` 2. Tables of the previous release (version 1, no
marker) are recognized by their old column names and upgraded on read by :func:`upgrade`, a
declared list of renames per table (:data:`UPGRADES`): in sweeps ``seed`` -> ``map_seed`` (in
a study's sweeps ``seed`` -> ``train_seed``, it had ``map_seed`` already), in every study table
``seed`` -> ``train_seed``, ``se`` -> ``value_se`` (long metrics) / ``importance_se``
(importance), ``se_<stat>`` -> ``<stat>_se`` (margins); sweeps written before codecs get
``bits_per_weight = NaN`` and ``memory_bits = -1``. A table that cannot be upgraded is refused
with a message naming the command that regenerates it.

**Metric vocabulary.** A study's long-form ``metrics.csv`` names its metrics after the summary
columns they come from (:func:`metric_name`); which of them the report shows where (headline,
correlation curve, scatter plots) and which direction the paper's claims expect are declared on
those columns (:data:`REPORT_METRICS`, :func:`report_metrics`, :func:`claim_metrics`), so a
renamed column cannot silently drop out of the report.

Only pandas and pandera are imported (base layer).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.errors
import pandera.pandas as pa

from bnn_tol.exceptions import InvalidArgument, ResultsMismatch

__all__ = ["VERSION", "VOCABULARY", "TABLES", "UPGRADES", "REPORT_METRICS", "PAPER_ESTIMATOR",
           "TASK_COLUMNS", "columns", "describe", "validate", "conform", "read_csv", "upgrade",
           "is_previous", "regenerate_hint", "metric_name", "report_metrics", "claim_metrics"]

#: Version of the schema. 1: the previous release (no marker); 2: this one.
VERSION = 2

# -- the vocabulary ---------------------------------------------------------------------------

_KINDS = {"str": "text", "int": "integers", "float": "numbers", "bool": "True/False"}


def _kind_ok(kind: str) -> Callable[[pd.Series], bool]:
    def ok(s: pd.Series) -> bool:
        if len(s) == 0:
            return True
        if kind == "str":
            return pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty")
        if pd.api.types.is_bool_dtype(s):
            return kind == "bool"
        if kind == "bool":
            return False
        if kind == "int":
            return pd.api.types.is_integer_dtype(s)
        return pd.api.types.is_float_dtype(s) or pd.api.types.is_integer_dtype(s)
    return ok


# value checks, as factories (each table gets its own Check objects)
def _rate() -> pa.Check:
    return pa.Check.in_range(0.0, 1.0, error="must lie in [0, 1]")


def _nonneg() -> pa.Check:
    return pa.Check.ge(0, error="must be >= 0")


def _pos() -> pa.Check:
    return pa.Check.gt(0, error="must be > 0")


def _ge(v: float) -> Callable[[], pa.Check]:
    return lambda: pa.Check.ge(v, error=f"must be >= {v:g}")


def _isin(vals: tuple) -> Callable[[], pa.Check]:
    return lambda: pa.Check.isin(list(vals), error=f"must be one of {list(vals)}")


@dataclass(frozen=True)
class ColumnSpec:
    """One column of the vocabulary: its kind (``str``, ``int``, ``float``, ``bool``; any
    width of that kind passes), whether it may be missing (NaN), its value checks (factories of
    pandera checks) and what it means."""

    kind: str
    description: str
    nullable: bool = False
    checks: tuple = ()

    def column(self, name: str, *, required: bool = True) -> pa.Column:
        checks = [pa.Check(_kind_ok(self.kind), element_wise=False, name=f"kind_{self.kind}",
                           error=f"must hold {_KINDS[self.kind]}")]
        checks += [make() for make in self.checks]
        return pa.Column(None, checks=checks, nullable=self.nullable, required=required,
                         name=name, description=self.description,
                         metadata={"kind": self.kind})


def _f(description: str, *checks, nullable: bool = True) -> ColumnSpec:
    return ColumnSpec("float", description, nullable, checks)


def _i(description: str, *checks) -> ColumnSpec:
    return ColumnSpec("int", description, False, checks)


def _s(description: str, *checks, nullable: bool = False) -> ColumnSpec:
    return ColumnSpec("str", description, nullable, checks)


#: Per-neuron margin statistics that carry a standard error (``<stat>_se``).
MARGIN_SE_STATS = ("mean_margin", "mean_margin_half", "mean_margin_norm", "mean_margin_bn")

#: Every column name of every table, with its meaning. Tables list names from here.
VOCABULARY: dict[str, ColumnSpec] = {
    # who
    "model": _s("the label the user gave the network: checkpoint directory name (bnn-tol "
                "sweep/metrics), key of the models dict (evaluate.sweep), [[models]] label "
                "(study)"),
    "arch": _s("the architecture, as models.build names it (fc, vgg3, vgg7, ...)"),
    "model_id": _s("one trained network of a study: <model>_ber<train_ber>_s<train_seed>"),
    "train_ber": ColumnSpec("float", "BER of bit flip training (0: normal training)", False,
                            (_rate,)),
    "train_seed": _i("seed of the training run (initialization, shuffling, training flips)",
                     _nonneg),
    # sweeps
    "ber": ColumnSpec("float", "evaluation BER: p for symmetric rates, (p01 + p10) / 2 "
                      "otherwise", False, (_rate,)),
    "p01": ColumnSpec("float", "rate of stored 0 -> 1 flips (weight -1 -> +1)", False, (_rate,)),
    "p10": ColumnSpec("float", "rate of stored 1 -> 0 flips (weight +1 -> -1)", False, (_rate,)),
    "map": _i("fault map (chip) number within the sweep, 0 .. n_maps - 1", _nonneg),
    "map_seed": _i("seed of the fault map: errors.inject(model, (p01, p10), seed=map_seed) "
                   "replays the row", _nonneg),
    "accuracy": ColumnSpec("float", "fraction of test images classified correctly", False,
                           (_rate,)),
    "rerr": ColumnSpec("float", "robust error 1 - accuracy (Stutz et al.)", False, (_rate,)),
    "bits_per_weight": _f("stored bits per weight of the faulty layers (m when uniform; NaN: "
                          "unknown, a file written before codecs)", _pos),
    "memory_bits": _i("stored weight bits of the model (-1: unknown, a file written before "
                      "codecs)", _ge(-1)),
    # profiled chips
    "voltage": ColumnSpec("float", "supply voltage (units of the profile)", False),
    "offset": _i("placement of the model in the chip (bit offset)", _nonneg),
    "ber_realized": ColumnSpec("float", "flipped / stored bits at this voltage and placement",
                               False, (_rate,)),
    "p01_realized": ColumnSpec("float", "flips among stored 0s / stored 0s", False, (_rate,)),
    "p10_realized": ColumnSpec("float", "flips among stored 1s / stored 1s", False, (_rate,)),
    "energy": ColumnSpec("float", "energy per access relative to the lowest error-free voltage "
                         "(~ V^2)", False),
    "energy_saving": ColumnSpec("float", "1 - energy", False),
    "clean_accuracy": ColumnSpec("float", "accuracy without errors", False, (_rate,)),
    # protection (issue 21)
    "ranking": _s("what ranked the protected units (importance[:estimator], margin, "
                  "flip_probability, magnitude, gradient, random:<seed>)"),
    "unit": _s("the unit of protection: neuron (all its incoming weights) or weight",
               _isin(("neuron", "weight"))),
    "fraction": ColumnSpec("float", "the protected fraction of stored bits asked for",
                           False, (_rate,)),
    "protected_fraction": ColumnSpec("float", "fraction of stored bits kept error-free (the "
                                     "longest prefix of the ranking within the asked fraction)",
                                     False, (_rate,)),
    "auc": _f("mean accuracy over the protection curve (trapezoid area / span of fractions)",
              _rate),
    "gain": _f("auc of the ranking minus the mean auc of the random rankings (accuracy)"),
    "gain_low": _f("lower end of the bootstrap interval of gain (maps and random seeds "
                   "resampled)"),
    "gain_high": _f("upper end of the bootstrap interval of gain"),
    "better_than_baseline": ColumnSpec("bool", "gain_low > 0: the ranking beats random "
                                       "protection"),
    "n_maps": _i("fault maps per curve point", _ge(1)),
    "n_baseline": _i("random rankings (seeds) in the baseline", _ge(1)),
    # adversarial bit errors (issue 23)
    "method": _s("how the flipped bits were chosen: attack (greedy, gradient-guided) or "
                 "random (uniform stored bits, the baseline)", _isin(("attack", "random"))),
    "attack_seed": _i("seed of the attack images (attack) or of the drawn bits (random): "
                      "faults.attack.attack(..., seed=attack_seed) replays the rows", _nonneg),
    "n_flips": _i("stored bits flipped so far (0: the clean network)", _nonneg),
    "loss": _f("mean cross-entropy on the evaluation images"),
    "attack_loss": _f("mean cross-entropy on the attack images (NaN: random flips)"),
    "bit_index": _i("flat index of the flipped bit in layer.stored_bits() (weight_index m + "
                    "bit)", _nonneg),
    "weight_index": _i("flat index of the weight the flipped bit belongs to", _nonneg),
    "bit": _i("bit position in the weight's m-bit code (0: least significant; BNN: 0, the "
              "sign bit)", _nonneg),
    "estimate": _f("first-order loss increase g dw of the flip when it was chosen (NaN: "
                   "random flips)"),
    # study: models.csv
    "clean_acc": ColumnSpec("float", "clean accuracy of the network on the study's test set "
                            "(mean of its BER-0 sweep rows)", False, (_rate,)),
    "train_acc": _f("training accuracy of the last epoch", _rate),
    "epochs": _i("training epochs", _ge(1)),
    "checkpoint": _s("checkpoint directory, relative to the study directory"),
    "recipe": _s("the bit flip training recipe: the layers that got flips while training "
                 "(all, hidden, layers-<p1>-...)", nullable=True),
    "threads": _i("torch threads the task ran with (training results depend on it)", _ge(1)),
    # long-form metrics
    "layer": _s("qualified layer name, or 'network' for network-level aggregates"),
    "metric": _s("metric name (see bnn_tol.schema.metric_name)"),
    "value": _f("the row's value: the metric (long form) or the table's headline column "
                "(margin_summary: mean_margin_norm; importance_variance: variance)"),
    "value_se": _f("standard error of value (NaN where none is known)", _nonneg),
    "split": _s("'all': the whole metric subset; 'a' / 'b': its two disjoint halves",
                _isin(("all", "a", "b"))),
    # per layer / neuron
    "layer_index": _i("position of the layer among the binary layers (-1: the network row)",
                      _ge(-1)),
    "kind": _s("first | hidden | network"),
    "neuron": _i("neuron (output channel) of the layer", _nonneg),
    "fan_in": _i("inputs per neuron (conv: in_channels x kernel area; 0 for the network row)",
                 _nonneg),
    "tau": _f("real batch-norm threshold (NaN for dead neurons)"),
    "direction": _i("+1: fires when a > tau, -1: when a < tau, 0: dead (gamma == 0)",
                    _isin((-1, 0, 1))),
    "dead": ColumnSpec("bool", "gamma == 0: constant output, infinite margin"),
    "n": _i("pre-activations per neuron (samples x output positions)", _nonneg),
    "mean_margin": _f("mean_n |a_nj - tau_j|"),
    "min_margin": _f("min_n |a_nj - tau_j|"),
    "q10_margin": _f("10 % quantile of |a_nj - tau_j| over n"),
    "mean_margin_half": _f("mean margin / 2: tolerable weight flips (first layer: / 2 xbar)"),
    "mean_margin_norm": _f("mean margin / fan_in"),
    "mean_margin_bn": _f("|gamma| / sqrt(s2 + eps) * mean margin (= mean |BN(a)|)"),
    **{f"{s}_se": _f(f"standard error of {s} (images are the sample)", _nonneg)
       for s in MARGIN_SE_STATS},
    **{f"cov_layer_{s}": _f(f"covariance of the neuron's {s} with its layer mean, / N")
       for s in MARGIN_SE_STATS},
    **{f"cov_network_{s}": _f(f"covariance of the neuron's {s} with the network mean, / N")
       for s in MARGIN_SE_STATS},
    "n_neurons": _i("neurons of the layer (network: of all layers)", _nonneg),
    "n_dead": _i("dead neurons", _nonneg),
    "median_margin": _f("median over live neurons of mean_margin"),
    "mean_min_margin": _f("mean over live neurons of min_margin"),
    "mean_q10_margin": _f("mean over live neurons of q10_margin"),
    # importance
    "importance": _f("I_j: the output's loss of quality when neuron j's output is corrupted"),
    "estimator": _s("importance estimator (accuracy, loss, loss_norm, flips, taylor, mc)"),
    "importance_se": _f("standard error of importance (images are the sample)", _nonneg),
    "bias": _f("sampling bias of the plug-in variance (per neuron: its share)"),
    "n_samples": _i("images the estimate is computed from", _nonneg),
    "vu_se": _f("jackknife standard error of the layer's variance_unbiased (vu)", _nonneg),
    "vu_netcov": _f("jackknife covariance of the layer's vu with the network's"),
    "vu_layers": _i("layers measured together (the network row's vu_se needs all of them)"),
    "mean": _f("mean over the layer's neurons of importance"),
    "std": _f("standard deviation over the layer's neurons of importance"),
    "variance": _f("plug-in inter-neuron importance variance Var_j(I_j)"),
    "cv": _f("coefficient of variation std / |mean| (scale-free)"),
    "variance_unbiased": _f("variance - bias: unbiased for the true between-neuron variance"),
    "variance_unbiased_se": _f("standard error of variance_unbiased (jackknife)", _nonneg),
    "noise_share": _f("share of the plug-in variance that is sampling noise", _rate),
    # flip probability, prediction, score margin
    "flip_prob": _f("probability that the neuron's output bit flips at this BER", _rate),
    "predicted_accuracy": _f("accuracy predicted from the margins"),
    "predicted_drop": _f("clean_accuracy - predicted_accuracy"),
    "first_order_accuracy": _f("first-order (independent neurons) prediction"),
    "sample": _i("index of the image in the dataset", _nonneg),
    "label": _i("true class", _nonneg),
    "pred": _i("predicted class", _nonneg),
    "correct": ColumnSpec("bool", "pred == label"),
    "score_margin": _f("z_y - max_{c != y} z_c of the last layer's class scores"),
    "score_margin_flips": _f("last-layer weight flips the decision survives"),
}

#: Task columns in front of every per-network study table, in order (``arch`` is optional in
#: tables of the previous release, which lacked it).
TASK_COLUMNS = ("model_id", "model", "arch", "train_ber", "train_seed")

_SWEEP = ("model", "ber", "p01", "p10", "map", "map_seed", "accuracy", "rerr", "bits_per_weight",
          "memory_bits")
_MARGIN = ("layer", "layer_index", "kind", "neuron", "fan_in", "tau", "direction", "dead", "n",
           "mean_margin", "min_margin", "q10_margin", "mean_margin_half", "mean_margin_norm",
           "mean_margin_bn", *[f"{s}_se" for s in MARGIN_SE_STATS],
           *[f"cov_layer_{s}" for s in MARGIN_SE_STATS],
           *[f"cov_network_{s}" for s in MARGIN_SE_STATS])
_SUMMARY = ("layer", "layer_index", "kind", "fan_in", "n_neurons", "n_dead", "mean_margin",
            "median_margin", "mean_min_margin", "mean_q10_margin", "mean_margin_half",
            "mean_margin_norm", "mean_margin_bn", "value",
            *[f"{s}_se" for s in MARGIN_SE_STATS], "value_se")
_IMPORTANCE = ("layer", "layer_index", "neuron", "importance", "estimator", "importance_se",
               "bias", "n_samples", "vu_se", "vu_netcov", "vu_layers")
_IVAR = ("estimator", "layer", "layer_index", "n_neurons", "mean", "std", "variance", "cv",
         "value", "bias", "variance_unbiased", "variance_unbiased_se", "noise_share")
_PRED = ("ber", "layer", "layer_index", "predicted_accuracy", "predicted_drop",
         "first_order_accuracy", "clean_accuracy", "n_samples")

_PROTECTION = ("model", "ranking", "unit", "fraction", "protected_fraction", "ber", "p01", "p10",
               "map", "map_seed", "accuracy", "rerr")
_AUC = ("model", "unit", "ber", "ranking", "auc", "gain", "gain_low", "gain_high",
        "better_than_baseline", "n_maps", "n_baseline")


@dataclass(frozen=True)
class _Decl:
    columns: tuple[str, ...]
    description: str
    regenerate: str
    key: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


_STUDY = "bnn-tol study <study file> --out <dir>"
_DECLS: dict[str, _Decl] = {
    "sweep": _Decl(_SWEEP, "one row per (model, BER, fault map)",
                   "bnn-tol sweep <checkpoints> --out <file> (or evaluate.sweep(..., out=))",
                   key=("model", "p01", "p10", "map"),
                   optional=("model_id", "arch", "train_ber", "train_seed")),
    "profile": _Decl(("model", "voltage", "offset", "ber_realized", "p01_realized",
                      "p10_realized", "energy", "energy_saving", "accuracy", "rerr",
                      "clean_accuracy", "bits_per_weight", "memory_bits"),
                     "one row per (model, voltage, placement) on a profiled chip",
                     "bnn-tol sweep <checkpoints> --profile <chip.npz> --out <file>",
                     key=("model", "voltage", "offset")),
    "protection": _Decl(_PROTECTION,
                        "one row per (model, ranking, protected fraction, BER, fault map): "
                        "study.protection.protection",
                        "bnn-tol protect <checkpoint> --out <file>",
                        key=("model", "ranking", "unit", "fraction", "p01", "p10", "map")),
    "protection_auc": _Decl(_AUC, "one row per (model, unit, BER, ranking): the area under the "
                            "protection curve vs random, study.protection.protection_auc",
                            "bnn-tol protect <checkpoint> --out <file>",
                            key=("model", "unit", "ber", "ranking")),
    "margin": _Decl(_MARGIN, "one row per (layer, neuron): metrics.margin",
                    "bnn-tol metrics <checkpoints> --out <file>", key=("layer", "neuron"),
                    optional=("model",)),
    "margin_summary": _Decl(_SUMMARY, "one row per layer plus the network: "
                            "metrics.margin_summary", "bnn-tol metrics ... --summary <file>",
                            key=("layer",), optional=("model",)),
    "importance": _Decl(_IMPORTANCE, "one row per (estimator, layer, neuron): "
                        "metrics.importance", "bnn-tol metrics <checkpoints> --out <file>",
                        key=("estimator", "layer", "neuron"), optional=("model",)),
    "importance_variance": _Decl(_IVAR, "one row per (estimator, layer) plus the network: "
                                 "metrics.importance_variance",
                                 "bnn-tol metrics ... --summary <file>",
                                 key=("estimator", "layer"), optional=("model",)),
    "flip_probability": _Decl(("layer", "layer_index", "neuron", "fan_in", "ber", "flip_prob"),
                              "one row per (layer, neuron, BER): metrics.flip_probability "
                              "(no neuron column: per layer, level='layer')",
                              "bnn-tol metrics ... --flip-ber <p>",
                              key=("layer", "neuron", "ber"), optional=("neuron",)),
    "predictions": _Decl(_PRED, "one row per BER: metrics.predict_accuracy",
                         "metrics.predict_accuracy(model, data, bers)", key=("layer", "ber")),
    "score_margin": _Decl(("sample", "label", "pred", "correct", "score_margin",
                           "score_margin_flips"), "one row per sample: metrics.score_margin",
                          "metrics.score_margin(model, data)", key=("sample",)),
    "attack": _Decl(("model", "method", "attack_seed", "n_flips", "accuracy", "loss",
                     "attack_loss"), "one row per (method, seed, flips so far): "
                    "faults.attack.attack / random_baseline (AttackResult.curve)",
                    "faults.attack.attack(model, data, n_bits)",
                    key=("method", "attack_seed", "n_flips"), optional=("model",)),
    "attack_flips": _Decl(("model", "method", "attack_seed", "n_flips", "layer", "bit_index",
                           "weight_index", "bit", "estimate", "attack_loss"),
                          "one row per flipped bit, in flip order: faults.attack.attack / "
                          "random_baseline (AttackResult.flips_table)",
                          "faults.attack.attack(model, data, n_bits)",
                          key=("method", "attack_seed", "n_flips"), optional=("model",)),
    "study.models": _Decl(("model_id", "model", "arch", "train_ber", "train_seed", "clean_acc",
                           "train_acc", "epochs", "checkpoint", "threads", "recipe"),
                          "a study's models.csv: one row per trained network", _STUDY,
                          key=("model_id",), optional=("recipe",)),
    "study.sweeps": _Decl((*TASK_COLUMNS, *_SWEEP[1:]), "a study's sweeps.csv: one row per "
                          "(network, BER, fault map)", _STUDY, key=("model_id", "p01", "p10",
                                                                    "map"),
                          optional=("arch",)),
    "study.metrics": _Decl((*TASK_COLUMNS, "layer", "metric", "value", "value_se", "split"),
                           "a study's metrics.csv: long form, one row per (network, layer, "
                           "metric, split)", _STUDY,
                           key=("model_id", "layer", "metric", "split"), optional=("arch",)),
    "study.margins": _Decl((*TASK_COLUMNS, *_MARGIN), "a study's margins.csv: per neuron",
                           _STUDY, key=("model_id", "layer", "neuron"), optional=("arch",)),
    "study.importance": _Decl((*TASK_COLUMNS, *_IMPORTANCE), "a study's importance.csv: per "
                              "(estimator, neuron)", _STUDY,
                              key=("model_id", "estimator", "layer", "neuron"),
                              optional=("arch",)),
    "study.predictions": _Decl((*TASK_COLUMNS, *_PRED), "a study's predictions.csv: per "
                               "(network, BER)", _STUDY, key=("model_id", "layer", "ber"),
                               optional=("arch",)),
    "study.protection": _Decl((*TASK_COLUMNS, *_PROTECTION[1:]), "a study's protection.csv: "
                              "per (network, ranking, fraction, BER, fault map)", _STUDY,
                              key=("model_id", "ranking", "unit", "fraction", "p01", "p10",
                                   "map")),
    "study.protection_auc": _Decl((*TASK_COLUMNS, *_AUC[1:]), "a study's protection_auc.csv: "
                                  "per (network, unit, BER, ranking)", _STUDY,
                                  key=("model_id", "unit", "ber", "ranking")),
}

#: Column names of the previous release that this schema no longer uses anywhere.
_RETIRED = re.compile(r"seed|se|se_\w+")


def _no_retired(df: pd.DataFrame) -> bool:
    return not any(isinstance(c, str) and _RETIRED.fullmatch(c) for c in df.columns)


def _unique_key(key: tuple[str, ...]) -> Callable[[pd.DataFrame], pd.Series]:
    def ok(df: pd.DataFrame) -> pd.Series:
        # rows of several networks (a model label, a study's model_id) are keyed by them too;
        # a frame without some key column (a reader asked for less) is not key-checked
        if not all(c in df.columns for c in key):
            return pd.Series(True, index=df.index)
        cols = [*(c for c in ("model_id", "model") if c in df.columns and c not in key), *key]
        return ~df.duplicated(cols, keep=False)
    return ok


def _build(name: str, d: _Decl) -> pa.DataFrameSchema:
    cols = {c: VOCABULARY[c].column(c, required=c not in d.optional) for c in d.columns}
    for c in d.optional:
        cols.setdefault(c, VOCABULARY[c].column(c, required=False))
    checks = [pa.Check(_no_retired, name="no_retired_names",
                       error="has a column name of the previous release (seed, se or se_*): "
                             "upgrade it with bnn_tol.schema.upgrade")]
    if d.key:
        checks.append(pa.Check(_unique_key(d.key), name="unique_key",
                               error=f"repeats the key ({', '.join(d.key)}) of another row"))
    return pa.DataFrameSchema(cols, checks=checks, name=name, description=d.description,
                              metadata={"version": VERSION, "regenerate": d.regenerate,
                                        "key": d.key, "order": d.columns})


#: Every table of the library by name (see the module docstring).
TABLES: dict[str, pa.DataFrameSchema] = {n: _build(n, d) for n, d in _DECLS.items()}


def _schema(table: str) -> pa.DataFrameSchema:
    try:
        return TABLES[table]
    except KeyError:
        raise InvalidArgument(f"unknown table {table!r}; tables: {', '.join(TABLES)}") from None


def columns(table: str) -> list[str]:
    """The columns of ``table`` in the order writers write them (optional ones excluded)."""
    return list(_DECLS[_schema(table).name].columns)


def describe(table: str) -> pd.DataFrame:
    """``column, kind, required, nullable, description`` of every column of ``table``."""
    s = _schema(table)
    return pd.DataFrame([{"column": n, "kind": c.metadata["kind"], "required": c.required,
                          "nullable": c.nullable, "description": c.description}
                         for n, c in s.columns.items()])


def regenerate_hint(table: str) -> str:
    """The command that writes ``table``."""
    return str(_schema(table).metadata["regenerate"])


# -- validation -------------------------------------------------------------------------------

def _message(err: pandera.errors.SchemaErrors | pandera.errors.SchemaError,
             schema: pa.DataFrameSchema) -> str:
    """One line out of a pandera error: per column, what is wrong and an example row."""
    if isinstance(err, pandera.errors.SchemaError):
        fc = getattr(err, "failure_cases", None)
        cases = (fc if isinstance(fc, pd.DataFrame) else pd.DataFrame({"failure_case": [fc]}))
        cases = cases.assign(column=getattr(err.schema, "name", None),
                             check=str(err.check.error if err.check is not None else err))
    else:
        cases = err.failure_cases
    parts: list[str] = []
    check = cases["check"].astype(str)
    missing = cases.loc[check == "column_in_dataframe", "failure_case"]
    if len(missing):
        parts.append(f"lacks column(s) {', '.join(map(repr, sorted(set(map(str, missing)))))}")
    kinds = {f"must hold {w}" for w in _KINDS.values()}
    bad_kind: set[str] = set()
    frame = {str(c.error) for c in schema.checks}
    col_of = cases["column"].astype(str).where(~check.isin(frame), str(schema.name))
    for (col, what), g in cases.groupby([col_of, check], sort=False):
        if what == "column_in_dataframe" or col in bad_kind:
            continue
        if what in kinds:
            bad_kind.add(col)
        what = _PANDERA_WORDS.get(what.split("(")[0], what)
        ex = ""
        if "index" in g.columns and g["index"].notna().any() and what not in kinds:
            i, v = g["index"].dropna().iloc[0], g["failure_case"].iloc[0]
            v = v.item() if hasattr(v, "item") else v
            i = int(i) if isinstance(i, int | float) else i
            ex = f" (e.g. row {i})" if what in frame else f" (e.g. {v!r} at row {i})"
        where = "the table" if col in ("None", "nan", str(schema.name)) else f"column {col!r}"
        parts.append(f"{where} {what}{ex}")
    return "; ".join(dict.fromkeys(parts)) or " ".join(str(err).split())[:200]


#: Pandera's own check names, in words.
_PANDERA_WORDS = {"not_nullable": "has missing values", "dtype": "has the wrong type",
                  "field_uniqueness": "repeats values"}


@lru_cache(maxsize=64)
def _variant(table: str, require: tuple[str, ...] | None) -> pa.DataFrameSchema:
    """``table``, or with ``require`` the same checks but only those columns required."""
    schema = _schema(table)
    if require is None:
        return schema
    extra = {c: VOCABULARY[c].column(c) for c in require
             if c not in schema.columns and c in VOCABULARY}
    schema = schema.add_columns(extra) if extra else schema
    return schema.update_columns({c: {"required": c in require} for c in schema.columns})


def _validate(df: pd.DataFrame, table: str,
              require: tuple[str, ...] | None = None) -> str | None:
    """``None`` if ``df`` fits ``table`` (with ``require``: only those columns required, every
    other declared column checked where present), else the one-line reason."""
    if not isinstance(df, pd.DataFrame):
        return f"is a {type(df).__name__}, not a DataFrame"
    schema = _variant(table, require)
    missing = [c for c in require or () if c not in df.columns and c not in schema.columns]
    if missing:
        return f"lacks column(s) {', '.join(map(repr, missing))}"
    try:
        schema.validate(df, lazy=True)
    except (pandera.errors.SchemaErrors, pandera.errors.SchemaError) as e:
        return _message(e, schema)
    return None


def validate(df: pd.DataFrame, table: str, *, what: str = "the table",
             error: type[Exception] = InvalidArgument) -> pd.DataFrame:
    """Check that ``df`` fits ``table`` (every required column, of its kind, passing its
    checks, the key unique, no column name of the previous release); return ``df`` unchanged.

    Writers call it on what they write. Raises ``error`` (default
    :class:`~bnn_tol.exceptions.InvalidArgument`) with one line:
    ``"<what> is not a valid <table> table: column 'ber' must lie in [0, 1] (e.g. 1.5 at row
    3)"``.
    """
    why = _validate(df, table)
    if why is not None:
        raise error(f"{what} is not a valid {table} table: {why}")
    return df


def _normalize(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Declared kinds as dtypes: float columns float64, int columns int64."""
    out = {}
    for name, col in _schema(table).columns.items():
        if name in df.columns:
            kind = col.metadata["kind"]
            if kind == "float" and df[name].dtype != "float64":
                out[name] = df[name].astype("float64")
            elif kind == "int" and df[name].dtype != "int64":
                out[name] = df[name].astype("int64")
    return df.assign(**out) if out else df


def conform(df: pd.DataFrame, table: str, *, what: str = "the table",
            require: Sequence[str] | None = None) -> pd.DataFrame:
    """``df`` as a ``table`` of this schema: upgraded if it is one of the previous release
    (:func:`upgrade`), validated (:func:`validate`), numeric columns as float64 / int64.

    For readers of frames a user passes (analysis, plots). ``require``: the columns the reader
    needs (default: every required column of ``table``); the other declared columns are
    checked where present. Raises :class:`~bnn_tol.exceptions.InvalidArgument` with one line
    naming ``what`` and the problem.
    """
    if not isinstance(df, pd.DataFrame):
        raise InvalidArgument(f"{what} must be a pandas DataFrame ({table} table), got "
                              f"{type(df).__name__}")
    try:
        df = upgrade(df, table)
    except ResultsMismatch as e:
        raise InvalidArgument(f"{what}: {e}") from None
    why = _validate(df, table, None if require is None else tuple(require))
    if why is not None:
        raise InvalidArgument(f"{what} is not a valid {table} table: {why}")
    return _normalize(df, table)


# -- the previous release ---------------------------------------------------------------------

#: Renames from the previous release (schema 1) to this one, per table. ``se_*`` stands for
#: every ``se_<stat>`` column (-> ``<stat>_se``). In ``sweep``, ``seed`` is the map seed of a
#: sweep CSV; in a study's sweeps.csv (``model_id`` present; it had ``map_seed`` already) it
#: was the training seed.
UPGRADES: dict[str, dict[str, str]] = {
    "sweep": {"seed": "map_seed"},
    "protection": {"seed": "map_seed"},
    "margin": {"se_*": "*_se"},
    "importance": {"se": "importance_se"},
    "study.models": {"seed": "train_seed"},
    "study.sweeps": {"seed": "train_seed"},
    "study.metrics": {"seed": "train_seed", "se": "value_se"},
    "study.margins": {"seed": "train_seed", "se_*": "*_se"},
    "study.importance": {"seed": "train_seed", "se": "importance_se"},
    "study.predictions": {"seed": "train_seed"},
}
#: Columns that sweeps written before codecs lack, and the value they are read with.
_FILL = {"bits_per_weight": math.nan, "memory_bits": -1}


def is_previous(df: pd.DataFrame) -> bool:
    """Whether ``df`` has a column name of the previous release (``seed``, ``se``, ``se_*``)."""
    return not _no_retired(df)


def upgrade(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """A table of the previous release with this schema's names (:data:`UPGRADES`); a table
    without old names is returned as is.

    Sweeps (``sweep``, ``study.sweeps``) written before codecs also get ``bits_per_weight =
    NaN`` and ``memory_bits = -1``. Raises :class:`~bnn_tol.exceptions.ResultsMismatch` when
    an old name cannot be mapped (it is not declared for ``table``, or its new name is taken).
    """
    _schema(table)
    if not is_previous(df):
        return df
    rules = UPGRADES.get(table, {})
    if table == "sweep" and "model_id" in df.columns:
        rules = UPGRADES["study.sweeps"]  # a study's sweeps.csv of the previous release
    ren: dict[str, str] = {}
    for c in df.columns:
        if not (isinstance(c, str) and _RETIRED.fullmatch(c)):
            continue
        new = rules.get(c)
        if new is None and c.startswith("se_") and "se_*" in rules:
            new = f"{c[3:]}_se"
        if new is None:
            raise ResultsMismatch(f"its column {c!r} has no meaning in a {table} table of "
                                  f"this version; regenerate it with {regenerate_hint(table)}")
        if new in df.columns:
            raise ResultsMismatch(f"it has both {c!r} (previous release) and {new!r}; "
                                  f"regenerate it with {regenerate_hint(table)}")
        ren[c] = new
    df = df.rename(columns=ren)
    if table in ("sweep", "study.sweeps"):
        df = df.assign(**{c: v for c, v in _FILL.items() if c not in df.columns})
    return df


def read_csv(path: str | os.PathLike, table: str,
             require: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a CSV file as a ``table``: text columns as text, a table of the previous release
    upgraded (:func:`upgrade`), validated, numeric columns as float64 / int64.

    ``require``: the columns the reader needs (default: every required column of ``table``);
    the other declared columns are checked where present.

    Raises:
        ResultsMismatch: one line naming ``path``, what is wrong and the command that
            regenerates the file.
    """
    hint = regenerate_hint(table)
    schema = _schema(table)
    text_cols = [n for n, c in schema.columns.items() if c.metadata["kind"] == "str"]
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ResultsMismatch(f"{path}: cannot read it ({e.strerror})") from None
    try:
        df = pd.read_csv(io.BytesIO(raw), dtype=dict.fromkeys(text_cols, str),
                         keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError) as e:
        msg = " ".join(str(e).split())
        raise ResultsMismatch(f"{path} is not a {table} CSV ({msg})") from None
    try:
        df = upgrade(df, table)
    except ResultsMismatch as e:
        raise ResultsMismatch(f"{path} was written by an older bnn_tol and {e}") from None
    why = _validate(df, table, None if require is None else tuple(require))
    if why is not None:
        raise ResultsMismatch(f"{path} is not a {table} CSV of bnn_tol (schema {VERSION}): "
                              f"{why}; regenerate it with {hint}")
    return _normalize(df, table)

# -- the metric vocabulary --------------------------------------------------------------------

#: The importance estimator whose plug-in statistics are the paper's (accuracy form).
PAPER_ESTIMATOR = "accuracy"


@dataclass(frozen=True)
class ReportMetric:
    """A network-level metric the report shows: the column of a summary table it comes from,
    where it is shown (``roles``: ``headline`` -- the summary's findings; ``curve`` -- the
    correlation-with-accuracy table and figure; ``scatter`` -- metric vs accuracy figures),
    which direction the paper's claim (a) expects in flip-trained networks (``claim``), and
    for importance columns which estimators (``"every"``; ``"paper"``: a study's only
    estimator or :data:`PAPER_ESTIMATOR`; ``"single"``: a study's only estimator)."""

    table: str
    column: str
    roles: tuple[str, ...] = ()
    claim: str | None = None
    estimators: str = "every"


#: Report metrics in display order (importance ones are repeated per estimator).
REPORT_METRICS: tuple[ReportMetric, ...] = (
    ReportMetric("margin_summary", "mean_margin_norm", ("headline", "curve", "scatter"),
                 claim="larger"),
    ReportMetric("margin_summary", "mean_q10_margin", ("headline",)),
    ReportMetric("importance_variance", "variance_unbiased", ("curve",), claim="smaller"),
    ReportMetric("importance_variance", "variance_unbiased", ("scatter",),
                 estimators="single"),
    ReportMetric("importance_variance", "variance", ("curve",), claim="smaller",
                 estimators="paper"),
    ReportMetric("importance_variance", "variance", ("headline", "scatter"),
                 estimators="single"),
    ReportMetric("importance_variance", "cv", ("headline",), estimators="single"),
    ReportMetric("predictions", "predicted_accuracy", ("curve",)),
    ReportMetric("predictions", "clean_accuracy", ("curve",)),
)


def metric_name(table: str, column: str, estimator: str | None = None) -> str:
    """Name of a summary column in a study's long-form metrics: margin columns keep their name
    (``mean_margin_norm``), importance columns get ``importance_`` (one estimator) or
    ``importance_<estimator>_`` (several) in front; ``predictions`` columns keep theirs."""
    if table == "importance_variance":
        return f"importance_{estimator}_{column}" if estimator else f"importance_{column}"
    if table == "margin_summary" and "margin" not in column:
        return f"margin_{column}"
    return column


def _estimators(names: Iterable[str]) -> list[str | None]:
    """``[None, <estimators named in names in order of appearance>]``."""
    cols = sorted((c for c in _DECLS["importance_variance"].columns
                   if VOCABULARY[c].kind == "float"), key=len, reverse=True)
    out: list[str | None] = [None]
    for n in names:
        if not n.startswith("importance_"):
            continue
        rest = n[len("importance_"):]
        for c in cols:
            if rest.endswith("_" + c) and rest != c:
                est = rest[:-len(c) - 1]
                if est not in out:
                    out.append(est)
                break
    return out


def _expand(m: ReportMetric, ests: list[str | None]) -> list[str]:
    if m.table != "importance_variance":
        return [metric_name(m.table, m.column)]
    ok = {"every": ests, "paper": [None, PAPER_ESTIMATOR], "single": [None]}[m.estimators]
    return [metric_name(m.table, m.column, e) for e in ests if e in ok]


def report_metrics(role: str, present: Iterable[str] | None = None) -> list[str]:
    """Metric names the report shows in ``role`` (``headline``, ``curve``, ``scatter``), in
    display order; with ``present`` (the metric names of a study) those present, importance
    metrics grouped per estimator in the order the study names them."""
    names = list(dict.fromkeys(present)) if present is not None else None
    ests = _estimators(names) if names is not None else [None]
    out: list[str] = []
    imp = [m for m in REPORT_METRICS if m.table == "importance_variance" and role in m.roles]
    done_imp = False
    for m in REPORT_METRICS:
        if role not in m.roles:
            continue
        if m.table == "importance_variance":
            if done_imp:
                continue
            done_imp = True
            out += [n for e in ests for x in imp for n in _expand(x, [e])]
        else:
            out += _expand(m, ests)
    out = list(dict.fromkeys(out))
    return out if names is None else [n for n in out if n in set(names)]


def claim_metrics(present: Iterable[str] | None = None) -> dict[str, str]:
    """``{metric name: "larger" | "smaller"}``: the direction the paper's claim (a) expects in
    flip-trained networks, for the declared metrics (every estimator's importance variance);
    with ``present`` only those present."""
    names = list(dict.fromkeys(present)) if present is not None else None
    ests = _estimators(names) if names is not None else [None]
    out: dict[str, str] = {}
    for m in REPORT_METRICS:
        if m.claim is not None:
            for n in (_expand(m, ests) if m.table != "importance_variance" else
                      [metric_name(m.table, m.column, e) for e in ests]):
                out.setdefault(n, m.claim)
    return out if names is None else {k: v for k, v in out.items() if k in set(names)}


def _check_declarations(decls: Mapping[str, Any] = _DECLS) -> None:
    """Every report metric names a declared column of its table (import-time guard)."""
    for m in REPORT_METRICS:
        if m.column not in decls[m.table].columns:
            raise AssertionError(f"report metric {m.column!r} is not a column of {m.table}")


_check_declarations()
