"""What a result depends on besides its settings: versions, code commit, CPU, threads.

Float results of training (and of every float reduction) depend on the CPU (kernel dispatch,
reduction order) and the thread count, so every results file the library writes records
:func:`environment` next to its numbers (``environment.json`` of a study, the sidecar of a
sweep CSV, the header of ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bnn_tol._version import __version__

__all__ = ["environment", "cpuinfo", "cpu_model", "cpu_flags_digest", "has_cpu_flag",
           "available_cores", "git_commit", "model_digest", "data_digest"]


@lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields, keys lower-case (empty if unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, val = line.partition(":")
        out[key.strip().lower()] = val.strip()
    return out


def cpu_model() -> str:
    """CPU model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def has_cpu_flag(*flags: str) -> bool:
    """Whether the CPU advertises any of ``flags`` (e.g. ``"avx512_vnni"``) in ``/proc/cpuinfo``."""
    have = set(cpuinfo().get("flags", "").split())
    return any(f in have for f in flags)


def cpu_flags_digest() -> str | None:
    """sha256 prefix of the sorted CPU feature flags: the ISA torch's kernels dispatch on."""
    flags = cpuinfo().get("flags")
    return (hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
            if flags else None)


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``, else ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, text=True,
                           capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip()


def git_commit() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding this package; ``(None, None)`` for an
    installed copy. ``dirty``: tracked files differ from the commit."""
    if not _git("ls-files", "--error-unmatch", "provenance.py"):
        return None, None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if commit is None or dirty is None else bool(dirty))


def environment(threads: int | None = None, workers: int = 1,
                command: str | None = None) -> dict[str, Any]:
    """The record written next to results.

    ``bnn_tol`` version, git commit and ``git_dirty``, torch / numpy / pandas / python versions,
    platform, CPU model and a digest of its feature flags, available cores, torch threads per
    task (default: the current ``torch.get_num_threads()``), workers, and the command that
    reproduces the run.
    """
    commit, dirty = git_commit()
    return {"bnn_tol": __version__, "git_commit": commit, "git_dirty": dirty,
            "torch": torch.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_flags": cpu_flags_digest(), "cores": available_cores(),
            "torch_threads": int(threads if threads is not None else torch.get_num_threads()),
            "workers": int(workers), "command": command}


def describe(env: dict[str, Any]) -> str:
    """One line of an :func:`environment` record: ``CPU (cores) · bnn_tol version @ commit
    [(dirty)] · torch version · python version · threads``."""
    commit = (env.get("git_commit") or "no git")[:12] + (" (dirty)" if env.get("git_dirty")
                                                        else "")
    return (f"{env.get('cpu')} ({env.get('cores')} cores) · bnn_tol {env.get('bnn_tol')} @ "
            f"{commit} · torch {env.get('torch')} · python {env.get('python')} · "
            f"{env.get('torch_threads')} threads")


def _tensor_bytes(t) -> bytes:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def model_digest(model) -> str:
    """sha256 over a model's state dict: per tensor (sorted by name) its name, dtype, shape and
    bytes. What identifies "the same weights" in sweep sidecars and studies."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_digest(data) -> str:
    """sha256 over a dataset's images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""
    h = hashlib.sha256(f"{tuple(data.images.shape)}|".encode())
    h.update(_tensor_bytes(data.images))
    h.update(_tensor_bytes(data.labels.to(torch.int64)))
    return h.hexdigest()
