"""Streamed q4 decode GEMV: the weights flow through a shared-memory ring, the activations stay
in registers.

The register-pipelined GEMVs (mlcc.backends.cuda.gemv, linear) keep their next weight tile in
registers, so the bytes an SM has in flight are bounded by the registers its warps hold: the
7B gate_up kernel runs 2.56 warps a scheduler at 127 registers and reads at ~60% of HBM
bandwidth, stalled in a third of its cycles (ncu, benchmarks/results/2026-11-29-h200-d). Here
the weights go from global memory to shared memory by cp.async (16 bytes a thread and copy,
no registers held while in flight) into a ring of `stages` slots, so a block keeps stages - 1
chunks of weights in flight while it computes one:

    chunk       `rows` consecutive output features (in GLU mode their gate rows f and up
                rows I + f), all of K: rows x K / 2 bytes of packed codes, rows x K / 16 of
                scales. Block b takes chunks b, b + gridDim, b + 2 gridDim, ...
    threads     thread t owns the word pairs p = t, t + threads, ... of every row (16
                consecutive k each); it loads those activations once, as nibble pairs
                (x_j, x_{j+4}), into registers before the first chunk, and for each chunk
                multiplies them with its pairs of every row of the chunk (an 8-byte shared
                load per row and pair, conflict-free across a warp), scaled per half group
    reduction   each warp folds its `rows` sums in a transposed butterfly (log2 rows
                levels that halve the values a lane holds, then plain levels), so one
                shuffle per value and level; warp totals go to shared memory, and after the
                next barrier the first `rows` threads add the warps in order and store.

One barrier per chunk: it publishes the landed chunk (each thread's cp.async.wait_group, then
the barrier), frees the slot computed last (refilled right after it) and publishes the warp
totals of the chunk before, which are finished one chunk late.

Arithmetic: the nibble dot of the persistent GEMV (`dot`, mlcc_q4_dot8_lop3_pairs by default:
products summed in pairs in float16, then in float32), each pair of words times its group's
scale in float32, warp and block sums in float32 in a fixed order (results are deterministic,
though not in the other GEMVs' summation order). GLU mode rounds g and u to float16 as the
unfused GEMV stores them and applies the GLU expression (mlcc.backends.cuda.glu.SILU_MUL).

Static shared memory (48 KB a block) bounds stages x rows x (K / 2 + K / 16) bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcc.backends.cuda.gemm import HELPERS as CP_HELPERS
from mlcc.backends.cuda.gemv import SMS, glu_buffers
from mlcc.backends.cuda.gemv_tc import PORTABLE_HELPERS
from mlcc.backends.cuda.kernels import GRID_WAIT, CudaKernel, launcher, signature
from mlcc.backends.cuda.linear import LinearShape
from mlcc.errors import MlccError

SHARED_BYTES = 48 * 1024
MAX_THREADS = 1024
DOTS = ("mlcc_q4_dot8_lop3_pairs", "mlcc_q4_dot8_lop3", "mlcc_q4_dot8")


@dataclass(frozen=True)
class StreamConfig:
    """`blocks_per_sm` x SMS blocks of `threads` threads; chunks of `rows` output features; a
    ring of `stages` chunk slots in shared memory."""

    blocks_per_sm: int = 2
    threads: int = 256
    rows: int = 4
    stages: int = 4
    dot: str = DOTS[0]

    @property
    def tag(self) -> str:
        dot = "" if self.dot == DOTS[0] else "_" + self.dot[13:]
        return f"st_b{self.blocks_per_sm}_t{self.threads}_r{self.rows}_s{self.stages}{dot}"


@dataclass(frozen=True)
class Plan:
    features: int  # outputs (N, or N / 2 in GLU mode)
    weight_rows: int  # rows of a chunk: rows, or 2 x rows in GLU mode
    chunks: int
    grid: int
    pairs: int  # word pairs per weight row
    pairs_per_thread: int
    shared_bytes: int


def applies(s: LinearShape) -> bool:
    """q4f16_1 weights (K a multiple of 256, so every row's scales are whole 16-byte units),
    float16 activations, one static row."""
    return (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.ydt in ("float16", "float32") and s.k % 256 == 0
            and s.words * 8 == s.k and s.groups * 32 == s.k and s.static_rows == 1
            and s.n * s.words < 2**31)


def shared_bytes(k: int, weight_rows: int, c: StreamConfig) -> int:
    ring = c.stages * weight_rows * (k // 2 + k // 16)
    return ring + 2 * (c.threads // 32) * weight_rows * 4


def plan(s: LinearShape, c: StreamConfig, name: str, glu: bool = False, sms: int = SMS) -> Plan:
    """The launch of s with config c; MlccError naming the limit when it cannot run."""
    if not applies(s):
        raise MlccError("compile", f"{name}: the streamed GEMV needs q4f16_1 weights with K % "
                        f"256 == 0, float16 activations and one static row; got N={s.n}, "
                        f"K={s.k}, rows {s.rows_text}; use another linear rule")
    if glu and (s.n % 2 or s.ydt != "float16"):
        raise MlccError("compile", f"{name}: GLU mode needs an even gate_up row count and "
                        f"float16 values, got {s.n} rows of {s.ydt}; leave the pair unfused")
    weight_rows = c.rows * (2 if glu else 1)
    problems = []
    if c.threads % 32 or not 32 <= c.threads <= 256:
        problems.append("threads must be a multiple of 32 from 32 to 256")
    if c.rows not in (1, 2, 4, 8, 16) or weight_rows > 16:
        problems.append("rows must be 1, 2, 4, 8 or 16 (16 weight rows at most in GLU mode)")
    if c.stages < 2 or c.blocks_per_sm < 1:
        problems.append("stages >= 2 and blocks_per_sm >= 1")
    if c.blocks_per_sm * c.threads > 2048:
        problems.append(f"{c.blocks_per_sm * c.threads} threads per SM > 2048")
    if c.dot not in DOTS:
        problems.append(f"dot must be one of {', '.join(DOTS)}")
    if not problems and shared_bytes(s.k, weight_rows, c) > SHARED_BYTES:
        problems.append(f"{shared_bytes(s.k, weight_rows, c)} bytes of shared memory > "
                        f"{SHARED_BYTES} (fewer stages or rows)")
    if problems:
        raise MlccError("compile", f"{name}: streamed GEMV {c.tag} at K={s.k}: "
                        f"{'; '.join(problems)}; pick another StreamConfig")
    features = s.n // 2 if glu else s.n
    chunks = -(-features // c.rows)
    pairs = s.k // 16
    return Plan(features, weight_rows, chunks, max(1, min(c.blocks_per_sm * sms, chunks)),
                pairs, -(-pairs // c.threads), shared_bytes(s.k, weight_rows, c))


def _issue(s: LinearShape, c: StreamConfig, p: Plan, glu: bool, local: str, slot: str) -> str:
    """cp.async of chunk `local` (this block's count) into ring slot `slot`, then a commit
    (always, so that every thread's group count stays in step)."""
    row_units, scale_units = s.k // 32, s.k // 256  # 16-byte units of a weight / scale row
    seg = f"(r2 / {c.rows}) * {p.features} + " if glu else ""
    rr = f"r2 % {c.rows}" if glu else "r2"
    return f"""    {{
      const int c = blockIdx.x + ({local}) * {p.grid};
      if (c < {p.chunks}) {{
        const unsigned wdst = wbase + ({slot}) * {p.weight_rows * s.k // 2}u;
        const unsigned sdst = sbase + ({slot}) * {p.weight_rows * s.k // 16}u;
        for (int u = threadIdx.x; u < {p.weight_rows * row_units}; u += {c.threads}) {{
          const int r2 = u / {row_units}, f = c * {c.rows} + {rr};
          if (f < {p.features})
            mlcc_tc_cp16(wdst + u * 16u, qv + (long long)({seg}f) * {row_units} + u % {row_units});
        }}
        for (int u = threadIdx.x; u < {p.weight_rows * scale_units}; u += {c.threads}) {{
          const int r2 = u / {scale_units}, f = c * {c.rows} + {rr};
          if (f < {p.features})
            mlcc_tc_cp16(sdst + u * 16u,
                         sv + (long long)({seg}f) * {scale_units} + u % {scale_units});
        }}
      }}
      mlcc_tc_cp_commit();
    }}"""


def _reduce(rows: int) -> str:
    """Transposed butterfly over acc[0..rows): afterwards lane l holds the warp total of row
    `mine` (when `writer`)."""
    lines, count, offset = [], rows, 16
    while count > 1:
        half = count // 2
        lines.append(f"""      {{
        const bool up = (lane & {offset}) != 0;
        #pragma unroll
        for (int q = 0; q < {half}; ++q) {{
          const float send = up ? acc[q] : acc[q + {half}];
          const float keep = up ? acc[q + {half}] : acc[q];
          acc[q] = keep + __shfl_xor_sync(0xffffffffu, send, {offset});
        }}
        mine += up ? {half} : 0;
      }}""")
        count, offset = half, offset // 2
    while offset >= 1:
        lines.append(f"      acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], {offset});")
        offset //= 2
    writer_mask = (32 >> (rows.bit_length() - 1)) - 1
    lines.append(f"      if ((lane & {writer_mask}) == 0) red[parity][warp][mine] = acc[0];")
    return "\n".join(lines)


def _finish(s: LinearShape, c: StreamConfig, p: Plan, glu: str | None, local: str,
            parity: str) -> str:
    """The first `rows` threads add the warp totals of chunk `local` and store."""
    warps = c.threads // 32
    if glu is None:
        store = f"mlcc_put(y, f, v{s.bias_term('f')});"
        second = ""
    else:
        g = f"mlcc_round(v{s.bias_term('f')}, y)"
        u = f"mlcc_round(v2{s.bias_term(f'{p.features} + f')}, y)"
        second = f"""        float v2 = 0.f;
        #pragma unroll
        for (int w = 0; w < {warps}; ++w) v2 += red[{parity}][w][{c.rows} + threadIdx.x];"""
        store = f"""const float g = {g}, u = {u};
        mlcc_put(y, f, {glu.format(g="g", u="u")});"""
    return f"""    if (threadIdx.x < {c.rows}) {{
      const int f = (blockIdx.x + ({local}) * {p.grid}) * {c.rows} + threadIdx.x;
      if (f < {p.features}) {{
        float v = 0.f;
        #pragma unroll
        for (int w = 0; w < {warps}; ++w) v += red[{parity}][w][threadIdx.x];
{second}
        {store}
      }}
    }}"""


def gemv_q4_stream_kernel(s: LinearShape, name: str, config: StreamConfig,
                          glu: str | None = None, sms: int = SMS) -> CudaKernel:
    """The streamed GEMV of one q4 linear (module docstring); `glu` (an expression in g and u)
    turns on GLU mode; `sms` scales the grid (the host emulation runs few blocks)."""
    c = config
    p = plan(s, c, name, glu is not None, sms)
    warps, np_, rr = c.threads // 32, p.pairs_per_thread, p.weight_rows
    buffers = s.buffers if glu is None else glu_buffers(s)
    guard = "" if p.pairs % c.threads == 0 else f"if (j < {np_ - 1} || pr < {p.pairs}) "
    wpr, gpr = s.k // 8, s.k // 32
    prologue = "\n".join(_issue(s, c, p, glu is not None, str(i), str(i))
                         for i in range(c.stages - 1))
    body = f"""{CP_HELPERS}{PORTABLE_HELPERS}
{signature(name, buffers, ("y",), s.symbols)} {{
  __shared__ __align__(16) unsigned int ws[{c.stages * rr * wpr}];
  __shared__ __align__(16) half ss[{c.stages * rr * gpr}];
  __shared__ float red[2][{warps}][{rr}];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned wbase = mlcc_tc_smem(ws), sbase = mlcc_tc_smem(ss);
  const uint4* qv = reinterpret_cast<const uint4*>(qw);
  const uint4* sv = reinterpret_cast<const uint4*>(qs);
{prologue}
  {GRID_WAIT}
  uint4 xr[{np_}][2];  // this thread's activations, 16 per word pair, as nibble pairs
  #pragma unroll
  for (int j = 0; j < {np_}; ++j) {{
    const int pr = threadIdx.x + j * {c.threads};
    xr[j][0] = xr[j][1] = make_uint4(0u, 0u, 0u, 0u);
    {guard}{{
      const uint4* xp = reinterpret_cast<const uint4*>(x) + 2 * pr;
      xr[j][0] = mlcc_tcv_pairs(xp[0]);
      xr[j][1] = mlcc_tcv_pairs(xp[1]);
    }}
  }}
  int i = 0;
  for (; blockIdx.x + i * {p.grid} < {p.chunks}; ++i) {{
    mlcc_tc_cp_wait<{c.stages - 2}>();
    __syncthreads();  // chunk i landed; slot (i - 1) % stages is free; totals of i - 1 are in
    if (i > 0) {{
{_finish(s, c, p, glu, "i - 1", "(i - 1) & 1")}
    }}
{_issue(s, c, p, glu is not None, f"i + {c.stages - 1}", f"(i + {c.stages - 1}) % {c.stages}")}
    const int slot = i % {c.stages}, parity = i & 1;
    const unsigned int* wsl = ws + slot * {rr * wpr};
    const half* ssl = ss + slot * {rr * gpr};
    float acc[{rr}];
    #pragma unroll
    for (int r = 0; r < {rr}; ++r) acc[r] = 0.f;
    #pragma unroll
    for (int j = 0; j < {np_}; ++j) {{
      const int pr = threadIdx.x + j * {c.threads};
      {guard}{{
        const half2* xh = reinterpret_cast<const half2*>(&xr[j][0]);
        #pragma unroll
        for (int r = 0; r < {rr}; ++r) {{
          const uint2 w = reinterpret_cast<const uint2*>(wsl + r * {wpr})[pr];
          const float d = {c.dot}(w.x, xh) + {c.dot}(w.y, xh + 4);
          acc[r] = fmaf(d, __half2float(ssl[r * {gpr} + (pr >> 1)]), acc[r]);
        }}
      }}
    }}
    {{
      int mine = 0;
{_reduce(rr)}
    }}
  }}
  __syncthreads();
  if (i > 0) {{
{_finish(s, c, p, glu, "i - 1", "(i - 1) & 1")}
  }}
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, buffers, (f"T.int64({p.grid})",), c.threads,
                                           s.symbols))
