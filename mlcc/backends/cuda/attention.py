"""CUDA kernel of `qkv_attention` over the paged KV cache, with rotary, sliding window and sinks.

One launcher, two kernels in order:
1. append: a block per (token, KV head), a thread per feature: rotate k, write k and v into
   the token's slot of the page pool (this layer's part: [pages, 2, kv_heads, page, d]);
2. attend: a block per (token, query head), sixteen warps. The rotated query sits in shared
   memory; the warps take turns over the visible positions, four positions a round each (keys
   and values of all four loaded before any is used), lanes split the head dimension
   (coalesced key and value rows), and each warp keeps an online softmax (running max, sum,
   weighted values). The partial states are merged at the end.

Visibility and slots follow the CPU kernel (mlcc.backends.llvm.attention): causal; with a
window, the last `window` positions plus the first `sinks`; a ring layout maps position p >=
sinks to slot sinks + (p - sinks) mod (capacity - sinks).
"""

from __future__ import annotations

import numpy as np

from mlcc.backends.cuda.kernels import (
    CudaKernel,
    fp,
    launcher_nests,
    signature,
    symbols_of,
    tir_numel,
)
from mlcc.backends.llvm.fallback import inv_freq_table
from mlcc.backends.plan import KernelSpec

WARPS = 16
UNROLL = 4


def _slot(kv: dict) -> str:
    if not kv["ring"]:
        return "return p;"
    sinks, capacity = kv["sinks"], kv["capacity"]
    return (f"return p < {sinks} ? p : {sinks} + (p - {sinks}) % {capacity - sinks}LL;")


def _rope(name: str, spec: KernelSpec, d: int) -> str:
    """`{name}_rope(src, c, pos, dt_ptr)`: feature c of a head rotated to `pos` (float)."""
    rotary, style = spec.attr("rotary_dim"), spec.attr("rope_style")
    table = inv_freq_table(spec).astype(np.float32) if rotary else np.zeros(1, np.float32)
    values = ", ".join(fp(v) for v in table)
    half = rotary // 2
    if style == "rotate_half":
        freq, partner = f"c % {max(half, 1)}", f"c < {half} ? c + {half} : c - {half}"
        sign = f"c < {half} ? -1.0f : 1.0f"
    else:
        freq, partner, sign = "c / 2", "(c & 1) == 0 ? c + 1 : c - 1", "(c & 1) == 0 ? -1.0f : 1.0f"
    return f"""__device__ const float {name}_invf[{len(table)}] = {{{values}}};
template <typename T>
__device__ __forceinline__ float {name}_rope(const T* src, int c, long long pos) {{
  const float v = mlcc_f32(src[c]);
  if (c >= {rotary}) return v;
  const float angle = (float)pos * {name}_invf[{freq}];
  const int other = {partner};
  return mlcc_round(v * cosf(angle) + ({sign}) * mlcc_f32(src[other]) * sinf(angle), src);
}}
"""


