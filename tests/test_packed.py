"""The packed-bit XNOR/popcount engine (issue 13): kernels against slow obvious references, and
sweeps bit-identical to the reference engine (inject + model(x)) on fc and conv BNNs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st

from bnn_tol import data, errors, evaluate, models
from bnn_tol.core import kernels
from bnn_tol.engines import int8 as int8_engine

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")

#: Both implementations of the hidden-layer kernels, ``(fc_hidden, conv_hidden)``: the register
#: tiles (AVX-512 VPOPCNTDQ) and the counts-in-memory kernels; ``kernels.TILES`` picks one per
#: CPU, and the tests run both on every CPU.
HIDDEN = {"tiles": ("_fc_hidden_tiles", "_conv_hidden_tiles"),
          "taps": ("_fc_hidden_taps", "_conv_hidden_taps")}
by_impl = pytest.mark.parametrize("impl", list(HIDDEN))


def _fc_hidden(impl):
    return getattr(kernels, HIDDEN[impl][0])


def _conv_hidden(impl):
    return getattr(kernels, HIDDEN[impl][1])


def _pm1(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < 0.5, 1.0, -1.0)


def _rule(o, seed):
    """A comparator with both directions and dead units of both constants."""
    g = np.random.default_rng(seed)
    d = g.choice([-1, 0, 1], size=o, p=[0.4, 0.2, 0.4])
    t = g.integers(-20, 20, size=o)
    const = g.choice([-1, 1], size=o)
    return d, t, const


def _expected_bits(a, d, t, const):
    """The folded rule written out per unit: d > 0: a >= t; d < 0: a <= t; d = 0: const."""
    pos = np.where(d > 0, a >= t, a <= t)
    return np.where(d == 0, const > 0, pos)


def _unpack(words, n):
    by = np.ascontiguousarray(words).view(np.uint8)
    return np.unpackbits(by, axis=-1, bitorder="little")[..., :n].astype(bool)


def test_pack_rows_is_little_endian_per_word():
    v = -np.ones((2, 130))
    v[0, 0] = v[0, 64] = v[1, 129] = 1
    w = kernels.pack_rows(v)
    assert w.shape == (2, 3) and w.dtype == np.uint64
    assert w[0].tolist() == [1, 1, 0] and w[1].tolist() == [0, 0, 2]


@by_impl
@pytest.mark.parametrize("n_in,n_out", [(64, 64), (100, 70), (300, 129)])
def test_fc_kernels_equal_the_integer_dot_product(n_in, n_out, impl):
    x, w = _pm1((33, n_in), 0), _pm1((n_out, n_in), 1)
    a = (x @ w.t()).numpy().astype(np.int64)  # exact: small integers
    x_p = kernels.pack_rows(x.numpy())
    w_p = kernels.pack_rows(w.numpy())
    out = np.empty((33, n_out), np.int64)
    kernels.fc_output(x_p, w_p, n_in, out)
    assert (out == a).all()
    d, t, const = _rule(n_out, 2)
    bits = np.empty((33, -(-n_out // 64)), np.uint64)
    _fc_hidden(impl)(x_p, w_p.T.copy(), n_in, *kernels.comparator(d, t, const), bits)
    assert (_unpack(bits, n_out) == _expected_bits(a, d, t, const)).all()


@pytest.mark.parametrize("n_r,n_o", [(1, 1), (9, 64), (18, 67), (64, 2048)])
def test_halves_split_each_word_in_order_on_a_64_byte_boundary(n_r, n_o):
    """The register tiles' weights: row ``2 r`` the low, ``2 r + 1`` the high half of word row
    ``r``; data on a 64-byte boundary whatever the allocator returned (a straddling zmm load
    cost the 2048 x 2048 layer up to 26 %)."""
    rng = np.random.default_rng(n_r * n_o)
    w = rng.integers(0, 2**63, (n_r, n_o), dtype=np.int64).view(np.uint64) ^ np.uint64(2**63)
    kept = [kernels._halves(w) for _ in range(20)]  # alive: 20 distinct allocations
    for h in kept:
        assert h.dtype == np.uint32 and h.shape == (2 * n_r, n_o) and h.flags.c_contiguous
        assert h.ctypes.data % 64 == 0
        assert (h[0::2].astype(np.uint64) | h[1::2].astype(np.uint64) << np.uint64(32) == w).all()


@pytest.mark.parametrize("n_b", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (63, 3), (65, 67), (130, 128), (2048, 131),
                                         (2100, 64)])
@by_impl
def test_fc_kernel_tiles_cover_odd_widths_and_batch_tails(n_b, n_in, n_out, impl):
    """``fc_output``'s 4-sample x 2-unit tiles and ``fc_hidden``'s register tiles (sample
    pairs x 64 units over 32-bit half-words): batches not a multiple of 4 (or odd), unit
    counts below 64 and past a multiple of 64 (the masked last tile; its bits past the last
    unit stay 0 in a buffer that started all ones), widths not a multiple of 64 (1, 2, 3 and
    33 words); every unit kind of the comparator (d = +1, -1, dead +1 / -1), ties ``a ==
    t``."""
    x, w = _pm1((n_b, n_in), 10 + n_b), _pm1((n_out, n_in), 11)
    a = (x.double() @ w.double().t()).numpy().astype(np.int64)
    x_p, w_p = kernels.pack_rows(x.numpy()), kernels.pack_rows(w.numpy())
    out = np.full((n_b, n_out), 7, np.int64)
    kernels.fc_output(x_p, w_p, n_in, out)
    assert (out == a).all()
    d, t, const = _rule(n_out, 12)
    t[::3] = a[0, ::3]  # ties a == t on the first sample: >= and <= both hold
    bits = np.full((n_b, -(-n_out // 64)), 2**64 - 1, np.uint64)
    _fc_hidden(impl)(x_p, w_p.T.copy(), n_in, *kernels.comparator(d, t, const), bits)
    assert (_unpack(bits, n_out) == _expected_bits(a, d, t, const)).all()
    assert (np.bitwise_count(bits).sum(1) == _expected_bits(a, d, t, const).sum(1)).all()


@pytest.mark.parametrize("n_b", [1, 63, 64, 130, 1100, 4700])
@pytest.mark.parametrize("n_flips", [0, 1, 40, 900])
def test_fc_first_delta_equals_the_flipped_integer_product(n_b, n_flips):
    """``a0 + sum_f coef_f q[col_f]`` by rows == ``W' q`` of the flipped weights, thresholded;
    flips in any order, sample blocks with tails, odd unit count, ties, dead units."""
    n_in, n_out = 50, 70
    g = torch.Generator().manual_seed(n_b + n_flips)
    q = torch.randint(-128, 128, (n_b, n_in), generator=g, dtype=torch.int64)
    w = _pm1((n_out, n_in), 15).to(torch.int64)
    idx = torch.randperm(w.numel(), generator=g)[:n_flips]  # unsorted
    w2 = w.clone().view(-1)
    w2[idx] = -w2[idx]
    a = (q @ w2.view_as(w).t()).numpy()
    rows, cols = np.divmod(idx.numpy(), n_in)
    coef = (-2 * w.view(-1)[idx]).to(torch.int32).numpy()
    d, t, const = _rule(n_out, 16)
    t = t * 40
    t[::4] = a[0, ::4]  # ties
    bits = np.full((n_b, 2), 2**64 - 1, np.uint64)
    kernels.fc_first_delta(np.ascontiguousarray((w @ q.t()).to(torch.int32).numpy()),
                           np.ascontiguousarray(q.t().to(torch.int32).numpy()), rows, cols,
                           coef, *kernels.comparator(d, t, const), bits, np.zeros((0, 0), np.int32))
    assert (_unpack(bits, n_out) == _expected_bits(a, d, t, const)).all()
    assert (np.bitwise_count(bits).sum(1) == _expected_bits(a, d, t, const).sum(1)).all()


@pytest.mark.parametrize("kind", ["linear", "flatten", "conv"])
def test_flip_positions_equal_packing_the_flipped_weights(kind):
    """XOR at :meth:`_PackedLayout.positions` == packing the negated +-1 weights."""
    from bnn_tol.engines.packed import _PackedLayout
    from bnn_tol.faults.apply import negate

    shape = {"linear": (5, 130), "flatten": (5, 70 * 3 * 2), "conv": (70, 67, 3, 3)}[kind]
    w = _pm1(shape, 13)

    class St:
        conv, pool, index, wb, kernel, padding = kind == "conv", None, 1, w, (3, 3), (1, 1)
        in_shape = (67, 5, 5) if kind == "conv" else (shape[1],)
        preact_shape = (shape[0], 5, 5) if kind == "conv" else (shape[0],)

    lay = _PackedLayout(St, (70, 3, 2) if kind == "flatten" else St.in_shape)
    idx = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(14))[:97]
    words = lay.pack(w)
    word, bit = lay.positions(idx.numpy())
    kernels.flip_words(words, word.astype(np.int64), bit.astype(np.int64))
    assert (words == lay.pack(negate(w, idx))).all()


@pytest.mark.parametrize(
    "c_in,c_out,k,pad,hw",
    [(64, 64, 3, 1, 7), (70, 130, 3, 1, 6), (5, 9, 3, 0, 5), (3, 4, 5, 2, 4), (65, 128, 3, 1, 2),
     (128, 192, 3, 1, 5), (9, 70, 5, 1, 3)],
)
@by_impl
def test_conv_hidden_equals_conv2d_with_zero_padding(c_in, c_out, k, pad, hw, impl):
    """Every border class (corners, edges, images smaller than the kernel, more padding
    classes than 3 x 3), odd position counts (the last position of a pair computed twice),
    widths across word boundaries, dead units of both signs."""
    x, w = _pm1((4, c_in, hw, hw), 3), _pm1((c_out, c_in, k, k), 4)
    a = F.conv2d(x, w, padding=pad).numpy().astype(np.int64)  # (B, O, Ho, Wo)
    from bnn_tol.engines.packed import _PackedLayout

    class St:  # the few compiled-stage facts a layout reads
        conv, pool, index, wb, kernel, padding = True, None, 1, w, (k, k), (pad, pad)
        in_shape = (c_in, hw, hw)
        preact_shape = (c_out, hw + 2 * pad - k + 1, hw + 2 * pad - k + 1)

    lay = _PackedLayout(St, (c_in, hw, hw))
    w_t = lay.pack(w)
    d, t, const = _rule(c_out, 5)
    out = np.empty((4, *a.shape[2:], -(-c_out // 64)), np.uint64)
    _conv_hidden(impl)(
        kernels.pack_rows(x.permute(0, 2, 3, 1).numpy()),
        w_t,
        k,
        pad,
        *lay.windows(w_t, kernels.comparator(d, t, const)),
        out,
    )
    want = _expected_bits(a.transpose(0, 2, 3, 1), d, t, const)
    assert (_unpack(out, c_out) == want).all()


@settings(max_examples=30, deadline=None)
@given(c_in=st.integers(1, 140), c_out=st.integers(1, 140), k=st.sampled_from([1, 3, 5]),
       pad=st.integers(0, 3), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 99))
@by_impl
def test_conv_hidden_equals_conv2d_on_any_shape(impl, c_in, c_out, k, pad, h, w, seed):
    """Property: any channel counts, kernel, padding (also wider than the kernel: positions
    with no tap inside) and non-square image whose output is not empty."""
    if h + 2 * pad < k or w + 2 * pad < k:
        return
    x, wt = _pm1((3, c_in, h, w), seed), _pm1((c_out, c_in, k, k), seed + 1)
    a = F.conv2d(x, wt, padding=pad).numpy().astype(np.int64)
    from bnn_tol.engines.packed import _PackedLayout

    class St:
        conv, pool, index, wb, kernel, padding = True, None, 1, wt, (k, k), (pad, pad)
        in_shape = (c_in, h, w)
        preact_shape = (c_out, *a.shape[2:])

    lay = _PackedLayout(St, (c_in, h, w))
    w_t = lay.pack(wt)
    d, t, const = _rule(c_out, seed)
    out = np.empty((3, *a.shape[2:], -(-c_out // 64)), np.uint64)
    xb = kernels.pack_rows(x.permute(0, 2, 3, 1).numpy())
    args = (xb, w_t, k, pad, *lay.windows(w_t, kernels.comparator(d, t, const)), out)
    _conv_hidden(impl)(*args)
    want = _expected_bits(a.transpose(0, 2, 3, 1), d, t, const)
    assert (_unpack(out, c_out) == want).all()


@pytest.mark.parametrize("pool,pad,size", [(2, 1, 9), (1, 0, 8), (3, 1, 10)])
def test_conv_first_equals_conv2d_and_recomputes_the_named_channels_only(pool, pad, size):
    """``conv_first`` with every channel == the rule on ``F.conv2d`` of the integer pixels,
    max-pooled (both words of 70 channels, odd sizes and floor pooling, zero padding, dead
    units, a tail block of images); with some channels named it equals the flipped conv on
    those and keeps the clean bits of the others even where they would change."""
    g = torch.Generator().manual_seed(pool + pad)
    q = torch.randint(-128, 128, (67, 2, size, size), generator=g, dtype=torch.int32)
    w = _pm1((70, 2, 3, 3), 6)
    w2 = w.clone()
    flipped = [0, 3, 63, 64, 69]
    for o in flipped:
        w2[o, 1] *= -1
    w2[7, 0, 1, 1] *= -1  # changed, but not named: must keep its clean bits
    d, t, const = _rule(70, 7)
    dd, td = kernels.comparator(d, t * 50, const)  # the folded rule d a >= td, dead units too

    def pooled(weights):
        a = F.conv2d(q.double(), weights.double(), padding=pad).numpy().astype(np.int64)
        bits = (dd[:, None, None] * a) >= td[:, None, None]  # (B, O, H, W)
        bits = torch.from_numpy(bits.astype(np.float32))
        return (F.max_pool2d(bits, pool) > 0).permute(0, 2, 3, 1).numpy()

    ho = (size + 2 * pad - 2) // pool
    clean, out = (np.empty((67, ho, ho, 2), np.uint64) for _ in range(2))
    qc = np.ascontiguousarray(q.permute(2, 3, 1, 0).numpy())  # batch last
    for weights, dst, chans in ((w, clean, list(range(70))), (w2, out, flipped)):
        w_t = np.ascontiguousarray(weights.permute(2, 3, 1, 0).reshape(-1, 70)
                                   .to(torch.int32).numpy())
        kernels.conv_first(qc, w_t, 3, pad, pool, np.array(chans, np.int64), dd, td,
                           np.zeros_like(dst) if dst is clean else clean, dst)
    want_clean = pooled(w)
    assert (_unpack(clean, 70) == want_clean).all()  # every channel named: the whole conv
    want = pooled(w2)
    got = _unpack(out, 70)
    assert (got[..., flipped] == want[..., flipped]).all()
    assert (got[..., 7] == _unpack(clean, 70)[..., 7]).all()
    assert (want[..., flipped] != want_clean[..., flipped]).any()  # the flips matter


def test_pool_or_is_max_pooling_of_signs_in_floor_mode():
    x = _pm1((2, 70, 7, 7), 8)
    out = np.empty((2, 3, 3, 2), np.uint64)
    kernels.pool_or(kernels.pack_rows(x.permute(0, 2, 3, 1).numpy()), 2, out)
    want = F.max_pool2d(x, 2).permute(0, 2, 3, 1).numpy() > 0
    assert (_unpack(out, 70) == want).all()


def _data(model, shape, n=300, seed=0):
    """Random images labelled with the clean model's predictions (clean accuracy 1)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        labels = model(data.to_float(images)).argmax(1)
    return data.BNNDataset(images, labels, name="synthetic")


