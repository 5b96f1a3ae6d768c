"""CUDA kernels of the mixture-of-experts ops: routing, dispatch, grouped linears, reduction.

The router's weights stay on the device, so every kernel finds the chosen experts there; the
host launches the same grids whatever the routing is (no copy back, and a decode step stays
capturable as a CUDA graph).

    moe_route       one thread per row: top_k by repeated argmax (ties: lower expert), softmax
                    over the chosen logits, 0 elsewhere (mlcc.ir.ops moe_route).
    moe_dispatch    one block, a warp per expert: rows with a non-zero weight are compacted
                    with warp ballots into the expert's slots (ordered by expert, then row).
    moe_linear /    decode (a static row count): a gathered GEMV with one grid row per slot;
    q_moe_linear    the block finds its expert in expert_offsets and reads only that expert's
                    weights (4-bit groups of 32 with float16 activations: 128-bit loads and the
                    nibble-pair dot of the dense GEMV); blocks of unused slots write 0 and
                    exit. Prefill (symbolic rows):
                    a grouped GEMM whose grid covers every expert's largest possible slot range
                    (n rows); a tile block past its expert's last slot exits at once, the
                    others gather their activation rows through slot_rows and multiply them by
                    their expert's weight tile (dequantized on the fly): 64x64 tiles on tensor
                    cores (WMMA, float32 accumulation) for float16, else 16x16 in float32.
    moe_reduce      one block per row: weighted slot results summed in float32 over the row's
                    experts in ascending order, as the dense combination adds them.

Experts are separate parameters, so a kernel receives one pointer per expert weight and picks
the one of its expert with a chain of selects.

Measured on an H200 (2026-11-28), one Mixtral-8x7B layer in q4f16_1 with random weights: at
decode the two grouped GEMVs take 78 and 40 us (about 1.5 TB/s of the chosen experts' weights;
the per-element dequantizing GEMV took 323 and 199 us); for a 512-token chunk the WMMA grouped
GEMMs take 2.1 and 1.25 ms (39.5 and 19.9 ms in the float32 tiles).
"""

from __future__ import annotations

from collections.abc import Callable

from mlcc.backends.cuda.kernels import (
    BLOCK,
    C_TYPES,
    CudaKernel,
    dequant_expr,
    dim_text,
    launcher,
    launcher_nests,
    signature,
    symbols_of,
)
from mlcc.backends.cuda.linear import WMMA_ACC_INIT, wmma_k_step
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym

TILE = 16
GEMV_WARPS = 4
GEMV_MAX_SLOTS = 64  # grid rows of the gathered GEMV (static slot counts up to this)
Q4_WARPS, Q4_ROWS_PER_WARP = 4, 4  # the 4-bit GEMV: 16 output features per block
Q4_MAX_SHARED_BYTES = 48 * 1024  # the staged activation row (float16) must fit


def gen_moe_route(spec: KernelSpec, name: str) -> CudaKernel:
    (shape, dt), = spec.inputs
    experts, k = shape[1], spec.attr("top_k")
    buffers = [("x", shape, dt), ("y", shape, "float32")]
    syms = symbols_of(shape)
    body = f"""{signature(name, buffers, ("y",), syms)} {{
  const long long i = (long long)blockIdx.x * {BLOCK} + threadIdx.x;
  if (i >= {dim_text(shape[0])}) return 0;
  bool taken[{experts}];
  float val[{k}];
  int idx[{k}];
  for (int e = 0; e < {experts}; ++e) {{ taken[e] = false; y[i * {experts}LL + e] = 0.f; }}
  for (int s = 0; s < {k}; ++s) {{
    val[s] = -3.4e38f;
    idx[s] = 0;
    for (int e = 0; e < {experts}; ++e) {{
      const float v = mlcc_f32(x[i * {experts}LL + e]);
      if (!taken[e] && v > val[s]) {{ val[s] = v; idx[s] = e; }}
    }}
    taken[idx[s]] = true;
  }}
  float total = 0.f;
  for (int s = 0; s < {k}; ++s) total += expf(val[s] - val[0]);
  for (int s = 0; s < {k}; ++s) y[i * {experts}LL + idx[s]] = expf(val[s] - val[0]) / total;
  return 0;
}}
"""
    grid = f"({dim_text(shape[0])} + T.int64({BLOCK - 1})) // T.int64({BLOCK})"
    if not isinstance(shape[0], Sym):
        grid = f"T.int64({-(-shape[0] // BLOCK)})"
    return CudaKernel(name, body, launcher(name, buffers, (grid,), BLOCK, syms))


