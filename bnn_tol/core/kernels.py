"""Packed-bit XNOR/popcount kernels (numba) for exact BNN inference on CPU.

A +-1 value is stored as one bit, ``bit = (v + 1) / 2`` (+1 -> 1, -1 -> 0), 64 to a ``uint64``
word, least significant bit first. For +-1 vectors ``w, x`` of length ``n`` the dot product is

    w . x = n - 2 popcount(bits(w) XOR bits(x)),

an integer, so every kernel here is exact. Layouts (``nw = ceil(C / 64)`` words per position,
unused high bits zero in weights and activations alike, so they never count):

- fully connected activations ``(B, nw)``; weights ``(O, nw)`` (rows), transposed ``(nw, O)``
  for :func:`fc_hidden`;
- conv activations channels-last ``(B, H, W, nw)``; weights transposed ``(k k nw, O)`` (taps
  ``(i, j, word)`` major).

The hidden-layer kernels (:func:`fc_hidden`, :func:`conv_hidden`) read both as 32-bit half-words
(the activations as their uint64 array viewed as uint32, little-endian; the weights through
:func:`_halves`) in register tiles of two samples or positions x 64 units where the CPU has
AVX-512 VPOPCNTDQ (:data:`TILES`); elsewhere they keep the counts in memory (:func:`_taps`).

Hidden layers end in the folded comparator of :func:`bnn_tol.layers.fold_threshold`, written
branch-free per output unit ``o`` as ``bit = d_o a >= td_o`` (``d_o = +-1``, ``td_o = d_o t_o``;
a dead unit has ``d_o = 0`` and ``td_o = 0`` for constant +1, ``1`` for constant -1). The output
layer returns the exact integer pre-activations ``a``.

Parallel over samples (``numba.prange``); the thread count is numba's, which callers set to
torch's (:func:`threads`). Numba is optional: :data:`AVAILABLE` says whether it imported.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

try:  # optional dependency: the packed engine is unsupported without it
    import numba
    from llvmlite import binding as llvm_binding
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    AVAILABLE = False

__all__ = ["AVAILABLE", "TILES", "threads", "serial", "comparator", "pack_rows", "pack_threshold",
           "fc_hidden", "fc_output", "conv_windows", "conv_hidden", "conv_first",
           "fc_first_delta", "pool_or",
           "flip_words", "gap_positions", "negate_at", "margin_rows", "margin_cols",
           "margin_comoments", "near_threshold_preact", "rank1_preact",
           "argmax_classes"]


def comparator(direction: np.ndarray, t: np.ndarray, const: np.ndarray) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """``(d, td)`` int64 ``(O,)`` of the branch-free rule ``bit = d a >= td`` (see module)."""
    d = np.asarray(direction, dtype=np.int64)
    td = np.where(d == 0, np.where(np.asarray(const) > 0, 0, 1), d * np.asarray(t, np.int64))
    return d, td.astype(np.int64)


@contextmanager
def threads(n: int):
    """Run numba's parallel kernels on ``n`` threads inside the block."""
    if not AVAILABLE:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


