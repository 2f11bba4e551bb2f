"""The study runner: grid of cached tasks, tidy outputs, Dask == in-process, report."""

import filecmp
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import bnn_tol
from bnn_tol import analysis, data, evaluate, report
from bnn_tol.cli import main
from bnn_tol.exceptions import BnnTolError, InvalidArgument, ResultsMismatch
from bnn_tol.study import runner as study

SMALL = {"train": {"seeds": [0, 1], "bers": [0.0, 0.2], "epochs": 3},
         "eval": {"bers": [0.0, 0.1, 0.2], "n_maps": 2},
         "protection": {"rankings": ["margin", "magnitude", "random:0", "random:1"],
                        "fractions": [0.0, 0.5, 1.0], "bers": [0.2], "n_maps": 2,
                        "seeds": [0], "train_bers": [0.2]}}
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
    assert len(sweeps) == 4 * 3 * 2  # tasks x eval BERs x maps
    assert {"map_seed", "accuracy", "rerr", "p01", "p10"} <= set(sweeps.columns)
    assert not metrics.duplicated(["model_id", "layer", "metric", "split"]).any()
    net = set(metrics[metrics.layer == "network"].metric)
    assert {"mean_margin_norm", "importance_variance", "importance_cv"} <= net
    # every table's task columns agree with models.csv
    assert list(models.columns[:5]) == ["model_id", "model", "arch", "train_ber", "train_seed"]
    for df in (sweeps, metrics, pd.read_csv(res["margins"]), pd.read_csv(res["importance"])):
        assert list(df.columns[:5]) == list(models.columns[:5])
        merged = df.merge(models[["model_id", "arch", "train_ber", "train_seed"]],
                          on="model_id", suffixes=("", "_m"))
        assert len(merged) == len(df)
        assert (merged.train_ber == merged.train_ber_m).all()
        assert (merged.train_seed == merged.train_seed_m).all()
        assert (merged.arch == merged.arch_m).all() and set(merged.arch) == {"fc"}
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
    cfg["train"]["epochs"] = 2  # a changed spec is neither served from the cache nor mixed in
    with pytest.raises(ResultsMismatch, match=r"\[train\] epochs = 1, now 2"):
        study.run("tiny", tmp_path, overrides=cfg, echo=None)
    assert all((tmp_path / f).read_bytes() == before[f] for f in RESULTS)
    assert ck.stat().st_mtime_ns == stamp
    assert res["failed"] == []


def test_a_failed_task_is_reported_and_does_not_lose_the_others(tmp_path, monkeypatch):
    cfg = {"train": {"seeds": [0], "bers": [0.0], "epochs": 1}, "eval": {"n_maps": 1},
           "models": [{"label": "ok", "name": "fc", "hidden": [16]},
                      {"label": "broken", "name": "fc", "hidden": [16]}]}
    compute = study._compute

    def fails_for_broken(spec, tdir, stages):
        if spec["model"]["label"] == "broken":  # e.g. out of memory half-way
            raise RuntimeError("worker ran out of memory")
        return compute(spec, tdir, stages)

    monkeypatch.setattr(study, "_compute", fails_for_broken)
    res = study.run("tiny", tmp_path, overrides=cfg, echo=None)
    assert [m for m, _ in res["failed"]] == ["broken_ber0_s0"]
    assert "RuntimeError: worker ran out of memory" in res["failed"][0][1]
    assert "Traceback" in (tmp_path / "models" / "broken_ber0_s0" / "error.txt").read_text()
    assert list(pd.read_csv(res["models"]).model_id) == ["ok_ber0_s0"]
    status = pd.read_csv(res["status"])
    assert list(status.status) == ["done", "failed"]


def test_dask_local_cluster_gives_the_same_files_bit_for_bit(tiny_run, tmp_path):
    from dask.distributed import Client, LocalCluster

    out, _ = tiny_run
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        with Client(cluster) as client:  # "auto": 2 single-thread workers share the cores
            assert study._worker_threads(client) == (study.auto_threads(
                study.available_cores(), 2), 2)
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
    env = json.loads((out / "environment.json").read_text())
    assert "<h2>Reproduction</h2>" in text and html.escape(env["command"]) in text
    assert html.escape(env["cpu"]) in text


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


# -- issue 9: safety of a study's outputs, whole-config validation, threads, provenance ---------

