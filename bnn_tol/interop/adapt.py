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
* **Inputs**: what the user's model saw (``transform``: the library's ``(p - 128) / 128`` or
  ``ToTensor``/``Normalize(mean, std)``), composed with the operations ``forward`` runs before
  the first layer (``2x - 1``, an input quantizer), is recorded as the adapted model's
  :class:`~bnn_tol.data.InputGrid` ``x = q_p / S`` with integer ``q_p`` (per input channel for
  a per-channel ``Normalize``); a transform off every integer grid (a zero point that is not a
  whole or half pixel value, per-channel stds) gets a rounded grid whose error is stated and
  verified (:func:`_input_grid`, :func:`_undecided`).
* **Biases, scales, output normalization**: layer biases (also ``+ b`` after the product and
  binarized ``sign(b)``), per-tensor and per-channel weight scales, and positive scales/shifts
  after a block (``Scale``, ``TensorNorm``) are folded into the block's BatchNorm (a block
  without one gets one: its bias becomes the threshold).
* **Residual blocks** (a sum of two branches around a layer: binary ResNets, Bi-Real-Net) are
  mapped from the ``torch.fx`` trace onto a :class:`~bnn_tol.core.graph.GraphBNN` (its nodes:
  binary layers, BatchNorms, sign, hardtanh, add, max-pool, flatten), verified like a chain.
  Where ``torch.fx`` cannot trace ``forward`` (data-dependent control flow), the skip
  connection is found by comparing what each registered module receives with what the chain
  of modules would give it, and the dataflow is reconstructed from one run
  (:func:`_observed_graph`), then verified on the probes like any other mapping.
* **Brevitas**: ``QuantLinear``/``QuantConv2d``/``QuantIdentity`` are leaves; binary weights
  with a per-tensor scale (``alpha sign(W)``, Brevitas' default ``alpha = 0.1``) are recognized
  and ``alpha`` is folded into the following BatchNorm.
* **Verification**: on ``example`` and probe batches the adapted model's class scores must equal
  the original's bit for bit (before a trailing softmax/log_softmax, which is dropped: the
  predictions are the same) -- where something was folded, the predictions exactly and the
  scores within ``1e-4 max |score|``; otherwise :class:`AdaptError` names the batch that
  differs.

The result is an ordinary BNN (``models.build("custom", blocks=[...])``), so sweeps, metrics,
studies, ``io.save``/``load`` and :func:`bnn_tol.export` work on it.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol.core.compiled import UnsupportedModel, compile_model
from bnn_tol.core.models import build
from bnn_tol.data import INPUT, InputGrid, Normalize, grid_of
from bnn_tol.exceptions import InvalidArgument, require_int

__all__ = ["adapt", "AdaptError"]


class AdaptError(UnsupportedModel):
    """The user's module cannot be mapped onto BNN blocks (names the operation and why)."""


class _SkipConnection(AdaptError):
    """A traced forward with a shortcut around a layer: mapped as a residual graph."""


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


#: Tensor attributes a traced forward may read without making the graph branch
#: (``x.shape[0]``, ``x.device``): their nodes are resolved, not mapped as operations.
_ATTRS = ("shape", "device", "dtype")

#: Binary operators whose two tensor operands mark a skip connection (residual BNNs).
_JOINS = (operator.add, operator.iadd, torch.add, operator.mul, torch.cat, torch.stack)


def _is_join(node) -> bool:
    return (node.op == "call_function" and node.target in _JOINS) or (
        node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__"))


def _ops(module: nn.Module) -> tuple[list[tuple[str, Any]], bool, str | None]:
    """The module's operations in order ``[(description, callable(x) -> y)]``, whether they
    come from a torch.fx trace (``False``: a walk of the leaf modules, where functional sign and
    flatten calls in ``forward`` are invisible and are inferred between blocks), and why fx
    could not trace (``None`` when it could).

    Resolved rather than mapped: shape/size/device reads of the input, parameters read in
    ``forward``, and constants built from them (``torch.tensor([1.0], device=x.device)``),
    which become arguments of the operation that uses them (``2.0 * x - one``: a scale and a
    shift). The traced graph is cut at the nodes every path from input to output passes
    through; a stretch between two cuts with several nodes but no layer or BatchNorm (a sign
    written as ``torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))``) is one
    operation; one with a layer is a skip connection (residual blocks), refused."""
    try:
        graph = _Tracer().trace(module)
        gm = torch.fx.GraphModule(module, graph)
    except Exception as e:  # noqa: BLE001 -- data-dependent forward: walk the modules
        return _leaves(module), False, _first_line(e)
    mods = dict(gm.named_modules())
    side: dict = {}  # node -> resolved value (a size, a device, a constant tensor)
    nodes, source, sink = [], None, None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if source is not None:
                raise AdaptError(f"{node.name}: forward takes more than one input")
            source = node
        elif node.op == "output":
            sink = node
        else:
            resolved = _resolve(node, side, gm)
            if resolved is _UNRESOLVED:
                nodes.append(node)
            else:
                side[node] = resolved
    ops: list[tuple[str, Any]] = []
    start = source
    for seg in _segments(source, nodes, sink, side):
        ops.append(_segment_op(seg, start, side, mods))
        start = seg[-1]
    return ops, True, None


def _tensor_args(node, side: dict) -> list:
    return [a for a in _flat_args(node) if isinstance(a, torch.fx.Node) and a not in side]


def _segments(source, nodes: list, sink, side: dict) -> list[list]:
    """``nodes`` (topological order) split after every cut node: a node ``n`` such that no
    edge of the data flow jumps over it (every path from the input to the output passes
    through it)."""
    order = [source, *nodes, sink]
    pos = {n: i for i, n in enumerate(order)}
    last_use = dict.fromkeys(order, 0)
    for v in order[1:]:
        for u in _tensor_args(v, side):
            last_use[u] = max(last_use[u], pos[v])
    segments, cur, far = [], [], last_use[source]
    for n in nodes:
        cur.append(n)
        if far <= pos[n]:  # nothing before n is used after it: a cut
            segments.append(cur)
            cur = []
        far = max(far, last_use[n])
    if cur or (nodes and _tensor_args(sink, side) != [nodes[-1]]):
        raise AdaptError("the module's output is not the last operation of a chain")
    return segments


def _segment_op(seg: list, start, side: dict, mods: dict) -> tuple[str, Any]:
    """One operation from a stretch of the graph between two cut nodes (see :func:`_ops`)."""
    node = seg[-1]
    if len(seg) == 1 and _tensor_args(node, side) == [start]:
        args, kwargs = _bind(node.args, side, start), _bind(node.kwargs, side, start)
        if node.op == "call_module":
            return node.target, mods[node.target]
        if node.op == "call_method" and node.target in ("view", "reshape") and any(
                isinstance(a, torch.fx.Node) and a in side for a in node.args):
            return ".flatten", lambda x: x.flatten(1)  # x.view(x.size(0), -1)
        if node.op == "call_function" and node.target in _FUNCTIONAL_POOLS:
            return node.name, _pool_module(node.name, list(args[1:]), kwargs)
        if node.op == "call_function":
            fn = node.target
            return (getattr(fn, "__name__", str(fn)),
                    lambda x, fn=fn, a=args, k=kwargs: fn(*_put(a, x), **_put(k, x)))
        if node.op == "call_method":
            meth = node.target
            return (f".{meth}", lambda x, m=meth, a=args, k=kwargs:
                    getattr(x, m)(*_put(a[1:], x), **_put(k, x)))
        raise AdaptError(f"{node.name}: unsupported operation {node.op}")
    inner = [n for n in seg if n.op == "call_module" and isinstance(
        mods[n.target], nn.Linear | nn.Conv2d | nn.modules.batchnorm._BatchNorm)]
    if inner:
        joins = [n for n in seg if _is_join(n) and len(_tensor_args(n, side)) == 2]
        if joins:
            raise _SkipConnection(f"{joins[0].name}: a skip connection (the sum of two "
                                  "branches, as in residual BNNs: binary ResNets, Bi-Real-Net) "
                                  f"around {inner[0].target}")
        raise AdaptError(f"{node.name}: only a chain of one-input operations can be adapted "
                         f"(branches around {inner[0].target})")
    return "(" + " -> ".join(n.name for n in seg) + ")", _Subgraph(seg, start, side, mods)


class _Subgraph:
    """A stretch of the traced graph with one input and one output, run node by node."""

    def __init__(self, seg: list, start, side: dict, mods: dict) -> None:
        self.seg, self.start, self.side, self.mods = seg, start, side, mods

    def __call__(self, x: Tensor) -> Tensor:
        env = {self.start: x}

        def val(a):
            if isinstance(a, torch.fx.Node):
                return env[a] if a in env else self.side[a]
            return a

        for n in self.seg:
            args = torch.fx.node.map_aggregate(n.args, val)
            kwargs = torch.fx.node.map_aggregate(n.kwargs, val)
            if n.op == "call_module":
                env[n] = self.mods[n.target](*args, **kwargs)
            elif n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                raise AdaptError(f"{n.name}: unsupported operation {n.op}")
        return env[self.seg[-1]]


_UNRESOLVED = object()


class _Chain:
    """Where the chain's tensor goes in a bound argument list."""


_CHAIN = _Chain()


def _flat_args(node) -> list:
    out: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), out.append)
    return out


