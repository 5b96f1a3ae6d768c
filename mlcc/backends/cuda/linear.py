"""CUDA kernels for `linear` and `q_linear`: y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]).

Rules, first match wins (each returns None when it does not apply):

    gemv_q4_rule     few static rows, 4-bit weights in groups of 32, float16 activations: the
                     decode hot path. Each warp owns ROWS output features; a lane reads one
                     group (four packed words) per row with one 128-bit load, converts nibbles
                     to half2 with the 0x6400 exponent trick (two nibbles per LOP3, no int->float
                     conversions), multiplies with half2 instructions and accumulates each word
                     in float32, applying the group's scale once. The activation row is staged
                     in shared memory, already permuted into the nibble-pair order.
    gemv_rule        few static rows, any weight: a warp per output feature, lanes over k.
    gemm_wmma_rule   float16 activations, any row count: 64x64 tiles on tensor cores (WMMA,
                     fp32 accumulation), weights dequantized into shared memory per 32-wide K
                     step (one 128-bit load and one scale per row for 4-bit groups of 32).
    gemm_rule        fallback: 16x16 shared-memory tiles in float32.
"""

from __future__ import annotations

from collections.abc import Callable

from mlcc.backends.cuda.kernels import (
    CudaKernel, dequant_expr, dim_text, launcher, signature, symbols_of,
)
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym

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


