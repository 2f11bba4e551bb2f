"""Evaluation of BNNs: clean accuracy and BER sweeps.

>>> from bnn_tol import errors, evaluate
>>> with errors.inject(model, ber=0.05, seed=3):      # doctest: +SKIP
...     acc = evaluate.accuracy(model, test)
>>> df = evaluate.sweep(model, test, bers=[0, .01, .05], n_maps=50, seed=0)  # doctest: +SKIP
>>> evaluate.summarize(df)                             # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import io as _io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compiled import UnsupportedModel, eval_mode
from .data import INPUT_SCALE, BNNDataset, to_float
from .exceptions import FileInUse, InvalidArgument, ResultsMismatch, require_int
from .layers import apply_folded

__all__ = ["accuracy", "predict", "resolve_device", "sweep", "read_sweep", "summarize",
           "model_digest", "data_digest", "meta_path", "COLUMNS", "META_SUFFIX", "engines",
           "register_engine", "accuracy_under_flips", "Int8Engine", "Fp32Engine",
           "FixedPointEngine", "ReferenceEngine"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available, else ``cpu``; other values as given.

    Raises:
        ValueError: ``cuda`` requested but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


def _check_batch_size(batch_size, *, optional: bool = False) -> int | None:
    """``batch_size``: an int >= 1 (or ``None`` where a default is chosen)."""
    if batch_size is None and optional:
        return None
    return require_int(batch_size, "batch_size", minimum=1, strict=True)


@torch.no_grad()
def predict(model: nn.Module, data: BNNDataset, *, batch_size: int = 2048) -> Tensor:
    """Predicted class ``argmax_c z_c`` per sample, int64 ``(N,)`` on CPU (eval mode).

    Raises:
        InvalidArgument: an empty dataset, ``batch_size`` not an int >= 1.
    """
    batch_size = _check_batch_size(batch_size)
    if len(data) == 0:
        raise InvalidArgument("cannot evaluate on an empty dataset")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(x).argmax(1).cpu() for x, _ in data.batches(batch_size, device=device)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, data: BNNDataset, *, batch_size: int = 2048) -> float:
    """Fraction of correctly classified samples: ``mean_n 1{argmax_c z_nc == y_n}``.

    Raises:
        InvalidArgument: see :func:`predict`.
    """
    return float((predict(model, data, batch_size=batch_size) == data.labels).double().mean())


# ---------------------------------------------------------------------------------------------
# BER sweeps
# ---------------------------------------------------------------------------------------------

COLUMNS = ["model", "ber", "p01", "p10", "map", "seed", "accuracy", "rerr", "bits_per_weight",
           "memory_bits"]
#: Columns of sweep files written before codecs (still readable; ``bits_per_weight`` and
#: ``memory_bits`` are NaN / -1 there).
OLD_COLUMNS = COLUMNS[:8]

#: Rough upper bound (bytes) on the activations held per data chunk; sets the default chunk size.
MEMORY_BUDGET = 2**28


def _int8_ok(device: torch.device) -> bool:
    """``torch._int_mm`` (int8 x int8 -> int32) is used on CPU only; CUDA uses exact fp32."""
    return device.type == "cpu" and hasattr(torch, "_int_mm")


#: CPU feature flags (``/proc/cpuinfo``) with a fast int8 dot product behind ``torch._int_mm``.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


#: Default int8 engine chunk: the widest layer's int32 output per chunk, in bytes.
INT8_CHUNK_BYTES = 4 << 20


def int8_is_fast() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX).

    Without one, ``torch._int_mm`` falls back to a slow kernel: on an AVX2-only AMD EPYC a
    512 x 784 x 1024 product took 3.4 s against 0.11 s in fp32 (one thread), so
    ``engine="auto"`` then picks the fp32 engine (both are exact). ``False`` where
    ``/proc/cpuinfo`` is unreadable.
    """
    from .provenance import has_cpu_flag

    return has_cpu_flag(*VNNI_FLAGS)


class _Stage:
    """One block prepared for the sign engines: the compiled stage plus its clean +-1 weights
    and folded comparator (``bn``: an eval-mode copy on the engine's device, set later)."""

    def __init__(self, st) -> None:
        self.st, self.k, self.name, self.block = st, st.index, st.name, st.block
        self.conv, self.flatten, self.pool, self.hidden = st.conv, st.flatten, st.pool, st.hidden
        self.scale = st.scale
        layer = st.layer
        if self.conv and (layer.stride != (1, 1) or layer.groups != 1
                          or layer.dilation != (1, 1)):
            raise UnsupportedModel(
                f"{st.name}: the sweep engines support stride 1, ungrouped convs only")
        if layer.bias is not None:
            raise UnsupportedModel(
                f"{st.name}: binary layers with a bias are not supported by the engines")
        with torch.no_grad():
            self.wb = torch.where(layer.weight.detach() >= 0, 1.0, -1.0).cpu()
        if self.hidden:
            self.folded = st.folded


def _compile(model: nn.Module) -> list[_Stage]:
    """The sign engines' stages (:func:`bnn_tol.compiled.check_bnn`: sign weights and
    activations)."""
    from .compiled import check_bnn

    return [_Stage(st) for st in check_bnn(model, what="this sweep engine").stages]


# -- int8 engine (fully connected models, CPU) -------------------------------------------------


