"""The compiled model is the one view every consumer reads (issue 19): its geometry, its
thresholds on one stated grid and its input transform agree with the model itself."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import randomize_bn
from torch import nn

from bnn_tol import models
from bnn_tol.core.compiled import UnsupportedModel, check_bnn, compile_model
from bnn_tol.core.layers import bn_threshold, fold_threshold
from bnn_tol.data import INPUT, InputGrid

NETS = [
    ("fc", {"hidden": (24, 16)}, (1, 8, 8)),
    ("vgg3", {"channels": ((6,), (8,)), "fc_width": 12}, (1, 9, 7)),  # odd sizes: pool floors
    ("vgg7", {"channels": ((4, 4), (6, 6), (8, 8)), "fc_width": 10}, (3, 16, 16)),
]


@pytest.mark.parametrize(("arch", "kw", "shape"), NETS)
def test_stage_geometry_is_the_shape_the_forward_pass_produces(arch, kw, shape):
    model = randomize_bn(models.build(arch, in_shape=shape, **kw))
    cm = compile_model(model)
    assert cm.in_shape == shape
    x = torch.zeros(2, *shape)
    widths = [math.prod(shape)]
    with torch.no_grad():
        for st, block in zip(cm.stages, model.blocks, strict=True):
            h = x.flatten(1) if st.flatten else x
            assert tuple(h.shape[1:]) == st.in_shape
            a = block.preact(x)
            assert tuple(a.shape[1:]) == st.preact_shape
            x = block(x)
            assert tuple(x.shape[1:]) == st.out_shape
            widths.append(x[0].numel())
    assert cm.max_width == max(widths)


def test_a_model_without_in_shape_compiles_without_geometry():
    model = models.build("fc", hidden=(8,), in_shape=(1, 4, 4))
    del model.config["kwargs"]["in_shape"]
    cm = compile_model(model)
    assert cm.in_shape is None and all(s.out_shape is None for s in cm.stages)
    with pytest.raises(UnsupportedModel, match="in_shape"):
        _ = cm.max_width


@pytest.mark.parametrize(("arch", "kw", "shape"), NETS[:2])
def test_thresholds_are_read_once_on_the_stated_grid(arch, kw, shape):
    model = randomize_bn(models.build(arch, in_shape=shape, **kw))
    with torch.no_grad():
        model.blocks[0].bn.weight[0] = 0.0  # a dead neuron
        model.blocks[0].bn.weight[1] = -0.7  # gamma < 0
    cm = check_bnn(model)
    assert cm.input == INPUT
    for st in cm.hidden:
        bn = st.block.bn
        ref = bn_threshold(bn)
        torch.testing.assert_close(st.tau, ref.tau, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(st.direction, ref.direction)
        scale = bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.double() + bn.eps)
        assert torch.equal(st.bn_scale, scale)
        # the first stage compares k = scale * a (integer inputs q = p - offset), the others a
        assert st.scale == (INPUT.scale if st.kind == "first" else 1)
        f = fold_threshold(bn, scale=st.scale)
        assert all(torch.equal(u, v) for u, v in zip(st.folded, f, strict=True))
    assert int(cm.stages[0].direction[0]) == 0 and int(cm.stages[0].direction[1]) == -1
    with pytest.raises(UnsupportedModel, match="threshold"):
        _ = cm.stages[-1].folded


def test_the_first_stage_comparator_equals_the_float_forward_on_the_input_grid():
    model = randomize_bn(models.build("fc", hidden=(40,), in_shape=(1, 6, 6)))
    st = compile_model(model).stages[0]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (500, 1, 6, 6), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        h = model.blocks[0](INPUT.to_float(images))
    k = INPUT.to_int(images).flatten(1).double() @ st.wb.double().t()  # k = scale * a
    t, d, const = st.folded
    pos = torch.where(d > 0, k >= t, k <= t)
    pos = torch.where(d == 0, const > 0, pos)
    assert torch.equal(torch.where(pos, 1.0, -1.0), h)


def test_a_model_can_declare_another_input_grid_and_bad_ones_are_refused():
    model = models.build("fc", hidden=(8,), in_shape=(1, 4, 4))
    model.input_grid = InputGrid(offset=0, scale=256)
    cm = compile_model(model)
    assert cm.input.offset == 0 and cm.stages[0].scale == 256 and cm.stages[1].scale == 1
    model.input_grid = (128, 128)
    with pytest.raises(UnsupportedModel, match="InputGrid"):
        compile_model(model)


def test_the_integer_arithmetic_refuses_biases_and_strides_naming_the_layer():
    model = models.build("vgg3", in_shape=(1, 8, 8), channels=((4,), (4,)), fc_width=8)
    assert compile_model(model).integer_issue() is None
    model.blocks[1].layer.stride = (2, 2)
    assert "blocks.1.layer" in compile_model(model).integer_issue()
    model = models.build("fc", hidden=(8,), in_shape=(1, 4, 4))
    model.blocks[0].layer.bias = nn.Parameter(torch.zeros(8))
    with pytest.raises(UnsupportedModel, match="blocks.0.layer has a bias"):
        check_bnn(model, what="export", need_integer=True)
