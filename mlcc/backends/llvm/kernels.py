"""CPU kernels other than linear layers and attention: lookups, norms, epilogues, sampling.

Each generator returns a scheduled `tvm.tirx.PrimFunc` exported as `name`. Shapes are ints or
symbol names ("seq_len"); buffers are row-major and 64-byte aligned. Arguments, in order:

    embedding(name, rows, vocab, hidden, dtype)          tokens i32[rows], table dtype[vocab,
                                                          hidden] -> out dtype[rows, hidden]
    embedding_q(name, rows, vocab, hidden, bits, group_size, dtype)
                                                          tokens, q_weight u32[vocab, words],
                                                          q_scale dtype[vocab, groups] -> out
    rms_norm(name, rows, hidden, dtype, eps, weight_offset=0, residual=False)
        x, weight -> out;  with residual: x, residual, weight -> out, sum  (sum = x + residual,
        rounded to dtype, and out = rms_norm(sum))
    layer_norm(name, rows, hidden, dtype, eps, residual=False)
        x, weight, bias -> out;  with residual: x, residual, weight, bias -> out, sum
    silu_mul(name, rows, inter, dtype)                    gate_up dtype[rows, 2 * inter] (gate
                                                          first) -> out dtype[rows, inter]
    gelu / silu / scale(factor) (name, shape, dtype)      x -> out
    add / mul (name, shape, dtype)                        a, b -> out
    cast(name, shape, in_dtype, out_dtype)                x -> out
    take_last_logits(name, rows, vocab, dtype)            x dtype[rows, vocab] -> f32[vocab]
    last_row(name, rows, features, dtype)                 x dtype[rows, f] -> dtype[1, f]
    argmax(name, vocab)                                   logits f32[vocab] -> i32[1] (first max)
    softmax_with_temperature(name, vocab)                 logits f32[vocab], temperature f32
                                                          (> 0) -> probs f32[vocab]

Arithmetic runs in float32 whatever the storage dtype; token ids outside [0, vocab) are clamped
(the runtime rejects them before calling) so a bad id can never read outside the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tvm import te, tirx
from tvm.script import tirx as T

from mlcc.backends.layouts import Dim, GroupQuantLayout, check_float_dtype
from mlcc.backends.llvm.kernel_base import extent, finish
from mlcc.backends.llvm.schedules import schedule_blocks
from mlcc.errors import MlccError

STAGE = "compile"
F32 = "float32"


def _i64(value) -> tirx.PrimExpr:
    return tirx.IntImm("int64", value) if isinstance(value, int) else value


def _shape(dims: Sequence[Dim]) -> tuple:
    return tuple(_i64(extent(d)) for d in dims)


def _f32(value: te.Tensor | tirx.PrimExpr) -> tirx.PrimExpr:
    return value if value.dtype == F32 else value.astype(F32)


def _build(name: str, args: list) -> tirx.PrimFunc:
    func = te.create_prim_func(args)
    return finish(schedule_blocks(func), name)


def _token(tokens: te.Tensor, i, vocab: int) -> tirx.PrimExpr:
    tok = tokens[i].astype("int64")
    return tirx.max(tirx.min(tok, _i64(vocab - 1)), _i64(0))


def embedding(name: str, rows: Dim, vocab: int, hidden: int, dtype: str) -> tirx.PrimFunc:
    """out[i, :] = table[tokens[i], :]."""
    check_float_dtype("embedding", dtype)
    (n,) = _shape([rows])
    tokens = te.placeholder((n,), "int32", name="tokens")
    table = te.placeholder(_shape([vocab, hidden]), dtype, name="table")
    out = te.compute((n, _i64(hidden)), lambda i, j: table[_token(tokens, i, vocab), j],
                     name="out")
    return _build(name, [tokens, table, out])


def dequantized(q_weight: te.Tensor, q_scale: te.Tensor, layout: GroupQuantLayout, row,
                col) -> tirx.PrimExpr:
    """W[row, col] in float32 from its packed code and group scale (layouts.py)."""
    word = q_weight[row, col // layout.per_word]
    shift = (col % layout.per_word * layout.bits).astype("uint32")
    code = (word >> shift) & tirx.const(layout.mask, "uint32")
    return (code.astype(F32) - tirx.const(layout.max_int, F32)) * _f32(
        q_scale[row, col // layout.group_size])


def embedding_q(name: str, rows: Dim, vocab: int, hidden: int, bits: int, group_size: int,
                dtype: str) -> tirx.PrimFunc:
    """Rows of a group-quantized table, dequantized into out dtype[rows, hidden]."""
    check_float_dtype("embedding_q", dtype)
    layout = GroupQuantLayout(bits, group_size, hidden)
    (n,) = _shape([rows])
    tokens = te.placeholder((n,), "int32", name="tokens")
    q_weight = te.placeholder(_shape([vocab, layout.num_words]), "uint32", name="q_weight")
    q_scale = te.placeholder(_shape([vocab, layout.num_groups]), dtype, name="q_scale")
    out = te.compute(
        (n, _i64(hidden)),
        lambda i, j: dequantized(q_weight, q_scale, layout, _token(tokens, i, vocab), j
                                 ).astype(dtype), name="out")
    return _build(name, [tokens, q_weight, q_scale, out])


def _residual_sum(x: te.Tensor, residual: te.Tensor | None, dtype: str) -> te.Tensor:
    if residual is None:
        return x
    return te.compute(x.shape, lambda i, j: (_f32(x[i, j]) + _f32(residual[i, j])).astype(dtype),
                      name="sum")


def rms_norm(name: str, rows: Dim, hidden: int, dtype: str, eps: float,
             weight_offset: float = 0.0, residual: bool = False) -> tirx.PrimFunc:
    """x / sqrt(mean(x^2) + eps) * (weight + weight_offset) over the last axis."""
    check_float_dtype("rms_norm", dtype)
    shape = _shape([rows, hidden])
    x = te.placeholder(shape, dtype, name="x")
    res = te.placeholder(shape, dtype, name="residual") if residual else None
    weight = te.placeholder((shape[1],), dtype, name="weight")
    total = _residual_sum(x, res, dtype)
    k = te.reduce_axis((_i64(0), shape[1]), name="k")
    squares = te.compute((shape[0],), lambda i: te.sum(_f32(total[i, k]) * _f32(total[i, k]),
                                                       axis=k), name="squares")
    inv = te.compute((shape[0],), lambda i: tirx.const(1.0, F32) / te.sqrt(
        squares[i] / tirx.const(float(hidden), F32) + tirx.const(eps, F32)), name="inv_rms")
    out = te.compute(shape, lambda i, j: (_f32(total[i, j]) * inv[i] * (
        _f32(weight[j]) + tirx.const(weight_offset, F32))).astype(dtype), name="out")
    args = [x, res, weight, out, total] if residual else [x, weight, out]
    return _build(name, args)


def layer_norm(name: str, rows: Dim, hidden: int, dtype: str, eps: float,
               residual: bool = False) -> tirx.PrimFunc:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (two-pass variance)."""
    check_float_dtype("layer_norm", dtype)
    shape = _shape([rows, hidden])
    x = te.placeholder(shape, dtype, name="x")
    res = te.placeholder(shape, dtype, name="residual") if residual else None
    weight = te.placeholder((shape[1],), dtype, name="weight")
    bias = te.placeholder((shape[1],), dtype, name="bias")
    total = _residual_sum(x, res, dtype)
    width = tirx.const(float(hidden), F32)
    k1 = te.reduce_axis((_i64(0), shape[1]), name="k1")
    sums = te.compute((shape[0],), lambda i: te.sum(_f32(total[i, k1]), axis=k1), name="sums")
    mean = te.compute((shape[0],), lambda i: sums[i] / width, name="mean")
    k2 = te.reduce_axis((_i64(0), shape[1]), name="k2")
    var = te.compute((shape[0],), lambda i: te.sum(
        (_f32(total[i, k2]) - mean[i]) * (_f32(total[i, k2]) - mean[i]), axis=k2), name="var")
    inv = te.compute((shape[0],), lambda i: tirx.const(1.0, F32) / te.sqrt(
        var[i] / width + tirx.const(eps, F32)), name="inv_std")
    out = te.compute(shape, lambda i, j: ((_f32(total[i, j]) - mean[i]) * inv[i] * _f32(
        weight[j]) + _f32(bias[j])).astype(dtype), name="out")
    args = [x, res, weight, bias, out, total] if residual else [x, weight, bias, out]
    return _build(name, args)


