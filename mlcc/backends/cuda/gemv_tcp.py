"""Persistent tensor-core q4 decode GEMV: y = x @ dequant(W).T (+ b) for 1..8 static rows.

The persistent CUDA-core GEMV (mlcc.backends.cuda.gemv) is bound by instruction issue: about 7
of the ~20 math instructions of its exact dot per packed word convert float16 sums to float32
and add them. This kernel keeps its structure (one wave of blocks_per_sm x SMS blocks, the
activation rows staged once per block, warps looping over feature tiles with the next loads in
flight, no barrier in the loop) and moves the products and sums onto mma.sync m16n8k16 (float16
inputs, float32 accumulation), as mlcc.backends.cuda.gemv_tc does:

    A tile is 16 output features; warp w of block b takes tiles b * warps + w, then + gridDim *
    warps, ... Within a tile it walks K in rounds of 128: lane (g, j) = (lane / 4, lane % 4)
    loads the quantization group 4r + j (four words, one 128-bit load) of features g and g + 8
    and their two scales. Each word becomes four half2 (c - 7) * s (MLCC_LOP3_OR: one lop3 per
    nibble pair, the 0x6400 exponent trick, the odd pairs scaled by 1/16 in place, then one
    float16 multiply by the group's scale, which rounds exactly as q_linear's float16
    dequantization), the A fragments of two mmas; the B fragments are one 128-bit shared load
    of the staged activations, already in nibble-pair order (gemv_tc.mlcc_tcv_pairs).
    Rows become B columns; columns past the rows read a staged row again and are never stored.

The loads run `depth` rounds ahead in a ring of register slots, unrolled so that every slot is
a static register set; the ring crosses tile boundaries, so a warp's next tile is already in
flight while it stores the current one. At a tile's end lane (g, j) holds columns 2j and 2j + 1
of features g and g + 8 (row 0 in lanes j == 0): bias and mlcc_put (float16, or float32 logits)
finish, with no shared-memory reduction. Rows that do not fit in 48 KB of static shared memory
at once are processed in chunks, each re-reading the weights (as the CUDA-core kernel does).

Selection: gemv_q4_tcp_rule applies only where the GEMV database's single-row record for the
shape has kind "tcp" (benchmarks/cuda/gemv_sweep.py, set `tcp`, measures and records it).

Measured on an H200 (benchmarks/results/2026-11-29-h200-b/gemv_sweep_tcp.json): correct (every
variant within 5e-4 of the float32 reference) but 1.4-3.9x slower than the CUDA-core GEMVs on
the 7B shapes (22016 x 4096: 22.9 us at best against 16.6; 4096 x 11008: 37.2 against 11.2):
a warp walks a 16-feature tile's whole K in 128-wide rounds with only `depth` rounds in flight,
so each tile costs K / 128 / depth memory round trips (ncu, benchmarks/results/2026-11-29-h200-d:
0.38 warps issued per scheduler and cycle, no eligible warp in 62% of cycles). The database
therefore holds no tcp record; splitting a tile's K over the warps of a block (more rounds in
flight per tile) is what it would need.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcc.backends.cuda.gemv import SMS
from mlcc.backends.cuda.gemv_tc import PORTABLE_HELPERS, PTX_HELPERS
from mlcc.backends.cuda.kernels import CudaKernel, launcher, signature
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError

MAX_ROWS = 8  # one 8-column B tile
SHARED_UNITS = 48 * 1024 // 16  # static shared memory of a block, in 16-byte units
SM_THREADS = 2048  # resident threads of an sm_90 multiprocessor

HELPERS = r"""
#ifndef MLCC_GEMV_TCP_HELPERS
#define MLCC_GEMV_TCP_HELPERS
// The four half2 (c_i - 7) * s, (c_{i+4} - 7) * s of word w, i = 0..3, with one lop3 per
// nibble pair. Each value is exact before the multiply, so its one rounding equals
// q_linear's float16 dequantization.
__device__ __forceinline__ void mlcc_tcp_dequant(unsigned w, half2 s, unsigned* d) {
  const half2 magic = __half2half2(__ushort_as_half((unsigned short)0x6407));      // 1031
  const half2 sixteenth = __half2half2(__ushort_as_half((unsigned short)0x2C00));  // 1/16
  const half2 magic_hi = __half2half2(__ushort_as_half((unsigned short)0xD470));   // -71
  const unsigned w8 = w >> 8;
  unsigned t0, t1, t2, t3;
  MLCC_LOP3_OR(t0, w, 0x000F000F);
  MLCC_LOP3_OR(t1, w, 0x00F000F0);
  MLCC_LOP3_OR(t2, w8, 0x000F000F);
  MLCC_LOP3_OR(t3, w8, 0x00F000F0);
  d[0] = mlcc_tcv_u32(__hmul2(__hsub2(mlcc_tcv_h2(t0), magic), s));
  d[1] = mlcc_tcv_u32(__hmul2(__hfma2(mlcc_tcv_h2(t1), sixteenth, magic_hi), s));
  d[2] = mlcc_tcv_u32(__hmul2(__hsub2(mlcc_tcv_h2(t2), magic), s));
  d[3] = mlcc_tcv_u32(__hmul2(__hfma2(mlcc_tcv_h2(t3), sixteenth, magic_hi), s));
}
#endif
"""


@dataclass(frozen=True)
class TcpConfig:
    """`blocks_per_sm` x SMS blocks of `warps` warps, each warp keeping `depth` rounds (128 k:
    two 128-bit weight loads and two scales a lane) of loads in flight."""

    blocks_per_sm: int = 3
    warps: int = 4
    depth: int = 2

    @property
    def tag(self) -> str:
        return f"tcp_b{self.blocks_per_sm}_w{self.warps}_d{self.depth}"


@dataclass(frozen=True)
class Plan:
    """Derived sizes: tiles of 16 features, rounds of 128 k, the grid, the staged row pitch
    (16-byte units) and the (first row, rows) of each staging pass."""

    tiles: int
    rounds: int
    grid: int
    stride: int  # warps of the launch: a warp's next tile
    row_units: int
    chunks: tuple[tuple[int, int], ...]


def applies(s: LinearShape) -> bool:
    """The layout and dtypes this kernel reads: q4f16_1 weights, K % 128, 1..8 static rows."""
    return (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.ydt in ("float16", "float32") and s.k % 128 == 0
            and s.words * 8 == s.k and s.groups * 32 == s.k and s.n * s.groups < 2**31
            and s.static_rows is not None and 1 <= s.static_rows <= MAX_ROWS)


def row_units(k: int) -> int:
    """Staged pitch of one row: groups of four words padded to five units (the four lanes j
    of a load phase hit distinct bank quads), rows offset by 4 units mod 8 (the two rows g,
    g + 1 of a phase as well)."""
    base = k // 32 * 5
    return base + (4 if base % 8 == 0 else 0)


def plan(s: LinearShape, c: TcpConfig, name: str, sms: int = SMS) -> Plan:
    """The launch of s with config c; MlccError naming the limit when it cannot run."""
    if not applies(s):
        raise MlccError("compile", f"{name}: the persistent tensor-core GEMV needs q4f16_1 "
                        f"weights, K % 128 == 0 and 1..{MAX_ROWS} static rows; got N={s.n}, "
                        f"K={s.k}, rows {s.rows_text}; use another linear rule")
    if c.warps not in (1, 2, 4, 8) or not 1 <= c.depth <= 4 or c.blocks_per_sm < 1:
        raise MlccError("compile", f"{name}: {c.tag}: warps must be 1, 2, 4 or 8, depth 1..4 "
                        f"and blocks_per_sm >= 1; pick a config within those")
    if c.blocks_per_sm * c.warps * 32 > SM_THREADS:
        raise MlccError("compile", f"{name}: {c.tag}: {c.blocks_per_sm * c.warps * 32} threads "
                        f"per SM, over the {SM_THREADS} an SM holds; use blocks_per_sm * warps "
                        f"<= {SM_THREADS // 32}")
    pitch = row_units(s.k)
    if pitch > SHARED_UNITS:
        raise MlccError("compile", f"{name}: one staged row of K={s.k} takes {pitch * 16} "
                        f"bytes, over the {SHARED_UNITS * 16} of static shared memory; use "
                        f"K <= {(SHARED_UNITS - 4) // 20 * 128}")
    rows = s.static_rows
    per_pass = min(rows, SHARED_UNITS // pitch)
    chunks = tuple((r0, min(per_pass, rows - r0)) for r0 in range(0, rows, per_pass))
    tiles = -(-s.n // 16)
    grid = max(1, min(c.blocks_per_sm * sms, -(-tiles // c.warps)))
    return Plan(tiles, s.k // 128, grid, grid * c.warps, pitch, chunks)


def _load(s: LinearShape, p: Plan, slot: int) -> str:
    """Issue round `lr` of tile `lt` into register slot `slot`, then advance (lt, lr)."""
    last = s.n - 1
    return f"""      if (lt < {p.tiles}) {{
        const int fa = lt * 16 + g, fb = fa + 8, grp = lr * 4 + j;
        const int ra = (fa < {last} ? fa : {last}) * {s.groups} + grp;
        const int rb = (fb < {last} ? fb : {last}) * {s.groups} + grp;
        w{slot}[0] = __ldg(qv + ra);
        w{slot}[1] = __ldg(qv + rb);
        s{slot}[0] = qs[ra];
        s{slot}[1] = qs[rb];
      }}
      if (++lr == {p.rounds}) {{ lr = 0; lt += {p.stride}; }}"""


def _compute(slot: int, pitch: int) -> str:
    """The eight mmas of the round in `slot`: per word, features g and g + 8 dequantized into
    the A fragments of two mmas and the staged pairs of column row `gb` as their B."""
    return f"""      {{
        const half2 sa = __half2half2(s{slot}[0]), sb = __half2half2(s{slot}[1]);
        const uint4* xr = xs + gb * {pitch} + (tile_r * 4 + j) * 5;
        #pragma unroll
        for (int i = 0; i < 4; ++i) {{
          unsigned lo[4], hi[4];
          const uint4 wa = w{slot}[0], wb = w{slot}[1];
          mlcc_tcp_dequant(i == 0 ? wa.x : i == 1 ? wa.y : i == 2 ? wa.z : wa.w, sa, lo);
          mlcc_tcp_dequant(i == 0 ? wb.x : i == 1 ? wb.y : i == 2 ? wb.z : wb.w, sb, hi);
          const uint4 b = xr[i];
          mlcc_tcv_mma(acc, lo[0], hi[0], lo[1], hi[1], b.x, b.y);
          mlcc_tcv_mma(acc, lo[2], hi[2], lo[3], hi[3], b.z, b.w);
        }}
      }}"""


def _store(s: LinearShape, r0: int, count: int) -> str:
    """Lane (g, j): columns 2j, 2j + 1 of features g and g + 8, rows r0 + column < count."""
    cols = "j == 0" if count == 1 else f"2 * j < {count}"
    return f"""        if ({cols}) {{
          #pragma unroll
          for (int e = 0; e < 4; ++e) {{
            const int col = 2 * j + (e & 1);
            const long long n = (long long)tile * 16 + g + (e >> 1) * 8;
            if (col < {count} && n < {s.n})
              mlcc_put(y, ({r0} + col) * {s.n}LL + n, acc[e]{s.bias_term("n")});
          }}
        }}"""


def _stage(s: LinearShape, c: TcpConfig, p: Plan, r0: int, count: int) -> str:
    """Rows r0 .. r0 + count - 1 of x into xs, each word's halves as pairs (h_i, h_{i+4})."""
    words = s.k // 8
    return f"""    for (int e = threadIdx.x; e < {count * words}; e += {32 * c.warps}) {{
      const int t = e / {words}, wl = e % {words};
      const uint4 v = *reinterpret_cast<const uint4*>(x + ({r0} + t) * {s.k}LL + wl * 8);
      xs[t * {p.row_units} + (wl >> 2) * 5 + (wl & 3)] = mlcc_tcv_pairs(v);
    }}"""


