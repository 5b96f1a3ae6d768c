"""The persistent decode GEMV with the integer dot (gemv.DP2A) run on the CPU, every thread a
host thread.

The generated device function is compiled with g++ against the shims of the GLU GEMV's
emulation (test_cuda_gemv_glu_emulated), plus the integer intrinsics the dot and its staging
use, written from their definitions in the CUDA documentation: __dp2a_lo / __dp2a_hi (two
signed 16-bit halves of a times two signed bytes of b, low or high pair, plus c),
__float2int_rn (round half to even), __float_as_int / __int_as_float (bit casts).

The reference is NumPy alone, from the staging's definition: per group of 32 activations, E =
floor(log2 max |x|), a = round(x * 2^(14 - E)) (to even), then each output is the sum over
groups of (sum_k (c_k - 7) a_k) * 2^(E - 14) * scale in exact integers and float64. The kernel
sums those group terms in float32 (one rounding per term and per addition), so it agrees with
that reference to (K / 32 + 2) * 2^-24 * sum |term| (+ half a float16 step for float16
outputs). Independently, against the float dot of float16 activations and weights (q_linear's
definition), the error stays within the GEMV parity tolerance, and on float32 outputs it is on
average below the float16-pair dot's (mlcc_q4_dot8_lop3_pairs, same data); both are then
bounded mostly by that definition's float16 rounding of each weight, which neither kernel does.
"""

from __future__ import annotations

import re
import shutil
from unittest import mock

import numpy as np
import pytest
from test_cuda_gemv_glu_emulated import build, run
from test_cuda_gemv_persistent import launched, q_linear_spec
from test_cuda_glu_emulated import silu_mul

from mlcc.backends.cuda import gemv, glu, linear, tuning
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.ir.quant_ops import dequantize_group

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

INT_HOST = r"""
#include <cstdint>
inline int mlcc_host_i16(unsigned v, int half) { return (int)(int16_t)(v >> (16 * half)); }
inline int mlcc_host_i8(unsigned v, int byte) { return (int)(int8_t)(v >> (8 * byte)); }
inline int __dp2a_lo(int a, int b, int c) {
  return c + mlcc_host_i16(a, 0) * mlcc_host_i8(b, 0) + mlcc_host_i16(a, 1) * mlcc_host_i8(b, 1);
}
inline int __dp2a_hi(int a, int b, int c) {
  return c + mlcc_host_i16(a, 0) * mlcc_host_i8(b, 2) + mlcc_host_i16(a, 1) * mlcc_host_i8(b, 3);
}
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float2int_rn(float f) { return (int)nearbyintf(f); }
struct int2 { int x, y; };
inline int2 make_int2(int x, int y) { return {x, y}; }
"""


def group_reference(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, k: int):
    """(sum of group terms in float64, sum of |term|) per row and feature, by the staging's
    definition (module docstring)."""
    rows, groups = x.shape[0], k // 32
    xg = x.astype(np.float64).reshape(rows, groups, 32)
    m = np.abs(xg).max(axis=2)
    ex = np.floor(np.log2(np.where(m > 0, m, 1.0)))
    a = np.rint(xg * 2.0 ** (14 - ex)[..., None])  # numpy rounds half to even
    assert np.abs(a).max() < 2**15
    factor = np.where(m > 0, 2.0 ** (ex - 14), 0.0)
    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((qw[:, :, None] >> shifts) & 0xF).reshape(qw.shape[0], groups, 32).astype(np.int64)
    isum = np.einsum("rgk,ngk->rng", a.astype(np.int64), codes - 7)  # exact integers
    terms = isum * factor[:, None, :] * qs.astype(np.float64)[None]
    return terms.sum(axis=2), np.abs(terms).sum(axis=2)


