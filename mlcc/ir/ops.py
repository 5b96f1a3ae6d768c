"""The core ops: tensor math, normalization, rotary embedding, attention over a KV cache.

Each op is registered once with its attributes, type/shape rule and NumPy reference. Float math in
the references runs in float32 (accumulations included) and results are cast to the output dtype,
which is what the compiled kernels do as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mlcc.ir.registry import AttrSpec, OpDef, TypeRuleError, as_f32, register
from mlcc.ir.types import (
    FLOAT_DTYPES,
    Sym,
    TensorType,
    Type,
    broadcast_shapes,
    dims_product,
    format_shape,
    numpy_dtype,
)

INT_DTYPES = ("int32", "int64")


# --- helpers for type rules ------------------------------------------------------------------


def tensor(types: Sequence[Type], index: int, what: str) -> TensorType:
    t = types[index]
    if not isinstance(t, TensorType):
        raise TypeRuleError(f"{what} (input {index}) must be a tensor, got {t}")
    return t


def need(cond: bool, message: str) -> None:
    if not cond:
        raise TypeRuleError(message)


def need_float(t: TensorType, what: str) -> None:
    need(t.dtype in FLOAT_DTYPES, f"{what} must be a float tensor, got {t}")


def same_dtype(a: TensorType, b: TensorType, what: str) -> None:
    need(a.dtype == b.dtype, f"dtype mismatch: {what} ({a} vs {b})")


def out(values: Sequence[np.ndarray], dtypes: Sequence[str]) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(v).astype(numpy_dtype(d), copy=False) for v, d in zip(values, dtypes))


def unary_float(name: str, fn, doc: str, attrs: tuple[AttrSpec, ...] = (), verify=None) -> OpDef:
    def infer(types, attrs):
        x = tensor(types, 0, "x")
        need_float(x, "x")
        return (x,)

    def reference(ctx, inputs, attrs):
        return out([fn(as_f32(inputs[0]), attrs)], [inputs[0].dtype.name])

    return register(OpDef(name, attrs, (1, 1), infer, reference, verify=verify, doc=doc))


def binary_broadcast(name: str, fn, doc: str) -> OpDef:
    def infer(types, attrs):
        a, b = tensor(types, 0, "lhs"), tensor(types, 1, "rhs")
        same_dtype(a, b, "lhs and rhs")
        try:
            shape = broadcast_shapes(a.shape, b.shape)
        except ValueError as err:
            raise TypeRuleError(str(err)) from None
        return (TensorType(a.dtype, shape),)

    def reference(ctx, inputs, attrs):
        a, b = inputs
        if a.dtype.kind == "f":
            return out([fn(as_f32(a), as_f32(b))], [a.dtype.name])
        return (fn(a, b).astype(a.dtype),)

    return register(OpDef(name, (), (2, 2), infer, reference, doc=doc))


# --- elementwise ----------------------------------------------------------------------------

binary_broadcast("add", np.add, "Elementwise sum with NumPy broadcasting.")
binary_broadcast("mul", np.multiply, "Elementwise product with NumPy broadcasting.")

_erf = np.frompyfunc(math.erf, 1, 1)


def _gelu(x: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    if attrs["approximate"] == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
        return 0.5 * x * (1.0 + np.tanh(inner))
    return 0.5 * x * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64))


def _check_gelu(types, attrs):
    need(attrs["approximate"] in ("none", "tanh"),
         f"approximate must be 'none' or 'tanh', got {attrs['approximate']!r}")


unary_float("silu", lambda x, a: x / (1.0 + np.exp(-x)), "x * sigmoid(x).")
unary_float(
    "gelu", _gelu, "GELU, exact (erf) or the tanh approximation.",
    (AttrSpec("approximate", (str,), "none"),), verify=_check_gelu,
)
unary_float("scale", lambda x, a: x * a["factor"], "x * factor (a constant).",
            (AttrSpec("factor", (float,)),))


def _swiglu_infer(types, attrs):
    x = tensor(types, 0, "x")
    need_float(x, "x")
    last = x.shape[-1] if x.rank else None
    need(isinstance(last, int) and last % 2 == 0,
         f"last dim of x must be an even int (gate and up halves), got {x}")
    return (TensorType(x.dtype, x.shape[:-1] + (last // 2,)),)


def _swiglu_ref(ctx, inputs, attrs):
    x = as_f32(inputs[0])
    gate, up = np.split(x, 2, axis=-1)
    return out([gate / (1.0 + np.exp(-gate)) * up], [inputs[0].dtype.name])


register(OpDef("silu_mul", (), (1, 1), _swiglu_infer, _swiglu_ref,
               doc="silu(first half) * second half of the last axis (fused gate/up)."))


def _gelu_mul_ref(ctx, inputs, attrs):
    gate, up = np.split(as_f32(inputs[0]), 2, axis=-1)
    return out([_gelu(gate, attrs) * up], [inputs[0].dtype.name])


register(OpDef("gelu_mul", (AttrSpec("approximate", (str,), "tanh"),), (1, 1), _swiglu_infer,
               _gelu_mul_ref, verify=_check_gelu,
               doc="gelu(first half) * second half of the last axis (GeGLU, fused gate/up)."))


def _scale_in_dtype_ref(ctx, inputs, attrs):
    # The constant is a tensor of the model dtype in the frameworks (Gemma's sqrt(hidden)).
    factor = np.float32(np.asarray(attrs["factor"]).astype(inputs[0].dtype))
    return out([as_f32(inputs[0]) * factor], [inputs[0].dtype.name])


def _scale_in_dtype_infer(types, attrs):
    x = tensor(types, 0, "x")
    need_float(x, "x")
    return (x,)


register(OpDef("scale_in_dtype", (AttrSpec("factor", (float,)),), (1, 1), _scale_in_dtype_infer,
               _scale_in_dtype_ref,
               doc="x * factor, the factor first rounded to x's dtype."))


def _cast_infer(types, attrs):
    x = tensor(types, 0, "x")
    return (TensorType(attrs["dtype"], x.shape),)


def _cast_verify(types, attrs):
    need(attrs["dtype"] in ("float32", "float16", "int32", "int64"),
         f"cast target dtype {attrs['dtype']!r} is not supported")


register(OpDef("cast", (AttrSpec("dtype", (str,)),), (1, 1), _cast_infer,
               lambda ctx, i, a: out([i[0]], [a["dtype"]]), verify=_cast_verify,
               doc="Convert to another dtype."))


# --- normalization --------------------------------------------------------------------------


def _norm_infer(types, attrs, with_bias: bool):
    x, w = tensor(types, 0, "x"), tensor(types, 1, "weight")
    need_float(x, "x")
    same_dtype(x, w, "x and weight")
    need(w.rank == 1 and x.rank >= 1 and w.shape[0] == x.shape[-1],
         f"weight must be [{x.shape[-1] if x.rank else '?'}] to match x {x}, got {w}")
    if with_bias:
        b = tensor(types, 2, "bias")
        need(b.shape == w.shape and b.dtype == w.dtype, f"bias must be {w}, got {b}")
    need(attrs["eps"] > 0, f"eps must be > 0, got {attrs['eps']}")
    return (x,)


def _rms_norm_ref(ctx, inputs, attrs):
    x, w = as_f32(inputs[0]), as_f32(inputs[1])
    var = np.mean(x * x, axis=-1, keepdims=True)
    y = x / np.sqrt(var + np.float32(attrs["eps"]))
    return out([y * (w + np.float32(attrs["weight_offset"]))], [inputs[0].dtype.name])


def _layer_norm_ref(ctx, inputs, attrs):
    x, w, b = (as_f32(v) for v in inputs)
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(attrs["eps"]))
    return out([y * w + b], [inputs[0].dtype.name])


register(OpDef(
    "rms_norm", (AttrSpec("eps", (float,)), AttrSpec("weight_offset", (float,), 0.0)), (2, 2),
    lambda t, a: _norm_infer(t, a, False), _rms_norm_ref,
    doc="x / sqrt(mean(x^2) + eps) * (weight + weight_offset) over the last axis."))
register(OpDef(
    "layer_norm", (AttrSpec("eps", (float,)),), (3, 3),
    lambda t, a: _norm_infer(t, a, True), _layer_norm_ref,
    doc="(x - mean) / sqrt(var + eps) * weight + bias over the last axis."))


# --- embedding, linear, matmul --------------------------------------------------------------


def _embedding_infer(types, attrs):
    table, ids = tensor(types, 0, "table"), tensor(types, 1, "ids")
    need(table.rank == 2, f"table must be 2-D [vocab, hidden], got {table}")
    need(ids.dtype in INT_DTYPES, f"ids must be int32/int64, got {ids}")
    return (TensorType(table.dtype, ids.shape + (table.shape[1],)),)


def _embedding_ref(ctx, inputs, attrs):
    table, ids = inputs
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise IndexError(f"token id out of range [0, {table.shape[0]}): {ids.min()}..{ids.max()}")
    return (table[ids],)


register(OpDef("embedding", (), (2, 2), _embedding_infer, _embedding_ref,
               doc="Rows of table [vocab, hidden] selected by integer ids."))


# The output projection of a float16 model writes float32 logits straight from its float32
# accumulator: rounding them to float16 first merges logits closer than one float16 step
# (0.0078 at 8..16), which decides greedy ties.
OUT_DTYPE_ATTR = AttrSpec("out_dtype", (str, type(None)), None,
                          doc="dtype of the result when it differs from x's (float32 logits)")


def result_dtype(x: TensorType, attrs) -> str:
    """The dtype a linear-like op writes: its `out_dtype` attribute, else x's dtype."""
    dtype = attrs["out_dtype"]
    need(dtype is None or dtype in FLOAT_DTYPES,
         f"out_dtype must be one of {', '.join(sorted(FLOAT_DTYPES))} or none, got {dtype!r}")
    return x.dtype if dtype is None else dtype


