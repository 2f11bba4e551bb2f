"""The library's persistent fault-map draws, in numpy: torch's CPU generator, replayed word
for word.

Numpy only (plus :mod:`bnn_tol.exceptions`): every persistent map of the library is drawn here
(:func:`bnn_tol.faults.maps.fault_map`, the ``bernoulli`` and ``stuck-at`` error models, hence
sweeps, ``inject`` and ``deploy``). The streams are those of ``torch.Generator().manual_seed(s)``
on CPU, so the maps are the ones the library drew with torch before (``tests/test_draw.py``
checks against torch ops bit for bit; the golden tests against the recorded maps); training's
transient draws stay in torch, on the model's device (:func:`bnn_tol.faults.maps.
bernoulli_indices`).

**Generator.** ``torch.Generator().manual_seed(s)`` on CPU is MT19937 (``at::mt19937``) seeded
with the low 32 bits of ``s`` by Matsumoto-Nishimura's ``init_genrand``::

    x_0 = s mod 2^32,   x_j = (1812433253 (x_{j-1} xor (x_{j-1} >> 30)) + j) mod 2^32,  j < 624

and the first word comes after a twist of that state (the state numpy's ``MT19937`` holds with
``pos = 624``). :func:`generator` builds that ``np.random.MT19937``; its ``random_raw()`` then
returns torch's 32-bit words ``w_0, w_1, ...`` (tempered MT19937 outputs) in order. Seeds that
agree modulo ``2^32`` give the same stream (in torch as here).

**Uniforms** (``at::uniform_real_distribution``; the CPU kernel is serial, one element after
the other, at every size):

* float64, ``torch.rand(n, dtype=torch.float64)``: element ``i`` takes two words, the first
  the high half: ``r_i = w_{2i} 2^32 + w_{2i+1}``, ``u_i = (r_i mod 2^53) 2^-53``;
* float32, ``torch.rand(n)``: one word each, ``u_i = float32(w_i mod 2^24) 2^-24``;
* int64, ``torch.empty(n, dtype=torch.int64).random_(-2**63, None)``: ``r_i`` read as
  two's complement.

All three conversions are exact (no rounding), so the uniforms agree bit for bit.

**Maps.** :func:`bernoulli_indices` and :func:`fault_map` run the library's loops over these
streams: geometric gaps ``G = trunc(min(log1p(-u) / log1p(-p), n))`` from chunks of float64
uniforms for ``p <= DENSE_ABOVE``, one float32 uniform per bit (``u < float32(p)``) above, and
the bands of :data:`BAND_EDGES`. Every step is IEEE arithmetic (correctly rounded, the same in
numpy and torch) except one: ``log1p``, whose last bit is not fixed by IEEE 754. Torch on an
AVX2/AVX-512 CPU computes it with SLEEF (glibc for the last ``chunk mod 16`` elements), numpy
with its own SIMD code; the two differ by one ulp on about 3 % of arguments, which changes a
gap only when ``log1p(-u) / log1p(-p)`` lies within about one ulp of an integer: measured
``7.5e-12`` expected changed gaps per band of 4.2 Mbit (``7e-11`` per map at cap 1). Torch's
own maps differ as often between CPU capabilities (SLEEF vs glibc). The ``log1p`` argument
takes any other implementation (torch's, to reproduce a torch map on the machine that drew it
even then). See ``docs/notes/torch_rng.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from bnn_tol.exceptions import InvalidArgument, require_int

__all__ = [
    "DENSE_ABOVE",
    "BAND_EDGES",
    "STATE_WORDS",
    "generator",
    "uniform64",
    "uniform32",
    "random64",
    "bernoulli_indices",
    "MapArrays",
    "band_count",
    "fault_map",
    "flips",
]

#: Above this rate one float32 uniform per bit is cheaper than geometric gaps (here and in the
#: torch draws of :func:`bnn_tol.faults.maps.bernoulli_indices`).
DENSE_ABOVE = 0.2

#: Edges ``0 = b_0 < b_1 < ... < b_J = 1`` of the bands in which per-bit uniforms are drawn
#: (:func:`fault_map`): coarse below ``2^-7`` (few bands), then doubling, so a map capped at
#: ``p >= 2^-7`` materializes at most ``2 p n`` uniforms and one capped lower at most
#: ``n 2^-7`` (~0.8 %).
BAND_EDGES: tuple[float, ...] = (0.0, 2.0**-16, 2.0**-12, 2.0**-9, 2.0**-7, 2.0**-6, 2.0**-5,
                                 2.0**-4, 2.0**-3, 2.0**-2, 2.0**-1, 1.0)

#: MT19937's state: 624 words of 32 bits.
STATE_WORDS = 624

_MASK32 = 0xFFFFFFFF
_MASK21 = (1 << 21) - 1  # the high word's share of the 53 bits of a float64 uniform
_MASK24 = (1 << 24) - 1
_TWO_M53 = 2.0**-53
_TWO_M24 = np.float32(2.0**-24)

#: ``log1p`` of an array: the one step whose last bit depends on the implementation.
Log1p = Callable[[np.ndarray], np.ndarray]


def _init_genrand(seed32: int) -> np.ndarray:
    """``init_genrand``: ``x_0 = seed32``, ``x_j = 1812433253 (x_{j-1} ^ (x_{j-1} >> 30)) + j``
    (mod ``2^32``), the state ``at::mt19937(seed)`` starts from."""
    x = seed32
    key = [x]
    for j in range(1, STATE_WORDS):
        x = (1812433253 * (x ^ (x >> 30)) + j) & _MASK32
        key.append(x)
    return np.array(key, dtype=np.uint32)


def generator(seed: int) -> np.random.MT19937:
    """The bit generator of ``torch.Generator().manual_seed(seed)`` (CPU).

    Torch keeps the 64-bit seed but seeds MT19937 with its low 32 bits
    (``init_with_uint32``); the state is :func:`_init_genrand` of ``seed mod 2^32`` with the
    twist pending (``pos = 624``), so ``random_raw(k)`` gives torch's first ``k`` words.

    Args:
        seed: ``0 <= seed < 2^64`` (the library's seeds are 63-bit).

    Returns:
        a fresh ``np.random.MT19937``; the functions below advance it as torch advances its
        generator.
    """
    seed = require_int(seed, "seed", minimum=0)
    if seed >= 1 << 64:
        raise InvalidArgument(f"seed must be < 2**64 (torch's manual_seed), got {seed}")
    bitgen = np.random.MT19937(0)
    bitgen.state = {"bit_generator": "MT19937",
                    "state": {"key": _init_genrand(seed & _MASK32), "pos": STATE_WORDS}}
    return bitgen


def _words64(bitgen: np.random.MT19937, n: int) -> np.ndarray:
    """``r_i = w_{2i} 2^32 + w_{2i+1}`` (``random64()``: the first word is the high half),
    uint64 ``(n,)``."""
    w = bitgen.random_raw(2 * n)
    hi, lo = w[0::2], w[1::2]
    hi <<= 32
    hi |= lo
    return hi


def uniform64(bitgen: np.random.MT19937, n: int) -> np.ndarray:
    """``torch.rand(n, generator=g, dtype=torch.float64)``: ``u_i = (r_i mod 2^53) 2^-53``.

    ``r_i`` is the 64-bit draw of :func:`_words64`; the 53 low bits are the low 21 bits of the
    first word and all of the second. Exact: an integer below ``2^53`` times a power of two.
    """
    n = require_int(n, "n", minimum=0)
    w = bitgen.random_raw(2 * n)
    hi, lo = w[0::2], w[1::2]
    hi &= _MASK21
    hi <<= 32
    hi |= lo
    out = hi.view(np.int64).astype(np.float64)
    out *= _TWO_M53
    return out


def uniform32(bitgen: np.random.MT19937, n: int) -> np.ndarray:
    """``torch.rand(n, generator=g)`` (float32): ``u_i = float32(w_i mod 2^24) 2^-24``, one
    32-bit word per element. Exact, as :func:`uniform64`."""
    n = require_int(n, "n", minimum=0)
    w = bitgen.random_raw(n)
    w &= _MASK24
    out = w.view(np.int64).astype(np.float32)
    out *= _TWO_M24
    return out


def random64(bitgen: np.random.MT19937, n: int) -> np.ndarray:
    """``torch.empty(n, dtype=torch.int64).random_(-2**63, None, generator=g)``: ``r_i`` of
    :func:`_words64` read as a two's complement int64."""
    n = require_int(n, "n", minimum=0)
    return _words64(bitgen, n).view(np.int64)


def bernoulli_indices(n: int, p: float, bitgen: np.random.MT19937, *,
                      log1p: Log1p = np.log1p) -> np.ndarray:
    """Sorted indices in ``[0, n)`` of Bernoulli(p) successes, the draws of
    :func:`bnn_tol.faults.maps.bernoulli_indices` (CPU).

    * ``n <= 0`` or ``p <= 0``: none; ``p >= 1``: all (no draw in either case);
    * ``p > DENSE_ABOVE``: ``u = uniform32(n)``, the ``i`` with ``u_i < float32(p)`` (torch
      compares a float32 tensor with a Python float in float32);
    * else geometric gaps in chunks of ``c = int(m + 6 sqrt(m) + 16)`` float64 uniforms,
      ``m = n p``: ``G_k = trunc(min(log1p(-u_k) / log1p(-p), n))`` (``log1p(-p)`` by
      ``math.log1p``), positions ``pos_k = pos_{k-1} + G_k + 1`` from ``pos_{-1} = -1``; chunks
      are drawn until a position reaches ``n``, and the positions ``< n`` are returned. The
      generator ends where torch's does (whole chunks).

    Args:
        n: number of trials; p: success rate.
        bitgen: from :func:`generator` (advanced in place).
        log1p: the ``log1p`` of the gaps (see the module docstring).

    Returns:
        int64 ``(K,)``, strictly increasing.
    """
    n = require_int(n, "n")
    if n <= 0 or p <= 0.0:
        return np.empty(0, dtype=np.int64)
    if p >= 1.0:
        return np.arange(n, dtype=np.int64)
    if p > DENSE_ABOVE:
        u = uniform32(bitgen, n)
        return np.flatnonzero(u < np.float32(p)).astype(np.int64, copy=False)
    log1mp = math.log1p(-p)
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)
    fn = float(n)
    out: list[np.ndarray] = []
    offset = -1  # position of the last success so far
    while True:
        u = uniform64(bitgen, chunk)
        q = np.asarray(log1p(np.negative(u, out=u)), dtype=np.float64)
        with np.errstate(over="ignore"):  # tiny p: q = inf, clipped to n (as in torch)
            q /= log1mp
        np.minimum(q, fn, out=q)
        pos = q.astype(np.int64)  # q >= 0: truncation is the floor
        pos += 1
        np.cumsum(pos, out=pos)
        pos += offset
        last = int(pos[-1])
        if last >= n:  # gaps >= 1: increasing, the positions < n are a prefix
            out.append(pos[: int(np.searchsorted(pos, n))])
            break
        out.append(pos)
        offset = last
    return out[0] if len(out) == 1 else np.concatenate(out)