ONE = {"train": {"seeds": [0], "bers": [0.0], "epochs": 1}, "eval": {"n_maps": 1}}


@pytest.mark.parametrize("label", ["../../escaped", "/tmp/abs", "a/b", "a\\b", "..", ".", "",
                                   ".hidden", "a b", "-x"])
def test_labels_are_names_not_paths(tmp_path, label):
    out = tmp_path / "a" / "out"
    cfg = {**ONE, "models": [{"label": label, "name": "fc", "hidden": [8]}]}
    with pytest.raises(InvalidArgument, match=r"\[\[models\]\] label") as exc:
        study.run("tiny", out, overrides=cfg, echo=None)
    assert repr(label) in str(exc.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere
    with pytest.raises(InvalidArgument, match="name"):
        study.load_config({"name": "../up"})


def test_cached_rerun_keeps_the_original_timings(tmp_path):
    cfg = {**ONE, "train": {**ONE["train"], "bers": [0.0, 0.1]}}
    first = pd.read_csv(study.run("tiny", tmp_path, overrides=cfg, echo=None)["status"])
    assert list(first.columns) == ["model_id", "status", "seconds", "train_s", "sweep_s",
                                   "metrics_s", "protect_s", "error"]
    assert first["protect_s"].isna().all()  # no [protection] section: no stage
    assert list(first.status) == ["done", "done"]
    stages = first[["train_s", "sweep_s", "metrics_s"]]
    assert (stages > 0).all().all()
    assert (stages.sum(axis=1) <= first.seconds).all()
    again = pd.read_csv(study.run("tiny", tmp_path, overrides=cfg, echo=None)["status"])
    assert list(again.status) == ["cached", "cached"]
    cols = ["seconds", "train_s", "sweep_s", "metrics_s"]
    pd.testing.assert_frame_equal(again[cols], first[cols])


BAD_CONFIGS = [
    ({"eval": {"n_maps": 0}}, r"\[eval\] n_maps"),
    ({"eval": {"n_maps": 2.5}}, r"\[eval\] n_maps"),
    ({"train": {"epochs": -1}}, r"\[train\] epochs"),
    ({"train": {"epochs": "one"}}, r"\[train\] epochs.*'one'"),
    ({"train": {"epochs": True}}, r"\[train\] epochs"),
    ({"train": {"epochs": 2.0}}, r"\[train\] epochs"),
    ({"eval": {"bers": []}}, r"\[eval\] bers"),
    ({"train": {"bers": []}}, r"\[train\] bers"),
    ({"train": {"bers": [-0.1]}}, r"\[train\] bers"),
    ({"eval": {"bers": [0.0, 1.5]}}, r"\[eval\] bers"),
    ({"eval": {"bers": [[0.1, 2.0]]}}, r"\[eval\] bers"),
    ({"eval": {"bers": ["x"]}}, r"\[eval\] bers"),
    ({"train": {"seeds": [0.5]}}, r"\[train\] seeds"),
    ({"train": {"seeds": [True]}}, r"\[train\] seeds"),
    ({"train": {"lr": "fast"}}, r"\[train\] lr"),
    ({"train": {"lr": -1e-3}}, r"\[train\] lr"),
    ({"train": {"loss": "l2"}}, r"\[train\] loss"),
    ({"train": {"batch_size": 0}}, r"\[train\] batch_size"),
    ({"data": {"dataset": "nope"}}, r"\[data\] dataset.*'nope'"),
    ({"data": {"metric_subset": 0}}, r"\[data\] metric_subset"),
    ({"metrics": {"importance": ["nope"]}}, r"\[metrics\] importance"),
    ({"run": {"threads": 0}}, r"\[run\] threads"),
    ({"run": {"threads": "many"}}, r"\[run\] threads"),
    ({"run": {"device": "tpu"}}, r"\[run\] device"),
    ({"models": [{"label": "x", "name": "fc", "foo": 1}]}, r"\[\[models\]\] 'x'.*foo"),
    ({"models": [{"label": "x", "name": "fc", "hidden": [0]}]}, r"\[\[models\]\] 'x'.*hidden"),
    ({"models": [{"label": "x", "name": "fc", "in_shape": [1, 28, 28]}]},
     r"\[\[models\]\] 'x'"),
]


@pytest.mark.parametrize(("over", "match"), BAD_CONFIGS)
def test_whole_config_is_validated_before_training(tmp_path, monkeypatch, over, match):
    from bnn_tol import train

    def no_training(*a, **k):
        raise AssertionError("trained before validating the whole configuration")

    monkeypatch.setattr(train, "fit", no_training)
    cfg = {**ONE, **{k: {**ONE.get(k, {}), **v} if isinstance(v, dict) else v
                     for k, v in over.items()}}
    with pytest.raises(InvalidArgument, match=match):
        study.run("tiny", tmp_path / "out", overrides=cfg, echo=None)
    assert not (tmp_path / "out" / "models").exists()


def test_cli_study_bad_input_is_one_line_and_trains_nothing(tmp_path):
    r = CliRunner().invoke(main, ["study", "--preset", "tiny", "--out", str(tmp_path / "s"),
                                  "--maps", "0"])
    assert r.exit_code != 0 and "n_maps" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s" / "models").exists()


def test_unreachable_scheduler_fails_fast_with_one_clear_error(tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(BnnTolError, match=r"scheduler.*tcp://127\.0\.0\.1:9"):
        study.run("tiny", tmp_path, overrides=ONE, scheduler="tcp://127.0.0.1:9", echo=None)
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "models").exists()


def test_auto_threads_never_oversubscribe_the_cores():
    assert study.auto_threads(cores=2, concurrent=2) == 1
    assert study.auto_threads(cores=2, concurrent=1) == 2
    assert study.auto_threads(cores=16, concurrent=3) == 5
    assert study.auto_threads(cores=2, concurrent=4) == 1
    assert study.DEFAULTS["run"]["threads"] == "auto"
    with pytest.raises(InvalidArgument):
        study.auto_threads(cores=0, concurrent=1)


def test_resolved_threads_and_environment_are_recorded(tmp_path):
    res = study.run("tiny", tmp_path, overrides={**ONE, "run": {"threads": "auto"}}, echo=None)
    cores = study.available_cores()
    cfg = json.loads((tmp_path / "study.json").read_text())
    assert cfg["run"]["threads"] == cores  # in-process: one worker gets every core
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["torch_threads"] == cores and env["workers"] == 1 and env["cores"] == cores
    assert env["bnn_tol"] == bnn_tol.__version__ and env["torch"] == torch.__version__
    assert env["numpy"] == np.__version__ and env["pandas"] == pd.__version__
    assert {"python", "cpu", "git_commit", "git_dirty", "command"} <= set(env)
    assert pd.read_csv(res["models"])["threads"].tolist() == [cores]
    # an explicit setting wins
    study.run("tiny", tmp_path / "b", overrides={**ONE, "run": {"threads": 1}}, echo=None)
    assert json.loads((tmp_path / "b" / "study.json").read_text())["run"]["threads"] == 1


def test_cli_fresh_refuses_a_used_directory_and_states_the_command(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    args = ["study", "--preset", "tiny", "--epochs", "1", "--seeds", "0", "--train-bers", "0",
            "--maps", "1", "--no-report", "--fresh"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "s")])
    assert r.exit_code != 0 and "--fresh" in r.output
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["keep.txt"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "new")])
    assert r.exit_code == 0, r.output
    env = json.loads((tmp_path / "new" / "environment.json").read_text())
    assert env["command"].startswith("bnn-tol study --preset tiny") and "--fresh" in env["command"]


