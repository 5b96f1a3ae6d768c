"""Prefill GEMM on tensor cores with int4 dequantization fused into a software pipeline.

y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]) for float16 activations, 4-bit weights in groups of 32
with float16 scales (q4f16_1) or plain float16 weights, float16 or float32 results, any row
count (a symbolic prefill length or a static one) and K a multiple of 32.

One block of 8 warps owns a BM x BN output tile (the rule: 128x128 for weights of >= 8192
features, 128x64 below) and walks K in 32-wide steps:

    activations   cp.async (16 bytes, L2 only) into a ring of `stages` shared buffers, one
                  commit group per K step, so `stages - 1` steps are in flight during the math
    q4 weights    the packed words and the scale of a step `ahead` steps away are loaded into
                  registers while the current step computes; one step before use they are
                  dequantized (0x6400 exponent trick, exact) into one of two shared B buffers.
                  The K loop is unrolled `ahead` times so step t always lives in register
                  slot t % ahead: no copies between slots, which would wait on the loads
    f16 weights   through the same cp.async ring as the activations
    math          mma.sync m16n8k16 (float16 in, float32 accumulators) on fragments loaded with
                  ldmatrix; each warp owns a (BM / warps_m) x (BN / warps_n) sub-tile
    epilogue      accumulators + bias straight from registers to y, rows and features bounded

Shared tiles are 32 halves (64 bytes) per row, with the 16-byte chunk index XOR-ed by bits 1-2
of the row, so the eight rows an ldmatrix phase reads fall in eight different bank groups.
Everything stays in <= 48 KB of static shared memory: TVM launches our device functions from its
own kernels, so a dynamic shared-memory size could not be requested.

Rows past the end of x and features past the end of W are loaded clamped to the last valid one:
they only feed outputs that are never stored, so no zero filling is needed.

GLU mode (`glu=True`, the fused linear_silu_mul of mlcc.backends.cuda.glu): W is a gate_up
weight of N = 2I features (gate rows 0..I-1, up rows I..2I-1) and y[m, f] = silu(g) * u for
f < I, with g, u the GEMM's values at features f and I + f. Each warp's warp_n tile columns load
warp_n / 2 gate rows, then the matching up rows, so every lane ends with g and u of one output
feature in its own accumulators (fragments j and j + nt / 2) and a BN-wide tile yields BN / 2
outputs. g and u are rounded to float16 before the activation, as the unfused GEMM stores them.

    gemm_tc_rule(spec, name)                    the LINEAR_RULES entry (None when it declines)
    gemm_tc_kernel(shape, name, config, glu)    any TileConfig, for benchmarks/cuda/gemm_bench.py
    glu_problems(shape, config)                 why the GLU mode cannot run a shape ([] if it can)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlcc.backends.cuda.kernels import CudaKernel, launcher, signature
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.ir.types import Sym

if TYPE_CHECKING:
    from mlcc.backends.cuda.linear import LinearShape

STAGE = "compile"
WARPS = 8
THREADS = WARPS * 32
BK = 32
SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class TileConfig:
    """Block tile bm x bn, warps_m x (8 / warps_m) warps, activation ring depth, weight lead."""

    bm: int = 128
    bn: int = 128
    warps_m: int = 2
    stages: int = 4
    ahead: int = 2  # K steps between a q4 weight load and its dequantization
    split_dequant: bool = False  # dequantize between the two k16 halves instead of before

    @property
    def warps_n(self) -> int:
        return WARPS // self.warps_m

    @property
    def warp_m(self) -> int:
        return self.bm // self.warps_m

    @property
    def warp_n(self) -> int:
        return self.bn // self.warps_n

    @property
    def tag(self) -> str:
        split = "_split" if self.split_dequant else ""
        return (f"{self.bm}x{self.bn}_w{self.warp_m}x{self.warp_n}_s{self.stages}_a{self.ahead}"
                f"{split}")

    def shared_bytes(self, q4: bool) -> int:
        b_rows = 2 * self.bn if q4 else self.stages * self.bn
        return (self.stages * self.bm + b_rows) * BK * 2

    def check(self, q4: bool) -> None:
        """Raise unless the tile maps onto 8 warps, whole mma fragments and the thread layout."""
        problems = []
        if WARPS % self.warps_m or self.warp_m % 16 or self.warp_n % 16:
            problems.append("warp tiles must be multiples of 16 x 16")
        if (self.bm * 4) % THREADS or (self.bn * 4) % THREADS:
            problems.append("bm and bn must be multiples of 64 (one 16-byte chunk per thread)")
        if self.bn * 4 > THREADS * 4 or self.stages < 2 or self.ahead < 1:
            problems.append("bn <= 256, stages >= 2, ahead >= 1")
        if self.shared_bytes(q4) > SHARED_LIMIT:
            problems.append(f"{self.shared_bytes(q4)} bytes of shared memory > {SHARED_LIMIT}")
        if problems:
            raise MlccError(STAGE, f"gemm tile {self.tag}: {'; '.join(problems)}; pick another "
                            "TileConfig (e.g. TileConfig(128, 128, 2, 4))")


# Tiles the rule picks: 128x128 when the weight has enough 128-wide column tiles to fill the GPU
# at a 512-row prefill, 128x64 (twice the blocks, dequantization still shared by 128 rows)
# below that. On an H200 (benchmarks/cuda/gemm_bench.py, 2026-11-28, 512 rows) these were the
# fastest validated tiles: q4 qkv 255, gate_up 241, o_proj 207, down 233 TFLOP/s (the 64x64
# WMMA kernel: 114, 107, 94, 86); 4-bit 128x128 tiles gain 3-8% from split_dequant.
WIDE_TILE = TileConfig(128, 128, 2, 4, 2, split_dequant=True)
NARROW_TILE = TileConfig(128, 64, 4, 4, 2)
F16_WIDE_TILE = TileConfig(128, 128, 2, 3, 2)
WIDE_FROM_FEATURES = 8192

# Device helpers, guarded so that any number of these kernels can share one translation unit.
HELPERS = r"""
#ifndef MLCC_GEMM_TC_HELPERS
#define MLCC_GEMM_TC_HELPERS
__device__ __forceinline__ unsigned mlcc_tc_smem(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mlcc_tc_cp16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst), "l"(src));
}
__device__ __forceinline__ void mlcc_tc_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void mlcc_tc_cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}
// Offset in halves of (row r, column c) of a tile with rows of 32 halves, c a multiple of 8:
// the 16-byte chunk index is XOR-ed with bits 1-2 of the row, so rows r..r+7 (r % 8 == 0) at
// one column use all eight 16-byte bank groups.
__device__ __forceinline__ int mlcc_tc_swz(int r, int c) {
  return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3);
}
__device__ __forceinline__ void mlcc_tc_ldsm4(unsigned* d, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(addr));
}
__device__ __forceinline__ void mlcc_tc_mma16816(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Eight 4-bit codes of `w` (element j at bits 4j) as eight halves in k order, times the scale.
// Each pair (c_2i, c_2i+1) is moved to bits 0-3 and 16-19 and OR-ed into 0x6400: the half2
// (1024 + c_2i, 1024 + c_2i+1) exactly; subtracting 1031 leaves c - 7 exactly, and one rounded
// multiply gives float16((c - 7) * scale), the reference's rounding.
__device__ __forceinline__ uint4 mlcc_tc_q4_dequant8(unsigned w, half2 scale) {
  const half2 magic = __half2half2(__ushort_as_half((unsigned short)0x6407));
  unsigned t[4];
  t[0] = (w & 0xFu) | ((w << 12) & 0xF0000u) | 0x64006400u;
  t[1] = ((w >> 8) & 0xFu) | ((w << 4) & 0xF0000u) | 0x64006400u;
  t[2] = ((w >> 16) & 0xFu) | ((w >> 4) & 0xF0000u) | 0x64006400u;
  t[3] = ((w >> 24) & 0xFu) | ((w >> 12) & 0xF0000u) | 0x64006400u;
  uint4 out;
  unsigned* o = reinterpret_cast<unsigned*>(&out);
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    const half2 v = __hmul2(__hsub2(*reinterpret_cast<half2*>(&t[i]), magic), scale);
    o[i] = *reinterpret_cast<const unsigned*>(&v);
  }
  return out;
}
__device__ __forceinline__ void mlcc_tc_put2(half* p, long long i, float a, float b) {
  *reinterpret_cast<half2*>(p + i) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void mlcc_tc_put2(float* p, long long i, float a, float b) {
  *reinterpret_cast<float2*>(p + i) = make_float2(a, b);
}
#endif
"""


def _linear():
    # linear.py lists this module's rule in LINEAR_RULES, so it is imported when first used:
    # either module can then be imported first.
    from mlcc.backends.cuda import linear

    return linear


def gemm_tc_kind(s: LinearShape) -> str | None:
    """"q4" or "f16" when the tensor-core GEMM handles this linear, else None."""
    if s.xdt != "float16" or s.ydt not in ("float16", "float32") or s.k % BK:
        return None
    if s.static_rows is not None and s.static_rows <= _linear().GEMV_MAX_ROWS:
        return None  # the decode GEMVs own these
    if s.bias and s.buffers[-2][2] not in ("float16", "float32"):
        return None
    if s.quant:
        ok = (s.bits == 4 and s.group == 32 and s.sdt == "float16"
              and s.words * 8 == s.k and s.groups * 32 == s.k)
        return "q4" if ok else None
    return "f16" if s.wdt == "float16" else None


def choose_tile(s: LinearShape, q4: bool) -> TileConfig:
    if s.n >= WIDE_FROM_FEATURES:
        return WIDE_TILE if q4 else F16_WIDE_TILE
    return NARROW_TILE


def gemm_tc_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    """Tensor-core GEMM for prefill-sized q_linear / float16 linear, or None."""
    s = _linear().LinearShape(spec)
    kind = gemm_tc_kind(s)
    # batch_decode rows (one per sequence, a handful) keep the 64-row WMMA tiles: a 128-row
    # tile would leave most of its MMAs idle with half as many blocks streaming the weights
    if kind is None or (isinstance(s.rows, Sym) and s.rows.name == "batch"):
        return None
    return gemm_tc_kernel(s, name, choose_tile(s, kind == "q4"))


def gemm_tc_kernel(s: LinearShape, name: str, config: TileConfig,
                   glu: bool = False) -> CudaKernel:
    """The kernel for `s` with tile `config` (raises MlccError when either does not fit); with
    `glu`, silu(gate) * up of the gate_up weight `s` ([rows, N / 2] results)."""
    kind = gemm_tc_kind(s)
    if kind is None:
        raise MlccError(STAGE, f"{name}: the tensor-core GEMM needs float16 activations, "
                        f"float16/float32 results, K % 32 == 0 and q4f16 (group 32) or float16 "
                        f"weights; got x {s.xdt}, y {s.ydt}, K {s.k}; use linear.gemm_wmma_rule")
    q4 = kind == "q4"
    config.check(q4)
    problems = glu_problems(s, config) if glu else []
    if problems:
        raise MlccError(STAGE, f"{name}: the GLU epilogue cannot run {s.n} gate_up features with "
                        f"tile {config.tag}: {'; '.join(problems)}; keep silu_mul apart")
    buffers = glu_buffers(s) if glu else s.buffers
    epilogue = _glu_epilogue(s, config) if glu else _epilogue(s, config)
    body = f"""{HELPERS}
{signature(name, buffers, ("y",), s.symbols)} {{
{_prologue(s, config, q4, glu)}
{_k_loop(s, config, q4)}
{epilogue}
  return 0;
}}
"""
    rows = (f"({s.rows_text} + T.int64({config.bm - 1})) // T.int64({config.bm})"
            if isinstance(s.rows, Sym) else f"T.int64({-(-s.static_rows // config.bm)})")
    # Row tiles vary fastest, so the blocks running together share weight tiles in L2. A GLU
    # tile covers bn weight rows but bn / 2 outputs: as many blocks as the unfused GEMM.
    grid = (rows, f"T.int64({-(-s.n // config.bn)})")
    return CudaKernel(name, body, launcher(name, buffers, grid, THREADS, s.symbols))


def glu_problems(s: LinearShape, config: TileConfig) -> list[str]:
    """What stops the GLU mode on shape `s` with tile `config` (empty when it runs)."""
    problems = []
    if (config.warp_n // 2) % 8:
        problems.append(f"warp_n / 2 = {config.warp_n // 2} is not a whole number of "
                        "8-column mma fragments")
    if s.n % 4:
        problems.append(f"N / 2 = {s.n / 2:g} outputs must be even (paired float16 stores)")
    if s.ydt != "float16":
        problems.append(f"the gate_up values are {s.ydt}, not float16")
    return problems


def glu_buffers(s: LinearShape) -> list[tuple]:
    """The GEMM's buffers with y holding the N / 2 gated outputs per row."""
    (name, shape, dtype) = s.buffers[-1]
    return s.buffers[:-1] + [(name, tuple(shape[:-1]) + (s.n // 2,), dtype)]


def _chunk_sources(var: str, src: str, rows: int, limit: str, k: int, base: str) -> str:
    """Per-thread source pointers and swizzled byte offsets of `rows` x 32-half tiles."""
    per_thread = rows * 4 // THREADS
    return f"""  const half* {var}_src[{per_thread}];
  int {var}_dst[{per_thread}];
  #pragma unroll
  for (int i = 0; i < {per_thread}; ++i) {{
    const int v = tid + i * {THREADS}, r = v >> 2;
    const long long row = {base} + r < {limit} ? {base} + r : {limit} - 1;
    {var}_src[i] = {src} + row * {k}LL + (v & 3) * 8;
    {var}_dst[i] = mlcc_tc_swz(r, (v & 3) * 8) * 2;
  }}"""


def _issue(s: LinearShape, config: TileConfig, q4: bool, step: str, indent: str) -> str:
    """cp.async of K step `step` into ring slot step % stages (activations, f16 weights)."""
    lines = [f"const int slot = ({step}) % {config.stages};"]
    tiles = [("a", config.bm)] + ([] if q4 else [("b", config.bn)])
    for var, rows in tiles:
        lines += ["#pragma unroll",
                  f"for (int i = 0; i < {rows * 4 // THREADS}; ++i)",
                  (f"  mlcc_tc_cp16({var}s0 + slot * {rows * BK * 2} + {var}_dst[i], "
                   f"{var}_src[i] + ({step}) * {BK});")]
    return "\n".join(indent + ln for ln in lines)


def _q4_layout(config: TileConfig) -> tuple[int, str, tuple[str, ...]]:
    per_thread = config.bn * 4 // THREADS  # packed words of one feature per thread and step
    vec = {1: "unsigned", 2: "uint2", 4: "uint4"}[per_thread]
    fields = {1: ("",), 2: (".x", ".y"), 4: (".x", ".y", ".z", ".w")}[per_thread]
    return per_thread, vec, fields


def _q4_load(config: TileConfig, step: str, slot: int) -> str:
    per_thread, vec, _ = _q4_layout(config)
    return (f"wq[{slot}] = __ldg(reinterpret_cast<const {vec}*>(w_src) + ({step}) * "
            f"{4 // per_thread}); sq[{slot}] = s_src[{step}];")


def _q4_dequant(config: TileConfig, slot: int, buffer: str) -> list[str]:
    """Dequantize register slot `slot` into B buffer `buffer` (one 16-byte store per word)."""
    _, _, fields = _q4_layout(config)
    lines = [f"{{ const half2 sc = __half2half2(sq[{slot}]);"]
    for j, f in enumerate(fields):
        lines.append(f"  *reinterpret_cast<uint4*>(Bs + ({buffer}) * {config.bn * BK} + "
                     f"mlcc_tc_swz(b_row, (b_word + {j}) * 8)) = "
                     f"mlcc_tc_q4_dequant8(wq[{slot}]{f}, sc);")
    lines.append("}")
    return lines


def _glu_weight_row(s: LinearShape, config: TileConfig, r: str, out: str, indent: str) -> str:
    """`out` = the gate_up weight row that B tile row `r` holds in GLU mode: row r of a warp's
    warp_n columns is gate feature f (first half) or up feature I + f (second half) for output
    f = n0 + r / warp_n * warp_n / 2 + r % (warp_n / 2), f clamped to I - 1 past the end."""
    half_n, out_n = config.warp_n // 2, s.n // 2
    return (f"const long long {out}_f = n0 + ({r}) / {config.warp_n} * {half_n} + ({r}) % {half_n};"
            f"\n{indent}const long long {out} = ({out}_f < {out_n} ? {out}_f : {out_n - 1}LL)"
            f" + ((({r}) / {half_n}) & 1) * {out_n}LL;")


def _glu_b_sources(s: LinearShape, config: TileConfig) -> str:
    """_chunk_sources of the float16 weight tile in GLU mode (gate and up rows interleaved)."""
    per_thread = config.bn * 4 // THREADS
    return f"""  const half* b_src[{per_thread}];
  int b_dst[{per_thread}];
  #pragma unroll
  for (int i = 0; i < {per_thread}; ++i) {{
    const int v = tid + i * {THREADS}, r = v >> 2;
    {_glu_weight_row(s, config, "r", "row", "    ")}
    b_src[i] = w + row * {s.k}LL + (v & 3) * 8;
    b_dst[i] = mlcc_tc_swz(r, (v & 3) * 8) * 2;
  }}"""


def _prologue(s: LinearShape, config: TileConfig, q4: bool, glu: bool = False) -> str:
    steps = s.k // BK
    b_rows = 2 * config.bn if q4 else config.stages * config.bn
    mt, nt = config.warp_m // 16, config.warp_n // 8
    text = f"""  __shared__ __align__(128) half As[{config.stages * config.bm * BK}];
  __shared__ __align__(128) half Bs[{b_rows * BK}];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long m0 = (long long)blockIdx.x * {config.bm}, n0 = (long long)blockIdx.y * {config.bn // 2 if glu else config.bn};
  const long long m_rows = {s.rows_text};
  const int wm = (warp % {config.warps_m}) * {config.warp_m};
  const int wn = (warp / {config.warps_m}) * {config.warp_n};
  const unsigned as0 = mlcc_tc_smem(As), bs0 = mlcc_tc_smem(Bs);
  // ldmatrix row addresses (bytes) of this lane for the two k16 halves of a step: A rows
  // wm + lane % 16 at k 8 (lane / 16); B features wn + 8 (lane / 16) + lane % 8 at k 8 (lane / 8 % 2)
  int a_ld[2], b_ld[2];
  #pragma unroll
  for (int h = 0; h < 2; ++h) {{
    a_ld[h] = mlcc_tc_swz(wm + (lane & 15), h * 16 + (lane >> 4) * 8) * 2;
    b_ld[h] = mlcc_tc_swz(wn + (lane >> 4) * 8 + (lane & 7), h * 16 + ((lane >> 3) & 1) * 8) * 2;
  }}
{_chunk_sources("a", "x", config.bm, "m_rows", s.k, "m0")}
  float acc[{mt}][{nt}][4];
  #pragma unroll
  for (int i = 0; i < {mt}; ++i)
    #pragma unroll
    for (int j = 0; j < {nt}; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
"""
    if not q4:
        b_sources = (_glu_b_sources(s, config) if glu
                     else _chunk_sources("b", "w", config.bn, f"{s.n}LL", s.k, "n0"))
        text += b_sources + "\n"
    else:
        per_thread, vec, _ = _q4_layout(config)
        feature = (_glu_weight_row(s, config, "b_row", "b_feature", "  ") if glu else
                   f"const long long b_feature = n0 + b_row < {s.n}LL ? n0 + b_row : {s.n - 1}LL;")
        text += f"""  const int b_row = tid / {4 // per_thread}, b_word = (tid % {4 // per_thread}) * {per_thread};
  {feature}
  const unsigned* w_src = qw + b_feature * {s.words}LL + b_word;
  const half* s_src = qs + b_feature * {s.groups}LL;
  {vec} wq[{config.ahead}];
  half sq[{config.ahead}];
"""
        # register slot of K step t: t % ahead, so no value ever moves between slots
        text += "".join(f"  {_q4_load(config, str(t), t)}\n"
                        for t in range(min(config.ahead, steps)))
    for st in range(config.stages - 1):
        if st < steps:
            text += "  {\n" + _issue(s, config, q4, str(st), "    ") + "\n  }\n"
        text += "  mlcc_tc_cp_commit();\n"
    if q4:
        text += "\n".join("  " + ln for ln in _q4_dequant(config, 0, "0")) + "\n"
        if config.ahead < steps:
            text += f"  {_q4_load(config, str(config.ahead), 0)}\n"
    return text.rstrip("\n")


def _k_loop(s: LinearShape, config: TileConfig, q4: bool) -> str:
    """The K loop, unrolled `ahead` times for q4 so each copy names its register slot."""
    steps, unroll = s.k // BK, config.ahead if q4 else 1
    copies = []
    for u in range(unroll):
        guard = f"if (kt0 + {u} < {steps}) " if steps % unroll else ""
        dequant = _q4_step(s, config, (u + 1) % unroll) if q4 else ""
        if config.split_dequant and q4:  # first half's mma in the tensor pipe meanwhile
            math = "\n".join([_compute(config, q4, (0,)), dequant, _compute(config, q4, (1,))])
        else:
            math = "\n".join(filter(None, [dequant, _compute(config, q4, (0, 1))]))
        copies.append(f"""    {guard}{{
      const int kt = kt0 + {u};
      mlcc_tc_cp_wait<{config.stages - 2}>();
      __syncthreads();
      if (kt + {config.stages - 1} < {steps}) {{
{_issue(s, config, q4, f"kt + {config.stages - 1}", "        ")}
      }}
      mlcc_tc_cp_commit();
{math}
    }}""")
    body = "\n".join(copies)
    return f"""  for (int kt0 = 0; kt0 < {steps}; kt0 += {unroll}) {{
{body}
  }}"""


def _q4_step(s: LinearShape, config: TileConfig, slot: int) -> str:
    """Prepare B of step kt + 1 from register slot `slot`, then reload that slot with step
    kt + 1 + ahead."""
    steps = s.k // BK
    body = "\n".join("        " + ln for ln in _q4_dequant(config, slot, "(kt + 1) & 1"))
    load = _q4_load(config, f"kt + {1 + config.ahead}", slot)
    return f"""      if (kt + 1 < {steps}) {{
{body}
        if (kt + {1 + config.ahead} < {steps}) {{ {load} }}
      }}"""


def _compute(config: TileConfig, q4: bool, halves: tuple[int, ...]) -> str:
    """k16 halves of the step: ldmatrix fragments, then every mma of the warp tile. Rows 16
    apart share their swizzle phase, so fragment i sits a constant i * 1024 bytes further."""
    mt, nt = config.warp_m // 16, config.warp_n // 8
    b_slot = "(kt & 1)" if q4 else f"(kt % {config.stages})"
    return f"""      {{
        const unsigned a_base = as0 + (kt % {config.stages}) * {config.bm * BK * 2};
        const unsigned b_base = bs0 + {b_slot} * {config.bn * BK * 2};
        #pragma unroll
        for (int h = {halves[0]}; h <= {halves[-1]}; ++h) {{
          unsigned af[{mt}][4], bfr[{nt}][2];
          #pragma unroll
          for (int i = 0; i < {mt}; ++i) mlcc_tc_ldsm4(af[i], a_base + a_ld[h] + i * 1024);
          #pragma unroll
          for (int p = 0; p < {nt // 2}; ++p) {{
            unsigned r[4];
            mlcc_tc_ldsm4(r, b_base + b_ld[h] + p * 1024);
            bfr[2 * p][0] = r[0]; bfr[2 * p][1] = r[1];
            bfr[2 * p + 1][0] = r[2]; bfr[2 * p + 1][1] = r[3];
          }}
          #pragma unroll
          for (int i = 0; i < {mt}; ++i)
            #pragma unroll
            for (int j = 0; j < {nt}; ++j) mlcc_tc_mma16816(acc[i][j], af[i], bfr[j]);
        }}
      }}"""


def _epilogue(s: LinearShape, config: TileConfig) -> str:
    """Accumulators (+ bias) to y: lane holds rows g and g + 8, features 2t and 2t + 1."""
    mt, nt = config.warp_m // 16, config.warp_n // 8
    v0 = f"acc[i][j][2 * h]{s.bias_term('col')}"
    v1 = f"acc[i][j][2 * h + 1]{s.bias_term('col + 1')}"
    if s.n % 2 == 0:  # pairs never straddle the end and stay 4/8-byte aligned
        store = f"if (col < {s.n}) mlcc_tc_put2(y, row * {s.n}LL + col, {v0}, {v1});"
    else:
        store = (f"if (col < {s.n}) mlcc_put(y, row * {s.n}LL + col, {v0}); "
                 f"if (col + 1 < {s.n}) mlcc_put(y, row * {s.n}LL + col + 1, {v1});")
    return f"""  const int g = lane >> 2, t2 = (lane & 3) * 2;
  #pragma unroll
  for (int i = 0; i < {mt}; ++i)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {{
      const long long row = m0 + wm + i * 16 + h * 8 + g;
      if (row < m_rows) {{
        #pragma unroll
        for (int j = 0; j < {nt}; ++j) {{
          const long long col = n0 + wn + j * 8 + t2;
          {store}
        }}
      }}
    }}"""


def _glu_epilogue(s: LinearShape, config: TileConfig) -> str:
    """silu(g) * u to y: lane holds rows g and g + 8 at tile columns 8j + t2 and t2 + 1, gate
    features in fragments j < nt / 2 and their up features in fragments j + nt / 2."""
    mt, half_nt, out_n = config.warp_m // 16, config.warp_n // 16, s.n // 2

    def rounded(j: str, first: str) -> str:
        # float16 first: the unfused GEMM stores g and u as float16 and silu_mul reads them
        v0 = f"acc[i][{j}][2 * h]{s.bias_term(first)}"
        v1 = f"acc[i][{j}][2 * h + 1]{s.bias_term(first + ' + 1')}"
        return f"__half22float2(__floats2half2_rn({v0}, {v1}))"

    # silu_mul's arithmetic (mlcc.backends.cuda.kernels), so the results match it bit for bit
    act = "({0} / (1.0f + expf(-{0}))) * {1}"
    return f"""  const int g = lane >> 2, t2 = (lane & 3) * 2;
  #pragma unroll
  for (int i = 0; i < {mt}; ++i)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {{
      const long long row = m0 + wm + i * 16 + h * 8 + g;
      if (row < m_rows) {{
        #pragma unroll
        for (int j = 0; j < {half_nt}; ++j) {{
          const long long f = n0 + wn / 2 + j * 8 + t2;
          if (f < {out_n}) {{
            const float2 gv = {rounded("j", "f")};
            const float2 uv = {rounded(f"j + {half_nt}", f"f + {out_n}")};
            mlcc_tc_put2(y, row * {out_n}LL + f, {act.format("gv.x", "uv.x")},
                         {act.format("gv.y", "uv.y")});
          }}
        }}
      }}
    }}"""
