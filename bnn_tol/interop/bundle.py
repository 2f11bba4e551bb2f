"""Bit-exact export of a BNN in the form an accelerator stores: packed weight bits, integer
thresholds, a JSON manifest (:func:`export`, also ``bnn_tol.export``); :mod:`bnn_tol.deploy`
runs it with numpy only.

Bundle layout (plain ``.npy`` files, no pickle; every array's sha256 in the manifest)::

    manifest.json            format "bnn_tol.export" v1, shapes, bit order, input scaling,
                             class names, per-layer entries, checksums, versions, and
                             ``manifest_sha256``: the sha256 of the manifest's own canonical
                             form (:func:`bnn_tol.deploy.manifest_digest`)
    bnn_deploy.py            a copy of :mod:`bnn_tol.deploy`: the numpy-only reader, usable
                             without bnn_tol or torch installed
    layer{k}_weights.npy     uint64 (rows, words): the packed weights of block k
    layer{k}_t.npy           int64 (rows,) folded integer thresholds (hidden blocks)
    layer{k}_direction.npy   int8 (rows,) +1: y = +1 iff a >= t; -1: iff a <= t; 0: dead
    layer{k}_const.npy       int8 (rows,) the constant output of dead neurons (+-1), else 0
    layer{k}_scores.npy      float32 (2 fan_in + 1, classes): output block, the float32 score
                             torch's BatchNorm gives for every reachable integer a = -fan_in..fan_in

**Bit order.** Row ``r`` is output neuron (conv: output channel) ``r``; its ``fan_in`` weights
are in torch's flattening order (linear: input feature; conv: ``(c_in, kh, kw)`` C order). Bit
``j`` (LSB = 0) of word ``w`` of row ``r`` holds weight ``64 w + j``: 1 for +1, 0 for -1.
Padding bits after ``fan_in`` are 0 and never counted. The memory image (what fault maps flip)
is the ``rows * fan_in`` weight bits in row-major order: flat stored-bit index
``i = r fan_in + c`` is bit ``c mod 64`` of word ``c // 64`` of row ``r`` -- exactly the flat
index of :func:`bnn_tol.errors.draw_maps`, so a map drawn for the model flips the same bits here.

**Arithmetic.** Inputs are integers ``q = p - 128`` (``p`` the uint8 pixel); the first block
computes ``k = sum_i w_i q_i = 128 a`` and compares it with its threshold on that grid. Later
blocks see +-1 activations held as bits: ``a = n - 2 popcount((x XOR w) AND valid)`` with ``n``
the number of valid (non-padding) inputs. Max-pooling of +-1 values is an OR of bits. The output
block looks up its scores in ``layer{k}_scores`` (the exact float32 values of the float model)
and takes the first argmax, as ``torch.argmax`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_tol._version import __version__
from bnn_tol.core.compiled import UnsupportedModel, check_bnn
from bnn_tol.exceptions import InvalidArgument, ResultsMismatch
from bnn_tol.interop import deploy

__all__ = ["export", "pack_rows", "FORMAT", "MANIFEST"]

FORMAT = deploy.FORMAT
MANIFEST = deploy.MANIFEST


def pack_rows(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean ``(rows, n)`` array into uint64 ``(rows, ceil(n / 64))``, bit ``j`` of
    word ``w`` = column ``64 w + j``; padding bits 0."""
    rows, n = bits.shape
    words = (n + 63) // 64
    padded = np.zeros((rows, words * 64), dtype=bool)
    padded[:, :n] = bits
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(rows, words)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ResultsMismatch(f"{out} exists and is not a directory; choose another --out")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    ours = MANIFEST in names and json.loads((out / MANIFEST).read_text()).get("format") == FORMAT
    if not ours:
        raise ResultsMismatch(f"{out} is not empty and not a bnn_tol export; refusing to write "
                              "into it: choose a new or empty --out")
    if not overwrite:
        raise ResultsMismatch(f"{out} already holds an export; pass overwrite=True (--overwrite)"
                              " to replace it")


