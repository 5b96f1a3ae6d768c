"""Tensor-core q4 decode GEMVs that apply the group scales after the mma (one row).

The decode GEMVs are bound by instruction issue rather than by HBM (benchmarks/results/
2026-11-29-h200-d and -e). The tensor-core GEMVs of gemv_tc / gemv_tcp multiply every nibble
pair by its group's scale in float16 before the mma; here the mma sums exact products
(c - 7) * x in float32 and the scale multiplies that sum once, which needs the mma's sums never
to mix two groups of a row. Two layouts do that (TcgConfig.cols):

    rows  lane (g, j) = (lane / 4, lane % 4) loads word j of a group of features g and g + 8
          (32-bit loads); the four lanes j of a row hold the group's four words, which are the
          A fragments (k slots 2j, 2j + 1, 2j + 8, 2j + 9 of lane j) of two mmas: nibble pairs
          (i, i + 4), i = 0, 1 in the first, 2, 3 in the second. The pair's float32 result
          times the group's scale is the group's share of the row: one FMA.
    cols  lane (g, j) loads a whole group of features g and g + 8 (one 128-bit load each),
          group 4 it + j; B is zero except in column j of lane j's own k slots, so C column n
          collects group 4 it + n of every row over the iteration's 8 mmas, and lanes j < 2
          scale columns 2j, 2j + 1 in float32.

The dot product does not depend on the order of k as long as B uses the same: the activations
are staged in shared memory as the pairs (x_i, x_{i+4}) of each word (gemv_tc.mlcc_tcv_pairs).
With `fold` the 0x6400 exponent trick's offset is left in the fragments (only the lop3s remain:
5 instructions a word instead of 9) and removed after the mma: the staged odd pairs are
divided by 16 (odd nibbles sit 4 bits up) and each group subtracts 1031 * (its even-pair
activations) + 1136 * (its odd ones as staged); the mma then sums values near 1024 |x|, so its
float32 rounding weighs about 2^10 more than in the exact form.

One-shot form (gemv_q4_tcg_kernel): block b owns the 16-feature tile b; its warps split K in
iterations (8 groups for rows, 4 for cols) taken warp, warp + warps, ..., `depth` iterations
of loads in flight per warp (a ring of register sets), each warp staging its own activations;
the warps' sums meet in shared memory. Persistent form (gemv_q4_tcgp_kernel, cols layout):
blocks_per_sm x SMS blocks stage the activation row once and each warp walks whole tiles with
its ring crossing tile ends. Weights and scales of the first iterations are requested before
the kernel waits for the one ahead of it (programmatic dependent launch).

Measured on an H200 (benchmarks/results/2026-11-29-h200-e, sweep sets `tcg` and `tcgp` of
benchmarks/cuda/gemv_sweep.py), against the shipped GEMVs in the same call: cols within the
run-to-run spread on every 7B shape (down 11.15 against 11.43 us, gate_up 17.74 against 17.00),
rows 8-35% slower (its 32-bit loads leave 40% of the L2 sectors excess), the folded forms
slower than the exact ones, tcgp 1.5-3.7x slower (one warp a tile: 256 to 2,000 warps for the
whole GPU). No database record selects them; gemv_q4_tcg_rule takes a shape only where a
sweep's single-row winner has kind "tcg". The exact forms' sums are 4,000x closer to a float64
reference than the CUDA-core GEMV's float16 pair sums (tests/compile/
test_cuda_gemv_tcg_emulated.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcc.backends.cuda.gemv_tc import PORTABLE_HELPERS, PTX_HELPERS
from mlcc.backends.cuda.kernels import GRID_WAIT, CudaKernel, launcher, signature
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError

TCG = "tcg"  # the kind of this kernel's records in gemv_tuning.json
GROUPS = 8  # groups of one iteration: one 128-bit load of a row's scales
ITER_K = GROUPS * 32

HELPERS = r"""
#ifndef MLCC_GEMV_TCG_HELPERS
#define MLCC_GEMV_TCG_HELPERS
// The nibble pairs (c_i, c_{i+4}) of w, i = 0..3, as half2 of c - 7 exactly
// (mlcc_q4_pairs_lop3), as the 32-bit A fragments of the mmas.
__device__ __forceinline__ void mlcc_tcg_exact(unsigned w, unsigned* d) {
  half2 h[4];
  mlcc_q4_pairs_lop3(w, h);
#pragma unroll
  for (int i = 0; i < 4; ++i) d[i] = mlcc_tcv_u32(h[i]);
}
// The same pairs with the 0x6400 exponent left in: (1024 + c_i, 1024 + c_{i+4}) for the even
// pairs, (1024 + 16 c_i, 1024 + 16 c_{i+4}) for the odd ones (one lop3 each).
__device__ __forceinline__ void mlcc_tcg_folded(unsigned w, unsigned* d) {
  const unsigned w8 = w >> 8;
  MLCC_LOP3_OR(d[0], w, 0x000F000F);
  MLCC_LOP3_OR(d[1], w, 0x00F000F0);
  MLCC_LOP3_OR(d[2], w8, 0x000F000F);
  MLCC_LOP3_OR(d[3], w8, 0x00F000F0);
}
#endif
"""


@dataclass(frozen=True)
class TcgConfig:
    """`warps` per block (one 16-feature tile), `depth` iterations of loads in flight per warp,
    `fold`: the offset removed after the mma instead of before it, `cols`: the layout with the
    groups as C columns (else rows; see the module docstring)."""

    warps: int = 8
    depth: int = 1
    fold: bool = False
    cols: bool = False

    def __post_init__(self) -> None:
        if self.warps not in (1, 2, 4, 8, 16) or self.depth not in (1, 2, 3):
            raise MlccError("compile", f"tcg GEMV: warps must be 1, 2, 4, 8 or 16 and depth "
                            f"1..3; got {self.warps} warps, depth {self.depth}")

    @property
    def tag(self) -> str:
        return (f"tcg_w{self.warps}_d{self.depth}{'_fold' if self.fold else ''}"
                f"{'_cols' if self.cols else ''}")

    @property
    def iter_k(self) -> int:
        """k of one iteration: 8 groups (rows), 4 groups (cols)."""
        return 128 if self.cols else 256


def applies(s: LinearShape, iter_k: int = ITER_K) -> bool:
    """q4f16_1 weights, one static row, K a multiple of `iter_k` (whole iterations)."""
    return (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.ydt in ("float16", "float32") and s.k % iter_k == 0
            and s.words * 8 == s.k and s.groups * 32 == s.k and s.n * s.words < 2**31
            and s.static_rows == 1)


def _load(s: LinearShape, c: TcgConfig, slot: int) -> str:
    """Rows layout: iteration `lt`'s weights and scales into register set `slot`, then
    lt += warps."""
    return f"""    if (lt < {s.k // ITER_K}) {{
#pragma unroll
      for (int u = 0; u < {GROUPS}; ++u) {{
        wa{slot}[u] = __ldg(qa + (lt * {GROUPS} + u) * 4);
        wb{slot}[u] = __ldg(qb + (lt * {GROUPS} + u) * 4);
      }}
      sa{slot} = __ldg(sra + lt);
      sb{slot} = __ldg(srb + lt);
    }}
    lt += {c.warps};"""


def _stage(c: TcgConfig) -> str:
    """Rows layout: iteration `it`'s 256 activations into the warp's shared slice, in pair order; with
    fold, the odd pairs divided by 16 and each group's offset sum in xc."""
    if not c.fold:
        return """    __syncwarp();
    xw[lane] = mlcc_tcv_pairs(__ldg(xv + it * 32 + lane));
    __syncwarp();"""
    return """    __syncwarp();
    {
      const uint4 p = mlcc_tcv_pairs(__ldg(xv + it * 32 + lane));
      const half2 sixteenth = __half2half2(__ushort_as_half((unsigned short)0x2C00));
      uint4 q = p;
      q.y = mlcc_tcv_u32(__hmul2(mlcc_tcv_h2(p.y), sixteenth));
      q.w = mlcc_tcv_u32(__hmul2(mlcc_tcv_h2(p.w), sixteenth));
      xw[lane] = q;
      // 1031 * (even pairs) + 71 * (odd pairs, as staged / 16 times 16): the offset of the
      // folded fragments, summed over the group's four lanes
      const float2 e0 = __half22float2(mlcc_tcv_h2(p.x)), e1 = __half22float2(mlcc_tcv_h2(p.z));
      const float2 o0 = __half22float2(mlcc_tcv_h2(q.y)), o1 = __half22float2(mlcc_tcv_h2(q.w));
      float corr = 1031.f * ((e0.x + e0.y) + (e1.x + e1.y))
                   + 1136.f * ((o0.x + o0.y) + (o1.x + o1.y));
      corr += __shfl_xor_sync(0xffffffffu, corr, 1);
      corr += __shfl_xor_sync(0xffffffffu, corr, 2);
      if ((lane & 3) == 0) xc[lane >> 2] = corr;
    }
    __syncwarp();"""


