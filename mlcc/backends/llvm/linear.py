"""Linear layers on the CPU: out = x @ W^T (+ bias), W float or group-quantized.

Arguments, in order (row-major, 64-byte aligned):
    x         dtype[rows, K]
    weight    wdtype[N, K]                                   `linear`
    q_weight  uint32[N, K_pad // per_word]                   `linear_q` (layout: layouts.py)
    q_scale   sdtype[N, K_pad // group_size]                 `linear_q`
    bias      wdtype[N]                                      only with bias=True
    out       dtype[rows, N], or out_dtype[rows, N] when given (float32 logits of a float16
              model); float32[N] with last_row=True (the lm_head of a prefill chunk: only row
              rows - 1 of x is multiplied, so the head runs on one row)
`rows` is an int or a symbol name. Products accumulate in float32; the dequantized weight never
exists outside a per-thread tile of 4 rows.

Schedules are ordered rules (first that applies wins), each returning a finished loop nest:
    GEMV-BYTES  one row of x, 4- or 8-bit codes, at least 16 bytes a group: the codes are
          read as bytes (one zero-extending load gives 32 4-bit or 16 8-bit codes), x is
          pre-split into even and odd elements for 4 bits, the code offset is folded into
          each group's starting sum: 8 instructions per 32 multiply-adds per row in the
          inner loop at 4 bits. Each step prefetches (software prefetch, one per 64-byte
          line) the weight rows it will read PREFETCH_BLOCKS steps later: the hardware
          prefetcher alone left the decode GEMVs waiting on memory (decode of a 134M Llama
          1.22-1.31x faster with it, benchmarks/results/2026-11-29-cpu).
    GEMV  rows == 1 or last_row: blocks of 4 output rows in parallel; K walks 16-lane vectors
          (for quantized codes: whole uint32 words shifted by a lane-dependent amount, which
          is what 3-bit codes take), scales are applied once per group. Float weights are
          prefetched like GEMV-BYTES' (float16 decode 1.67x faster with it); 3-bit codes
          are not (this loop is compute-bound for them).
    GEMM  any rows: blocks of 16 output rows in parallel; each block's weights are dequantized
          once into float32 tiles [4, K] and reused by every 4-row block of x, which stays in
          cache across the block's 4 tiles (16 vector accumulators, horizontal sums at the end).
    Fallback: one row per parallel step, scalar dot products; always applies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from mlcc.backends.layouts import Dim, GroupQuantLayout, check_float_dtype
from mlcc.backends.llvm.kernel_base import VECTOR_LANES, ceil_div, extent, finish
from mlcc.errors import MlccError

STAGE = "compile"
BLOCK_ROWS = 4  # output rows (of W) per parallel step
X_ROWS = 4  # rows of x per GEMM micro-kernel step
TILES_PER_TASK = 4  # GEMM: 4-row weight tiles per parallel task, sharing each block of x
PREFETCH_BLOCKS = 2  # decode GEMVs: row blocks ahead that the software prefetch reads
CACHE_LINE = 64


@dataclass(frozen=True)
class LinearSpec:
    """A linear kernel's static description."""

    rows: Dim
    in_features: int
    out_features: int
    dtype: str
    weight_dtype: str
    quant: GroupQuantLayout | None = None
    bias: bool = False
    last_row: bool = False
    result_dtype: str | None = None  # None: the activations' dtype

    def __post_init__(self) -> None:
        check_float_dtype("linear activations", self.dtype)
        check_float_dtype("linear weight", self.weight_dtype)
        if self.result_dtype is not None:
            check_float_dtype("linear result", self.result_dtype)
        if self.in_features <= 0 or self.out_features <= 0:
            raise MlccError(STAGE, f"linear: in_features {self.in_features} and out_features "
                            f"{self.out_features} must be positive")
        if self.quant is not None and self.quant.k != self.in_features:
            raise MlccError(STAGE, f"linear_q: quant layout K {self.quant.k} differs from "
                            f"in_features {self.in_features}")

    @property
    def out_dtype(self) -> str:
        return "float32" if self.last_row else self.result_dtype or self.dtype

    @property
    def single_row(self) -> bool:
        return self.rows == 1 or self.last_row

    @property
    def lanes(self) -> int:
        """Vector width of the K loop: whole words of codes for quantized weights."""
        q = self.quant
        if q is None:
            return VECTOR_LANES
        words = max(1, VECTOR_LANES // q.per_word)
        while q.words_per_group % words:
            words -= 1
        return words * q.per_word

    @property
    def k_tile(self) -> int:
        """K rounded up to whole vectors (padding reads as zero)."""
        base = self.quant.k_pad if self.quant else self.in_features
        return ceil_div(base, self.lanes) * self.lanes


LinearRule = Callable[[LinearSpec], tirx.PrimFunc | None]


def linear(name: str, rows: Dim, in_features: int, out_features: int, dtype: str,
           bias: bool = False, weight_dtype: str | None = None,
           last_row: bool = False, out_dtype: str | None = None,
           prefetch_blocks: int = PREFETCH_BLOCKS) -> tirx.PrimFunc:
    """x[rows, K] @ weight[N, K]^T (+ bias[N]) -> out[rows, N] (or float32[N] with last_row);
    out is out_dtype when given, else dtype. `prefetch_blocks` goes to the GEMV rules (0: no
    software prefetch)."""
    spec = LinearSpec(rows, in_features, out_features, dtype, weight_dtype or dtype, None, bias,
                      last_row, out_dtype)
    return finish(schedule_linear(spec, _rules(prefetch_blocks)), name)


def linear_q(name: str, rows: Dim, in_features: int, out_features: int, bits: int,
             group_size: int, dtype: str, bias: bool = False, scale_dtype: str | None = None,
             last_row: bool = False, out_dtype: str | None = None,
             prefetch_blocks: int = PREFETCH_BLOCKS) -> tirx.PrimFunc:
    """Like `linear` with W given as q_weight/q_scale; dequantization is fused.
    `prefetch_blocks` goes to the GEMV rules (0: no software prefetch)."""
    quant = GroupQuantLayout(bits, group_size, in_features)
    spec = LinearSpec(rows, in_features, out_features, dtype, scale_dtype or dtype, quant, bias,
                      last_row, out_dtype)
    return finish(schedule_linear(spec, _rules(prefetch_blocks)), name)


def _rules(prefetch_blocks: int) -> Sequence[LinearRule]:
    """LINEAR_RULES with the GEMV rules' software prefetch set to `prefetch_blocks`."""
    if prefetch_blocks == PREFETCH_BLOCKS:
        return LINEAR_RULES
    gemvs = (gemv_rule, gemv_bytes_rule)
    return tuple(functools.partial(rule, prefetch_blocks=prefetch_blocks) if rule in gemvs
                 else rule for rule in LINEAR_RULES)


def prefetch_line(address: tirx.PrimExpr) -> tirx.PrimExpr:
    """Software prefetch of the cache line holding `address` (read, keep in all levels)."""
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.const(0, "int32"),
                                 tirx.const(3, "int32"), tirx.const(1, "int32"))