CASES = [
    ("fc", {"hidden": (100, 70)}, (1, 12, 12)),
    ("vgg3", {"channels": ((16,), (70,)), "fc_width": 50}, (1, 14, 14)),
    ("vgg7", {"channels": ((8, 8), (65, 65), (20, 20)), "fc_width": 30}, (3, 16, 16)),
]


@pytest.mark.parametrize("arch,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_packed_sweep_rows_equal_the_reference_engine(arch, kw, shape):
    model = randomize_bn(models.build(arch, in_shape=shape, seed=3, **kw), seed=4)
    with torch.no_grad():  # a dead unit (gamma = 0) in a hidden conv/fc block
        model.blocks[1].bn.weight[2] = 0.0
    ds = _data(model, shape)
    sw = dict(bers=[0.0, 0.02, (0.05, 0.15), 0.3], n_maps=3, seed=1, progress=False, batch_size=128)
    ref = evaluate.sweep(model, ds, engine="reference", **sw)
    got = evaluate.sweep(model, ds, engine="packed", **sw)
    assert got["accuracy"].tolist() == ref["accuracy"].tolist()
    assert ref["accuracy"].nunique() > 3  # the flips matter, the comparison is not vacuous
    last = list(model.binary_layers())[1:]  # a clean first layer: the prefix is reused
    ref = evaluate.sweep(model, ds, engine="reference", layers=last, **sw)
    got = evaluate.sweep(model, ds, engine="packed", layers=last, **sw)
    assert got["accuracy"].tolist() == ref["accuracy"].tolist()


@pytest.mark.parametrize("arch,kw,shape", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_packed_equals_reference_with_one_map(arch, kw, shape):
    """``n_maps = 1``: one map chained through every BER (the first layer's delta starts from
    the clean output and is never reset by a second map), BERs unsorted."""
    model = randomize_bn(models.build(arch, in_shape=shape, seed=11, **kw), seed=12)
    ds = _data(model, shape, n=97, seed=5)
    sw = dict(bers=[0.05, 0.0, 0.2, 0.01], n_maps=1, seed=9, progress=False)
    ref = evaluate.sweep(model, ds, engine="reference", **sw)
    got = evaluate.sweep(model, ds, engine="packed", **sw)
    assert len(got) == 4 and got["accuracy"].tolist() == ref["accuracy"].tolist()
    assert ref["accuracy"].nunique() > 2


ODD = [
    ("fc", {"hidden": (67, 129, 3)}, (1, 11, 9)),
    ("vgg3", {"channels": ((5,), (67,)), "fc_width": 33}, (1, 10, 10)),
    ("vgg7", {"channels": ((5, 64), (67, 130), (3, 65)), "fc_width": 33}, (3, 12, 12)),
]


@by_impl
@pytest.mark.parametrize("arch,kw,shape", ODD, ids=[c[0] for c in ODD])
def test_packed_equals_reference_on_odd_widths_dead_units_and_negative_gamma(
        arch, kw, shape, impl, monkeypatch):
    """Widths that are not multiples of 64 (odd unit counts, a 3-unit layer; vgg7: exactly 64,
    two words with a tail, a tail word alone, odd positions 3 x 3), a data chunk that is not a
    multiple of the kernels' 4-sample tiles, dead units (gamma = 0) and gamma < 0
    units in every hidden block; with either implementation of the hidden kernels."""
    monkeypatch.setattr(kernels, "fc_hidden", _fc_hidden(impl))
    monkeypatch.setattr(kernels, "conv_hidden", _conv_hidden(impl))
    model = randomize_bn(models.build(arch, in_shape=shape, seed=7, **kw), seed=8)
    with torch.no_grad():
        for b in model.blocks[:-1]:
            b.bn.weight[0] = 0.0
            b.bn.weight[1] = -abs(float(b.bn.weight[1])) - 0.1
    ds = _data(model, shape, n=251, seed=3)
    sw = dict(bers=[0.0, 0.04, 0.01, 0.3, 0.1], n_maps=3, seed=2, progress=False, batch_size=83)
    ref = evaluate.sweep(model, ds, engine="reference", **sw)
    got = evaluate.sweep(model, ds, engine="packed", **sw)
    assert got["accuracy"].tolist() == ref["accuracy"].tolist()
    assert ref["accuracy"].nunique() > 3


def test_packed_engine_equals_naive_loop_on_explicit_flips():
    model = randomize_bn(
        models.build("vgg3", in_shape=(1, 14, 14), channels=((16,), (64,)), fc_width=40, seed=5),
        seed=6,
    )
    ds = _data(model, (1, 14, 14), n=200, seed=2)
    layers = model.binary_layers()
    g = torch.Generator().manual_seed(0)
    sets = [
        {n: torch.randperm(lay.weight.numel(), generator=g)[:40] for n, lay in layers.items()}
        for _ in range(3)
    ]
    got = evaluate.accuracy_under_flips(model, ds, sets, engine="packed")
    want = evaluate.accuracy_under_flips(model, ds, sets, engine="reference")
    assert got == want


def test_chained_first_layer_equals_each_flip_set_alone():
    """:meth:`PackedNet.weights_seq` chains a first linear layer through consecutive flip sets
    (nested, shrinking, disjoint, clean, and a dense GEMM set in the middle, several data
    chunks with tails): every set's predictions equal evaluating it alone from the clean
    output, and the chain is taken where it is shorter."""
    from bnn_tol.core.compiled import compile_model
    from bnn_tol.engines.packed import PackedEngine

    model = randomize_bn(models.build("fc", hidden=(97, 70), in_shape=(1, 9, 9), seed=11),
                         seed=12)
    ds = _data(model, (1, 9, 9), n=203, seed=5)
    n = model.blocks[0].layer.weight.numel()
    g = torch.Generator().manual_seed(3)
    u = torch.rand(n, generator=g)
    first = compile_model(model).stages[0].name
    sets = [{first: torch.nonzero(u < p).flatten()} for p in (0.01, 0.03, 0.04, 0, 0.08, 0.07)]
    sets[3] = {}  # clean in the middle
    sets.append({first: torch.nonzero(u > 0.97).flatten()})  # disjoint from the previous one
    sets.append({first: torch.nonzero(u < 0.5).flatten()})  # dense: the float GEMM
    sets.append({first: torch.nonzero(u < 0.49).flatten()})  # after a GEMM: from clean
    eng = PackedEngine(model, ds, layers=None, device=torch.device("cpu"), batch_size=64,
                       maps_per_step=None, targets=("weights",))
    seq = eng.net.weights_seq([eng.by_index(f) for f in sets])
    kinds = [ws[0][0] if ws[0][0] != "delta" else ("chained" if ws[0][4] else "clean")
             for ws in seq]
    assert kinds == ["clean", "chained", "chained", "clean", "clean", "chained", "clean",
                     "dense", "dense"]
    assert eng.evaluate(sets) == [eng.evaluate([f])[0] for f in sets]
    assert eng.evaluate(sets) == evaluate.accuracy_under_flips(model, ds, sets,
                                                               engine="reference")
    assert len(set(eng.evaluate(sets))) > 3


def test_chained_first_conv_equals_each_flip_set_alone():
    """A first conv chains too: only the channels whose flips changed since the previous set
    are recomputed from the previous set's pooled bits (nested, shrinking, clean and disjoint
    sets, data chunks with tails); predictions equal each set alone and the reference."""
    from bnn_tol.core.compiled import compile_model
    from bnn_tol.engines.packed import PackedEngine

    model = randomize_bn(models.build("vgg3", in_shape=(1, 10, 10), channels=((70,), (20,)),
                                      fc_width=30, seed=13), seed=14)
    ds = _data(model, (1, 10, 10), n=150, seed=6)
    n = model.blocks[0].layer.weight.numel()
    u = torch.rand(n, generator=torch.Generator().manual_seed(4))
    first = compile_model(model).stages[0].name
    sets = [{first: torch.nonzero(u < p).flatten()} for p in (0.005, 0.01, 0.02, 0, 0.3, 0.28)]
    sets[3] = {}
    sets.append({first: torch.nonzero(u > 0.99).flatten()})
    eng = PackedEngine(model, ds, layers=None, device=torch.device("cpu"), batch_size=64,
                       maps_per_step=None, targets=("weights",))
    seq = eng.net.weights_seq([eng.by_index(f) for f in sets])
    chained = [len(ws[0]) == 4 and bool(ws[0][2]) for ws in seq]
    assert chained == [False, True, True, False, False, True, False]
    assert all(len(seq[i][0][1]) < len(np.unique(sets[i][first].numpy() // 9))
               for i in (1, 2, 5))  # fewer channels recomputed than have flips
    got = eng.evaluate(sets)
    assert got == [eng.evaluate([f])[0] for f in sets]
    assert got == evaluate.accuracy_under_flips(model, ds, sets, engine="reference")
    assert len(set(got)) > 3


def test_auto_picks_packed_for_bnns_on_cpu():
    """packed for conv BNNs; for fc too unless AMX makes int8 faster (both branches with a
    patched CPU check: test_engines)."""
    model = models.build("fc", hidden=(32,), in_shape=(1, 4, 4))
    conv = models.build("vgg3", in_shape=(1, 8, 8), channels=((4,), (8,)), fc_width=16)
    cpu = torch.device("cpu")
    fc_engine = "int8" if int8_engine.int8_has_amx() else "packed"
    assert (
        evaluate.pick_engine(model, device=cpu, engine="auto", targets=("weights",)).name
        == fc_engine
    )
    assert (
        evaluate.pick_engine(conv, device=cpu, engine="auto", targets=("weights",)).name == "packed"
    )
    assert evaluate.engines()[0] == "packed"
    maps = errors.draw_maps(model, 0, 0.1)
    assert set(maps) == set(model.binary_layers())