def _compute(c: TcgConfig, slot: int) -> str:
    """Rows layout: the 16 mmas of register set `slot`: per group, features g and g + 8 in one mma pair,
    the float32 result times the group's scale into the row sums."""
    codes = "mlcc_tcg_folded" if c.fold else "mlcc_tcg_exact"
    ca, cb = ("(ct[0] - xc[u])", "(ct[2] - xc[u])") if c.fold else ("ct[0]", "ct[2]")
    return f"""    {{
      const half* sah = reinterpret_cast<const half*>(&sa{slot});
      const half* sbh = reinterpret_cast<const half*>(&sb{slot});
#pragma unroll
      for (int u = 0; u < {GROUPS}; ++u) {{
        unsigned lo[4], hi[4];
        {codes}(wa{slot}[u], lo);
        {codes}(wb{slot}[u], hi);
        const uint4 b = xw[u * 4 + j];
        float ct[4] = {{0.f, 0.f, 0.f, 0.f}};
        mlcc_tcv_mma(ct, lo[0], hi[0], lo[1], hi[1], b.x, b.y);
        mlcc_tcv_mma(ct, lo[2], hi[2], lo[3], hi[3], b.z, b.w);
        acc_a = fmaf(__half2float(sah[u]), {ca}, acc_a);
        acc_b = fmaf(__half2float(sbh[u]), {cb}, acc_b);
      }}
    }}"""