def random_inputs(tmp_path, seed: int, rows: int, n: int, k: int, scale: float,
                  large: tuple[int, float], zero: tuple[int, int]):
    """x (one large column, one all-zero group), random codes and scales, written to files."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * scale).astype(np.float16)
    x[:, large[0]] = large[1]  # the rest of its group keeps fewer bits, as designed
    x[zero[0], zero[1]:zero[1] + 32] = 0.0
    qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qs = (rng.random((n, k // 32)) * 0.05 + 0.001).astype(np.float16)
    return x, qw, qs, write_inputs(tmp_path, [x, qw, qs])


def write_inputs(tmp_path, arrays) -> list:
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"in{i}.bin")
        a.tofile(paths[-1])
    return paths


def rounding_bound(reference: np.ndarray, magnitude: np.ndarray, k: int, ydt: str) -> np.ndarray:
    """float32 rounding of the group terms' sum (module docstring), plus half a float16 step
    for float16 outputs."""
    bound = (k / 32 + 2) * 2.0**-24 * magnitude
    if ydt == "float16":
        bound = bound + 2.0 ** (np.floor(np.log2(np.maximum(np.abs(reference), 2.0**-14))) - 11)
    return bound

# (N, K, rows, y dtype, GLU, blocks per SM, warps, features per warp): SMS = 2 in the
# emulation, so warps loop over several tiles; K = 11008 has groups past the last full round
# of lanes; 5 rows at K = 4096 stage in two passes
CASES = [
    (40, 256, 1, "float16", False, 2, 4, 1),
    (72, 4096, 1, "float32", False, 3, 4, 2),
    (24, 11008, 1, "float16", False, 2, 4, 1),
    (48, 4096, 5, "float16", False, 1, 4, 2),
    (80, 4096, 1, "float16", True, 2, 4, 1),
    (36, 512, 3, "float16", True, 1, 2, 2),
]


def case_id(c) -> str:
    n, k, rows, ydt, is_glu, bps, warps, rpw = c
    return f"n{n}k{k}m{rows}_{ydt[5:]}{'_glu' if is_glu else ''}_p{bps}_w{warps}_r{rpw}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_integer_dot_gemv_on_host_threads_is_exact_per_group(tmp_path, case):
    n, k, rows, ydt, is_glu, bps, warps, rpw = case
    s = LinearShape(q_linear_spec(rows, n, k, ydt=ydt))
    expr = glu.SILU_MUL if is_glu else None
    exact_dot = gemv.gemv_q4_persistent_kernel(s, "dp2a", bps, warps, rpw, dot=gemv.DP2A,
                                               sms=2, glu=expr)
    plain = gemv.gemv_q4_persistent_kernel(s, "plain", bps, warps, 2 * rpw if is_glu else rpw,
                                           dot=gemv.DP2A, sms=2)
    pairs = gemv.gemv_q4_persistent_kernel(s, "pairs", bps, warps, rpw,
                                           dot="mlcc_q4_dot8_lop3_pairs", sms=2)
    _, _, stride = launched(plain)
    assert stride < gemv.tile_count(n, 2 * rpw if is_glu else rpw)  # several tiles a warp
    binary = build(tmp_path, [exact_dot, plain, pairs], s.buffers, INT_HOST)

    x, qw, qs, paths = random_inputs(tmp_path, n * k + rows, rows, n, k, 3, (5, 300.0), (0, 32))
    linear = run(binary, 1, paths, (rows, n), ydt).astype(np.float64)
    float_dot = run(binary, 2, paths, (rows, n), ydt).astype(np.float64)

    reference, magnitude = group_reference(x, qw, qs, k)
    bound = rounding_bound(reference, magnitude, k, ydt)
    gap = np.abs(linear - reference)
    assert (gap <= bound).all(), f"{int((gap > bound).sum())} outputs beyond float32 rounding"

    w = dequantize_group(qw, qs, 4, 32, k).astype(np.float16).astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    scale = np.abs(exact).max()
    err, err_pairs = np.abs(linear - exact), np.abs(float_dot - exact)
    assert err.max() / scale < 2e-3, err.max() / scale
    if ydt == "float32":  # float16 outputs round both to the same steps
        assert err.mean() < err_pairs.mean(), (err.mean(), err_pairs.mean())

    if is_glu:
        got = run(binary, 0, paths, (rows, n // 2), ydt)
        with np.errstate(over="ignore"):  # exp(-g) overflows for g << 0: silu is then 0
            unfused = silu_mul(linear.astype(np.float16), np.exp)
        assert np.array_equal(got.view(np.uint16), unfused.view(np.uint16))


def test_integer_dot_propagates_nan_and_refuses_prologues(tmp_path):
    s = LinearShape(q_linear_spec(1, 16, 256))
    kernel = gemv.gemv_q4_persistent_kernel(s, "dp2a", 1, 2, 1, dot=gemv.DP2A, sms=1)
    binary = build(tmp_path, [kernel], s.buffers, INT_HOST)
    x = np.ones((1, 256), np.float16)
    x[0, 40] = np.nan
    qw = np.full((16, 32), 0x77777778, np.uint32)
    qs = np.full((16, 8), 0.5, np.float16)
    paths = write_inputs(tmp_path, [x, qw, qs])
    out = binary.with_suffix(".y0.bin")
    np.zeros((1, 16), np.float16).tofile(out)
    import subprocess

    done = subprocess.run([str(binary), "0", *map(str, paths), str(out), str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.isnan(np.fromfile(out, np.float16)).all()
    with pytest.raises(MlccError, match=r"integer dot stages its own activations"):
        gemv.gemv_q4_persistent_kernel(s, "f", 1, 2, 1, staging="xs[0] = 0;", dot=gemv.DP2A)


def test_gpu_cases_force_the_integer_dot_on_every_decode_gemv():
    """tests/gpu/cuda_cases.py builds its *_dp2a cases under forced_dp2a: there the rules
    hand tiny decode linears and the GLU pair to the persistent GEMV with the integer dot, and
    for *_dp2a_block the plain linears to the one-shot GEMV with it."""
    import importlib.util
    from pathlib import Path

    from mlcc.backends.cuda.linear import LINEAR_RULES

    path = Path(__file__).resolve().parents[1] / "gpu" / "cuda_cases.py"
    spec = importlib.util.spec_from_file_location("cuda_cases_under_test", path)
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    assert {"llama_q4f16_1_dp2a", "mistral_q4f16_1_dp2a"} <= {c[0] for c in cases.CASES}
    linear = q_linear_spec(1, 96, 64)
    gate_up = KernelSpec(glu.OP, linear.inputs, (((1, 48), "float16"),),
                         tuple(sorted(linear.attrs + ((glu.WEIGHTS_ATTR, "q4"),))))

    def sources() -> tuple[str, str]:
        plain = next(k for k in (rule(linear, "t") for rule in LINEAR_RULES) if k is not None)
        return plain.device_source, glu.gen_linear_silu_mul(gate_up, "g").device_source

    assert all("mlcc_q4_dp2a(" not in src for src in sources())
    with cases.forced_dp2a():
        assert all("mlcc_q4_dp2a(" in src for src in sources())
        assert "xq[rot]" not in sources()[0]  # the persistent kernel
    assert {"llama_q4f16_1_dp2a_block", "mistral_q4f16_1_dp2a_block"} <= {c[0] for c in cases.CASES}
    with cases.case_database("llama_q4f16_1_dp2a_block"):
        plain, gated = sources()
        assert "mlcc_q4_dp2a(" in plain and "xq[rot]" in plain  # the one-shot kernel
        assert "mlcc_q4_dp2a(" in gated


def one_shot_launch(kernel) -> tuple[int, int]:
    """(grid, warps) of a one-shot GEMV's launcher."""
    grid = int(re.search(r"T\.thread_binding\(T\.int64\((\d+)\), thread=\"blockIdx\.x\"",
                         kernel.launcher).group(1))
    threads = int(re.search(r"T\.thread_binding\((\d+), thread=\"threadIdx\.x\"",
                            kernel.launcher).group(1))
    return grid, threads // 32


