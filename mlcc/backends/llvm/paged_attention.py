"""Rotary embedding, KV-cache append and paged attention on the CPU.

All three read a fused projection `qkv: dtype[rows, (Hq + 2 * Hkv) * d]` laid out as all query
heads, then all key heads, then all value heads, each head `d` wide. Positions come from
`seq_info: int32[m]` (m >= 1), whose element 0 is the number of tokens already in the cache
(`seq_start`); row i of the chunk is position seq_start + i. The KV cache is one layer's page pool
`kv_pages: kv_dtype[pages, 2, Hkv, 16, d]` plus `page_table: int32[max_pages]`; where a position
lives is `PagedKVSpec.physical_slot` (layouts.py), shared by the append and the attention.

    rope(name, rows, q_heads, kv_heads, head_dim, rotary_dim, theta, dtype, style, scaling)
        qkv (rotated in place: the q and k heads, first rotary_dim features of each), seq_info
    kv_append(name, rows, q_heads, spec, dtype)
        qkv, kv_pages (written in place), page_table, seq_info
    attention(name, rows, q_heads, spec, dtype, scale=None)
        qkv, kv_pages, page_table, seq_info -> out dtype[rows, Hq * d]

Attention is causal GQA (query head h reads kv head h // (Hq / Hkv)) with scale 1/sqrt(d) by
default. A query at position p sees keys max(0, p - W + 1) .. p and, under a window, also the
first S (sink) positions. Keys are visited 16 at a time with a running max and sum (softmax in
float32, never overflowing), so no score buffer grows with the context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from mlcc.backends.layouts import Dim, PagedKVSpec, check_float_dtype, lanes_dividing
from mlcc.backends.llvm.kernel_base import extent, finish
from mlcc.errors import MlccError

STAGE = "compile"
KEY_BLOCK = 16  # keys scored per step of the running softmax
NEG_LARGE = -3.0e38  # stands for -inf without producing inf - inf = NaN


def inv_freq_expr(j: tirx.PrimExpr, rotary_dim: int, theta: float,
                  scaling: Mapping[str, Any] | None = None) -> tirx.PrimExpr:
    """float32 inverse frequency of rotary pair j, evaluated in float64 and rounded once.

    Positions multiply it, so its rounding error grows with the position; float64 keeps it to
    the final rounding, as the IR reference does. Supports no scaling, "linear" and "llama3".
    """
    kind = _scaling_kind(scaling)
    f64 = "float64"
    exponent = tirx.Cast(f64, j * 2) / tirx.const(float(rotary_dim), f64)
    inv = tirx.const(1.0, f64) / tirx.power(tirx.const(float(theta), f64), exponent)
    if kind is None:
        return tirx.Cast("float32", inv)
    if kind == "linear":
        return tirx.Cast("float32", inv / tirx.const(float(scaling["factor"]), f64))
    factor = tirx.const(float(scaling["factor"]), f64)
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = tirx.const(2 * math.pi, f64) / inv
    scaled = tirx.Select(wavelen > tirx.const(old_len / low, f64), inv / factor, inv)
    smooth = (tirx.const(old_len, f64) / wavelen - tirx.const(low, f64)) / tirx.const(
        high - low, f64)
    mid = (tirx.const(1.0, f64) - smooth) * scaled / factor + smooth * scaled
    is_mid = tirx.And(wavelen >= tirx.const(old_len / high, f64),
                      wavelen <= tirx.const(old_len / low, f64))
    return tirx.Cast("float32", tirx.Select(is_mid, mid, scaled))


def _scaling_kind(scaling: Mapping[str, Any] | None) -> str | None:
    """None (no scaling), "linear" or "llama3"; anything else has no kernel."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if not scaling or kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise MlccError(STAGE, f"rope scaling {kind!r} has no CPU kernel; supported: linear, "
                        "llama3")
    return kind


