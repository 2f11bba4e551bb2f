"""Residual BNNs (graphs) export and deploy like every other family: a binary ResNet
(BinaryNet.pytorch ``resnet_binary``, untraceable) and a Bi-Real-Net, calibrated on real
Fashion-MNIST and adapted, export to a graph bundle (format version 2) whose numpy deploy predicts
what the model predicts, clean, under flip masks and under the library's fault maps; a graph on the
library's own input grid covers folded first-layer thresholds, gamma < 0 and dead neurons; hostile
graph manifests are refused in one line; chain bundles of the previous release still load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import _public_bnns as P
import numpy as np
import pytest
import torch
from _bundle_helpers import IMAGES, manifest, put_array, write_manifest
from _helpers import bn_node, conv_node, random_graph, small_bnn
from click.testing import CliRunner

import bnn_tol
from bnn_tol import data, errors, evaluate, models
from bnn_tol.cli import main
from bnn_tol.core.compiled import UnsupportedModel, stored_layers
from bnn_tol.data import BNNDataset, Normalize, grid_of
from bnn_tol.interop import deploy
from bnn_tol.interop.bundle import pack_rows

#: float32 unit roundoff.
U = 2.0 ** -24
OLD_CHAIN = Path(__file__).parent / "data" / "chain_bundle_v1"
FAMILIES = {"Bi-Real-Net": P.BiRealNet, "resnet_binary": P.BinaryResNet}


@pytest.fixture(scope="module")
def fmnist():
    return P.fashion_mnist(1024, 600)


@pytest.fixture(scope="module")
def residual(fmnist, tmp_path_factory):
    """Per family: the adapted graph (seeded weights, BatchNorms calibrated on 1024 real
    images, as tests/test_adapt_public.py does) and its bundle."""
    train, test = fmnist
    tf = Normalize(0.5, 0.5)
    root = tmp_path_factory.mktemp("graph_bundles")
    out = {}
    for name, make in FAMILIES.items():
        user = P.calibrate(make(), tf.to_float(train.images[:1024]))
        model = bnn_tol.adapt(user, tf.to_float(test.images[:128]), transform=tf)
        out[name] = (model, bnn_tol.export(model, root / name))
    return out


def _torch_scores(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(grid_of(model).to_float(images))


def _score_tolerance(model, images: torch.Tensor) -> np.ndarray:
    """Bound on |deploy - torch| of the scores when the last node is a BatchNorm: both compute
    ``y = x alpha + beta`` with ``alpha = w / sqrt(var + eps)`` and ``beta = b - mean alpha``
    from the same exact input ``x`` (an integer pre-activation) in float32, each either fused
    (one rounding) or not (two); they differ by at most ``u (|x alpha| + |mean alpha| + 2|beta|
    + 2|y|)`` to first order, ``u = 2^-24``: twice that is the tolerance."""
    last = model.nodes[-1]
    assert last["op"] == "bn"
    bn = model.ops[last["name"]]
    with torch.no_grad():
        y, got = model.run(grid_of(model).to_float(images), capture=[last["inputs"][0]])
        w, b, mean, var = (t.double().numpy() for t in (
            bn.weight, bn.bias, bn.running_mean, bn.running_var))
    x = got[last["inputs"][0]].double().numpy()
    alpha = w / np.sqrt(var + bn.eps)
    beta = b - mean * alpha
    return 2 * U * (np.abs(x * alpha) + np.abs(mean * alpha) + 2 * np.abs(beta)
                    + 2 * np.abs(y.double().numpy()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_deploy_predicts_what_the_residual_model_predicts_on_real_images(name, residual, fmnist):
    model, bundle = residual[name]
    _, test = fmnist
    z = _torch_scores(model, test.images)
    assert np.array_equal(deploy.predict(bundle, test.images.numpy()), z.argmax(1).numpy())
    part = test.images[:200]
    got = deploy.scores(bundle, part.numpy())
    assert got.dtype == np.float32 and got.shape == (200, 10)
    assert (np.abs(got - z[:200].numpy()) <= _score_tolerance(model, part)).all()
    assert len(np.unique(z.argmax(1).numpy())) >= 5  # not a constant: the check can fail
    man = manifest(bundle)
    assert (man["version"], man["kind"]) == (deploy.GRAPH_VERSION, "graph")
    folded = {u["bn"] for u in model.units() if u["input"] == u["layer"]}
    assert folded and {n["name"] for n in man["nodes"] if "t" in n} == folded
    assert man["memory_bits"] == models.memory_bits(model)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_flip_masks_and_fault_maps_in_deploy_equal_faults_on_the_model(name, residual, fmnist):
    model, bundle = residual[name]
    _, test = fmnist
    small = test.subset(300)
    imgs = small.images.numpy()
    image = deploy.memory_image(bundle)
    layers = stored_layers(model)
    assert list(image) == [f"layer{k}" for k in range(len(layers))]
    rng = np.random.default_rng(1)
    flips, masks = {}, {}
    for (lname, layer), (key, words) in zip(layers.items(), image.items(), strict=True):
        rows, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :fan_in]
        assert np.array_equal(bits.reshape(-1), layer.stored_bits().numpy())  # the same image
        idx = np.sort(rng.choice(rows * fan_in, size=max(1, rows * fan_in // 20), replace=False))
        flips[lname] = torch.from_numpy(idx)
        flat = np.zeros(rows * fan_in, dtype=bool)
        flat[idx] = True
        masks[key] = pack_rows(flat.reshape(rows, fan_in))
    clean = _torch_scores(model, small.images).argmax(1).numpy()
    with errors.apply(model, flips):
        ref = _torch_scores(model, small.images).argmax(1).numpy()
    assert (ref != clean).any()  # the flips change predictions: the comparison can fail
    assert np.array_equal(deploy.predict(bundle, imgs, flip_mask=masks), ref)

    row = evaluate.sweep(model, small, bers=[0.05], n_maps=1, seed=0, progress=False).iloc[0]
    pred = deploy.predict(bundle, imgs, ber=0.05, seed=int(row.map_seed))
    with errors.inject(model, 0.05, seed=int(row.map_seed)):
        assert np.array_equal(pred, _torch_scores(model, small.images).argmax(1).numpy())
    assert (pred == small.labels.numpy()).mean() == row.accuracy  # the sweep row, replayed


# --- a graph on the library's input grid: folded first layer (scale 128), gamma < 0, dead -----



#: stem (folded) -> Bi-Real block (conv, BN, + shortcut, sign of the sum) -> pool -> conv (folded)
#: -> flatten -> binary linear -> BN scores.
NODES = [
    conv_node("c0", "x", 1, 6), bn_node("b0", "c0", 6),
    {"name": "h0", "op": "hardtanh", "inputs": ["b0"], "min": -1.0, "max": 1.0},
    {"name": "s0", "op": "sign", "inputs": ["h0"]},
    conv_node("c1", "s0", 6, 6), bn_node("b1", "c1", 6),
    {"name": "r", "op": "add", "inputs": ["b1", "h0"]},
    {"name": "s1", "op": "sign", "inputs": ["r"]},
    {"name": "p", "op": "pool", "inputs": ["s1"], "kernel": 2},
    conv_node("c2", "p", 6, 5), bn_node("b2", "c2", 5),
    {"name": "s2", "op": "sign", "inputs": ["b2"]},
    {"name": "f", "op": "flatten", "inputs": ["s2"]},
    {"name": "fc", "op": "binary", "inputs": ["f"], "type": "linear", "in": 5 * 4 * 4, "out": 10},
    bn_node("bo", "fc", 10, conv=False),
]


def _small_graph(nodes=NODES):
    return random_graph(nodes, dead="b0")  # gamma < 0 channels and a dead neuron


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model = _small_graph()
    return model, bnn_tol.export(model, tmp_path_factory.mktemp("small") / "b",
                                 class_names=[f"c{i}" for i in range(10)])


@pytest.fixture
def edit(small, tmp_path):
    """A fresh copy of the small graph bundle to edit."""
    b = tmp_path / "bundle"
    shutil.copytree(small[1], b)
    return b


def test_a_graph_on_the_library_grid_deploys_with_its_predictions_clean_and_faulted(small):
    model, bundle = small
    digits = data.load("digits", "test")
    imgs = digits.images.numpy()
    assert grid_of(model).scale == 128
    man = manifest(bundle)
    assert [n["name"] for n in man["nodes"] if "t" in n] == ["b0", "b2"]
    assert man["classes"] == [f"c{i}" for i in range(10)]
    ref = _torch_scores(model, digits.images)
    assert np.array_equal(deploy.predict(bundle, imgs), ref.argmax(1).numpy())
    assert np.array_equal(deploy.predict(bundle, imgs / 255.0), ref.argmax(1).numpy())
    tol = _score_tolerance(model, digits.images)
    assert (np.abs(deploy.scores(bundle, imgs) - ref.numpy()) <= tol).all()
    differs = 0
    for ber, seed in ((0.02, 0), (0.1, 3), ((0.01, 0.08), 5)):
        with errors.inject(model, ber, seed=seed):
            faulted = _torch_scores(model, digits.images).argmax(1).numpy()
        assert np.array_equal(deploy.predict(bundle, imgs, ber=ber, seed=seed), faulted)
        differs += int((faulted != ref.argmax(1).numpy()).sum())
    assert differs > 0


def test_graph_bundles_run_with_numpy_only(small, tmp_path):
    model, bundle = small
    np.save(tmp_path / "x.npy", IMAGES)
    reader = bundle / "bnn_deploy.py"
    code = (f"import sys; sys.modules['torch'] = None\n"
            f"import importlib.util, numpy as np\n"
            f"spec = importlib.util.spec_from_file_location('d', {str(reader)!r})\n"
            f"d = importlib.util.module_from_spec(spec); spec.loader.exec_module(d)\n"
            f"print(list(d.predict({str(bundle)!r}, np.load({str(tmp_path / 'x.npy')!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert eval(out.stdout) == _torch_scores(model, torch.from_numpy(IMAGES)).argmax(1).tolist()


def test_fused_multiply_add_is_correctly_rounded():
    """Against exact rational arithmetic, rounded to the nearest float32 (ties to even)."""

    def exact(a, b, c):
        v = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        x = np.float32(float(v))
        cands = [x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))]
        return min(cands, key=lambda y: (abs(Fraction(float(y)) - v),
                                         int(np.array(y).view(np.uint32)) & 1))

    rng = np.random.default_rng(0)
    a = (rng.standard_normal(300) * 4).astype(np.float32)
    b = (rng.standard_normal(300) * 4).astype(np.float32)
    c = (rng.standard_normal(300) * 4).astype(np.float32)
    # a b + c = (1 + 2^-23) + 2^-24 - 2^-70: just below a float32 midpoint, which float64
    # rounds onto the midpoint (a double rounding to 1 + 2^-22 would be wrong)
    a[:2] = np.float32(2.0 ** -24 * (1 + 2.0 ** -23)), -np.float32(2.0 ** -24 * (1 + 2.0 ** -23))
    b[:2] = np.float32(1 - 2.0 ** -23)
    c[:2] = np.float32(1 + 2.0 ** -23), -np.float32(1 + 2.0 ** -23)
    got = deploy._fma32(a, b, c)
    want = np.array([exact(*v) for v in zip(a, b, c, strict=True)], dtype=np.float32)
    assert np.array_equal(got, want)
    assert got[0] == np.float32(1 + 2.0 ** -23) and got[1] == -got[0]
    assert np.float32(np.float64(a[0]) * np.float64(b[0]) + np.float64(c[0])) != got[0]


# --- old chain bundles ------------------------------------------------------------------

def test_a_chain_bundle_of_the_previous_release_loads_and_predicts_as_before(tmp_path):
    model = small_bnn("vgg3", {"channels": ((8,), (6,)), "fc_width": 20})
    ds = BNNDataset(torch.from_numpy(IMAGES), torch.zeros(len(IMAGES), dtype=torch.int64))
    ref = evaluate.predict(model, ds).numpy()
    assert np.array_equal(deploy.predict(OLD_CHAIN, IMAGES), ref)
    assert len(deploy.memory_image(OLD_CHAIN)) == 4
    new = bnn_tol.export(model, tmp_path / "b")
    old_man, new_man = manifest(OLD_CHAIN), manifest(new)
    assert new_man["version"] == deploy.VERSION == 1 and "kind" not in new_man
    assert new_man["layers"] == old_man["layers"] and new_man["input"] == old_man["input"]
    same = {k: v for k, v in old_man["sha256"].items() if k != deploy.READER}
    assert {k: v for k, v in new_man["sha256"].items() if k != deploy.READER} == same
    assert np.array_equal(deploy.predict(new, IMAGES), ref)


# --- hostile graph manifests ------------------------------------------------------------

def _node(man, name):
    return next(n for n in man["nodes"] if n["name"] == name)


EDITS = {
    "unknown op": (lambda m: _node(m, "s0").update(op="conv3d"), "op 'conv3d'"),
    "input defined later": (lambda m: _node(m, "c1").update(inputs=["s2"]), "defined before"),
    "a cycle": (lambda m: _node(m, "c0").update(inputs=["bo"]), "defined before"),
    "reads itself": (lambda m: _node(m, "h0").update(inputs=["h0"]), "defined before"),
    "two inputs to sign": (lambda m: _node(m, "s0").update(inputs=["h0", "b0"]), "1 node"),
    "duplicate name": (lambda m: _node(m, "s0").update(name="h0"), "new identifier"),
    "name x": (lambda m: _node(m, "s0").update(name="x"), "new identifier"),
    "name not an identifier": (lambda m: _node(m, "s0").update(name="../a"), "new identifier"),
    "wrong in channels": (lambda m: _node(m, "c1").update({"in": 5}), "in 5 channels"),
    "wrong linear fan-in": (lambda m: _node(m, "fc").update({"in": 81}), "in 81"),
    "wrong bn features": (lambda m: _node(m, "b1").update(features=5), "5 features"),
    "add of other shapes": (lambda m: _node(m, "r").update(inputs=["b1", "x"]), "adds shapes"),
    "huge out": (lambda m: _node(m, "c0").update(out=2 ** 40), "integer in"),
    "huge pool": (lambda m: _node(m, "p").update(kernel=10 ** 6), "pool needs"),
    "kernel leaves nothing": (lambda m: _node(m, "c2").update(kernel=9, padding=0),
                              "leave no output"),
    "binary reads reals": (lambda m: _node(m, "c1").update(inputs=["h0"]), "real values"),
    "fold on a real value": (lambda m: _node(m, "b1").update(
        inputs=["h0"], t="node5_t.npy", direction="node5_direction.npy",
        const="node5_const.npy"), "need a binary node"),
    "half a fold": (lambda m: _node(m, "b1").update(t="node5_t.npy"), "lacks"),
    "weights outside": (lambda m: _node(m, "c1").update(weights="../c1.npy"), "names the file"),
    "params of another": (lambda m: _node(m, "b1").update(params="node1_bn.npy"),
                          "names the file"),
    "index skipped": (lambda m: _node(m, "c1").update(index=2), "numbered"),
    "unknown field": (lambda m: _node(m, "s0").update(bias=1), "does not define"),
    "missing field": (lambda m: _node(m, "p").pop("kernel"), "lacks"),
    "negative eps": (lambda m: _node(m, "b0").update(eps=-1.0), "eps"),
    "hardtanh min > max": (lambda m: _node(m, "h0").update(min=2.0), "min 2.0 > max"),
    "bool as a number": (lambda m: _node(m, "h0").update(max=True), "finite number"),
    "no nodes": (lambda m: m.update(nodes=[]), "nodes must list"),
    "too many nodes": (lambda m: m.update(nodes=m["nodes"] * 300), "nodes must list"),
    "a node is a list": (lambda m: m["nodes"].__setitem__(3, ["sign"]), "JSON object"),
    "last node not scores": (lambda m: m["nodes"].pop(), None),
    "classes": (lambda m: m.update(classes=["a"]), "classes"),
    "memory bits": (lambda m: m.update(memory_bits=1), "memory_bits"),
    "kind": (lambda m: m.update(kind="chain"), "kind"),
    "version 3": (lambda m: m.update(version=3), "version"),
    "layers instead of nodes": (lambda m: m.update(layers=m.pop("nodes")), None),
    "scale not a power of two": (lambda m: m["input"].update(scale=100), None),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_hostile_graph_manifests_are_refused_in_one_line(edit, case):
    change, needle = EDITS[case]
    man = manifest(edit)
    change(man)
    write_manifest(edit, man)  # with a recomputed manifest hash: a deliberate edit
    with pytest.raises(deploy.DeployError) as e:
        deploy.predict(edit, IMAGES)
    assert "\n" not in str(e.value)
    if needle is not None:
        assert needle in str(e.value)


def test_hostile_graph_arrays_are_refused_in_one_line(edit):
    man = manifest(edit)
    name = _node(man, "b1")["params"]
    bad = np.load(edit / name)
    bad[3, 0] = np.nan
    put_array(edit, man, name, bad)
    write_manifest(edit, man)
    with pytest.raises(deploy.DeployError, match="finite"):
        deploy.predict(edit, IMAGES)
    put_array(edit, man, name, bad.astype(np.float64))
    write_manifest(edit, man)
    with pytest.raises(deploy.DeployError, match="float64"):
        deploy.predict(edit, IMAGES)


def test_flip_masks_of_a_graph_bundle_are_checked(small):
    _, bundle = small
    image = deploy.memory_image(bundle)
    with pytest.raises(deploy.DeployError, match="unknown layer"):
        deploy.predict(bundle, IMAGES, flip_mask={"layer9": image["layer0"]})
    pad = np.zeros_like(image["layer0"])  # fan_in 9: bits 9..63 are padding
    pad[0, 0] = np.uint64(1 << 40)
    with pytest.raises(deploy.DeployError, match="padding"):
        deploy.predict(bundle, IMAGES, flip_mask={"layer0": pad})


# --- CLI and ONNX -----------------------------------------------------------------------

def test_cli_exports_a_saved_graph_and_refuses_in_one_line(small, tmp_path):
    model, _ = small
    bnn_tol.save(model, tmp_path / "run")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["layers"] == 4 and out["memory_bits"] == models.memory_bits(model)
    ref = _torch_scores(model, torch.from_numpy(IMAGES)).argmax(1).numpy()
    assert np.array_equal(deploy.predict(tmp_path / "d", IMAGES), ref)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "d")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error:")

    reals = [dict(n, inputs=["h0"]) if n["name"] == "c1" else n for n in NODES]
    bnn_tol.save(_small_graph(reals), tmp_path / "reals")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "reals"), "--out",
                                  str(tmp_path / "e")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1
    assert "node c1 (binary): reads h0, which holds real values" in lines[0]
    assert not (tmp_path / "e").exists()


def test_onnx_export_refuses_a_graph_naming_the_reason(small, tmp_path):
    pytest.importorskip("onnx")
    from bnn_tol.interop.onnx import export_onnx

    with pytest.raises(UnsupportedModel, match="residual BNN .* ONNX export") as e:
        export_onnx(small[0], tmp_path / "g.onnx")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "g.onnx").exists()