def _resolve(node, side: dict, gm):
    """The value of a node computed from shapes/devices/constants only (``_UNRESOLVED``
    otherwise): ``x.shape``, ``x.size()``, ``x.device``, ``x.shape[0]``, and constants built
    from them -- with a symbolic batch size, a ``size`` is kept as a marker, not a number."""
    if node.op == "get_attr":  # a parameter or buffer used in forward: a constant
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj.detach() if isinstance(obj, Tensor) else obj
    if node.op == "call_function" and node.target is getattr and node.args[1] in _ATTRS:
        return {"shape": "size", "device": torch.device("cpu"),
                "dtype": torch.float32}[node.args[1]]
    if node.op == "call_method" and node.target in ("size", "dim"):
        return "size"
    if node.op == "call_function" and node.target is operator.getitem and \
            node.args[0] in side and side[node.args[0]] == "size":
        return "size"
    nodes = [a for a in _flat_args(node) if isinstance(a, torch.fx.Node)]
    if node.op == "call_function" and all(a in side for a in nodes) and not any(
            isinstance(side[a], str) for a in nodes):  # a constant built from x.device
        try:
            return node.target(*_bind(node.args, side, None), **_bind(node.kwargs, side, None))
        except Exception:  # noqa: BLE001 -- not a constant after all
            return _UNRESOLVED
    return _UNRESOLVED


def _bind(args, side: dict, prev):
    """``args`` with resolved nodes replaced by their values and the chain node by
    :data:`_CHAIN` (positions kept: ``1.0 - x`` stays ``1.0 - x``)."""
    def one(a):
        if isinstance(a, torch.fx.Node):
            if a is prev:
                return _CHAIN
            return side[a]
        return a
    return torch.fx.node.map_aggregate(args, one)


def _put(args, x):
    """``args`` with :data:`_CHAIN` replaced by the tensor ``x``."""
    if isinstance(args, dict):
        return {k: _put(v, x) for k, v in args.items()}
    if isinstance(args, list | tuple):
        return type(args)(_put(a, x) for a in args) if not isinstance(args, torch.Size) else args
    return x if args is _CHAIN else args


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
    if _is_softmax(desc, op):
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
    if desc in (".clone", ".contiguous", ".detach", "clone", "contiguous", "detach"):
        return "drop"  # an identity (x.clone(), ...): nothing to map
    line = _line(ref, y)
    if line == (1.0, 0.0) and _identity_far(op, x.dim()):
        return "drop"  # x - 0, x * 1 (a TensorNorm's unit parameters): nothing to map
    if line is not None and line != (1.0, 0.0):
        return "affine"  # a positive scale / shift: Scale, TensorNorm, x * s + t
    if y.shape == ref.shape and torch.equal(torch.sign(y), torch.sign(ref)) and bool(
            (torch.diff(y) >= 0).all()):
        # keeps every sign: hardtanh / clamp (piecewise identity) or a squashing function
        return "clip" if torch.equal(y, ref.clamp(float(y.min()), float(y.max()))) \
            else "squash"
    raise AdaptError(f"{_name(desc, op)}: not a recognized BNN operation (layer, "
                     "BatchNorm, sign-like activation, hardtanh, max-pool, flatten)")


def _line(ref: Tensor, y: Tensor) -> tuple[float, float] | None:
    """``(c1, c0)`` with ``c1 > 0`` if ``y = c1 ref + c0`` on the probe values to float32
    rounding (``4e-6 max |y|``), else ``None``."""
    if y.shape != ref.shape or not bool(torch.isfinite(y).all()):
        return None
    r, v = ref.double(), y.double()
    c1 = float((v[-1] - v[0]) / (r[-1] - r[0]))
    c0 = float(v[0] - c1 * r[0])
    if not c1 > 0 or not bool(((v - (c1 * r + c0)).abs() <= 4e-6 * float(v.abs().max())
                               + 1e-12).all()):
        return None
    return (1.0, 0.0) if torch.equal(y, ref.to(y.dtype)) else (c1, c0)


def _affine(desc: str, op: Any, x: Tensor) -> tuple[float, float]:
    """The ``(c1, c0)`` of an operation :func:`_kind` found affine (probed again)."""
    probe = _probe(x.dtype).reshape(1, -1) if x.dim() == 2 else \
        _probe(x.dtype).reshape(1, -1, 1, 1)
    y = _call(_name(desc, op), "the probe values", op, probe)
    line = _line(_probe(), (y.value if hasattr(y, "value") else y).reshape(-1))
    assert line is not None  # noqa: S101 -- _kind found it affine on the same probe
    return line


def _sign_at_zero(desc: str, op: Any, dim: int) -> float:
    """What a sign activation returns at exactly 0 (+1: the library's convention)."""
    z = torch.zeros((1, 1) if dim == 2 else (1, 1, 1, 1))
    y = _call(_name(desc, op), "an input of 0", op, z)
    return float((y.value if hasattr(y, "value") else y).reshape(-1)[0])


def _identity_far(op: Any, dim: int) -> bool:
    """``op`` leaves values far outside the probe range unchanged too (so it is not a clip
    with a wide range, such as ``Hardtanh(-10, 10)``)."""
    far = torch.tensor([-1e6, -1e3, 1e3, 1e6])
    far = far.reshape(1, -1) if dim == 2 else far.reshape(1, -1, 1, 1)
    try:
        with torch.no_grad():
            y = op(far.clone())
    except Exception:  # noqa: BLE001 -- it cannot take the values: not an identity
        return False
    y = y.value if hasattr(y, "value") else y
    return isinstance(y, Tensor) and y.shape == far.shape and torch.equal(y, far)


def _is_softmax(desc: str, op: Any) -> bool:
    """A softmax / log_softmax (module, function or method): dropped after the last layer."""
    return isinstance(op, nn.Softmax | nn.LogSoftmax) or desc in (
        "softmax", "log_softmax", ".softmax", ".log_softmax")


