"""Checkpoints: ``model.safetensors`` (tensors only, loading executes no code) plus a
``config.json`` beside it (architecture, training recipe and history, versions).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bnn_tol._version import __version__
from bnn_tol.core.models import BNN, build
from bnn_tol.exceptions import BnnTolError, ResultsMismatch
from bnn_tol.files import atomic_write, check_output, ensure_dir

__all__ = ["save", "load", "check_out", "is_config", "CheckpointError", "WEIGHTS", "CONFIG"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = 1


class CheckpointError(BnnTolError, ValueError):
    """A checkpoint directory is missing, corrupt, or does not match its config."""


def is_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``config.json`` that :func:`save` wrote: a JSON object with an
    integer ``format`` and ``model = {"name", "kwargs"}``."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(cfg, dict) and isinstance(cfg.get("format"), int)
            and isinstance(cfg.get("model"), dict) and {"name", "kwargs"} <= set(cfg["model"]))


def _foreign_config(path: Path) -> bool:
    cfg = path / CONFIG
    return os.path.lexists(cfg) and not is_config(cfg)


def check_out(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse a checkpoint destination that would lose data; writes nothing.

    Accepted: a path that does not exist, an empty directory, or (``overwrite=True``) a
    directory that already holds a checkpoint (``model.safetensors`` and/or a ``config.json``
    that :func:`save` wrote, :func:`is_config`).

    Raises:
        ResultsMismatch: ``path`` is a file or lies below one; holds a checkpoint and
            ``overwrite`` is false; or is a non-empty directory that is not a checkpoint, e.g.
            one whose ``config.json`` is someone else's (never written into).
    """
    path = Path(path)
    check_output(path / CONFIG, replace=True)  # an ancestor that is a file
    if not path.exists():
        return
    if not path.is_dir():
        raise ResultsMismatch(f"{path} exists and is not a directory; a checkpoint is a "
                              "directory: choose another --out")
    names = {p.name for p in path.iterdir()}
    if not names:
        return
    if not names & {CONFIG, WEIGHTS} or _foreign_config(path):
        raise ResultsMismatch(f"{path} is not empty and is not a bnn_tol checkpoint "
                              f"({len(names)} entries); refusing to write into it: choose a "
                              "new or empty --out")
    if not overwrite:
        try:
            what = json.loads((path / CONFIG).read_text())["model"]
            desc = f" ({what['name']} {what['kwargs']})"
        except (OSError, ValueError, KeyError, TypeError):
            desc = ""
        raise ResultsMismatch(f"{path} already holds a checkpoint{desc}; pass --overwrite "
                              "(overwrite=True) to replace it, or choose another --out")


def save(model: BNN, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``model`` to directory ``path`` (created if needed); atomic per file.

    ``config.json`` holds ``format``, ``model`` (``{"name", "kwargs"}``), ``meta`` (training
    recipe, history, anything in ``model.meta`` and ``extra``) and library versions.

    A directory whose ``config.json`` was not written by :func:`save` (:func:`is_config`) is
    refused; deciding whether an existing checkpoint may be replaced is the caller's
    (:func:`check_out`).

    Returns:
        The checkpoint directory.

    Raises:
        ResultsMismatch: ``path`` holds someone else's ``config.json``, or is a file.
        OutputError: the files cannot be written (read-only, disk full); the previous ones
            are left as they were.
    """
    if not isinstance(model, BNN):
        raise TypeError(f"save() expects a bnn_tol BNN, got {type(model).__name__}")
    path = Path(path)
    if _foreign_config(path):
        raise ResultsMismatch(f"{path / CONFIG} was not written by bnn_tol; refusing to replace "
                              "it: save the checkpoint into a new or empty directory")
    ensure_dir(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {**model.meta, **extra}
    config = {
        "format": FORMAT,
        "model": model.config,
        "meta": meta,
        "versions": {"bnn_tol": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    text = json.dumps(config, indent=2, default=_json_default)

    def write_weights(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors (disk full, file too large) are OSErrors
            raise OSError(str(e).rsplit("I/O error: ", 1)[-1]) from e

    atomic_write(path / WEIGHTS, write_weights, replace=True)
    atomic_write(path / CONFIG, lambda p: Path(p).write_text(text), replace=True)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in config.json")


#: Largest config.json read (a config holds the recipe and the history: kilobytes).
_MAX_CONFIG = 64 << 20


def _read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint, validated: a JSON object with an integer ``format`` no
    newer than :data:`FORMAT` (absent: 0), ``model = {"name": str, "kwargs": object}`` and
    an object ``meta`` (absent: empty).

    Raises:
        CheckpointError: naming the file and the first thing that is wrong.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}; it is not a config.json that bnn_tol wrote")

    try:
        if path.stat().st_size > _MAX_CONFIG:
            raise bad(f"larger than {_MAX_CONFIG} bytes")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable config ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise bad(f"a JSON {type(config).__name__}, not an object")
    fmt = config.get("format", 0)
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise bad(f"format must be an integer, got {fmt!r}")
    if fmt > FORMAT:
        raise CheckpointError(f"{path}: format {fmt} is newer than this bnn_tol "
                              f"({__version__}) understands")
    model = config.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str)
            and isinstance(model.get("kwargs"), dict)):
        raise bad(f"model must be {{\"name\": str, \"kwargs\": object}}, got {model!r:.80}")
    config.setdefault("meta", {})
    if not isinstance(config["meta"], dict):
        raise bad(f"meta must be an object, got {config['meta']!r:.80}")
    return config


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> BNN:
    """Load a checkpoint written by :func:`save` (no code is executed), in eval mode.

    The architecture is first built on the ``meta`` device (no memory) and its tensor shapes
    compared with the safetensors header, so a config that does not match its weights (e.g.
    a hand-edited ``hidden = [200000, 200000]``) fails before anything is allocated.

    Raises:
        CheckpointError: missing files, unreadable JSON/safetensors, unknown model, or
            tensors that do not match the architecture in the config (names the keys).
    """
    path = Path(path)
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{path} is not a bnn_tol checkpoint: {p.name} is missing")
    config = _read_config(cfg_path)
    name, kwargs = config["model"]["name"], config["model"]["kwargs"]
    try:  # shapes only: parameters on the meta device allocate nothing
        with torch.device("meta"):
            skeleton = build(name, **kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot build model {name!r}: {e}") from e
    try:  # the safetensors header only
        with safe_open(str(w_path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path}: unreadable weights ({e})") from e
    own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    wrong = sorted(k for k in set(own) & set(stored) if own[k] != stored[k])
    if missing or unexpected or wrong:
        shapes = ", ".join(f"{k} {stored[k]} vs {own[k]}" for k in wrong[:3])
        raise CheckpointError(
            f"{path}: weights do not match {name} {kwargs} in {cfg_path.name}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
            + (f" (file vs config: {shapes})" if shapes else ""))
    del skeleton
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path}: unreadable weights ({e})") from e
    model = build(name, **kwargs)
    model.load_state_dict(state)
    model.meta = dict(config["meta"])
    return model.to(device).eval()