def schedule_linear(spec: LinearSpec,
                    rules: Sequence[LinearRule] | None = None) -> tirx.PrimFunc:
    """Apply the first rule that accepts `spec`."""
    for rule in rules or LINEAR_RULES:
        func = rule(spec)
        if func is not None:
            return func
    raise MlccError(STAGE, f"no linear schedule accepts {spec}; end the rule list with "
                    "linear_fallback")


def _signature(spec: LinearSpec, n):
    """Maximal argument shapes; `_drop_unused` removes what the chosen variant does not read."""
    q, n_out = spec.quant, spec.out_features
    w_shape = (1,) if q else (n_out, spec.in_features)
    qw_shape = (n_out, q.num_words) if q else (1,)
    qs_shape = (n_out, q.num_groups) if q else (1,)
    out_shape = (n_out,) if spec.last_row else (n, n_out)
    return w_shape, qw_shape, qs_shape, out_shape


def _drop_unused(func: tirx.PrimFunc, spec: LinearSpec) -> tirx.PrimFunc:
    keep = ["x"] + (["q_weight", "q_scale"] if spec.quant else ["weight"])
    keep += (["bias"] if spec.bias else []) + ["out"]
    params = [p for p in func.params if p.name in keep]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def gemv_rule(spec: LinearSpec, prefetch_blocks: int = PREFETCH_BLOCKS) -> tirx.PrimFunc | None:
    """One row of x (decode, or the last row of a chunk): see the module docstring. For float
    weights, software prefetch as in gemv_bytes_rule: each step reads ahead the same bytes of the
    rows it will reach `prefetch_blocks` steps later, once per cache line."""
    if not spec.single_row:
        return None
    n = extent(spec.rows)
    n_out, k, q, lanes = spec.out_features, spec.in_features, spec.quant, spec.lanes
    dt, wdt, odt, k_tile = spec.dtype, spec.weight_dtype, spec.out_dtype, spec.k_tile
    w_shape, qw_shape, qs_shape, o_shape = _signature(spec, n)
    rb, quantized, has_bias, last_row = BLOCK_ROWS, q is not None, spec.bias, spec.last_row
    blocks = ceil_div(n_out, rb)
    bits = q.bits if q else 0
    per_word, mask, max_int = (q.per_word, q.mask, q.max_int) if q else (1, 0, 0)
    groups, wpg = (q.num_groups, q.words_per_group) if q else (0, 0)
    vec_words = lanes // per_word
    k_vecs = k_tile // lanes
    # Float weights only: codes that reach this rule (3 bits) take its per-lane shifts, which
    # keep it busy computing (8-bit codes did, before GEMV-BYTES: about 10% slower with the
    # prefetch), while float16 weights stream (1.67x faster with it).
    ahead = 0 if q else prefetch_blocks
    every = max(1, CACHE_LINE // (lanes * (2 if wdt == "float16" else 4)))  # vectors a line

    @T.prim_func
    def gemv(x_h: T.handle, w_h: T.handle, qw_h: T.handle, qs_h: T.handle,
             b_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        x = T.match_buffer(x_h, (n, k), dt)
        weight = T.match_buffer(w_h, w_shape, wdt)
        q_weight = T.match_buffer(qw_h, qw_shape, "uint32")
        q_scale = T.match_buffer(qs_h, qs_shape, wdt)
        bias = T.match_buffer(b_h, (n_out,), wdt)
        out = T.match_buffer(o_h, o_shape, odt)
        xf = T.alloc_buffer((k_tile,), "float32")
        # Vector loops stay one register wide: TVM lowers a wide vectorized loop into one
        # huge vector expression that takes LLVM very long to compile.
        for io in range(k_tile // lanes):
            for lane in T.vectorized(lanes):
                xf[io * lanes + lane] = T.if_then_else(io * lanes + lane < k, T.Cast(
                    "float32", x[n - 1, T.min(io * lanes + lane, k - 1)]), T.float32(0))
        for jb in T.parallel(blocks):
            acc = T.alloc_buffer((rb, lanes), "float32")
            for r in T.unroll(rb):
                for lane in T.vectorized(lanes):
                    acc[r, lane] = T.float32(0)
            if quantized:
                part = T.alloc_buffer((rb, lanes), "float32")
                for g in range(groups):
                    for r in T.unroll(rb):
                        for lane in T.vectorized(lanes):
                            part[r, lane] = T.float32(0)
                    for wv in T.unroll(wpg // vec_words):
                        for r in T.unroll(rb):
                            for lane in T.vectorized(lanes):
                                part[r, lane] = part[r, lane] + xf[
                                    (g * wpg + wv * vec_words) * per_word + lane] * (T.Cast(
                                        "float32", T.bitwise_and(T.shift_right(q_weight[
                                            T.min(jb * rb + r, n_out - 1),
                                            g * wpg + wv * vec_words + lane // per_word],
                                            T.Cast("uint32", lane % per_word * bits)),
                                            T.uint32(mask))) - T.float32(max_int))
                    for r in T.unroll(rb):
                        for lane in T.vectorized(lanes):
                            acc[r, lane] = acc[r, lane] + part[r, lane] * T.Cast(
                                "float32", q_scale[T.min(jb * rb + r, n_out - 1), g])
            else:
                for kv in range(k_vecs):
                    if ahead > 0:  # noqa: SIM102 - resolved while parsing; the next is TIR
                        if kv % every == 0:
                            for r in T.unroll(rb):
                                w_row = T.min((jb + ahead) * rb + r, n_out - 1)
                                T.evaluate(prefetch_line(T.address_of(
                                    weight[w_row, T.min(kv * lanes, k - 1)])))
                    for r in T.unroll(rb):
                        for lane in T.vectorized(lanes):
                            acc[r, lane] = acc[r, lane] + xf[kv * lanes + lane] * T.Cast(
                                "float32", weight[T.min(jb * rb + r, n_out - 1),
                                             T.min(kv * lanes + lane, k - 1)])
            total = T.alloc_buffer((1,), "float32")
            for r in T.unroll(rb):
                if jb * rb + r < n_out:
                    total[0] = T.float32(0)
                    for lane in range(lanes):
                        total[0] = total[0] + acc[r, lane]
                    if has_bias:
                        total[0] = total[0] + T.Cast("float32", bias[jb * rb + r])
                    if last_row:
                        out[jb * rb + r] = total[0]
                    else:
                        out[0, jb * rb + r] = T.Cast(odt, total[0])

    return _drop_unused(gemv, spec)


def gemv_bytes_rule(spec: LinearSpec, rows_per_step: int = BLOCK_ROWS,
                    prefetch_blocks: int = PREFETCH_BLOCKS) -> tirx.PrimFunc | None:
    """One row of x against 4- or 8-bit codes, read as bytes (16 bytes a group at least).

    4 bits: byte b of a row holds code 2b in its low nibble and code 2b + 1 in its high one,
    so 16 bytes give 32 codes with one zero-extending load, a mask and a shift; x is split once
    per call into its even and odd elements to match. 8 bits: byte b is code b, 16 codes a
    load. The code offset (max_int) never reaches the inner loop: each group's sum starts from
    -max_int * (sum of its x), and the scales are widened to float32 once per row block.

    With `prefetch_blocks` > 0, the step over rows [jb * rb, jb * rb + rb) prefetches the same
    bytes of rows (jb + prefetch_blocks) * rb + r, once per cache line; 0 leaves it out.
    """
    q = spec.quant
    if (not spec.single_row or q is None or q.bits not in (4, 8)
            or q.group_size * q.bits // 8 % 16):
        return None
    n = extent(spec.rows)
    n_out, k, lanes, rb = spec.out_features, spec.in_features, 16, rows_per_step
    dt, wdt, odt = spec.dtype, spec.weight_dtype, spec.out_dtype
    w_shape, qw_shape, qs_shape, o_shape = _signature(spec, n)
    has_bias, last_row = spec.bias, spec.last_row
    nibbles = q.bits == 4
    per_byte = 8 // q.bits  # codes a byte
    row_bytes, groups, max_int = q.k_pad // per_byte, q.num_groups, q.max_int
    vecs = q.group_size // per_byte // lanes  # 16-byte vectors per group
    blocks = ceil_div(n_out, rb)
    ahead, every = prefetch_blocks, max(1, CACHE_LINE // (16 * vecs))  # groups per line

    @T.prim_func
    def gemv(x_h: T.handle, w_h: T.handle, qw_h: T.handle, qs_h: T.handle,
             b_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        x = T.match_buffer(x_h, (n, k), dt)
        weight = T.match_buffer(w_h, w_shape, wdt)  # noqa: F841 (dropped below)
        q_weight = T.match_buffer(qw_h, qw_shape, "uint32")
        q_scale = T.match_buffer(qs_h, qs_shape, wdt)
        bias = T.match_buffer(b_h, (n_out,), wdt)
        out = T.match_buffer(o_h, o_shape, odt)
        q_bytes = T.decl_buffer((n_out, row_bytes), "uint8", data=q_weight.data)
        # x_lo[b]: the element of byte b's (low) code; x_hi[b]: of its high nibble (4 bits)
        x_lo = T.alloc_buffer((row_bytes,), "float32")
        x_hi = T.alloc_buffer((row_bytes if nibbles else 1,), "float32")
        offset = T.alloc_buffer((groups * lanes,), "float32")
        for io in range(row_bytes // lanes):
            for lane in T.vectorized(lanes):
                x_lo[io * lanes + lane] = T.if_then_else(
                    per_byte * (io * lanes + lane) < k,
                    T.Cast("float32", x[n - 1, T.min(per_byte * (io * lanes + lane), k - 1)]),
                    T.float32(0))
                if nibbles:
                    x_hi[io * lanes + lane] = T.if_then_else(
                        2 * (io * lanes + lane) + 1 < k,
                        T.Cast("float32", x[n - 1, T.min(2 * (io * lanes + lane) + 1, k - 1)]),
                        T.float32(0))
        for g in range(groups):
            for lane in T.vectorized(lanes):
                offset[g * lanes + lane] = T.float32(0)
            for v in range(vecs):
                for lane in T.vectorized(lanes):
                    if nibbles:
                        offset[g * lanes + lane] = offset[g * lanes + lane] - T.float32(
                            max_int) * (x_lo[(g * vecs + v) * lanes + lane] + x_hi[
                                (g * vecs + v) * lanes + lane])
                    else:
                        offset[g * lanes + lane] = offset[g * lanes + lane] - T.float32(
                            max_int) * x_lo[(g * vecs + v) * lanes + lane]
        for jb in T.parallel(blocks):
            scales = T.alloc_buffer((rb, groups), "float32")
            acc = T.alloc_buffer((rb, lanes), "float32")
            part = T.alloc_buffer((rb, lanes), "float32")
            total = T.alloc_buffer((1,), "float32")
            for r in range(rb):
                for g in range(groups):
                    scales[r, g] = T.Cast("float32", q_scale[T.min(jb * rb + r, n_out - 1), g])
            for r in T.unroll(rb):
                for lane in T.vectorized(lanes):
                    acc[r, lane] = T.float32(0)
            for g in range(groups):
                for r in T.unroll(rb):
                    for lane in T.vectorized(lanes):
                        part[r, lane] = offset[g * lanes + lane]
                if ahead > 0:  # noqa: SIM102 - resolved while parsing; the next is a TIR test
                    if g % every == 0:
                        for r in T.unroll(rb):
                            ahead_row = T.min((jb + ahead) * rb + r, n_out - 1)
                            T.evaluate(prefetch_line(T.address_of(
                                q_bytes[ahead_row, g * vecs * 16])))
                for v in T.unroll(vecs):
                    for r in T.unroll(rb):
                        for lane in T.vectorized(lanes):
                            if nibbles:
                                part[r, lane] = part[r, lane] + x_lo[
                                    (g * vecs + v) * lanes + lane] * T.Cast(
                                    "float32", T.bitwise_and(T.Cast("int32", q_bytes[
                                        T.min(jb * rb + r, n_out - 1),
                                        (g * vecs + v) * lanes + lane]), 15)) + x_hi[
                                    (g * vecs + v) * lanes + lane] * T.Cast(
                                    "float32", T.shift_right(T.Cast("int32", q_bytes[
                                        T.min(jb * rb + r, n_out - 1),
                                        (g * vecs + v) * lanes + lane]), 4))
                            else:
                                part[r, lane] = part[r, lane] + x_lo[
                                    (g * vecs + v) * lanes + lane] * T.Cast(
                                    "float32", T.Cast("int32", q_bytes[
                                        T.min(jb * rb + r, n_out - 1),
                                        (g * vecs + v) * lanes + lane]))
                for r in T.unroll(rb):
                    for lane in T.vectorized(lanes):
                        acc[r, lane] = acc[r, lane] + part[r, lane] * scales[r, g]
            for r in T.unroll(rb):
                if jb * rb + r < n_out:
                    total[0] = T.float32(0)
                    for lane in range(lanes):
                        total[0] = total[0] + acc[r, lane]
                    if has_bias:
                        total[0] = total[0] + T.Cast("float32", bias[jb * rb + r])
                    if last_row:
                        out[jb * rb + r] = total[0]
                    else:
                        out[0, jb * rb + r] = T.Cast(odt, total[0])

    return _drop_unused(gemv, spec)


def gemm_rule(spec: LinearSpec) -> tirx.PrimFunc | None:
    """Several rows of x (a prefill chunk): see the module docstring."""
    if spec.single_row:
        return None
    n = extent(spec.rows)
    n_out, k, q, lanes = spec.out_features, spec.in_features, spec.quant, spec.lanes
    dt, wdt, odt, k_tile = spec.dtype, spec.weight_dtype, spec.out_dtype, spec.k_tile
    w_shape, qw_shape, qs_shape, o_shape = _signature(spec, n)
    rb, xr, quantized, has_bias = BLOCK_ROWS, X_ROWS, q is not None, spec.bias
    tiles, wr = TILES_PER_TASK, BLOCK_ROWS * TILES_PER_TASK  # W rows dequantized per task
    blocks = ceil_div(n_out, wr)
    x_blocks = (n + xr - 1) // xr
    bits = q.bits if q else 0
    per_word, mask, max_int = (q.per_word, q.mask, q.max_int) if q else (1, 0, 0)
    group, k_pad = (q.group_size, q.k_pad) if q else (1, k)
    vec_words = lanes // per_word
    k_vecs = k_tile // lanes
    w_vecs = k_pad // lanes  # vectors holding real codes; the rest of the tile is zero

    @T.prim_func
    def gemm(x_h: T.handle, w_h: T.handle, qw_h: T.handle, qs_h: T.handle,
             b_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        x = T.match_buffer(x_h, (n, k), dt)
        weight = T.match_buffer(w_h, w_shape, wdt)
        q_weight = T.match_buffer(qw_h, qw_shape, "uint32")
        q_scale = T.match_buffer(qs_h, qs_shape, wdt)
        bias = T.match_buffer(b_h, (n_out,), wdt)
        out = T.match_buffer(o_h, o_shape, odt)
        # x as float32, zero-padded to whole vectors and whole 4-row blocks
        xf = T.alloc_buffer((x_blocks * xr, k_tile), "float32")
        for i in T.parallel(x_blocks * xr):
            for co in range(k_vecs):
                for lane in T.vectorized(lanes):
                    xf[i, co * lanes + lane] = T.if_then_else(
                        i < n and co * lanes + lane < k,
                        T.Cast("float32", x[T.min(i, n - 1), T.min(co * lanes + lane, k - 1)]),
                        T.float32(0))
        for jb in T.parallel(blocks):
            tile = T.alloc_buffer((wr, k_tile), "float32")
            if quantized:
                for r in range(wr):
                    for wv in range(w_vecs):
                        for lane in T.vectorized(lanes):
                            tile[r, wv * lanes + lane] = (T.Cast("float32", T.bitwise_and(
                                T.shift_right(q_weight[T.min(jb * wr + r, n_out - 1),
                                                 wv * vec_words + lane // per_word],
                                              T.Cast("uint32", lane % per_word * bits)),
                                T.uint32(mask))) - T.float32(max_int)) * T.Cast(
                                    "float32", q_scale[T.min(jb * wr + r, n_out - 1),
                                                  (wv * lanes + lane) // group])
                    for c in range(k_pad, k_tile):
                        tile[r, c] = T.float32(0)
            else:
                for r in range(wr):
                    for co in range(k_vecs):
                        for lane in T.vectorized(lanes):
                            tile[r, co * lanes + lane] = T.if_then_else(
                                co * lanes + lane < k, T.Cast("float32", weight[
                                    T.min(jb * wr + r, n_out - 1),
                                    T.min(co * lanes + lane, k - 1)]), T.float32(0))
            acc = T.alloc_buffer((xr, rb, lanes), "float32")
            total = T.alloc_buffer((1,), "float32")
            for ib in range(x_blocks):
                # the 4 rows of x stay in cache while the task's 4 tiles use them
                for t in range(tiles):
                    for i in T.unroll(xr):
                        for r in T.unroll(rb):
                            for lane in T.vectorized(lanes):
                                acc[i, r, lane] = T.float32(0)
                    for kv in range(k_vecs):
                        for r in T.unroll(rb):
                            for i in T.unroll(xr):
                                for lane in T.vectorized(lanes):
                                    acc[i, r, lane] = acc[i, r, lane] + xf[
                                        ib * xr + i, kv * lanes + lane] * tile[
                                            t * rb + r, kv * lanes + lane]
                    for i in range(xr):
                        for r in range(rb):
                            if ib * xr + i < n and jb * wr + t * rb + r < n_out:
                                total[0] = T.float32(0)
                                for lane in range(lanes):
                                    total[0] = total[0] + acc[i, r, lane]
                                if has_bias:
                                    total[0] = total[0] + T.Cast("float32",
                                                                 bias[jb * wr + t * rb + r])
                                out[ib * xr + i, jb * wr + t * rb + r] = T.Cast(odt, total[0])

    return _drop_unused(gemm, spec)


def linear_fallback(spec: LinearSpec) -> tirx.PrimFunc:
    """Scalar dot products, one output row of W per parallel step; applies to every spec."""
    n = extent(spec.rows)
    n_out, k, q = spec.out_features, spec.in_features, spec.quant
    dt, wdt, odt = spec.dtype, spec.weight_dtype, spec.out_dtype
    w_shape, qw_shape, qs_shape, o_shape = _signature(spec, n)
    quantized, has_bias, last_row = q is not None, spec.bias, spec.last_row
    bits = q.bits if q else 0
    per_word, mask, max_int, group = (q.per_word, q.mask, q.max_int, q.group_size) if q else (
        1, 0, 0, 1)
    x_rows = 1 if last_row else n

    @T.prim_func
    def fallback(x_h: T.handle, w_h: T.handle, qw_h: T.handle, qs_h: T.handle,
                 b_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        x = T.match_buffer(x_h, (n, k), dt)
        weight = T.match_buffer(w_h, w_shape, wdt)
        q_weight = T.match_buffer(qw_h, qw_shape, "uint32")
        q_scale = T.match_buffer(qs_h, qs_shape, wdt)
        bias = T.match_buffer(b_h, (n_out,), wdt)
        out = T.match_buffer(o_h, o_shape, odt)
        for j in T.parallel(n_out):
            total = T.alloc_buffer((1,), "float32")
            for i in range(x_rows):
                total[0] = T.float32(0)
                for c in range(k):
                    if quantized:
                        total[0] = total[0] + T.Cast("float32", x[i + n - x_rows, c]) * (
                            T.Cast("float32", T.bitwise_and(T.shift_right(
                                q_weight[j, c // per_word], T.Cast("uint32", c % per_word * bits)),
                                T.uint32(mask))) - T.float32(max_int)) * T.Cast(
                                    "float32", q_scale[j, c // group])
                    else:
                        total[0] = total[0] + T.Cast("float32", x[i + n - x_rows, c]) * T.Cast(
                            "float32", weight[j, c])
                if has_bias:
                    total[0] = total[0] + T.Cast("float32", bias[j])
                if last_row:
                    out[j] = total[0]
                else:
                    out[i, j] = T.Cast(odt, total[0])

    return _drop_unused(fallback, spec)


LINEAR_RULES: tuple[LinearRule, ...] = (gemv_bytes_rule, gemv_rule, gemm_rule,
                                        linear_fallback)