def _load_cols(s: LinearShape, c: TcgConfig, slot: int) -> str:
    """Iteration `lt` (4 groups) with groups as B columns: lane (g, j) loads group 4 lt + j of
    features g and g + 8 (one 128-bit load each) and the scales of groups 4 lt + 2 (j & 1) and
    the one after (one 32-bit load a row)."""
    return f"""    if (lt < {s.k // 128}) {{
      wa{slot} = __ldg(qa + lt * 4);
      wb{slot} = __ldg(qb + lt * 4);
      sa{slot} = __ldg(sra + lt * 2);
      sb{slot} = __ldg(srb + lt * 2);
    }}
    lt += {c.warps};"""


def _stage_cols(c: TcgConfig) -> str:
    """Iteration `it`'s 128 activations (16 words, lanes 0..15) into the warp's slice in pair
    order; lanes g == j read the B fragments of their group (column) from it, the others
    keep zeros. With fold, as _stage."""
    fold = "" if not c.fold else """
      const half2 sixteenth = __half2half2(__ushort_as_half((unsigned short)0x2C00));
      q.y = mlcc_tcv_u32(__hmul2(mlcc_tcv_h2(p.y), sixteenth));
      q.w = mlcc_tcv_u32(__hmul2(mlcc_tcv_h2(p.w), sixteenth));
      const float2 e0 = __half22float2(mlcc_tcv_h2(p.x)), e1 = __half22float2(mlcc_tcv_h2(p.z));
      const float2 o0 = __half22float2(mlcc_tcv_h2(q.y)), o1 = __half22float2(mlcc_tcv_h2(q.w));
      corr = 1031.f * ((e0.x + e0.y) + (e1.x + e1.y)) + 1136.f * ((o0.x + o0.y) + (o1.x + o1.y));"""
    sums = "" if not c.fold else """
    corr += __shfl_xor_sync(0xffffffffu, corr, 1);
    corr += __shfl_xor_sync(0xffffffffu, corr, 2);
    if (lane < 16 && (lane & 3) == 0) xc[lane >> 2] = corr;"""
    return f"""    __syncwarp();
    {{
    float corr = 0.f;
    (void)corr;
    if (lane < 16) {{
      const uint4 p = mlcc_tcv_pairs(__ldg(xv + it * 16 + lane));
      uint4 q = p;{fold}
      xw[lane] = q;
    }}{sums}
    }}
    __syncwarp();
    if (g == j) {{
#pragma unroll
      for (int i = 0; i < 4; ++i) bx[i] = xw[j * 4 + i];
    }}"""


