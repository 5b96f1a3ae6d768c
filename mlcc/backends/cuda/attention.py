"""CUDA kernel of `qkv_attention` over the paged KV cache, with rotary, sliding window and sinks.

One launcher, two kernels in order:
1. append: a block per token (prefill) or per (token, KV head) (decode rows), a thread per
   feature pair (c, c + d/2), one page
   lookup per block: rotate k, write k and v into the token's slot of the page pool (this
   layer's part: [pages, 2, kv_heads, page, d]);
2. attend, one of:
   * prefill chunks in float16 (`use_flash`): `flash_source`, a block per (64-query tile,
     query head), four warps of 16 rows; key and value tiles of 64 positions gathered from the
     pages into shared memory with cp.async; S = Q K^T and O += P V on tensor cores (mma.sync
     m16n8k16, float32 accumulators); online softmax per row in float32; key tiles no query of
     the tile sees are skipped;
   * otherwise (decode rows, batches, float32): a block per (token, query head), sixteen warps.
     The rotated query sits in shared memory; the warps take turns over the visible positions,
     four positions a round each (keys and values of all four loaded before any is used), lanes
     split the head dimension, and each warp keeps an online softmax (running max, sum,
     weighted values). The partial states are merged at the end.

Visibility and slots follow the CPU kernel (mlcc.backends.llvm.attention): causal; with a
window, the last `window` positions plus the first `sinks`; a ring layout maps position p >=
sinks to slot sinks + (p - sinks) mod (capacity - sinks). Both attend kernels use the query
rotated in float32 and rounded to float16 (for float16 activations), as the CPU kernel does.
"""

from __future__ import annotations

import numpy as np

from mlcc.backends.cuda.flash import (  # noqa: F401 - TILE, FLASH_PTX, ... are read from here
    FLASH_PTX,
    FLASH_WARPS,
    PAD,
    TILE,
    flash_nest,
    flash_source,
    order_source,
    visibility_source,
)
from mlcc.backends.cuda.kernels import (
    C_TYPES,
    CudaKernel,
    fp,
    launcher_nests,
    numel_text,
    signature,
    symbols_of,
    tir_numel,
)
from mlcc.backends.llvm.fallback import inv_freq_table
from mlcc.backends.plan import KernelSpec

WARPS = 16
UNROLL = 4
DECODE_ROWS = 4  # at most this many static rows attend on CUDA cores
APPEND_THREADS = 256  # threads of an append block that covers all KV heads of a token
# Key/value fragments through ldmatrix (fewer shared-memory instructions) or plain loads (whose
# layouts need only the MMA's). Both validated on an H200 (benchmarks/cuda/attention_bench.py,
# 2026-11-28): ldmatrix 4-11% faster.
LDMATRIX = True
# Blocks of the tensor-core kernel in the order of `order_source` (one heavy and one light query
# tile per SM when the grid fits in one wave) instead of heaviest first: on the H200 4% faster
# at 512 tokens from position 0, equal on chunks after earlier ones (attention_bench.py).
BALANCE = True


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
{_rope_pair(name, style, rotary, d)}"""


def _rope_pair(name: str, style: str, rotary: int, d: int) -> str:
    """`{name}_rope2(src, q, pos, &lo, &hi)`: features q and q + d/2 (q < d/2) rotated to `pos`.
    With rotate_half over the whole head these are one rotary pair: both share the angle and
    the two loads, so the angle, its cosine and sine are computed once per pair; the formulas
    and rounding are `{name}_rope`'s. Other layouts call `{name}_rope` twice."""
    if style != "rotate_half" or rotary != d:
        return f"""template <typename T>
__device__ __forceinline__ void {name}_rope2(const T* src, int q, long long pos, float* lo,
                                             float* hi) {{
  *lo = {name}_rope(src, q, pos);
  *hi = {name}_rope(src, q + {d // 2}, pos);
}}"""
    return f"""template <typename T>
__device__ __forceinline__ void {name}_rope2(const T* src, int q, long long pos, float* lo,
                                             float* hi) {{
  const float a = mlcc_f32(src[q]), b = mlcc_f32(src[q + {d // 2}]);
  const float angle = (float)pos * {name}_invf[q];
  const float cs = cosf(angle), sn = sinf(angle);
  *lo = mlcc_round(a * cs + (-1.0f) * b * sn, src);
  *hi = mlcc_round(b * cs + (1.0f) * a * sn, src);
}}"""


def page_helpers(name: str, kv: dict) -> str:
    """`{name}_slot(p)`: the cache slot of position p (ring and sinks); `{name}_row(table, p,
    kind, head)`: the offset of that slot's key (kind 0) or value (kind 1) row in the pool."""
    page, hkv, d = kv["page_size"], kv["kv_heads"], kv["head_dim"]
    return f"""__device__ __forceinline__ long long {name}_slot(long long p) {{ {_slot(kv)} }}
__device__ __forceinline__ long long {name}_row(const int* page_table, long long p, int kind,
                                               int head) {{
  const long long s = {name}_slot(p);
  return ((((long long)page_table[s / {page}] * 2 + kind) * {hkv} + head) * {page}
          + s % {page}) * {d}LL;
}}"""


def use_flash(spec: KernelSpec) -> bool:
    """Prefill chunks (symbolic or more than four rows) with float16 activations and cache, and
    a head dimension the tensor-core tiles cover (a multiple of 16, at most 128: the output
    accumulators of 16 rows x d stay in registers)."""
    kv = dict(spec.kv)
    (qkv_shape, dt) = spec.inputs[0]
    rows, d = qkv_shape[0], kv["head_dim"]
    many = not isinstance(rows, int) or rows > DECODE_ROWS
    return (many and not dict(spec.attrs).get("batched") and dt == "float16"
            and kv["dtype"] == "float16" and d % 16 == 0 and d <= 128)


