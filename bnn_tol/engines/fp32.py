"""The fp32 engine: any BNN, CPU or CUDA, ``maps_per_step`` fault maps batched per step.

Maps ride in the batch/group dimension of stacked +-1 weights (``bmm``, grouped conv); every
pre-activation is rounded to the exact integer it equals (float rounding of any GEMM/conv
algorithm stays far below 1/2 on these values), then compared with the folded thresholds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.compiled import Stage
from bnn_tol.core.layers import apply_folded
from bnn_tol.engines.base import MEMORY_BUDGET, SignEngine, fp32_prefix, register_engine
from bnn_tol.faults.apply import negate_

__all__ = ["Fp32Engine"]


def _fp32_forward(
    stages: list[Stage], out_bn: nn.Module, x: Tensor, ws: list[Tensor], start: int = 0
) -> Tensor:
    """Predictions ``(G, B)`` of ``G`` fault maps at once.

    ``x``: ``(B, ...)`` input of stage ``start`` shared by all maps (float, exact values);
    ``ws[k]``: ``(G, *weight.shape)`` per-map ±1 weights, or ``weight.shape`` when shared.
    Maps ride in the batch/group dimension: a shared input meets stacked weights
    (``(G out, in)`` / ``(G C_out, C_in, k, k)``), per-map inputs use ``bmm`` / grouped conv.
    Pre-activations are rounded to the exact integers ``scale a`` they equal in exact
    arithmetic (float rounding errors of any GEMM/conv algorithm are far below 1/2), then
    compared with the folded thresholds; the last layer's float BatchNorm gets the exact ``a``.
    """
    h, shared, g = x, True, None
    for k in range(start, len(stages)):
        st, w = stages[k], ws[k]
        per_map = w.dim() == st.wb.dim() + 1
        if per_map:
            g = w.shape[0]
        if st.flatten:
            h = h.flatten(1) if shared else h.flatten(2)
        if not st.conv:
            if shared and per_map:
                a = (h @ w.reshape(-1, w.shape[-1]).t()).view(h.shape[0], g, -1).transpose(0, 1)
            elif shared:
                a = h @ w.t()
            elif per_map:
                a = torch.bmm(h, w.transpose(1, 2))
            else:
                a = h @ w.t()
        else:
            pad = st.block.layer.padding
            if shared and per_map:
                a = F.conv2d(h, w.reshape(-1, *w.shape[2:]), padding=pad)
                a = a.view(a.shape[0], g, -1, *a.shape[2:]).transpose(0, 1)
            elif shared:
                a = F.conv2d(h, w, padding=pad)
            elif per_map:
                gb = h.shape[1]
                hh = h.transpose(0, 1).reshape(gb, -1, *h.shape[3:])
                a = F.conv2d(hh, w.reshape(-1, *w.shape[2:]), padding=pad, groups=g)
                a = a.view(gb, g, -1, *a.shape[2:]).transpose(0, 1)
            else:
                a = F.conv2d(h.reshape(-1, *h.shape[2:]), w, padding=pad)
                a = a.view(h.shape[0], h.shape[1], *a.shape[1:])
        shared = shared and not per_map
        ai = torch.round(a * st.scale)  # exact integer scale * a
        cdim = 1 if shared else 2
        if st.hidden:
            h = apply_folded(ai, st.folded, channel_dim=cdim).to(x.dtype)
            if st.pool:
                lead = h.shape[: cdim]
                h = F.max_pool2d(h.reshape(-1, *h.shape[cdim:]), st.pool)
                h = h.view(*lead, *h.shape[1:])
        else:
            a = ai / st.scale
            z = out_bn(a.reshape(-1, a.shape[-1]))
            return z.argmax(1).view(a.shape[:-1])
    raise AssertionError("unreachable: the last stage returns")


@register_engine
class Fp32Engine(SignEngine):
    """``maps_per_step`` maps batched through stacked +-1 weights / ``bmm`` / grouped conv,
    pre-activations rounded to their exact integers (any BNN, CPU or CUDA)."""

    name, rank = "fp32", 1

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        super().__init__(model, data, batch_size=batch_size, maps_per_step=maps_per_step or 8,
                         **kw)
        self.batch_size = batch_size or max(64, min(len(data), MEMORY_BUDGET //
                                                    (self.cm.max_width * 12 * self.g)))
        self.w_dev = [st.wb.to(self.device) for st in self.stages]

    def _input(self, images):  # noqa: D102
        return self.cm.input.to_float(images.to(self.device))

    def _prefix_of(self, h):  # noqa: D102
        return fp32_prefix(self.stages, h, self.w_dev, self.start) if self.start > 0 else h

    def evaluate(self, flips):  # noqa: D102
        n = len(self.data)
        ws = list(self.w_dev)
        flips = [self.by_index(f) for f in flips]
        for k in self.faulty:
            w = self.stages[k].wb.expand(len(flips), *self.stages[k].wb.shape).clone()
            for g, f in enumerate(flips):
                idx = f.get(k)
                if idx is not None:
                    negate_(w[g], idx)
            ws[k] = w.to(self.device)
        correct = torch.zeros(len(flips), dtype=torch.int64, device=self.device)
        for h, y in self._chunks():
            pred = _fp32_forward(self.stages, self.out_bn, h, ws, self.start)
            pred = pred if pred.dim() == 2 else pred.expand(len(flips), -1)
            correct += (pred == y[None, :]).sum(1)
        return [int(c) / n for c in correct.cpu()]