def _score_table(bn: nn.Module, fan_in: int) -> np.ndarray:
    """Float32 ``bn(a)`` for every integer ``a`` in ``[-fan_in, fan_in]``: ``(2 fan_in + 1, C)``,
    computed by the model's own BatchNorm in eval mode (bit-identical to its forward pass)."""
    was = bn.training
    bn.eval()
    try:
        with torch.no_grad():
            p = next(iter(bn.buffers()))
            a = torch.arange(-fan_in, fan_in + 1, dtype=torch.float32, device=p.device)
            a = a[:, None].expand(-1, bn.num_features).contiguous()
            return bn(a).cpu().numpy().astype(np.float32)
    finally:
        bn.train(was)


def export(model: nn.Module, out: str | os.PathLike, *, class_names=None,
           overwrite: bool = False) -> Path:
    """Write ``model`` (a BNN: sign weights and activations) as a deployable bundle.

    Args:
        model: a :class:`~bnn_tol.models.BNN`.
        out: a new or empty directory (or an earlier export of ours with ``overwrite``).
        class_names: names of the output classes (default ``"0".."C-1"``).

    Returns:
        The bundle directory.

    Raises:
        UnsupportedModel: m-bit weights, ReLU blocks, a block layout the integer arithmetic
            cannot express (stride/groups/bias), or a single-block model.
        ResultsMismatch: ``out`` holds something else.
    """
    cm = check_bnn(model, what="export", need_integer=True)
    stages = cm.stages
    if len(stages) < 2:
        raise UnsupportedModel("export needs at least one hidden block before the output block")
    out = Path(out)
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    in_shape = [int(v) for v in model.in_shape]
    files: dict[str, str] = {}
    layers = []

    def save(name: str, arr: np.ndarray) -> str:
        np.save(out / name, arr, allow_pickle=False)
        files[name] = _sha(out / name)
        return name

    for st in stages:
        w = st.wb.reshape(st.wb.shape[0], -1).numpy() > 0
        k = st.index
        entry = {"index": k, "name": st.name, "kind": "conv" if st.conv else "linear",
                 "rows": int(w.shape[0]), "fan_in": int(w.shape[1]),
                 "flatten": bool(st.flatten), "pool": int(st.pool) if st.pool else None,
                 "input_scale": int(st.scale), "role": st.kind,
                 "weights": save(f"layer{k}_weights.npy", pack_rows(w))}
        if st.conv:
            layer = st.block.layer
            entry.update(kernel=[int(v) for v in layer.kernel_size],
                         padding=[int(v) for v in layer.padding],
                         in_channels=int(layer.in_channels))
        if st.hidden:
            f = st.folded
            entry.update(t=save(f"layer{k}_t.npy", f.t.numpy().astype(np.int64)),
                         direction=save(f"layer{k}_direction.npy",
                                        f.direction.numpy().astype(np.int8)),
                         const=save(f"layer{k}_const.npy", f.const.numpy().astype(np.int8)))
        else:
            entry["scores"] = save(f"layer{k}_scores.npy",
                                   _score_table(st.block.bn, int(w.shape[1])))
        layers.append(entry)
    shutil.copyfile(deploy.__file__, out / "bnn_deploy.py")
    files["bnn_deploy.py"] = _sha(out / "bnn_deploy.py")
    n_classes = layers[-1]["rows"]
    names = [str(c) for c in (class_names or range(n_classes))]
    if len(names) != n_classes:
        raise InvalidArgument(f"{len(names)} class names for {n_classes} classes")
    manifest = {
        "format": FORMAT, "version": 1, "bnn_tol": __version__,
        "model": getattr(model, "config", {}),
        "input": {"shape": in_shape, "dtype": "uint8", "offset": int(cm.input.offset),
                  "scale": int(cm.input.scale), "transform": cm.input.describe()},
        "bit_order": deploy.BIT_ORDER,
        "classes": names, "layers": layers, "sha256": files,
        "memory_bits": int(sum(e["rows"] * e["fan_in"] for e in layers)),
    }
    manifest["manifest_sha256"] = deploy.manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