# (N, K, rows, y dtype, warps, features per warp): partial last blocks (N = 40, 33), K = 11008's
# groups past the last full round of lanes, two rows staged in turn, float32 logits
ONE_SHOT_CASES = [
    (40, 256, 1, "float16", 4, 2),
    (24, 11008, 1, "float16", 4, 2),
    (72, 4096, 2, "float32", 2, 4),
    (33, 4096, 1, "float16", 8, 1),
    (60, 4096, 1, "float16", 4, 4),  # the 7B qkv GEMV's launch
]


@pytest.mark.parametrize("case", ONE_SHOT_CASES,
                         ids=lambda c: f"n{c[0]}k{c[1]}m{c[2]}_w{c[4]}_r{c[5]}")
def test_one_shot_integer_dot_equals_the_persistent_kernel(tmp_path, case):
    """The one-shot GEMV with the integer dot (linear.gemv_q4_kernel, rotated activation reads)
    gives the persistent kernel's bits (same group terms, summed in the same order) and stays
    within float32 rounding of the exact per-group reference."""
    n, k, rows, ydt, warps, rpw = case
    s = LinearShape(q_linear_spec(rows, n, k, ydt=ydt))
    one_shot = linear.gemv_q4_kernel(s, "once", warps, rpw, dot=gemv.DP2A)
    persistent = gemv.gemv_q4_persistent_kernel(s, "pers", 2, 4, 1, dot=gemv.DP2A, sms=2)
    assert "xq[rot]" in one_shot.device_source

    def launch(kernel):
        return one_shot_launch(kernel) if kernel is one_shot else launched(kernel)[:2]

    binary = build(tmp_path, [one_shot, persistent], s.buffers, INT_HOST, launch)
    x, qw, qs, paths = random_inputs(tmp_path, 7 * n + k + rows, rows, n, k, 2, (3, -250.0),
                                     (rows - 1, 64))
    got = run(binary, 0, paths, (rows, n), ydt)
    same = run(binary, 1, paths, (rows, n), ydt)
    assert np.array_equal(got.view(np.uint8), same.view(np.uint8))

    reference, magnitude = group_reference(x, qw, qs, k)
    bound = rounding_bound(reference, magnitude, k, ydt)
    assert (np.abs(got.astype(np.float64) - reference) <= bound).all()


