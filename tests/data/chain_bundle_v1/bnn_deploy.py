"""Numpy reference inference of an exported BNN (:func:`bnn_tol.export`).

This file imports only numpy at module level; every bundle carries a copy
(``bnn_deploy.py``), so a hardware team can run it without bnn_tol or torch
(``import bnn_tol.deploy`` itself goes through the package, which imports torch).

Clean inference imports only numpy: XNOR + popcount (``np.bitwise_count``, numpy >= 2) on the
packed weight words, integer threshold comparisons, bit max-pooling, and the exported score
table of the output block; predictions equal ``model(x).argmax(1)`` of the torch model for every
input. Bit errors go into the packed memory image:

* ``ber=p`` or ``(p01, p10)`` with ``seed=s`` (and ``error=``, default ``bernoulli``): exactly
  the flips of ``errors.inject(model, ber, seed=s, error=...)``, drawn by the library's own
  drawing entry point (:func:`bnn_tol.faults.registry.draw_sites`, whose persistent maps are
  the numpy-only :mod:`bnn_tol.faults.draw`), hence the predictions of the sweep row with that
  seed, bit for bit. This path needs bnn_tol installed (the registry imports torch for the
  other error models); the bundle's standalone copy does clean inference and flip masks;
* ``flip_mask=``: XOR masks over the image (``{"layer{k}": uint64 array shaped like the packed
  weights}``, or an ``.npz`` path with those keys) -- pure numpy.

**What is checked before anything is used** (:func:`load_bundle`; any failure is one
:class:`DeployError` line naming the file or field):

* files: only the names the format defines are opened -- ``manifest.json``, ``bnn_deploy.py``
  and ``layer{k}_{weights,t,direction,const,scores}.npy`` for the layer indices ``k`` of the
  manifest. A name in the manifest that differs from the one its layer entry implies (``..``,
  absolute paths, ``/dev/zero``, other spellings) is refused unopened. Each file must be a
  plain file directly in the bundle directory (not a symbolic link, directory, device or
  pipe: opened with ``O_NOFOLLOW``/``O_NONBLOCK`` and checked with ``fstat``), and its size must
  be what the manifest's shapes imply (``.npy``: data bytes plus a header of at most
  :data:`MAX_NPY_HEADER` bytes; the manifest at most :data:`MAX_MANIFEST_BYTES`) *before* it
  is read. Arrays are parsed with :mod:`numpy.lib.format` (dtype, shape and C order compared
  with the manifest, exact length) and loaded with ``allow_pickle=False``.
* checksums: the manifest's ``sha256`` names exactly those files, each a lowercase 64-digit
  hex digest, and every file matches its digest.
* the manifest itself: ``manifest_sha256`` is the sha256 of its canonical form
  (:func:`manifest_digest`: every other field as compact JSON with sorted keys), so an edited
  field is refused as an edit. JSON with duplicate keys, ``NaN``/``Infinity``, or anything but
  an object at the top is refused.
* every field, against the format and the arrays (also for bundles of the previous release,
  written before ``manifest_sha256`` and ``input.offset``/``input.scale`` existed: they load
  if these checks pass, their grid read from ``input.transform``): the known top-level, input
  and layer fields and no others; ``format``, ``version``, ``bit_order`` (the documented
  text, :data:`BIT_ORDER`), ``input.dtype`` ``uint8``, the input offset (0..255; the number in
  ``input.transform`` must agree) and scale; roles ``first``, ``hidden``..., ``output`` in
  order with strictly increasing ``index``; ``kind`` ``linear`` or ``conv`` (the output layer
  linear); the geometry from ``input.shape`` through every layer (a linear ``fan_in`` is the
  size of its input, flattened -- a multi-dimensional input must say ``flatten``; a conv's
  ``in_channels`` and ``fan_in = in_channels kh kw`` match its input, its output and pooled
  sizes are at least 1; ``pool`` on hidden conv layers only); ``input_scale`` of the first
  layer equals ``input.scale``, of the others 1; ``classes`` (one string per output row);
  ``memory_bits`` = sum of ``rows fan_in``. Arrays: ``weights`` uint64 ``(rows,
  ceil(fan_in / 64))`` with padding bits 0, ``t`` int64 ``(rows,)``, ``direction`` int8
  ``(rows,)`` in {-1, 0, +1}, ``const`` int8 ``(rows,)``, +-1 exactly where ``direction`` is 0
  and 0 elsewhere, ``scores`` float32 ``(2 fan_in + 1, rows)``. ``model``, ``bnn_tol`` and
  layer ``name`` are informational (their types are checked).

What the checks cannot catch: a deliberate edit that recomputes every hash and stays
consistent (other thresholds, weights or input offset) is a different model, which is what it
then computes. The hash guards against accidents and half edits, not against an author.

>>> pred = predict("deploy/", images_uint8)                      # doctest: +SKIP
>>> pred_bad = predict("deploy/", images_uint8, ber=0.01, seed=3)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import re
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["load_bundle", "predict", "memory_image", "manifest_digest", "DeployError",
           "FORMAT", "VERSION", "MANIFEST", "READER", "BIT_ORDER"]

FORMAT = "bnn_tol.export"
VERSION = 1
MANIFEST = "manifest.json"
#: The numpy-only reader each bundle carries (a copy of this file).
READER = "bnn_deploy.py"
BIT_ORDER = ("row r = output neuron/channel; bit j (LSB 0) of word w of row r = weight 64 w + j "
             "of that row in torch flatten order; 1 = +1, 0 = -1; padding bits 0; stored-bit "
             "index i = r * fan_in + c")
#: dtype of each array of a layer entry (``layer{k}_{field}.npy``), as ``np.dtype.str``.
ARRAYS = {"weights": "<u8", "t": "<i8", "direction": "|i1", "const": "|i1", "scores": "<f4"}
MAX_MANIFEST_BYTES = 64 << 20
MAX_READER_BYTES = 4 << 20
#: Bytes an ``.npy`` file may hold beyond its data (magic, version, header).
MAX_NPY_HEADER = 4096
_MAX_INT = 1 << 31  # bound of every count in a manifest (rows, fan_in, sizes, kernel, ...)
_MAX_LAYERS = 4096
_HEX = re.compile(r"[0-9a-f]{64}")
_TOP = {"format", "version", "bnn_tol", "model", "input", "bit_order", "classes", "layers",
        "sha256", "memory_bits", "manifest_sha256"}
_INPUT = {"shape", "dtype", "offset", "scale", "transform", "levels"}
_LAYER = {"index", "name", "kind", "rows", "fan_in", "flatten", "pool", "input_scale", "role",
          "weights"}
_CONV = {"kernel", "padding", "in_channels"}
_ROLE_ARRAYS = {"first": ("t", "direction", "const"), "hidden": ("t", "direction", "const"),
                "output": ("scores",)}


class DeployError(ValueError):
    """A bundle or input that :func:`predict` cannot use (one line naming the problem)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


