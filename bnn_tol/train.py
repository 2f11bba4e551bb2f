"""Normal and bit flip training (BFT) of BNNs.

The anchor recipe: Adam (lr 1e-3), batch 256, StepLR (gamma 0.5), hardtanh STE, cross-entropy
or the modified hinge loss. Bit flip training binarizes the latent weights on every forward
pass, flips them with a fresh transient map at the training BER (``p`` or ``(p01, p10)``), and
backpropagates straight through the flips (:class:`bnn_tol.errors.TransientFlip`).

Adversarial bit error training (``adversarial_bits=N``) also minimizes the loss on the weights
with the ``N`` stored bits flipped that a one-shot gradient attack picks
(:func:`bnn_tol.faults.attack.one_shot`).

Latent weights are clipped to ``[-1, 1]`` after every step (the STE is zero outside).
Same seed, same device -> identical weights, bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bnn_tol import faults
from bnn_tol.core import models
from bnn_tol.core.codec import share_ranges
from bnn_tol.core.inference import accuracy, resolve_device
from bnn_tol.data import BNNDataset, grid_of
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults.apply import attach
from bnn_tol.faults.attack import one_shot
from bnn_tol.faults.seeds import spawn
from bnn_tol.interop.checkpoint import check_out, save

__all__ = ["fit", "RANDBET_PAPER", "OPTIMIZERS", "build", "check_fits", "check_memory",
           "training_bytes", "modified_hinge_loss",
           "LOSSES", "MAX_EPOCHS", "MAX_THREADS", "MAX_SEED"]

#: Most epochs and torch threads :func:`fit` takes (beyond them a count is a typo, not a recipe).
MAX_EPOCHS = 100_000
MAX_THREADS = 1024
#: Largest seed (torch generators take 64-bit signed seeds).
MAX_SEED = (1 << 63) - 1


def training_bytes(model: nn.Module) -> int:
    """Bytes that training ``model`` holds for its parameters at least: the float32 weights,
    their gradients and Adam's two moments (``16 * n_parameters``), plus the buffers."""
    params = sum(p.numel() for p in model.parameters())
    return 16 * params + sum(b.numel() * b.element_size() for b in model.buffers())


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 1 << 62


