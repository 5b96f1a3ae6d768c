"""The tensor-core GEMM's generated CUDA run on the CPU: every thread of a block as a host thread.

The device function text of mlcc.backends.cuda.gemm is compiled with g++ against a small shim:
`__shared__` arrays become statics shared by the block's 256 std::threads, `__syncthreads` a
std::barrier, and the PTX helpers are emulated from the PTX ISA: cp.async copies are read at
issue and land in shared memory only at the cp.async.wait_group that retires their group (or at
once, in the second mode: both orders must give the same numbers); ldmatrix and
mma.m16n8k16 gather the 32 lanes' operands at a warp barrier. The portable helpers (swizzle, int4
dequantization, paired stores) run as generated. Outputs are compared with q_linear's NumPy
reference: dequantize_group rounded to the scale dtype, float32 products, bias, rounded to y.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from mlcc.backends.cuda.gemm import (
    F16_WIDE_TILE,
    HELPERS,
    NARROW_TILE,
    TileConfig,
    gemm_tc_kernel,
)
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.ir.quant_ops import dequantize_group
from mlcc.ir.types import Sym

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
PTX_HELPERS = ("mlcc_tc_smem", "mlcc_tc_cp16", "mlcc_tc_cp_commit", "mlcc_tc_cp_wait",
               "mlcc_tc_ldsm4", "mlcc_tc_mma16816")

MMA16816 = r"""
// Lane l's part of D += A B for one mma.sync m16n8k16 (PTX ISA fragment layouts), from every
// lane's A (four registers) and B (two registers) fragments.
inline void mma16816_from_lanes(const unsigned (*a)[4], const unsigned (*b)[2], int l, float* c) {
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = 2 * (t % 4);
    half h[8], hb[4];
    memcpy(h, a[t], 16); memcpy(hb, b[t], 8);
    A[g][q] = h[0]; A[g][q + 1] = h[1]; A[g + 8][q] = h[2]; A[g + 8][q + 1] = h[3];
    A[g][q + 8] = h[4]; A[g][q + 9] = h[5]; A[g + 8][q + 8] = h[6]; A[g + 8][q + 9] = h[7];
    B[q][g] = hb[0]; B[q + 1][g] = hb[1]; B[q + 8][g] = hb[2]; B[q + 9][g] = hb[3];
  }
  const int g = l / 4, q = 2 * (l % 4);
  for (int k = 0; k < 16; ++k) {
    c[0] += A[g][k] * B[k][q]; c[1] += A[g][k] * B[k][q + 1];
    c[2] += A[g + 8][k] * B[k][q]; c[3] += A[g + 8][k] * B[k][q + 1];
  }
}
"""

SHIM = r"""
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define MLCC_GEMM_TC_HELPERS
typedef _Float16 half;
struct half2 { _Float16 x, y; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct Dim3 { unsigned x, y, z; };
thread_local Dim3 threadIdx, blockIdx;
inline float2 make_float2(float a, float b) { return {a, b}; }
// global memory: every load must fall inside one of the kernel's buffers
static std::vector<std::pair<const char*, const char*>> g_buffers;
inline void check_global(const void* p, size_t n, const char* what) {
  const char* c = static_cast<const char*>(p);
  for (const auto& [lo, hi] : g_buffers) if (c >= lo && c + n <= hi) return;
  fprintf(stderr, "%s outside every buffer\n", what);
  abort();
}
template <class T> inline T __ldg(const T* p) {
  if (reinterpret_cast<size_t>(p) % sizeof(T)) { fprintf(stderr, "misaligned ldg\n"); abort(); }
  check_global(p, sizeof(T), "ldg");
  return *p;
}
inline half2 __half2half2(half h) { return {h, h}; }
inline half __ushort_as_half(unsigned short u) { half h; memcpy(&h, &u, 2); return h; }
inline half2 __hsub2(half2 a, half2 b) { return {(half)(a.x - b.x), (half)(a.y - b.y)}; }
inline half2 __hmul2(half2 a, half2 b) { return {(half)(a.x * b.x), (half)(a.y * b.y)}; }
inline half2 __floats2half2_rn(float a, float b) { return {(half)a, (half)b}; }
inline float mlcc_f32(float v) { return v; }
inline float mlcc_f32(half v) { return (float)v; }
inline void mlcc_put(float* p, long long i, float v) { p[i] = v; }
inline void mlcc_put(half* p, long long i, float v) { p[i] = (half)v; }

// shared memory: each registered static array is its own 16 MB window of a 32-bit space
static char* g_spaces[8];
static int g_nspaces = 0;
static std::mutex g_mutex;
static bool g_land_at_issue = false;
inline unsigned mlcc_tc_smem(const void* p) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (int i = 0; i < g_nspaces; ++i) if (g_spaces[i] == p) return (unsigned)i << 24;
  g_spaces[g_nspaces] = (char*)p;
  return (unsigned)(g_nspaces++) << 24;
}
inline char* smem_at(unsigned a) { return g_spaces[a >> 24] + (a & 0xFFFFFF); }
struct Copy { unsigned dst; char data[16]; };
thread_local std::vector<Copy> t_pending;
thread_local std::vector<std::vector<Copy>> t_groups;
inline void mlcc_tc_cp16(unsigned dst, const void* src) {
  if (dst % 16 || reinterpret_cast<size_t>(src) % 16) { fprintf(stderr, "misaligned cp\n"); abort(); }
  check_global(src, 16, "cp.async");
  Copy c; c.dst = dst; memcpy(c.data, src, 16);
  if (g_land_at_issue) memcpy(smem_at(dst), c.data, 16); else t_pending.push_back(c);
}
inline void mlcc_tc_cp_commit() { t_groups.push_back(t_pending); t_pending.clear(); }
template <int N> inline void mlcc_tc_cp_wait() {
  while ((int)t_groups.size() > N) {
    for (const Copy& c : t_groups.front()) memcpy(smem_at(c.dst), c.data, 16);
    t_groups.erase(t_groups.begin());
  }
}
static std::barrier<>* g_block;
inline void __syncthreads() { g_block->arrive_and_wait(); }
struct Warp { std::barrier<>* bar; unsigned addr[32]; unsigned a[32][4]; unsigned b[32][2]; };
static Warp g_warps[8];
inline void mlcc_tc_ldsm4(unsigned* d, unsigned addr) {
  Warp& w = g_warps[threadIdx.x >> 5];
  const int l = threadIdx.x & 31;
  if (addr % 16) { fprintf(stderr, "misaligned ldmatrix\n"); abort(); }
  w.addr[l] = addr;
  w.bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) memcpy(&d[i], smem_at(w.addr[i * 8 + l / 4]) + (l % 4) * 4, 4);
  w.bar->arrive_and_wait();
}
inline void mlcc_tc_mma16816(float* c, const unsigned* a, const unsigned* b) {
  Warp& w = g_warps[threadIdx.x >> 5];
  const int l = threadIdx.x & 31;
  memcpy(w.a[l], a, 16); memcpy(w.b[l], b, 8);
  w.bar->arrive_and_wait();
  mma16816_from_lanes(w.a, w.b, l, c);
  w.bar->arrive_and_wait();
}
"""
SHIM = SHIM.replace("struct Warp {", MMA16816 + "struct Warp {", 1)

C_HOST = {"float16": "half", "float32": "float", "uint32": "unsigned"}


def portable_helpers() -> str:
    """The generated helpers that need no PTX, verbatim."""
    body = HELPERS.split("#define MLCC_GEMM_TC_HELPERS", 1)[1].rsplit("#endif", 1)[0]
    chunks = re.split(r"(?=^(?://[^\n]*\n)*(?:__device__|template))", body, flags=re.MULTILINE)
    return "".join(c for c in chunks if not any(f" {n}(" in c for n in PTX_HELPERS))


def driver(name: str, s: LinearShape, config: TileConfig) -> str:
    reads = []
    for i, (b, _, dt) in enumerate(s.buffers):
        reads.append(f"std::vector<{C_HOST[dt]}> {b}_v = load<{C_HOST[dt]}>(argv[{i + 3}]);")
    args = ", ".join([f"{b}_v.data()" for b, _, _ in s.buffers] + ["rows"])
    return f"""