@contextmanager
def serial() -> Iterator[None]:
    """Run light tensor ops (sampling, index bookkeeping) on one intra-op thread.

    Ops on ~1e4-1e6 elements gain nothing from a second thread, and on a busy machine each
    parallel region waits for a scheduler slice (measured: fault_map 0.78 s with 2 threads vs
    0.04 s with 1 under load). Results are identical. Only the main thread changes the setting
    (``torch.set_num_threads`` is process-global), so worker threads are never affected.
    """
    n = torch.get_num_threads()
    if n == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def pack_rows(v: np.ndarray) -> np.ndarray:
    """Pack +-1 (or {0, 1}) values along the last axis: ``(..., C)`` -> uint64 ``(..., nw)``."""
    bits = np.asarray(v) > 0
    c = bits.shape[-1]
    nw = -(-c // 64)
    padded = np.zeros((*bits.shape[:-1], nw * 64), dtype=bool)
    padded[..., :c] = bits
    by = np.packbits(padded.reshape(-1, nw * 64), axis=1, bitorder="little")
    return by.view(np.uint64).reshape(*bits.shape[:-1], nw).copy()


def conv_windows(in_hw: tuple[int, int], k: int, pad: int, c_in: int, tap_pop: np.ndarray,
                 d: np.ndarray, td: np.ndarray) -> tuple[np.ndarray, ...]:
    """The comparator of a hidden stride-1 ``k x k`` conv as popcount windows per border
    class, for :func:`conv_hidden`.

    A position whose patch has ``n_v`` taps inside the image has ``a = n_v c_in - 2 s``, ``s``
    the popcount over those taps, and the bit ``d a >= td`` is the window ``lo <= s <= lo +
    span`` of ``_count_window`` on ``n = n_v c_in``. :func:`conv_hidden` counts the padding
    taps too, as zero words (``popcount(0 XOR w) = popcount(w)``), i.e. ``s + P`` with ``P``
    the popcount of the missing taps' weights, so the window is shifted by ``P``. Positions
    missing the same taps share one window: a row class (which kernel rows ``i`` fall inside)
    times a column class, at most ``(2 pad + 1)^2`` of them.

    Args:
        in_hw: input ``(H, W)``; output ``Ho = H + 2 pad - k + 1`` (likewise ``Wo``).
        tap_pop: int64 ``(k k, O)``, popcount of each tap's weight words.
        d, td: int64 ``(O,)``, the rule of :func:`comparator`.

    Returns:
        ``rc`` int64 ``(Ho,)`` and ``cc`` ``(Wo,)``: each output row's / column's class;
        ``lo`` int64 ``(n_rc, n_cc, O)`` and ``span`` uint64 ``(n_rc, n_cc, O)``.
    """
    def classes(n_in: int) -> tuple[np.ndarray, np.ndarray]:
        inside = np.array([[0 <= o + i - pad < n_in for i in range(k)]
                           for o in range(n_in + 2 * pad - k + 1)], dtype=bool)
        masks, ids = np.unique(inside, axis=0, return_inverse=True)
        return ids.reshape(-1).astype(np.int64), masks

    rc, rows = classes(in_hw[0])
    cc, cols = classes(in_hw[1])
    taps = np.asarray(tap_pop, np.int64).reshape(k, k, -1)
    lo = np.empty((len(rows), len(cols), taps.shape[2]), np.int64)
    span = np.empty(lo.shape, np.uint64)
    for a, rv in enumerate(rows):
        for b, cv in enumerate(cols):
            inside = np.outer(rv, cv)
            lo[a, b], span[a, b] = _count_window(int(inside.sum()) * c_in, d, td)
            lo[a, b] += taps[~inside].sum(0)
    return rc, cc, lo, span


if AVAILABLE:

    def _has_vpopcntdq() -> bool:
        """Whether numba compiles for a CPU with AVX-512 VPOPCNTDQ: its ``NUMBA_CPU_FEATURES``
        when set, else the host's."""
        features = numba.config.CPU_FEATURES or llvm_binding.get_host_cpu_features().flatten()
        return "+avx512vpopcntdq" in features.split(",")

    @intrinsic
    def _popcount(typingctx, x):
        sig = types.int64(types.uint64)

        def codegen(context, builder, signature, args):
            fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
            return builder.call(fn, args)

        return sig, codegen

    @njit(parallel=True, cache=True, nogil=True)
    def pack_threshold(a, d, td, out):  # pragma: no cover - compiled
        """Threshold + pack: ``a`` ``(B, P, O)`` integer-valued floats (P positions,
        O channels) -> ``out`` uint64 ``(B, P, ceil(O / 64))``."""
        nb, npos, no = a.shape
        for b in prange(nb):
            for p in range(npos):
                for o0 in range(0, no, 64):
                    word = np.uint64(0)
                    for o in range(o0, min(no, o0 + 64)):
                        if d[o] * np.int64(a[b, p, o]) >= td[o]:
                            word |= np.uint64(1) << np.uint64(o - o0)
                    out[b, p, o0 // 64] = word

    @njit(inline="always", nogil=True)
    def _dot4x2(x, b0, b1, b2, b3, w, o0, o1):  # pragma: no cover - compiled
        """``popcount(x[b] XOR w[o])`` summed over the words, for samples ``b0..b3`` x rows
        ``o0, o1``: one load of each weight word serves 4 samples (register blocking)."""
        s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = 0
        for k in range(x.shape[1]):
            v0, v1 = w[o0, k], w[o1, k]
            x0, x1, x2, x3 = x[b0, k], x[b1, k], x[b2, k], x[b3, k]
            s00 += _popcount(x0 ^ v0)
            s01 += _popcount(x0 ^ v1)
            s10 += _popcount(x1 ^ v0)
            s11 += _popcount(x1 ^ v1)
            s20 += _popcount(x2 ^ v0)
            s21 += _popcount(x2 ^ v1)
            s30 += _popcount(x3 ^ v0)
            s31 += _popcount(x3 ^ v1)
        return s00, s01, s10, s11, s20, s21, s30, s31

    @njit(nogil=True)
    def _count_window(n, d, td):  # pragma: no cover - compiled
        """The rule ``d a >= td`` on ``a = n - 2 s`` as a window on the popcount ``s`` in
        ``[0, n]``: ``bit = lo <= s <= lo + span``, one unsigned compare ``uint64(s - lo) <=
        span``. ``d = 1``: ``s <= floor((n - td) / 2)``; ``d = -1``: ``s >= ceil((n + td) /
        2)``; dead: all ``s`` (``td <= 0``) or none (an empty window: ``lo = n + 1``,
        ``span = 0``)."""
        n_o = d.shape[0]
        lo = np.empty(n_o, np.int64)
        span = np.empty(n_o, np.uint64)
        for o in range(n_o):
            a, b = 0, n
            if d[o] > 0:
                b = (n - td[o]) // 2
            elif d[o] < 0:
                a = -((-(n + td[o])) // 2)
            elif td[o] > 0:
                a = n + 1
            a, b = max(a, 0), min(b, n)
            if b < a:
                a, b = n + 1, n + 1
            lo[o] = a
            span[o] = np.uint64(b - a)
        return lo, span

    @njit(parallel=True, cache=True, nogil=True)
    def _fc_hidden_tiles(x, w_t, n, d, td, out):  # pragma: no cover - compiled
        """``x`` ``(B, nw)`` (C-contiguous), weights transposed ``w_t`` ``(nw, O)``, ``n``
        inputs -> bits ``out`` ``(B, ceil(O / 64))``.

        The conv kernel's register tiles on a 1 x 1 "image" per sample (:func:`_tiles` over
        the half-words ``0 .. 2 nw - 1``): two samples x 64 units, the counts in registers
        over all words, the comparator the window of :func:`_count_window` on the popcount.
        An odd last sample is computed twice, writing the same bits. About as fast as the
        previous kernel on a 2048 x 2048 layer (0.95-1.17x in three same-run A/Bs)."""
        nb, nw = x.shape
        n_o = w_t.shape[1]
        lo, span = _count_window(n, d, td)
        lo2, span2 = _windows32(lo.reshape((1, n_o)), span.reshape((1, n_o)))
        xf, w_h = x.ravel().view(np.uint32), _halves(w_t)
        off = np.arange(2 * nw)
        for ip in prange((nb + 1) // 2):
            b0 = 2 * ip
            b1 = min(b0 + 1, nb - 1)
            _tiles(xf, off, w_h, 2 * nw * b0, 2 * nw * b1, lo2, span2, 0, 0, out, b0, b1)

    @njit(parallel=True, cache=True, nogil=True)
    def fc_output(x, w, n, out):  # pragma: no cover - compiled
        """``x`` ``(B, nw)``, weight rows ``w`` ``(O, nw)`` -> exact ``a`` int64 ``out``
        ``(B, O)``. Tiles of 4 samples x 2 units (:func:`_dot4x2`); a tail tile repeats the
        last sample or unit (clamped indices), which recomputes and rewrites the same
        values."""
        nb = x.shape[0]
        n_o = w.shape[0]
        for ib in prange((nb + 3) // 4):
            b0 = 4 * ib
            b1, b2, b3 = min(b0 + 1, nb - 1), min(b0 + 2, nb - 1), min(b0 + 3, nb - 1)
            for o0 in range(0, n_o, 2):
                o1 = min(o0 + 1, n_o - 1)
                s00, s01, s10, s11, s20, s21, s30, s31 = _dot4x2(x, b0, b1, b2, b3, w, o0, o1)
                out[b0, o0], out[b0, o1] = n - 2 * s00, n - 2 * s01
                out[b1, o0], out[b1, o1] = n - 2 * s10, n - 2 * s11
                out[b2, o0], out[b2, o1] = n - 2 * s20, n - 2 * s21
                out[b3, o0], out[b3, o1] = n - 2 * s30, n - 2 * s31

    # The register tile: 64 units x two positions, the units' weights as 32-bit half-words
    # in the lanes of a <64 x i32> (four zmm registers per position), the counts in registers
    # across all the words (LLVM IR written here: numba's loops kept them in memory). Same-run
    # A/B (9 interleaved rounds) against the counts-in-memory kernel (four words per pass, the
    # comparator packed bit by bit): conv 64 -> 64 on 14x14 1.66x, 256 -> 256 on 8x8 1.16x,
    # 512 -> 512 on 7x7 1.05x, fc 2048 -> 2048 0.95-1.17x (three runs). 32-bit lanes against
    # 64-bit lanes: 1.08x on the 64-channel conv (half the compares and mask merges per
    # position), 1.06x on 256, 0.96x on 512, 1.07x on the fc layer.
    _LANES = 64
    _I32 = ir.IntType(32)
    _VEC = ir.VectorType(_I32, _LANES)

    def _splat(builder, x):
        """``x`` (i32) in every lane of a ``<64 x i32>``."""
        one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), x, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined), ir.Constant(
            ir.VectorType(_I32, _LANES), [0] * _LANES))

    def _lane_loader(builder, masked, nv):
        """``load(pointer) -> <64 x i32>``: all 64 lanes, or with ``masked`` the first ``nv``
        (a masked load; the other lanes read as 0, so a tile may end past the last unit)."""
        if not masked:
            return lambda ptr: builder.load(ptr, typ=_VEC, align=4)
        mask = builder.icmp_unsigned("<", ir.Constant(_VEC, list(range(_LANES))),
                                     _splat(builder, builder.trunc(nv, _I32)))
        masked_load = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _VEC, [ir.PointerType(), _I32, mask.type, _VEC]), "llvm.masked.load.v64i32.p0")
        return lambda ptr: builder.call(masked_load, [ptr, ir.Constant(_I32, 4), mask,
                                                      ir.Constant(_VEC, None)])

    def _tile_counts(context, builder, sig, args, load):
        """IR of the register tile: ``<64 x i32>`` counts of units ``o0 .. o0 + 63`` at two
        positions, ``acc_p = sum_r popcount(xf[q_p + off[r]] XOR w_h[r, o0:o0 + 64])``
        (``args``: ``xf`` uint32 (1-d), ``off`` int64 ``(n_r,)``, ``w_h`` uint32 ``(n_r,
        O)``, ``q0, q1, o0``), held in registers across every half-word ``r``; ``load`` from
        :func:`_lane_loader`."""
        xf, off, w_h = (context.make_array(t)(context, builder, v)
                        for t, v in zip(sig.args[:3], args[:3], strict=True))
        q0, q1, o0 = args[3:6]
        n_r = builder.extract_value(off.shape, 0)
        n_o = builder.extract_value(w_h.shape, 1)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC]),
                                               "llvm.ctpop.v64i32")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_VEC, None)) for _ in range(2)]
        with cgutils.for_range(builder, n_r) as loop:
            r = loop.index
            o = builder.load(builder.gep(off.data, [r]))
            w = load(builder.gep(w_h.data, [builder.add(builder.mul(r, n_o), o0)]))
            for acc, q in zip(accs, (q0, q1), strict=True):
                x = builder.load(builder.gep(xf.data, [builder.add(q, o)]))
                pop = builder.call(ctpop, [builder.xor(w, _splat(builder, x))])
                builder.store(builder.add(builder.load(acc), pop), acc)
        return [builder.load(acc) for acc in accs]

    def _window_tile(masked):
        """``tile(xf, off, w_h, q0, q1, o0, nv, lo, span, c0, c1) -> (word_0, word_1)``: the
        comparator bits of units ``o0 .. o0 + 63`` at two positions, ``bit_o = uint32(s_p[o]
        - lo[c_p, o0 + o]) <= span[c_p, o0 + o]`` (the window ``lo <= s <= lo + span`` of
        :func:`_count_window`, one unsigned compare per lane; the 64 lanes' compares bitcast
        to the word), ``s_p`` the counts of :func:`_tile_counts`; ``lo`` int32, ``span``
        uint32 ``(classes, O)``, ``c_p`` the position's class. ``masked``: the last ``nv <
        64`` units only (bits ``nv ..`` are 0); otherwise ``nv`` is ignored."""

        @intrinsic
        def tile(typingctx, xf, off, w_h, q0, q1, o0, nv, lo, span, c0, c1):
            sig = types.UniTuple(types.uint64, 2)(xf, off, w_h, types.intp, types.intp,
                                                  types.intp, types.intp, lo, span,
                                                  types.intp, types.intp)

            def codegen(context, builder, signature, args):
                load = _lane_loader(builder, masked, args[6])
                accs = _tile_counts(context, builder, signature, args, load)
                lo_a, span_a = (context.make_array(t)(context, builder, v)
                                for t, v in zip(signature.args[7:9], args[7:9], strict=True))
                n_o = builder.extract_value(lo_a.shape, 1)
                words = []
                for acc, c in zip(accs, args[9:11], strict=True):
                    at = builder.add(builder.mul(c, n_o), args[5])
                    bits = builder.icmp_unsigned("<=", builder.sub(acc, load(
                        builder.gep(lo_a.data, [at]))), load(builder.gep(span_a.data, [at])))
                    words.append(builder.bitcast(bits, ir.IntType(64)))
                if masked:  # lanes past the last unit are no units: clear their bits
                    keep = builder.lshr(ir.Constant(ir.IntType(64), -1),
                                        builder.sub(ir.Constant(ir.IntType(64), 64), args[6]))
                    words = [builder.and_(word, keep) for word in words]
                return context.make_tuple(builder, signature.return_type, words)

            return sig, codegen

        return tile

    _tile = _window_tile(False)
    _tile_tail = _window_tile(True)

    @intrinsic
    def _tile_sum(typingctx, xf, off, w_h, q0, q1, o0):
        """``(sum(acc_0), sum(acc_1))`` of a full register tile over its 64 units, no
        comparator (the popcount roofline's blocking in ``benchmarks/bench_popcount.py``)."""
        sig = types.UniTuple(types.int64, 2)(xf, off, w_h, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            accs = _tile_counts(context, builder, signature, args,
                                _lane_loader(builder, False, None))
            add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                _I32, [_VEC]), "llvm.vector.reduce.add.v64i32")
            return context.make_tuple(builder, signature.return_type, [
                builder.sext(builder.call(add, [acc]), ir.IntType(64)) for acc in accs])

        return sig, codegen

    @njit(nogil=True)
    def _empty64(rows, cols, dtype):  # pragma: no cover - compiled
        """An uninitialized C-contiguous ``(rows, cols)`` array of a 4-byte ``dtype`` whose data
        starts on a 64-byte boundary: a tile's zmm loads then never straddle two cache lines
        (measured on the 2048 x 2048 layer: 2217 G MAC/s aligned, 1643-1839 at offsets of 4,
        16 and 32 bytes; numba aligns its arrays to 32 bytes only,
        ``BaseContext.get_preferred_array_alignment``)."""
        buf = np.empty(rows * cols + 15, dtype)
        start = (-(buf.ctypes.data // 4)) % 16
        return buf[start:start + rows * cols].reshape((rows, cols))

    @njit(nogil=True)
    def _halves(w_t):  # pragma: no cover - compiled
        """Transposed weight words ``(n_r, O)`` uint64 -> half-words ``(2 n_r, O)`` uint32
        (64-byte aligned), row ``2 r`` the low and ``2 r + 1`` the high 32 bits of row ``r``
        (the order of a little-endian uint64 array viewed as uint32, as the activations are
        read)."""
        n_r, n_o = w_t.shape
        out = _empty64(2 * n_r, n_o, np.uint32)
        for r in range(n_r):
            for o in range(n_o):
                out[2 * r, o] = np.uint32(w_t[r, o] & np.uint64(0xFFFFFFFF))
                out[2 * r + 1, o] = np.uint32(w_t[r, o] >> np.uint64(32))
        return out

    @njit(nogil=True)
    def _windows32(lo, span):  # pragma: no cover - compiled
        """Windows ``(classes, O)`` int64 / uint64 -> int32 / uint32, 64-byte aligned (the
        lanes of :func:`_tile`; every count and bound is far below 2^31)."""
        n_c, n_o = lo.shape
        lo32, span32 = _empty64(n_c, n_o, np.int32), _empty64(n_c, n_o, np.uint32)
        for c in range(n_c):
            for o in range(n_o):
                lo32[c, o], span32[c, o] = np.int32(lo[c, o]), np.uint32(span[c, o])
        return lo32, span32

    @njit(nogil=True)
    def _tap_offsets(k, wp, nw):  # pragma: no cover - compiled
        """``off`` int64 ``(k k nw,)``: tap word ``((i, j), c)``'s offset in a zero-bordered
        image ``(Hp, wp, nw)`` (flattened) from its patch's first word, ``(i wp + j) nw + c``
        (taps ``(i, j, word)`` major, as the transposed weights)."""
        off = np.empty(k * k * nw, np.int64)
        for i in range(k):
            for j in range(k):
                for c in range(nw):
                    off[(i * k + j) * nw + c] = (i * wp + j) * nw + c
        return off

    @njit(inline="always", nogil=True)
    def _tiles(xf, off, w_h, q0, q1, lo, span, c0, c1, out, i0, i1):  # pragma: no cover
        """Every unit of two positions: ``out[i_p]`` ``(ceil(O / 64),)`` = the comparator
        bits of the position at ``q_p`` (class ``c_p``), one :func:`_tile` per 64 units and
        a :func:`_tile_tail` for the rest (``w_h`` ``(n_r, O)`` from :func:`_halves`)."""
        n_o = w_h.shape[1]
        nq = n_o // 64
        for q in range(nq):
            out[i0, q], out[i1, q] = _tile(xf, off, w_h, q0, q1, 64 * q, 64, lo, span, c0, c1)
        if n_o > 64 * nq:
            out[i0, nq], out[i1, nq] = _tile_tail(xf, off, w_h, q0, q1, 64 * nq, n_o - 64 * nq,
                                                  lo, span, c0, c1)

    @njit(parallel=True, cache=True, nogil=True)
    def _conv_hidden_tiles(x, w_t, k, pad, rc, cc, lo, span, out):  # pragma: no cover - compiled
        """Stride-1 ``k x k`` conv with zero padding ``pad`` on packed +-1 activations, then
        the comparator, as bits.

        ``x`` ``(B, H, W, nw)``; ``w_t`` ``(k k nw, O)`` (taps ``(i, j, word)`` major); ``rc,
        cc, lo, span`` from :func:`conv_windows` -> bits ``out`` ``(B, Ho, Wo, ceil(O / 64))``.
        Each image is copied once into a zero-bordered buffer, so every tap reads a word
        without a bounds test, and its taps' words are one flat loop (``off``); a padding tap's
        zero word counts ``popcount(w)``, which the position's window (per border class)
        already adds. Two output positions x 64 units per register tile (:func:`_tiles`): the
        counts stay in registers over all the taps' words and the comparator is 64 lane
        compares read as the word. An odd last position is computed twice, writing the same
        bits. Measured (same run) against the previous kernel (counts in memory, four words per
        pass, the comparator packed bit by bit): 1.66x on 64 channels, 1.05-1.16x on 256-512."""
        nb, hh, ww, nw = x.shape
        _, ho, wo, nq = out.shape
        n_pos = ho * wo
        wp = ww + 2 * pad
        n_rc, ncc, n_o = lo.shape
        lo2, span2 = _windows32(lo.reshape((n_rc * ncc, n_o)), span.reshape((n_rc * ncc, n_o)))
        w_h, nh = _halves(w_t), 2 * nw
        off = _tap_offsets(k, wp, nh)
        for b in prange(nb):
            xp = np.zeros((hh + 2 * pad, wp, nw), np.uint64)
            xp[pad:pad + hh, pad:pad + ww] = x[b]
            xf, ob = xp.ravel().view(np.uint32), out[b].reshape((n_pos, nq))
            for p0 in range(0, n_pos, 2):
                p1 = min(p0 + 1, n_pos - 1)
                h0, v0 = divmod(p0, wo)
                h1, v1 = divmod(p1, wo)
                _tiles(xf, off, w_h, (h0 * wp + v0) * nh, (h1 * wp + v1) * nh, lo2, span2,
                       rc[h0] * ncc + cc[v0], rc[h1] * ncc + cc[v1], ob, p0, p1)

    @njit(parallel=True, cache=True, nogil=True)
    def _fc_hidden_taps(x, w_t, n, d, td, out):  # pragma: no cover - compiled
        """:func:`fc_hidden` where the CPU lacks AVX-512 VPOPCNTDQ: two samples per weight
        load, the units vectorized, the counts in memory with four words per pass over them
        (:func:`_taps`), the comparator packed by :func:`_pack_window`."""
        nb, nw = x.shape
        n_o = w_t.shape[1]
        lo, span = _count_window(n, d, td)
        lo3, span3 = lo.reshape((1, 1, n_o)), span.reshape((1, 1, n_o))
        out3 = out.reshape((nb, 1, out.shape[1]))
        xf = x.ravel()
        off = np.arange(nw)
        for ip in prange((nb + 1) // 2):
            b0 = 2 * ip
            b1 = min(b0 + 1, nb - 1)
            s0 = np.empty(n_o, np.int64)
            s1 = np.empty(n_o, np.int64)
            _taps(xf, off, w_t, b0 * nw, b1 * nw, s0, s1)
            _pack_window(s0, lo3, span3, 0, 0, out3, b0, 0)
            _pack_window(s1, lo3, span3, 0, 0, out3, b1, 0)

    @njit(parallel=True, cache=True, nogil=True)
    def _conv_hidden_taps(x, w_t, k, pad, rc, cc, lo, span, out):  # pragma: no cover - compiled
        """:func:`conv_hidden` where the CPU lacks AVX-512 VPOPCNTDQ: the same zero-bordered
        image and flat tap loop, two positions per weight load with the counts in memory
        (:func:`_taps`), the comparator packed by :func:`_pack_window`."""
        nb, hh, ww, nw = x.shape
        _, ho, wo, _ = out.shape
        n_pos = ho * wo
        wp = ww + 2 * pad
        off = _tap_offsets(k, wp, nw)
        for b in prange(nb):
            s0 = np.empty(w_t.shape[1], np.int64)
            s1 = np.empty(w_t.shape[1], np.int64)
            xp = np.zeros((hh + 2 * pad, wp, nw), np.uint64)
            xp[pad:pad + hh, pad:pad + ww] = x[b]
            xf, ob = xp.ravel(), out[b]
            for p0 in range(0, n_pos, 2):
                h0, v0 = divmod(p0, wo)
                h1, v1 = divmod(min(p0 + 1, n_pos - 1), wo)
                q0, q1 = (h0 * wp + v0) * nw, (h1 * wp + v1) * nw
                _taps(xf, off, w_t, q0, q1, s0, s1)
                _pack_window(s0, lo, span, rc[h0], cc[v0], ob, h0, v0)
                _pack_window(s1, lo, span, rc[h1], cc[v1], ob, h1, v1)

    @njit(inline="always", nogil=True)
    def _pack_window(s, lo, span, a, b, out, h, v):  # pragma: no cover - compiled
        """Bits ``lo[a, b, o] <= s[o] <= lo[a, b, o] + span[a, b, o]`` of ``s`` ``(O,)``
        packed into ``out[h, v]`` ``(ceil(O / 64),)``. Whole words in a fixed 64-trip loop
        (LLVM vectorizes it: one unsigned compare per 8 units and an OR reduction; with a
        variable trip count it stays scalar, ~7x slower), then the tail word. Indexed, not
        sliced: a numba slice is a reference-counted view (atomic increments per call)."""
        n_o = s.shape[0]
        nq = n_o // 64
        for q in range(nq):
            word = np.uint64(0)
            for o in range(64):
                u = 64 * q + o
                if np.uint64(s[u] - lo[a, b, u]) <= span[a, b, u]:
                    word |= np.uint64(1) << np.uint64(o)
            out[h, v, q] = word
        if n_o > 64 * nq:
            word = np.uint64(0)
            for u in range(64 * nq, n_o):
                if np.uint64(s[u] - lo[a, b, u]) <= span[a, b, u]:
                    word |= np.uint64(1) << np.uint64(u - 64 * nq)
            out[h, v, nq] = word

    @njit(inline="always", nogil=True)
    def _taps(xf, off, w_t, q0, q1, s0, s1):  # pragma: no cover - compiled
        """``s_p[o] = sum_r popcount(xf[q_p + off[r]] XOR w_t[r, o])`` for two output
        positions ``p`` (``q_p``: the flat index of the patch's first word in the zero-bordered
        image ``xf``, ``off[r]``: tap word ``r``'s offset from it; for a linear layer the
        sample's words), vectorized over ``o``: one weight load serves both positions, and the
        words go four at a time into each pass over the counts (the first word sets them), so
        the counts are read and written a quarter as often (measured 1.2-1.3x over one word
        per pass)."""
        n_o = w_t.shape[1]
        n_r = off.shape[0]
        x0, x1 = xf[q0 + off[0]], xf[q1 + off[0]]
        for o in range(n_o):
            wv = w_t[0, o]
            s0[o] = _popcount(x0 ^ wv)
            s1[o] = _popcount(x1 ^ wv)
        r = 1
        while r + 3 < n_r:
            a0, a1 = xf[q0 + off[r]], xf[q1 + off[r]]
            b0, b1 = xf[q0 + off[r + 1]], xf[q1 + off[r + 1]]
            c0, c1 = xf[q0 + off[r + 2]], xf[q1 + off[r + 2]]
            d0, d1 = xf[q0 + off[r + 3]], xf[q1 + off[r + 3]]
            for o in range(n_o):
                wa, wb, wc, wd = w_t[r, o], w_t[r + 1, o], w_t[r + 2, o], w_t[r + 3, o]
                s0[o] += (_popcount(a0 ^ wa) + _popcount(b0 ^ wb) + _popcount(c0 ^ wc)
                          + _popcount(d0 ^ wd))
                s1[o] += (_popcount(a1 ^ wa) + _popcount(b1 ^ wb) + _popcount(c1 ^ wc)
                          + _popcount(d1 ^ wd))
            r += 4
        while r < n_r:
            x0, x1 = xf[q0 + off[r]], xf[q1 + off[r]]
            for o in range(n_o):
                wv = w_t[r, o]
                s0[o] += _popcount(x0 ^ wv)
                s1[o] += _popcount(x1 ^ wv)
            r += 1

    #: Whether numba's target CPU has AVX-512 VPOPCNTDQ (``vpopcntd`` on zmm registers): then
    #: :func:`fc_hidden` and :func:`conv_hidden` are the register tiles. Without it LLVM
    #: emulates the tiles' vector popcount (a nibble table lookup) and they ran at 0.61-0.75x
    #: the counts-in-memory kernels (AVX2 code for this machine, same run), which are then
    #: used instead. Both are exact and tested on every machine.
    TILES = _has_vpopcntdq()
    fc_hidden = _fc_hidden_tiles if TILES else _fc_hidden_taps
    conv_hidden = _conv_hidden_tiles if TILES else _conv_hidden_taps

    @njit(parallel=True, cache=True, nogil=True)
    def conv_first(q_bl, w_t, k, pad, pool, chans, d, td, clean, out):  # pragma: no cover
        """First conv on integer inputs followed by ``pool x pool`` max pooling (floor mode, OR
        of the bits), computed for the output channels ``chans`` only: the others are copied
        from ``clean`` (the pooled bits of the same input with weights in which those channels
        are unchanged; any array for a complete ``chans``). ``q_bl`` int32 ``(H, W, C, B)``
        (batch last), ``w_t`` int32 +-1 ``(k k C, O)``; ``clean``, ``out`` ``(B, Ho // pool,
        Wo // pool, ceil(O / 64))``. A channel's bit is the OR over its pooling window of
        ``d a >= td`` on the exact ``a = sum w q`` (zero padding, as ``F.conv2d`` pads ``x = q
        / scale`` with zeros).

        Images go in blocks of 64, each tap a contiguous multiply-add over the block
        (vectorized); work ``len(chans) / O`` of the whole conv: a fault map at low BER flips
        the weights of a few of the first layer's channels."""
        hh, ww, nc, nb = q_bl.shape
        _, ph, pw, nwo = out.shape
        n_all = chans.shape[0] == w_t.shape[1]
        blk = 64
        for ib in prange((nb + blk - 1) // blk):
            b0 = ib * blk
            m = min(nb, b0 + blk) - b0
            acc = np.empty(m, np.int32)
            on = np.empty(m, np.bool_)
            words = np.empty((m, nwo), np.uint64)
            for y in range(ph):
                for x in range(pw):
                    for t in range(m):
                        for wd in range(nwo):
                            if n_all:  # (two branches: no uint64/int64 unification to float)
                                words[t, wd] = np.uint64(0)
                            else:
                                words[t, wd] = clean[b0 + t, y, x, wd]
                    for ci in range(chans.shape[0]):
                        o = chans[ci]
                        for t in range(m):
                            on[t] = False
                        for dy in range(pool):
                            for dx in range(pool):
                                oh, ow = y * pool + dy, x * pool + dx
                                for t in range(m):
                                    acc[t] = 0
                                for i in range(k):
                                    ih = oh + i - pad
                                    if ih < 0 or ih >= hh:
                                        continue
                                    for j in range(k):
                                        iw = ow + j - pad
                                        if iw < 0 or iw >= ww:
                                            continue
                                        for c in range(nc):
                                            wv = w_t[(i * k + j) * nc + c, o]
                                            qrow = q_bl[ih, iw, c, b0:b0 + m]
                                            for t in range(m):
                                                acc[t] += wv * qrow[t]
                                do, to = d[o], td[o]
                                for t in range(m):
                                    on[t] |= do * acc[t] >= to
                        bit = np.uint64(1) << np.uint64(o % 64)
                        for t in range(m):
                            if on[t]:
                                words[t, o // 64] |= bit
                            else:
                                words[t, o // 64] &= ~bit
                    for t in range(m):
                        for wd in range(nwo):
                            out[b0 + t, y, x, wd] = words[t, wd]

    @njit(nogil=True)
    def _value_window(d, td):  # pragma: no cover - compiled
        """The rule ``d a >= td`` as a window on an integer ``a`` (``|a| < 2^61``): ``bit =
        uint64(a - lo) <= span``. ``d = 1``: ``a >= td``; ``d = -1``: ``a <= -td``; dead: all
        ``a`` (``td <= 0``) or none (``lo = 2^62``, ``span = 0``)."""
        n_o = d.shape[0]
        big = np.int64(2**62)
        lo = np.empty(n_o, np.int64)
        span = np.empty(n_o, np.uint64)
        for o in range(n_o):
            a, b = -big, big
            if d[o] > 0:
                a = td[o]
            elif d[o] < 0:
                b = -td[o]
            elif td[o] > 0:
                a = big
            if b < a:
                a, b = big, big
            lo[o] = a
            span[o] = np.uint64(b - a)
        return lo, span

    @njit(nogil=True)
    def _by_row(rows, cols, coef, n_o):  # pragma: no cover - compiled
        """Flips grouped by row (a stable counting sort): ``start`` ``(O + 1,)``, and the
        columns and coefficients of row ``o`` at ``start[o]:start[o + 1]``."""
        nf = rows.shape[0]
        start = np.zeros(n_o + 1, np.int64)
        for f in range(nf):
            start[rows[f] + 1] += 1
        for o in range(n_o):
            start[o + 1] += start[o]
        fill = start[:-1].copy()
        c_s = np.empty(nf, np.int64)
        v_s = np.empty(nf, np.int32)
        for f in range(nf):
            r = rows[f]
            c_s[fill[r]] = cols[f]
            v_s[fill[r]] = coef[f]
            fill[r] += 1
        return start, c_s, v_s

    @njit(parallel=True, cache=True, nogil=True)
    def fc_first_delta(a0_t, q_t, rows, cols, coef, d, td, out, dst_t):  # pragma: no cover
        """First linear layer of a faulty copy from known pre-activations: ``a = a0 + sum_f
        coef_f q[cols_f]`` added to row ``rows_f`` (``coef = -2 w`` of a weight that flips,
        ``+2 w`` of one that flips back), then the rule, packed. ``a0_t`` int32 ``(O, B)``
        (the clean ``W q``, or the pre-activations of another flip set); ``q_t`` int32 ``(I,
        B)`` -> ``out`` ``(B, ceil(O / 64))``; ``a`` is also written to ``dst_t`` (int32 ``(O,
        B)``, may be ``a0_t`` itself) unless ``dst_t`` has no rows. Work ``flips x B`` instead
        of ``O x I x B``.

        Samples go in blocks (64 to 512, at least 8 blocks where the batch allows: longer
        rows amortize each flip's loop overhead, measured 1.3-1.5x faster at 512 than 64 on
        10k samples); per block, unit by unit, the known row is copied to an accumulator, each
        flip of the unit adds ``coef q[col]`` over the block (a contiguous loop the compiler
        vectorizes) and the rule (:func:`_value_window`) sets the unit's bit in the block's
        output words."""
        n_o, nb = a0_t.shape
        store = dst_t.shape[0] > 0
        start, c_s, v_s = _by_row(rows, cols, coef, n_o)
        lo, span = _value_window(d, td)
        blk = 64 * max(1, min(8, nb // 512))
        for ib in prange((nb + blk - 1) // blk):
            b0 = ib * blk
            m = min(nb, b0 + blk) - b0
            acc = np.empty(m, np.int32)
            bits = np.zeros(m, np.uint64)
            for o in range(n_o):
                arow = a0_t[o, b0:b0 + m]
                for t in range(m):
                    acc[t] = arow[t]
                for f in range(start[o], start[o + 1]):
                    qrow = q_t[c_s[f], b0:b0 + m]
                    v = v_s[f]
                    for t in range(m):
                        acc[t] += v * qrow[t]
                if store:
                    drow = dst_t[o, b0:b0 + m]
                    for t in range(m):
                        drow[t] = acc[t]
                lo_o, span_o, sh = lo[o], span[o], np.uint64(o % 64)
                for t in range(m):
                    bits[t] |= np.uint64(1 if np.uint64(acc[t] - lo_o) <= span_o else 0) << sh
                if o % 64 == 63 or o == n_o - 1:
                    for t in range(m):
                        out[b0 + t, o // 64] = bits[t]
                        bits[t] = 0

    @njit(parallel=True, cache=True, nogil=True)
    def pool_or(x, k, out):  # pragma: no cover - compiled
        """``k x k`` max pooling of +-1 bits (floor mode): OR of the window's words."""
        nb, ho, wo, nw = out.shape
        for b in prange(nb):
            for oh in range(ho):
                for ow in range(wo):
                    for q in range(nw):
                        word = np.uint64(0)
                        for i in range(k):
                            for j in range(k):
                                word |= x[b, oh * k + i, ow * k + j, q]
                        out[b, oh, ow, q] = word

    @njit(cache=True, nogil=True)
    def flip_words(words, word_idx, bit_idx):  # pragma: no cover - compiled
        """XOR bit ``bit_idx[i]`` of ``words.flat[word_idx[i]]`` (in place)."""
        flat = words.reshape(-1)
        for i in range(word_idx.shape[0]):
            flat[word_idx[i]] ^= np.uint64(1) << np.uint64(bit_idx[i])

    @njit(cache=True, nogil=True)
    def gap_positions(lg, log1mp, n, offset, out):  # pragma: no cover - compiled
        """Positions of Bernoulli successes from geometric gaps, in one pass.

        ``lg`` ``(K,)`` float64 holds ``log(1 - u_i)`` of uniforms ``u_i``; the gaps are
        ``G_i = trunc(min(lg_i / log1mp, n))`` (``log1mp = log(1 - p)``) and the positions
        ``pos_i = offset + sum_{l <= i} (G_l + 1)``. Writes the positions ``< n`` to
        ``out[:k]`` (int64) and returns ``(k, pos)``: ``k < K`` when ``pos_k >= n`` ended the
        draw, else ``k = K`` and ``pos`` is the last position. The same IEEE operations as
        ``floor(lg / log1mp).clamp(max=n)`` and a cumulative sum, so the same integers.
        """
        pos = offset
        fn = float(n)
        for i in range(lg.shape[0]):
            g = lg[i] / log1mp
            if g > fn:
                g = fn
            pos += np.int64(g) + 1
            if pos >= n:
                return i, pos
            out[i] = pos
        return lg.shape[0], pos

    @njit(cache=True, nogil=True)
    def negate_at(flat, idx):  # pragma: no cover - compiled
        """``flat[idx[i]] = not flat[idx[i]]`` for a bool array (in place; ``idx`` unique)."""
        for i in range(idx.shape[0]):
            flat[idx[i]] = not flat[idx[i]]

    # -- margin statistics of fully connected layers (bnn_tol.metrics.margin) ---------------
    # ``a`` (B, C) float32 pre-activations, ``tau`` (C,) float64 thresholds; the margin of an
    # entry is m = |float64(a) - tau| (the float64 value of torch's type promotion). Column
    # kernels run over blocks of _MB columns, one block per thread (no shared writes).

    _MB = 16

    @njit(parallel=True, cache=True, nogil=True)
    def margin_rows(a, tau, wagg, out):  # pragma: no cover - compiled
        """``out[n, q] = sum_c m_nc wagg[c, q]`` (``wagg`` (C, 2)): per-image layer means."""
        b, c = a.shape
        for n in prange(b):
            s0 = 0.0
            s1 = 0.0
            for j in range(c):
                m = abs(np.float64(a[n, j]) - tau[j])
                s0 += m * wagg[j, 0]
                s1 += m * wagg[j, 1]
            out[n, 0] = s0
            out[n, 1] = s1

    @njit(parallel=True, cache=True, nogil=True)
    def margin_cols(a, scale, shift, k0, hist, grid, thr, tau, r, n_plus, s_abs, min_m,
                    sum_half):  # pragma: no cover - compiled
        """Histogram and (``grid > 0``, a first layer) exact grid sums of one batch.

        ``hist[k - k0, c] += 1`` for ``k = rint(a scale + shift)`` (float32 operations, as
        ``a.mul_(scale).add_(shift).round_()``). With ``grid``: ``d = a grid - thr_c``
        (float32, exact integers), ``n_plus_c += #{d > 0}``, ``s_abs_c += sum |d|``,
        ``min_m_c = min(min_m_c, min_n m_nc)``, ``sum_half_c += sum_n r_n m_nc``.
        """
        b, c = a.shape
        for blk in prange((c + _MB - 1) // _MB):
            c0 = blk * _MB
            c1 = min(c, c0 + _MB)
            for n in range(b):
                for j in range(c0, c1):
                    v = a[n, j]
                    k = np.rint(v * scale + shift)
                    hist[np.int64(k) - k0, j] += 1
                    if grid > 0:
                        d = v * grid - thr[j]
                        if d > 0:
                            n_plus[j] += 1
                        s_abs[j] += abs(np.float64(d))
                        m = abs(np.float64(v) - tau[j])
                        if m < min_m[j]:
                            min_m[j] = m
                        sum_half[j] += r[n] * m

    @njit(parallel=True, cache=True, nogil=True)
    def margin_comoments(a, tau, z, r, use_r, want_sxx, prod, sxx):  # pragma: no cover
        """``prod = z^T x`` ``(Q, C)`` for ``x_nc = m_nc`` (``use_r``: ``m_nc r_n``); with
        ``want_sxx`` also ``sxx_c = sum_n (x_nc - prod[0, c] / B)^2`` (``z[:, 0] = 1``)."""
        b, c = a.shape
        nq = z.shape[1]
        for blk in prange((c + _MB - 1) // _MB):
            c0 = blk * _MB
            w = min(c, c0 + _MB) - c0
            acc = np.zeros((nq, _MB))
            x = np.empty(_MB)
            for n in range(b):
                for j in range(w):
                    x[j] = abs(np.float64(a[n, c0 + j]) - tau[c0 + j])
                    if use_r:
                        x[j] *= r[n]
                for q in range(nq):
                    zq = z[n, q]
                    for j in range(w):
                        acc[q, j] += zq * x[j]
            for q in range(nq):
                for j in range(w):
                    prod[q, c0 + j] = acc[q, j]
            if want_sxx:
                for j in range(w):
                    mean = acc[0, j] / b
                    s = 0.0
                    for n in range(b):
                        xv = abs(np.float64(a[n, c0 + j]) - tau[c0 + j])
                        if use_r:
                            xv *= r[n]
                        s += (xv - mean) * (xv - mean)
                    sxx[c0 + j] = s

    # -- exact negation importance (bnn_tol.metrics.importance) ------------------------------

    @njit(parallel=True, cache=True, nogil=True)
    def near_threshold_preact(a_out, g, gs, w2, w1c, u, unit, out):  # pragma: no cover
        """Output pre-activations when each neuron ``j`` of the layer before last but one is
        perturbed alone (case 2 of :mod:`bnn_tol.metrics.importance`), all in float32:

            hsum_nc = sum_k g_nk w2[c, k],          M_ncj = sum_k gs_nk w2[c, k] w1c[k, j],
            unit:      out[n, c, j] = u_nj M_ncj + (a_out_nc + hsum_nc)
            otherwise: out[n, c, j] = (u_nj M_ncj + a_out_nc) + |u_nj| ((a_out_nc + hsum_nc)
                                                                       - a_out_nc)

        (the float32 operations, in this order, of the torch expression it replaces).
        ``a_out`` ``(B, C)`` float32; ``g``, ``gs`` ``(B, K)`` float32 in {-1, 0, 1}
        (``g = -h e``, ``gs = g sigma``); ``w2`` ``(C, K)`` float32; ``w1c`` ``(K, J)`` int8 in
        {-1, 0, 1}; ``u`` ``(B, J)`` float32 -> ``out`` ``(B, C, J)``. The integer sums are
        exact (int16 accumulators: ``K < 2^15``). Work per sample ``|{k: gs_nk != 0}| C J``
        additions of weight rows: only the units next to their threshold (a few per cent)
        enter, where the dense product costs ``K C J``.
        """
        nb, nk = g.shape
        nc = w2.shape[0]
        nj = w1c.shape[1]
        for n in prange(nb):
            acc = np.zeros((nc, nj), np.int16)  # |M| <= K < 2^15 (the caller checks)
            hsum = np.zeros(nc, np.int64)
            for k in range(nk):
                gk = g[n, k]
                if gk != 0:
                    for c in range(nc):
                        hsum[c] += np.int64(gk * w2[c, k])
                sk = gs[n, k]
                if sk != 0:
                    row = w1c[k]
                    for c in range(nc):
                        vc = sk * w2[c, k]
                        ac = acc[c]
                        if vc > 0:
                            for j in range(nj):
                                ac[j] += row[j]
                        elif vc < 0:
                            for j in range(nj):
                                ac[j] -= row[j]
            for c in range(nc):
                ao = a_out[n, c]
                base = ao + np.float32(hsum[c])
                oc = out[n, c]
                ac = acc[c]
                if unit:
                    for j in range(nj):
                        oc[j] = np.float32(ac[j]) * u[n, j] + base
                else:
                    dif = base - ao
                    for j in range(nj):
                        uj = u[n, j]
                        oc[j] = (np.float32(ac[j]) * uj + ao) + abs(uj) * dif

    @njit(parallel=True, cache=True, nogil=True)
    def rank1_preact(a_out, w, d, out):  # pragma: no cover - compiled
        """``out[n, c, j] = w[c, j] d[n, j] + a_out[n, c]`` (float32: the product rounded,
        then the sum, as ``(w[None] * d[:, None]).add_(a_out[:, :, None])``): the output
        pre-activations when neuron ``j`` of the last hidden layer changes by ``d[:, j]``.
        ``a_out`` ``(B, C)``, ``w`` ``(C, J)``, ``d`` ``(B, J)`` -> ``out`` ``(B, C, J)``."""
        nb, nc, nj = out.shape
        for n in prange(nb):
            for c in range(nc):
                ao = a_out[n, c]
                oc = out[n, c]
                wc = w[c]
                for j in range(nj):
                    oc[j] = wc[j] * d[n, j] + ao

    @njit(parallel=True, cache=True, nogil=True)
    def argmax_classes(z, out):  # pragma: no cover - compiled
        """``out[n, j] = argmax_c z[n, c, j]``, first maximum on ties: ``z`` ``(B, C, J)`` ->
        int64 ``out`` ``(B, J)``, a running maximum from class 0 updated on a strict ``>``."""
        nb, nc, nj = z.shape
        for n in prange(nb):
            best = z[n, 0].copy()
            idx = out[n]
            for j in range(nj):
                idx[j] = 0
            for c in range(1, nc):
                zc = z[n, c]
                for j in range(nj):
                    if zc[j] > best[j]:
                        best[j] = zc[j]
                        idx[j] = c