class MapArrays(NamedTuple):
    """A fault map as arrays: the fields of :class:`bnn_tol.faults.maps.FaultMap`.

    Attributes:
        numel: number of stored bits.
        idx: int64 ``(K,)`` the bits with ``u_i < cap``, band by band (increasing in a band).
        u: float64 ``(K,)`` their uniforms.
        cap: the band edge the map was drawn up to.
    """

    numel: int
    idx: np.ndarray
    u: np.ndarray
    cap: float


def band_count(cap: float) -> int:
    """Bands drawn for ``cap``: the fewest ``J`` with ``BAND_EDGES[J] >= cap`` (0 for
    ``cap = 0``)."""
    if cap <= 0:
        return 0
    for j, hi in enumerate(BAND_EDGES[1:]):
        if cap <= hi:
            return j + 1
    return len(BAND_EDGES) - 1


def fault_map(numel: int, cap: float, bitgen: np.random.MT19937, *,
              log1p: Log1p = np.log1p) -> MapArrays:
    """The per-bit uniforms ``u_i < cap`` of ``numel`` bits:
    :func:`bnn_tol.faults.maps.fault_map` with ``torch.Generator`` -> ``bitgen``.

    For bands ``j = 0, ..., J - 1`` (``J = band_count(cap)``), ``[b_j, b_{j+1})`` of
    :data:`BAND_EDGES`: hits ``H_j = bernoulli_indices(numel, r_j)`` at
    ``r_j = (b_{j+1} - b_j) / (1 - b_j)``, then ``|H_j|`` float64 uniforms ``v`` and the values
    ``u = min(b_j + (b_{j+1} - b_j) v, nextafter(b_{j+1}, b_j))``. A bit keeps its first hit:
    band ``j`` drops the bits hit in bands ``< j``. ``idx`` and ``u`` are the bands' kept
    hits in band order.

    Args:
        numel: number of bits; cap: in ``[0, 1]``; bitgen: from :func:`generator`.
        log1p: passed to :func:`bernoulli_indices`.

    Returns:
        :class:`MapArrays` with ``cap = BAND_EDGES[J]``.

    Raises:
        InvalidArgument: ``cap`` outside ``[0, 1]`` or ``numel < 0``.
    """
    numel = require_int(numel, "numel", minimum=0)
    if not 0.0 <= cap <= 1.0:
        raise InvalidArgument(f"cap {cap} is outside [0, 1]")
    n_bands = band_count(cap)
    idx_parts: list[np.ndarray] = []
    u_parts: list[np.ndarray] = []
    for j in range(n_bands):
        lo, hi = BAND_EDGES[j], BAND_EDGES[j + 1]
        hit = bernoulli_indices(numel, (hi - lo) / (1.0 - lo), bitgen, log1p=log1p)
        v = uniform64(bitgen, hit.size)
        u = lo + (hi - lo) * v
        np.minimum(u, math.nextafter(hi, lo), out=u)
        idx_parts.append(hit)
        u_parts.append(u)
    top = BAND_EDGES[n_bands]
    if not idx_parts:
        return MapArrays(numel, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64), top)
    seen = np.zeros(numel, dtype=np.bool_)
    for j, hit in enumerate(idx_parts):
        if j:
            new = ~seen[hit]
            idx_parts[j], u_parts[j] = hit[new], u_parts[j][new]
        seen[idx_parts[j]] = True
    return MapArrays(numel, np.concatenate(idx_parts), np.concatenate(u_parts), top)


