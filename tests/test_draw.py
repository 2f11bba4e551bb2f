"""The numpy draw (:mod:`bnn_tol.faults.draw`) against torch, the oracle, bit for bit.

Torch's CPU generator (``torch.Generator().manual_seed(s)``) and the library's torch draws
(:mod:`bnn_tol.faults.maps`) on one side, the numpy replica on the other: raw generator state,
float64 / float32 / int64 streams in any interleaving, ``bernoulli_indices`` (dense float32,
geometric gaps with and without the numba kernel), ``fault_map`` (indices and float64 uniforms)
and ``FaultMap.flips``, plus the generator state after each draw. Equal means equal bits.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnn_tol.core import kernels
from bnn_tol.core.kernels import serial
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults import draw, maps

ROOT = Path(__file__).resolve().parents[1]
DRAW_PY = ROOT / "bnn_tol" / "faults" / "draw.py"

#: 63-bit seeds and the edges of torch's 32-bit seeding (2^32 + k seeds MT19937 like k).
SEEDS = [0, 1, 5489, 2**31 + 11, 2**32 - 1, 2**32, 2**32 + 5489, 2**62 + 3,
         987654321987654321, 2**63 - 1]
#: Rates of the brief: none, geometric gaps, the DENSE_ABOVE edge and just above, dense, all.
RATES = [0.0, 1e-6, 1e-3, 0.05, 0.2, math.nextafter(0.2, 1.0), 0.5, 1.0]
#: 2^20 bits at p >= 0.05 draw chunks >= 2^15 (the numba gap kernel); 1.1 M > 10^6.
SIZES = [0, 1, 5, 1000, 1 << 20, 1_100_000]


def _torch_state(g: torch.Generator) -> tuple[np.ndarray, int]:
    """(key, pos) of a torch CPU generator in numpy's MT19937 convention.

    ``get_state()`` is ``CPUGeneratorImplState``: uint64 seed, int32 left, int32 seeded, uint64
    next, uint64 state[624], ... Torch draws ``state[next]`` after ``--left``; ``left == 1`` is
    a pending twist, which numpy writes ``pos = 624``.
    """
    raw = g.get_state().numpy().tobytes()
    left = int(np.frombuffer(raw, np.int32, 1, 8)[0])
    nxt = int(np.frombuffer(raw, np.uint64, 1, 16)[0])
    key = np.frombuffer(raw, np.uint64, draw.STATE_WORDS, 24)
    assert int(key.max()) < 1 << 32
    return key.astype(np.uint32), (draw.STATE_WORDS if left == 1 else nxt)


def _assert_same_state(g: torch.Generator, bitgen: np.random.MT19937) -> None:
    key, pos = _torch_state(g)
    st_np = bitgen.state["state"]
    assert np.array_equal(st_np["key"], key)
    assert int(st_np["pos"]) == pos
    # and the next draws agree (both generators advance: call last)
    a = torch.rand(3, generator=g, dtype=torch.float64).numpy()
    assert _bits(a) == _bits(draw.uniform64(bitgen, 3))


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _pair(seed: int) -> tuple[torch.Generator, np.random.MT19937]:
    return torch.Generator().manual_seed(seed), draw.generator(seed)


def _torch_log1p(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).log1p().numpy()


# -- the generator ---------------------------------------------------------------------------



# -- the oracle: the library's torch draws before they moved to numpy -------------------------
# (``bnn_tol.faults.maps`` drew fault maps with these torch ops up to issue 19; the geometric
# gaps are still the library's torch ``bernoulli_indices``, which training's transient draws use)

_TORCH_BANDS = (0.0, 2.0**-16, 2.0**-12, 2.0**-9, 2.0**-7, 2.0**-6, 2.0**-5, 2.0**-4, 2.0**-3,
                2.0**-2, 2.0**-1, 1.0)


def _torch_band_cap(cap: float) -> int:
    for j, hi in enumerate(_TORCH_BANDS[1:]):
        if cap <= hi:
            return j + 1
    return len(_TORCH_BANDS) - 1


def _torch_fault_map(numel: int, cap: float, generator: torch.Generator) -> maps.FaultMap:
    with serial():
        n_bands = _torch_band_cap(cap) if cap > 0 else 0
        idx_parts, u_parts = [], []
        for j in range(n_bands):
            lo, hi = _TORCH_BANDS[j], _TORCH_BANDS[j + 1]
            hit = maps.bernoulli_indices(numel, (hi - lo) / (1.0 - lo), generator=generator)
            v = torch.rand(hit.numel(), generator=generator, dtype=torch.float64)
            idx_parts.append(hit)
            u_parts.append((lo + (hi - lo) * v).clamp_(max=math.nextafter(hi, lo)))
        top = _TORCH_BANDS[n_bands]
        if not idx_parts:
            return maps.FaultMap(numel, torch.empty(0, dtype=torch.int64),
                                 torch.empty(0, dtype=torch.float64), top)
        seen = torch.zeros(numel, dtype=torch.bool)
        for j, hit in enumerate(idx_parts):
            if j:
                new = ~seen[hit]
                idx_parts[j], u_parts[j] = hit[new], u_parts[j][new]
            seen[idx_parts[j]] = True
        return maps.FaultMap(numel, torch.cat(idx_parts), torch.cat(u_parts), top)


def _torch_flips(tm: maps.FaultMap, stored: torch.Tensor, p01: float, p10: float):
    if p01 == p10:
        return tm.idx[tm.u < p01]
    s = stored.reshape(-1)[tm.idx] > 0
    return tm.idx[tm.u < torch.where(s, p10, p01)]


def test_the_library_draws_its_maps_and_flips_with_this_module():
    for seed, numel, cap in ((3, 100_000, 0.1), (2**63 - 1, 5000, 1.0), (11, 70_000, 0.003)):
        lib = maps.fault_map(numel, cap, seed=seed)
        _assert_same_map(lib, _torch_fault_map_np(numel, cap, seed))
        stored = torch.where(torch.rand(numel, generator=torch.Generator().manual_seed(seed))
                             < 0.3, 1.0, -1.0)
        for p01, p10 in ((cap / 2, cap / 2), (cap / 3, cap)):
            assert torch.equal(lib.flips(stored, p01, p10),
                               _torch_flips(lib, stored, p01, p10))


def _torch_fault_map_np(numel, cap, seed):
    tm = _torch_fault_map(numel, cap, torch.Generator().manual_seed(seed))
    return draw.MapArrays(tm.numel, tm.idx.numpy(), tm.u.numpy(), tm.cap)

def test_constants_are_the_library_s():
    assert draw.DENSE_ABOVE == maps.DENSE_ABOVE
    assert draw.BAND_EDGES == maps.BAND_EDGES
    for cap in (0.0, 1e-9, 2.0**-16, 0.01, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0):
        assert draw.band_count(cap) == (_torch_band_cap(cap) if cap > 0 else 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_seeding_gives_torch_s_state(seed):
    g, b = _pair(seed)
    _assert_same_state(g, b)


@pytest.mark.parametrize("words", [1, 623, 624, 625, 1248, 1249, 5000])
def test_state_across_twists(words):
    """Float32 draws take one word each: states agree on both sides of every twist."""
    g, b = _pair(2**40 + 17)
    a = torch.rand(words, generator=g).numpy()
    assert _bits(a) == _bits(draw.uniform32(b, words))
    _assert_same_state(g, b)


def test_seeds_equal_mod_2_32_share_a_stream():
    """Torch seeds MT19937 with the low 32 bits of the seed (and so does the replica)."""
    for s in (5, 2**32 - 1):
        a = torch.rand(4, generator=torch.Generator().manual_seed(s + 2**33)).numpy()
        b = torch.rand(4, generator=torch.Generator().manual_seed(s)).numpy()
        assert _bits(a) == _bits(b) == _bits(draw.uniform32(draw.generator(s + 2**33), 4))


@pytest.mark.parametrize("seed", SEEDS)
def test_interleaved_streams(seed):
    """float64 (two words, high first), float32 (one word), int64 (two words) in any order."""
    g, b = _pair(seed)
    plan = [("f64", 0), ("f64", 1), ("f32", 1), ("i64", 3), ("f64", 7), ("f32", 623),
            ("i64", 1), ("f64", 313), ("f32", 0), ("f64", 40_000), ("f32", 3), ("i64", 999)]
    for kind, n in plan:
        if kind == "f64":
            a = torch.rand(n, generator=g, dtype=torch.float64).numpy()
            ours = draw.uniform64(b, n)
        elif kind == "f32":
            a = torch.rand(n, generator=g).numpy()
            ours = draw.uniform32(b, n)
        else:
            a = torch.empty(n, dtype=torch.int64).random_(-(2**63), None, generator=g).numpy()
            ours = draw.random64(b, n)
        assert a.dtype == ours.dtype and a.shape == ours.shape
        assert _bits(a) == _bits(ours), (kind, n)
    _assert_same_state(g, b)


def test_large_streams():
    """Over 10^6 elements (a serial kernel in torch at every size)."""
    g, b = _pair(2**63 - 1)
    a = torch.rand(1_500_000, generator=g, dtype=torch.float64).numpy()
    ours = draw.uniform64(b, 1_500_000)
    assert _bits(a) == _bits(ours)
    assert ours.min() >= 0.0 and ours.max() < 1.0
    a = torch.rand(1_200_000, generator=g).numpy()
    assert _bits(a) == _bits(draw.uniform32(b, 1_200_000))
    _assert_same_state(g, b)


def test_bad_seeds_refused():
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(InvalidArgument):
            draw.generator(bad)
    draw.generator(2**64 - 1)  # torch's manual_seed takes a uint64


# -- bernoulli_indices -----------------------------------------------------------------------


def test_sizes_reach_the_numba_gap_kernel():
    """The torch side of the big cases runs the fused numba kernel (chunks >= 2^15), the small
    ones torch ops: both paths are compared below."""
    n, p = 1 << 20, 0.05
    chunk = int(n * p + 6.0 * math.sqrt(n * p) + 16)
    assert chunk >= maps._KERNEL_FROM
    if kernels.AVAILABLE:
        assert maps._gap_kernel(chunk, "cpu") is not None
    assert maps._gap_kernel(int(1000 * 0.05 + 6 * math.sqrt(50) + 16), "cpu") is None


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", RATES)
def test_bernoulli_indices(n, p):
    for seed in (SEEDS[0], SEEDS[5], SEEDS[-1]) if n < 1 << 20 else (SEEDS[-1],):
        g, b = _pair(seed)
        with serial():
            want = maps.bernoulli_indices(n, p, generator=g).numpy()
        got = draw.bernoulli_indices(n, p, b)
        assert got.dtype == np.int64
        assert np.array_equal(want, got), (seed, n, p)
        _assert_same_state(g, b)


@pytest.mark.parametrize("p", [5e-324, 1e-300, 1e-17, 0.999999, math.nextafter(1.0, 0.0)])
def test_bernoulli_indices_extreme_rates(p):
    """Subnormal to almost-1 rates: infinite quotients clipped to n, float32(p) rounding to 1."""
    g, b = _pair(3)
    with serial():
        want = maps.bernoulli_indices(100_000, p, generator=g).numpy()
    assert np.array_equal(want, draw.bernoulli_indices(100_000, p, b))
    _assert_same_state(g, b)


def test_dense_path_compares_in_float32():
    """Above DENSE_ABOVE torch compares float32 uniforms with ``float32(p)``: a rate just above
    a drawn uniform (in float64) rounds onto it and does not select it."""
    g, b = _pair(11)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(11)).numpy()
    i = int(np.flatnonzero((u > 0.25) & (u < 0.5))[0])
    p = math.nextafter(float(u[i]), 1.0)
    assert np.float32(p) == u[i]
    with serial():
        want = maps.bernoulli_indices(1000, p, generator=g).numpy()
    got = draw.bernoulli_indices(1000, p, b)
    assert np.array_equal(want, got) and i not in got
    _assert_same_state(g, b)


def _untemper(y: int) -> int:
    """The MT19937 state word whose output is ``y`` (inverse of the tempering)."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y
    for _ in range(5):
        x = y ^ ((x << 7) & 0x9D2C5680)
    y = x & 0xFFFFFFFF
    x = y
    for _ in range(3):
        x = y ^ (x >> 11)
    return x & 0xFFFFFFFF


