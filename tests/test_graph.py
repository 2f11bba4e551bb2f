"""Residual BNNs as graphs (issue 22, item 5): the GraphBNN model, its faults and sweeps, and
margins / importance of its binary neurons checked against slow obvious loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import bn_node, conv_node, random_graph

import bnn_tol
from bnn_tol import data, errors, evaluate, metrics, models
from bnn_tol.core.compiled import UnsupportedModel
from bnn_tol.core.graph import GraphBNN
from bnn_tol.core.layers import bn_threshold
from bnn_tol.exceptions import InvalidArgument

#: A binary ResNet block on 8x8 digits: stem -> (conv, BN, sign, conv, BN) + shortcut -> BN,
#: hardtanh, sign; the stem's sign feeds both the block's conv and ... the shortcut is real.
NODES = [
    conv_node("c0", "x", 1, 6), bn_node("b0", "c0", 6), {"name": "h0", "op": "hardtanh",
                                                 "inputs": ["b0"], "min": -1.0, "max": 1.0},
    {"name": "s0", "op": "sign", "inputs": ["h0"]},
    conv_node("c1", "s0", 6, 6), bn_node("b1", "c1", 6),
    {"name": "s1", "op": "sign", "inputs": ["b1"]},
    conv_node("c2", "s1", 6, 6), {"name": "r", "op": "add", "inputs": ["c2", "h0"]},
    bn_node("b2", "r", 6), {"name": "s2", "op": "sign", "inputs": ["b2"]},
    {"name": "p", "op": "pool", "inputs": ["s2"], "kernel": 2},
    {"name": "f", "op": "flatten", "inputs": ["p"]},
    {"name": "fc", "op": "binary", "inputs": ["f"], "type": "linear", "in": 6 * 4 * 4, "out": 10},
    bn_node("bo", "fc", 10, conv=False),
]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return random_graph(NODES, dead="b1")  # gamma < 0 channels and a dead neuron


@pytest.fixture(scope="module")
def test():
    return data.load("digits", "test")


def test_units_are_the_batchnorms_read_by_signs(net):
    units = net.units()
    assert [(u["bn"], u["input"], u["layer"], u["signs"]) for u in units] == [
        ("b0", "c0", "c0", ["s0"]), ("b1", "c1", "c1", ["s1"]), ("b2", "r", "c2", ["s2"])]


def test_bad_node_specs_are_refused_naming_the_node():
    bad = [
        ([{"name": "a", "op": "conv3d", "inputs": ["x"]}], "op one of"),
        ([{"name": "a", "op": "sign", "inputs": ["y"]}], "needs 1 input"),
        ([conv_node("a", "x", 1, 2), {"name": "a", "op": "sign", "inputs": ["a"]}],
         "new identifier"),
        ([{"name": "a", "op": "add", "inputs": ["x"]}], "needs 2 input"),
        ([{"name": "a", "op": "pool", "inputs": ["x"]}], "lacks"),
        ([{"name": "a", "op": "sign", "inputs": ["x"], "bias": 1}], "unknown fields"),
    ]
    for nodes, needle in bad:
        with pytest.raises(InvalidArgument, match=needle):
            models.build("graph", nodes=nodes, in_shape=(1, 8, 8))


def test_a_graph_saves_loads_and_its_faults_replay(net, test, tmp_path):
    back = bnn_tol.load(bnn_tol.save(net, tmp_path / "g"))
    assert isinstance(back, GraphBNN)
    x = data.to_float(test.images[:32])
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    df = evaluate.sweep(net, test, bers=[0.02, 0.1], n_maps=3, seed=0, progress=False)
    for row in df.itertuples():
        with errors.inject(net, (row.p01, row.p10), seed=int(row.map_seed)):
            assert evaluate.accuracy(net, test) == row.accuracy
    with pytest.raises(UnsupportedModel, match="not a residual graph"):
        evaluate.sweep(net, test, bers=[0.1], n_maps=1, engine="packed", progress=False)


def _bn_inputs(net, x):
    """Slow: each image alone through the graph, the BatchNorm inputs of the units."""
    names = [u["input"] for u in net.units()]
    out = {n: [] for n in names}
    with torch.no_grad():
        for i in range(len(x)):
            _, got = net.run(x[i:i + 1], capture=names)
            for n in names:
                out[n].append(got[n][0].double())
    return [torch.stack(out[n]) for n in names]


def test_graph_margins_equal_a_per_image_loop(net, test):
    sub = test.subset(90)
    table = metrics.margin(net, sub, batch_size=32)
    vs = _bn_inputs(net, data.to_float(sub.images))
    for u, v in zip(net.units(), vs, strict=True):
        thr = bn_threshold(net.ops[u["bn"]])
        rows = table[table.layer == f"ops.{u['layer']}"].sort_values("neuron")
        for j, r in enumerate(rows.itertuples()):
            if thr.direction[j] == 0:
                assert r.dead and math.isinf(r.mean_margin)
                continue
            m = (v[:, j] - thr.tau[j]).abs().reshape(len(v), -1)  # (images, positions)
            flat = np.sort(m.reshape(-1).numpy())
            assert r.n == flat.size
            assert r.mean_margin == pytest.approx(float(m.mean()), rel=1e-9)
            assert r.min_margin == pytest.approx(flat[0], rel=1e-6)
            assert r.q10_margin == pytest.approx(flat[math.ceil(0.1 * flat.size) - 1], rel=1e-6)
            per = m.mean(1).numpy()
            assert r.mean_margin_se == pytest.approx(per.std(ddof=1) / math.sqrt(len(per)),
                                                     rel=1e-6)
    summary = metrics.margin_summary(table)
    assert "network" in set(summary.layer) and np.isfinite(summary.value_se).all()


def test_graph_importance_equals_negating_one_neuron_at_a_time(net, test):
    sub = test.subset(60)
    imp = metrics.importance(net, sub, estimator=["accuracy", "flips"], batch_size=25)
    x = data.to_float(sub.images)
    with torch.no_grad():
        z = net(x)
        ok = (z.argmax(1) == sub.labels).double()
        for u in net.units():
            rows = imp[(imp.layer == f"ops.{u['layer']}") & (imp.estimator == "accuracy")]
            flips = imp[(imp.layer == f"ops.{u['layer']}") & (imp.estimator == "flips")]
            for j in range(net.ops[u["bn"]].num_features):
                def edit(name, v, u=u, j=j):
                    if name in u["signs"]:
                        v = v.clone()
                        v[:, j] *= -1
                    return v

                zj, _ = net.run(x, edit=edit)
                acc = float((ok - (zj.argmax(1) == sub.labels).double()).mean())
                assert rows.importance.iloc[j] == pytest.approx(acc, abs=1e-12)
                flip = float((zj.argmax(1) != z.argmax(1)).double().mean())
                assert flips.importance.iloc[j] == pytest.approx(flip, abs=1e-12)
    with pytest.raises(InvalidArgument, match="only the negation estimators"):
        metrics.importance(net, sub, estimator="taylor")


def test_graph_loss_norm_uses_the_output_batchnorm_scale(net, test):
    """``loss_norm`` divides the logits by the mean scale of the graph's output BatchNorm (its
    last node), ``s = mean_c |gamma_c| / sqrt(var_c + eps)``."""
    sub = test.subset(40)
    imp = metrics.importance(net, sub, estimator="loss_norm", layers=[0])
    bo = net.ops["bo"]
    s = float((bo.weight.detach().double().abs() / torch.sqrt(bo.running_var.double()
                                                              + bo.eps)).mean())
    x = data.to_float(sub.images)
    u = net.units()[0]
    with torch.no_grad():
        z = net(x)
        for j in (0, 3):
            def edit(name, v, j=j):
                if name in u["signs"]:
                    v = v.clone()
                    v[:, j] *= -1
                return v

            zj, _ = net.run(x, edit=edit)
            ce = torch.nn.functional.cross_entropy
            want = float((ce(zj / s, sub.labels, reduction="none").double()
                          - ce(z / s, sub.labels, reduction="none").double()).mean())
            assert imp.importance.iloc[j] == pytest.approx(want, rel=1e-5, abs=1e-7)
