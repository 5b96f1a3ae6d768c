"""The tensor-core GEMV's generated CUDA run on the CPU, every thread of a block a host thread.

The device function of mlcc.backends.cuda.gemv_tc is compiled with g++ against the shim of the
tensor-core GEMM's emulation (test_cuda_gemm_emulated: shared arrays shared by the block's
threads, __syncthreads a barrier, global loads bounds-checked, mma.m16n8k16 gathered from the 32
lanes' fragments as the PTX ISA lays them out). The dequantization and pair permutation helpers
run as generated. Outputs are compared with q_linear's NumPy reference (dequantize_group rounded
to float16, float32 products, bias, rounded to y's dtype); every output must be written.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from test_cuda_gemm_emulated import C_HOST, SHIM

from mlcc.backends.cuda.gemv_tc import TcConfig, gemv_q4_tc_kernel
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.ir.quant_ops import dequantize_group
from mlcc.ir.types import Sym

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# the tensor-core GEMVs' PTX helpers on the host: byte permutes and the emulated mma
TC_HOST = r"""
#define MLCC_GEMV_TC_PTX
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i)
    out |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
}
inline void mlcc_tcv_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                         unsigned b0, unsigned b1) {
  const unsigned a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  mlcc_tc_mma16816(c, a, b);
}
"""
EXTRA = r"""
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline half2 __hfma2(half2 a, half2 b, half2 c) {
  return {(half)((float)a.x * (float)b.x + (float)c.x),
          (half)((float)a.y * (float)b.y + (float)c.y)};
}
""" + TC_HOST


def spec_for(n: int, k: int, rows, ydt: str, bias: bool) -> KernelSpec:
    ins = [((rows, k), "float16"), ((n, k // 8), "uint32"), ((n, k // 32), "float16")]
    if bias:
        ins.append(((n,), "float16"))
    return KernelSpec("q_linear", tuple(ins), (((rows, n), ydt),),
                      (("bits", 4), ("group_size", 32), ("in_features", k)))


def driver(name: str, s: LinearShape, config: TcConfig) -> str:
    reads = [f"std::vector<{C_HOST[dt]}> {b}_v = load<{C_HOST[dt]}>(argv[{i + 2}]);"
             for i, (b, _, dt) in enumerate(s.buffers)]
    args = ", ".join([f"{b}_v.data()" for b, _, _ in s.buffers] + s.symbols)
    threads = 32 * config.warps
    return f"""
template <class T> std::vector<T> load(const char* path) {{
  FILE* f = fopen(path, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<T> v(n / sizeof(T)); fread(v.data(), 1, n, f); fclose(f); return v;
}}
int main(int argc, char** argv) {{
  const long long rows = atoll(argv[1]);
  {"const long long batch = rows;" if s.symbols else ""}
  {" ".join(reads)}
  {" ".join(f"g_buffers.emplace_back((const char*){b}_v.data(), (const char*)({b}_v.data() + "
            f"{b}_v.size()));" for b, _, _ in s.buffers)}
  const unsigned grid_y = {"(rows + 15) / 16" if s.symbols else "1"};
  for (unsigned by = 0; by < grid_y; ++by)
    for (unsigned bx = 0; bx < {-(-s.n // (16 * config.tiles))}; ++bx) {{
      std::barrier<> block({threads});
      g_block = &block;
      for (int w = 0; w < {config.warps}; ++w) g_warps[w].bar = new std::barrier<>(32);
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < {threads}; ++t)
        threads.emplace_back([&, t] {{
          threadIdx = {{t, 0, 0}}; blockIdx = {{bx, by, 0}};
          {name}_dev({args});
        }});
      for (auto& th : threads) th.join();
      for (int w = 0; w < {config.warps}; ++w) delete g_warps[w].bar;
    }}
  FILE* f = fopen(argv[{len(s.buffers) + 1}], "wb");
  fwrite(y_v.data(), sizeof(y_v[0]), y_v.size(), f); fclose(f);
  return 0;
}}
"""


CASES = [  # (n, k, rows (int, or the batch symbol's runtime value), y dtype, bias, config)
    (40, 4096, 1, "float16", False, TcConfig(8, 1, 1)),
    (72, 4096, 5, "float32", True, TcConfig(4, 2, 2)),
    (24, 11008, 16, "float16", True, TcConfig(8, 1, 1)),
    (33, 11008, 1, "float32", False, TcConfig(4, 1, 2)),
    (40, 1024, 9, "float16", False, TcConfig(2, 1, 4)),
    (48, 4096, ("batch", 16), "float16", False, TcConfig(4, 1, 2)),
    (20, 1024, ("batch", 21), "float32", True, TcConfig(2, 2, 1)),
    (17, 96, ("batch", 3), "float16", False, TcConfig(2, 1, 1)),
    (70, 11008, 4, "float16", True, TcConfig(8, 4, 1)),  # several staged chunks
]


def _id(case) -> str:
    n, k, rows, _, bias, config = case
    m = f"batch{rows[1]}" if isinstance(rows, tuple) else f"m{rows}"
    return f"n{n}k{k}{m}{'_bias' if bias else ''}_{config.tag}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_generated_tc_gemv_run_on_host_threads_matches_the_reference(tmp_path, case):
    n, k, rows, ydt, bias, config = case
    symbolic = isinstance(rows, tuple)
    m = rows[1] if symbolic else rows
    s = LinearShape(spec_for(n, k, Sym("batch") if symbolic else rows, ydt, bias))
    kernel = gemv_q4_tc_kernel(s, "gemv", config)
    source = SHIM + EXTRA + kernel.device_source + driver("gemv", s, config)
    (tmp_path / "k.cpp").write_text(source)
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-pthread", "-o",
                           str(tmp_path / "k"), str(tmp_path / "k.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rng = np.random.default_rng(n + k + m)
    x = rng.standard_normal((m, k)).astype(np.float16)
    qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qs = (rng.random((n, k // 32)) * 0.05 + 0.001).astype(np.float16)
    arrays = [x, qw, qs] + ([rng.standard_normal(n).astype(np.float16)] if bias else [])
    w = dequantize_group(qw, qs, 4, 32, k).astype(np.float16).astype(np.float32)
    expected = x.astype(np.float32) @ w.T + (arrays[-1].astype(np.float32) if bias else 0)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"in{i}.bin")
        a.tofile(paths[-1])
    out = tmp_path / "y.bin"
    np.full((m, n), np.nan, ydt).tofile(out)
    run = subprocess.run([str(tmp_path / "k"), str(m), *map(str, paths), str(out), str(out)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.fromfile(out, ydt).reshape(m, n).astype(np.float32)
    assert not np.isnan(got).any()
    # float32 results: only the summation order differs from the reference
    tol = 2e-3 if ydt == "float16" else 1e-5
    np.testing.assert_allclose(got, expected.astype(ydt).astype(np.float32), rtol=tol,
                               atol=tol * np.abs(expected).max())
