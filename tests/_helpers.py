"""Helpers shared by the metric tests."""

import torch


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
