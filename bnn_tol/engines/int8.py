"""The int8 engine: fully connected BNNs as ``torch._int_mm`` (int8 x int8 -> int32) on CPU.

+-1 weights and {0, 1} activation bits are int8; every product sum is an exact int32, compared
with the folded integer thresholds (:attr:`bnn_tol.core.compiled.Stage.folded`). ``"auto"``
picks it for fc BNNs where the CPU has an int8 dot product (:func:`int8_is_fast`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnn_tol.core.compiled import Stage
from bnn_tol.core.kernels import serial
from bnn_tol.data import InputGrid
from bnn_tol.engines.base import SignEngine, register_engine
from bnn_tol.faults.apply import negate_
from bnn_tol.provenance import has_cpu_flag

__all__ = ["Int8Engine", "int8_is_fast", "int8_has_amx", "int8_available", "VNNI_FLAGS"]


def int8_available(device: torch.device) -> bool:
    """``torch._int_mm`` (int8 x int8 -> int32) is used on CPU only; CUDA uses exact fp32."""
    return device.type == "cpu" and hasattr(torch, "_int_mm")


#: CPU feature flags (``/proc/cpuinfo``) with a fast int8 dot product behind ``torch._int_mm``.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


#: Default int8 engine chunk: the widest layer's int32 output per chunk, in bytes.
INT8_CHUNK_BYTES = 4 << 20


def int8_is_fast() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX).

    Without one, ``torch._int_mm`` falls back to a slow kernel: on an AVX2-only AMD EPYC a
    512 x 784 x 1024 product took 3.4 s against 0.11 s in fp32 (one thread), so
    ``engine="auto"`` then picks the fp32 engine (both are exact). ``False`` where
    ``/proc/cpuinfo`` is unreadable.
    """
    return has_cpu_flag(*VNNI_FLAGS)


def int8_has_amx() -> bool:
    """Whether this CPU has AMX int8 tiles (``amx_int8``): there ``engine="auto"`` prefers the
    int8 engine over ``packed`` for fc BNNs (:meth:`bnn_tol.engines.packed.PackedEngine.
    preferred`). ``False`` where ``/proc/cpuinfo`` is unreadable."""
    return has_cpu_flag("amx_int8")