def _popcount(x: np.ndarray) -> np.ndarray:
    if not hasattr(np, "bitwise_count"):
        raise DeployError("bnn_tol.deploy needs numpy >= 2.0 (np.bitwise_count)")
    return np.bitwise_count(x)


def _show(v: object) -> str:
    """``repr(v)``, cut to 60 characters (messages stay one short line)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# --- reading files ----------------------------------------------------------------------

def _read_plain(root: Path, name: str, low: int, high: int, expect: str) -> bytes:
    """The bytes of ``root / name``, a plain file of ``low..high`` bytes (checked with fstat
    before reading; never through a symbolic link, never a directory, device or pipe)."""
    path = root / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DeployError(f"{root}: {name} is missing") from None
    except OSError as e:
        raise DeployError(f"{root}: cannot read {name} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeployError(f"{root}: {name} is not a plain file (a link, directory, device or "
                          "pipe); a bundle holds plain files only")
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise DeployError(f"{root}: cannot open {name} as a plain file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeployError(f"{root}: {name} is not a plain file; a bundle holds plain files "
                              "only")
        if not low <= st.st_size <= high:
            raise DeployError(f"{root}: {name} has {st.st_size} bytes where {expect}")
        chunks, left = [], st.st_size + 1  # one byte more: a file that grew is noticed
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise DeployError(f"{root}: cannot read {name} ({e.strerror})") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) != st.st_size:
        raise DeployError(f"{root}: {name} changed while it was read")
    return raw


def _npy(raw: bytes, what: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Parse ``.npy`` bytes whose header must say ``dtype`` (``np.dtype.str``), ``shape``, C
    order, followed by exactly the data bytes; loaded with ``allow_pickle=False``."""
    fp = io.BytesIO(raw)
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            got_shape, fortran, got = fmt.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            got_shape, fortran, got = fmt.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
        else:
            raise DeployError(f"{what}: .npy format version {version} (1.0 or 2.0 expected)")
    except DeployError:
        raise
    except Exception as e:  # noqa: BLE001 -- numpy's header parser on untrusted bytes raises
        # ValueError, SyntaxError, tokenize.TokenError, TypeError, EOFError, ...: all "not .npy"
        raise DeployError(f"{what} is not a .npy array ({type(e).__name__}: {e})") from None
    if got.str != dtype or got.names is not None or got.subdtype is not None:
        raise DeployError(f"{what} holds {got} ({got.str}); the format stores {np.dtype(dtype)} "
                          f"({dtype})")
    if tuple(got_shape) != tuple(shape):
        raise DeployError(f"{what} has shape {tuple(got_shape)}; the manifest implies {shape}")
    if fortran:
        raise DeployError(f"{what} is stored in Fortran order; the format stores C order")
    nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    if len(raw) - fp.tell() != nbytes:
        raise DeployError(f"{what} has {len(raw) - fp.tell()} data bytes; a {dtype} {shape} "
                          f"array has {nbytes} (truncated or with trailing bytes)")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # pragma: no cover - the header was checked
        raise DeployError(f"{what} is not a .npy array ({e})") from None


