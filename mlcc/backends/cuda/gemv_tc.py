"""Tensor-core int4 GEMV for 1..16 rows (decode and batch decode): y = x @ dequant(W).T (+ b).

The CUDA-core GEMV spends about 20 instructions per packed weight word on unpacking, half2
products, pair sums and conversions. Here the products and sums run on mma.sync m16n8k16
(float16 inputs, float32 accumulation) with the weights as the A operand (16 output features
per mma) and the activations as B (8 rows per mma), so a lane only unpacks:

    lane (g, j) = (lane / 4, lane % 4) loads, with one 128-bit load, the whole quantization
    group 4 * step + j (four words, 32 k) of features g and g + 8 of its tile. A word's nibble
    pairs (i, i + 4) become half2 (c - 7) * scale: the 0x6400 exponent trick, the odd pairs
    masked in place and scaled by 1/16, then one multiply by the group's scale, which rounds
    exactly as q_linear's dequantization does. Word i feeds two mmas: pairs 0, 1 as the slots
    (q, q + 1), (q + 8, q + 9) of the first, pairs 2, 3 of the second.

The dot product does not depend on the order of k as long as A and B use the same one; the
activations are staged in shared memory already in that order (pairs (x_i, x_{i+4}) of every
word: one 128-bit shared load gives a lane the B fragments of both mmas of a word), in chunks
of rounds (the whole K at one row). B columns of rows >= M read a staged row again: an mma's
output columns are independent and those are never stored. By design a packed word costs a
lane about 15 instructions (5 integer, 8 half2, half a shared load, one mma per feature pair
and word) against about 22 in mlcc_q4_dot8's loop, and the float32 sums cost nothing; on an
H200, ncu counted 29-31 issued per word at one row (benchmarks/results/2026-11-29-h200-d:
nvcc splits each `(w & m) | c` in two, and the per-block staging and reduction add the rest),
no fewer than the CUDA-core GEMVs.

A block owns 16 * tiles output features and all rows of its 16-row tile (grid y for the batch
symbol, so any batch is covered); its warps split K: in round r warp w takes the steps (128 k)
r * warps * unroll + u * warps + w, u < unroll, and the weights of round r + 1 are loaded into
registers before round r's mmas, so they stay in flight over the staging and the math. The
warps' float32 partial sums meet in shared memory at the end; bias and mlcc_put (float16 or
float32 results) finish, rows >= M masked. Configs: TcConfig; selection: gemv_q4_tc_rule reads
the GEMV database (benchmarks/cuda/gemv_sweep.py writes it).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcc.backends.cuda.kernels import CudaKernel, launcher, signature
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.ir.types import Sym

MAX_ROWS = 16
BATCH_SYMBOL = "batch"
TC = "tc"  # the kind of this kernel's records in gemv_tuning.json

# PTX: compiled by nvcc; the host emulation of the tests provides its own definition.
PTX_HELPERS = r"""
#ifndef MLCC_GEMV_TC_PTX
#define MLCC_GEMV_TC_PTX
__device__ __forceinline__ void mlcc_tcv_mma(float* c, unsigned a0, unsigned a1, unsigned a2,
                                             unsigned a3, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif
"""

# Portable: the host emulation compiles these as generated.
PORTABLE_HELPERS = r"""
#ifndef MLCC_GEMV_TC_PORTABLE
#define MLCC_GEMV_TC_PORTABLE
__device__ __forceinline__ unsigned mlcc_tcv_u32(half2 h) {
  return *reinterpret_cast<unsigned*>(&h);
}
__device__ __forceinline__ half2 mlcc_tcv_h2(unsigned u) { return *reinterpret_cast<half2*>(&u); }
// The four half2 (c_i - 7) * s, (c_{i+4} - 7) * s of word w, i = 0..3. Each value is exact
// before the multiply, so the one rounding equals q_linear's float16 dequantization.
__device__ __forceinline__ void mlcc_tcv_dequant(unsigned w, half2 s, unsigned* d) {
  const half2 magic = __half2half2(__ushort_as_half((unsigned short)0x6407));      // 1031
  const half2 sixteenth = __half2half2(__ushort_as_half((unsigned short)0x2C00));  // 1/16
  const half2 magic_hi = __half2half2(__ushort_as_half((unsigned short)0xD470));   // -71
  const unsigned w8 = w >> 8;
  const unsigned t0 = (w & 0x000F000Fu) | 0x64006400u, t1 = (w & 0x00F000F0u) | 0x64006400u;
  const unsigned t2 = (w8 & 0x000F000Fu) | 0x64006400u, t3 = (w8 & 0x00F000F0u) | 0x64006400u;
  d[0] = mlcc_tcv_u32(__hmul2(__hsub2(mlcc_tcv_h2(t0), magic), s));
  d[1] = mlcc_tcv_u32(__hmul2(__hfma2(mlcc_tcv_h2(t1), sixteenth, magic_hi), s));
  d[2] = mlcc_tcv_u32(__hmul2(__hsub2(mlcc_tcv_h2(t2), magic), s));
  d[3] = mlcc_tcv_u32(__hmul2(__hfma2(mlcc_tcv_h2(t3), sixteenth, magic_hi), s));
}
// Eight consecutive halves (h0..h7) -> the pairs (h0, h4), (h1, h5), (h2, h6), (h3, h7).
__device__ __forceinline__ uint4 mlcc_tcv_pairs(uint4 v) {
  uint4 out;
  out.x = __byte_perm(v.x, v.z, 0x5410);
  out.y = __byte_perm(v.x, v.z, 0x7632);
  out.z = __byte_perm(v.y, v.w, 0x5410);
  out.w = __byte_perm(v.y, v.w, 0x7632);
  return out;
}
#endif
"""


@dataclass(frozen=True)
class TcConfig:
    """`warps` per block splitting K (even, so the staged rows keep their bank offsets),
    `tiles` 16-feature tiles per block, `unroll` steps (128 k) per warp and round: the weight
    loads one round ahead are 1 KB per warp per tile and step."""

    warps: int = 8
    tiles: int = 1
    unroll: int = 1

    def __post_init__(self) -> None:
        if self.warps not in (2, 4, 8) or self.tiles not in (1, 2, 4) or self.unroll not in (
                1, 2, 4):
            raise ValueError(f"TcConfig: warps in (2, 4, 8), tiles and unroll in (1, 2, 4), "
                             f"got {self}")

    @property
    def tag(self) -> str:
        return f"tc_w{self.warps}_t{self.tiles}_u{self.unroll}"


def applies(s: LinearShape) -> bool:
    rows_ok = (s.static_rows is not None and 1 <= s.static_rows <= MAX_ROWS) or (
        isinstance(s.rows, Sym) and s.rows.name == BATCH_SYMBOL)
    return (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.ydt in ("float16", "float32") and s.k % 32 == 0
            and s.words * 8 == s.k and s.groups * 32 == s.k and s.n * s.words < 2**31
            and rows_ok)


def _database() -> dict:
    from mlcc.backends.cuda.tuning import _database as load

    return load()


def measured(n: int, k: int, rows: int | str) -> dict | None:
    """The fastest measured record for N x K at `rows` rows (a count or "batch", the batch
    symbol's kernels), any kind: the database's "best" at one row, else its "best_at_rows"
    (written by benchmarks/cuda/gemv_sweep.py)."""
    db = _database()
    table = db.get("best", {}) if rows == 1 else db.get("best_at_rows", {}).get(str(rows), {})
    return table.get(f"{n},{k}")


def tc_config(s: LinearShape) -> TcConfig:
    """The measured config of this kernel for s's shape and rows, else the heuristic: two steps
    per warp and round (2 KB of weight loads in flight per warp) up to 8 rows, one above (a
    round of 16 rows fills the shared memory at eight warps), and four warps at a static 9..16
    rows (ptxas spills eight at 64 registers there)."""
    rows = BATCH_SYMBOL if s.static_rows is None else s.static_rows
    record = measured(s.n, s.k, rows)
    if (record is None or record.get("kind") != TC) and rows == 1:
        record = _database().get("best_by_kind", {}).get(TC, {}).get(f"{s.n},{s.k}")
    if record is not None and record.get("kind") == TC:
        config = TcConfig(int(record["warps"]), int(record["tiles"]), int(record["unroll"]))
        if fits(s, config):
            return config
    if s.static_rows is not None and s.static_rows <= 8:
        return TcConfig(8, 1, 2)
    return TcConfig(8 if s.static_rows is None else 4, 1, 1)


def gemv_q4_tc_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    """The tensor-core GEMV where it should run, None elsewhere: at 1..4 static rows only where
    the database measured it fastest (the CUDA-core GEMVs keep the rest); at 5..16 rows and the
    batch symbol (compared at 16) unless a measured record of another kind won there (the
    alternative is a 64-row GEMM tile)."""
    s = LinearShape(spec)
    if not applies(s):
        return None
    rows = MAX_ROWS if s.static_rows is None else s.static_rows
    record = measured(s.n, s.k, rows)
    if rows <= 4 and (record is None or record.get("kind") != TC):
        return None
    if rows > 4 and record is not None and record.get("kind") != TC:
        return None
    return gemv_q4_tc_kernel(s, name, tc_config(s))


SMEM_UNITS = 44 * 1024 // 16  # staged activations, in 16-byte units (static shared <= 48 KB)


@dataclass(frozen=True)
class Layout:
    """Sizes derived from a shape and a config: rows staged per block (`tok_rows`), 8-row
    mma column tiles (`nt`), rounds of warps * unroll steps, rounds staged per chunk."""

    tok_rows: int
    nt: int
    steps: int
    rounds: int
    chunk: int
    words: int  # staged words (8 k) per row and round

    @property
    def row_units(self) -> int:
        # groups of four words padded to five units, rows to 20 * warps * unroll * chunk + 4:
        # the eight lanes of a 128-bit load phase (two rows, four groups) hit distinct bank
        # quads because warps is even.
        return self.words * self.chunk * 5 // 4 + 4


def layout(s: LinearShape, c: TcConfig) -> Layout:
    """The staging plan of s with config c: as many rounds per chunk as fit 44 KB of shared
    memory; MlccError when a single round does not."""
    tok_rows = MAX_ROWS if s.static_rows is None else s.static_rows
    nt = 1 if tok_rows <= 8 else 2
    steps = -(-s.groups // 4)
    rounds = -(-steps // (c.warps * c.unroll))
    words = 16 * c.warps * c.unroll
    chunk = max(1, min(rounds, (SMEM_UNITS // tok_rows - 4) // (words * 5 // 4)))
    lay = Layout(tok_rows, nt, steps, rounds, chunk, words)
    if tok_rows * lay.row_units > SMEM_UNITS:
        raise MlccError("compile", f"tensor-core GEMV {s.n}x{s.k} at {tok_rows} rows: one "
                        f"round of {c.tag} stages {tok_rows * lay.row_units * 16} bytes, over "
                        f"{SMEM_UNITS * 16}; use warps * unroll <= "
                        f"{(SMEM_UNITS // tok_rows - 4) * 4 // 5 // 16}")
    return lay


def fits(s: LinearShape, config: TcConfig) -> bool:
    """Whether one round of `config` fits the static shared memory at s's row count."""
    try:
        layout(s, config)
    except MlccError:
        return False
    return True


def _unit(tok: str, wl: str, lay: Layout) -> str:
    """Shared index (in 16-byte units) of staged word `wl` (chunk-local) of row `tok`."""
    return f"(({tok}) * {lay.row_units} + (({wl}) >> 2) * 5 + (({wl}) & 3))"


def _loads(s: LinearShape, c: TcConfig, lay: Layout, dst: str, rnd: str) -> str:
    """Issue the weight and scale loads of round `rnd` into `dst`w / `dst`s."""
    return f"""    #pragma unroll
    for (int u = 0; u < {c.unroll}; ++u) {{
      const int step = ({rnd}) * {c.warps * c.unroll} + u * {c.warps} + warp;
      const int grp = step * 4 + j;
      const bool ok = step < {lay.steps} && grp < {s.groups};
      #pragma unroll
      for (int f = 0; f < {c.tiles}; ++f)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {{
          {dst}w[u][f][h] = ok ? __ldg(reinterpret_cast<const uint4*>(qw) + wrow[f][h] + grp)
                            : make_uint4(0u, 0u, 0u, 0u);
          {dst}s[u][f][h] = __half2half2(ok ? qs[wrow[f][h] + grp]
                                            : __ushort_as_half((unsigned short)0));
        }}
    }}"""


def _stage(s: LinearShape, c: TcConfig, lay: Layout) -> str:
    """Stage rounds c0 .. c0 + chunk - 1 of the tile's rows, permuted into pair order."""
    span = lay.words * lay.chunk
    return f"""    for (int e = threadIdx.x; e < here * {span}; e += {32 * c.warps}) {{
      const int tok = e / {span}, wl = e % {span};
      const long long word = (long long)c0 * {lay.words} + wl;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (word < {s.k // 8})
        v = mlcc_tcv_pairs(*reinterpret_cast<const uint4*>(x + (m0 + tok) * {s.k}LL + word * 8));
      xs[{_unit("tok", "wl", lay)}] = v;
    }}"""


def _compute(c: TcConfig, lay: Layout) -> str:
    """The mmas of round r on the registers cw / cs. B columns of rows >= here read a staged
    row again: an mma's output columns are independent, and those are never stored."""
    second = ("" if lay.nt == 1 else
              f"""
            if (here > 8) {{
              const uint4 b = xs[{_unit("gb8", "wl", lay)}];
              mlcc_tcv_mma(acc[f][1], lo[0], hi[0], lo[1], hi[1], b.x, b.y);
              mlcc_tcv_mma(acc[f][1], lo[2], hi[2], lo[3], hi[3], b.z, b.w);
            }}""")
    return f"""      #pragma unroll
      for (int u = 0; u < {c.unroll}; ++u) {{
        if (r * {c.warps * c.unroll} + u * {c.warps} + warp >= {lay.steps}) break;
        #pragma unroll
        for (int f = 0; f < {c.tiles}; ++f)
          #pragma unroll
          for (int i = 0; i < 4; ++i) {{
            const uint4 wv = cw[u][f][0], wv8 = cw[u][f][1];
            unsigned lo[4], hi[4];
            mlcc_tcv_dequant(i == 0 ? wv.x : i == 1 ? wv.y : i == 2 ? wv.z : wv.w, cs[u][f][0],
                             lo);
            mlcc_tcv_dequant(i == 0 ? wv8.x : i == 1 ? wv8.y : i == 2 ? wv8.z : wv8.w,
                             cs[u][f][1], hi);
            const int wl = (r - c0) * {lay.words} + ((u * {c.warps} + warp) * 4 + j) * 4 + i;
            const uint4 b = xs[{_unit("gb", "wl", lay)}];
            mlcc_tcv_mma(acc[f][0], lo[0], hi[0], lo[1], hi[1], b.x, b.y);
            mlcc_tcv_mma(acc[f][0], lo[2], hi[2], lo[3], hi[3], b.z, b.w);{second}
          }}
      }}"""


def _epilogue(s: LinearShape, c: TcConfig, lay: Layout) -> str:
    """Sum the warps' partial tiles in shared memory, add the bias, store rows < here."""
    cols = lay.nt * 8
    per_warp = c.tiles * 16 * cols
    return f"""  __syncthreads();
  float* red = reinterpret_cast<float*>(xs);
  #pragma unroll
  for (int f = 0; f < {c.tiles}; ++f)
    #pragma unroll
    for (int t = 0; t < {lay.nt}; ++t)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {{
        const int feat = f * 16 + g + (i >> 1) * 8, tok = t * 8 + 2 * j + (i & 1);
        red[warp * {per_warp} + feat * {cols} + tok] = acc[f][t][i];
      }}
  __syncthreads();
  for (int e = threadIdx.x; e < {per_warp}; e += {32 * c.warps}) {{
    float sum = 0.f;
    #pragma unroll
    for (int w = 0; w < {c.warps}; ++w) sum += red[w * {per_warp} + e];
    const long long n = n0 + e / {cols};
    const int tok = e % {cols};
    if (n < {s.n} && tok < here) mlcc_put(y, (m0 + tok) * {s.n}LL + n, sum{s.bias_term("n")});
  }}"""


def _prologue(s: LinearShape, c: TcConfig, lay: Layout) -> str:
    """Block coordinates, the lane's weight/scale rows (features past N read the last one,
    their results are never stored) and the zeroed accumulators."""
    symbolic = s.static_rows is None
    here = (f"{s.rows_text} - m0 < {MAX_ROWS} ? (int)({s.rows_text} - m0) : {MAX_ROWS}"
            if symbolic else str(s.static_rows))
    return f"""  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, j = lane & 3;  // the mma fragments' row and k pair
  const long long n0 = (long long)blockIdx.x * {16 * c.tiles};
  const long long m0 = {"(long long)blockIdx.y * " + str(MAX_ROWS) if symbolic else "0"};
  const int here = {here};  // rows of this block's tile
  const int gb = g < here ? g : here - 1, gb8 = 8 + g < here ? 8 + g : here - 1;
  // n * groups: the row's offset in 16-byte weight units and in scales alike (K / 32 each);
  // 32-bit offsets take fewer registers than pointers
  int wrow[{c.tiles}][2];
  #pragma unroll
  for (int f = 0; f < {c.tiles}; ++f)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {{
      long long n = n0 + f * 16 + h * 8 + g;
      n = n < {s.n} ? n : {s.n - 1};
      wrow[f][h] = (int)n * {s.groups};
    }}
  float acc[{c.tiles}][{lay.nt}][4];
  #pragma unroll
  for (int f = 0; f < {c.tiles}; ++f)
    #pragma unroll
    for (int t = 0; t < {lay.nt}; ++t)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[f][t][i] = 0.f;"""


def gemv_q4_tc_kernel(s: LinearShape, name: str, config: TcConfig) -> CudaKernel:
    """The tensor-core GEMV of one q4 linear with `config`'s block shape."""
    c, lay = config, layout(s, config)
    xs_units = lay.tok_rows * lay.row_units
    red_units = -(-c.warps * c.tiles * 16 * lay.nt * 8 * 4 // 16)
    buf = f"[{c.unroll}][{c.tiles}][2]"
    body = f"""{PTX_HELPERS}{PORTABLE_HELPERS}
{signature(name, s.buffers, ("y",), s.symbols)} {{
  __shared__ __align__(16) uint4 xs[{max(xs_units, red_units)}];
{_prologue(s, c, lay)}
  uint4 cw{buf};
  half2 cs{buf};
{_loads(s, c, lay, "c", "0")}
  for (int c0 = 0; c0 < {lay.rounds}; c0 += {lay.chunk}) {{
    __syncthreads();
{_stage(s, c, lay)}
    __syncthreads();
    const int c1 = c0 + {lay.chunk} < {lay.rounds} ? c0 + {lay.chunk} : {lay.rounds};
    for (int r = c0; r < c1; ++r) {{
      uint4 nw{buf};
      half2 ns{buf};
{_loads(s, c, lay, "n", "r + 1")}
{_compute(c, lay)}
      #pragma unroll
      for (int u = 0; u < {c.unroll}; ++u)
        #pragma unroll
        for (int f = 0; f < {c.tiles}; ++f)
          #pragma unroll
          for (int h = 0; h < 2; ++h) {{
            cw[u][f][h] = nw[u][f][h];
            cs[u][f][h] = ns[u][f][h];
          }}
    }}
  }}
{_epilogue(s, c, lay)}
  return 0;
}}
"""
    grid = [f"T.int64({-(-s.n // (16 * c.tiles))})"]
    if s.static_rows is None:
        grid.append(f"({s.rows_text} + T.int64({MAX_ROWS - 1})) // T.int64({MAX_ROWS})")
    return CudaKernel(name, body, launcher(name, s.buffers, tuple(grid), 32 * c.warps,
                                           s.symbols))
