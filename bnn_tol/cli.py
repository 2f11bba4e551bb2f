"""The ``bnn-tol`` command. It only parses arguments and calls the library.

Sub-commands: ``train``, ``sweep``, ``metrics``, ``plot ...``, ``study``, ``report``.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import click

from bnn_tol.exceptions import InvalidArgument

__all__ = ["main"]


def _parse_ber(text: str | None) -> float | tuple[float, float] | None:
    """``"0.1"`` -> 0.1; ``"0.05,0.1"`` -> (p01, p10)."""
    if text is None:
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError as e:
        raise click.BadParameter(f"{text!r} is not a number or a pair p01,p10") from e
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise click.BadParameter(f"{text!r}: give p or p01,p10")


def _parse_list(text: str | None, what: str, cast=int) -> tuple | None:
    """``"1,2,3"`` -> ``(1, 2, 3)`` (``None`` for empty text); a clear error otherwise."""
    if not text:
        return None
    try:
        return tuple(cast(v) for v in text.split(","))
    except ValueError as e:
        kind = "integers" if cast is int else "numbers"
        raise click.BadParameter(f"{what} must be comma-separated {kind}, got {text!r}") from e


def _parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    return _parse_list(text, what, int)


class RegistryChoice(click.Choice):
    """A choice among the names of a library registry, read when first needed.

    The registries (engines, error models, estimators) live in modules that import torch
    (~2 s); reading them lazily keeps ``bnn-tol --help`` and usage errors instant, while the
    registry stays the single source of the names (no list is repeated here).
    """

    def __init__(self, names, *, extra: tuple[str, ...] = ()) -> None:
        self._names, self._extra, self._cached = names, tuple(extra), None
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:  # noqa: D102
        if self._cached is None:
            self._cached = (*self._extra, *self._names())
        return self._cached

    @choices.setter
    def choices(self, value) -> None:  # click assigns in __init__; the registry decides
        pass


class ErrorModelChoice(RegistryChoice):
    """An error model of the library's registry (:func:`bnn_tol.errors.models`): a listed
    name, or ``name:argument`` for a model that takes one (``chip:<profile.npz>``). The
    registry validates the value (one-line error otherwise)."""

    def convert(self, value, param, ctx):  # noqa: D102
        from bnn_tol.faults import error_model

        try:
            error_model(value)
        except InvalidArgument as e:
            self.fail(str(e), param, ctx)
        return value


def _error_names() -> list[str]:
    from bnn_tol.faults import models

    return models()


def _engine_names() -> list[str]:
    from bnn_tol.engines import engines

    return engines()


def _estimator_names() -> list[str]:
    from bnn_tol.metrics import estimators

    return estimators.names()


class _OneLineError(click.ClickException):
    """A user error shown as the single line ``Error: <message>`` (exit ``code``)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = code