class _Int8Net:
    """Exact integer evaluation of an all-linear BNN with ``torch._int_mm``.

    Activations are kept neuron-major ``(features, B)``. The first layer multiplies int8
    ``q = p - offset`` (so ``scale a = W q`` exactly, on the input grid ``grid``); hidden
    outputs are stored as bits ``b = (h + 1) / 2`` in {0, 1}, so the next pre-activation is
    ``a = 2 W b - rowsum(W)``.
    Rows of ``W`` are multiplied by the BN direction ``d`` so that every comparator reads
    ``W_d b >= ceil((t_d + rowsum(W_d)) / 2)`` (``t_d = d t``; dead neurons: zero row,
    ``t_d = 0`` for constant +1 and ``1`` for constant -1). The last layer feeds the exact
    ``a`` to the model's float BatchNorm and takes ``argmax``: bit-identical to ``model(x)``.
    """

    def __init__(self, stages: list[Stage], out_bn: nn.Module, grid: InputGrid,
                 device: torch.device) -> None:
        self.stages, self.out_bn, self.grid, self.device = stages, out_bn, grid, device
        self.w: list[Tensor] = []  # direction-folded int8 weights (out, in) on device
        self.t: list[Tensor | None] = []  # folded integer thresholds (out,) int64
        self.s: list[Tensor] = []  # row sums of self.w, int64
        for st in stages:
            w = st.wb.to(torch.int8)
            if st.hidden:
                f = st.folded
                d = f.direction.to(torch.int64)
                w = w * d[:, None].to(torch.int8)
                t = torch.where(d > 0, f.t, -f.t)
                t = torch.where(d == 0, torch.where(f.const > 0, 0, 1), t)
                self.t.append(t)
            else:
                self.t.append(None)
            self.w.append(w.contiguous())
            self.s.append(w.sum(1, dtype=torch.int64))
        self.w_dev = [w.to(device) for w in self.w]

    def comparator(self, k: int, s: Tensor) -> Tensor:
        """Stage ``k``'s output rule: int32 ``(out, 1)`` threshold on ``W_d input``, or for the
        last stage the float64 row sums ``(out,)`` (``a = 2 W b - s``)."""
        if not self.stages[k].hidden:
            return s.to(torch.float64)
        t = self.t[k]
        thr = t if k == 0 else -torch.div(-(t + s), 2, rounding_mode="floor")
        return thr.to(torch.int32)[:, None].to(self.device)

    def clean(self) -> tuple[list[Tensor], list[Tensor]]:
        """Clean weights and comparators of every stage."""
        return list(self.w_dev), [self.comparator(k, s) for k, s in enumerate(self.s)]

    def unit_weights(self, flips: dict[int, Tensor], base=None) -> tuple[list[Tensor],
                                                                         list[Tensor]]:
        """Weights and comparators with the stored bits at ``flips[k]`` (flat indices) negated."""
        ws, cs = base if base is not None else self.clean()
        ws, cs = list(ws), list(cs)
        with serial():
            self._flip_into(flips, ws, cs)
        return ws, cs

    def _flip_into(self, flips: dict[int, Tensor], ws: list[Tensor], cs: list[Tensor]) -> None:
        for k, idx in flips.items():
            if idx.numel() == 0:
                continue
            w = self.w[k].clone()
            old = w.view(-1)[idx]
            negate_(w, idx)
            rows = torch.div(idx, w.shape[1], rounding_mode="floor")
            cs[k] = self.comparator(k, self.s[k].index_add(0, rows, -2 * old.to(torch.int64)))
            ws[k] = w.to(self.device)

    def input(self, images: Tensor) -> Tensor:
        """uint8 ``(B, C, H, W)`` -> int8 ``q = p - offset`` neuron-major ``(C H W, B)``."""
        q = self.grid.to_int(images, torch.int16).reshape(images.shape[0], -1).to(torch.int8)
        return q.t().contiguous().to(self.device)

    def run(self, h: Tensor, start: int, ws: list[Tensor], cs: list[Tensor]) -> Tensor:
        """Forward from stage ``start`` (input ``h`` neuron-major) -> predictions ``(B,)``."""
        for k in range(start, len(self.stages)):
            h = self.step(k, h, ws[k], cs[k])
        return h

    def step(self, k: int, h: Tensor, w: Tensor, c: Tensor) -> Tensor:
        """One stage: hidden -> bits int8 ``(out, B)``; last -> predictions ``(B,)``."""
        st = self.stages[k]
        r = torch._int_mm(w, h)  # (out, B) int32, exact
        if st.hidden:
            return (r >= c).view(torch.int8)
        with serial():  # (B, n_classes): tiny
            a = r.t().contiguous().to(torch.float64)
            a = a / float(st.scale) if k == 0 else 2.0 * a - c
            return self.out_bn(a.to(torch.float32)).argmax(1)



@register_engine
class Int8Engine(SignEngine):
    """``torch._int_mm`` int8 x int8 -> int32 on +-1 weights, folded integer thresholds, bits
    as activations (fully connected BNNs on CPU; ``"auto"`` only with VNNI/AMX)."""

    name, rank = "int8", 0

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        if not (cm.all_linear and int8_available(device)):
            return "it needs an all-linear model (fc) on CPU; use 'fp32'"
        lim = torch.iinfo(torch.int8)
        lo, hi = cm.input.q_range
        if not lim.min <= lo <= hi <= lim.max:
            return f"its input integers q in {lo}..{hi} ({cm.input.describe()}) do not fit int8"
        return None

    @classmethod
    def preferred(cls, cm, device):  # noqa: D102
        return int8_is_fast()

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        super().__init__(model, data, batch_size=batch_size, maps_per_step=1, **kw)
        # chunks whose widest int32 product fits ~4 MiB (cache-sized): on a 2-core Xeon with
        # AMX, fc 2048-2048 took 0.17 s per map in chunks of 512 against 0.32 s in one 10k
        # chunk (fc 512-512: 0.034 s at 2048 against 0.060 s)
        widest = max(st.wb.shape[0] for st in self.stages)
        self.batch_size = batch_size or max(256, min(len(data), INT8_CHUNK_BYTES //
                                                     (4 * widest) // 64 * 64))
        self.net = _Int8Net(self.stages, self.out_bn, self.cm.input, self.device)
        self._clean_wc = self.net.clean()

    def _input(self, images):  # noqa: D102
        return self.net.input(images)

    def _prefix_of(self, h):  # noqa: D102
        ws, cs = self.net.clean()
        for k in range(self.start):
            h = self.net.step(k, h, ws[k], cs[k])
        return h

    def evaluate(self, flips):  # noqa: D102
        n, out = len(self.data), []
        for f in flips:
            ws, cs = self.net.unit_weights(self.by_index(f), self._clean_wc)
            correct = 0
            for h, y in self._chunks():
                pred = self.net.run(h, self.start, ws, cs)
                correct += int((pred.to(y.device) == y).sum())
            out.append(correct / n)
        return out