def gen_qkv_attention(spec: KernelSpec, name: str, flash: bool | None = None,
                      ldmatrix: bool = LDMATRIX, balance: bool = BALANCE) -> CudaKernel:
    """Append + attend; prefill chunks attend with the tensor-core kernel (`use_flash`) unless
    `flash` says otherwise (False keeps the CUDA-core kernel, as benchmarks compare both).
    `balance`: the tensor-core kernel's block order of `order_source`. Static decode rows
    without an explicit `flash` take the one-launch kernel of mlcc.backends.cuda.decode_attention;
    an explicit `flash` asks for this two-kernel path."""
    from mlcc.backends.cuda import decode_attention  # it reads this module's rotary helpers

    if flash is None and decode_attention.use_decode(spec):
        return decode_attention.gen_decode_attention(spec, name)
    flash = use_flash(spec) if flash is None else flash
    kv = dict(spec.kv)
    (qkv_shape, dt), (out_shape, _) = spec.inputs[0], spec.outputs[0]
    hq, hkv, d, page = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"], kv["page_size"]
    pool_shape = (kv["pages"], 2, hkv, page, d)
    # A chunk of one sequence starts at seq_info[0]; in a batch, row i is the next token of
    # sequence i, at position seq_info[i], with its own row of the page table.
    batched = bool(dict(spec.attrs).get("batched"))
    rows, per_seq = qkv_shape[0], kv.get("pages_per_seq", kv["pages"])
    buffers = [("qkv", qkv_shape, dt), ("y", out_shape, dt),
               ("seq_info", (rows,) if batched else (2,), "int32"),
               ("page_table", (rows, per_seq) if batched else (per_seq,), "int32"),
               ("pool", pool_shape, kv["dtype"])]
    syms = symbols_of(qkv_shape)
    params = signature(name, buffers, ("y", "pool"), syms).replace(f"int {name}_dev(",
                                                                 f"int {name}_PHASE(")
    position = "seq_info[i]" if batched else "seq_info[0] + i"
    # prefill chunks append a token's KV heads in one block (tens of thousands of tiny blocks
    # would cost more to schedule than to run); decode rows keep a block per (token, head)
    heads = 1 if isinstance(rows, int) and rows <= DECODE_ROWS else hkv
    table = f"page_table + i * {per_seq}LL" if batched else "page_table"
    width = (hq + 2 * hkv) * d
    source = f"""{_rope(name, spec, d)}
{page_helpers(name, kv)}
{params.replace("PHASE", "append")} {{
  const long long i = blockIdx.x / {hkv // heads};
  const int g0 = (int)(blockIdx.x % {hkv // heads}) * {heads};
  const long long pos = {position};
  const int* table = {table};
  // the slot's page is looked up once; head g's key row is {page * d} further per head, and
  // the value row follows the key row by one kind
  const long long row0 = {name}_row(table, pos, 0, 0);
  for (int e = threadIdx.x; e < {heads * (d // 2)}; e += blockDim.x) {{
    const int g = g0 + e / {d // 2}, q = e % {d // 2};
    const long long krow = row0 + (long long)g * {page * d}, vrow = krow + {hkv * page * d}LL;
    const T_QKV* src = qkv + i * {width}LL + {hq * d} + g * {d};
    float k0, k1;
    {name}_rope2(src, q, pos, &k0, &k1);
    const float v0 = mlcc_f32(src[{hkv * d} + q]), v1 = mlcc_f32(src[{hkv * d + d // 2} + q]);
    mlcc_put(pool, krow + q, k0);
    mlcc_put(pool, krow + q + {d // 2}, k1);
    mlcc_put(pool, vrow + q, v0);
    mlcc_put(pool, vrow + q + {d // 2}, v1);
  }}
  return 0;
}}
""".replace("T_QKV", C_TYPES[dt])
    tokens = tir_numel(qkv_shape[:1])
    nests = [(f"{name}_append", (f"{tokens} * T.int64({hkv // heads})",),
              max(32, min(heads * (d // 2), APPEND_THREADS)))]
    if flash:
        source += flash_source(spec, name, params.replace("PHASE", "flash"),
                               numel_text(qkv_shape[:1]), ldmatrix, balance)
        nests.append(flash_nest(name, tokens, hq))  # flash.QUERY_TILE rows per block
    else:
        source += _attend_source(spec, name, params.replace("PHASE", "attend"), position, table)
        nests.append((f"{name}_attend", (f"{tokens} * T.int64({hq})",), WARPS * 32))
    return CudaKernel(name, source, launcher_nests(name, buffers, nests, syms))


def _attend_source(spec: KernelSpec, name: str, head: str, position: str, table: str) -> str:
    """One block per (token, query head) on CUDA cores: decode rows, float32, batches."""
    kv = dict(spec.kv)
    hq, hkv, d = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"]
    scale = spec.attr("scale") if spec.attr("scale") is not None else 1.0 / np.sqrt(d)
    width = (hq + 2 * hkv) * d
    window, sinks = kv["window"], kv["sinks"]
    per_lane = -(-d // 32)
    first_window = (f"(pos - {window - 1} > 0 ? pos - {window - 1} : 0)" if window > 0 else "0")
    return f"""{head} {{
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


# --- prefill on tensor cores --------------------------------------------------------------
