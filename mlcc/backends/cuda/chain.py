"""The decode chain: one persistent kernel per layer from o_proj to the next layer's first GEMV.

Between two decode attentions a Llama layer runs six kernels of one row each:

    q_linear(a, Wo) -> d;  add_rms_norm(d, res, w1) -> (h1, s1);  linear_silu_mul(h1, Wgu) -> g;
    q_linear(g, Wd) -> d2;  add_rms_norm(d2, s1, w2) -> (h2, s2);  q_linear(h2, Wn) -> y

(Wn: the next layer's qkv, or the output projection after the last layer). Each kernel boundary
drains the GPU and restarts the weight stream. `fuse_chain` replaces the six calls by one
`decode_chain` call -> (y, s2), run by one kernel of one block per SM with a grid-wide barrier
between its four phases (o_proj + residual | norm + gate_up + silu_mul | down + residual |
norm + Wn). In every block:

- a producer warp streams the block's share of all four weight matrices, in order, through a
  ring of NSLOT shared-memory slots with bulk copies (cp.async.bulk, sm_90; completion counted
  on an mbarrier per slot). Weights depend on nothing the step computes, so the stream starts
  before the kernel waits for the attention ahead and never waits for a barrier; it keeps at
  most CAP chunks in flight, since more only queue in the memory system where the barrier polls
  and activation loads would wait behind them;
- after each barrier the eight consumer warps stage the phase's activation row once per block
  for the integer dot (mlcc.backends.cuda.intdot: groups of 32 as 16-bit integers, exact dp2a
  sums, one float rounding per group), RMS-normalizing it first where the phase has a norm;
  each lane keeps the groups it multiplies in registers for the whole phase;
- teams of KS warps (KS splitting K) take the block's chunks in turn, so the teams work on
  different slots at once, and one lane per chunk writes its rows through the phase's epilogue.

Every value is rounded where the six kernels round it (float16 results of each GEMV, the
residual sums, the normalized rows, g and u before silu); the dot products differ from the
library's GEMVs in summation order (and from those taking the float16 pair dot, in its
rounding). s1 and the GLU result live in `__device__` scratch arrays of the kernel, beside
counts that the last block out resets: one launch at a time per library (as the decode
attention's scratch: calls on one stream). The inputs are read before the first barrier and
the outputs written after it, so the memory plan may put an output over an input.

Every block takes all of an SM's shared memory, and the barriers need every participating block
resident at once. The grid is GRID blocks (the most SMs of an sm_90 GPU); the first nb to
arrive take part, in their order of arrival, and the rest leave at once, so a GPU with fewer
SMs runs the chain on what it has. nb is counted by the first launch (whose one participating
block does all the work): the SMs its blocks ran on. The next kernel is released at the end
only (no early pdl trigger: its waiting blocks would sit beside this kernel's).

Measured on an H200 (benchmarks/results/2026-11-30-h200-b): standalone (benchmarks/cuda/
chain_proto.cu) 32 layers of the 7B chain take 1.30 ms against 1.40 ms for the six kernels of
the library, but in the decode step the chain ties them (0.99x): a barrier's release takes
1.1-2.5 us while the weight stream loads the memory system (0.6 us without it), and the windows
of barrier and staging are longer than the ring covers. Releasing the next kernel early made it
0.91x. Correct: 5.7e-3 of the logits' scale from the library without it over 65 steps of the
7B, the same greedy tokens. Opt-in knob `decode_chain`.
"""

from __future__ import annotations

from mlcc.backends.cuda import glu
from mlcc.backends.cuda.intdot import DP2A_SOURCE
from mlcc.backends.cuda.kernels import C_TYPES, GRID_WAIT, CudaKernel, fp
from mlcc.backends.plan import EntryPlan, KernelCall, KernelSpec

OP = "decode_chain"
CW = 8  # consumer warps
THREADS = 32 * (CW + 1)
RQ = 4  # rows of a chunk of the K = hidden phases (gate_up: RQ / 2 features, gate and up rows)
RD = 2  # rows of a chunk of the down projection
KSD = 2  # warps splitting K of the down projection
NSLOT = 16  # ring slots (power of two)
CAP = 3  # chunks in flight per block
RED_FLOATS = CW * 32
RESID = 256  # residual rows a block keeps in shared memory (more are read from memory)
MAX_SMEM = 232448  # dynamic shared memory a block may have on sm_90
GRID = 132  # blocks launched: the most SMs of an sm_90 GPU (fewer take part where it has fewer)