def gen_moe_dispatch(spec: KernelSpec, name: str) -> CudaKernel:
    (wshape, wdt), = spec.inputs
    (rshape, _), (oshape, _), _ = spec.outputs
    experts, k, n = wshape[1], spec.attr("top_k"), dim_text(wshape[0])
    buffers = [("w", wshape, wdt), ("slot_rows", rshape, "int32"), ("offsets", oshape, "int32"),
               ("row_slots", rshape, "int32")]
    syms = symbols_of(wshape)
    warps = min(experts, 32)
    # rank: the expert's position among the row's experts; a row past top_k (never from
    # moe_route) keeps its first top_k experts, as the CPU kernel does.
    chosen = f"""const long long i = base + lane;
      int rank = 0;
      bool on = i < {n} && w[i * {experts}LL + e] != 0.f;
      if (on) {{
        for (int f = 0; f < e; ++f) rank += w[i * {experts}LL + f] != 0.f;
        on = rank < {k};
      }}
      const unsigned int mask = __ballot_sync(0xffffffffu, on);"""
    body = f"""{signature(name, buffers, ("slot_rows", "offsets", "row_slots"), syms)} {{
  __shared__ int start[{experts + 1}];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (long long p = threadIdx.x; p < {n} * {k}LL; p += blockDim.x) {{
    slot_rows[p] = -1;
    row_slots[p] = -1;
  }}
  for (int e = warp; e < {experts}; e += {warps}) {{
    int count = 0;
    for (long long base = 0; base < {n}; base += 32) {{
      {chosen}
      count += __popc(mask);
    }}
    if (lane == 0) start[e + 1] = count;
  }}
  __syncthreads();
  if (threadIdx.x == 0) {{
    start[0] = 0;
    for (int e = 0; e < {experts}; ++e) start[e + 1] += start[e];
  }}
  __syncthreads();
  for (int e = threadIdx.x; e <= {experts}; e += blockDim.x) offsets[e] = start[e];
  for (int e = warp; e < {experts}; e += {warps}) {{
    int next = start[e];
    for (long long base = 0; base < {n}; base += 32) {{
      {chosen}
      if (on) {{
        const int p = next + __popc(mask & ((1u << lane) - 1u));
        slot_rows[p] = (int)i;
        row_slots[i * {k}LL + rank] = p;
      }}
      next += __popc(mask);
    }}
  }}
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, buffers, ("T.int64(1)",), 32 * warps, syms))


class _Grouped:
    """Buffers, the expert select and the weight expression of a (q_)moe_linear spec."""

    def __init__(self, spec: KernelSpec) -> None:
        (self.xshape, self.xdt), (self.rshape, _), (self.oshape, _) = spec.inputs[:3]
        (self.yshape, self.ydt), = spec.outputs
        self.quant = spec.op == "q_moe_linear"
        weights = spec.inputs[3:]
        if self.quant:
            self.experts = len(weights) // 2
            (wshape, _), (sshape, self.sdt) = weights[0], weights[1]
            self.n, self.k = wshape[0], spec.attr("in_features")
            self.words, self.groups = wshape[1], sshape[1]
            parts = [("qw", weights[0::2]), ("qs", weights[1::2])]
        else:
            self.experts = len(weights)
            self.n, self.k = weights[0][0]
            parts = [("w", weights)]
        self.weight_buffers = [(f"{p}{e}",) + ws[e] for e in range(self.experts)
                               for p, ws in parts]
        self.buffers = ([("x", self.xshape, self.xdt), ("slot_rows", self.rshape, "int32"),
                         ("offsets", self.oshape, "int32")] + self.weight_buffers
                        + [("y", self.yshape, self.ydt)])
        self.part_dtypes = {p: ws[0][1] for p, ws in parts}  # "qw"/"qs" or "w" -> dtype
        self.slots_per_row = self.rshape[1]
        self.rows = self.rshape[0]
        self.gather = spec.attr("gather")
        self.symbols = symbols_of(self.xshape, self.rshape)
        self.spec = spec

    def select(self, expert: str) -> str:
        """C++ declarations of the chosen expert's weight pointers (`qwe`/`qse` or `we`)."""
        lines = []
        for part, dtype in self.part_dtypes.items():
            chain = f"{part}{self.experts - 1}"
            for e in range(self.experts - 2, -1, -1):
                chain = f"{expert} == {e} ? {part}{e} : {chain}"
            lines.append(f"const {C_TYPES[dtype]}* __restrict__ {part}e = {chain};")
        return "\n  ".join(lines)

    def weight(self, n: str, k: str) -> str:
        if self.quant:
            return dequant_expr(self.spec, "qwe", "qse", n, k, self.words, self.groups, self.sdt)
        return f"mlcc_f32(we[({n}) * {self.k}LL + ({k})])"

    def source_row(self, p: str) -> str:
        """Pointer offset of slot p's activation row."""
        if self.gather:
            return f"(long long)slot_rows[{p}] * {self.k}LL"
        return f"({p}) * {self.k}LL"


