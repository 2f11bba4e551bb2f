"""The fp32 sweep engine on residual graphs (:class:`bnn_tol.core.graph.GraphBNN`): many fault
maps at once, the same accuracies as the reference engine (faults + the model's own forward,
one map at a time) bit for bit, and the same prediction on every sample; the chain engines
(packed, int8, fixed) declare graphs unsupported, so ``engine="auto"`` picks fp32."""

from __future__ import annotations

import _public_bnns as P
import pytest
import torch
from _helpers import bn_node, conv_node, random_bn
from test_graph import NODES

import bnn_tol
from bnn_tol import errors, evaluate, metrics, models
from bnn_tol.core.compiled import UnsupportedModel
from bnn_tol.data import BNNDataset, Normalize
from bnn_tol.engines import GraphFp32Engine, ReferenceEngine, pick_engine


def _labelled_by(model, data_):
    """``data_`` with the clean model's predictions as labels: accuracy 1 without errors, and
    every changed prediction under errors counts."""
    return BNNDataset(data_.images, evaluate.predict(model, data_), name=data_.name)


@pytest.fixture(scope="module")
def net():
    m = models.build("graph", nodes=NODES, in_shape=(1, 8, 8), seed=2)
    random_bn(m, 1)
    with torch.no_grad():
        m.ops["b1"].weight[2] = 0.0  # a dead neuron
    return m.eval()


@pytest.fixture(scope="module")
def test(net, digits):
    return _labelled_by(net, digits.subset(200))


def _sweep(model, data_, engine, **kw):
    kw = {"bers": [0.01, 0.05, 0.2], "n_maps": 4, "seed": 3, "progress": False,
          "device": "cpu"} | kw
    return evaluate.sweep(model, data_, engine=engine, **kw).accuracy.tolist()


def test_auto_picks_the_graph_fp32_engine(net):
    assert pick_engine(net, device="cpu") is GraphFp32Engine
    assert pick_engine(net, engine="fp32", device="cpu") is GraphFp32Engine
    assert pick_engine(net, device="cpu", targets=("activations",)) is ReferenceEngine


@pytest.mark.parametrize("layers, seed", [(None, 0), (None, 3), (["ops.c0"], 1),
                                          (["ops.c2"], 2), (["ops.c1", "ops.fc"], 4)])
def test_fp32_sweep_of_a_graph_equals_the_reference_bit_for_bit(net, test, layers, seed):
    """Faults in every layer, in the first (reads the input grid), in the shortcut block, and
    in two layers with a clean one between (its output varies with the map)."""
    want = _sweep(net, test, "reference", layers=layers, seed=seed)
    got = _sweep(net, test, "fp32", layers=layers, seed=seed, maps_per_step=4)
    assert got == want
    assert min(want) < 0.9  # the errors changed predictions


def test_every_sample_is_predicted_as_the_faulty_model_predicts(net, digits):
    """Per map the engine's predictions are those of ``errors.apply`` + the model's own forward
    (on batches of 50 images): with the labels set to map j's predictions, map j scores
    exactly 1 and every other map its agreement with map j."""
    digits = digits.subset(150)
    layers = bnn_tol.core.compiled.stored_layers(net)
    g = torch.Generator().manual_seed(5)
    flips = [{n: torch.randperm(lay.n_stored_bits, generator=g)[:int(0.04 * lay.n_stored_bits)]
              for n, lay in layers.items()} for _ in range(4)]
    preds = []
    for f in flips:
        with errors.apply(net, f):
            preds.append(evaluate.predict(net, digits, batch_size=50))
    for j, pj in enumerate(preds):
        lab = BNNDataset(digits.images, pj, name="digits")  # labels: map j's predictions
        got = evaluate.accuracy_under_flips(net, lab, flips, engine="fp32", device="cpu")
        assert got[j] == 1.0
        assert got == [float((p == pj).double().mean()) for p in preds]
    assert len({tuple(p.tolist()) for p in preds}) == len(preds)  # the maps differ


def test_results_do_not_depend_on_maps_per_step_batch_size_or_threads(net, test):
    want = _sweep(net, test, "fp32", maps_per_step=8)
    for kw in ({"maps_per_step": 1}, {"maps_per_step": 3, "batch_size": 37}):
        assert _sweep(net, test, "fp32", **kw) == want
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _sweep(net, test, "fp32", maps_per_step=5, batch_size=100) == want
    finally:
        torch.set_num_threads(threads)