# -- issue 10: metrics with their standard errors and split halves, predictions ----------------

def test_metric_halves_are_disjoint_seeded_and_cover_the_subset():
    ds = data.load("digits", "test").subset(201, seed=0)
    a, b = study.metric_halves(ds, seed=0)
    assert (len(a), len(b)) == (101, 100)
    rows = {bytes(x.numpy()) + bytes([int(y)]) for x, y in zip(ds.images, ds.labels, strict=True)}
    ra = [bytes(x.numpy()) + bytes([int(y)]) for x, y in zip(a.images, a.labels, strict=True)]
    rb = [bytes(x.numpy()) + bytes([int(y)]) for x, y in zip(b.images, b.labels, strict=True)]
    assert set(ra) | set(rb) == rows and len(set(ra) & set(rb)) == 0
    a2, _ = study.metric_halves(ds, seed=0)
    assert torch.equal(a.images, a2.images)
    assert not torch.equal(study.metric_halves(ds, seed=1)[0].images, a.images)


def test_metrics_carry_se_and_split_and_match_the_library(tiny_run):
    from bnn_tol import metrics as mlib

    out, res = tiny_run
    met = pd.read_csv(res["metrics"])
    assert list(met.columns) == ["model_id", "model", "arch", "train_ber", "train_seed",
                                 "layer", "metric", "value", "value_se", "split"]
    assert set(met.split) == {"all", "a", "b"}
    assert not met.duplicated(["model_id", "layer", "metric", "split"]).any()
    # the analysis takes the first row per model and metric: the whole subset comes first
    first = met.drop_duplicates(["model_id", "layer", "metric"])
    assert set(first.split) == {"all"}
    cfg = study.load_config("tiny", SMALL)
    d = cfg["data"]
    whole = data.load("digits", "test").subset(d["metric_subset"], seed=d["subset_seed"])
    halves = dict(zip("ab", study.metric_halves(whole, seed=d["subset_seed"]), strict=True))
    mid = "fc_ber0.2_s1"
    model = bnn_tol.load(out / "models" / mid)
    for split, ds in [("all", whole), *halves.items()]:
        rows = met[(met.model_id == mid) & (met.split == split)].set_index(["layer", "metric"])
        summ = mlib.margin_summary(mlib.margin(model, ds)).set_index("layer")
        for col in ("mean_margin_norm", "mean_margin"):
            r = rows.loc[("network", col)]
            assert r.value == summ.loc["network", col]
            assert r.value_se == summ.loc["network", f"{col}_se"] and r.value_se > 0
            # an X_se column is stored as its own metric too
            assert rows.loc[("network", f"{col}_se"), "value"] == r.value_se
        iv = mlib.importance_variance(mlib.importance(model, ds)).set_index("layer")
        r = rows.loc[("network", "importance_variance_unbiased")]
        assert r.value == iv.loc["network", "variance_unbiased"]
        assert r.value_se == iv.loc["network", "variance_unbiased_se"]
        assert rows.loc[("network", "importance_noise_share"), "value"] == iv.loc[
            "network", "noise_share"]
    # score margin: mean over correctly classified images, se = sd / sqrt(n)
    sm = mlib.score_margin(model, whole)
    sm = sm[sm["correct"].astype(bool)]["score_margin"]
    r = met[(met.model_id == mid) & (met.split == "all") & (met.metric == "score_margin")]
    assert r.value.item() == float(sm.mean())
    assert r.value_se.item() == pytest.approx(float(sm.std(ddof=1)) / len(sm) ** 0.5,
                                              rel=1e-12)


