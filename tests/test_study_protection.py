"""Study axes and stages of issue 21: the training recipe as an axis, and the protection stage
(curves and AUC per network, cached on its own settings, addable, never changed on resume)."""

import json

import pandas as pd
import pytest

import bnn_tol
from bnn_tol import schema
from bnn_tol.exceptions import InvalidArgument, ResultsMismatch
from bnn_tol.faults import protect as shield
from bnn_tol.study import protection as prot
from bnn_tol.study import runner as study

BASE = {"train": {"seeds": [0], "bers": [0.0, 0.2], "epochs": 2},
        "eval": {"bers": [0.0, 0.2], "n_maps": 2}}
PROTECT = {"rankings": ["margin", "magnitude", "random:0", "random:1"],
           "fractions": [0.0, 0.25, 1.0], "bers": [0.2], "n_maps": 2, "train_bers": [0.2]}


def _cfg(**over):
    return {**BASE, **over}


# -- recipes ------------------------------------------------------------------------------------

def test_recipes_parse_axis_and_single_recipes():
    assert study.recipes("all") == [("all", "all")]
    assert study.recipes(None) == [("all", None)]
    assert study.recipes([1, 2]) == [("layers-1-2", [1, 2])]  # a flat list: one recipe
    assert study.recipes(["all", "hidden"]) == [("all", "all"), ("hidden", "hidden")]
    assert study.recipes(["hidden", [0, -1]]) == [("hidden", "hidden"), ("layers-0--1", [0, -1])]


def test_a_recipe_axis_crosses_models_bers_and_seeds():
    cfg = study.load_config({"models": [{"label": "a", "name": "fc"}],
                             "train": {"bers": [0, 0.1], "seeds": [3, 4],
                                       "flip_layers": ["all", "hidden"]}})
    specs = study.tasks(cfg)
    assert len(specs) == 8 and len({s["model_id"] for s in specs}) == 8
    assert {s["model"]["label"] for s in specs} == {"a-all", "a-hidden"}
    assert {(s["recipe"], s["train"]["flip_layers"]) for s in specs} == {("all", "all"),
                                                                         ("hidden", "hidden")}
    assert specs[0]["model_id"] == "a-all_ber0_s3"


def test_one_recipe_keeps_the_spec_and_its_hash():
    """A study with one recipe is the study it always was: cached tasks stay cached."""
    one = study.tasks(study.load_config({"train": {"flip_layers": "hidden"}}))
    assert all("recipe" not in s and s["train"]["flip_layers"] == "hidden" for s in one)
    plain = study.tasks(study.load_config({}))
    assert plain[0]["model_id"] == "fc_ber0_s0" and "recipe" not in plain[0]


