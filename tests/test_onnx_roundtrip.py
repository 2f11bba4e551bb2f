"""The library's own ONNX export re-imports as the same model (issue 22, item 6): native fc and
vgg3 and an adapted model give back bit-identical accumulators, scores and sweeps; edited
weights are read from the graph, an edited threshold or score table is refused in one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from _helpers import small_bnn
from click.testing import CliRunner
from test_adapt import BinaryNetMLP, _example, _randomize

import bnn_tol
from bnn_tol import evaluate
from bnn_tol.core.compiled import compile_model
from bnn_tol.data import BNNDataset, to_float

onnx = pytest.importorskip("onnx")
from bnn_tol.interop.onnx import OnnxError, export_onnx, import_onnx  # noqa: E402


def _adapted():
    torch.manual_seed(0)
    user = _randomize(BinaryNetMLP())
    return bnn_tol.adapt(user, to_float(_example()))


MODELS = {
    "fc": lambda: small_bnn("fc", {"hidden": (40, 30)}),
    "vgg3": lambda: small_bnn("vgg3", {"channels": ((8,), (6,)), "fc_width": 20}),
    "adapted": _adapted,
}


def _accumulators(model, x):
    """Every block's pre-activation (the layer output before its BatchNorm)."""
    out = []
    hooks = [b.layer.register_forward_hook(lambda _m, _i, o: out.append(o.clone()))
             for b in model.blocks]
    try:
        with torch.no_grad():
            scores = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, scores


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_export_reimports_as_the_same_model(tmp_path, name):
    model = MODELS[name]()
    path = export_onnx(model, tmp_path / "m.onnx")
    back = import_onnx(path)
    assert back.meta["exported_by"] == "bnn_tol"
    g = torch.Generator().manual_seed(5)
    imgs = torch.randint(0, 256, (200, *model.in_shape), generator=g, dtype=torch.uint8)
    x = to_float(imgs)
    acc, scores = _accumulators(model, x)
    acc_back, scores_back = _accumulators(back, x)
    for a, b in zip(acc, acc_back, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(scores, scores_back)  # bit for bit, output BatchNorm included
    for s, t in zip(compile_model(model).stages, compile_model(back).stages, strict=True):
        assert torch.equal(s.wb, t.wb)
        if s.hidden:
            assert torch.equal(s.folded.t, t.folded.t)
            assert torch.equal(s.folded.direction, t.folded.direction)
    ds = BNNDataset(imgs, scores.argmax(1))
    kw = dict(bers=[0.0, 0.02, 0.1], n_maps=2, seed=3, progress=False)
    a, b = evaluate.sweep(model, ds, **kw), evaluate.sweep(back, ds, **kw)
    assert a["accuracy"].tolist() == b["accuracy"].tolist()
    assert a["accuracy"].nunique() > 1  # the faults do something


def _edit(path, out, name, change):
    proto = onnx.load(str(path))
    t = next(t for t in proto.graph.initializer if t.name == name)
    arr = onnx.numpy_helper.to_array(t).copy()
    change(arr)
    t.CopyFrom(onnx.numpy_helper.from_array(arr, name))
    onnx.save(proto, str(out))
    return arr


def test_an_edited_export_is_what_its_graph_computes_never_its_stale_record(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = MODELS["fc"]()
    path = export_onnx(model, tmp_path / "m.onnx")
    # a weight flipped after export: the weights are read from the graph
    w = _edit(path, tmp_path / "w.onnx", "w1", lambda a: a.__setitem__((0, 0), -a[0, 0]))
    back = import_onnx(tmp_path / "w.onnx")
    assert torch.equal(back.blocks[1].layer.weight.detach(), torch.from_numpy(w.T))
    x = to_float(torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator()
                               .manual_seed(1), dtype=torch.uint8))
    sess = ort.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_array_equal(sess.run(None, {"x": x.numpy()})[0], back(x).numpy())
    # a threshold or a score changed after export: the record no longer describes the graph,
    # and a folded threshold or a score table alone does not determine the BatchNorms
    for name in ("e0", "scores_table"):
        _edit(path, tmp_path / f"{name}.onnx", name, lambda a: a.reshape(-1).__setitem__(
            0, a.reshape(-1)[0] + 1))
        with pytest.raises(OnnxError, match="without a model record that matches") as e:
            import_onnx(tmp_path / f"{name}.onnx")
        assert "\n" not in str(e.value)


def test_without_onnxruntime_a_stale_record_is_still_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    path = export_onnx(MODELS["fc"](), tmp_path / "m.onnx")
    assert "verified_with" not in import_onnx(path).meta
    _edit(path, tmp_path / "e.onnx", "e0", lambda a: a.reshape(-1).__setitem__(
        0, a.reshape(-1)[0] + 1))
    with pytest.raises(OnnxError, match="without a model record that matches"):
        import_onnx(tmp_path / "e.onnx")


def test_the_import_command_gives_back_the_exported_model(tmp_path):
    model = MODELS["vgg3"]()
    path = export_onnx(model, tmp_path / "m.onnx")
    r = CliRunner().invoke(bnn_tol.cli.main, ["import", str(path), "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    x = to_float(torch.randint(0, 256, (50, 1, 8, 8), generator=torch.Generator()
                               .manual_seed(2), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(bnn_tol.load(tmp_path / "r")(x), model(x))