def _silu(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return v / (tirx.const(1.0, F32) + te.exp(-v))


def silu_mul(name: str, rows: Dim, inter: int, dtype: str) -> tirx.PrimFunc:
    """out = silu(gate) * up where gate_up = [gate | up] along the last axis."""
    check_float_dtype("silu_mul", dtype)
    (n, width) = _shape([rows, inter])
    gate_up = te.placeholder((n, _i64(2 * inter)), dtype, name="gate_up")
    out = te.compute((n, width), lambda i, j: (_silu(_f32(gate_up[i, j])) * _f32(
        gate_up[i, j + width])).astype(dtype), name="out")
    return _build(name, [gate_up, out])


def _unary(name: str, shape: Sequence[Dim], dtype: str, fn) -> tirx.PrimFunc:
    check_float_dtype(name, dtype)
    dims = _shape(shape)
    x = te.placeholder(dims, dtype, name="x")
    out = te.compute(dims, lambda *idx: fn(_f32(x[idx])).astype(dtype), name="out")
    return _build(name, [x, out])


def gelu(name: str, shape: Sequence[Dim], dtype: str, approximate: str = "none"
         ) -> tirx.PrimFunc:
    """GELU: exact (erf) or the tanh approximation."""
    if approximate not in ("none", "tanh"):
        raise MlccError(STAGE, f"gelu approximate={approximate!r} is not supported; use "
                        "'none' or 'tanh'")
    half, one = tirx.const(0.5, F32), tirx.const(1.0, F32)

    def exact(v):
        return half * v * (one + te.erf(v * tirx.const(1.0 / math.sqrt(2.0), F32)))

    def tanh(v):
        inner = tirx.const(math.sqrt(2.0 / math.pi), F32) * (
            v + tirx.const(0.044715, F32) * v * v * v)
        return half * v * (one + te.tanh(inner))

    return _unary(name, shape, dtype, exact if approximate == "none" else tanh)


def silu(name: str, shape: Sequence[Dim], dtype: str) -> tirx.PrimFunc:
    """x * sigmoid(x)."""
    return _unary(name, shape, dtype, _silu)


def scale(name: str, shape: Sequence[Dim], dtype: str, factor: float) -> tirx.PrimFunc:
    """x * factor."""
    return _unary(name, shape, dtype, lambda v: v * tirx.const(factor, F32))


def _binary(name: str, shape: Sequence[Dim], dtype: str, fn) -> tirx.PrimFunc:
    check_float_dtype(name, dtype)
    dims = _shape(shape)
    a = te.placeholder(dims, dtype, name="a")
    b = te.placeholder(dims, dtype, name="b")
    out = te.compute(dims, lambda *idx: fn(_f32(a[idx]), _f32(b[idx])).astype(dtype),
                     name="out")
    return _build(name, [a, b, out])


def add(name: str, shape: Sequence[Dim], dtype: str) -> tirx.PrimFunc:
    """a + b (same shapes; computed in float32)."""
    return _binary(name, shape, dtype, lambda u, v: u + v)


def mul(name: str, shape: Sequence[Dim], dtype: str) -> tirx.PrimFunc:
    """a * b (same shapes; computed in float32)."""
    return _binary(name, shape, dtype, lambda u, v: u * v)


def cast(name: str, shape: Sequence[Dim], in_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """Convert between float32 and float16 (or to int32)."""
    if in_dtype not in ("float32", "float16") or out_dtype not in ("float32", "float16",
                                                                    "int32"):
        raise MlccError(STAGE, f"cast {in_dtype} -> {out_dtype} is not supported; use float32, "
                        "float16 (and int32 as a target)")
    dims = _shape(shape)
    x = te.placeholder(dims, in_dtype, name="x")
    out = te.compute(dims, lambda *idx: x[idx].astype(out_dtype), name="out")
    return _build(name, [x, out])


def take_last_logits(name: str, rows: Dim, vocab: int, dtype: str) -> tirx.PrimFunc:
    """out f32[vocab] = x[rows - 1, :]."""
    check_float_dtype("take_last_logits", dtype)
    n, width = _shape([rows, vocab])
    x = te.placeholder((n, width), dtype, name="x")
    out = te.compute((width,), lambda j: _f32(x[n - 1, j]), name="out")
    return _build(name, [x, out])


def last_row(name: str, rows: Dim, features: int, dtype: str) -> tirx.PrimFunc:
    """out dtype[1, features] = x[rows - 1 : rows, :]."""
    check_float_dtype("last_row", dtype)
    n, width = _shape([rows, features])
    x = te.placeholder((n, width), dtype, name="x")
    out = te.compute((_i64(1), width), lambda i, j: x[n - 1, j], name="out")
    return _build(name, [x, out])


def argmax(name: str, vocab: int) -> tirx.PrimFunc:
    """Index of the largest logit (the first one on ties, as NumPy)."""

    @T.prim_func
    def kernel(logits: T.Buffer((vocab,), "float32"), out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True})
        best = T.alloc_buffer((1,), "float32")
        best[0] = logits[0]
        out[0] = 0
        for j in range(1, vocab):
            if logits[j] > best[0]:
                best[0] = logits[j]
                out[0] = j

    return finish(kernel, name)


def softmax_with_temperature(name: str, vocab: int) -> tirx.PrimFunc:
    """probs = softmax(logits / temperature), max-subtracted so it never overflows."""
    width = _i64(vocab)
    logits = te.placeholder((width,), F32, name="logits")
    temperature = te.var("temperature", F32)
    k1 = te.reduce_axis((_i64(0), width), name="k1")
    top = te.compute((_i64(1),), lambda _: te.max(logits[k1], axis=k1), name="top")
    exps = te.compute((width,), lambda j: te.exp((logits[j] - top[0]) / temperature),
                      name="exps")
    k2 = te.reduce_axis((_i64(0), width), name="k2")
    total = te.compute((_i64(1),), lambda _: te.sum(exps[k2], axis=k2), name="total")
    probs = te.compute((width,), lambda j: exps[j] / total[0], name="probs")
    return _build(name, [logits, temperature, probs])
