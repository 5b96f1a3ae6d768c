"""The persistent tensor-core GEMV's generated CUDA run on the CPU, every thread a host thread.

The device function of mlcc.backends.cuda.gemv_tcp is compiled with g++ against the shims of
the tensor-core emulations (test_cuda_gemm_emulated: shared arrays shared by a block's threads,
__syncthreads a barrier, global loads bounds-checked, mma.m16n8k16 gathered from the 32 lanes'
fragments as the PTX ISA lays them out, its float32 sums in order) and of the GLU GEMV's
(half2 intrinsics rounded once, warp shuffles, COMMON_SOURCE with the PTX lop3 macro replaced
by the plain C it computes). Blocks run in turn; the grids are scaled down (`sms`) so warps
loop over several tiles, partial last tiles included, and rows that do not fit the shared
memory at once are staged in several passes.

Reference: NumPy dequantizes as q_linear does (each weight rounded to float16) and sums in
float64. Every product of two float16 values is exact in float32, so the kernel's only errors
are its float32 additions (K of them into the accumulator, one for the bias): by the standard
recursive-summation bound |sum_fp32 - sum| <= (K + 1) * 2^-24 * sum_k |x_k w_k| (+ |b|) in any
order; float16 outputs may add half a float16 ulp of the result for their final rounding. The
same data through the persistent CUDA-core GEMV (gemv.py with mlcc_q4_dot8_lop3_pairs, products
summed in pairs in float16) must be no closer to the reference than this kernel.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cuda_gemv_glu_emulated import build as build_host
from test_cuda_gemv_glu_emulated import run as run_host
from test_cuda_gemv_persistent import q_linear_spec
from test_cuda_gemv_tc_emulated import TC_HOST

from mlcc.backends.cuda import gemv
from mlcc.backends.cuda.gemv_tcp import TcpConfig, gemv_q4_tcp_kernel, plan
from mlcc.backends.cuda.linear import LinearShape
from mlcc.errors import MlccError
from mlcc.ir.quant_ops import dequantize_group

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def launch_of(kernel) -> tuple[int, int]:
    """(grid, warps) read back from a generated kernel's launcher."""
    grid = re.search(r"T\.thread_binding\(T\.int64\((\d+)\), thread=\"blockIdx\.x\"",
                     kernel.launcher).group(1)
    threads = re.search(r"T\.thread_binding\((\d+), thread=\"threadIdx\.x\"",
                        kernel.launcher).group(1)
    return int(grid), int(threads) // 32


def build(tmp_path: Path, kernels: list, buffers: list[tuple]) -> Path:
    """The GLU GEMV emulation's host program, with the tensor-core stand-ins."""
    return build_host(tmp_path, kernels, buffers, TC_HOST, launch_of)


def run(binary: Path, which: int, inputs: list[Path], shape: tuple[int, int],
        ydt: str) -> np.ndarray:
    return run_host(binary, which, inputs, shape, ydt).astype(np.float64)


