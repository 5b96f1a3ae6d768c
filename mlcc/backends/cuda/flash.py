"""The tensor-core prefill attention kernel of `qkv_attention` (see mlcc.backends.cuda.attention).

`flash_source` writes `{name}_flash`: a block per (64-query tile, query head), four warps of 16
query rows, key and value tiles of 64 positions gathered from the KV pages with cp.async,
S = Q K^T and O += P V on mma.sync m16n8k16 with float32 accumulators, online softmax per row;
`flash_nest` is its launch. The knobs QUERY_TILE (128 rows on eight warps), PAIRED (those rows
as two 64-row tiles from both ends of the chunk) and EXP2 (base-2 softmax) change the kernel
and its launch; benchmarks/cuda/attention_bench.py times each setting.
`visibility_source` is its tile and visibility logic as plain C++ (also compiled on the host by
the tests), `order_source` the order in which blocks take query tiles.
"""

from __future__ import annotations

import numpy as np

from mlcc.backends.cuda.kernels import fp
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError

TILE = 64  # keys per step of the tensor-core prefill kernel (and queries per block by default)
FLASH_WARPS = 4  # 16 query rows each, with QUERY_TILE = 64
PAD = 8  # float16 padding per shared-memory row of keys and values
# Query rows per block: 64 (four warps) or 128 (eight warps: each key and value tile staged in
# shared memory serves twice the queries, half the cp.async and shared-memory traffic per
# query; a warp skips the key tiles none of its 16 rows sees). The knobs are read by
# `flash_source` and `flash_nest` at generation time, so a script may set them before a build.
QUERY_TILE = 64
# With QUERY_TILE = 128 and no sliding window: a block takes two 64-row query tiles a and
# T - 1 - a of the chunk's T (warps 0-3 and 4-7) instead of 128 consecutive rows. Causally, the
# key tiles of a are a prefix of those of T - 1 - a, so the loads are shared all the same, and
# every block does about the same work (128 consecutive rows leave the last block of a 512-token
# prefill twice the key tiles of an average one, in a grid of one block per SM).
PAIRED = False
# Softmax in base 2 with scale * log2(e) folded into one FMA per score (exp2f instead of expf
# of a scaled, max-shifted score; the running max kept in base-2 units) instead of base e.
EXP2 = False
LOG2E = 1.4426950408889634
# Double-buffered key and value tiles do not fit: four tiles of 64 x (128 + PAD) float16 take
# 68 KB, past the 48 KB of static shared memory a TVM-launched device function may use. The
# single buffers already overlap: values load while S = Q K^T runs, the next keys while O += P V
# runs, and P stays in registers as the A operand of P V.


def visibility_source(name: str, window: int, sinks: int) -> str:
    """Plain C++ (host and device) deciding which key tiles a query tile visits, which key rows
    are loaded and which (query, key) pairs are visible. Query tiles cover positions [p0, p1].

    `{name}_tiles(p0, p1, &sink_tiles, &first)` returns the tile count: the sink tiles [0,
    sink_tiles) then [first, first + count - sink_tiles). A key row is loaded when some query of
    the tile sees it (others are zero-filled: their slots may be unwritten pages or, in a ring,
    newer positions); `{name}_visible` is today's rule: causal, and with a window the last
    `window` positions plus the first `sinks`; `{name}_full(p0, p1, j0)`: every query in [p0,
    p1] sees every key of the tile at j0, so the mask can be skipped; `{name}_touch(p0, p1,
    j0)` is false only when no query in [p0, p1] sees any key of that tile (a warp skips it).
    """
    tile = TILE
    if window > 0:
        lo = f"(p0 - {window - 1} > 0 ? p0 - {window - 1} : 0LL)"
        sink_tiles = f"(({sinks}LL < lo ? {sinks}LL : lo) + {tile - 1}) / {tile}"
        visible = f"j <= p && (j >= p - {window - 1} || j < {sinks}LL)"
        loaded = f"j >= 0 && j <= p1 && (j >= p0 - {window - 1} || j < {sinks}LL)"
        full = f"j0 + {tile - 1} <= p0 && j0 >= p1 - {window - 1}"
        touch = f"j0 <= p1 && (j0 + {tile - 1} >= p0 - {window - 1} || j0 < {sinks}LL)"
    else:
        lo, sink_tiles, visible, loaded = "0LL", "0LL", "j <= p", "j >= 0 && j <= p1"
        full, touch = f"j0 + {tile - 1} <= p0", "j0 <= p1"
    return f"""MLCC_ATTN_HD long long {name}_tiles(long long p0, long long p1,
                                     long long* sink_tiles, long long* first) {{
  const long long lo = {lo};
  *sink_tiles = {sink_tiles};
  const long long from = lo / {tile};
  *first = from > *sink_tiles ? from : *sink_tiles;
  return *sink_tiles + p1 / {tile} + 1 - *first;
}}
MLCC_ATTN_HD long long {name}_tile_at(long long t, long long sink_tiles, long long first) {{
  return t < sink_tiles ? t : first + (t - sink_tiles);
}}
MLCC_ATTN_HD bool {name}_visible(long long p, long long j) {{ return {visible}; }}
MLCC_ATTN_HD bool {name}_loaded(long long p0, long long p1, long long j) {{ return {loaded}; }}
MLCC_ATTN_HD bool {name}_full(long long p0, long long p1, long long j0) {{ return {full}; }}
MLCC_ATTN_HD bool {name}_touch(long long p0, long long p1, long long j0) {{ return {touch}; }}
"""