def _row_bytes(k: int) -> int:
    return k // 2 + k // 16  # packed 4-bit weights + float16 scales of one row


def layout(h: int, i: int) -> dict[str, int]:
    """Byte offsets of the shared-memory parts for hidden size h and intermediate size i."""
    slot = max(RQ * _row_bytes(h), RD * _row_bytes(i))
    xs = max(h, i) // 32 * (64 + 8)
    parts = {"ring": 0}
    parts["red"] = NSLOT * slot
    parts["bars"] = parts["red"] + 2 * RED_FLOATS * 4
    parts["xs"] = parts["bars"] + 2 * NSLOT * 8
    parts["nred"] = parts["xs"] + xs
    parts["resid"] = parts["nred"] + 64
    parts["share"] = parts["resid"] + RESID * 4
    parts["total"] = parts["share"] + 16
    parts["slot"] = slot
    return parts


# ------------------------------------------------------------------------------ the plan


def _q4(spec: KernelSpec, k: int, n: int | None = None) -> bool:
    """A 4-bit, group-32 q_linear-like spec of one float16 row over k inputs, no bias."""
    attrs = dict(spec.attrs)
    if attrs.get("bits") != 4 or attrs.get("group_size") != 32:
        return False
    (xshape, xdt), (wshape, wdt), (sshape, sdt) = spec.inputs[:3]
    if len(spec.inputs) != 3 or xshape != (1, k) or xdt != "float16":
        return False
    if wdt != "uint32" or sdt != "float16" or wshape[1] != k // 8 or sshape[1] != k // 32:
        return False
    return n is None or wshape[0] == n


def _norm(spec: KernelSpec, h: int) -> bool:
    return (spec.op == "add_rms_norm" and all(s == ((1, h), "float16") for s in spec.inputs[:2])
            and spec.inputs[2] == ((h,), "float16"))