def _gemv(g: _Grouped, name: str, slots: int) -> CudaKernel:
    body = f"""{signature(name, g.buffers, ("y",), g.symbols)} {{
  const int lane = threadIdx.x & 31;
  const long long n = (long long)blockIdx.x * {GEMV_WARPS} + (threadIdx.x >> 5);
  const int p = blockIdx.y;
  if (n >= {g.n}) return 0;
  if (slot_rows[p] < 0) {{
    if (lane == 0) mlcc_put(y, p * {g.n}LL + n, 0.f);
    return 0;
  }}
  int e = 0;
  while (e < {g.experts - 1} && p >= offsets[e + 1]) ++e;
  {g.select("e")}
  const long long src = {g.source_row("p")};
  float acc = 0.f;
  for (int k = lane; k < {g.k}; k += 32) acc += mlcc_f32(x[src + k]) * {g.weight("n", "k")};
  acc = mlcc_warp_sum(acc);
  if (lane == 0) mlcc_put(y, p * {g.n}LL + n, acc);
  return 0;
}}
"""
    grid = (f"T.int64({-(-g.n // GEMV_WARPS)})", f"T.int64({slots})")
    return CudaKernel(name, body, launcher(name, g.buffers, grid, GEMV_WARPS * 32, g.symbols))


def _q4_gemv_applies(g: _Grouped) -> bool:
    return (g.quant and g.spec.attr("bits") == 4 and g.spec.attr("group_size") == 32
            and g.xdt == "float16" and g.sdt == "float16" and g.k % 32 == 0
            and g.words * 8 == g.k and 2 * g.k <= Q4_MAX_SHARED_BYTES)


