"""One result schema (issue 19): every writer's table fits its declared schema, readers refuse
a table that breaks it with one line, any sweep table plots, and files of the previous release
are read through the declared upgrade (or refused with the command that regenerates them)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import bnn_tol
from bnn_tol import analysis, data, evaluate, metrics, models, plots, report, schema, train
from bnn_tol.exceptions import BnnTolError, InvalidArgument, ResultsMismatch
from bnn_tol.faults import chip

ROOT = Path(__file__).resolve().parents[1]
FC35 = ROOT / "docs" / "results" / "fmnist_fc35"
#: rows.csv of scripts/stutz_fmnist.py as the previous release wrote it (column `seed`): 3 maps
#: per network and BER, lines taken verbatim from docs/results/stutz_fmnist/rows.csv at 755e259
STUTZ_ROWS = ROOT / "tests" / "data" / "stutz_rows_previous_release.csv"
#: The report's hard-coded lists before issue 19 (the schema must reproduce them).
OLD_HEADLINE = ["mean_margin_norm", "mean_q10_margin", "importance_variance", "importance_cv"]
OLD_CURVE = ["mean_margin_norm", "importance_variance_unbiased", "importance_variance",
             "importance_accuracy_variance_unbiased", "importance_accuracy_variance",
             "importance_loss_norm_variance_unbiased", "predicted_accuracy", "clean_accuracy"]


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "test").subset(200, seed=0)


@pytest.fixture(scope="module")
def fc():
    m = models.build("fc", seed=0, hidden=(32, 32), in_shape=(1, 8, 8))
    train.fit(m, data.load("digits", "train").subset(400), epochs=1, batch_size=64,
              progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def sweep_rows(fc, digits):
    return evaluate.sweep({"fc": fc}, digits, bers=[0, 0.05], n_maps=2, seed=0, progress=False)


def _one_line_cli_error(args) -> str:
    r = CliRunner().invoke(bnn_tol.cli.main, args)
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit | BnnTolError), r.exception
    msg = r.output if r.exception is None or isinstance(r.exception, SystemExit) else str(
        r.exception)
    assert "Traceback" not in msg and "pandera" not in msg.lower()
    return msg


# -- writers ----------------------------------------------------------------------------------


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


def test_sweep_and_profile_writers_return_tables_of_their_schema(fc, digits, sweep_rows,
                                                                 tmp_path):
    assert list(sweep_rows.columns) == evaluate.COLUMNS == schema.columns("sweep")
    assert "map_seed" in sweep_rows.columns and "seed" not in sweep_rows.columns
    schema.validate(sweep_rows, "sweep")
    prof = chip.synthetic_profile(rows=64, cols=16, n_arrays=2, seed=0)
    pr = evaluate.profile_sweep({"fc": fc}, digits, prof, voltages=prof.voltages[-2:],
                                progress=False)
    assert list(pr.columns) == schema.columns("profile")
    schema.validate(pr, "profile")
    # the map seed of a row replays it
    row = sweep_rows.iloc[-1]
    with bnn_tol.errors.inject(fc, (row.p01, row.p10), seed=int(row.map_seed)):
        assert evaluate.accuracy(fc, digits) == row.accuracy


def test_sweep_file_sidecar_records_the_columns_and_its_version(fc, digits, tmp_path):
    out = tmp_path / "s.csv"
    evaluate.sweep({"fc": fc}, digits, bers=[0.01], n_maps=1, progress=False, out=out)
    meta = json.loads(evaluate.meta_path(out).read_text())
    assert meta["version"] == evaluate.META_VERSION == 2 and meta["columns"] == evaluate.COLUMNS
    assert out.read_text().splitlines()[0] == ",".join(schema.columns("sweep"))


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


# -- readers ----------------------------------------------------------------------------------


def _study_sweeps(sweep_rows: pd.DataFrame, n: int = 2) -> pd.DataFrame:
    """A study's sweeps.csv built from real sweep rows: n networks, two training BERs."""
    parts = []
    for i in range(n):
        tb = [0.0, 0.1][i % 2]
        parts.append(sweep_rows.drop(columns="model").assign(
            model_id=f"fc_ber{tb:g}_s{i}", model="fc", arch="fc", train_ber=tb, train_seed=i))
    df = pd.concat(parts, ignore_index=True)
    return df[schema.columns("study.sweeps")]