class _Cli(click.Group):
    """The ``bnn-tol`` group: user errors end in one line, bugs keep their traceback.

    A :class:`~bnn_tol.exceptions.BnnTolError` raised by any sub-command, and click's own
    usage errors of a sub-command's arguments, print ``Error: <message>`` on stderr as one
    line; the exit code is 2 for bad arguments (click usage errors and ``InvalidArgument``)
    and 1 for the other user errors (missing/corrupt files, results made with other
    settings, a locked output). ``bnn-tol --debug ...`` re-raises them with the traceback.
    Any other exception is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context):
        from bnn_tol.exceptions import BnnTolError, InvalidArgument

        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if ctx.params.get("debug"):
                raise
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            raise _OneLineError(f"{e.format_message()} (see `{where} -h`)", 2) from e
        except BnnTolError as e:
            if ctx.params.get("debug"):
                raise
            raise _OneLineError(str(e), 2 if isinstance(e, InvalidArgument) else 1) from e


@click.group(cls=_Cli,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bnn_tol")
@click.option("--debug", is_flag=True,
              help="Show the traceback of user errors instead of the one-line message.")
def main(debug: bool) -> None:
    """Bit error tolerance of binarized neural networks: train, inject, sweep, measure."""


#: The library's bounds (bnn_tol.train.MAX_SEED, MAX_THREADS), here so that `--help` and usage
#: errors need no torch import (tests/test_cli_limits.py checks that they agree).
_MAX_SEED = (1 << 63) - 1
_MAX_THREADS = 1024
#: bnn_tol.engines.driver.MAX_MAPS (fault maps per BER of one sweep).
_MAX_MAPS = 100_000


@main.command()
@click.option("--model", "model_name", default="fc", show_default=True,
              help="Architecture: fc, vgg3 or vgg7.")
@click.option("--hidden", default=None,
              help="fc hidden widths, comma-separated (default 2048,2048).")
@click.option("--fc-width", type=int, default=None, help="vgg width of the dense hidden layer.")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, mnist, kmnist, cifar10 or digits.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Directory searched first for the dataset files.")
@click.option("--epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Mini-batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              show_default=True, help="Adam learning rate (> 0).")
@click.option("--lr-step", type=click.IntRange(min=1), default=None,
              help="StepLR period in epochs (default epochs // 4); the rate halves each period.")
@click.option("--loss", type=click.Choice(["ce", "mhl"]), default="ce", show_default=True,
              help="Cross-entropy or modified hinge loss.")
@click.option("--mhl-margin", type=float, default=1.0, show_default=True,
              help="Margin b of the modified hinge loss.")
@click.option("--flip-ber", default=None,
              help="Bit flip training BER: p, or p01,p10 for asymmetric errors. Omit for normal "
                   "training.")
@click.option("--flip-layers", default=None,
              help="Layers flipped during training: 'all' (default), 'hidden', or "
                   "comma-separated positions/names.")
@click.option("--flip-warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="Epochs of linear BER warm-up.")
@click.option("--weight-bits", type=click.IntRange(min=1, max=8), default=1, show_default=True,
              help="Stored bits per weight: 1 = BNN (sign), 2..8 = fixed point.")
@click.option("--quant", type=click.Choice(["symmetric", "asymmetric", "asymmetric-signed"]),
              default="symmetric",
              show_default=True, help="Fixed-point scheme (two's complement / unsigned + offset "
              "/ asymmetric range in two's complement).")
@click.option("--granularity", type=click.Choice(["layer", "channel", "network"]),
              default="layer",
              show_default=True, help="One quantization range per layer, per output channel, "
              "or for the whole network.")
@click.option("--rounding", type=click.Choice(["nearest", "truncate"]), default="nearest",
              show_default=True, help="Quantization rounding.")
@click.option("--activation", type=click.Choice(["sign", "relu"]), default=None,
              help="Hidden activation (default: sign for 1 bit, relu for more).")
@click.option("--clip", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Weight clipping w_max: latent weights kept in [-w_max, w_max].")
@click.option("--randbet-ber", default=None,
              help="Random bit error training (RandBET) rate: p or p01,p10.")
@click.option("--adversarial-bits", type=click.IntRange(min=0), default=None,
              help="Adversarial bit error training: also minimize the loss with the N stored "
                   "bits flipped that a one-shot gradient attack picks each step.")
@click.option("--train-subset", type=click.IntRange(min=1), default=None,
              help="Use only the first N training samples (quick runs).")
@click.option("--seed", type=click.IntRange(0, _MAX_SEED), default=0, show_default=True,
              help="Seed of initialization, shuffling and flips.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to train.")
@click.option("--threads", type=click.IntRange(1, _MAX_THREADS), default=None,
              help="torch CPU threads while training (default: the current torch setting). "
                   "The trained weights depend on it; recorded in config.json.")
@click.option("--out", type=click.Path(), required=True,
              help="Checkpoint directory (model.safetensors + config.json), updated every epoch.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing checkpoint in --out (never any other directory).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(model_name, hidden, fc_width, dataset, data_dir, epochs, batch_size, lr, lr_step, loss,
          mhl_margin, flip_ber, flip_layers, flip_warmup, weight_bits, quant, granularity,
          rounding, activation, clip, randbet_ber, adversarial_bits, train_subset, seed, device,
          threads, out, overwrite, quiet) -> None:
    """Train a BNN (or an m-bit network: --weight-bits) normally, with bit flip training,
    RandBET or adversarial bit errors, and save a checkpoint."""
    import torch

    from bnn_tol import data
    from bnn_tol import train as train_mod
    from bnn_tol.interop import checkpoint

    checkpoint.check_out(out, overwrite=overwrite)
    if hidden and model_name.lower() != "fc":
        raise click.BadParameter(f"--hidden is an fc option; {model_name} takes --fc-width",
                                 param_hint="'--hidden'")
    ber = _parse_ber(flip_ber)
    tr = data.load(dataset, "train", data_dir=data_dir)
    te = data.load(dataset, "test", data_dir=data_dir)
    if train_subset is not None:
        tr = tr.subset(train_subset)
    kwargs: dict = {"in_shape": tr.shape, "n_classes": len(tr.classes)}
    if hidden:
        kwargs["hidden"] = _parse_ints(hidden, "--hidden")
    if fc_width is not None:
        kwargs["fc_width"] = fc_width
    if weight_bits != 1 or (quant, granularity, rounding) != ("symmetric", "layer", "nearest"):
        kwargs.update(weight_bits=weight_bits, quant=quant, granularity=granularity,
                      rounding=rounding)
    if activation is not None:
        kwargs["activation"] = activation
    model = train_mod.build(model_name, seed=seed, **kwargs)  # refuses what cannot fit
    layers = None
    if flip_layers and flip_layers not in ("all", "hidden"):
        layers = [int(v) if v.lstrip("-").isdigit() else v for v in flip_layers.split(",")]
    elif flip_layers:
        layers = flip_layers
    hist = train_mod.fit(model, tr, te, epochs=epochs, batch_size=batch_size, lr=lr,
                         lr_step=lr_step, loss=loss, mhl_margin=mhl_margin,
                         flip_ber=ber, flip_layers=layers, flip_warmup=flip_warmup,
                         clip=clip, randbet_ber=_parse_ber(randbet_ber),
                         adversarial_bits=adversarial_bits, seed=seed,
                         device=device, out=out, overwrite=overwrite, progress=not quiet,
                         threads=threads if threads is not None else torch.get_num_threads())
    checkpoint.save(model, out)
    last = hist.iloc[-1].to_dict() if len(hist) else {}
    click.echo(json.dumps({"out": str(Path(out)), "model": model_name,
                           "flip_ber": model.meta["training"]["flip_ber"],
                           "test_acc": last.get("test_acc"),
                           "seconds": float(hist["seconds"].sum()) if len(hist) else 0.0}))


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Directory for the demo's checkpoints and results.")
@click.option("--dataset", default="fashion-mnist", show_default=True, help="Dataset name.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Directory searched first for the dataset files.")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Training epochs per model.")
@click.option("--seed", type=click.IntRange(0, _MAX_SEED), default=0, show_default=True,
              help="Seed of everything random.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to compute.")
@click.option("--maps", type=click.IntRange(1, _MAX_MAPS), default=10, show_default=True,
              help="Fault maps per BER in the demo sweep.")
@click.option("--study", "study_name", default="quick", show_default=True,
              help="Study preset run at the end ('none' to skip).")
def demo(out, dataset, data_dir, epochs, seed, device, maps, study_name) -> None:
    """The end-to-end demo of `make demo`: train normal + flip-trained BNNs, sweep them under
    bit errors, compute both tolerance metrics, run the quick correlation study + report."""
    from bnn_tol.study import demo as demo_mod

    demo_mod.run(out, dataset=dataset, data_dir=data_dir, epochs=epochs, seed=seed,
                 device=device, n_maps=maps,
                 study=None if study_name.lower() == "none" else study_name, echo=click.echo)


#: Most BERs one sweep may take (a START:STOP:STEP with a tiny step is a typo, not a sweep).
MAX_BERS = 10_000


def _parse_bers(text: str) -> list:
    """``"0:0.1:0.01"`` (inclusive range), ``"0,0.01,0.05"`` or pairs ``"0.01/0.05"`` (p01/p10).

    A range gives ``round(START + k STEP, 12)`` for ``k = 0 .. K``,
    ``K = floor((STOP - START) / STEP + 1e-9)``: never past STOP (``0:0.1:0.06`` -> 0, 0.06),
    and STOP itself despite float rounding (``0:0.1:0.01`` has 11 points, the last 0.1).
    Every BER must be finite and in [0, 1]; at most :data:`MAX_BERS` points.
    """

    text = text.replace(" ", "")
    usage = "use START:STOP:STEP, a list p1,p2,... or p01/p10 pairs"

    def num(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise click.BadParameter(f"{text!r}: {v!r} is not a number; {usage}") from None
        if not math.isfinite(x):
            raise click.BadParameter(f"{text!r}: {v!r} is not a finite number")
        return x

    def ber(v: str) -> float:
        p = num(v)
        if not 0.0 <= p <= 1.0:
            raise click.BadParameter(f"{text!r}: BER {v} is outside [0, 1]")
        return p

    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise click.BadParameter(f"{text!r}: a range is START:STOP:STEP; {usage}")
        start, stop, step = ber(parts[0]), ber(parts[1]), num(parts[2])
        if step <= 0:
            raise click.BadParameter(f"{text!r}: STEP must be > 0")
        if stop < start:
            raise click.BadParameter(f"{text!r}: STOP is below START")
        q = (stop - start) / step
        if not q < MAX_BERS:
            raise click.BadParameter(f"{text!r}: more than {MAX_BERS} BERs; use a larger STEP")
        return [min(round(start + k * step, 12), stop) for k in range(math.floor(q + 1e-9) + 1)]
    out: list = []
    for item in text.split(","):
        if not item:
            continue
        if "/" in item:
            pair = item.split("/")
            if len(pair) != 2:
                raise click.BadParameter(f"{text!r}: {item!r} is not a pair p01/p10; {usage}")
            out.append((ber(pair[0]), ber(pair[1])))
        else:
            out.append(ber(item))
    if not out:
        raise click.BadParameter(f"{text!r}: no BERs given; {usage}")
    if len(out) > MAX_BERS:
        raise click.BadParameter(f"more than {MAX_BERS} BERs")
    return out


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--bers", default="0:0.1:0.01", show_default=True,
              help="BERs: START:STOP:STEP (inclusive), a list 0,0.01,0.05, or p01/p10 pairs.")
@click.option("--maps", "n_maps", type=click.IntRange(1, _MAX_MAPS), default=20,
              show_default=True, help="Fault maps (chips) per BER.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fault maps.")
@click.option("--layers", default=None,
              help="Layers with errors: 'all' (default), 'hidden', or comma-separated "
                   "positions/names.")
@click.option("--targets", default="weights", show_default=True,
              help="Comma-separated: weights, activations, thresholds[:m], bn[:m] (the BN "
                   "thresholds or scale/shift as m-bit words).")
@click.option("--error", type=ErrorModelChoice(_error_names), default="bernoulli",
              show_default=True, help="Error model (how stored bits fail).")
@click.option("--dataset", default=None,
              help="Test set (default: the dataset the first checkpoint was trained on).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Directory searched first for the dataset files.")
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Use only the first N test samples.")
@click.option("--batch-size", type=int, default=None,
              help="Test samples per chunk (>= 1; default from a memory budget).")
@click.option("--engine", type=RegistryChoice(_engine_names, extra=("auto",)),
              default="auto", show_default=True, help="Evaluation engine (all exact).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to compute.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="CSV file; rows are appended per (model, BER) as they finish. It is "
                   "locked while the sweep runs; FILE.meta.json records its settings.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted --out file made with the same settings.")
@click.option("--profile", "profile_file", type=click.Path(exists=True, dir_okay=False),
              default=None,
              help="Errors of a profiled chip (.npz, see bnn_tol.profile) per supply voltage "
                   "instead of random BERs; writes accuracy vs voltage and energy to --out.")
@click.option("--voltages", default=None,
              help="With --profile: comma-separated voltages, or 'grid': steps of at most "
                   "0.1 % bit error rate over the profile's range (profile.voltage_grid) "
                   "(default: all of the profile).")
@click.option("--offsets", default="0", show_default=True,
              help="With --profile: placements of the model in the chip (bit offsets).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(runs, bers, n_maps, seed, layers, targets, error, dataset, data_dir, subset,
          batch_size, engine, device, out, resume, profile_file, voltages, offsets,
          quiet) -> None:
    """Accuracy of checkpoints RUNS... under persistent bit errors (one row per model, BER, map),
    or on a profiled chip per voltage (--profile)."""
    from bnn_tol import data, engines, files
    from bnn_tol.interop import checkpoint

    if resume and not out:
        raise click.UsageError("--resume needs --out FILE: the sweep CSV to continue")
    _refuse_other_kind(click.get_current_context(), profile=profile_file is not None)
    if out:  # never into a checkpoint read; whether an existing file is ours: the sweep file
        for path in (out, engines.meta_path(out)):
            files.check_output(path, inputs=[*runs, data_dir], replace=True)
    if profile_file is not None:
        return _profile_sweep(runs, profile_file, voltages, offsets, dataset, data_dir, subset,
                              out, quiet)
    ber_list = _parse_bers(bers)
    models = {Path(r).name: checkpoint.load(r) for r in runs}
    if len(models) != len(runs):
        raise click.BadParameter("two checkpoints have the same directory name")
    first = next(iter(models.values()))
    name = dataset or first.meta.get("training", {}).get("dataset", "fashion-mnist")
    test = data.load(name, "test", data_dir=data_dir)
    if subset is not None:
        test = test.subset(subset)
    sel = None
    if layers and layers not in ("all", "hidden"):
        sel = [int(v) if v.lstrip("-").isdigit() else v for v in layers.split(",")]
    elif layers:
        sel = layers
    try:
        df = engines.sweep(models, test, bers=ber_list, n_maps=n_maps, seed=seed,
                            layers=sel, batch_size=batch_size, device=device,
                            progress=not quiet, engine=engine,
                            targets=[t for t in targets.split(",") if t], out=out,
                            resume=resume, error=error)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    summ = engines.summarize(df)
    click.echo(summ.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if out:
        click.echo(f"wrote {len(df)} rows to {out}")


_ATTACK_TABLE = "model,method,attack_seed,n_flips,accuracy,loss,attack_loss"


@main.command("attack")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--bits", "n_bits", type=click.IntRange(min=0), required=True,
              help="N: the stored bits each attack flips (the curve has rows 0..N).")
@click.option("--random-seeds", default="0,1,2", show_default=True,
              help="Seeds of the random-flip baselines (uniform stored bits), e.g. 0,1,2.")
@click.option("--candidates", type=click.IntRange(min=1), default=8, show_default=True,
              help="Bits evaluated exactly per greedy round (1: pure gradient ranking).")
@click.option("--attack-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Attack images, drawn from the training split with --seed.")
@click.option("--layers", default=None,
              help="Attacked layers: names or indices, comma-separated (default: all).")
@click.option("--seed", type=click.IntRange(0, _MAX_SEED), default=0, show_default=True,
              help="Seed of the attack images.")
@click.option("--dataset", default=None,
              help="Dataset name (default: the one the first checkpoint was trained on).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Directory searched first for the dataset files.")
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N test images only.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="CSV (table `attack`): one row per (model, method, seed, bits flipped).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out that `attack` did not write (never a checkpoint "
                   "read).")
def attack_cmd(runs, n_bits, random_seeds, candidates, attack_size, layers, seed, dataset,
               data_dir, subset, out, overwrite) -> None:
    """Worst-case bit errors: accuracy of checkpoints RUNS... as a greedy gradient-guided attack
    flips the N stored bits that hurt most, beside N random flips (bnn_tol.errors.attack)."""
    import pandas as pd

    from bnn_tol import data, errors, files
    from bnn_tol.core import models as core_models
    from bnn_tol.interop import checkpoint

    replace = True if overwrite else files.starts_with(_ATTACK_TABLE)
    files.check_output(out, inputs=[*runs, data_dir], replace=replace)  # before the long run
    seeds = _parse_ints(random_seeds, "--random-seeds") or ()
    labels = [Path(r).name for r in runs]
    if len(set(labels)) != len(labels):
        raise click.BadParameter("two checkpoints have the same directory name: rows are "
                                 "labelled by it", param_hint="RUNS")
    loaded = {label: checkpoint.load(r) for label, r in zip(labels, runs, strict=True)}
    first = next(iter(loaded.values()))
    name = dataset or first.meta.get("training", {}).get("dataset", "fashion-mnist")
    train_ds = data.load(name, "train", data_dir=data_dir)
    test = data.load(name, "test", data_dir=data_dir)
    if subset is not None:
        test = test.subset(subset)
    for label, model in loaded.items():
        try:
            core_models.check_data(model, test)
        except InvalidArgument as e:
            raise InvalidArgument(f"{label}: {e}") from e
    sel = [int(v) if v.lstrip("-").isdigit() else v for v in layers.split(",")] if layers \
        else None
    parts = []
    for label, model in loaded.items():  # one model at a time: its line as soon as it is done
        df = errors.attack.curves({label: model}, train_ds, n_bits, eval_data=test,
                           random_seeds=seeds, seed=seed, candidates=candidates,
                           attack_size=attack_size, layers=sel)
        parts.append(df)
        last = df[df["n_flips"] == n_bits].groupby("method")["accuracy"]
        cells = [f"{m} {100 * g.mean():.2f} %" + (f" ± {100 * g.std():.2f}" if len(g) > 1
                                                   else "") for m, g in last]
        clean = 100 * float(df.loc[df["n_flips"] == 0, "accuracy"].iloc[0])
        click.echo(f"{label}: clean {clean:.2f} %; after {n_bits} flipped bits: "
                   + ", ".join(cells))
    table = pd.concat(parts, ignore_index=True)
    files.atomic_write(out, lambda p: table.to_csv(p, index=False, float_format="%.17g"),
                       inputs=[*runs, data_dir], replace=replace)
    click.echo(f"wrote {len(table)} rows to {out}")


#: Options of a BER sweep that a profile sweep (--profile) does not take, and back.
_BER_ONLY = ("bers", "n_maps", "seed", "layers", "targets", "error", "batch_size", "engine",
             "device", "resume")
_PROFILE_ONLY = ("voltages", "offsets")


def _refuse_other_kind(ctx: click.Context, *, profile: bool) -> None:
    """Refuse options given on the command line that the chosen kind of sweep would ignore."""
    names = _BER_ONLY if profile else _PROFILE_ONLY
    default = (click.core.ParameterSource.DEFAULT, None)
    given = [p for p in ctx.command.params if p.name in names
             and ctx.get_parameter_source(p.name) not in default]
    if given:
        opts = ", ".join(p.opts[0] for p in given)
        raise click.UsageError(f"{opts} {'is' if len(given) == 1 else 'are'} "
                               + ("not used by a profile sweep (--profile sweeps voltages x "
                                  "--offsets)" if profile else
                                  "only used with --profile (a profiled chip)"))


def _profile_sweep(runs, profile_file, voltages, offsets, dataset, data_dir, subset, out,
                   quiet) -> None:
    """``sweep --profile``: accuracy vs voltage and energy on a profiled chip."""
    from bnn_tol import data, engines, files
    from bnn_tol.faults import chip as prof
    from bnn_tol.interop import checkpoint

    if not out:
        raise click.UsageError("--profile needs --out FILE (the profile sweep CSV)")
    if Path(out).exists():
        raise click.UsageError(f"{out} exists; choose another --out (profile sweeps are not "
                               "resumed)")
    files.check_output(out, inputs=[*runs, profile_file])
    chip = prof.load_profile(profile_file)
    volts = tuple(prof.voltage_grid(chip)) if voltages == "grid" \
        else _parse_list(voltages, "--voltages", float)
    offs = _parse_ints(offsets, "--offsets") or (0,)
    models = {Path(r).name: checkpoint.load(r) for r in runs}
    first = next(iter(models.values()))
    name = dataset or first.meta.get("training", {}).get("dataset", "fashion-mnist")
    test = data.load(name, "test", data_dir=data_dir)
    if subset is not None:
        test = test.subset(subset)
    df = engines.profile_sweep(models, test, chip, voltages=volts, offsets=offs,
                            progress=not quiet)
    files.atomic_write(out, lambda p: df.to_csv(p, index=False, float_format="%.17g"),
                       inputs=[*runs, profile_file])
    summ = engines.summary_energy(df)
    click.echo(summ.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    click.echo(f"wrote {len(df)} rows to {out}")


@main.group("profile")
def profile_group() -> None:
    """Profiled (or synthetic) chips: per-cell failure voltages for `sweep --profile`."""


@profile_group.command("synth")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Profile file to write (.npz); refused if it exists.")
@click.option("--generator", type=click.Choice(["calibrated", "legacy"]), default="calibrated",
              show_default=True,
              help="calibrated: Figure 1 of Stutz et al. in units of V/V_min, errors along "
                   "columns, 0->1 bias, 0.1 % BER voltage grid (profile.calibrated_profile); "
                   "legacy: the generator of issue 11 (profile.synthetic_profile).")
@click.option("--rows", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--cols", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--arrays", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--v-mean", type=float, default=None,
              help="legacy: mean cell failure voltage (units of V_min)  [default: 0.70]")
@click.option("--v-sd", type=click.FloatRange(min=0), default=None,
              help="legacy  [default: 0.05]")
@click.option("--row-sd", type=click.FloatRange(min=0), default=None,
              help="legacy  [default: 0.01]")
@click.option("--col-sd", type=click.FloatRange(min=0), default=None,
              help="legacy  [default: 0.01]")
@click.option("--col-share", type=click.FloatRange(0, 1), default=None,
              help="calibrated: share of the failure-voltage variance along columns  "
                   "[default: 0.3]")
@click.option("--row-share", type=click.FloatRange(0, 1), default=None,
              help="calibrated: the same along rows  [default: 0.05]")
@click.option("--flaky", type=click.FloatRange(0, 1), default=None,
              help="calibrated: share of cells that flip with a probability U(0, 1) per read "
                   "[default: 0.1]")
@click.option("--two-way", type=click.FloatRange(0, 1), default=None,
              help="calibrated: share of cells that flip both ways  [default: 0.02]")
@click.option("--to-one", type=click.FloatRange(0, 1), default=None,
              help="Fraction of failing cells that read 1 (p01 vs p10 asymmetry)  "
                   "[default: calibrated 0.8, legacy 0.3]")
@click.option("--voltages", default=None,
              help="Comma-separated, decreasing (default: calibrated 1.0..0.75 in 0.1 % BER "
                   "steps, legacy 1.0..0.8 by 0.02).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def profile_synth(out, generator, rows, cols, arrays, v_mean, v_sd, row_sd, col_sd, col_share,
                  row_share, flaky, two_way, to_one, voltages, seed) -> None:
    """Write a synthetic chip profile (see bnn_tol.profile.calibrated_profile and
    synthetic_profile)."""
    from bnn_tol.faults import chip as prof

    if Path(out).exists():
        raise click.UsageError(f"{out} exists; choose another --out")
    if not Path(out).parent.is_dir():
        raise click.UsageError(f"cannot write {out}: the directory {Path(out).parent} does not "
                               "exist")
    legacy = {"v_mean": v_mean, "v_sd": v_sd, "row_sd": row_sd, "col_sd": col_sd}
    calibrated = {"col_share": col_share, "row_share": row_share, "flaky": flaky,
                  "two_way": two_way}
    other = legacy if generator == "calibrated" else calibrated
    given = [f"--{k.replace('_', '-')}" for k, v in other.items() if v is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} only with --generator "
                               f"{'legacy' if generator == 'calibrated' else 'calibrated'}")
    own = {k: v for k, v in (calibrated if generator == "calibrated" else legacy).items()
           if v is not None}
    if to_one is not None:
        own["to_one"] = to_one
    make = prof.calibrated_profile if generator == "calibrated" else prof.synthetic_profile
    chip = make(rows=rows, cols=cols, n_arrays=arrays, seed=seed,
                voltages=_parse_list(voltages, "--voltages", float), **own)
    prof.save_profile(chip, out)
    rate = chip.cell_error_rate()
    click.echo(rate.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    click.echo(f"wrote {out}")


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:  # also refuses NaN
        raise click.BadParameter(f"the confidence level must be in (0, 1), got {level}",
                                 param_hint="'--level'")
    return level


if "plot" not in main.commands:  # the `plot` group: others add sub-commands to it

    @main.group()
    def plot() -> None:
        """Figures from result tables (PNG/PDF/SVG by the --out suffix)."""


_OVERWRITE_FIGURE = ("Replace an existing --out that is not a figure bnn_tol wrote (never the "
                     "table it reads).")


@main.commands["plot"].command("sweep")
@click.argument("csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Image file (png, pdf, svg).")
@click.option("--metric", type=click.Choice(["accuracy", "rerr"]), default="accuracy",
              show_default=True, help="Plot accuracy or robust error.")
@click.option("--level", type=float, default=0.95, show_default=True,
              callback=lambda ctx, param, v: _check_level(v),
              help="Confidence level of the band over fault maps, in (0, 1).")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_FIGURE)
def plot_sweep(csv, out, metric, level, overwrite) -> None:
    """Accuracy vs BER from a sweep table (a sweep CSV, or a study's sweeps.csv): mean and
    confidence band per model (a study: per model and training BER)."""
    from bnn_tol import engines
    from bnn_tol.study import plots as plots

    plots.check_out(out, inputs=[csv], overwrite=overwrite)
    fig = plots.sweep(engines.load_sweep(csv), level=level, metric=metric)
    plots.save(fig, out, inputs=[csv], overwrite=overwrite, dpi=150)
    click.echo(f"wrote {out}")


@main.command("import")
@click.argument("onnx_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Checkpoint directory to write (then sweep/metrics/study as usual).")
@click.option("--in-shape", default=None,
              help="C,H,W when the graph input is flat or its dims are symbolic.")
@click.option("--normalize", default=None, metavar="MEAN,STD",
              help="The graph input's convention, ToTensor then Normalize(MEAN, STD) (0,1 for "
                   "[0, 1] inputs, 0.5,0.5 for 2x-1; per channel M1/M2/M3,S1/S2/S3); lets "
                   "graphs with an input transform, an input quantizer, a TensorNorm (Brevitas' "
                   "QONNX export) or shortcut additions (residual BNNs) import via adapt.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")
def import_cmd(onnx_file, out, in_shape, normalize, overwrite) -> None:
    """Import a BNN from ONNX (Gemm/MatMul/Conv +-1 weights, BatchNorm, sign; needs the
    [onnx] extra) and save it as a bnn_tol checkpoint. Reads bnn_tol's own --onnx exports (as
    the exported model), torch.onnx.export graphs of a plain BNN (both exporters) and QONNX
    BipolarQuant graphs.

    The graph is checked (data flow, every attribute, shapes) and, with onnxruntime installed,
    verified against it before anything is written; a graph that cannot be imported exactly
    ends in one line and a non-zero exit."""
    shape = _parse_ints(in_shape, "--in-shape")
    from bnn_tol.data import Normalize
    from bnn_tol.interop import checkpoint
    from bnn_tol.interop import onnx as onnx_io

    transform = None
    if normalize is not None:
        parts = normalize.split(",")
        if len(parts) != 2:
            raise click.BadParameter(f"expected MEAN,STD (per channel M1/M2/M3,S1/S2/S3), got "
                                     f"{normalize!r}", param_hint="--normalize")
        mean, std = (_parse_floats(p.replace("/", ","), "--normalize") for p in parts)
        transform = Normalize(mean[0] if len(mean) == 1 else mean,
                              std[0] if len(std) == 1 else std)
    checkpoint.check_out(out, overwrite=overwrite)
    model = onnx_io.import_onnx(onnx_file, in_shape=shape, transform=transform)
    if "verified_with" not in model.meta:
        click.echo("warning: onnxruntime is not installed: the graph was checked but not "
                   "verified (pip install 'bnn_tol[onnx]')", err=True)
    checkpoint.save(model, out)
    size = {"blocks": len(model.blocks)} if hasattr(model, "blocks") else \
        {"nodes": len(model.nodes)}  # a residual BNN (bnn_tol.core.graph)
    click.echo(json.dumps({"out": str(out), **size, "in_shape": list(model.in_shape),
                           "verified_with": model.meta.get("verified_with")}))


@main.command("export")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Bundle directory (new or empty): packed weights, integer thresholds, "
                   "manifest.json, bnn_deploy.py. Written as a unit: a failed export leaves "
                   "the previous bundle or nothing.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier export in --out (only a directory holding nothing but "
                   "a bundle) and an ONNX file written by bnn_tol at --onnx.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None,
              help="Also write an ONNX graph with the same predictions (needs [onnx]); never "
                   "into --out, over RUN's files, or over a file that is not our ONNX.")
def export_cmd(run, out, overwrite, onnx_path) -> None:
    """Export checkpoint RUN bit-exactly for hardware: packed bits + integer thresholds."""
    from bnn_tol import files
    from bnn_tol.interop import bundle as bundle
    from bnn_tol.interop import checkpoint

    if onnx_path:  # refused before anything is written
        reads = [Path(run) / checkpoint.CONFIG, Path(run) / checkpoint.WEIGHTS]
        bundle.check_onnx_out(onnx_path, out=out, reads=reads, overwrite=overwrite)
    model = checkpoint.load(run)
    path = bundle.export(model, out, overwrite=overwrite)
    if onnx_path:
        from bnn_tol.interop.onnx import export_onnx

        try:
            Path(onnx_path).parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write(onnx_path, lambda tmp: export_onnx(model, tmp),
                               inputs=reads, replace=overwrite)
        except OSError as e:
            raise bundle.ExportError(f"writing --onnx {onnx_path} failed ({e.strerror or e}); "
                                     f"the bundle {path} is complete") from e
    man = json.loads((Path(path) / bundle.MANIFEST).read_text())
    stored = man.get("layers") or [n for n in man["nodes"] if n["op"] == "binary"]
    click.echo(json.dumps({"out": str(path), "layers": len(stored),
                           "memory_bits": man["memory_bits"]}))


@main.commands["plot"].command("energy")
@click.argument("csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Image file (png, pdf, svg).")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_FIGURE)
def plot_energy(csv, out, overwrite) -> None:
    """Accuracy vs voltage and vs energy saving from a `sweep --profile` CSV."""
    import pandas as pd

    from bnn_tol.study import plots as plots

    plots.check_out(out, inputs=[csv], overwrite=overwrite)
    try:
        df = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{csv} is not a profile sweep CSV ({type(e).__name__})") from None
    plots.save(plots.energy(df), out, inputs=[csv], overwrite=overwrite, dpi=150)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("study_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--preset", default=None,
              help="A study shipped with bnn_tol instead of STUDY_FILE: tiny, quick or fmnist.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Results directory (models/<task>/ checkpoints, models.csv, sweeps.csv, "
                   "metrics.csv, report.html). Finished tasks found there are skipped.")
@click.option("--scheduler", default=None,
              help="dask.distributed scheduler address (tcp://host:8786) to run the tasks on; "
                   "default: one after the other in this process. Same results either way.")
@click.option("--epochs", type=int, default=None, help="Override [train] epochs.")
@click.option("--train-subset", type=int, default=None,
              help="Override [data] train_subset (training images per network).")
@click.option("--test-subset", type=int, default=None, help="Override [data] test_subset.")
@click.option("--seeds", default=None, help="Override [train] seeds, e.g. 0,1,2.")
@click.option("--train-bers", default=None, help="Override [train] bers, e.g. 0,0.05,0.1.")
@click.option("--eval-bers", default=None, help="Override [eval] bers, e.g. 0,0.01,0.05.")
@click.option("--maps", "n_maps", type=int, default=None, help="Override [eval] n_maps.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Override [run] device.")
@click.option("--threads", default=None,
              help="Override [run] threads: torch threads per task, or 'auto' (cores // "
                   "workers). Results depend on it.")
@click.option("--report/--no-report", "make_report", default=True, show_default=True,
              help="Write report.html into --out at the end.")
@click.option("--workers", type=int, default=None,
              help="Override [run] workers: > 1 runs the tasks on a local Dask cluster of that "
                   "many single-thread processes.")
@click.option("--fresh", is_flag=True,
              help="Refuse an --out that is not empty (no cached task is reused: every number "
                   "comes from the code at hand). `make results` uses it.")
def study(study_file, preset, out, scheduler, epochs, train_subset, test_subset, seeds,
          train_bers, eval_bers, n_maps, device, threads, make_report, workers, fresh) -> None:
    """Train the model family, sweep it under bit errors, measure margins and importance.

    Writes environment.json (versions, commit, CPU, threads) and the command that
    reproduces the run."""

    from bnn_tol.exceptions import BnnTolError
    from bnn_tol.study import report as report_mod
    from bnn_tol.study import runner as study_mod

    if (study_file is None) == (preset is None):
        raise click.UsageError("give a STUDY_FILE (TOML) or --preset NAME "
                               f"({', '.join(study_mod.presets())}), not both")
    if threads is not None and threads != "auto":
        threads = _parse_ints(threads, "--threads")[0]
    params = click.get_current_context().params
    argv = ["bnn-tol", "study", *([study_file] if study_file else ["--preset", preset]),
            "--out", str(out)]
    for key, val in params.items():
        if key not in ("study_file", "preset", "out", "make_report", "fresh") and val is not None:
            argv += [f"--{key.replace('_', '-')}" if key != "n_maps" else "--maps", str(val)]
    argv += [*([] if make_report else ["--no-report"]), *(["--fresh"] if fresh else [])]
    sections: dict = {"data": {"train_subset": train_subset, "test_subset": test_subset},
                      "train": {"epochs": epochs, "seeds": _parse_ints(seeds, "--seeds"),
                                "bers": _parse_floats(train_bers, "--train-bers")},
                      "eval": {"bers": _parse_floats(eval_bers, "--eval-bers"),
                               "n_maps": n_maps},
                      "run": {"device": device, "threads": threads, "workers": workers}}
    overrides = {s: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                     if v is not None} for s, d in sections.items()}
    try:
        res = study_mod.run(study_file or preset, out, scheduler=scheduler,
                            overrides=overrides, echo=click.echo, fresh=fresh,
                            command=shlex.join(argv))
    except ValueError as e:
        if isinstance(e, BnnTolError):  # one line, exit 1 (2 for bad arguments)
            raise
        raise click.UsageError(str(e)) from e
    if make_report and Path(res["models"]).stat().st_size > 0 and not res["failed"]:
        path = report_mod.write(out, Path(out) / "report.html", echo=click.echo)
        click.echo(f"[study] report: {path}")
    if res["failed"]:
        sys.exit(1)


def _parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    return _parse_list(text, what, float)


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write (default RESULTS/report.html).")
@click.option("--n-boot", type=click.IntRange(min=1, max=100_000), default=1000,
              show_default=True, help="Bootstrap resamples of the correlation intervals.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Bootstrap seed.")
@click.option("--overwrite", is_flag=True,
              help="Replace files where the report writes that it did not write (never the "
                   "tables it reads).")
def report(results, out, n_boot, seed, overwrite) -> None:
    """Write the HTML report (figures, tables, summary) of a study results directory."""
    from bnn_tol.study import report as report_mod

    try:
        path = report_mod.write(results, out, n_boot=n_boot, seed=seed, echo=click.echo,
                                overwrite=overwrite)
    except FileNotFoundError as e:  # not a study results directory (says what to run)
        raise click.ClickException(str(e)) from e
    click.echo(str(path))


#: How the tables of `metrics` begin (an existing file is replaced only if it is one of them).
_METRICS_TABLE = "model,layer,layer_index,kind,neuron,"
_METRICS_SUMMARY = "model,layer,layer_index,kind,fan_in,n_neurons,"


@main.command("metrics")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--dataset", default="fashion-mnist", show_default=True, help="Dataset name.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Directory searched first for the dataset files.")
@click.option("--split", default="test", show_default=True, help="Dataset split to measure on.")
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Use only the first N samples.")
@click.option("--estimator", "estimators", multiple=True, default=("accuracy",),
              show_default=True, type=RegistryChoice(_estimator_names),
              help="Importance estimator (repeatable).")
@click.option("--no-importance", is_flag=True, help="Margins only.")
@click.option("--flip-ber", type=float, default=None,
              help="Also add the analytic flip probability at this BER (column flip_prob).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per pass.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="CSV: one row per (model, layer, neuron) with margins and importances.")
@click.option("--summary", "summary_out", type=click.Path(dir_okay=False), default=None,
              help="CSV of the per-layer / network summaries (margin and importance variance).")
@click.option("--overwrite", is_flag=True,
              help="Replace existing --out / --summary files that `metrics` did not write "
                   "(never the checkpoints read).")
def metrics_cmd(runs, dataset, data_dir, split, subset, estimators, no_importance, flip_ber,
                batch_size, out, summary_out, overwrite) -> None:
    """Neuron-level margin and importance of trained checkpoints (RUNS: checkpoint dirs)."""
    import pandas as pd

    from bnn_tol import data, files, schema
    from bnn_tol import metrics as mt
    from bnn_tol.core import models as models
    from bnn_tol.interop import checkpoint

    labels = [Path(r).name for r in runs]
    dup = sorted({v for v in labels if labels.count(v) > 1})
    if dup:
        raise click.BadParameter(f"two checkpoints have the same directory name {dup[0]!r}: "
                                 "rows are labelled by it", param_hint="RUNS")
    outputs = {"--out": (out, _METRICS_TABLE), "--summary": (summary_out, _METRICS_SUMMARY)}
    if summary_out and files.input_of(summary_out, [out]):
        raise InvalidArgument(f"--out and --summary name the same file {out}")
    for option, (path, header) in outputs.items():
        if path:
            files.check_output(path, inputs=[*runs, data_dir], option=option,
                               replace=True if overwrite else files.starts_with(header))
    ds = data.load(dataset, split, data_dir=data_dir)
    if subset is not None:
        ds = ds.subset(subset)
    loaded = {label: checkpoint.load(run) for label, run in zip(labels, runs, strict=True)}
    for label, model in loaded.items():
        try:
            models.check_data(model, ds)
        except InvalidArgument as e:
            raise InvalidArgument(f"{label}: {e}") from e
    tables, summaries = [], []
    for label, model in loaded.items():
        m = mt.margin(model, ds, batch_size=batch_size)
        summ = [mt.margin_summary(m).assign(metric_group="margin")]
        if not no_importance:
            imp = mt.importance(model, ds, estimator=list(estimators), batch_size=batch_size)
            wide = imp.pivot_table(index=["layer_index", "neuron"], columns="estimator",
                                   values="importance")
            wide.columns = [f"importance_{c}" for c in wide.columns]
            m = m.join(wide, on=["layer_index", "neuron"])
            summ.append(mt.importance_variance(imp).assign(metric_group="importance"))
        if flip_ber is not None:
            fp = mt.flip_probability(model, ds, ber=flip_ber, batch_size=batch_size)
            m = m.join(fp.set_index(["layer_index", "neuron"])["flip_prob"],
                       on=["layer_index", "neuron"])
        tables.append(m.assign(model=label))
        summaries += [s.assign(model=label) for s in summ]
    table = pd.concat(tables, ignore_index=True)
    table = table[["model", *[c for c in table.columns if c != "model"]]]
    schema.validate(table, "margin", what=f"the table for {out}")
    summ = pd.concat(summaries, ignore_index=True)
    summ = summ[["model", *[c for c in summ.columns if c != "model"]]]
    for option, (path, header) in outputs.items():
        if path:
            frame = table if option == "--out" else summ
            files.atomic_write(path, lambda p, frame=frame: frame.to_csv(p, index=False),
                               inputs=[*runs, data_dir],
                               replace=True if overwrite else files.starts_with(header))
    net = summ[summ["layer"] == "network"]
    cols = [c for c in ("model", "metric_group", "estimator", "mean_margin_norm",
                        "mean_margin_half", "variance", "cv") if c in net.columns]
    click.echo(net[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    click.echo(f"wrote {len(table)} rows to {out}")


@main.commands["plot"].command("margins")
@click.argument("csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Image file (png, pdf, svg).")
@click.option("--value", default="mean_margin_norm", show_default=True,
              help="Per-neuron column to histogram (e.g. mean_margin_half, importance_accuracy).")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_FIGURE)
def plot_margins(csv, out, value, overwrite) -> None:
    """Per-layer histograms of a per-neuron margin column, models overlaid (from `metrics`)."""
    import pandas as pd

    from bnn_tol import schema
    from bnn_tol.study import plots as plots

    plots.check_out(out, inputs=[csv], overwrite=overwrite)
    try:
        table = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{csv} is not a CSV table ({e})") from e
    missing = [c for c in (value, "layer") if c not in table.columns]
    if missing:
        raise InvalidArgument(f"{csv} is not a per-neuron table of `bnn-tol metrics`: no column "
                              f"{', '.join(map(repr, missing))} (it has "
                              f"{', '.join(map(str, table.columns[:8]))})")
    # a margin table of `metrics` or a study's margins.csv (older ones upgraded), checked
    table = schema.conform(table, "study.margins" if "model_id" in table else "margin",
                           what=str(csv), require=("layer", value))
    fig = plots.margins(table, value=value)
    plots.save(fig, out, inputs=[csv], overwrite=overwrite, dpi=150)
    click.echo(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _parse_fractions(text: str) -> tuple[float, ...]:
    """``"0,0.05,0.1"`` or ``"start:stop:step"`` (inclusive of stop) -> fractions in [0, 1]."""
    if ":" in text:
        parts = _parse_list(text.replace(":", ","), "--fractions", float)
        if parts is None or len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
            raise click.BadParameter(f"--fractions {text!r}: give start:stop:step with "
                                     "step > 0 and stop >= start")
        n = int(round((parts[1] - parts[0]) / parts[2])) + 1
        if n > 1000:
            raise click.BadParameter(f"--fractions {text!r} gives {n} points (at most 1000)")
        vals = tuple(round(parts[0] + i * parts[2], 12) for i in range(n))
    else:
        vals = _parse_list(text, "--fractions", float) or ()
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise click.BadParameter(f"--fractions {text!r}: fractions lie in [0, 1]")
    return vals


@main.command("protect")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--rank", default="importance,margin,random", show_default=True,
              help="Comma-separated rankings: importance[:estimator], margin, flip_probability, "
                   "magnitude, gradient, random (expanded to --random-seeds seeds).")
@click.option("--fractions", default="0,0.01,0.02,0.05,0.1,0.2", show_default=True,
              help="Protected fractions of the stored bits: a list or start:stop:step.")
@click.option("--bers", default="0.05,0.1,0.2", show_default=True,
              help="BERs: START:STOP:STEP, a list p1,p2,... or p01/p10 pairs.")
@click.option("--maps", "n_maps", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Fault maps (chips) per BER.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the chips (the sweep's seed).")
@click.option("--unit", type=click.Choice(["neuron", "weight"]), default="neuron",
              show_default=True, help="Unit of protection.")
@click.option("--random-seeds", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Seeds of the random baseline (its band).")
@click.option("--dataset", default=None,
              help="Dataset (default: the one the checkpoint was trained on).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Directory searched first for the dataset files.")
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N test images.")
@click.option("--rank-subset", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Rank on N images of the training split (held out from the evaluation).")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="CSV of the protection curves (one row per ranking, fraction, BER, map).")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Also draw the curves (png, pdf, svg).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out / --plot.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def protect(run, rank, fractions, bers, n_maps, seed, unit, random_seeds, dataset, data_dir,
            subset, rank_subset, out, plot_out, overwrite, quiet) -> None:
    """Protection curves of checkpoint RUN: accuracy under bit errors when the units ranked
    first by each metric sit in reliable memory, against random protection of the same
    memory; prints each ranking's area gain over random with its interval."""
    from bnn_tol import data
    from bnn_tol.files import atomic_write, check_output, starts_with
    from bnn_tol.interop import checkpoint
    from bnn_tol.study import plots
    from bnn_tol.study import protection as prot

    fracs = _parse_fractions(fractions)
    ber_list = _parse_bers(bers)
    ranks = []
    for r in (x.strip() for x in rank.split(",") if x.strip()):
        ranks += [f"random:{s}" for s in range(random_seeds)] if r == "random" else [r]
    # our own earlier curve (its header) is rewritten; anything else only with --overwrite
    ours = True if overwrite else starts_with("model,ranking,unit,fraction,")
    check_output(out, inputs=[run], replace=ours)
    if plot_out:
        plots.check_out(plot_out, inputs=[run], overwrite=overwrite)
    model = checkpoint.load(run)
    name = dataset or model.meta.get("training", {}).get("dataset", "fashion-mnist")
    test = data.load(name, "test", data_dir=data_dir)
    if subset is not None:
        test = test.subset(subset)
    train_ds = data.load(name, "train", data_dir=data_dir)
    rank_ds = train_ds.subset(min(rank_subset, len(train_ds)), seed=0)
    curve = prot.protection(model, test, rank=ranks, fractions=fracs, bers=ber_list,
                            n_maps=n_maps, seed=seed, unit=unit, rank_data=rank_ds,
                            label=Path(run).name, progress=not quiet)
    atomic_write(out, lambda p: curve.to_csv(p, index=False, float_format="%.17g"),
                 inputs=[run], replace=ours)
    auc = prot.protection_auc(curve)
    cols = ["ber", "ranking", "gain", "gain_low", "gain_high", "better_than_baseline"]
    click.echo(auc[cols].to_string(index=False, formatters={
        "ber": "{:g}".format, **{c: "{:+.4f}".format for c in cols[2:5]}}))
    if plot_out:
        plots.save(plots.protection(curve), plot_out, inputs=[run], overwrite=overwrite, dpi=150)
    click.echo(f"wrote {len(curve)} rows to {out}")