def gen_qkv_attention(spec: KernelSpec, name: str) -> CudaKernel:
    kv = dict(spec.kv)
    (qkv_shape, dt), (out_shape, _) = spec.inputs[0], spec.outputs[0]
    hq, hkv, d, page = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"], kv["page_size"]
    kv_dt = kv["dtype"]
    scale = spec.attr("scale") if spec.attr("scale") is not None else 1.0 / np.sqrt(d)
    pool_shape = (kv["pages"], 2, hkv, page, d)
    # A chunk of one sequence starts at seq_info[0]; in a batch, row i is the next token of
    # sequence i, at position seq_info[i], with its own row of the page table.
    batched = bool(dict(spec.attrs).get("batched"))
    rows, per_seq = qkv_shape[0], kv.get("pages_per_seq", kv["pages"])
    buffers = [("qkv", qkv_shape, dt), ("y", out_shape, dt),
               ("seq_info", (rows,) if batched else (2,), "int32"),
               ("page_table", (rows, per_seq) if batched else (per_seq,), "int32"),
               ("pool", pool_shape, kv_dt)]
    position = "seq_info[i]" if batched else "seq_info[0] + i"
    table = f"page_table + i * {per_seq}LL" if batched else "page_table"
    syms = symbols_of(qkv_shape)
    width = (hq + 2 * hkv) * d
    window, sinks = kv["window"], kv["sinks"]
    per_lane = -(-d // 32)
    first_window = (f"(pos - {window - 1} > 0 ? pos - {window - 1} : 0)" if window > 0 else "0")
    params = signature(name, buffers, ("y", "pool"), syms).replace(f"int {name}_dev(",
                                                                 f"int {name}_PHASE(")
    source = f"""{_rope(name, spec, d)}
__device__ __forceinline__ long long {name}_slot(long long p) {{ {_slot(kv)} }}
__device__ __forceinline__ long long {name}_row(const int* page_table, long long p, int kind,
                                               int head) {{
  const long long s = {name}_slot(p);
  return ((((long long)page_table[s / {page}] * 2 + kind) * {hkv} + head) * {page}
          + s % {page}) * {d}LL;
}}
{params.replace("PHASE", "append")} {{
  const long long i = blockIdx.x / {hkv};
  const int g = blockIdx.x % {hkv};
  const long long pos = {position};
  const int* table = {table};
  for (int c = threadIdx.x; c < {d}; c += blockDim.x) {{
    const float k = {name}_rope(qkv + i * {width}LL + {hq * d} + g * {d}, c, pos);
    const float v = mlcc_f32(qkv[i * {width}LL + {(hq + hkv) * d} + g * {d} + c]);
    mlcc_put(pool, {name}_row(table, pos, 0, g) + c, k);
    mlcc_put(pool, {name}_row(table, pos, 1, g) + c, v);
  }}
  return 0;
}}
{params.replace("PHASE", "attend")} {{
  __shared__ float q[{d}];
  __shared__ float part_m[{WARPS}], part_l[{WARPS}], part_acc[{WARPS}][{d}];
  const long long i = blockIdx.x / {hq};
  const int h = blockIdx.x % {hq}, g = h / {hq // hkv};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long pos = {position};
  const int* table = {table};
  for (int c = threadIdx.x; c < {d}; c += blockDim.x)
    q[c] = {name}_rope(qkv + i * {width}LL + h * {d}, c, pos);
  __syncthreads();
  float m = -1.0e30f, l = 0.f, acc[{per_lane}];
  #pragma unroll
  for (int e = 0; e < {per_lane}; ++e) acc[e] = 0.f;
  const long long lo = {first_window};
  const long long sinks_end = {sinks} < lo ? {sinks} : lo;
  // visible: [0, sinks_end) then [lo, pos], walked as one index range; each warp takes
  // {UNROLL} positions per round so their key and value loads are in flight together
  const long long count = sinks_end + (pos - lo + 1);
  for (long long t0 = warp * {UNROLL}; t0 < count; t0 += {WARPS * UNROLL}) {{
    // keys and values of this round's positions are all loaded before any is used
    float kv_k[{UNROLL}][{per_lane}], kv_v[{UNROLL}][{per_lane}];
    #pragma unroll
    for (int u = 0; u < {UNROLL}; ++u) {{
      const long long t = t0 + u < count ? t0 + u : count - 1;
      const long long j = t < sinks_end ? t : lo + (t - sinks_end);
      const long long krow = {name}_row(table, j, 0, g), vrow = {name}_row(table, j, 1, g);
      #pragma unroll
      for (int e = 0; e < {per_lane}; ++e) {{
        const int c = lane + e * 32;
        kv_k[u][e] = c < {d} ? mlcc_f32(pool[krow + c]) : 0.f;
        kv_v[u][e] = c < {d} ? mlcc_f32(pool[vrow + c]) : 0.f;
      }}
    }}
    float score[{UNROLL}];
    float m_new = m;
    #pragma unroll
    for (int u = 0; u < {UNROLL}; ++u) {{
      float dot = 0.f;
      #pragma unroll
      for (int e = 0; e < {per_lane}; ++e) {{
        const int c = lane + e * 32;
        if (c < {d}) dot += q[c] * kv_k[u][e];
      }}
      score[u] = t0 + u < count ? mlcc_warp_sum(dot) * {fp(scale)} : -1.0e30f;
      m_new = fmaxf(m_new, score[u]);
    }}
    const float keep = expf(m - m_new);
    l *= keep;
    #pragma unroll
    for (int e = 0; e < {per_lane}; ++e) acc[e] *= keep;
    #pragma unroll
    for (int u = 0; u < {UNROLL}; ++u) {{
      const float wgt = t0 + u < count ? expf(score[u] - m_new) : 0.f;
      l += wgt;
      #pragma unroll
      for (int e = 0; e < {per_lane}; ++e) acc[e] += wgt * kv_v[u][e];
    }}
    m = m_new;
  }}
  if (lane == 0) {{ part_m[warp] = m; part_l[warp] = l; }}
  #pragma unroll
  for (int e = 0; e < {per_lane}; ++e) {{
    const int c = lane + e * 32;
    if (c < {d}) part_acc[warp][c] = acc[e];
  }}
  __syncthreads();
  float top = part_m[0];
  #pragma unroll
  for (int w = 1; w < {WARPS}; ++w) top = fmaxf(top, part_m[w]);
  float total = 0.f;
  #pragma unroll
  for (int w = 0; w < {WARPS}; ++w) total += part_l[w] * expf(part_m[w] - top);
  for (int c = threadIdx.x; c < {d}; c += blockDim.x) {{
    float out = 0.f;
    #pragma unroll
    for (int w = 0; w < {WARPS}; ++w) out += part_acc[w][c] * expf(part_m[w] - top);
    mlcc_put(y, i * {hq * d}LL + h * {d} + c, out / total);
  }}
  return 0;
}}
"""
    tokens = tir_numel(qkv_shape[:1])
    launch = launcher_nests(name, buffers, [
        (f"{name}_append", (f"{tokens} * T.int64({hkv})",), max(32, min(d, 128))),
        (f"{name}_attend", (f"{tokens} * T.int64({hq})",), WARPS * 32)], syms)
    return CudaKernel(name, source, launch)
