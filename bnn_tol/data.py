"""Datasets without torchvision: IDX files (MNIST, Fashion-MNIST, KMNIST), CIFAR-10 python
batches, and scikit-learn's ``digits`` as a tiny built-in set.

Images are kept as ``uint8`` ``(N, C, H, W)`` tensors; batches are converted to float on the
library's input grid :data:`INPUT` (the one place it is defined),

    x = (p - offset) / scale = (p - 128) / 128       p in {0, ..., 255},

a dyadic scaling: first-layer sums of up to 2^16 terms ``+-x`` are exact in float32 in any
summation order, and ``q = p - 128`` fits in int8 for integer kernels.

>>> train = load("fashion-mnist", "train")          # doctest: +SKIP
>>> x, y = next(train.batches(256, shuffle=True, seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bnn_tol.exceptions import BnnTolError, InvalidArgument, require_int

__all__ = [
    "BNNDataset",
    "InputGrid",
    "INPUT",
    "Normalize",
    "grid_of",
    "DatasetNotFound",
    "CorruptDataset",
    "load",
    "read_idx",
    "to_float",
    "search_paths",
    "available",
    "SYSTEM_DIR",
]

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_SETS = {"fashion-mnist": "fashion-mnist", "mnist": "mnist", "kmnist": "kmnist"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


class DatasetNotFound(BnnTolError, FileNotFoundError):
    """A dataset's files were not found in any searched location."""


class CorruptDataset(BnnTolError, ValueError):
    """A dataset file exists but is truncated or malformed."""