def test_plot_sweep_accepts_a_study_sweeps_csv_and_a_sweep_csv(fc, digits, sweep_rows,
                                                               tmp_path):
    study_csv = tmp_path / "sweeps.csv"
    _study_sweeps(sweep_rows).to_csv(study_csv, index=False)
    assert schema.read_csv(study_csv, "study.sweeps").shape[0] == 2 * len(sweep_rows)
    sweep_csv = tmp_path / "s.csv"
    evaluate.sweep({"fc": fc}, digits, bers=[0, 0.05], n_maps=2, progress=False, out=sweep_csv)
    for csv in (study_csv, sweep_csv):
        png = tmp_path / f"{csv.stem}.png"
        r = CliRunner().invoke(bnn_tol.cli.main, ["plot", "sweep", str(csv), "--out", str(png)])
        assert r.exit_code == 0, r.output
        assert png.stat().st_size > 0
    # one line per label and training BER for a study
    fig = plots.sweep(evaluate.load_sweep(study_csv))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["fc, training BER 0", "fc, training BER 0.1"]


def test_study_analysis_and_figures_accept_a_plain_sweep(sweep_rows):
    acc = analysis.accuracy_at_ber(sweep_rows)  # each model label is one network
    assert list(acc.model_id.unique()) == ["fc"] and list(acc.ber) == [0.0, 0.05]
    assert acc.loc[1, "accuracy"] == sweep_rows[sweep_rows.ber == 0.05].accuracy.mean()
    assert analysis.clean_accuracy(sweep_rows).loc["fc"] == sweep_rows.accuracy.iloc[0]
    fig = plots.accuracy_vs_ber(sweep_rows)
    assert len(fig.axes) == 1


def test_a_reader_refuses_a_table_that_breaks_the_schema_with_one_line(sweep_rows, tmp_path):
    d = tmp_path / "res"
    shutil.copytree(FC35, d, ignore=shutil.ignore_patterns("report.html"))
    sw = pd.read_csv(d / "sweeps.csv")
    sw.loc[5, "accuracy"] = 1.5
    sw.to_csv(d / "sweeps.csv", index=False)
    with pytest.raises(ResultsMismatch) as ei:
        report.load_results(d)
    msg = str(ei.value)
    assert "\n" not in msg and str(d / "sweeps.csv") in msg
    assert "column 'accuracy' must lie in [0, 1] (e.g. 1.5 at row 5)" in msg
    assert "regenerate it with bnn-tol study" in msg
    cli = _one_line_cli_error(["report", str(d), "--n-boot", "10"])
    assert "must lie in [0, 1]" in cli
    # a sweep CSV whose rows break the schema (memory_bits below -1) and a foreign table
    s = tmp_path / "s.csv"
    sweep_rows.assign(memory_bits=-5).to_csv(s, index=False, float_format="%.17g")
    assert "memory_bits" in _one_line_cli_error(["plot", "sweep", str(s), "--out",
                                                 str(tmp_path / "p.png")])
    # frames passed to the analysis: InvalidArgument, one line
    with pytest.raises(InvalidArgument, match="must lie in"):
        analysis.accuracy_at_ber(sweep_rows.assign(accuracy=2.0))


# -- the previous release ----------------------------------------------------------------------


def test_committed_results_of_the_previous_release_are_read_through_the_upgrade():
    assert "seed" in pd.read_csv(FC35 / "models.csv", nrows=1).columns  # really the old format
    res = report.load_results(FC35)
    assert "train_seed" in res["models"].columns and "seed" not in res["models"].columns
    assert {"train_seed", "map_seed"} <= set(res["sweeps"].columns)
    assert "value_se" in res["metrics"].columns and "se" not in res["metrics"].columns
    old = pd.read_csv(FC35 / "metrics.csv")
    np.testing.assert_array_equal(res["metrics"]["value_se"].to_numpy(), old["se"].to_numpy())
    np.testing.assert_array_equal(res["sweeps"]["train_seed"].to_numpy(),
                                  pd.read_csv(FC35 / "sweeps.csv")["seed"].to_numpy())
    # sweeps of that release lacked the storage columns: unknown, not invented
    assert res["sweeps"]["memory_bits"].eq(-1).all()
    assert res["sweeps"]["bits_per_weight"].isna().all()


def test_report_of_the_committed_fc35_study_still_works(tmp_path):
    out = report.write(FC35, tmp_path / "report.html", n_boot=20)
    assert "<h2>Summary</h2>" in out.read_text()
    # the tables that do not depend on the bootstrap are the committed ones, byte for byte
    for name in ("comparison.csv",):
        assert (tmp_path / name).read_bytes() == (FC35 / name).read_bytes()
    assert not any(p.name.startswith(".") for p in FC35.iterdir())


