"""The fixed engine: any codec (m-bit fixed point or sign), any activation, CPU or CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bnn_tol.core.compiled import compile_model, eval_mode
from bnn_tol.core.graph import GraphBNN
from bnn_tol.engines.base import CHAINS_ONLY, Engine, register_engine

__all__ = ["FixedPointEngine"]


@register_engine
class FixedPointEngine(Engine):
    """Exact engine for any codec (m-bit fixed point or sign), any activation, CPU or CUDA.

    Per map it flips the stored bits in a cached copy of the codes (``code_j ^= 2^b`` for each
    flipped bit ``i = j m + b``), decodes the layer (``numel`` work, nothing like a forward
    pass), and runs the model's own ops -- ``F.linear``/conv, ``block.post`` (BN, activation,
    pool) -- on the same batches as :func:`accuracy`, from the clean output of the last
    error-free block (computed once per chunk). Same ops on the same shapes as the naive loop
    (deepcopy, flip, decode, ``model(x)``), so the predictions are the same bit for bit,
    without the copy and the clean prefix.
    """

    name, rank = "fixed", 2

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        if isinstance(cm, GraphBNN):
            return CHAINS_ONLY
        return "it needs a bnn_tol block model (.blocks)" if cm is None else None

    def __init__(self, model, data, **kw) -> None:
        super().__init__(model, data, **kw)
        self.cm = compile_model(model)
        self.faulty = [s.index for s in self.cm.stages if s.name in self.chosen]
        self.start = self.faulty[0] if self.faulty else len(self.cm.stages)
        self.codes, self.clean_w, self.stored = {}, {}, {}
        with torch.no_grad():
            for s in self.cm.stages:
                codes = s.codec.encode(s.layer.weight.detach())
                self.codes[s.index] = codes
                self.clean_w[s.index] = s.codec.decode(codes).to(s.layer.weight.dtype)
                if s.index in self.faulty:  # the memory image in the +-1 convention of errors
                    self.stored[s.index] = s.codec.to_bits(codes).to(torch.float32) * 2 - 1
        self._prefix: list[tuple[Tensor, Tensor]] | None = None

    def flips(self, fmap, p01, p10):  # noqa: D102
        return {self.cm.stages[k].name: fmap[self.cm.stages[k].name].flips(self.stored[k], p01,
                                                                          p10)
                for k in self.faulty}

    def _weights(self, k: int, idx: Tensor | None) -> Tensor:
        s = self.cm.stages[k]
        if idx is None or idx.numel() == 0:
            return self.clean_w[k]
        return s.codec.decode(s.codec.flip(self.codes[k], idx)).to(s.layer.weight.dtype)

    def _block(self, k: int, x: Tensor, w: Tensor) -> Tensor:
        s = self.cm.stages[k]
        if s.flatten:
            x = x.flatten(1)
        w = w.to(x.device)
        a = s.layer._conv_forward(x, w, s.layer.bias) if s.conv else F.linear(x, w, s.layer.bias)
        return s.block.post(a)

    def _chunks(self):
        if self._prefix is None:
            self._prefix = []
            with torch.no_grad(), eval_mode(self.model):
                for x, y in self.data.batches(self.batch_size, device=self.device,
                                                 grid=self.cm.input):
                    if x.dim() == 2 and len(self.model.in_shape) == 3:
                        x = x.view(-1, *self.model.in_shape)
                    for k in range(self.start):
                        x = self._block(k, x, self.clean_w[k])
                    self._prefix.append((x, y))
        return self._prefix

    def evaluate(self, flips):  # noqa: D102
        n, out = len(self.data), []
        with torch.no_grad(), eval_mode(self.model):
            for f in flips:
                ws = {s.index: self._weights(s.index, f.get(s.name)) for s in self.cm.stages}
                correct = 0
                for x, y in self._chunks():
                    for k in range(self.start, len(self.cm.stages)):
                        x = self._block(k, x, ws[k])
                    correct += int((x.argmax(1) == y).sum())
                out.append(correct / n)
        return out

