"""One result schema (issue 19): every writer's table fits its declared schema, readers refuse
a table that breaks it with one line, any sweep table plots, and files of the previous release
are read through the declared upgrade (or refused with the command that regenerates them)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from bnn_tol import data, metrics, models, schema, train
from bnn_tol.exceptions import InvalidArgument


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "test").subset(200, seed=0)


@pytest.fixture(scope="module")
def fc():
    m = models.build("fc", seed=0, hidden=(32, 32), in_shape=(1, 8, 8))
    train.fit(m, data.load("digits", "train").subset(400), epochs=1, batch_size=64,
              progress=False)
    return m.eval()


def test_every_metric_writer_returns_a_table_of_its_schema(fc, digits):
    mg = metrics.margin(fc, digits)
    imp = metrics.importance(fc, digits, estimator=["accuracy", "loss_norm"])
    out = {"margin": mg, "margin_summary": metrics.margin_summary(mg), "importance": imp,
           "importance_variance": metrics.importance_variance(imp),
           "flip_probability": metrics.flip_probability(fc, digits, ber=[0.01, 0.05]),
           "predictions": metrics.predict_accuracy(fc, digits, [0.01, 0.05]),
           "score_margin": metrics.score_margin(fc, digits)}
    for table, df in out.items():
        assert schema.validate(df, table) is df
        declared = schema.columns(table)
        assert [c for c in df.columns if c in declared] == declared, table
    assert list(mg.columns) == metrics.MARGIN_COLUMNS == schema.columns("margin")
    # standard errors are <column>_se everywhere, no bare seed / se columns
    for df in out.values():
        assert not schema.is_previous(df)
    assert "importance_se" in imp.columns and "mean_margin_norm_se" in mg.columns


def test_a_writer_refuses_a_table_that_breaks_its_schema():
    bad = pd.DataFrame({"model": ["a"], "ber": [1.5], "p01": [0.1], "p10": [0.1], "map": [0],
                        "map_seed": [3], "accuracy": [0.5], "rerr": [0.5],
                        "bits_per_weight": [1.0], "memory_bits": [10]})
    with pytest.raises(InvalidArgument) as ei:
        schema.validate(bad, "sweep", what="rows")
    msg = str(ei.value)
    assert "\n" not in msg and "column 'ber' must lie in [0, 1]" in msg and "1.5" in msg
    with pytest.raises(InvalidArgument, match="lacks column.*'accuracy'"):
        schema.validate(bad.drop(columns="accuracy").assign(ber=0.1), "sweep")
    with pytest.raises(InvalidArgument, match="repeats the key"):
        schema.validate(pd.concat([bad, bad]).assign(ber=0.1), "sweep")
    with pytest.raises(InvalidArgument, match="previous release"):
        schema.validate(bad.assign(ber=0.1, seed=3), "sweep")
    with pytest.raises(InvalidArgument, match="'model' must hold text"):
        schema.validate(bad.assign(ber=0.1, model=1), "sweep")


def test_upgrade_is_the_declared_renames_and_nothing_else():
    sweep = pd.DataFrame({"model": ["a"], "ber": [0.0], "p01": [0.0], "p10": [0.0], "map": [0],
                          "seed": [7], "accuracy": [0.5], "rerr": [0.5]})
    up = schema.upgrade(sweep, "sweep")
    assert list(up.columns[:8]) == ["model", "ber", "p01", "p10", "map", "map_seed", "accuracy",
                                    "rerr"]
    assert up["map_seed"].tolist() == [7] and up["memory_bits"].tolist() == [-1]
    study = sweep.rename(columns={"seed": "map_seed"}).assign(model_id="a_ber0_s3", seed=3)
    assert schema.upgrade(study, "sweep")["train_seed"].tolist() == [3]  # a study's sweeps
    margins = pd.DataFrame({"se_mean_margin": [1.0], "cov_layer_mean_margin": [0.0]})
    assert list(schema.upgrade(margins, "margin").columns) == ["mean_margin_se",
                                                               "cov_layer_mean_margin"]
    new = schema.upgrade(up, "sweep")
    assert new is up  # a table of this version is returned as is


def test_a_report_metric_must_be_a_declared_column():
    decls = dict(schema._DECLS)
    decls["margin_summary"] = schema._Decl(("layer", "mean_margin_normalized"), "", "")
    with pytest.raises(AssertionError, match="mean_margin_norm"):
        schema._check_declarations(decls)


def test_validation_is_cheap_for_result_sized_tables():
    n = 10_000  # a sweep of 10 models x 100 BERs x 10 maps
    big = pd.DataFrame({"model": np.repeat([f"m{i}" for i in range(10)], 1000),
                        "ber": np.tile(np.repeat(np.linspace(0, 0.2, 100), 10), 10),
                        "map": np.tile(np.arange(10), 1000), "map_seed": np.arange(n) * 977,
                        "accuracy": np.linspace(0, 1, n), "bits_per_weight": 1.0,
                        "memory_bits": 4096})
    big = big.assign(p01=big.ber, p10=big.ber, rerr=1 - big.accuracy)[schema.columns("sweep")]
    schema.validate(big, "sweep")
    t = time.perf_counter()
    for _ in range(3):
        schema.validate(big, "sweep")
    assert (time.perf_counter() - t) / 3 < 0.5
    assert schema.describe("sweep").set_index("column").loc["map_seed", "kind"] == "int"
