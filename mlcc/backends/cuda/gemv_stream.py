"""Streamed q4 decode GEMV: each warp streams its weights through its own shared-memory ring.

The register-pipelined GEMVs (mlcc.backends.cuda.gemv, linear) keep their next weight tile in
registers, so the bytes an SM has in flight are bounded by the registers its warps hold: the
7B gate_up kernel runs 2.56 warps a scheduler at 127 registers and reads at ~60% of HBM
bandwidth, stalled in a third of its cycles (ncu, benchmarks/results/2026-11-29-h200-d). Here
the weights go from global to shared memory by cp.async (16 bytes a lane and copy, no register
held while in flight), into a ring of `stages` slots that belongs to one warp:

    chunk       `rows` consecutive output features (in GLU mode their gate rows f and up rows
                I + f), all of K: rows x K / 2 bytes of packed codes, rows x K / 16 of scales.
                Warp g of the launch takes chunks g, g + warps of the launch, ...; a warp keeps
                stages - 1 chunks in flight while it computes one, with no block barrier in the
                loop (cp.async.wait_group, then __syncwarp, publishes a landed slot to the
                warp and orders its reads before the slot is refilled).
    activations staged once per block into shared memory as nibble pairs (x_j, x_{j+4}),
                laid out by word position within a group, so that lane l reading unit
                l + 32 m hits consecutive 16-byte words (no bank conflicts)
    lanes       lane l takes the 16-byte units (groups of 32 weights) l, l + 32, ... of every
                row of the chunk: four activation loads per unit serve all the chunk's rows
    reduction   a transposed butterfly over the chunk's rows (log2 rows levels that halve
                the values a lane holds, then plain levels); writer lanes store, in GLU mode
                after one more exchange that brings g and u of a feature into one lane.

Arithmetic: the nibble dot of the persistent GEMV (`dot`, mlcc_q4_dot8_lop3_pairs by default:
products summed in pairs in float16, then in float32), a group's four word sums times its scale
in float32, lanes summed in float32 in a fixed order (results are deterministic, though not in
the other GEMVs' summation order). GLU mode rounds g and u to float16 as the unfused GEMV stores
them and applies the GLU expression (mlcc.backends.cuda.glu.SILU_MUL).

The block form before this one (commit c09b5e4: all warps of a block on one chunk, a block
barrier per chunk) measured 15-45% slower than the shipped GEMVs on the H200
(benchmarks/results/2026-11-29-h200-g).

Static shared memory (48 KB a block) bounds K x 2 (activations) + warps x stages x rows x
(K / 2 + K / 16) bytes.
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
DOTS = ("mlcc_q4_dot8_lop3_pairs", "mlcc_q4_dot8_lop3", "mlcc_q4_dot8")


@dataclass(frozen=True)
class StreamConfig:
    """`blocks_per_sm` x SMS blocks of `warps` warps; chunks of `rows` output features; a
    ring of `stages` chunk slots per warp in shared memory."""

    blocks_per_sm: int = 5
    warps: int = 2
    rows: int = 2
    stages: int = 4
    dot: str = DOTS[0]
    # each lane keeps its activations in registers (16 words' pairs a unit round) instead of
    # reading them from the block's staged copy
    x_regs: bool = False

    @property
    def tag(self) -> str:
        dot = "" if self.dot == DOTS[0] else "_" + self.dot[13:]
        regs = "_xr" if self.x_regs else ""
        return f"st_b{self.blocks_per_sm}_w{self.warps}_r{self.rows}_s{self.stages}{dot}{regs}"


@dataclass(frozen=True)
class Plan:
    features: int  # outputs (N, or N / 2 in GLU mode)
    weight_rows: int  # rows of a chunk: rows, or 2 x rows in GLU mode
    chunks: int
    grid: int
    launch_warps: int  # warps of the launch: a warp's next chunk
    units: int  # 16-byte units (groups of 32 weights) of a weight row
    units_per_lane: int
    shared_bytes: int


def applies(s: LinearShape) -> bool:
    """q4f16_1 weights (K a multiple of 256, so every row's scales are whole 16-byte units),
    float16 activations, one static row."""
    return (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.ydt in ("float16", "float32") and s.k % 256 == 0
            and s.words * 8 == s.k and s.groups * 32 == s.k and s.static_rows == 1
            and s.n * s.words < 2**31)


def shared_bytes(k: int, weight_rows: int, c: StreamConfig) -> int:
    return (0 if c.x_regs else 2 * k) + c.warps * c.stages * weight_rows * (k // 2 + k // 16)


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
    if not 1 <= c.warps <= 8:
        problems.append("warps must be 1 to 8")
    if c.rows not in (1, 2, 4, 8):
        problems.append("rows must be 1, 2, 4 or 8")
    if c.stages < 2 or c.blocks_per_sm < 1:
        problems.append("stages >= 2 and blocks_per_sm >= 1")
    if c.dot not in DOTS:
        problems.append(f"dot must be one of {', '.join(DOTS)}")
    if c.x_regs and s.k > 4096:
        problems.append("x_regs holds at most K = 4096 (64 registers a lane)")
    if not problems and shared_bytes(s.k, weight_rows, c) > SHARED_BYTES:
        problems.append(f"{shared_bytes(s.k, weight_rows, c)} bytes of shared memory > "
                        f"{SHARED_BYTES} (fewer warps, stages or rows)")
    if problems:
        raise MlccError("compile", f"{name}: streamed GEMV {c.tag} at K={s.k}: "
                        f"{'; '.join(problems)}; pick another StreamConfig")
    features = s.n // 2 if glu else s.n
    chunks = -(-features // c.rows)
    grid = max(1, min(c.blocks_per_sm * sms, -(-chunks // c.warps)))
    units = s.k // 32
    return Plan(features, weight_rows, chunks, grid, grid * c.warps, units, -(-units // 32),
                shared_bytes(s.k, weight_rows, c))


def _issue(s: LinearShape, c: StreamConfig, p: Plan, glu: bool, local: str, slot: str) -> str:
    """cp.async of the warp's chunk `local` into its ring slot `slot`, then a commit (always,
    so that the lanes' group counts stay in step)."""
    units, scale_units = p.units, s.k // 256  # 16-byte units of a weight / scale row
    lines = []
    for r2 in range(p.weight_rows):
        seg, rr = divmod(r2, c.rows)
        row = f"{seg * p.features} + f0 + {rr}" if seg else f"f0 + {rr}"
        w_off, s_off = r2 * units, r2 * scale_units
        lines.append(f"""        if (f0 + {rr} < {p.features}) {{
          const uint4* wsrc = qv + (long long)({row}) * {units};
          for (int u = lane; u < {units}; u += 32)
            mlcc_tc_cp16(wdst + ({w_off} + u) * 16u, wsrc + u);
          for (int v = lane; v < {scale_units}; v += 32)
            mlcc_tc_cp16(sdst + ({s_off} + v) * 16u, sv + (long long)({row}) * {scale_units} + v);
        }}""")
    body = "\n".join(lines)
    return f"""    {{
      const int c = gw + ({local}) * {p.launch_warps};
      if (c < {p.chunks}) {{
        const int f0 = c * {c.rows};
        const unsigned wdst = wring + ({slot}) * {p.weight_rows * s.k // 2}u;
        const unsigned sdst = sring + ({slot}) * {p.weight_rows * s.k // 16}u;
{body}
      }}
      mlcc_tc_cp_commit();
    }}"""


def _reduce(rows: int) -> tuple[str, int]:
    """Transposed butterfly over acc[0..rows): afterwards lane l holds the warp total of row
    `mine`; lanes whose low bits (the returned mask) are zero hold distinct rows."""
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
    return "\n".join(lines), (32 >> (rows.bit_length() - 1)) - 1


def _store(s: LinearShape, c: StreamConfig, p: Plan, glu: str | None) -> str:
    """Writer lanes store their feature (in GLU mode the lanes holding a gate row, with the up
    total from lane ^ 16, where the first butterfly level put the up rows)."""
    reduce, mask = _reduce(p.weight_rows)
    if glu is None:
        finish = f"""      const int f = c * {c.rows} + mine;
      if ((lane & {mask}) == 0 && f < {p.features}) mlcc_put(y, f, acc[0]{s.bias_term("f")});"""
    else:
        g = f"mlcc_round(acc[0]{s.bias_term('f')}, y)"
        u = f"mlcc_round(up_total{s.bias_term(f'{p.features} + f')}, y)"
        finish = f"""      const float up_total = __shfl_xor_sync(0xffffffffu, acc[0], 16);
      const int f = c * {c.rows} + mine;
      if ((lane & {mask | 16}) == 0 && f < {p.features}) {{
        const float g = {g}, u = {u};
        mlcc_put(y, f, {glu.format(g="g", u="u")});
      }}"""
    return f"""    {{
      int mine = 0;
{reduce}
{finish}
    }}"""


def _stage(s: LinearShape, c: StreamConfig) -> str:
    """x into xs as nibble pairs: word 4u + q of the row at xs[q * units + u]."""
    units = s.k // 32
    return f"""  for (int w = threadIdx.x; w < {s.k // 8}; w += {32 * c.warps}) {{
    const uint4 v = *reinterpret_cast<const uint4*>(x + w * 8);
    xs[(w & 3) * {units} + (w >> 2)] = mlcc_tcv_pairs(v);
  }}"""


def _stage_regs(s: LinearShape, p: Plan) -> str:
    """Each lane's activations of units lane + 32 m, m < units_per_lane, into registers."""
    return f"""  uint4 xr[{p.units_per_lane}][4];
  #pragma unroll
  for (int m = 0; m < {p.units_per_lane}; ++m) {{
    const int u = lane + m * 32;
    #pragma unroll
    for (int q = 0; q < 4; ++q)
      xr[m][q] = u < {p.units} ? mlcc_tcv_pairs(*reinterpret_cast<const uint4*>(
                                     x + (u * 4 + q) * 8)) : make_uint4(0u, 0u, 0u, 0u);
  }}"""


def _x_read(units: int, x_regs: bool) -> str:
    if x_regs:
        return ("        const uint4 x0 = xr[m][0], x1 = xr[m][1], x2 = xr[m][2], "
                "x3 = xr[m][3];")
    return f"""        const uint4 x0 = xs[u], x1 = xs[{units} + u], x2 = xs[{2 * units} + u];
        const uint4 x3 = xs[{3 * units} + u];"""


def gemv_q4_stream_kernel(s: LinearShape, name: str, config: StreamConfig,
                          glu: str | None = None, sms: int = SMS) -> CudaKernel:
    """The streamed GEMV of one q4 linear (module docstring); `glu` (an expression in g and u)
    turns on GLU mode; `sms` scales the grid (the host emulation runs few blocks)."""
    c = config
    p = plan(s, c, name, glu is not None, sms)
    rr, units = p.weight_rows, p.units
    buffers = s.buffers if glu is None else glu_buffers(s)
    guard = "" if units % 32 == 0 else f"if (u < {units}) "
    ring_words, ring_scales = c.stages * rr * s.k // 8, c.stages * rr * s.k // 32
    prologue = "\n".join(_issue(s, c, p, glu is not None, str(i), str(i))
                         for i in range(c.stages - 1))
    body = f"""{CP_HELPERS}{PORTABLE_HELPERS}
{signature(name, buffers, ("y",), s.symbols)} {{
{"" if c.x_regs else f"  __shared__ __align__(16) uint4 xs[{s.k // 8}];"}
  __shared__ __align__(16) unsigned int ws[{c.warps * ring_words}];
  __shared__ __align__(16) half ss[{c.warps * ring_scales}];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gw = blockIdx.x * {c.warps} + warp;
  const unsigned wring = mlcc_tc_smem(ws) + warp * {ring_words * 4}u;
  const unsigned sring = mlcc_tc_smem(ss) + warp * {ring_scales * 2}u;
  const uint4* wv = reinterpret_cast<const uint4*>(ws + warp * {ring_words});
  const half* sh = ss + warp * {ring_scales};
  const uint4* qv = reinterpret_cast<const uint4*>(qw);
  const uint4* sv = reinterpret_cast<const uint4*>(qs);
{prologue}
  {GRID_WAIT}
{_stage_regs(s, p) if c.x_regs else _stage(s, c) + chr(10) + "  __syncthreads();"}
  for (int i = 0; gw + i * {p.launch_warps} < {p.chunks}; ++i) {{
    const int c = gw + i * {p.launch_warps};
    mlcc_tc_cp_wait<{c.stages - 2}>();
    __syncwarp();  // chunk i landed for every lane; slot (i - 1) % stages was read by all
{_issue(s, c, p, glu is not None, f"i + {c.stages - 1}", f"(i + {c.stages - 1}) % {c.stages}")}
    const int slot = i % {c.stages};
    const uint4* wsl = wv + slot * {rr * units};
    const half* ssl = sh + slot * {rr * units};
    float acc[{rr}];
    #pragma unroll
    for (int r = 0; r < {rr}; ++r) acc[r] = 0.f;
    #pragma unroll
    for (int m = 0; m < {p.units_per_lane}; ++m) {{
      const int u = lane + m * 32;
      {guard}{{
{_x_read(units, c.x_regs)}
        #pragma unroll
        for (int r = 0; r < {rr}; ++r) {{
          const uint4 w = wsl[r * {units} + u];
          const float d = ({c.dot}(w.x, reinterpret_cast<const half2*>(&x0))
                           + {c.dot}(w.y, reinterpret_cast<const half2*>(&x1)))
                          + ({c.dot}(w.z, reinterpret_cast<const half2*>(&x2))
                             + {c.dot}(w.w, reinterpret_cast<const half2*>(&x3)));
          acc[r] = fmaf(d, __half2float(ssl[r * {units} + u]), acc[r]);
        }}
      }}
    }}
{_store(s, c, p, glu)}
  }}
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, buffers, (f"T.int64({p.grid})",), 32 * c.warps,
                                           s.symbols))