def test_predictions_are_collected_per_task(tiny_run):
    from bnn_tol import metrics as mlib

    if not hasattr(mlib, "predict_accuracy"):
        pytest.skip("metrics.predict_accuracy not available")
    out, res = tiny_run
    pred = pd.read_csv(res["predictions"])
    assert list(pred.columns[:6]) == ["model_id", "model", "arch", "train_ber", "train_seed",
                                      "ber"]
    assert "predicted_accuracy" in pred.columns
    models = pd.read_csv(res["models"])
    assert len(pred) == len(models) * len(SMALL["eval"]["bers"])
    assert sorted(pred.ber.unique()) == SMALL["eval"]["bers"]
    assert pred.predicted_accuracy.between(0, 1).all()


def test_run_workers_starts_a_local_cluster_and_resolves_threads_for_it(tmp_path):
    over = {**ONE, "run": {"workers": 2, "threads": "auto"}}
    res = study.run("tiny", tmp_path, overrides=over, echo=None)
    assert res["failed"] == []
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["workers"] == 2 and env["torch_threads"] == study.auto_threads(
        study.available_cores(), 2)
    # the worker count is not part of a task: the same tasks are cached for 1 worker
    again = study.run("tiny", tmp_path, overrides={**ONE, "run": {
        "workers": 1, "threads": env["torch_threads"]}}, echo=None)
    assert set(pd.read_csv(again["status"]).status) == {"cached"}
    with pytest.raises(InvalidArgument, match=r"\[run\] workers"):
        study.load_config("tiny", {"run": {"workers": 0}})


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "studies").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_committed_study_files_are_valid(path):
    cfg = study.load_config(path)
    assert cfg["name"] == path.stem  # `make results` writes to docs/results/<file stem>
    try:
        study.check(cfg)  # the dataset loads and every model builds
    except data.DatasetNotFound:
        pytest.skip(f"{cfg['data']['dataset']} is not installed")


