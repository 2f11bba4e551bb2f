"""The study runner: grid of cached tasks, tidy outputs, Dask == in-process, report."""

import filecmp
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import bnn_tol
from bnn_tol import analysis, data, evaluate, report, study
from bnn_tol.cli import main

SMALL = {"train": {"seeds": [0, 1], "bers": [0.0, 0.2], "epochs": 3},
         "eval": {"bers": [0.0, 0.1, 0.2], "n_maps": 2}}
RESULTS = ["models.csv", "sweeps.csv", "metrics.csv", "margins.csv", "importance.csv"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    res = study.run("tiny", out, overrides=SMALL, echo=None)
    return out, res


def test_presets_load_and_overrides_merge_section_wise():
    assert {"tiny", "quick", "fmnist"} <= set(study.presets())
    cfg = study.load_config("fmnist", {"train": {"epochs": 2}, "data": {"train_subset": 500}})
    assert cfg["train"]["epochs"] == 2 and cfg["data"]["train_subset"] == 500
    assert cfg["train"]["seeds"] == [0, 1, 2] and len(cfg["train"]["bers"]) >= 5
    assert {m["name"] for m in cfg["models"]} == {"fc", "vgg3"}
    assert len(study.tasks(cfg)) == 2 * len(cfg["train"]["bers"]) * 3
    quick = study.load_config("quick")
    assert quick["data"]["dataset"] == "fashion-mnist" and len(study.tasks(quick)) == 6


def test_bad_study_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="neither a study file nor a preset"):
        study.load_config("nope")
    bad = tmp_path / "s.toml"
    bad.write_text('[train]\nepoch = 3\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\] in \[train\]"):
        study.load_config(bad)
    bad.write_text('[[models]]\nname = "resnet"\n')
    with pytest.raises(ValueError, match="name must be one of"):
        study.load_config(bad)
    bad.write_text('[train]\nbers = [0, 1.5]\n')
    with pytest.raises(ValueError, match="outside"):
        study.load_config(bad)


def test_grid_is_models_x_bers_x_seeds_with_unique_ids():
    cfg = study.load_config({"models": [{"label": "a", "name": "fc"}, {"label": "b", "name": "fc"}],
                             "train": {"bers": [0, 0.05, 0.1], "seeds": [3, 4]}})
    specs = study.tasks(cfg)
    assert len(specs) == 12 and len({s["model_id"] for s in specs}) == 12
    assert specs[0]["model_id"] == "a_ber0_s3" and specs[-1]["model_id"] == "b_ber0.1_s4"


def test_outputs_are_tidy_and_consistent_with_the_checkpoints(tiny_run):
    out, res = tiny_run
    assert res["failed"] == []
    models = pd.read_csv(res["models"])
    sweeps = pd.read_csv(res["sweeps"])
    metrics = pd.read_csv(res["metrics"])
    assert list(models.model_id) == ["fc_ber0_s0", "fc_ber0_s1", "fc_ber0.2_s0", "fc_ber0.2_s1"]
    assert list(metrics.columns) == ["model_id", "model", "train_ber", "seed", "layer", "metric",
                                     "value"]
    assert len(sweeps) == 4 * 3 * 2  # tasks x eval BERs x maps
    assert {"map_seed", "accuracy", "rerr", "p01", "p10"} <= set(sweeps.columns)
    assert not metrics.duplicated(["model_id", "layer", "metric"]).any()
    net = set(metrics[metrics.layer == "network"].metric)
    assert {"mean_margin_norm", "importance_variance", "importance_cv"} <= net
    # every table's task columns agree with models.csv
    for df in (sweeps, metrics, pd.read_csv(res["margins"]), pd.read_csv(res["importance"])):
        merged = df.merge(models[["model_id", "train_ber", "seed"]], on="model_id",
                          suffixes=("", "_m"))
        assert len(merged) == len(df)
        assert (merged.train_ber == merged.train_ber_m).all()
        assert (merged.seed == merged.seed_m).all()
    # the checkpoint reproduces the recorded clean accuracy exactly
    cfg = study.load_config("tiny", SMALL)
    test = data.load("digits", "test")
    for row in models.itertuples():
        m = bnn_tol.load(out / row.checkpoint)
        assert m.meta["training"]["flip_ber"] == [row.train_ber] * 2
        assert m.meta["training"]["epochs"] == cfg["train"]["epochs"]
        assert evaluate.accuracy(m, test) == row.clean_acc
    clean = analysis.clean_accuracy(sweeps)
    assert np.array_equal(clean.loc[models.model_id].to_numpy(), models.clean_acc.to_numpy())


def test_task_is_a_pure_function_of_its_spec(tiny_run, tmp_path):
    out, _ = tiny_run
    spec = study.tasks(study.load_config("tiny", SMALL))[3]
    torch.set_num_threads(2)  # the task sets its own thread count
    r = study.run_task(spec, tmp_path)
    assert r["status"] == "done"
    a, b = out / "models" / spec["model_id"], tmp_path / "models" / spec["model_id"]
    for f in ["model.safetensors", "sweep.csv", "metrics.csv", "margin.csv", "importance.csv",
              "model.csv", "done"]:
        assert filecmp.cmp(a / f, b / f, shallow=False), f


def test_rerun_skips_finished_tasks_and_recomputes_only_missing_or_stale(tmp_path):
    cfg = {"train": {"seeds": [0], "bers": [0.0, 0.1], "epochs": 1}, "eval": {"n_maps": 1}}
    res = study.run("tiny", tmp_path, overrides=cfg, echo=None)
    before = {f: (tmp_path / f).read_bytes() for f in RESULTS}
    ck = tmp_path / "models" / "fc_ber0_s0" / "model.safetensors"
    stamp = ck.stat().st_mtime_ns
    again = pd.read_csv(study.run("tiny", tmp_path, overrides=cfg, echo=None)["status"])
    assert list(again.status) == ["cached", "cached"]
    assert ck.stat().st_mtime_ns == stamp
    (tmp_path / "models" / "fc_ber0.1_s0" / "done").unlink()  # interrupted task
    again = pd.read_csv(study.run("tiny", tmp_path, overrides=cfg, echo=None)["status"])
    assert list(again.status) == ["cached", "done"]
    assert all((tmp_path / f).read_bytes() == before[f] for f in RESULTS)
    cfg["train"]["epochs"] = 2  # a changed spec is not served from the cache
    again = pd.read_csv(study.run("tiny", tmp_path, overrides=cfg, echo=None)["status"])
    assert list(again.status) == ["done", "done"]
    assert res["failed"] == []


def test_a_failed_task_is_reported_and_does_not_lose_the_others(tmp_path):
    cfg = {"train": {"seeds": [0], "bers": [0.0], "epochs": 1}, "eval": {"n_maps": 1},
           "models": [{"label": "ok", "name": "fc", "hidden": [16]},
                      {"label": "broken", "name": "fc", "hidden": [0]}]}
    res = study.run("tiny", tmp_path, overrides=cfg, echo=None)
    assert [m for m, _ in res["failed"]] == ["broken_ber0_s0"]
    assert "hidden widths must be positive" in res["failed"][0][1]
    assert "Traceback" in (tmp_path / "models" / "broken_ber0_s0" / "error.txt").read_text()
    assert list(pd.read_csv(res["models"]).model_id) == ["ok_ber0_s0"]
    status = pd.read_csv(res["status"])
    assert list(status.status) == ["done", "failed"]


def test_dask_local_cluster_gives_the_same_files_bit_for_bit(tiny_run, tmp_path):
    from dask.distributed import LocalCluster

    out, _ = tiny_run
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        res = study.run("tiny", tmp_path, overrides=SMALL, scheduler=cluster.scheduler_address,
                        echo=None)
    assert res["failed"] == []
    for f in RESULTS:
        assert (out / f).read_bytes() == (tmp_path / f).read_bytes(), f
    for mid in pd.read_csv(out / "models.csv").model_id:
        a, b = out / "models" / mid, tmp_path / "models" / mid
        assert filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)