def _cols_math(c: TcgConfig | TcgpConfig, slot: int, xc: str) -> str:
    """The 8 mmas of register set `slot` on the B fragments bx: C column n collects group n of
    the iteration for features g and g + 8 (B is zero outside a column's own k slots); lanes
    j < 2 scale columns 2j, 2j + 1 into the row sums (with fold, less the offsets at `xc`)."""
    codes = "mlcc_tcg_folded" if c.fold else "mlcc_tcg_exact"
    if c.fold:
        terms = ("(ct[0] - xcj[0])", "(ct[1] - xcj[1])", "(ct[2] - xcj[0])", "(ct[3] - xcj[1])")
        offsets = f"        const float* xcj = {xc} + 2 * j;\n"
    else:
        terms, offsets = ("ct[0]", "ct[1]", "ct[2]", "ct[3]"), ""
    return f"""      float ct[4] = {{0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int i = 0; i < 4; ++i) {{
        unsigned lo[4], hi[4];
        {codes}(i == 0 ? wa{slot}.x : i == 1 ? wa{slot}.y : i == 2 ? wa{slot}.z : wa{slot}.w, lo);
        {codes}(i == 0 ? wb{slot}.x : i == 1 ? wb{slot}.y : i == 2 ? wb{slot}.z : wb{slot}.w, hi);
        mlcc_tcv_mma(ct, lo[0], hi[0], lo[1], hi[1], bx[i].x, bx[i].y);
        mlcc_tcv_mma(ct, lo[2], hi[2], lo[3], hi[3], bx[i].z, bx[i].w);
      }}
      if (j < 2) {{
{offsets}        const float2 fa2 = __half22float2(sa{slot}), fb2 = __half22float2(sb{slot});
        acc_a = fmaf(fa2.x, {terms[0]}, acc_a);
        acc_a = fmaf(fa2.y, {terms[1]}, acc_a);
        acc_b = fmaf(fb2.x, {terms[2]}, acc_b);
        acc_b = fmaf(fb2.y, {terms[3]}, acc_b);
      }}"""


def _compute_cols(c: TcgConfig, slot: int) -> str:
    """Register set `slot`'s iteration on the B fragments its staging read."""
    return f"""    {{
{_cols_math(c, slot, "xc")}
    }}"""


