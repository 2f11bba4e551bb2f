"""The sweep CSV format: recognized, locked, validated, resumable.

A sweep writes ``<out>`` (one row per (model, BER, map), :data:`COLUMNS`: the ``sweep`` table
of :mod:`bnn_tol.schema`) and the sidecar ``<out>.meta.json`` (format version
:data:`META_VERSION`, the columns, what defines the rows: per model a sha256 of its state dict
and its faulty layers; the dataset's name, split, size and sha256; the fault targets; the error
model; and the provenance). A sidecar without an error model (written before error models were
selectable) is a Bernoulli sweep.
While a sweep runs it holds an exclusive ``flock`` on ``<out>``; rows of each finished
(model, BER) are appended in one write and fsynced, so a killed sweep leaves at most a torn
last line, which :meth:`SweepFile.open_rows` cuts off before resuming. Nothing in an existing
file is touched before it is recognized as ours (sidecar + exact header + same settings).

Files of earlier versions are read (:func:`read_sweep`), never resumed: the previous release
(sidecar version 1) named the map seed ``seed`` (now ``map_seed``); files written before codecs
lack ``bits_per_weight`` / ``memory_bits`` (read as NaN / -1).
"""

from __future__ import annotations

import fcntl
import io as _io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bnn_tol import schema
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import FileInUse, InvalidArgument, ResultsMismatch
from bnn_tol.faults.maps import select_layers
from bnn_tol.files import check_output, ensure_dir, write_text, writing
from bnn_tol.provenance import data_digest, environment, model_digest

__all__ = ["COLUMNS", "PREVIOUS_COLUMNS", "OLD_COLUMNS", "META_SUFFIX", "META_VERSION",
           "meta_path", "read_sweep", "load_sweep", "SweepFile", "settings"]

#: Columns of a sweep CSV, in order: the ``sweep`` table of :mod:`bnn_tol.schema`.
COLUMNS = schema.columns("sweep")
#: Columns of sweep CSVs of the previous release (sidecar version 1): the map seed was
#: ``seed``. Read (as ``map_seed``), not resumed.
PREVIOUS_COLUMNS = [("seed" if c == "map_seed" else c) for c in COLUMNS]
#: Columns of sweep files written before codecs (still readable; ``bits_per_weight`` and
#: ``memory_bits`` are NaN / -1 there).
OLD_COLUMNS = PREVIOUS_COLUMNS[:8]

#: Suffix of the sidecar that records what defines the sweep in ``<out>`` (``<out>.meta.json``).
META_SUFFIX = ".meta.json"
#: Version of the sidecar; it changes with the header (2: ``map_seed``, schema 2).
META_VERSION = 2
_META_FORMAT = "bnn_tol.sweep"
_HEADER = ",".join(COLUMNS)
_PREVIOUS_HEADER = ",".join(PREVIOUS_COLUMNS)
_OLD_HEADER = ",".join(OLD_COLUMNS)
_HEADERS = {_HEADER: COLUMNS, _PREVIOUS_HEADER: PREVIOUS_COLUMNS, _OLD_HEADER: OLD_COLUMNS}
_FLOAT_COLS = ("ber", "p01", "p10", "accuracy", "rerr", "bits_per_weight")
_INT_COLS = ("map", "map_seed", "memory_bits")
_UNBOUNDED = ("ber", "bits_per_weight")  # not rates/accuracies in [0, 1]
_KEY = ["model", "p01", "p10", "map", "map_seed"]
#: The values an integer column may hold (seeds are 63-bit; memory_bits -1: unknown).
_INT_RANGE = {"map": (0, (1 << 63) - 1), "map_seed": (0, (1 << 63) - 1),
              "memory_bits": (-1, (1 << 63) - 1)}
#: The error model of sidecars written before error models were recorded.
_DEFAULT_ERROR = {"name": "bernoulli"}
#: Largest sidecar read (a sidecar records settings and provenance: a few kB per model).
_MAX_META = 64 << 20


def meta_path(out) -> Path:
    """The sidecar ``<out>.meta.json`` of sweep CSV ``out``."""
    return Path(os.fspath(out) + META_SUFFIX)


