"""ONNX import follows the data flow, honours or refuses every attribute, checks shapes and is
verified against onnxruntime: never silently wrong, never a traceback (issue 20, items 8, 9, 15).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from _helpers import small_bnn  # noqa: E402
from _onnx_graphs import G, conv_graph, fc_graph, ort_run, probe_images, session  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import bnn_tol  # noqa: E402
from bnn_tol.core.compiled import compile_model  # noqa: E402
from bnn_tol.data import INPUT, to_float  # noqa: E402
from bnn_tol.interop import onnx as onnx_io  # noqa: E402
from bnn_tol.interop.onnx import OnnxError, export_onnx, import_onnx  # noqa: E402


def _scores(model, x):
    with torch.no_grad():
        return model(x).numpy()


def _agrees(model, path, scores: str | None = None, exact: bool = False) -> None:
    """The imported model predicts what onnxruntime predicts on 300 images spanning the pixel
    range (``scores``: the graph tensor holding the class scores, e.g. before a softmax)."""
    x = to_float(probe_images(model.in_shape))
    ref = ort_run(session(path, scores), x.numpy())
    got = _scores(model, x)
    np.testing.assert_array_equal(ref.argmax(1), got.argmax(1))
    if exact:
        np.testing.assert_array_equal(ref, got)


def _refused(path, match: str, **kw) -> OnnxError:
    with pytest.raises(OnnxError, match=match) as e:
        import_onnx(path, **kw)
    assert "\n" not in str(e.value)
    assert "(OnnxError" not in str(e.value)  # said once, not wrapped by the safety net
    return e.value


# -- what imports (and what it equals) --------------------------------------------------------


def test_a_conv_graph_imports_and_its_scores_match_onnxruntime(tmp_path):
    g = conv_graph()
    path = g.save(tmp_path / "c.onnx")
    model = import_onnx(path)
    assert [b.pool for b in model.blocks] == [2, 2, None]
    softmax_input = g.nodes[-1].input[0]
    x = to_float(probe_images((1, 8, 8)))
    ref = ort_run(session(path, softmax_input), x.numpy())
    got = _scores(model, x)
    np.testing.assert_array_equal(ref.argmax(1), got.argmax(1))
    # an output BatchNorm rounds differently in torch and onnxruntime (1 ulp): the stated tolerance
    np.testing.assert_allclose(got, ref, rtol=0, atol=4 * np.finfo(np.float32).eps
                               * np.abs(ref).max())


def test_a_fashion_mnist_sized_graph_imports_and_agrees(tmp_path):
    # 784-2048-256-10: about one first-layer neuron in 10^4 has its threshold where torch's and
    # onnxruntime's float BatchNorm round to different sides (a rounding tie): counted, accepted
    g = G(("N", 1, 28, 28), seed=3).flatten().gemm(784, 2048).bn(2048, 16.0).sign()
    g.gemm(2048, 256).bn(256, 45.0).where_sign().gemm(256, 10).bn(10, 16.0)
    path = g.save(tmp_path / "big.onnx")
    model = import_onnx(path)
    assert model.meta["verified_with"].startswith("onnxruntime")
    assert model.meta.get("onnx_rounding_ties", 0) <= 3
    _agrees(model, path)


def test_scores_are_exactly_onnxruntimes_where_the_arithmetic_is_exact(tmp_path):
    # no BatchNorm after the last layer: the scores are sums of +-1 (integers), exact in both
    g = G().flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 10)
    path = g.save(tmp_path / "e.onnx")
    _agrees(import_onnx(path), path, exact=True)


@pytest.mark.parametrize("sign", ["sign", "where"])
@pytest.mark.parametrize("layer", ["gemm", "matmul"])
def test_fc_graphs_with_either_sign_pattern_and_layer_op_import(tmp_path, sign, layer):
    path = fc_graph(sign=sign, layer=layer).save(tmp_path / "f.onnx")
    _agrees(import_onnx(path), path)


def test_the_library_export_without_its_record_is_refused_in_one_line(tmp_path):
    # an export whose metadata record was stripped (or one from before issue 22): the folded
    # comparators and the score table do not determine the BatchNorms (the round trip with the
    # record: test_onnx_roundtrip.py)
    path = export_onnx(small_bnn("fc", {"hidden": (16, 12)}), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    _refused(tmp_path / "bare.onnx", "without a model record .*export the model again")


# -- item 8: data flow, attributes, thresholds ------------------------------------------------


def test_a_where_threshold_other_than_zero_is_refused_naming_it(tmp_path):
    g = G().flatten().gemm(64, 24).bn(24, 4.0).where_sign(thr=0.7).gemm(24, 10)
    err = _refused(g.save(tmp_path / "t.onnx"), "GreaterOrEqual")
    assert "0.7" in str(err)


def test_hardsigmoid_before_sign_is_refused(tmp_path):
    g = G().flatten().gemm(64, 24).bn(24, 4.0).node("HardSigmoid").sign().gemm(24, 10)
    _refused(g.save(tmp_path / "h.onnx"), "HardSigmoid")


@pytest.mark.parametrize(("attrs", "bias", "name"), [
    ({"alpha": -1.0}, False, "alpha"), ({"alpha": 2.0}, False, "alpha"),
    ({"beta": 0.5}, True, "beta"), ({"transA": 1}, False, "transA")])
def test_gemm_attributes_are_honoured_or_refused(tmp_path, attrs, bias, name):
    g = G().flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 10, bias=bias, **attrs)
    _refused(g.save(tmp_path / "g.onnx"), name)


def test_gemm_with_beta_but_no_bias_and_transB_0_import(tmp_path):
    g = G().flatten().gemm(64, 24, beta=0.5).bn(24, 4.0).sign()
    g.node("Gemm", g.const(g.pm(24, 10), "W"), transB=0).bn(10, 4.0)
    path = g.save(tmp_path / "g.onnx")
    _agrees(import_onnx(path), path)


def test_a_second_layer_fed_from_the_flatten_output_is_refused(tmp_path):
    g = G().flatten()
    flat = g.h
    g.gemm(64, 24).bn(24, 4.0).sign()
    g.h = flat  # the next layer reads the flattened input, not the sign: the data flow branches
    g.matmul(64, 10)
    _refused(g.save(tmp_path / "b.onnx"), "feeds 2 nodes")


def test_a_sign_followed_by_nothing_and_a_rewired_layer_is_refused(tmp_path):
    g = fc_graph(head="")
    g.nodes[4].input[0] = g.nodes[2].output[0]  # layer 2 reads the BN output, skipping Sign
    _refused(g.save(tmp_path / "r.onnx"), "feeds")


@pytest.mark.parametrize(("attrs", "name"), [
    ({"dilations": [2, 2]}, "dilations"), ({"strides": [2, 2]}, "strides"),
    ({"pads": [0, 0, 1, 1]}, "pads"), ({"auto_pad": "SAME_LOWER", "pads": None, "k": 2},
                                       "auto_pad"),
    ({"kernel_shape": [2, 2]}, "kernel_shape")])
def test_conv_attributes_are_refused_naming_them(tmp_path, attrs, name):
    k = attrs.pop("k", 3)
    g = G().conv(1, 6, k, **attrs).bn(6, 3.0).sign().flatten()
    g.gemm(6 * (8 if name != "strides" else 4) ** 2, 10)
    _refused(g.save(tmp_path / "c.onnx"), name)


def test_a_grouped_conv_is_refused(tmp_path):
    g = G(("N", 2, 8, 8))
    g.node("Conv", g.const(g.pm(4, 1, 3, 3), "W"), pads=[1, 1, 1, 1], group=2)
    g.bn(4, 3.0).sign().flatten().gemm(256, 10)
    _refused(g.save(tmp_path / "c.onnx"), "group")


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad_is_honoured(tmp_path, auto_pad):
    g = G().conv(1, 6, pads=None, auto_pad=auto_pad).bn(6, 3.0).sign().flatten()
    g.gemm(6 * (64 if auto_pad != "VALID" else 36), 10)
    path = g.save(tmp_path / "c.onnx")
    model = import_onnx(path)
    assert model.blocks[0].layer.padding == ((1, 1) if auto_pad != "VALID" else (0, 0))
    _agrees(model, path)


@pytest.mark.parametrize(("attrs", "name"), [
    ({"strides": None}, "strides"), ({"pads": [1, 1, 1, 1]}, "pads"),
    ({"dilations": [2, 2]}, "dilations"), ({"auto_pad": "SAME_UPPER"}, "auto_pad")])
def test_maxpool_attributes_are_refused_naming_them(tmp_path, attrs, name):
    g = G().conv(1, 6).bn(6, 3.0).sign().maxpool(**attrs).flatten().gemm(96, 10)
    _refused(g.save(tmp_path / "p.onnx"), name)


def test_maxpool_ceil_mode_is_honoured_where_it_changes_nothing_and_refused_elsewhere(tmp_path):
    g = G().conv(1, 6).bn(6, 3.0).sign().maxpool(ceil_mode=1).flatten().gemm(96, 10)
    path = g.save(tmp_path / "even.onnx")
    _agrees(import_onnx(path), path)
    g = G(("N", 1, 9, 9)).conv(1, 6).bn(6, 3.0).sign().maxpool(ceil_mode=1).flatten()
    g.gemm(150, 10)
    _refused(g.save(tmp_path / "odd.onnx"), "ceil_mode")


def test_maxpool_between_layer_and_sign_is_refused(tmp_path):
    g = G().conv(1, 6).maxpool().bn(6, 3.0).sign().flatten().gemm(96, 10)
    _refused(g.save(tmp_path / "p.onnx"), "MaxPool")


@pytest.mark.parametrize(("hi", "lo"), [(-1.0, 1.0), (1.0, 0.0), (2.0, -2.0)])
def test_where_must_map_to_plus_and_minus_one(tmp_path, hi, lo):
    g = G().flatten().gemm(64, 24).bn(24, 4.0).where_sign(hi=hi, lo=lo).gemm(24, 10)
    _refused(g.save(tmp_path / "w.onnx"), "Where")


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (-1.0, 0.0), (0.5, 1.0)])
def test_a_clip_that_changes_signs_is_refused(tmp_path, lo, hi):
    g = G().flatten().gemm(64, 24).bn(24, 4.0).clip(lo, hi).sign().gemm(24, 10)
    _refused(g.save(tmp_path / "c.onnx"), "Clip")


def test_clip_before_batchnorm_is_refused(tmp_path):
    g = G().flatten().gemm(64, 24).clip().bn(24, 4.0).sign().gemm(24, 10)
    _refused(g.save(tmp_path / "c.onnx"), "Clip")


@pytest.mark.parametrize("pattern", ["sign", "greater"])
def test_a_sign_of_an_exact_zero_is_refused(tmp_path, pattern):
    # no BatchNorm on an even fan-in: the pre-activation 0 is reachable, where Sign gives 0 and
    # Greater gives -1 but the library's sign gives +1
    g = G().flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 12)
    g.sign() if pattern == "sign" else g.where_sign(op="Greater")
    g.gemm(12, 10)
    _refused(g.save(tmp_path / "z.onnx"), "exactly 0")


def test_a_sign_where_zero_is_unreachable_imports(tmp_path):
    g = G().flatten().gemm(64, 25).bn(25, 4.0).sign().gemm(25, 12).sign().gemm(12, 10)
    path = g.save(tmp_path / "odd.onnx")  # odd fan-in 25: the pre-activation is never 0
    _agrees(import_onnx(path), path, exact=True)


def test_a_per_channel_bias_add_imports_and_a_misbroadcast_one_is_refused(tmp_path):
    g = G().conv(1, 6)
    g.node("Add", g.const(g.rng.normal(0, 1, (1, 6, 1, 1)).astype(np.float32), "B"))
    g.bn(6, 3.0).sign().flatten().gemm(384, 10)
    path = g.save(tmp_path / "ok.onnx")
    _agrees(import_onnx(path), path)
    g = G().conv(1, 8)
    g.node("Add", g.const(np.arange(8, dtype=np.float32), "B"))  # (8,) adds along W, not C
    g.bn(8, 3.0).sign().flatten().gemm(512, 10)
    _refused(g.save(tmp_path / "bad.onnx"), "Add")


def test_verification_refuses_an_import_whose_predictions_differ(tmp_path, monkeypatch):
    path = fc_graph().save(tmp_path / "f.onnx")
    build = onnx_io._build_model

    def corrupt(*args, **kw):
        model = build(*args, **kw)
        with torch.no_grad():
            model.blocks[-1].layer.weight.neg_()  # what a wrong transpose would do
        return model

    monkeypatch.setattr(onnx_io, "_build_model", corrupt)
    _refused(path, "onnxruntime")


def test_verification_finds_a_threshold_off_by_one_step_that_probes_miss(tmp_path, monkeypatch):
    path = fc_graph().save(tmp_path / "f.onnx")
    build = onnx_io._build_model

    def shift(*args, **kw):
        model = build(*args, **kw)
        bn = model.blocks[0].bn  # a threshold moved by two steps of the first layer's grid
        with torch.no_grad():
            bn.running_mean[3] += 2.0 / INPUT.scale
        return model

    monkeypatch.setattr(onnx_io, "_build_model", shift)
    # one black probe image: what finds the moved threshold is the check of every threshold
    monkeypatch.setattr(onnx_io, "_probe_pixels",
                        lambda shape: torch.zeros((1, *shape), dtype=torch.uint8))
    _refused(path, "neuron")


# -- item 9: shapes -------------------------------------------------------------------------


def test_absurd_input_dims_are_refused(tmp_path):
    g = G(("N", 1, 100000, 100000)).flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 10)
    _refused(g.save(tmp_path / "a.onnx"), "input")


def test_input_dims_must_match_the_first_layer(tmp_path):
    g = G(("N", 1, 8, 9)).flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 10)
    _refused(g.save(tmp_path / "a.onnx"), "64")


def test_a_flat_graph_input_needs_an_in_shape_with_its_size(tmp_path):
    g = G(("N", 784)).gemm(784, 16).bn(16, 10.0).sign().gemm(16, 10)
    path = g.save(tmp_path / "flat.onnx")
    _refused(path, "in_shape")
    _refused(path, "784", in_shape=(1, 28, 27))
    model = import_onnx(path, in_shape=(1, 28, 28))
    x = to_float(probe_images((1, 28, 28), n=50))
    ref = ort_run(session(path), x.numpy().reshape(50, 784))
    np.testing.assert_array_equal(ref.argmax(1), _scores(model, x).argmax(1))
    assert len(compile_model(model).stages) == 2


def test_an_in_shape_other_than_the_graphs_is_refused(tmp_path):
    path = fc_graph().save(tmp_path / "f.onnx")
    _refused(path, "in_shape", in_shape=(1, 4, 16))
    for bad in [(1, 8), "1,8,8", (1, -8, -8), 5]:
        _refused(path, "in_shape must be three positive integers", in_shape=bad)


def test_chained_layer_widths_must_agree(tmp_path):
    g = G(("N", 1, 28, 28)).flatten().gemm(784, 16).bn(16, 10.0).sign().gemm(784, 10)
    _refused(g.save(tmp_path / "w.onnx"), "784")


def test_matmul_on_an_unflattened_image_is_refused(tmp_path):
    g = G(("N", 1, 8, 8)).matmul(8, 24).bn(24, 4.0).sign().flatten().gemm(24 * 8, 10)
    _refused(g.save(tmp_path / "m.onnx"), "MatMul")


# -- item 15: no traceback --------------------------------------------------------------------


def test_an_initializer_whose_size_does_not_match_its_dims_is_refused(tmp_path):
    g = fc_graph()
    w = g.inits[0]
    w.dims[:] = [24, 65]
    _refused(g.save(tmp_path / "s.onnx"), w.name)


def test_maxpool_without_kernel_shape_is_refused(tmp_path):
    g = G().conv(1, 6).bn(6, 3.0).sign().maxpool(kernel_shape=None).flatten().gemm(96, 10)
    _refused(g.save(tmp_path / "k.onnx"), "kernel_shape")


def test_3d_matmul_weights_are_refused(tmp_path):
    g = G().flatten()
    g.node("MatMul", g.const(np.ones((2, 64, 24), np.float32), "W"))
    g.bn(24, 4.0).sign().gemm(24, 10)
    _refused(g.save(tmp_path / "m.onnx"), "2-D")


@pytest.mark.parametrize(("value", "ok"), [(0.0, True), (0.7, False)])
def test_a_constant_node_with_value_float_is_read(tmp_path, value, ok):
    g = G().flatten().gemm(64, 24).bn(24, 4.0)
    g.nodes.append(helper.make_node("Constant", [], ["thr"], value_float=value))
    g.node("GreaterOrEqual", "thr")
    g.node("Where", g.const(np.float32(1), "one"), g.const(np.float32(-1), "minus"))
    g.gemm(24, 10)
    path = g.save(tmp_path / "c.onnx")
    if ok:
        _agrees(import_onnx(path), path)
    else:
        _refused(path, "0.7")


def test_nodes_out_of_order_are_refused(tmp_path):
    g = fc_graph()
    g.nodes[1], g.nodes[2] = g.nodes[2], g.nodes[1]
    _refused(g.save(tmp_path / "o.onnx"), "not a valid ONNX")


def test_verify_needs_a_tensor_and_checks_it(tmp_path):
    path = fc_graph().save(tmp_path / "f.onnx")
    x = to_float(probe_images(n=20))
    assert torch.equal(import_onnx(path, verify=x)(x), import_onnx(path)(x))
    _refused(path, "verify", verify="abc")
    _refused(path, "verify", verify=torch.zeros(3, 5))


# -- the command: one line, non-zero exit, nothing written -------------------------------------


def _bad_graphs(tmp_path):
    out = {}
    g = G().flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 10, alpha=2.0)
    out["alpha"] = (g.save(tmp_path / "alpha.onnx"), [])
    g = G(("N", 1, 100000, 100000)).flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 10)
    out["dims"] = (g.save(tmp_path / "dims.onnx"), [])
    g = fc_graph()
    g.inits[0].dims[:] = [24, 65]
    out["size"] = (g.save(tmp_path / "size.onnx"), [])
    g = G().conv(1, 6).bn(6, 3.0).sign().maxpool(kernel_shape=None).flatten().gemm(96, 10)
    out["kernel"] = (g.save(tmp_path / "kernel.onnx"), [])
    g = G(("N", 784)).gemm(784, 16).bn(16, 10.0).sign().gemm(16, 10)
    out["in-shape"] = (g.save(tmp_path / "flat.onnx"), ["--in-shape", "1,28,27"])
    out["in-shape-text"] = (str(tmp_path / "flat.onnx"), ["--in-shape", "1,28,x"])
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk")
    out["junk"] = (str(tmp_path / "junk.onnx"), [])
    proto = onnx.load(str(export_onnx(small_bnn("fc", {"hidden": (16, 12)}),
                                      tmp_path / "export.onnx")))
    del proto.metadata_props[:]  # an export without its record (round trip: test_onnx_roundtrip)
    onnx.save(proto, str(tmp_path / "bare-export.onnx"))
    out["export"] = (str(tmp_path / "bare-export.onnx"), [])
    return out


def test_the_import_command_ends_every_bad_graph_in_one_line(tmp_path):
    for what, (path, extra) in _bad_graphs(tmp_path).items():
        out = tmp_path / f"run-{what}"
        r = CliRunner().invoke(bnn_tol.cli.main, ["import", path, "--out", str(out), *extra])
        assert r.exit_code != 0, (what, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (what, r.exception)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), (what, r.output)
        assert not out.exists(), what


def test_the_import_command_writes_a_verified_checkpoint(tmp_path):
    path = conv_graph().save(tmp_path / "c.onnx")
    r = CliRunner().invoke(bnn_tol.cli.main, ["import", path, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert '"verified_with": "onnxruntime' in r.output
    x = to_float(probe_images(n=50))
    assert torch.equal(bnn_tol.load(tmp_path / "run")(x), import_onnx(path)(x))


def test_without_onnxruntime_the_checks_hold_and_the_command_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    g = G().flatten().gemm(64, 24).bn(24, 4.0).sign().gemm(24, 10, alpha=2.0)
    _refused(g.save(tmp_path / "alpha.onnx"), "alpha")
    path = fc_graph().save(tmp_path / "f.onnx")
    _refused(path, "onnxruntime", verify=to_float(probe_images(n=4)))
    assert "verified_with" not in import_onnx(path).meta
    r = CliRunner().invoke(bnn_tol.cli.main, ["import", path, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0 and "not verified" in r.stderr


def test_initializer_bytes_are_never_trusted_beyond_their_dims(tmp_path):
    g = fc_graph()
    t = g.inits[0]
    big = numpy_helper.from_array(np.ones(4, np.float32), t.name)
    big.dims[:] = [100000, 100000]  # declares 10^10 values, holds 4
    g.inits[0] = big
    _refused(g.save(tmp_path / "big.onnx"), t.name)


def test_a_graph_with_two_outputs_or_inputs_is_refused(tmp_path):
    g = fc_graph()
    proto = g.model()
    proto.graph.output.append(helper.make_tensor_value_info(g.nodes[2].output[0],
                                                            TensorProto.FLOAT, None))
    onnx.save(proto, str(tmp_path / "two.onnx"))
    _refused(tmp_path / "two.onnx", "output")
