"""Fuzz the export bundle (issue 20, "Done when"): mutate manifests and bundle files the way
careless or hostile users do and check that deploy either refuses with one ``DeployError`` line
or predicts what the bundle says -- never another exception, never a file read outside the
bundle directory, never a silent difference.

Mutations (one to three per example, then a hash level):

* files: byte flips, truncation, appended bytes, sparse growth to 1 GiB, arrays re-saved with
  another dtype (object arrays with pickle included), shape or byte order, deletion, renaming
  and swapping, replacement by a symbolic link (out of the bundle to an identical copy or to
  a sentinel, inside the bundle, to ``/dev/zero``), by a directory, or by a sentinel array
  from outside;
* manifest fields: any value replaced by another JSON value (file names such as
  ``../outside/evil.npy``, absolute paths, ``/dev/zero``; edge integers, floats, bools, null,
  lists, objects), deleted, integers nudged, list items duplicated or swapped, keys added;
* manifest text: duplicate keys, ``NaN``, byte flips (written after the hashes);
* hashes: none recomputed, the arrays' ``sha256`` entries recomputed, those and the manifest
  hash recomputed (a deliberate edit), or the manifest hash removed (a bundle of the previous
  release) -- a name pointing outside gets the correct hash of its target.

Oracle: the ``open``/``io.open``/``os.open`` calls of deploy stay inside the bundle (a sentinel
directory beside it holds ``evil.npy`` and ``secret.txt``). A prediction must equal the
original model's unless the edit was deliberate (all hashes recomputed, or the manifest hash
removed), and must always equal an independent reading of the bundle's files by the format's
definition (:func:`reference`, torch conv/matmul on unpacked +-1 weights) -- so an accepted
bundle means what its files say, and an accidental edit is never accepted with a change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _bundle_helpers import IMAGES, canonical_digest, opened_paths, outside
from _helpers import small_bnn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bnn_tol
from bnn_tol import deploy

ARCHS = {"fc": ("fc", {"hidden": (70, 30)}),
         "vgg3": ("vgg3", {"channels": ((8,), (6,)), "fc_width": 20})}


@pytest.fixture(scope="module")
def world():
    """Pristine bundles, their predictions, and a sentinel directory outside them."""
    root = Path(tempfile.mkdtemp(prefix="bnn_fuzz_"))
    bundles, ref = {}, {}
    for name, (arch, kw) in ARCHS.items():
        bundles[name] = bnn_tol.export(small_bnn(arch, kw), root / "pristine" / name)
        ref[name] = deploy.predict(bundles[name], IMAGES)
        assert np.array_equal(reference(bundles[name], IMAGES), ref[name])
    sentinel = root / "outside"
    sentinel.mkdir()
    np.save(sentinel / "evil.npy", np.zeros((70, 1), dtype=np.uint64))
    (sentinel / "secret.txt").write_text("SENTINEL: deploy must never read this\n")
    yield {"root": root, "bundles": bundles, "ref": ref, "sentinel": sentinel}
    shutil.rmtree(root, ignore_errors=True)


# --- the format, read independently -----------------------------------------------------

def reference(b: Path, images: np.ndarray) -> np.ndarray:
    """Predictions of the bundle's files by the format's definition (bundle docstring), in
    torch float64 (exact for these integers): +-1 weights from the documented bit order,
    ``q = p - offset`` into the first layer, folded comparators, max-pooling, the output
    score table, the first maximum."""
    man = json.loads((b / "manifest.json").read_text())
    inp = man["input"]
    offset = inp["offset"] if "offset" in inp else \
        int(re.match(r"q = p - (\d+)", inp["transform"]).group(1))
    x = torch.from_numpy(images.astype(np.int64) - offset).double()
    x = x.reshape(len(images), *inp["shape"])
    for e in man["layers"]:
        w = np.load(b / e["weights"])
        bits = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")[:, :e["fan_in"]]
        wpm = torch.from_numpy(bits.astype(np.float64) * 2 - 1)
        if e["kind"] == "linear":
            a = x.reshape(len(x), -1) @ wpm.T
        else:
            a = F.conv2d(x, wpm.reshape(e["rows"], e["in_channels"], *e["kernel"]),
                         padding=tuple(e["padding"]))
        a = a.round().long()
        if e["role"] == "output":
            table = np.load(b / e["scores"])
            z = table[a.numpy() + e["fan_in"], np.arange(e["rows"])[None, :]]
            return np.argmax(z, axis=1)
        t, d, c = (torch.from_numpy(np.load(b / e[k]).astype(np.int64))
                   for k in ("t", "direction", "const"))
        shape = (1, -1, 1, 1) if a.ndim == 4 else (1, -1)
        t, d, c = t.view(shape), d.view(shape), c.view(shape)
        y = torch.where(d == 0, c > 0, torch.where(d > 0, a >= t, a <= t))
        x = torch.where(y, 1.0, -1.0).double()
        if e["pool"]:
            x = F.max_pool2d(x, e["pool"])
    raise AssertionError("a bundle without an output layer was accepted")


# --- mutations ----------------------------------------------------------------------------

FORMAT_WORDS = ["layer0_weights.npy", "layer1_t.npy", "layer2_scores.npy", "bnn_deploy.py",
                "manifest.json", "../outside/evil.npy", "../outside/secret.txt", "/dev/zero",
                "/etc/hostname", "layer1_t.npy/..", ".", "", "conv", "linear", "first",
                "hidden", "output", "uint8", "bnn_tol.export"]
EDGE_NUMBERS = [0, 1, -1, 2, 3, 7, 8, 20, 30, 64, 70, 128, 255, 256, 2**31, 2**63, 10**30,
                1.0, 70.0, 0.5, -0.0, 1e308]
json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(EDGE_NUMBERS) | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(FORMAT_WORDS)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=4)


def paths(node, prefix=()):
    """Every path into a JSON value (dict keys and list indices), the root excluded."""
    out = []
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += paths(v, (*prefix, k))
    return out


def at(node, path):
    for k in path:
        node = node[k]
    return node


def mutate_file(data, b: Path, sentinel: Path) -> str:
    names = sorted(p.name for p in b.iterdir())
    if not names:
        return "empty"
    name = data.draw(st.sampled_from(names), label="file")
    f = b / name
    if f.is_symlink() or not f.is_file():
        return "skip"
    op = data.draw(st.sampled_from(["flip", "truncate", "append", "grow", "resave", "delete",
                                    "rename", "swap", "link_out", "link_in", "link_dev",
                                    "directory", "evil"]), label="file op")
    raw = f.read_bytes()
    if op == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1), label="offset")
        bit = data.draw(st.integers(0, 7), label="bit")
        f.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:])
    elif op == "truncate":
        f.write_bytes(raw[:data.draw(st.integers(0, max(len(raw) - 1, 0)), label="length")])
    elif op == "append":
        f.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64), label="tail"))
    elif op == "grow":
        with open(f, "r+b") as fh:
            fh.truncate(len(raw) + (1 << 30))  # sparse: costs nothing unless read
    elif op == "resave" and name.endswith(".npy"):
        try:
            a = np.load(f)
        except (ValueError, OSError, EOFError):  # an earlier mutation broke it
            return "skip"
        how = data.draw(st.sampled_from(["uint64", "int64", "int32", "int8", "uint8", "float32",
                                         "float64", ">u8", ">i8", "object", "flat", "column",
                                         "slice", "tile", "fortran", "scalar"]), label="resave")
        if how == "object":
            np.save(f, np.array(list(a.ravel()), dtype=object), allow_pickle=True)
            return op
        b2 = {"flat": lambda: a.ravel(), "column": lambda: a.reshape(-1, 1),
              "slice": lambda: a[:-1], "tile": lambda: np.concatenate([a, a]),
              "fortran": lambda: np.asfortranarray(a),
              "scalar": lambda: a.ravel()[:1].reshape(())}.get(how)
        with np.errstate(invalid="ignore", over="ignore"):
            np.save(f, b2() if b2 else a.astype(how), allow_pickle=False)
    elif op == "delete":
        f.unlink()
    elif op == "rename":
        new = data.draw(st.sampled_from([name + ".bak", name.upper(), "x" + name]),
                        label="new name")
        f.rename(b / new)
    elif op == "swap":
        other = b / data.draw(st.sampled_from(names), label="other")
        if other != f and other.is_file() and not other.is_symlink():
            tmp = b / ".swap"
            f.rename(tmp)
            other.rename(f)
            tmp.rename(other)
    elif op == "link_out":
        copy = sentinel / f"copy_{name}"
        shutil.copyfile(f, copy)  # identical bytes: only the link is wrong
        f.unlink()
        f.symlink_to(data.draw(st.sampled_from([copy, sentinel / "evil.npy",
                                                sentinel / "secret.txt"]), label="target"))
    elif op == "link_in":
        f.rename(b / f"real_{name}")
        f.symlink_to(f"real_{name}")
    elif op == "link_dev":
        f.unlink()
        f.symlink_to("/dev/zero")
    elif op == "directory":
        f.unlink()
        f.mkdir()
    elif op == "evil":
        shutil.copyfile(sentinel / "evil.npy", f)
    return op


def mutate_manifest(data, man, sentinel: Path) -> str:
    ps = paths(man)
    op = data.draw(st.sampled_from(["set", "delete", "nudge", "duplicate", "swap", "add_key",
                                    "file_name", "file_name"]), label="manifest op")
    if op == "file_name":
        if not isinstance(man.get("layers"), list) or not man["layers"]:
            return "skip"
        layer = data.draw(st.integers(0, len(man["layers"]) - 1), label="layer")
        entry = man["layers"][layer]
        fields = [f for f in ("weights", "t", "direction", "const", "scores")
                  if isinstance(entry, dict) and f in entry] or ["weights"]
        field = data.draw(st.sampled_from(fields), label="field")
        name = data.draw(st.sampled_from(["../outside/evil.npy", str(sentinel / "evil.npy"),
                                          "/dev/zero", "/etc/hostname", "layer0_weights.npy",
                                          "./layer0_weights.npy", "manifest.json"]),
                         label="name")
        if isinstance(man["layers"][layer], dict):
            old = man["layers"][layer].get(field)
            man["layers"][layer][field] = name
            if isinstance(man.get("sha256"), dict):
                if data.draw(st.booleans(), label="drop the old digest"):
                    man["sha256"].pop(old, None) if isinstance(old, str) else None
                man["sha256"][name] = "0" * 64  # the hash level fills in the right digest
        return op
    if not ps:
        return "skip"
    path = data.draw(st.sampled_from(ps), label="path")
    parent, key = at(man, path[:-1]), path[-1]
    if op == "set":
        parent[key] = data.draw(json_values, label="value")
    elif op == "delete":
        del parent[key]
    elif op == "nudge" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += data.draw(st.sampled_from([-2, -1, 1, 2, 64]), label="delta")
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(parent[key])))
    elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
        other = data.draw(st.integers(0, len(parent) - 1), label="other")
        parent[key], parent[other] = parent[other], parent[key]
    elif op == "add_key" and isinstance(parent, dict):
        new = data.draw(st.sampled_from(["extra", "offset", "scale", "kernel", "pool", "t",
                                         "manifest_sha256", "arrays"]), label="key")
        parent[new] = data.draw(json_values, label="value")
    return op


def rehash(b: Path, man, level: str) -> None:
    """Recompute the arrays' digests (the targets' true digests, wherever they are) and, at
    level "full", the manifest hash; "strip" removes it (a previous-release bundle)."""
    if level == "none" or not isinstance(man, dict):
        return
    sums = man.get("sha256")
    if isinstance(sums, dict):
        for name in list(sums):
            p = b / str(name) if not os.path.isabs(str(name)) else Path(name)
            try:
                if p.is_file() and p.stat().st_size < (1 << 20):
                    sums[name] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                pass
    if level == "full":
        try:
            man["manifest_sha256"] = canonical_digest(man)
        except (TypeError, ValueError):
            pass
    elif level == "strip":
        man.pop("manifest_sha256", None)


def raw_edit(data, b: Path) -> str:
    f = b / "manifest.json"
    if f.is_symlink() or not f.is_file() or f.stat().st_size > (1 << 20):
        return "skip"
    text = f.read_text(errors="replace")
    op = data.draw(st.sampled_from(["dup_key", "nan", "flip", "compact"]), label="raw op")
    if op == "dup_key" and text.rstrip().endswith("}"):
        text = text.rstrip()[:-1] + ', "version": 1}'
    elif op == "nan":
        text = re.sub(r"(?<=: )-?\d+(?:\.\d+)?", "NaN", text, count=1)
    elif op == "flip" and text:
        i = data.draw(st.integers(0, len(text) - 1), label="offset")
        text = text[:i] + chr((ord(text[i]) ^ 1) % 0x110000 or 1) + text[i + 1:]
    elif op == "compact":
        try:
            text = json.dumps(json.loads(text))
        except ValueError:
            return op
    f.write_text(text, errors="surrogatepass")
    return op


def one_example(world, data) -> None:
    arch = data.draw(st.sampled_from(sorted(world["bundles"])), label="arch")
    work = Path(tempfile.mkdtemp(dir=world["root"]))
    b = work / "bundle"
    shutil.copytree(world["bundles"][arch], b)
    try:
        for _ in range(data.draw(st.integers(0, 2), label="file mutations")):
            mutate_file(data, b, world["sentinel"])
        level = data.draw(st.sampled_from(["none", "arrays", "full", "strip"]), label="hashes")
        mf = b / "manifest.json"
        if mf.is_file() and not mf.is_symlink() and mf.stat().st_size < (1 << 20):
            try:
                man = json.loads(mf.read_text())
            except ValueError:
                man = None
            if isinstance(man, dict):
                for _ in range(data.draw(st.integers(0, 2), label="manifest mutations")):
                    mutate_manifest(data, man, world["sentinel"])
                rehash(b, man, level)
                mf.write_text(json.dumps(man, indent=2))
        if data.draw(st.booleans(), label="raw edit"):
            raw_edit(data, b)
        check(world, arch, b, level)
    finally:
        for p in sorted(work.rglob("*"), reverse=True):  # links and directories too
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        work.rmdir()


def check(world, arch: str, b: Path, level: str) -> None:
    with opened_paths(confine=b) as seen:
        try:
            pred = deploy.predict(b, IMAGES)
        except deploy.DeployError as e:
            pred, msg = None, str(e)
            assert type(e) is deploy.DeployError and msg and "\n" not in msg, repr(msg)
    assert not outside(seen, b), f"deploy opened {outside(seen, b)}"
    if pred is None:
        event("refused")
        return
    same = np.array_equal(pred, world["ref"][arch])
    event(f"accepted, {'same' if same else 'other'} predictions, hashes {level}")
    if level not in ("full", "strip"):  # an accidental edit: nothing may change
        assert same
    assert np.array_equal(pred, reference(b, IMAGES)), "deploy disagrees with the format"


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_bundles_are_refused_in_one_line_or_predict_what_they_say(world, data):
    one_example(world, data)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_deliberate_edits_of_array_data_predict_what_the_files_say(world, data):
    """Bit flips in the data of arrays (not their headers) with every hash recomputed, or with
    the manifest hash removed: a different but well-formed bundle, refused only where a value
    leaves the format (padding bits, direction/const values); otherwise it must predict what
    its files say (:func:`reference`) -- so the accepted half of the fuzz is exercised too.
    With only the arrays' digests recomputed, the stale manifest hash must refuse it."""
    arch = data.draw(st.sampled_from(sorted(world["bundles"])), label="arch")
    work = Path(tempfile.mkdtemp(dir=world["root"]))
    b = work / "bundle"
    shutil.copytree(world["bundles"][arch], b)
    try:
        man = json.loads((b / "manifest.json").read_text())
        arrays = sorted(n for n in man["sha256"] if n.endswith(".npy"))
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            f = b / data.draw(st.sampled_from(arrays), label="file")
            raw = f.read_bytes()
            start = len(raw) - np.load(f).nbytes
            i = data.draw(st.integers(start, len(raw) - 1), label="offset")
            bit = data.draw(st.integers(0, 7), label="bit")
            f.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:])
        level = data.draw(st.sampled_from(["full", "strip", "arrays"]), label="hashes")
        rehash(b, man, level)
        (b / "manifest.json").write_text(json.dumps(man, indent=2))
        check(world, arch, b, level)
    finally:
        shutil.rmtree(work)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_bundles_long_run(world, data):
    one_example(world, data)