def test_one_shot_integer_dot_refuses_prologues_and_fusion_falls_back():
    from mlcc.backends.cuda import fusion

    s = LinearShape(q_linear_spec(1, 16, 256))
    with pytest.raises(MlccError, match=r"integer dot stages its own activations"):
        linear.gemv_q4_kernel(s, "f", 2, 1, staging="xs[0] = 0;", dot=gemv.DP2A)
    record = {"kind": "block", "warps": 4, "rows_per_warp": 2, "dot": gemv.DP2A}
    with mock.patch.object(tuning, "_database", lambda: {"best": {"16,256": record}}):
        assert tuning.gemv_config(16, 256) == (4, 2, gemv.DP2A)
        assert fusion._prologue_config(s) == (4, 2, "mlcc_q4_dot8_lop3_pairs")



@pytest.mark.parametrize("case", [c for c in ONE_SHOT_CASES if c[2] == 1],
                         ids=lambda c: f"n{c[0]}k{c[1]}_w{c[4]}_r{c[5]}")
def test_row_first_gives_the_one_shot_bits(tmp_path, case):
    """row_first (the activation row's loads issued ahead of the weights', then staged from
    registers) stages the same integers and factors, so the output is the one-shot kernel's,
    bit for bit; two threads' groups each at K = 11008 with 128 threads."""
    n, k, _, ydt, warps, rpw = case
    s = LinearShape(q_linear_spec(1, n, k, ydt=ydt))
    plain = linear.gemv_q4_kernel(s, "once", warps, rpw, dot=gemv.DP2A)
    first = linear.gemv_q4_kernel(s, "first", warps, rpw, dot=gemv.DP2A, row_first=True)
    body = first.device_source[first.device_source.index("first_dev("):]
    assert body.index("mlcc_grid_wait();") < body.index("sraw[i][j] =") < body.index("__ldg(")
    binary = build(tmp_path, [plain, first], s.buffers, INT_HOST, one_shot_launch)
    x, qw, qs, paths = random_inputs(tmp_path, 5 * n + k, 1, n, k, 2, (0, -250.0), (0, 64))
    got = run(binary, 1, paths, (1, n), ydt)
    assert np.array_equal(got.view(np.uint8), run(binary, 0, paths, (1, n), ydt).view(np.uint8))
    reference, magnitude = group_reference(x, qw, qs, k)
    assert (np.abs(got.astype(np.float64) - reference)
            <= rounding_bound(reference, magnitude, k, ydt)).all()


def test_row_first_takes_one_plain_row_with_the_integer_dot():
    for rows, dot in ((2, gemv.DP2A), (1, "mlcc_q4_dot8")):
        s = LinearShape(q_linear_spec(rows, 16, 256))
        with pytest.raises(MlccError, match=r"row_first needs the integer dot on one plain row"):
            linear.gemv_q4_kernel(s, "f", 2, 1, dot=dot, row_first=True)
