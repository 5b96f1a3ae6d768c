"""The group-aligned tensor-core GEMV's generated CUDA run on the CPU, every thread a host thread.

The device function of mlcc.backends.cuda.gemv_tcg is compiled with g++ against the shims of
the tensor-core emulations (test_cuda_gemm_emulated: shared arrays shared by a block's threads,
__syncthreads a barrier, global loads bounds-checked, mma.m16n8k16 gathered from the 32 lanes'
fragments as the PTX ISA lays them out, its float32 sums in order) and of the GLU GEMV's
(half2 intrinsics rounded once, warp shuffles, COMMON_SOURCE with the PTX lop3 macro replaced
by the plain C it computes), plus __syncwarp as a warp barrier.

Reference: float64 sums of the exact products x * (c - 7) * s. The exact form's products are
exact in float32 and the scale is applied to a group's float32 sum once, so its only errors
are float32 additions and one rounding per group: within (K + 1) * 2^-24 * sum |x w| (+ |b|).
The folded form's mma sums values up to ~1300 |x| s before its offset is removed, so its bound
carries that magnitude, plus half a float16 subnormal step of each activation below 2^-10
(divided by 16 when staged) times 1264 s. Float16 outputs add half a float16 ulp. Both must be
no farther from the reference than the persistent CUDA-core GEMV (float16 pair sums).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_cuda_gemv_glu_emulated import build
from test_cuda_gemv_persistent import DECODE_SHAPES, ptxas, q_linear_spec
from test_cuda_gemv_tc_emulated import TC_HOST
from test_cuda_gemv_tcp_emulated import half_ulp16, launch_of, run, write_inputs

from mlcc.backends.cuda import gemv
from mlcc.backends.cuda.gemv_tcg import (
    TcgConfig,
    TcgpConfig,
    applies,
    gemv_q4_tcg_kernel,
    gemv_q4_tcgp_kernel,
)
from mlcc.backends.cuda.linear import LinearShape
from mlcc.errors import MlccError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
SYNCWARP = "inline void __syncwarp() { g_warps[threadIdx.x >> 5].bar->arrive_and_wait(); }\n"

# (N, K, y dtype, bias, config): N % 16 != 0 leaves a partial last tile; K = 256 is one
# iteration (idle warps), K = 11008 is 86 cols iterations over 8 warps (uneven), depth 1..3
CASES = [
    (40, 256, "float16", False, TcgConfig(2, 1)),
    (40, 1024, "float32", True, TcgConfig(4, 2, fold=True)),
    (72, 384, "float32", True, TcgConfig(4, 2, cols=True)),
    (24, 11008, "float16", False, TcgConfig(8, 3, cols=True)),
    (33, 11008, "float16", False, TcgConfig(8, 1, fold=True, cols=True)),
]
# The persistent form with the grid scaled to one SM (`sms`), so warps walk several tiles and
# the load ring crosses tile ends: (N, K, y dtype, bias, config)
PERSISTENT_CASES = [
    (72, 256, "float16", True, TcgpConfig(1, 2, 2)),
    (40, 11008, "float16", False, TcgpConfig(1, 2, 4)),
    (72, 1024, "float32", True, TcgpConfig(2, 2, 2, fold=True)),
]


def case_id(c) -> str:
    n, k, ydt, bias, config = c
    return f"n{n}k{k}_{ydt[5:]}{'_bias' if bias else ''}_{config.tag}"


@pytest.mark.parametrize("case", CASES + PERSISTENT_CASES, ids=case_id)
def test_tcg_gemv_on_host_threads_is_within_its_float32_bound(tmp_path, case):
    n, k, ydt, bias, config = case
    s = LinearShape(q_linear_spec(1, n, k, ydt=ydt, bias=bias))
    core = gemv.gemv_q4_persistent_kernel(s, "core", 2, 4, 1, dot="mlcc_q4_dot8_lop3_pairs",
                                          sms=1)
    if isinstance(config, TcgpConfig):
        tcg = gemv_q4_tcgp_kernel(s, "tcg", config, sms=1)
        grid, warps = launch_of(tcg)
        assert warps == config.warps and grid * warps < -(-n // 16)  # several tiles a warp
    else:
        tcg = gemv_q4_tcg_kernel(s, "tcg", config)
        assert launch_of(tcg) == (-(-n // 16), config.warps)
    binary = build(tmp_path, [tcg, core], s.buffers, TC_HOST + SYNCWARP, launch_of)

    arrays, paths = write_inputs(tmp_path, n, k, 1, bias, seed=n * k)
    x, qw, qs = arrays[:3]
    got = run(binary, 0, paths, (1, n), ydt)
    got_core = run(binary, 1, paths, (1, n), ydt)

    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((qw[:, :, None] >> shifts) & 15).reshape(n, k).astype(np.float64)
    scale = np.repeat(qs.astype(np.float64), 32, axis=1)
    w = (codes - 7) * scale
    b = arrays[-1].astype(np.float64) if bias else np.zeros(n)
    xf = x.astype(np.float64)
    reference = xf @ w.T + b
    magnitude = np.abs(xf) @ np.abs(w).T
    if config.fold:
        tiny = (np.abs(xf) < 2.0**-10).astype(np.float64)
        magnitude = magnitude + np.abs(xf) @ (1300 * scale).T
        extra = tiny @ (1264 * 2.0**-25 * scale).T
    else:
        extra = 0.0
    bound = (k + 1) * 2.0**-24 * (magnitude + np.abs(b)) + extra
    if ydt == "float16":
        bound = bound + half_ulp16(reference)
    err, err_core = np.abs(got - reference), np.abs(got_core - reference)
    assert (err <= bound).all(), f"{int((err > bound).sum())} outputs over the bound"
    assert err.max() <= err_core.max(), (err.max(), err_core.max())
    print(f"{case_id(case)}: max |err| {err.max():.3e} (CUDA-core {err_core.max():.3e}), "
          f"worst err / bound {(err / bound).max():.3f}")


def test_tcg_applies_to_one_row_q4_with_whole_iterations_only():
    assert applies(LinearShape(q_linear_spec(1, 4096, 11008)))
    assert not applies(LinearShape(q_linear_spec(2, 4096, 4096)))  # one row only
    assert not applies(LinearShape(q_linear_spec(1, 64, 4000)))  # K % 256
    with pytest.raises(MlccError, match=r"^\[compile\] t: the tcg GEMV needs .* K % 256 == 0"):
        gemv_q4_tcg_kernel(LinearShape(q_linear_spec(1, 64, 4000)), "t", TcgConfig())
    with pytest.raises(MlccError, match="warps must be 1, 2, 4, 8 or 16 and depth 1..3"):
        TcgConfig(warps=3)


def test_tcg_rule_follows_the_database(monkeypatch):
    """gemv_q4_tcg_rule takes a shape only where the database's single-row winner has kind
    "tcg", with that record's config (the shipped database has none, so nothing changes)."""
    from mlcc.backends.cuda import gemv_tc, gemv_tcg, gemv_tma, linear

    spec = q_linear_spec(1, 4096, 11008)
    assert gemv_tcg.gemv_q4_tcg_rule(spec, "k") is None  # the shipped database
    # first after the TMA rule, which takes only the specs the tma_gemv knob marked
    assert linear.LINEAR_RULES[:2] == (gemv_tma.gemv_tma_rule, gemv_tcg.gemv_q4_tcg_rule)
    assert gemv_tma.gemv_tma_rule(spec, "k") is None
    record = {"kind": "tcg", "warps": 16, "depth": 1, "fold": False, "cols": True, "us": 11.0}
    monkeypatch.setattr(gemv_tc, "_database", lambda: {"best": {"4096,11008": record}})
    kernel = linear.gen_linear(spec, "k")
    assert "mlcc_tcg_exact" in kernel.device_source and "bx[4]" in kernel.device_source
    assert launch_of(kernel) == (256, 16)
    assert gemv_tcg.gemv_q4_tcg_rule(q_linear_spec(2, 4096, 11008), "k") is None  # two rows


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_7b_decode_tcg_kernels_compile_for_sm90_without_spills(tmp_path):
    """The exact cols kernels (the form at parity on the H200) and the default persistent one
    at the 7B decode shapes: nvcc sm_90 compiles them with no spills and with their mmas."""
    kernels = []
    for n, k in DECODE_SHAPES:
        s = LinearShape(q_linear_spec(1, n, k, ydt="float32" if n == 32000 else "float16"))
        kernels += [gemv_q4_tcg_kernel(s, f"tcg_{n}_{k}_{c.tag}", c)
                    for c in (TcgConfig(4, 1, cols=True), TcgConfig(16, 1, cols=True))]
        kernels.append(gemv_q4_tcgp_kernel(s, f"tcgp_{n}_{k}", TcgpConfig()))
    done = ptxas(kernels, tmp_path, "ptx")
    assert done.returncode == 0, done.stderr[-2000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert "ld.global.nc.v4.u32" in ptx  # whole groups in one load (cols layout)
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" 0 bytes spill stores") == len(kernels), done.stderr
