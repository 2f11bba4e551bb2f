"""Bring your own BNN: convert a user's PyTorch BNN into a :class:`~bnn_tol.models.BNN`.

:func:`adapt` traces the module with ``torch.fx`` (a plain ``nn.Sequential`` walk when it does
not trace), reads the chain of operations, and maps it onto the library's blocks::

    [flatten] -> Linear/Conv2d with sign-binarized weights -> BatchNorm
              -> [hardtanh / clamp] -> sign-like activation -> [max-pool]      (hidden block)
    [flatten] -> Linear -> [BatchNorm] -> [softmax / log_softmax]             (output block)

* **Binarized layers** are recognized by behaviour, not by class name: a Linear/Conv2d (or a
  subclass such as BinaryNet's ``BinarizeLinear``) whose output on the activations that reach it
  equals ``linear/conv(x, sign(weight))`` bit for bit. Its latent real weights are copied.
* **Sign-like activations** are recognized by probing: ``torch.sign``, ``x.sign()``, custom
  ``autograd.Function`` s and modules whose output is +-1 for every nonzero input. ``torch.sign``
  maps 0 to 0 where the library uses +1 (DESIGN.md); ``sign_zero`` says what the user's model
  does at 0 and the verification refuses a model whose example hits a zero it cannot map.
* **Max-pooling before BatchNorm** (conv -> pool -> BN -> sign, BinaryNet's VGG order) equals
  the library's BN -> sign -> pool when every BN scale ``gamma`` is > 0 (a monotone BN commutes
  with max); with a ``gamma < 0`` channel it is refused.
* **Inputs**: the adapted model takes the library's inputs ``x = (p - offset) / scale``
  (:data:`bnn_tol.data.INPUT`, :func:`bnn_tol.data.to_float`); the user's model must have
  been trained on that scaling (the example must lie on that grid). Other input conventions
  are refused with the reason.
* **Brevitas**: ``QuantLinear``/``QuantConv2d``/``QuantIdentity`` are leaves; binary weights
  with a per-tensor scale (``alpha sign(W)``, Brevitas' default ``alpha = 0.1``) are recognized
  and ``alpha`` is folded into the following BatchNorm (``BN(alpha a) = BN'(a)`` with mean /
  alpha, variance and eps / alpha^2).
* **Verification**: on ``example`` the adapted model's class scores must equal the original's
  bit for bit (before a trailing softmax/log_softmax, which is dropped: the predictions are
  the same) -- with a folded ``alpha``, the predictions exactly and the scores to float32
  rounding; otherwise :class:`AdaptError` names the first block that differs.

The result is an ordinary BNN (``models.build("custom", blocks=[...])``), so sweeps, metrics,
studies, ``io.save``/``load`` and :func:`bnn_tol.export` work on it.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.compiled import UnsupportedModel
from bnn_tol.core.models import build
from bnn_tol.data import INPUT
from bnn_tol.exceptions import InvalidArgument, require_int

__all__ = ["adapt", "AdaptError"]


class AdaptError(UnsupportedModel):
    """The user's module cannot be mapped onto BNN blocks (names the operation and why)."""


#: The values an activation is probed with (a tuple: no tensor is shared between calls, so a
#: user's in-place activation can only change the copy :func:`_probe` makes for it).
_PROBE_VALUES = (-3.0, -1.5, -1.0, -0.5, -1e-3, 1e-3, 0.5, 1.0, 1.5, 3.0)


def _probe(dtype: torch.dtype = torch.float32) -> Tensor:
    """A fresh tensor of :data:`_PROBE_VALUES` (``adapt`` never mutates shared state)."""
    return torch.tensor(_PROBE_VALUES, dtype=dtype)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaf modules in registration order (the module-walk fallback)."""
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if len(list(child.children())) == 0 or isinstance(child, nn.Linear | nn.Conv2d):
            out.append((full, child))
        else:
            out += _leaves(child, f"{full}.")
    return out


class _Tracer(torch.fx.Tracer):
    """Layers (any Linear/Conv2d subclass) and modules without children are leaves: they are
    classified by behaviour, not traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        return isinstance(m, nn.Linear | nn.Conv2d) or len(list(m.children())) == 0 \
            or type(m).__module__.startswith("brevitas.") or super().is_leaf_module(m, qualname)