def _lib_sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _binary(layer: nn.Module, x: Tensor, wb: Tensor | None = None,
            bias: Tensor | None = None) -> Tensor:
    """``r = linear/conv(x, sign(W), bias)`` (``wb``: other binary weights; the bias inside
    the product, which rounds differently from adding it after)."""
    if wb is None:
        wb = torch.where(layer.weight >= 0, 1.0, -1.0).to(layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        return F.linear(x, wb, bias)
    return F.conv2d(x, wb, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _channels(t: Tensor, c: int) -> Tensor:
    """``(N, C[, H, W])`` -> ``(C, -1)``: one row per output channel."""
    return t.transpose(0, 1).reshape(c, -1)


class _Form:
    """How a user's layer computes from the library's ``r = linear/conv(x, sign(W))``::

        out = alpha_c r + b_c

    ``alpha``: ``(C,)`` float64 positive per-channel weight scales (``None``: 1; XNOR-Net's
    ``mean |W_o|``, Brevitas' per-tensor scale); ``bias``: ``(C,)`` float64 (``None``: no
    bias; a real bias or a binarized one, ``sign(b)``). ``exact``: ``out`` equals the library's
    bias-free layer bit for bit (no scale, no bias)."""

    def __init__(self, alpha: Tensor | None, bias: Tensor | None) -> None:
        self.alpha, self.bias = alpha, bias

    @property
    def exact(self) -> bool:
        return self.alpha is None and self.bias is None

    def scale(self, factor: float, c: int) -> None:
        """The layer reads ``factor`` times the library's input (the first layer's input
        grid, :func:`_input_grid`): ``alpha <- factor alpha`` over its ``c`` channels."""
        if factor != 1.0:
            one = torch.ones(c, dtype=torch.float64)
            self.alpha = (self.alpha if self.alpha is not None else one) * factor

    def describe(self) -> str:
        parts = [] if self.alpha is None else ["a weight scale"]
        return " and ".join(parts + ([] if self.bias is None else ["a bias"]))


def _bias_candidates(layer: nn.Module) -> list[Tensor | None]:
    """No bias, the layer's bias, and its sign (codes that binarize the bias too)."""
    b = getattr(layer, "bias", None)
    if b is None:
        return [None]
    b = b.detach()
    return [b, torch.where(b >= 0, 1.0, -1.0).to(b.dtype), torch.sign(b), None]


def _fit_form(layer: nn.Module, x: Tensor, out: Tensor) -> _Form | None:
    """The :class:`_Form` of ``out = layer(x)``, or ``None`` (not a binarized layer).

    Bit-equal forms first (no scale: ``linear(x, sign W, b)`` or ``linear(x, sign W) + b``),
    then per-channel scales fitted as the median of ``(out - b) / r`` over the nonzero ``r``
    and accepted if every output is within float32 rounding (``1e-5 max |out|``)."""
    r = _binary(layer, x)
    if out.shape != r.shape:
        return None
    c = r.shape[1]
    shape = (1, c) + (1,) * (r.dim() - 2)
    for b in _bias_candidates(layer):
        if b is None and torch.equal(out, r):
            return _Form(None, None)
        if b is not None and (torch.equal(out, r + b.view(shape)) or torch.equal(
                out, _binary(layer, x, bias=b))):
            return _Form(None, b.double())
    rc, tol = _channels(r.double(), c), 1e-5 * float(out.abs().max()) + 1e-12
    for b in _bias_candidates(layer):
        oc = _channels(out.double() - (0.0 if b is None else b.double().view(shape)), c)
        ratio = torch.where(rc != 0, oc / torch.where(rc != 0, rc, 1.0), math.nan)
        alpha = torch.nanmedian(ratio, dim=1).values
        alpha = torch.where(torch.isnan(alpha), 1.0, alpha)  # a channel never reached
        if bool((alpha <= 0).any()):
            continue
        if bool(((oc - alpha[:, None] * rc).abs() <= tol).all()):
            return _Form(alpha, None if b is None else b.double())
    return None


def _why_not_binary(desc: str, layer: nn.Module, x: Tensor, out: Tensor) -> str:
    """The one-line refusal of a layer that no :class:`_Form` explains: latent weights exactly
    0 that the user's binarization maps to 0 (``torch.sign``), or not binarized at all."""
    zeros = int((layer.weight == 0).sum())
    if zeros and _fit_form_with(layer, x, out, torch.sign(layer.weight.detach())):
        return (f"{desc} ({type(layer).__name__}): {zeros} latent weight(s) are exactly 0 and "
                "your binarization maps them to 0 (torch.sign); bnn_tol stores one sign bit "
                "per weight (sign(0) = +1): set them to a tiny nonzero value (e.g. "
                "w[w == 0] = 1e-8) or binarize with torch.where(w >= 0, 1, -1)")
    if _fit_form_with(layer, x, out, layer.weight.detach()):
        return (f"{desc} ({type(layer).__name__}) is a full-precision layer (its real weights "
                "are used as they are): every stored layer of a bnn_tol BNN is binary; "
                "binarize it (e.g. BinaryNet's BinarizeLinear) and retrain")
    return (f"{desc} ({type(layer).__name__}): its output is not linear/conv(x, alpha "
            "sign(weight)) + bias: not a binarized layer")


def _fit_form_with(layer: nn.Module, x: Tensor, out: Tensor, wb: Tensor) -> bool:
    """``out`` is ``linear/conv(x, wb)`` plus a candidate bias, to float32 rounding."""
    r = _binary(layer, x, wb.to(layer.weight.dtype))
    if r.shape != out.shape:
        return False
    tol = 1e-5 * float(out.abs().max()) + 1e-12
    shape = (1, r.shape[1]) + (1,) * (r.dim() - 2)
    return any(bool(((out - r - (0 if b is None else b.view(shape))).abs() <= tol).all())
               for b in _bias_candidates(layer))


def _pool_k(op) -> int:
    """Kernel of a max-pool with stride = kernel and no padding (else refused)."""
    if not isinstance(op, nn.MaxPool2d):
        raise AdaptError("functional max-pooling: use nn.MaxPool2d so its kernel is known")
    k = op.kernel_size if isinstance(op.kernel_size, int) else op.kernel_size[0]
    stride = op.stride if isinstance(op.stride, int) else op.stride[0]
    if stride != k or op.padding not in (0, (0, 0)) or op.dilation not in (1, (1, 1)):
        raise AdaptError("only max-pooling with stride = kernel, no padding or dilation")
    return int(k)


def _fold(bn: nn.Module | None, c: int, form: _Form, post: tuple[float, float] | None = None,
          conv: bool = False) -> nn.Module:
    """The library's BatchNorm for a block whose user code computes
    ``c1 BN(alpha a + b) + c0`` from the library's pre-activation ``a`` (``post = (c1, c0)``:
    an output ``Scale``/``TensorNorm``; ``bn`` ``None``: no BatchNorm, i.e. mean 0, variance 1,
    eps 0, gamma 1, beta 0)::

        c1 BN(alpha a + b) + c0 = BN'(a):  gamma' = c1 gamma alpha,  mu' = (mu - b) / alpha,
                                           beta' = c1 beta + c0,      var and eps unchanged

    (exact in real arithmetic; ``alpha > 0``, ``c1 > 0``). With nothing to fold, ``bn`` itself."""
    if form.exact and post is None and bn is not None:
        return bn
    kind = nn.BatchNorm2d if conv else nn.BatchNorm1d
    out = kind(c, eps=float(bn.eps) if bn is not None else 0.0)
    out.eval()
    with torch.no_grad():
        if bn is not None:
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            if bn.affine:
                out.weight.copy_(bn.weight)
                out.bias.copy_(bn.bias)
        mu, gamma, beta = (t.double() for t in (out.running_mean, out.weight, out.bias))
        alpha = form.alpha if form.alpha is not None else torch.ones(c, dtype=torch.float64)
        b = form.bias if form.bias is not None else torch.zeros(c, dtype=torch.float64)
        c1, c0 = post if post is not None else (1.0, 0.0)
        out.running_mean.copy_((mu - b) / alpha)
        out.weight.copy_(c1 * gamma * alpha)
        out.bias.copy_(c1 * beta + c0)
    return out


def adapt(module: nn.Module, example: Tensor, *, in_shape=None, sign_zero: int | None = None,
          transform: Normalize | None = None):
    """Convert ``module`` (a user's BNN) into a bnn_tol BNN, verified on ``example`` and on
    probe batches spanning the input range.

    Args:
        module: the user's model, a ``torch.nn.Module`` (eval mode is used; its state is not
            modified). Its operations run on adapt's own copies of the example and of the probe
            values, so in-place activations (``Hardtanh(inplace=True)``, ``x.sign_()``) change
            neither ``example`` nor what a later adaptation probes with.
        example: a float32 batch of the model's inputs made from 8-bit pixels by ``transform``
            (``(N, C, H, W)``, or ``(N, features)`` with ``in_shape``).
        in_shape: ``(C, H, W)`` when ``example`` is flat (three positive integers holding its
            features); with a 4-D example it may be given and must equal its shape.
        sign_zero: what the user's sign does at exactly 0: ``None`` (refuse if the input of a
            sign that does not map 0 to +1 is exactly 0 on the example), ``+1``, ``-1`` or
            ``0`` (as ``torch.sign``).
        transform: how the user's model got its inputs from pixels ``p``:
            :class:`bnn_tol.data.Normalize` (``ToTensor`` then ``Normalize(mean, std)``;
            ``Normalize()`` is ``[0, 1]``, ``Normalize(0.5, 0.5)`` is ``2x - 1``), or ``None``
            for the library's ``(p - 128) / 128``.

    **Input transform.** What ``forward`` does before the first layer (``2.0 * x - 1``, an
    input quantizer such as Brevitas' 8-bit ``QuantIdentity``, a flatten) is composed with
    ``transform`` into the pixel -> first-layer-input map ``T(p)``, which must be one integer
    grid ``T(p) = u q_p`` (``u > 0``; affine transforms whose zero point ``255 mean`` is a
    whole or half pixel value, and input quantizers; per channel with one ``u`` for all
    channels). The adapted model records it as its :class:`~bnn_tol.data.InputGrid`
    ``x = q_p / S`` (``S`` the power of two nearest to ``1 / u``), so its first layer is exact
    integer arithmetic on ``q``; the factor ``u S`` is folded into the first BatchNorm.
    Otherwise (``Normalize(0.1307, 0.3081)``, CIFAR's per-channel stds) the grid is rounded,
    ``q_p = round(T(p) / u)`` (:meth:`bnn_tol.data.InputGrid.fit`), with ``error =
    max |q_p - T(p) / u|`` recorded on the grid: the adapted model's first-layer
    pre-activations ``k = sum_i w_i q_i`` are within ``bound = fan_in (error + 2^-23 q_max)``
    of the original's (``2^-23 q_max fan_in`` allows for float32 rounding in the original),
    so its hidden bits are the original's on every sample whose ``k`` are all farther than
    ``bound`` from their thresholds. Samples with some ``k`` within ``bound`` (or, for a
    single-layer model, top-two scores within the bound's effect) are *undecided*: left out of
    the comparison below and counted in ``model.meta["input"]`` (``unit`` ``u``, ``error``,
    ``bound``, ``undecided`` per verification batch). Residual graphs with a rounded grid are
    refused (the bound is not carried through real-valued shortcuts).

    **Folded into the BatchNorms** (exact in real arithmetic): layer biases (``linear(x, W,
    b)``, ``linear(x, W) + b``, binarized ``sign(b)``; before a BN they shift its mean, without
    one they become the threshold), weight scales ``alpha sign(W)`` per tensor or per output
    channel (XNOR-Net's ``mean |W_o|``, Brevitas' scale), and positive scales / shifts after
    a block (an output ``Scale`` or Brevitas' ``TensorNorm``):
    ``c1 BN(alpha a + b) + c0 = BN'(a)``.

    What is verified: the adapted model's class scores equal the module's (before a trailing
    softmax) on ``example`` and on probe batches of pixels -- dark, bright, uniform random,
    and constant images (black, white, mid-gray) -- bit for bit, or, where something was
    folded (a scale, bias, input factor), with equal predictions and scores within
    ``1e-4 max |score|`` (with a rounded input grid: on the samples the bound decides). A
    module walk (``torch.fx`` cannot trace ``forward``, e.g.
    data-dependent control flow such as ``if x.mean() > 0: h = -h``) sees only the registered
    modules, and the probes are what shows whether ``forward`` does more with them.

    Returns:
        A :class:`~bnn_tol.models.BNN` (``config["name"] == "custom"``) in eval mode, taking
        inputs on its ``input_grid`` (:func:`bnn_tol.data.grid_of`).

    Raises:
        AdaptError: one line naming the first operation or block that cannot be mapped and why
            (an unsupported activation by name: ReLU, Tanh, Softsign, GELU, ...; a skip
            connection; latent weights exactly 0 binarized to 0; an input transform off any
            integer grid), the probe batch on which the adapted model differs, a ``module``
            that is not an ``nn.Module``, a bad ``example``, ``in_shape``, ``sign_zero`` or
            ``transform``, or the user's ``forward`` failing on the example or a probe.
    """

    if not isinstance(module, nn.Module):
        raise AdaptError(f"module must be a torch.nn.Module (your BNN), got "
                         f"{type(module).__name__}")
    if sign_zero is not None and (isinstance(sign_zero, bool) or not isinstance(
            sign_zero, numbers.Integral) or sign_zero not in (-1, 0, 1)):
        raise AdaptError(f"sign_zero must be None, -1, 0 or +1 (what your sign does at 0), got "
                         f"{sign_zero!r}")
    if transform is not None and not isinstance(transform, Normalize):
        raise AdaptError(f"transform must be None (the library's (p - 128) / 128) or "
                         f"bnn_tol.data.Normalize(mean, std), got {type(transform).__name__}")
    if not isinstance(example, Tensor) or example.dim() not in (2, 4) or len(example) == 0:
        raise AdaptError("example must be a non-empty batch (N, C, H, W) or (N, features)")
    example = example.detach()
    if example.dtype != torch.float32:
        raise AdaptError(f"example must be float32 inputs made from 8-bit pixels "
                         f"(bnn_tol.data.to_float or transform.to_float), got {example.dtype}")
    user = transform if transform is not None else _LIBRARY
    try:
        pixels = user.pixels(example)
    except InvalidArgument as e:
        raise AdaptError(f"example does not fit {user!r}: {e}") from None
    if pixels is None:
        raise AdaptError(
            f"example is not {user!r} of 8-bit pixels: pass the transform the model was trained "
            "with (transform=bnn_tol.data.Normalize(mean, std) for ToTensor/Normalize inputs, "
            "None for bnn_tol's (p - 128) / 128)")
    shape = _in_shape(example, in_shape)
    ctx = _Ctx(module, example, pixels, shape, sign_zero, user)
    was = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            model = _adapt(ctx)
    finally:
        for m, flag in was:
            m.training = flag
    model.meta = {"adapted_from": type(module).__name__, **model.meta}
    if transform is not None:
        model.meta["transform"] = {k: list(v) if isinstance(v, tuple) else float(v) for k, v in
                                   (("mean", transform.mean), ("std", transform.std))}
    return model


class _LibraryInput:
    """The library's input convention ``(p - 128) / 128`` as a user transform."""

    def to_float(self, images: Tensor) -> Tensor:
        return INPUT.to_float(images)

    def pixels(self, x: Tensor) -> Tensor | None:
        q = x.double() * INPUT.scale
        lo, hi = INPUT.q_range
        if not torch.equal(q, torch.round(q)) or float(q.min()) < lo or float(q.max()) > hi:
            return None
        return (q + INPUT.offset).to(torch.uint8)

    def __repr__(self) -> str:
        return "on bnn_tol's input grid (p - 128) / 128"


_LIBRARY = _LibraryInput()


@dataclass
class _Ctx:
    """What one adaptation works on: the module, the example (the user's inputs) and its
    pixels, the per-sample shape, ``sign_zero``, the user's input convention."""

    module: nn.Module
    example: Tensor
    pixels: Tensor
    shape: tuple[int, int, int]
    sign_zero: int | None
    user: Any
    unit: float | None = None  # the input grid's step in the user's units (_input_grid)
    residual: Tensor | None = None  # float64 (C or 1, 256): q - T / unit (_input_grid)


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


def _adapt(ctx: _Ctx):
    """Map the traced operations, build and verify; if the trace is not a chain or its mapping
    fails, the leaf-module walk (inferring functional signs and flattens), verified on the probe
    batches like any other. The traced error is reported when the walk fails too; a traced
    model that maps but does not verify is refused as it is."""
    module = ctx.module
    if not any(isinstance(m, nn.Linear | nn.Conv2d) for m in module.modules()):
        raise AdaptError(f"no Linear/Conv2d layer found in the module ({type(module).__name__})")
    try:
        ops, traced, untraceable = _ops(module)
    except _SkipConnection as skip:  # a residual BNN: a graph of operations
        try:
            return _build_graph_verified(ctx, _map_graph(ctx))
        except AdaptError as e:
            raise AdaptError(f"{skip}: mapped as a residual graph, {e}") from None
    except AdaptError as first:  # traced, but not a chain (a constant built from x, ...):
        try:  # the module walk may still map it; verified like any other
            return _build_verified(ctx, _map_ops(ctx, _leaves(module), False), "")
        except AdaptError:
            raise first from None
    if not traced:
        why = f" (torch.fx could not trace forward: {untraceable})"
        try:
            mapped = _map_ops(ctx, ops, False)
            return _build_verified(ctx, mapped, why)
        except AdaptError as e:
            skip = _walk_divergence(ctx, ops)
            if skip:  # a shortcut: reconstruct the dataflow from hooks, verify it
                try:
                    return _build_graph_verified(ctx, _map_graph(ctx, _observed_graph(ctx)))
                except AdaptError as g:
                    raise AdaptError(f"{skip}{why}; reconstructing its dataflow: {g}") from None
            if why in str(e):
                raise
            raise AdaptError(f"{e} -- the module walk{why} takes the registered modules in "
                             "order: is every registered layer used, in that order?") from None
    try:
        mapped = _map_ops(ctx, ops, True)
    except AdaptError as first:
        try:
            return _build_verified(ctx, _map_ops(ctx, _leaves(module), False), "")
        except AdaptError:
            raise first from None
    return _build_verified(ctx, mapped, None)


def _record_calls(ctx: _Ctx, leaves: list[tuple[str, Any]]) -> tuple[list[list], Any]:
    """One run of the module on (a copy of) the example with the calls of the registered
    leaf modules recorded in call order, ``[name, copy of its input, copy of its output]``
    (the hooks return nothing: the module computes as it would); and the module's output.

    Raises:
        AdaptError: the module fails on the example.
    """
    events: list[list] = []

    def pre(name: str, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            events.append([name, args[0].detach().clone(), None])

    def post(name: str, out: Any) -> None:
        out = out.value if hasattr(out, "value") else out
        if isinstance(out, Tensor):
            for ev in reversed(events):
                if ev[0] == name and ev[2] is None:
                    ev[2] = out.detach().clone()
                    break

    handles = []
    for name, mod in leaves:
        if isinstance(mod, nn.Module):
            handles += [mod.register_forward_pre_hook(lambda _m, a, name=name: pre(name, a)),
                        mod.register_forward_hook(lambda _m, _a, o, name=name: post(name, o))]
    try:
        out = _call(f"the module ({type(ctx.module).__name__})", "the example", ctx.module,
                    ctx.example.clone())
    finally:
        for h in handles:
            h.remove()
    return events, (out.value if hasattr(out, "value") else out)


def _observed_graph(ctx: _Ctx) -> torch.fx.GraphModule:
    """The dataflow of a forward that torch.fx cannot trace (data-dependent control flow such
    as ``if residual.data.max() > 1``), reconstructed from one run on the example.

    Every registered leaf module's calls are recorded with copies of their input and output.
    Each call's input must then be, bit for bit, the input ``x``, an earlier output, its
    flatten, its max-pooling (kernel 2, 3 or 4), or the sum of two earlier values (the
    shortcut ``out += residual``); the module's output likewise. The result is a torch.fx
    graph of those calls (and the ``add`` / ``flatten`` / pooling between them) that
    :func:`_map_graph` maps like a traced one; the probe batches then verify it. A layer called
    twice (shared weights) is refused.

    Raises:
        AdaptError: a call whose input is none of these (naming the module).
    """
    events, out = _record_calls(ctx, _leaves(ctx.module))
    graph = torch.fx.Graph()
    known = [(graph.placeholder("x"), ctx.example.clone())]
    layers_seen = set()

    def source(t: Tensor, what: str):
        for node, v in reversed(known):
            if v.shape == t.shape and torch.equal(v, t):
                return node
        for node, v in reversed(known):
            if v.dim() > 2 and t.dim() == 2 and v.flatten(1).shape == t.shape and torch.equal(
                    v.flatten(1), t):
                new = graph.call_method("flatten", (node, 1))
                known.append((new, t))
                return new
        for node, v in reversed(known):
            for k in (2, 3, 4):
                if v.dim() == 4 and v.shape[-1] // k == t.shape[-1] and v.shape[1] == t.shape[1]:
                    p = F.max_pool2d(v, k)
                    if p.shape == t.shape and torch.equal(p, t):
                        new = graph.call_function(F.max_pool2d, (node, k))
                        known.append((new, t))
                        return new
        recent = known[-40:]
        for i, (a, va) in enumerate(recent):
            for b, vb in recent[i + 1:]:
                if va.shape == t.shape == vb.shape and torch.equal(va + vb, t):
                    new = graph.call_function(operator.add, (b, a))
                    known.append((new, t))
                    return new
        raise AdaptError(f"{what}: its input is not the input, an earlier module's output (or "
                         "its flatten, max-pool, or the sum of two) -- forward does more than "
                         "this reconstruction of a forward torch.fx cannot trace can see")

    for name, x_in, y in events:
        if y is None:
            raise AdaptError(f"{name}: no tensor output recorded")
        mod = ctx.module.get_submodule(name)
        if isinstance(mod, nn.Linear | nn.Conv2d):
            if name in layers_seen:
                raise AdaptError(f"{name}: a layer called twice (shared weights)")
            layers_seen.add(name)
        node = graph.call_module(name, (source(x_in, name),))
        known.append((node, y))
    graph.output(source(out, "the module's output"))
    return torch.fx.GraphModule(ctx.module, graph)


def _map_graph(ctx: _Ctx, gm: torch.fx.GraphModule | None = None
               ) -> tuple[list[dict], dict, InputGrid, bool]:
    """A traced forward with shortcuts as :class:`~bnn_tol.core.graph.GraphBNN` nodes.

    Every traced operation is run on the example (on copies: in-place activations change
    nothing) and mapped by behaviour as in a chain: binarized layers (their input binarized
    inside the layer becomes a ``sign`` node; a scale or bias becomes a BatchNorm, folded into
    the user's BatchNorm when that is the layer's only consumer), BatchNorms, sign-like
    activations, hardtanh, max-pooling, flatten, and sums of two tensors (``add``). The
    operations before the first layer are the input transform (:func:`_input_grid`).

    Returns:
        The node specs, ``{node name: (user layer or folded BatchNorm)}`` to copy, the input
        grid, and whether nothing was folded (bit-exact verification)."""
    if gm is None:
        gm = torch.fx.GraphModule(ctx.module, _Tracer().trace(ctx.module))
    mods = dict(gm.named_modules())
    side: dict = {}
    order = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        resolved = _resolve(node, side, gm)
        if resolved is _UNRESOLVED:
            order.append(node)
        else:
            side[node] = resolved
    users: dict = {}
    for node in order:
        for a in _tensor_args(node, side):
            users.setdefault(a, []).append(node)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    values = {next(n for n in gm.graph.nodes if n.op == "placeholder"): ctx.example.clone()}
    nodes: list[dict] = []
    state: dict = {}
    lib: dict = {}  # fx node -> (library node name or "x", pending _Form or None)
    pre: list[tuple[str, Any]] = []
    grid, exact, first_seen = None, True, False

    def value(a):
        if isinstance(a, torch.fx.Node):
            v = values[a] if a in values else side[a]
            return v.clone() if isinstance(v, Tensor) else v
        return a

    def emit(spec: dict, module=None) -> str:
        name = f"n{len(nodes)}"
        nodes.append({"name": name, **spec})
        if module is not None:
            state[name] = module
        return name

    def settle(a) -> str:
        """The library name of ``a``'s value, a pending scale/bias materialized as a BN."""
        name, form = lib[a]
        if form is None or form.exact:
            return name
        c = int(values[a].shape[1])
        conv = values[a].dim() == 4
        bn = _fold(None, c, form, conv=conv)
        new = emit({"op": "bn", "inputs": [name], "features": c, "conv": conv,
                    "eps": float(bn.eps), "affine": True}, bn)
        lib[a] = (new, None)
        return new

    placeholder = next(iter(values))
    lib[placeholder] = ("x", None)
    for node in order:
        args = torch.fx.node.map_aggregate(node.args, value)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
        if node.op == "call_module":
            op = mods[node.target]
            desc = str(node.target)
            y = _call(_name(desc, op), "the example", functools.partial(op, **kwargs), *args)
        elif node.op == "call_function":
            op = node.target
            desc = getattr(op, "__name__", str(op))
            y = _call(desc, "the example", functools.partial(op, **kwargs), *args)
        elif node.target in ("view", "reshape") and any(
                isinstance(a, torch.fx.Node) and isinstance(side.get(a), str) for a in node.args):
            op, desc = None, ".flatten"  # x.view(x.size(0), -1)
            y = args[0].flatten(1)
        else:
            op = None
            desc = f".{node.target}"
            y = _call(desc, "the example", functools.partial(_method, node.target, kwargs),
                      *args)
        y = y.value if hasattr(y, "value") else y
        values[node] = y.clone() if isinstance(y, Tensor) else y
        ins = _tensor_args(node, side)
        if not first_seen:  # the input transform, up to the first layer
            if node.op == "call_module" and isinstance(op, nn.Linear | nn.Conv2d):
                first_seen = True
            else:
                if len(ins) != 1 or len(users.get(ins[0], [])) != 1:
                    raise AdaptError(f"{node.name}: the input feeds more than the first layer")
                pre.append((desc, mods[node.target] if node.op == "call_module" else
                            _Subgraph([node], ins[0], side, mods)))
                lib[node] = ("x", None)
                continue
        if _is_join(node) and len(ins) == 2:
            if node.kwargs.get("alpha", 1) != 1:
                raise AdaptError(f"{node.name}: a scaled sum (alpha)")
            lib[node] = (emit({"op": "add", "inputs": [settle(ins[0]), settle(ins[1])]}),
                         None)
            continue
        if len(ins) != 1:
            raise AdaptError(f"{node.name}: an operation on {len(ins)} tensors")
        src = ins[0]
        x_in = values[src]
        fn = mods[node.target] if node.op == "call_module" else (
            nn.Flatten() if desc == ".flatten" else _Subgraph([node], src, side, mods))
        if node.op == "call_module" and isinstance(op, nn.Linear | nn.Conv2d):
            form = _fit_form(op, x_in, y)
            name_in = settle(src) if lib[src][0] != "x" else "x"
            if form is None:
                found = _own_sign(op, x_in, y)
                if found is None:
                    raise AdaptError(_why_not_binary(desc, op, x_in, y))
                form, sign = found
                if sign is torch.sign and ctx.sign_zero is None and bool((x_in == 0).any()):
                    raise AdaptError(f"{desc}: it binarizes its input with torch.sign, and an "
                                     "input of the example is exactly 0: pass sign_zero=0")
                if grid is None:
                    pre.append(("the layer's own input sign", sign))
                else:
                    name_in = emit({"op": "sign", "inputs": [name_in]})
            if grid is None:
                grid, factor = _input_grid(ctx, pre, op.weight[0].numel())
                if grid.error:
                    raise AdaptError(
                        f"the input transform ({ctx.user!r}) is not an integer grid, and a "
                        "rounded grid is verified through the first layer's sign decisions, "
                        "which the real-valued shortcuts of a residual graph bypass: train "
                        "with a mean of k / 510 and one std for all channels (e.g. "
                        "Normalize(0.5, 0.5))")
                form.scale(factor, y.shape[1])
            spec = _layer_spec(desc, op, False)
            spec = {k: v for k, v in spec.items() if k in ("type", "in", "out", "kernel",
                                                          "padding")}
            lib[node] = (emit({"op": "binary", "inputs": [name_in], **spec}, op), form)
            exact &= form.exact
            continue
        kind = _kind(desc, fn, x_in)
        if kind == "bn":
            if fn.running_mean is None:
                raise AdaptError(f"{desc}: a BatchNorm without running statistics")
            name, form = lib[src]
            form = form if form is not None and len(users.get(src, [])) == 1 else None
            if form is None:
                name = settle(src)
            bn = _fold(fn, fn.num_features, form or _Form(None, None),
                       conv=isinstance(fn, nn.BatchNorm2d))
            lib[node] = (emit({"op": "bn", "inputs": [name], "features": int(fn.num_features),
                               "conv": isinstance(fn, nn.BatchNorm2d), "eps": float(bn.eps),
                               "affine": bool(bn.affine)}, bn), None)
        elif kind == "sign":
            if _sign_at_zero(desc, fn, x_in.dim()) != 1.0 and ctx.sign_zero is None and bool(
                    (x_in == 0).any()):
                raise AdaptError(f"{desc}: an input of this sign is exactly 0 on the example "
                                 "and it does not map 0 to +1: pass sign_zero")
            lib[node] = (emit({"op": "sign", "inputs": [settle(src)]}), None)
        elif kind == "clip":
            probe = _probe(x_in.dtype).reshape((1, -1) if x_in.dim() == 2 else (1, -1, 1, 1))
            yp = _call(_name(desc, fn), "the probe values", fn, probe)
            lib[node] = (emit({"op": "hardtanh", "inputs": [settle(src)],
                               "min": float(yp.min()), "max": float(yp.max())}), None)
        elif kind == "pool":
            k = _pool_k(fn if isinstance(fn, nn.MaxPool2d) else _pool_module(
                desc, list(torch.fx.node.map_aggregate(node.args[1:], value)), dict(kwargs)))
            lib[node] = (emit({"op": "pool", "inputs": [settle(src)], "kernel": k}), None)
        elif kind == "flatten":
            lib[node] = (emit({"op": "flatten", "inputs": [settle(src)]}), None)
        elif kind in ("drop", "softmax"):
            if kind == "softmax" and _tensor_args(out_node, side) != [node]:
                raise AdaptError(f"{desc}: softmax is only allowed as the last operation")
            lib[node] = lib[src]
        else:
            raise AdaptError(f"{_name(desc, fn)}: a {kind} operation in a residual graph")
    last = _tensor_args(out_node, side)
    if len(last) != 1:
        raise AdaptError("the module's output is not one tensor")
    settle(last[0])
    if nodes[-1]["name"] != lib[last[0]][0]:
        raise AdaptError("the module's output is not the last operation")
    return nodes, state, grid, exact


def _method(name: str, kwargs: dict, x: Any, *args: Any) -> Any:
    return getattr(x, name)(*args, **kwargs)


def _build_graph_verified(ctx: _Ctx, mapped) -> nn.Module:
    """Build the :class:`~bnn_tol.core.graph.GraphBNN` of :func:`_map_graph`, verify it."""
    nodes, state, grid, exact = mapped
    last = ctx.module
    n_classes = None
    with torch.no_grad():
        out = _reference(last, ctx.example, "the example")
        n_classes = int(out.shape[1])
    model = build("graph", nodes=nodes, in_shape=ctx.shape, n_classes=n_classes,
                  input_grid=None if grid == INPUT else grid.config())
    with torch.no_grad():
        for name, src in state.items():
            dst = model.ops[name]
            if isinstance(dst, nn.modules.batchnorm._BatchNorm):
                dst.load_state_dict(src.state_dict())
            else:
                dst.weight.copy_(src.weight)
    model.eval()
    _verify(ctx, model, exact=exact)
    return model


def _walk_divergence(ctx: _Ctx, leaves: list[tuple[str, Any]]) -> str | None:
    """Where ``forward`` feeds a registered module something other than what the walk's
    chain gives it (the previous module's output, flattened or binarized): a skip connection
    (residual blocks) or an operation the walk cannot see; ``None`` when none is found."""
    try:
        events, _ = _record_calls(ctx, leaves)
    except AdaptError:
        return None
    seen: dict[str, Tensor] = {}
    for name, x_in, _ in events:
        seen.setdefault(name, x_in)  # the first call's input
    x, prev = ctx.example.clone(), "the input"
    for name, mod in leaves:
        got = seen.get(name)
        if got is None:
            return None
        fits = [x, x.flatten(1), _lib_sign(x), torch.sign(x)]
        if not any(c.shape == got.shape and torch.equal(c, got) for c in fits):
            return (f"forward feeds {name} ({type(mod).__name__}) something other than the "
                    f"output of {prev}: a skip connection (residual block) or an operation "
                    "the module walk cannot see; residual BNNs are adapted from a torch.fx "
                    "trace of forward, which this forward does not allow")
        x = _call(name, "the example", mod, got.clone())
        x = x.value if hasattr(x, "value") else x
        prev = name
    return None


class _Block:
    """One block being mapped: the user's layer, its :class:`_Form`, its BatchNorm (or
    ``None``), an affine ``(c1, c0)`` after it (output ``Scale``/``TensorNorm``), the spec."""

    def __init__(self, layer: nn.Module, form: _Form, spec: dict) -> None:
        self.layer, self.form, self.spec = layer, form, spec
        self.bn: nn.Module | None = None
        self.post: tuple[float, float] | None = None
        self.kept: list[str] = []  # clip / squash operations before the sign
        self.pool_before_bn = False
        self.feeds_sign: nn.Module | None = None  # the user module whose output the sign reads

    @property
    def exact(self) -> bool:
        return self.form.exact and self.post is None

    def folded_bn(self) -> nn.Module:
        c = int(self.spec["out"])
        return _fold(self.bn, c, self.form, self.post, conv=self.spec["type"] == "conv")


def _build_verified(ctx: _Ctx, mapped, walk_why: str | None):
    """Build the BNN from the mapped blocks and verify it (``walk_why``: a module walk)."""
    blocks, assumed, grid = mapped
    spec = []
    bns = []
    for b in blocks:
        bn = b.folded_bn()
        bns.append(bn)
        spec.append({**b.spec, "bias": False, "bn_eps": float(bn.eps),
                     "bn_affine": bool(bn.affine)})
    model = build("custom", blocks=spec, in_shape=ctx.shape, n_classes=int(spec[-1]["out"]),
                  input_grid=None if grid == INPUT else grid.config())
    for block, b, bn in zip(model.blocks, blocks, bns, strict=True):
        block.layer.weight.copy_(b.layer.weight)
        block.bn.load_state_dict(bn.state_dict())
    model.eval()
    _verify(ctx, model, exact=all(b.exact for b in blocks), walk_why=walk_why, assumed=assumed)
    return model


def _layer_spec(desc: str, op: nn.Module, flatten: bool) -> dict:
    conv = isinstance(op, nn.Conv2d)
    if conv and (op.stride != (1, 1) or op.groups != 1 or op.dilation != (1, 1)
                 or op.kernel_size[0] != op.kernel_size[1] or op.padding[0] != op.padding[1]):
        raise AdaptError(f"{desc}: only square, stride-1, ungrouped convolutions")
    spec = {"type": "conv" if conv else "linear",
            "in": int(op.in_channels if conv else op.in_features),
            "out": int(op.out_channels if conv else op.out_features), "flatten": flatten}
    if conv:
        spec.update(kernel=int(op.kernel_size[0]), padding=int(op.padding[0]))
    return spec


def _own_sign(op: nn.Module, x: Tensor, out: Tensor) -> tuple[_Form, Any] | None:
    """A layer that binarizes its own input (BinaryNet: ``sign(x)`` inside the layer): its
    form and the sign it uses (the library's, or ``torch.sign`` where ``x`` has exact zeros),
    or ``None``."""
    form = _fit_form(op, _lib_sign(x), out)
    if form is not None:
        return form, _lib_sign
    if bool((x == 0).any()):
        form = _fit_form(op, torch.sign(x), out)
        if form is not None:
            return form, torch.sign
    return None


def _input_binarized(name: str, op: nn.Module, x: Tensor, out: Tensor,
                     sign_zero: int | None) -> _Form | None:
    """The form of a hidden layer that binarizes its own input (:func:`_own_sign`), or
    ``None``. An input exactly 0 that the layer maps to 0 (``torch.sign``) is refused unless
    ``sign_zero`` says the model does so."""
    found = _own_sign(op, x, out)
    if found is None:
        return None
    form, sign = found
    if sign is torch.sign and sign_zero is None:
        raise AdaptError(f"{name}: it binarizes its input with torch.sign, and an input of "
                         "the example is exactly 0 (torch.sign(0) = 0, the library's "
                         "sign(0) = +1): pass sign_zero=0 to say what the model does")
    return form


def _map_ops(ctx: _Ctx, ops, traced: bool):
    """Walk the operations on the example; return the :class:`_Block` s, what a module walk
    assumed (the functional signs it cannot see), and the input grid (:func:`_input_grid`)."""
    module, sign_zero = ctx.module, ctx.sign_zero
    x = ctx.example.clone()
    blocks: list[_Block] = []
    assumed: list[str] = []
    cur: _Block | None = None
    pending_flatten = False
    pre: list[tuple[str, Any]] = []  # operations before the first layer: the input transform
    grid = None

    def close(how: str | None = None) -> None:
        nonlocal cur
        if how is not None:
            assumed.append(how)
        blocks.append(cur)
        cur = None

    for i, (desc, op) in enumerate(ops):
        name = _name(desc, op)
        if grid is None and not isinstance(op, nn.Linear | nn.Conv2d):
            # before the first layer: the input transform (checked by _input_grid)
            if isinstance(op, nn.MaxPool2d) or desc in ("max_pool2d", "_max_pool2d"):
                raise AdaptError(f"{name}: max-pooling before the first layer")
            y = _call(name, "the example", op, x.clone())
            y = y.value if hasattr(y, "value") else y
            if y.shape != x.shape:
                if not (y.dim() == 2 and y.shape[0] == x.shape[0]
                        and y.shape[1] == x[0].numel()):
                    raise AdaptError(f"{name}: changes the input's shape {tuple(x.shape)} -> "
                                     f"{tuple(y.shape)} before the first layer")
                pending_flatten = True
            pre.append((desc, op))
            x = y
            continue
        kind = _kind(desc, op, x)
        if not traced and kind in ("layer", "pool") and cur is not None and cur.bn is not None:
            # module walk: a functional sign between BN and the next layer/pool is invisible
            close(f"a sign after {cur.kept[-1] if cur.kept else 'block ' + str(len(blocks))}")
            x = _lib_sign(x)
            if kind == "pool":
                blocks[-1].spec["pool"] = _pool_k(op)
                x = _call(name, "the example", op, x)
                continue
        if not traced and kind == "layer" and isinstance(op, nn.Linear) and x.dim() > 2:
            pending_flatten = True  # module walk: an invisible x.view(N, -1)
            x = x.flatten(1)
        if kind == "flatten":
            pending_flatten = True
        elif kind == "layer":
            out = _call(name, "the example", op, x)
            out = out.value if hasattr(out, "value") else out  # a Brevitas QuantTensor
            if cur is not None:  # BinaryNet style: the layer binarizes its own input
                form = _call(name, "the example", _input_binarized, name, op, x, out, sign_zero)
                if form is None and _fit_form(op, x, out) is None:
                    raise AdaptError(_why_not_binary(desc, op, x, out))
                if form is None:
                    why = f" ({', '.join(cur.kept)} {'is' if len(cur.kept) == 1 else 'are'} " \
                        "not a sign activation)" if cur.kept else ""
                    raise AdaptError(f"{desc}: a layer follows block {len(blocks)} without a "
                                     f"sign activation in between{why}")
                close()
            else:
                form = _call(name, "the example", _fit_form, op, x, out)
                if form is None and grid is None:  # a first layer that binarizes the image
                    found = _call(name, "the example", _own_sign, op, x, out)
                    if found is not None:
                        form = found[0]
                        pre.append(("the layer's own input sign", found[1]))
                if form is None:
                    raise AdaptError(_why_not_binary(desc, op, x, out))
            if grid is None:  # the first layer: its input grid and the factor to fold
                grid, factor = _input_grid(ctx, pre, op.weight[0].numel())
                form.scale(factor, out.shape[1])
            if bool((op.weight == 0).any()) and sign_zero not in (1, None):
                raise AdaptError(f"{desc}: latent weights exactly 0 binarize to {sign_zero}, "
                                 "the library binarizes them to +1")
            cur = _Block(op, form, _layer_spec(desc, op, pending_flatten or (
                not isinstance(op, nn.Conv2d) and not blocks)))  # the first block sees 4-D
            cur.feeds_sign = op
            pending_flatten = False
            x = out
            continue
        elif kind == "bn":
            if cur is None or cur.bn is not None or cur.post is not None or cur.kept:
                raise AdaptError(f"{desc}: BatchNorm without a preceding binarized layer")
            if op.running_mean is None or op.running_var is None:
                raise AdaptError(f"{name}: a BatchNorm without running statistics "
                                 "(track_running_stats=False) normalizes with each batch's own "
                                 "statistics; its threshold is undefined")
            cur.bn = op
            cur.feeds_sign = op
            if cur.pool_before_bn:
                gamma = op.weight if op.affine else torch.ones(op.num_features)
                if bool((gamma <= 0).any()):
                    raise AdaptError(f"{desc}: max-pool before a BatchNorm with gamma <= 0 "
                                     "does not commute with it; cannot map the block")
        elif kind == "affine":
            if cur is None or cur.kept:
                raise AdaptError(f"{name}: a scale/shift outside layer -> [BatchNorm] -> sign")
            c1, c0 = _affine(desc, op, x)
            p1, p0 = cur.post if cur.post is not None else (1.0, 0.0)
            cur.post = (c1 * p1, c1 * p0 + c0)
            cur.feeds_sign = op if isinstance(op, nn.Module) else None
        elif kind == "pool":
            k = _pool_k(op)
            if cur is not None:  # pool before BN/sign: moved after the sign (checked above)
                if cur.bn is not None or cur.post is not None or cur.kept:
                    raise AdaptError(f"{desc}: max-pool between BatchNorm and sign")
                cur.spec["pool"] = k
                cur.pool_before_bn = True
            elif blocks and blocks[-1].spec.get("binary_output", True) and \
                    "pool" not in blocks[-1].spec:
                blocks[-1].spec["pool"] = k
            else:
                raise AdaptError(f"{desc}: max-pool without a preceding block")
        elif kind in ("clip", "squash"):
            if cur is None:
                raise AdaptError(f"{name}: an activation outside layer -> BatchNorm -> sign "
                                 "(not a sign activation)")
            cur.kept.append(name)
        elif kind == "sign":
            if cur is None:
                raise AdaptError(f"{desc}: a sign activation without a binarized layer before "
                                 "it")
            if _sign_at_zero(desc, op, x.dim()) == 1.0:
                cur.feeds_sign = None  # sign(0) = +1 as in the library: zeros are harmless
            close()
        elif kind == "softmax":
            if i != len(ops) - 1:
                raise AdaptError(f"{desc}: softmax is only allowed as the last operation")
        x = _call(name, "the example", op, x)
    if cur is None:
        raise AdaptError("the module ends with a sign activation: the last block must output "
                         "class scores (Linear -> [BatchNorm])")
    if cur.kept:
        raise AdaptError(f"{', '.join(cur.kept)}: an activation after the last layer changes "
                         "the class scores (only softmax / log_softmax may follow it)")
    cur.spec["binary_output"] = False
    blocks.append(cur)
    if sign_zero is None:  # the user's own modules that feed a sign
        _check_no_zero(module, ctx.example, [b.feeds_sign for b in blocks[:-1]
                                             if b.feeds_sign is not None])
    return blocks, assumed, grid


def _input_grid(ctx: _Ctx, pre: list[tuple[str, Any]], fan_in: int
                ) -> tuple[InputGrid, float]:
    """The pixel -> first-layer-input map ``T(p)`` (the user's transform, then the operations
    ``pre`` before the first layer, on 256 constant images) per input channel where channels
    differ, as an integer grid (:meth:`bnn_tol.data.InputGrid.fit`: exact ``T(p) = u q_p``
    where the values allow, else rounded with its error stated; ``fan_in``: the first layer's,
    which bounds the levels so that its sums stay exact). Returns the
    :class:`~bnn_tol.data.InputGrid` ``x = q_p / S`` and the factor ``u S`` (1 for the
    library's grid); sets ``ctx.unit = u`` and ``ctx.residual`` (float64 ``(C or 1, 256)``:
    ``q_p - T(p) / u``, what rounding added to each level)."""
    p = torch.arange(256, dtype=torch.uint8).reshape(256, 1, 1, 1).expand(
        256, *ctx.shape).contiguous()
    x = ctx.user.to_float(p)
    x = x.reshape(256, -1) if ctx.example.dim() == 2 else x
    names = ", ".join(_name(d, op) for d, op in pre) or "none"
    for desc, op in pre:
        x = _call(_name(desc, op), "constant images (one per pixel value)", op, x)
        x = x.value if hasattr(x, "value") else x
    rows = x.reshape(256, -1).double()
    c = ctx.shape[0]
    if bool((rows == rows[:, :1]).all()):
        t = rows[:, :1].t()  # (1, 256): one transform for every input
    else:
        per = rows.reshape(256, c, -1) if rows.shape[1] % c == 0 else None
        if per is None or not bool((per == per[:, :, :1]).all()):
            raise AdaptError(f"the operations before the first layer ({names}) do not treat "
                             "every pixel of a channel alike: not an input transform bnn_tol "
                             "can record")
        t = per[:, :, 0].t()  # (C, 256): one transform per input channel
    try:
        grid, unit = InputGrid.fit(t, fan_in=fan_in)
    except InvalidArgument as e:
        raise AdaptError(f"the input transform ({ctx.user!r}, then {names}): {e}") from None
    ctx.unit = unit
    pix = torch.arange(256, dtype=torch.uint8)
    q = grid.to_int(pix if grid.channels is None else pix.view(1, 256, 1).expand(
        len(t), 256, 1), torch.int64).double().reshape(-1, 256)
    ctx.residual = q - t / unit
    return grid, unit * grid.scale


def _undecided(model, grid: InputGrid, pixels: Tensor, residual: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Which samples of ``pixels`` (``uint8`` ``(N, C, H, W)``) a rounded input grid
    (``grid.error > 0``) may decide differently from the user's transform.

    The first layer's ``k = sum_i w_i q_i`` differs from the exact ``k* = sum_i w_i T_i / u``
    by ``sum_i w_i r_i`` (``residual`` ``r = q - T / u``, float64 ``(C or 1, 256)``), at most
    ``fan_in error``; ``bound = fan_in (error + 2^-23 q_max)`` adds float32 rounding of the
    original's sum (``slack = 2^-23 q_max fan_in``). With ``tau`` the real threshold on the
    ``k`` grid (dead neurons never count):

    * *within the bound*: some ``|k - tau| <= bound`` -- the a-priori test;
    * *undecided*: some neuron decides differently on ``k`` and ``k*`` (``k - tau`` and
      ``k* - tau`` of different signs) or ``|k* - tau| <= slack``. Every other sample has the
      original's hidden bits, so the adapted model must predict what the original predicts.

    A first layer that outputs the scores ``z = BN(k / S)``: within the bound when its top two
    scores differ by at most ``2 bound max_c |gamma_c| / sqrt(s2_c + eps) / S``, undecided
    when ``k`` and ``k*`` give different argmaxes or ``k*``'s top two are within the slack's
    share of that. Returns ``(within_bound, undecided)``, ``(N,)`` bool each."""
    st = compile_model(model).stages[0]
    q = grid.to_int(pixels, torch.int64).double()
    idx = pixels.long()
    r = residual[0][idx] if len(residual) == 1 else residual[
        torch.arange(len(residual)).view(-1, 1, 1), idx]
    wb = st.wb.double()

    def layer(v: Tensor) -> Tensor:
        return F.conv2d(v, wb, padding=st.padding) if st.conv else v.flatten(1) @ wb.t()

    k = layer(q)
    k_exact = k - layer(r)
    slack = st.fan_in * grid.q_max * 2.0**-23
    bound = st.fan_in * grid.error + slack
    if st.hidden:
        tau = (st.tau * st.scale).view((1, -1, 1, 1) if k.dim() == 4 else (1, -1))
        d, d_exact = k - tau, k_exact - tau  # nan for dead neurons: never counted
        within = (d.abs() <= bound).flatten(1).any(1)
        flips = ((d >= 0) != (d_exact >= 0)) & ~torch.isnan(d)
        return within, (flips | (d_exact.abs() <= slack)).flatten(1).any(1)
    bn = st.block.bn

    def scores(v: Tensor) -> Tensor:
        return F.batch_norm(v / st.scale, bn.running_mean.double(), bn.running_var.double(),
                            None if bn.weight is None else bn.weight.double(),
                            None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)

    z, z_exact = scores(k), scores(k_exact)
    if z.shape[1] < 2:
        none = torch.zeros(len(z), dtype=torch.bool)
        return none, none
    per = 2 * float(st.bn_scale.max()) / st.scale
    top, top_exact = z.topk(2, dim=1).values, z_exact.topk(2, dim=1).values
    within = top[:, 0] - top[:, 1] <= per * bound
    undecided = (z.argmax(1) != z_exact.argmax(1)) | (
        top_exact[:, 0] - top_exact[:, 1] <= per * slack)
    return within, undecided


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


def _probe_batches(ctx: _Ctx) -> list[tuple[str, Tensor]]:
    """The example's pixels and probe batches of pixels (``uint8`` ``(N, C, H, W)``): dark
    (0..31), bright (224..255), uniform random, and constant images (black, white, around the
    library's input offset)."""
    shape = ctx.shape
    g = torch.Generator().manual_seed(0)
    n = max(1, min(16, 2**20 // math.prod(shape)))

    def pixels(lo: int, hi: int) -> Tensor:
        return torch.randint(lo, hi, (n, *shape), generator=g, dtype=torch.uint8)

    levels = torch.tensor([0, 255, INPUT.offset, INPUT.offset - 1, 1, 254], dtype=torch.uint8)
    flat = levels.reshape(-1, 1, 1, 1).expand(-1, *shape).contiguous()
    return [("the example", ctx.pixels.reshape(-1, *shape)),
            ("the dark probe batch", pixels(0, 32)),
            ("the bright probe batch", pixels(224, 256)),
            ("the random probe batch", pixels(0, 256)),
            ("the black/white/gray probe batch", flat)]


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
            ops, traced, _ = _ops(module)
        except AdaptError:  # not a chain: adapted by the module walk, no trailing softmax
            ops, traced = [], False
        if traced and ops and _is_softmax(*ops[-1]):
            y = x.clone()
            for desc, op in ops[:-1]:
                y = _call(desc, what, op, y)
    return y.value if hasattr(y, "value") else y


def _verify(ctx: _Ctx, model, exact: bool = True, walk_why: str | None = None,
            assumed: list[str] | None = None) -> None:
    """On the example and each probe batch (:func:`_probe_batches`), the scores of ``model``
    (on its input grid) equal ``module``'s (on the user's inputs, :func:`_reference`) bit for
    bit; where something was folded (``exact=False``: a weight scale, a bias, an input
    factor) the predictions must be equal and the scores within ``1e-4 max |score|``.
    ``walk_why``: the operations came from a module walk (named in the refusal with what it
    ``assumed``). With a rounded input grid (``grid.error > 0``) the samples it leaves
    undecided (:func:`_undecided`) are left out and counted, and the grid's ``unit``,
    ``error``, ``bound`` and per batch ``{"samples", "within_bound", "undecided"}`` are
    recorded in ``model.meta["input"]``."""
    grid = grid_of(model)
    counts: dict[str, dict[str, int]] = {}
    for name, p in _probe_batches(ctx):
        x = ctx.example if name == "the example" else ctx.user.to_float(p)
        x = x.reshape(len(p), -1) if ctx.example.dim() == 2 else x
        ref = _reference(ctx.module, x, name)
        got = model(grid.to_float(p))
        if grid.error and ref.shape == got.shape:
            exact = False
            within, near = _undecided(model, grid, p, ctx.residual)
            counts[name] = {"samples": len(p), "within_bound": int(within.sum()),
                            "undecided": int(near.sum())}
            ref, got = ref[~near], got[~near]
            if len(ref) == 0:
                continue
        if not exact and ref.shape == got.shape and torch.equal(ref.argmax(1), got.argmax(1)) \
                and torch.allclose(ref, got, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
            continue
        if ref.shape == got.shape and torch.equal(ref, got):
            continue
        same = ref.shape == got.shape and torch.equal(ref.argmax(1), got.argmax(1))
        diff = math.inf if ref.shape != got.shape else float((ref - got).abs().max())
        preds = "same predictions" if same else (
            f"{int((ref.argmax(1) != got.argmax(1)).sum())} of {len(ref)} predictions differ"
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
    if grid.error:
        fan_in = compile_model(model).stages[0].fan_in
        model.meta["input"] = {
            "approximate": True, "unit": float(ctx.unit), "error": float(grid.error),
            "bound": float(fan_in * (grid.error + grid.q_max * 2.0**-23)),
            "verified": counts}