template <class T> std::vector<T> load(const char* path) {{
  FILE* f = fopen(path, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<T> v(n / sizeof(T)); fread(v.data(), 1, n, f); fclose(f); return v;
}}
int main(int argc, char** argv) {{
  const long long rows = atoll(argv[1]);
  g_land_at_issue = atoi(argv[2]) != 0;
  {" ".join(reads)}
  {" ".join(f"g_buffers.emplace_back((const char*){b}_v.data(), (const char*)({b}_v.data() + "
            f"{b}_v.size()));" for b, _, _ in s.buffers)}
  for (unsigned by = 0; by < {-(-s.n // config.bn)}; ++by)
    for (unsigned bx = 0; bx < (rows + {config.bm - 1}) / {config.bm}; ++bx) {{
      std::barrier<> block(256);
      g_block = &block;
      for (int w = 0; w < 8; ++w) g_warps[w].bar = new std::barrier<>(32);
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < 256; ++t)
        threads.emplace_back([&, t] {{
          threadIdx = {{t, 0, 0}}; blockIdx = {{bx, by, 0}};
          {name}_dev({args});
        }});
      for (auto& th : threads) th.join();
      for (int w = 0; w < 8; ++w) delete g_warps[w].bar;
    }}
  FILE* f = fopen(argv[{len(s.buffers) + 2}], "wb");
  fwrite(y_v.data(), sizeof(y_v[0]), y_v.size(), f); fclose(f);
  return 0;
}}
"""


def spec_for(n: int, k: int, q4: bool, ydt: str, bias: bool) -> KernelSpec:
    rows = Sym("seq_len")
    if q4:
        ins = [((rows, k), "float16"), ((n, k // 8), "uint32"), ((n, k // 32), "float16")]
        attrs = (("bits", 4), ("group_size", 32), ("in_features", k))
    else:
        ins, attrs = [((rows, k), "float16"), ((n, k), "float16")], ()
    if bias:
        ins.append(((n,), "float16"))
    return KernelSpec("q_linear" if q4 else "linear", tuple(ins), (((rows, n), ydt),), attrs)


def random_inputs(rng, n: int, k: int, q4: bool, bias: bool, rows: int,
                  bias_scale: float = 0.5) -> tuple[list[np.ndarray], np.ndarray]:
    """x, the weights (q4: packed words and scales; else float16) and the bias if any, in the
    launcher's order, and the float32 weights they stand for (q4: rounded to float16 first)."""
    x = rng.standard_normal((rows, k)).astype(np.float16)
    if q4:
        qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
        qs = (rng.random((n, k // 32)) * 0.05 + 0.001).astype(np.float16)
        weights = [qw, qs]
        w = dequantize_group(qw, qs, 4, 32, k).astype(np.float16).astype(np.float32)
    else:
        weights = [(rng.standard_normal((n, k)) * 0.1).astype(np.float16)]
        w = weights[0].astype(np.float32)
    b = [(rng.standard_normal(n) * bias_scale).astype(np.float16)] if bias else []
    return [x, *weights, *b], w


CASES = [  # (n, k, q4, y dtype, bias, rows, tile)
    (200, 256, True, "float16", True, 77, TileConfig(64, 64, 2, 4, 2)),
    (136, 128, True, "float32", False, 130, TileConfig(128, 128, 2, 4, 2)),
    (72, 96, True, "float16", False, 20, TileConfig(128, 64, 4, 3, 3, True)),
    (201, 96, False, "float32", True, 65, TileConfig(64, 128, 2, 4, 2)),
    (64, 160, False, "float16", False, 16, TileConfig(128, 64, 4, 3, 2)),
    (96, 192, True, "float16", True, 140, NARROW_TILE),  # the rule's tiles
    (130, 64, False, "float16", False, 33, F16_WIDE_TILE),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}k{c[1]}m{c[5]}_{c[6].tag}")
def test_generated_kernel_run_on_host_threads_matches_the_reference(tmp_path, case):
    n, k, q4, ydt, bias, rows, config = case
    s = LinearShape(spec_for(n, k, q4, ydt, bias))
    kernel = gemm_tc_kernel(s, "gemm", config)
    source = SHIM + portable_helpers() + kernel.device_source + driver("gemm", s, config)
    (tmp_path / "k.cpp").write_text(source)
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-pthread", "-o",
                           str(tmp_path / "k"), str(tmp_path / "k.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    arrays, w = random_inputs(np.random.default_rng(n + k + rows), n, k, q4, bias, rows, 1.0)
    x = arrays[0]
    expected = x.astype(np.float32) @ w.T + (arrays[-1].astype(np.float32) if bias else 0)
    expected = expected.astype(ydt)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"in{i}.bin")
        a.tofile(paths[-1])
    for land_at_issue in (0, 1):
        out = tmp_path / f"y{land_at_issue}.bin"
        np.full((rows, n), np.nan, ydt).tofile(out)  # every element must be written
        run = subprocess.run([str(tmp_path / "k"), str(rows), str(land_at_issue), *map(str, paths),
                              str(out), str(out)], capture_output=True, text=True, timeout=600,
                             check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        got = np.fromfile(out, ydt).reshape(rows, n)
        assert not np.isnan(got).any()
        tol = 2e-3 if ydt == "float16" else 1e-4
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                                   rtol=tol, atol=tol * np.abs(expected).max())