def _pass(s: LinearShape, c: TcpConfig, p: Plan, r0: int, count: int) -> str:
    """One staging pass: the first `depth` rounds' loads, the staging, then the tile loop."""
    loads = "\n".join(_load(s, p, d) for d in range(c.depth))
    steps = []
    for d in range(c.depth):
        steps.append(f"""      if (tile >= {p.tiles}) break;
{_compute(d, p.row_units)}
{_load(s, p, d)}
      if (++tile_r == {p.rounds}) {{
{_store(s, r0, count)}
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        tile_r = 0;
        tile += {p.stride};
      }}""")
    body = "\n".join(steps)
    return f"""  {{
    int lt = blockIdx.x * {c.warps} + warp, lr = 0;  // the next round to load
{loads}
    __syncthreads();  // the previous pass has finished reading xs
{_stage(s, c, p, r0, count)}
    __syncthreads();
    const int gb = g < {count} ? g : {count - 1};  // B column g reads staged row gb
    int tile = blockIdx.x * {c.warps} + warp, tile_r = 0;
    float acc[4] = {{0.f, 0.f, 0.f, 0.f}};
    while (tile < {p.tiles}) {{  // unrolled by depth: slot d holds rounds d, d + depth, ...
{body}
    }}
  }}"""


def gemv_q4_tcp_kernel(s: LinearShape, name: str, config: TcpConfig,
                       sms: int = SMS) -> CudaKernel:
    """The persistent tensor-core GEMV of one q4 linear (see the module docstring); `sms`
    scales the grid (the host emulation runs few blocks)."""
    c, p = config, plan(s, config, name, sms)
    regs = "\n".join(f"  uint4 w{d}[2];\n  half s{d}[2];" for d in range(c.depth))
    passes = "\n".join(_pass(s, c, p, r0, count) for r0, count in p.chunks)
    body = f"""{PTX_HELPERS}{PORTABLE_HELPERS}{HELPERS}
{signature(name, s.buffers, ("y",), s.symbols)} {{
  __shared__ __align__(16) uint4 xs[{p.chunks[0][1] * p.row_units}];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, j = lane & 3;  // the mma fragments' row and k pair
  const uint4* qv = reinterpret_cast<const uint4*>(qw);
{regs}
{passes}
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, s.buffers, (f"T.int64({p.grid})",),
                                           32 * c.warps, s.symbols))


def tcp_config_of(s: LinearShape) -> TcpConfig:
    """The database's tcp record for s's shape, else the default config."""
    from mlcc.backends.cuda.tuning import tcp_config

    record = tcp_config(s.n, s.k)
    return TcpConfig() if record is None else TcpConfig(*record)


def gemv_q4_tcp_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    """This kernel where the database's single-row winner for the shape has kind "tcp" (at
    any of 1..8 static rows: the row count only widens the B tile), None elsewhere."""
    from mlcc.backends.cuda.tuning import TCP, selected_kind

    s = LinearShape(spec)
    if not applies(s) or selected_kind(s.n, s.k) != TCP:
        return None
    return gemv_q4_tcp_kernel(s, name, tcp_config_of(s))
