"""The storage model: codecs, stored bits, and faults on stored bits (issue 11)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from bnn_tol import codec, errors, models
from bnn_tol.core.layers import BinaryLinear, QuantConv2d, QuantLinear
from bnn_tol.exceptions import InvalidArgument

SCHEMES = list(itertools.product((2, 3, 4, 8), codec.SCHEMES, codec.GRANULARITIES))


def _weights(seed: int = 0, shape=(7, 13)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.3 + 0.05


@pytest.mark.parametrize(("bits", "scheme", "gran"), SCHEMES)
def test_round_trip_error_at_most_half_a_step(bits, scheme, gran):
    w = _weights(bits)
    c = codec.FixedPointCodec(bits, scheme, gran, channels=w.shape[0])
    codes = c.encode(w)
    assert codes.dtype == torch.int64 and codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits
    step = c.step()
    step = step[:, None] if gran == "channel" else step
    err = (c.decode(codes) - w).abs()
    # float32 arithmetic: w / Delta and q * Delta each round once (relative 2^-24)
    slack = 4 * torch.finfo(torch.float32).eps * w.abs().max()
    assert bool((err <= step / 2 + slack).all())


@pytest.mark.parametrize(("bits", "scheme"), [(4, "symmetric"), (4, "asymmetric"),
                                              (8, "asymmetric")])
def test_truncation_rounds_toward_zero_and_errs_up_to_a_step(bits, scheme):
    w = _weights(3)
    near = codec.FixedPointCodec(bits, scheme)
    trunc = codec.FixedPointCodec(bits, scheme, rounding="truncate")
    e_near = (near.decode(near.encode(w)) - w).abs()
    e_trunc = (trunc.decode(trunc.encode(w)) - w).abs()
    slack = 4 * torch.finfo(torch.float32).eps * w.abs().max()
    assert bool((e_trunc <= trunc.step() + slack).all())
    assert float(e_trunc.mean()) > float(e_near.mean())  # truncation is the worse quantizer


@pytest.mark.parametrize(("bits", "scheme", "gran"), SCHEMES)
def test_flipping_bit_b_moves_the_weight_by_its_place_value(bits, scheme, gran):
    w = _weights(10 + bits)
    c = codec.FixedPointCodec(bits, scheme, gran, channels=w.shape[0])
    codes = c.encode(w)
    base = c.decode(codes).double()
    bits_img = c.to_bits(codes)
    step = c.step().double()
    step = step[:, None] if gran == "channel" else step
    place = c.place_values()
    if scheme == "symmetric":
        assert float(place[-1]) == -(2.0 ** (bits - 1))
    for b in range(bits):
        flipped = bits_img.clone().view(-1, bits)
        flipped[:, b] ^= 1
        new = c.decode(c.from_bits(flipped.reshape(-1), w.shape)).double()
        was_one = bits_img.view(*w.shape, bits)[..., b].double()
        expected = (1 - 2 * was_one) * float(place[b]) * step  # 0 -> 1 adds, 1 -> 0 subtracts
        # float32: Delta, q Delta and lo + c Delta each round once, relative 2^-24 of the range
        tol = 8 * torch.finfo(torch.float32).eps * float(c.lo.abs().max() + c.hi.abs().max())
        assert bool(((new - base - expected).abs() <= tol).all()), b


def test_bits_are_weight_major_lsb_first():
    c = codec.FixedPointCodec(4, "asymmetric")
    codes = torch.tensor([[0b0001, 0b1010], [0b1111, 0b0100]])
    bits = c.to_bits(codes)
    assert bits.tolist() == [1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 0]
    assert torch.equal(c.from_bits(bits, codes.shape), codes)


def test_sign_codec_is_the_bnn_storage():
    w = _weights(4)
    c = codec.SignCodec()
    assert c.bits_per_weight == 1 and c.is_sign
    assert torch.equal(c.to_bits(c.encode(w)), (w >= 0).to(torch.uint8).reshape(-1))
    assert torch.equal(c.decode(c.encode(w)), torch.where(w >= 0, 1.0, -1.0))
    layer = BinaryLinear(13, 7)
    assert list(layer.state_dict()) == ["weight"]  # no codec state: BNN checkpoints unchanged
    assert torch.equal(layer.deployed_weight(), c.decode(c.encode(layer.weight)))


def test_quantize_is_straight_through():
    w = _weights(5).requires_grad_(True)
    c = codec.FixedPointCodec(4, "asymmetric")
    q = c.quantize(w)
    assert torch.equal(q.detach(), c.decode(c.encode(w.detach())))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (q * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_codec_config_round_trip_and_validation():
    c = codec.FixedPointCodec(6, "asymmetric", "channel", "truncate", channels=5)
    d = codec.make(c.config())
    assert d.config() == c.config()
    assert isinstance(codec.make(None), codec.SignCodec)
    for bad in ({"bits": 9}, {"bits": 1}, {"bits": 4, "scheme": "signed"},
                {"bits": 4, "granularity": "row"}, {"bits": 4, "rounding": "up"}):
        with pytest.raises(InvalidArgument):
            codec.FixedPointCodec(**bad)
    with pytest.raises(InvalidArgument, match="unknown codec kind"):
        codec.make({"kind": "float"})


def test_build_storage_options_validated_and_recorded():
    m = models.build("fc", hidden=(8,), in_shape=(1, 4, 4), weight_bits=4, quant="asymmetric")
    assert m.config["kwargs"]["weight_bits"] == 4 and m.config["kwargs"]["quant"] == "asymmetric"
    assert all(b.activation == "relu" for b in m.blocks[:-1])
    bnn = models.build("fc", hidden=(8,), in_shape=(1, 4, 4))
    assert set(bnn.config["kwargs"]) == {"hidden", "in_shape", "n_classes"}  # unchanged config
    with pytest.raises(InvalidArgument, match="weight_bits"):
        models.build("fc", weight_bits=9)
    with pytest.raises(InvalidArgument, match="weight_bits >= 2"):
        models.build("fc", quant="asymmetric")
    with pytest.raises(InvalidArgument, match="activation"):
        models.build("fc", weight_bits=4, activation="tanh")
    conv = models.build("vgg3", channels=((4,), (4,)), fc_width=8, in_shape=(1, 8, 8),
                        weight_bits=8, granularity="channel")
    assert isinstance(conv.blocks[0].layer, QuantConv2d)
    assert conv.blocks[0].layer.codec.lo.shape == (4,)


@pytest.mark.parametrize(("scheme", "rates"), [("symmetric", 0.05), ("asymmetric", (0.02, 0.08))])
def test_realized_flip_rate_per_bit_position_matches_the_ber(scheme, rates):
    """Each stored bit flips at p01 (stored 0) or p10 (stored 1), at every bit position."""
    bits = 4
    layer = QuantLinear(300, 200, bits=bits, quant=scheme)
    torch.nn.init.uniform_(layer.weight, -1, 1, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(layer)
    p01, p10 = errors.rates(rates)
    stored = layer.stored_bits().view(-1, bits)
    with errors.inject(model, rates, seed=7) as faults:
        layer.deployed_weight()
        idx = faults["0"].last_flips
    flipped = torch.zeros(stored.numel(), dtype=torch.bool)
    flipped[idx] = True
    flipped = flipped.view(-1, bits)
    for b in range(bits):
        for value, p in ((0, p01), (1, p10)):
            cells = stored[:, b] == value
            n, k = int(cells.sum()), int(flipped[:, b][cells].sum())
            if n < 500:
                continue
            assert stats.binomtest(k, n, p).pvalue > 1e-4, (b, value, k, n, p)


def test_injected_m_bit_weights_are_the_decoded_flipped_memory_image():
    layer = QuantLinear(40, 30, bits=8, quant="symmetric")
    model = torch.nn.Sequential(layer)
    c = layer.codec
    img = layer.stored_bits()
    fmap = errors.draw_maps(model, seed=3, cap=0.05)["0"]
    assert fmap.numel == 40 * 30 * 8
    idx = fmap.flips(img.float() * 2 - 1, 0.05, 0.05)
    bad = img.clone()
    bad[idx] ^= 1
    expected = c.decode(c.from_bits(bad, layer.weight.shape))
    with errors.inject(model, 0.05, seed=3):
        got = layer.deployed_weight().detach()
    assert idx.numel() > 0 and torch.equal(got, expected)
    assert torch.equal(layer.deployed_weight().detach(), c.decode(c.encode(layer.weight)))


def test_bnn_fault_maps_have_one_bit_per_weight():
    m = models.build("fc", hidden=(16,), in_shape=(1, 4, 4))
    maps = errors.draw_maps(m, seed=1, cap=0.1)
    assert [f.numel for f in maps.values()] == [16 * 16, 16 * 10]


def test_activation_and_threshold_errors_need_sign_activations():
    m = models.build("fc", hidden=(8,), in_shape=(1, 4, 4), weight_bits=4)
    for target in ("activations", "thresholds"):
        with pytest.raises(InvalidArgument, match="need sign activations"):
            with errors.inject(m, 0.1, targets=target):
                pass


@pytest.mark.parametrize("ber", [0.01, (0.005, 0.03), 0.2, (0.15, 0.3)])
@pytest.mark.parametrize("kind", ["transient", "persistent"])
def test_faults_flip_codes_directly_with_the_same_draws_as_on_the_bit_tensor(ber, kind):
    """The fast path (fault.indices on the codes) equals calling the fault on +-1 bits."""
    def layer_with(fault_factory):
        layer = QuantLinear(50, 40, bits=4, quant="asymmetric")
        torch.nn.init.uniform_(layer.weight, -1, 1, generator=torch.Generator().manual_seed(0))
        layer.fault = fault_factory()
        return layer

    def make():
        if kind == "transient":
            return errors.TransientFlip(ber, torch.Generator().manual_seed(5))
        fmap = errors.fault_map(50 * 40 * 4, max(errors.rates(ber)), seed=5)
        return errors.PersistentFlip(fmap, *errors.rates(ber))

    fast = layer_with(make)
    slow_fault = make()
    slow = layer_with(lambda: (lambda bits: slow_fault(bits)))  # no .indices: the +-1 path
    for _ in range(3):  # consecutive transient draws stay in step
        a, b = fast.deployed_weight(), slow.deployed_weight()
        assert torch.equal(a, b)
    assert not torch.equal(a, fast.codec.decode(fast.codec.encode(fast.weight)))


@pytest.mark.parametrize(("scheme", "gran"),
                         list(itertools.product(codec.SCHEMES, codec.GRANULARITIES)))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fixed_point_encode_refuses_nan_and_inf_weights(scheme, gran, bad):
    """Issue 20 item 13: NaN/inf weights were encoded as code 0 (a weight of 0 or lo)."""
    w = _weights()
    w[3, 5] = bad
    c = codec.FixedPointCodec(4, scheme, gran, channels=w.shape[0])
    with pytest.raises(InvalidArgument, match=r"NaN or inf.*\(3, 5\)"):
        c.encode(w)
    with pytest.raises(InvalidArgument, match="NaN or inf"):
        c.quantize(w.requires_grad_())
    # the refused calls left the stored range untouched; finite weights encode as before
    assert torch.equal(c.lo, -torch.ones_like(c.lo)) and torch.equal(c.hi, torch.ones_like(c.hi))
    good = _weights()
    fresh = codec.FixedPointCodec(4, scheme, gran, channels=w.shape[0])
    assert torch.equal(c.encode(good), fresh.encode(good))
    c.frozen = True
    c.hi.fill_(float("nan"))
    with pytest.raises(InvalidArgument, match="range"):
        c.encode(good)


def test_make_refuses_specs_that_are_not_codec_configs():
    """Issue 20 item 15: ``codec.make("fixed")`` ended in an AttributeError."""
    for spec, match in (("fixed", "mapping"), (["fixed"], "mapping"), (4, "mapping"),
                        ({"kind": "fixed"}, "bits"), ({"kind": "fixed", "bits": 4.5}, "bits"),
                        ({"kind": "fixed", "bits": 4, "colour": 1}, "colour"),
                        ({"kind": ["sign"]}, "kind")):
        with pytest.raises(InvalidArgument, match=match):
            codec.make(spec)
    assert codec.make({"kind": "fixed", "bits": 4}).config() == codec.FixedPointCodec(4).config()


# -- the paper's quantization ladder (issue 23): hand-computed words ------------------------

#: 4-bit weights on dyadic steps (Delta = 1/8), so every product below is exact in float32:
#: x = w / Delta (symmetric) or (w - lo) / Delta (- 7 for asymmetric-signed).
_W_SYM = [-0.875, -0.3125, 0.0, 0.4375, 0.6, 0.875]    # r = 7/8: Delta = r / 7 = 1/8
_W_ASYM = [-0.875, -0.3125, 0.0, 0.4375, 0.6, 1.0]     # hi - lo = 15/8: Delta = 1/8


@pytest.mark.parametrize("scheme, w, rounding, codes", [
    # x = [-7, -2.5, 0, 3.5, 4.8, 7]: half away from zero vs toward zero; q mod 16
    ("symmetric", _W_SYM, "nearest", [9, 13, 0, 4, 5, 7]),
    ("symmetric", _W_SYM, "truncate", [9, 14, 0, 3, 4, 7]),
    # x = [0, 4.5, 7, 10.5, 11.8, 15]: unsigned, the code is the level
    ("asymmetric", _W_ASYM, "nearest", [0, 5, 7, 11, 12, 15]),
    ("asymmetric", _W_ASYM, "truncate", [0, 4, 7, 10, 11, 15]),
    # hi - lo = 14/8: Delta = 1/8, x = (w + 7/8) 8 - 7 = [-7, -2.5, 0, 3.5, 4.8, 7]
    ("asymmetric-signed", _W_SYM, "nearest", [9, 13, 0, 4, 5, 7]),
    ("asymmetric-signed", _W_SYM, "truncate", [9, 14, 0, 3, 4, 7]),
])
def test_codes_of_the_ladder_schemes_equal_hand_computed_words(scheme, w, rounding, codes):
    c = codec.FixedPointCodec(4, scheme, rounding=rounding)
    got = c.encode(torch.tensor([w]))
    assert got.tolist() == [codes]
    assert float(c.step()) == 0.125
    q = torch.tensor(codes)
    q = q if scheme == "asymmetric" else torch.where(q >= 8, q - 16, q)
    lo = 0.0 if scheme == "symmetric" else w[0]
    want = q * 0.125 + (lo + (7 * 0.125 if scheme == "asymmetric-signed" else 0.0))
    assert c.decode(got).tolist() == [want.tolist()]


def test_network_granularity_shares_one_range_over_the_model_and_follows_training():
    from bnn_tol import train
    from bnn_tol.core.codec import share_ranges

    model = models.build("fc", hidden=(16, 8), in_shape=(1, 8, 8), weight_bits=4,
                         quant="symmetric", granularity="network", rounding="truncate", seed=3)
    layers = list(model.binary_layers().values())
    r = max(float(layer.weight.detach().abs().max()) for layer in layers)
    for layer in layers:  # the paper's Normal quantization: one global range
        assert layer.codec.frozen
        assert (float(layer.codec.lo), float(layer.codec.hi)) == (-r, r)
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(2.0)
    assert share_ranges(model) == len(layers)
    r2 = max(float(layer.weight.detach().abs().max()) for layer in layers)
    assert r2 > r and all(float(layer.codec.hi) == r2 for layer in layers)
    train.fit(model, _quadrants(), epochs=1, batch_size=64, seed=0, progress=False)
    r3 = max(float(layer.weight.detach().abs().max()) for layer in layers)
    assert all(float(layer.codec.hi) == r3 for layer in layers)
    assert model.binary_layers()["blocks.0.layer"].codec.config()["granularity"] == "network"


def _quadrants():
    from bnn_tol.data import BNNDataset

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (128,), generator=g)
    img = torch.randint(0, 256, (128, 1, 8, 8), generator=g, dtype=torch.uint8)
    return BNNDataset(img, y)