class _Int8Net:
    """Exact integer evaluation of an all-linear BNN with ``torch._int_mm``.

    Activations are kept neuron-major ``(features, B)``. The first layer multiplies int8
    ``q = p - 128`` (so ``128 a = W q`` exactly); hidden outputs are stored as bits
    ``b = (h + 1) / 2`` in {0, 1}, so the next pre-activation is ``a = 2 W b - rowsum(W)``.
    Rows of ``W`` are multiplied by the BN direction ``d`` so that every comparator reads
    ``W_d b >= ceil((t_d + rowsum(W_d)) / 2)`` (``t_d = d t``; dead neurons: zero row,
    ``t_d = 0`` for constant +1 and ``1`` for constant -1). The last layer feeds the exact
    ``a`` to the model's float BatchNorm and takes ``argmax``: bit-identical to ``model(x)``.
    """

    def __init__(self, stages: list[_Stage], device: torch.device) -> None:
        self.stages, self.device = stages, device
        self.w: list[Tensor] = []  # direction-folded int8 weights (out, in) on device
        self.t: list[Tensor | None] = []  # folded integer thresholds (out,) int64
        self.s: list[Tensor] = []  # row sums of self.w, int64
        for st in stages:
            w = st.wb.to(torch.int8)
            if st.hidden:
                f = st.folded
                d = f.direction.to(torch.int64)
                w = w * d[:, None].to(torch.int8)
                t = torch.where(d > 0, f.t, -f.t)
                t = torch.where(d == 0, torch.where(f.const > 0, 0, 1), t)
                self.t.append(t)
            else:
                self.t.append(None)
            self.w.append(w.contiguous())
            self.s.append(w.sum(1, dtype=torch.int64))
        self.w_dev = [w.to(device) for w in self.w]

    def comparator(self, k: int, s: Tensor) -> Tensor:
        """Stage ``k``'s output rule: int32 ``(out, 1)`` threshold on ``W_d input``, or for the
        last stage the float64 row sums ``(out,)`` (``a = 2 W b - s``)."""
        if not self.stages[k].hidden:
            return s.to(torch.float64)
        t = self.t[k]
        thr = t if k == 0 else -torch.div(-(t + s), 2, rounding_mode="floor")
        return thr.to(torch.int32)[:, None].to(self.device)

    def clean(self) -> tuple[list[Tensor], list[Tensor]]:
        """Clean weights and comparators of every stage."""
        return list(self.w_dev), [self.comparator(k, s) for k, s in enumerate(self.s)]

    def unit_weights(self, flips: dict[int, Tensor], base=None) -> tuple[list[Tensor],
                                                                         list[Tensor]]:
        """Weights and comparators with the stored bits at ``flips[k]`` (flat indices) negated."""
        from .errors import _serial

        ws, cs = base if base is not None else self.clean()
        ws, cs = list(ws), list(cs)
        with _serial():
            self._flip_into(flips, ws, cs)
        return ws, cs

    def _flip_into(self, flips: dict[int, Tensor], ws: list[Tensor], cs: list[Tensor]) -> None:
        for k, idx in flips.items():
            if idx.numel() == 0:
                continue
            w = self.w[k].clone()
            flat = w.view(-1)
            old = flat[idx]
            flat[idx] = -old
            rows = torch.div(idx, w.shape[1], rounding_mode="floor")
            cs[k] = self.comparator(k, self.s[k].index_add(0, rows, -2 * old.to(torch.int64)))
            ws[k] = w.to(self.device)

    def input(self, images: Tensor) -> Tensor:
        """uint8 ``(B, C, H, W)`` -> int8 ``q = p - 128`` neuron-major ``(C H W, B)``."""
        q = (images.reshape(images.shape[0], -1).to(torch.int16) - INPUT_SCALE).to(torch.int8)
        return q.t().contiguous().to(self.device)

    def run(self, h: Tensor, start: int, ws: list[Tensor], cs: list[Tensor]) -> Tensor:
        """Forward from stage ``start`` (input ``h`` neuron-major) -> predictions ``(B,)``."""
        for k in range(start, len(self.stages)):
            h = self.step(k, h, ws[k], cs[k])
        return h

    def step(self, k: int, h: Tensor, w: Tensor, c: Tensor) -> Tensor:
        """One stage: hidden -> bits int8 ``(out, B)``; last -> predictions ``(B,)``."""
        st = self.stages[k]
        r = torch._int_mm(w, h)  # (out, B) int32, exact
        if st.hidden:
            return (r >= c).view(torch.int8)
        from .errors import _serial

        with _serial():  # (B, n_classes): tiny
            a = r.t().contiguous().to(torch.float64)
            a = a / float(INPUT_SCALE) if k == 0 else 2.0 * a - c
            return st.bn(a.to(torch.float32)).argmax(1)


# -- fp32 engine (any BinaryBlock model, CPU or CUDA; G maps batched) ---------------------------


def _fp32_forward(
    stages: list[_Stage], x: Tensor, ws: list[Tensor], start: int = 0
) -> Tensor:
    """Predictions ``(G, B)`` of ``G`` fault maps at once.

    ``x``: ``(B, ...)`` input of stage ``start`` shared by all maps (float, exact values);
    ``ws[k]``: ``(G, *weight.shape)`` per-map ±1 weights, or ``weight.shape`` when shared.
    Maps ride in the batch/group dimension: a shared input meets stacked weights
    (``(G out, in)`` / ``(G C_out, C_in, k, k)``), per-map inputs use ``bmm`` / grouped conv.
    Pre-activations are rounded to the exact integers ``scale a`` they equal in exact
    arithmetic (float rounding errors of any GEMM/conv algorithm are far below 1/2), then
    compared with the folded thresholds; the last layer's float BatchNorm gets the exact ``a``.
    """
    h, shared, g = x, True, None
    for k in range(start, len(stages)):
        st, w = stages[k], ws[k]
        per_map = w.dim() == st.wb.dim() + 1
        if per_map:
            g = w.shape[0]
        if st.flatten:
            h = h.flatten(1) if shared else h.flatten(2)
        if not st.conv:
            if shared and per_map:
                a = (h @ w.reshape(-1, w.shape[-1]).t()).view(h.shape[0], g, -1).transpose(0, 1)
            elif shared:
                a = h @ w.t()
            elif per_map:
                a = torch.bmm(h, w.transpose(1, 2))
            else:
                a = h @ w.t()
        else:
            pad = st.block.layer.padding
            if shared and per_map:
                a = F.conv2d(h, w.reshape(-1, *w.shape[2:]), padding=pad)
                a = a.view(a.shape[0], g, -1, *a.shape[2:]).transpose(0, 1)
            elif shared:
                a = F.conv2d(h, w, padding=pad)
            elif per_map:
                gb = h.shape[1]
                hh = h.transpose(0, 1).reshape(gb, -1, *h.shape[3:])
                a = F.conv2d(hh, w.reshape(-1, *w.shape[2:]), padding=pad, groups=g)
                a = a.view(gb, g, -1, *a.shape[2:]).transpose(0, 1)
            else:
                a = F.conv2d(h.reshape(-1, *h.shape[2:]), w, padding=pad)
                a = a.view(h.shape[0], h.shape[1], *a.shape[1:])
        shared = shared and not per_map
        ai = torch.round(a * st.scale)  # exact integer scale * a
        cdim = 1 if shared else 2
        if st.hidden:
            h = apply_folded(ai, st.folded, channel_dim=cdim).to(x.dtype)
            if st.pool:
                lead = h.shape[: cdim]
                h = F.max_pool2d(h.reshape(-1, *h.shape[cdim:]), st.pool)
                h = h.view(*lead, *h.shape[1:])
        else:
            a = ai / st.scale
            z = st.bn(a.reshape(-1, a.shape[-1]))
            return z.argmax(1).view(a.shape[:-1])
    raise AssertionError("unreachable: the last stage returns")


# -- sweep driver --------------------------------------------------------------------------------


def _ber_list(bers) -> list[tuple[float, float]]:
    from .errors import rates

    if isinstance(bers, int | float):
        bers = [bers]
    out = [rates(b) for b in bers]
    if not out:
        raise InvalidArgument("bers is empty: give at least one BER, e.g. bers=[0, 0.01, 0.05]")
    return out