def gemv_q4_tcg_kernel(s: LinearShape, name: str, config: TcgConfig) -> CudaKernel:
    """The group-aligned tensor-core GEMV of one q4 linear at one row (module docstring)."""
    c, w = config, config.warps
    if not applies(s, c.iter_k):
        raise MlccError("compile", f"{name}: the tcg GEMV needs q4f16_1 weights, one static "
                        f"row and K % {c.iter_k} == 0; got N={s.n}, K={s.k}, rows "
                        f"{s.rows_text}; use another linear rule")
    iters = s.k // c.iter_k
    if c.cols:
        regs = "\n".join(f"  uint4 wa{d}, wb{d};\n  half2 sa{d}, sb{d};" for d in range(c.depth))
        regs += "\n  uint4 bx[4] = {};"
        load, stage, compute = _load_cols, _stage_cols(c), _compute_cols
        pointers = f"""  // group j of features g, g + 8; scales of groups 2 (j & 1), + 1
  const uint4* qa = reinterpret_cast<const uint4*>(qw) + fa * {s.groups} + j;
  const uint4* qb = reinterpret_cast<const uint4*>(qw) + fb * {s.groups} + j;
  const half2* sra = reinterpret_cast<const half2*>(qs + fa * {s.groups}) + (j & 1);
  const half2* srb = reinterpret_cast<const half2*>(qs + fb * {s.groups}) + (j & 1);"""
        reduce = "  acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);\n" \
                 "  acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);\n"
    else:
        regs = "\n".join(f"  unsigned wa{d}[{GROUPS}], wb{d}[{GROUPS}];\n  uint4 sa{d}, sb{d};"
                         for d in range(c.depth))
        load, stage, compute = _load, _stage(c), _compute
        pointers = f"""  const unsigned* qa = qw + fa * {s.words} + j;  // word j of group 0 of features g, g + 8
  const unsigned* qb = qw + fb * {s.words} + j;
  const uint4* sra = reinterpret_cast<const uint4*>(qs + fa * {s.groups});
  const uint4* srb = reinterpret_cast<const uint4*>(qs + fb * {s.groups});"""
        reduce = ""
    loads = "\n".join(load(s, c, d) for d in range(c.depth))
    steps = "\n".join(f"""    if (it >= {iters}) break;
{stage}
{compute(c, d)}
{load(s, c, d)}
    it += {w};""" for d in range(c.depth))
    last = s.n - 1
    body = f"""{PTX_HELPERS}{PORTABLE_HELPERS}{HELPERS}
{signature(name, s.buffers, ("y",), s.symbols)} {{
  __shared__ __align__(16) uint4 xs[{w}][32];
  __shared__ float xcs[{w}][{GROUPS}];
  __shared__ float red[{w}][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, j = lane & 3;  // the mma fragments' row and k pair
  const long long n0 = (long long)blockIdx.x * 16;
  const long long fa = n0 + g < {last} ? n0 + g : {last};
  const long long fb = n0 + g + 8 < {last} ? n0 + g + 8 : {last};
{pointers}
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  uint4* xw = xs[warp];
  float* xc = xcs[warp];
  (void)xc;
{regs}
  int lt = warp;  // the next iteration to load
{loads}
  {GRID_WAIT}
  float acc_a = 0.f, acc_b = 0.f;
  int it = warp;
  while (true) {{  // unrolled by depth: set d holds iterations it, it + depth * warps, ...
{steps}
  }}
{reduce}  if (j == 0) {{
    red[warp][g] = acc_a;
    red[warp][g + 8] = acc_b;
  }}
  __syncthreads();
  if (threadIdx.x < 16) {{
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < {w}; ++v) sum += red[v][threadIdx.x];
    const long long n = n0 + threadIdx.x;
    if (n < {s.n}) mlcc_put(y, n, sum{s.bias_term("n")});
  }}
  return 0;
}}
"""
    grid = (f"T.int64({-(-s.n // 16)})",)
    return CudaKernel(name, body, launcher(name, s.buffers, grid, 32 * w, s.symbols))


def gemv_q4_tcg_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    """This kernel where the GEMV database's single-row winner for the shape has kind "tcg",
    with the recorded config; None elsewhere."""
    from mlcc.backends.cuda.gemv_tc import measured

    s = LinearShape(spec)
    if not applies(s, 128):
        return None
    record = measured(s.n, s.k, 1)
    if record is None or record.get("kind") != TCG:
        return None
    config = TcgConfig(int(record["warps"]), int(record["depth"]),
                       bool(record.get("fold", False)), bool(record.get("cols", False)))
    return gemv_q4_tcg_kernel(s, name, config) if applies(s, config.iter_k) else None


