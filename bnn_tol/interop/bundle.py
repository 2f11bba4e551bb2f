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

**Residual BNNs** (:class:`bnn_tol.core.graph.GraphBNN`) are written as graph bundles (format
version 2, ``kind: "graph"``): ``nodes`` (the model's node specs with the files of their
arrays), ``layer{k}_weights.npy`` per binary node ``k`` (in node order; packed as below),
``node{j}_bn.npy`` float32 ``(4, C)`` (weight, bias, running mean, running variance) per
BatchNorm node ``j`` and, where a sign reads ``sign(BN(a))`` of a binary node, that
BatchNorm's folded thresholds ``node{j}_{t,direction,const}.npy`` (see :mod:`bnn_tol.deploy`).
Chain bundles stay version 1, file for file.

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

**Writing.** A bundle is written as a unit (:func:`bnn_tol.files.atomic_dir`): into a new
directory beside ``out``, read back by :func:`bnn_tol.deploy.load_bundle` (every check a
reader makes, listed in :mod:`bnn_tol.deploy`), then renamed over ``out``. A failing export (a
full disk, a read-only directory, an interrupt) leaves the previous bundle as it was, or
nothing; a replaced bundle leaves no file of its predecessor. ``out`` is replaced only if it is
empty or one of our bundles (:func:`check_out`), never a directory holding anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_tol._version import __version__
from bnn_tol.core.compiled import UnsupportedModel, check_bnn, stored_layers
from bnn_tol.core.graph import GraphBNN
from bnn_tol.core.layers import fold_threshold
from bnn_tol.data import grid_of
from bnn_tol.exceptions import BnnTolError, InvalidArgument, ResultsMismatch
from bnn_tol.files import atomic_dir
from bnn_tol.interop import deploy

__all__ = ["export", "pack_rows", "check_out", "check_onnx_out", "is_bnn_tol_onnx",
           "ExportError", "FORMAT", "MANIFEST"]

FORMAT = deploy.FORMAT
MANIFEST = deploy.MANIFEST
#: Names a file of a bundle can have (any layer index): what an export may replace.
BUNDLE_FILE = re.compile(r"manifest\.json|bnn_deploy\.py|"
                         r"layer\d+_(?:weights|t|direction|const|scores)\.npy|"
                         r"node\d+_(?:bn|t|direction|const)\.npy")


class ExportError(BnnTolError, OSError):
    """Writing a bundle (or its ONNX file) failed: a full disk, a read-only directory, ...
    The previous bundle, if any, is unchanged; nothing half-written is left."""


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


