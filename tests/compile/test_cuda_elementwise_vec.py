"""The 128-bit silu_mul / gelu_mul and norm kernels of mlcc.backends.cuda.kernels, run on the CPU.

The generated device functions are compiled with g++ against a small shim (`half` is _Float16,
`uint4` four 32-bit words, every thread of a block a host thread, `__shared__` a static shared
by them, the block sum a barrier-ordered sum) and their float16 outputs are compared with NumPy
references written from the IR ops' definitions: silu(g) * u per element, and for the norms
the residual sum rounded to float16, then x / sqrt(mean(x^2) + eps) * (w + offset) or
(x - mean) / sqrt(var + eps) * w + b in float32. Row lengths include one whose last thread
holds no whole word of the row. The kernels also compile with nvcc for sm_90 without spills,
and the scalar path stays for float32 and rows that do not split into 128-bit words.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from host_shim import MLCC_HOST
from nvcc_probe import cubin_report, entry_ptx

from mlcc.backends.cuda.codegen import device_source
from mlcc.backends.cuda.kernels import (
    BLOCK,
    gated_vectorized,
    gen_elementwise,
    gen_norm,
    norm_vec_block,
    norm_vectorized,
)
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym

SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
typedef _Float16 half;
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float __half2float(half v) { return (float)v; }
inline half __float2half(float v) { return (half)v; }
struct Dim3 { unsigned x, y, z; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim;
""" + MLCC_HOST + r"""
static std::barrier<>* g_block;
static float g_parts[1024];
// every thread gets the same total, summed in thread order
inline float mlcc_block_sum(float v, float*) {
  g_parts[threadIdx.x] = v;
  g_block->arrive_and_wait();
  float total = 0.f;
  for (unsigned t = 0; t < blockDim.x; ++t) total += g_parts[t];
  g_block->arrive_and_wait();
  return total;
}
"""


