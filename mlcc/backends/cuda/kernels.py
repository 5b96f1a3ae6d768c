"""CUDA kernels for row-wise and elementwise ops: lookups, norms, epilogues, last row.

Every generator turns a `KernelSpec` into a `CudaKernel`: a CUDA C++ device function (the work
of one thread, with the spec's sizes baked in as constants) and a TVMScript launcher, a public
PrimFunc whose thread-bound loops set the grid and call the device function with the buffers'
data pointers and the symbolic sizes. Arithmetic follows the IR interpreter: float32 inside,
results rounded to the storage dtype where the interpreter rounds.

    embedding / q_embedding   one block per token, threads over features
    norms (+ residual add)    one block per row; the row stays in registers between the
                              reduction and the write, so outputs may not alias inputs
    elementwise, silu_mul     one thread per output element
    last_row / last_logits    one thread per feature of the last row
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from mlcc.backends.llvm.fallback import Emitter, header
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Dim, Sym

BLOCK = 256
VEC = 8  # float16 values per 128-bit load or store
# Placed by a kernel after the loads that need nothing from earlier kernels (its weights), before
# the first read of an activation or any write; a kernel containing it gets no wait at the top.
GRID_WAIT = "mlcc_grid_wait();"
C_TYPES = {"float16": "half", "float32": "float", "float64": "double", "int32": "int",
           "uint32": "unsigned int", "uint8": "unsigned char"}

# Helpers shared by every kernel, emitted once at the top of the device source.
COMMON_SOURCE = r"""
#include <cuda_fp16.h>
#include <mma.h>
__device__ __forceinline__ float mlcc_f32(float v) { return v; }
__device__ __forceinline__ float mlcc_f32(half v) { return __half2float(v); }
__device__ __forceinline__ void mlcc_put(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void mlcc_put(half* p, long long i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ float mlcc_round(float v, const float*) { return v; }
__device__ __forceinline__ float mlcc_round(float v, const half*) {
  return __half2float(__float2half(v));
}
// Programmatic dependent launch (mlcc.backends.cuda.toolchain): wait until the kernel before
// this one has finished and its writes are visible; let the next one be scheduled now.
// No-ops unless the library is built with pdl (MLCC_PDL) for sm_90 or newer.
__device__ __forceinline__ void mlcc_grid_wait() {
#if defined(MLCC_PDL) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void mlcc_grid_launch() {
#if defined(MLCC_PDL) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ float mlcc_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float mlcc_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Eight 4-bit codes of `w` (element j at bits 4j) times eight activations stored as pairs
// (x_j, x_{j+4}): OR-ing a nibble pair into 0x6400 makes the half2 (1024 + c_j, 1024 + c_{j+4})
// exactly, and subtracting 1031 (1024 + max_int) leaves c - 7. Products are summed two at a
// time in float16, then in float32.
__device__ __forceinline__ float mlcc_q4_dot8(unsigned int w, const half2* xp) {
  const half2 magic = __half2half2(__ushort_as_half((unsigned short)0x6407));
  unsigned int t0 = (w & 0x000F000Fu) | 0x64006400u, t1 = ((w >> 4) & 0x000F000Fu) | 0x64006400u;
  unsigned int t2 = ((w >> 8) & 0x000F000Fu) | 0x64006400u;
  unsigned int t3 = ((w >> 12) & 0x000F000Fu) | 0x64006400u;
  const half2 p = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t1), magic), xp[1],
                          __hmul2(__hsub2(*reinterpret_cast<half2*>(&t0), magic), xp[0]));
  const half2 q = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t3), magic), xp[3],
                          __hmul2(__hsub2(*reinterpret_cast<half2*>(&t2), magic), xp[2]));
  const float2 a = __half22float2(p), b = __half22float2(q);
  return (a.x + a.y) + (b.x + b.y);
}
// The same with fewer instructions: the odd nibble pairs are masked in place (0x00F0 gives
// 1024 + 16c exactly) and scaled by 1/16 in the subtraction, so one shift serves four pairs.
__device__ __forceinline__ float mlcc_q4_dot8_masked(unsigned int w, const half2* xp) {
  const half2 magic = __half2half2(__ushort_as_half((unsigned short)0x6407));
  const half2 sixteenth = __half2half2(__ushort_as_half((unsigned short)0x2C00));
  const half2 magic_hi = __half2half2(__ushort_as_half((unsigned short)0xD470));  // -71
  const unsigned int w2 = w >> 8;
  unsigned int t0 = (w & 0x000F000Fu) | 0x64006400u, t1 = (w & 0x00F000F0u) | 0x64006400u;
  unsigned int t2 = (w2 & 0x000F000Fu) | 0x64006400u, t3 = (w2 & 0x00F000F0u) | 0x64006400u;
  const half2 d1 = __hfma2(*reinterpret_cast<half2*>(&t1), sixteenth, magic_hi);
  const half2 d3 = __hfma2(*reinterpret_cast<half2*>(&t3), sixteenth, magic_hi);
  const half2 d0 = __hsub2(*reinterpret_cast<half2*>(&t0), magic);
  const half2 d2 = __hsub2(*reinterpret_cast<half2*>(&t2), magic);
  const half2 p = __hfma2(d1, xp[1], __hmul2(d0, xp[0]));
  const half2 q = __hfma2(d3, xp[3], __hmul2(d2, xp[2]));
  const float2 a = __half22float2(p), b = __half22float2(q);
  return (a.x + a.y) + (b.x + b.y);
}
// The fewest instructions per word (17 on sm_90 against 33 for mlcc_q4_dot8): each nibble pair
// is masked and OR-ed into 0x6400 by one lop3 (the compiler splits `(w & m) | c` into two), the
// odd pairs are scaled by 1/16 in their subtraction as above, and all four products of a lane
// are summed in float16 before the one conversion to float32 (a lane's sum is at most 32 |x|,
// so activations up to 2047 cannot overflow it).
#define MLCC_LOP3_OR(out, in, mask) \
  asm("lop3.b32 %0, %1, " #mask ", 0x64006400, 0xEA;" : "=r"(out) : "r"(in))
// The four half2 (c_j - 7, c_{j+4} - 7), j = 0..3, of word w, exactly: pairs 0 and 2 OR-ed
// into 0x6400 minus 1031, pairs 1 and 3 masked in place (1024 + 16c) times 1/16 minus 71.
__device__ __forceinline__ void mlcc_q4_pairs_lop3(unsigned int w, half2* d) {
  const half2 magic = __half2half2(__ushort_as_half((unsigned short)0x6407));
  const half2 sixteenth = __half2half2(__ushort_as_half((unsigned short)0x2C00));
  const half2 magic_hi = __half2half2(__ushort_as_half((unsigned short)0xD470));  // -71
  const unsigned int w2 = w >> 8;
  unsigned int t0, t1, t2, t3;
  MLCC_LOP3_OR(t0, w, 0x000F000F);
  MLCC_LOP3_OR(t1, w, 0x00F000F0);
  MLCC_LOP3_OR(t2, w2, 0x000F000F);
  MLCC_LOP3_OR(t3, w2, 0x00F000F0);
  d[0] = __hsub2(*reinterpret_cast<half2*>(&t0), magic);
  d[1] = __hfma2(*reinterpret_cast<half2*>(&t1), sixteenth, magic_hi);
  d[2] = __hsub2(*reinterpret_cast<half2*>(&t2), magic);
  d[3] = __hfma2(*reinterpret_cast<half2*>(&t3), sixteenth, magic_hi);
}
__device__ __forceinline__ float mlcc_q4_dot8_lop3(unsigned int w, const half2* xp) {
  half2 d[4];
  mlcc_q4_pairs_lop3(w, d);
  half2 acc = __hmul2(d[0], xp[0]);
  acc = __hfma2(d[1], xp[1], acc);
  acc = __hfma2(d[2], xp[2], acc);
  acc = __hfma2(d[3], xp[3], acc);
  const float2 a = __half22float2(acc);
  return a.x + a.y;
}
// mlcc_q4_dot8's arithmetic, bit for bit (the same exact nibble values, products summed in
// pairs in float16, then in float32), with mlcc_q4_dot8_lop3's dequantization: 20 instructions
// a word. The float16 pair sums keep activations up to 4095 from overflowing.
__device__ __forceinline__ float mlcc_q4_dot8_lop3_pairs(unsigned int w, const half2* xp) {
  half2 d[4];
  mlcc_q4_pairs_lop3(w, d);
  const half2 p = __hfma2(d[1], xp[1], __hmul2(d[0], xp[0]));
  const half2 q = __hfma2(d[3], xp[3], __hmul2(d[2], xp[2]));
  const float2 a = __half22float2(p), b = __half22float2(q);
  return (a.x + a.y) + (b.x + b.y);
}
// Sum over the block; every thread gets the total. `red` holds 32 floats of shared memory.
__device__ __forceinline__ float mlcc_block_sum(float v, float* red) {
  v = mlcc_warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < ((blockDim.x + 31) >> 5) ? red[lane] : 0.f;
  return mlcc_warp_sum(v);
}
"""


@dataclass(frozen=True)
class CudaKernel:
    """Device source (CUDA C++) plus the TVMScript launcher that TVM compiles."""

    name: str
    device_source: str
    launcher: str
    # Device functions, besides `name`_dev, that place GRID_WAIT themselves (with pdl the
    # build adds no wait at the top of a kernel calling them).
    self_waiting: tuple[str, ...] = ()
    # Blocks that must fit an SM at once (0: no demand): the kernel's launch bound gets it as
    # its second argument, so ptxas keeps the registers a thread uses within that budget.
    min_blocks: int = 0

    def device_functions(self) -> tuple[str, ...]:
        """The device functions the launcher's nests call, in order (usually `name`_dev)."""
        return tuple(re.findall(r'T\.call_extern\("int32", "(\w+)"', self.launcher))

    def single_block(self) -> bool:
        """Whether the launcher starts exactly one block (one nest, a grid of T.int64(1))."""
        grids = re.findall(r'T\.thread_binding\(([^,]+), thread="blockIdx\.\w"\)', self.launcher)
        return grids == ["T.int64(1)"]


def dim_text(d: Dim) -> str:
    return d.name if isinstance(d, Sym) else str(d)


def numel_text(shape: tuple[Dim, ...]) -> str:
    """C++ (and TVMScript) expression of the element count; symbols are long long params."""
    return " * ".join(f"(long long)({dim_text(d)})" for d in shape) or "1"


def tir_numel(shape: tuple[Dim, ...]) -> str:
    return " * ".join(dim_text(d) if isinstance(d, Sym) else f"T.int64({d})" for d in shape)


def symbols_of(*shapes: tuple[Dim, ...]) -> list[str]:
    return sorted({d.name for shape in shapes for d in shape if isinstance(d, Sym)})


def launcher(name: str, buffers: list[tuple[str, tuple[Dim, ...], str]], grid: tuple[str, ...],
             block: int, symbols: list[str]) -> str:
    """A PrimFunc launching `grid` (x[, y]) blocks of `block` threads of `name`_dev."""
    return launcher_nests(name, buffers, [(f"{name}_dev", grid, block)], symbols)


def launcher_nests(name: str, buffers: list[tuple[str, tuple[Dim, ...], str]],
                   nests: list[tuple[str, tuple[str, ...], int]], symbols: list[str]) -> str:
    """One PrimFunc with a thread-bound nest per (device function, grid, block), run in order."""
    em = Emitter()
    header(em, name, buffers)
    args = ", ".join([f"{b}.data" for b, _, _ in buffers] + symbols)
    for device, grid, block in nests:
        loops = [("bx", grid[0], "blockIdx.x")] + ([("by", grid[1], "blockIdx.y")]
                                                    if len(grid) > 1 else [])
        depth = 1
        for var, extent, tag in reversed(loops):
            em.depth = depth
            em(f'for {var} in T.thread_binding({extent}, thread="{tag}"):')
            depth += 1
        em.depth = depth
        em(f'for tx in T.thread_binding({block}, thread="threadIdx.x"):')
        em.depth = depth + 1
        em(f'T.evaluate(T.call_extern("int32", "{device}", {args}))')
    return em.text()


def signature(name: str, buffers: list[tuple[str, tuple[Dim, ...], str]],
              outputs: tuple[str, ...], symbols: list[str]) -> str:
    # Outputs never alias inputs (the memory plan keeps values alive together apart), and
    # without __restrict__ every store would order the loads after it: one memory round trip
    # per element instead of all loads in flight.
    params = [f"{'' if b in outputs else 'const '}{C_TYPES[dt]}* __restrict__ {b}"
              for b, _, dt in buffers]
    params += [f"long long {s}" for s in symbols]
    return f"__device__ __forceinline__ int {name}_dev({', '.join(params)})"


def grid_for(total: str, per_block: int) -> str:
    return f"({total} + T.int64({per_block - 1})) // T.int64({per_block})"


def fp(x: float) -> str:
    text = repr(float(np.float32(x)))
    return (text if ("." in text or "e" in text) else text + ".0") + "f"


# --- lookups ------------------------------------------------------------------------------


def dequant_expr(spec: KernelSpec, w: str, s: str, row: str, k: str, words: int,
                 groups: int, scale_dt: str) -> str:
    """One dequantized weight as float, rounded through the scale dtype (the reference's way)."""
    bits, group = spec.attr("bits"), spec.attr("group_size")
    per_word, max_int, mask = 32 // bits, (1 << (bits - 1)) - 1, (1 << bits) - 1
    code = (f"(float)(({w}[({row}) * {words}LL + ({k}) / {per_word}] >> "
            f"((({k}) % {per_word}) * {bits})) & {mask}u)")
    scale = f"mlcc_f32({s}[({row}) * {groups}LL + ({k}) / {group}])"
    return f"mlcc_round(({code} - {max_int}.0f) * {scale}, {s})"


def gen_embedding(spec: KernelSpec, name: str) -> CudaKernel:
    out_shape, dt = spec.outputs[0]
    if spec.op == "embedding":
        (tshape, tdt), (ishape, idt) = spec.inputs
        buffers = [("table", tshape, tdt), ("ids", ishape, idt), ("y", out_shape, dt)]
        vocab, hidden = tshape
        value = f"mlcc_f32(table[tok * {hidden}LL + k])"
    else:
        (wshape, wdt), (sshape, sdt), (ishape, idt) = spec.inputs
        buffers = [("qw", wshape, wdt), ("qs", sshape, sdt), ("ids", ishape, idt),
                   ("y", out_shape, dt)]
        vocab, hidden = wshape[0], spec.attr("in_features")
        value = dequant_expr(spec, "qw", "qs", "tok", "k", wshape[1], sshape[1], sdt)
    syms = symbols_of(ishape)
    body = f"""{signature(name, buffers, ("y",), syms)} {{
  const long long row = blockIdx.x;
  long long tok = ids[row];
  tok = tok < 0 ? 0 : (tok >= {vocab} ? {vocab - 1} : tok);
  for (int k = threadIdx.x; k < {hidden}; k += {BLOCK}) {{
    mlcc_put(y, row * {hidden}LL + k, {value});
  }}
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, buffers, (tir_numel(ishape),), BLOCK, syms))


# --- norms --------------------------------------------------------------------------------


def norm_block(h: int) -> int:
    """Threads per row: about four features each, so loads overlap and the reduction is short."""
    return min(1024, max(128, -(-h // 4 // 32) * 32))


def norm_vec_block(h: int) -> int:
    """Threads per row of the vectorized norm: about two 128-bit words of the row each."""
    return min(1024, max(32, -(-h // VEC // 2 // 32) * 32))


def _norm_vec_source(spec: KernelSpec, name: str, buffers, syms: list[str]) -> str:
    """The norm over float16 rows in 128-bit words: every load and store moves VEC features,
    so a thread has its row words, residual words and weight words in flight at once. The
    arithmetic per feature and the rounding points are the scalar kernel's."""
    fused_add, layer = spec.op.startswith("add_"), spec.op.endswith("layer_norm")
    h = spec.inputs[0][0][-1]
    block = norm_vec_block(h)
    per = -(-h // VEC // block)
    eps = fp(spec.attr("eps"))
    if layer:
        stats = f"""  const float mean = mlcc_block_sum(part, red) / {h}.0f;
  float dev = 0.f;
  #pragma unroll
  for (int j = 0; j < {per}; ++j)
    #pragma unroll
    for (int e = 0; e < {VEC}; ++e) dev += live[j] ? (v[j][e] - mean) * (v[j][e] - mean) : 0.f;
  const float inv = 1.0f / sqrtf(mlcc_block_sum(dev, red) / {h}.0f + {eps});"""
        value = "(v[j][e] - mean) * inv * __half2float(wh[e]) + __half2float(bh[e])"
        accumulate = "part += a;"
    else:
        stats = f"  const float inv = 1.0f / sqrtf(mlcc_block_sum(part, red) / {h}.0f + {eps});"
        value = f"v[j][e] * inv * (__half2float(wh[e]) + {fp(spec.attr('weight_offset'))})"
        accumulate = "part += a * a;"
    # The sum is rounded to the model dtype before normalizing, as the interpreter does.
    add = ("a = __half2float(__float2half(a + __half2float(rh[e]))); sh[e] = __float2half(a);"
           if fused_add else "")
    return f"""{signature(name, buffers, ("y", "s"), syms)} {{
  __shared__ float red[32];
  const long long base = (long long)blockIdx.x * {h}LL;
  float v[{per}][{VEC}], part = 0.f;
  bool live[{per}];
  // The weights (and biases) are loaded with the row, so their latency is hidden behind the
  // reduction instead of following it.
  uint4 wv[{per}], bv[{per}];
  #pragma unroll
  for (int j = 0; j < {per}; ++j) {{
    const int k = (threadIdx.x + j * {block}) * {VEC};
    live[j] = k < {h};
    uint4 xw = make_uint4(0u, 0u, 0u, 0u), rw = xw, sw;
    wv[j] = xw;
    bv[j] = xw;
    if (live[j]) {{
      xw = *reinterpret_cast<const uint4*>(x + base + k);
      {"rw = *reinterpret_cast<const uint4*>(r + base + k);" if fused_add else ""}
      wv[j] = *reinterpret_cast<const uint4*>(w + k);
      {"bv[j] = *reinterpret_cast<const uint4*>(b + k);" if layer else ""}
    }}
    const half* xh = reinterpret_cast<const half*>(&xw);
    const half* rh = reinterpret_cast<const half*>(&rw);
    half* sh = reinterpret_cast<half*>(&sw);
    #pragma unroll
    for (int e = 0; e < {VEC}; ++e) {{
      float a = __half2float(xh[e]);
      {add}
      v[j][e] = a;
      {accumulate}
    }}
    {"if (live[j]) *reinterpret_cast<uint4*>(s + base + k) = sw;" if fused_add else ""}
    (void)rh; (void)sh;
  }}
{stats}
  #pragma unroll
  for (int j = 0; j < {per}; ++j) {{
    const int k = (threadIdx.x + j * {block}) * {VEC};
    if (!live[j]) continue;
    const half* wh = reinterpret_cast<const half*>(&wv[j]);
    const half* bh = reinterpret_cast<const half*>(&bv[j]);
    (void)bh;
    uint4 out;
    half* oh = reinterpret_cast<half*>(&out);
    #pragma unroll
    for (int e = 0; e < {VEC}; ++e) oh[e] = __float2half({value});
    *reinterpret_cast<uint4*>(y + base + k) = out;
  }}
  return 0;
}}
"""


def norm_vectorized(spec: KernelSpec) -> bool:
    """Norms over float16 rows of whole 128-bit words (rows stay 16-byte aligned)."""
    (shape, dt) = spec.inputs[0]
    return dt == "float16" and isinstance(shape[-1], int) and shape[-1] % VEC == 0


def gen_norm(spec: KernelSpec, name: str) -> CudaKernel:
    """rms_norm, layer_norm and their add_ fusions over rows of H features."""
    fused_add, layer = spec.op.startswith("add_"), spec.op.endswith("layer_norm")
    (shape, dt) = spec.inputs[0]
    h = shape[-1]
    names = ["x"] + (["r"] if fused_add else []) + ["w"] + (["b"] if layer else [])
    buffers = [(n, shape if n in ("x", "r") else (h,), dt) for n in names]
    buffers += [("y", shape, dt)] + ([("s", shape, dt)] if fused_add else [])
    syms = symbols_of(shape)
    if norm_vectorized(spec):
        rows = tir_numel(shape[:-1]) if len(shape) > 1 else "T.int64(1)"
        return CudaKernel(name, _norm_vec_source(spec, name, buffers, syms),
                          launcher(name, buffers, (rows,), norm_vec_block(h), syms))
    block = norm_block(h)
    per_thread = -(-h // block)
    eps = fp(spec.attr("eps"))
    load = "float a = mlcc_f32(x[base + k]);"
    if fused_add:
        # The sum is rounded to the model dtype before normalizing, as the interpreter does.
        load = ("float a = mlcc_round(mlcc_f32(x[base + k]) + mlcc_f32(r[base + k]), x);"
                " mlcc_put(s, base + k, a);")
    if layer:
        stats = f"""  const float mean = mlcc_block_sum(part, red) / {h}.0f;
  float dev = 0.f;
  #pragma unroll
  for (int j = 0; j < {per_thread}; ++j) {{
    const int k = threadIdx.x + j * {block};
    if (k < {h}) dev += (v[j] - mean) * (v[j] - mean);
  }}
  const float inv = 1.0f / sqrtf(mlcc_block_sum(dev, red) / {h}.0f + {eps});"""
        accumulate = "part += a;"
        value = "(v[j] - mean) * inv * wk[j] + bk[j]"
    else:
        stats = f"""  const float inv = 1.0f / sqrtf(mlcc_block_sum(part, red) / {h}.0f + {eps});"""
        accumulate = "part += a * a;"
        offset = fp(spec.attr("weight_offset"))
        value = f"v[j] * inv * (wk[j] + {offset})"
    bias_load = f"k < {h} ? mlcc_f32(b[k]) : 0.f" if layer else "0.f"
    body = f"""{signature(name, buffers, ("y", "s"), syms)} {{
  __shared__ float red[32];
  const long long base = (long long)blockIdx.x * {h}LL;
  // the norm's weights are loaded with the row, before the reduction waits
  float v[{per_thread}], wk[{per_thread}], bk[{per_thread}];
  float part = 0.f;
  #pragma unroll
  for (int j = 0; j < {per_thread}; ++j) {{
    const int k = threadIdx.x + j * {block};
    v[j] = 0.f;
    wk[j] = k < {h} ? mlcc_f32(w[k]) : 0.f;
    bk[j] = {bias_load};
    if (k < {h}) {{ {load} v[j] = a; {accumulate} }}
  }}
{stats}
  #pragma unroll
  for (int j = 0; j < {per_thread}; ++j) {{
    const int k = threadIdx.x + j * {block};
    if (k < {h}) mlcc_put(y, base + k, {value});
  }}
  return 0;
}}
"""
    rows = tir_numel(shape[:-1]) if len(shape) > 1 else "T.int64(1)"
    return CudaKernel(name, body, launcher(name, buffers, (rows,), block, syms))


# --- elementwise --------------------------------------------------------------------------


def gelu_text(a: str, approximate: str | None) -> str:
    if approximate == "tanh":
        c = fp(math.sqrt(2.0 / math.pi))
        return f"0.5f * {a} * (1.0f + tanhf({c} * ({a} + 0.044715f * {a} * {a} * {a})))"
    return f"0.5f * {a} * (1.0f + erff({a} * {fp(1 / math.sqrt(2))}))"


def _elementwise_value(spec: KernelSpec) -> str:
    op = spec.op
    a = "mlcc_f32(a0[i])"
    if op == "add":
        return f"{a} + mlcc_f32(a1[i])"
    if op == "mul":
        return f"{a} * mlcc_f32(a1[i])"
    if op == "scale":
        return f"{a} * {fp(spec.attr('factor'))}"
    if op == "silu":
        return f"{a} / (1.0f + expf(-{a}))"
    if op == "gelu":
        return gelu_text(a, spec.attr("approximate"))
    if op == "scale_in_dtype":  # the factor rounded to the input dtype first, as the model does
        factor = float(np.float32(np.asarray(spec.attr("factor")).astype(spec.inputs[0][1])))
        return f"{a} * {fp(factor)}"
    if op == "cast":
        return a
    raise NotImplementedError(op)


def _gated_vec_source(spec: KernelSpec, name: str, buffers, syms: list[str]) -> str:
    """silu_mul / gelu_mul in float16, VEC outputs per thread: the gate and up halves of the
    row arrive as one 128-bit load each and the results leave as one 128-bit store, so each
    thread keeps three wide memory operations in flight instead of three 16-bit ones per
    output. The arithmetic per element is the scalar kernel's."""
    (shape, _) = spec.outputs[0]
    half = shape[-1]
    act = ("g / (1.0f + expf(-g))" if spec.op == "silu_mul"
           else gelu_text("g", spec.attr("approximate")))
    return f"""{signature(name, buffers, ("y",), syms)} {{
  const long long v = (long long)blockIdx.x * {BLOCK} + threadIdx.x;
  if (v >= {numel_text(shape)} / {VEC}) return 0;
  const long long row = v / {half // VEC}, c = v % {half // VEC} * {VEC};
  const uint4 gw = *reinterpret_cast<const uint4*>(a0 + row * {2 * half}LL + c);
  const uint4 uw = *reinterpret_cast<const uint4*>(a0 + row * {2 * half}LL + {half} + c);
  const half* gh = reinterpret_cast<const half*>(&gw);
  const half* uh = reinterpret_cast<const half*>(&uw);
  uint4 out;
  half* oh = reinterpret_cast<half*>(&out);
  #pragma unroll
  for (int e = 0; e < {VEC}; ++e) {{
    const float g = __half2float(gh[e]), u = __half2float(uh[e]);
    oh[e] = __float2half(({act}) * u);
  }}
  *reinterpret_cast<uint4*>(y + v * {VEC}) = out;
  return 0;
}}
"""


def gated_vectorized(spec: KernelSpec) -> bool:
    """silu_mul / gelu_mul in float16 whose rows split into whole 128-bit words (row starts
    stay 16-byte aligned: buffers are 64-byte aligned and rows hold multiples of 8 values)."""
    (shape, dt) = spec.outputs[0]
    return (spec.op in ("silu_mul", "gelu_mul") and dt == "float16"
            and spec.inputs[0][1] == "float16" and isinstance(shape[-1], int)
            and shape[-1] % VEC == 0)


def gen_elementwise(spec: KernelSpec, name: str) -> CudaKernel:
    (shape, dt) = spec.outputs[0]
    for s, _ in spec.inputs:
        if spec.op in ("add", "mul") and tuple(s) != tuple(shape):
            raise NotImplementedError(f"{spec.op} with broadcasting ({s} vs {shape})")
    buffers = [(f"a{i}", s, d) for i, (s, d) in enumerate(spec.inputs)] + [("y", shape, dt)]
    syms = symbols_of(*(s for _, s, _ in buffers))
    total = numel_text(shape)
    if gated_vectorized(spec):
        grid = grid_for(f"{tir_numel(shape)} // T.int64({VEC})", BLOCK)
        return CudaKernel(name, _gated_vec_source(spec, name, buffers, syms),
                          launcher(name, buffers, (grid,), BLOCK, syms))
    if spec.op in ("silu_mul", "gelu_mul"):
        half = shape[-1]
        act = ("g / (1.0f + expf(-g))" if spec.op == "silu_mul"
               else gelu_text("g", spec.attr("approximate")))
        value = (f"const long long row = i / {half}, c = i % {half}; "
                 f"const float g = mlcc_f32(a0[row * {2 * half}LL + c]); "
                 f"const float u = mlcc_f32(a0[row * {2 * half}LL + {half} + c]); "
                 f"mlcc_put(y, i, ({act}) * u);")
    else:
        value = f"mlcc_put(y, i, {_elementwise_value(spec)});"
    body = f"""{signature(name, buffers, ("y",), syms)} {{
  const long long i = (long long)blockIdx.x * {BLOCK} + threadIdx.x;
  if (i < {total}) {{ {value} }}
  return 0;
}}
"""
    grid = grid_for(tir_numel(shape), BLOCK)
    return CudaKernel(name, body, launcher(name, buffers, (grid,), BLOCK, syms))


def gen_last(spec: KernelSpec, name: str) -> CudaKernel:
    (shape, dt), (out_shape, odt) = spec.inputs[0], spec.outputs[0]
    buffers = [("x", shape, dt), ("y", out_shape, odt)]
    syms = symbols_of(shape)
    features = shape[1]
    body = f"""{signature(name, buffers, ("y",), syms)} {{
  const long long k = (long long)blockIdx.x * {BLOCK} + threadIdx.x;
  if (k < {features}) mlcc_put(y, k, mlcc_f32(x[({dim_text(shape[0])} - 1) * {features}LL + k]));
  return 0;
}}
"""
    grid = f"T.int64({-(-features // BLOCK)})"
    return CudaKernel(name, body, launcher(name, buffers, (grid,), BLOCK, syms))


def gen_positions(spec: KernelSpec, name: str) -> CudaKernel:
    """Positions of the entry's tokens: seq_info[0] + i, or seq_info[i] in a batched entry."""
    (shape, dt), = spec.outputs
    batched = spec.attr("batched")
    buffers = [("y", shape, dt), ("seq_info", shape if batched else (2,), "int32")]
    syms = symbols_of(shape)
    value = "seq_info[i]" if batched else "seq_info[0] + (int)i"
    body = f"""{signature(name, buffers, ("y",), syms)} {{
  const long long i = (long long)blockIdx.x * {BLOCK} + threadIdx.x;
  if (i < {numel_text(shape)}) y[i] = {value};
  return 0;
}}
"""
    grid = grid_for(tir_numel(shape), BLOCK)
    return CudaKernel(name, body, launcher(name, buffers, (grid,), BLOCK, syms))