def test_previous_release_sweep_csvs_are_read_and_never_resumed(fc, digits, tmp_path):
    old = tmp_path / "old.csv"
    evaluate.sweep({"fc": fc}, digits, bers=[0.05], n_maps=2, progress=False, out=old)
    new_rows = evaluate.read_sweep(old)
    # rewrite it as the previous release wrote it: header `seed`, sidecar version 1
    text = old.read_text().replace("map_seed", "seed", 1)
    old.write_text(text)
    meta = json.loads(evaluate.meta_path(old).read_text())
    meta.update(version=1, columns=evaluate.PREVIOUS_COLUMNS)
    evaluate.meta_path(old).write_text(json.dumps(meta))
    pd.testing.assert_frame_equal(evaluate.read_sweep(old), new_rows)
    before = old.read_bytes(), evaluate.meta_path(old).read_bytes()
    with pytest.raises(ResultsMismatch, match="older bnn_tol.*'seed', now 'map_seed'"):
        evaluate.sweep({"fc": fc}, digits, bers=[0.05, 0.1], n_maps=2, progress=False, out=old,
                       resume=True)
    assert (old.read_bytes(), evaluate.meta_path(old).read_bytes()) == before
    # our header with a sidecar of the previous version: not recognized, left untouched
    old.write_text(text.replace("seed", "map_seed", 1))
    before = old.read_bytes()
    with pytest.raises(ResultsMismatch, match="not recognized.*version 1"):
        evaluate.sweep({"fc": fc}, digits, bers=[0.05], n_maps=2, progress=False, out=old,
                       resume=True)
    assert old.read_bytes() == before


def test_other_sweep_tables_of_the_previous_release_plot(tmp_path):
    assert "seed" in pd.read_csv(STUTZ_ROWS, nrows=1).columns
    rows = evaluate.load_sweep(STUTZ_ROWS)  # extra column `group` kept, seed -> map_seed
    assert {"map_seed", "group"} <= set(rows.columns) and "seed" not in rows.columns
    for csv in (STUTZ_ROWS, FC35 / "sweeps.csv"):  # a script's rows, a study's sweeps
        png = tmp_path / f"{csv.parent.name}.png"
        r = CliRunner().invoke(bnn_tol.cli.main, ["plot", "sweep", str(csv), "--out", str(png)])
        assert r.exit_code == 0, r.output
        assert png.stat().st_size > 0


def test_a_previous_table_that_cannot_be_upgraded_names_the_command_that_regenerates_it(
        tmp_path):
    csv = tmp_path / "sweeps.csv"
    pd.DataFrame({"model": ["a"], "ber": [0.0], "p01": [0.0], "p10": [0.0], "map": [0],
                  "seed": [1], "map_seed": [2], "accuracy": [0.5], "rerr": [0.5]}).to_csv(
        csv, index=False)
    msg = _one_line_cli_error(["plot", "sweep", str(csv), "--out", str(tmp_path / "p.png")])
    assert "both 'seed'" in msg and "regenerate it with bnn-tol sweep" in msg
    m = pd.DataFrame({"model_id": ["x"], "layer": ["network"], "metric": ["m"], "value": [1.0],
                      "se": [0.1], "value_se": [0.1]})
    with pytest.raises(InvalidArgument, match="regenerate it with bnn-tol study"):
        analysis.feature_table(m)


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


# -- the metric vocabulary ----------------------------------------------------------------------


def test_report_metric_lists_come_from_the_schema_and_match_the_old_report():
    names = pd.read_csv(FC35 / "metrics.csv")["metric"].unique().tolist()
    present = [*names, "predicted_accuracy", "clean_accuracy"]
    assert report.HEADLINE == OLD_HEADLINE
    assert schema.report_metrics("curve", present) == [m for m in OLD_CURVE if m in present]
    assert schema.report_metrics("headline", present) == [m for m in OLD_HEADLINE
                                                          if m in present]
    assert schema.report_metrics("scatter") == ["mean_margin_norm",
                                                "importance_variance_unbiased",
                                                "importance_variance"]
    cm = schema.claim_metrics(names)
    assert cm == {"mean_margin_norm": "larger", "importance_accuracy_variance": "smaller",
                  "importance_accuracy_variance_unbiased": "smaller",
                  "importance_loss_norm_variance": "smaller",
                  "importance_loss_norm_variance_unbiased": "smaller"}
    assert analysis.CLAIM_METRICS == {"mean_margin_norm": "larger",
                                      "importance_variance": "smaller",
                                      "importance_variance_unbiased": "smaller"}


def test_a_report_metric_must_be_a_declared_column():
    decls = dict(schema._DECLS)
    decls["margin_summary"] = schema._Decl(("layer", "mean_margin_normalized"), "", "")
    with pytest.raises(AssertionError, match="mean_margin_norm"):
        schema._check_declarations(decls)


def test_metric_names_are_the_runner_names(fc, digits):
    from bnn_tol.study.runner import _metric_rows

    long = _metric_rows(fc, digits, ["accuracy", "loss_norm"], 256)[2]
    assert "importance_accuracy_variance_unbiased" in set(long.metric)
    assert schema.metric_name("importance_variance", "variance_unbiased", "accuracy") in set(
        long.metric)
    assert schema.metric_name("margin_summary", "mean_margin_norm") in set(long.metric)
    assert list(long.columns) == ["layer", "metric", "value", "value_se"]


# -- cost -----------------------------------------------------------------------------------------


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