def run_host(tmp_path, kernel, call: str, threads: int, blocks: int, arrays: dict,
             outputs: list[str], body: str | None = None) -> dict:
    """Compile `kernel`'s device function (or `body`) with the shim, run `blocks` blocks of
    `threads` host threads over `arrays` (read from and written to .bin files; float16, or
    int32 for integer arrays)."""
    if body is None:
        body = device_source([kernel]).split("#include <mma.h>", 1)[1]
        body = body[body.index("__device__ __forceinline__ int "):]
    names = list(arrays)
    ctype = {n: "int" if arrays[n].dtype.kind == "i" else "half" for n in names}
    loads = "".join(
        f'  std::vector<{ctype[n]}> {n}({arrays[n].size}); {{ FILE* f = fopen("{tmp_path}/{n}.bin",'
        f' "rb"); fread({n}.data(), sizeof({n}[0]), {n}.size(), f); fclose(f); }}\n'
        for n in names)
    saves = "".join(
        f'  {{ FILE* f = fopen("{tmp_path}/{n}.out", "wb"); fwrite({n}.data(), 2, {n}.size(), f);'
        f" fclose(f); }}\n" for n in outputs)
    main = f"""
int main() {{
{loads}  blockDim = {{{threads}, 1, 1}};
  for (unsigned blk = 0; blk < {blocks}; ++blk) {{
    std::barrier<> block({threads});
    g_block = &block;
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < {threads}; ++t)
      workers.emplace_back([&, t] {{ threadIdx = {{t, 0, 0}}; blockIdx = {{blk, 0, 0}}; {call}; }});
    for (auto& th : workers) th.join();
  }}
{saves}  return 0;
}}
"""
    for n in names:
        arrays[n].astype(np.int32 if ctype[n] == "int" else np.float16).tofile(
            tmp_path / f"{n}.bin")
    (tmp_path / "k.cpp").write_text(SHIM + body + main)
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-pthread", "-o",
                           str(tmp_path / "k"), str(tmp_path / "k.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run([str(tmp_path / "k")], check=True, timeout=120)
    return {n: np.fromfile(tmp_path / f"{n}.out", np.float16).reshape(arrays[n].shape)
            for n in outputs}


def gated_spec(op: str, rows, half: int, dtype: str = "float16") -> KernelSpec:
    attrs = (("approximate", "tanh"),) if op == "gelu_mul" else ()
    return KernelSpec(op, (((rows, 2 * half), dtype),), (((rows, half), dtype),), attrs, ())


def norm_spec(op: str, rows, h: int, dtype: str = "float16") -> KernelSpec:
    inputs = [((rows, h), dtype)] + ([((rows, h), dtype)] if op.startswith("add_") else [])
    inputs += [((h,), dtype)] + ([((h,), dtype)] if op.endswith("layer_norm") else [])
    outputs = [((rows, h), dtype)] + ([((rows, h), dtype)] if op.startswith("add_") else [])
    attrs = (("eps", 1e-5),) + ((("weight_offset", 0.0),) if "rms" in op else ())
    return KernelSpec(op, tuple(inputs), tuple(outputs), attrs, ())


def silu_mul_reference(a: np.ndarray) -> np.ndarray:
    g, u = np.split(a.astype(np.float32), 2, axis=-1)
    return (g / (1.0 + np.exp(-g)) * u).astype(np.float16)


def norm_reference(op: str, x, r, w, b, eps: float = 1e-5):
    a = x.astype(np.float32)
    if r is not None:
        a = (a + r.astype(np.float32)).astype(np.float16).astype(np.float32)
    if op.endswith("layer_norm"):
        mean = a.mean(-1, keepdims=True)
        inv = 1.0 / np.sqrt(((a - mean) ** 2).mean(-1, keepdims=True) + eps)
        y = (a - mean) * inv * w.astype(np.float32) + b.astype(np.float32)
    else:
        y = a / np.sqrt((a * a).mean(-1, keepdims=True) + eps) * w.astype(np.float32)
    return y.astype(np.float16), a.astype(np.float16)


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@needs_gxx
@pytest.mark.parametrize("half", [64, 11008])
def test_silu_mul_in_128_bit_words_matches_numpy(tmp_path, half):
    rows = 3
    spec = gated_spec("silu_mul", Sym("seq_len"), half)
    assert gated_vectorized(spec)
    kernel = gen_elementwise(spec, "k0_silu_mul")
    a = (np.random.default_rng(half).standard_normal((rows, 2 * half)) * 3).astype(np.float16)
    y = np.zeros((rows, half), np.float16)
    blocks = -(-rows * half // 8 // BLOCK)
    out = run_host(tmp_path, kernel, "k0_silu_mul_dev(a0.data(), y.data(), 3LL)", BLOCK, blocks,
                   {"a0": a, "y": y}, ["y"])["y"]
    expected = silu_mul_reference(a)
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32),
                               rtol=1e-3, atol=1e-4)


@needs_gxx
@pytest.mark.parametrize("op,h", [("add_rms_norm", 4096), ("rms_norm", 4104),
                                  ("add_layer_norm", 200), ("layer_norm", 2048)])