def test_decisive_study_is_sized_to_decide():
    cfg = study.load_config(Path(__file__).parents[1] / "studies" / "fmnist_decisive.toml")
    tr, ev = cfg["train"], cfg["eval"]
    assert cfg["models"] == [{"label": "fc", "name": "fc", "hidden": [512, 512]}]
    assert cfg["data"]["train_subset"] is None and cfg["data"]["test_subset"] is None
    assert len(tr["bers"]) >= 7 and min(tr["bers"]) == 0 and max(tr["bers"]) <= 0.3
    # issue 10 sized it at 5 seeds; issue 21 ran the largest design that fitted (3 seeds)
    assert len(tr["seeds"]) >= 3 and tr["epochs"] == 5
    pr = cfg["protection"]  # protection curves on normal and flip-trained networks
    assert {"importance", "margin"} <= set(pr["rankings"]) and pr["train_bers"][0] == 0
    assert max(ev["bers"]) == 0.2 and ev["n_maps"] >= 20
    assert cfg["data"]["metric_subset"] >= 5000
    assert {"accuracy", "loss"} <= set(cfg["metrics"]["importance"])
    assert cfg["run"]["threads"] * cfg["run"]["workers"] <= 2  # one thread per worker


def test_eval_engine_is_configurable_and_every_engine_gives_the_same_sweep(tmp_path):
    with pytest.raises(InvalidArgument, match=r"\[eval\] engine"):
        study.load_config("tiny", {"eval": {"engine": "fast"}})
    over = {**ONE, "eval": {"n_maps": 2, "bers": [0.0, 0.1]}}
    runs = {e: study.run("tiny", tmp_path / e, overrides={**over, "eval": {**over["eval"],
                                                                              "engine": e}},
                         echo=None) for e in ("int8", "fp32")}
    a, b = (pd.read_csv(r["sweeps"]) for r in runs.values())
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_markdown_summary_quotes_the_sweep_accuracies_and_the_reproduction_command(tiny_run,
                                                                                   tmp_path):
    out, res = tiny_run
    report.write(out, tmp_path / "r.html", n_boot=200)
    md = (tmp_path / "summary.md").read_text()
    env = json.loads((out / "environment.json").read_text())
    assert f"Reproduce: `{env['command']}`" in md and env["cpu"] in md
    # every accuracy cell is the mean (and sd) over seeds of the per-network mean over maps
    acc = analysis.accuracy_at_ber(pd.read_csv(res["sweeps"]))
    for (tb, ber), g in acc.groupby(["train_ber", "ber"]):
        cell = f"{g['accuracy'].mean():.4f}"
        if len(g) > 1:
            cell += f" ± {g['accuracy'].std():.4f}"
        assert cell in md, (tb, ber, cell)
    assert "## The paper's claims" in md


def test_every_collected_table_fits_its_schema(tiny_run):
    from bnn_tol import schema

    _, res = tiny_run
    for stem, table in study.SCHEMAS.items():
        key = "models" if stem == "model" else study.TABLES[stem][:-4]
        df = schema.read_csv(res[key], table)
        assert len(df) and not schema.is_previous(df)
        assert list(df.columns) == schema.columns(table), table


def test_tasks_finished_by_the_previous_release_are_collected_with_the_new_names(tiny_run,
                                                                                  tmp_path):
    from bnn_tol import schema

    out, res = tiny_run
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    # task 0 as the previous release left it: seed, se, se_<stat>, no arch
    tdir = copy / "models" / "fc_ber0_s0"
    for stem in ("model", *study.TABLES):
        if not (tdir / f"{stem}.csv").is_file():  # protection: not in this study
            continue
        df = pd.read_csv(tdir / f"{stem}.csv")
        old = {"train_seed": "seed", "value_se": "se", "importance_se": "se",
               **{f"{s}_se": f"se_{s}" for s in schema.MARGIN_SE_STATS}}
        if stem != "model":
            df = df.drop(columns="arch")
        df.rename(columns=old).to_csv(tdir / f"{stem}.csv", index=False)
    paths = study.collect(copy, list(pd.read_csv(res["models"]).model_id))
    for fname in ("models.csv", *study.TABLES.values()):
        new = pd.read_csv(paths[fname[:-4]])
        ref = pd.read_csv(out / fname)
        pd.testing.assert_frame_equal(new, ref, check_exact=True)
