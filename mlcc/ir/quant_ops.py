"""Ops on group-quantized weights, produced by the quantization fusion pass.

A weight W [N, K] is stored as `q_weight` uint32 [N, K_pad / (32 // bits)] and `q_scale`
[N, K_pad / group_size] (K_pad: K rounded up to the group size). Element j of a word sits at bit
j * bits, low bits first; W[n, k] = (code - (2^(bits-1) - 1)) * scale[n, k // group_size].
The fused ops below never materialize W outside their reference implementation.
"""

from __future__ import annotations

import numpy as np

from mlcc.ir.ops import (
    INT_DTYPES,
    OUT_DTYPE_ATTR,
    need,
    need_float,
    out,
    result_dtype,
    tensor,
)
from mlcc.ir.registry import AttrSpec, OpDef, as_f32, register
from mlcc.ir.types import TensorType

QUANT_ATTRS = (
    AttrSpec("bits", (int,), doc="bits per code: 3, 4 or 8"),
    AttrSpec("group_size", (int,), doc="codes sharing one scale, along K"),
    AttrSpec("in_features", (int,), doc="K before padding to the group size"),
)


def padded_k(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def dequantize_group(q_weight: np.ndarray, q_scale: np.ndarray, bits: int, group_size: int,
                     in_features: int) -> np.ndarray:
    """The reference dequantization: float32 [N, in_features]."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    codes = (q_weight[:, :, None] >> shifts[None, None, :]) & np.uint32((1 << bits) - 1)
    codes = codes.reshape(q_weight.shape[0], -1)[:, : q_scale.shape[1] * group_size]
    max_int = (1 << (bits - 1)) - 1
    scales = np.repeat(as_f32(q_scale), group_size, axis=1)
    w = (codes.astype(np.float32) - np.float32(max_int)) * scales
    return w[:, :in_features]


def _check_quant_operands(qw: TensorType, qs: TensorType, attrs) -> tuple:
    bits, group, k = attrs["bits"], attrs["group_size"], attrs["in_features"]
    need(bits in (3, 4, 8), f"bits must be 3, 4 or 8, got {bits}")
    need(group > 0 and k > 0, f"group_size and in_features must be > 0, got {group}, {k}")
    k_pad = padded_k(k, group)
    per_word = 32 // bits
    need(k_pad % per_word == 0,
         f"padded K {k_pad} is not a whole number of {per_word}-code words")
    need(qw.dtype == "uint32" and qw.rank == 2 and qw.shape[1] == k_pad // per_word,
         f"q_weight must be u32[N, {k_pad // per_word}] for K={k}, got {qw}")
    need_float(qs, "q_scale")
    need(qs.rank == 2 and qs.shape == (qw.shape[0], k_pad // group),
         f"q_scale must be [{qw.shape[0]}, {k_pad // group}], got {qs}")
    return qw.shape[0], k


def _q_linear_infer(types, attrs):
    x, qw, qs = tensor(types, 0, "x"), tensor(types, 1, "q_weight"), tensor(types, 2, "q_scale")
    need_float(x, "x")
    n, k = _check_quant_operands(qw, qs, attrs)
    need(x.rank >= 1 and x.shape[-1] == k, f"x {x} last dim must equal in_features {k}")
    if len(types) == 4:
        b = tensor(types, 3, "bias")
        need(b.rank == 1 and b.shape[0] == n, f"bias must be [{n}], got {b}")
    return (TensorType(result_dtype(x, attrs), x.shape[:-1] + (n,)),)


def _q_linear_ref(ctx, inputs, attrs):
    w = dequantize_group(inputs[1], inputs[2], attrs["bits"], attrs["group_size"],
                         attrs["in_features"])
    w = w.astype(inputs[2].dtype).astype(np.float32)  # dequantized in the scale dtype
    y = as_f32(inputs[0]) @ w.T
    if len(inputs) == 4:
        y = y + as_f32(inputs[3])
    return out([y], [attrs["out_dtype"] or inputs[0].dtype.name])


register(OpDef("q_linear", QUANT_ATTRS + (OUT_DTYPE_ATTR,), (3, 4), _q_linear_infer,
               _q_linear_ref,
               doc="x @ dequantize(q_weight, q_scale).T (+ bias), dequantization fused; the "
                   "float32 sum is rounded to out_dtype (default: x's dtype)."))


def _q_embedding_infer(types, attrs):
    qw, qs, ids = tensor(types, 0, "q_weight"), tensor(types, 1, "q_scale"), tensor(types, 2, "ids")
    _, k = _check_quant_operands(qw, qs, attrs)
    need(ids.dtype in INT_DTYPES, f"ids must be int32/int64, got {ids}")
    return (TensorType(qs.dtype, ids.shape + (k,)),)


def _q_embedding_ref(ctx, inputs, attrs):
    qw, qs, ids = inputs
    if ids.size and (ids.min() < 0 or ids.max() >= qw.shape[0]):
        raise IndexError(f"token id out of range [0, {qw.shape[0]}): {ids.min()}..{ids.max()}")
    rows = dequantize_group(qw[ids.reshape(-1)], qs[ids.reshape(-1)], attrs["bits"],
                            attrs["group_size"], attrs["in_features"])
    return out([rows.reshape(ids.shape + (rows.shape[-1],))], [qs.dtype.name])


register(OpDef("q_embedding", QUANT_ATTRS, (3, 3), _q_embedding_infer, _q_embedding_ref,
               doc="Rows of a group-quantized table, dequantized on the fly."))
