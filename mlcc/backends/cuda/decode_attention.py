"""One-launch decode attention of `qkv_attention` on CUDA (flash-decoding over the paged cache).

For a chunk of 1..DECODE_ROWS tokens of one sequence, `gen_decode_attention` replaces the
append + attend pair of mlcc.backends.cuda.attention by one kernel, `{name}_decode`, with a
block per (row, query head, split):

1. Blocks are numbered split-major (all (row, head) pairs of split 0 first), so the blocks of
   short contexts, which use the first splits only, spread over the SMs. The block rotates
   its query and the keys of its KV head for every chunk row up to its own,
   and keeps those keys and values (in the cache dtype) in shared memory: the chunk's
   positions are read from there, never from the pool, so no block waits on another's write.
   Exactly one block per (row, KV head) (split 0, the first query head of the group) also
   writes its row's key and value into the pool slot the append kernel writes (ring and sink
   slots included), with the append kernel's formulas: the pool ends bit for bit the same.
2. The visible positions (causal; with a window the last `window` plus the first `sinks`) are
   one index range split over `active` blocks, `active` = min(splits, ceil(count / chunk)),
   with twice the chunk from `wide` visible positions on, or one block while count <= `solo`
   (a merge costs more than it saves on short contexts),
   computed on the GPU from seq_info, so the step replays from a CUDA graph unchanged.
   Blocks past `active` return at once. A block has `warps` warps (WARPS), each taking
   `unroll` (UNROLL) x (32 / lanes) positions a round: a group of `lanes` lanes per position,
   each lane loading 16-byte words of the key and value, every load of the round issued
   before any is used. Each lane group keeps an online softmax (running max, sum, weighted
   values in float32); the groups merge in shared memory.
3. With pdl (mlcc.backends.cuda.toolchain) the block issues its first round's loads of cached
   positions (the pool rows before the chunk, written by earlier launches) before it waits for
   the kernel ahead, the qkv GEMV, whose output only the rotation and the chunk's rows need,
   so those loads overlap the wait for its completion and the rotation (decode 1.02x
   interleaved on the H200 in one call, 1.01x with the norms' later release in two more,
   under the launch bound below at every context from 16 to 3,968 positions;
   benchmarks/results/2026-11-29-h200-i). It also brings the cached positions of its next
   PREFETCH_ROUNDS rounds into L2 then (prefetches, no registers held). After the wait its
   threads load the query and the chunk rows' keys and values in one loop, all at once. The
   pool rows of the chunk are written after the wait, and no cached position the block reads
   shares a slot with them (a ring holds the window, the sinks and a chunk).
4. With more than one active split, each block writes (max, sum, weighted values) to a
   `__device__` scratch array, fences, and counts itself in on a per-(row, head) counter; the
   block that arrives last merges the partial states, writes the output and sets the counter
   back to 0, so the next layer, step or graph replay starts clean.

Scratch: the memory planner gives workspace only to IR intermediates (KernelSpec carries no
scratch request), so the partial states live in `{name}_ws`, sized for the static maximum
(rows x heads x splits x (head_dim + 2) floats), and the counters in `{name}_cnt`, a global
array the loader zero-fills. Launches of one library run one after another on one stream
(layers, steps, sequences), so one array serves them all; it is not safe for two streams
running the same library at once.

Results match the two-kernel path except in the last bits: scores are summed over 16-byte
words and then across lanes, and splits and lane groups are merged in a different order.
The query is rotated in float32 and rounded to the activation dtype, as elsewhere.

Lean (`mark_lean`, the knob `lean_attention`, on at O2): two changes that shrink the block and
move work ahead of the wait.
- Where rotate_half covers the whole head, each thread reads its first pair's frequency
  first in the kernel and computes that pair's cosine and sine before the wait.
- The lane groups of a warp merge their states through shuffles before the block's merge,
  so there is one partial state a warp in shared memory: 5,188 bytes a block for the 7B
  head, against 9,348.
The block then fits on an SM beside a block of the 7B qkv TMA GEMV, and that GEMV releases it
at its start (codegen.releases_attention), so its blocks are placed and load their first
cached positions while the GEMV streams.
- On the host (tests/compile) the pool gets the append kernel's bytes with the same formulas.
  nvcc may contract the rotation's products differently once the angle is an argument, so on
  the GPU a rotated key can differ from the default kernel's in its last bit.
- Measured on an H200 (benchmarks/results/2026-11-30-h200-h, run_h200.py's decode loop in
  turns): 703.7 and 702.4 tok/s against 690.8 and 692.0 for the default (1.019x, 1.015x).
  The 7B logits were within 5.42e-3 of the default's scale, with 16/16 greedy tokens
  (2026-11-30-h200-g).
- Without the release (the lean block alone), 0.991x.
- tests/gpu (test_lean_attention_equals_the_plain_attention) passed on an H200, and the
  pipelined A/B there read 711.8 against 698.6 tok/s (1.019x, 2026-11-30-h200-i), so O2
  turns it on.
"""