def _rigged(words: list[int]) -> tuple[torch.Generator, np.random.MT19937]:
    """Generators (torch, numpy) whose next outputs are ``words`` (at most 623 of them, read
    from state words 1.. before the next twist: torch's ``next = 1``, ``left = 624``)."""
    assert len(words) <= draw.STATE_WORDS - 1
    g = torch.Generator().manual_seed(0)
    raw = bytearray(g.get_state().numpy().tobytes())
    key = np.frombuffer(raw, np.uint64, draw.STATE_WORDS, 24).copy()
    key[1:1 + len(words)] = [_untemper(w) for w in words]
    raw[8:12] = np.int32(draw.STATE_WORDS).tobytes()
    raw[16:24] = np.uint64(1).tobytes()
    raw[24:24 + 8 * draw.STATE_WORDS] = key.tobytes()
    g.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
    b = np.random.MT19937(0)
    b.state = {"bit_generator": "MT19937", "state": {"key": key.astype(np.uint32), "pos": 1}}
    return g, b


def test_rigged_generators_agree():
    words = [0, 1, 0xFFFFFFFF, 0x80000000, 0x001FFFFF, 0x12345678]
    g, b = _rigged(words)
    assert b.random_raw(len(words)).tolist() == words
    g, b = _rigged(words)
    a = torch.rand(3, generator=g, dtype=torch.float64).numpy()
    assert a.tolist() == [2.0**-53, 0x1FFFFF80000000 * 2.0**-53, 0x1FFFFF12345678 * 2.0**-53]
    assert _bits(a) == _bits(draw.uniform64(b, 3))