def order_source(name: str) -> str:
    """`{name}_rank(k, blocks, sms)`: the work rank (0 = most key tiles) of block k, a
    permutation of [0, blocks). Ranks are heaviest first, so a grid larger than the GPU holds at
    once starts its longest blocks first. A grid of at most two blocks per SM runs in one wave,
    where the block scheduler hands out blocks k and k + sms to the same SM one round after the
    other: blocks [0, sms) take the heaviest ranks in order and the rest the lightest in
    reverse, so each SM pairs a heavy query tile with a light one (a 512-token causal prefill
    of 32 heads: at most 9 key tiles of work per SM instead of 12)."""
    return f"""MLCC_ATTN_HD long long {name}_rank(long long k, long long blocks, long long sms) {{
  if (blocks > 2 * sms || k < sms) return k;
  return sms + (blocks - 1 - k);
}}
#ifdef __CUDA_ARCH__
__device__ __forceinline__ long long {name}_sms() {{
  unsigned v;
  asm("mov.u32 %0, %%nsmid;" : "=r"(v));
  return v;
}}
#endif
"""


# PTX helpers: 16-byte asynchronous copies into shared memory and the m16n8k16 float16 MMA
# with float32 accumulators. Fragment layouts (PTX ISA, "mma.m16n8k16"): with g = lane / 4 and
# t = lane % 4, A registers hold rows (g, g+8, g, g+8) x columns (2t, 2t, 2t+8, 2t+8) (+0, +1);
# B registers hold rows (2t, 2t+8) (+0, +1) of column g; C holds rows (g, g, g+8, g+8) x
# columns (2t, 2t+1, 2t, 2t+1). C of S = Q K^T is thereby A of O += P V without shuffles.
FLASH_PTX = r"""
#ifndef MLCC_ATTN_FLASH_PTX
#define MLCC_ATTN_FLASH_PTX
#define MLCC_ATTN_HD __host__ __device__ __forceinline__
__device__ __forceinline__ void mlcc_attn_cp_async16(void* dst, const void* src) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(s), "l"(src));
}
__device__ __forceinline__ void mlcc_attn_cp_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
__device__ __forceinline__ void mlcc_attn_cp_wait1() {
  asm volatile("cp.async.wait_group 1;\n" ::);
}
__device__ __forceinline__ void mlcc_attn_mma16816(float* c, const unsigned* a, unsigned b0,
                                              unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// ldmatrix: lane l gives the address of row l % 8 of 8x8 matrix l / 8; register i receives
// (row g, columns 2t, 2t+1) of matrix i, or with .trans (rows 2t, 2t+1, column g).
__device__ __forceinline__ void mlcc_attn_ldmatrix_x4(unsigned* r, const half* row) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void mlcc_attn_ldmatrix_x4_trans(unsigned* r, const half* row) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ unsigned mlcc_attn_pack_halves(half lo, half hi) {
  const half2 v = __halves2half2(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}
#endif
"""


