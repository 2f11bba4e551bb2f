"""Helpers shared by the metric tests."""

import torch

from bnn_tol import models


def randomize_bn(model, seed=1):
    """Random BN statistics and affine parameters (gamma of both signs), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.blocks:
            c = b.bn.num_features
            b.bn.running_mean.copy_(torch.randn(c, generator=g) * 3)
            b.bn.running_var.copy_(torch.rand(c, generator=g) * 20 + 1)
            b.bn.weight.copy_(torch.randn(c, generator=g))
            b.bn.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def small_bnn(arch, kw, seed=1):
    """A small BNN on 1x8x8 inputs with random BN statistics, a dead neuron (gamma = 0) in
    block 0 and a gamma < 0 channel in block 1, eval mode (export/ONNX tests)."""
    from bnn_tol import models

    g = torch.Generator().manual_seed(seed)
    m = models.build(arch, in_shape=(1, 8, 8), seed=seed, **kw)
    with torch.no_grad():
        for b in m.blocks:
            b.bn.running_mean.normal_(0, 2, generator=g)
            b.bn.running_var.uniform_(1, 4, generator=g)
        m.blocks[0].bn.weight[1] = 0.0
        m.blocks[1].bn.weight[0] = -0.6
    return m.eval()


def plain_accuracy(model, test) -> float:
    """Accuracy of ``model`` by its own forward pass, 500 images at a time (no library path)."""
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in test.batches(500)])
    return float((pred == test.labels).double().mean())


def quadrants(n: int = 256, seed: int = 0):
    """A learnable synthetic task on 1x8x8 images: the class is the brightest of the 4 image
    quadrants (plus noise)."""
    from bnn_tol.data import BNNDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    img = torch.randint(0, 100, (n, 1, 8, 8), generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        img[y == q, :, 4 * r: 4 * r + 4, 4 * c: 4 * c + 4] += 150
    return BNNDataset(img.clamp(0, 255).to(torch.uint8), y, name="quadrants",
                      classes=[str(i) for i in range(4)])


def conv_node(name, src, c_in, c_out, k=3):
    """A ``graph`` node spec: a binary conv, ``k // 2`` padding."""
    return {"name": name, "op": "binary", "inputs": [src], "type": "conv", "in": c_in,
            "out": c_out, "kernel": k, "padding": k // 2}


def bn_node(name, src, c, conv=True):
    """A ``graph`` node spec: an affine BatchNorm, eps 1e-5."""
    return {"name": name, "op": "bn", "inputs": [src], "features": c, "conv": conv,
            "eps": 1e-5, "affine": True}


def random_bn(model, seed=1):
    """Every BatchNorm module's statistics and affine parameters drawn at random (gamma of
    both signs, ``N(0, 2)`` means, variances in ``[1, 9]``), so that bit errors change
    predictions; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 2, generator=g)
                mod.running_var.uniform_(1, 9, generator=g)
                mod.weight.uniform_(-1, 1.5, generator=g)
                mod.bias.normal_(0, 0.5, generator=g)
    return model.eval()


def random_graph(nodes, *, dead: str, in_shape=(1, 8, 8), seed: int = 2):
    """A ``graph`` model of ``nodes`` with :func:`random_bn` BatchNorms (seed 1) and channel 2
    of BatchNorm node ``dead`` dead (gamma = 0), eval mode."""
    m = random_bn(models.build("graph", nodes=nodes, in_shape=in_shape, seed=seed))
    with torch.no_grad():
        m.ops[dead].weight[2] = 0.0
    return m