# --- persistent form ---------------------------------------------------------------------


@dataclass(frozen=True)
class TcgpConfig:
    """The persistent form: `blocks_per_sm` x SMS blocks of `warps` warps, each warp walking
    whole tiles with `depth` iterations (4 groups: two 128-bit weight loads and two 32-bit
    scale loads a lane) of loads in flight; `fold` as TcgConfig's."""

    blocks_per_sm: int = 3
    warps: int = 8
    depth: int = 2
    fold: bool = False

    def __post_init__(self) -> None:
        if (self.warps not in (2, 4, 8) or not 1 <= self.depth <= 4
                or not 1 <= self.blocks_per_sm * self.warps <= 64):
            raise MlccError("compile", f"tcgp GEMV: warps must be 2, 4 or 8, depth 1..4 and "
                            f"blocks_per_sm * warps 1..64; got {self}")

    @property
    def tag(self) -> str:
        return (f"tcgp_b{self.blocks_per_sm}_w{self.warps}_d{self.depth}"
                f"{'_fold' if self.fold else ''}")


PERSISTENT_SHARED = 46 * 1024  # bytes of static shared memory the staged row may take


def persistent_applies(s: LinearShape) -> bool:
    """applies() with 128-k iterations, and the whole activation row (plus, folded, one float
    a group) staged in static shared memory."""
    return applies(s, 128) and s.k * 2 + s.groups * 4 <= PERSISTENT_SHARED


def _load_p(s: LinearShape, slot: int) -> str:
    """Iteration `lr` of tile `lt` into register set `slot`, then advance (lt, lr)."""
    return f"""    if (lt < tiles) {{
      const long long ra = lt * 16 + g < {s.n - 1} ? lt * 16 + g : {s.n - 1};
      const long long rb = lt * 16 + g + 8 < {s.n - 1} ? lt * 16 + g + 8 : {s.n - 1};
      wa{slot} = __ldg(qv + ra * {s.groups} + lr * 4 + j);
      wb{slot} = __ldg(qv + rb * {s.groups} + lr * 4 + j);
      sa{slot} = __ldg(sv + ra * {s.groups // 2} + lr * 2 + (j & 1));
      sb{slot} = __ldg(sv + rb * {s.groups // 2} + lr * 2 + (j & 1));
    }}
    if (++lr == {s.k // 128}) {{ lr = 0; lt += stride; }}"""


def _step_p(s: LinearShape, c: TcgpConfig, slot: int) -> str:
    """Iteration `tr` of tile `tile` from register set `slot` (8 mmas, groups as C columns),
    the next loads into the slot, and at a tile's end its store."""
    return f"""    if (tile >= tiles) break;
    {{
      uint4 bx[4] = {{}};
      if (g == j) {{
#pragma unroll
        for (int i = 0; i < 4; ++i) bx[i] = xs[(tr * 4 + j) * 4 + i];
      }}
{_cols_math(c, slot, "(xcs + tr * 4)")}
    }}
{_load_p(s, slot)}
    if (++tr == {s.k // 128}) {{
      acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
      acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
      if (j == 0) {{
        const long long na = tile * 16 + g, nb = na + 8;
        if (na < {s.n}) mlcc_put(y, na, acc_a{s.bias_term("na")});
        if (nb < {s.n}) mlcc_put(y, nb, acc_b{s.bias_term("nb")});
      }}
      acc_a = acc_b = 0.f;
      tr = 0;
      tile += stride;
    }}"""