def _q4_gemv(g: _Grouped, name: str, slots: int) -> CudaKernel:
    """The gathered GEMV for 4-bit experts: a lane reads a whole group (four packed words) of a
    feature with one 128-bit load; the slot's activation row is staged in shared memory in
    nibble-pair order for mlcc_q4_dot8 (see kernels.COMMON_SOURCE); the group's scale is
    applied once to its sum."""
    groups, per_block = g.k // 32, Q4_WARPS * Q4_ROWS_PER_WARP
    body = f"""{signature(name, g.buffers, ("y",), g.symbols)} {{
  __shared__ __align__(16) half2 xs[{g.k // 2}];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int p = blockIdx.y;
  const long long n0 = (long long)blockIdx.x * {per_block} + warp * {Q4_ROWS_PER_WARP};
  if (slot_rows[p] < 0) {{
    for (int q = lane; q < {Q4_ROWS_PER_WARP}; q += 32)
      if (n0 + q < {g.n}) mlcc_put(y, p * {g.n}LL + n0 + q, 0.f);
    return 0;
  }}
  int e = 0;
  while (e < {g.experts - 1} && p >= offsets[e + 1]) ++e;
  {g.select("e")}
  const half* xr = x + {g.source_row("p")};
  for (int blk = threadIdx.x; blk < {g.k // 8}; blk += {Q4_WARPS * 32}) {{
    const uint4 raw = *reinterpret_cast<const uint4*>(xr + blk * 8);
    const half* h = reinterpret_cast<const half*>(&raw);
    #pragma unroll
    for (int j = 0; j < 4; ++j) xs[blk * 4 + j] = __halves2half2(h[j], h[j + 4]);
  }}
  __syncthreads();
  #pragma unroll
  for (int q = 0; q < {Q4_ROWS_PER_WARP}; ++q) {{
    const long long n = n0 + q;
    if (n >= {g.n}) break;
    const uint4* row = reinterpret_cast<const uint4*>(qwe + n * {g.words}LL);
    float acc = 0.f;
    for (int gi = lane; gi < {groups}; gi += 32) {{
      const uint4 w = __ldg(row + gi);
      const half2* xg = xs + gi * 16;
      const float part = mlcc_q4_dot8(w.x, xg) + mlcc_q4_dot8(w.y, xg + 4)
                       + mlcc_q4_dot8(w.z, xg + 8) + mlcc_q4_dot8(w.w, xg + 12);
      acc += part * __half2float(qse[n * {g.groups}LL + gi]);
    }}
    acc = mlcc_warp_sum(acc);
    if (lane == 0) mlcc_put(y, p * {g.n}LL + n, acc);
  }}
  return 0;
}}
"""
    grid = (f"T.int64({-(-g.n // per_block)})", f"T.int64({slots})")
    return CudaKernel(name, body, launcher(name, g.buffers, grid, Q4_WARPS * 32, g.symbols))


def _zero_unused(g: _Grouped, name: str) -> tuple[str, tuple[str, tuple[str, ...], int]]:
    """Device function and launch nest writing 0 to the slots past the last used one."""
    rows, kk = dim_text(g.rows), g.slots_per_row
    source = f"""{signature(f"{name}_zero", g.buffers, ("y",), g.symbols)} {{
  const long long i = (long long)blockIdx.x * {BLOCK} + threadIdx.x;
  if (i < {rows} * {kk}LL * {g.n} && i / {g.n} >= offsets[{g.experts}]) mlcc_put(y, i, 0.f);
  return 0;
}}
"""
    grid = f"({rows} * T.int64({kk * g.n}) + T.int64({BLOCK - 1})) // T.int64({BLOCK})"
    return source, (f"{name}_zero_dev", (grid,), BLOCK)


def _expert_tile(g: _Grouped, tile: int) -> str:
    """C++ finding this block's expert and its slot range [start, end); returns if empty."""
    return f"""const long long tiles = ({dim_text(g.rows)} + {tile - 1}) / {tile};
  const int e = (int)(blockIdx.y / tiles);
  const long long start = offsets[e] + (blockIdx.y % tiles) * {tile}, end = offsets[e + 1];
  if (start >= end) return 0;
  {g.select("e")}"""


def _tile_grid(g: _Grouped, tile: int) -> tuple[str, str]:
    rows = dim_text(g.rows)
    return (f"T.int64({-(-g.n // tile)})",
            f"({rows} + T.int64({tile - 1})) // T.int64({tile}) * T.int64({g.experts})")


