"""The integer dot of the q4 decode GEMVs (mlcc.backends.cuda.gemv, mlcc.backends.cuda.linear).

Activations are staged per group of 32 as 16-bit integers, each value times 2^(14 - E) with E
the exponent of the group's largest |x| (exact for every value within 16x of it), beside the
group's factor 2^(E - 14) and seven times its integer sum (the codes' zero point). The products
of a packed weight word are then four dp2a (two byte codes times two 16-bit values, added to an
int32): a group's sum over its 32 codes is exact, and (sum - zero point) x factor x scale is its
one float32 rounding. That is 7 instructions a packed word for the products against ~20 for the
float16 nibble dots of kernels.py, and more precise than either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlcc.backends.cuda.norm_fold import RowNorm

# The integer dot (see DP2A_SOURCE): activations staged as 16-bit integers per group of 32
DP2A = "mlcc_q4_dp2a"
DP2A_SOURCE = r"""
#ifndef MLCC_Q4_DP2A
#define MLCC_Q4_DP2A
// Integer products of one packed word: codes c_0..c_7 (nibble j = element j) times the staged
// 16-bit activations of the word, xp = ((a_0, a_2), (a_4, a_6), (a_1, a_3), (a_5, a_7)); the
// even and odd nibbles become bytes by one mask each, and dp2a multiplies two byte codes by
// two 16-bit values and adds them to the running sum, exactly.
__device__ __forceinline__ int mlcc_q4_dp2a(unsigned w, uint4 xp, int acc) {
  const int lo = (int)(w & 0x0F0F0F0Fu), hi = (int)((w >> 4) & 0x0F0F0F0Fu);
  acc = __dp2a_lo((int)xp.x, lo, acc);
  acc = __dp2a_hi((int)xp.y, lo, acc);
  acc = __dp2a_lo((int)xp.z, hi, acc);
  return __dp2a_hi((int)xp.w, hi, acc);
}
#endif
"""


def row_loads(k: int, warps: int, row: str = "r") -> str:
    """Issue the loads of activation row `row` that stage_dp2a(..., preloaded=True) stages:
    thread t's groups t, t + threads, ... into sraw (four 16-byte words a group)."""
    groups, threads = k // 32, warps * 32
    per = -(-groups // threads)
    return f"""    uint4 sraw[{per}][4];
    #pragma unroll
    for (int i = 0; i < {per}; ++i) {{
      const int gi = threadIdx.x + i * {threads};
      const uint4* src = reinterpret_cast<const uint4*>(x + ({row}) * {k}LL + gi * 32);
      #pragma unroll
      for (int j = 0; j < 4; ++j) sraw[i][j] = gi < {groups} ? src[j] : make_uint4(0u, 0u, 0u, 0u);
    }}"""


def stage_dp2a(k: int, warps: int, norm: RowNorm | None = None,
               preloaded: bool = False) -> str:
    """Stage activation row r for the integer dot: thread t takes groups t, t + threads, ...
    of 32 values; with E the exponent of the group's largest |x|, each value times 2^(14 - E)
    rounded to an integer fits 16 bits (|.| < 2^15; values within 16x of the largest are
    exact), stored per word as ((a_0, a_2), (a_4, a_6), (a_1, a_3), (a_5, a_7)); the group's
    7 x its integer sum (the codes' zero point) and factor 2^(E - 14) go to xg, read together
    as one 8-byte word. A group holding inf or NaN gets a NaN factor (and zero integers), so
    the output is NaN as a float dot would make it.

    With `norm` (mlcc.backends.cuda.norm_fold) x holds a residual sum and each value is first
    RMS-normalized as the one-row norm kernel would store it (float16), with the row's inverse
    RMS taken from the partial sums of squares that the GEMV ahead wrote.

    With `preloaded` the row's words come from registers that row_loads filled (sraw)."""
    groups = k // 32
    prelude, load = "", "raw[j] = src[j];"
    loop = f"for (int gi = threadIdx.x; gi < {groups}; gi += {warps * 32}) {{"
    if preloaded:
        if norm is not None:
            raise ValueError("a preloaded row is staged without a folded norm")
        per = -(-groups // (warps * 32))
        load = "raw[j] = sraw[i][j];"
        loop = (f"#pragma unroll\n    for (int i = 0; i < {per}; ++i) {{\n"
                f"      const int gi = threadIdx.x + i * {warps * 32};\n"
                f"      if (gi >= {groups}) break;")
    if norm is not None:
        prelude = norm.prelude(groups)
        load = f"""const uint4 wv = gi == threadIdx.x ? first_w[j]
                        : reinterpret_cast<const uint4*>(nw + gi * 32)[j];
        raw[j] = gi == threadIdx.x ? first_x[j] : src[j];{norm.apply("raw[j]", "wv")}"""
    return f"""{prelude}    {loop}
      const uint4* src = reinterpret_cast<const uint4*>(x + r * {k}LL + gi * 32);
      uint4 raw[4];
      unsigned mb = 0u;  // the largest |x| as float16 bits: ordered as the values, inf/NaN last
      #pragma unroll
      for (int j = 0; j < 4; ++j) {{
        {load}
        const unsigned v[4] = {{raw[j].x, raw[j].y, raw[j].z, raw[j].w}};
        #pragma unroll
        for (int e = 0; e < 4; ++e) {{
          const unsigned lo = v[e] & 0x7FFFu, hi = (v[e] >> 16) & 0x7FFFu;
          mb = lo > mb ? lo : mb;
          mb = hi > mb ? hi : mb;
        }}
      }}
      const float m = __half2float(__ushort_as_half((unsigned short)mb));
      const int ex = ((__float_as_int(m) >> 23) & 0xFF) - 127;  // floor(log2 m); m is normal
      const bool finite = mb < 0x7C00u;  // no inf or NaN in the group
      const float up = mb != 0u && finite ? __int_as_float((127 + 14 - ex) << 23) : 0.f;
      const float factor = !finite ? __int_as_float(0x7FC00000)
                           : mb != 0u ? __int_as_float((127 - 14 + ex) << 23) : 0.f;
      int total = 0;
      uint4* dst = reinterpret_cast<uint4*>(xs) + gi * 4;
      #pragma unroll
      for (int j = 0; j < 4; ++j) {{
        const half* h = reinterpret_cast<const half*>(&raw[j]);
        int a[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) {{
          a[e] = __float2int_rn(__half2float(h[e]) * up);
          total += a[e];
        }}
        unsigned u[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) u[e] = (unsigned)a[e] & 0xFFFFu;
        dst[j] = make_uint4(u[0] | (u[2] << 16), u[4] | (u[6] << 16), u[1] | (u[3] << 16),
                            u[5] | (u[7] << 16));
      }}
      xg[gi] = make_int2(7 * total, __float_as_int(factor));
    }}"""


def dp2a_group(v: str, xs: tuple[str, str, str, str], zf: str) -> str:
    """The float32 term of one group: packed words v.x .. v.w against the staged 16-bit words
    xs (one uint4 each), zf the group's (7 x integer sum, factor bits) int2."""
    x0, x1, x2, x3 = xs
    return (f"(float)(mlcc_q4_dp2a({v}.x, {x0}, mlcc_q4_dp2a({v}.y, {x1}, 0)) + "
            f"mlcc_q4_dp2a({v}.z, {x2}, mlcc_q4_dp2a({v}.w, {x3}, 0)) - {zf}.x) * "
            f"__int_as_float({zf}.y)")