@dataclass(frozen=True)
class InputGrid:
    """How ``uint8`` pixels ``p`` enter a model: ``x = q / scale`` with the integer
    ``q = p - offset`` (affine), or ``q = levels[p]`` (an input quantizer, e.g. Brevitas'
    8-bit ``QuantIdentity`` after ``2x - 1``: ``levels[p] = round((2p - 255) 127 / 255)``), or
    ``q = levels[c][p]`` per input channel ``c`` (``Normalize`` with a mean and std per
    channel).

    ``q`` is the integer input of the integer engines and of the deploy bundle; a first layer
    of +-1 weights then has pre-activations on the grid ``a = k / scale`` with the integer
    ``k = sum_i w_i q_i`` (its folded threshold lives on that grid, see
    :attr:`bnn_tol.core.compiled.Stage.scale`).

    **Approximate grids.** A transform ``T`` whose values are not all integer multiples of one
    step (``Normalize(0.1307, 0.3081)``: zero point at pixel 33.33; per-channel stds) is
    represented by rounded levels ``q = round(T(p) / unit)`` (:meth:`fit`); ``error`` is then
    ``max |q - T(p) / unit|`` over pixel values and channels (``0``: exact), so the first
    layer's ``k`` is within ``error * fan_in`` of the exact ``sum_i w_i T_i / unit``. The model
    built on the grid is the definition every engine, export and deploy reproduces exactly;
    ``error`` only says how far it is from the user's float transform.

    Attributes:
        offset: subtracted from the pixel (``q = p - offset``; ignored with ``levels``).
        scale: a power of two, so ``x`` is exact in float32 and sums of ``+-x`` are exact.
        levels: ``None`` (affine), the 256 integers ``q`` of the pixel values ``0..255``, or
            one such tuple per input channel (``(C, 256)``).
        error: ``max |q - T / unit|`` of an approximate grid, in units of ``q`` (``0 <= error
            <= 0.5``); ``0.0`` for an exact one.
    """

    offset: int
    scale: int
    levels: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    error: float = 0.0

    def __post_init__(self) -> None:
        scale = require_int(self.scale, "input grid scale", minimum=1, strict=True)
        if scale & (scale - 1):
            raise InvalidArgument(f"input grid scale must be a power of two, got {scale}")
        require_int(self.offset, "input grid offset", strict=True)
        if self.levels is not None:
            rows = self.levels if self.levels and isinstance(self.levels[0], tuple) else (
                self.levels,)
            if not rows or not all(isinstance(r, tuple) and len(r) == 256 and all(
                    isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**15
                    for v in r) for r in rows):
                raise InvalidArgument("input grid levels must be 256 integers |q| < 2^15 (one "
                                      "per pixel value 0..255), or one such list per channel")
        e = self.error
        if isinstance(e, bool) or not isinstance(e, int | float) or not 0.0 <= e <= 0.5:
            raise InvalidArgument(f"input grid error must be a number in [0, 0.5] (the largest "
                                  f"|q - T / unit| of a rounded grid), got {e!r}")

    @classmethod
    def from_levels(cls, levels, scale: int, error: float = 0.0) -> InputGrid:
        """The grid of ``q = levels[p]`` (``(256,)``) or ``q = levels[c][p]`` (``(C, 256)``):
        one table when every channel's is the same, affine (``offset``) when ``levels[p] = p -
        offset``."""
        arr = np.asarray(levels.cpu() if isinstance(levels, Tensor) else levels)
        rows = [tuple(int(v) for v in r) for r in arr.reshape(-1, arr.shape[-1])] if \
            arr.ndim == 2 else [tuple(int(v) for v in arr.reshape(-1))]
        error = float(error)
        if any(r != rows[0] for r in rows):
            return cls(offset=0, scale=scale, levels=tuple(rows), error=error)
        levels = rows[0]
        if len(levels) == 256 and len({p - q for p, q in enumerate(levels)}) == 1:
            return cls(offset=-levels[0], scale=scale, error=error)
        return cls(offset=0, scale=scale, levels=levels, error=error)

    @classmethod
    def fit(cls, values: Tensor, *, fan_in: int) -> tuple[InputGrid, float]:
        """The grid of a transform given by its values: ``values`` float ``(C, 256)`` (or
        ``(256,)``), ``T_c(p)`` the first layer's input for pixel value ``p`` in channel ``c``.

        Exact when every value is an integer multiple of one step ``unit`` (``u``: the smallest
        gap between values, or half of it, refined by least squares; float32 noise up to
        ``1e-3 u`` is the transform's own rounding): ``q = T / unit``, ``error = 0``.
        Otherwise approximate: ``unit = s / m`` with ``s`` the smallest gap between a
        channel's values and the integer ``m >= 1`` that minimizes ``unit * error``,
        ``q = round(T / unit)``, ``error = max |q - T / unit|``, while ``|q| < 2^15`` and
        ``max |q| fan_in < 2^24`` (first-layer sums stay exact in float32); where even
        ``m = 1`` needs more levels (a wide fan-in, very different stds), the finest coarser
        step ``unit = j s`` (integer ``j >= 2``) within those limits.

        Returns:
            The grid (``scale``: the power of two nearest to ``1 / unit``, at least 1) and
            ``unit``, so ``T ~ unit q = (unit scale) x``: ``unit scale`` is the factor a caller
            folds into the first layer.

        Raises:
            InvalidArgument: fewer than two distinct values, or levels beyond those limits even
                for ``m = 1``.
        """
        t = values.detach().double().reshape(-1, 256)
        fan_in = require_int(fan_in, "fan_in", minimum=1)
        flat = t.reshape(-1)
        distinct = torch.unique(flat)
        if len(distinct) < 2:
            raise InvalidArgument(f"every pixel value maps to {float(distinct[0]):.6g}")
        gap = float(torch.diff(distinct).min())
        for parts in (1, 2):  # exact: every value an integer multiple of one step
            u = gap / parts
            for _ in range(3):  # refine u by least squares on the rounded levels (float noise)
                q = (flat / u).round()
                u = float((flat * q).sum() / (q * q).sum())
            if float((flat / u - q).abs().max()) <= 1e-3 and float(q.abs().max()) < 2**15:
                return cls._scaled(q.reshape(t.shape), u, 0.0), u
        steps = [torch.diff(torch.unique(r)) for r in t]
        s = min(float(d.min()) for d in steps if len(d))
        best = None
        for m in range(1, 4097):
            u = s / m
            q = (t / u).round()
            top = int(q.abs().max())
            if top >= 2**15 or top * fan_in >= 2**24:
                break
            err = float((q - t / u).abs().max())
            if best is None or err * u < best[0] * (1 - 1e-6):
                best = (err * u, q, u, err)
        if best is None:  # even the smallest gap needs too many levels: a coarser step
            limit = min(2**15 - 1, (2**24 - 1) // fan_in)
            j0 = max(2, math.ceil(float(t.abs().max()) / max(limit, 1) / s))
            for j in range(j0, j0 + 8):
                q = (t / (s * j)).round()
                top = int(q.abs().max())
                if 0 < top <= limit:
                    best = (0.0, q, s * j, float((q - t / (s * j)).abs().max()))
                    break
        if best is None:
            raise InvalidArgument(f"its levels need integers up to {top} on a step of "
                                  f"{s:.6g} (|q| < 2^15 and max |q| fan_in = {top} x {fan_in} "
                                  "< 2^24 keep the first layer exact)")
        _, q, u, err = best
        return cls._scaled(q, u, err), u

    @classmethod
    def _scaled(cls, q: Tensor, u: float, error: float) -> InputGrid:
        scale = 2 ** max(0, round(math.log2(1 / u)))
        return cls.from_levels(q.long().tolist() if len(q) > 1 else q[0].long().tolist(),
                               scale, error)

    @property
    def channels(self) -> int | None:
        """The number of per-channel tables, or ``None`` (one transform for every channel)."""
        if self.levels is not None and isinstance(self.levels[0], tuple):
            return len(self.levels)
        return None

    @property
    def q_range(self) -> tuple[int, int]:
        """``(min q, max q)`` over the pixel values ``0..255`` (and channels)."""
        if self.levels is None:
            return -self.offset, 255 - self.offset
        flat = [v for r in self.levels for v in r] if self.channels else self.levels
        return min(flat), max(flat)

    @property
    def q_max(self) -> int:
        """The largest ``|q|`` of a pixel in ``0..255``: bounds ``|k| <= q_max fan_in``."""
        lo, hi = self.q_range
        return max(-lo, hi)

    def _lookup(self, images: Tensor, dtype: torch.dtype) -> Tensor:
        """``q`` of ``images`` from the table(s) ``levels`` (per channel: axis ``-3``)."""
        table = torch.tensor(self.levels, dtype=dtype, device=images.device)
        c = self.channels
        if c is None:
            return table[images.long()]
        if images.dim() < 3 or images.shape[-3] != c:
            raise InvalidArgument(f"a per-channel input grid ({c} channels) needs pixels "
                                  f"(..., {c}, H, W), got shape {tuple(images.shape)}")
        return table[torch.arange(c, device=images.device).view(c, 1, 1), images.long()]

    def to_float(self, images: Tensor) -> Tensor:
        """``uint8`` pixels, any shape (``(..., C, H, W)`` per channel) -> float32
        ``q / scale``."""
        if self.levels is not None:
            return self._lookup(images, torch.float32) / float(self.scale)
        return (images.to(torch.float32) - float(self.offset)) / float(self.scale)

    def to_int(self, images: Tensor, dtype: torch.dtype = torch.int32) -> Tensor:
        """``uint8`` pixels, any shape (``(..., C, H, W)`` per channel) -> the integers ``q``
        (``dtype``)."""
        if self.levels is not None:
            return self._lookup(images, dtype)
        return images.to(dtype) - self.offset

    def describe(self) -> str:
        """The transform in words (written into export manifests)."""
        if self.channels:
            lo, hi = self.q_range
            text = (f"q = levels[c][p] (int, one table per input channel c of {self.channels}, "
                    f"levels {lo}..{hi}); the float model sees q / {self.scale}")
        elif self.levels is not None:
            lo, hi = self.q_range
            what = "the rounded input transform" if self.error else "an input quantizer"
            text = (f"q = levels[p] (int, {what} with levels {lo}..{hi}); the "
                    f"float model sees q / {self.scale}")
        else:
            text = (f"q = p - {self.offset} (int); the float model sees "
                    f"(p - {self.offset}) / {self.scale}")
        if self.error:
            text += (f"; approximate: each q is within {self.error:.4g} of the trained "
                     f"transform's exact value (in units of q), so the first layer's "
                     f"k = sum w q is within {self.error:.4g} fan_in of it")
        return text

    def config(self) -> dict:
        """JSON form (``offset``, ``scale``; ``levels`` for a quantizer or per-channel tables;
        ``error`` for an approximate grid)."""
        out: dict = {"offset": int(self.offset), "scale": int(self.scale)}
        if self.levels is not None:
            out["levels"] = [list(r) for r in self.levels] if self.channels else list(
                self.levels)
        if self.error:
            out["error"] = float(self.error)
        return out

    @classmethod
    def from_config(cls, cfg: dict) -> InputGrid:
        """Inverse of :meth:`config` (validated)."""
        if not isinstance(cfg, dict) or not {"offset", "scale"} <= set(cfg) <= {
                "offset", "scale", "levels", "error"}:
            raise InvalidArgument(f"an input grid is {{offset, scale[, levels][, error]}}, got "
                                  f"{cfg!r:.200}")
        levels = cfg.get("levels")
        if levels is not None:
            if not isinstance(levels, list | tuple) or not levels:
                raise InvalidArgument("input grid levels must be a list of 256 integers (or one "
                                      "such list per channel)")
            if isinstance(levels[0], list | tuple):
                levels = tuple(tuple(r) if isinstance(r, list | tuple) else r for r in levels)
            else:
                levels = tuple(levels)
        return cls(offset=cfg["offset"], scale=cfg["scale"], levels=levels,
                   error=cfg.get("error", 0.0))


#: The library's input grid: ``x = (p - 128) / 128`` in ``[-1, 0.9921875]``, step 1/128.
INPUT = InputGrid(offset=128, scale=128)


def grid_of(model: object) -> InputGrid:
    """The input grid a model declares (``model.input_grid``), else :data:`INPUT`."""
    return getattr(model, "input_grid", None) or INPUT


def to_float(images: Tensor) -> Tensor:
    """``uint8`` pixels ``(N, C, H, W)`` -> float32 on the input grid :data:`INPUT`."""
    return INPUT.to_float(images)


@dataclass(frozen=True)
class Normalize:
    """The input convention of public BNN code: ``ToTensor()`` then ``Normalize(mean, std)``,

        x = (p / 255 - mean_c) / std_c          (float32, in that order, as torchvision),

    so ``Normalize()`` is ``[0, 1]`` inputs and ``Normalize(0.5, 0.5)`` is ``2x - 1``. ``mean``
    and ``std`` are one number each, or one per channel (``Normalize((0.4914, 0.4822, 0.4465),
    (0.247, 0.243, 0.261))``; a one-element tuple is one number for every channel): channel
    ``c`` is axis ``-3`` of ``(..., C, H, W)`` pixels, or the ``c``-th block of a flat
    ``(N, C H W)`` batch (torch's flattening order)."""

    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0

    def __post_init__(self) -> None:
        sizes = set()
        for name in ("mean", "std"):
            v = getattr(self, name)
            vals = tuple(v) if isinstance(v, list | tuple) else (v,)
            if not vals or any(isinstance(e, bool) or not isinstance(e, int | float)
                               or not np.isfinite(e) for e in vals):
                raise InvalidArgument(f"Normalize {name} must be a finite number or a tuple of "
                                      f"finite numbers (one per channel), got {v!r}")
            if isinstance(v, list | tuple):
                object.__setattr__(self, name, tuple(float(e) for e in vals))
            if len(vals) > 1:
                sizes.add(len(vals))
            if name == "std" and not all(e > 0 for e in vals):
                raise InvalidArgument(f"Normalize std must be > 0, got {v!r}")
        if len(sizes) > 1:
            raise InvalidArgument(f"Normalize mean and std give different numbers of channels "
                                  f"({self.mean!r}, {self.std!r})")

    @property
    def channels(self) -> int | None:
        """The number of channels with their own mean/std, or ``None`` (one for all)."""
        n = max(len(v) if isinstance(v, tuple) else 1 for v in (self.mean, self.std))
        return n if n > 1 else None

    def _per_channel(self, x: Tensor, fn) -> Tensor:
        """``fn(x, mean, std)`` with float32 ``mean``/``std`` broadcast over ``x``'s channels."""
        m, s = (torch.tensor(v, dtype=torch.float32) for v in (self.mean, self.std))
        c = self.channels
        if c is None:
            return fn(x, m.reshape(()), s.reshape(()))
        m, s = m.expand(c), s.expand(c)
        if x.dim() >= 3 and x.shape[-3] == c:
            return fn(x, m.view(c, 1, 1), s.view(c, 1, 1))
        if x.dim() == 2 and x.shape[1] % c == 0:
            return fn(x.reshape(len(x), c, -1), m.view(c, 1), s.view(c, 1)).reshape(x.shape)
        raise InvalidArgument(f"Normalize with {c} channels needs (..., {c}, H, W) or flat "
                              f"(N, {c} H W) inputs, got shape {tuple(x.shape)}")

    def to_float(self, images: Tensor) -> Tensor:
        """``uint8`` pixels, any shape (see the class docstring for channels) -> the float32
        inputs the user's model was trained on."""
        return self._per_channel(images.to(torch.float32).div(255),
                                 lambda x, m, s: x.sub(m).div(s))

    def pixels(self, x: Tensor) -> Tensor | None:
        """The ``uint8`` pixels ``p`` with ``to_float(p) == x`` bit for bit, or ``None``."""
        p = self._per_channel(x.double(), lambda v, m, s: torch.round(
            (v * s.double() + m.double()) * 255))
        if not bool(((p >= 0) & (p <= 255)).all()):
            return None
        p = p.to(torch.uint8)
        return p if torch.equal(self.to_float(p), x) else None


class BNNDataset(Dataset):
    """Images and labels held in memory.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        labels: ``int64`` tensor ``(N,)``.
        name: dataset name; ``split``: ``"train"``/``"test"``; ``classes``: class names.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        name: str = "custom",
        split: str = "",
        classes: tuple[str, ...] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise InvalidArgument(f"images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise InvalidArgument(f"labels must have shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.name = name
        self.split = split
        n_cls = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = tuple(classes) if classes else tuple(str(c) for c in range(n_cls))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return to_float(self.images[i : i + 1])[0], self.labels[i]

    def __repr__(self) -> str:
        return (f"BNNDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, classes={len(self.classes)})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image ``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, n: int | None = None, *, seed: int | None = None) -> BNNDataset:
        """The first ``n`` samples, or a random ``n`` if ``seed`` is given.

        ``n=None`` (or ``n >= len(self)``) is the whole set.

        Raises:
            InvalidArgument: ``n`` is not an integer >= 1, or ``seed`` is not an integer.
        """
        if n is not None:
            n = require_int(n, "subset size n", minimum=1)
        if seed is not None:
            seed = require_int(seed, "subset seed", minimum=0)
        if n is None or n >= len(self):
            return self
        if seed is None:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return BNNDataset(self.images[idx], self.labels[idx], name=self.name, split=self.split,
                          classes=self.classes)

    def batches(
        self,
        batch_size: int = 1024,
        *,
        shuffle: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        grid: InputGrid = INPUT,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)``: float32 ``(B, C, H, W)`` on the input ``grid`` (the model's,
        :func:`grid_of`) and int64 ``(B,)`` on ``device``.

        Shuffling draws from ``generator`` (or a fresh one seeded with ``seed``).
        """
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            if generator is None:
                if seed is None:
                    raise InvalidArgument("shuffle=True needs a seed or a generator")
                generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(n, generator=generator)
        else:
            order = None
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size] if order is not None else slice(
                start, start + batch_size)
            x = grid.to_float(self.images[idx].to(device, non_blocking=True))
            yield x, self.labels[idx].to(device, non_blocking=True)