def _match(run: list[KernelCall], later: list[KernelCall]) -> KernelCall | None:
    """The decode_chain call replacing the six calls of `run`, or None."""
    o, n1, g, d, n2, nxt = run
    if o.spec.op != "q_linear" or g.spec.op != glu.OP or d.spec.op != "q_linear":
        return None
    if nxt.spec.op != "q_linear" or dict(g.spec.attrs).get(glu.WEIGHTS_ATTR) != "q4":
        return None
    h = o.spec.inputs[0][0][-1]
    if not isinstance(h, int) or not _q4(o.spec, h, h) or not _norm(n1.spec, h):
        return None
    if not _norm(n2.spec, h) or not _q4(g.spec, h) or not _q4(nxt.spec, h):
        return None
    i2 = g.spec.inputs[1][0][0]
    i = i2 // 2
    if not _q4(d.spec, i, h) or g.spec.outputs[0] != ((1, i), "float16"):
        return None
    if o.spec.outputs[0] != ((1, h), "float16") or d.spec.outputs[0] != ((1, h), "float16"):
        return None
    n3 = nxt.spec.inputs[1][0][0]
    (yshape, ydt) = nxt.spec.outputs[0]
    if yshape != (1, n3) or ydt not in ("float16", "float32"):
        return None
    # TMA rows: whole 16-byte units of weights and scales; every phase in whole chunks
    if h % 256 or i % 256 or h % RQ or i % (RQ // 2) or h % RD or n3 % RQ:
        return None
    if layout(h, i)["total"] > MAX_SMEM:
        return None
    # the wiring: each result read by the next call of the run and by nothing after it
    dres = o.buffers[3]
    if dres not in n1.buffers[:2]:
        return None
    res = n1.buffers[1] if n1.buffers[0] == dres else n1.buffers[0]
    h1, s1 = n1.buffers[3], n1.buffers[4]
    if g.buffers[0] != h1 or d.buffers[0] != g.buffers[3]:
        return None
    d2 = d.buffers[3]
    if {n2.buffers[0], n2.buffers[1]} != {d2, s1}:
        return None
    h2, s2 = n2.buffers[3], n2.buffers[4]
    if nxt.buffers[0] != h2:
        return None
    internal = (dres, h1, s1, g.buffers[3], d2, h2)
    if any(b in c.buffers for c in later for b in internal):
        return None
    a1, a2 = dict(n1.spec.attrs), dict(n2.spec.attrs)
    attrs = (("eps1", a1["eps"]), ("eps2", a2["eps"]), ("hidden", h), ("intermediate", i),
             ("offset1", a1["weight_offset"]), ("offset2", a2["weight_offset"]))
    inputs = (o.spec.inputs[0], n1.spec.inputs[0], o.spec.inputs[1], o.spec.inputs[2],
              n1.spec.inputs[2], g.spec.inputs[1], g.spec.inputs[2], d.spec.inputs[1],
              d.spec.inputs[2], n2.spec.inputs[2], nxt.spec.inputs[1], nxt.spec.inputs[2])
    buffers = [o.buffers[0], res, o.buffers[1], o.buffers[2], n1.buffers[2], g.buffers[1],
               g.buffers[2], d.buffers[1], d.buffers[2], n2.buffers[2], nxt.buffers[1],
               nxt.buffers[2], nxt.buffers[3], s2]
    spec = KernelSpec(OP, inputs, (nxt.spec.outputs[0], ((1, h), "float16")), attrs)
    return KernelCall(spec, buffers)


def fuse_chain(plan: EntryPlan) -> EntryPlan:
    """The plan with every (o_proj, add_rms_norm, GLU, down, add_rms_norm, q_linear) run of a
    one-row decode replaced by a decode_chain call (run after the GLU fusion)."""
    calls, out, i = list(plan.calls), [], 0
    while i < len(calls):
        fused = _match(calls[i:i + 6], calls[i + 6:]) if i + 6 <= len(calls) else None
        if fused is None:
            out.append(calls[i])
            i += 1
            continue
        out.append(fused)
        i += 6
    return EntryPlan(plan.name, plan.args, out, plan.workspace_bytes, plan.symbols, plan.bounds)


# ------------------------------------------------------------------------------ the kernel

HELPERS = r"""
#ifndef MLCC_CHAIN_HELPERS
#define MLCC_CHAIN_HELPERS
// Helpers of the decode chain kernels (mlcc.backends.cuda.chain); sm_90 and newer.
__device__ __forceinline__ unsigned mlcc_chain_smem(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mlcc_chain_wait(unsigned bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("{\n .reg .pred p;\n MLCC_CHAIN_WAIT_%=:\n"
               " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               " @!p bra MLCC_CHAIN_WAIT_%=;\n}" ::"r"(bar), "r"(parity) : "memory");
#endif
}
__device__ __forceinline__ void mlcc_chain_arrive(unsigned bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mlcc_chain_expect(unsigned bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void mlcc_chain_copy(unsigned dst, const void* src, unsigned bytes,
                                                unsigned bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mlcc_chain_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Every consumer thread calls this; one thread per block counts in, then waits for all.
__device__ __forceinline__ void mlcc_chain_grid_barrier(unsigned* count, unsigned target,
                                                        int consumers) {
  mlcc_chain_sync(1, consumers);
  if (threadIdx.x == 32) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
    unsigned seen = 0u;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(count) : "memory");
    } while (seen < target);
#endif
  }
  mlcc_chain_sync(1, consumers);
}
// Chunks [c0, c1) of `chunks` that participant b of nb takes.
__device__ __forceinline__ void mlcc_chain_range(int chunks, int b, int nb, int& c0, int& c1) {
  c0 = (int)((long long)b * chunks / nb);
  c1 = (int)((long long)(b + 1) * chunks / nb);
}
// Staged activations of one group for the integer dot (mlcc.backends.cuda.intdot).
struct MlccChainGroup {
  uint4 x[4];
  int2 zf;
};
__device__ __forceinline__ float mlcc_chain_term(uint4 w, const MlccChainGroup& s, half scale) {
  const int d = mlcc_q4_dp2a(w.x, s.x[0], mlcc_q4_dp2a(w.y, s.x[1], 0)) +
                mlcc_q4_dp2a(w.z, s.x[2], mlcc_q4_dp2a(w.w, s.x[3], 0));
  return (float)(d - s.zf.x) * __int_as_float(s.zf.y) * __half2float(scale);
}

// Stage an activation row of K values once per block (CW consumer warps): TPG threads a
// group, each VPT = 32 / TPG values; with `norm` the row is first RMS-normalized as
// add_rms_norm stores it (float16 of x * inv * (w + offset)). Staged groups go to shared
// memory as xq[k][g] and xzf[g]; then each lane loads the groups it multiplies,
// g = q * 32 + lane + j * 32 * KS, into st. With `res`, the residual rows [r0, r0 + rows)
// go to resid[] first.
template <int K, int KS, int CW, int J>
__device__ __forceinline__ void mlcc_chain_stage(const half* src, const half* norm, float eps,
                                                 float offset, int q, MlccChainGroup* st,
                                                 unsigned char* xs, float* nred,
                                                 const half* res, int r0, int rows,
                                                 float* resid, int resid_cap) {
  constexpr int G = K / 32, T = CW * 32;
  constexpr int TPG = 2 * G <= T ? 2 : 1, VPT = 32 / TPG, UPT = 4 / TPG, PER = T / TPG;
  constexpr int JT = (G + PER - 1) / PER;
  uint4* xq = reinterpret_cast<uint4*>(xs);
  int2* xzf = reinterpret_cast<int2*>(xs + 4 * G * 16);
  const int t = threadIdx.x - 32, part = t % TPG, lane = threadIdx.x % 32;
  half v[JT][VPT];
  uint4 nw[JT][UPT];
  #pragma unroll
  for (int j = 0; j < JT; ++j) {
    const int g = t / TPG + j * PER;
    #pragma unroll
    for (int u = 0; u < UPT; ++u) {
      uint4 a = make_uint4(0u, 0u, 0u, 0u), w = a;
      if (g < G) {
        a = __ldcg(reinterpret_cast<const uint4*>(src + g * 32 + part * VPT) + u);
        if (norm != nullptr) w = reinterpret_cast<const uint4*>(norm + g * 32 + part * VPT)[u];
      }
      *reinterpret_cast<uint4*>(v[j] + 8 * u) = a;
      nw[j][u] = w;
    }
  }
  if (res != nullptr)
    for (int r = t; r < rows && r < resid_cap; r += T) resid[r] = __half2float(__ldcg(res + r0 + r));
  if (norm != nullptr) {
    float sq = 0.f;
    #pragma unroll
    for (int j = 0; j < JT; ++j)
      #pragma unroll
      for (int e = 0; e < VPT; ++e) {
        const float a = __half2float(v[j][e]);
        sq += a * a;
      }
    sq = mlcc_warp_sum(sq);
    if (lane == 0) nred[t / 32] = sq;
    mlcc_chain_sync(1, T);
    float total = 0.f;
    #pragma unroll
    for (int w = 0; w < CW; ++w) total += nred[w];
    const float inv = 1.0f / sqrtf(total / (float)K + eps);
    #pragma unroll
    for (int j = 0; j < JT; ++j)
      #pragma unroll
      for (int u = 0; u < UPT; ++u) {
        const half* wh = reinterpret_cast<const half*>(&nw[j][u]);
        #pragma unroll
        for (int e = 0; e < 8; ++e)
          v[j][8 * u + e] = __float2half(__half2float(v[j][8 * u + e]) * inv *
                                         (__half2float(wh[e]) + offset));
      }
  }
  #pragma unroll
  for (int j = 0; j < JT; ++j) {
    const int g = t / TPG + j * PER;
    unsigned mb = 0u;  // the largest |x| as float16 bits
    #pragma unroll
    for (int e = 0; e < VPT; ++e) {
      const unsigned b = __half_as_ushort(v[j][e]) & 0x7FFFu;
      mb = b > mb ? b : mb;
    }
    if (TPG == 2) {  // every lane takes part (lanes past the row hold zeros)
      const unsigned o = __shfl_xor_sync(0xffffffffu, mb, 1);
      mb = o > mb ? o : mb;
    }
    const float m = __half2float(__ushort_as_half((unsigned short)mb));
    const int ex = ((__float_as_int(m) >> 23) & 0xFF) - 127;
    const bool finite = mb < 0x7C00u;
    const float up = mb != 0u && finite ? __int_as_float((127 + 14 - ex) << 23) : 0.f;
    const float factor = !finite ? __int_as_float(0x7FC00000)
                         : mb != 0u ? __int_as_float((127 - 14 + ex) << 23) : 0.f;
    int total = 0;
    #pragma unroll
    for (int u = 0; u < UPT; ++u) {
      int a[8];
      #pragma unroll
      for (int e = 0; e < 8; ++e) {
        a[e] = __float2int_rn(__half2float(v[j][8 * u + e]) * up);
        total += a[e];
      }
      unsigned w[8];
      #pragma unroll
      for (int e = 0; e < 8; ++e) w[e] = (unsigned)a[e] & 0xFFFFu;
      if (g < G)
        xq[(part * UPT + u) * G + g] = make_uint4(w[0] | (w[2] << 16), w[4] | (w[6] << 16),
                                                  w[1] | (w[3] << 16), w[5] | (w[7] << 16));
    }
    if (TPG == 2) total += __shfl_xor_sync(0xffffffffu, total, 1);
    if (g < G && part == 0) xzf[g] = make_int2(7 * total, __float_as_int(factor));
  }
  mlcc_chain_sync(1, T);
  #pragma unroll
  for (int j = 0; j < J; ++j) {
    const int g = q * 32 + lane + j * 32 * KS;
    if (g < G) {
      #pragma unroll
      for (int k = 0; k < 4; ++k) st[j].x[k] = xq[k * G + g];
      st[j].zf = xzf[g];
    }
  }
}

// The producer's share of one phase: chunks [c0, c1) of R rows (GLU: R gate rows at r0 and R
// up rows at UP + r0), each into slot it % NSLOT after that slot's previous chunk is released
// and at most CAP chunks are in flight.
template <int K, int R, int NSLOT, int CAP, int SLOT, bool GLU, long long UP>
__device__ __forceinline__ void mlcc_chain_produce(const unsigned* w, const half* s, int chunks,
                                                   int b, int nb, unsigned char* ring,
                                                   unsigned full, unsigned empty, int& it) {
  constexpr int WB = K / 2, SB = K / 16, SZ = (GLU ? 2 : 1) * R * (WB + SB);
  int c0, c1;
  mlcc_chain_range(chunks, b, nb, c0, c1);
  const unsigned char* wb = reinterpret_cast<const unsigned char*>(w);
  const unsigned char* sb = reinterpret_cast<const unsigned char*>(s);
  for (int c = c0; c < c1; ++c, ++it) {
    const int slot = it % NSLOT, round = it / NSLOT;
    if (round > 0) mlcc_chain_wait(empty + 8 * slot, (round - 1) & 1);
    if (it >= CAP) mlcc_chain_wait(full + 8 * ((it - CAP) % NSLOT), ((it - CAP) / NSLOT) & 1);
    const unsigned dst = mlcc_chain_smem(ring + (size_t)slot * SLOT), bar = full + 8 * slot;
    mlcc_chain_expect(bar, SZ);
    const long long r0 = (long long)c * R;
    if (GLU) {
      mlcc_chain_copy(dst, wb + r0 * WB, R * WB, bar);
      mlcc_chain_copy(dst + R * WB, wb + (UP + r0) * WB, R * WB, bar);
      mlcc_chain_copy(dst + 2 * R * WB, sb + r0 * SB, R * SB, bar);
      mlcc_chain_copy(dst + 2 * R * WB + R * SB, sb + (UP + r0) * SB, R * SB, bar);
    } else {
      mlcc_chain_copy(dst, wb + r0 * WB, R * WB, bar);
      mlcc_chain_copy(dst + R * WB, sb + r0 * SB, R * SB, bar);
    }
  }
}

// The consumers' share of one phase: teams of KS warps (warp q of team `team` multiplying
// groups q * 32 + lane + j * 32 * KS) take chunks team, team + CW / KS, ... of the block's
// share; one lane per chunk releases its slot and calls emit(chunk, row, value) for its RR
// rows in order.
template <int K, int KS, int RR, int CW, int NSLOT, int SLOT, int J, typename Emit>
__device__ __forceinline__ void mlcc_chain_consume(const unsigned char* ring, unsigned full,
                                                   unsigned empty, int chunks, int b, int nb,
                                                   int& it, const MlccChainGroup* st,
                                                   float* red, Emit emit) {
  constexpr int G = K / 32, TEAMS = CW / KS, WB = K / 2;
  const int warp = threadIdx.x / 32 - 1, lane = threadIdx.x % 32, team = warp / KS, q = warp % KS;
  int c0, c1;
  mlcc_chain_range(chunks, b, nb, c0, c1);
  for (int k = team; k < c1 - c0; k += TEAMS) {
    const int i = it + k, slot = i % NSLOT;
    mlcc_chain_wait(full + 8 * slot, (i / NSLOT) & 1);
    const unsigned char* base = ring + (size_t)slot * SLOT;
    const uint4* wq = reinterpret_cast<const uint4*>(base);
    const half* sc = reinterpret_cast<const half*>(base + RR * WB);
    float part[RR];
    #pragma unroll
    for (int row = 0; row < RR; ++row) {
      float acc = 0.f;
      #pragma unroll
      for (int j = 0; j < J; ++j) {
        const int g = q * 32 + lane + j * 32 * KS;
        if (g < G) acc += mlcc_chain_term(wq[row * (WB / 16) + g], st[j], sc[row * G + g]);
      }
      part[row] = acc;
    }
    #pragma unroll
    for (int row = 0; row < RR; ++row) part[row] = mlcc_warp_sum(part[row]);
    if (KS == 1) {
      __syncwarp();
      if (lane == 0) {
        mlcc_chain_arrive(empty + 8 * slot);
        #pragma unroll
        for (int row = 0; row < RR; ++row) emit(c0 + k, row, part[row]);
      }
    } else {
      float* r = red + (team * 2 + ((k / TEAMS) & 1)) * RR * KS;
      if (lane == 0) {
        #pragma unroll
        for (int row = 0; row < RR; ++row) r[row * KS + q] = part[row];
      }
      mlcc_chain_sync(2 + team, 32 * KS);
      if (q == 0 && lane == 0) {
        mlcc_chain_arrive(empty + 8 * slot);
        #pragma unroll
        for (int row = 0; row < RR; ++row) {
          float v = 0.f;
          #pragma unroll
          for (int t = 0; t < KS; ++t) v += r[row * KS + t];
          emit(c0 + k, row, v);
        }
      }
    }
  }
  it += c1 - c0;
}
#endif
"""


def _j(k: int, ks: int) -> int:
    return -(-(k // 32) // (32 * ks))


def gen_decode_chain(spec: KernelSpec, name: str) -> CudaKernel:
    attrs = dict(spec.attrs)
    h, i = attrs["hidden"], attrs["intermediate"]
    n3 = spec.inputs[10][0][0]
    ydt = spec.outputs[0][1]
    lay = layout(h, i)
    slot = lay["slot"]
    rg = RQ // 2
    jh, jd = _j(h, 1), _j(i, KSD)
    ctype = C_TYPES[ydt]
    store = "__float2half(v)" if ydt == "float16" else "v"
    eps1, eps2 = fp(attrs["eps1"]), fp(attrs["eps2"])
    off1, off2 = fp(attrs["offset1"]), fp(attrs["offset2"])
    body = f"""
__device__ half {name}_s1[{h}];   // residual after o_proj
__device__ half {name}_act[{i}];  // silu(gate) * up
// [0] grid barrier count, [1] blocks out, [2] tickets handed out (all three zero between
// launches), [3] blocks that take part (0 until the first launch has counted the SMs)
__device__ unsigned {name}_bar[4];
__device__ unsigned {name}_sms[8];  // the SMs a block of the first launch ran on

// One thread of every block, as the block leaves: the last of the grid resets the counts and,
// after the first launch, sets how many blocks take part: the SMs its blocks ran on (each block
// takes a whole SM, so they were all resident at once; never more than the GPU has).
__device__ __forceinline__ void {name}_out() {{
  __threadfence();
  if (atomicAdd({name}_bar + 1, 1u) == gridDim.x - 1) {{
    if ({name}_bar[3] == 0u) {{
      unsigned n = 0u;
      for (int w = 0; w < 8; ++w) n += __popc({name}_sms[w]);
      {name}_bar[3] = n;
    }}
    {name}_bar[0] = 0u;
    {name}_bar[1] = 0u;
    {name}_bar[2] = 0u;
    __threadfence();
  }}
}}

__device__ __forceinline__ int {name}_dev(
    const half* a, const half* res, const unsigned* wo, const half* so, const half* nw1,
    const unsigned* wgu, const half* sgu, const unsigned* wd, const half* sd, const half* nw2,
    const unsigned* wn, const half* sn, {ctype}* y, half* s2, unsigned char* smem) {{
  unsigned char* ring = smem;
  float* red = reinterpret_cast<float*>(smem + {lay["red"]});
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + {lay["bars"]});
  unsigned char* xs = smem + {lay["xs"]};
  float* nred = reinterpret_cast<float*>(smem + {lay["nred"]});
  float* resid = reinterpret_cast<float*>(smem + {lay["resid"]});
  const unsigned full = mlcc_chain_smem(bars), empty = mlcc_chain_smem(bars + {NSLOT});
  // The grid has {GRID} blocks; the first nb to arrive take part (b: the order of arrival),
  // so every one of them is resident whatever the GPU's SM count; the rest leave at once.
  // Until the first launch has counted the SMs, one block does all the work.
  unsigned* share = reinterpret_cast<unsigned*>(smem + {lay["share"]});
  if (threadIdx.x == 0) {{
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    if (smid < 256u) atomicOr({name}_sms + smid / 32, 1u << (smid % 32));
    const unsigned counted = *reinterpret_cast<volatile unsigned*>({name}_bar + 3);
    share[0] = atomicAdd({name}_bar + 2, 1u);
    share[1] = counted == 0u ? 1u : (counted < gridDim.x ? counted : gridDim.x);
  }}
  __syncthreads();
  const int b = (int)share[0], nb = (int)share[1];
  if (b >= nb) {{
    if (threadIdx.x == 0) {name}_out();
    return 0;
  }}
  if (threadIdx.x == 0) {{
    for (int s = 0; s < {NSLOT}; ++s) {{
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(full + 8 * s) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(empty + 8 * s) : "memory");
    }}
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }}
  __syncthreads();
  int it = 0;
  if (threadIdx.x < 32) {{  // the producer: one lane streams the four phases' rows
    if (threadIdx.x == 0) {{
      mlcc_chain_produce<{h}, {RQ}, {NSLOT}, {CAP}, {slot}, false, 0>(wo, so, {h // RQ}, b, nb,
                                                                      ring, full, empty, it);
      mlcc_chain_produce<{h}, {rg}, {NSLOT}, {CAP}, {slot}, true, {i}LL>(wgu, sgu, {i // rg}, b,
                                                                       nb, ring, full, empty, it);
      mlcc_chain_produce<{i}, {RD}, {NSLOT}, {CAP}, {slot}, false, 0>(wd, sd, {h // RD}, b, nb,
                                                                      ring, full, empty, it);
      mlcc_chain_produce<{h}, {RQ}, {NSLOT}, {CAP}, {slot}, false, 0>(wn, sn, {n3 // RQ}, b, nb,
                                                                      ring, full, empty, it);
    }}
    return 0;
  }}
  const int warp = threadIdx.x / 32 - 1;
  unsigned* count = {name}_bar;
  {GRID_WAIT}  // the attention ahead has finished: a and res are final
  {{  // o_proj, + residual -> s1
    MlccChainGroup st[{jh}];
    int c0, c1;
    mlcc_chain_range({h // RQ}, b, nb, c0, c1);
    const int r0 = c0 * {RQ}, rows = (c1 - c0) * {RQ};
    mlcc_chain_stage<{h}, 1, {CW}, {jh}>(a, nullptr, 0.f, 0.f, 0, st, xs, nred, res, r0, rows,
                                          resid, {RESID});
    mlcc_chain_consume<{h}, 1, {RQ}, {CW}, {NSLOT}, {slot}, {jh}>(
        ring, full, empty, {h // RQ}, b, nb, it, st, red, [&](int c, int row, float v) {{
          const int n = c * {RQ} + row, at = n - r0;
          const float r = at < {RESID} ? resid[at] : __half2float(__ldcg(res + n));
          {name}_s1[n] = __float2half(__half2float(__float2half(v)) + r);
        }});
  }}
  mlcc_chain_grid_barrier(count, nb, {CW * 32});
  // No early release of the next kernel (pdl): its blocks, placed beside this kernel's and
  // waiting for it, cost the 7B decode 8% on an H200 (0.91x against 0.99x without).
  {{  // norm + gate_up + silu_mul -> act
    MlccChainGroup st[{jh}];
    mlcc_chain_stage<{h}, 1, {CW}, {jh}>({name}_s1, nw1, {eps1}, {off1}, 0, st, xs, nred,
                                          nullptr, 0, 0, resid, 0);
    float gate[{rg}];  // a chunk's gate values, emitted before its up values
    mlcc_chain_consume<{h}, 1, {2 * rg}, {CW}, {NSLOT}, {slot}, {jh}>(
        ring, full, empty, {i // rg}, b, nb, it, st, red, [&](int c, int row, float v) {{
          if (row < {rg}) {{
            gate[row] = v;
          }} else {{
            const float g = __half2float(__float2half(gate[row - {rg}]));
            const float u = __half2float(__float2half(v));
            {name}_act[c * {rg} + row - {rg}] = __float2half((g / (1.0f + expf(-g))) * u);
          }}
        }});
  }}
  mlcc_chain_grid_barrier(count, 2 * nb, {CW * 32});
  {{  // down, + s1 -> s2
    MlccChainGroup st[{jd}];
    int c0, c1;
    mlcc_chain_range({h // RD}, b, nb, c0, c1);
    const int r0 = c0 * {RD}, rows = (c1 - c0) * {RD};
    mlcc_chain_stage<{i}, {KSD}, {CW}, {jd}>({name}_act, nullptr, 0.f, 0.f, warp % {KSD}, st,
                                            xs, nred, {name}_s1, r0, rows, resid, {RESID});
    mlcc_chain_consume<{i}, {KSD}, {RD}, {CW}, {NSLOT}, {slot}, {jd}>(
        ring, full, empty, {h // RD}, b, nb, it, st, red, [&](int c, int row, float v) {{
          const int n = c * {RD} + row, at = n - r0;
          const float r = at < {RESID} ? resid[at] : __half2float(__ldcg({name}_s1 + n));
          s2[n] = __float2half(__half2float(__float2half(v)) + r);
        }});
  }}
  mlcc_chain_grid_barrier(count, 3 * nb, {CW * 32});
  {{  // norm + the next GEMV -> y
    MlccChainGroup st[{jh}];
    mlcc_chain_stage<{h}, 1, {CW}, {jh}>(s2, nw2, {eps2}, {off2}, 0, st, xs, nred, nullptr, 0,
                                          0, resid, 0);
    mlcc_chain_consume<{h}, 1, {RQ}, {CW}, {NSLOT}, {slot}, {jh}>(
        ring, full, empty, {n3 // RQ}, b, nb, it, st, red, [&](int c, int row, float v) {{
          y[c * {RQ} + row] = {store};
        }});
  }}
  if (threadIdx.x == 32) {name}_out();  // past the last barrier
  return 0;
}}
"""
    names = ["a", "res", "wo", "so", "nw1", "wgu", "sgu", "wd", "sd", "nw2", "wn", "sn", "y",
             "s2"]
    tensors = list(spec.inputs) + list(spec.outputs)
    args = ", ".join(f"{n}_h: T.handle" for n in names)
    lines = [f"@T.prim_func\ndef {name}({args}):",
             f'    T.func_attr({{"global_symbol": "{name}", "tirx.noalias": True}})']
    for n, (shape, dt) in zip(names, tensors):
        dims = ", ".join(f"T.int64({d})" for d in shape)
        lines.append(f'    {n} = T.match_buffer({n}_h, ({dims},), "{dt}")')
    lines.append(f'    for bx in T.thread_binding({GRID}, thread="blockIdx.x"):')
    lines.append(f'        for tx in T.thread_binding({THREADS}, thread="threadIdx.x"):')
    lines.append(f'            smem = T.alloc_buffer(({lay["total"]},), "uint8", '
                 'scope="shared.dyn")')
    pointers = ", ".join(f"{n}.data" for n in names)
    lines.append(f'            T.evaluate(T.call_extern("int32", "{name}_dev", {pointers}, '
                 'smem.data))')
    launcher = "\n".join(lines) + "\n"
    return CudaKernel(name, DP2A_SOURCE + HELPERS + body, launcher, min_blocks=1)


GENERATORS = {OP: gen_decode_chain}
