"""CUDA kernels for `linear` and `q_linear`: y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]).

Rules, first match wins (each returns None when it does not apply). Every rule sums in float32
and stores through mlcc_put, which rounds to y's dtype: float32 logits of a float16 model
(out_dtype="float32" on the output projection) are stored unrounded.

    gemv_tma_rule    (mlcc.backends.cuda.gemv_tma) one-row q4 GEMVs behind a norm, the
                     decode attention or the GLU GEMV, marked with the `tma_gemv` knob (on at
                     O2): the block's weight slice bulk-copied into shared memory by a producer
                     warp that does not wait for the kernel ahead.

    gemv_q4_tcg_rule (mlcc.backends.cuda.gemv_tcg) one row, 4-bit weights, K % 128 == 0: the
                     tensor-core GEMV with the scales applied after the mma, only where the
                     GEMV database's single-row winner has kind "tcg" (none today).
    gemv_q4_tc_rule  (mlcc.backends.cuda.gemv_tc) 4-bit weights at 1..16 rows or the batch_decode
                     rows, products on tensor cores (mma.sync with the weights as A): where the
                     tuning database measured it fastest (batch decode, 4 and 16 rows).
    gemv_q4_tcp_rule (mlcc.backends.cuda.gemv_tcp) 1..8 static rows, K % 128 == 0: the persistent
                     GEMV with mma.sync products and float32 sums, only where the database's
                     single-row winner for the shape has kind "tcp".
    gemv_q4_tuned_rule (mlcc.backends.cuda.gemv) the persistent GEMV for the decode shapes
                     where the tuning database measured it fastest, and for shapes it never
                     measured (on an H200 it beat the one-shot kernel below with the float16
                     dots by 16-24% on the 7B shapes; the one-shot kernel with the integer dot
                     now beats it on all of them: benchmarks/results/2026-11-29-h200-h).
    gemv_q4_rule     few static rows, 4-bit weights in groups of 32, float16 activations: the
                     one-shot decode GEMV. Each warp owns up to four output features; a lane reads
                     one group (four packed words) per feature with one 128-bit load, and all of
                     a warp's weight and scale loads are issued before the activation row is
                     staged in shared memory (already permuted into nibble-pair order), so the
                     memory latency overlaps the staging. Nibbles become half2 by the 0x6400
                     exponent trick (mlcc_q4_dot8: no int->float conversions), products are
                     summed in pairs in half2, then in float32, and the group's scale is applied
                     once; or, where the database picks the integer dot (mlcc.backends.cuda.intdot:
                     the 7B decode GEMVs), the row is staged as 16-bit integers meanwhile and each
                     group's products are exact dp2a sums; a record's min_blocks becomes the
                     kernel's launch bound (one wave of blocks at K = 11008).
    gemv_rule        few static rows, any weight: a warp per output feature, lanes over k.
    gemm_tc_rule     (mlcc.backends.cuda.gemm) the prefill GEMM: 128-row tiles on mma.sync
                     tensor cores, cp.async activation ring, int4 weights loaded ahead into
                     registers; float16 activations, 4-bit or float16 weights, K % 32 == 0.
    gemm_wmma_rule   float16 activations, float16 or float32 results (the logits), any row
                     count: 64x64 tiles on tensor cores (WMMA, fp32 accumulation) over 64- (or
                     32-) wide K steps; activations staged
                     with 128-bit loads, 4-bit weights dequantized a packed word at a time into
                     shared memory (one 128-bit store per word).
    gemm_rule        fallback: 16x16 shared-memory tiles in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mlcc.backends.cuda.intdot import DP2A, DP2A_SOURCE, dp2a_group, row_loads, stage_dp2a
from mlcc.backends.cuda.kernels import (
    GRID_WAIT,
    CudaKernel,
    dequant_expr,
    dim_text,
    launcher,
    signature,
    symbols_of,
)
from mlcc.backends.cuda.tuning import block_min_blocks, gemv_config
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.ir.types import Sym

if TYPE_CHECKING:
    from mlcc.backends.cuda.norm_fold import RowNorm

GEMV_MAX_ROWS = 4


class LinearShape:
    """Names, buffers and the weight expression of one linear spec."""

    def __init__(self, spec: KernelSpec) -> None:
        (xshape, self.xdt), (self.yshape, self.ydt) = spec.inputs[0], spec.outputs[0]
        self.rows = xshape[0]
        self.quant = spec.op == "q_linear"
        if self.quant:
            (wshape, wdt), (sshape, self.sdt) = spec.inputs[1], spec.inputs[2]
            self.n, self.k = wshape[0], spec.attr("in_features")
            self.words, self.groups = wshape[1], sshape[1]
            self.bits, self.group = spec.attr("bits"), spec.attr("group_size")
            self.buffers = [("x", xshape, self.xdt), ("qw", wshape, wdt), ("qs", sshape, self.sdt)]
        else:
            (wshape, self.wdt) = spec.inputs[1]
            self.n, self.k = wshape
            self.bits = 0
            self.buffers = [("x", xshape, self.xdt), ("w", wshape, self.wdt)]
        self.bias = len(spec.inputs) == (4 if self.quant else 3)
        if self.bias:
            self.buffers.append(("b", spec.inputs[-1][0], spec.inputs[-1][1]))
        self.buffers.append(("y", self.yshape, self.ydt))
        self.symbols = symbols_of(xshape)
        self.spec = spec

    def weight(self, n: str, k: str) -> str:
        if self.quant:
            return dequant_expr(self.spec, "qw", "qs", n, k, self.words, self.groups, self.sdt)
        return f"mlcc_f32(w[({n}) * {self.k}LL + ({k})])"

    def bias_term(self, n: str) -> str:
        return f" + mlcc_f32(b[{n}])" if self.bias else ""

    @property
    def static_rows(self) -> int | None:
        return None if isinstance(self.rows, Sym) else int(self.rows)

    @property
    def rows_text(self) -> str:
        return dim_text(self.rows)


# The tensor-core part of a 64x64 output tile, shared by the dense and the expert-grouped GEMMs
# (mlcc.backends.cuda.moe): four warps each own a 32x32 quarter as 2x2 WMMA fragments with
# float32 accumulators; each K step multiplies the tiles staged in As/Bs (row stride `ld`), and
# after the last one the fragments are stored to Cs (64 x 68 floats) for the epilogue.
WMMA_ACC_INIT = """  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  #pragma unroll
  for (int i = 0; i < 2; ++i)
    #pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);"""


