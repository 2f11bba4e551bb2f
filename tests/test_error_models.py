"""The error-model registry: a model defined here (no library file touched) sweeps, replays and
equals a naive deepcopy-and-write loop through the library, the CLI, study files and deploy;
the default is the Bernoulli map of before; names are validated in one line everywhere."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from _helpers import plain_accuracy
from click.testing import CliRunner

from bnn_tol import data, errors, evaluate
from bnn_tol.cli import main
from bnn_tol.faults.registry import ErrorModel, register_error
from bnn_tol.interop import checkpoint


class BurstMap:
    """A burst of ``round(p n)`` consecutive bits from a random start (wrapping around)."""

    def __init__(self, n_bits: int, start: int) -> None:
        self.n_bits, self.start = n_bits, start

    def flips(self, stored, p01, p10):
        k = round(p01 * self.n_bits)
        return (torch.arange(k, dtype=torch.int64) + self.start) % self.n_bits


@register_error
class Burst(ErrorModel):
    """Toy error model of this test file: one burst per stored tensor, symmetric rates."""

    name = "test-burst"
    symmetric = True

    def draw(self, site, seed, cap):
        g = self.generator(site, seed)
        return BurstMap(site.n_bits, int(torch.randint(site.n_bits, (1,), generator=g)))


def _naive_burst(model, test, p, chip, layers=None) -> float:
    """Obvious reference: positions from the burst definition, -sign(w) written into a copy."""
    m = copy.deepcopy(model)
    for pos, layer in enumerate(m.binary_layers().values()):
        if layers is not None and pos not in layers:
            continue
        n = layer.weight.numel()
        g = torch.Generator().manual_seed(errors.layer_seed(chip, pos))
        start = int(torch.randint(n, (1,), generator=g))
        wb = torch.where(layer.weight >= 0, 1.0, -1.0).view(-1)
        w = wb.clone()
        for i in range(round(p * n)):
            w[(start + i) % n] = -wb[(start + i) % n]
        layer.weight.data = w.view_as(layer.weight)
    return plain_accuracy(m, test)


def test_a_toy_error_model_defined_in_a_test_sweeps_and_replays_exactly(fc, digits):
    assert "test-burst" in errors.models() and errors.models()[0] == "bernoulli"
    for engine in ("auto", "reference"):
        df = evaluate.sweep(fc, digits, bers=[0.0, 0.05, 0.3], n_maps=3, seed=4,
                            error="test-burst", engine=engine, progress=False, layers=[1, 2])
        ref = [_naive_burst(fc, digits, p, s, layers=[1, 2]) for p, s in zip(df.ber, df.map_seed,
                                                                           strict=True)]
        assert df.accuracy.tolist() == ref
        for row in df.itertuples():
            with errors.inject(fc, row.ber, seed=int(row.map_seed), error="test-burst",
                               layers=[1, 2]):
                assert evaluate.accuracy(fc, digits) == row.accuracy
    assert len(set(df[df.ber == 0.3].accuracy)) > 1  # the chips differ
    with pytest.raises(ValueError, match="takes one rate p"):
        evaluate.sweep(fc, digits, bers=[(0.01, 0.02)], error="test-burst", progress=False)


def test_default_error_model_is_the_bernoulli_map_of_before(fc, digits):
    a = evaluate.sweep(fc, digits, bers=[0.02, (0.01, 0.1)], n_maps=2, seed=1, progress=False)
    b = evaluate.sweep(fc, digits, bers=[0.02, (0.01, 0.1)], n_maps=2, seed=1, progress=False,
                       error="bernoulli")
    assert a.equals(b)
    maps = errors.draw_maps(fc, 7, 0.1)
    for k, (name, layer) in enumerate(fc.binary_layers().items()):
        fm = errors.fault_map(layer.n_stored_bits, 0.1, seed=errors.layer_seed(7, k))
        assert torch.equal(maps[name].idx, fm.idx) and torch.equal(maps[name].u, fm.u)


def test_unknown_or_malformed_error_models_are_refused_in_one_line(fc, digits, tmp_path):
    for bad, msg in (("nope", "unknown error model 'nope'; choose one of bernoulli"),
                     ("bernoulli:x", "takes no argument"), (3, "is a name")):
        with pytest.raises(ValueError, match=msg):
            errors.error_model(bad)
    with pytest.raises(ValueError, match="unknown error model"):
        evaluate.sweep(fc, digits, bers=[0.1], error="nope", progress=False)
    with pytest.raises(ValueError, match="unknown error model"):
        with errors.inject(fc, 0.1, error="nope"):
            pass
    with pytest.raises(ValueError, match="persistent only"):
        with errors.inject(fc, 0.1, mode="transient", error="test-burst"):
            pass
    with pytest.raises(ValueError, match="weights only"):
        with errors.inject(fc, 0.1, error="test-burst", targets="thresholds"):
            pass
    run = tmp_path / "run"
    checkpoint.save(fc, run)
    res = CliRunner().invoke(main, ["sweep", str(run), "--bers", "0.1", "--maps", "1",
                                    "--dataset", "digits", "--error", "nope", "--quiet"])
    assert res.exit_code == 2 and "unknown error model 'nope'" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_cli_sweep_takes_an_error_model_and_the_sidecar_records_it(fc, digits, tmp_path):
    run = tmp_path / "run"
    checkpoint.save(fc, run)
    out = tmp_path / "s.csv"
    args = ["sweep", str(run), "--bers", "0,0.05", "--maps", "2", "--seed", "3", "--dataset",
            "digits", "--error", "test-burst", "--quiet", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    df = evaluate.read_sweep(out)
    ref = evaluate.sweep({"run": fc}, digits, bers=[0, 0.05], n_maps=2, seed=3,
                         error="test-burst", progress=False)
    assert df.accuracy.tolist() == ref.accuracy.tolist()
    meta = json.loads(evaluate.meta_path(out).read_text())
    assert meta["settings"]["error"] == {"name": "test-burst"}
    res = CliRunner().invoke(main, args[:-5] + ["--error", "bernoulli", "--quiet", "--out",
                                                str(out), "--resume"])
    assert res.exit_code != 0 and "error model 'test-burst', now 'bernoulli'" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_deploy_draws_its_flips_through_the_library(fc, tmp_path):
    from bnn_tol import deploy, export

    b = export(fc, tmp_path / "b")
    x = data.load("digits", "test").images.numpy()
    for err in ("bernoulli", "test-burst"):
        with errors.inject(fc, 0.05, seed=9, error=err):
            want = evaluate.predict(fc, data.load("digits", "test")).numpy()
        got = deploy.predict(b, x, ber=0.05, seed=9, error=err)
        np.testing.assert_array_equal(got, want)


def test_study_files_choose_the_error_model_by_name_and_keep_default_task_hashes():
    from bnn_tol.study import runner as study

    spec = study.tasks(study.load_config("tiny"))[0]
    assert "error" not in spec["eval"]  # default: the spec (and its cache hash) of before
    spec = study.tasks(study.load_config("tiny", {"eval": {"error": "test-burst",
                                                           "bers": [0.0, 0.1]}}))[0]
    assert spec["eval"]["error"] == "test-burst"
    with pytest.raises(ValueError, match=r"\[eval\] error: unknown error model 'nope'"):
        study.load_config("tiny", {"eval": {"error": "nope"}})
    with pytest.raises(ValueError, match=r"\[eval\] error: .* takes one rate p"):
        study.load_config("tiny", {"eval": {"error": "test-burst", "bers": [[0.0, 0.1]]}})
