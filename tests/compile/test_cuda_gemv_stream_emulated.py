"""The streamed decode GEMV's generated CUDA run on the CPU, every thread a host thread.

The device function of mlcc.backends.cuda.gemv_stream is compiled with g++ against the shims of
the emulated GEMM and GLU GEMV (test_cuda_gemm_emulated, test_cuda_gemv_glu_emulated): cp.async
copies read at issue and land in shared memory only at the cp.async.wait_group that retires
their group, __syncthreads a barrier of the block's host threads, warp shuffles exchanged at a
per-warp barrier, half2 arithmetic rounded as the hardware rounds. A ring slot read before its
copies were waited for, or refilled while another warp still reads it, gives wrong sums here.
Grids are scaled down (`sms`) so every block loops over several chunks, with partial last
chunks, pairs of words left over past the last full round of threads, and GLU mode.

Each case runs the streamed kernel and the persistent CUDA-core GEMV (mlcc.backends.cuda.gemv)
with the same nibble dot on the same data. Every word's dot is the same function of the same
values in both, so the two differ only in the order of their float32 sums: by at most
(K / 4 + 2) * 2^-24 * sum |x w| (+ |b|), plus one float16 rounding step of the result where
outputs are float16. Independently of that kernel, both are checked against NumPy (float16
weights, float32 sums) within the GEMV parity tolerance, and GLU outputs against silu(g) * u.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_cuda_gemv_glu_emulated import build as build_host
from test_cuda_gemv_glu_emulated import run as run_host
from test_cuda_gemv_persistent import q_linear_spec
from test_cuda_gemv_tc_emulated import TC_HOST
from test_cuda_gemv_tcg_emulated import SYNCWARP
from test_cuda_gemv_tcp_emulated import launch_of, write_inputs
from test_cuda_glu_emulated import silu_mul, ulps

from mlcc.backends.cuda import gemv, glu
from mlcc.backends.cuda.gemv_stream import StreamConfig, gemv_q4_stream_kernel, plan
from mlcc.backends.cuda.linear import LinearShape
from mlcc.errors import MlccError
from mlcc.ir.quant_ops import dequantize_group

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
DOT = "mlcc_q4_dot8_lop3_pairs"

# (N, K, y dtype, bias, GLU, config, sms): N is the weight's rows (2I in GLU mode)
CASES = [
    (40, 256, "float16", False, False, StreamConfig(1, 2, 4, 3), 2),
    (37, 512, "float32", True, False, StreamConfig(1, 1, 2, 2), 3),
    (48, 4096, "float16", True, True, StreamConfig(1, 2, 1, 3), 2),
    (20, 11008, "float16", False, False, StreamConfig(1, 1, 1, 3), 2),
    (26, 768, "float16", False, True, StreamConfig(2, 2, 2, 4), 1),
    (72, 4096, "float32", False, False, StreamConfig(1, 1, 8, 2), 2),
    (40, 256, "float16", True, False, StreamConfig(1, 2, 2, 3, x_regs=True), 2),
    (48, 4096, "float16", False, True, StreamConfig(1, 2, 1, 2, x_regs=True), 2),
]


def case_id(c) -> str:
    n, k, ydt, bias, is_glu, config, sms = c
    return (f"n{n}k{k}_{ydt[5:]}{'_bias' if bias else ''}{'_glu' if is_glu else ''}_"
            f"{config.tag}_sms{sms}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_streamed_gemv_on_host_threads_matches_the_persistent_gemv(tmp_path, case):
    n, k, ydt, bias, is_glu, config, sms = case
    s = LinearShape(q_linear_spec(1, n, k, ydt=ydt, bias=bias))
    expr = glu.SILU_MUL if is_glu else None
    streamed = gemv_q4_stream_kernel(s, "streamed", config, glu=expr, sms=sms)
    core = gemv.gemv_q4_persistent_kernel(s, "core", 2, 4, 1, dot=DOT, sms=sms)
    p = plan(s, config, "streamed", is_glu, sms)
    assert launch_of(streamed) == (p.grid, config.warps)
    assert p.chunks > p.launch_warps  # warps loop over several chunks
    binary = build_host(tmp_path, [streamed, core], s.buffers, TC_HOST + SYNCWARP, launch_of)

    arrays, paths = write_inputs(tmp_path, n, k, 1, bias, seed=n * k)
    x, qw, qs = arrays[:3]
    out_n = n // 2 if is_glu else n
    got = run_host(binary, 0, paths, (1, out_n), ydt).astype(np.float64)
    linear = run_host(binary, 1, paths, (1, n), ydt)  # the core GEMV: the whole linear

    w = dequantize_group(qw, qs, 4, 32, k).astype(np.float16).astype(np.float64)
    b = arrays[-1].astype(np.float64) if bias else np.zeros(n)
    xf = x.astype(np.float64)
    exact = xf @ w.T + b
    scale = np.abs(exact).max()
    assert np.abs(linear - exact).max() / scale < 2e-3
    if not is_glu:
        bound = (k / 4 + 2) * 2.0**-24 * (np.abs(xf) @ np.abs(w).T + np.abs(b))
        if ydt == "float16":
            bound = bound + 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 2.0**-14))) - 10)
        gap = np.abs(got - linear)
        assert (gap <= bound).all(), f"{int((gap > bound).sum())} outputs beyond the sum order"
        assert np.abs(got - exact).max() / scale < 2e-3
        return
    unfused = silu_mul(linear.astype(np.float16), np.exp)
    assert ulps(got.astype(np.float16), unfused).max() <= 2
    expected = silu_mul(exact.astype(np.float32), np.exp).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=4e-3, atol=4e-3 * np.abs(expected).max())


def test_streamed_gemv_refuses_what_it_cannot_run():
    ok = LinearShape(q_linear_spec(1, 64, 4096))
    with pytest.raises(MlccError, match=r"^\[compile\] t: the streamed GEMV needs q4f16_1 .* "
                                        r"K % 256 == 0.* got N=64, K=384, rows 1"):
        plan(LinearShape(q_linear_spec(1, 64, 384)), StreamConfig(), "t")
    with pytest.raises(MlccError, match=r"rows 2;"):
        plan(LinearShape(q_linear_spec(2, 64, 4096)), StreamConfig(), "t")
    with pytest.raises(MlccError, match=r"81920 bytes of shared memory > 49152"):
        plan(ok, StreamConfig(1, 2, 4, 4), "t")
    with pytest.raises(MlccError, match=r"GLU mode needs an even gate_up row count and float16 values, got 63 rows"):
        plan(LinearShape(q_linear_spec(1, 63, 4096)), StreamConfig(), "t", glu=True)
    with pytest.raises(MlccError, match=r"warps must be 1 to 8; rows must be 1, 2, 4 or 8"):
        plan(ok, StreamConfig(1, 9, 3, 2), "t")