@pytest.mark.parametrize("bad, match", [
    (["all", "all"], "distinct recipes"),
    (["all", "sideways"], "flip_layers"),
    (["all", []], "flip_layers"),
])
def test_bad_recipe_axes_are_refused(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        study.load_config({"train": {"flip_layers": bad}})


def test_a_recipe_study_trains_each_recipe_on_its_layers(tmp_path):
    res = study.run("tiny", tmp_path, echo=None,
                    overrides=_cfg(train={**BASE["train"], "bers": [0.2],
                                          "flip_layers": ["all", "hidden"]}))
    models = pd.read_csv(res["models"])
    assert list(models["model"]) == ["fc-all", "fc-hidden"]
    assert list(models["recipe"]) == ["all", "hidden"]
    # the same seed and training BER, different layers with flips: different networks
    a, h = (bnn_tol.load(tmp_path / "models" / m) for m in models["model_id"])
    assert any((pa != ph).any() for pa, ph in zip(a.parameters(), h.parameters(), strict=True))


# -- the protection stage -----------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ({"rankings": ["margin"]}, "random"),
    ({"rankings": ["margin", "random:0", "random:0"]}, "distinct"),
    ({"rankings": ["nope", "random:0"]}, "unknown ranking"),
    ({"rankings": ["importance:nope", "random:0"]}, "estimator"),
    ({"fractions": [0.0]}, "fractions"),
    ({"fractions": [0.2, 0.1]}, "fractions"),
    ({"fractions": [0.0, 1.5]}, "fractions"),
    ({"bers": [2.0]}, "bers"),
    ({"n_maps": 0}, "n_maps"),
    ({"unit": "layer"}, "unit"),
    ({"seeds": [7]}, "seeds"),
    ({"train_bers": [0.3]}, "train_bers"),
])
def test_bad_protection_settings_name_the_key(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        study.load_config(_cfg(protection={**PROTECT, **bad}))


def test_protection_runs_only_for_the_chosen_networks():
    specs = study.tasks(study.load_config(_cfg(protection=PROTECT)))
    assert [("protection" in s) for s in specs] == [False, True]
    assert "seeds" not in specs[1]["protection"]  # the grid selection is not a task setting
    off = study.tasks(study.load_config(_cfg()))
    assert not any("protection" in s for s in off)


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    out = tmp_path_factory.mktemp("protected")
    res = study.run("tiny", out, overrides=_cfg(protection=PROTECT), echo=None)
    return out, res


def test_the_stage_writes_curves_and_auc_that_replay(protected):
    out, res = protected
    assert res["failed"] == []
    curve = schema.read_csv(out / "protection.csv", "study.protection")
    auc = schema.read_csv(out / "protection_auc.csv", "study.protection_auc")
    assert set(curve["model_id"]) == {"fc_ber0.2_s0"} == set(auc["model_id"])
    assert set(auc["ranking"]) == set(PROTECT["rankings"])
    # the stage is exactly the library function on the saved network, the units ranked on
    # training images and evaluated on the study's test set with the [eval] seed's chips
    cfg = json.loads((out / "study.json").read_text())
    model = bnn_tol.load(out / "models" / "fc_ber0.2_s0")
    d = cfg["data"]
    test = bnn_tol.data.load(d["dataset"], "test")
    train = bnn_tol.data.load(d["dataset"], "train").subset(d["metric_subset"],
                                                            seed=d["subset_seed"])
    ref = prot.protection(model, test, rank=PROTECT["rankings"], fractions=PROTECT["fractions"],
                          bers=PROTECT["bers"], n_maps=PROTECT["n_maps"], seed=cfg["eval"]["seed"],
                          rank_data=train, label="fc_ber0.2_s0", progress=False)
    cols = list(ref.columns.drop("model"))
    pd.testing.assert_frame_equal(curve[cols].reset_index(drop=True), ref[cols],
                                  check_dtype=False)
    # fraction 0 is the unprotected sweep of the study (same maps), 1 is clean accuracy
    sw = pd.read_csv(out / "sweeps.csv")
    sw = sw[(sw.model_id == "fc_ber0.2_s0") & (sw.ber == 0.2)].set_index("map")["accuracy"]
    zero = curve[(curve.fraction == 0) & (curve.ranking == "margin")].set_index("map")
    assert (zero["accuracy"] == sw.reindex(zero.index)).all()
    clean = pd.read_csv(out / "models.csv").set_index("model_id").loc["fc_ber0.2_s0",
                                                                       "clean_acc"]
    assert (curve.loc[curve.fraction == 1.0, "accuracy"] == clean).all()


def test_protection_is_added_to_a_finished_study_without_retraining(tmp_path):
    study.run("tiny", tmp_path, overrides=_cfg(), echo=None)
    assert not (tmp_path / "protection.csv").exists() or pd.read_csv(
        tmp_path / "protection.csv").empty
    res = study.run("tiny", tmp_path, overrides=_cfg(protection=PROTECT), echo=None)
    status = pd.read_csv(res["status"]).set_index("model_id")
    # the base stages are cached (their timings are the recorded ones); protection ran once
    assert status.loc["fc_ber0_s0", "status"] == "cached"
    assert status.loc["fc_ber0.2_s0", "status"] == "done"
    assert status.loc["fc_ber0.2_s0", "protect_s"] > 0
    assert len(pd.read_csv(tmp_path / "protection_auc.csv")) == len(PROTECT["rankings"])
    again = pd.read_csv(study.run("tiny", tmp_path, overrides=_cfg(protection=PROTECT),
                                  echo=None)["status"])
    assert list(again["status"]) == ["cached", "cached"]
    # the protection settings of a study are never changed on resume
    with pytest.raises(ResultsMismatch, match=r"\[protection\] n_maps"):
        study.run("tiny", tmp_path, overrides=_cfg(protection={**PROTECT, "n_maps": 3}),
                  echo=None)
    # which networks get curves is the grid: more of them may be added
    res = study.run("tiny", tmp_path, echo=None,
                    overrides=_cfg(protection={**PROTECT, "train_bers": [0.0, 0.2]}))
    status = pd.read_csv(res["status"]).set_index("model_id")["status"]
    assert status.to_dict() == {"fc_ber0_s0": "done", "fc_ber0.2_s0": "cached"}
    assert set(pd.read_csv(res["protection_auc"])["model_id"]) == {"fc_ber0_s0",
                                                                   "fc_ber0.2_s0"}


def test_an_interrupted_stage_is_not_collected(protected, tmp_path):
    import shutil

    out, _ = protected
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "models" / "fc_ber0.2_s0" / "protection.json").unlink()  # killed before the marker
    paths = study.collect(copy)
    assert pd.read_csv(paths["protection"]).empty and pd.read_csv(paths["protection_auc"]).empty


def test_units_are_the_faults_registry_units():
    assert prot.UNITS == shield.UNITS


def test_a_conv_study_runs_protection_and_skips_predictions(tmp_path):
    """vgg3 (a conv "neuron" is an output channel): every stage but predict_accuracy, which
    refuses conv models (:func:`bnn_tol.metrics.predict.unsupported`)."""
    from bnn_tol.metrics import predict

    res = study.run("tiny", tmp_path, echo=None, overrides={
        "train": {"seeds": [0], "bers": [0.2], "epochs": 1},
        "eval": {"bers": [0.0, 0.2], "n_maps": 1}, "metrics": {"batch_size": 200},
        "models": [{"label": "vgg3", "name": "vgg3"}],
        "protection": {"rankings": ["margin", "random:0"], "fractions": [0.0, 1.0],
                       "bers": [0.2], "n_maps": 1}})
    assert res["failed"] == []
    assert pd.read_csv(res["out"] + "/predictions.csv").empty
    model = bnn_tol.load(tmp_path / "models" / "vgg3_ber0.2_s0")
    assert "convolution" in predict.unsupported(model)
    curve = pd.read_csv(tmp_path / "protection.csv")
    clean = pd.read_csv(res["models"])["clean_acc"].iloc[0]
    assert (curve.loc[curve.fraction == 1.0, "accuracy"] == clean).all()