def _parse_json(raw: bytes, where: str) -> object:
    """JSON text -> value; duplicate keys, NaN/Infinity, invalid UTF-8 or JSON refused."""

    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise DeployError(f"{where} has the key {_show(k)} twice (duplicate key)")
            out[k] = v
        return out

    def constant(c):
        raise DeployError(f"{where} holds {c}, which JSON does not have")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except DeployError:
        raise
    except UnicodeDecodeError:
        raise DeployError(f"{where} is not UTF-8 text") from None
    except RecursionError:
        raise DeployError(f"{where} is not a manifest: JSON nested too deeply") from None
    except ValueError as e:
        raise DeployError(f"{where} is not valid JSON ({e})") from None


def manifest_digest(man: Mapping) -> str:
    """sha256 (hex) of a manifest's canonical form: every field but ``manifest_sha256`` as
    ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True)``, UTF-8.

    Formatting (indentation, key order) does not change it; any value does.

    Raises:
        DeployError: ``man`` is not a JSON object (non-string keys, NaN, other types).
    """
    if not isinstance(man, Mapping):
        raise DeployError(f"a manifest is a JSON object, got {type(man).__name__}")
    body = {k: v for k, v in man.items() if k != "manifest_sha256"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DeployError(f"the manifest is not plain JSON ({e})") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- checking the manifest --------------------------------------------------------------

def _int(v: object, what: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise DeployError(f"{what} must be an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _ints(v: object, what: str, n: int, lo: int) -> list[int]:
    if not isinstance(v, list) or len(v) != n:
        raise DeployError(f"{what} must be a list of {n} integers, got {_show(v)}")
    return [_int(x, what, lo) for x in v]


def _keys(d: object, what: str, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(d, dict):
        raise DeployError(f"{what} must be a JSON object, got {_show(d)}")
    missing = sorted(required - set(d))
    if missing:
        raise DeployError(f"{what} lacks the field(s) {', '.join(missing)}")
    extra = sorted(str(k) for k in set(d) - allowed)
    if extra:
        raise DeployError(f"{what} has field(s) the format does not define: {', '.join(extra)}")
    return d


def _input_offset(man: dict) -> int:
    """The pixel offset of the bundle's input grid (``q = p - offset``). Bundles written before
    ``input.offset`` existed state the transform only in words (``"q = p - <offset> (int);
    ..."``): it is read from there; when both exist they must agree."""
    inp = man["input"]
    said = re.match(r"q = p - (\d+) \(int\)", inp["transform"])
    offset = inp.get("offset")
    if offset is None:
        if said is None:
            raise DeployError("the bundle's manifest states no input offset (input.offset)")
        offset = int(said.group(1))
    offset = _int(offset, "input.offset (a pixel value)", 0, 255)
    if said is not None and int(said.group(1)) != offset:
        raise DeployError(f"input.transform says q = p - {said.group(1)} but input.offset is "
                          f"{offset}: an inconsistent manifest")
    return offset


def _input_table(man: dict) -> np.ndarray:
    """``(256,)`` int64: the first block's integer input ``q`` of each pixel value -- ``p -
    offset``, or ``input.levels`` (an input quantizer: 256 integers ``|q| < 2^15``, with the
    transform text ``q = levels[p] ...``)."""
    inp = man["input"]
    levels = inp.get("levels")
    if levels is None:
        return np.arange(256, dtype=np.int64) - _input_offset(man)
    if not isinstance(levels, list) or len(levels) != 256 or not all(
            isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**15 for v in levels):
        raise DeployError("input.levels must list 256 integers |q| < 2^15 (one per pixel value)")
    if not inp["transform"].startswith("q = levels[p]"):
        raise DeployError("input.levels is given but input.transform does not say q = levels[p]: "
                          "an inconsistent manifest")
    return np.asarray(levels, dtype=np.int64)


def _check_manifest(man: object, where: str) -> list[dict]:
    """Check every field of a manifest (see the module docstring); return per layer the
    arrays it needs: ``[{field: (file name, dtype, shape)}]``."""
    if not isinstance(man, dict):
        raise DeployError(f"{where}: the manifest must be a JSON object, got "
                          f"{type(man).__name__}")
    if man.get("format") != FORMAT:
        raise DeployError(f"{where} is not a bnn_tol export (format {_show(man.get('format'))})")
    if man.get("version") != VERSION or isinstance(man.get("version"), bool):
        raise DeployError(f"{where}: a version-{_show(man.get('version'))} bundle; this reader "
                          f"knows version {VERSION}")
    if "manifest_sha256" in man:
        got = man["manifest_sha256"]
        if not isinstance(got, str) or not _HEX.fullmatch(got):
            raise DeployError(f"{where}: manifest_sha256 must be a lowercase hex sha256, got "
                              f"{_show(got)}")
        if manifest_digest(man) != got:
            raise DeployError(f"{where}: the manifest does not match its manifest_sha256 (edited "
                              "or corrupted)")
    _keys(man, f"{where}: the manifest", _TOP, _TOP - {"manifest_sha256"})
    for key, typ in (("bnn_tol", str), ("model", dict), ("bit_order", str)):
        if not isinstance(man[key], typ):
            raise DeployError(f"{where}: {key} must be a {typ.__name__}, got {_show(man[key])}")
    if man["bit_order"] != BIT_ORDER:
        raise DeployError(f"{where}: bit_order is not the documented one ({BIT_ORDER})")
    inp = _keys(man["input"], f"{where}: input", _INPUT, {"shape", "dtype", "transform"})
    if ("offset" in inp) != ("scale" in inp):
        raise DeployError(f"{where}: input states offset and scale together, or neither")
    if inp["dtype"] != "uint8" or not isinstance(inp["transform"], str):
        raise DeployError(f"{where}: input must be uint8 pixels with a transform text, got "
                          f"dtype {_show(inp['dtype'])}")
    shape = inp["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 3:
        raise DeployError(f"{where}: input.shape must list 1 to 3 sizes, got {_show(shape)}")
    shape = [_int(s, f"{where}: input.shape", 1) for s in shape]
    if int(np.prod(shape, dtype=object)) > _MAX_INT:
        raise DeployError(f"{where}: input.shape {shape} is larger than 2^31 pixels")
    _input_table(man)
    scale = _int(inp["scale"], f"{where}: input.scale", 1) if "scale" in inp else None

    layers = man["layers"]
    if not isinstance(layers, list) or not 2 <= len(layers) <= _MAX_LAYERS:
        raise DeployError(f"{where}: layers must list 2 to {_MAX_LAYERS} layer entries, got "
                          f"{_show(layers)}")
    plans, last_index, bits = [], -1, 0
    for pos, e in enumerate(layers):
        what = f"{where}: layer entry {pos}"
        if not isinstance(e, dict):
            raise DeployError(f"{what} must be a JSON object, got {_show(e)}")
        role = "first" if pos == 0 else "output" if pos == len(layers) - 1 else "hidden"
        if e.get("role") != role:
            raise DeployError(f"{what}: role {_show(e.get('role'))} where the format has "
                              f"{role!r} (first, hidden..., output)")
        kind = e.get("kind")
        if kind not in ("linear", "conv") or (role == "output" and kind != "linear"):
            raise DeployError(f"{what}: kind {_show(kind)}; "
                              + ("the output layer is linear" if role == "output"
                                 else "linear or conv"))
        index = _int(e.get("index"), f"{what}: index", last_index + 1)
        what = f"{where}: layer{index}"
        fields = _ROLE_ARRAYS[role]
        need = _LAYER | set(fields) | (_CONV if kind == "conv" else set())
        _keys(e, what, need, need)
        last_index = index
        if not isinstance(e["name"], str) or not isinstance(e["flatten"], bool):
            raise DeployError(f"{what}: name must be a string and flatten true/false")
        rows = _int(e["rows"], f"{what}: rows", 1)
        fan_in = _int(e["fan_in"], f"{what}: fan_in", 1)
        pool = e["pool"]
        if pool is not None:
            pool = _int(pool, f"{what}: pool", 1)
        want_scale = (scale if scale is not None else e["input_scale"]) if pos == 0 else 1
        if _int(e["input_scale"], f"{what}: input_scale", 1) != want_scale:
            raise DeployError(f"{what}: input_scale {e['input_scale']} but its input grid is "
                              f"1/{want_scale}: an inconsistent manifest")
        if kind == "linear":
            if len(shape) > 1 and not e["flatten"]:
                raise DeployError(f"{what}: a linear layer on a {shape} input must flatten it")
            size = int(np.prod(shape, dtype=object))
            if fan_in != size:
                raise DeployError(f"{what}: fan_in {fan_in} but its input has {size} values "
                                  f"({shape})")
            if pool is not None:
                raise DeployError(f"{what}: a linear layer has no pool")
            shape = [rows]
        else:
            if len(shape) != 3 or e["flatten"]:
                raise DeployError(f"{what}: a conv layer needs a C x H x W input (not "
                                  f"flattened), got {shape}")
            kh, kw = _ints(e["kernel"], f"{what}: kernel", 2, 1)
            ph, pw = _ints(e["padding"], f"{what}: padding", 2, 0)
            cin = _int(e["in_channels"], f"{what}: in_channels", 1)
            c, h, w = shape
            if cin != c or fan_in != c * kh * kw:
                raise DeployError(f"{what}: in_channels {cin} and fan_in {fan_in} do not fit "
                                  f"its {shape} input and {kh} x {kw} kernel")
            h, w = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
            if pool is not None:
                h, w = h // pool, w // pool
            if h < 1 or w < 1:
                raise DeployError(f"{what}: its kernel, padding and pool leave no output")
            shape = [rows, h, w]
        if role == "output" and pool is not None:
            raise DeployError(f"{what}: the output layer has no pool")
        files = {"weights": (f"layer{index}_weights.npy", ARRAYS["weights"],
                             (rows, (fan_in + 63) // 64))}
        for f in fields:
            files[f] = (f"layer{index}_{f}.npy", ARRAYS[f],
                        (2 * fan_in + 1, rows) if f == "scores" else (rows,))
        for f, (name, _, _) in files.items():
            if e[f] != name:
                raise DeployError(f"{what}: {f} names the file {_show(e[f])}; the format names "
                                  f"it {name!r}")
        bits += rows * fan_in
        plans.append({"key": f"layer{index}", "rows": rows, "fan_in": fan_in, "files": files})
    classes = man["classes"]
    if not isinstance(classes, list) or len(classes) != plans[-1]["rows"] or \
            not all(isinstance(c, str) for c in classes):
        raise DeployError(f"{where}: classes must name the {plans[-1]['rows']} output classes "
                          "(strings)")
    if isinstance(man["memory_bits"], bool) or man["memory_bits"] != bits:
        raise DeployError(f"{where}: memory_bits {_show(man['memory_bits'])} but the layers "
                          f"store {bits} bits")
    sums = man["sha256"]
    if not isinstance(sums, dict):
        raise DeployError(f"{where}: sha256 must map file names to digests, got {_show(sums)}")
    names = {n for p in plans for n, _, _ in p["files"].values()} | {READER}
    extra = sorted(set(sums) - names, key=str)
    if extra:
        raise DeployError(f"{where}: sha256 lists {_show(extra[0])}, a file the format does not "
                          "define")
    for name in sorted(names):
        digest = sums.get(name)
        if not isinstance(digest, str) or not _HEX.fullmatch(digest):
            raise DeployError(f"{where}: sha256 of {name} must be a lowercase hex sha256, got "
                              f"{_show(digest)}")
    return plans


def _check_arrays(plans: list[dict], arrays: object, where: str) -> None:
    """Every array of the plan, of its dtype and shape, with values the format allows."""
    if not isinstance(arrays, dict):
        raise DeployError(f"{where}: no arrays (a bundle dict is what load_bundle returns)")
    for p in plans:
        for _, (name, dtype, shape) in p["files"].items():
            a = arrays.get(name)
            if not isinstance(a, np.ndarray) or a.dtype.str != dtype or a.shape != shape:
                got = (f"{a.dtype.str} {a.shape}" if isinstance(a, np.ndarray)
                       else type(a).__name__)
                raise DeployError(f"{where}: {name} must be {dtype} {shape}, got {got}")
        w = arrays[p["files"]["weights"][0]]
        tail = p["fan_in"] % 64
        if tail and (w[:, -1] >> np.uint64(tail)).any():
            raise DeployError(f"{where}: {p['files']['weights'][0]} sets padding bits beyond "
                              f"fan_in {p['fan_in']} (the format keeps them 0)")
        if "direction" in p["files"]:
            d = arrays[p["files"]["direction"][0]]
            c = arrays[p["files"]["const"][0]]
            if (np.abs(d.astype(np.int64)) > 1).any():
                raise DeployError(f"{where}: {p['files']['direction'][0]} holds values other "
                                  "than -1, 0, +1")
            ok = np.where(d == 0, np.abs(c.astype(np.int64)) == 1, c == 0)
            if not ok.all():
                raise DeployError(f"{where}: {p['files']['const'][0]} must be +-1 where "
                                  "direction is 0 (dead neurons) and 0 elsewhere")


def _load(path: Path) -> tuple[dict, list[dict]]:
    where = str(path)
    if not path.is_dir():
        raise DeployError(f"{where} is not a bnn_tol export (not a directory)")
    if not os.path.lexists(path / MANIFEST):
        raise DeployError(f"{where} is not a bnn_tol export (no {MANIFEST})")
    raw = _read_plain(path, MANIFEST, 0, MAX_MANIFEST_BYTES,
                      f"a manifest has at most {MAX_MANIFEST_BYTES} bytes")
    man = _parse_json(raw, f"{where}/{MANIFEST}")
    plans = _check_manifest(man, where)  # man is a dict from here on
    arrays: dict[str, np.ndarray] = {}
    specs = [spec for p in plans for spec in p["files"].values()]
    for name, dtype, shape in [*specs, (READER, None, None)]:
        if dtype is None:
            raw = _read_plain(path, name, 1, MAX_READER_BYTES,
                              f"the reader has at most {MAX_READER_BYTES} bytes")
        else:
            nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
            raw = _read_plain(path, name, nbytes + 1, nbytes + MAX_NPY_HEADER,
                              f"the manifest's shapes imply {nbytes} data bytes ({dtype} "
                              f"{shape}) and a header")
        if hashlib.sha256(raw).hexdigest() != man["sha256"][name]:
            raise DeployError(f"{where}: {name} does not match its checksum (corrupted or "
                              "edited)")
        if dtype is not None:
            arrays[name] = _npy(raw, f"{where}: {name}", dtype, shape)
    _check_arrays(plans, arrays, where)
    man["arrays"] = arrays
    return man, plans


def load_bundle(path: str | os.PathLike) -> dict:
    """Read ``manifest.json`` and every array, checking everything the module docstring lists.

    Bundles of the previous release (no ``manifest_sha256``; the input grid only in
    ``input.transform``) load after the same field, file and array checks: only the check of
    the manifest against its own hash is missing for them.

    Returns:
        The manifest as a dict, with ``"arrays"``: ``{file name: array}``.

    Raises:
        DeployError: not an export, a missing, foreign or oversized file, a checksum
            mismatch, an edited manifest, a field that disagrees with the format or the
            arrays (one line naming the file or field).
    """
    return _bundle(path)[0]


def _bundle(bundle: object) -> tuple[dict, list[dict]]:
    """A bundle directory (loaded and checked) or a :func:`load_bundle` dict (checked
    again: its manifest hash, fields and arrays)."""
    if isinstance(bundle, dict):
        man = {k: v for k, v in bundle.items() if k != "arrays"}
        where = "the bundle"
        plans = _check_manifest(man, where)
        _check_arrays(plans, bundle.get("arrays"), where)
        return bundle, plans
    if not isinstance(bundle, str | os.PathLike):
        raise DeployError(f"bundle must be an export directory or a load_bundle() dict, got "
                          f"{type(bundle).__name__}")
    return _load(Path(bundle))


def memory_image(bundle: str | os.PathLike | dict) -> dict[str, np.ndarray]:
    """The packed weights per block, ``{"layer{k}": uint64 (rows, words)}`` (a copy)."""
    b, _ = _bundle(bundle)
    return {f"layer{e['index']}": b["arrays"][e["weights"]].copy() for e in b["layers"]}


def _pixels(x, shape: list[int]) -> np.ndarray:
    """uint8 pixels ``(N, *shape)`` from uint8, or floats in [0, 1] (``p = round(255 x)``) or
    integer-valued floats in [0, 255]. Accepted layouts: ``(N, *shape)`` up to dimensions of
    size 1 (``(N, 28, 28)`` for ``1 x 28 x 28``), or flat ``(N, C H W)``; ``N = 0`` gives no
    predictions."""
    want = f"(N, {', '.join(map(str, shape))})"
    try:
        x = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise DeployError(f"inputs must be an array {want} of pixels ({e})") from None
    if x.dtype.kind not in "uif":
        raise DeployError(f"inputs must be uint8 pixels or real numbers, got dtype {x.dtype}")
    size = int(np.prod(shape))
    per = list(x.shape[1:])
    if x.ndim < 2 or not (per == [size] or [d for d in per if d != 1]
                          == [d for d in shape if d != 1]):
        raise DeployError(f"inputs must be {want} or (N, {size}) pixels, got {x.shape}")
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, *shape), dtype=np.uint8)
    if x.dtype == np.uint8:
        return x.reshape(n, *shape)
    xf = x.astype(np.float64)
    if not np.isfinite(xf).all() or xf.min() < 0 or xf.max() > 255:
        raise DeployError("float inputs must be pixels in [0, 1] or [0, 255]")
    p = np.rint(xf * 255.0) if xf.max() <= 1.0 else np.rint(xf)
    ref = xf * 255.0 if xf.max() <= 1.0 else xf
    if np.abs(p - ref).max() > 1e-3:
        raise DeployError("float inputs are not on the 8-bit pixel grid (p / 255 or p)")
    return p.astype(np.uint8).reshape(n, *shape)


def _unfold(x: np.ndarray, kernel, padding) -> tuple[np.ndarray, np.ndarray]:
    """im2col of ``x`` ``(N, C, H, W)`` with zero padding: patches ``(N, H' W', C kh kw)`` and
    the validity mask ``(H' W', C kh kw)`` (False at padding), torch's unfold order."""
    n, c, h, w = x.shape
    kh, kw = kernel
    ph, pw = padding
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    valid = np.zeros((c, h + 2 * ph, w + 2 * pw), dtype=bool)
    valid[:, ph:ph + h, pw:pw + w] = True
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    cols = np.empty((n, ho, wo, c, kh, kw), dtype=x.dtype)
    vcols = np.empty((ho, wo, c, kh, kw), dtype=bool)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, :, i, j] = xp[:, :, i:i + ho, j:j + wo].transpose(0, 2, 3, 1)
            vcols[:, :, :, i, j] = valid[:, i:i + ho, j:j + wo].transpose(1, 2, 0)
    return cols.reshape(n, ho * wo, -1), vcols.reshape(ho * wo, -1)


def _pack(bits: np.ndarray) -> np.ndarray:
    """bool ``(..., n)`` -> uint64 ``(..., ceil(n / 64))`` (bit j of word w = column 64 w + j)."""
    n = bits.shape[-1]
    words = (n + 63) // 64
    pad = np.zeros((*bits.shape[:-1], words * 64), dtype=bool)
    pad[..., :n] = bits
    return np.packbits(pad, axis=-1, bitorder="little").view("<u8")


def _compare(a: np.ndarray, t, d, const) -> np.ndarray:
    """Folded comparator on integer pre-activations ``a`` (..., C): bool (True = +1)."""
    pos = np.where(d > 0, a >= t, a <= t)
    return np.where(d == 0, const > 0, pos)


def _forward(man: dict, images: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    arr = man["arrays"]
    n = images.shape[0]
    x: np.ndarray = _input_table(man)[images]  # first block: integers q
    first = True
    layers = man["layers"]
    for e in layers:
        w = weights[f"layer{e['index']}"]
        fan_in = e["fan_in"]
        if e["kind"] == "linear":
            if e["flatten"] or x.ndim > 2:
                x = x.reshape(n, -1)
            if first:
                a = _int_matmul(x, _unpack_pm1(w, fan_in))  # (N, rows) = k = scale a
            else:
                xb = _pack(x > 0)  # (N, words)
                diff = np.zeros((n, e["rows"]), dtype=np.int64)
                for j in range(w.shape[1]):  # one word at a time: (N, rows) per step
                    diff += _popcount(xb[:, j, None] ^ w[None, :, j])
                a = fan_in - 2 * diff
        else:
            cols, valid = _unfold(x if first else (x > 0), e["kernel"], e["padding"])
            if first:
                a = _int_matmul(cols, _unpack_pm1(w, fan_in))  # padding q = 0
            else:
                vb = _pack(valid)  # (HW, words)
                xb = _pack(cols.astype(bool))  # (N, HW, words)
                nvalid = _popcount(vb).sum(-1, dtype=np.int64)  # (HW,)
                diff = np.zeros((n, cols.shape[1], e["rows"]), dtype=np.int64)
                for r in range(e["rows"]):
                    diff[:, :, r] = _popcount((xb ^ w[r]) & vb).sum(-1, dtype=np.int64)
                a = nvalid[None, :, None] - 2 * diff
            h_out = x.shape[2] + 2 * e["padding"][0] - e["kernel"][0] + 1
            a = a.reshape(n, h_out, cols.shape[1] // h_out, e["rows"]).transpose(0, 3, 1, 2)
        if e["role"] == "output":
            z = arr[e["scores"]][a + fan_in, np.arange(e["rows"])[None, :]]  # (N, classes)
            return np.argmax(z, axis=1)  # the first maximum, as torch.argmax
        t, d, const = (arr[e[k]] for k in ("t", "direction", "const"))
        shape = (1, -1, 1, 1) if a.ndim == 4 else (1, -1)
        y = _compare(a, t.reshape(shape), d.reshape(shape), const.reshape(shape))
        if e["pool"]:
            p = e["pool"]
            nn_, c, h, ww = y.shape
            y = y[:, :, :h - h % p, :ww - ww % p].reshape(nn_, c, h // p, p, ww // p, p)
            y = y.any(axis=(3, 5))
        x = np.where(y, 1, -1).astype(np.int64)
        first = False
    raise DeployError("the bundle has no output layer")


def _int_matmul(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``q @ w.T`` for integer pixels ``|q| <= 255`` and +-1 weights, exactly: every partial sum
    is an integer below ``255 fan_in < 2^53``, so float64 BLAS is exact; int64 result."""
    return np.rint(q.astype(np.float64) @ w.T.astype(np.float64)).astype(np.int64)


def _unpack_pm1(w: np.ndarray, fan_in: int) -> np.ndarray:
    bits = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")[:, :fan_in]
    return bits.astype(np.int64) * 2 - 1


def _int_arg(value: object, name: str, *, minimum: int, strict: bool) -> int:
    """``value`` as an int (as :func:`bnn_tol.exceptions.require_int`, whose messages these
    are: bools, non-integral numbers, strings and ``None`` refused; integral floats such as
    ``2.0`` only when not ``strict``)."""
    ok = isinstance(value, numbers.Integral) or (
        not strict and isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok:
        raise DeployError(f"{name} must be an integer, got {value!r}")
    out = int(value)  # type: ignore[arg-type]
    if out < minimum:
        raise DeployError(f"{name} must be >= {minimum}, got {out}")
    return out


def _library_rates(ber, error):
    """``(error model, (p01, p10))`` from the library (refusals as ``errors.inject``'s)."""
    try:
        from bnn_tol.exceptions import BnnTolError
        from bnn_tol.faults.maps import rates
        from bnn_tol.faults.registry import error_model
    except ImportError as e:
        raise DeployError(f"ber= draws the library's fault maps and needs bnn_tol installed "
                          f"({e}); this reader alone does clean inference and flip_mask=") from None
    try:
        p01, p10 = rates(ber)
        em = error_model(error)
        em.check_rates(p01, p10)
    except BnnTolError as e:
        raise DeployError(str(e)) from None
    return em, (p01, p10)


def _flip_with_maps(man: dict, weights: dict, em, p01: float, p10: float, seed: int) -> None:
    """XOR the flips of ``errors.inject(model, ber, seed=seed, error=error)`` into the packed
    image: the maps come from the library's own drawing function
    (:func:`bnn_tol.faults.registry.draw_sites`, what ``inject`` and the sweep draw)."""
    import torch

    from bnn_tol.exceptions import BnnTolError
    from bnn_tol.faults.registry import Site, draw_sites

    sites, address = [], 0
    for pos, e in enumerate(man["layers"]):  # every stored layer, in forward order
        n_bits = e["rows"] * e["fan_in"]
        sites.append(Site(f"layer{e['index']}", pos, n_bits, 0, address))
        address += n_bits
    try:
        maps = draw_sites(sites, seed, max(p01, p10), error=em)
    except BnnTolError as e:
        raise DeployError(str(e)) from None
    for e in man["layers"]:
        key, fan_in = f"layer{e['index']}", e["fan_in"]
        stored = _unpack_pm1(weights[key], fan_in).reshape(-1)
        idx = maps[key].flips(torch.from_numpy(stored.astype(np.float32)), p01, p10).numpy()
        r, c = np.divmod(idx, fan_in)
        np.bitwise_xor.at(weights[key], (r, c // 64), np.left_shift(
            np.uint64(1), (c % 64).astype(np.uint64)))


def _read_masks(path: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` of flip masks, each member's declared (uncompressed) size
    checked against its layer's shape before it is decompressed."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DeployError(f"flip mask file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeployError(f"flip mask file {path} is not a file (an .npz of uint64 masks)")
    masks: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if key not in shapes:
                    raise DeployError(f"flip mask for unknown layer {_show(key)} in {path}; "
                                      f"layers: {', '.join(shapes)}")
                if key in masks:
                    raise DeployError(f"flip mask {key} appears twice in {path}")
                nbytes = 8 * shapes[key][0] * shapes[key][1]
                if info.file_size > nbytes + MAX_NPY_HEADER:
                    raise DeployError(f"flip mask {key} in {path} declares {info.file_size} "
                                      f"bytes; a uint64 {shapes[key]} mask has {nbytes}")
                masks[key] = _npy(zf.read(info), f"flip mask {key} in {path}", "<u8",
                                  shapes[key])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError,
            NotImplementedError) as e:
        raise DeployError(f"flip mask file {path} is not an .npz of uint64 masks (np.savez): "
                          f"{e}") from None
    return masks


def _apply_masks(flip_mask, man: dict, weights: dict[str, np.ndarray]) -> None:
    """XOR ``flip_mask`` (a dict or an ``.npz`` path) into the packed weights, checked."""
    shapes = {k: w.shape for k, w in weights.items()}
    if isinstance(flip_mask, str | os.PathLike):
        masks = _read_masks(Path(flip_mask), shapes)
    elif isinstance(flip_mask, Mapping):
        masks = dict(flip_mask)
    else:
        raise DeployError(f"flip_mask must be a dict {{'layer<k>': uint64 array}} or the path of "
                          f"an .npz with those keys, got {type(flip_mask).__name__}")
    for key, m in masks.items():
        if not isinstance(key, str) or key not in weights:
            raise DeployError(f"flip mask for unknown layer {_show(key)}; layers: "
                              f"{', '.join(weights)}")
        if not isinstance(m, np.ndarray) or m.shape != weights[key].shape or \
                m.dtype != np.uint64:
            raise DeployError(f"flip mask {key} must be a uint64 array {weights[key].shape}")
        e = next(e for e in man["layers"] if f"layer{e['index']}" == key)
        pad = _pack(np.ones((1, e["fan_in"]), dtype=bool))[0]
        if (m & ~pad[None, :]).any():
            raise DeployError(f"flip mask {key} sets padding bits beyond fan_in")
        weights[key] = weights[key] ^ m


def predict(bundle: str | os.PathLike | dict, x: np.ndarray, *,
            ber: float | tuple[float, float] | None = None, seed: int | None = None,
            flip_mask: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
            batch_size: int = 1000, error: str | None = None) -> np.ndarray:
    """Predicted classes ``(N,)`` int64 of inputs ``x`` with the exported BNN.

    Args:
        bundle: the export directory (or a :func:`load_bundle` result, checked again).
        x: uint8 pixels ``(N, C, H, W)`` / ``(N, C H W)``, or float pixels (``p / 255`` or
            ``p``); ``N = 0`` gives an empty result.
        ber, seed: bit errors of chip ``seed`` at ``p`` or ``(p01, p10)``: the fault map of
            ``errors.inject(model, ber, seed=seed, error=error)`` (needs bnn_tol installed).
            Both are refused exactly as ``errors.inject`` refuses them (``seed``: an int
            >= 0, ``2.0`` accepted; ``1.7``, ``True``, ``"3"``, ``-1`` refused), ``seed`` and
            ``error`` without ``ber`` are refused (they would be ignored).
        error: the error model (a name of ``bnn_tol.errors.models()``; default bernoulli).
        flip_mask: ``{"layer{k}": uint64 XOR mask like the packed weights}`` (numpy arrays)
            or the path of an ``.npz`` with those keys; an ``.npy``, a list or a bare array is
            refused.
        batch_size: images per step (memory: the conv patches of one step), an int >= 1.

    Raises:
        DeployError: bad inputs, arguments, masks or bundles (one line; never another
            exception type for malformed input).
    """
    batch_size = _int_arg(batch_size, "batch_size", minimum=1, strict=True)
    em = rates = None
    if ber is None:
        if seed is not None or error is not None:
            raise DeployError("seed= and error= choose the fault map of ber=, which is not "
                              "given (clean inference takes neither)")
    else:
        em, rates = _library_rates(ber, error)
        if seed is None:
            raise DeployError("ber= needs seed= (the chip)")
        seed = _int_arg(seed, "seed", minimum=0, strict=False)
    man, _ = _bundle(bundle)
    images = _pixels(x, man["input"]["shape"])
    weights = {f"layer{e['index']}": man["arrays"][e["weights"]].copy() for e in man["layers"]}
    if em is not None:
        _flip_with_maps(man, weights, em, *rates, seed)
    if flip_mask is not None:
        _apply_masks(flip_mask, man, weights)
    out = [_forward(man, images[i:i + batch_size], weights)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