def _own_manifest(out: Path) -> dict | None:
    """``out``'s manifest if it is a plain file holding a JSON object of our format, else
    None (missing, a link or directory, too large, not JSON, another format)."""
    p = out / MANIFEST
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size > deploy.MAX_MANIFEST_BYTES:
            return None
        man = json.loads(p.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return man if isinstance(man, dict) and man.get("format") == FORMAT else None


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a bundle directory that :func:`export` may not write.

    Allowed: a path that does not exist, an empty directory, and -- with ``overwrite`` --
    one of our bundles: a directory holding only plain files named as bundle files are
    (:data:`BUNDLE_FILE`) whose ``manifest.json`` says our format, or (an export of an older
    release interrupted before its manifest) only such files and no manifest. Everything
    else is refused, whatever ``overwrite`` says: a symbolic link, a file, a directory with
    any other file, subdirectory or link (export replaces the directory as a whole, so they
    would be deleted), a ``manifest.json`` that is not ours.

    Raises:
        ResultsMismatch: naming what is in the way and what to do (one line).
    """
    out = Path(out)
    if out.is_symlink():
        raise ResultsMismatch(f"{out} is a symbolic link; export replaces --out as a whole: "
                              "give the directory itself or a new path")
    if not out.exists():
        return
    if not out.is_dir():
        raise ResultsMismatch(f"{out} exists and is not a directory; choose another --out")
    try:
        entries = sorted(out.iterdir())
    except OSError as e:
        raise ResultsMismatch(f"{out} cannot be listed ({e.strerror}); choose another --out") \
            from None
    if not entries:
        return
    man = _own_manifest(out)
    foreign = [p.name for p in entries
               if p.is_symlink() or not p.is_file() or not BUNDLE_FILE.fullmatch(p.name)]
    if man is None and (foreign or os.path.lexists(out / MANIFEST)):
        raise ResultsMismatch(f"{out} is not empty and not a bnn_tol export; refusing to write "
                              "into it: choose a new or empty --out")
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ResultsMismatch(f"{out} holds files that are not part of its bundle ({shown}); "
                              "export replaces the directory as a whole and would delete "
                              "them: move them away or choose another --out")
    if not overwrite:
        what = "an export" if man is not None else \
            "an incomplete export (bundle files without manifest.json)"
        raise ResultsMismatch(f"{out} already holds {what}; pass overwrite=True (--overwrite) "
                              "to replace it")


def is_bnn_tol_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ONNX model written by :func:`bnn_tol.interop.onnx.export_onnx`:
    its serialized ``ModelProto`` starts with ``ir_version`` (field 1) and ``producer_name``
    (field 2) ``"bnn_tol"``. Reads 32 bytes; never parses the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError:
        return False
    if head[:1] != b"\x08":
        return False
    i = 1
    while i < len(head) and head[i] >> 7:  # the ir_version varint (continuation bit)
        i += 1
    name = b"bnn_tol"
    return head[i + 1:i + 3 + len(name)] == bytes([0x12, len(name)]) + name


def check_onnx_out(path: str | os.PathLike, *, out: str | os.PathLike,
                   reads: Sequence[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Refuse an ONNX output path (``bnn-tol export --onnx``) that would lose data.

    Refused, whatever ``overwrite`` says: the path (after resolving links) is, or is inside,
    the bundle directory ``out`` (export replaces it as a whole), or is one of the files
    ``reads`` the command reads (the checkpoint's ``config.json`` and ``model.safetensors``;
    also through a link or a hard link), or is a symbolic link, or is an existing file that is
    not an ONNX graph written by bnn_tol (:func:`is_bnn_tol_onnx`). An ONNX graph of ours is
    replaced only with ``overwrite``.

    Raises:
        ResultsMismatch: naming ``--onnx`` and why (one line).
    """
    path = Path(path)
    real = Path(os.path.realpath(path))
    bundle = Path(os.path.realpath(out))
    if real == bundle or bundle in real.parents:
        raise ResultsMismatch(f"--onnx {path} is inside the bundle directory {out}, which "
                              "export replaces as a whole: write the ONNX file beside it")
    for r in reads:
        same = real == Path(os.path.realpath(r))
        try:
            same = same or (path.exists() and os.path.samefile(path, r))
        except OSError:
            pass
        if same:
            raise ResultsMismatch(f"--onnx {path} is {r}, which this command reads; choose "
                                  "another --onnx")
    if path.is_symlink():
        raise ResultsMismatch(f"--onnx {path} is a symbolic link; give a plain file path")
    if path.exists():
        if not path.is_file():
            raise ResultsMismatch(f"--onnx {path} exists and is not a file")
        if not is_bnn_tol_onnx(path):
            raise ResultsMismatch(f"--onnx {path} exists and is not an ONNX graph written by "
                                  "bnn_tol; refusing to replace it: choose another --onnx")
        if not overwrite:
            raise ResultsMismatch(f"--onnx {path} exists; pass --overwrite to replace it")
    return path


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


def _write(model: nn.Module, cm, out: Path, names: list[str]) -> None:
    """The bundle's files in the (new, empty) directory ``out``, the manifest last."""
    files: dict[str, str] = {}
    layers = []

    def save(name: str, arr: np.ndarray) -> str:
        np.save(out / name, arr, allow_pickle=False)
        files[name] = _sha(out / name)
        return name

    for st in cm.stages:
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
    shutil.copyfile(deploy.__file__, out / deploy.READER)
    files[deploy.READER] = _sha(out / deploy.READER)
    manifest = {
        "format": FORMAT, "version": deploy.VERSION, "bnn_tol": __version__,
        "model": getattr(model, "config", {}),
        "input": {"shape": [int(v) for v in model.in_shape], "dtype": "uint8",
                  **cm.input.config(), "transform": cm.input.describe()},
        "bit_order": deploy.BIT_ORDER,
        "classes": names, "layers": layers, "sha256": files,
        "memory_bits": int(sum(e["rows"] * e["fan_in"] for e in layers)),
    }
    manifest["manifest_sha256"] = deploy.manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _graph_nodes(model: GraphBNN) -> list[dict]:
    """The manifest's node entries of a graph (its node specs, binary nodes numbered with the
    files of their packed weights, BatchNorms with their parameters and -- where a sign reads
    ``sign(BN(a))`` of a binary node ``a`` -- their folded thresholds), checked by the reader's
    own rules; refusals as :class:`UnsupportedModel`."""
    layers = stored_layers(model)
    folded = {u["bn"] for u in model.units() if u["input"] == u["layer"]}
    out, k = [], 0
    for j, node in enumerate(model.nodes):
        e, name = dict(node), node["name"]
        if node["op"] == "binary":
            if not layers[f"ops.{name}"].codec.is_sign:
                raise UnsupportedModel(f"export needs sign (1-bit) weights; graph node {name} "
                                       "stores fixed-point weights")
            e.update(index=k, weights=f"layer{k}_weights.npy")
            k += 1
        elif node["op"] == "bn":
            if model.ops[name].running_mean is None:
                raise UnsupportedModel(f"export: graph node {name}: its BatchNorm has no running "
                                       "statistics (track_running_stats=False)")
            e["params"] = f"node{j}_bn.npy"
            if name in folded:
                e.update({f: f"node{j}_{f}.npy" for f in ("t", "direction", "const")})
        out.append(e)
    return out


def _graph_manifest(model: GraphBNN, names: list[str]) -> dict:
    """The manifest of a graph bundle (format version 2) but its checksums, checked by the
    reader's rules (:func:`bnn_tol.deploy.check_graph`; a refusal is an
    :class:`UnsupportedModel` naming the node)."""
    grid = grid_of(model)
    man = {
        "format": FORMAT, "version": deploy.GRAPH_VERSION, "kind": "graph",
        "bnn_tol": __version__, "model": getattr(model, "config", {}),
        "input": {"shape": [int(v) for v in model.in_shape], "dtype": "uint8",
                  **grid.config(), "transform": grid.describe()},
        "bit_order": deploy.BIT_ORDER, "classes": names, "nodes": _graph_nodes(model),
        "memory_bits": int(sum(layer.n_stored_bits for layer in stored_layers(model).values())),
    }
    try:
        deploy.check_graph(man, "export")
    except deploy.DeployError as e:
        raise UnsupportedModel(str(e)) from None
    return man


def _write_graph(model: GraphBNN, man: dict, out: Path) -> None:
    """The files of the graph bundle ``man`` in the new, empty directory ``out``, the
    manifest last (with the checksums and its own hash)."""
    files: dict[str, str] = {}

    def save(name: str, arr: np.ndarray) -> None:
        np.save(out / name, arr, allow_pickle=False)
        files[name] = _sha(out / name)

    image = {"x"}  # nodes holding the image's integers q (pooled, flattened)
    on_grid = set()  # binary nodes reading them: pre-activations k / scale
    for e in man["nodes"]:
        name, src = e["name"], e["inputs"][0]
        if e["op"] in ("pool", "flatten") and src in image:
            image.add(name)
        elif e["op"] == "binary":
            if src in image:
                on_grid.add(name)
            w = model.ops[name].weight.detach()
            save(e["weights"], pack_rows(w.reshape(w.shape[0], -1).cpu().numpy() >= 0))
        elif e["op"] == "bn":
            bn = model.ops[name]
            c = bn.num_features
            rows = [bn.weight if bn.affine else torch.ones(c),
                    bn.bias if bn.affine else torch.zeros(c), bn.running_mean, bn.running_var]
            save(e["params"], torch.stack([r.detach().cpu().float() for r in rows]).numpy())
            if "t" in e:  # sign(BN(a)) of binary node src: on the grid k = scale a
                f = fold_threshold(bn, scale=man["input"]["scale"] if src in on_grid else 1)
                save(e["t"], f.t.numpy().astype(np.int64))
                save(e["direction"], f.direction.numpy().astype(np.int8))
                save(e["const"], f.const.numpy().astype(np.int8))
    shutil.copyfile(deploy.__file__, out / deploy.READER)
    files[deploy.READER] = _sha(out / deploy.READER)
    man = {**man, "sha256": files}
    man["manifest_sha256"] = deploy.manifest_digest(man)
    (out / MANIFEST).write_text(json.dumps(man, indent=2))


def export(model: nn.Module, out: str | os.PathLike, *, class_names: Sequence | None = None,
           overwrite: bool = False) -> Path:
    """Write ``model`` (a BNN: sign weights and activations) as a deployable bundle.

    The bundle is written into a new directory beside ``out``, read back with
    :func:`bnn_tol.deploy.load_bundle` (so it passes every check a reader makes), and only
    then renamed over ``out``: a failure leaves the previous bundle (or nothing), never half
    of one, and a replaced bundle leaves no file of the old one behind.

    Args:
        model: a :class:`~bnn_tol.models.BNN`, or a residual
            :class:`~bnn_tol.core.graph.GraphBNN` (written as a graph bundle, version 2).
        out: a new or empty directory, or -- with ``overwrite`` -- one of our bundles (see
            :func:`check_out`; a directory holding anything else is never replaced).
        class_names: names of the output classes (default ``"0".."C-1"``).

    Returns:
        The bundle directory.

    Raises:
        UnsupportedModel: m-bit weights, ReLU blocks, a block layout the integer arithmetic
            cannot express (stride/groups/bias), or a single-block model; for a graph, a
            binary node reading real values, a BatchNorm without running statistics, or any
            other node the graph format refuses (naming the node).
        InvalidArgument: class names that do not match the classes.
        ResultsMismatch: ``out`` holds something else, or an export without ``overwrite``.
        ExportError: writing failed (disk full, read-only, ...); ``out`` is unchanged.
    """
    graph = isinstance(model, GraphBNN)
    if graph:
        n_classes = int(model.config["kwargs"]["n_classes"])
    else:
        cm = check_bnn(model, what="export", need_integer=True)
        if len(cm.stages) < 2:
            raise UnsupportedModel("export needs at least one hidden block before the output "
                                   "block")
        n_classes = int(cm.stages[-1].wb.shape[0])
    names = [str(c) for c in (range(n_classes) if class_names is None else class_names)]
    if len(names) != n_classes:
        raise InvalidArgument(f"{len(names)} class names for {n_classes} classes")
    man = _graph_manifest(model, names) if graph else None
    out = Path(out)
    check_out(out, overwrite)
    existed = out.exists()
    try:
        with atomic_dir(out) as tmp:
            if man is not None:
                _write_graph(model, man, tmp)
            else:
                _write(model, cm, tmp, names)
            deploy.load_bundle(tmp)
    except deploy.DeployError as e:
        raise ExportError(f"export wrote a bundle that deploy refuses, a bug in bnn_tol "
                          f"({e}); {out} is unchanged") from e
    except OSError as e:
        if isinstance(e, BnnTolError):
            raise
        what = "the previous bundle is unchanged" if existed else "nothing was written"
        raise ExportError(f"writing the bundle {out} failed ({e.strerror or e}); {what}") \
            from e
    return out
