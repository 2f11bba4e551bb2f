import pytest
import torch

from bnn_tol import models
from bnn_tol.core.layers import BinaryConv2d, BinaryLinear


def test_registry_lists_anchor_models_and_rejects_unknown():
    assert {"fc", "vgg3", "vgg7"} <= set(models.available())
    with pytest.raises(ValueError, match="available: custom, fc, graph, vgg3, vgg7"):
        models.build("resnet18")


@pytest.mark.parametrize(
    ("name", "kwargs", "x_shape", "n_layers"),
    [
        ("fc", {}, (3, 1, 28, 28), 3),
        ("fc", {"hidden": (32, 16, 8)}, (3, 1, 28, 28), 4),
        ("vgg3", {"channels": ((8,), (8,)), "fc_width": 32}, (3, 1, 28, 28), 4),
        ("vgg7", {"channels": ((4, 4), (8, 8), (8, 8)), "fc_width": 16}, (2, 3, 32, 32), 8),
    ],
)
def test_models_output_class_scores(name, kwargs, x_shape, n_layers):
    m = models.build(name, **kwargs, in_shape=x_shape[1:]).eval()
    z = m(torch.zeros(x_shape))
    assert z.shape == (x_shape[0], 10)
    assert len(m.binary_layers()) == n_layers
    assert not m.blocks[-1].binary_output and all(b.binary_output for b in m.blocks[:-1])


def test_default_architectures_match_the_anchor_work():
    fc = models.build("fc")
    assert [tuple(layer.weight.shape) for layer in fc.binary_layers().values()] == [
        (2048, 784), (2048, 2048), (10, 2048)]
    vgg3 = models.build("vgg3")
    shapes = [tuple(layer.weight.shape) for layer in vgg3.binary_layers().values()]
    assert shapes == [(64, 1, 3, 3), (64, 64, 3, 3), (2048, 3136), (10, 2048)]
    vgg7 = models.build("vgg7")
    kinds = [type(m) for m in vgg7.binary_layers().values()]
    assert kinds == [BinaryConv2d] * 6 + [BinaryLinear] * 2
    assert vgg7.binary_layers()["blocks.6.layer"].weight.shape == (1024, 512 * 4 * 4)


def test_hidden_activations_are_plus_minus_one():
    m = models.build("vgg3", channels=((4,), (4,)), fc_width=8).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for block in m.blocks[:-1]:
        x = block(x)
        assert set(x.unique().tolist()) <= {-1.0, 1.0}


def test_same_seed_same_weights_different_seed_different():
    a, b, c = (models.build("fc", hidden=(16,), seed=s) for s in (0, 0, 1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.blocks[0].layer.weight, c.blocks[0].layer.weight)


def test_wrong_input_shape_is_a_clear_error():
    m = models.build("fc", hidden=(8,))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 1, 28, 28\)"):
        m(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="in_shape"):
        models.build("fc", in_shape=(28, 28))


def test_summary_counts_binary_parameters_and_memory():
    text = models.summary(models.build("fc"))
    assert "5,820,416 weights in 5,820,416 stored bits" in text
    assert models.memory_bits(models.build("fc")) == 5_820_416
    assert models.memory_bits(models.build("fc", weight_bits=4)) == 4 * 5_820_416
    assert len(text.splitlines()) == 1 + 3 + 1
