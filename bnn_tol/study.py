"""The correlation study: train a family of BNNs, sweep them under bit errors, measure them.

A study is a grid of independent tasks ``(model, training BER, seed)``. Each task

1. builds the model (``models.build(name, seed=seed)``) and trains it
   (``train.fit(..., flip_ber=train_ber, seed=seed)``; ``train_ber == 0`` is normal training),
2. saves the checkpoint (``bnn_tol.save``) in ``out/models/<task-id>/``,
3. sweeps it (``evaluate.sweep`` over the evaluation BERs x fault maps),
4. measures it (``metrics.margin`` + ``margin_summary``, ``metrics.score_margin`` of the last
   layer, ``metrics.importance`` + ``importance_variance``),

and writes its tables into the task directory (each file atomically, the ``done`` marker
last). Re-running skips tasks whose ``done`` marker matches the task spec; a failed task
writes ``error.txt``, is reported, and does not stop the others. At the end the per-task
tables are concatenated into tidy files in ``out/``:

- ``models.csv``: one row per task: ``model_id, model, train_ber, seed, arch, clean_acc,
  train_acc, epochs, checkpoint`` (timings are not results: they are in ``status.csv`` and
  each task's ``history.csv``);
- ``sweeps.csv``: one row per (task, BER, map): ``model_id, model, train_ber, seed, ber, p01,
  p10, map, map_seed, accuracy, rerr`` (``map_seed`` is the fault-map seed that
  ``evaluate.sweep`` calls ``seed``);
- ``metrics.csv``: long form ``model_id, model, train_ber, seed, layer, metric, value``
  (``layer == "network"`` for network-level aggregates). Metrics: the per-layer and network
  statistics of ``margin_summary`` (``mean_margin, median_margin, mean_min_margin,
  mean_q10_margin, mean_margin_half, mean_margin_norm, mean_margin_bn``), ``score_margin``
  and ``score_margin_flips`` (last layer: mean over correctly classified samples) and
  ``importance_variance``, ``importance_cv``, ``importance_mean``, ``importance_std`` (the
  numeric columns of ``importance_variance``; with several estimators in ``[metrics]
  importance = [...]`` they are named ``importance_<estimator>_variance`` etc.);
- ``margins.csv`` / ``importance.csv``: per-neuron tables of ``metrics.margin`` /
  ``metrics.importance`` with the task columns in front;
- ``status.csv``: ``model_id, status (done|cached|failed), seconds, error``.

A task is a pure function of its spec (all randomness seeded, ``torch.set_num_threads``
fixed), so the in-process run and a dask.distributed run give the same files, bit for bit.

Study files are TOML (see ``bnn_tol/presets/*.toml``; every key has a default, see
:data:`DEFAULTS`)::

    name = "quick"
    [data]    dataset, train_subset, test_subset, metric_subset, subset_seed, data_dir
    [train]   bers, seeds, epochs, batch_size, lr, lr_step, lr_gamma, loss, flip_layers,
              flip_warmup
    [eval]    bers, n_maps, seed, layers, batch_size
    [metrics] importance (estimator name or list of names), batch_size
    [run]     device, threads
    [[models]] label, name, and the model's keyword arguments (hidden = [256, 256], ...)

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
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from .exceptions import InvalidArgument

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport has the same API
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["presets", "load_config", "tasks", "run_task", "run", "collect", "TABLES", "DEFAULTS"]

#: Defaults filled into every study config (a study file overrides any of them).
DEFAULTS: dict[str, Any] = {
    "name": "study",
    "data": {"dataset": "fashion-mnist", "train_subset": None, "test_subset": None,
             "metric_subset": 2000, "subset_seed": 0, "data_dir": None},
    "train": {"bers": [0.0, 0.1], "seeds": [0], "epochs": 10, "batch_size": 256, "lr": 1e-3,
              "lr_step": None, "lr_gamma": 0.5, "loss": "ce", "flip_layers": "all",
              "flip_warmup": 0},
    "eval": {"bers": [0.0, 0.01, 0.02, 0.05, 0.1], "n_maps": 10, "seed": 0, "layers": "all",
             "batch_size": 2048},
    "metrics": {"importance": "accuracy", "batch_size": 1024},
    "run": {"device": "cpu", "threads": 1},
    "models": [{"label": "fc", "name": "fc"}],
}

#: Tidy tables concatenated by :func:`collect` (file stem in each task dir -> output file).
TABLES = {"sweep": "sweeps.csv", "metrics": "metrics.csv", "margin": "margins.csv",
          "importance": "importance.csv"}
_TASK_COLS = ["model_id", "model", "train_ber", "seed"]
_DONE = "done"


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

    Raises:
        ValueError: unknown preset/path, unknown sections or keys, or invalid values (says
            which and lists what is allowed).
    """
    if isinstance(study, Mapping):
        raw = dict(study)
    else:
        text = str(study)
        path = Path(text)
        if path.is_file():
            raw = tomllib.loads(path.read_text())
            raw.setdefault("name", path.stem)
        elif text in presets():
            raw = tomllib.loads((resources.files("bnn_tol") / "presets" / f"{text}.toml")
                                .read_text())
            raw.setdefault("name", text)
        else:
            raise InvalidArgument(f"{text!r} is neither a study file nor a preset; presets: "
                             f"{', '.join(presets())}")
    unknown = set(raw) - set(DEFAULTS) - {"description"}
    if unknown:
        raise InvalidArgument(f"unknown study section(s) {sorted(unknown)}; allowed: "
                         f"{sorted(DEFAULTS)}")
    for sec, val in raw.items():
        if isinstance(DEFAULTS.get(sec), dict):
            bad = set(val) - set(DEFAULTS[sec])
            if bad:
                raise InvalidArgument(f"unknown key(s) {sorted(bad)} in [{sec}]; allowed: "
                                 f"{sorted(DEFAULTS[sec])}")
    cfg = _merge(DEFAULTS, raw)
    if overrides:
        cfg = _merge(cfg, overrides)
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    from . import errors, models

    labels = [m.get("label", m.get("name")) for m in cfg["models"]]
    if not cfg["models"] or len(set(labels)) != len(labels):
        raise InvalidArgument(
            f"[[models]] must be a non-empty list with unique labels, got {labels}")
    for m in cfg["models"]:
        if m.get("name") not in models.available():
            raise InvalidArgument(f"[[models]] entry {m}: name must be one of {models.available()}")
    for p in cfg["train"]["bers"]:
        if not isinstance(p, int | float):
            raise InvalidArgument(f"[train] bers must be numbers (symmetric BERs), got {p!r}")
        errors.rates(p)
    for p in cfg["eval"]["bers"]:
        errors.rates(p)
    if not cfg["train"]["seeds"] or len(set(cfg["train"]["seeds"])) != len(cfg["train"]["seeds"]):
        raise InvalidArgument(f"[train] seeds must be a non-empty list of distinct integers, got "
                         f"{cfg['train']['seeds']}")
    if int(cfg["run"]["threads"]) < 1:
        raise InvalidArgument(f"[run] threads must be >= 1, got {cfg['run']['threads']}")