def check_memory(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model whose training state (:func:`training_bytes`) exceeds this machine's
    physical memory (a model built on the ``meta`` device costs nothing to check).

    Raises:
        InvalidArgument: naming the parameter count, the memory needed and the memory there is.
    """
    need, have = training_bytes(model), _physical_memory()
    if need > have:
        n = sum(p.numel() for p in model.parameters())
        raise InvalidArgument(f"{what} has {n:.3g} parameters: training it needs at least "
                              f"{need / 2**30:.3g} GiB of memory, this machine has "
                              f"{have / 2**30:.3g} GiB; choose smaller widths")


def check_fits(name: str, *, seed: int = 0, **kwargs: Any) -> None:
    """Check the arguments of :func:`bnn_tol.models.build` and that the model can be trained
    in this machine's memory (:func:`check_memory`), on the ``meta`` device: nothing is
    allocated.

    Raises:
        InvalidArgument: as :func:`bnn_tol.models.build`, a seed outside [0, 2^63), or a model
            too large to train here.
    """
    seed = require_int(seed, "seed", minimum=0)
    if seed > MAX_SEED:
        raise InvalidArgument(f"seed must be < 2^63, got {seed}")
    with torch.device("meta"):
        skeleton = models.build(name, seed=seed, **kwargs)
    check_memory(skeleton, f"{name} {kwargs.get('hidden', kwargs.get('fc_width', ''))}".strip())


def build(name: str, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """:func:`bnn_tol.models.build` after :func:`check_fits` (a model too large for this
    machine is refused before anything is allocated)."""
    check_fits(name, seed=seed, **kwargs)
    return models.build(name, seed=seed, **kwargs)


def modified_hinge_loss(scores: Tensor, target: Tensor, b: float = 1.0) -> Tensor:
    """Modified hinge loss with margin ``b`` (squared hinge of BNN work, margin ``b``).

    With ``t_nc = +1`` for the true class and ``-1`` otherwise::

        L = mean_n sum_c max(0, b - t_nc z_nc)^2 / C

    Args:
        scores: ``(N, C)`` class scores; target: ``(N,)`` int64; b: the margin.
    """
    t = 2.0 * F.one_hot(target, scores.shape[1]).to(scores.dtype) - 1.0
    return torch.clamp(b - t * scores, min=0).pow(2).mean()


LOSSES = {"ce": "cross-entropy", "mhl": "modified hinge loss"}


def _loss_fn(loss: str, b: float):
    if loss == "ce":
        return F.cross_entropy
    if loss == "mhl":
        return lambda z, y: modified_hinge_loss(z, y, b)
    raise InvalidArgument(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def _perturbed_loss(model: nn.Module, rb_layers: dict, rb_faults: dict, loss_fn, x: Tensor,
                    y: Tensor) -> Tensor:
    """RandBET's second term: the loss under a fresh random stored-bit error pattern (any
    flip-training fault on the same layers is replaced for this pass and restored after)."""
    with attach(rb_layers, rb_faults):
        return loss_fn(model(x), y)


def _randbet_step(model: nn.Module, params: list, rb_layers: dict, rb_faults: dict, loss_fn,
                  x: Tensor, y: Tensor, clean: Tensor, o: _Options) -> Tensor:
    """Gradients of one RandBET step into ``p.grad``; returns ``(L_clean + L_err) / 2``.

    Unclipped: the gradient of ``(L_clean + L_err) / 2`` (one backward pass). With
    ``o.randbet_grad_clip = c``: ``g = (g_clean + clip(g_err, -c, c)) / 2`` (two passes). The
    perturbed forward leaves the BatchNorm statistics alone with ``o.randbet_bn == "clean"``."""
    c = o.randbet_grad_clip
    if c is None:
        with _bn_frozen(model, o.randbet_bn == "clean"):  # restored after the backward pass,
            err = _perturbed_loss(model, rb_layers, rb_faults, loss_fn, x, y)  # which saved
            total = 0.5 * (clean + err)  # the running statistics it was given
            total.backward()
        return total
    clean.backward()
    g_clean = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with _bn_frozen(model, o.randbet_bn == "clean"):
        err = _perturbed_loss(model, rb_layers, rb_faults, loss_fn, x, y)
        err.backward()
    with torch.no_grad():
        for p, gc in zip(params, g_clean, strict=True):
            ge = torch.zeros_like(p) if p.grad is None else p.grad.clamp(-c, c)
            p.grad = 0.5 * ((torch.zeros_like(p) if gc is None else gc) + ge)
    return 0.5 * (clean.detach() + err.detach())


def _adversarial_loss(model: nn.Module, adv_layers: dict, n_bits: int, loss_fn, x: Tensor,
                      y: Tensor, clean: Tensor, rb_layers: dict, rb_faults: dict) -> Tensor:
    """Adversarial bit error training's loss: the mean of ``clean``, the RandBET loss (when on)
    and the loss on the weights attacked by :func:`~bnn_tol.faults.attack.one_shot` from the
    gradient of ``clean`` (the graph of ``clean`` is kept for the step's backward pass)."""
    weights = [layer.weight for layer in adv_layers.values()]
    grads = torch.autograd.grad(clean, weights, retain_graph=True, allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(w)).detach()
             for n, g, w in zip(adv_layers, grads, weights, strict=True)}
    flips = one_shot(model, grads, n_bits)
    attacked = {n: faults.FixedFlips(flips.get(n, torch.empty(0, dtype=torch.int64)))
                for n in adv_layers}
    with attach(adv_layers, attacked):
        terms = [clean, loss_fn(model(x), y)]
    if rb_layers:
        terms.insert(1, _perturbed_loss(model, rb_layers, rb_faults, loss_fn, x, y))
    return sum(terms[1:], terms[0]) / len(terms)


