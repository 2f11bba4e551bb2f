"""A published table is regenerated from the committed code and compared (issue 9).

``tests/data/published_tiny/`` holds a tiny study and the tables the code produced from it
(``models.csv``, ``sweep_summary.csv``, ``environment.json``), written by
``python tests/test_published.py --write`` -- never by hand. The test reruns the study into a
fresh directory and compares:

- always exactly: the grid (task ids, training BERs, seeds, epochs, threads), the evaluation
  BERs and the number of fault maps per BER (these follow from the study file and the seeded
  fault maps alone);
- in the environment that generated the files (same CPU model and feature flags, torch
  version, threads):
  every number bit for bit (training is deterministic for a fixed thread count on one
  machine, and the sweep engines are exact);
- elsewhere: accuracies within a tolerance. On another CPU the float reductions of training
  differ (kernel dispatch, summation order), a latent weight near 0 can change sign, and
  training follows a different trajectory: the result is a different network drawn from the
  same distribution, like another seed. So the per-cell mean over the k seeds (and maps) is
  compared with 4 standard deviations of the difference of two such means,
  ``4 * sqrt(2 / k) * s``, where ``s`` is the spread between seeds measured in the committed
  table, floored by the binomial sampling sd of one accuracy on n test images,
  ``sqrt(a (1 - a) / n)`` (the spread between seeds can be 0 by chance when k is small).

The committed tables were written before issue 19's schema: they are read through its declared
upgrade (``seed`` -> ``train_seed``, :func:`bnn_tol.schema.upgrade`), as any table of the
previous release is; the numbers are compared as they are.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bnn_tol import data, schema, study

HERE = Path(__file__).resolve().parent / "data" / "published_tiny"
STUDY = HERE / "study.toml"
KEYS = ["model_id", "model", "train_ber", "train_seed", "arch", "epochs", "checkpoint",
        "threads"]


def regenerate(out: Path) -> dict[str, pd.DataFrame]:
    """Run the tiny study into a fresh ``out``; its models table and sweep summary."""
    res = study.run(STUDY, out, fresh=True, echo=None,
                    command="python tests/test_published.py --write")
    assert res["failed"] == []
    sweeps = pd.read_csv(res["sweeps"])
    summary = (sweeps.groupby(["model_id", "train_ber", "train_seed", "ber", "p01", "p10"],
                              sort=False)["accuracy"]
               .agg(mean_accuracy="mean", n_maps="size").reset_index())
    env = json.loads(Path(res["environment"]).read_text())
    return {"models": pd.read_csv(res["models"]), "sweep_summary": summary, "env": env}


def _same_environment(env: dict) -> bool:
    from bnn_tol.provenance import cpu_flags_digest as _cpu_flags
    from bnn_tol.provenance import cpu_model as _cpu_model

    return (env["cpu"] == _cpu_model() and env.get("cpu_flags") == _cpu_flags() is not None
            and env["torch"] == torch.__version__ and env["torch_threads"] == 1)


def _tolerance(cells: pd.DataFrame, value: str, n_test: int) -> pd.Series:
    """4 sd of the difference of two k-seed means (see the module docstring), per cell."""
    g = cells.groupby(["train_ber", *(["ber"] if "ber" in cells else [])])[value]
    a, s, k = g.mean(), g.std(ddof=1).fillna(0.0), g.size()
    floor = (a * (1 - a) / n_test).clip(lower=n_test**-2.0) ** 0.5  # a = 1 still varies
    return 4 * (2 / k) ** 0.5 * s.combine(floor, max)


@pytest.mark.slow
def test_published_tiny_table_is_regenerated_by_the_committed_code(tmp_path):
    new = regenerate(tmp_path / "out")
    old_models = schema.read_csv(HERE / "models.csv", "study.models")
    old_summary = pd.read_csv(HERE / "sweep_summary.csv").rename(
        columns=schema.UPGRADES["study.sweeps"])
    old_env = json.loads((HERE / "environment.json").read_text())
    models, summary = new["models"], new["sweep_summary"]
    # the grid and the fault-map layout follow from the study file alone: exact everywhere
    pd.testing.assert_frame_equal(models[KEYS], old_models[KEYS])
    cols = ["model_id", "train_ber", "train_seed", "ber", "p01", "p10", "n_maps"]
    pd.testing.assert_frame_equal(summary[cols], old_summary[cols])
    if _same_environment(old_env):  # one machine, one thread count: bit for bit
        pd.testing.assert_frame_equal(models[old_models.columns], old_models, check_exact=True)
        pd.testing.assert_frame_equal(summary, old_summary, check_exact=True)
        return
    n_test = len(data.load("digits", "test"))
    for old, cur, value in ((old_models, models, "clean_acc"),
                            (old_summary, summary, "mean_accuracy")):
        by = ["train_ber", *(["ber"] if "ber" in old else [])]
        tol = _tolerance(old, value, n_test)
        diff = (cur.groupby(by)[value].mean() - old.groupby(by)[value].mean()).abs()
        bad = diff[diff > tol]
        assert bad.empty, f"{value}: {bad.to_dict()} beyond {tol[bad.index].to_dict()}"
        assert all(math.isfinite(v) for v in tol)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    tmp = HERE / ".regenerate"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tables = regenerate(tmp)
        tables["models"].to_csv(HERE / "models.csv", index=False)
        tables["sweep_summary"].to_csv(HERE / "sweep_summary.csv", index=False)
        (HERE / "environment.json").write_text(json.dumps(tables["env"], indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