def test_norms_in_128_bit_words_match_numpy(tmp_path, op, h):
    rows, rng = 3, np.random.default_rng(h)
    spec = norm_spec(op, Sym("seq_len"), h)
    assert norm_vectorized(spec)
    kernel = gen_norm(spec, "k0_norm")
    fused, layer = op.startswith("add_"), op.endswith("layer_norm")
    arrays = {"x": rng.standard_normal((rows, h)).astype(np.float16)}
    if fused:
        arrays["r"] = rng.standard_normal((rows, h)).astype(np.float16)
    arrays["w"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float16)
    if layer:
        arrays["b"] = (0.1 * rng.standard_normal(h)).astype(np.float16)
    arrays["y"] = np.zeros((rows, h), np.float16)
    outputs = ["y"] + (["s"] if fused else [])
    if fused:
        arrays["s"] = np.zeros((rows, h), np.float16)
    args = ", ".join(f"{n}.data()" for n in arrays) + ", 3LL"
    out = run_host(tmp_path, kernel, f"k0_norm_dev({args})", norm_vec_block(h), rows, arrays,
                   outputs)
    y, s = norm_reference(op, arrays["x"], arrays.get("r"), arrays["w"], arrays.get("b"))
    np.testing.assert_allclose(out["y"].astype(np.float32), y.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    if fused:
        np.testing.assert_array_equal(out["s"], s)


def test_scalar_paths_stay_for_float32_and_ragged_rows():
    assert not gated_vectorized(gated_spec("silu_mul", 4, 64, "float32"))
    assert not gated_vectorized(gated_spec("silu_mul", 4, 60))
    assert not norm_vectorized(norm_spec("rms_norm", 4, 4096, "float32"))
    assert not norm_vectorized(norm_spec("rms_norm", 4, 100))
    scalar = gen_norm(norm_spec("rms_norm", 4, 100), "k0_norm")
    assert "uint4" not in scalar.device_source
    vec = gen_elementwise(gated_spec("silu_mul", Sym("seq_len"), 11008), "k1")
    # a thread per 8 outputs: the grid covers seq_len * 11008 / 8 threads
    assert "seq_len * T.int64(11008) // T.int64(8)" in vec.launcher


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_vectorized_kernels_compile_for_sm90_with_wide_memory_operations(tmp_path):
    kernels = [gen_elementwise(gated_spec("silu_mul", Sym("seq_len"), 11008), "k0"),
               gen_elementwise(gated_spec("gelu_mul", Sym("seq_len"), 4096), "k1"),
               gen_norm(norm_spec("add_rms_norm", Sym("seq_len"), 4096), "k2"),
               gen_norm(norm_spec("layer_norm", Sym("seq_len"), 2560), "k3")]
    probes = (
        "__global__ void p0(const half* a, half* y, long long n) { k0_dev(a, y, n); }\n"
        "__global__ void p1(const half* a, half* y, long long n) { k1_dev(a, y, n); }\n"
        "__global__ void p2(const half* x, const half* r, const half* w, half* y, half* s, "
        "long long n) { k2_dev(x, r, w, y, s, n); }\n"
        "__global__ void p3(const half* x, const half* w, const half* b, half* y, long long n) "
        "{ k3_dev(x, w, b, y, n); }\n")
    report = cubin_report(tmp_path, device_source(kernels) + probes)
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert len(spills) == 4 and all(int(s) == 0 for s in spills), report
    # 128-bit global loads and stores in every kernel
    for probe, text in entry_ptx(tmp_path, ["p0", "p1", "p2", "p3"]).items():
        assert re.search(r"ld\.global(\.nc)?\.v4\.(u32|b32)", text), probe
        assert re.search(r"st\.global\.v4\.(u32|b32)", text), probe


def test_benchmark_references_agree_with_torch():
    """elementwise_bench.py validates the GPU kernels with these references: they must be the
    ops (torch's silu, RMS norm over the float16-rounded residual sum) and catch a wrong row."""
    torch = pytest.importorskip("torch")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda" / "elementwise_bench.py"
    spec = importlib.util.spec_from_file_location("elementwise_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(1)
    a = bench.make_inputs("silu_mul", 64, bench.ROWS, rng)
    g, u = torch.from_numpy(a[0].astype(np.float32)).chunk(2, dim=-1)
    (silu,) = bench.reference("silu_mul", a)
    np.testing.assert_allclose(silu, (torch.nn.functional.silu(g) * u).numpy(), rtol=1e-5,
                               atol=1e-6)
    x, r, w = bench.make_inputs("add_rms_norm", 256, bench.ROWS, rng)
    y, s = bench.reference("add_rms_norm", [x, r, w])
    total = (torch.from_numpy(x) + torch.from_numpy(r)).float()  # float16 sum, as the model
    norm = torch.nn.functional.rms_norm(total, (256,), torch.from_numpy(w).float(), bench.EPS)
    np.testing.assert_allclose(s, total.numpy())
    np.testing.assert_allclose(y, norm.numpy(), rtol=1e-4, atol=1e-5)
    wrong = y.astype(np.float16).copy()
    wrong[3] = 0
    assert bench.error([y.astype(np.float16), s.astype(np.float16)], [y, s]) < bench.TOLERANCE
    assert bench.error([wrong, s.astype(np.float16)], [y, s]) > bench.TOLERANCE
