"""The ``bnn-tol`` command. It only parses arguments and calls the library.

Sub-commands: ``train``, ``sweep``, ``metrics``, ``plot ...``, ``study``, ``report``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

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


def _parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from e


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bnn_tol")
def main() -> None:
    """Bit error tolerance of binarized neural networks: train, inject, sweep, measure."""


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
@click.option("--epochs", type=int, default=10, show_default=True, help="Training epochs.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Mini-batch size.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--lr-step", type=int, default=None,
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
@click.option("--flip-warmup", type=int, default=0, show_default=True,
              help="Epochs of linear BER warm-up.")
@click.option("--train-subset", type=int, default=None,
              help="Use only the first N training samples (quick runs).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of initialization, shuffling and flips.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to train.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Checkpoint directory (model.safetensors + config.json), updated every epoch.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(model_name, hidden, fc_width, dataset, data_dir, epochs, batch_size, lr, lr_step, loss,
          mhl_margin, flip_ber, flip_layers, flip_warmup, train_subset, seed, device, out,
          quiet) -> None:
    """Train a BNN normally or with bit flip training, and save a checkpoint."""
    from . import data, io, models
    from . import train as train_mod

    tr = data.load(dataset, "train", data_dir=data_dir)
    te = data.load(dataset, "test", data_dir=data_dir)
    if train_subset:
        tr = tr.subset(train_subset)
    kwargs: dict = {"in_shape": tr.shape, "n_classes": len(tr.classes)}
    if hidden:
        kwargs["hidden"] = _parse_ints(hidden, "--hidden")
    if fc_width:
        kwargs["fc_width"] = fc_width
    model = models.build(model_name, seed=seed, **kwargs)
    layers = None
    if flip_layers and flip_layers not in ("all", "hidden"):
        layers = [int(v) if v.lstrip("-").isdigit() else v for v in flip_layers.split(",")]
    elif flip_layers:
        layers = flip_layers
    hist = train_mod.fit(model, tr, te, epochs=epochs, batch_size=batch_size, lr=lr,
                         lr_step=lr_step, loss=loss, mhl_margin=mhl_margin,
                         flip_ber=_parse_ber(flip_ber), flip_layers=layers,
                         flip_warmup=flip_warmup, seed=seed, device=device, out=out,
                         progress=not quiet)
    io.save(model, out)
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
@click.option("--epochs", type=int, default=2, show_default=True, help="Training epochs per model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything random.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to compute.")
def demo(out, dataset, data_dir, epochs, seed, device) -> None:
    """The end-to-end demo of `make demo`: train normal + flip-trained BNNs and evaluate them."""
    from . import demo as demo_mod

    demo_mod.run(out, dataset=dataset, data_dir=data_dir, epochs=epochs, seed=seed,
                 device=device, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