def _ber_at(epoch: int, target: tuple[float, float], warmup: int) -> tuple[float, float]:
    """Linear BER warm-up: ``p(epoch) = p * min(1, (epoch + 1) / (warmup + 1))``."""
    f = 1.0 if warmup <= 0 else min(1.0, (epoch + 1) / (warmup + 1))
    return target[0] * f, target[1] * f


def fit(
    model: nn.Module,
    train: BNNDataset,
    test: BNNDataset | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    lr_step: int | None = None,
    lr_gamma: float = 0.5,
    loss: str = "ce",
    mhl_margin: float = 1.0,
    flip_ber: faults.BER | None = None,
    flip_layers: Sequence[str | int] | str | None = None,
    flip_warmup: int = 0,
    clip: float | None = None,
    clip_params: str = "weights",
    randbet_ber: faults.BER | None = None,
    randbet_layers: Sequence[str | int] | str | None = None,
    randbet_start_loss: float | None = None,
    randbet_grad_clip: float | None = None,
    randbet_bn: str = "both",
    randbet_fixed: bool = False,
    label_smoothing: float = 0.0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    adversarial_bits: int | None = None,
    adversarial_layers: Sequence[str | int] | str | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> pd.DataFrame:
    """Train ``model`` in place; optionally with bit flip training.

    Args:
        model: a :class:`~bnn_tol.models.BNN` (or any module of binary layers).
        train, test: datasets; ``test`` is evaluated after every epoch when given.
        epochs, batch_size, lr: Adam recipe.
        lr_step: StepLR period in epochs (default ``max(1, epochs // 4)``);
            ``lr_gamma``: its factor (0.5).
        loss: ``"ce"`` (cross-entropy) or ``"mhl"`` (modified hinge loss, margin ``mhl_margin``).
        flip_ber: training BER ``p`` or ``(p01, p10)``; ``None``/0 = normal training.
        flip_layers: layers with flips (see :func:`bnn_tol.errors.select_layers`); default all.
        flip_warmup: epochs of linear BER warm-up (0 = full BER from the start).
        clip: weight clipping ``w_max`` (Stutz et al.): latent weights are clamped to
            ``[-w_max, w_max]`` after every step (default: ``[-1, 1]`` for sign-coded layers,
            no clamp for fixed-point ones). Every layer of the library's models is followed
            by BatchNorm, which rescales the pre-activations, so clipping does not limit a
            layer's scale (the role of the paper's reparameterized normalization).
        randbet_ber: random bit error training (RandBET, Stutz et al.): every step minimizes
            ``(L(z_clean) + L(z_err)) / 2`` where ``z_err`` is computed with a fresh random
            pattern of stored-bit errors at this rate (``p`` or ``(p01, p10)``) over every
            stored bit (``numel * m``; a :class:`~bnn_tol.errors.TransientFlip`), gradients
            passing straight through the flips. ``None``/0 = off.
        randbet_layers: layers with RandBET errors (default all).
        clip_params: ``"weights"`` (the binary/quantized layers' latent weights) or ``"all"``
            (every parameter, BatchNorm scales and shifts included, as Stutz et al. clip);
            ``"all"`` needs ``clip``.
        randbet_start_loss: RandBET starts once a batch's clean loss is below this (the
            paper: 1.75); ``None`` from the first step. The step it started at is recorded
            as ``model.meta["training"]["randbet_started"]`` (``[epoch, batch]``).
        randbet_grad_clip: clip the perturbed pass's gradient elementwise to ``[-c, c]``
            before averaging, ``g = (g_clean + clip(g_err, c)) / 2`` (the paper: 0.05);
            ``None``: the gradient of ``(L(z_clean) + L(z_err)) / 2`` unclipped.
        randbet_bn: ``"both"`` (the perturbed forward pass updates the BatchNorm running
            statistics too) or ``"clean"`` (they come from the clean pass only: the paper).
            :data:`RANDBET_PAPER` holds the paper's three settings.
        randbet_fixed: the fixed-pattern control of Stutz et al.: RandBET's errors come from
            one persistent fault map (the chip ``faults.draw_maps(model, s, p)`` with ``s``
            RandBET's child seed) at every step instead of a fresh pattern per step.
        label_smoothing: cross-entropy label smoothing ``eps`` (``loss="ce"``; the paper's
            control: targets ``(1 - eps) onehot + eps / C``).
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``; the paper: lr 0.05, momentum
            0.9, ``weight_decay`` 5e-4). ``weight_decay``: L2 penalty of either optimizer.
        adversarial_bits: adversarial bit error training with ``N`` bits: every step also
            computes the loss ``L_adv`` on weights attacked by a cheap one-shot attack
            (:func:`bnn_tol.faults.attack.one_shot`: the ``N`` stored bits of largest
            first-order loss increase ``g (decode(c XOR 2^b) - decode(c))`` from the batch's
            own clean gradient ``g``, that of the latent weights -- for fixed point exactly
            ``dL/dw`` of the deployed weight, for sign bits the STE's, equal to it inside the
            clip range), gradients passing straight through the flips, and minimizes the mean
            of the clean loss, the RandBET loss (when on) and ``L_adv``. Deterministic (no
            draw); the attacked pass updates BatchNorm's running statistics too, as RandBET's
            does. ``None``/0 = off.
        adversarial_layers: the attacked layers (default all).
        seed: seeds shuffling and flips (init is seeded by :func:`bnn_tol.models.build`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        out: checkpoint directory, written after every epoch (nothing lost on interruption).
            An existing checkpoint there is refused unless ``overwrite``; a non-empty directory
            that is not a checkpoint always (:func:`bnn_tol.io.check_out`).
        progress: show tqdm progress bars.
        threads: ``torch.set_num_threads`` while training (restored afterwards); ``None``
            keeps the current setting. The trained weights depend on the thread count, so the
            count used is recorded as ``model.meta["training"]["threads"]``.

    Returns:
        History, one row per epoch: ``epoch, lr, p01, p10, train_loss, train_acc, test_acc,
        seconds``. Also stored in ``model.meta["history"]`` with the recipe in
        ``model.meta["training"]``.

    Raises:
        InvalidArgument: naming the argument: non-integer or negative ``epochs``,
            ``flip_warmup``, ``seed``; ``batch_size``, ``lr_step``, ``threads`` < 1; ``epochs``,
            ``seed``, ``threads`` above :data:`MAX_EPOCHS`, :data:`MAX_SEED`,
            :data:`MAX_THREADS`; ``lr``, ``lr_gamma`` not finite and > 0; a BER outside
            [0, 1]; an empty training set; a model too large to train here
            (:func:`check_memory`).
    """
    epochs = require_int(epochs, "epochs", minimum=0)
    batch_size = require_int(batch_size, "batch_size", minimum=1)
    flip_warmup = require_int(flip_warmup, "flip_warmup", minimum=0)
    seed = require_int(seed, "seed", minimum=0)
    if lr_step is not None:
        lr_step = require_int(lr_step, "lr_step", minimum=1)
    if threads is not None:
        threads = require_int(threads, "threads", minimum=1)
    for label, v, top in (("epochs", epochs, MAX_EPOCHS), ("seed", seed, MAX_SEED),
                          ("threads", threads, MAX_THREADS)):
        if v is not None and v > top:
            raise InvalidArgument(f"{label} must be <= {top}, got {v}")
    check_memory(model)
    for label, v in (("lr", lr), ("lr_gamma", lr_gamma), ("mhl_margin", mhl_margin)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                or (v <= 0 and label != "mhl_margin"):
            raise InvalidArgument(f"{label} must be a finite number"
                                  f"{'' if label == 'mhl_margin' else ' > 0'}, got {v!r}")
    if flip_ber is not None:
        faults.rates(flip_ber)
    if randbet_ber is not None:
        faults.rates(randbet_ber)
    if adversarial_bits is not None:
        adversarial_bits = require_int(adversarial_bits, "adversarial_bits", minimum=0)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)
                             or not math.isfinite(clip) or clip <= 0):
        raise InvalidArgument(f"clip must be a finite number > 0 (w_max), got {clip!r}")
    _check_recipe_options(clip=clip, clip_params=clip_params, randbet_bn=randbet_bn,
                          optimizer=optimizer, randbet_start_loss=randbet_start_loss,
                          randbet_grad_clip=randbet_grad_clip, momentum=momentum,
                          weight_decay=weight_decay)
    if not isinstance(randbet_fixed, bool):
        raise InvalidArgument(f"randbet_fixed must be True or False, got {randbet_fixed!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float) or \
            not 0.0 <= label_smoothing < 1.0 or (label_smoothing and loss != "ce"):
        raise InvalidArgument(f"label_smoothing must be in [0, 1) with loss='ce', got "
                              f"{label_smoothing!r} (loss {loss!r})")
    _loss_fn(loss, mhl_margin)
    if len(train) == 0:
        raise InvalidArgument("the training set is empty")
    if out is not None:
        check_out(out, overwrite=overwrite)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(model, train, test, epochs=epochs, batch_size=batch_size, lr=lr,
                    lr_step=lr_step, lr_gamma=lr_gamma, loss=loss, mhl_margin=mhl_margin,
                    flip_ber=flip_ber, flip_layers=flip_layers, flip_warmup=flip_warmup,
                    clip=clip, randbet_ber=randbet_ber, randbet_layers=randbet_layers,
                    adversarial_bits=adversarial_bits or 0,
                    adversarial_layers=adversarial_layers, seed=seed, device=device, out=out,
                    progress=progress,
                    options=_Options(clip_params, randbet_start_loss, randbet_grad_clip,
                                     randbet_bn, optimizer, momentum, weight_decay,
                                     randbet_fixed, float(label_smoothing)))
    finally:
        torch.set_num_threads(old_threads)


#: RandBET as Stutz et al. (MLSys 2021) specify it: start once the clean loss is below 1.75,
#: clip the perturbed gradient at +-0.05 and average it with the clean one, BatchNorm statistics
#: from the clean pass only. Their recipe also trains with SGD (``optimizer="sgd"``, lr 0.05,
#: momentum 0.9, weight decay 5e-4) and clips every parameter (``clip_params="all"``).
RANDBET_PAPER = {"randbet_start_loss": 1.75, "randbet_grad_clip": 0.05, "randbet_bn": "clean"}

OPTIMIZERS = ("adam", "sgd")


class _Options(NamedTuple):
    """The recipe options beyond the original ones (defaults: the original behaviour)."""

    clip_params: str = "weights"
    randbet_start_loss: float | None = None
    randbet_grad_clip: float | None = None
    randbet_bn: str = "both"
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    randbet_fixed: bool = False
    label_smoothing: float = 0.0

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (recorded in the recipe)."""
        return {k: v for k, v in self._asdict().items() if v != _Options._field_defaults[k]}


def _check_recipe_options(*, clip, clip_params, randbet_bn, optimizer, randbet_start_loss,
                          randbet_grad_clip, momentum, weight_decay) -> None:
    for name, value, allowed in (("clip_params", clip_params, ("weights", "all")),
                                 ("randbet_bn", randbet_bn, ("both", "clean")),
                                 ("optimizer", optimizer, OPTIMIZERS)):
        if value not in allowed:
            raise InvalidArgument(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if clip_params == "all" and clip is None:
        raise InvalidArgument("clip_params='all' needs clip (w_max)")
    for name, v, lo in (("randbet_start_loss", randbet_start_loss, 0.0),
                        ("randbet_grad_clip", randbet_grad_clip, 0.0),
                        ("momentum", momentum, 0.0), ("weight_decay", weight_decay, 0.0)):
        if v is None and name.startswith("randbet"):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                or v < lo or (name.startswith("randbet") and v <= 0):
            raise InvalidArgument(f"{name} must be a finite number "
                                  f"{'> 0' if name.startswith('randbet') else '>= 0'}, got {v!r}")


@contextmanager
def _bn_frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """With ``frozen``, the BatchNorm running statistics are restored after the block (a
    forward pass in train mode still normalizes with the batch's statistics)."""
    if not frozen:
        yield
        return
    saved = [(m, {k: t.clone() for k, t in m.named_buffers(recurse=False)})
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, t in bufs.items():
                    getattr(m, k).copy_(t)


def _make_optimizer(model: nn.Module, lr: float, o: _Options) -> torch.optim.Optimizer:
    if o.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum,
                               weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=o.weight_decay)


def _clamp_bounds(layers: dict, clip: float | None) -> list[tuple[nn.Module, float]]:
    """Per layer the latent-weight bound: ``clip`` if given, else 1 for sign-coded layers and
    none (``inf``) for fixed-point ones."""
    out = []
    for layer in layers.values():
        bound = clip if clip is not None else (1.0 if layer.codec.is_sign else math.inf)
        if math.isfinite(bound):
            out.append((layer, float(bound)))
    return out


def _fit(model, train, test, *, epochs, batch_size, lr, lr_step, lr_gamma, loss, mhl_margin,
         flip_ber, flip_layers, flip_warmup, clip, randbet_ber, randbet_layers, adversarial_bits,
         adversarial_layers, seed, device, out, progress,
         options: _Options | None = None) -> pd.DataFrame:
    """The training loop of :func:`fit`, on validated arguments."""
    options = options if options is not None else _Options()
    dev = resolve_device(device)
    model.to(dev)
    loss_fn = _loss_fn(loss, mhl_margin) if not options.label_smoothing else \
        functools.partial(F.cross_entropy, label_smoothing=options.label_smoothing)
    p_target = faults.rates(flip_ber) if flip_ber is not None else (0.0, 0.0)
    flipping = max(p_target) > 0
    layers = faults.select_layers(model, flip_layers)
    s_shuffle, s_flip = spawn(seed, 2)
    shuffle_gen = torch.Generator().manual_seed(s_shuffle)
    flip_gen = torch.Generator(device=dev).manual_seed(s_flip)
    bounds = _clamp_bounds(layers, clip)
    rb = faults.rates(randbet_ber) if randbet_ber is not None else (0.0, 0.0)
    rb_layers = faults.select_layers(model, randbet_layers) if max(rb) > 0 else {}
    # RandBET draws from its own stream (child seed 3 of 3: the first two are unchanged)
    rb_gen = torch.Generator(device=dev).manual_seed(spawn(seed, 3)[2]) \
        if rb_layers else None
    rb_faults = {n: faults.TransientFlip(rb, rb_gen) for n in rb_layers}
    if rb_layers and options.randbet_fixed:  # one chip for every step: the fixed pattern
        maps = faults.draw_maps(model, spawn(seed, 3)[2], max(rb), layers=list(rb_layers))
        rb_faults = {n: faults.PersistentFlip(maps[n], *rb) for n in rb_layers}
    adv_layers = faults.select_layers(model, adversarial_layers) if adversarial_bits else {}
    opt = _make_optimizer(model, lr, options)
    params = [p for p in model.parameters() if p.requires_grad]
    every = params if options.clip_params == "all" else []
    rb_open = options.randbet_start_loss is None
    step = lr_step if lr_step is not None else max(1, epochs // 4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=lr_gamma)
    recipe: dict[str, Any] = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_step": step,
        "lr_gamma": lr_gamma, "loss": loss, "mhl_margin": mhl_margin,
        "flip_ber": list(p_target), "flip_layers": list(layers) if flipping else [],
        "flip_warmup": flip_warmup, "seed": seed, "device": str(dev),
        "threads": torch.get_num_threads(),
        "dataset": getattr(train, "name", "custom"),
    }
    codecs = {n: m.codec.config() for n, m in faults.select_layers(model).items()}
    if clip is not None or rb_layers or any(c["kind"] != "sign" for c in codecs.values()):
        # recorded only where used, so a BNN's recipe reads as before codecs existed
        recipe.update({"clip": clip, "randbet_ber": list(rb) if rb_layers else None,
                       "randbet_layers": list(rb_layers), "codecs": codecs})
    recipe.update(options.changed())  # only what differs from the original recipe
    if adv_layers:
        recipe.update({"adversarial_bits": adversarial_bits,
                       "adversarial_layers": list(adv_layers)})
    meta = getattr(model, "meta", None)
    if meta is None:
        meta = {}
        model.meta = meta  # type: ignore[attr-defined]
    meta["training"] = recipe
    rows: list[dict[str, Any]] = []
    n_batches = math.ceil(len(train) / batch_size)
    bar = tqdm(range(epochs), desc="epochs", disable=not progress, unit="ep")
    try:
        for epoch in bar:
            p01, p10 = _ber_at(epoch, p_target, flip_warmup)
            for layer in layers.values():
                layer.fault = faults.TransientFlip((p01, p10), flip_gen) if flipping else None
            model.train()
            t0 = time.perf_counter()
            tot_loss = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            inner = tqdm(train.batches(batch_size, shuffle=True, generator=shuffle_gen, device=dev,
                                       grid=grid_of(model)),
                         total=n_batches, desc=f"epoch {epoch + 1}", leave=False,
                         disable=not progress, unit="batch")
            for k_batch, (x, y) in enumerate(inner):
                z = model(x)
                batch_loss = loss_fn(z, y)
                clean_loss = batch_loss.detach()
                opt.zero_grad(set_to_none=True)
                if adv_layers:  # RandBET's term (when on) enters the mean as it is
                    batch_loss = _adversarial_loss(model, adv_layers, adversarial_bits, loss_fn,
                                                   x, y, batch_loss,
                                                   rb_layers if rb_open else {}, rb_faults)
                    batch_loss.backward()
                elif rb_layers and rb_open:
                    batch_loss = _randbet_step(model, params, rb_layers, rb_faults, loss_fn, x,
                                               y, batch_loss, options)
                else:
                    batch_loss.backward()
                opt.step()
                if rb_layers and not rb_open and float(clean_loss) < options.randbet_start_loss:
                    rb_open = True  # from the next step on
                    recipe["randbet_started"] = [epoch + 1, k_batch + 1]
                with torch.no_grad():
                    for layer, bound in bounds:
                        layer.weight.clamp_(-bound, bound)
                    for p in every:
                        p.clamp_(-clip, clip)
                    tot_loss += batch_loss.detach().double() * len(y)
                    correct += (z.argmax(1) == y).sum()
                share_ranges(model)  # global quantization follows the weights
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            for layer in layers.values():
                layer.fault = None
            row = {"epoch": epoch + 1, "lr": lr_now, "p01": p01, "p10": p10,
                   "train_loss": float(tot_loss) / len(train),
                   "train_acc": float(correct) / len(train),
                   "test_acc": accuracy(model, test) if test is not None else math.nan,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            meta["history"] = rows
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", test_acc=f"{row['test_acc']:.4f}")
            if out is not None:
                save(model, out)
    finally:
        for layer in (*layers.values(), *rb_layers.values(), *adv_layers.values()):
            layer.fault = None
        model.eval()
    return pd.DataFrame(rows, columns=["epoch", "lr", "p01", "p10", "train_loss", "train_acc",
                                       "test_acc", "seconds"])