def write_inputs(tmp_path: Path, n: int, k: int, rows: int, bias: bool,
                 seed: int) -> tuple[list[np.ndarray], list[Path]]:
    """Random x (rows, K), packed codes, scales and (with bias) a bias, each written to a file
    of tmp_path for the host program: (arrays, paths)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * 2).astype(np.float16)
    qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qs = (rng.random((n, k // 32)) * 0.05 + 0.001).astype(np.float16)
    arrays = [x, qw, qs] + ([rng.standard_normal(n).astype(np.float16)] if bias else [])
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"in{i}.bin")
        a.tofile(paths[-1])
    return arrays, paths


def half_ulp16(v: np.ndarray) -> np.ndarray:
    """Half the float16 spacing at |v| (subnormal spacing below 2^-14)."""
    exp = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-14)))
    return 2.0 ** (exp - 11)


# (N, K, rows, y dtype, bias, config, sms): sms scales the grid down so warps take several
# tiles; N % 16 != 0 leaves partial last tiles; 8 rows at K = 4096 and 2 at K = 11008 stage
# in two passes; K = 128 is one round per tile (the load ring runs ahead across tiles)
CASES = [
    (40, 256, 1, "float16", False, TcpConfig(1, 2, 2), 1),
    (100, 512, 3, "float32", True, TcpConfig(1, 2, 3), 2),
    (72, 4096, 1, "float32", False, TcpConfig(1, 2, 2), 1),
    (200, 4096, 8, "float16", True, TcpConfig(1, 4, 3), 1),
    (24, 11008, 2, "float16", False, TcpConfig(1, 1, 4), 1),
    (17, 128, 3, "float32", True, TcpConfig(1, 1, 2), 1),
    (56, 384, 5, "float16", False, TcpConfig(1, 2, 1), 1),
]


def case_id(c) -> str:
    n, k, rows, ydt, bias, config, sms = c
    return f"n{n}k{k}m{rows}_{ydt[5:]}{'_bias' if bias else ''}_{config.tag}_sms{sms}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tcp_gemv_on_host_threads_is_float32_exact_and_beats_the_cuda_core_gemv(tmp_path, case):
    n, k, rows, ydt, bias, config, sms = case
    s = LinearShape(q_linear_spec(rows, n, k, ydt=ydt, bias=bias))
    tcp = gemv_q4_tcp_kernel(s, "tcp", config, sms=sms)
    core = gemv.gemv_q4_persistent_kernel(s, "core", 2, 4, 1, dot="mlcc_q4_dot8_lop3_pairs",
                                          sms=sms)
    p = plan(s, config, "tcp", sms)
    assert launch_of(tcp) == (p.grid, config.warps)
    assert p.tiles > p.stride  # warps loop over several tiles
    binary = build(tmp_path, [tcp, core], s.buffers)

    arrays, paths = write_inputs(tmp_path, n, k, rows, bias, seed=n * k + rows)
    x, qw, qs = arrays[:3]
    got = run(binary, 0, paths, (rows, n), ydt)
    got_core = run(binary, 1, paths, (rows, n), ydt)

    w = dequantize_group(qw, qs, 4, 32, k).astype(np.float16).astype(np.float64)
    b = arrays[-1].astype(np.float64) if bias else np.zeros(n)
    xf = x.astype(np.float64)
    reference = xf @ w.T + b
    bound = (k + 1) * 2.0**-24 * (np.abs(xf) @ np.abs(w).T + np.abs(b))
    if ydt == "float16":
        bound = bound + half_ulp16(reference)
    err, err_core = np.abs(got - reference), np.abs(got_core - reference)
    assert (err <= bound).all(), f"{int((err > bound).sum())} outputs over the float32 bound"
    assert err.max() <= err_core.max(), (err.max(), err_core.max())
    if ydt == "float32":  # float16 pair sums: the CUDA-core GEMV is far from float32 exact
        assert err.mean() < err_core.mean() / 4, (err.mean(), err_core.mean())
    print(f"{case_id(case)}: max |err| {err.max():.3e} (CUDA-core {err_core.max():.3e}), "
          f"worst err / bound {(err / bound).max():.3f}")


def test_tcp_refuses_what_it_cannot_run():
    ok = LinearShape(q_linear_spec(1, 64, 256))
    with pytest.raises(MlccError, match=r"^\[compile\] t: the persistent tensor-core GEMV "
                                        r"needs .* K % 128 == 0 .* got N=64, K=96"):
        plan(LinearShape(q_linear_spec(1, 64, 96)), TcpConfig(), "t")
    with pytest.raises(MlccError, match=r"1\.\.8 static rows; got .* rows 9"):
        plan(LinearShape(q_linear_spec(9, 64, 256)), TcpConfig(), "t")
    with pytest.raises(MlccError, match=r"3072 threads per SM, over the 2048 .* <= 64"):
        plan(ok, TcpConfig(12, 8, 2), "t")
    with pytest.raises(MlccError, match=r"warps must be 1, 2, 4 or 8, depth 1\.\.4"):
        plan(ok, TcpConfig(2, 4, 5), "t")
    with pytest.raises(MlccError, match=r"one staged row of K=20096 .* use K <= 19584"):
        plan(LinearShape(q_linear_spec(1, 64, 20096)), TcpConfig(), "t")