def _linear_infer(types, attrs):
    x, w = tensor(types, 0, "x"), tensor(types, 1, "weight")
    need_float(x, "x")
    same_dtype(x, w, "x and weight")
    need(w.rank == 2, f"weight must be 2-D [out, in], got {w}")
    need(x.rank >= 1 and x.shape[-1] == w.shape[1],
         f"x {x} last dim must equal weight in_features {w.shape[1]} (weight {w})")
    if len(types) == 3:
        b = tensor(types, 2, "bias")
        need(b.rank == 1 and b.shape[0] == w.shape[0] and b.dtype == w.dtype,
             f"bias must be {TensorType(w.dtype, (w.shape[0],))}, got {b}")
    return (TensorType(result_dtype(x, attrs), x.shape[:-1] + (w.shape[0],)),)


def _linear_ref(ctx, inputs, attrs):
    x, w = as_f32(inputs[0]), as_f32(inputs[1])
    y = x @ w.T
    if len(inputs) == 3:
        y = y + as_f32(inputs[2])
    return out([y], [attrs["out_dtype"] or inputs[0].dtype.name])


register(OpDef("linear", (OUT_DTYPE_ATTR,), (2, 3), _linear_infer, _linear_ref,
               doc="x @ weight.T (+ bias); weight is [out_features, in_features]; the float32 "
                   "sum is rounded to out_dtype (default: x's dtype)."))