def _grouped_gemm(g: _Grouped, name: str) -> CudaKernel:
    """16x16 tiles in float32: any dtype and quantization."""
    body = f"""{signature(name, g.buffers, ("y",), g.symbols)} {{
  __shared__ float As[{TILE}][{TILE + 1}];
  __shared__ float Bs[{TILE}][{TILE + 1}];
  {_expert_tile(g, TILE)}
  const int tx = threadIdx.x & {TILE - 1}, ty = threadIdx.x / {TILE};
  const long long n0 = (long long)blockIdx.x * {TILE};
  const long long p_load = start + ty;
  const long long src = p_load < end ? {g.source_row("p_load")} : 0;
  float acc = 0.f;
  for (int k0 = 0; k0 < {g.k}; k0 += {TILE}) {{
    const int k = k0 + tx;
    const long long nn = n0 + ty;
    As[ty][tx] = (p_load < end && k < {g.k}) ? mlcc_f32(x[src + k]) : 0.f;
    Bs[ty][tx] = (nn < {g.n} && k < {g.k}) ? {g.weight("nn", "k")} : 0.f;
    __syncthreads();
    #pragma unroll
    for (int j = 0; j < {TILE}; ++j) acc += As[ty][j] * Bs[tx][j];
    __syncthreads();
  }}
  const long long n = n0 + tx;
  if (p_load < end && n < {g.n}) mlcc_put(y, p_load * {g.n}LL + n, acc);
  return 0;
}}
"""
    zero, zero_nest = _zero_unused(g, name)
    nests = [zero_nest, (f"{name}_dev", _tile_grid(g, TILE), TILE * TILE)]
    return CudaKernel(name, zero + body, launcher_nests(name, g.buffers, nests, g.symbols))


def _wmma_b_fill(g: _Grouped, bk: int) -> str:
    """Fill Bs (64 features x bk) from the expert's weights, as float16."""
    if g.quant and g.spec.attr("bits") == 4 and g.spec.attr("group_size") == 32 \
            and g.k % 32 == 0 and g.words * 8 == g.k:
        # one packed word = eight consecutive k of one feature -> one 128-bit shared store
        return f"""    for (int v = tid; v < {64 * bk // 8}; v += 128) {{
      const int r = v / {bk // 8}, c = (v % {bk // 8}) * 8;
      const long long n = n0 + r;
      uint4 out = make_uint4(0u, 0u, 0u, 0u);
      if (n < {g.n} && k0 + c < {g.k}) {{
        const unsigned int word = __ldg(qwe + n * {g.words}LL + (k0 + c) / 8);
        const float sc = mlcc_f32(qse[n * {g.groups}LL + (k0 + c) / 32]);
        half* h = reinterpret_cast<half*>(&out);
        #pragma unroll
        for (int j = 0; j < 8; ++j)
          h[j] = __float2half(((float)((word >> (4 * j)) & 15u) - 7.0f) * sc);
      }}
      *reinterpret_cast<uint4*>(&Bs[r][c]) = out;
    }}"""
    return f"""    for (int i = tid; i < {64 * bk}; i += 128) {{
      const int r = i / {bk}, c = i % {bk};
      const long long n = n0 + r;
      const int k = k0 + c;
      Bs[r][c] = __float2half((n < {g.n} && k < {g.k}) ? {g.weight("n", "k")} : 0.f);
    }}"""


def _wmma_applies(g: _Grouped) -> bool:
    return g.xdt == "float16" and g.ydt == "float16" and g.k % 8 == 0


