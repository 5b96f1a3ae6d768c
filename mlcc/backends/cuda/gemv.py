"""Persistent q4 decode GEMV: y[r, n] = sum_k x[r, k] * W[n, k] (+ b[n]) for a few static rows.

The one-shot GEMV of mlcc.backends.cuda.linear launches ~1400 short blocks per call and pays,
in every block, the staging of the whole activation row, a barrier, a reduction and the tail
wave, with little weight traffic in flight meanwhile. This kernel launches `blocks_per_sm` x
SMS blocks (132 SMs on an H200) and lets each block

    1. issue the weight loads of its warps' first tiles,
    2. stage the activation rows once into shared memory (the `staging` hook: C++ filling the
       shared half2 array `xs` from row `r`, permuted into nibble-pair order; the fused norm
       and silu_mul prologues of mlcc.backends.cuda.fusion plug in here and now run in ~264
       blocks instead of ~1400),
    3. loop over tiles of `rows_per_warp` output features: warp w of block b takes tiles
       b * warps + w, then + gridDim * warps, ... The loop is software pipelined in registers:
       the packed weights (one 128-bit load per lane and group) and scales of the next tile
       go to a second buffer before the arithmetic on the current one, so a warp always has a
       tile of loads in flight; the buffer is then moved into the first. The move waits for
       those loads to land before the next tile's are issued; `pingpong` instead uses the two
       buffers in turn (the loop written out twice), which keeps two tiles in flight but took
       126-166 registers at K = 4096 against 64-111 (and spills at K = 11008), and registers
       decide how many warps an SM holds. No barrier is inside the loop.

Arithmetic is the one-shot kernel's: a lane owns one group of 32 weights per feature
(mlcc_q4_dot8 on each packed word, products summed in pairs in half2, then in float32, the
group's scale applied once), lanes are summed by mlcc_warp_sum and results stored through
mlcc_put (float16, or float32 logits), plus the optional bias. With `rotate` each lane reads the
four words of its group starting at word (lane / 2) % 4: the four 16-byte activation reads of a
quarter warp then fall in distinct banks (without it lanes 0, 2, 4, 6 collide); a group's four
word sums are then added in a rotated order, which changes nothing in practice: each word sum is
a float32 sum of float16 values, and four of them add up exactly in float32 in nearly every case
(tests/compile/test_cuda_gemv_persistent.py emulates both orders). Activations are read from
shared memory 16 bytes at a time.

The integer dot (`dot=DP2A`, mlcc.backends.cuda.intdot) stages the activations differently
(stage_dp2a: 16-bit integers per group of 32, with the group's factor and zero-point sum); a
lane's group of a feature is then sixteen exact dp2a over its four words and one float32
rounding. That is 7 instructions a packed word for the products against ~20 for the float16
dots, and more precise than either: on the H200 the 7B decode gate_up + silu_mul takes 15.1 us
instead of 17.9 (benchmarks/results/2026-11-29-h200-g); the tuning database picks it per shape
(for the plain 7B decode GEMVs in the one-shot kernel of mlcc.backends.cuda.linear, which
stages while all its weight loads are in flight: benchmarks/results/2026-11-29-h200-h).

Rows that do not fit in 48 KB of static shared memory at once are processed in chunks (the
tile loop runs once per chunk and re-reads the weights), so any static row count compiles; a
weight word is reused for every row of a chunk.

GLU mode (`glu=`, the decode linear_silu_mul of mlcc.backends.cuda.glu): the weight is a gate_up
of N = 2I rows and a tile of `rows_per_warp` output features f loads their gate rows f, then
their up rows I + f, into one register buffer (2 * rows_per_warp weight rows, the same loop and
arithmetic as above). After the warp sums, lane 0 rounds g and u to float16 (as the unfused
GEMV stores them), applies the GLU expression and stores y[r, f] ([rows, I]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mlcc.backends.cuda.intdot import DP2A, DP2A_SOURCE, dp2a_group, stage_dp2a
from mlcc.backends.cuda.kernels import GRID_WAIT, CudaKernel, launcher, signature
from mlcc.backends.cuda.linear import LinearShape, gemv_q4_applies, stage_plain
from mlcc.backends.cuda.tuning import PERSISTENT, PersistentConfig, persistent_config, selected_kind
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError

if TYPE_CHECKING:
    from mlcc.backends.cuda.norm_fold import RowNorm

SMS = 132  # streaming multiprocessors of an H200
SHARED_BYTES = 48 * 1024  # static shared memory of one block
RED_BYTES = 32 * 4  # the reduction scratch `red` that fused prologues use
def tile_count(n: int, rows_per_warp: int) -> int:
    return -(-n // rows_per_warp)


def persistent_grid(n: int, rows_per_warp: int, blocks_per_sm: int, warps: int,
                    sms: int = SMS) -> int:
    """Blocks launched: blocks_per_sm x sms, fewer when there are not enough tiles."""
    return max(1, min(blocks_per_sm * sms, -(-tile_count(n, rows_per_warp) // warps)))


def row_bytes(k: int, dot: str = "") -> int:
    """Shared memory one staged row takes: its activations (and with the integer dot, each
    group's float factor and integer zero-point sum)."""
    return 2 * k + (k // 32 * 8 if dot == DP2A else 0)


def row_chunks(rows: int, k: int, dot: str = "") -> list[tuple[int, int]]:
    """(first row, row count) of each staging pass: as many rows as fit in shared memory."""
    per_pass = max(1, min(rows, (SHARED_BYTES - RED_BYTES) // row_bytes(k, dot)))
    return [(r0, min(per_pass, rows - r0)) for r0 in range(0, rows, per_pass)]


def tile_schedule(n: int, rows_per_warp: int, grid: int, warps: int) -> list[tuple[int, int]]:
    """(global warp, output feature) of every feature a launch computes, in program order.

    A model of the kernel's loop: the tile loaded into each register buffer is checked against
    the tile computed from it, so a broken pipeline raises instead of returning."""
    tiles, stride = tile_count(n, rows_per_warp), grid * warps
    done: list[tuple[int, int]] = []
    for gw in range(grid * warps):
        tile = gw
        current = tile if tile < tiles else None  # the loads before staging
        while tile < tiles:
            following = tile + stride if tile + stride < tiles else None
            if current != tile:
                raise AssertionError(f"warp {gw} computes tile {tile} from {current}")
            done += [(gw, f) for f in range(tile * rows_per_warp, (tile + 1) * rows_per_warp)
                     if f < n]
            current = following
            tile += stride
    return done


def _load(s: LinearShape, buf: str, tile: str, rows_per_warp: int, iters: int,
          glu: bool = False) -> str:
    """Issue the weight and scale loads of `tile` into register buffer `buf` (if it exists)."""
    groups = s.k // 32
    guard = "" if groups % 32 == 0 else f"g < {groups} ? "
    zero_w = "" if not guard else " : make_uint4(0u, 0u, 0u, 0u)"
    zero_s = "" if not guard else " : __float2half(0.f)"
    return f"""      if ({tile} < {tile_count(s.n, rows_per_warp)}) {{
        #pragma unroll
        for (int q = 0; q < {rows_per_warp}; ++q) {{
{_glu_feature(s, tile, rows_per_warp) if glu else _feature(s, tile, rows_per_warp)}
          const uint4* wrow = reinterpret_cast<const uint4*>(qw + n * {s.words}LL);
          #pragma unroll
          for (int it = 0; it < {iters}; ++it) {{
            const int g = lane + it * 32;
            w{buf}[q][it] = {guard}__ldg(wrow + g){zero_w};
            s{buf}[q][it] = {guard}qs[n * {s.groups}LL + g]{zero_s};
          }}
        }}
      }}"""


def _feature(s: LinearShape, tile: str, rows_per_warp: int) -> str:
    return f"""          const long long nq = (long long)({tile}) * {rows_per_warp} + q;
          const long long n = nq < {s.n} ? nq : {s.n - 1}LL;"""


def _glu_feature(s: LinearShape, tile: str, rows_per_warp: int) -> str:
    """Weight row q of a GLU tile: gate rows f for q < pairs, then the up rows I + f."""
    pairs, out_n = rows_per_warp // 2, s.n // 2
    up = f"(q < {pairs} ? 0LL : {out_n}LL)"
    return f"""          const long long fq = (long long)({tile}) * {pairs} + q % {pairs};
          const long long n = (fq < {out_n} ? fq : {out_n - 1}LL) + {up};"""


def _compute(s: LinearShape, buf: str, rows_per_warp: int, iters: int, r0: int, count: int,
             rotate: bool, dot: str, glu: str | None = None) -> str:
    """Dot products of the tile in buffer `buf` with `count` staged rows; lane 0 stores."""
    groups, half_k = s.k // 32, s.k // 2
    guard = "true" if groups % 32 == 0 else f"g < {groups}"
    turn = ""
    if rotate:
        turn = """
              v = (rot & 1) ? make_uint4(v.y, v.z, v.w, v.x) : v;
              v = (rot & 2) ? make_uint4(v.z, v.w, v.x, v.y) : v;"""
    words = " + ".join(f"{dot}(v.{c}, reinterpret_cast<const half2*>(&x{j}))"
                       for j, c in enumerate("xyzw"))
    if dot == DP2A:  # exact integer sums of the group, zero point and factors in float32
        words = dp2a_group("v", ("x0", "x1", "x2", "x3"), "zf")
    zf = "" if dot != DP2A else f"\n                const int2 zf = xg_rows[rr * {groups} + g];"
    store = (_store(s, rows_per_warp, r0, count) if glu is None
             else _glu_store(s, rows_per_warp, r0, count, glu))
    return f"""      {{
        float acc[{count}][{rows_per_warp}];
        #pragma unroll
        for (int rr = 0; rr < {count}; ++rr)
          #pragma unroll
          for (int q = 0; q < {rows_per_warp}; ++q) acc[rr][q] = 0.f;
        #pragma unroll
        for (int it = 0; it < {iters}; ++it) {{
          const int g = lane + it * 32;
          if ({guard}) {{
            #pragma unroll
            for (int q = 0; q < {rows_per_warp}; ++q) {{
              uint4 v = w{buf}[q][it];{turn}
              const float sc = __half2float(s{buf}[q][it]);
              #pragma unroll
              for (int rr = 0; rr < {count}; ++rr) {{
                const uint4* xq = reinterpret_cast<const uint4*>(xs_rows + rr * {half_k} + g * 16);
                const uint4 x0 = xq[p0], x1 = xq[p1], x2 = xq[p2], x3 = xq[p3];{zf}
                acc[rr][q] += ({words}) * sc;
              }}
            }}
          }}
        }}
{store}
      }}"""


def _store(s: LinearShape, rows_per_warp: int, r0: int, count: int) -> str:
    return f"""        #pragma unroll
        for (int rr = 0; rr < {count}; ++rr)
          #pragma unroll
          for (int q = 0; q < {rows_per_warp}; ++q) {{
            const float total = mlcc_warp_sum(acc[rr][q]);
            const long long n = (long long)tile * {rows_per_warp} + q;
            if (lane == 0 && n < {s.n})
              mlcc_put(y, ({r0} + rr) * {s.n}LL + n, total{s.bias_term("n")});
          }}"""


def _glu_store(s: LinearShape, rows_per_warp: int, r0: int, count: int, glu: str) -> str:
    """silu(g) * u (the `glu` text) of each pair: gate sums in acc[.][q], up in [q + pairs]."""
    pairs, out_n = rows_per_warp // 2, s.n // 2
    # float16 first: the unfused GEMV stores g and u as float16 and silu_mul reads them back
    gate = f"__half2float(__float2half(sum_g{s.bias_term('f')}))"
    up = f"__half2float(__float2half(sum_u{s.bias_term(f'f + {out_n}')}))"
    return f"""        #pragma unroll
        for (int rr = 0; rr < {count}; ++rr)
          #pragma unroll
          for (int q = 0; q < {pairs}; ++q) {{
            const float sum_g = mlcc_warp_sum(acc[rr][q]);
            const float sum_u = mlcc_warp_sum(acc[rr][q + {pairs}]);
            const long long f = (long long)tile * {pairs} + q;
            if (lane == 0 && f < {out_n}) {{
              const float g = {gate}, u = {up};
              mlcc_put(y, ({r0} + rr) * {out_n}LL + f, {glu.format(g="g", u="u")});
            }}
          }}"""


def _tile_loop(s: LinearShape, cfg: tuple[int, int, int], r0: int, count: int,
               arithmetic: tuple) -> str:
    """The pipelined loop over a warp's tiles; buffer a holds the first tile's loads."""
    _, rows_per_warp, stride = cfg
    rotate, dot, pingpong, glu = arithmetic
    iters = -(-(s.k // 32) // 32)
    tiles = tile_count(s.n, rows_per_warp)
    if pingpong:  # buffers a and b in turn, the loop written out twice
        return f"""    while (tile < {tiles}) {{
{_load(s, "b", f"tile + {stride}", rows_per_warp, iters, glu is not None)}
{_compute(s, "a", rows_per_warp, iters, r0, count, rotate, dot, glu)}
      tile += {stride};
      if (tile >= {tiles}) break;
{_load(s, "a", f"tile + {stride}", rows_per_warp, iters, glu is not None)}
{_compute(s, "b", rows_per_warp, iters, r0, count, rotate, dot, glu)}
      tile += {stride};
    }}"""
    return f"""    while (tile < {tiles}) {{
{_load(s, "b", f"tile + {stride}", rows_per_warp, iters, glu is not None)}
{_compute(s, "a", rows_per_warp, iters, r0, count, rotate, dot, glu)}
      #pragma unroll
      for (int q = 0; q < {rows_per_warp}; ++q)
        #pragma unroll
        for (int it = 0; it < {iters}; ++it) {{ wa[q][it] = wb[q][it]; sa[q][it] = sb[q][it]; }}
      tile += {stride};
    }}"""


def _chunk(s: LinearShape, staging: str, cfg: tuple[int, int, int], r0: int, count: int,
           arithmetic: tuple) -> str:
    """Stage rows r0 .. r0 + count - 1 once, then run the pipelined tile loop over them."""
    warps, rows_per_warp, _ = cfg
    iters = -(-(s.k // 32) // 32)
    # pdl: the first pass waits for the kernel before once its first weight loads are issued
    wait = f"    {GRID_WAIT}  // the weights above need nothing from the kernel before\n" \
        if r0 == 0 else ""
    return f"""  {{
    int tile = blockIdx.x * {warps} + warp;
{_load(s, "a", "tile", rows_per_warp, iters, arithmetic[3] is not None)}
{wait}    __syncthreads();  // the previous pass has finished reading xs_rows
    #pragma unroll 1
    for (int slot = 0; slot < {count}; ++slot) {{
      const int r = {r0} + slot;
      half2* const xs = xs_rows + slot * {s.k // 2};{_factor_slots(s, arithmetic[1])}
{staging}
    }}
    __syncthreads();
{_tile_loop(s, cfg, r0, count, arithmetic)}
  }}"""


def _factor_slots(s: LinearShape, dot: str) -> str:
    if dot != DP2A:
        return ""
    return f"\n      int2* const xg = xg_rows + slot * {s.k // 32};"


def gemv_q4_persistent_kernel(s: LinearShape, name: str, blocks_per_sm: int, warps: int,
                              rows_per_warp: int, staging: str | None = None,
                              buffers: list | None = None, outputs: tuple[str, ...] = ("y",),
                              dot: str = "mlcc_q4_dot8", rotate: bool = True,
                              sms: int = SMS, pingpong: bool = False,
                              glu: str | None = None, norm: RowNorm | None = None) -> CudaKernel:
    """The persistent q4 GEMV of `s` (see the module docstring). `staging` (C++ filling xs from
    row r with warps * 32 threads) replaces the plain copy; `buffers`/`outputs` name the fused
    kernels' parameters; `pingpong` alternates the two register buffers instead of moving.

    `glu` (a C++ expression of float16-rounded `{g}` and `{u}`, such as glu.SILU_MUL) turns on
    the GLU mode: `s` is a gate_up linear of N = 2I features and y[r, f] = glu(g_f, u_f) for
    f < I; a tile then holds `rows_per_warp` output features, i.e. twice as many weight rows.

    `norm` (the integer dot only; mlcc.backends.cuda.norm_fold) stages the RMS-normalized row
    of a residual sum; `buffers` then name the sum x, its partial sums of squares and the
    norm's weight ahead of the linear's."""
    rows = s.static_rows
    if rows is None or not gemv_q4_applies_any_rows(s):
        raise MlccError("compile", f"{name}: the persistent q4 GEMV needs 4-bit weights in "
                        f"groups of 32, float16 activations and scales and a static row count; "
                        f"got {s.spec.op} {s.spec.inputs}; use linear.gen_linear for this spec")
    if glu is not None:
        _check_glu(s, name)
        buffers = buffers or glu_buffers(s)
        rows_per_warp *= 2  # weight rows per tile: the gate rows, then their up rows
    iters = -(-(s.k // 32) // 32)
    buffers = buffers or s.buffers
    if dot == DP2A and staging is not None:
        raise MlccError("compile", f"{name}: the integer dot stages its own activations; a "
                        f"fused prologue needs another dot (e.g. mlcc_q4_dot8_lop3_pairs)")
    if norm is not None and dot != DP2A:
        raise MlccError("compile", f"{name}: a folded norm is staged by the integer dot only")
    staging = staging or (stage_dp2a(s.k, warps, norm) if dot == DP2A else stage_plain(s, warps))
    grid = persistent_grid(s.n, rows_per_warp, blocks_per_sm, warps, sms)
    chunks = row_chunks(rows, s.k, dot)
    if rotate:
        rotation = ("\n  const int rot = (lane >> 1) & 3;\n  const int p0 = rot, "
                    "p1 = (rot + 1) & 3, p2 = (rot + 2) & 3, p3 = (rot + 3) & 3;")
    else:
        rotation = "\n  const int p0 = 0, p1 = 1, p2 = 2, p3 = 3;"
    passes = "\n".join(_chunk(s, staging, (warps, rows_per_warp, grid * warps), r0, count,
                              (rotate, dot, pingpong, glu)) for r0, count in chunks)
    factors = "" if dot != DP2A else f"\n  __shared__ int2 xg_rows[{chunks[0][1] * s.k // 32}];"
    body = f"""{DP2A_SOURCE if dot == DP2A else ""}{signature(name, buffers, outputs, s.symbols)} {{
  __shared__ __align__(16) half2 xs_rows[{chunks[0][1] * s.k // 2}];{factors}
  __shared__ float red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;{rotation}
  uint4 wa[{rows_per_warp}][{iters}], wb[{rows_per_warp}][{iters}];
  half sa[{rows_per_warp}][{iters}], sb[{rows_per_warp}][{iters}];
{passes}
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, buffers, (f"T.int64({grid})",), warps * 32,
                                           s.symbols))


def glu_buffers(s: LinearShape) -> list[tuple]:
    """The GEMV's buffers with y holding the N / 2 gated outputs per row."""
    (name, shape, dtype) = s.buffers[-1]
    return s.buffers[:-1] + [(name, tuple(shape[:-1]) + (s.n // 2,), dtype)]


def _check_glu(s: LinearShape, name: str) -> None:
    if s.n % 2 or s.ydt != "float16":
        raise MlccError("compile", f"{name}: the GLU mode of the persistent GEMV needs an even "
                        f"number of gate_up features and float16 gate_up values; got N = {s.n}, "
                        f"{s.ydt}; keep silu_mul apart for this linear")


def gemv_q4_applies_any_rows(s: LinearShape) -> bool:
    """gemv_q4_applies without the row limit: the layout and dtypes the kernel reads."""
    return (s.quant and s.bits == 4 and s.group == 32 and s.xdt == "float16"
            and s.sdt == "float16" and s.k % 32 == 0 and s.words * 8 == s.k
            and s.static_rows is not None)


def gemv_q4_v2_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    """The persistent GEMV wherever the one-shot q4 GEMV applies, shaped by the database."""
    s = LinearShape(spec)
    if not gemv_q4_applies(s):
        return None
    c = persistent_config(s.n, s.k)
    return gemv_q4_persistent_kernel(s, name, c.blocks_per_sm, c.warps, c.rows_per_warp,
                                     dot=c.dot, rotate=c.rotate, pingpong=c.pingpong)


def gemv_q4_tuned_rule(spec: KernelSpec, name: str) -> CudaKernel | None:
    """gemv_q4_v2_rule unless the database measured the one-shot kernel faster for this shape
    (then None, and the next rule, gemv_q4_rule, takes it)."""
    s = LinearShape(spec)
    if not gemv_q4_applies(s) or selected_kind(s.n, s.k) not in (None, PERSISTENT):
        return None
    return gemv_q4_v2_rule(spec, name)


def fusion_gemv(config: PersistentConfig, sms: int = SMS) -> Callable[..., CudaKernel]:
    """A function with gemv_q4_kernel's signature building the persistent kernel, for the fused
    prologues of mlcc.backends.cuda.fusion: their staging strides by the `warps` they pass, so
    those are kept; the other launch parameters come from `config`."""

    def kernel(s: LinearShape, name: str, warps: int, rows_per_warp: int,
               buffers: list | None = None, staging: str | None = None,
               outputs: tuple[str, ...] = ("y",), dot: str = "mlcc_q4_dot8") -> CudaKernel:
        return gemv_q4_persistent_kernel(s, name, config.blocks_per_sm, warps,
                                         config.rows_per_warp, staging, buffers, outputs,
                                         dot, config.rotate, sms, config.pingpong)

    return kernel