def _stage_p(s: LinearShape, c: TcgpConfig) -> str:
    """The activation row into xs in pair order (odd pairs / 16 with fold), and with fold each
    group's offset 1031 * (even pairs) + 1136 * (odd pairs as staged) into xcs."""
    words = s.k // 8
    if not c.fold:
        return f"""  for (int e = threadIdx.x; e < {words}; e += {32 * c.warps})
    xs[e] = mlcc_tcv_pairs(__ldg(xv + e));"""
    return f"""  {{
    const half2 sixteenth = __half2half2(__ushort_as_half((unsigned short)0x2C00));
    for (int e = threadIdx.x; e < {words}; e += {32 * c.warps}) {{
      const uint4 p = mlcc_tcv_pairs(__ldg(xv + e));
      uint4 q = p;
      q.y = mlcc_tcv_u32(__hmul2(mlcc_tcv_h2(p.y), sixteenth));
      q.w = mlcc_tcv_u32(__hmul2(mlcc_tcv_h2(p.w), sixteenth));
      xs[e] = q;
    }}
    __syncthreads();
    for (int gi = threadIdx.x; gi < {s.groups}; gi += {32 * c.warps}) {{
      float corr = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {{
        const uint4 q = xs[gi * 4 + i];
        const float2 e0 = __half22float2(mlcc_tcv_h2(q.x)), e1 = __half22float2(mlcc_tcv_h2(q.z));
        const float2 o0 = __half22float2(mlcc_tcv_h2(q.y)), o1 = __half22float2(mlcc_tcv_h2(q.w));
        corr += 1031.f * ((e0.x + e0.y) + (e1.x + e1.y)) + 1136.f * ((o0.x + o0.y) + (o1.x + o1.y));
      }}
      xcs[gi] = corr;
    }}
  }}"""


def gemv_q4_tcgp_kernel(s: LinearShape, name: str, config: TcgpConfig,
                        sms: int | None = None) -> CudaKernel:
    """The persistent group-aligned tensor-core GEMV (groups as C columns, the activation row
    staged once per block); `sms` scales the grid (the host emulation runs few blocks)."""
    from mlcc.backends.cuda.gemv import SMS

    c = config
    if not persistent_applies(s):
        raise MlccError("compile", f"{name}: the persistent tcg GEMV needs q4f16_1 weights, one "
                        f"static row, K % 128 == 0 and K <= {PERSISTENT_SHARED // 2 - 64}; got "
                        f"N={s.n}, K={s.k}, rows {s.rows_text}; use another linear rule")
    tiles = -(-s.n // 16)
    grid = max(1, min(c.blocks_per_sm * (sms or SMS), -(-tiles // c.warps)))
    regs = "\n".join(f"  uint4 wa{d}, wb{d};\n  half2 sa{d}, sb{d};" for d in range(c.depth))
    loads = "\n".join(_load_p(s, d) for d in range(c.depth))
    steps = "\n".join(_step_p(s, c, d) for d in range(c.depth))
    xcs = f"  __shared__ float xcs[{s.groups}];\n" if c.fold else ""
    body = f"""{PTX_HELPERS}{PORTABLE_HELPERS}{HELPERS}
{signature(name, s.buffers, ("y",), s.symbols)} {{
  __shared__ __align__(16) uint4 xs[{s.k // 8}];
{xcs}  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, j = lane & 3;  // the mma fragments' row and k pair
  const long long tiles = {tiles}, stride = {grid * c.warps};  // warps of the launch
  const uint4* qv = reinterpret_cast<const uint4*>(qw);
  const half2* sv = reinterpret_cast<const half2*>(qs);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
{regs}
  long long lt = (long long)blockIdx.x * {c.warps} + warp;  // the next (tile, iteration) to load
  int lr = 0;
{loads}
  {GRID_WAIT}
{_stage_p(s, c)}
  __syncthreads();
  long long tile = (long long)blockIdx.x * {c.warps} + warp;
  int tr = 0;
  float acc_a = 0.f, acc_b = 0.f;
  while (true) {{  // unrolled by depth: set d holds iterations d, d + depth, ... of the walk
{steps}
  }}
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, s.buffers, (f"T.int64({grid})",),
                                           32 * c.warps, s.symbols))