def _ops(module: nn.Module) -> tuple[list[tuple[str, Any]], bool]:
    """The module's operations in order ``[(description, callable(x) -> y)]`` and whether they
    come from a torch.fx trace (``False``: a walk of the leaf modules, where functional sign and
    flatten calls in ``forward`` are invisible and are inferred between blocks)."""
    try:
        graph = _Tracer().trace(module)
        gm = torch.fx.GraphModule(module, graph)
    except Exception:  # noqa: BLE001 -- data-dependent forward: walk the modules
        return _leaves(module), False
    mods = dict(gm.named_modules())
    ops: list[tuple[str, Any]] = []
    prev = None
    sizes = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            prev = node
            continue
        if (node.op == "call_method" and node.target in ("size", "dim")) or (
                node.op == "call_function" and node.target is getattr
                and node.args[1:] in (("shape",),)):
            sizes.add(node)  # x.size(), x.dim(), x.shape
            continue
        if node.op == "call_function" and node.target is operator.getitem and \
                node.args[0] in sizes:
            sizes.add(node)  # x.shape[0], x.size()[0]
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise AdaptError("the module's output is not the last operation of a chain")
            break
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and a not in sizes]
        if len(tensor_args) != 1 or tensor_args[0] is not prev:
            raise AdaptError(f"{node.name}: only a chain of one-input operations can be adapted "
                             "(no skip connections or multi-input ops)")
        others = [a for a in node.args if not isinstance(a, torch.fx.Node)]
        kwargs = dict(node.kwargs)
        if node.op == "call_module":
            ops.append((node.target, mods[node.target]))
        elif node.op == "call_method" and node.target in ("view", "reshape") and any(
                a in sizes for a in node.args):
            ops.append((".flatten", lambda x: x.flatten(1)))  # x.view(x.size(0), -1)
        elif node.op == "call_function" and node.target in _FUNCTIONAL_POOLS:
            ops.append((node.name, _pool_module(node.name, others, kwargs)))
        elif node.op == "call_function":
            fn = node.target
            ops.append((getattr(fn, "__name__", str(fn)),
                        (lambda x, fn=fn, o=others, k=kwargs: fn(x, *o, **k))))
        elif node.op == "call_method":
            meth = node.target
            ops.append((f".{meth}", (lambda x, m=meth, o=others, k=kwargs:
                                     getattr(x, m)(*o, **k))))
        else:
            raise AdaptError(f"{node.name}: unsupported operation {node.op}")
        prev = node
    return ops, True


#: Functional max-pooling calls traced with constant arguments (``F.max_pool2d(x, 2)``).
_FUNCTIONAL_POOLS = (F.max_pool2d, torch.max_pool2d)


