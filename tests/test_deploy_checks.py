"""deploy reads only what the bundle format defines and refuses everything else with one line
(issue 20, items 6, 11, 12, 14): file names from the format, plain files inside the bundle,
sizes before reading, a hashed manifest whose every field is checked against the arrays, and
validated arguments."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from _bundle_helpers import (
    IMAGES,
    canonical_digest,
    manifest,
    opened_paths,
    outside,
    put_array,
    sha,
    write_manifest,
)
from _helpers import small_bnn

import bnn_tol
from bnn_tol import deploy, errors
from bnn_tol.exceptions import InvalidArgument

FC = ("fc", {"hidden": (70, 30)})
VGG = ("vgg3", {"channels": ((8,), (6,)), "fc_width": 20})


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, (arch, kw) in {"fc": FC, "vgg3": VGG}.items():
        model = small_bnn(arch, kw)
        out[name] = (model, bnn_tol.export(model, root / name))
    return out


@pytest.fixture
def fc(made, tmp_path):
    """A fresh copy of the fc bundle (layers 64 -> 70 -> 30 -> 10) to edit."""
    b = tmp_path / "bundle"
    shutil.copytree(made["fc"][1], b)
    return b


@pytest.fixture
def vgg(made, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(made["vgg3"][1], b)
    return b


@pytest.fixture(scope="module")
def ref(made):
    return {k: deploy.predict(b, IMAGES) for k, (_, b) in made.items()}


def refused(b, match=None, x=IMAGES, **kw) -> str:
    """deploy.predict raises DeployError with one line (matching ``match``), opening nothing
    outside the bundle directory ``b`` (but the flip mask file a test passes)."""
    confine = b if isinstance(b, Path) and b.is_dir() and "flip_mask" not in kw else None
    with pytest.raises(deploy.DeployError, match=match) as e, opened_paths(confine):
        deploy.predict(b, x, **kw)
    msg = str(e.value)
    assert type(e.value) is deploy.DeployError and msg and "\n" not in msg, repr(msg)
    return msg


# --- item 6: file names, plain files, sizes -----------------------------------------------

def test_manifest_file_names_outside_the_format_are_refused_and_never_opened(made, tmp_path):
    evil_dir = tmp_path / "outside"
    evil_dir.mkdir()
    w = np.load(made["fc"][1] / "layer0_weights.npy")
    np.save(evil_dir / "evil.npy", np.zeros_like(w))  # all -1 weights: would change predictions
    names = ["../outside/evil.npy", str(evil_dir / "evil.npy"), "/dev/zero",
             "layer0_weights.npy/../../outside/evil.npy", "LAYER0_weights.npy",
             "layer00_weights.npy", "./layer0_weights.npy"]
    if os.path.isfile("/etc/hostname"):
        names.append("/etc/hostname")
    for name in names:
        fc = tmp_path / "bundle"
        shutil.rmtree(fc, ignore_errors=True)
        shutil.copytree(made["fc"][1], fc)
        man = manifest(fc)
        man["sha256"].pop(man["layers"][0]["weights"])
        man["layers"][0]["weights"] = name
        target = fc / name
        man["sha256"][name] = sha(target) if target.is_file() else "0" * 64
        write_manifest(fc, man)
        with opened_paths() as seen:
            refused(fc, "layer0")
        assert not outside(seen, fc), (name, outside(seen, fc))


def test_a_hash_entry_for_a_file_the_format_does_not_define_is_refused(fc, tmp_path):
    (tmp_path / "x.txt").write_text("secret")
    man = manifest(fc)
    man["sha256"]["../x.txt"] = sha(tmp_path / "x.txt")
    write_manifest(fc, man)
    with opened_paths() as seen:
        refused(fc, "x.txt")
    assert not outside(seen, fc)


def test_symlinks_out_of_the_bundle_are_refused_even_with_the_right_content(fc, tmp_path):
    copy = tmp_path / "copy.npy"
    shutil.copyfile(fc / "layer1_t.npy", copy)  # identical bytes: its sha256 matches
    (fc / "layer1_t.npy").unlink()
    (fc / "layer1_t.npy").symlink_to(copy)
    with opened_paths() as seen:
        refused(fc, "layer1_t.npy.*plain file")
    assert not outside(seen, fc)
    (fc / "layer1_t.npy").unlink()
    (fc / "layer1_t.npy").symlink_to("/dev/zero")
    refused(fc, "plain file")
    (fc / "layer1_t.npy").unlink()
    shutil.copyfile(copy, fc / "layer1_t.real")
    (fc / "layer1_t.npy").symlink_to("layer1_t.real")  # a link inside the bundle: still no
    refused(fc, "plain file")


def test_a_symlinked_manifest_is_refused(fc, tmp_path):
    shutil.move(fc / "manifest.json", tmp_path / "manifest.json")
    (fc / "manifest.json").symlink_to(tmp_path / "manifest.json")
    refused(fc, "manifest.json.*plain file")


def test_directories_and_fifos_named_like_bundle_files_are_refused(fc):
    (fc / "layer2_scores.npy").unlink()
    (fc / "layer2_scores.npy").mkdir()
    refused(fc, "layer2_scores.npy")
    (fc / "layer2_scores.npy").rmdir()
    os.mkfifo(fc / "layer2_scores.npy")

    def give_up(*_):
        raise TimeoutError("deploy blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(5)
    try:
        refused(fc, "layer2_scores.npy.*plain file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_file_sizes_are_checked_before_reading(fc):
    with open(fc / "layer1_t.npy", "r+b") as fh:
        fh.truncate(1 << 30)  # a sparse 1 GiB file: reading it first would take a while
    t0 = time.monotonic()
    refused(fc, "layer1_t.npy.*bytes")
    assert time.monotonic() - t0 < 1.0
    with open(fc / "manifest.json", "r+b") as fh:
        fh.truncate(1 << 30)
    t0 = time.monotonic()
    refused(fc, "manifest.json.*bytes")
    assert time.monotonic() - t0 < 1.0


def test_declared_shapes_are_bounded_by_the_files_not_allocated(fc):
    man = manifest(fc)
    man["layers"][1]["rows"] = 10**12  # and the next layer's fan_in with it
    man["layers"][2]["fan_in"] = 10**12
    write_manifest(fc, man)
    t0 = time.monotonic()
    refused(fc)
    assert time.monotonic() - t0 < 1.0


# --- item 11: the manifest is hashed and every field is checked against the arrays -------

def test_export_writes_the_manifest_hash_over_the_canonical_form(fc, ref):
    man = manifest(fc)
    assert man["manifest_sha256"] == canonical_digest(man)
    # formatting is not content: the same manifest compact and with keys reversed still loads
    (fc / "manifest.json").write_text(json.dumps(dict(reversed(list(man.items())))))
    assert np.array_equal(deploy.predict(fc, IMAGES), ref["fc"])


def test_an_edited_manifest_without_a_new_hash_is_refused(fc):
    man = manifest(fc)
    man["layers"][1]["fan_in"] = 60  # the 32 -> 20: 21.8 % agreement, no error
    write_manifest(fc, man, rehash=False)
    refused(fc, "manifest_sha256")
    for bad in (None, "0" * 64, 5, "abc"):
        man = manifest(fc)
        man["layers"][1]["fan_in"] = 70
        man["manifest_sha256"] = bad
        write_manifest(fc, man, rehash=False)
        refused(fc, "manifest_sha256")


@pytest.mark.parametrize("field", ["fan_in", "rows"])
@pytest.mark.parametrize("rehash", [True, False])
def test_edited_geometry_is_refused_with_or_without_a_recomputed_hash(fc, field, rehash):
    man = manifest(fc)
    if not rehash:
        del man["manifest_sha256"]  # a bundle of the previous release: no hash to catch it
    man["layers"][1][field] = 60
    write_manifest(fc, man, rehash=rehash)
    refused(fc, "layer[12]: fan_in")  # rows 60 is caught at the next layer's fan_in


def test_float64_thresholds_with_recomputed_hashes_are_refused(fc):
    man = manifest(fc)
    put_array(fc, man, "layer1_t.npy", np.load(fc / "layer1_t.npy").astype(np.float64))
    write_manifest(fc, man)
    refused(fc, "layer1_t.npy.*int64")


@pytest.mark.parametrize(("name", "change"), [
    ("layer0_weights.npy", lambda a: a.astype(np.int64)),
    ("layer0_weights.npy", lambda a: a[:-1]),
    ("layer1_weights.npy", lambda a: np.asfortranarray(a)),
    ("layer0_weights.npy", lambda a: a.astype(">u8")),
    ("layer1_direction.npy", lambda a: a.astype(np.int64)),
    ("layer1_const.npy", lambda a: a.astype(np.uint8)),
    ("layer1_t.npy", lambda a: a[:, None]),
    ("layer2_scores.npy", lambda a: a.astype(np.float64)),
    ("layer2_scores.npy", lambda a: a[:-1]),
])
def test_arrays_of_the_wrong_dtype_shape_or_order_are_refused(fc, name, change):
    man = manifest(fc)
    put_array(fc, man, name, change(np.load(fc / name)))
    write_manifest(fc, man)
    refused(fc, name.split("_")[0])


def test_a_truncated_array_with_recomputed_hashes_is_refused(fc):
    raw = (fc / "layer1_weights.npy").read_bytes()
    (fc / "layer1_weights.npy").write_bytes(raw[:-8])
    man = manifest(fc)
    man["sha256"]["layer1_weights.npy"] = sha(fc / "layer1_weights.npy")
    write_manifest(fc, man)
    refused(fc, "layer1_weights.npy")


@pytest.mark.parametrize("offset", [8, 10, 11, 20, 60, 127])
def test_a_broken_npy_header_with_recomputed_hashes_is_refused(fc, offset):
    """Found by the fuzz: a flipped header byte made numpy's header parser raise
    tokenize.TokenError (offset 10, the opening brace)."""
    raw = bytearray((fc / "layer0_const.npy").read_bytes())
    raw[offset] ^= 1
    (fc / "layer0_const.npy").write_bytes(bytes(raw))
    man = manifest(fc)
    man["sha256"]["layer0_const.npy"] = sha(fc / "layer0_const.npy")
    write_manifest(fc, man)
    refused(fc, "layer0_const.npy")


def test_array_values_outside_the_format_are_refused(made, fc):
    man = manifest(fc)
    w = np.load(fc / "layer1_weights.npy")  # fan_in 70: bits 6..63 of word 1 are padding
    w[0, 1] |= np.uint64(1 << 40)
    put_array(fc, man, "layer1_weights.npy", w)
    write_manifest(fc, man)
    refused(fc, "layer1_weights.npy.*padding")
    for name, edit in (("layer1_direction.npy", lambda a: np.where(a == 1, 2, a)),
                       ("layer0_const.npy", lambda a: np.zeros_like(a)),  # dead neuron 1
                       ("layer1_const.npy", lambda a: np.ones_like(a))):
        shutil.rmtree(fc)
        shutil.copytree(made["fc"][1], fc)
        man = manifest(fc)
        put_array(fc, man, name, edit(np.load(fc / name)).astype(np.int8))
        write_manifest(fc, man)
        refused(fc, name)


@pytest.mark.parametrize(("path", "value"), [
    (("layers", 1, "kind"), "conv"),
    (("layers", 1, "role"), "output"),
    (("layers", 2, "role"), "hidden"),
    (("layers", 0, "role"), "hidden"),
    (("layers", 1, "index"), 7),
    (("layers", 1, "input_scale"), 2),
    (("layers", 1, "pool"), 2),
    (("layers", 0, "flatten"), False),
    (("layers", 1, "fan_in"), 70.0),
    (("layers", 1, "fan_in"), True),
    (("layers", 1, "weights"), "layer1_t.npy"),
    (("input", "shape"), [1, 4, 16]),
    (("input", "shape"), [1, 8]),
    (("input", "dtype"), "float32"),
    (("input", "offset"), 300),
    (("input", "scale"), 64),
    (("input", "transform"), "q = p - 100 (int); the float model sees (p - 100) / 100"),
    (("classes",), ["a", "b"]),
    (("memory_bits",), 12),
    (("bit_order",), "MSB first"),
    (("format",), "bnn_tol.exporT"),
    (("version",), 2),
    (("extra",), 1),
])
def test_every_field_is_checked_against_the_arrays(fc, path, value):
    man = manifest(fc)
    node = man
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    write_manifest(fc, man)
    refused(fc)


def test_a_vgg_bundle_with_edited_geometry_is_refused(made, vgg):
    edits = [(("layers", 1, "padding"), [0, 0]), (("layers", 1, "kernel"), [3, 1]),
             (("layers", 1, "in_channels"), 2), (("layers", 1, "pool"), None),
             (("layers", 1, "flatten"), True), (("layers", 0, "pool"), 3),
             (("layers", 2, "kind"), "conv"), (("input", "shape"), [8, 8])]
    for path, value in edits:
        shutil.rmtree(vgg)
        shutil.copytree(made["vgg3"][1], vgg)
        man = manifest(vgg)
        node = man
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        write_manifest(vgg, man)
        refused(vgg, "layer[0-3]")  # at the edited layer or where its output no longer fits
    shutil.rmtree(vgg)
    shutil.copytree(made["vgg3"][1], vgg)
    man = manifest(vgg)
    man["input"]["shape"] = [1, 4, 16]  # same size, other spatial layout: same fan-ins later
    write_manifest(vgg, man)
    refused(vgg, "inputs must be")  # the images are 1 x 8 x 8


@pytest.mark.parametrize("man", [[], [1, 2], "x", None, 5])
def test_a_manifest_that_is_not_a_json_object_is_refused(fc, man):
    write_manifest(fc, man, rehash=False)
    refused(fc, "manifest")


def test_malformed_json_is_refused(fc):
    (fc / "manifest.json").write_text('{"format": "bnn_tol.export", ')
    refused(fc, "manifest.json")


def test_duplicate_keys_are_refused(fc):
    man = manifest(fc)
    text = json.dumps(man)
    (fc / "manifest.json").write_text(text[:-1] + ', "version": 1}')
    refused(fc, "duplicate")
    (fc / "manifest.json").write_text('[' * 100000 + ']' * 100000)
    refused(fc, "manifest")
    (fc / "manifest.json").write_bytes(b"\xff\xfe{}")
    refused(fc, "manifest")
    (fc / "manifest.json").write_text('{"version": NaN}')
    refused(fc, "manifest")


@pytest.mark.parametrize("case", ["no sha256", "null sha256", "list sha256", "no layer hash",
                                  "null layer hash", "no reader hash", "upper-case hash",
                                  "no layers", "empty layers", "layer is a list",
                                  "missing field", "no input"])
def test_malformed_manifests_give_one_line(fc, case):
    man = manifest(fc)
    if case == "no sha256":
        del man["sha256"]
    elif case == "null sha256":
        man["sha256"] = None
    elif case == "list sha256":
        man["sha256"] = list(man["sha256"])
    elif case == "no layer hash":
        del man["sha256"]["layer1_t.npy"]
    elif case == "null layer hash":
        man["sha256"]["layer1_t.npy"] = None
    elif case == "no reader hash":
        del man["sha256"]["bnn_deploy.py"]
    elif case == "upper-case hash":
        man["sha256"]["layer1_t.npy"] = man["sha256"]["layer1_t.npy"].upper()
    elif case == "no layers":
        del man["layers"]
    elif case == "empty layers":
        man["layers"] = []
    elif case == "layer is a list":
        man["layers"][1] = list(man["layers"][1].values())
    elif case == "missing field":
        del man["layers"][1]["direction"]
    elif case == "no input":
        del man["input"]
    write_manifest(fc, man)
    refused(fc)


def test_missing_bundle_files_and_bad_bundle_arguments_give_one_line(fc, tmp_path):
    (fc / "layer1_t.npy").unlink()
    refused(fc, "layer1_t.npy")
    refused(tmp_path / "nope", "not a bnn_tol export")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "not a bnn_tol export")
    for bad in (5, None, ["x"], {"format": "bnn_tol.export"}):
        refused(bad)


# --- old bundles: no manifest hash, input grid in words ----------------------------------

def test_bundles_of_the_previous_release_still_load(fc, ref):
    man = manifest(fc)
    del man["manifest_sha256"], man["input"]["offset"], man["input"]["scale"]
    write_manifest(fc, man, rehash=False)
    assert np.array_equal(deploy.predict(fc, IMAGES), ref["fc"])
    man["layers"][1]["fan_in"] = 60  # their fields are still checked
    write_manifest(fc, man, rehash=False)
    refused(fc, "layer1")


# --- items 12 and 14: arguments of predict ------------------------------------------------

@pytest.mark.parametrize("bs", [-1, 0, 1.5, 2.0, True, "10", None])
def test_batch_size_must_be_an_int_of_at_least_one(fc, bs):
    refused(fc, "batch_size", batch_size=bs)


def test_every_batch_size_gives_the_same_predictions(fc, ref):
    for bs in (1, 7, 64, 10**9, np.int64(5)):
        assert np.array_equal(deploy.predict(fc, IMAGES, batch_size=bs), ref["fc"])


@pytest.mark.parametrize("seed", [1.7, True, "abc", -1, None, [1]])
def test_seed_is_refused_exactly_as_errors_inject_refuses_it(made, fc, seed):
    model = made["fc"][0]
    with pytest.raises(InvalidArgument) as want:
        with errors.inject(model, 0.05, seed=seed):
            pass
    msg = refused(fc, ber=0.05, seed=seed)
    if seed is not None:
        assert msg == str(want.value)


def test_an_integral_float_seed_is_accepted_as_errors_inject_accepts_it(fc):
    assert np.array_equal(deploy.predict(fc, IMAGES, ber=0.05, seed=2.0),
                          deploy.predict(fc, IMAGES, ber=0.05, seed=2))


@pytest.mark.parametrize("ber", [1.5, -0.1, float("nan"), "0.1", (0.1,), (0.1, 2.0), True])
def test_ber_is_refused_exactly_as_errors_inject_refuses_it(made, fc, ber):
    with pytest.raises(InvalidArgument) as want:
        with errors.inject(made["fc"][0], ber, seed=0):
            pass
    assert refused(fc, ber=ber, seed=0) == str(want.value)


def test_seed_or_error_without_ber_and_unknown_error_models_are_refused(fc):
    refused(fc, "ber", seed=3)
    refused(fc, "ber", error="stuck-at")
    refused(fc, "error model", ber=0.1, seed=0, error="nope")


def test_flip_masks_must_be_a_dict_of_uint64_arrays_or_an_npz(fc, tmp_path):
    w0 = np.load(fc / "layer0_weights.npy")
    np.save(tmp_path / "m.npy", np.zeros_like(w0))
    np.savez(tmp_path / "ok.npz", layer0=np.zeros_like(w0))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.savez(tmp_path / "pickled.npz", layer0=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "wrongkey.npz", evil=np.zeros_like(w0))
    for mask in (tmp_path / "m.npy", [np.zeros_like(w0)], np.zeros_like(w0),
                 tmp_path / "missing.npz", tmp_path, tmp_path / "bad.npz",
                 tmp_path / "pickled.npz", tmp_path / "wrongkey.npz", str(tmp_path / "m.npy"),
                 {"layer0": w0.astype(np.int64)}, {"layer0": w0.tolist()}, {0: w0}, 5, "x"):
        refused(fc, "flip mask|flip_mask", flip_mask=mask)
    assert np.array_equal(deploy.predict(fc, IMAGES, flip_mask=tmp_path / "ok.npz"),
                          deploy.predict(fc, IMAGES))


def test_an_npz_mask_bomb_is_refused_before_decompressing(fc, tmp_path):
    big = np.zeros((1 << 27,), dtype=np.uint64)  # 1 GiB of zeros, ~1 MB compressed
    np.savez_compressed(tmp_path / "bomb.npz", layer0=big)
    del big
    t0 = time.monotonic()
    refused(fc, "flip mask", flip_mask=tmp_path / "bomb.npz")
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("x", ["abc", [], [[]], np.zeros((0, 5)), np.zeros((3, 5), np.uint8),
                               np.zeros((3, 1, 4, 16), np.uint8), np.full((2, 64), 300.0),
                               np.full((2, 64), np.nan), np.zeros((2, 64), bool),
                               np.zeros((2, 64), complex), np.array([["a"] * 64]),
                               np.zeros((2, 64), object), [[1, 2], [3]], 7, None])
def test_bad_inputs_give_one_line(fc, x):
    refused(fc, "input", x=x)


def test_an_empty_batch_of_the_right_shape_gives_no_predictions(fc):
    for x in (np.zeros((0, 1, 8, 8), np.uint8), np.zeros((0, 64))):
        out = deploy.predict(fc, x)
        assert out.shape == (0,) and out.dtype == np.int64


def test_inputs_flat_or_shaped_give_the_same_predictions(fc, ref):
    for x in (IMAGES.reshape(64, 64), IMAGES.reshape(64, 8, 8), IMAGES / 255.0):
        assert np.array_equal(deploy.predict(fc, x), ref["fc"])


def test_a_loaded_bundle_dict_is_checked_too(fc, ref):
    b = deploy.load_bundle(fc)
    assert np.array_equal(deploy.predict(b, IMAGES), ref["fc"])
    b["layers"][1]["fan_in"] = 60
    refused(b)
    b = deploy.load_bundle(fc)
    b["arrays"]["layer1_t.npy"] = b["arrays"]["layer1_t.npy"].astype(np.float64)
    refused(b, "layer1_t.npy")
    b = deploy.load_bundle(fc)
    del b["arrays"]
    refused(b)


def test_deploy_error_is_always_one_line():
    e = deploy.DeployError("a\nb   c\t d")
    assert str(e) == "a b c d"


@pytest.mark.parametrize("levels, transform, needle", [
    ([0] * 255, None, "input.levels must list 256 integers"),
    ([0.5] * 256, None, "input.levels must list 256 integers"),
    ([2**15] * 256, None, "input.levels must list 256 integers"),
    ("0" * 256, None, "input.levels must list 256 integers"),
    ([0] * 256, "q = p - 128 (int); the float model sees (p - 128) / 128",
     "does not say q = levels"),
])
def test_hostile_input_levels_are_refused_in_one_line(fc, levels, transform, needle):
    man = manifest(fc)
    man["input"]["levels"] = levels
    man["input"]["transform"] = transform or "q = levels[p] (int, an input quantizer)"
    write_manifest(fc, man)
    refused(fc, needle)


def test_input_levels_in_a_bundle_are_what_deploy_computes_with(tmp_path):
    """A model on a quantizer grid (``q = levels[p]``) deploys with the same predictions."""
    import torch

    from bnn_tol.data import InputGrid

    model = small_bnn(*FC)
    model.input_grid = InputGrid.from_levels([(p * 3) // 4 - 96 for p in range(256)], 128)
    b = bnn_tol.export(model, tmp_path / "q")
    assert manifest(b)["input"]["levels"] == list(model.input_grid.levels)
    x = torch.from_numpy(IMAGES)
    with torch.no_grad():
        want = model(model.input_grid.to_float(x)).argmax(1).numpy()
    assert np.array_equal(deploy.predict(b, IMAGES), want)
