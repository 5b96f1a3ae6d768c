"""The portable CPU kernel of `qkv_attention` over the paged KV cache (TVMScript text).

One kernel does the whole op in two loop nests:
1. append: for each token of the chunk and each KV head, apply rotary embedding to k and write
   k and v into the page pool at the token's slot;
2. attend: for each token and query head, rotate q, then run an online softmax over the cached
   positions it may see (causal; with a sliding window, the last `window` positions plus the
   `sinks` first ones) and write the weighted sum of values.

Slots: position p lives in slot p, or with a ring (sliding window) in slot p when p < sinks and
sinks + (p - sinks) mod (capacity - sinks) otherwise; slot s is row s % page_size of page
page_table[s // page_size]. The kernel gets its layer's part of the pool:
[pages, 2 (k, v), kv_heads, page_size, head_dim].
"""

from __future__ import annotations

import numpy as np

from mlcc.backends.llvm.fallback import Emitter, Loops, f32, fp, header, inv_freq_table, to
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym


def _slot(pos: str, kv: dict) -> str:
    if not kv["ring"]:
        return pos
    sinks, capacity = kv["sinks"], kv["capacity"]
    return (f"T.if_then_else({pos} < T.int64({sinks}), {pos}, T.int64({sinks}) + "
            f"T.floormod({pos} - T.int64({sinks}), T.int64({capacity - sinks})))")


def _emit_rope(em: Emitter, dst: str, src, d: int, rotary: int, style: str, dt: str) -> None:
    """dst[c] (float32, rounded through dt) = rotary embedding of src(c) at angle pos * inv."""
    half = rotary // 2
    with em.block(f"for c in range({d}):"):
        if rotary == 0:
            em(f"{dst}[c] = {f32(src('c'), dt)}")
            return
        if style == "rotate_half":
            freq = f"T.floormod(c, {half})"
            partner = f"T.if_then_else(c < {half}, c + {half}, c - {half})"
            sign = f"T.if_then_else(c < {half}, T.float32(-1), T.float32(1))"
        else:
            freq = "c // 2"
            partner = "T.if_then_else(T.floormod(c, 2) == 0, c + 1, c - 1)"
            sign = "T.if_then_else(T.floormod(c, 2) == 0, T.float32(-1), T.float32(1))"
        with em.block(f"if c < {rotary}:"):
            angle = f'T.Cast("float32", pos) * invf[{freq}]'
            val = (f"{f32(src('c'), dt)} * T.cos({angle}) + {sign} * "
                   f"{f32(src(partner), dt)} * T.sin({angle})")
            em(f"{dst}[c] = {f32(to(dt, val), dt)}")
        with em.block("else:"):
            em(f"{dst}[c] = {f32(src('c'), dt)}")