def flash_nest(name: str, tokens: str, hq: int) -> tuple[str, tuple[str], int]:
    """The launch of `{name}_flash` for `launcher_nests`: a block per (QUERY_TILE rows, query
    head) of `tokens` (a TIR expression) and 16 rows per warp."""
    tiles = f"({tokens} + T.int64({QUERY_TILE - 1})) // T.int64({QUERY_TILE})"
    return (f"{name}_flash", (f"{tiles} * T.int64({hq})",), QUERY_TILE // 16 * 32)


def _copies(rows: int, d: int, threads: int) -> tuple[int, str]:
    """Rounds of a loop that spreads `rows` x d/8 16-byte copies over the block's threads, and
    the guard of its last round when they do not divide evenly."""
    words = rows * d // 8
    return -(-words // threads), "" if words % threads == 0 else f"if (e >= {words}) break;"


def flash_source(spec: KernelSpec, name: str, head: str, rows: str,
                 ldmatrix: bool = False, balance: bool = False) -> str:
    """`{name}_flash`: a block per (QUERY_TILE-query tile, query head), a warp per 16 rows.

    The rotated queries (float16, as the CUDA-core kernel rounds them) go through shared memory
    into MMA fragments held in registers. Key tiles of 64 positions are gathered row by row from
    the pages with cp.async (each row's page looked up once per tile, for keys and values),
    keys then values, so values load while scores are computed and the next keys load while
    values are summed. Scores S = Q K^T and O += P V run on tensor cores
    (float32 accumulators); each row keeps its online softmax (running max and sum) in float32;
    P is rounded to float16 for the MMA. Query tiles are ordered by `order_source` (`balance`)
    or last-first (they visit the most key tiles). `ldmatrix` loads the key and value
    fragments with ldmatrix (four 8x8 matrices per instruction, values transposed on the way)
    instead of 32- and 16-bit loads. QUERY_TILE, PAIRED and EXP2 are read when the source is
    written.
    """
    kv = dict(spec.kv)
    hq, hkv, d, page = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"], kv["page_size"]
    scale = spec.attr("scale") if spec.attr("scale") is not None else 1.0 / np.sqrt(d)
    qt, ld = QUERY_TILE, d + PAD
    if qt not in (TILE, 2 * TILE):
        raise MlccError("compile", f"flash.QUERY_TILE: must be {TILE} or {2 * TILE}, got {qt}; "
                        "set it to one of them")
    threads = qt // 16 * 32
    rounds, guard = _copies(TILE, d, threads)
    rank = (f"{name}_rank(blockIdx.x, gridDim.x, {name}_sms())" if balance
            else "(long long)blockIdx.x")
    # with 128 rows, a warp whose rows see no key of the tile (the diagonal's last key tile for
    # the first four warps) skips its MMAs and softmax; the block still loads the tile
    mine = f"if ({name}_touch(pa - gid, pa - gid + 15, j0))" if qt > TILE else ""
    paired = PAIRED and qt > TILE and kv["window"] <= 0
    return (FLASH_PTX + visibility_source(name, kv["window"], kv["sinks"])
            + order_source(name)) + f"""
// One page lookup per key row of a tile (thread r < {TILE} looks up row r): the row's key
// offset in 16-byte words, -1 when not loaded. Kept in `tab`, read by both stages of the tile,
// so no copy waits on a page-table load.
__device__ __forceinline__ int {name}_row_word(const int* __restrict__ table, long long j0, int g,
                                               long long p0, long long p1) {{
  const long long j = j0 + threadIdx.x;
  return threadIdx.x < {TILE} && {name}_loaded(p0, p1, j)
      ? (int)({name}_row(table, j, 0, g) / 8) : -1;
}}
__device__ __forceinline__ void {name}_stage(half* dst, const half* __restrict__ pool,
                                             const int* tab, int kind) {{
  #pragma unroll
  for (int u = 0; u < {rounds}; ++u) {{
    const int e = threadIdx.x + u * {threads}, r = e / {d // 8}, c = e % {d // 8} * 8;
    {guard}
    const int w = tab[r];
    half* s = dst + r * {ld} + c;
    const long long word = (long long)w + kind * {hkv * page * d // 8};
    if (w >= 0) mlcc_attn_cp_async16(s, pool + word * 8 + c);
    else *reinterpret_cast<uint4*>(s) = make_uint4(0u, 0u, 0u, 0u);
  }}
}}
{head} {{
  // (64 keys, d + {PAD}) float16 each; the padding spreads fragment loads over all banks
  __shared__ __align__(16) half ks[{TILE * ld}];
  __shared__ __align__(16) half vs[{TILE * ld}];
  __shared__ int tab[2][{TILE}];  // key row offsets of this tile and the next
  const long long n = {rows};
  const long long rank = {rank};  // 0: the first of the query tiles that visit the most keys
  const int h = rank % {hq}, g = h / {hq // hkv};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const long long start = seq_info[0];
{_query_rows(hq, qt, paired)}
  unsigned qf[{d // 16}][4];
{_query_fragments(name, d, ld, (hq + 2 * hkv) * d, qt, threads, rounds, guard, paired)}
  long long sink_tiles, first;
  const long long count = {name}_tiles(p0, p1, &sink_tiles, &first);
  const long long pa = {"start + qw" if paired else "p0 + warp * 16"} + gid;  // rows pa, pa + 8
  float o[{d // 8}][4], m[2] = {{-1.0e30f, -1.0e30f}}, l[2] = {{0.f, 0.f}};
  #pragma unroll
  for (int nt = 0; nt < {d // 8}; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  const long long j00 = {name}_tile_at(0, sink_tiles, first) * {TILE};
  if (threadIdx.x < {TILE}) tab[0][threadIdx.x] = {name}_row_word(page_table, j00, g, p0, p1);
  __syncthreads();
  {name}_stage(ks, pool, tab[0], 0);
  mlcc_attn_cp_commit();
  {name}_stage(vs, pool, tab[0], 1);
  mlcc_attn_cp_commit();
  for (long long t = 0; t < count; ++t) {{
    const long long j0 = {name}_tile_at(t, sink_tiles, first) * {TILE};
    const long long jn = {name}_tile_at(t + 1, sink_tiles, first) * {TILE};
    // the next tile's page lookups are issued now and land while the scores are computed
    const int next = t + 1 < count ? {name}_row_word(page_table, jn, g, p0, p1) : -1;
    mlcc_attn_cp_wait1();  // this tile's keys; its values may still be in flight
    __syncthreads();
    float s[{TILE // 8}][4];
    {mine} {{
{_scores(d, ld, ldmatrix)}
    }}
    // the next tile's rows: its other buffer was last read by the values of tile t - 1
    if (threadIdx.x < {TILE}) tab[(t + 1) & 1][threadIdx.x] = next;
    __syncthreads();  // every warp is done with ks; the next rows are visible
    if (t + 1 < count) {name}_stage(ks, pool, tab[(t + 1) & 1], 0);
    mlcc_attn_cp_commit();
    unsigned pf[{TILE // 16}][4];
    {mine} {{
{_softmax(name, scale, d)}
    }}
    mlcc_attn_cp_wait1();  // this tile's values; the next keys may still be in flight
    __syncthreads();
    {mine} {{
{_weighted_values(d, ld, ldmatrix)}
    }}
    __syncthreads();  // every warp is done with vs
    if (t + 1 < count) {name}_stage(vs, pool, tab[(t + 1) & 1], 1);
    mlcc_attn_cp_commit();
  }}
{_flash_store(hq, d, paired)}
  return 0;
}}
"""


def _query_rows(hq: int, qt: int, paired: bool) -> str:
    """The block's query rows: positions [p0, p1] cover them (the key tiles and rows loaded
    follow from those); paired, qw is the first chunk row of this warp's 16."""
    if not paired:
        return f"""  const long long q0 = ((n + {qt - 1}) / {qt} - 1 - rank / {hq}) * {qt};
  const long long p0 = start + q0, p1 = start + (q0 + {qt - 1} < n ? q0 + {qt - 1} : n - 1);"""
    return f"""  // 64-row query tiles qa <= qb, equal in the middle of an odd count (warps 4-7 then
  // compute qa's rows again and store nothing)
  const long long qa = rank / {hq} * {TILE};
  const long long qb = ((n + {TILE - 1}) / {TILE} - 1 - rank / {hq}) * {TILE};
  const long long p0 = start + qa, p1 = start + (qb + {TILE - 1} < n ? qb + {TILE - 1} : n - 1);
  const long long qw = (warp < 4 ? qa : qb) + (warp & 3) * 16;"""


def _query_fragments(name: str, d: int, ld: int, width: int, qt: int, threads: int,
                     rounds: int, guard: str, paired: bool) -> str:
    """The query tile into `qf`, 64 rows at a time through the key and value buffers: the raw
    rows land in vs with every 16-byte copy in flight at once (rows past the chunk are zeros),
    a thread per rotary pair rotates them into ks, and the warps of those rows take their A
    fragments."""
    return f"""  #pragma unroll 1
  for (int part = 0; part < {qt // TILE}; ++part) {{
    const long long r0 = {"part == 0 ? qa : qb" if paired else f"q0 + part * {TILE}"};
    #pragma unroll
    for (int u = 0; u < {rounds}; ++u) {{
      const int e = threadIdx.x + u * {threads}, r = e / {d // 8}, c = e % {d // 8} * 8;
      {guard}
      half* s = vs + r * {ld} + c;
      if (r0 + r < n) mlcc_attn_cp_async16(s, qkv + (r0 + r) * {width}LL + h * {d} + c);
      else *reinterpret_cast<uint4*>(s) = make_uint4(0u, 0u, 0u, 0u);
    }}
    asm volatile("cp.async.wait_all;\\n" ::);
    __syncthreads();
    #pragma unroll 4
    for (int e = threadIdx.x; e < {TILE * d // 2}; e += {threads}) {{
      const int r = e / {d // 2}, c = e % {d // 2};
      float lo = 0.f, hi = 0.f;
      if (r0 + r < n) {name}_rope2(vs + r * {ld}, c, start + r0 + r, &lo, &hi);
      ks[r * {ld} + c] = __float2half(lo);
      ks[r * {ld} + c + {d // 2}] = __float2half(hi);
    }}
    __syncthreads();
    if (warp / 4 == part) {{
      #pragma unroll
      for (int kc = 0; kc < {d // 16}; ++kc) {{
        const half* a = ks + (warp % 4 * 16 + gid) * {ld} + kc * 16 + tig * 2;
        qf[kc][0] = *reinterpret_cast<const unsigned*>(a);
        qf[kc][1] = *reinterpret_cast<const unsigned*>(a + {8 * ld});
        qf[kc][2] = *reinterpret_cast<const unsigned*>(a + 8);
        qf[kc][3] = *reinterpret_cast<const unsigned*>(a + {8 * ld + 8});
      }}
    }}
    __syncthreads();
  }}"""


def _scores(d: int, ld: int, ldmatrix: bool) -> str:
    if ldmatrix and d % 32 == 0:  # matrices: keys x features (kc, kc + 8, kc + 16, kc + 24)
        return f"""    #pragma unroll
    for (int nt = 0; nt < {TILE // 8}; ++nt) {{
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      #pragma unroll
      for (int kc = 0; kc < {d // 32}; ++kc) {{
        unsigned b[4];
        mlcc_attn_ldmatrix_x4(b, ks + (nt * 8 + (lane & 7)) * {ld} + kc * 32 + (lane >> 3) * 8);
        mlcc_attn_mma16816(s[nt], qf[2 * kc], b[0], b[1]);
        mlcc_attn_mma16816(s[nt], qf[2 * kc + 1], b[2], b[3]);
      }}
    }}"""
    return f"""    #pragma unroll
    for (int nt = 0; nt < {TILE // 8}; ++nt) {{
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      #pragma unroll
      for (int kc = 0; kc < {d // 16}; ++kc) {{
        const half* b = ks + (nt * 8 + gid) * {ld} + kc * 16 + tig * 2;
        mlcc_attn_mma16816(s[nt], qf[kc], *reinterpret_cast<const unsigned*>(b),
                      *reinterpret_cast<const unsigned*>(b + 8));
      }}
    }}"""


def _softmax(name: str, scale: float, d: int) -> str:
    """Mask and scale the scores, update each row's running max and sum (the four lanes of a
    row group hold its 64 columns), rescale the output rows, and pack P as A fragments."""
    if EXP2:
        return _softmax_exp2(name, scale, d)
    return f"""    // tiles inside every row's range (most of a long prefill) skip the mask
    const bool full = {name}_full(pa - gid, pa - gid + 15, j0);
    #pragma unroll
    for (int r = 0; r < 2; ++r) {{
      float top = m[r];
      #pragma unroll
      for (int nt = 0; nt < {TILE // 8}; ++nt) {{
        #pragma unroll
        for (int e = 0; e < 2; ++e) {{
          const long long j = j0 + nt * 8 + tig * 2 + e;
          const float v = s[nt][2 * r + e] * {fp(scale)};
          s[nt][2 * r + e] = full || {name}_visible(pa + 8 * r, j) ? v : -INFINITY;
          top = fmaxf(top, s[nt][2 * r + e]);
        }}
      }}
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2));
      const float keep = expf(m[r] - top);
      m[r] = top;
      l[r] *= keep;
      #pragma unroll
      for (int nt = 0; nt < {d // 8}; ++nt) {{ o[nt][2 * r] *= keep; o[nt][2 * r + 1] *= keep; }}
    }}
    #pragma unroll
    for (int nt = 0; nt < {TILE // 8}; ++nt) {{
      #pragma unroll
      for (int r = 0; r < 2; ++r) {{
        // rounded to float16 before summing, so the weights sum to what is multiplied
        const half2 p = __floats2half2_rn(expf(s[nt][2 * r] - m[r]),
                                          expf(s[nt][2 * r + 1] - m[r]));
        l[r] += __low2float(p) + __high2float(p);
        pf[nt / 2][(nt & 1) * 2 + r] = *reinterpret_cast<const unsigned*>(&p);
      }}
    }}"""


def _softmax_exp2(name: str, scale: float, d: int) -> str:
    """`_softmax` in base 2: the mask and the max act on the raw scores (scale > 0 keeps their
    order), the running max m is kept times scale * log2(e), and each weight is one FMA and one
    exp2f: exp(scale * s - M) = 2^(s * scale * log2(e) - m)."""
    c = fp(scale * LOG2E)
    return f"""    // tiles inside every row's range (most of a long prefill) skip the mask
    const bool full = {name}_full(pa - gid, pa - gid + 15, j0);
    #pragma unroll
    for (int r = 0; r < 2; ++r) {{
      float top = -INFINITY;
      #pragma unroll
      for (int nt = 0; nt < {TILE // 8}; ++nt) {{
        #pragma unroll
        for (int e = 0; e < 2; ++e) {{
          if (!full && !{name}_visible(pa + 8 * r, j0 + nt * 8 + tig * 2 + e))
            s[nt][2 * r + e] = -INFINITY;
          top = fmaxf(top, s[nt][2 * r + e]);
        }}
      }}
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2));
      const float next = fmaxf(m[r], top * {c});
      const float keep = exp2f(m[r] - next);
      m[r] = next;
      l[r] *= keep;
      #pragma unroll
      for (int nt = 0; nt < {d // 8}; ++nt) {{ o[nt][2 * r] *= keep; o[nt][2 * r + 1] *= keep; }}
    }}
    #pragma unroll
    for (int nt = 0; nt < {TILE // 8}; ++nt) {{
      #pragma unroll
      for (int r = 0; r < 2; ++r) {{
        // rounded to float16 before summing, so the weights sum to what is multiplied
        const half2 p = __floats2half2_rn(exp2f(fmaf(s[nt][2 * r], {c}, -m[r])),
                                          exp2f(fmaf(s[nt][2 * r + 1], {c}, -m[r])));
        l[r] += __low2float(p) + __high2float(p);
        pf[nt / 2][(nt & 1) * 2 + r] = *reinterpret_cast<const unsigned*>(&p);
      }}
    }}"""


def _weighted_values(d: int, ld: int, ldmatrix: bool) -> str:
    if ldmatrix:  # matrices: (keys 0-7, 8-15) x (features nt, nt + 8), transposed
        return f"""    #pragma unroll
    for (int kc = 0; kc < {TILE // 16}; ++kc) {{
      #pragma unroll
      for (int nt = 0; nt < {d // 16}; ++nt) {{
        unsigned b[4];
        mlcc_attn_ldmatrix_x4_trans(b, vs + (kc * 16 + (lane & 15)) * {ld} + nt * 16
                                      + (lane >> 4) * 8);
        mlcc_attn_mma16816(o[2 * nt], pf[kc], b[0], b[1]);
        mlcc_attn_mma16816(o[2 * nt + 1], pf[kc], b[2], b[3]);
      }}
    }}"""
    return f"""    #pragma unroll
    for (int kc = 0; kc < {TILE // 16}; ++kc) {{
      #pragma unroll
      for (int nt = 0; nt < {d // 8}; ++nt) {{
        const half* b = vs + (kc * 16 + tig * 2) * {ld} + nt * 8 + gid;
        mlcc_attn_mma16816(o[nt], pf[kc], mlcc_attn_pack_halves(b[0], b[{ld}]),
                      mlcc_attn_pack_halves(b[{8 * ld}], b[{9 * ld}]));
      }}
    }}"""


def _flash_store(hq: int, d: int, paired: bool) -> str:
    stored = "i < n && (warp < 4 || qb != qa)" if paired else "i < n"
    row = "qw" if paired else "q0 + warp * 16"
    return f"""  #pragma unroll
  for (int r = 0; r < 2; ++r) {{
    float total = l[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const long long i = {row} + gid + 8 * r;
    if ({stored}) {{
      const float inv = 1.0f / total;
      #pragma unroll
      for (int nt = 0; nt < {d // 8}; ++nt)
        *reinterpret_cast<half2*>(y + i * {hq * d}LL + h * {d} + nt * 8 + tig * 2) =
            __floats2half2_rn(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    }}
  }}"""