def flips(fmap: MapArrays, stored: np.ndarray, p01: float, p10: float) -> np.ndarray:
    """Flat indices of the bits that flip at ``(p01, p10)``: :meth:`FaultMap.flips
    <bnn_tol.faults.maps.FaultMap.flips>`.

    * ``p01 == p10 = p``: the ``idx_k`` with ``u_k < p`` (float64 comparison);
    * else: ``u_k < t_k`` with ``t_k = float32(p10)`` where ``stored[idx_k] > 0`` (a stored 1)
      and ``float32(p01)`` elsewhere, as float64: torch's ``where(s, p10, p01)`` of two Python
      floats is a float32 tensor, so the library compares with the rates rounded to float32.

    Args:
        fmap: from :func:`fault_map`.
        stored: the stored values (``> 0``: a stored 1), ``fmap.numel`` of them, any shape.
        p01, p10: rates ``<= fmap.cap``.

    Returns:
        int64 ``(F,)`` (in the map's order).

    Raises:
        InvalidArgument: a rate above the map's cap.
    """
    if max(p01, p10) > fmap.cap:
        raise InvalidArgument(f"this fault map was drawn up to p={fmap.cap}; it cannot answer "
                              f"p01={p01}, p10={p10}: draw it with a larger cap")
    if p01 == p10:
        return fmap.idx[fmap.u < p01]
    one = np.asarray(stored).reshape(-1)[fmap.idx] > 0
    rate = np.where(one, np.float32(p10), np.float32(p01)).astype(np.float64)
    return fmap.idx[fmap.u < rate]