def _grouped_gemm_wmma(g: _Grouped, name: str) -> CudaKernel:
    """float16: 64x64 tiles of slots x features on tensor cores (WMMA, float32 accumulation);
    activation rows gathered with 128-bit loads, weights dequantized into shared memory."""
    bk = 64 if g.k % 64 == 0 else 32
    ld = bk + 8
    body = f"""{signature(name, g.buffers, ("y",), g.symbols)} {{
  using namespace nvcuda;
  __shared__ __align__(32) half As[64][{ld}];
  __shared__ __align__(32) half Bs[64][{ld}];
  __shared__ __align__(32) float Cs[64][68];
  {_expert_tile(g, 64)}
  const int tid = threadIdx.x, warp = tid >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const long long n0 = (long long)blockIdx.x * 64;
{WMMA_ACC_INIT}
  for (int k0 = 0; k0 < {g.k}; k0 += {bk}) {{
    for (int v = tid; v < {64 * bk // 8}; v += 128) {{
      const int r = v / {bk // 8}, c = (v % {bk // 8}) * 8;
      const long long p = start + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (p < end && k0 + c < {g.k})
        val = *reinterpret_cast<const uint4*>(x + {g.source_row("p")} + k0 + c);
      *reinterpret_cast<uint4*>(&As[r][c]) = val;
    }}
{_wmma_b_fill(g, bk)}
{wmma_k_step(bk, ld)}
  for (int i = tid; i < 4096; i += 128) {{
    const int r = i >> 6, c = i & 63;
    const long long p = start + r, n = n0 + c;
    if (p < end && n < {g.n}) mlcc_put(y, p * {g.n}LL + n, Cs[r][c]);
  }}
  return 0;
}}
"""
    zero, zero_nest = _zero_unused(g, name)
    nests = [zero_nest, (f"{name}_dev", _tile_grid(g, 64), 128)]
    return CudaKernel(name, zero + body, launcher_nests(name, g.buffers, nests, g.symbols))


def gen_moe_linear(spec: KernelSpec, name: str) -> CudaKernel:
    g = _Grouped(spec)
    if not isinstance(g.rows, Sym) and g.rows * g.slots_per_row <= GEMV_MAX_SLOTS:
        slots = g.rows * g.slots_per_row
        return _q4_gemv(g, name, slots) if _q4_gemv_applies(g) else _gemv(g, name, slots)
    return _grouped_gemm_wmma(g, name) if _wmma_applies(g) else _grouped_gemm(g, name)


def gen_moe_reduce(spec: KernelSpec, name: str) -> CudaKernel:
    (vshape, vdt), (wshape, wdt), (sshape, _) = spec.inputs
    (yshape, ydt), = spec.outputs
    k, hidden, experts = vshape[1], vshape[2], wshape[1]
    buffers = [("v", vshape, vdt), ("w", wshape, wdt), ("row_slots", sshape, "int32"),
               ("y", yshape, ydt)]
    syms = symbols_of(vshape)
    threads = min(BLOCK, -(-hidden // 32) * 32)
    body = f"""{signature(name, buffers, ("y",), syms)} {{
  const long long i = blockIdx.x;
  for (int h = threadIdx.x; h < {hidden}; h += {threads}) {{
    float acc = 0.f;
    int c = 0;
    for (int e = 0; e < {experts}; ++e) {{
      const float we = w[i * {experts}LL + e];
      if (we != 0.f) {{
        if (c < {k}) {{
          const long long s = row_slots[i * {k}LL + c];
          acc += we * mlcc_f32(v[s * {hidden}LL + h]);
        }}
        ++c;
      }}
    }}
    mlcc_put(y, i * {hidden}LL + h, acc);
  }}
  return 0;
}}
"""
    rows = dim_text(vshape[0]) if isinstance(vshape[0], Sym) else f"T.int64({vshape[0]})"
    return CudaKernel(name, body, launcher(name, buffers, (rows,), threads, syms))


MOE_GENERATORS: dict[str, Callable[[KernelSpec, str], CudaKernel]] = {
    "moe_route": gen_moe_route, "moe_dispatch": gen_moe_dispatch,
    "moe_linear": gen_moe_linear, "q_moe_linear": gen_moe_linear,
    "moe_reduce": gen_moe_reduce,
}