def wmma_k_step(bk: int, ld: int) -> str:
    """The end of one K step (`bk` wide) and, after the K loop closes, the store to Cs."""
    return f"""    __syncthreads();
    #pragma unroll
    for (int kk = 0; kk < {bk}; kk += 16) {{
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b[2];
      #pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wm + 16 * i][kk], {ld});
      #pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[wn + 16 * j][kk], {ld});
      #pragma unroll
      for (int i = 0; i < 2; ++i)
        #pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }}
    __syncthreads();
  }}
  #pragma unroll
  for (int i = 0; i < 2; ++i)
    #pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], acc[i][j], 68, wmma::mem_row_major);
  __syncthreads();"""


def gemv_q4_applies(s: LinearShape) -> bool:
    return (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.k % 32 == 0 and s.words * 8 == s.k
            and s.static_rows is not None and s.static_rows <= GEMV_MAX_ROWS)


def gemv_q4_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    s = LinearShape(spec)
    if not gemv_q4_applies(s):
        return None
    warps, rows_per_warp, dot = gemv_config(s.n, s.k)
    return gemv_q4_kernel(s, name, warps, rows_per_warp, dot=dot,
                          min_blocks=block_min_blocks(s.n, s.k))


def stage_plain(s: LinearShape, warps: int) -> str:
    """Stage activation row r into xs, permuted into nibble-pair order: (x_j, x_{j+4})."""
    stage = -(-(s.k // 8) // (warps * 32))  # 128-bit activation loads per thread
    return f"""    uint4 raw[{stage}];
    #pragma unroll
    for (int i = 0; i < {stage}; ++i) {{
      const int blk = threadIdx.x + i * {warps * 32};
      if (blk < {s.k // 8}) raw[i] = *reinterpret_cast<const uint4*>(x + r * {s.k}LL + blk * 8);
    }}
    #pragma unroll
    for (int i = 0; i < {stage}; ++i) {{
      const int blk = threadIdx.x + i * {warps * 32};
      const half* h = reinterpret_cast<const half*>(&raw[i]);
      if (blk < {s.k // 8}) {{
        #pragma unroll
        for (int j = 0; j < 4; ++j) xs[blk * 4 + j] = __halves2half2(h[j], h[j + 4]);
      }}
    }}"""


def gemv_q4_kernel(s: LinearShape, name: str, warps: int, rows_per_warp: int,
                   buffers: list | None = None, staging: str | None = None,
                   outputs: tuple[str, ...] = ("y",), dot: str = "mlcc_q4_dot8",
                   min_blocks: int = 0, norm: RowNorm | None = None,
                   residual: bool = False, row_first: bool = False) -> CudaKernel:
    """The q4 decode GEMV with `warps` warps per block, each owning `rows_per_warp` features;
    `staging` (C++ filling xs from row r) replaces the plain copy for fused prologues;
    `min_blocks` > 0 asks ptxas to fit that many blocks on an SM (CudaKernel.min_blocks).

    The folded norms of mlcc.backends.cuda.norm_fold: with `residual` the kernel adds the
    residual `res` to its (float16) results and stores the sum `sum_out` instead of y, plus
    each block's float32 sum of squares of its stored sums at ssq[r * blocks + block]; with
    `norm` (the integer dot only) it stages the RMS-normalized row of such a sum.

    With the integer dot (`dot=intdot.DP2A`) each block stages its row as 16-bit integers and
    group factors (intdot.stage_dp2a) while its weight loads are in flight, and a lane reads its
    group's four activation words starting at word (lane / 2) % 4 (the weight words rotated to
    match), so a quarter warp's 16-byte reads fall in distinct banks; the group sums are exact
    integers, so the rotation changes no bit and the result equals the persistent GEMV's.
    (K split over a block's warps and a GLU mode were measured here and won nowhere:
    benchmarks/results/2026-11-29-h200-h.)

    `row_first` (the integer dot, one row, no fused prologue or residual) waits first, then
    issues the activation row's loads ahead of the weight loads, so that the staging does
    not queue behind them: meant for a GEMV that the kernel ahead does not release early,
    whose wait returns at its start anyway. Same bits; slower on an H200 at K = 11008 and in
    the 7B decode (0.92-0.93x: benchmarks/results/2026-11-30-h200-c), so nothing selects it
    (gemv_sweep.py's `row_first` set times it)."""
    groups = s.k // 32
    iters = -(-groups // 32)  # groups per lane and feature
    per_block = warps * rows_per_warp
    buffers = buffers or s.buffers
    integer = dot == DP2A
    if integer and staging is not None:
        raise MlccError("compile", f"{name}: the integer dot stages its own activations; a "
                        f"fused prologue needs another dot (e.g. mlcc_q4_dot8_lop3_pairs)")
    if norm is not None and not integer:
        raise MlccError("compile", f"{name}: a folded norm is staged by the integer dot only")
    if row_first and not (integer and staging is None and norm is None and not residual
                          and s.static_rows == 1):
        raise MlccError("compile", f"{name}: row_first needs the integer dot on one plain row")
    if row_first:
        staging = stage_dp2a(s.k, warps, preloaded=True)
    staging = staging or (stage_dp2a(s.k, warps, norm) if integer else stage_plain(s, warps))
    factors = f"\n  __shared__ int2 xg[{groups}];" if integer else ""
    rotation = ("\n  const int rot = (lane >> 1) & 3;" if integer else "")
    head, wait = "", f"{GRID_WAIT}  // the weights above need nothing from the kernel before"
    if row_first:
        head = (f"\n  {GRID_WAIT}  // then the row's loads, ahead of the weights'\n"
                f"{row_loads(s.k, warps, row='0')}")
        wait = "// (the row was loaded above)"
    body = f"""{DP2A_SOURCE if integer else ""}{signature(name, buffers, outputs, s.symbols)} {{
  __shared__ __align__(16) half2 xs[{s.k // 2}];{factors}
  __shared__ float red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;{rotation}
  const long long n0 = (long long)blockIdx.x * {per_block} + warp * {rows_per_warp};{head}
  uint4 w[{rows_per_warp}][{iters}];
  half sc[{rows_per_warp}][{iters}];
  #pragma unroll
  for (int q = 0; q < {rows_per_warp}; ++q) {{
    const long long n = n0 + q < {s.n} ? n0 + q : {s.n - 1};
    const uint4* row = reinterpret_cast<const uint4*>(qw + n * {s.words}LL);
    #pragma unroll
    for (int it = 0; it < {iters}; ++it) {{
      const int g = lane + it * 32;
      w[q][it] = g < {groups} ? __ldg(row + g) : make_uint4(0u, 0u, 0u, 0u);
      sc[q][it] = g < {groups} ? qs[n * {s.groups}LL + g] : __float2half(0.f);
    }}
  }}
  {wait}
  for (int r = 0; r < {s.static_rows}; ++r) {{
    __syncthreads();{_residual_loads(s, rows_per_warp) if residual else ""}
{staging}
    __syncthreads();
    float acc[{rows_per_warp}];
    #pragma unroll
    for (int q = 0; q < {rows_per_warp}; ++q) acc[q] = 0.f;
    #pragma unroll
    for (int it = 0; it < {iters}; ++it) {{
      const int g = lane + it * 32;
      if (g < {groups}) {{
{_integer_group(rows_per_warp) if integer else _float_group(dot, rows_per_warp)}
      }}
    }}
{_residual_store(s, rows_per_warp, warps) if residual else _store(s, rows_per_warp)}
  }}
  return 0;
}}
"""
    grid = f"T.int64({-(-s.n // per_block)})"
    return CudaKernel(name, body, launcher(name, buffers, (grid,), warps * 32, s.symbols),
                      min_blocks=min_blocks)


def _store(s: LinearShape, rows_per_warp: int) -> str:
    return f"""    #pragma unroll
    for (int q = 0; q < {rows_per_warp}; ++q) {{
      const float total = mlcc_warp_sum(acc[q]);
      const long long n = n0 + q;
      if (lane == 0 && n < {s.n}) mlcc_put(y, r * {s.n}LL + n, total{s.bias_term("n")});
    }}"""


def _residual_loads(s: LinearShape, rows_per_warp: int) -> str:
    """Lane 0 loads the residual of its features for row r (in flight while the row stages)."""
    return f"""
    half rv[{rows_per_warp}];
    #pragma unroll
    for (int q = 0; q < {rows_per_warp}; ++q)
      rv[q] = lane == 0 && n0 + q < {s.n} ? res[r * {s.n}LL + n0 + q] : __float2half(0.f);"""


def _residual_store(s: LinearShape, rows_per_warp: int, warps: int) -> str:
    """sum_out = float16(float16(result) + residual), as add_rms_norm rounds it; then the
    block's float32 sum of squares of its stored sums goes to ssq[r * blocks + block]."""
    return f"""    float sq = 0.f;
    #pragma unroll
    for (int q = 0; q < {rows_per_warp}; ++q) {{
      const float total = mlcc_warp_sum(acc[q]);
      const long long n = n0 + q;
      if (lane == 0 && n < {s.n}) {{
        const half result = __float2half(total{s.bias_term("n")});
        const half sum = __float2half(__half2float(result) + __half2float(rv[q]));
        sum_out[r * {s.n}LL + n] = sum;
        sq += __half2float(sum) * __half2float(sum);
      }}
    }}
    if (lane == 0) red[warp] = sq;
    __syncthreads();
    if (threadIdx.x == 0) {{
      float part = 0.f;
      #pragma unroll
      for (int v = 0; v < {warps}; ++v) part += red[v];
      ssq[r * {-(-s.n // (warps * rows_per_warp))}LL + blockIdx.x] = part;
    }}"""


def _float_group(dot: str, rows_per_warp: int) -> str:
    """A lane's group g of each feature with a float16 nibble dot of kernels.py."""
    return f"""        const half2* xg = xs + g * 16;
        #pragma unroll
        for (int q = 0; q < {rows_per_warp}; ++q) {{
          const float part = {dot}(w[q][it].x, xg) + {dot}(w[q][it].y, xg + 4)
                           + {dot}(w[q][it].z, xg + 8) + {dot}(w[q][it].w, xg + 12);
          acc[q] += part * __half2float(sc[q][it]);
        }}"""


def _integer_group(rows_per_warp: int) -> str:
    """A lane's group g of each feature with the integer dot, activation words rotated."""
    return f"""        const uint4* xq = reinterpret_cast<const uint4*>(xs) + g * 4;
        const uint4 x0 = xq[rot], x1 = xq[(rot + 1) & 3], x2 = xq[(rot + 2) & 3],
                    x3 = xq[(rot + 3) & 3];
        const int2 zf = xg[g];
        #pragma unroll
        for (int q = 0; q < {rows_per_warp}; ++q) {{
          uint4 v = w[q][it];
          v = (rot & 1) ? make_uint4(v.y, v.z, v.w, v.x) : v;
          v = (rot & 2) ? make_uint4(v.z, v.w, v.x, v.y) : v;
          acc[q] += ({dp2a_group("v", ("x0", "x1", "x2", "x3"), "zf")}) * __half2float(sc[q][it]);
        }}"""


def gemv_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    s = LinearShape(spec)
    if s.static_rows is None or s.static_rows > GEMV_MAX_ROWS:
        return None
    warps = 4
    body = f"""{signature(name, s.buffers, ("y",), s.symbols)} {{
  const int lane = threadIdx.x & 31;
  const long long n = (long long)blockIdx.x * {warps} + (threadIdx.x >> 5);
  if (n >= {s.n}) return 0;
  for (int r = 0; r < {s.static_rows}; ++r) {{
    float acc = 0.f;
    for (int k = lane; k < {s.k}; k += 32)
      acc += mlcc_f32(x[r * {s.k}LL + k]) * {s.weight("n", "k")};
    acc = mlcc_warp_sum(acc);
    if (lane == 0) mlcc_put(y, r * {s.n}LL + n, acc{s.bias_term("n")});
  }}
  return 0;
}}
"""
    grid = f"T.int64({-(-s.n // warps)})"
    return CudaKernel(name, body, launcher(name, s.buffers, (grid,), warps * 32, s.symbols))


def _gemm_a_fill(s: LinearShape, bk: int) -> str:
    """Fill As (64 rows x bk) from x, 128-bit loads when rows are 16-byte aligned."""
    m = s.rows_text
    if s.k % 8 == 0:
        return f"""    for (int v = tid; v < {64 * bk // 8}; v += 128) {{
      const int r = v / {bk // 8}, c = (v % {bk // 8}) * 8;
      const long long mm = m0 + r;
      const int k = k0 + c;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (mm < {m} && k < {s.k}) val = *reinterpret_cast<const uint4*>(x + mm * {s.k}LL + k);
      *reinterpret_cast<uint4*>(&As[r][c]) = val;
    }}"""
    return f"""    for (int e = tid; e < {64 * bk}; e += 128) {{
      const int r = e / {bk}, c = e % {bk};
      const long long mm = m0 + r;
      const int k = k0 + c;
      As[r][c] = (mm < {m} && k < {s.k}) ? x[mm * {s.k}LL + k] : __float2half(0.f);
    }}"""


def _gemm_b_fill(s: LinearShape, bk: int, q4: bool) -> str:
    """Fill Bs (64 output features x bk) with dequantized (or plain) weights."""
    if q4:
        # One packed word = eight consecutive k of one feature -> one 128-bit shared store.
        return f"""    for (int v = tid; v < {64 * bk // 8}; v += 128) {{
      const int r = v / {bk // 8}, c = (v % {bk // 8}) * 8;
      const long long n = n0 + r;
      uint4 out = make_uint4(0u, 0u, 0u, 0u);
      if (n < {s.n}) {{
        const unsigned int word = __ldg(qw + n * {s.words}LL + (k0 + c) / 8);
        const float sc = mlcc_f32(qs[n * {s.groups}LL + (k0 + c) / 32]);
        half* h = reinterpret_cast<half*>(&out);
        #pragma unroll
        for (int j = 0; j < 8; ++j)
          h[j] = __float2half(((float)((word >> (4 * j)) & 15u) - 7.0f) * sc);
      }}
      *reinterpret_cast<uint4*>(&Bs[r][c]) = out;
    }}"""
    return f"""    for (int e = tid; e < {64 * bk}; e += 128) {{
      const int r = e / {bk}, c = e % {bk};
      const long long n = n0 + r;
      const int k = k0 + c;
      Bs[r][c] = __float2half((n < {s.n} && k < {s.k}) ? {s.weight("n", "k")} : 0.f);
    }}"""


def gemm_wmma_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    s = LinearShape(spec)
    # float32 results: the logits projection of a float16 model (out_dtype="float32").
    if s.xdt != "float16" or s.ydt not in ("float16", "float32"):
        return None
    q4 = s.quant and s.bits == 4 and s.group == 32 and s.k % 32 == 0 and s.sdt == "float16"
    bk = 64 if s.k % 64 == 0 else 32
    m, ld = s.rows_text, bk + 8
    body = f"""{signature(name, s.buffers, ("y",), s.symbols)} {{
  using namespace nvcuda;
  __shared__ __align__(32) half As[64][{ld}];
  __shared__ __align__(32) half Bs[64][{ld}];
  __shared__ __align__(32) float Cs[64][68];
  const int tid = threadIdx.x, warp = tid >> 5;
  const long long m0 = (long long)blockIdx.y * 64, n0 = (long long)blockIdx.x * 64;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
{WMMA_ACC_INIT}
  for (int k0 = 0; k0 < {s.k}; k0 += {bk}) {{
{_gemm_a_fill(s, bk)}
{_gemm_b_fill(s, bk, q4)}
{wmma_k_step(bk, ld)}
  for (int e = tid; e < 4096; e += 128) {{
    const int r = e >> 6, c = e & 63;
    const long long mm = m0 + r, n = n0 + c;
    if (mm < {m} && n < {s.n}) mlcc_put(y, mm * {s.n}LL + n, Cs[r][c]{s.bias_term("n")});
  }}
  return 0;
}}
"""
    return CudaKernel(name, body, _gemm_launcher(name, s, 64, 128))


def _gemm_launcher(name: str, s: LinearShape, tile: int, threads: int) -> str:
    rows = (f"({s.rows_text} + T.int64({tile - 1})) // T.int64({tile})"
            if isinstance(s.rows, Sym) else f"T.int64({-(-s.static_rows // tile)})")
    cols = f"T.int64({-(-s.n // tile)})"
    return launcher(name, s.buffers, (cols, rows), threads, s.symbols)


def gemm_rule(spec: KernelSpec, name: str) -> CudaKernel:
    s = LinearShape(spec)
    m = s.rows_text
    body = f"""{signature(name, s.buffers, ("y",), s.symbols)} {{
  __shared__ float As[16][17];
  __shared__ float Bs[16][17];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const long long m0 = (long long)blockIdx.y * 16, n0 = (long long)blockIdx.x * 16;
  float acc = 0.f;
  for (int k0 = 0; k0 < {s.k}; k0 += 16) {{
    const long long mm = m0 + ty, nn = n0 + ty;
    const int k = k0 + tx;
    As[ty][tx] = (mm < {m} && k < {s.k}) ? mlcc_f32(x[mm * {s.k}LL + k]) : 0.f;
    Bs[ty][tx] = (nn < {s.n} && k < {s.k}) ? {s.weight("nn", "k")} : 0.f;
    __syncthreads();
    #pragma unroll
    for (int kk = 0; kk < 16; ++kk) acc += As[ty][kk] * Bs[tx][kk];
    __syncthreads();
  }}
  const long long mm = m0 + ty, n = n0 + tx;
  if (mm < {m} && n < {s.n}) mlcc_put(y, mm * {s.n}LL + n, acc{s.bias_term("n")});
  return 0;
}}
"""
    return CudaKernel(name, body, _gemm_launcher(name, s, 16, 256))


from mlcc.backends.cuda.gemm import gemm_tc_rule  # noqa: E402 - gemm.py reads this module
from mlcc.backends.cuda.gemv import gemv_q4_tuned_rule  # noqa: E402 - and gemv.py
from mlcc.backends.cuda.gemv_tc import gemv_q4_tc_rule  # noqa: E402 - and gemv_tc.py
from mlcc.backends.cuda.gemv_tcg import gemv_q4_tcg_rule  # noqa: E402 - and gemv_tcg.py
from mlcc.backends.cuda.gemv_tcp import gemv_q4_tcp_rule  # noqa: E402 - and gemv_tcp.py
from mlcc.backends.cuda.gemv_tma import gemv_tma_rule  # noqa: E402 - and gemv_tma.py

LINEAR_RULES: tuple[Callable[[KernelSpec, str], CudaKernel | None], ...] = (
    gemv_tma_rule, gemv_q4_tcg_rule, gemv_q4_tc_rule, gemv_q4_tcp_rule, gemv_q4_tuned_rule,
    gemv_q4_rule, gemv_rule, gemm_tc_rule, gemm_wmma_rule,
)


def gen_linear(spec: KernelSpec, name: str) -> CudaKernel:
    for rule in LINEAR_RULES:
        kernel = rule(spec, name)
        if kernel is not None:
            return kernel
    return gemm_rule(spec, name)