def search_paths(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for dataset ``name``, in order.

    A given ``data_dir`` is the only place searched (as is and with ``/<name>``): it must
    exist, and nothing falls back silently to another copy. Without it: ``$BNN_TOL_DATA``,
    ``./data`` (each as is and with ``/<name>``), then ``/usr/share/datasets/<name>`` (the
    Debian ``dataset-fashion-mnist`` package).

    Raises:
        DatasetNotFound: ``data_dir`` is given but is not an existing directory.
    """
    if data_dir is not None:
        d = Path(data_dir)
        if not d.is_dir():
            raise DatasetNotFound(f"data directory {d} does not exist (or is not a directory); "
                                  "pass an existing --data-dir, or omit it to search "
                                  "$BNN_TOL_DATA, ./data and /usr/share/datasets")
        return [d / name, d]
    roots: list[Path] = []
    env = os.environ.get("BNN_TOL_DATA")
    if env:
        roots.append(Path(env))
    roots.append(Path("data"))
    out: list[Path] = []
    for r in roots:
        out += [r / name, r]
    out.append(Path("/usr/share/datasets") / name)
    return out


def _open(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorruptDataset(f"{path}: cannot read ({e}); the file is corrupt or truncated, "
                             "delete it and reinstall the dataset") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array.

    Format: magic ``0x0000 TT DD`` (TT = type code, DD = number of dims), DD big-endian
    uint32 sizes, then the data.

    Raises:
        CorruptDataset: bad magic, unknown type, or fewer bytes than the header announces.
    """
    path = Path(path)
    raw = _open(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptDataset(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise CorruptDataset(f"{path}: unknown IDX type 0x{code:02x} or 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataset(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header < need:
        raise CorruptDataset(f"{path}: truncated: header announces {dims} ({need} bytes of data),"
                             f" file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)


def _find_idx(name: str, split: str, data_dir) -> tuple[Path, Path]:
    stems = _IDX_FILES[split]
    looked = search_paths(name, data_dir)
    for d in looked:
        found = []
        for stem in stems:
            hits = [d / (stem + ext) for ext in ("", ".gz")]
            hits += [d / (stem.replace("-idx", ".idx") + ext) for ext in ("", ".gz")]
            hits = [h for h in hits if h.is_file()]
            if not hits:
                break
            found.append(hits[0])
        if len(found) == 2:
            return found[0], found[1]
    env = os.environ.get("BNN_TOL_DATA")
    where = ", ".join(str(p) for p in dict.fromkeys(looked))
    hint = (" Install it with `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist"
            else "")
    if data_dir is not None:
        raise DatasetNotFound(
            f"{name} ({split}) not found in the given data directory. Looked in: {where} (only "
            f"the given --data-dir is searched): it must contain {stems[0]}.gz and "
            f"{stems[1]}.gz (or uncompressed), or omit --data-dir to use the default places.")
    raise DatasetNotFound(
        f"{name} ({split}) not found. Looked in: {where} ($BNN_TOL_DATA "
        f"{'=' + env if env else 'unset'}).{hint} or pass --data-dir DIR (data_dir=DIR) "
        f"containing {stems[0]}.gz and {stems[1]}.gz."
    )


def _load_idx(name: str, split: str, data_dir) -> BNNDataset:
    img_path, lbl_path = _find_idx(name, split, data_dir)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise CorruptDataset(f"{img_path} / {lbl_path}: shapes {images.shape} and {labels.shape}"
                             " do not form an image/label pair")
    classes = FASHION_CLASSES if name == "fashion-mnist" else None
    n_classes = len(classes) if classes is not None else 10
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise CorruptDataset(f"{lbl_path}: labels must be class indices 0..{n_classes - 1}, "
                             f"found {int(labels.min())}..{int(labels.max())}; the file is "
                             "corrupt or of another dataset")
    return BNNDataset(torch.from_numpy(images.astype(np.uint8))[:, None],
                      torch.from_numpy(labels.astype(np.int64)), name=name, split=split,
                      classes=classes)


def _load_cifar10(split: str, data_dir) -> BNNDataset:
    looked = search_paths("cifar-10-batches-py", data_dir) + search_paths("cifar10", data_dir)
    files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    for d in looked:
        if all((d / f).is_file() for f in files):
            xs, ys = [], []
            for f in files:
                try:
                    with open(d / f, "rb") as fh:
                        # CIFAR batches are pickles of plain dicts: allow only numpy/builtins.
                        batch = _SafeUnpickler(fh, encoding="bytes").load()
                    x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    y = np.asarray(batch[b"labels"], dtype=np.int64)
                except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                    raise CorruptDataset(f"{d / f}: not a CIFAR-10 python batch ({e})") from e
                xs.append(x)
                ys.append(y)
            return BNNDataset(torch.from_numpy(np.concatenate(xs)),
                              torch.from_numpy(np.concatenate(ys)), name="cifar10", split=split,
                              classes=CIFAR_CLASSES)
    raise DatasetNotFound(
        f"cifar10 ({split}) not found. Looked in: {', '.join(map(str, dict.fromkeys(looked)))}. "
        "Download the CIFAR-10 python version, unpack it and pass --data-dir DIR containing "
        "cifar-10-batches-py/."
    )


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_digits(split: str) -> BNNDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    perm = np.random.default_rng(0).permutation(len(images))  # fixed split, not a global seed
    cut = int(0.8 * len(images))
    idx = perm[:cut] if split == "train" else perm[cut:]
    labels = torch.from_numpy(d.target[idx].astype(np.int64))
    return BNNDataset(torch.from_numpy(images[idx]), labels, name="digits", split=split)


def available() -> list[str]:
    """Dataset names accepted by :func:`load`."""
    return [*sorted(_IDX_SETS), "cifar10", "digits"]


def load(
    name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None
) -> BNNDataset:
    """Load a dataset split into memory.

    Args:
        name: ``"fashion-mnist"`` (alias ``"fmnist"``), ``"mnist"``, ``"kmnist"``,
            ``"cifar10"``, or ``"digits"`` (scikit-learn's 8x8 digits, fixed 80/20 split).
        split: ``"train"`` or ``"test"``.
        data_dir: when given, the only directory searched; it must exist (see
            :func:`search_paths`).

    Raises:
        DatasetNotFound: names every directory searched and how to install or point to it.
        CorruptDataset: truncated or malformed files.
    """
    key = name.lower().replace("_", "-")
    key = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(
        key, key)
    if split not in ("train", "test"):
        raise InvalidArgument(f"split must be 'train' or 'test', got {split!r}")
    if key in _IDX_SETS:
        return _load_idx(key, split, data_dir)
    if key == "cifar10":
        return _load_cifar10(split, data_dir)
    if key == "digits":
        return _load_digits(split)
    raise InvalidArgument(f"unknown dataset {name!r}; available: {', '.join(available())}")