from __future__ import annotations

import numpy as np

from mlcc.backends.cuda.attention import DECODE_ROWS, _rope, page_helpers
from mlcc.backends.cuda.kernels import (
    C_TYPES,
    GRID_WAIT,
    CudaKernel,
    fp,
    launcher_nests,
    signature,
)
from mlcc.backends.plan import KernelSpec

# Larger blocks walk more positions a round but fill the grid's blocks per head (MAX_SPLITS,
# most of which return at once on short contexts) more slowly: on an H200
# (benchmarks/results/2026-11-29-h200-i, attention_bench.json) 16 warps with eight positions a
# lane group took 6.8 us a layer at 160 positions against 8.4, but 6.1 against 4.5 at 32 and
# twice the time from 700 on. With the grid cut to 16 blocks a head (MAX_SPLITS) and one block
# a head up to 160 positions (SOLO), 8 warps decode the 7B 1.03-1.04x faster than 4 warps with
# 32 blocks a head and one up to 64, and 1.05x after 3,968 positions (interleaved A/Bs;
# benchmarks/results/2026-11-30-h200-f). 4 splits were 1.00x there, 16 warps 0.97x after 960.
WARPS = 8
UNROLL = 4  # positions per lane group whose loads are in flight together
RESIDENT_THREADS = 1024  # an SM's threads of this kernel the launch bound asks room for
CHUNK = 32  # fewest visible positions per split (a round of 8 warps at d = 128 is 64)
MAX_SPLITS = 16  # at most this many blocks per (row, query head)
# Up to this many visible positions one block per (row, head) walks them all (at most three
# rounds of 8 warps): on an H200 (benchmarks/results/2026-11-29-h200-b, attention_bench.json,
# 4 warps) 33 positions took 6.3 us per layer in two splits and 4.2 us in one; 160 with 8
# warps is measured with WARPS.
SOLO = 160
# From this many visible positions on a split takes at least 2 * CHUNK of them (two rounds):
# on an H200 (benchmarks/results/2026-11-29-h200-d, attention_bench_call5.json) splits of 64
# took 9-15% less time a layer than splits of 32 from 300 to 1,500 positions and 6-17% more at
# 100 and 160 (fewer, longer blocks: less prologue and merge per position, less parallelism).
WIDE = 256
# Rounds after the first whose cached positions a block brings into L2 before its wait (0:
# none): the 7B decode 1.02x in the range, 1.00x after 960 positions, the same logits
# bit for bit (benchmarks/results/2026-11-30-h200-f, call 7)
PREFETCH_ROUNDS = 2
# The spec attribute of a lean decode attention (`mark_lean`, the `lean_attention` knob)
LEAN_ATTR = "lean"


def _geometry(spec: KernelSpec) -> tuple[int, int, int]:
    """(values per 16-byte word, lanes per position, words per lane) of the cache dtype."""
    kv = dict(spec.kv)
    vec = 16 // np.dtype(kv["dtype"]).itemsize
    words = kv["head_dim"] // vec
    lanes = min(32, words)
    return vec, lanes, words // lanes


def lean(spec: KernelSpec) -> bool:
    """Whether `mark_lean` marked this decode attention."""
    return bool(dict(spec.attrs).get(LEAN_ATTR))