def _matmul_infer(types, attrs):
    a, b = tensor(types, 0, "lhs"), tensor(types, 1, "rhs")
    need_float(a, "lhs")
    same_dtype(a, b, "lhs and rhs")
    need(a.rank >= 2 and b.rank >= 2, f"matmul needs rank >= 2 operands, got {a} and {b}")
    need(a.shape[-1] == b.shape[-2],
         f"contracted dims differ: lhs {a} has {a.shape[-1]}, rhs {b} has {b.shape[-2]}")
    try:
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError as err:
        raise TypeRuleError(f"batch dims: {err}") from None
    return (TensorType(a.dtype, batch + (a.shape[-2], b.shape[-1])),)


register(OpDef("matmul", (), (2, 2), _matmul_infer,
               lambda ctx, i, a: out([as_f32(i[0]) @ as_f32(i[1])], [i[0].dtype.name]),
               doc="Batched matrix product with broadcasting batch dims."))


# --- shape ops ------------------------------------------------------------------------------


def _reshape_infer(types, attrs):
    x = tensor(types, 0, "x")
    shape = tuple(attrs["shape"])
    for d in shape:
        need(isinstance(d, Sym) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0),
             f"shape entries must be ints >= 0 or symbols, got {d!r}")
    need(dims_product(x.shape) == dims_product(shape),
         f"cannot reshape {x} to {format_shape(shape)}: element counts differ")
    return (TensorType(x.dtype, shape),)


