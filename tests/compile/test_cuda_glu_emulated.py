"""The GLU mode of the tensor-core GEMM (linear_silu_mul) run on the CPU, against silu_mul.

The generated device source runs on host threads through the mma.sync emulation of
test_cuda_gemm_emulated (imported, with two more device functions the GLU epilogue calls). Each
case runs both the fused kernel and the plain GEMM of the same gate_up weight, then checks:

    bit for bit   fused == silu_mul applied to the plain GEMM's float16 gate_up, computed the
                  way the CUDA silu_mul kernel computes it (float32 g / (1 + expf(-g)) * u,
                  rounded to float16) with the C library's expf: the fusion changes nothing
                  but where the gate_up values live
    independent   fused against NumPy alone: gate_up = x @ W.T (+ b) in float32 rounded to
                  float16, silu_mul in float32 with NumPy's exp. Where that gate_up equals the
                  GEMM's (the float32 sums may round the other way), the outputs differ by at
                  most 1 float16 ulp (NumPy's exp and expf may differ in the last float32 bit);
                  everywhere they agree to the GEMM test's tolerance.

The source of the plain GEMM (glu off) must stay what it was before the GLU mode existed: the
7B shapes' sources are compared with those of the commit before it. The fused 7B kernels compile
for sm_90 without spills and with no more registers than the plain GEMM.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_cuda_codegen import nvcc
from test_cuda_gemm_emulated import SHIM, driver, portable_helpers, random_inputs, spec_for

from mlcc.backends.cuda import gemm
from mlcc.backends.cuda.gemm import F16_WIDE_TILE, NARROW_TILE, WIDE_TILE, TileConfig
from mlcc.backends.cuda.kernels import COMMON_SOURCE
from mlcc.backends.cuda.linear import LinearShape

ROOT = Path(__file__).resolve().parents[2]
BEFORE_GLU = "2efa94c53634027e5576fffc313e5da8fffcb2b3"  # the last gemm.py without a GLU mode
GLU_SHIM = SHIM + r"""
#include <cmath>
inline float2 __half22float2(half2 h) { return {(float)h.x, (float)h.y}; }
"""

CASES = [  # (outputs I, k, q4, bias, rows, tile): partial last tiles, rows not a multiple of 128
    (200, 128, True, True, 150, WIDE_TILE),  # the 7B gate_up's tile (128x128, split dequant)
    (72, 96, True, False, 77, NARROW_TILE),  # the tiny models' tile
    (100, 64, False, True, 130, F16_WIDE_TILE),
    (48, 160, False, False, 20, NARROW_TILE),
    (80, 64, True, False, 33, TileConfig(128, 128, 4, 3, 2)),  # 64-wide warp tiles
]


def build(tmp_path: Path, tag: str, s: LinearShape, config: TileConfig, glu: bool) -> Path:
    kernel = gemm.gemm_tc_kernel(s, "gemm", config, glu=glu)
    view = SimpleNamespace(buffers=gemm.glu_buffers(s) if glu else s.buffers, n=s.n)
    source = GLU_SHIM + portable_helpers() + kernel.device_source + driver("gemm", view, config)
    (tmp_path / f"{tag}.cpp").write_text(source)
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-pthread", "-o",
                           str(tmp_path / tag), str(tmp_path / f"{tag}.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / tag


def run(binary: Path, rows: int, inputs: list[Path], shape: tuple[int, int]) -> np.ndarray:
    out = binary.with_suffix(".y.bin")
    np.full(shape, np.nan, np.float16).tofile(out)  # every element must be written
    done = subprocess.run([str(binary), str(rows), "0", *map(str, inputs), str(out), str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.fromfile(out, np.float16).reshape(shape)
    assert not np.isnan(got).any()
    return got


def silu_mul(gate_up: np.ndarray, exp) -> np.ndarray:
    """silu_mul's CUDA arithmetic on float16 gate_up: float32 throughout, rounded at the end."""
    half = gate_up.shape[1] // 2
    g, u = gate_up[:, :half].astype(np.float32), gate_up[:, half:].astype(np.float32)
    return ((g / (np.float32(1) + exp(-g))) * u).astype(np.float16)