def mark_lean(spec: KernelSpec) -> KernelSpec:
    """The spec of a one-launch decode attention marked lean (others unchanged)."""
    if spec.op != "qkv_attention" or not use_decode(spec) or lean(spec):
        return spec
    return KernelSpec(spec.op, spec.inputs, spec.outputs, spec.attrs + ((LEAN_ATTR, 1),),
                      spec.kv)


def _warp_merge(spec: KernelSpec) -> bool:
    """Whether the lane groups of a warp merge through shuffles (lean, several groups a warp)."""
    return lean(spec) and _geometry(spec)[1] < 32


def smem_bytes(spec: KernelSpec) -> int:
    """Static shared memory of a block of the library's kernel (WARPS warps): the rotated
    query, the chunk's keys and values, the partial states of the block's merge (one a lane
    group, or a warp when lean) and its flag, rounded up to 16 bytes (ptxas's figure, checked
    in tests/compile)."""
    kv = dict(spec.kv)
    d, item = kv["head_dim"], np.dtype(kv["dtype"]).itemsize
    rows = spec.inputs[0][0][0]
    groups = WARPS if _warp_merge(spec) else WARPS * (32 // _geometry(spec)[1])
    return -(-(d * 4 + 2 * rows * d * item + groups * (d + 2) * 4 + 4) // 16) * 16


def early_angles(spec: KernelSpec) -> bool:
    """Whether the thread's first rotary angle is computed before the wait: lean, with the
    head rotated as one rotate_half pair over all of it."""
    d = dict(spec.kv)["head_dim"]
    return (lean(spec) and spec.attr("rope_style") == "rotate_half"
            and spec.attr("rotary_dim") == d)


def use_decode(spec: KernelSpec) -> bool:
    """Static chunks of at most DECODE_ROWS rows of one sequence whose head splits into a
    power-of-two count of 16-byte words (float16 d = 8, 16, ..., 256, ...)."""
    kv = dict(spec.kv)
    rows = spec.inputs[0][0][0]
    if dict(spec.attrs).get("batched") or not isinstance(rows, int) or rows > DECODE_ROWS:
        return False
    if kv["dtype"] not in ("float16", "float32"):
        return False
    vec = 16 // np.dtype(kv["dtype"]).itemsize
    words = kv["head_dim"] // vec
    return kv["head_dim"] % vec == 0 and words > 0 and words & (words - 1) == 0


def max_visible(kv: dict) -> int:
    """The most positions one query sees: the window and sinks, or the sequence capacity."""
    capacity = kv.get("capacity", kv.get("pages_per_seq", kv["pages"]) * kv["page_size"])
    if kv["window"] > 0:
        return min(capacity, kv["window"] + kv["sinks"])
    return capacity


def static_splits(spec: KernelSpec, chunk: int = CHUNK, max_splits: int = MAX_SPLITS) -> int:
    """Blocks per (row, query head) in the grid, from the static maximum context."""
    return max(1, min(max_splits, -(-max_visible(dict(spec.kv)) // chunk)))


def split_ranges(count: int, splits: int, chunk: int = CHUNK, solo: int = SOLO,
                 wide: int = WIDE) -> list[tuple[int, int]]:
    """The kernel's [begin, end) index ranges of the active splits for `count` visible
    positions (host mirror of the device arithmetic; a range may be empty)."""
    per_split = chunk if count < wide else 2 * chunk
    active = 1 if count <= solo else min(splits, -(-count // per_split))
    per = -(-count // active)
    return [(s * per, min(s * per + per, count)) for s in range(active)]


def _unpack(kv_dt: str, vec: int) -> str:
    """`{{name}}_unpack(word, f)`: the 16-byte word's values as floats."""
    ct = C_TYPES[kv_dt]
    return f"""__device__ __forceinline__ void NAME_unpack(const uint4& w, float* f) {{
  const {ct}* v = reinterpret_cast<const {ct}*>(&w);
  #pragma unroll
  for (int k = 0; k < {vec}; ++k) f[k] = mlcc_f32(v[k]);
}}"""


def _coords(spec: KernelSpec, rows: int, splits: int) -> str:
    """Shared state, block coordinates and the split's range (from seq_info alone)."""
    kv = dict(spec.kv)
    hq, hkv, d = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"]
    group = hq // hkv
    window, sinks = kv["window"], kv["sinks"]
    first = f"(pos - {window - 1} > 0 ? pos - {window - 1} : 0)" if window > 0 else "0"
    return f"""  __shared__ float q_s[{d}];
  __shared__ __align__(16) T_KV kv_s[2][{rows}][{d}];  // the chunk's keys, values
  __shared__ int last_s;
  // split-major: the blocks that may have work come first and spread over the SMs
  const int split = blockIdx.x / {rows * hq};
  const int h = blockIdx.x % {hq}, g = h / {group};
  const int i = blockIdx.x / {hq} % {rows};
  // positions as int (32-bit registers); pool offsets are 64-bit (page_helpers)
  const int start = seq_info[0], pos = start + i;
  const int lo = {first};
  const int sinks_end = {sinks} < lo ? {sinks} : lo;
  // visible: [0, sinks_end) then [lo, pos], walked as one index range
  const int count = sinks_end + (pos - lo + 1);
  // divisions by constants (shifts for a power-of-two chunk), not by a variable
  int active = count <= SOLO_ ? 1 : count < WIDE_ ? (count + CHUNK_ - 1) / CHUNK_
                                                         : (count + 2 * CHUNK_ - 1) / (2 * CHUNK_);
  active = active < SPLITS ? active : SPLITS;
  if (split >= active) return 0;
  const int per = (count + active - 1) / active;
  const int t_begin = split * per;
  const int t_end = t_begin + per < count ? t_begin + per : count;
""".replace("SPLITS", str(splits))


def _angles(spec: KernelSpec, name: str) -> str:
    """`{name}_angle(q, p, &cs, &sn)` and `{name}_rot2(src, q, cs, sn, &lo, &hi)`: the rotary
    pair (q, q + d/2) of rope2 split into its angle, computable before the wait, and the
    rotation of the loaded pair (rope2's formulas and rounding)."""
    d = dict(spec.kv)["head_dim"]
    return f"""__device__ __forceinline__ void {name}_angle_of(float inv, int p, float* cs, float* sn) {{
  const float angle = (float)p * inv;
  *cs = cosf(angle);
  *sn = sinf(angle);
}}
__device__ __forceinline__ void {name}_angle(int q, int p, float* cs, float* sn) {{
  {name}_angle_of({name}_invf[q], p, cs, sn);
}}
template <typename T>
__device__ __forceinline__ void {name}_rot2(const T* src, int q, float cs, float sn, float* lo,
                                            float* hi) {{
  const float a = mlcc_f32(src[q]), b = mlcc_f32(src[q + {d // 2}]);
  *lo = mlcc_round(a * cs + (-1.0f) * b * sn, src);
  *hi = mlcc_round(b * cs + (1.0f) * a * sn, src);
}}"""


def _angle_table(spec: KernelSpec, name: str) -> str:
    """First in the kernel: the frequency of the first pair the thread rotates in `_stage`
    (element threadIdx.x: query pair c, or a chunk row's key pair c, c = threadIdx.x % (d/2)),
    read from the table while the block reads seq_info."""
    h2 = dict(spec.kv)["head_dim"] // 2
    return f"  const float inv0 = {name}_invf[threadIdx.x % {h2}];\n"


def _early_angles(spec: KernelSpec, name: str) -> str:
    """The cosine and sine of the thread's first pair (unused past the pairs `_stage` has)."""
    h2 = dict(spec.kv)["head_dim"] // 2
    return f"""  float cs0, sn0;
  {name}_angle_of(inv0, threadIdx.x < {h2} ? pos : start + ((int)threadIdx.x - {h2}) / {h2},
                  &cs0, &sn0);
"""


def _stage(spec: KernelSpec, name: str, rows: int, early: bool = False) -> str:
    """The rotated query and the chunk's keys and values in shared memory (and the one pool
    write per (row, KV head)): everything that reads the kernel ahead's output. With `early`
    the thread's first pair takes the angle `_early_angles` computed before the wait."""
    kv = dict(spec.kv)
    hq, hkv, d, page = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"], kv["page_size"]
    group, width = hq // hkv, (hq + 2 * hkv) * d
    if early:
        angle = f"""    float cs = cs0, sn = sn0;
    if (e0 != (int)threadIdx.x)
      {name}_angle(e0 < {d // 2} ? e0 : (e0 - {d // 2}) % {d // 2},
                   e0 < {d // 2} ? pos : start + (e0 - {d // 2}) / {d // 2}, &cs, &sn);
"""
        rot_q = f"{name}_rot2(qkv + i * {width}LL + h * {d}, e0, cs, sn, &q_s[e0], &q_s[e0 + {d // 2}])"
        rot_k = f"{name}_rot2(src, c, cs, sn, &k0, &k1)"
    else:
        angle = ""
        rot_q = f"{name}_rope2(qkv + i * {width}LL + h * {d}, e0, pos, &q_s[e0], &q_s[e0 + {d // 2}])"
        rot_k = f"{name}_rope2(src, c, start + r, &k0, &k1)"
    return f"""  const bool writer = split == 0 && h % {group} == 0;
  const long long wrow = writer ? {name}_row(page_table, pos, 0, g) : 0;
  // the query's pairs and the chunk rows' key and value pairs in one loop, so that the
  // threads load all of them at once (one round trip, not one for the query and one more)
  for (int e0 = threadIdx.x; e0 < (int)(i + 2) * {d // 2}; e0 += blockDim.x) {{
{angle}    if (e0 < {d // 2}) {{
      {rot_q};
      continue;
    }}
    const int e = e0 - {d // 2}, r = e / {d // 2}, c = e % {d // 2};
    const T_QKV* src = qkv + r * {width}LL + {hq * d} + g * {d};
    float k0, k1;
    {rot_k};
    const float v0 = mlcc_f32(src[{hkv * d} + c]), v1 = mlcc_f32(src[{hkv * d + d // 2} + c]);
    mlcc_put(kv_s[0][r], c, k0);
    mlcc_put(kv_s[0][r], c + {d // 2}, k1);
    mlcc_put(kv_s[1][r], c, v0);
    mlcc_put(kv_s[1][r], c + {d // 2}, v1);
    if (writer && r == i) {{  // the append kernel's stores, same values and slot
      mlcc_put(pool, wrow + c, k0);
      mlcc_put(pool, wrow + c + {d // 2}, k1);
      mlcc_put(pool, wrow + {hkv * page * d} + c, v0);
      mlcc_put(pool, wrow + {hkv * page * d + d // 2} + c, v1);
    }}
  }}
  __syncthreads();
"""


def _loads(spec: KernelSpec, name: str, rows: int, unroll: int, which: str,
           base: str = "base") -> str:
    """The loads of the round at `base` into kw, vw: `which` is "pool" (positions before the
    chunk, cached by earlier launches), "chunk" (the chunk's rows, from shared memory) or
    "all"."""
    kv = dict(spec.kv)
    hkv, d, page = kv["kv_heads"], kv["head_dim"], kv["page_size"]
    vec, lanes, per_lane = _geometry(spec)
    step = 32 // lanes  # positions a warp takes side by side
    pool = f"kp = pool + {name}_row(page_table, j, 0, g); vp = kp + {hkv * page * d}LL;"
    # a chunk row's value follows its key by one shared row, a pool row's by one kind
    chunk = f"kp = kv_s[0][0] + (j - start) * {d}; vp = kp + {rows * d}LL;"
    pick = {"pool": f"if (j >= start) continue;\n      {pool}",
            "chunk": f"if (j < start) continue;\n      {chunk}",
            "all": f"if (j >= start) {{ {chunk} }} else {{ {pool} }}"}[which]
    return f"""    #pragma unroll
    for (int u = 0; u < {unroll}; ++u) {{
      const int t = {base} + (warp * {unroll} + u) * {step} + grp;
      const int tc = t < t_end ? t : t_end - 1;
      const int j = tc < sinks_end ? tc : lo + (tc - sinks_end);
      const T_KV *kp, *vp;
      {pick}
      #pragma unroll
      for (int e = 0; e < {per_lane}; ++e) {{
        kw[u][e] = *reinterpret_cast<const uint4*>(kp + (e * {lanes} + sub) * {vec});
        vw[u][e] = *reinterpret_cast<const uint4*>(vp + (e * {lanes} + sub) * {vec});
      }}
    }}
"""


def _prefetch(spec: KernelSpec, name: str, warps: int, unroll: int) -> str:
    """The cached positions of the block's next PREFETCH_ROUNDS rounds, brought into L2 while
    it waits (their loads come after the first round's arithmetic): every 128-byte line of
    their key and value rows, one line a thread at a time (mlcc_prefetch_l2 of
    mlcc.backends.cuda.prefetch)."""
    if not PREFETCH_ROUNDS:
        return ""
    kv = dict(spec.kv)
    hkv, d, page = kv["kv_heads"], kv["head_dim"], kv["page_size"]
    item = np.dtype(kv["dtype"]).itemsize
    lines, per_line = -(-d * item // 128), 128 // item
    step = 32 // _geometry(spec)[1]
    span = warps * unroll * step  # positions of a round
    return f"""  {{
    const int p0 = t_begin + {span};
    const int p1 = p0 + {PREFETCH_ROUNDS * span} < t_end ? p0 + {PREFETCH_ROUNDS * span} : t_end;
    for (int x = threadIdx.x; x < (p1 - p0) * {2 * lines}; x += blockDim.x) {{
      const int t = p0 + x / {2 * lines}, l = x % {2 * lines};
      const int j = t < sinks_end ? t : lo + (t - sinks_end);
      if (j >= start) continue;  // the chunk's rows: from shared memory
      const long long at = {name}_row(page_table, j, 0, g)
                           + (l < {lines} ? 0LL : {hkv * page * d}LL) + (l % {lines}) * {per_line};
      mlcc_prefetch_l2(pool + at);
    }}
  }}
"""


def _first_loads(spec: KernelSpec, name: str, rows: int, unroll: int, warps: int,
                 early: bool = False) -> str:
    """Lane coordinates and the first round's loads of cached positions: they need nothing
    from the kernel ahead, so they are issued before the block waits for it (as are the
    prefetches and, with `early`, the first rotary angle)."""
    _, lanes, per_lane = _geometry(spec)
    return f"""  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % {lanes}, grp = lane / {lanes};
  uint4 kw[{unroll}][{per_lane}], vw[{unroll}][{per_lane}];
  {{
{_loads(spec, name, rows, unroll, "pool", "t_begin")}  }}
{_prefetch(spec, name, warps, unroll)}{_early_angles(spec, name) if early else ""}"""


def _walk(spec: KernelSpec, name: str, rows: int, warps: int, unroll: int) -> str:
    """Each lane group's online softmax over its positions of the split's range: `unroll`
    positions a lane group a round, every load of the round issued before any is used (the
    first round's cached positions by `_first_loads`)."""
    d = dict(spec.kv)["head_dim"]
    vec, lanes, per_lane = _geometry(spec)
    step = 32 // lanes  # positions a warp takes side by side
    scale = spec.attr("scale") if spec.attr("scale") is not None else 1.0 / np.sqrt(d)
    n = per_lane * vec
    return f"""  float qr[{n}], acc[{n}], m = -1.0e30f, l = 0.f;
  #pragma unroll
  for (int e = 0; e < {per_lane}; ++e)
    #pragma unroll
    for (int k = 0; k < {vec}; ++k) {{
      qr[e * {vec} + k] = q_s[(e * {lanes} + sub) * {vec} + k];
      acc[e * {vec} + k] = 0.f;
    }}
  for (int base = t_begin; base < t_end; base += {warps * unroll * step}) {{
    if (base == t_begin) {{
{_loads(spec, name, rows, unroll, "chunk")}    }} else {{
{_loads(spec, name, rows, unroll, "all")}    }}
    float s[{unroll}], m_new = m;
    #pragma unroll
    for (int u = 0; u < {unroll}; ++u) {{
      float dot = 0.f, f[{vec}];
      #pragma unroll
      for (int e = 0; e < {per_lane}; ++e) {{
        {name}_unpack(kw[u][e], f);
        #pragma unroll
        for (int k = 0; k < {vec}; ++k) dot += qr[e * {vec} + k] * f[k];
      }}
      #pragma unroll
      for (int o = {lanes // 2}; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      const bool live = base + (warp * {unroll} + u) * {step} + grp < t_end;
      s[u] = live ? dot * {fp(scale)} : -1.0e30f;
      m_new = fmaxf(m_new, s[u]);
    }}
    const float keep = expf(m - m_new);
    l *= keep;
    #pragma unroll
    for (int k = 0; k < {n}; ++k) acc[k] *= keep;
    #pragma unroll
    for (int u = 0; u < {unroll}; ++u) {{
      const bool live = base + (warp * {unroll} + u) * {step} + grp < t_end;
      const float wgt = live ? expf(s[u] - m_new) : 0.f;
      l += wgt;
      float f[{vec}];
      #pragma unroll
      for (int e = 0; e < {per_lane}; ++e) {{
        {name}_unpack(vw[u][e], f);
        #pragma unroll
        for (int k = 0; k < {vec}; ++k) acc[e * {vec} + k] += wgt * f[k];
      }}
    }}
    m = m_new;
  }}
"""


def _merge(spec: KernelSpec, name: str, splits: int, warps: int) -> str:
    """Lane groups merge in shared memory; with one active split the block writes the output,
    otherwise the last block to arrive merges the splits' states from the scratch array."""
    kv = dict(spec.kv)
    hq, d = spec.attr("num_q_heads"), kv["head_dim"]
    vec, lanes, per_lane = _geometry(spec)
    n = per_lane * vec
    shuffled = _warp_merge(spec)
    groups = warps if shuffled else warps * (32 // lanes)
    stride = d + 2
    # the lane groups of a warp first merged through shuffles (one partial state a warp)
    in_warp = f"""  for (int o = {lanes}; o < 32; o <<= 1) {{
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
    const float top = fmaxf(m, m2), a = expf(m - top), b = expf(m2 - top);
    l = l * a + l2 * b;
    #pragma unroll
    for (int k = 0; k < {n}; ++k) acc[k] = acc[k] * a + __shfl_xor_sync(0xffffffffu, acc[k], o) * b;
    m = top;
  }}
  const int gi = warp;
  if (grp == 0) {{
""" if shuffled else f"""  const int gi = warp * {32 // lanes} + grp;
  {{
"""
    return f"""  __shared__ float part_m[{groups}], part_l[{groups}], part_acc[{groups}][{d}];
{in_warp}    if (sub == 0) {{ part_m[gi] = m; part_l[gi] = l; }}
    #pragma unroll
    for (int e = 0; e < {per_lane}; ++e)
      #pragma unroll
      for (int k = 0; k < {vec}; ++k)
        part_acc[gi][(e * {lanes} + sub) * {vec} + k] = acc[e * {vec} + k];
  }}
  __syncthreads();
  float top = part_m[0], total = 0.f;
  #pragma unroll
  for (int w = 1; w < {groups}; ++w) top = fmaxf(top, part_m[w]);
  #pragma unroll
  for (int w = 0; w < {groups}; ++w) total += part_l[w] * expf(part_m[w] - top);
  float* ws = {name}_ws + (i * {hq} + h) * {splits * stride}LL;
  const long long out_at = (long long)i * {hq * d}LL + h * {d};
  for (int c = threadIdx.x; c < {d}; c += blockDim.x) {{
    float out = 0.f;
    #pragma unroll
    for (int w = 0; w < {groups}; ++w) out += part_acc[w][c] * expf(part_m[w] - top);
    if (active == 1) mlcc_put(y, out_at + c, out / total);
    else ws[split * {stride} + 2 + c] = out;
  }}
  if (active == 1) return 0;
  if (threadIdx.x == 0) {{ ws[split * {stride}] = top; ws[split * {stride} + 1] = total; }}
  __threadfence();  // this block's state is visible before it counts itself in
  __syncthreads();
  if (threadIdx.x == 0)
    last_s = atomicAdd(&{name}_cnt[i * {hq} + h], 1u) == (unsigned)(active - 1);
  __syncthreads();
  if (!last_s) return 0;
  __threadfence();
  // the last block: every split's state, read past L1 (other SMs wrote it)
  float all_top = -1.0e30f, all_total = 0.f;
  for (int s = 0; s < active; ++s) all_top = fmaxf(all_top, __ldcg(ws + s * {stride}));
  for (int s = 0; s < active; ++s)
    all_total += __ldcg(ws + s * {stride} + 1) * expf(__ldcg(ws + s * {stride}) - all_top);
  for (int c = threadIdx.x; c < {d}; c += blockDim.x) {{
    float out = 0.f;
    for (int s = 0; s < active; ++s)
      out += __ldcg(ws + s * {stride} + 2 + c) * expf(__ldcg(ws + s * {stride}) - all_top);
    mlcc_put(y, out_at + c, out / all_total);
  }}
  if (threadIdx.x == 0) {name}_cnt[i * {hq} + h] = 0u;  // clean for the next launch
  return 0;
"""


def gen_decode_attention(spec: KernelSpec, name: str, chunk: int | None = None,
                         max_splits: int | None = None, solo: int | None = None,
                         wide: int | None = None, warps: int | None = None,
                         unroll: int | None = None) -> CudaKernel:
    """`{name}_decode` for a `use_decode` spec: one launch of rows x query heads x splits
    blocks of `warps` warps. `chunk`, `max_splits`, `solo` and `wide` set the split count (see
    `split_ranges`), `unroll` the positions a lane group loads at once. Each left out is the
    module's constant of that name as it is at the call.

    Up to four positions a lane group, the launch bound asks for RESIDENT_THREADS threads an
    SM (64 registers a thread): the first round's early loads would otherwise take the 7B
    kernel to 72 registers and 6 blocks of 4 warps an SM, fewer than its 1,024 blocks of
    that shape needed to be placed at once (decode after 3,968 positions 2% slower on the
    H200). With 8 warps and 16 splits the 7B grid is 512 blocks, 4 an SM."""
    chunk = CHUNK if chunk is None else chunk
    max_splits = MAX_SPLITS if max_splits is None else max_splits
    solo = SOLO if solo is None else solo
    wide = WIDE if wide is None else wide
    warps = WARPS if warps is None else warps
    unroll = UNROLL if unroll is None else unroll
    kv = dict(spec.kv)
    (qkv_shape, dt), (out_shape, _) = spec.inputs[0], spec.outputs[0]
    hq, hkv, d, page = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"], kv["page_size"]
    rows, per_seq = qkv_shape[0], kv.get("pages_per_seq", kv["pages"])
    vec, _, _ = _geometry(spec)
    splits = static_splits(spec, chunk, max_splits)
    early = early_angles(spec)
    buffers = [("qkv", qkv_shape, dt), ("y", out_shape, dt), ("seq_info", (2,), "int32"),
               ("page_table", (per_seq,), "int32"),
               ("pool", (kv["pages"], 2, hkv, page, d), kv["dtype"])]
    head = signature(name, buffers, ("y", "pool"), []).replace(f"int {name}_dev(",
                                                               f"int {name}_decode(")
    source = f"""{_rope(name, spec, d)}
{_angles(spec, name) if early else ""}
{page_helpers(name, kv)}
{_unpack(kv["dtype"], vec).replace("NAME", name)}
// partial states of the splits: (row, head, split) x (max, sum, weighted values)
__device__ float {name}_ws[{rows * hq * splits * (d + 2)}];
__device__ unsigned int {name}_cnt[{rows * hq}];  // blocks done per (row, head)
{head} {{
{_angle_table(spec, name) if early else ""}\
{_coords(spec, rows, splits)}\
{_first_loads(spec, name, rows, unroll, warps, early)}  {GRID_WAIT}
{_stage(spec, name, rows, early)}{_walk(spec, name, rows, warps, unroll)}\
{_merge(spec, name, splits, warps)}}}
"""
    source = source.replace("T_QKV", C_TYPES[dt]).replace("T_KV", C_TYPES[kv["dtype"]])
    source = source.replace("CHUNK_", str(chunk)).replace("SOLO_", str(solo))
    source = source.replace("WIDE_", str(wide))
    grid = (f"T.int64({rows * hq * splits})",)
    return CudaKernel(name, source,
                      launcher_nests(name, buffers, [(f"{name}_decode", grid, warps * 32)], []),
                      self_waiting=(f"{name}_decode",),
                      min_blocks=RESIDENT_THREADS // (warps * 32) if unroll <= 4 else 0)
