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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.compiled import UnsupportedModel
from bnn_tol.core.models import build
from bnn_tol.data import INPUT

__all__ = ["adapt", "AdaptError"]


class AdaptError(UnsupportedModel):
    """The user's module cannot be mapped onto BNN blocks (names the operation and why)."""


_PROBE = torch.tensor([-3.0, -1.5, -1.0, -0.5, -1e-3, 1e-3, 0.5, 1.0, 1.5, 3.0])


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
        if node.op == "call_method" and node.target in ("size", "dim"):
            sizes.add(node)
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


def _kind(desc: str, op: Any, x: Tensor) -> str:
    """Classify one operation: layer, bn, pool, flatten, drop, sign, clip, softmax."""
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
        y = op(x)
        if y.dim() == 2 and y.shape[0] == x.shape[0]:
            return "flatten"
        raise AdaptError(f"{desc}: a reshape that is not a flatten to (N, -1)")
    probe = _PROBE.reshape(1, -1) if x.dim() == 2 else _PROBE.reshape(1, -1, 1, 1)
    try:
        with torch.no_grad():
            y = op(probe.to(x.dtype))
    except Exception as e:  # noqa: BLE001
        raise AdaptError(f"{desc}: cannot probe this operation ({e})") from None
    y = y.reshape(-1)
    if torch.equal(y, torch.where(_PROBE > 0, 1.0, -1.0)):
        return "sign"
    if torch.equal(torch.sign(y), torch.sign(_PROBE)) and bool((torch.diff(y) >= 0).all()):
        return "clip"  # hardtanh / clamp: keeps every sign, harmless before a sign
    raise AdaptError(f"{desc} ({type(op).__name__}): not a recognized BNN operation (layer, "
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
    """Convert ``module`` (a user's BNN) into a bnn_tol BNN, verified on ``example``.

    Args:
        module: the user's model (eval mode is used; its state is not modified).
        example: a batch of inputs on the library's grid (:data:`bnn_tol.data.INPUT`),
            ``(N, C, H, W)`` (or ``(N, features)`` with ``in_shape``).
        in_shape: ``(C, H, W)`` when ``example`` is flat.
        sign_zero: what the user's sign does at exactly 0 (``+1``, ``-1``, or ``0`` as
            ``torch.sign``); ``None``: refuse if a BN output of the example is exactly 0.

    Returns:
        A :class:`~bnn_tol.models.BNN` (``config["name"] == "custom"``) in eval mode.

    Raises:
        AdaptError: naming the first operation or block that cannot be mapped, and why.
    """

    if not isinstance(example, Tensor) or example.dim() not in (2, 4) or len(example) == 0:
        raise AdaptError("example must be a non-empty batch (N, C, H, W) or (N, features)")
    grid = example.double() * INPUT.scale
    lo, hi = -INPUT.offset, 255 - INPUT.offset
    if not torch.equal(grid, torch.round(grid)) or float(grid.min()) < lo or float(grid.max()) > hi:
        raise AdaptError(f"example is not on the library's input grid {INPUT.describe()}: adapt "
                         "supports models trained on bnn_tol's input scaling "
                         "(bnn_tol.data.to_float); retrain or rescale the first layer")
    if example.dim() == 4:
        shape = tuple(int(v) for v in example.shape[1:])
    elif in_shape is None:
        raise AdaptError("a flat example (N, features) needs in_shape=(C, H, W)")
    else:
        shape = tuple(int(v) for v in in_shape)
    was = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            spec, layers, bns, scales = _map(module, example, shape, sign_zero)
            model = build("custom", blocks=spec, in_shape=shape,
                          n_classes=int(spec[-1]["out"]))
            for block, layer, bn in zip(model.blocks, layers, bns, strict=True):
                block.layer.weight.copy_(layer.weight)
                if layer.bias is not None:
                    block.layer.bias.copy_(layer.bias)
                if bn is not None:
                    block.bn.load_state_dict(bn.state_dict())
            if bns[-1] is None and scales[-1] != 1.0:  # a scaled output layer without BN
                model.blocks[-1].bn.weight.fill_(scales[-1])
            model.eval()
            _verify(module, model, example, shape, exact=all(a == 1.0 for a in scales))
    finally:
        for m, flag in was:
            m.training = flag
    model.meta = {"adapted_from": type(module).__name__}
    return model


def _map(module, example, shape, sign_zero):
    """Map the traced operations; if that fails, the leaf-module walk (inferring functional
    signs and flattens); the first error is reported when both fail."""
    ops, traced = _ops(module)
    try:
        return _map_ops(module, example, ops, traced, sign_zero)
    except AdaptError as first:
        if not traced:
            raise
        try:
            return _map_ops(module, example, _leaves(module), False, sign_zero)
        except AdaptError:
            raise first from None


def _map_ops(module, example, ops, traced, sign_zero):
    """Walk the operations on ``example``; return the block specs, layers and BNs."""
    x = example
    spec: list[dict] = []
    layers, bns, scales = [], [], []
    cur: dict | None = None
    pending_flatten = False
    pool_before_bn = None
    for i, (desc, op) in enumerate(ops):
        kind = _kind(desc, op, x)
        if not traced and kind in ("layer", "pool") and cur is not None and bns[-1] is not None:
            # module walk: a functional sign between BN and the next layer/pool is invisible
            spec.append(cur)
            cur = None
            x = _lib_sign(x)
            if kind == "pool":
                spec[-1]["pool"] = _pool_k(op)
                x = op(x)
                continue
        if not traced and kind == "layer" and isinstance(op, nn.Linear) and x.dim() > 2:
            pending_flatten = True  # module walk: an invisible x.view(N, -1)
            x = x.flatten(1)
        if kind == "flatten":
            pending_flatten = True
        elif kind == "layer":
            if cur is not None and bns[-1] is not None and _binarizes_input(op, x):
                spec.append(cur)  # BinaryNet style: the layer binarizes its own input
                cur = None
                x = _lib_sign(x)
            if cur is not None:
                raise AdaptError(f"{desc}: a layer follows block {len(spec)} without a "
                                 "sign activation in between")
            scale = _weight_scale(op, x)
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
                   (not conv and not spec and x.dim() > 2)}
            if conv:
                cur.update(kernel=int(op.kernel_size[0]), padding=int(op.padding[0]))
            pending_flatten = False
            layers.append(op)
            bns.append(None)
            pool_before_bn = None
        elif kind == "bn":
            if cur is None or bns[-1] is not None:
                raise AdaptError(f"{desc}: BatchNorm without a preceding binarized layer")
            bns[-1] = _fold_scale(op, scales[-1])
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
        elif kind == "clip":
            if cur is None or bns[-1] is None:
                raise AdaptError(f"{desc}: a clipping activation outside BN -> sign")
        elif kind == "sign":
            if cur is None or bns[-1] is None:
                raise AdaptError(f"{desc}: a sign activation without layer -> BatchNorm before it")
            spec.append(cur)
            cur = None
        elif kind == "softmax":
            if i != len(ops) - 1:
                raise AdaptError(f"{desc}: softmax is only allowed as the last operation")
        x = op(x)
    if cur is None:
        raise AdaptError("the module ends with a sign activation: the last block must output "
                         "class scores (Linear -> [BatchNorm])")
    cur["binary_output"] = False
    spec.append(cur)
    if sign_zero is None:
        _check_no_zero(module, example, [b for b in bns[:-1] if b is not None])
    return spec, layers, bns, scales


