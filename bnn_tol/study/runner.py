"""The correlation study: train a family of BNNs, sweep them under bit errors, measure them.

A study is a grid of independent tasks ``(model, training BER, training seed)``. Each task

1. builds the model (``models.build(name, seed=train_seed)``) and trains it
   (``train.fit(..., flip_ber=train_ber, seed=train_seed)``; ``train_ber == 0`` is normal
   training),
2. saves the checkpoint (``bnn_tol.save``) in ``out/models/<task-id>/``,
3. sweeps it (``engines.sweep`` over the evaluation BERs x fault maps),
4. measures it (``metrics.margin`` + ``margin_summary``, ``metrics.score_margin`` of the last
   layer, ``metrics.importance`` + ``importance_variance``) on the metric subset and on its
   two halves, and predicts its accuracy under BER (``metrics.predict_accuracy``),

and writes its tables into the task directory (each file atomically, the ``done`` marker
last). Re-running skips tasks whose ``done`` marker matches the task spec; a failed task
writes ``error.txt``, is reported, and does not stop the others. At the end the per-task
tables are concatenated into tidy files in ``out/``, each a table of :mod:`bnn_tol.schema`
(validated when written; ``study.<stem>``). Every per-network table starts with the task
columns ``model_id, model, arch, train_ber, train_seed`` (``model``: the ``[[models]] label``;
``arch``: its architecture, the ``name``; ``train_seed``: the training seed):

- ``models.csv``: one row per task: task columns, ``clean_acc, train_acc, epochs,
  checkpoint, threads`` (timings are not results: they are in ``status.csv`` and each task's
  ``history.csv``);
- ``sweeps.csv``: one row per (task, BER, map): task columns and the rows of
  ``engines.sweep`` (``ber, p01, p10, map, map_seed, accuracy, rerr, bits_per_weight,
  memory_bits``);
- ``metrics.csv``: long form: task columns, ``layer, metric, value, value_se, split``
  (``layer == "network"`` for network-level aggregates). ``value_se`` is the metric's
  standard error where the library gives one (a summary column ``X_se`` is the se of
  ``X``; the ``X_se`` columns are metrics of their own too), else NaN. ``split`` is
  ``"all"`` for the whole metric subset (written first for each task) and ``"a"`` / ``"b"``
  for its two disjoint random halves (:func:`metric_halves`, seeded by ``subset_seed``),
  from which the analysis computes split-half reliability across networks. Metrics: the
  per-layer and network statistics of ``margin_summary`` (``mean_margin, median_margin,
  mean_min_margin, mean_q10_margin, mean_margin_half, mean_margin_norm, mean_margin_bn``),
  ``score_margin`` and ``score_margin_flips`` (last layer: mean over correctly
  classified samples) and
  ``importance_variance``, ``importance_cv``, ``importance_mean``, ``importance_std`` (the
  numeric columns of ``importance_variance``; with several estimators in ``[metrics]
  importance = [...]`` they are named ``importance_<estimator>_variance`` etc.:
  :func:`bnn_tol.schema.metric_name`);
- ``margins.csv`` / ``importance.csv``: per-neuron tables of ``metrics.margin`` /
  ``metrics.importance`` (whole metric subset) with the task columns in front;
- ``predictions.csv`` (fc models: :func:`bnn_tol.metrics.predict_accuracy` refuses conv ones;
  :func:`bnn_tol.metrics.predict.unsupported`): accuracy predicted from
  the margins on the metric subset at each symmetric evaluation BER, task columns in front;
- ``status.csv``: ``model_id, status (done|cached|failed), seconds, train_s, sweep_s,
  metrics_s, error`` (a cached task reports the timings it recorded when it ran);
- ``study.json`` (the resolved config) and ``environment.json`` (:func:`environment`:
  versions, git commit, CPU, threads, and the command that reproduces the run).

A task is a pure function of its spec (all randomness seeded, ``torch.set_num_threads``
fixed; labels and the study name are validated as plain names, so nothing is written
outside ``out``), so the in-process run and a dask.distributed run give the same files, bit for bit.

Study files are TOML (see ``bnn_tol/presets/*.toml``; every key has a default, see
:data:`DEFAULTS`)::

    name = "quick"
    [data]    dataset, train_subset, test_subset, metric_subset, subset_seed, data_dir
    [train]   bers, seeds, epochs, batch_size, lr, lr_step, lr_gamma, loss, flip_layers,
              flip_warmup
    [eval]    bers, n_maps, seed, layers, batch_size, engine (``engines.sweep``'s; all exact),
              error (the error model, a name of ``bnn_tol.errors.models()``)
    [metrics] importance (estimator name or list of names), batch_size
    [run]     device, threads ("auto": cores // concurrent tasks, or an integer), workers
              (> 1: a local Dask cluster of that many single-thread worker processes)
    [[models]] label, name, and the model's keyword arguments (hidden = [256, 256], ...)
    [protection] rankings (empty: off), fractions, bers, n_maps, unit, seeds, train_bers,
              batch_size

``[train] flip_layers`` may list several recipes (``["all", "hidden"]``): each is a group of
networks of its own (:func:`recipes`). ``[protection]`` adds metric-guided protection curves
(:func:`bnn_tol.study.protection.protection`) for the networks of the chosen training seeds
and BERs (``"all"``): the units ranked on a random subset of the *training* set
(``metric_subset`` images, so the ranking never sees the evaluated images), evaluated on the
test subset with the fault maps of ``[eval] seed``; written as ``protection.csv`` and
``protection_auc.csv`` (area under each curve relative to random, with its bootstrap
interval). The rankings must include ``random:<seed>`` entries (the baseline). Protection
curves may be added to a finished study: the stage is cached on its own settings.

``train_subset`` / ``test_subset`` / ``metric_subset`` are random subsets (seeded by
``subset_seed``) of the training set (training), the test set (sweeps, clean accuracy) and
the test set (margins and importance); ``None`` means the whole split. The training seed
seeds the initialization, the shuffling and the training flips, so the normal and the
flip-trained network of one seed start from the same weights. The fault maps depend only
on ``[eval] seed``: every network meets the same chips.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from bnn_tol import data, engines, faults, files, metrics, provenance, schema, train
from bnn_tol.core import models
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import BnnTolError, InvalidArgument, OutputError, ResultsMismatch
from bnn_tol.faults.registry import error_model
from bnn_tol.files import atomic_write
from bnn_tol.interop import checkpoint
from bnn_tol.metrics import estimators, predict
from bnn_tol.provenance import available_cores
from bnn_tol.study import protection as prot

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport has the same API
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["presets", "load_config", "tasks", "run_task", "run", "collect", "TABLES", "SCHEMAS",
           "DEFAULTS", "engine_choices", "MARKER", "MAX_TASKS", "MAX_WORKERS"]

#: Defaults filled into every study config (a study file overrides any of them).
DEFAULTS: dict[str, Any] = {
    "name": "study",
    "data": {"dataset": "fashion-mnist", "train_subset": None, "test_subset": None,
             "metric_subset": 2000, "subset_seed": 0, "data_dir": None},
    "train": {"bers": [0.0, 0.1], "seeds": [0], "epochs": 10, "batch_size": 256, "lr": 1e-3,
              "lr_step": None, "lr_gamma": 0.5, "loss": "ce", "flip_layers": "all",
              "flip_warmup": 0},
    "eval": {"bers": [0.0, 0.01, 0.02, 0.05, 0.1], "n_maps": 10, "seed": 0, "layers": "all",
             "batch_size": 2048, "engine": "auto", "error": "bernoulli"},
    "metrics": {"importance": "accuracy", "batch_size": 1024},
    "run": {"device": "cpu", "threads": "auto", "workers": 1},
    "models": [{"label": "fc", "name": "fc"}],
    "protection": {"rankings": [], "fractions": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
                   "bers": [0.05, 0.1, 0.2], "n_maps": 10, "unit": "neuron", "seeds": "all",
                   "train_bers": "all", "batch_size": 1000},
}

#: Tidy tables concatenated by :func:`collect` (file stem in each task dir -> output file).
TABLES = {"sweep": "sweeps.csv", "metrics": "metrics.csv", "margin": "margins.csv",
          "importance": "importance.csv", "predictions": "predictions.csv",
          "protection": "protection.csv", "protection_auc": "protection_auc.csv"}
#: The :mod:`bnn_tol.schema` table of each file stem (per task and collected).
SCHEMAS = {"model": "study.models", "sweep": "study.sweeps", "metrics": "study.metrics",
           "margin": "study.margins", "importance": "study.importance",
           "predictions": "study.predictions", "protection": "study.protection",
           "protection_auc": "study.protection_auc"}
#: Tables a finished task may lack (``metrics.predict_accuracy`` is optional; protection
#: curves only where ``[protection]`` asks for them).
_OPTIONAL = {"predictions", "protection", "protection_auc"}
#: Tables of the protection stage (collected only from tasks whose stage finished).
_PROTECTION_TABLES = ("protection", "protection_auc")
#: Keys of ``[protection]`` that select networks (the grid), not how curves are computed.
_PROTECTION_GRID = ("seeds", "train_bers")
#: The protection stage's marker: its settings hash and seconds (written last).
_PROTECTED = "protection.json"
_TASK_COLS = list(schema.TASK_COLUMNS)
_DONE = "done"
_TIMING = "timing.json"
#: Per-stage wall-clock seconds a task records in ``timing.json`` (train includes saving).
_STAGES = ("train_s", "sweep_s", "metrics_s", "protect_s")
STATUS_COLUMNS = ["model_id", "status", "seconds", *_STAGES, "error"]


# -- configuration ----------------------------------------------------------------------------

def presets() -> list[str]:
    """Names of the study presets shipped with the package (``bnn_tol/presets/*.toml``)."""
    root = resources.files("bnn_tol") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(
    study: str | os.PathLike | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a study: a preset name (:func:`presets`), a TOML path, or a dict.

    ``overrides`` is merged last, section-wise, e.g. ``{"train": {"epochs": 1}}`` (this is
    how the ``fmnist`` study is scaled down or up).

    Every key is type- and range-checked against :data:`DEFAULTS` (integer keys refuse
    floats and booleans, BERs lie in [0, 1], labels and the name are plain names), and every
    count is bounded: ``[train] epochs`` and ``[run] threads`` as :func:`bnn_tol.train.fit`,
    ``[eval] n_maps`` and the sweep rows per network as :func:`bnn_tol.evaluate.sweep`, at
    most :data:`MAX_TASKS` tasks and :data:`MAX_WORKERS` workers.

    Raises:
        InvalidArgument: unknown preset/path, unknown sections or keys, or invalid values
            (names the key and the value, and says what is allowed).
    """
    if isinstance(study, Mapping):
        raw = dict(study)
    else:
        text = str(study)
        path = Path(text)
        if path.is_file():
            raw = _read_toml(path)
            raw.setdefault("name", path.stem)
        elif text in presets():
            raw = tomllib.loads((resources.files("bnn_tol") / "presets" / f"{text}.toml")
                                .read_text())
            raw.setdefault("name", text)
        else:
            raise InvalidArgument(f"{text!r} is neither a study file nor a preset; presets: "
                             f"{', '.join(presets())}")
    for where, over in (("study", raw), ("overrides", overrides or {})):
        unknown = set(over) - set(DEFAULTS) - {"description"}
        if unknown:
            raise InvalidArgument(f"unknown study section(s) {sorted(unknown)} in {where}; "
                                  f"allowed: {sorted(DEFAULTS)}")
        for sec, val in over.items():
            if isinstance(DEFAULTS.get(sec), dict):
                if not isinstance(val, Mapping):
                    raise _bad(f"[{sec}]", val, "a table")
                bad = set(val) - set(DEFAULTS[sec])
                if bad:
                    raise InvalidArgument(f"unknown key(s) {sorted(bad)} in [{sec}]; allowed: "
                                          f"{sorted(DEFAULTS[sec])}")
    cfg = _merge(DEFAULTS, raw)
    if overrides:
        cfg = _merge(cfg, overrides)
    _validate(cfg)
    return cfg


#: Largest study file read (a study file is a page of TOML).
_MAX_STUDY_FILE = 1 << 20


def _read_toml(path: Path) -> dict[str, Any]:
    """A study file's TOML (InvalidArgument naming the file if it is not UTF-8 TOML)."""
    try:
        if path.stat().st_size > _MAX_STUDY_FILE:
            raise InvalidArgument(f"{path} is larger than {_MAX_STUDY_FILE} bytes: not a study "
                                  "file")
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
        raise InvalidArgument(f"{path} is not a TOML study file ({e})") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read the study file {path} ({e.strerror})") from None


#: Most tasks (models x training BERs x seeds) and local Dask workers of one study.
MAX_TASKS = 10_000
MAX_WORKERS = 256

#: A label or study name is a file name, never a path: it names directories under ``out``.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DEVICES = ("cpu", "cuda", "auto")
_LOSSES = ("ce", "mhl")


def engine_choices() -> tuple[str, ...]:
    """``[eval] engine`` values: ``auto`` and the registered engines (all exact: the choice
    changes speed, not results)."""
    return ("auto", *engines.engines())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _bad(where: str, val: Any, want: str) -> InvalidArgument:
    return InvalidArgument(f"{where} must be {want}, got {val!r}")


def _check_name(where: str, val: Any) -> None:
    if not (isinstance(val, str) and _NAME.fullmatch(val) and val not in (".", "..")):
        raise _bad(where, val, "a name of letters, digits, '.', '_' and '-' starting with a "
                   "letter or digit (it names a directory: no path separators, not '.'/'..')")


def _check_int(where: str, val: Any, lo: int, *, none: bool = False,
               hi: int | None = None) -> None:
    if none and val is None:
        return
    if not _is_int(val) or val < lo or (hi is not None and val > hi):
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise _bad(where, val, want + (" or absent" if none else ""))


def _check_ber(where: str, val: Any, *, pairs: bool) -> None:

    ok = _is_num(val) or (pairs and isinstance(val, list | tuple) and len(val) == 2
                          and all(_is_num(v) for v in val))
    if not ok:
        raise _bad(where, val, "a number p" + (" or a pair [p01, p10]" if pairs else ""))
    try:
        faults.rates(tuple(val) if isinstance(val, list) else val)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from e


def _check_layers(where: str, val: Any) -> None:
    if val is None or val in ("all", "hidden"):
        return
    if not (isinstance(val, list) and val and all(_is_int(v) or isinstance(v, str) for v in val)):
        raise _bad(where, val, "'all', 'hidden' or a non-empty list of layer positions/names")


#: Named bit flip training recipes (the layers that get flips while training).
RECIPES = ("all", "hidden")


def _recipe_name(layers: Any) -> str:
    if layers is None:
        return "all"
    if isinstance(layers, str):
        return layers
    return "layers-" + "-".join(str(v) for v in layers)


def recipes(flip_layers: Any) -> list[tuple[str, Any]]:
    """The training recipes of ``[train] flip_layers``: ``[(name, layers)]``.

    A recipe says which layers get bit flips while training: ``"all"``, ``"hidden"`` (all but
    the first and the last) or a list of layer positions/names (named
    ``layers-<p1>-<p2>...``). A list whose entries are recipes (``["all", "hidden"]``, or
    lists of layers) is an axis of the study: every (model, recipe) pair is a group of its
    own, labelled ``<label>-<recipe>``, crossed with the training BERs and seeds. A flat list
    of positions/names is one recipe.
    """
    if (isinstance(flip_layers, list) and flip_layers
            and any(isinstance(v, list) or v in RECIPES for v in flip_layers)):
        items = list(flip_layers)
    else:
        items = [flip_layers]
    return [(_recipe_name(v), v) for v in items]


def _group_label(label: str, recipe: str, recs: list) -> str:
    """The model group of a task: the ``[[models]]`` label, ``<label>-<recipe>`` when the
    study has a recipe axis (:func:`recipes`)."""
    return f"{label}-{recipe}" if len(recs) > 1 else label


def _validate(cfg: dict) -> None:
    """Type- and range-check every key of a merged config; errors name the key and value."""

    _check_name("name", cfg["name"])
    if not isinstance(cfg.get("description", ""), str):
        raise _bad("description", cfg["description"], "a string")
    for sec in DEFAULTS:
        if sec != "name" and not isinstance(cfg[sec], dict if sec != "models" else list):
            raise _bad(f"[{sec}]", cfg[sec], "a table" if sec != "models" else
                       "an array of tables [[models]]")
    d, tr, ev, mt, rn = cfg["data"], cfg["train"], cfg["eval"], cfg["metrics"], cfg["run"]
    if not isinstance(d["dataset"], str) or not d["dataset"]:
        raise _bad("[data] dataset", d["dataset"], "a dataset name")
    for k in ("train_subset", "test_subset", "metric_subset"):
        _check_int(f"[data] {k}", d[k], 1, none=True)
    _check_int("[data] subset_seed", d["subset_seed"], 0)
    if d["data_dir"] is not None and not isinstance(d["data_dir"], str):
        raise _bad("[data] data_dir", d["data_dir"], "a directory path (string)")

    for sec, pairs in (("train", False), ("eval", True)):
        bers = cfg[sec]["bers"]
        if not isinstance(bers, list) or not bers:
            raise _bad(f"[{sec}] bers", bers, "a non-empty list of bit error rates")
        for p in bers:
            _check_ber(f"[{sec}] bers", p, pairs=pairs)
    seeds = tr["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(_is_int(v) and 0 <= v <= train.MAX_SEED for v in seeds)
            or len(set(seeds)) != len(seeds)):
        raise _bad("[train] seeds", seeds, "a non-empty list of distinct integers in [0, 2^63)")
    _check_int("[train] epochs", tr["epochs"], 1, hi=train.MAX_EPOCHS)
    _check_int("[train] batch_size", tr["batch_size"], 1)
    if not _is_num(tr["lr"]) or tr["lr"] <= 0:
        raise _bad("[train] lr", tr["lr"], "a positive number")
    _check_int("[train] lr_step", tr["lr_step"], 1, none=True)
    if not _is_num(tr["lr_gamma"]) or tr["lr_gamma"] <= 0:
        raise _bad("[train] lr_gamma", tr["lr_gamma"], "a positive number")
    if tr["loss"] not in _LOSSES:
        raise _bad("[train] loss", tr["loss"], f"one of {list(_LOSSES)}")
    recs = recipes(tr["flip_layers"])
    for _, layers in recs:
        _check_layers("[train] flip_layers", layers)
    if len({n for n, _ in recs}) != len(recs):
        raise _bad("[train] flip_layers", tr["flip_layers"], "distinct recipes")
    _check_int("[train] flip_warmup", tr["flip_warmup"], 0)

    _check_int("[eval] n_maps", ev["n_maps"], 1, hi=engines.driver.MAX_MAPS)
    if len(ev["bers"]) * ev["n_maps"] > engines.driver.MAX_ROWS:
        raise InvalidArgument(f"[eval] bers x n_maps = {len(ev['bers'])} x {ev['n_maps']} is "
                              f"more than {engines.driver.MAX_ROWS} sweep rows per network")
    _check_int("[eval] seed", ev["seed"], 0)
    _check_layers("[eval] layers", ev["layers"])
    _check_int("[eval] batch_size", ev["batch_size"], 1)
    if ev["engine"] not in engine_choices():
        raise _bad("[eval] engine", ev["engine"], f"one of {list(engine_choices())}")
    try:
        em = error_model(ev["error"])
        for p in ev["bers"]:
            em.check_rates(*faults.rates(tuple(p) if isinstance(p, list) else p))
    except InvalidArgument as e:
        raise InvalidArgument(f"[eval] error: {e}") from e

    ests = [mt["importance"]] if isinstance(mt["importance"], str) else mt["importance"]
    if (not isinstance(ests, list) or not ests
            or not all(isinstance(e, str) and e in estimators.names() for e in ests)
            or len(set(ests)) != len(ests)):
        raise _bad("[metrics] importance", mt["importance"],
                   f"an estimator or a list of distinct ones of {estimators.names()}")
    _check_int("[metrics] batch_size", mt["batch_size"], 1)

    if rn["device"] not in _DEVICES:
        raise _bad("[run] device", rn["device"], f"one of {list(_DEVICES)}")
    if rn["threads"] != "auto":
        _check_int("[run] threads", rn["threads"], 1, hi=train.MAX_THREADS)
    _check_int("[run] workers", rn["workers"], 1, hi=MAX_WORKERS)

    _validate_protection(cfg["protection"], tr)

    if not cfg["models"]:
        raise _bad("[[models]]", cfg["models"], "a non-empty list of model tables")
    labels = []
    for m in cfg["models"]:
        if not isinstance(m, dict):
            raise _bad("[[models]] entry", m, "a table with name, label and model arguments")
        if m.get("name") not in models.available():
            raise InvalidArgument(f"[[models]] entry {m}: name must be one of "
                                  f"{models.available()}")
        label = m.get("label", m["name"])
        _check_name("[[models]] label", label)
        for rname, _ in recs:
            labels.append(_group_label(label, rname, recs))
            _check_name("[[models]] label-recipe", labels[-1])
    if len(set(labels)) != len(labels):
        raise _bad("[[models]] labels (with their recipes)", labels, "unique")
    n_tasks = len(labels) * len(tr["bers"]) * len(seeds)
    if n_tasks > MAX_TASKS:
        raise InvalidArgument(f"{len(labels)} model(s) and recipe(s) x {len(tr['bers'])} "
                              f"training BER(s) x {len(seeds)} seed(s) = {n_tasks} tasks, more "
                              f"than {MAX_TASKS}")


def _validate_protection(pr: dict, tr: dict) -> None:
    """Check the ``[protection]`` section (``rankings = []``: no protection stage)."""
    ranks = pr["rankings"]
    if not isinstance(ranks, list) or not all(isinstance(r, str) for r in ranks):
        raise _bad("[protection] rankings", ranks, "a list of ranking names")
    if not ranks:
        return
    if len(set(ranks)) != len(ranks):
        raise _bad("[protection] rankings", ranks, "distinct rankings")
    try:
        for r in ranks:
            prot.check_ranking(r)
    except InvalidArgument as e:
        raise InvalidArgument(f"[protection] rankings: {e}") from e
    if not any(r.split(":")[0] == "random" for r in ranks):
        raise _bad("[protection] rankings", ranks, "at least one random:<seed> ranking (the "
                   "baseline every ranking is compared with)")
    fr = pr["fractions"]
    if (not isinstance(fr, list) or len(fr) < 2
            or not all(_is_num(f) and 0 <= f <= 1 for f in fr)
            or any(b <= a for a, b in zip(fr, fr[1:], strict=False))):
        raise _bad("[protection] fractions", fr, "an increasing list of at least two fractions "
                   "in [0, 1]")
    if not isinstance(pr["bers"], list) or not pr["bers"]:
        raise _bad("[protection] bers", pr["bers"], "a non-empty list of bit error rates")
    for p in pr["bers"]:
        _check_ber("[protection] bers", p, pairs=True)
    _check_int("[protection] n_maps", pr["n_maps"], 1, hi=engines.driver.MAX_MAPS)
    rows = len(ranks) * len(fr) * len(pr["bers"]) * pr["n_maps"]
    if rows > engines.driver.MAX_ROWS:
        raise InvalidArgument(f"[protection] rankings x fractions x bers x n_maps = {rows} rows "
                              f"per network, more than {engines.driver.MAX_ROWS}")
    if pr["unit"] not in prot.UNITS:
        raise _bad("[protection] unit", pr["unit"], f"one of {list(prot.UNITS)}")
    for key, grid in (("seeds", tr["seeds"]), ("train_bers", tr["bers"])):
        v = pr[key]
        if v != "all" and (not isinstance(v, list) or not v or any(x not in grid for x in v)):
            raise _bad(f"[protection] {key}", v, f"\"all\" or a non-empty subset of [train] "
                       f"{'seeds' if key == 'seeds' else 'bers'} {grid}")
    _check_int("[protection] batch_size", pr["batch_size"], 1)


def check(cfg: Mapping[str, Any]) -> None:
    """Check that a validated config can run, before anything is trained.

    Loads the datasets (``[data] dataset`` must be known and its files present) and builds
    every ``[[models]]`` entry once on the ``meta`` device with the dataset's shape, then
    runs a meta forward pass of a batch of shape ``(2, C, H, W)``: unknown or invalid model
    arguments, shape mismatches and models too large to train in this machine's memory
    (:func:`bnn_tol.train.check_memory`) are found here, not after training. Costs no memory
    for weights.

    Raises:
        InvalidArgument: naming ``[data] dataset`` or the ``[[models]]`` label.
        DatasetNotFound, CorruptDataset: the dataset's files are missing or corrupt.
    """
    import torch

    d = cfg["data"]
    try:
        train_ds = _dataset(d["dataset"], "train", d["data_dir"])
        _dataset(d["dataset"], "test", d["data_dir"])
    except InvalidArgument as e:
        raise InvalidArgument(f"[data] dataset = {d['dataset']!r}: {e}") from e
    except BnnTolError as e:
        raise type(e)(f"[data] dataset = {d['dataset']!r}: {e}") from e
    for m in cfg["models"]:
        entry = dict(m)
        label, name = entry.pop("label", m["name"]), entry.pop("name")
        kwargs = {"in_shape": train_ds.shape, "n_classes": len(train_ds.classes), **entry}
        try:
            with torch.device("meta"):
                net = models.build(name, **kwargs)
                net.eval()(torch.zeros(2, *train_ds.shape))
        except Exception as e:  # noqa: BLE001 -- any failure here is the entry's arguments
            raise InvalidArgument(f"[[models]] {label!r}: cannot build {name} with {entry} on "
                                  f"{d['dataset']} images {tuple(train_ds.shape)}: "
                                  f"{type(e).__name__}: {e}") from e
        train.check_memory(net, f"[[models]] {label!r}")


def auto_threads(cores: int, concurrent: int) -> int:
    """Torch threads per task so that tasks x threads never exceed the cores.

    ``threads = max(1, cores // concurrent)`` where ``concurrent`` is the number of tasks
    that run at the same time on the machine (Dask: the worker threads on that host;
    in-process: 1). Oversubscribing (e.g. 2 workers x 2 threads on 2 cores) makes torch's
    parallel kernels wait on each other: metrics ran ~10x slower.
    """
    if not (_is_int(cores) and cores >= 1 and _is_int(concurrent) and concurrent >= 1):
        raise InvalidArgument(f"cores and concurrent must be integers >= 1, got {cores!r}, "
                              f"{concurrent!r}")
    return max(1, cores // concurrent)


def task_id(label: str, train_ber: float, seed: int) -> str:
    """``<label>_ber<p>_s<seed>``, e.g. ``fc_ber0.1_s0``: the task's directory name."""
    return f"{label}_ber{float(train_ber):g}_s{int(seed)}"


def tasks(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The grid ``models x recipes x training BERs x seeds`` as self-contained task specs.

    With one recipe (:func:`recipes`) a task is labelled by its model's label; with several,
    by ``<label>-<recipe>`` (and its spec names the recipe), so every analysis grouped by
    ``model`` is per recipe.

    Each spec holds everything the task needs (``data``, ``train``, ``eval``, ``metrics``,
    ``run`` sections, the model entry, ``train_ber``, ``seed``, ``model_id``), so that
    :func:`run_task` is a pure function of it. ``[run] threads = "auto"`` resolves to every
    core of this machine (one task at a time); :func:`run` resolves it for its workers first.
    """
    out = []
    threads = cfg["run"]["threads"]
    threads = auto_threads(available_cores(), 1) if threads == "auto" else int(threads)
    recs = recipes(cfg["train"]["flip_layers"])
    grid = [(m, rname, layers) for m in cfg["models"] for rname, layers in recs]
    for m, rname, layers in grid:
        label = _group_label(m.get("label", m["name"]), rname, recs)
        for ber in cfg["train"]["bers"]:
            for seed in cfg["train"]["seeds"]:
                spec = {sec: copy.deepcopy(dict(cfg[sec]))
                        for sec in ("data", "train", "eval", "metrics", "run")}
                del spec["train"]["bers"], spec["train"]["seeds"]
                spec["train"]["flip_layers"] = copy.deepcopy(layers)
                if len(recs) > 1:  # a single recipe keeps the spec (and hash) it always had
                    spec["recipe"] = rname
                spec["run"]["threads"] = threads
                del spec["run"]["workers"]  # how tasks are spread does not change them
                if spec["eval"]["error"] == DEFAULTS["eval"]["error"]:
                    # the default is not part of the spec: tasks finished before error models
                    # were selectable keep their hash (and stay cached)
                    del spec["eval"]["error"]
                spec.update(model=dict(m, label=label), train_ber=float(ber), seed=int(seed),
                            model_id=task_id(label, ber, seed))
                pr = cfg["protection"]
                if pr["rankings"] and all(pr[k] == "all" or v in pr[k] for k, v in
                                          (("seeds", seed), ("train_bers", ber))):
                    spec["protection"] = {k: copy.deepcopy(v) for k, v in pr.items()
                                          if k not in ("seeds", "train_bers")}
                out.append(spec)
    return out


def _spec_hash(spec: Mapping[str, Any]) -> str:
    """The hash of what a task's training, sweep and metrics depend on (its protection
    settings are hashed by their own stage, so adding them keeps the task cached)."""
    base = {k: v for k, v in spec.items() if k != "protection"}
    return hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()


# -- one task -----------------------------------------------------------------------------------

def _write_csv(df: pd.DataFrame, path: Path, table: str | None = None) -> None:
    """Write ``df`` atomically; validated against the schema ``table`` first, if given."""
    if table is not None:
        schema.validate(df, table, what=str(path))
    atomic_write(path, lambda p: df.to_csv(p, index=False), replace=True)


def _write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text), replace=True)


@lru_cache(maxsize=8)
def _dataset(name: str, split: str, data_dir: str | None):

    return data.load(name, split, data_dir=data_dir)


def _subset(ds, n, seed):
    return ds if n is None else ds.subset(int(n), seed=int(seed))


def _long_metrics(summary: pd.DataFrame, table: str,
                  estimator: str | None = None) -> pd.DataFrame:
    """Melt a per-layer summary (``layer`` + numeric columns) to ``layer, metric, value,
    value_se``.

    Columns that identify or count rather than measure (``layer_index, n_neurons, n_dead,
    fan_in``) and ``value`` / ``value_se`` (copies of the headline column and its se) are
    dropped; metric names are :func:`bnn_tol.schema.metric_name` of ``table`` (the summary's
    schema table), the column and ``estimator``. Standard errors are picked up generically:
    a column ``X_se`` is the se of metric ``X`` (and ``value_se`` that of the headline
    column ``value`` repeats, if it has no ``X_se``); every ``X_se`` column is also kept as
    a metric of its own. ``value_se`` is NaN where the summary has none.
    """
    skip = {"layer", "layer_index", "kind", "n", "n_neurons", "n_dead", "neurons", "fan_in",
            "estimator", "value", "value_se", "model"}
    cols = [c for c in summary.columns
            if c not in skip and pd.api.types.is_numeric_dtype(summary[c])
            and not pd.api.types.is_bool_dtype(summary[c])]
    se_of = {c[:-3]: c for c in cols if c.endswith("_se") and c[:-3] in cols}
    if "value" in summary.columns and "value_se" in summary.columns:
        head = next((c for c in cols if summary[c].equals(summary["value"])), None)
        if head is not None and head not in se_of:
            se_of[head] = "value_se"
    long = summary[["layer", *cols]].melt(id_vars=["layer"], var_name="metric",
                                          value_name="value")
    se = pd.concat([summary[se_of[c]] if c in se_of else
                    pd.Series(math.nan, index=summary.index) for c in cols], ignore_index=True)
    long["value_se"] = se.astype(float).to_numpy()
    long["metric"] = [schema.metric_name(table, c, estimator) for c in long["metric"]]
    long["layer"] = long["layer"].astype(str)
    long["value"] = long["value"].astype(float)
    return long


def metric_halves(ds, seed: int) -> tuple[Any, Any]:
    """Two disjoint random halves ``(a, b)`` of a metric subset, for split-half reliability.

    A permutation of ``len(ds)`` drawn from ``torch.Generator().manual_seed(seed)``: its
    first ``ceil(N / 2)`` images are half ``a``, the rest half ``b``. Same seed -> same halves.
    """
    import torch

    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    cut = (n + 1) // 2
    return tuple(BNNDataset(ds.images[idx], ds.labels[idx], name=ds.name, split=ds.split,
                            classes=ds.classes) for idx in (perm[:cut], perm[cut:]))


def _metric_rows(model, ds, ests: list[str], batch_size: int):
    """``(margin table, importance table, long metrics)`` of one model on one image set."""

    mg = metrics.margin(model, ds, batch_size=batch_size)
    imp = metrics.importance(model, ds, estimator=ests, batch_size=batch_size)
    sm = metrics.score_margin(model, ds, batch_size=batch_size)
    sm = sm[sm["correct"].astype(bool)]
    last = list(model.binary_layers())[-1]
    vals = [sm[c].to_numpy(dtype=float) for c in ("score_margin", "score_margin_flips")]
    score = pd.DataFrame({"layer": last, "metric": ["score_margin", "score_margin_flips"],
                          "value": [float(sm[c].mean()) for c in ("score_margin",
                                                                  "score_margin_flips")],
                          "value_se": [float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1
                                       else math.nan for v in vals]})
    iv = metrics.importance_variance(imp)
    iv = iv if "estimator" in iv.columns else iv.assign(estimator=ests[0])
    long = pd.concat([_long_metrics(metrics.margin_summary(mg), "margin_summary"), score,
                      *[_long_metrics(iv[iv["estimator"] == e], "importance_variance",
                                      None if len(ests) == 1 else e)
                        for e in ests]],
                     ignore_index=True)
    return mg, imp, long


def run_task(spec: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """Run one task (train, save, sweep, measure) into ``out/models/<model_id>/``.

    Pure function of ``spec`` (see :func:`tasks`): same spec -> same files, bit for bit,
    in any process. Sets ``torch.set_num_threads(spec["run"]["threads"])`` (float results
    of training depend on the thread count) and leaves it set.

    Records its wall-clock time (``seconds``) and per-stage breakdown (``train_s``: build,
    train and save; ``sweep_s``; ``metrics_s``: margins, importance and the tables) in
    ``timing.json`` before the ``done`` marker, so a cached re-run reports the original
    timings. With ``spec["protection"]`` the protection stage (:func:`_protect`) follows,
    cached on its own settings (``protect_s``, also counted in ``seconds``).

    Returns:
        ``{"model_id", "status": "done"|"cached"|"failed", "seconds", "train_s", "sweep_s",
        "metrics_s", "protect_s", "error"}``. Exceptions are caught and reported (with the
        traceback in ``error.txt``), never raised.
    """
    t0 = time.perf_counter()
    mid = spec["model_id"]
    tdir = files.ensure_dir(Path(out) / "models" / mid)
    h = _spec_hash(spec)
    done = tdir / _DONE
    cached = done.is_file() and done.read_text().strip() == h
    stages: dict[str, float] = _read_timing(tdir) if cached else {}
    if not cached:
        with files.writing(tdir):
            for name in (_DONE, "error.txt", _TIMING, _PROTECTED):
                (tdir / name).unlink(missing_ok=True)
    ran = not cached
    try:
        if not cached:
            _compute(spec, tdir, stages)
            stages["seconds"] = time.perf_counter() - t0
            _write_text(json.dumps({k: stages[k] for k in ("seconds", *_STAGES[:3])},
                                   indent=1), tdir / _TIMING)
            _write_text(h, done)
        if "protection" in spec:
            ran |= _protect(spec, tdir, h, stages)
    except OutputError:  # the disk, not the task: stop the study (one line)
        raise
    except Exception as e:  # noqa: BLE001 -- a failed task must not lose the others
        _write_text(traceback.format_exc(), tdir / "error.txt")
        return {"model_id": mid, "status": "failed", "seconds": time.perf_counter() - t0,
                **{k: stages.get(k, math.nan) for k in _STAGES},
                "error": f"{type(e).__name__}: {e}"}
    (tdir / "error.txt").unlink(missing_ok=True)
    timing = {k: stages.get(k, math.nan) for k in ("seconds", *_STAGES)}
    if "protection" in spec:  # seconds: training, sweep and metrics, plus protection
        timing["seconds"] += timing["protect_s"]
    return {"model_id": mid, "status": "done" if ran else "cached", **timing, "error": ""}


def _read_timing(tdir: Path) -> dict[str, float]:
    """The timings a finished task recorded (NaN for tasks finished by older versions; the
    protection stage's seconds are in its own marker)."""
    try:
        rec = json.loads((tdir / _TIMING).read_text())
        return {k: float(rec.get(k, math.nan)) for k in ("seconds", *_STAGES)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return dict.fromkeys(("seconds", *_STAGES), math.nan)


def _protection_marker(tdir: Path) -> dict[str, Any]:
    try:
        rec = json.loads((tdir / _PROTECTED).read_text())
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _protect(spec: Mapping[str, Any], tdir: Path, base_hash: str,
             stages: dict[str, float]) -> bool:
    """The protection stage of a finished task (``spec["protection"]``): protection curves of
    its saved network and their AUC vs random, cached on their own settings. Returns whether
    it ran (False: cached)."""
    import torch

    pr = spec["protection"]
    h = hashlib.sha256(json.dumps({"task": base_hash, "protection": pr}, sort_keys=True,
                                  default=str).encode()).hexdigest()
    rec = _protection_marker(tdir)
    if rec.get("hash") == h:
        stages["protect_s"] = float(rec.get("seconds", math.nan))
        return False
    with files.writing(tdir):
        (tdir / _PROTECTED).unlink(missing_ok=True)
    t = time.perf_counter()
    torch.set_num_threads(int(spec["run"]["threads"]))
    d, ev = spec["data"], spec["eval"]
    model = checkpoint.load(tdir, device=spec["run"]["device"])
    test_ds = _subset(_dataset(d["dataset"], "test", d["data_dir"]), d["test_subset"],
                      d["subset_seed"])
    rank_ds = _subset(_dataset(d["dataset"], "train", d["data_dir"]), d["metric_subset"],
                      d["subset_seed"])
    bers = [tuple(b) if isinstance(b, list) else b for b in pr["bers"]]
    curve = prot.protection(model, test_ds, rank=pr["rankings"], fractions=pr["fractions"],
                            bers=bers, n_maps=pr["n_maps"], seed=ev["seed"], unit=pr["unit"],
                            rank_data=rank_ds, label=spec["model_id"], engine=ev["engine"],
                            error=ev.get("error", DEFAULTS["eval"]["error"]),
                            batch_size=pr["batch_size"], progress=False)
    auc = prot.protection_auc(curve, seed=ev["seed"])
    ids = _ids(spec)
    _write_csv(_front(curve, ids), tdir / "protection.csv", SCHEMAS["protection"])
    _write_csv(_front(auc, ids), tdir / "protection_auc.csv", SCHEMAS["protection_auc"])
    stages["protect_s"] = time.perf_counter() - t
    _write_text(json.dumps({"hash": h, "seconds": stages["protect_s"]}, indent=1),
                tdir / _PROTECTED)
    return True


def _ids(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The task columns of a task's rows."""
    return {"model_id": spec["model_id"], "model": spec["model"]["label"],
            "arch": spec["model"]["name"], "train_ber": spec["train_ber"],
            "train_seed": spec["seed"]}


def _front(df: pd.DataFrame, ids: Mapping[str, Any]) -> pd.DataFrame:
    """``df`` with the task columns (:data:`bnn_tol.schema.TASK_COLUMNS`) in front."""
    df = df.copy()
    for k in reversed(_TASK_COLS):
        if k in df.columns:
            df = df.drop(columns=k)
        df.insert(0, k, ids[k])
    return df


def _compute(spec: Mapping[str, Any], tdir: Path, stages: dict[str, float]) -> None:
    import torch

    t = time.perf_counter()
    torch.set_num_threads(int(spec["run"]["threads"]))
    d, tr, ev, mt = spec["data"], spec["train"], spec["eval"], spec["metrics"]
    dev = spec["run"]["device"]
    train_ds = _subset(_dataset(d["dataset"], "train", d["data_dir"]), d["train_subset"],
                       d["subset_seed"])
    test_full = _dataset(d["dataset"], "test", d["data_dir"])
    test_ds = _subset(test_full, d["test_subset"], d["subset_seed"])
    metric_ds = _subset(test_full, d["metric_subset"], d["subset_seed"])
    entry = dict(spec["model"])
    entry.pop("label")
    name = entry.pop("name")
    kwargs = {"in_shape": train_ds.shape, "n_classes": len(train_ds.classes), **entry}
    seed, ber = spec["seed"], spec["train_ber"]
    model = models.build(name, seed=seed, **kwargs)
    layers = tr["flip_layers"]
    layers = None if layers in (None, "all") else layers
    hist = train.fit(model, train_ds, None, epochs=tr["epochs"], batch_size=tr["batch_size"],
                     lr=tr["lr"], lr_step=tr["lr_step"], lr_gamma=tr["lr_gamma"],
                     loss=tr["loss"], flip_ber=ber if ber > 0 else None, flip_layers=layers,
                     flip_warmup=tr["flip_warmup"], seed=seed, device=dev, progress=False)
    model.eval()
    checkpoint.save(model, tdir, study_task={k: spec[k] for k in ("model_id", "train_ber", "seed")})
    ids = _ids(spec)
    stages["train_s"], t = time.perf_counter() - t, time.perf_counter()

    def front(df: pd.DataFrame) -> pd.DataFrame:
        return _front(df, ids)

    bers = [tuple(b) if isinstance(b, list) else b for b in ev["bers"]]
    eval_layers = None if ev["layers"] in (None, "all") else ev["layers"]
    sw = engines.sweep({spec["model_id"]: model}, test_ds, bers=bers, n_maps=ev["n_maps"],
                        seed=ev["seed"], layers=eval_layers, batch_size=ev["batch_size"],
                        device=dev, progress=False, engine=ev["engine"],
                        error=ev.get("error", DEFAULTS["eval"]["error"]))
    sw = sw.drop(columns=["model"])  # the sweep's label was model_id
    _write_csv(front(sw), tdir / "sweep.csv", SCHEMAS["sweep"])
    stages["sweep_s"], t = time.perf_counter() - t, time.perf_counter()

    ests = [mt["importance"]] if isinstance(mt["importance"], str) else list(mt["importance"])
    mg, imp, long = _metric_rows(model, metric_ds, ests, mt["batch_size"])
    parts = [long.assign(split="all")]
    for split, half in zip("ab", metric_halves(metric_ds, d["subset_seed"]), strict=True):
        parts.append(_metric_rows(model, half, ests, mt["batch_size"])[2].assign(split=split))
    _write_csv(front(mg), tdir / "margin.csv", SCHEMAS["margin"])
    _write_csv(front(imp), tdir / "importance.csv", SCHEMAS["importance"])
    _write_csv(front(pd.concat(parts, ignore_index=True)), tdir / "metrics.csv",
               SCHEMAS["metrics"])
    if predict.unsupported(model) is None:  # conv models: no predictions.csv
        sym = [float(b) for b in bers if not isinstance(b, tuple)]
        if sym:
            pred = metrics.predict_accuracy(model, metric_ds, sym, batch_size=mt["batch_size"])
            _write_csv(front(pred), tdir / "predictions.csv", SCHEMAS["predictions"])

    clean = sw[sw["p01"].eq(0) & sw["p10"].eq(0)]
    clean_acc = (float(clean["accuracy"].mean()) if len(clean)
                 else engines.accuracy(model, test_ds))
    final = hist.iloc[-1] if len(hist) else None
    row = {**ids, "clean_acc": clean_acc,
           "train_acc": float(final["train_acc"]) if final is not None else math.nan,
           "epochs": int(tr["epochs"]), "checkpoint": str(Path("models") / spec["model_id"]),
           "threads": int(spec["run"]["threads"]),
           "recipe": spec.get("recipe", _recipe_name(tr["flip_layers"]))}
    _write_csv(pd.DataFrame([row]), tdir / "model.csv", SCHEMAS["model"])
    _write_csv(hist, tdir / "history.csv")
    stages["metrics_s"] = time.perf_counter() - t


# -- the grid -----------------------------------------------------------------------------------

#: Seconds to wait for a Dask scheduler before giving up with a clear error.
CONNECT_TIMEOUT = 5


def _connect(scheduler: Any) -> tuple[Any, bool]:
    """``(client, owned)`` for an address, a ``LocalCluster`` or a ``Client``.

    Raises:
        BnnTolError: the scheduler cannot be reached within :data:`CONNECT_TIMEOUT` seconds.
    """
    from dask.distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, False
    if isinstance(scheduler, LocalCluster):
        scheduler = scheduler.scheduler_address
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT), True
    except (OSError, TimeoutError, ValueError) as e:
        raise BnnTolError(f"cannot reach the Dask scheduler {scheduler!r} within "
                          f"{CONNECT_TIMEOUT} s ({e}); start it or omit --scheduler to run "
                          "in this process") from e


def _worker_threads(client: Any) -> tuple[int, int]:
    """``(threads, workers)``: :func:`auto_threads` on the busiest host of a Dask cluster.

    Per host, ``concurrent`` is the sum of the worker threads (each runs one task at a time)
    and ``cores`` what the workers there may run on; the smallest result over the hosts is
    used everywhere, so every task has the same thread count (results depend on it).
    """
    info = client.scheduler_info()["workers"]
    if not info:
        raise BnnTolError("the Dask scheduler has no workers: start some (dask worker ...)")
    cores = client.run(available_cores)
    hosts: dict[str, list[int]] = {}
    for addr, w in info.items():
        c = hosts.setdefault(str(w.get("host", addr)), [0, 0])
        c[0] = max(c[0], int(cores.get(addr, 1)))
        c[1] += int(w.get("nthreads", 1))
    return min(auto_threads(c, n) for c, n in hosts.values()), len(info)


def environment(threads: int, workers: int, command: str | None = None) -> dict[str, Any]:
    """What a study's numbers depend on besides its config (written as ``environment.json``):
    :func:`bnn_tol.provenance.environment`."""
    return provenance.environment(threads, workers, command)


def run(
    study: str | os.PathLike | Mapping[str, Any] = "quick",
    out: str | os.PathLike = "results",
    *,
    scheduler: Any = None,
    overrides: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] | None = print,
    fresh: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run a study (a preset name, TOML path or dict) into ``out``; skip finished tasks.

    The whole configuration is validated (:func:`load_config`) and checked (:func:`check`:
    datasets load, every model builds) before anything is written or trained.
    ``[run] threads = "auto"`` becomes ``cores // workers`` (in-process: 1 worker; Dask:
    see :func:`_worker_threads`); an explicit value wins (a warning is echoed when it
    oversubscribes the cores). The resolved value is in ``study.json``, ``environment.json``
    and ``models.csv``.

    Args:
        study: see :func:`load_config`.
        out: results directory (created).
        scheduler: ``None`` runs the tasks one after the other in this process (or, with
            ``[run] workers > 1``, on a local Dask cluster of that many processes); a
            dask.distributed scheduler address (``"tcp://host:8786"``), a ``LocalCluster``
            or a ``Client`` runs them as independent dask tasks (``client.submit``). Both
            give the same files, bit for bit, for the same thread count.
        overrides: section-wise config overrides (see :func:`load_config`).
        echo: progress lines (``None`` for silence).
        fresh: refuse an ``out`` that exists and is not empty (so that no cached task made
            by other code is reused: published numbers come from the code at hand).
        command: the command that reproduces this run, recorded in ``environment.json``
            (default: the equivalent Python call).

    Returns:
        ``{"out", "config", "environment", "models", "sweeps", "metrics", "margins",
        "importance", "status"}`` -> paths, plus ``"failed"``: list of ``(model_id, error)``.

    Raises:
        InvalidArgument: invalid configuration (names the key), or ``fresh`` and ``out`` is
            not empty. BnnTolError: unreachable scheduler, missing dataset.
    """
    say = echo or (lambda s: None)
    cfg = load_config(study, overrides)
    check(cfg)
    out = Path(out)
    if fresh and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"{out} exists and is not empty: a fresh run (--fresh) needs a "
                              "new or empty output directory")
    inputs = [cfg["data"]["data_dir"]]
    if not isinstance(study, Mapping):
        inputs.append(study)
    files.check_claim(out, MARKER, what="`bnn-tol study`", recognize=_is_study_dir)
    for name in _OUTPUTS:
        files.check_output(out / name, inputs=[p for p in inputs if p is not None],
                           replace=True)
    files.claim_dir(out, MARKER, what="`bnn-tol study`", recognize=_is_study_dir,
                    note="written by bnn-tol study: this directory is a study's results; a "
                         "running study holds this file's lock\n")
    with files.locked(out / MARKER, what=f"the study directory {out}"):
        return _run_locked(cfg, study, out, scheduler=scheduler, overrides=overrides, say=say,
                           command=command)


def _run_locked(cfg: dict[str, Any], study: Any, out: Path, *, scheduler: Any,
                overrides: Mapping[str, Any] | None, say: Callable[[str], None],
                command: str | None) -> dict[str, Any]:
    """:func:`run` once ``out`` is claimed and locked."""
    cluster = None
    if scheduler is None and cfg["run"]["workers"] > 1:
        from dask.distributed import LocalCluster

        cluster = scheduler = LocalCluster(n_workers=cfg["run"]["workers"],
                                           threads_per_worker=1, processes=True,
                                           dashboard_address=None)
    try:
        client, own = _connect(scheduler) if scheduler is not None else (None, False)
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    try:
        if client is None:
            workers, auto = 1, auto_threads(available_cores(), 1)
        else:
            auto, workers = _worker_threads(client)
        if cfg["run"]["threads"] == "auto":
            cfg["run"]["threads"] = auto
        elif cfg["run"]["threads"] > auto:
            say(f"[study] warning: [run] threads = {cfg['run']['threads']} x {workers} "
                f"worker(s) oversubscribes the cores (auto would be {auto}); expect slow runs")
        if command is None:
            command = (f"python -c \"import bnn_tol; bnn_tol.study.run({study!r}, {str(out)!r}"
                       + (f", overrides={dict(overrides)!r}" if overrides else "") + ")\"")
        _check_same_settings(out, cfg)
        _write_text(json.dumps(cfg, indent=2), out / "study.json")
        _write_text(json.dumps(environment(cfg["run"]["threads"], workers, command), indent=2),
                    out / "environment.json")
        specs = tasks(cfg)
        say(f"[study] {cfg['name']}: {len(specs)} tasks ({len(cfg['models'])} model(s) x "
            f"{len(cfg['train']['bers'])} training BER(s) x {len(cfg['train']['seeds'])} "
            f"seed(s)), {cfg['run']['threads']} thread(s) x {workers} worker(s) -> {out}")
        results: list[dict[str, Any]] = []

        def report(res: dict[str, Any]) -> None:
            results.append(res)
            msg = f"[study] {len(results)}/{len(specs)} {res['model_id']}: {res['status']}"
            if res["status"] != "failed" and not math.isnan(res["seconds"]):
                msg += (f" ({res['seconds']:.1f} s: train {res['train_s']:.1f}, sweep "
                        f"{res['sweep_s']:.1f}, metrics {res['metrics_s']:.1f}"
                        + ("" if math.isnan(res["protect_s"]) else
                           f", protection {res['protect_s']:.1f}") + ")")
            if res["error"]:
                msg += f" -- {res['error']}"
            say(msg)

        if client is None:
            import torch

            threads = torch.get_num_threads()
            try:
                for spec in specs:
                    report(run_task(spec, out))
            finally:
                torch.set_num_threads(threads)
        else:
            _run_dask(specs, out, client, report)
    finally:
        if own:
            client.close()
        if cluster is not None:
            cluster.close()
    status = pd.DataFrame(results, columns=STATUS_COLUMNS)
    order = {s["model_id"]: i for i, s in enumerate(specs)}
    status = status.sort_values("model_id", key=lambda c: c.map(order)).reset_index(drop=True)
    _write_csv(status, out / "status.csv")
    paths = collect(out, [s["model_id"] for s in specs])
    failed = [(r.model_id, r.error) for r in status.itertuples() if r.status == "failed"]
    if failed:
        say(f"[study] {len(failed)} task(s) failed (tracebacks in models/<id>/error.txt); "
            "re-run the same command to retry them")
    say(f"[study] tables in {out}: models.csv, sweeps.csv, metrics.csv; reproduce with: "
        f"{command}")
    return {"out": str(out), "config": str(out / "study.json"),
            "environment": str(out / "environment.json"), **paths,
            "status": str(out / "status.csv"), "failed": failed}


#: Marker (and lock file) of a study's results directory.
MARKER = ".bnn_tol_study"
#: The files a study writes at the top of its directory.
_OUTPUTS = ("study.json", "environment.json", "status.csv", "models.csv",
            *TABLES.values(), "report.html")


def _is_study_dir(path: Path) -> bool:
    """A results directory of a study made before markers existed: its ``study.json`` is a
    study config (the sections of :data:`DEFAULTS`)."""
    try:
        cfg = json.loads((path / "study.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(cfg, dict) and {"name", "data", "train", "eval", "models"} <= set(cfg)


def _task_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a study's finished tasks depend on besides their grid point (model label,
    training BER, seed): every section but the grid (``[train] bers/seeds``, the set of
    models), the name, the description and ``[run] workers``."""
    cfg = _merge(DEFAULTS, cfg)
    out: dict[str, Any] = {sec: dict(cfg[sec]) for sec in ("data", "train", "eval", "metrics")}
    del out["train"]["bers"], out["train"]["seeds"]
    out["run"] = {k: cfg["run"].get(k) for k in ("device", "threads")}
    return out


def _check_same_settings(out: Path, cfg: Mapping[str, Any]) -> None:
    """Refuse to continue a study in ``out`` made with other settings (its finished tasks would
    be mixed with, or replaced by, tasks of these). More models, seeds or training BERs are
    allowed: they add tasks.

    Raises:
        ResultsMismatch: naming each difference (``[train] epochs = 10, now 3``).
    """
    path = out / "study.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not an object")
        before = _task_settings(old)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise ResultsMismatch(f"{path} is unreadable ({e}); it was left untouched: use another "
                              "--out") from None
    now = _task_settings(cfg)
    diffs = [f"[{sec}] {k} = {json.dumps(before[sec].get(k))}, now {json.dumps(now[sec].get(k))}"
             for sec in now for k in sorted(set(now[sec]) | set(before[sec]))
             if before[sec].get(k) != now[sec].get(k)]
    models_before = {m.get("label", m.get("name")): m for m in old.get("models", [])
                     if isinstance(m, dict)}
    for m in cfg["models"]:
        label = m.get("label", m["name"])
        o = models_before.get(label)
        if o is not None and dict(o, label=label) != dict(m, label=label):
            diffs.append(f"[[models]] {label!r} = {json.dumps(o)}, now {json.dumps(m)}")
    pr_before = _merge(DEFAULTS, old)["protection"]
    if pr_before["rankings"]:  # protection may be added to a study, not changed (which
        # networks get it, seeds and train_bers, is the grid: it may change)
        diffs += [f"[protection] {k} = {json.dumps(pr_before.get(k))}, now "
                  f"{json.dumps(cfg['protection'].get(k))}" for k in sorted(DEFAULTS["protection"])
                  if k not in _PROTECTION_GRID and pr_before.get(k) != cfg["protection"].get(k)]
    if diffs:
        raise ResultsMismatch(f"{out} holds a study made with other settings ({'; '.join(diffs)})"
                              ": its finished tasks would be mixed with these; use another --out "
                              "(or the settings it was made with)")


def _run_dask(specs: Sequence[dict], out: Path, client: Any, report) -> None:
    from dask.distributed import as_completed

    futures = [client.submit(run_task, spec, str(out), key=f"bnn-tol-{spec['model_id']}",
                             pure=False) for spec in specs]
    by_key = {f.key: s["model_id"] for f, s in zip(futures, specs, strict=True)}
    for fut in as_completed(futures):
        try:
            report(fut.result())
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001 -- e.g. a worker died
            report({"model_id": by_key[fut.key], "status": "failed", "seconds": math.nan,
                    **dict.fromkeys(_STAGES, math.nan), "error": f"{type(e).__name__}: {e}"})


def collect(out: str | os.PathLike, model_ids: Iterable[str] | None = None) -> dict[str, str]:
    """Concatenate the per-task tables of finished tasks into the tidy files of ``out``.

    Tasks are taken in the order of ``model_ids`` (default: sorted task directories);
    unfinished or failed tasks are skipped. Each table is read and validated as its
    :mod:`bnn_tol.schema` table (:data:`SCHEMAS`); tables of tasks finished by the previous
    release are upgraded (:func:`bnn_tol.schema.upgrade`; their ``arch`` is taken from the
    task's ``model.csv``). Returns ``{"models", "sweeps", ...}`` -> paths.
    """
    out = Path(out)
    root = out / "models"
    if model_ids is None:
        model_ids = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    finished = [m for m in model_ids if (root / m / _DONE).is_file()]
    paths = {}
    arch: dict[str, str] = {}
    for stem, fname in {"model": "models.csv", **TABLES}.items():
        table = SCHEMAS[stem]
        frames = []
        for m in finished:
            path = root / m / f"{stem}.csv"
            if stem in _OPTIONAL and not path.is_file():
                continue
            if stem in _PROTECTION_TABLES and not (root / m / _PROTECTED).is_file():
                continue  # an unfinished protection stage
            df = schema.read_csv(path, table)
            if stem == "model":
                arch[m] = str(df["arch"].iloc[0])
            elif "arch" not in df.columns:  # a task finished by the previous release
                df.insert(df.columns.get_loc("model") + 1, "arch", arch.get(m, ""))
            frames.append(df)
        df = (pd.concat(frames, ignore_index=True) if frames
              else pd.DataFrame(columns=schema.columns(table)))
        _write_csv(df, out / fname, table)
        paths[fname[:-4]] = str(out / fname)
    return paths