def _pool_module(desc: str, args: list, kwargs: dict) -> nn.MaxPool2d:
    """The ``nn.MaxPool2d`` of a traced ``F.max_pool2d(x, *args, **kwargs)`` call (constant
    arguments: its kernel is known); one-line refusal otherwise."""
    if any(isinstance(a, torch.fx.Node) for a in [*args, *kwargs.values()]):
        raise AdaptError(f"{desc}: max-pooling with a computed kernel or stride")
    kwargs = {k: v for k, v in kwargs.items() if k != "return_indices" or v}
    try:
        return nn.MaxPool2d(*args, **kwargs)
    except TypeError as e:
        raise AdaptError(f"{desc}: max-pooling arguments {args} {kwargs}: {e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _call(desc: str, what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` where ``fn`` runs the user's code: its failure is one line naming ``desc``
    and ``what`` it was given (an :class:`AdaptError` passes through)."""
    try:
        with torch.no_grad():
            return fn(*args)
    except AdaptError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's module fails: a user error
        raise AdaptError(f"{desc}: fails on {what} ({_first_line(e)})") from None


def _name(desc: str, op: Any) -> str:
    """``desc (Type)`` for modules, ``desc`` for functions and methods."""
    return f"{desc} ({type(op).__name__})" if isinstance(op, nn.Module) else desc


def _kind(desc: str, op: Any, x: Tensor) -> str:
    """Classify one operation: layer, bn, pool, flatten, drop, sign, clip (hardtanh / clamp),
    squash (another monotone sign-keeping function such as tanh: harmless before a sign, not
    an activation of its own), softmax."""
    if isinstance(op, nn.Linear | nn.Conv2d):
        return "layer"
    if isinstance(op, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(op, nn.MaxPool2d) or desc in ("max_pool2d", "_max_pool2d"):
        return "pool"
    if isinstance(op, nn.Dropout | nn.Identity):
        return "drop"
    if isinstance(op, nn.Softmax | nn.LogSoftmax) or desc in ("softmax", "log_softmax",
                                                                ".softmax", ".log_softmax"):
        return "softmax"
    if isinstance(op, nn.Flatten) or desc in ("flatten", ".flatten", ".view", ".reshape"):
        y = _call(desc, "the example", op, x.clone())
        if y.dim() == 2 and y.shape[0] == x.shape[0]:
            return "flatten"
        raise AdaptError(f"{desc}: a reshape that is not a flatten to (N, -1)")
    ref = _probe()
    probe = _probe(x.dtype)  # the operation may work in place: its own copy
    probe = probe.reshape(1, -1) if x.dim() == 2 else probe.reshape(1, -1, 1, 1)
    try:
        with torch.no_grad():
            y = op(probe)
    except Exception as e:  # noqa: BLE001
        raise AdaptError(f"{_name(desc, op)}: cannot probe this operation "
                         f"({_first_line(e)})") from None
    y = y.reshape(-1)
    if torch.equal(y, torch.where(ref > 0, 1.0, -1.0)):
        return "sign"
    if y.shape == ref.shape and torch.equal(torch.sign(y), torch.sign(ref)) and bool(
            (torch.diff(y) >= 0).all()):
        # keeps every sign: hardtanh / clamp (piecewise identity) or a squashing function
        return "clip" if torch.equal(y, ref.clamp(float(y.min()), float(y.max()))) \
            else "squash"
    raise AdaptError(f"{_name(desc, op)}: not a recognized BNN operation (layer, "
                     "BatchNorm, sign-like activation, hardtanh, max-pool, flatten)")


def _lib_sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _binarizes_input(layer: nn.Module, x: Tensor) -> bool:
    """The layer computes ``linear/conv(sign(x), sign(W))`` from real inputs ``x``."""
    with torch.no_grad():
        return torch.equal(layer(x), _ref(layer, _lib_sign(x)))


def _ref(layer: nn.Module, x: Tensor) -> Tensor:
    wb = torch.where(layer.weight >= 0, 1.0, -1.0).to(layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        return F.linear(x, wb, layer.bias)
    return F.conv2d(x, wb, layer.bias, layer.stride, layer.padding, layer.dilation,
                    layer.groups)


def _pool_k(op) -> int:
    """Kernel of a max-pool with stride = kernel and no padding (else refused)."""
    if not isinstance(op, nn.MaxPool2d):
        raise AdaptError("functional max-pooling: use nn.MaxPool2d so its kernel is known")
    k = op.kernel_size if isinstance(op.kernel_size, int) else op.kernel_size[0]
    stride = op.stride if isinstance(op.stride, int) else op.stride[0]
    if stride != k or op.padding not in (0, (0, 0)) or op.dilation not in (1, (1, 1)):
        raise AdaptError("only max-pooling with stride = kernel, no padding or dilation")
    return int(k)


def _is_binarized(layer: nn.Module, x: Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(layer(x), _ref(layer, x))


def _weight_scale(layer: nn.Module, x: Tensor) -> float | None:
    """``1.0`` if the layer computes ``linear/conv(x, sign(W))`` bit for bit; ``alpha > 0`` if
    it computes ``alpha sign(W)`` (Brevitas' binary weights with a per-tensor scale), up to
    float32 rounding; ``None`` otherwise."""
    with torch.no_grad():
        out, ref = layer(x), _ref(layer, x)
        out = out.value if hasattr(out, "value") else out  # a Brevitas QuantTensor
        if torch.equal(out, ref):
            return 1.0
        nz = ref != 0
        if not bool(nz.any()):
            return None
        alpha = float((out[nz] / ref[nz]).median())
        tol = 1e-5 * float(out.abs().max()) + 1e-12
        if alpha > 0 and bool(((out - alpha * ref).abs() <= tol).all()):
            return alpha
        return None


def _fold_scale(bn: nn.Module, alpha: float) -> nn.Module:
    """``BN(alpha a) = BN'(a)``: running mean / alpha, variance and eps / alpha^2 (alpha > 0)."""
    if alpha == 1.0:
        return bn

    out = copy.deepcopy(bn)
    out.running_mean.div_(alpha)
    out.running_var.div_(alpha * alpha)
    out.eps = bn.eps / (alpha * alpha)
    return out


def adapt(module: nn.Module, example: Tensor, *, in_shape=None, sign_zero: int | None = None):
    """Convert ``module`` (a user's BNN) into a bnn_tol BNN, verified on ``example`` and on
    probe batches spanning the input range.

    Args:
        module: the user's model, a ``torch.nn.Module`` (eval mode is used; its state is not
            modified). Its operations run on adapt's own copies of the example and of the probe
            values, so in-place activations (``Hardtanh(inplace=True)``, ``x.sign_()``) change
            neither ``example`` nor what a later adaptation probes with.
        example: a float32 batch of inputs on the library's grid (:data:`bnn_tol.data.INPUT`),
            ``(N, C, H, W)`` (or ``(N, features)`` with ``in_shape``).
        in_shape: ``(C, H, W)`` when ``example`` is flat (three positive integers holding its
            features); with a 4-D example it may be given and must equal its shape.
        sign_zero: what the user's sign does at exactly 0: ``None`` (refuse if a BN output of
            the example is exactly 0), ``+1``, ``-1`` or ``0`` (as ``torch.sign``).

    What is verified: the adapted model's class scores equal the module's (before a trailing
    softmax; to float32 rounding where a weight scale was folded) on ``example`` and on probe
    batches of pixels through the input grid -- dark, bright, uniform random, and constant
    images (black, white, mid-gray). A module walk (``torch.fx`` cannot trace ``forward``, e.g.
    data-dependent control flow such as ``if x.mean() > 0: h = -h``) sees only the registered
    modules, and the probes are what shows whether ``forward`` does more with them.

    Returns:
        A :class:`~bnn_tol.models.BNN` (``config["name"] == "custom"``) in eval mode.

    Raises:
        AdaptError: one line naming the first operation or block that cannot be mapped and why
            (an unsupported activation by name: ReLU, Tanh, Softsign, GELU, ...), the probe
            batch on which the adapted model differs, a ``module`` that is not an
            ``nn.Module``, a bad ``example``, ``in_shape`` or ``sign_zero``, or the user's
            ``forward`` failing on the example or a probe.
    """

    if not isinstance(module, nn.Module):
        raise AdaptError(f"module must be a torch.nn.Module (your BNN), got "
                         f"{type(module).__name__}")
    if sign_zero is not None and (isinstance(sign_zero, bool) or not isinstance(
            sign_zero, numbers.Integral) or sign_zero not in (-1, 0, 1)):
        raise AdaptError(f"sign_zero must be None, -1, 0 or +1 (what your sign does at 0), got "
                         f"{sign_zero!r}")
    if not isinstance(example, Tensor) or example.dim() not in (2, 4) or len(example) == 0:
        raise AdaptError("example must be a non-empty batch (N, C, H, W) or (N, features)")
    example = example.detach()
    if example.dtype != torch.float32:
        raise AdaptError(f"example must be float32 on the library's input grid "
                         f"(bnn_tol.data.to_float), got {example.dtype}")
    grid = example.double() * INPUT.scale
    lo, hi = -INPUT.offset, 255 - INPUT.offset
    if not torch.equal(grid, torch.round(grid)) or float(grid.min()) < lo or float(grid.max()) > hi:
        raise AdaptError(f"example is not on the library's input grid {INPUT.describe()}: adapt "
                         "supports models trained on bnn_tol's input scaling "
                         "(bnn_tol.data.to_float); retrain or rescale the first layer")
    shape = _in_shape(example, in_shape)
    was = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            model = _adapt(module, example, shape, sign_zero)
    finally:
        for m, flag in was:
            m.training = flag
    model.meta = {"adapted_from": type(module).__name__}
    return model


def _in_shape(example: Tensor, in_shape) -> tuple[int, int, int]:
    """The per-sample ``(C, H, W)``: the example's, or ``in_shape`` holding its features."""
    given = None
    if in_shape is not None:
        try:
            given = tuple(require_int(v, "in_shape", minimum=1, strict=True) for v in in_shape)
        except (TypeError, InvalidArgument):
            given = ()
        if len(given) != 3:
            raise AdaptError(f"in_shape must be three positive integers (C, H, W), got "
                             f"{in_shape!r}")
    if example.dim() == 4:
        shape = tuple(int(v) for v in example.shape[1:])
        if given is not None and given != shape:
            raise AdaptError(f"in_shape {given} differs from the example's shape {shape}")
        return shape  # type: ignore[return-value]
    if given is None:
        raise AdaptError("a flat example (N, features) needs in_shape=(C, H, W)")
    if math.prod(given) != example.shape[1]:
        raise AdaptError(f"in_shape {given} holds {math.prod(given)} values; the example has "
                         f"{example.shape[1]} features")
    return given  # type: ignore[return-value]


def _adapt(module, example, shape, sign_zero):
    """Map the traced operations, build and verify; if the trace is not a chain or its mapping
    fails, the leaf-module walk (inferring functional signs and flattens), verified on the probe
    batches like any other. The traced error is reported when the walk fails too; a traced
    model that maps but does not verify is refused as it is."""
    if not any(isinstance(m, nn.Linear | nn.Conv2d) for m in module.modules()):
        raise AdaptError(f"no Linear/Conv2d layer found in the module ({type(module).__name__})")
    try:
        ops, traced = _ops(module)
    except AdaptError as first:  # traced, but not a chain (a constant built from x, ...):
        try:  # the module walk may still map it; verified like any other
            walked = _map_ops(module, example, _leaves(module), False, sign_zero)
            return _build_verified(module, example, shape, walked, "")
        except AdaptError:
            raise first from None
    if not traced:
        why = " (torch.fx could not trace forward)"
        try:
            mapped = _map_ops(module, example, ops, False, sign_zero)
        except AdaptError as e:
            raise AdaptError(f"{e} -- the module walk{why} takes the registered modules in "
                             "order: is every registered layer used, in that order?") from None
        return _build_verified(module, example, shape, mapped, why)
    try:
        mapped = _map_ops(module, example, ops, True, sign_zero)
    except AdaptError as first:
        try:
            walked = _map_ops(module, example, _leaves(module), False, sign_zero)
            return _build_verified(module, example, shape, walked, "")
        except AdaptError:
            raise first from None
    return _build_verified(module, example, shape, mapped, None)


def _build_verified(module, example, shape, mapped, walk_why: str | None):
    """Build the BNN from the mapped blocks and verify it (``walk_why``: a module walk)."""
    spec, layers, bns, scales, assumed = mapped
    model = build("custom", blocks=spec, in_shape=shape, n_classes=int(spec[-1]["out"]))
    for block, layer, bn in zip(model.blocks, layers, bns, strict=True):
        block.layer.weight.copy_(layer.weight)
        if layer.bias is not None:
            block.layer.bias.copy_(layer.bias)
        if bn is not None:
            block.bn.load_state_dict(bn.state_dict())
    if bns[-1] is None and scales[-1] != 1.0:  # a scaled output layer without BN
        model.blocks[-1].bn.weight.fill_(scales[-1])
    model.eval()
    _verify(module, model, example, shape, exact=all(a == 1.0 for a in scales),
            walk_why=walk_why, assumed=assumed)
    return model


def _map_ops(module, example, ops, traced, sign_zero):
    """Walk the operations on ``example``; return the block specs, layers, BNs, weight scales
    and what a module walk assumed (the functional signs it cannot see)."""
    x = example.clone()
    spec: list[dict] = []
    layers, bns, scales = [], [], []
    user_bns: dict[int, nn.Module] = {}  # block -> the module's own BatchNorm
    assumed: list[str] = []
    kept: list[str] = []  # clip / squash operations after the current block's BatchNorm
    cur: dict | None = None
    pending_flatten = False
    pool_before_bn = None
    for i, (desc, op) in enumerate(ops):
        kind = _kind(desc, op, x)
        name = _name(desc, op)
        if not traced and kind in ("layer", "pool") and cur is not None and bns[-1] is not None:
            # module walk: a functional sign between BN and the next layer/pool is invisible
            assumed.append(f"a sign after {kept[-1] if kept else 'block ' + str(len(spec))}")
            spec.append(cur)
            cur = None
            kept = []
            x = _lib_sign(x)
            if kind == "pool":
                spec[-1]["pool"] = _pool_k(op)
                x = _call(name, "the example", op, x)
                continue
        if not traced and kind == "layer" and isinstance(op, nn.Linear) and x.dim() > 2:
            pending_flatten = True  # module walk: an invisible x.view(N, -1)
            x = x.flatten(1)
        if kind == "flatten":
            pending_flatten = True
        elif kind == "layer":
            if cur is not None and bns[-1] is not None and _call(
                    name, "the example", _binarizes_input, op, x):
                spec.append(cur)  # BinaryNet style: the layer binarizes its own input
                cur = None
                x = _lib_sign(x)
            if cur is not None:
                why = f" ({', '.join(kept)} {'is' if len(kept) == 1 else 'are'} not a sign " \
                    "activation)" if kept else ""
                raise AdaptError(f"{desc}: a layer follows block {len(spec)} without a "
                                 f"sign activation in between{why}")
            kept = []
            scale = _call(name, "the example", _weight_scale, op, x)
            if scale is None:
                raise AdaptError(f"{desc} ({type(op).__name__}): its output is not "
                                 "linear/conv(x, alpha sign(weight)): not a binarized layer")
            scales.append(scale)
            if bool((op.weight == 0).any()) and sign_zero not in (1, None):
                raise AdaptError(f"{desc}: latent weights exactly 0 binarize to {sign_zero}, "
                                 "the library binarizes them to +1")
            conv = isinstance(op, nn.Conv2d)
            if conv and (op.stride != (1, 1) or op.groups != 1 or op.dilation != (1, 1)
                         or op.kernel_size[0] != op.kernel_size[1]
                         or op.padding[0] != op.padding[1]):
                raise AdaptError(f"{desc}: only square, stride-1, ungrouped convolutions")
            cur = {"type": "conv" if conv else "linear",
                   "in": int(op.in_channels if conv else op.in_features),
                   "out": int(op.out_channels if conv else op.out_features),
                   "bias": op.bias is not None, "flatten": pending_flatten or
                   (not conv and not spec)}  # the library's first block sees (N, C, H, W)
            if conv:
                cur.update(kernel=int(op.kernel_size[0]), padding=int(op.padding[0]))
            pending_flatten = False
            layers.append(op)
            bns.append(None)
            pool_before_bn = None
        elif kind == "bn":
            if cur is None or bns[-1] is not None:
                raise AdaptError(f"{desc}: BatchNorm without a preceding binarized layer")
            if op.running_mean is None or op.running_var is None:
                raise AdaptError(f"{name}: a BatchNorm without running statistics "
                                 "(track_running_stats=False) normalizes with each batch's own "
                                 "statistics; its threshold is undefined")
            bns[-1] = _fold_scale(op, scales[-1])
            user_bns[len(bns) - 1] = op  # the module's own BN (bns[-1] may be a copy)
            cur.update(bn_eps=float(bns[-1].eps), bn_affine=bool(op.affine))
            if pool_before_bn is not None:
                gamma = op.weight if op.affine else torch.ones(op.num_features)
                if bool((gamma <= 0).any()):
                    raise AdaptError(f"{desc}: max-pool before a BatchNorm with gamma <= 0 "
                                     "does not commute with it; cannot map the block")
        elif kind == "pool":
            k = _pool_k(op)
            if cur is not None:  # pool before BN/sign: moved after the sign (checked above)
                cur["pool"] = k
                pool_before_bn = True if bns[-1] is None else None
                if bns[-1] is not None:
                    raise AdaptError(f"{desc}: max-pool between BatchNorm and sign")
            elif spec and spec[-1].get("binary_output", True) and "pool" not in spec[-1]:
                spec[-1]["pool"] = k
            else:
                raise AdaptError(f"{desc}: max-pool without a preceding block")
        elif kind in ("clip", "squash"):
            if cur is None or bns[-1] is None:
                raise AdaptError(f"{name}: an activation outside layer -> BatchNorm -> sign "
                                 "(not a sign activation)")
            kept.append(name)
        elif kind == "sign":
            if cur is None or bns[-1] is None:
                raise AdaptError(f"{desc}: a sign activation without layer -> BatchNorm before it")
            spec.append(cur)
            cur = None
            kept = []
        elif kind == "softmax":
            if i != len(ops) - 1:
                raise AdaptError(f"{desc}: softmax is only allowed as the last operation")
        x = _call(name, "the example", op, x)
    if cur is None:
        raise AdaptError("the module ends with a sign activation: the last block must output "
                         "class scores (Linear -> [BatchNorm])")
    if kept:
        raise AdaptError(f"{', '.join(kept)}: an activation after the last layer changes the "
                         "class scores (only softmax / log_softmax may follow it)")
    cur["binary_output"] = False
    spec.append(cur)
    if sign_zero is None:  # hook the module's own BNs: a folded scale makes bns[k] a copy
        _check_no_zero(module, example, [user_bns[k] for k, b in enumerate(bns[:-1])
                                         if b is not None])
    return spec, layers, bns, scales, assumed


def _check_no_zero(module, example, hidden_bns) -> None:
    """Refuse an example whose hidden BN outputs hit exactly 0 (sign(0) conventions differ)."""
    hits = []

    def hook(_m, _i, out):
        hits.append(bool((out == 0).any()))

    handles = [m.register_forward_hook(hook) for m in hidden_bns]
    try:
        _call(f"the module ({type(module).__name__})", "the example", module, example.clone())
    finally:
        for h in handles:
            h.remove()
    if any(hits):
        raise AdaptError("a BatchNorm output of the example is exactly 0, where sign "
                         "conventions differ (torch.sign(0) = 0, the library's sign(0) = +1): "
                         "pass sign_zero=+1/-1/0 to say what the model does")


def _probe_batches(example: Tensor, shape: tuple[int, ...]) -> list[tuple[str, Tensor]]:
    """The example and probe batches of pixels through the input grid, in the example's
    layout: dark (0..31), bright (224..255), uniform random, and constant images (black,
    white, around the input offset)."""
    g = torch.Generator().manual_seed(0)
    n = max(1, min(16, 2**20 // math.prod(shape)))

    def pixels(lo: int, hi: int) -> Tensor:
        return torch.randint(lo, hi, (n, *shape), generator=g, dtype=torch.uint8)

    levels = torch.tensor([0, 255, INPUT.offset, INPUT.offset - 1, 1, 254], dtype=torch.uint8)
    flat = levels.reshape(-1, 1, 1, 1).expand(-1, *shape).contiguous()
    out = [("the example", example)]
    for name, imgs in (("the dark probe batch", pixels(0, 32)),
                       ("the bright probe batch", pixels(224, 256)),
                       ("the random probe batch", pixels(0, 256)),
                       ("the black/white/gray probe batch", flat)):
        x = INPUT.to_float(imgs)
        out.append((name, x.reshape(len(x), -1) if example.dim() == 2 else x))
    return out


def _reference(module, x: Tensor, what: str) -> Tensor:
    """``module``'s class scores on ``x`` (``what``: its name in messages): before a trailing
    softmax (captured with a hook on the last module before it, or by running the traced
    operations but the last)."""
    leaves = _leaves(module)
    captured = []
    handle = None
    if leaves and isinstance(leaves[-1][1], nn.Softmax | nn.LogSoftmax) and len(leaves) > 1:
        handle = leaves[-2][1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        y = _call(f"the module ({type(module).__name__})", what, module, x.clone())
    finally:
        if handle is not None:
            handle.remove()
    if captured:
        y = captured[-1]
    else:
        try:
            ops, traced = _ops(module)
        except AdaptError:  # not a chain: adapted by the module walk, no trailing softmax
            ops, traced = [], False
        if traced and ops and ops[-1][0] in ("softmax", "log_softmax", ".softmax",
                                              ".log_softmax"):
            y = x.clone()
            for desc, op in ops[:-1]:
                y = _call(desc, what, op, y)
    return y.value if hasattr(y, "value") else y


def _verify(module, model, example, shape, exact: bool = True, walk_why: str | None = None,
            assumed: list[str] | None = None) -> None:
    """On the example and each probe batch (:func:`_probe_batches`), the scores of ``model``
    equal ``module``'s (:func:`_reference`) bit for bit; with a folded weight scale
    (``exact=False``) the predictions must be equal and the scores within float32 rounding
    (1e-4 relative). ``walk_why``: the operations came from a module walk (named in the
    refusal with what it ``assumed``)."""
    for name, x in _probe_batches(example, shape):
        ref = _reference(module, x, name)
        got = model(x.reshape(-1, *shape) if x.dim() == 2 else x)
        if not exact and ref.shape == got.shape and torch.equal(ref.argmax(1), got.argmax(1)) \
                and torch.allclose(ref, got, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
            continue
        if ref.shape == got.shape and torch.equal(ref, got):
            continue
        same = ref.shape == got.shape and torch.equal(ref.argmax(1), got.argmax(1))
        diff = math.inf if ref.shape != got.shape else float((ref - got).abs().max())
        preds = "same predictions" if same else (
            f"{int((ref.argmax(1) != got.argmax(1)).sum())} of {len(x)} predictions differ"
            if ref.shape == got.shape else f"scores of shape {tuple(ref.shape)} vs "
            f"{tuple(got.shape)}")
        if walk_why is None:
            why = ": an operation was not mapped exactly"
        else:
            extra = f"; it assumed {', '.join(assumed)}" if assumed else ""
            why = (f": the module walk{walk_why} sees the registered modules in order, not what "
                   "forward does with them (e.g. data-dependent control flow such as "
                   f"`if x.mean() > 0`){extra}")
        raise AdaptError(f"the adapted model differs from the original on {name} ({preds}, "
                         f"max |score diff| {diff:.3g}){why}")