def _check_no_zero(module, example, hidden_bns) -> None:
    """Refuse an example whose hidden BN outputs hit exactly 0 (sign(0) conventions differ)."""
    hits = []

    def hook(_m, _i, out):
        hits.append(bool((out == 0).any()))

    handles = [m.register_forward_hook(hook) for m in hidden_bns]
    try:
        module(example)
    finally:
        for h in handles:
            h.remove()
    if any(hits):
        raise AdaptError("a BatchNorm output of the example is exactly 0, where sign "
                         "conventions differ (torch.sign(0) = 0, the library's sign(0) = +1): "
                         "pass sign_zero=+1/-1/0 to say what the model does")


def _verify(module, model, example, shape, exact: bool = True) -> None:
    """Scores of ``model`` equal ``module``'s (before a trailing softmax, captured with a hook
    on the last module before it) bit for bit; with a folded weight scale (``exact=False``)
    the predictions must be equal and the scores within float32 rounding (1e-4 relative)."""
    leaves = _leaves(module)
    captured = []
    handle = None
    if leaves and isinstance(leaves[-1][1], nn.Softmax | nn.LogSoftmax) and len(leaves) > 1:
        handle = leaves[-2][1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        x = module(example)
    finally:
        if handle is not None:
            handle.remove()
    if captured:
        x = captured[-1]
    else:
        ops, traced = _ops(module)
        if traced and ops and ops[-1][0] in ("softmax", "log_softmax", ".softmax",
                                              ".log_softmax"):
            x = example
            for _desc, op in ops[:-1]:
                x = op(x)
    inp = example.reshape(-1, *shape) if example.dim() == 2 else example
    got = model(inp)
    x = x.value if hasattr(x, "value") else x
    if not exact and x.shape == got.shape and torch.equal(x.argmax(1), got.argmax(1)) and \
            torch.allclose(x, got, rtol=1e-4, atol=1e-4 * float(x.abs().max())):
        return
    if x.shape != got.shape or not torch.equal(x, got):
        same = x.shape == got.shape and torch.equal(x.argmax(1), got.argmax(1))
        diff = math.inf if x.shape != got.shape else float((x - got).abs().max())
        raise AdaptError(f"the adapted model's scores differ from the original's on the example "
                         f"(max |diff| = {diff:.3g}{', same predictions' if same else ''}): an "
                         "operation was not mapped exactly")
