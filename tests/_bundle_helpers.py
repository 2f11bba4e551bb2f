"""Helpers of the bundle tests: edit an exported bundle the way a user (or an attacker) would,
and watch which files deploy opens."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

#: 64 fixed uint8 images (1 x 8 x 8), the inputs of every bundle test.
IMAGES = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def canonical_digest(man: dict) -> str:
    """The documented manifest hash: sha256 of the manifest without ``manifest_sha256`` as
    compact JSON with sorted keys (``separators=(",", ":")``, ASCII), UTF-8."""
    body = {k: v for k, v in man.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest(b: Path) -> dict:
    return json.loads((Path(b) / "manifest.json").read_text())


def write_manifest(b: Path, man, *, rehash: bool = True) -> None:
    """Write ``man`` as the bundle's manifest; ``rehash``: with a recomputed manifest hash
    (what a deliberate edit does), else as edited."""
    if rehash and isinstance(man, dict):
        man["manifest_sha256"] = canonical_digest(man)
    (Path(b) / "manifest.json").write_text(json.dumps(man, indent=2))


def put_array(b: Path, man: dict, name: str, arr: np.ndarray) -> None:
    """Save ``arr`` as ``name`` in the bundle and record its sha256 in ``man`` (not written)."""
    np.save(Path(b) / name, arr, allow_pickle=False)
    man["sha256"][name] = sha(Path(b) / name)


@contextlib.contextmanager
def opened_paths(confine: Path | None = None):
    """Record every path opened through ``open``/``io.open``/``os.open`` inside the block
    (resolved), to assert that deploy reads nothing outside the bundle. With ``confine``, an
    open outside that directory raises ``AssertionError`` before anything is read (so a
    regression fails the test instead of reading ``/dev/zero`` until memory runs out)."""
    seen: list[Path] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def note(file) -> None:
        if isinstance(file, str | bytes | os.PathLike):
            p = Path(os.path.realpath(os.fsdecode(file)))
            seen.append(p)
            if confine is not None and outside([p], confine):
                raise AssertionError(f"opened {p} outside {confine}")

    def spy_open(file, *a, **k):
        note(file)
        return real_open(file, *a, **k)

    def spy_io_open(file, *a, **k):
        note(file)
        return real_io_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        if k.get("dir_fd") is None:
            note(path)
        return real_os_open(path, *a, **k)

    builtins.open, io.open, os.open = spy_open, spy_io_open, spy_os_open
    try:
        yield seen
    finally:
        builtins.open, io.open, os.open = real_open, real_io_open, real_os_open


def outside(seen: list[Path], root: Path) -> list[Path]:
    """The paths of ``seen`` that are not inside directory ``root``."""
    root = Path(os.path.realpath(root))
    return [p for p in seen if root != p and root not in p.parents]
