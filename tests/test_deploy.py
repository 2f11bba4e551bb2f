"""Bit-exact export and numpy inference (issue 12): clean and under fault maps, numpy only."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import small_bnn
from click.testing import CliRunner

import bnn_tol
from bnn_tol import deploy, errors, evaluate, models
from bnn_tol.cli import main
from bnn_tol.core.compiled import UnsupportedModel
from bnn_tol.data import BNNDataset
from bnn_tol.interop.bundle import pack_rows

ARCHS = [("fc", {"hidden": (70, 30)}), ("vgg3", {"channels": ((8,), (6,)), "fc_width": 20})]


def _model(arch, kw, seed=1):
    return small_bnn(arch, kw, seed)


def _images(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
def test_numpy_inference_equals_torch_clean_and_under_fault_maps(tmp_path, arch, kw):
    model = _model(arch, kw)
    imgs = _images()
    ds = BNNDataset(imgs, torch.zeros(len(imgs), dtype=torch.int64))
    bnn_tol.export(model, tmp_path / "b")
    assert np.array_equal(deploy.predict(tmp_path / "b", imgs.numpy()),
                          evaluate.predict(model, ds).numpy())
    # float pixels p / 255 are accepted too
    assert np.array_equal(deploy.predict(tmp_path / "b", imgs.numpy() / 255.0),
                          evaluate.predict(model, ds).numpy())
    differs = 0
    for ber in (0.02, 0.1, (0.01, 0.08)):
        for seed in (0, 3):
            with errors.inject(model, ber, seed=seed):
                ref = evaluate.predict(model, ds).numpy()
            got = deploy.predict(tmp_path / "b", imgs.numpy(), ber=ber, seed=seed)
            assert np.array_equal(got, ref), (ber, seed)
            differs += int((ref != evaluate.predict(model, ds).numpy()).sum())
    assert differs > 0  # the faults change predictions: the comparison can fail


def test_flip_mask_equals_the_fault_map_and_the_sweep_row(tmp_path):
    model = _model(*ARCHS[0])
    imgs = _images(200)
    labels = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(1))
    ds = BNNDataset(imgs, labels)
    bnn_tol.export(model, tmp_path / "b")
    row = evaluate.sweep(model, ds, bers=[0.05], n_maps=1, seed=4, progress=False).iloc[0]
    maps = errors.draw_maps(model, int(row.map_seed), 0.05)
    masks = {}
    for k, (name, layer) in enumerate(model.binary_layers().items()):
        rows, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        wb = torch.where(layer.weight >= 0, 1.0, -1.0)
        idx = maps[name].flips(wb, 0.05, 0.05).numpy()
        bits = np.zeros(rows * fan_in, dtype=bool)
        bits[idx] = True
        masks[f"layer{k}"] = pack_rows(bits.reshape(rows, fan_in))
    np.savez(tmp_path / "mask.npz", **masks)
    pred = deploy.predict(tmp_path / "b", imgs.numpy(), flip_mask=tmp_path / "mask.npz")
    assert (pred == labels.numpy()).mean() == row.accuracy
    with pytest.raises(deploy.DeployError, match="unknown layer"):
        deploy.predict(tmp_path / "b", imgs.numpy(), flip_mask={"layer9": masks["layer0"]})
    pad = np.zeros_like(masks["layer1"])
    pad[0, 1] = np.uint64(1 << 63)  # fan_in 70: bits 6..63 of word 1 are padding
    with pytest.raises(deploy.DeployError, match="padding"):
        deploy.predict(tmp_path / "b", imgs.numpy(), flip_mask={"layer1": pad})


def test_bit_order_is_the_documented_one():
    bits = np.zeros((2, 70), dtype=bool)
    bits[0, [0, 63, 64]] = True
    bits[1, 69] = True
    w = pack_rows(bits)
    assert w.dtype == np.uint64 and w.shape == (2, 2)
    assert int(w[0, 0]) == 1 | (1 << 63) and int(w[0, 1]) == 1
    assert int(w[1, 0]) == 0 and int(w[1, 1]) == 1 << 5  # padding bits 6..63 stay 0


def test_clean_inference_needs_only_numpy(tmp_path):
    model = _model(*ARCHS[1])
    bnn_tol.export(model, tmp_path / "b")
    imgs = _images(20).numpy()
    np.save(tmp_path / "x.npy", imgs)
    reader = tmp_path / "b" / "bnn_deploy.py"  # the bundle carries its own numpy reader
    code = (f"import sys; sys.modules['torch'] = None\n"
            f"import importlib.util, numpy as np\n"
            f"spec = importlib.util.spec_from_file_location('deploy', {str(reader)!r})\n"
            f"d = importlib.util.module_from_spec(spec); spec.loader.exec_module(d)\n"
            f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
            f"print(list(d.predict({str(tmp_path / 'b')!r}, x)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ds = BNNDataset(torch.from_numpy(imgs), torch.zeros(20, dtype=torch.int64))
    assert eval(out.stdout) == evaluate.predict(model, ds).tolist()


def test_bundle_is_checked_and_refuses_what_it_cannot_express(tmp_path):
    model = _model(*ARCHS[0])
    b = bnn_tol.export(model, tmp_path / "b")
    man = json.loads((b / "manifest.json").read_text())
    assert man["memory_bits"] == models.memory_bits(model)
    arr = np.load(b / "layer1_t.npy")
    arr[0] += 1
    np.save(b / "layer1_t.npy", arr)
    with pytest.raises(deploy.DeployError, match="checksum"):
        deploy.predict(b, _images(5).numpy())
    with pytest.raises(ValueError, match="already holds an export"):
        bnn_tol.export(model, b)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a bnn_tol export"):
        bnn_tol.export(model, tmp_path / "other")
    with pytest.raises(UnsupportedModel, match="sign"):
        bnn_tol.export(models.build("fc", hidden=(8,), in_shape=(1, 8, 8), weight_bits=4),
                       tmp_path / "q")
    with pytest.raises(deploy.DeployError, match="inputs must be"):
        deploy.predict(bnn_tol.export(model, tmp_path / "c"), np.zeros((3, 5), np.uint8))


def test_cli_export(tmp_path):
    model = _model(*ARCHS[0])
    bnn_tol.save(model, tmp_path / "run")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "manifest.json").exists()
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "d")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error:")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fc", "vgg3"])
def test_fashion_mnist_all_test_images_clean_and_five_maps(tmp_path, arch):
    """All 10k Fashion-MNIST test images: numpy inference equals torch, clean and 5 maps."""
    from bnn_tol import data, train

    try:
        tr, te = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    except Exception as e:  # noqa: BLE001 -- the data package may be absent
        pytest.skip(f"Fashion-MNIST not available: {e}")
    kw = {"hidden": (512, 512)} if arch == "fc" else {"fc_width": 256}
    model = models.build(arch, seed=0, **kw)
    train.fit(model, tr.subset(6000), epochs=1, seed=0, progress=False, device="cpu")
    model.eval()
    bnn_tol.export(model, tmp_path / "b")
    man = deploy.load_bundle(tmp_path / "b")
    imgs = te.images.numpy()
    assert np.array_equal(deploy.predict(man, imgs), evaluate.predict(model, te).numpy())
    df = evaluate.sweep(model, te, bers=[0.01], n_maps=5, seed=0, progress=False)
    for r in df.itertuples():
        pred = deploy.predict(man, imgs, ber=0.01, seed=r.map_seed)
        assert (pred == te.labels.numpy()).mean() == r.accuracy


@pytest.mark.slow
def test_fashion_mnist_onnx_and_adapted_copy_agree_on_all_test_images(tmp_path):
    """ONNX (onnxruntime) and an adapted plain-PyTorch copy agree with torch on all 10k."""
    from torch import nn

    from bnn_tol import data, train

    ort = pytest.importorskip("onnxruntime")
    from bnn_tol.interop.onnx import export_onnx

    try:
        tr, te = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not available: {e}")
    model = models.build("fc", hidden=(256, 256), seed=0)
    train.fit(model, tr.subset(6000), epochs=1, seed=0, progress=False, device="cpu")
    model.eval()
    x = bnn_tol.data.to_float(te.images)
    ref = evaluate.predict(model, te).numpy()
    sess = ort.InferenceSession(str(export_onnx(model, tmp_path / "m.onnx")),
                                providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x.numpy()})[0].argmax(1), ref)

    class Sign(nn.Module):
        def forward(self, v):
            return torch.where(v >= 0, 1.0, -1.0)

    class BinLin(nn.Linear):
        def forward(self, v):
            return torch.nn.functional.linear(v, torch.where(self.weight >= 0, 1.0, -1.0))

    seq = []
    for k, b in enumerate(model.blocks):
        lin = BinLin(b.layer.in_features, b.layer.out_features, bias=False)
        lin.weight.data.copy_(b.layer.weight.data)
        seq += ([nn.Flatten()] if k == 0 else []) + [lin, b.bn]
        seq += [Sign()] if b.binary_output else []
    user = nn.Sequential(*seq).eval()
    adapted = bnn_tol.adapt(user, x[:256])
    assert np.array_equal(evaluate.predict(adapted, te).numpy(), ref)


def test_deploy_reads_the_input_grid_from_the_manifest(tmp_path):
    model = _model(*ARCHS[1])
    imgs = _images(200).clamp(max=254)
    b = bnn_tol.export(model, tmp_path / "b")
    ref = deploy.predict(b, imgs.numpy())
    man = json.loads((b / "manifest.json").read_text())
    assert (man["input"]["offset"], man["input"]["scale"]) == (128, 128)

    def write(man):  # a deliberate edit: with its manifest hash recomputed
        man["manifest_sha256"] = deploy.manifest_digest(man)
        (b / "manifest.json").write_text(json.dumps(man))

    # offset 129 with pixels p + 1 gives the same integers q: the same predictions
    man["input"]["offset"] = 129
    man["input"]["transform"] = "q = p - 129 (int); the float model sees (p - 129) / 128"
    write(man)
    assert np.array_equal(deploy.predict(b, (imgs + 1).numpy()), ref)
    assert not np.array_equal(deploy.predict(b, imgs.numpy()), ref)
    # bundles of the previous release state the transform only in words (and have no hash)
    del man["input"]["offset"], man["input"]["scale"], man["manifest_sha256"]
    man["input"]["transform"] = "q = p - 128 (int); the float model sees (p - 128) / 128"
    (b / "manifest.json").write_text(json.dumps(man))
    assert np.array_equal(deploy.predict(b, imgs.numpy()), ref)
    man["input"]["transform"] = "x = p / 255"
    (b / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(deploy.DeployError, match="no input offset"):
        deploy.predict(b, imgs.numpy())
    man["input"].update(offset=128, scale=64)
    write(man)
    with pytest.raises(deploy.DeployError, match="inconsistent"):
        deploy.predict(b, imgs.numpy())