@pytest.mark.parametrize("word", [0, 0xFFFFFFFF])
@pytest.mark.parametrize("numel", [1, 3])
def test_extreme_words(word, numel):
    """Every word 0 (u = 0: gaps of 0, every bit hit in band 0, u_i = 0) or every word
    2^32 - 1 (u = 1 - 2^-53: infinite gaps clipped to n, no hit below 1/2, and band [1/2, 1)
    values ``1/2 + v/2`` that round to 1 and are clamped below it)."""
    g, b = _rigged([word] * 600)
    tm = _torch_fault_map(numel, 1.0, g)
    nm = draw.fault_map(numel, 1.0, b)
    _assert_same_map(tm, nm)
    assert nm.u.max() < 1.0 and (word or nm.u.max() == 0.0)
    _assert_same_state(g, b)


def test_log1p_is_the_one_implementation_dependent_step():
    """Seed 72 at this rate puts the first gap's quotient ``log1p(-u) / log1p(-p)`` within an
    ulp of 915: torch on AVX2/AVX-512 (SLEEF) says 915, glibc and numpy's AVX-512 ``log1p``
    914 (docs/notes/torch_rng.md). Given torch's ``log1p``, the replica is exact here too."""
    seed, p, n = 72, 0.0010004588916459184, 1_000_000
    g, b = _pair(seed)
    with serial():
        want = maps.bernoulli_indices(n, p, generator=g).numpy()
        got = draw.bernoulli_indices(n, p, b, log1p=_torch_log1p)
    assert np.array_equal(want, got)
    _assert_same_state(g, b)
    # with numpy's log1p the positions are the same up to that one gap's +-1 (or equal)
    ours = draw.bernoulli_indices(n, p, draw.generator(seed))
    assert ours.size == want.size and set(np.unique(ours - want)) <= {-1, 0, 1}