def gen_qkv_attention(spec: KernelSpec, name: str, fast: bool) -> str:
    L = Loops(fast)
    kv = dict(spec.kv)
    (qkv_shape, dt), (out_shape, _) = spec.inputs[0], spec.outputs[0]
    hq, hkv, d = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"]
    page = kv["page_size"]
    rotary, style = spec.attr("rotary_dim"), spec.attr("rope_style")
    scale = spec.attr("scale") if spec.attr("scale") is not None else 1.0 / np.sqrt(d)
    kv_dt = kv["dtype"]
    pool_shape = (kv["pages"], 2, hkv, page, d)  # this layer's part of the pool
    batched = spec.attr("batched")
    rows = qkv_shape[0]
    info_shape = (rows,) if batched else (2,)
    table_shape = (rows, kv["pages_per_seq"]) if batched else (kv["pages_per_seq"],)
    em = Emitter()
    header(em, name, [("qkv", qkv_shape, dt), ("y", out_shape, dt),
                      ("seq_info", info_shape, "int32"), ("page_table", table_shape, "int32"),
                      ("pool", pool_shape, kv_dt)])
    n = rows.name if isinstance(rows, Sym) else rows
    # A chunk of one sequence starts at seq_info[0]; in a batch, row i is sequence i's token
    # at position seq_info[i] and reads its own row of the page table.
    position = 'T.Cast("int64", seq_info[i])' if batched else "start + i"
    table_row = "i, " if batched else ""
    if not batched:
        em('start = T.Cast("int64", seq_info[0])')
    table = inv_freq_table(spec).astype(np.float32) if rotary else np.zeros(1, np.float32)
    em(f'invf = T.alloc_buffer(({max(1, len(table))},), "float32")')
    for j, value in enumerate(table):
        em(f"invf[{j}] = {fp(value)}")

    def pool_at(kind: int, head: str, pos: str) -> str:
        slot = _slot(pos, kv)
        return (f'pool[T.Cast("int64", page_table[{table_row}({slot}) // {page}]), {kind}, {head}, '
                f"T.floormod({slot}, {page}), c]")

    # 1. append k (rotated) and v of every token to the cache
    k_col, v_col = hq * d, (hq + hkv) * d
    with em.block(f"for i in {L.par}({n}):"):
        em(f"pos = {position}")
        with em.block(f"for g in range({hkv}):"):
            em(f'kr = T.alloc_buffer(({d},), "float32")')
            _emit_rope(em, "kr", lambda c: f"qkv[i, {k_col} + g * {d} + {c}]", d, rotary, style, dt)
            with em.block(f"for c in range({d}):"):
                em(f"{pool_at(0, 'g', 'pos')} = {to(kv_dt, 'kr[c]')}")
                value = f32(f"qkv[i, {v_col} + g * {d} + c]", dt)
                em(f"{pool_at(1, 'g', 'pos')} = {to(kv_dt, value)}")
    # 2. attention of each query over the positions it may see
    group = hq // hkv
    window, sinks = kv["window"], kv["sinks"]
    with em.block(f"for i in {L.par}({n}):"):
        em(f"pos = {position}")
        with em.block(f"for h in range({hq}):"):
            em(f'qr = T.alloc_buffer(({d},), "float32")')
            _emit_rope(em, "qr", lambda c: f"qkv[i, h * {d} + {c}]", d, rotary, style, dt)
            em(f'acc = T.alloc_buffer(({d},), "float32")')
            em('st = T.alloc_buffer((4,), "float32")')  # running max, sum, score, new max
            em("st[0] = T.float32(-3.0e38)")
            em("st[1] = T.float32(0)")
            with em.block(f"for c in range({d}):"):
                em("acc[c] = T.float32(0)")
            lo = f"T.max(pos - T.int64({window - 1}), T.int64(0))" if window > 0 else "T.int64(0)"
            with em.block("for j in range(pos + 1):"):
                cond = f"j >= {lo}" if sinks == 0 else f"T.Or(j >= {lo}, j < T.int64({sinks}))"
                with em.block(f"if {cond}:"):
                    em("st[2] = T.float32(0)")
                    with em.block(f"for c in range({d}):"):
                        key = f32(pool_at(0, f"h // {group}", "j"), kv_dt)
                        em(f"st[2] = st[2] + qr[c] * {key}")
                    em(f"st[2] = st[2] * {fp(scale)}")
                    em("st[3] = T.max(st[0], st[2])")
                    em("st[1] = st[1] * T.exp(st[0] - st[3]) + T.exp(st[2] - st[3])")
                    with em.block(f"for c in range({d}):"):
                        val = f32(pool_at(1, f"h // {group}", "j"), kv_dt)
                        em(f"acc[c] = acc[c] * T.exp(st[0] - st[3]) + T.exp(st[2] - st[3]) * {val}")
                    em("st[0] = st[3]")
            with em.block(f"for c in range({d}):"):
                em(f"y[i, h * {d} + c] = {to(dt, 'acc[c] / st[1]')}")
    return em.text()