def task_id(label: str, train_ber: float, seed: int) -> str:
    """``<label>_ber<p>_s<seed>``, e.g. ``fc_ber0.1_s0``: the task's directory name."""
    return f"{label}_ber{float(train_ber):g}_s{int(seed)}"


def tasks(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The grid ``models x training BERs x seeds`` as self-contained task specs.

    Each spec holds everything the task needs (``data``, ``train``, ``eval``, ``metrics``,
    ``run`` sections, the model entry, ``train_ber``, ``seed``, ``model_id``), so that
    :func:`run_task` is a pure function of it.
    """
    out = []
    for m in cfg["models"]:
        label = m.get("label", m["name"])
        for ber in cfg["train"]["bers"]:
            for seed in cfg["train"]["seeds"]:
                spec = {sec: copy.deepcopy(dict(cfg[sec]))
                        for sec in ("data", "train", "eval", "metrics", "run")}
                del spec["train"]["bers"], spec["train"]["seeds"]
                spec.update(model=dict(m, label=label), train_ber=float(ber), seed=int(seed),
                            model_id=task_id(label, ber, seed))
                out.append(spec)
    return out


def _spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


# -- one task -----------------------------------------------------------------------------------

def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    _atomic(path, lambda p: df.to_csv(p, index=False))


def _write_text(text: str, path: Path) -> None:
    _atomic(path, lambda p: Path(p).write_text(text))


@lru_cache(maxsize=8)
def _dataset(name: str, split: str, data_dir: str | None):
    from . import data

    return data.load(name, split, data_dir=data_dir)


def _subset(ds, n, seed):
    return ds if n is None else ds.subset(int(n), seed=int(seed))


def _long_metrics(summary: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Melt a per-layer summary (``layer`` + numeric columns) to ``layer, metric, value``.

    Columns that identify or count rather than measure (``layer_index, n_neurons, n_dead,
    fan_in``) and ``value`` (a copy of the headline column) are dropped; metric names are
    ``<prefix>_<column>`` unless the column already contains the prefix.
    """
    skip = {"layer", "layer_index", "kind", "n", "n_neurons", "n_dead", "neurons", "fan_in",
            "estimator", "value", "model"}
    cols = [c for c in summary.columns
            if c not in skip and pd.api.types.is_numeric_dtype(summary[c])
            and not pd.api.types.is_bool_dtype(summary[c])]
    long = summary[["layer", *cols]].melt(id_vars=["layer"], var_name="metric",
                                          value_name="value")
    long["metric"] = [c if prefix in c else f"{prefix}_{c}" for c in long["metric"]]
    long["layer"] = long["layer"].astype(str)
    long["value"] = long["value"].astype(float)
    return long


def run_task(spec: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """Run one task (train, save, sweep, measure) into ``out/models/<model_id>/``.

    Pure function of ``spec`` (see :func:`tasks`): same spec -> same files, bit for bit,
    in any process. Sets ``torch.set_num_threads(spec["run"]["threads"])`` (float results
    of training depend on the thread count) and leaves it set.

    Returns:
        ``{"model_id", "status": "done"|"cached"|"failed", "seconds", "error"}``. Exceptions
        are caught and reported (with the traceback in ``error.txt``), never raised.
    """
    t0 = time.perf_counter()
    mid = spec["model_id"]
    tdir = Path(out) / "models" / mid
    tdir.mkdir(parents=True, exist_ok=True)
    h = _spec_hash(spec)
    done = tdir / _DONE
    if done.is_file() and done.read_text().strip() == h:
        return {"model_id": mid, "status": "cached", "seconds": 0.0, "error": ""}
    done.unlink(missing_ok=True)
    (tdir / "error.txt").unlink(missing_ok=True)
    try:
        _compute(spec, tdir)
    except Exception as e:  # noqa: BLE001 -- a failed task must not lose the others
        _write_text(traceback.format_exc(), tdir / "error.txt")
        return {"model_id": mid, "status": "failed", "seconds": time.perf_counter() - t0,
                "error": f"{type(e).__name__}: {e}"}
    _write_text(h, done)
    return {"model_id": mid, "status": "done", "seconds": time.perf_counter() - t0, "error": ""}


def _compute(spec: Mapping[str, Any], tdir: Path) -> None:
    import torch

    from . import evaluate, io, metrics, models, train

    torch.set_num_threads(int(spec["run"]["threads"]))
    d, tr, ev, mt = spec["data"], spec["train"], spec["eval"], spec["metrics"]
    dev = spec["run"]["device"]
    train_ds = _subset(_dataset(d["dataset"], "train", d["data_dir"]), d["train_subset"],
                       d["subset_seed"])
    test_full = _dataset(d["dataset"], "test", d["data_dir"])
    test_ds = _subset(test_full, d["test_subset"], d["subset_seed"])
    metric_ds = _subset(test_full, d["metric_subset"], d["subset_seed"])
    entry = dict(spec["model"])
    label, name = entry.pop("label"), entry.pop("name")
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
    io.save(model, tdir, study_task={k: spec[k] for k in ("model_id", "train_ber", "seed")})
    ids = {"model_id": spec["model_id"], "model": label, "train_ber": ber, "seed": seed}

    def front(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        for k in reversed(_TASK_COLS):
            if k in df.columns:
                df = df.drop(columns=k)
            df.insert(0, k, ids[k])
        return df

    bers = [tuple(b) if isinstance(b, list) else b for b in ev["bers"]]
    eval_layers = None if ev["layers"] in (None, "all") else ev["layers"]
    sw = evaluate.sweep({spec["model_id"]: model}, test_ds, bers=bers, n_maps=ev["n_maps"],
                        seed=ev["seed"], layers=eval_layers, batch_size=ev["batch_size"],
                        device=dev, progress=False)
    sw = sw.rename(columns={"seed": "map_seed"}).drop(columns=["model"])
    _write_csv(front(sw), tdir / "sweep.csv")

    mg = metrics.margin(model, metric_ds, batch_size=mt["batch_size"])
    ests = [mt["importance"]] if isinstance(mt["importance"], str) else list(mt["importance"])
    imp = metrics.importance(model, metric_ds, estimator=ests, batch_size=mt["batch_size"])
    sm = metrics.score_margin(model, metric_ds, batch_size=mt["batch_size"])
    sm = sm[sm["correct"].astype(bool)]
    last = list(model.binary_layers())[-1]
    score = pd.DataFrame({"layer": last, "metric": ["score_margin", "score_margin_flips"],
                          "value": [float(sm["score_margin"].mean()),
                                    float(sm["score_margin_flips"].mean())]})
    iv = metrics.importance_variance(imp)
    iv = iv if "estimator" in iv.columns else iv.assign(estimator=ests[0])
    long = pd.concat([_long_metrics(metrics.margin_summary(mg), "margin"), score,
                      *[_long_metrics(iv[iv["estimator"] == e],
                                      "importance" if len(ests) == 1 else f"importance_{e}")
                        for e in ests]],
                     ignore_index=True)
    _write_csv(front(mg), tdir / "margin.csv")
    _write_csv(front(imp), tdir / "importance.csv")
    _write_csv(front(long), tdir / "metrics.csv")

    clean = sw[sw["p01"].eq(0) & sw["p10"].eq(0)]
    clean_acc = (float(clean["accuracy"].mean()) if len(clean)
                 else evaluate.accuracy(model, test_ds))
    final = hist.iloc[-1] if len(hist) else None
    row = {**ids, "arch": name, "clean_acc": clean_acc,
           "train_acc": float(final["train_acc"]) if final is not None else math.nan,
           "epochs": int(tr["epochs"]), "checkpoint": str(Path("models") / spec["model_id"])}
    _write_csv(pd.DataFrame([row]), tdir / "model.csv")
    _write_csv(hist, tdir / "history.csv")


# -- the grid -----------------------------------------------------------------------------------

def _client(scheduler: Any):
    from dask.distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    return Client(scheduler), True


def run(
    study: str | os.PathLike | Mapping[str, Any] = "quick",
    out: str | os.PathLike = "results",
    *,
    scheduler: Any = None,
    overrides: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run a study (a preset name, TOML path or dict) into ``out``; skip finished tasks.

    Args:
        study: see :func:`load_config`.
        out: results directory (created).
        scheduler: ``None`` runs the tasks one after the other in this process; a
            dask.distributed scheduler address (``"tcp://host:8786"``), a ``LocalCluster``
            or a ``Client`` runs them as independent dask tasks (``client.submit``). Both
            give the same files, bit for bit.
        overrides: section-wise config overrides (see :func:`load_config`).
        echo: progress lines (``None`` for silence).

    Returns:
        ``{"out", "config", "models", "sweeps", "metrics", "margins", "importance",
        "status"}`` -> paths, plus ``"failed"``: list of ``(model_id, error)``.
    """
    say = echo or (lambda s: None)
    cfg = load_config(study, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(json.dumps(cfg, indent=2), out / "study.json")
    specs = tasks(cfg)
    say(f"[study] {cfg['name']}: {len(specs)} tasks ({len(cfg['models'])} model(s) x "
        f"{len(cfg['train']['bers'])} training BER(s) x {len(cfg['train']['seeds'])} seed(s))"
        f" -> {out}")
    results: list[dict[str, Any]] = []

    def report(res: dict[str, Any]) -> None:
        results.append(res)
        msg = f"[study] {len(results)}/{len(specs)} {res['model_id']}: {res['status']}"
        if res["status"] == "done":
            msg += f" ({res['seconds']:.1f} s)"
        if res["error"]:
            msg += f" -- {res['error']}"
        say(msg)

    if scheduler is None:
        import torch

        threads = torch.get_num_threads()
        try:
            for spec in specs:
                report(run_task(spec, out))
        finally:
            torch.set_num_threads(threads)
    else:
        _run_dask(specs, out, scheduler, report)
    status = pd.DataFrame(results, columns=["model_id", "status", "seconds", "error"])
    order = {s["model_id"]: i for i, s in enumerate(specs)}
    status = status.sort_values("model_id", key=lambda c: c.map(order)).reset_index(drop=True)
    _write_csv(status, out / "status.csv")
    paths = collect(out, [s["model_id"] for s in specs])
    failed = [(r.model_id, r.error) for r in status.itertuples() if r.status == "failed"]
    if failed:
        say(f"[study] {len(failed)} task(s) failed (tracebacks in models/<id>/error.txt); "
            "re-run the same command to retry them")
    say(f"[study] tables in {out}: models.csv, sweeps.csv, metrics.csv")
    return {"out": str(out), "config": str(out / "study.json"), **paths,
            "status": str(out / "status.csv"), "failed": failed}


def _run_dask(specs: Sequence[dict], out: Path, scheduler: Any, report) -> None:
    from dask.distributed import LocalCluster, as_completed

    if isinstance(scheduler, LocalCluster):
        scheduler = scheduler.scheduler_address
    client, own = _client(scheduler)
    try:
        futures = [client.submit(run_task, spec, str(out), key=f"bnn-tol-{spec['model_id']}",
                                 pure=False) for spec in specs]
        by_key = {f.key: s["model_id"] for f, s in zip(futures, specs, strict=True)}
        for fut in as_completed(futures):
            try:
                report(fut.result())
            except Exception as e:  # noqa: BLE001 -- e.g. a worker died
                report({"model_id": by_key[fut.key], "status": "failed", "seconds": math.nan,
                        "error": f"{type(e).__name__}: {e}"})
    finally:
        if own:
            client.close()


def collect(out: str | os.PathLike, model_ids: Iterable[str] | None = None) -> dict[str, str]:
    """Concatenate the per-task tables of finished tasks into the tidy files of ``out``.

    Tasks are taken in the order of ``model_ids`` (default: sorted task directories);
    unfinished or failed tasks are skipped. Returns ``{"models", "sweeps", ...}`` -> paths.
    """
    out = Path(out)
    root = out / "models"
    if model_ids is None:
        model_ids = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    finished = [m for m in model_ids if (root / m / _DONE).is_file()]
    paths = {}
    for stem, fname in {"model": "models.csv", **TABLES}.items():
        frames = [pd.read_csv(root / m / f"{stem}.csv") for m in finished]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_TASK_COLS)
        _write_csv(df, out / fname)
        paths[fname[:-4]] = str(out / fname)
    return paths