def _storage(model: nn.Module) -> dict:
    """``bits_per_weight`` (stored bits / weights of all stored layers: ``m`` when uniform)
    and ``memory_bits`` of a model: the columns that make equal-memory comparisons a groupby."""
    from .compiled import stored_layers

    layers = stored_layers(model).values()
    bits = sum(lay.n_stored_bits for lay in layers)
    weights = sum(lay.weight.numel() for lay in layers)
    return {"bits_per_weight": bits / weights if weights else math.nan, "memory_bits": bits}


def _ber_value(p01: float, p10: float) -> float:
    return p01 if p01 == p10 else 0.5 * (p01 + p10)


# -- sweep files: recognized, locked, validated -------------------------------------------------

#: Suffix of the sidecar that records what defines the sweep in ``<out>`` (``<out>.meta.json``).
META_SUFFIX = ".meta.json"
_META_FORMAT = "bnn_tol.sweep"
_HEADER = ",".join(COLUMNS)
_OLD_HEADER = ",".join(OLD_COLUMNS)
_FLOAT_COLS = ("ber", "p01", "p10", "accuracy", "rerr", "bits_per_weight")
_INT_COLS = ("map", "seed", "memory_bits")
_UNBOUNDED = ("ber", "bits_per_weight")  # not rates/accuracies in [0, 1]
_KEY = ["model", "p01", "p10", "map", "seed"]


def meta_path(out) -> Path:
    """The sidecar ``<out>.meta.json`` of sweep CSV ``out``."""
    return Path(os.fspath(out) + META_SUFFIX)


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def model_digest(model: nn.Module) -> str:
    """sha256 over the state dict: per tensor (sorted by name) its name, dtype, shape, bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_digest(data: BNNDataset) -> str:
    """sha256 over the test images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""
    h = hashlib.sha256(f"{tuple(data.images.shape)}|".encode())
    h.update(_tensor_bytes(data.images))
    h.update(_tensor_bytes(data.labels.to(torch.int64)))
    return h.hexdigest()


def _settings(models: dict, data: BNNDataset, layers, targets: tuple) -> dict:
    """What defines a sweep's rows besides (model, BER, map, seed): engine, device and batch
    size do not (every engine is exact)."""
    from .errors import select_layers

    return {
        "models": {str(lb): {"digest": model_digest(m), "layers": list(select_layers(m, layers))}
                   for lb, m in models.items()},
        "dataset": {"name": str(data.name), "split": str(data.split), "n_samples": len(data),
                    "digest": data_digest(data)},
        "targets": sorted(targets),
    }


def _provenance() -> dict:
    """Versions, git commit, CPU model and threads (:func:`bnn_tol.provenance.environment`)."""
    from .provenance import environment

    return environment()


def _write_meta(out, settings: dict) -> None:
    """Write the sidecar atomically (temporary file in the same directory, fsync, rename)."""
    from .io import _atomic_write

    path = meta_path(out)
    text = json.dumps({"format": _META_FORMAT, "version": 1, "columns": COLUMNS,
                       "settings": settings, "provenance": _provenance()}, indent=2)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(path, write)


def _read_meta(out) -> dict:
    """The sidecar's settings; ``ResultsMismatch`` if ``out`` has no valid sidecar of ours."""
    path = meta_path(out)
    why = None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
            why = f"its sidecar {path.name} is not a bnn_tol sweep sidecar"
        elif meta.get("version") != 1:
            why = f"its sidecar {path.name} has unknown version {meta.get('version')!r}"
    except FileNotFoundError:
        why = f"its sidecar {path.name} is missing (every bnn_tol sweep writes one)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"its sidecar {path.name} is unreadable ({type(e).__name__})"
    if why:
        raise ResultsMismatch(f"{out} is not recognized as a bnn_tol sweep CSV: {why}; it was "
                              "left untouched, use another --out")
    return meta["settings"]


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
    if first not in (_HEADER, _OLD_HEADER):
        raise bad(f"is not a sweep CSV: its header is {first[:100]!r}, expected {_HEADER!r}")
    header = first
    if lines[-1] != "":
        raise bad("ends in a partial line (an interrupted sweep): continue it with --resume "
                  "(resume=True) before reading it")
    for n, line in enumerate(lines[1:-1], start=2):
        if line.rstrip("\r") in (_HEADER, _OLD_HEADER):
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
            out.append(x)
        return out

    res = pd.DataFrame({"model": df["model"].astype(str)})
    for col in COLUMNS[1:]:
        if header == _OLD_HEADER and col not in OLD_COLUMNS:  # written before codecs
            res[col] = -1 if col in _INT_COLS else math.nan
            continue
        res[col] = convert(col, int if col in _INT_COLS else float)
    res = res.astype({c: "int64" for c in _INT_COLS} | {c: "float64" for c in _FLOAT_COLS})
    dup = res.duplicated(_KEY)
    if dup.any():
        n = int(np.flatnonzero(dup.to_numpy())[0]) + 2
        raise bad(f"line {n} repeats the key (model, p01, p10, map, seed) of an earlier row "
                  "(two sweeps wrote into it)")
    return res[COLUMNS]


