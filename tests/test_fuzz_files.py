"""Issue 20, fuzzing the files a user hands to the writers: study files (TOML keys, types and
values, broken syntax) and sweep sidecars and CSVs (JSON values, rows, headers, truncation).

Every mutated input ends in exactly one of: a one-line ``Error:`` (exit != 0) or a correct run.
Never a traceback, never a file written outside the command's output, never a foreign file
changed. The default suite runs a few dozen examples (~30 s); ``-m slow`` runs hundreds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnn_tol
from bnn_tol import engines, models
from bnn_tol.cli import main
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.study import runner

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_line_or_ok(r) -> bool:
    """True for a successful run; asserts a one-line error otherwise (never a traceback)."""
    if r.exit_code == 0:
        return True
    assert isinstance(r.exception, SystemExit), "".join(__import__("traceback").format_exception(
        *r.exc_info))[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return False


# -- study files -----------------------------------------------------------------------------------

BASE = {"name": "fz", "data": {"dataset": "digits", "metric_subset": 40},
        "train": {"bers": [0.0], "seeds": [0], "epochs": 1, "batch_size": 64},
        "eval": {"bers": [0.0, 0.1], "n_maps": 1},
        "models": [{"label": "fc", "name": "fc", "hidden": [8]}]}

_KEYS = ["name", "description", "dataset", "metric_subset", "train_subset", "test_subset",
         "subset_seed", "data_dir", "bers", "seeds", "epochs", "batch_size", "lr", "lr_step",
         "lr_gamma", "loss", "flip_layers", "flip_warmup", "n_maps", "seed", "layers", "engine",
         "error", "importance", "device", "threads", "workers", "label", "hidden", "fc_width",
         "channels", "weight_bits", "activation", "bogus"]
_WORDS = ["all", "hidden", "auto", "cpu", "fc", "vgg3", "accuracy", "../x", "/tmp", "digits",
          "nope", "stuck-at", "packed", "mhl", ""]
_SCALARS = st.one_of(st.integers(-3, 3), st.integers(-2**63, 2**63 - 1), st.floats(),
                     st.booleans(), st.text(max_size=6), st.sampled_from(_WORDS))
_VALUES = st.recursive(_SCALARS, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=5), c,
                                                                     max_size=2)),
                       max_leaves=5)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v)
                else repr(v))
    if isinstance(v, int | str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


def dump(cfg: dict) -> str:
    """A study config as TOML (tables as sections, a list of tables as [[...]])."""
    def is_tables(v):
        return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)

    lines = [f"{json.dumps(k)} = {_toml(v)}" for k, v in cfg.items()
             if not isinstance(v, dict) and not is_tables(v)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += [f"[{json.dumps(k)}]", *(f"{json.dumps(a)} = {_toml(b)}"
                                              for a, b in v.items())]
        elif is_tables(v):
            for x in v:
                lines += [f"[[{json.dumps(k)}]]", *(f"{json.dumps(a)} = {_toml(b)}"
                                                    for a, b in x.items())]
    return "\n".join(lines) + "\n"


@st.composite
def study_files(draw) -> bytes:
    """The base study with 1-3 keys set to random values or deleted, in any section; or its
    text with a line deleted, garbage inserted or cut short."""
    cfg = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        sec = draw(st.sampled_from(["", "data", "train", "eval", "metrics", "run", "models",
                                    "bogus"]))
        key = draw(st.sampled_from(_KEYS))
        if sec == "":
            tgt = cfg
        elif sec == "models":
            ms = cfg.get("models")
            tgt = ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else cfg
        else:
            tgt = cfg.setdefault(sec, {}) if isinstance(cfg.get(sec, {}), dict) else cfg
        if draw(st.booleans()):
            tgt[key] = draw(_VALUES)
        else:
            tgt.pop(key, None)
    text = dump(cfg).encode()
    op = draw(st.sampled_from(["keys"] * 4 + ["del-line", "garbage", "cut"]))
    lines = text.split(b"\n")
    i = draw(st.integers(0, len(lines) - 1))
    if op == "del-line":
        del lines[i]
    elif op == "garbage":
        lines.insert(i, draw(st.binary(max_size=12)))
    elif op == "cut":
        return text[:draw(st.integers(0, len(text)))]
    return b"\n".join(lines)


class _Accepted(Exception):  # noqa: N818 -- a signal, not an error
    """Raised instead of running the tasks of a config that passed every check."""


def _cheap(cfg: dict) -> bool:
    """Whether a validated config runs in a second or two (digits, tiny models, few tasks)."""
    import torch

    tr, ev = cfg["train"], cfg["eval"]
    if cfg["data"]["dataset"] != "digits" or cfg["data"]["data_dir"] is not None:
        return False
    if len(runner.tasks(cfg)) > 2 or tr["epochs"] > 2 or ev["n_maps"] * len(ev["bers"]) > 6:
        return False
    if cfg["run"]["workers"] != 1 or tr["batch_size"] < 16:
        return False
    for m in cfg["models"]:
        entry = {k: v for k, v in m.items() if k != "label"}
        try:
            with torch.device("meta"):
                net = models.build(entry.pop("name"), **{"in_shape": (1, 8, 8), **entry})
        except Exception:  # noqa: BLE001 -- not a cheap model, whatever is wrong with it
            return False
        if sum(p.numel() for p in net.parameters()) > 20_000:
            return False
    return True


def _check_study_file(tmp: Path, raw: bytes, monkeypatch, *, real_runs: list[int]) -> None:
    d = tmp / f"case{len(list(tmp.iterdir()))}"
    d.mkdir()
    f = d / "s.toml"
    f.write_bytes(raw)
    (d / "foreign.txt").write_text("someone's notes")
    out = d / "O"
    before = _tree(d)
    real = runner.run_task
    cfg = None
    try:
        cfg = runner.load_config(f)
    except InvalidArgument:
        pass
    run_it = False
    if cfg is not None:
        try:
            runner.check(cfg)
            run_it = real_runs[0] > 0 and _cheap(cfg)
        except Exception:  # noqa: BLE001 -- the CLI must say it in one line (checked below)
            pass

    def stub(*a, **k):
        raise _Accepted()

    monkeypatch.setattr(runner, "run_task", real if run_it else stub)
    try:
        r = _run("study", f, "--out", out, "--no-report")
    finally:
        monkeypatch.setattr(runner, "run_task", real)
    if isinstance(r.exception, _Accepted):
        ok = None  # every check passed; the tasks were not run (too slow for a fuzz test)
    else:
        ok = _one_line_or_ok(r)
    after = _tree(d)
    outside = {k: v for k, v in after.items() if not k.startswith("O/")}
    assert outside == before, "a file outside the output was written or changed"
    if ok:
        real_runs[0] -= 1
        cfg_out = json.loads((out / "study.json").read_text())
        assert cfg_out["train"]["epochs"] == cfg["train"]["epochs"]
        for name in ("models.csv", "sweeps.csv", "metrics.csv", "status.csv"):
            assert (out / name).stat().st_size > 0, name
        assert "failed" not in (out / "status.csv").read_text()
    elif ok is False:
        assert not out.exists() or not any(p.name.endswith(".csv") for p in out.iterdir())
    shutil.rmtree(d)


def test_the_base_study_file_is_valid_and_dumps_faithfully(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(dump(BASE))
    cfg = runner.load_config(f)
    assert cfg["models"][0]["hidden"] == [8] and cfg["eval"]["bers"] == [0.0, 0.1]
    f.write_bytes(b"\xff\xfe[train")
    with pytest.raises(InvalidArgument, match="not a TOML study file"):
        runner.load_config(f)


@FAST
@given(raw=study_files())
def test_fuzzed_study_files_are_one_line_or_a_correct_run(tmp_path_factory, monkeypatch, raw):
    _check_study_file(tmp_path_factory.mktemp("fz"), raw, monkeypatch, real_runs=_REAL_FAST)


_REAL_FAST = [2]  # real runs of accepted cheap configs in the default suite (the rest: checks)
_REAL_SLOW = [40]


@pytest.mark.slow
@SLOW
@given(raw=study_files())
def test_fuzzed_study_files_slow(tmp_path_factory, monkeypatch, raw):
    _check_study_file(tmp_path_factory.mktemp("fz"), raw, monkeypatch, real_runs=_REAL_SLOW)


# -- sweep sidecars and CSVs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """A checkpoint, its sweep (BERs 0, 0.1) to mutate, and the reference of the resumed sweep
    (BERs 0, 0.1, 0.2) computed in one go."""
    d = tmp_path_factory.mktemp("sweeps")
    ck = d / "m1"
    bnn_tol.save(models.build("fc", hidden=(8,), in_shape=(1, 8, 8), seed=0), ck)
    args = ["sweep", ck, "--dataset", "digits", "--maps", "2", "--quiet", "--out"]
    assert _run(*args, d / "base.csv", "--bers", "0,0.1").exit_code == 0
    assert _run(*args, d / "ref.csv", "--bers", "0,0.1,0.2").exit_code == 0
    return {"ck": ck, "csv": (d / "base.csv").read_bytes(),
            "meta": json.loads((d / "base.csv.meta.json").read_text()),
            "ref": engines.read_sweep(d / "ref.csv"), "ck_tree": _tree(ck)}


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 2**64), st.floats(),
                               st.text(max_size=8)),
                     lambda c: st.one_of(st.lists(c, max_size=3),
                                         st.dictionaries(st.text(max_size=6), c, max_size=3)),
                     max_leaves=6)


def _paths(o, pre=()):
    yield pre
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _paths(v, (*pre, k))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _paths(v, (*pre, i))


@st.composite
def sidecar_mutations(draw, meta: dict) -> tuple[str, bytes]:
    m = copy.deepcopy(meta)
    for _ in range(draw(st.integers(1, 3))):
        p = draw(st.sampled_from(sorted(_paths(meta), key=str)))
        if not p:
            m = draw(_JSON)
            continue
        tgt = m
        try:
            for k in p[:-1]:
                tgt = tgt[k]
            if draw(st.booleans()) and isinstance(tgt, dict):
                tgt.pop(p[-1], None)
            else:
                tgt[p[-1]] = draw(_JSON)
        except (KeyError, IndexError, TypeError):
            pass
    raw = json.dumps(m).encode()
    if draw(st.integers(0, 9)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]
    return "meta", raw


_FIELDS = [b"", b"nan", b"inf", b"-1", b"2", b"x", b"1e400", b"0.5", b"9" * 30, b'"a,b"',
           b"1.0000000001", b"m1", b"0"]


@st.composite
def csv_mutations(draw, csv: bytes) -> tuple[str, bytes]:
    lines = csv.split(b"\n")
    op = draw(st.sampled_from(["del", "dup", "field", "cut", "garbage", "header", "swap"]))
    i = draw(st.integers(0, len(lines) - 2))
    if op == "del":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "field":
        f = lines[i].split(b",")
        f[draw(st.integers(0, len(f) - 1))] = draw(st.sampled_from(_FIELDS))
        lines[i] = b",".join(f)
    elif op == "cut":
        return "csv", csv[:draw(st.integers(0, len(csv)))]
    elif op == "garbage":
        lines.insert(i, draw(st.binary(max_size=20)))
    elif op == "header":
        f = lines[0].split(b",")
        draw(st.randoms()).shuffle(f)
        lines[0] = b",".join(f)
    else:
        j = draw(st.integers(0, len(lines) - 2))
        lines[i], lines[j] = lines[j], lines[i]
    return "csv", b"\n".join(lines)


def _check_sweep_files(tmp: Path, sw: dict, kind: str, raw: bytes) -> None:
    d = tmp / "case"
    d.mkdir()
    (d / "s.csv").write_bytes(raw if kind == "csv" else sw["csv"])
    (d / "s.csv.meta.json").write_bytes(raw if kind == "meta" else
                                        json.dumps(sw["meta"]).encode())
    (d / "foreign.txt").write_text("someone's notes")
    before = _tree(d)
    r = _run("sweep", sw["ck"], "--dataset", "digits", "--bers", "0,0.1,0.2", "--maps", "2",
             "--quiet", "--out", d / "s.csv", "--resume")
    if _one_line_or_ok(r):  # a correct run: every row of the reference, the new ones equal
        out, ref = engines.read_sweep(d / "s.csv"), sw["ref"]
        key = ["model", "p01", "p10", "map", "map_seed"]
        mine = out.merge(ref[key], on=key).sort_values(key).reset_index(drop=True)
        assert len(mine) == len(ref)
        new = mine[mine.ber == 0.2].reset_index(drop=True)
        assert new.equals(ref[ref.ber == 0.2].sort_values(key).reset_index(drop=True))
        if kind == "meta":  # rows untouched: the whole file is the reference
            assert out.equals(ref)
    else:
        assert _tree(d) == before, "a refused resume changed a file"
    _one_line_or_ok(_run("plot", "sweep", d / "s.csv", "--out", d / "p.png"))
    assert set(os.listdir(d)) <= {"s.csv", "s.csv.meta.json", "foreign.txt", "p.png"}
    assert (d / "foreign.txt").read_text() == "someone's notes"
    assert _tree(sw["ck"]) == sw["ck_tree"]
    shutil.rmtree(d)


def _sweep_mutations(sw):
    return st.one_of(sidecar_mutations(sw["meta"]), csv_mutations(sw["csv"]))


def test_fuzzed_sweep_files_are_one_line_or_a_correct_resume(tmp_path_factory, sweeps):
    @FAST
    @given(mut=_sweep_mutations(sweeps))
    def check(mut):
        _check_sweep_files(tmp_path_factory.mktemp("fz"), sweeps, *mut)

    check()


@pytest.mark.slow
def test_fuzzed_sweep_files_slow(tmp_path_factory, sweeps):
    @SLOW
    @given(mut=_sweep_mutations(sweeps))
    def check(mut):
        _check_sweep_files(tmp_path_factory.mktemp("fz"), sweeps, *mut)

    check()