def rope(name: str, rows: Dim, q_heads: int, kv_heads: int, head_dim: int, rotary_dim: int,
         theta: float, dtype: str, style: str = "rotate_half",
         scaling: Mapping[str, Any] | None = None) -> tirx.PrimFunc:
    """Rotate the q and k heads of `qkv` in place (see the module docstring)."""
    check_float_dtype("rope", dtype)
    if style not in ("rotate_half", "interleaved"):
        raise MlccError(STAGE, f"rope style {style!r} is not supported; use rotate_half or "
                        "interleaved")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise MlccError(STAGE, f"rope rotary_dim {rotary_dim} must be even and in (0, head_dim="
                        f"{head_dim}]")
    _scaling_kind(scaling)
    n = extent(rows)
    info_len = tirx.Var("seq_info_len", "int64")
    width = (q_heads + 2 * kv_heads) * head_dim
    heads, d, half = q_heads + kv_heads, head_dim, rotary_dim // 2
    interleaved = style == "interleaved"

    def freq_of(j):
        return inv_freq_expr(j, rotary_dim, theta, scaling)

    @T.prim_func
    def kernel(qkv_h: T.handle, info_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        qkv = T.match_buffer(qkv_h, (n, width), dtype)
        seq_info = T.match_buffer(info_h, (info_len,), "int32")
        freq = T.alloc_buffer((half,), "float32")
        for j in range(half):
            freq[j] = freq_of(j)
        for i in T.parallel(n):
            for j in range(half):
                angle = T.Cast("float32", T.Cast("int64", seq_info[0]) + i) * freq[j]
                cos = T.cos(angle)
                sin = T.sin(angle)
                for h in range(heads):
                    a_idx = h * d + j * 2 if interleaved else h * d + j
                    b_idx = a_idx + 1 if interleaved else a_idx + half
                    a = T.Cast("float32", qkv[i, a_idx])
                    b = T.Cast("float32", qkv[i, b_idx])
                    qkv[i, a_idx] = T.Cast(dtype, a * cos - b * sin)
                    qkv[i, b_idx] = T.Cast(dtype, b * cos + a * sin)

    return finish(kernel, name)


def _page_lookup(spec: PagedKVSpec):
    """Physical page of a slot. Both indices are clamped, so a position past the cache (which
    the runtime must refuse) can give wrong values but never touches memory outside it."""
    last_page = spec.num_pages - 1

    def page_of(page_table, slot, max_pages):
        entry = page_table[tirx.min(slot // spec.PAGE_SIZE, max_pages - 1)]
        return tirx.max(tirx.min(tirx.Cast("int64", entry), last_page), 0)

    return page_of


def _check_heads(q_heads: int, spec: PagedKVSpec, dtype: str) -> None:
    check_float_dtype("attention", dtype)
    if q_heads <= 0 or q_heads % spec.num_kv_heads:
        raise MlccError(STAGE, f"attention: query heads {q_heads} must be a positive multiple "
                        f"of kv heads {spec.num_kv_heads}")


def kv_append(name: str, rows: Dim, q_heads: int, spec: PagedKVSpec, dtype: str
              ) -> tirx.PrimFunc:
    """Write the chunk's keys and values (after rope) into their pages."""
    _check_heads(q_heads, spec, dtype)
    n = extent(rows)
    info_len = tirx.Var("seq_info_len", "int64")
    max_pages = tirx.Var("max_pages", "int64")
    kv_heads, d, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.dtype
    width = (q_heads + 2 * kv_heads) * d
    k_base, v_base = q_heads * d, (q_heads + kv_heads) * d
    page, slot_of, page_of = spec.PAGE_SIZE, spec.physical_slot, _page_lookup(spec)

    @T.prim_func
    def kernel(qkv_h: T.handle, pages_h: T.handle, table_h: T.handle, info_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        qkv = T.match_buffer(qkv_h, (n, width), dtype)
        kv_pages = T.match_buffer(pages_h, spec.page_shape, kv_dtype)
        page_table = T.match_buffer(table_h, (max_pages,), "int32")
        seq_info = T.match_buffer(info_h, (info_len,), "int32")
        for i in T.parallel(n):
            slot = slot_of(T.Cast("int64", seq_info[0]) + i)
            where = page_of(page_table, slot, max_pages)
            for h in range(kv_heads):
                for c in T.vectorized(d):
                    kv_pages[where, 0, h, slot % page, c] = T.Cast(
                        kv_dtype, qkv[i, k_base + h * d + c])
                    kv_pages[where, 1, h, slot % page, c] = T.Cast(
                        kv_dtype, qkv[i, v_base + h * d + c])

    return finish(kernel, name)


def attention(name: str, rows: Dim, q_heads: int, spec: PagedKVSpec, dtype: str,
              scale: float | None = None) -> tirx.PrimFunc:
    """Causal GQA attention of the chunk's queries over the cache (see the module docstring)."""
    _check_heads(q_heads, spec, dtype)
    n = extent(rows)
    info_len = tirx.Var("seq_info_len", "int64")
    max_pages = tirx.Var("max_pages", "int64")
    kv_heads, d, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.dtype
    width, group = (q_heads + 2 * kv_heads) * d, q_heads // kv_heads
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    page, slot_of, blk = spec.PAGE_SIZE, spec.physical_slot, KEY_BLOCK
    page_of = _page_lookup(spec)
    window, sinks = spec.sliding_window, spec.attention_sink if spec.windowed else 0
    lanes = lanes_dividing(d)

    def first_in_window(pos):
        return T.max(pos - (window - 1), T.int64(0)) if window > 0 else T.int64(0)

    @T.prim_func
    def kernel(qkv_h: T.handle, pages_h: T.handle, table_h: T.handle, info_h: T.handle,
               out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        qkv = T.match_buffer(qkv_h, (n, width), dtype)
        kv_pages = T.match_buffer(pages_h, spec.page_shape, kv_dtype)
        page_table = T.match_buffer(table_h, (max_pages,), "int32")
        seq_info = T.match_buffer(info_h, (info_len,), "int32")
        out = T.match_buffer(out_h, (n, q_heads * d), dtype)
        for task in T.parallel(q_heads * n):
            h = task // n
            i = task % n
            pos = T.Cast("int64", seq_info[0]) + i
            lo = first_in_window(pos)
            n_sink = T.min(T.int64(sinks), lo)
            count = n_sink + pos - lo + 1
            q = T.alloc_buffer((d,), "float32")
            acc = T.alloc_buffer((d,), "float32")
            score = T.alloc_buffer((blk,), "float32")
            partial = T.alloc_buffer((lanes,), "float32")
            state = T.alloc_buffer((3,), "float32")  # running max, running sum, block max
            for c in T.vectorized(d):
                q[c] = T.Cast("float32", qkv[i, h * d + c]) * T.float32(sm_scale)
                acc[c] = T.float32(0)
            state[0] = T.float32(NEG_LARGE)
            state[1] = T.float32(0)
            for kb in range((count + blk - 1) // blk):
                state[2] = state[0]
                for t in range(blk):
                    key = T.min(kb * blk + t, count - 1)
                    slot = slot_of(T.Select(key < n_sink, key, lo + key - n_sink))
                    where = page_of(page_table, slot, max_pages)
                    # q . k in `lanes`-wide partial sums, then one short scalar sum
                    for c in T.vectorized(lanes):
                        partial[c] = T.float32(0)
                    for co in range(d // lanes):
                        for c in T.vectorized(lanes):
                            partial[c] = partial[c] + q[co * lanes + c] * T.Cast(
                                "float32", kv_pages[where, 0, h // group, slot % page,
                                                    co * lanes + c])
                    score[t] = T.float32(0)
                    for c in range(lanes):
                        score[t] = score[t] + partial[c]
                    score[t] = T.Select(kb * blk + t < count, score[t], T.float32(NEG_LARGE))
                    state[2] = T.max(state[2], score[t])
                for c in T.vectorized(d):
                    acc[c] = acc[c] * T.exp(state[0] - state[2])
                state[1] = state[1] * T.exp(state[0] - state[2])
                state[0] = state[2]
                for t in range(blk):
                    if kb * blk + t < count:
                        key = kb * blk + t
                        slot = slot_of(T.Select(key < n_sink, key, lo + key - n_sink))
                        where = page_of(page_table, slot, max_pages)
                        weight = T.exp(score[t] - state[0])
                        state[1] = state[1] + weight
                        for c in T.vectorized(d):
                            acc[c] = acc[c] + weight * T.Cast(
                                "float32", kv_pages[where, 1, h // group, slot % page, c])
            for c in T.vectorized(d):
                out[i, h * d + c] = T.Cast(dtype, acc[c] / state[1])

    return finish(kernel, name)