def read_sweep(path) -> pd.DataFrame:
    """Read and validate a sweep CSV written by :func:`sweep` (``out=``).

    Accepts only a complete file: the exact header (:data:`COLUMNS`, or :data:`OLD_COLUMNS` of
    files written before codecs) once, every row complete and newline-terminated, numeric
    columns finite (rates and accuracies in [0, 1], ``map``/``seed``/``memory_bits``
    integers), no key ``(model, p01, p10, map, seed)`` twice.

    Returns:
        One row per (model, BER, map), columns :data:`COLUMNS` (``map``/``seed`` int64).

    Raises:
        ResultsMismatch: anything less than a valid sweep CSV (one line naming the problem).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ResultsMismatch(f"{path}: cannot read the sweep CSV ({e.strerror})") from None
    return _parse_sweep(raw, path)


class _SweepFile:
    """``out`` opened for appending under an exclusive, non-blocking ``flock`` held for the
    whole sweep; a second writer gets :class:`FileInUse`. Nothing in an existing file is
    touched before it is recognized as ours (sidecar + exact header + same settings)."""

    def __init__(self, out, *, resume: bool) -> None:
        import fcntl

        self.path = Path(os.fspath(out))
        if self.path.exists() and self.path.stat().st_size > 0 and not resume:
            raise InvalidArgument(f"{out} exists: pass resume=True (--resume) to continue that "
                                  "sweep, or choose another file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()
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
        old = _read_meta(self.path)
        with open(self.path, "rb") as fh:
            raw = fh.read()
        if raw.split(b"\n", 1)[0].rstrip(b"\r") == _OLD_HEADER.encode():
            raise ResultsMismatch(f"{self.path} was written by an older bnn_tol (no "
                                  "bits_per_weight/memory_bits columns); it was left untouched, "
                                  "use another --out (read_sweep still reads it)")
        if raw.split(b"\n", 1)[0].rstrip(b"\r") != _HEADER.encode():
            raise ResultsMismatch(f"{self.path} is not recognized as a bnn_tol sweep CSV: its "
                                  "first line is not the sweep header; it was left untouched, "
                                  "use another --out")
        diffs = _differences(old, settings)
        if diffs:
            raise ResultsMismatch(f"{self.path} was made with {'; '.join(diffs)}; use another "
                                  "--out for these settings")
        if not raw.endswith(b"\n"):  # ours, torn by a killed writer: drop the partial line
            cut = raw.rfind(b"\n") + 1
            os.ftruncate(self.fh.fileno(), cut)
            raw = raw[:cut]
        rows = _parse_sweep(raw, self.path)
        new = {lb: m for lb, m in settings["models"].items() if lb not in old["models"]}
        if new:
            _write_meta(self.path, {**old, "models": {**old["models"], **new}})
        return rows

    def append(self, rows: list[dict]) -> None:
        """Append rows (with the header if the file is empty) in one write, flush + fsync: a
        crash leaves at most a torn last line, which :meth:`open_rows` repairs."""
        buf = _io.StringIO()
        header = os.fstat(self.fh.fileno()).st_size == 0
        pd.DataFrame(rows, columns=COLUMNS).to_csv(buf, header=header, index=False,
                                                   float_format="%.17g", lineterminator="\n")
        self.fh.write(buf.getvalue().encode("utf-8"))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        """Release the lock; a file this sweep created but never wrote a row to is removed."""
        try:
            if self.created and os.fstat(self.fh.fileno()).st_size == 0:
                self.path.unlink(missing_ok=True)
                if self.wrote_meta:
                    meta_path(self.path).unlink(missing_ok=True)
        finally:
            self.fh.close()


def _check_shape(label: str, model: nn.Module, data: BNNDataset) -> None:
    """The dataset's image shape ``(C, H, W)`` must be the model's ``in_shape``."""
    try:
        want = tuple(int(v) for v in model.config["kwargs"]["in_shape"])  # type: ignore[index]
    except (AttributeError, KeyError, TypeError, ValueError):
        want = None
    have = tuple(data.shape)
    if want is None:  # no config: the first binary linear layer's fan-in, if it is one
        first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        if first is None or first.in_features == math.prod(have):
            return
        want = (first.in_features,)
    elif want == have:
        return
    raise InvalidArgument(f"the dataset {data.name!r} has images of shape {have} but model "
                          f"{label!r} expects {want}: use the dataset the model was trained on")


def sweep(
    models,
    data: BNNDataset,
    *,
    bers,
    n_maps: int = 20,
    seed: int = 0,
    layers=None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    engine: str = "auto",
    targets=("weights",),
    out=None,
    resume: bool = False,
    maps_per_step: int | None = None,
) -> pd.DataFrame:
    """Accuracy under persistent bit errors for every (model, BER, fault map).

    Map ``m`` has seed ``s_m = errors.map_seeds(seed, n_maps)[m]``; its flips at BER
    ``(p01, p10)`` are those of ``errors.inject(model, (p01, p10), seed=s_m, layers=layers)``
    (nested across BERs, identical on every run/device), so any row can be replayed alone
    and gives exactly the same accuracy.

    Engines (a registry, :func:`engines`; all exact: they reproduce ``model(x).argmax(1)`` of
    the faulty model bit for bit). ``engine="auto"`` takes the first that supports the model:

    * ``"packed"`` (any stride-1 BNN, fc or conv, on CPU with numba): +-1 values as bits,
      XNOR/popcount dot products (:mod:`bnn_tol.packed`); the first conv as an int32 kernel
      on ``q = p - 128``, a first linear layer updated from its cached clean output. ``auto``
      takes it for conv BNNs, and for fc ones where int8 is not fast.
    * ``"int8"`` (fully connected BNNs on a CPU with VNNI/AMX, :func:`int8_is_fast`):
      ``torch._int_mm`` int8 x int8 -> int32 on +-1 weights, folded integer thresholds,
      bit activations; the clean prefix before the first faulty layer is computed once.
    * ``"fp32"`` (any BNN, also CUDA): ``maps_per_step`` maps batched through stacked weights /
      ``bmm`` / grouped conv.
    * ``"fixed"`` (any codec, e.g. m-bit fixed point, and ReLU or sign activations): flips the
      stored bits in cached codes, decodes, and runs the model's own ops from the clean prefix
      (:class:`FixedPointEngine`).
    * ``"reference"``: ``inject`` + :func:`accuracy` per map (needed for activation and
      threshold ``targets``).

    Args:
        models: a BNN, or ``{label: BNN}``.
        data: test set (streamed in chunks of ``batch_size``; default from a ~256 MiB budget).
        bers: list of ``p`` or ``(p01, p10)``.
        n_maps: fault maps (chips) per BER; ``seed``: the sweep's seed.
        layers: layers with errors (:func:`bnn_tol.errors.select_layers`); default all.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        progress: tqdm bar over (model, BER, map).
        targets: see :func:`bnn_tol.errors.inject`.
        out: CSV path; rows of each finished (model, BER) are appended in one write. The file
            is locked (``flock``) for the whole sweep; the sidecar ``<out>.meta.json`` records
            what defines the rows (per model a sha256 of its state dict and its faulty layers;
            dataset name, split, size and sha256 of images + labels; targets) and provenance
            (library, git commit, torch, python, CPU model, threads).
        resume: with ``out``: skip the (model, BER, map) rows already in the file. Only a file
            recognized as ours (sidecar + header) made with the same settings is continued
            (BERs, maps and models may be added); a torn last line is cut off first.

    Returns:
        One row per (model, BER, map): ``model, ber, p01, p10, map, seed, accuracy, rerr,
        bits_per_weight, memory_bits`` (``ber = p`` for symmetric rates, ``(p01 + p10) / 2``
        otherwise; ``rerr = 1 - accuracy``; ``memory_bits`` the model's stored weight bits,
        ``bits_per_weight`` those per weight). With ``out`` the returned frame holds the
        file's rows of this sweep too.

    Raises:
        InvalidArgument: BER outside [0, 1], empty ``bers``, unknown layers, models without
            binary layers, a dataset whose image shape is not the model's ``in_shape``,
            ``n_maps``/``seed``/``batch_size`` not integers (>= 1, >= 0, >= 1), ``resume``
            without ``out``, an existing ``out`` without ``resume``.
        ResultsMismatch: ``resume`` into a file that is not a valid sweep CSV of ours, or that
            was made with other settings (names the difference; the file is left untouched).
        FileInUse: another process is writing ``out``.
    """
    from tqdm.auto import tqdm

    from .errors import draw_maps, map_seeds, select_layers

    if isinstance(models, nn.Module):
        models = {str(getattr(models, "config", {}).get("name", "model")): models}
    if not models:
        raise InvalidArgument("no models given")
    ber_list = _ber_list(bers)
    n_maps = require_int(n_maps, "n_maps", minimum=1, strict=True)
    seed = require_int(seed, "seed", minimum=0, strict=True)
    batch_size = _check_batch_size(batch_size, optional=True)
    if maps_per_step is not None:
        maps_per_step = require_int(maps_per_step, "maps_per_step", minimum=1, strict=True)
    if len(data) == 0:
        raise InvalidArgument("cannot evaluate on an empty dataset")
    if engine != "auto" and engine not in _ENGINES:
        raise InvalidArgument(f"engine must be auto or one of {', '.join(engines())}, "
                              f"got {engine!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if resume and out is None:
        raise InvalidArgument("resume=True needs out= (--out): the file to continue")
    dev = resolve_device(device)
    for label, model in models.items():
        select_layers(model, layers)  # validates names and that there are binary layers
        _check_shape(str(label), model, data)
    seeds = map_seeds(seed, n_maps)
    done: set = set()
    old = pd.DataFrame(columns=COLUMNS)
    file = None
    if out is not None:
        settings = _settings(models, data, layers, targets)
        file = _SweepFile(out, resume=resume)
        try:
            old = file.open_rows(settings)
        except BaseException:
            file.close()
            raise
        done = set(zip(*(old[c] for c in _KEY), strict=True))
    cap = max(max(p) for p in ber_list)
    total = len(models) * len(ber_list) * n_maps
    bar = tqdm(total=total, desc="sweep", unit="map", disable=not progress)
    rows_all: list[dict] = []
    maps = _MapCache()
    map_layout = None
    try:
        for label, model in models.items():
            runner = _Runner(model, data, layers=layers, device=dev, engine=engine,
                             batch_size=batch_size, maps_per_step=maps_per_step,
                             targets=targets)
            # maps depend on (seed, layer position, size) only: share them between models
            # of the same architecture (the same chips)
            layout = (tuple((n, lay.weight.numel()) for n, lay in select_layers(model).items()),
                      tuple(select_layers(model, layers)))
            if layout != map_layout:
                maps, map_layout = _MapCache(), layout
            storage = _storage(model)
            for p01, p10 in ber_list:
                todo = [m for m in range(n_maps)
                        if (str(label), p01, p10, m, seeds[m]) not in done]
                bar.update(n_maps - len(todo))
                if runner.engine == "reference":  # draws its own maps from the seeds
                    fmaps = (None for _ in todo)
                else:
                    fmaps = (maps.get(m, lambda m=m, model=model: draw_maps(
                        model, seeds[m], cap, layers=layers)) for m in todo)
                accs = runner.accuracies(fmaps, [seeds[m] for m in todo], p01, p10, bar)
                rows = [{"model": str(label), "ber": _ber_value(p01, p10), "p01": p01,
                         "p10": p10, "map": m, "seed": seeds[m], "accuracy": a,
                         "rerr": 1.0 - a, **storage} for m, a in zip(todo, accs, strict=True)]
                if file is not None and rows:
                    file.append(rows)
                rows_all += rows
    finally:
        bar.close()
        if file is not None:
            file.close()
    df = pd.DataFrame(rows_all, columns=COLUMNS)
    if len(old):
        keys = {(str(lb), p01, p10) for lb in models for p01, p10 in ber_list}
        mask = [(m, a, b) in keys and s == seeds[k] if k < n_maps else False
                for m, a, b, k, s in zip(old["model"], old["p01"], old["p10"], old["map"],
                                         old["seed"], strict=True)]
        df = pd.concat([old[mask], df], ignore_index=True)
    order_m = {str(lb): i for i, lb in enumerate(models)}
    order_b = {b: i for i, b in enumerate(ber_list)}
    df = df.assign(_m=df["model"].map(order_m),
                   _b=[order_b[(a, b)] for a, b in zip(df["p01"], df["p10"], strict=True)])
    df = df.sort_values(["_m", "_b", "map"]).drop(columns=["_m", "_b"]).reset_index(drop=True)
    df["map"] = df["map"].astype("int64")
    df["seed"] = df["seed"].astype("int64")
    df["memory_bits"] = df["memory_bits"].astype("int64")
    return df


class _MapCache:
    """Fault maps of a sweep by map number, kept while they fit in ``budget`` bytes.

    Maps are reused across BERs (the same chip); those beyond the budget are drawn again from
    their seed when needed (bit-identical), so a sweep's memory for maps stays below
    ``budget`` plus the ``maps_per_step`` maps in use, whatever ``n_maps`` is.
    """

    def __init__(self, budget: int = MEMORY_BUDGET) -> None:
        self.budget, self.used, self.maps = budget, 0, {}

    def get(self, m: int, draw):
        """Map ``m``: cached, or ``draw()`` (kept if it fits)."""
        if m in self.maps:
            return self.maps[m]
        fm = draw()
        size = sum(f.idx.numel() * f.idx.element_size() + f.u.numel() * f.u.element_size()
                   for f in fm.values())
        if self.used + size <= self.budget:
            self.maps[m] = fm
            self.used += size
        return fm


# -- engines: a registry ------------------------------------------------------------------------


class _Engine:
    """Base of the sweep engines. Every engine is exact: for each fault map it returns the
    accuracy of ``model(x).argmax(1)`` of the faulty model, bit for bit.

    Class attributes declare what an engine supports; :func:`_pick_engine` asks each registered
    engine, in order of :attr:`rank` (fastest first), whether it supports a model and takes the
    first one (``engine="auto"``).

    Attributes:
        name: the ``engine=`` value.
        rank: order of preference for ``"auto"`` (lower first).
        targets: fault targets it evaluates (``weights`` / ``activations`` / ``thresholds``).
    """

    name = ""
    rank = 100
    targets: frozenset = frozenset({"weights"})

    @classmethod
    def unsupported(cls, cm, device: torch.device, targets: tuple) -> str | None:
        """Why this engine cannot evaluate the compiled model ``cm`` (``None``: it can)."""
        if not set(targets) <= cls.targets:
            return f"it evaluates {sorted(cls.targets)} errors only"
        return None

    @classmethod
    def preferred(cls, cm, device: torch.device) -> bool:
        """Whether ``"auto"`` should pick it when supported (e.g. int8 only with VNNI)."""
        return True

    def __init__(self, model, data, *, layers, device, batch_size, maps_per_step,
                 targets) -> None:
        from .errors import select_layers

        self.model, self.data, self.layers, self.device = model, data, layers, device
        self.targets, self.labels = targets, data.labels
        self.chosen = select_layers(model, layers)
        self.batch_size = batch_size or 2048
        self.g = maps_per_step or 1
        self._clean: float | None = None

    def clean_accuracy(self) -> float:
        """Accuracy without errors (cached)."""
        if self._clean is None:
            self._clean = self.evaluate([{}])[0]
        return self._clean

    def flips(self, fmap: dict, p01: float, p10: float) -> dict:
        """``{stage/layer key: flat stored-bit indices}`` of map ``fmap`` at ``(p01, p10)``."""
        raise NotImplementedError

    def evaluate(self, flips: list[dict]) -> list[float]:
        """Accuracies of the given flip sets (``[{}]``: clean)."""
        raise NotImplementedError

    def accuracies(self, maps, seeds, p01, p10, bar) -> list[float]:
        """Accuracies of fault maps ``maps`` (an iterable, consumed in order; or seeds, for
        engines that draw them) at one BER; maps that flip nothing reuse the clean accuracy.
        At most ``maps_per_step`` maps and their flips are held at a time."""
        results: list[float | None] = []
        group: list[tuple[int, dict]] = []

        def flush() -> None:
            for (i, _), a in zip(group, self.evaluate([f for _, f in group]), strict=True):
                results[i] = a
            bar.update(len(group))
            group.clear()

        for i, fm in enumerate(maps):
            f = self.flips(fm, p01, p10)
            if all(v.numel() == 0 for v in f.values()):
                results.append(self.clean_accuracy())
                bar.update(1)
                continue
            results.append(None)
            group.append((i, f))
            if len(group) == self.g:
                flush()
        if group:
            flush()
        return results  # type: ignore[return-value]


_ENGINES: dict[str, type[_Engine]] = {}


def register_engine(cls: type[_Engine]) -> type[_Engine]:
    """Class decorator adding a sweep engine to the registry under ``cls.name``."""
    _ENGINES[cls.name] = cls
    return cls


def engines() -> list[str]:
    """Names of the registered engines, in ``"auto"`` preference order."""
    return [c.name for c in sorted(_ENGINES.values(), key=lambda c: c.rank)]


def _pick_engine(model, device: torch.device, engine: str, targets: tuple) -> type[_Engine]:
    """The named engine (refused with the reason when it cannot), or for ``"auto"`` the first
    supported and preferred engine in rank order."""
    from .compiled import compile_model

    if engine != "auto" and engine not in _ENGINES:
        raise InvalidArgument(f"engine must be auto or one of {', '.join(engines())}, "
                              f"got {engine!r}")
    try:
        cm = compile_model(model)
    except UnsupportedModel:
        cm = None  # not a block model: only the reference engine (inject + forward) applies
    if engine != "auto":
        cls = _ENGINES[engine]
        why = cls.unsupported(cm, device, targets)
        if why:
            raise UnsupportedModel(f"engine={engine!r} cannot evaluate this model: {why}")
        return cls
    for cls in sorted(_ENGINES.values(), key=lambda c: c.rank):
        if cls.unsupported(cm, device, targets) is None and cls.preferred(cm, device):
            return cls
    raise UnsupportedModel("no sweep engine supports this model")  # reference supports all


class _SignEngine(_Engine):
    """Shared plumbing of the +-1 engines: compiled stages, clean prefix per data chunk."""

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        if cm is None:
            return "it needs a bnn_tol block model (.blocks)"
        if not cm.is_bnn:
            return "it needs sign (1-bit) weights and sign activations; use 'fixed' or 'reference'"
        for st in cm.stages:
            lay = st.layer
            if lay.bias is not None:
                return f"{st.name} has a bias (integer thresholds need bias-free layers)"
            if st.conv and (lay.stride != (1, 1) or lay.groups != 1 or lay.dilation != (1, 1)):
                return f"{st.name}: only stride-1, ungrouped convolutions"
        return None

    def __init__(self, model, data, **kw) -> None:
        super().__init__(model, data, **kw)
        self.stages = _compile(model)
        for st in self.stages:  # the output BatchNorm where the engine computes (eval mode)
            st.bn = copy.deepcopy(st.block.bn).to(self.device).eval()
        self.faulty = [k for k, st in enumerate(self.stages) if st.name in self.chosen]
        # first stage that differs between maps (the last one if no layer is faulty)
        self.start = min(self.faulty[0] if self.faulty else len(self.stages),
                         len(self.stages) - 1)
        self._prefix: list[tuple[Tensor, Tensor]] | None = None

    def _max_width(self) -> int:
        x = torch.zeros(1, *self.data.shape)
        widths = [x.numel()]
        with torch.no_grad():
            for block in self.model.blocks:
                x = _cpu_block(block, x)
                widths.append(x.numel())
        return max(widths)

    def flips(self, fmap, p01, p10):  # noqa: D102
        return {k: fmap[self.stages[k].name].flips(self.stages[k].wb, p01, p10)
                for k in self.faulty}

    def _input(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _prefix_of(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def _chunks(self):
        """Clean prefix (input of the first faulty stage) per data chunk, computed once."""
        if self._prefix is None:
            self._prefix = []
            imgs, labels = self.data.images, self.data.labels
            for i in range(0, len(self.data), self.batch_size):
                h = self._prefix_of(self._input(imgs[i: i + self.batch_size]))
                self._prefix.append((h, labels[i: i + self.batch_size].to(self.device)))
        return self._prefix


@register_engine
class Int8Engine(_SignEngine):
    """``torch._int_mm`` int8 x int8 -> int32 on +-1 weights, folded integer thresholds, bits
    as activations (fully connected BNNs on CPU; ``"auto"`` only with VNNI/AMX)."""

    name, rank = "int8", 0

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        if not (cm.all_linear and _int8_ok(device)):
            return "it needs an all-linear model (fc) on CPU; use 'fp32'"
        return None

    @classmethod
    def preferred(cls, cm, device):  # noqa: D102
        return int8_is_fast()

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        super().__init__(model, data, batch_size=batch_size, maps_per_step=1, **kw)
        # chunks whose widest int32 product fits ~4 MiB (cache-sized): on a 2-core Xeon with
        # AMX, fc 2048-2048 took 0.17 s per map in chunks of 512 against 0.32 s in one 10k
        # chunk (fc 512-512: 0.034 s at 2048 against 0.060 s)
        widest = max(st.wb.shape[0] for st in self.stages)
        self.batch_size = batch_size or max(256, min(len(data), INT8_CHUNK_BYTES //
                                                     (4 * widest) // 64 * 64))
        self.net = _Int8Net(self.stages, self.device)
        self._clean_wc = self.net.clean()

    def _input(self, images):  # noqa: D102
        return self.net.input(images)

    def _prefix_of(self, h):  # noqa: D102
        ws, cs = self.net.clean()
        for k in range(self.start):
            h = self.net.step(k, h, ws[k], cs[k])
        return h

    def evaluate(self, flips):  # noqa: D102
        n, out = len(self.data), []
        for f in flips:
            ws, cs = self.net.unit_weights(f, self._clean_wc)
            correct = 0
            for h, y in self._chunks():
                pred = self.net.run(h, self.start, ws, cs)
                correct += int((pred.to(y.device) == y).sum())
            out.append(correct / n)
        return out


@register_engine
class PackedEngine(_SignEngine):
    """Packed-bit XNOR/popcount (:mod:`bnn_tol.packed`, numba kernels): any stride-1 BNN
    (fc and conv) on CPU; the first stage as an exact float conv/GEMM on integer pixels."""

    name, rank = "packed", -1

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        from . import kernels

        if not kernels.AVAILABLE:
            return "it needs numba (pip install numba)"
        if device.type != "cpu":
            return "it runs on CPU; use 'fp32' on CUDA"
        for st in cm.stages:
            if st.pool and not st.conv:
                return f"{st.name}: pooling after a linear layer"
            if st.conv:
                k = st.layer.kernel_size
                pad = st.padding if isinstance(st.padding, tuple) else (st.padding,) * 2
                if k[0] != k[1] or pad[0] != pad[1] or not isinstance(pad[0], int):
                    return f"{st.name}: only square kernels with equal integer padding"
        return None

    @classmethod
    def preferred(cls, cm, device):  # noqa: D102
        # with an int8 dot product (VNNI/AMX) the int8 engine is faster on fc models: measured
        # 2-3x on fc 512-512 and 2048-2048 (Xeon with AMX, 2 threads)
        return not (cm.all_linear and int8_is_fast())

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        from .packed import PackedNet

        super().__init__(model, data, batch_size=batch_size, maps_per_step=1, **kw)
        self.batch_size = batch_size or max(64, min(len(data), MEMORY_BUDGET //
                                                    (self._max_width() * 12)))
        self.net = PackedNet(self.stages, tuple(model.in_shape))
        self.w_dev = [st.wb for st in self.stages]

    def _input(self, images):  # noqa: D102
        return self.net.first_input(images) if self.start == 0 else to_float(images)

    def _prefix_of(self, h):  # noqa: D102
        if self.start == 0:
            return h
        return self.net.pack_activations(self.start,
                                         _fp32_prefix(self.stages, h, self.w_dev, self.start))

    def evaluate(self, flips):  # noqa: D102
        from .kernels import threads

        n, out = len(self.data), []
        with threads(torch.get_num_threads()), torch.no_grad():
            for f in flips:
                ws = self.net.weights(f)
                correct = 0
                for h, y in self._chunks():
                    correct += int((self.net.run(h, self.start, ws) == y).sum())
                out.append(correct / n)
        return out


@register_engine
class Fp32Engine(_SignEngine):
    """``maps_per_step`` maps batched through stacked +-1 weights / ``bmm`` / grouped conv,
    pre-activations rounded to their exact integers (any BNN, CPU or CUDA)."""

    name, rank = "fp32", 1

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        super().__init__(model, data, batch_size=batch_size, maps_per_step=maps_per_step or 8,
                         **kw)
        self.batch_size = batch_size or max(64, min(len(data), MEMORY_BUDGET //
                                                    (self._max_width() * 12 * self.g)))
        self.w_dev = [st.wb.to(self.device) for st in self.stages]

    def _input(self, images):  # noqa: D102
        return to_float(images.to(self.device))

    def _prefix_of(self, h):  # noqa: D102
        return _fp32_prefix(self.stages, h, self.w_dev, self.start) if self.start > 0 else h

    def evaluate(self, flips):  # noqa: D102
        n = len(self.data)
        ws = list(self.w_dev)
        for k in self.faulty:
            w = self.stages[k].wb.expand(len(flips), *self.stages[k].wb.shape).clone()
            for g, f in enumerate(flips):
                idx = f.get(k)
                if idx is not None and idx.numel():
                    flat = w[g].view(-1)
                    flat[idx] = -flat[idx]
            ws[k] = w.to(self.device)
        correct = torch.zeros(len(flips), dtype=torch.int64, device=self.device)
        for h, y in self._chunks():
            pred = _fp32_forward(self.stages, h, ws, self.start)
            pred = pred if pred.dim() == 2 else pred.expand(len(flips), -1)
            correct += (pred == y[None, :]).sum(1)
        return [int(c) / n for c in correct.cpu()]


@register_engine
class FixedPointEngine(_Engine):
    """Exact engine for any codec (m-bit fixed point or sign), any activation, CPU or CUDA.

    Per map it flips the stored bits in a cached copy of the codes (``code_j ^= 2^b`` for each
    flipped bit ``i = j m + b``), decodes the layer (``numel`` work, nothing like a forward
    pass), and runs the model's own ops -- ``F.linear``/conv, ``block.post`` (BN, activation,
    pool) -- on the same batches as :func:`accuracy`, from the clean output of the last
    error-free block (computed once per chunk). Same ops on the same shapes as the naive loop
    (deepcopy, flip, decode, ``model(x)``), so the predictions are the same bit for bit,
    without the copy and the clean prefix.
    """

    name, rank = "fixed", 2

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        return "it needs a bnn_tol block model (.blocks)" if cm is None else None

    def __init__(self, model, data, **kw) -> None:
        from .compiled import compile_model

        super().__init__(model, data, **kw)
        self.cm = compile_model(model)
        self.faulty = [s.index for s in self.cm.stages if s.name in self.chosen]
        self.start = self.faulty[0] if self.faulty else len(self.cm.stages)
        self.codes, self.clean_w, self.stored = {}, {}, {}
        with torch.no_grad():
            for s in self.cm.stages:
                codes = s.codec.encode(s.layer.weight.detach())
                self.codes[s.index] = codes
                self.clean_w[s.index] = s.codec.decode(codes).to(s.layer.weight.dtype)
                if s.index in self.faulty:  # the memory image in the +-1 convention of errors
                    self.stored[s.index] = s.codec.to_bits(codes).to(torch.float32) * 2 - 1
        self._prefix: list[tuple[Tensor, Tensor]] | None = None

    def flips(self, fmap, p01, p10):  # noqa: D102
        return {k: fmap[self.cm.stages[k].name].flips(self.stored[k], p01, p10)
                for k in self.faulty}

    def _weights(self, k: int, idx: Tensor | None) -> Tensor:
        s = self.cm.stages[k]
        if idx is None or idx.numel() == 0:
            return self.clean_w[k]
        return s.codec.decode(s.codec.flip(self.codes[k], idx)).to(s.layer.weight.dtype)

    def _block(self, k: int, x: Tensor, w: Tensor) -> Tensor:
        s = self.cm.stages[k]
        if s.flatten:
            x = x.flatten(1)
        w = w.to(x.device)
        a = s.layer._conv_forward(x, w, s.layer.bias) if s.conv else F.linear(x, w, s.layer.bias)
        return s.block.post(a)

    def _chunks(self):
        if self._prefix is None:
            self._prefix = []
            with torch.no_grad(), eval_mode(self.model):
                for x, y in self.data.batches(self.batch_size, device=self.device):
                    if x.dim() == 2 and len(self.model.in_shape) == 3:
                        x = x.view(-1, *self.model.in_shape)
                    for k in range(self.start):
                        x = self._block(k, x, self.clean_w[k])
                    self._prefix.append((x, y))
        return self._prefix

    def evaluate(self, flips):  # noqa: D102
        n, out = len(self.data), []
        with torch.no_grad(), eval_mode(self.model):
            for f in flips:
                ws = {k: self._weights(k, f.get(k)) for k in range(len(self.cm.stages))}
                correct = 0
                for x, y in self._chunks():
                    for k in range(self.start, len(self.cm.stages)):
                        x = self._block(k, x, ws[k])
                    correct += int((x.argmax(1) == y).sum())
                out.append(correct / n)
        return out


@register_engine
class ReferenceEngine(_Engine):
    """``errors.inject`` + :func:`accuracy` per map: any model, every target."""

    name, rank = "reference", 9
    targets = frozenset({"weights", "activations", "thresholds"})

    def accuracies(self, maps, seeds, p01, p10, bar):  # noqa: D102
        from .errors import inject

        out = []
        for s in seeds:
            with inject(self.model, (p01, p10), seed=s, layers=self.layers,
                        targets=self.targets):
                out.append(accuracy(self.model, self.data, batch_size=self.batch_size))
            bar.update(1)
        return out

    def flips(self, fmap, p01, p10):  # noqa: D102
        return {}

    def evaluate(self, flips):  # noqa: D102
        from .profile import accuracy_with_flips

        return [accuracy_with_flips(self.model, self.data,
                                    {n: f for n, f in fl.items()}, batch_size=self.batch_size)
                for fl in flips]


class _Runner:
    """Evaluates lists of fault maps of one model at one BER with the picked engine."""

    def __init__(self, model, data, *, layers, device, engine, batch_size, maps_per_step,
                 targets) -> None:
        cls = _pick_engine(model, device, engine, tuple(targets))
        self.impl = cls(model, data, layers=layers, device=device, batch_size=batch_size,
                        maps_per_step=maps_per_step, targets=tuple(targets))
        self.engine = cls.name

    def __getattr__(self, name: str):
        return getattr(self.__dict__["impl"], name)

    def accuracies(self, maps, seeds, p01, p10, bar) -> list[float]:
        """Accuracies of the maps at ``(p01, p10)`` (updates ``bar`` per map)."""
        return self.impl.accuracies(maps, seeds, p01, p10, bar)

    def _eval_group(self, flips: list[dict]) -> list[float]:
        return self.impl.evaluate(flips)


def accuracy_under_flips(model: nn.Module, data: BNNDataset, flip_sets: list[dict], *,
                         engine: str = "auto", device: str | torch.device = "auto",
                         batch_size: int | None = None) -> list[float]:
    """Accuracy with explicit stored-bit flips, one value per flip set.

    Args:
        flip_sets: ``[{layer name: int64 flat indices into layer.stored_bits()}, ...]``.
        engine: as :func:`sweep` (``"auto"``: the fastest exact engine for the model).

    Raises:
        InvalidArgument: an unknown layer name or an index outside a layer's memory image.
    """
    dev = resolve_device(device)
    batch_size = _check_batch_size(batch_size, optional=True)
    runner = _Runner(model, data, layers=None, device=dev, engine=engine,
                     batch_size=batch_size, maps_per_step=None, targets=("weights",))
    impl = runner.impl
    from .compiled import compile_model, stored_layers

    layers = stored_layers(model)
    by_block = isinstance(impl, _SignEngine | FixedPointEngine)
    index = {s.name: s.index for s in compile_model(model).stages} if by_block else {}
    converted = []
    for fs in flip_sets:
        conv = {}
        for name, idx in fs.items():
            if name not in layers:
                raise InvalidArgument(f"unknown layer {name!r}; layers: {', '.join(layers)}")
            idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
            n_bits = layers[name].n_stored_bits
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_bits):
                raise InvalidArgument(f"{name}: a flip index is outside its {n_bits} stored bits")
            conv[index[name] if by_block else name] = idx
        converted.append(conv)
    return impl.evaluate(converted)


def _cpu_block(block: nn.Module, x: Tensor) -> Tensor:
    """Shape probe: run a copy-free block on a CPU zero input (weights may live on CUDA)."""
    p = next(block.parameters())
    was = block.training
    block.eval()
    try:
        return block(x.to(p.device)).cpu()
    finally:
        block.train(was)


def _fp32_prefix(stages, x: Tensor, ws: list[Tensor], stop: int) -> Tensor:
    """Clean, shared output of stages ``0 .. stop-1`` (input of stage ``stop``)."""
    h = x
    for k in range(stop):
        st = stages[k]
        if st.flatten:
            h = h.flatten(1)
        a = h @ ws[k].t() if not st.conv else F.conv2d(h, ws[k], padding=st.block.layer.padding)
        ai = torch.round(a * st.scale)
        h = apply_folded(ai, st.folded).to(x.dtype)
        if st.pool:
            h = F.max_pool2d(h, st.pool)
    return h


def summarize(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Mean, std and a ``level`` confidence interval of the accuracy per (model, ber).

    ``ci = mean +- t_{(1+level)/2, n-1} std / sqrt(n)`` (Student t over the fault maps; with
    ``n = 1`` the interval collapses to the mean and ``std`` is NaN).

    Returns:
        One row per (model, ber, p01, p10): ``model, ber, p01, p10, mean, std, ci_low,
        ci_high, n`` (also ``rerr_mean = 1 - mean``).
    """
    from scipy import stats

    need = {"model", "ber", "p01", "p10", "accuracy"}
    if not need <= set(df.columns):
        raise InvalidArgument(f"summarize needs a sweep frame with columns {sorted(need)}")
    g = df.groupby(["model", "ber", "p01", "p10"], sort=False)["accuracy"]
    s = g.agg(mean="mean", std="std", n="count").reset_index()
    tq = stats.t.ppf(0.5 + level / 2, (s["n"] - 1).clip(lower=1))
    half = (tq * s["std"] / s["n"].pow(0.5)).where(s["n"] > 1, 0.0)
    s["ci_low"] = s["mean"] - half
    s["ci_high"] = s["mean"] + half
    s["rerr_mean"] = 1.0 - s["mean"]
    return s[["model", "ber", "p01", "p10", "mean", "std", "ci_low", "ci_high", "n",
              "rerr_mean"]]