# -- fault maps ------------------------------------------------------------------------------


def _assert_same_map(tm: maps.FaultMap, nm: draw.MapArrays) -> None:
    assert nm.numel == tm.numel and nm.cap == tm.cap
    assert nm.idx.dtype == np.int64 and nm.u.dtype == np.float64
    assert np.array_equal(tm.idx.numpy(), nm.idx)
    assert _bits(tm.u.numpy()) == _bits(nm.u)


@pytest.mark.parametrize("numel", [0, 1, 100, 40_000, 1_100_000])
@pytest.mark.parametrize("cap", RATES + [2.0**-16, 0.01, 0.1, 0.3])
def test_fault_map(numel, cap):
    for seed in SEEDS[::3] if numel < 1_000_000 else (SEEDS[-1],):
        g, b = _pair(seed)
        tm = _torch_fault_map(numel, cap, g)
        nm = draw.fault_map(numel, cap, b)
        _assert_same_map(tm, nm)
        _assert_same_state(g, b)


def test_fault_map_bad_arguments():
    for cap in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidArgument):
            draw.fault_map(10, cap, draw.generator(0))
        with pytest.raises(InvalidArgument):
            maps.fault_map(10, cap, seed=0)
    with pytest.raises(InvalidArgument):
        draw.fault_map(-1, 0.1, draw.generator(0))


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_flips(seed):
    numel = 50_000
    tm = _torch_fault_map(numel, 0.1, torch.Generator().manual_seed(seed))
    nm = draw.fault_map(numel, 0.1, draw.generator(seed))
    stored = np.where(np.random.default_rng(seed).random(numel) < 0.4, 1.0, -1.0)
    st_t = torch.from_numpy(stored.astype(np.float32))
    for p01, p10 in [(0.0, 0.0), (0.01, 0.01), (0.1, 0.1), (0.01, 0.07), (0.1, 0.0),
                     (0.0, 0.1), (0.033, 0.0991), (1e-4, 1e-3)]:
        want = _torch_flips(tm, st_t, p01, p10).numpy()
        assert np.array_equal(want, draw.flips(nm, stored, p01, p10)), (p01, p10)
        assert np.array_equal(want, draw.flips(nm, stored > 0, p01, p10))
    with pytest.raises(InvalidArgument):
        draw.flips(nm, stored, 0.2, 0.0)