def settings(models: dict, data: BNNDataset, layers, targets: tuple,
             error: dict | None = None, protect: dict | None = None) -> dict:
    """What defines a sweep's rows besides (model, BER, map, seed): engine, device and batch
    size do not (every engine is exact); the error model does (``error``: its
    :meth:`~bnn_tol.faults.registry.ErrorModel.settings`; default Bernoulli)."""
    return {
        "error": error or dict(_DEFAULT_ERROR),
        "models": {str(lb): {"digest": model_digest(m), "layers": list(select_layers(m, layers)),
                             **({"protect": protect[lb]} if (protect or {}).get(lb) else {})}
                   for lb, m in models.items()},
        "dataset": {"name": str(data.name), "split": str(data.split), "n_samples": len(data),
                    "digest": data_digest(data)},
        "targets": sorted(targets),
    }


def _is_sidecar(path: Path) -> bool:
    """Whether ``path`` is a sweep sidecar the library wrote (a JSON object whose ``format``
    is ``"bnn_tol.sweep"``); only such a file is ever replaced."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_META + 1)
        meta = json.loads(raw) if len(raw) <= _MAX_META else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == _META_FORMAT


def _write_meta(out, settings: dict) -> None:
    """Write the sidecar atomically (temporary file in the same directory, fsync, rename);
    an existing sidecar is replaced only if it is ours (:func:`_is_sidecar`)."""
    text = json.dumps({"format": _META_FORMAT, "version": META_VERSION, "columns": COLUMNS,
                       "settings": settings, "provenance": environment()}, indent=2)
    write_text(meta_path(out), text, fsync=True, replace=_is_sidecar)


def _settings_problem(st: object) -> str | None:
    """What is malformed in a sidecar's recorded ``settings`` (``None`` if nothing): the
    shapes :func:`settings` writes (``error`` optional: sidecars before error models)."""
    if not isinstance(st, dict):
        return f"settings is {type(st).__name__}, not an object"
    ds = st.get("dataset")
    if not (isinstance(ds, dict) and isinstance(ds.get("name"), str)
            and isinstance(ds.get("split"), str) and isinstance(ds.get("n_samples"), int)
            and isinstance(ds.get("digest"), str)):
        return "settings.dataset is not {name, split, n_samples, digest}"
    ms = st.get("models")
    if not (isinstance(ms, dict) and all(
            isinstance(m, dict) and isinstance(m.get("digest"), str)
            and isinstance(m.get("layers"), list) for m in ms.values())):
        return "settings.models is not {label: {digest, layers}}"
    tg = st.get("targets")
    if not (isinstance(tg, list) and all(isinstance(t, str) for t in tg)):
        return "settings.targets is not a list of names"
    err = st.get("error", _DEFAULT_ERROR)
    if not (isinstance(err, dict) and isinstance(err.get("name"), str)):
        return "settings.error is not {name, ...}"
    return None


def _read_meta(out) -> dict:
    """The sidecar (``format``, ``version`` 1 or :data:`META_VERSION`, ``settings``, ...);
    ``ResultsMismatch`` if ``out`` has no valid sidecar of ours (its JSON, format, version;
    :meth:`SweepFile.open_rows` then checks the columns and the shape of every setting)."""
    path = meta_path(out)
    why = None
    try:
        if path.stat().st_size > _MAX_META:
            raise ResultsMismatch(f"{out} is not recognized as a bnn_tol sweep CSV: its sidecar "
                                  f"{path.name} is larger than {_MAX_META} bytes; it was left "
                                  "untouched, use another --out")
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
            why = f"its sidecar {path.name} is not a bnn_tol sweep sidecar"
        elif meta.get("version") not in (1, META_VERSION):
            why = f"its sidecar {path.name} has unknown version {meta.get('version')!r}"
        elif not isinstance(meta.get("settings"), dict):
            why = f"its sidecar {path.name} records no settings"
    except FileNotFoundError:
        why = f"its sidecar {path.name} is missing (every bnn_tol sweep writes one)"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = f"its sidecar {path.name} is unreadable ({type(e).__name__})"
    if why:
        raise ResultsMismatch(f"{out} is not recognized as a bnn_tol sweep CSV: {why}; it was "
                              "left untouched, use another --out")
    return meta


def _differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between recorded and current settings (models of ``new``
    that the file does not know yet are not a difference: they are added)."""
    diffs = []
    od, nd = old.get("dataset", {}), new["dataset"]
    for k in ("name", "split", "n_samples"):
        if od.get(k) != nd[k]:
            diffs.append(f"dataset {k}={od.get(k)!r}, now {k}={nd[k]!r}")
    if not diffs and od.get("digest") != nd["digest"]:
        diffs.append("other test images or labels (same name and size, different sha256)")
    oe, ne = old.get("error", _DEFAULT_ERROR), new.get("error", _DEFAULT_ERROR)
    if oe != ne:
        diffs.append(f"error model {oe.get('name')!r}, now {ne.get('name')!r}"
                     if oe.get("name") != ne.get("name") else
                     f"error model {ne.get('name')!r} with settings {oe}, now {ne}")
    if old.get("targets") != new["targets"]:
        diffs.append(f"targets={old.get('targets')}, now targets={new['targets']}")
    for lb, m in new["models"].items():
        o = old.get("models", {}).get(lb)
        if o is None:
            continue
        if o.get("digest") != m["digest"]:
            diffs.append(f"model {lb!r} with weights sha256 {str(o.get('digest'))[:12]}..., "
                         f"now {m['digest'][:12]}... (retrained or another checkpoint)")
        if o.get("layers") != m["layers"]:
            diffs.append(f"model {lb!r} with faulty layers={o.get('layers')}, "
                         f"now layers={m['layers']}")
        if o.get("protect") != m.get("protect"):
            diffs.append(f"model {lb!r} with protected bits sha256 {o.get('protect')}, now "
                         f"{m.get('protect')}")
    return diffs