def gemv_q4_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    s = LinearShape(spec)
    if not (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.k % 32 == 0 and s.words * 8 == s.k
            and s.static_rows is not None and s.static_rows <= GEMV_MAX_ROWS):
        return None
    warps, rows_per_warp = 8, max(1, min(4, s.n // 8192))
    per_block = warps * rows_per_warp
    groups = s.k // 32
    body = f"""__device__ __forceinline__ float {name}_dot8(unsigned int w, const half2* xp) {{
  const half2 magic = __half2half2(__ushort_as_half((unsigned short)0x6407));  // 1024 + max_int (7)
  unsigned int t = (w & 0x000F000Fu) | 0x64006400u;
  half2 p = __hmul2(__hsub2(*reinterpret_cast<half2*>(&t), magic), xp[0]);
  t = ((w >> 4) & 0x000F000Fu) | 0x64006400u;
  p = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t), magic), xp[1], p);
  t = ((w >> 8) & 0x000F000Fu) | 0x64006400u;
  p = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t), magic), xp[2], p);
  t = ((w >> 12) & 0x000F000Fu) | 0x64006400u;
  p = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t), magic), xp[3], p);
  const float2 f = __half22float2(p);
  return f.x + f.y;
}}
{signature(name, s.buffers, ("y",), s.symbols)} {{
  __shared__ __align__(16) half2 xs[{s.k // 2}];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long n0 = (long long)blockIdx.x * {per_block} + warp * {rows_per_warp};
  for (int r = 0; r < {s.static_rows}; ++r) {{
    __syncthreads();
    for (int blk = threadIdx.x; blk < {s.k // 8}; blk += {warps * 32}) {{
      const uint4 raw = *reinterpret_cast<const uint4*>(x + r * {s.k}LL + blk * 8);
      const half* h = reinterpret_cast<const half*>(&raw);
      #pragma unroll
      for (int j = 0; j < 4; ++j) xs[blk * 4 + j] = __halves2half2(h[j], h[j + 4]);
    }}
    __syncthreads();
    float acc[{rows_per_warp}];
    #pragma unroll
    for (int q = 0; q < {rows_per_warp}; ++q) acc[q] = 0.f;
    #pragma unroll 2
    for (int g = lane; g < {groups}; g += 32) {{
      uint4 w[{rows_per_warp}];
      #pragma unroll
      for (int q = 0; q < {rows_per_warp}; ++q) {{
        const long long n = n0 + q < {s.n} ? n0 + q : {s.n - 1};
        w[q] = __ldg(reinterpret_cast<const uint4*>(qw + n * {s.words}LL) + g);
      }}
      const half2* xg = xs + g * 16;
      #pragma unroll
      for (int q = 0; q < {rows_per_warp}; ++q) {{
        const long long n = n0 + q < {s.n} ? n0 + q : {s.n - 1};
        const float part = {name}_dot8(w[q].x, xg) + {name}_dot8(w[q].y, xg + 4)
                         + {name}_dot8(w[q].z, xg + 8) + {name}_dot8(w[q].w, xg + 12);
        acc[q] += part * __half2float(qs[n * {s.groups}LL + g]);
      }}
    }}
    #pragma unroll
    for (int q = 0; q < {rows_per_warp}; ++q) {{
      const float total = mlcc_warp_sum(acc[q]);
      const long long n = n0 + q;
      if (lane == 0 && n < {s.n}) mlcc_put(y, r * {s.n}LL + n, total{s.bias_term("n")});
    }}
  }}
  return 0;
}}
"""
    grid = f"T.int64({-(-s.n // per_block)})"
    return CudaKernel(name, body, launcher(name, s.buffers, (grid,), warps * 32, s.symbols))


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
    for (int k = lane; k < {s.k}; k += 32) acc += mlcc_f32(x[r * {s.k}LL + k]) * {s.weight("n", "k")};
    acc = mlcc_warp_sum(acc);
    if (lane == 0) mlcc_put(y, r * {s.n}LL + n, acc{s.bias_term("n")});
  }}
  return 0;
}}
"""
    grid = f"T.int64({-(-s.n // warps)})"
    return CudaKernel(name, body, launcher(name, s.buffers, (grid,), warps * 32, s.symbols))


def _gemm_q4_tile(s: LinearShape) -> str:
    """Fill Bs (64 features x 32 k) from one 4-bit group of 32 per feature."""
    return f"""    if (tid < 64) {{
      const long long n = n0 + tid;
      half* dst = &Bs[tid][0];
      if (n < {s.n}) {{
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(qw + n * {s.words}LL) + k0 / 32);
        const float sc = mlcc_f32(qs[n * {s.groups}LL + k0 / 32]);
        const unsigned int words[4] = {{q.x, q.y, q.z, q.w}};
        #pragma unroll
        for (int j = 0; j < 32; ++j)
          dst[j] = __float2half(((float)((words[j >> 3] >> ((j & 7) * 4)) & 15u) - 7.0f) * sc);
      }} else {{
        #pragma unroll
        for (int j = 0; j < 32; ++j) dst[j] = __float2half(0.f);
      }}
    }}"""


def gemm_wmma_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    s = LinearShape(spec)
    if s.xdt != "float16" or s.ydt != "float16":
        return None
    q4 = s.quant and s.bits == 4 and s.group == 32 and s.k % 32 == 0 and s.sdt == "float16"
    m = s.rows_text
    if q4:
        b_fill = _gemm_q4_tile(s)
    else:
        b_fill = f"""    for (int e = tid; e < 2048; e += 128) {{
      const int r = e >> 5, c = e & 31;
      const long long n = n0 + r;
      const int k = k0 + c;
      Bs[r][c] = __float2half((n < {s.n} && k < {s.k}) ? {s.weight("n", "k")} : 0.f);
    }}"""
    body = f"""{signature(name, s.buffers, ("y",), s.symbols)} {{
  using namespace nvcuda;
  __shared__ __align__(32) half As[64][40];
  __shared__ __align__(32) half Bs[64][40];
  __shared__ __align__(32) float Cs[64][68];
  const int tid = threadIdx.x, warp = tid >> 5;
  const long long m0 = (long long)blockIdx.y * 64, n0 = (long long)blockIdx.x * 64;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  #pragma unroll
  for (int i = 0; i < 2; ++i)
    #pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int k0 = 0; k0 < {s.k}; k0 += 32) {{
    for (int e = tid; e < 2048; e += 128) {{
      const int r = e >> 5, c = e & 31;
      const long long mm = m0 + r;
      const int k = k0 + c;
      As[r][c] = (mm < {m} && k < {s.k}) ? x[mm * {s.k}LL + k] : __float2half(0.f);
    }}
{b_fill}
    __syncthreads();
    #pragma unroll
    for (int kk = 0; kk < 32; kk += 16) {{
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b[2];
      #pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wm + 16 * i][kk], 40);
      #pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[wn + 16 * j][kk], 40);
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
  __syncthreads();
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


LINEAR_RULES: tuple[Callable[[KernelSpec, str], CudaKernel | None], ...] = (
    gemv_q4_rule, gemv_rule, gemm_wmma_rule,
)


def gen_linear(spec: KernelSpec, name: str) -> CudaKernel:
    for rule in LINEAR_RULES:
        kernel = rule(spec, name)
        if kernel is not None:
            return kernel
    return gemm_rule(spec, name)