def test_flips_round_asymmetric_rates_to_float32_as_torch_does():
    """``FaultMap.flips`` compares with ``torch.where(s, p10, p01)``, a float32 tensor, when
    ``p01 != p10`` (and with the float64 rate when they are equal): uniforms between ``p`` and
    ``float32(p)`` decide which, so the map is built to have them."""
    p_up, p_down = 0.1, 0.01  # float32(0.1) > 0.1, float32(0.01) < 0.01
    assert float(np.float32(p_up)) > p_up and float(np.float32(p_down)) < p_down
    u = []
    for p in (p_up, p_down):
        lo, hi = sorted((p, float(np.float32(p))))
        u += [lo, math.nextafter(lo, 1.0), math.nextafter(hi, 0.0), hi, (lo + hi) / 2]
    u = np.array(u)
    idx = np.arange(u.size, dtype=np.int64) * 3
    numel = int(idx[-1]) + 1
    tm = maps.FaultMap(numel, torch.from_numpy(idx), torch.from_numpy(u), 0.5)
    nm = draw.MapArrays(numel, idx, u, 0.5)
    for ones in (np.ones(numel), -np.ones(numel), np.where(np.arange(numel) % 2, 1.0, -1.0)):
        st_t = torch.from_numpy(ones.astype(np.float32))
        for p01, p10 in [(p_up, p_down), (p_down, p_up), (p_up, p_up), (p_down, p_down),
                         (p_up, 0.0), (0.0, p_down)]:
            want = _torch_flips(tm, st_t, p01, p10).numpy()
            assert np.array_equal(want, draw.flips(nm, ones, p01, p10)), (p01, p10)


# -- property: any seed, size and rate ------------------------------------------------------

_caps = st.one_of(st.sampled_from(RATES + list(draw.BAND_EDGES)),
                  st.floats(0.0, 1.0, allow_nan=False))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.one_of(st.integers(0, 2**63 - 1), st.sampled_from(SEEDS)),
       numel=st.integers(0, 300_000), cap=_caps, p=_caps)
def test_property_maps_and_indices(seed, numel, cap, p):
    g, b = _pair(seed)
    _assert_same_map(_torch_fault_map(numel, cap, g), draw.fault_map(numel, cap, b))
    with serial():
        want = maps.bernoulli_indices(numel, p, generator=g).numpy()
    assert np.array_equal(want, draw.bernoulli_indices(numel, p, b))
    _assert_same_state(g, b)


# -- numpy only ------------------------------------------------------------------------------


def test_module_imports_numpy_and_exceptions_only():
    tree = ast.parse(DRAW_PY.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    assert names <= {"__future__", "math", "collections.abc", "typing", "numpy",
                     "bnn_tol.exceptions"}, names


def test_draws_without_torch():
    """Loaded as a file (as deploy would), the module draws a map and never imports torch."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('draw_alone', {str(DRAW_PY)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "fm = m.fault_map(100_000, 0.3, m.generator(2**63 - 1))\n"
        "assert fm.idx.size > 0 and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "print(fm.idx.size, fm.idx[:3].tolist(), fm.u[:2].tolist())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tm = _torch_fault_map(100_000, 0.3, torch.Generator().manual_seed(2**63 - 1))
    assert out.stdout.split()[0] == str(tm.idx.numel())