def _reshape_ref(ctx, inputs, attrs):
    shape = tuple(ctx.bindings[d.name] if isinstance(d, Sym) else d for d in attrs["shape"])
    return (inputs[0].reshape(shape),)


register(OpDef("reshape", (AttrSpec("shape", (tuple,)),), (1, 1), _reshape_infer, _reshape_ref,
               doc="Same elements, new shape (symbolic products must match)."))


def _axis(x: TensorType, axis: int) -> int:
    need(-x.rank <= axis < x.rank, f"axis {axis} out of range for {x}")
    return axis % x.rank


def _split_infer(types, attrs):
    x = tensor(types, 0, "x")
    axis = _axis(x, attrs["axis"])
    sizes = tuple(attrs["sizes"])
    need(len(sizes) >= 1 and all(isinstance(s, int) and s > 0 for s in sizes),
         f"sizes must be positive ints, got {sizes}")
    need(x.shape[axis] == sum(sizes),
         f"sizes {sizes} sum to {sum(sizes)} but axis {axis} of {x} is {x.shape[axis]}")
    return tuple(TensorType(x.dtype, x.shape[:axis] + (s,) + x.shape[axis + 1:]) for s in sizes)


def _split_ref(ctx, inputs, attrs):
    cuts = np.cumsum(attrs["sizes"])[:-1]
    return tuple(np.split(inputs[0], cuts, axis=attrs["axis"]))


register(OpDef("split", (AttrSpec("sizes", (tuple,)), AttrSpec("axis", (int,), -1)), (1, 1),
               _split_infer, _split_ref, doc="Split along an axis into pieces of given sizes."))


def _concat_infer(types, attrs):
    xs = [tensor(types, i, f"x{i}") for i in range(len(types))]
    axis = _axis(xs[0], attrs["axis"])
    total = 0
    for i, x in enumerate(xs):
        same_dtype(xs[0], x, f"x0 and x{i}")
        need(x.rank == xs[0].rank, f"rank mismatch: x0 {xs[0]} vs x{i} {x}")
        for d in range(x.rank):
            if d != axis:
                need(x.shape[d] == xs[0].shape[d],
                     f"dim {d} differs: x0 {xs[0]} vs x{i} {x}")
        need(isinstance(x.shape[axis], int), f"concat axis of x{i} {x} must be static")
        total += x.shape[axis]
    shape = xs[0].shape[:axis] + (total,) + xs[0].shape[axis + 1:]
    return (TensorType(xs[0].dtype, shape),)


register(OpDef("concat", (AttrSpec("axis", (int,), -1),), (1, None), _concat_infer,
               lambda ctx, i, a: (np.concatenate(i, axis=a["axis"]),),
               doc="Join tensors along an axis."))


def _transpose_infer(types, attrs):
    x = tensor(types, 0, "x")
    perm = tuple(attrs["perm"])
    need(sorted(perm) == list(range(x.rank)), f"perm {perm} is not a permutation of {x.rank} axes")
    return (TensorType(x.dtype, tuple(x.shape[p] for p in perm)),)


register(OpDef("transpose", (AttrSpec("perm", (tuple,)),), (1, 1), _transpose_infer,
               lambda ctx, i, a: (np.ascontiguousarray(np.transpose(i[0], a["perm"])),),
               doc="Permute axes."))