def c_expf():
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return np.vectorize(lambda v: np.float32(libm.expf(float(v))), otypes=[np.float32])


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float16 ulps (monotone integer order of the bit patterns)."""
    def order(v):
        bits = v.view(np.int16).astype(np.int32)
        return np.where(bits < 0, -32768 - bits, bits)
    return np.abs(order(a) - order(b))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"i{c[0]}k{c[1]}m{c[4]}_{c[5].tag}")
def test_glu_gemm_equals_gemm_then_silu_mul(tmp_path, case):
    out_n, k, q4, bias, rows, config = case
    n = 2 * out_n
    s = LinearShape(spec_for(n, k, q4, "float16", bias))
    fused_bin = build(tmp_path, "fused", s, config, glu=True)
    plain_bin = build(tmp_path, "plain", s, config, glu=False)
    rng = np.random.default_rng(n + k + rows)
    arrays, w = random_inputs(rng, n, k, q4, bias, rows)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"in{i}.bin")
        a.tofile(paths[-1])
    fused = run(fused_bin, rows, paths, (rows, out_n))
    gate_up = run(plain_bin, rows, paths, (rows, n))

    unfused = silu_mul(gate_up, c_expf())
    assert np.array_equal(fused.view(np.uint16), unfused.view(np.uint16)), \
        f"{int((fused.view(np.uint16) != unfused.view(np.uint16)).sum())} outputs differ"

    x_w = arrays[0].astype(np.float32) @ w.T
    if bias:
        x_w = x_w + arrays[-1].astype(np.float32)
    reference_gu = x_w.astype(np.float16)
    reference = silu_mul(reference_gu, np.exp)
    same_inputs = ((reference_gu[:, :out_n] == gate_up[:, :out_n])
                   & (reference_gu[:, out_n:] == gate_up[:, out_n:]))
    assert same_inputs.mean() > 0.9, "the GEMM itself drifted from x @ W.T"
    assert ulps(fused, reference)[same_inputs].max() <= 1
    expected = silu_mul(x_w.astype(np.float32), np.exp).astype(np.float32)
    np.testing.assert_allclose(fused.astype(np.float32), expected, rtol=4e-3,
                               atol=4e-3 * np.abs(expected).max())


def test_glu_mode_declines_tiles_and_shapes_it_cannot_run():
    s = LinearShape(spec_for(192, 64, True, "float16", False))
    assert gemm.glu_problems(s, NARROW_TILE) == []
    # warp tiles 24 wide (which TileConfig.check refuses anyway): 12-column halves
    assert any("mma fragments" in p for p in gemm.glu_problems(s, TileConfig(64, 96, 2, 4, 2)))
    odd = LinearShape(spec_for(194, 64, True, "float16", False))  # I = 97
    assert any("even" in p for p in gemm.glu_problems(odd, NARROW_TILE))
    f32 = LinearShape(spec_for(192, 64, True, "float32", False))
    assert any("float32" in p for p in gemm.glu_problems(f32, NARROW_TILE))
    with pytest.raises(Exception, match=r"\[compile\] g: the GLU epilogue cannot run 194"):
        gemm.gemm_tc_kernel(odd, "g", NARROW_TILE, glu=True)


def test_plain_gemm_source_is_unchanged_by_the_glu_mode(tmp_path):
    text = subprocess.run(["git", "show", f"{BEFORE_GLU}:mlcc/backends/cuda/gemm.py"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if text.returncode != 0:
        pytest.skip(f"commit {BEFORE_GLU[:7]} is not in this checkout ({text.stderr.strip()})")
    (tmp_path / "gemm_before_glu.py").write_text(text.stdout)
    spec = importlib.util.spec_from_file_location("gemm_before_glu",
                                                  tmp_path / "gemm_before_glu.py")
    before = importlib.util.module_from_spec(spec)
    sys.modules["gemm_before_glu"] = before  # its dataclasses look their module up
    spec.loader.exec_module(before)
    compared = 0
    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]:
        for q4 in (True, False):
            s = LinearShape(spec_for(n, k, q4, "float32" if n == 32000 else "float16", False))
            kind = gemm.gemm_tc_kind(s)
            old = before.gemm_tc_kernel(s, "k", before.choose_tile(s, kind == "q4"))
            new = gemm.gemm_tc_kernel(s, "k", gemm.choose_tile(s, kind == "q4"))
            assert (new.device_source, new.launcher) == (old.device_source, old.launcher), (n, k)
            compared += 1
    assert compared == 10


def test_fused_7b_kernels_compile_without_spills_in_the_plain_gemms_registers(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    kernels, wrappers = [], []
    for q4 in (True, False):
        spec = spec_for(22016, 4096, q4, "float16", False)
        s = LinearShape(spec)
        config = gemm.choose_tile(s, q4)
        buffers = "x, qw, qs, y" if q4 else "x, w, y"
        params = ("const half* x, const unsigned* qw, const half* qs, half* y" if q4
                  else "const half* x, const half* w, half* y")
        for glu in (True, False):
            name = f"{'q4' if q4 else 'f16'}_{'glu' if glu else 'plain'}"
            kernels.append(gemm.gemm_tc_kernel(s, name, config, glu=glu).device_source)
            wrappers.append(f'extern "C" __global__ void __launch_bounds__(256) w_{name}('
                            f"{params}, long long n) {{ {name}_dev({buffers}, n); }}")
    done = nvcc(COMMON_SOURCE + "\n".join(kernels + wrappers), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    used = dict(re.findall(r"entry function 'w_(\w+)'.*?Used (\d+) registers", done.stderr,
                           flags=re.DOTALL))
    assert done.stderr.count(" 0 bytes spill stores") == 4, done.stderr
    for kind in ("q4", "f16"):
        assert int(used[f"{kind}_glu"]) <= int(used[f"{kind}_plain"]), used
