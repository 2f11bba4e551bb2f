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

>>> pred = predict("deploy/", images_uint8)                      # doctest: +SKIP
>>> pred_bad = predict("deploy/", images_uint8, ber=0.01, seed=3)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

__all__ = ["load_bundle", "predict", "memory_image", "DeployError"]


class DeployError(ValueError):
    """A bundle or input that :func:`predict` cannot use (one line naming the problem)."""


def _popcount(x: np.ndarray) -> np.ndarray:
    if not hasattr(np, "bitwise_count"):
        raise DeployError("bnn_tol.deploy needs numpy >= 2.0 (np.bitwise_count)")
    return np.bitwise_count(x)


def load_bundle(path: str | os.PathLike) -> dict:
    """Read ``manifest.json`` and every array, verifying each sha256.

    Raises:
        DeployError: not an export, a missing file, or a checksum mismatch (names the file).
    """
    path = Path(path)
    try:
        man = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise DeployError(f"{path} is not a bnn_tol export (manifest.json: {e})") from None
    if man.get("format") != "bnn_tol.export" or man.get("version") != 1:
        raise DeployError(f"{path}: not a version-1 bnn_tol export")
    arrays = {}
    for name, digest in man["sha256"].items():
        f = path / name
        try:
            raw = f.read_bytes()
        except OSError:
            raise DeployError(f"{path}: {name} is missing") from None
        if hashlib.sha256(raw).hexdigest() != digest:
            raise DeployError(f"{path}: {name} does not match its checksum (corrupted or "
                              "edited)")
        if name.endswith(".npy"):
            arrays[name] = np.load(f, allow_pickle=False)
    man["arrays"] = arrays
    return man


def _input_offset(man: dict) -> int:
    """The pixel offset of the bundle's input grid (``q = p - offset``), checked against the
    grid its first layer was folded on. Bundles written before ``input.offset`` existed state
    the transform only in words (``"q = p - <offset> (int); ..."``): it is read from there."""
    inp = man.get("input", {})
    offset = inp.get("offset")
    if offset is None:
        m = re.match(r"q = p - (\d+) \(int\)", str(inp.get("transform", "")))
        if m is None:
            raise DeployError("the bundle's manifest states no input offset (input.offset)")
        offset = int(m.group(1))
    if not isinstance(offset, int) or not 0 <= offset <= 255:
        raise DeployError(f"the bundle's input offset {offset!r} is not a pixel value 0..255")
    scales = [e.get("input_scale") for e in man.get("layers", [])]
    if "scale" in inp and scales and scales[0] != inp["scale"]:
        raise DeployError(f"the first layer was folded on the grid 1/{scales[0]} but the input "
                          f"grid is 1/{inp['scale']}: an inconsistent manifest")
    if any(s != 1 for s in scales[1:]):
        raise DeployError("layers after the first must see +-1 inputs (input_scale 1)")
    return offset


def memory_image(bundle) -> dict[str, np.ndarray]:
    """The packed weights per block, ``{"layer{k}": uint64 (rows, words)}`` (a copy)."""
    b = bundle if isinstance(bundle, dict) else load_bundle(bundle)
    return {f"layer{e['index']}": b["arrays"][e["weights"]].copy() for e in b["layers"]}


def _pixels(x, shape: list[int]) -> np.ndarray:
    """uint8 pixels ``(N, *shape)`` from uint8, or floats in [0, 1] (``p = round(255 x)``) or
    integer-valued floats in [0, 255]."""
    x = np.asarray(x)
    n = x.shape[0] if x.ndim else 0
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise DeployError(f"inputs must be (N, {', '.join(map(str, shape))}) pixels, got "
                          f"{x.shape}")
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
    x: np.ndarray = images.astype(np.int64) - _input_offset(man)  # first block: integers q
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


def _flip_with_maps(man: dict, weights: dict, ber, seed: int, error: str | None) -> None:
    """XOR the flips of ``errors.inject(model, ber, seed=seed, error=error)`` into the packed
    image: the maps come from the library's own drawing function
    (:func:`bnn_tol.faults.registry.draw_sites`, what ``inject`` and the sweep draw)."""
    import torch

    from bnn_tol.faults.registry import Site, check_rates, draw_sites, error_model

    em = error_model(error)
    ((p01, p10),) = check_rates(em, [ber])
    sites, address = [], 0
    for pos, e in enumerate(man["layers"]):  # every stored layer, in forward order
        n_bits = e["rows"] * e["fan_in"]
        sites.append(Site(f"layer{e['index']}", pos, n_bits, 0, address))
        address += n_bits
    maps = draw_sites(sites, seed, max(p01, p10), error=em)
    for e in man["layers"]:
        key, fan_in = f"layer{e['index']}", e["fan_in"]
        stored = _unpack_pm1(weights[key], fan_in).reshape(-1)
        idx = maps[key].flips(torch.from_numpy(stored.astype(np.float32)), p01, p10).numpy()
        r, c = np.divmod(idx, fan_in)
        np.bitwise_xor.at(weights[key], (r, c // 64), np.left_shift(
            np.uint64(1), (c % 64).astype(np.uint64)))


def predict(bundle, x, *, ber=None, seed: int | None = None, flip_mask=None,
            batch_size: int = 1000, error: str | None = None) -> np.ndarray:
    """Predicted classes ``(N,)`` int64 of inputs ``x`` with the exported BNN.

    Args:
        bundle: the export directory (or a :func:`load_bundle` result).
        x: uint8 pixels ``(N, C, H, W)`` / ``(N, C H W)``, or float pixels (``p / 255`` or
            ``p``).
        ber, seed: bit errors of chip ``seed`` at ``p`` or ``(p01, p10)``: the fault map of
            ``errors.inject(model, ber, seed=seed, error=error)`` (needs bnn_tol installed).
        error: the error model (a name of ``bnn_tol.errors.models()``; default bernoulli).
        flip_mask: ``{"layer{k}": uint64 XOR mask like the packed weights}`` or an ``.npz``.
        batch_size: images per step (memory: the conv patches of one step).

    Raises:
        DeployError: bad inputs, masks or bundles.
    """
    man = bundle if isinstance(bundle, dict) else load_bundle(bundle)
    images = _pixels(x, man["input"]["shape"])
    weights = memory_image(man)
    if ber is not None:
        if seed is None:
            raise DeployError("ber= needs seed= (the chip)")
        _flip_with_maps(man, weights, ber, int(seed), error)
    if flip_mask is not None:
        masks = dict(np.load(flip_mask, allow_pickle=False)) \
            if isinstance(flip_mask, str | os.PathLike) else dict(flip_mask)
        for key, m in masks.items():
            if key not in weights:
                raise DeployError(f"flip mask for unknown layer {key!r}; layers: "
                                  f"{', '.join(weights)}")
            m = np.asarray(m)
            if m.shape != weights[key].shape or m.dtype != np.uint64:
                raise DeployError(f"flip mask {key} must be uint64 {weights[key].shape}")
            e = next(e for e in man["layers"] if f"layer{e['index']}" == key)
            pad = _pack(np.ones((1, e["fan_in"]), dtype=bool))[0]
            if (m & ~pad[None, :]).any():
                raise DeployError(f"flip mask {key} sets padding bits beyond fan_in")
            weights[key] = weights[key] ^ m
    out = [_forward(man, images[i:i + batch_size], weights)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
