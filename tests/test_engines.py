"""The engine registry and the exact m-bit engine (issue 11)."""

from __future__ import annotations

import copy

import pytest
import torch

import bnn_tol.engines.int8 as int8_engine
from bnn_tol import errors, evaluate, models
from bnn_tol.core.compiled import UnsupportedModel, check_bnn, compile_model
from bnn_tol.data import BNNDataset


def _accuracy_with(model, data, flips):
    with errors.apply(model, flips):
        return evaluate.accuracy(model, data)


def _data(n=300, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return BNNDataset(
        torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n,), generator=g),
        name="synthetic",
    )


def _trained_like(model, seed=0):
    """Random BN statistics so that errors change predictions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.blocks:
            b.bn.running_mean.normal_(0, 0.5, generator=g)
            b.bn.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def _naive(model, data, ber, seed):
    """Deepcopy, flip the stored bits of map ``seed``, decode, plain ``model(x)``."""
    fmaps = errors.draw_maps(model, seed, max(errors.rates(ber)))
    p01, p10 = errors.rates(ber)
    bad = copy.deepcopy(model)
    for name, layer in bad.binary_layers().items():
        c = layer.codec
        bits = c.to_bits(c.encode(layer.weight.detach()))
        idx = fmaps[name].flips(bits.float() * 2 - 1, p01, p10)
        bits[idx] ^= 1
        w = c.decode(c.from_bits(bits, layer.weight.shape))
        layer.deployed_weight = lambda w=w: w  # the layer computes with the decoded image
        if c.is_sign:
            layer.binary_weight = lambda w=w: w
    return evaluate.accuracy(bad, data)


CASES = [
    ("fc", {"hidden": (32, 24)}, 4, "symmetric", "layer"),
    ("fc", {"hidden": (32, 24)}, 8, "asymmetric", "channel"),
    ("vgg3", {"channels": ((4,), (6,)), "fc_width": 16}, 4, "asymmetric", "layer"),
    ("vgg3", {"channels": ((4,), (6,)), "fc_width": 16}, 8, "symmetric", "channel"),
]


@pytest.mark.parametrize(("arch", "kw", "bits", "quant", "gran"), CASES)
def test_m_bit_sweep_rows_equal_the_naive_loop_and_replay_alone(arch, kw, bits, quant, gran):
    model = _trained_like(
        models.build(
            arch, in_shape=(1, 8, 8), weight_bits=bits, quant=quant, granularity=gran, seed=1, **kw
        )
    )
    data = _data()
    bers = [0.0, 0.01, (0.005, 0.03)]
    df = evaluate.sweep({"q": model}, data, bers=bers, n_maps=3, seed=2, progress=False)
    assert (
        evaluate.pick_engine(
            model, device=torch.device("cpu"), engine="auto", targets=("weights",)
        ).name
        == "fixed"
    )
    changed = 0
    for r in df.itertuples():
        ber = (r.p01, r.p10)
        assert r.accuracy == _naive(model, data, ber, r.map_seed)
        with errors.inject(model, ber, seed=r.map_seed):
            assert r.accuracy == evaluate.accuracy(model, data)
        changed += r.accuracy != df.accuracy.iloc[0]
    assert changed > 0  # the errors matter: the test can fail


def test_auto_picks_the_fastest_exact_engine_that_supports_the_model(monkeypatch):
    from bnn_tol.core import kernels

    cpu = torch.device("cpu")
    bnn = models.build("fc", hidden=(8,), in_shape=(1, 4, 4))
    q = models.build("fc", hidden=(8,), in_shape=(1, 4, 4), weight_bits=4)
    conv = models.build("vgg3", in_shape=(1, 8, 8), channels=((4,), (8,)), fc_width=16)
    monkeypatch.setattr(kernels, "AVAILABLE", True)
    # AMX makes int8 the fastest on fc; conv models stay packed
    monkeypatch.setattr(int8_engine, "int8_is_fast", lambda: True)
    monkeypatch.setattr(int8_engine, "int8_has_amx", lambda: True)
    assert evaluate.pick_engine(bnn, device=cpu, engine="auto", targets=("weights",)).name == "int8"
    assert (
        evaluate.pick_engine(conv, device=cpu, engine="auto", targets=("weights",)).name == "packed"
    )
    # VNNI without AMX: the popcount kernels beat torch._int_mm on fc (issue 24)
    monkeypatch.setattr(int8_engine, "int8_has_amx", lambda: False)
    assert (
        evaluate.pick_engine(bnn, device=cpu, engine="auto", targets=("weights",)).name == "packed"
    )
    monkeypatch.setattr(int8_engine, "int8_is_fast", lambda: False)
    assert (
        evaluate.pick_engine(bnn, device=cpu, engine="auto", targets=("weights",)).name == "packed"
    )
    assert (
        evaluate.pick_engine(conv, device=cpu, engine="auto", targets=("weights",)).name == "packed"
    )
    assert evaluate.pick_engine(q, device=cpu, engine="auto", targets=("weights",)).name == "fixed"
    monkeypatch.setattr(kernels, "AVAILABLE", False)  # without numba: int8 (VNNI) or fp32
    with pytest.raises(UnsupportedModel, match="numba"):
        evaluate.pick_engine(bnn, device=cpu, engine="packed", targets=("weights",))
    monkeypatch.setattr(int8_engine, "int8_is_fast", lambda: False)
    assert evaluate.pick_engine(bnn, device=cpu, engine="auto", targets=("weights",)).name == "fp32"
    assert evaluate.pick_engine(q, device=cpu, engine="auto", targets=("weights",)).name == "fixed"
    assert (
        evaluate.pick_engine(bnn, device=cpu, engine="auto", targets=("activations",)).name
        == "reference"
    )
    monkeypatch.setattr(int8_engine, "int8_is_fast", lambda: True)
    assert evaluate.pick_engine(bnn, device=cpu, engine="auto", targets=("weights",)).name == "int8"
    assert evaluate.pick_engine(q, device=cpu, engine="auto", targets=("weights",)).name == "fixed"
    with pytest.raises(UnsupportedModel, match="sign .1-bit. weights"):
        evaluate.pick_engine(q, device=cpu, engine="fp32", targets=("weights",))
    with pytest.raises(UnsupportedModel, match="evaluates"):
        evaluate.pick_engine(bnn, device=cpu, engine="int8", targets=("thresholds",))
    assert evaluate.engines() == ["packed", "int8", "fp32", "fixed", "reference"]


def test_fixed_engine_on_a_bnn_equals_the_sign_engines():
    model = _trained_like(
        models.build("vgg3", channels=((4,), (4,)), fc_width=16, in_shape=(1, 8, 8), seed=3)
    )
    data = _data(200)
    kw = {"bers": [0.02, 0.1], "n_maps": 3, "seed": 1, "progress": False}
    a = evaluate.sweep(model, data, engine="fixed", **kw)
    b = evaluate.sweep(model, data, engine="fp32", **kw)
    assert a["accuracy"].tolist() == b["accuracy"].tolist()


def test_accuracy_under_flips_matches_every_path():
    for bits in (1, 4):
        model = _trained_like(
            models.build("fc", hidden=(16,), in_shape=(1, 8, 8), weight_bits=bits, seed=4)
        )
        data = _data(200)
        layers = model.binary_layers()
        g = torch.Generator().manual_seed(0)
        sets = [
            {n: torch.randperm(lay.n_stored_bits, generator=g)[:40] for n, lay in layers.items()}
            for _ in range(3)
        ]
        got = evaluate.accuracy_under_flips(model, data, sets)
        ref = evaluate.accuracy_under_flips(model, data, sets, engine="reference")
        assert got == ref == [_accuracy_with(model, data, s) for s in sets]
        with pytest.raises(ValueError, match="outside"):
            evaluate.accuracy_under_flips(model, data, [{"blocks.0.layer": [10**7]}])


def test_compiled_view_owns_the_block_facts():
    model = models.build(
        "vgg3", channels=((4,), (6,)), fc_width=16, in_shape=(1, 8, 8), weight_bits=4
    )
    cm = compile_model(model)
    assert [s.kind for s in cm.stages] == ["first", "hidden", "hidden", "output"]
    assert [s.scale for s in cm.stages] == [128, 1, 1, 1]
    assert [s.position for s in cm.stages] == [0, 1, 2, 3]
    assert cm.stages[0].fan_in == 9 and cm.stages[0].conv and not cm.stages[2].conv
    assert cm.memory_bits == models.memory_bits(model) and not cm.is_bnn
    with pytest.raises(UnsupportedModel, match="margin needs sign"):
        check_bnn(model, what="margin")
    with pytest.raises(UnsupportedModel, match="not a bnn_tol BNN"):
        compile_model(torch.nn.Linear(2, 2))


def test_sweep_rows_carry_bits_per_weight_and_memory_bits(tmp_path):
    data = _data(100)
    nets = {
        "bnn": models.build("fc", hidden=(16,), in_shape=(1, 8, 8)),
        "q4": models.build("fc", hidden=(16,), in_shape=(1, 8, 8), weight_bits=4),
    }
    out = tmp_path / "s.csv"
    df = evaluate.sweep(nets, data, bers=[0.01], n_maps=2, progress=False, out=out)
    by = df.groupby("model")[["bits_per_weight", "memory_bits"]].first()
    n = 64 * 16 + 16 * 10
    assert by.loc["bnn"].tolist() == [1.0, n] and by.loc["q4"].tolist() == [4.0, 4 * n]
    assert evaluate.read_sweep(out).equals(df)


def test_sweep_files_of_the_old_format_stay_readable_but_are_not_resumed(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text(",".join(evaluate.OLD_COLUMNS) + "\nfc,0.01,0.01,0.01,0,5,0.5,0.5\n")
    df = evaluate.read_sweep(old)
    assert list(df.columns) == evaluate.COLUMNS and df["memory_bits"].iloc[0] == -1
    evaluate.meta_path(old).write_text(
        '{"format": "bnn_tol.sweep", "version": 1, "settings": {"models": {}, "dataset": {}}}'
    )
    before = old.read_bytes()
    model = models.build("fc", hidden=(16,), in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="older bnn_tol"):
        evaluate.sweep(
            model, _data(50), bers=[0.01], n_maps=1, progress=False, out=old, resume=True
        )
    assert old.read_bytes() == before


def test_cli_and_study_offer_every_registered_engine():
    from bnn_tol import cli, study

    opt = next(p for p in cli.sweep.params if p.name == "engine")
    assert set(opt.type.choices) == {"auto", *evaluate.engines()}
    assert set(study.engine_choices()) == {"auto", *evaluate.engines()}