def test_report_is_self_contained_and_states_the_numbers(tiny_run, tmp_path):
    out, res = tiny_run
    path = report.write(out, tmp_path / "r.html", n_boot=200)
    text = path.read_text()
    assert "<h2>Summary</h2>" in text and "src=\"http" not in text
    n_img = len(re.findall(r'src="data:image/png;base64,', text))
    assert n_img >= 6
    corr = pd.read_csv(tmp_path / "correlations.csv")
    ref = analysis.correlate(pd.read_csv(res["metrics"]), pd.read_csv(res["sweeps"]),
                             level="network", n_boot=200)
    got = corr[corr.layer == "network"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[ref.columns], ref, check_dtype=False)
    # the summary quotes the spearman coefficient of the headline metric at the top BER
    r = ref[(ref.metric == "mean_margin_norm") & (ref.method == "spearman") & (ref.ber == 0.2)]
    assert f"&rho; = {r.r.iloc[0]:.2f}" in text
    assert (tmp_path / "regression.csv").is_file() and (tmp_path / "comparison.csv").is_file()


def test_cli_study_and_report(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["study", "--preset", "tiny", "--out", str(tmp_path / "s"),
                             "--epochs", "1", "--seeds", "0", "--train-bers", "0,0.1",
                             "--eval-bers", "0,0.1", "--maps", "1", "--no-report"])
    assert r.exit_code == 0, r.output
    assert "2 tasks" in r.output and not (tmp_path / "s" / "report.html").exists()
    cfg = json.loads((tmp_path / "s" / "study.json").read_text())
    assert cfg["train"]["bers"] == [0.0, 0.1] and cfg["eval"]["n_maps"] == 1
    r = runner.invoke(main, ["report", str(tmp_path / "s"), "--out", str(tmp_path / "r.html"),
                             "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.html").stat().st_size > 10_000
    r = runner.invoke(main, ["study", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--preset" in r.output
    r = runner.invoke(main, ["report", str(tmp_path)])
    assert r.exit_code != 0 and "not a study results directory" in r.output