def test_the_same_chip_flips_the_same_bits_at_every_ber(net, test):
    """A row replays alone: inject the row's chip at its BER, the model's own accuracy."""
    df = evaluate.sweep(net, test, bers=[0.03, 0.12], n_maps=3, seed=7, engine="fp32",
                        progress=False, device="cpu")
    for row in df.itertuples():
        with errors.inject(net, (row.p01, row.p10), seed=int(row.map_seed)):
            assert evaluate.accuracy(net, test) == row.accuracy


@pytest.mark.parametrize("engine", ["packed", "int8", "fixed"])
def test_chain_engines_declare_graphs_unsupported_in_one_line(net, test, engine):
    with pytest.raises(UnsupportedModel, match=rf"^engine='{engine}' cannot evaluate this "
                       r"model: it evaluates chains of blocks, not a residual graph "
                       r"\(bnn_tol.core.graph\); 'fp32' and 'reference' sweep graphs$"):
        evaluate.sweep(net, test, bers=[0.1], n_maps=1, engine=engine, progress=False)


def test_fp32_refuses_a_binary_layer_on_real_values_and_auto_falls_back(digits):
    """A binary conv reading a BatchNorm output directly (real values: a float sum that
    depends on the summation order) is the reference engine's."""
    nodes = [conv_node("c0", "x", 1, 4), bn_node("b0", "c0", 4), conv_node("c1", "b0", 4, 4),
             {"name": "f", "op": "flatten", "inputs": ["c1"]},
             {"name": "fc", "op": "binary", "inputs": ["f"], "type": "linear",
              "in": 4 * 8 * 8, "out": 10}]
    m = random_bn(models.build("graph", nodes=nodes, in_shape=(1, 8, 8), seed=0), 0)
    assert m.value_kinds() == {"x": "grid", "c0": "real", "b0": "real", "c1": "real",
                               "f": "real", "fc": "real"}
    with pytest.raises(UnsupportedModel, match=r"graph node c1 \(binary\) reads real values "
                       r"\(b0\)"):
        pick_engine(m, engine="fp32", device="cpu")
    assert pick_engine(m, device="cpu") is ReferenceEngine
    assert len(evaluate.sweep(m, digits, bers=[0.1], n_maps=1, progress=False)) == 1


@pytest.mark.parametrize("measure", [
    lambda m, d: metrics.flip_probability(m, d, ber=0.01),
    lambda m, d: metrics.predict_accuracy(m, d, bers=[0.01]),
])
def test_flip_probability_and_predicted_accuracy_refuse_a_graph_by_name(net, test, measure):
    with pytest.raises(UnsupportedModel, match=r"^a residual BNN .* the reference and fp32 "
                       r"sweep engines.* not by the packed, int8 and fixed engines, flip "
                       r"probability, predicted accuracy"):
        measure(net, test)


def test_value_kinds_follow_signs_through_pooling_and_hardtanh(net):
    kinds = net.value_kinds()
    assert [kinds[n] for n in ("x", "c0", "h0", "s0", "r", "s2", "p", "f", "bo")] == [
        "grid", "real", "real", "pm1", "real", "pm1", "pm1", "pm1", "real"]


# -- binary ResNet and Bi-Real-Net written the way public code writes them, adapted ------------

@pytest.fixture(scope="module")
def fmnist():
    return P.fashion_mnist(256, 64)


@pytest.mark.parametrize("make", [P.BiRealNet, lambda: P.BinaryResNet(check_range=False)])
def test_adapted_residual_bnns_sweep_exactly_with_fp32(make, fmnist):
    train, test = fmnist
    tf = Normalize(0.5, 0.5)
    user = P.calibrate(make(), tf.to_float(train.images))
    model = bnn_tol.adapt(user, tf.to_float(test.images[:16]), transform=tf)
    assert pick_engine(model, device="cpu") is GraphFp32Engine
    lab = _labelled_by(model, test)
    kw = {"bers": [0.01, 0.1], "n_maps": 3, "seed": 1}
    want = _sweep(model, lab, "reference", **kw)
    assert _sweep(model, lab, "fp32", maps_per_step=2, **kw) == want
    assert min(want) < 1.0