def _parse_sweep(raw: bytes, path) -> pd.DataFrame:
    """Validate a whole sweep CSV (``raw`` bytes) and return its rows (see :func:`read_sweep`)."""
    def bad(why: str) -> ResultsMismatch:
        return ResultsMismatch(f"{path} {why}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("is not a sweep CSV (not UTF-8 text)") from None
    if not text.strip():
        raise bad("is empty: not a sweep CSV")
    lines = text.split("\n")
    first = lines[0].rstrip("\r")
    if first not in _HEADERS:
        raise bad(f"is not a sweep CSV: its header is {first[:100]!r}, expected {_HEADER!r}")
    header = _HEADERS[first]
    if lines[-1] != "":
        raise bad("ends in a partial line (an interrupted sweep): continue it with --resume "
                  "(resume=True) before reading it")
    for n, line in enumerate(lines[1:-1], start=2):
        if line.rstrip("\r") in _HEADERS:
            raise bad(f"has a second header at line {n} (two sweeps wrote into it)")
    try:
        df = pd.read_csv(_io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise bad(f"is not a valid sweep CSV ({msg})") from None

    def convert(col: str, cast) -> list:
        out = []
        for n, v in enumerate(df[col], start=2):
            try:
                x = cast(v)
            except (TypeError, ValueError):
                raise bad(f"line {n}: {col}={v!r} is not a number") from None
            if cast is float and not (math.isfinite(x) and (col in _UNBOUNDED or 0.0 <= x <= 1.0)):
                raise bad(f"line {n}: {col}={v!r} is out of range")
            if cast is int and not _INT_RANGE[col][0] <= x <= _INT_RANGE[col][1]:
                raise bad(f"line {n}: {col}={v!r} is out of range")
            out.append(x)
        return out

    df = schema.upgrade(df, "sweep")  # the previous release's seed is the map seed
    res = pd.DataFrame({"model": df["model"].astype(str)})
    for col in COLUMNS[1:]:
        if header is OLD_COLUMNS and col in ("bits_per_weight", "memory_bits"):
            res[col] = -1 if col in _INT_COLS else math.nan  # written before codecs
            continue
        res[col] = convert(col, int if col in _INT_COLS else float)
    res = res.astype({c: "int64" for c in _INT_COLS} | {c: "float64" for c in _FLOAT_COLS})
    p01, p10 = res["p01"].to_numpy(), res["p10"].to_numpy()
    for col, want in (("ber", np.where(p01 == p10, p01, 0.5 * (p01 + p10))),
                      ("rerr", 1.0 - res["accuracy"].to_numpy())):
        wrong = np.flatnonzero(res[col].to_numpy() != want)
        if len(wrong):
            i = int(wrong[0])
            raise bad(f"line {i + 2}: {col}={res[col].iloc[i]!r} contradicts the row ("
                      + ("p01, p10" if col == "ber" else "1 - accuracy")
                      + f" give {want[i]!r})")
    dup = res.duplicated(_KEY)
    if dup.any():
        n = int(np.flatnonzero(dup.to_numpy())[0]) + 2
        raise bad(f"line {n} repeats the key (model, p01, p10, map, map_seed) of an earlier row "
                  "(two sweeps wrote into it)")
    return schema.validate(res[COLUMNS], "sweep", what=str(path), error=ResultsMismatch)


def read_sweep(path) -> pd.DataFrame:
    """Read and validate a sweep CSV written by :func:`sweep` (``out=``).

    Accepts only a complete file: the exact header (:data:`COLUMNS`; :data:`PREVIOUS_COLUMNS`
    of the previous release, whose ``seed`` is read as ``map_seed``; :data:`OLD_COLUMNS` of
    files written before codecs) once, every row complete and newline-terminated, numeric
    columns finite (rates and accuracies in [0, 1], ``map``/``map_seed``/``memory_bits``
    integers in range), every row consistent (``ber`` is ``p`` or ``(p01 + p10) / 2``,
    ``rerr = 1 - accuracy``, as written), no key ``(model, p01, p10, map, map_seed)`` twice;
    then the rows are validated against the ``sweep`` table of :mod:`bnn_tol.schema`.

    Returns:
        One row per (model, BER, map), columns :data:`COLUMNS` (``map``/``map_seed`` int64).

    Raises:
        ResultsMismatch: anything less than a valid sweep CSV (one line naming the problem).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ResultsMismatch(f"{path}: cannot read the sweep CSV ({e.strerror})") from None
    return _parse_sweep(raw, path)


def load_sweep(path) -> pd.DataFrame:
    """Any sweep table in a file: a sweep CSV (:func:`read_sweep`, every check of the file
    format), or another CSV that fits the ``sweep`` table of :mod:`bnn_tol.schema` (a study's
    ``sweeps.csv``, extra columns kept; tables of the previous release upgraded).

    Raises:
        ResultsMismatch: one line naming ``path`` and what is wrong (a table that is not a
            sweep says ``not a sweep CSV``).
    """
    try:
        with open(path, "rb") as fh:
            first = fh.readline().rstrip(b"\r\n")
    except OSError as e:
        raise ResultsMismatch(f"{path}: cannot read the sweep CSV ({e.strerror})") from None
    if not first or first.decode("utf-8", "replace") in _HEADERS:
        return read_sweep(path)
    return schema.read_csv(path, "sweep")


class SweepFile:
    """``out`` opened for appending under an exclusive, non-blocking ``flock`` held for the
    whole sweep; a second writer gets :class:`FileInUse`. Nothing in an existing file is
    touched before it is recognized as ours (sidecar + exact header + same settings)."""

    def __init__(self, out, *, resume: bool) -> None:
        self.path = Path(os.fspath(out))
        meta = meta_path(self.path)
        check_output(self.path, replace=True)  # a directory, a device, below a file
        if os.path.lexists(meta) and not _is_sidecar(meta):
            raise ResultsMismatch(f"{out}: its sidecar {meta.name} exists and was not written "
                                  "by bnn_tol (or is not a file); it was left untouched, use "
                                  "another --out")
        if self.path.exists() and self.path.stat().st_size > 0 and not resume:
            raise InvalidArgument(f"{out} exists: pass resume=True (--resume) to continue that "
                                  "sweep, or choose another file")
        ensure_dir(self.path.parent)
        self.created = not self.path.exists()
        with writing(self.path):
            self.fh = open(self.path, "ab")  # noqa: SIM115 -- closed in close()
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise FileInUse(f"{out} is in use by another sweep (it holds the file's lock); wait "
                            "for it to finish or use another --out") from None
        self.wrote_meta = False

    def open_rows(self, settings: dict) -> pd.DataFrame:
        """Recognize, compare and repair the existing rows (empty frame for a new file)."""
        if self.path.stat().st_size == 0:
            _write_meta(self.path, settings)
            self.wrote_meta = True
            return pd.DataFrame(columns=COLUMNS)
        meta = _read_meta(self.path)
        old = meta["settings"]
        with open(self.path, "rb") as fh:
            raw = fh.read()
        first = raw.split(b"\n", 1)[0].rstrip(b"\r")
        if first == _OLD_HEADER.encode():
            raise ResultsMismatch(f"{self.path} was written by an older bnn_tol (no "
                                  "bits_per_weight/memory_bits columns); it was left untouched, "
                                  "use another --out (read_sweep still reads it)")
        if first == _PREVIOUS_HEADER.encode():
            raise ResultsMismatch(f"{self.path} was written by an older bnn_tol (its map seed "
                                  "column is 'seed', now 'map_seed'); it was left untouched, use "
                                  "another --out (read_sweep still reads it)")
        if first != _HEADER.encode():
            raise ResultsMismatch(f"{self.path} is not recognized as a bnn_tol sweep CSV: its "
                                  "first line is not the sweep header; it was left untouched, "
                                  "use another --out")
        if meta.get("version") != META_VERSION or meta.get("columns") != COLUMNS:
            raise ResultsMismatch(f"{self.path} is not recognized as a bnn_tol sweep CSV: its "
                                  f"sidecar {meta_path(self.path).name} is of version "
                                  f"{meta.get('version')!r} with columns {meta.get('columns')}, "
                                  "not those of its header; it was left untouched, use another "
                                  "--out")
        problem = _settings_problem(old)
        if problem is not None:
            raise ResultsMismatch(f"{self.path} is not recognized as a bnn_tol sweep CSV: its "
                                  f"sidecar {meta_path(self.path).name} is malformed ({problem}); "
                                  "it was left untouched, use another --out")
        diffs = _differences(old, settings)
        if diffs:
            raise ResultsMismatch(f"{self.path} was made with {'; '.join(diffs)}; use another "
                                  "--out for these settings")
        torn = not raw.endswith(b"\n")  # ours, torn by a killed writer: drop the partial line
        cut = raw.rfind(b"\n") + 1
        rows = _parse_sweep(raw[:cut], self.path)
        unknown = sorted(set(rows["model"]) - set(old["models"]))
        if unknown:
            raise ResultsMismatch(f"{self.path} has rows of model(s) {unknown[:3]} that its "
                                  f"sidecar {meta_path(self.path).name} does not record (rows of "
                                  "another sweep?); it was left untouched, use another --out")
        if torn:  # only now that every complete row is valid
            with writing(self.path):
                os.ftruncate(self.fh.fileno(), cut)
        new = {lb: m for lb, m in settings["models"].items() if lb not in old["models"]}
        if new:
            _write_meta(self.path, {**old, "models": {**old["models"], **new}})
        return rows

    def append(self, rows: list[dict] | pd.DataFrame) -> None:
        """Append rows (with the header if the file is empty) in one write, flush + fsync: a
        crash leaves at most a torn last line, which :meth:`open_rows` repairs."""
        buf = _io.StringIO()
        header = os.fstat(self.fh.fileno()).st_size == 0
        frame = schema.validate(pd.DataFrame(rows, columns=COLUMNS), "sweep",
                                what=f"rows for {self.path}")
        frame.to_csv(buf, header=header, index=False, float_format="%.17g", lineterminator="\n")
        with writing(self.path):
            self.fh.write(buf.getvalue().encode("utf-8"))
            self.fh.flush()
            os.fsync(self.fh.fileno())

    def finish(self, table: pd.DataFrame) -> None:
        """After a complete sweep, order the file as the returned ``table`` (models, then BERs
        as the call listed them, then maps; engines may append one map at all its BERs at a
        time): rows of the file that ``table`` does not hold (earlier sweeps into it) first,
        in their order, then ``table``'s rows. The same rows, written beside the file and
        renamed over it while the lock is held: a crash leaves the old or the new order, never
        fewer rows."""
        with open(self.path, "rb") as fh:
            raw = fh.read()
        if not raw:
            return
        rows = _parse_sweep(raw, self.path)
        ours = set(zip(*(table[c] for c in _KEY), strict=True))
        rest = rows[[k not in ours for k in zip(*(rows[c] for c in _KEY), strict=True)]]
        frame = pd.concat([rest[COLUMNS], table[COLUMNS]], ignore_index=True) if len(rest) \
            else table[COLUMNS]
        text = frame.to_csv(index=False, float_format="%.17g", lineterminator="\n")
        if text.encode("utf-8") != raw:
            write_text(self.path, text, fsync=True, replace=True)

    def close(self) -> None:
        """Release the lock; a file this sweep created but never wrote a row to is removed."""
        try:
            if self.created and os.fstat(self.fh.fileno()).st_size == 0:
                self.path.unlink(missing_ok=True)
                if self.wrote_meta:
                    meta_path(self.path).unlink(missing_ok=True)
        finally:
            with writing(self.path):
                self.fh.close()