def _softmax_ref(ctx, inputs, attrs):
    x = as_f32(inputs[0])
    x = x - np.max(x, axis=attrs["axis"], keepdims=True)
    e = np.exp(x)
    return out([e / np.sum(e, axis=attrs["axis"], keepdims=True)], [inputs[0].dtype.name])


def _softmax_infer(types, attrs):
    x = tensor(types, 0, "x")
    need_float(x, "x")
    _axis(x, attrs["axis"])
    return (x,)


register(OpDef("softmax", (AttrSpec("axis", (int,), -1),), (1, 1), _softmax_infer, _softmax_ref,
               doc="Numerically safe softmax along an axis."))


def _last_logits_infer(types, attrs):
    x = tensor(types, 0, "x")
    need_float(x, "x")
    need(x.rank == 2, f"x must be [seq_len, vocab], got {x}")
    return (TensorType("float32", (x.shape[1],)),)


register(OpDef("last_logits", (), (1, 1), _last_logits_infer,
               lambda ctx, i, a: (as_f32(i[0][-1]),),
               doc="The last position's row of [seq_len, vocab], as float32."))


def _last_row_infer(types, attrs):
    x = tensor(types, 0, "x")
    need(x.rank == 2, f"x must be [seq_len, features], got {x}")
    return (TensorType(x.dtype, (1, x.shape[1])),)


register(OpDef("last_row", (), (1, 1), _last_row_infer, lambda ctx, i, a: (i[0][-1:],),
               doc="The last row of [seq_len, features], kept 2-D: [1, features]."))


# --- mixture of experts ---------------------------------------------------------------------


def _moe_route_infer(types, attrs):
    logits = tensor(types, 0, "router_logits")
    need_float(logits, "router_logits")
    experts = logits.shape[-1] if logits.rank == 2 else None
    need(isinstance(experts, int), f"router_logits must be [n, experts], got {logits}")
    need(0 < attrs["top_k"] <= experts, f"top_k must be in [1, {experts}], got {attrs['top_k']}")
    return (TensorType("float32", logits.shape),)


def _moe_route_ref(ctx, inputs, attrs):
    logits = as_f32(inputs[0])
    # The k largest logits (ties: the lower expert index first), softmax over those k only.
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, : attrs["top_k"]]
    picked = np.take_along_axis(logits, chosen, axis=-1)
    e = np.exp(picked - picked.max(axis=-1, keepdims=True))
    weights = np.zeros_like(logits)
    np.put_along_axis(weights, chosen, e / e.sum(axis=-1, keepdims=True), axis=-1)
    return (weights,)


register(OpDef("moe_route", (AttrSpec("top_k", (int,)),), (1, 1), _moe_route_infer,
               _moe_route_ref,
               doc="Router weights f32[n, experts]: softmax over each row's top_k logits, "
                   "0 for the experts not chosen."))


def _moe_combine_infer(types, attrs):
    weights = tensor(types, 0, "weights")
    outs = [tensor(types, i, f"expert{i - 1}") for i in range(1, len(types))]
    need(weights.dtype == "float32" and weights.rank == 2 and weights.shape[1] == len(outs),
         f"weights must be f32[n, {len(outs)}] (one column per expert input), got {weights}")
    for i, o in enumerate(outs):
        need_float(o, f"expert{i}")
        need(o == outs[0] and o.rank == 2 and o.shape[0] == weights.shape[0],
             f"expert outputs must all be [n, hidden] like {outs[0]}; expert{i} is {o}")
    return (outs[0],)


def _moe_combine_ref(ctx, inputs, attrs):
    weights, outs = inputs[0], inputs[1:]
    total = np.zeros(outs[0].shape, np.float32)
    for e, o in enumerate(outs):
        # An expert with weight 0 is not evaluated by the kernels: it contributes exactly 0.
        rows = weights[:, e] != 0
        total[rows] += weights[rows, e:e + 1] * as_f32(o[rows])
    return out([total], [outs[0].dtype.name])


register(OpDef("moe_combine", (), (2, None), _moe_combine_infer, _moe_combine_ref,
               doc="sum over experts e of weights[:, e] * expert_e, in float32, experts in "
                   "order; an expert whose weight is 0 contributes nothing."))
