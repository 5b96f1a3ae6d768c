"""Folded norms (mlcc.backends.cuda.norm_fold) run on the CPU, every thread a host thread.

The kernels of a folded (GEMV, add_rms_norm, GEMV) run are generated from the specs the plan
gives them and compiled with g++ against the integer-dot GEMVs' shims
(test_cuda_gemv_dp2a_emulated), launched as on the GPU (the database's launch replaced by a
small one). Checks, on random codes, scales, activations and residuals:

    GEMV ahead, bit for bit   sum_out = float16(float16 result of the plain one-shot GEMV, same
                              launch + residual), as add_rms_norm rounds its sum; ssq[r, b] =
                              the float32 sum of squares of block b's stored sums in the
                              kernel's order (each warp's features in turn, then the warps)
    GEMV after, bit for bit   the plain GEMV of the same launch on the row normalized in NumPy
                              by the kernel's definition: the partials summed lane by lane
                              (lane i: i, i + 32, ...) and then by the warp's butterfly,
                              inv = 1 / sqrt(sum / K + eps), float16(s * inv * (w + offset))
                              (the one-shot GEMV, and the persistent GEMV's GLU mode)
    independent               the chain against NumPy alone (float32 GEMV of dequantized
                              weights, the add and RMSNorm of the IR's reference, the second
                              GEMV), within the GEMV parity tests' tolerance
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from test_cuda_gemv_dp2a_emulated import INT_HOST, one_shot_launch, write_inputs
from test_cuda_gemv_glu_emulated import build, run
from test_cuda_gemv_persistent import launched, q_linear_spec
from test_cuda_glu_emulated import c_expf, silu_mul

from mlcc.backends.cuda import glu, linear, norm_fold, tuning
from mlcc.backends.cuda.intdot import DP2A
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.cuda.tuning import PersistentConfig
from mlcc.backends.plan import KernelSpec
from mlcc.ir.quant_ops import dequantize_group

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
QUANT = (("bits", 4), ("group_size", 32))
EPS = 1e-5


def q4(rng, n: int, k: int):
    return (rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32),
            (rng.random((n, k // 32)) * 0.04 + 0.002).astype(np.float16))


def producer_spec(rows: int, n: int, k: int, parts: int) -> KernelSpec:
    inputs = q_linear_spec(rows, n, k).inputs + (((rows, n), "float16"),)
    return KernelSpec(norm_fold.PRODUCER, inputs,
                      (((rows, n), "float16"), ((rows, parts), "float32")),
                      QUANT + (("in_features", k),))


def consumer_spec(op: str, rows: int, n_out: int, n_weight: int, k: int, parts: int,
                  offset: float) -> KernelSpec:
    inner = q_linear_spec(rows, n_weight, k)
    inputs = (((rows, k), "float16"), ((rows, parts), "float32"), ((k,), "float16"))
    attrs = QUANT + (("in_features", k), ("norm_eps", EPS), ("norm_weight_offset", offset))
    if op == "rms_linear_silu_mul":
        attrs += ((glu.WEIGHTS_ATTR, "q4"),)
    return KernelSpec(op, inputs + inner.inputs[1:], (((rows, n_out), "float16"),),
                      tuple(sorted(attrs)))


def expected_partials(sums: np.ndarray, warps: int, rows_per_warp: int) -> np.ndarray:
    """ssq of the GEMV ahead, in the kernel's float32 order."""
    rows, n = sums.shape
    per_block = warps * rows_per_warp
    parts = -(-n // per_block)
    out = np.zeros((rows, parts), np.float32)
    for r in range(rows):
        for b in range(parts):
            total = np.float32(0)
            for w in range(warps):
                sq = np.float32(0)
                for q in range(rows_per_warp):
                    f = b * per_block + w * rows_per_warp + q
                    if f < n:
                        v = np.float32(sums[r, f])
                        sq = np.float32(sq + v * v)
                total = np.float32(total + sq)
            out[r, b] = total
    return out


def normalized(sums: np.ndarray, ssq: np.ndarray, w: np.ndarray, offset: float) -> np.ndarray:
    """The row a folded consumer stages, by the kernel's definition (module docstring)."""
    rows, k = sums.shape
    out = np.empty_like(sums)
    for r in range(rows):
        lanes = np.zeros(32, np.float32)
        for i in range(ssq.shape[1]):
            lanes[i % 32] = np.float32(lanes[i % 32] + ssq[r, i])
        for o in (16, 8, 4, 2, 1):
            lanes = (lanes + lanes[np.arange(32) ^ o]).astype(np.float32)
        mean = np.float32(lanes[0] / np.float32(k))
        inv = np.float32(np.float32(1) / np.sqrt(np.float32(mean + np.float32(EPS))))
        scaled = (sums[r].astype(np.float32) * inv).astype(np.float32)
        out[r] = (scaled * (w.astype(np.float32) + np.float32(offset))).astype(np.float16)
    return out


def plain_one_shot(tmp_path, rows, n, k, warps, rpw, x, qw, qs) -> np.ndarray:
    s = LinearShape(q_linear_spec(rows, n, k))
    kernel = linear.gemv_q4_kernel(s, "plain", warps, rpw, dot=DP2A)
    folder = tmp_path / f"plain{n}"
    folder.mkdir()
    binary = build(folder, [kernel], s.buffers, INT_HOST, one_shot_launch)
    return run(binary, 0, write_inputs(folder, [x, qw, qs]), (rows, n))


# (rows, features of the GEMV ahead = K after, its K, the consumer, its N, warps, features per
# warp of the one-shot GEMVs, the norm's weight offset): partial last blocks (N = 544 ahead,
# N = 36 after), two rows, Gemma's weight offset of 1, threads without a group (17 groups for
# 256 threads) and with two (33 groups for 32 threads: 528 partials, 17 a lane)
CASES = [
    (1, 512, 256, "rms_q_linear", 48, 4, 2, 0.0),
    (2, 544, 256, "rms_q_linear", 36, 8, 1, 1.0),
    (1, 1056, 64, "rms_q_linear", 20, 1, 2, 0.0),
    (1, 512, 512, "rms_linear_silu_mul", 40, 4, 4, 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}_h{c[1]}_{c[3]}_w{c[5]}r{c[6]}")
def test_folded_norm_equals_the_three_kernels_it_replaces(tmp_path, monkeypatch, case):
    rows, hidden, k, op, n_out, warps, rpw, offset = case
    glu_mode = op == "rms_linear_silu_mul"
    n_weight = 2 * n_out if glu_mode else n_out
    monkeypatch.setattr(tuning, "gemv_config", lambda n, kk: (warps, rpw, DP2A))
    monkeypatch.setattr(tuning, "block_min_blocks", lambda n, kk: 0)
    persistent = PersistentConfig(2, 4, 1, True, DP2A)
    monkeypatch.setattr(glu, "glu_gemv_config", lambda n, kk: persistent)
    parts = -(-hidden // (warps * rpw))
    rng = np.random.default_rng(rows * hidden + n_out)
    x = rng.standard_normal((rows, k)).astype(np.float16)
    qw1, qs1 = q4(rng, hidden, k)
    res = (rng.standard_normal((rows, hidden)) * 2).astype(np.float16)
    nw = (rng.random(hidden) * 0.5 + 0.5).astype(np.float16)
    qw2, qs2 = q4(rng, n_weight, hidden)

    # the GEMV ahead: residual sum and partial sums of squares
    ahead = norm_fold.gen_q_linear_residual(producer_spec(rows, hidden, k, parts), "ahead")
    bufs = [("x", (rows, k), "float16"), ("qw", qw1.shape, "uint32"), ("qs", qs1.shape,
            "float16"), ("res", (rows, hidden), "float16"), ("sum_out", (rows, hidden),
            "float16"), ("ssq", (rows, parts), "float32")]
    (tmp_path / "ahead").mkdir()
    binary = build(tmp_path / "ahead", [ahead], bufs, INT_HOST, one_shot_launch,
                   written=("sum_out", "ssq"))
    paths = write_inputs(tmp_path / "ahead", [x, qw1, qs1, res])
    for name, shape, dt in bufs[4:]:
        paths.append(tmp_path / "ahead" / f"{name}.bin")
        np.full(shape, np.nan, dt).tofile(paths[-1])
    done = subprocess.run([str(binary), "0", *map(str, paths)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]  # sum_out and ssq written in place
    sums = np.fromfile(paths[4], np.float16).reshape(rows, hidden)
    ssq = np.fromfile(paths[5], np.float32).reshape(rows, parts)
    result = plain_one_shot(tmp_path, rows, hidden, k, warps, rpw, x, qw1, qs1)
    expected_sums = (result.astype(np.float32) + res.astype(np.float32)).astype(np.float16)
    assert np.array_equal(sums.view(np.uint16), expected_sums.view(np.uint16))
    assert np.array_equal(ssq.view(np.uint32),
                          expected_partials(sums, warps, rpw).view(np.uint32))

    # the GEMV after: the normalized row staged from the partials
    spec = consumer_spec(op, rows, n_out, n_weight, hidden, parts, offset)
    after = norm_fold.GENERATORS[op](spec, "after")
    bufs = [("x", (rows, hidden), "float16"), ("ssq", (rows, parts), "float32"),
            ("nw", (hidden,), "float16"), ("qw", qw2.shape, "uint32"),
            ("qs", qs2.shape, "float16"), ("y", (rows, n_out), "float16")]
    launch = (lambda kern: launched(kern)[:2]) if glu_mode else one_shot_launch
    (tmp_path / "after").mkdir()
    binary = build(tmp_path / "after", [after], bufs, INT_HOST, launch)
    got = run(binary, 0, write_inputs(tmp_path / "after", [sums, ssq, nw, qw2, qs2]),
              (rows, n_out))
    staged = normalized(sums, ssq, nw, offset)
    if glu_mode:
        from mlcc.backends.cuda import gemv

        s = LinearShape(q_linear_spec(rows, n_weight, hidden))
        plain = gemv.gemv_q4_persistent_kernel(s, "plain", 2, 4, 2, dot=DP2A)
        (tmp_path / "gu").mkdir()
        gu = run(build(tmp_path / "gu", [plain], s.buffers, INT_HOST),
                 0, write_inputs(tmp_path / "gu", [staged, qw2, qs2]), (rows, n_weight))
        unfused = silu_mul(gu, c_expf())
    else:
        unfused = plain_one_shot(tmp_path, rows, n_out, hidden, warps, rpw, staged, qw2, qs2)
    assert np.array_equal(got.view(np.uint16), unfused.view(np.uint16))

    # independent: NumPy alone
    w1 = dequantize_group(qw1, qs1, 4, 32, k).astype(np.float32)
    w2 = dequantize_group(qw2, qs2, 4, 32, hidden).astype(np.float32)
    total = (x.astype(np.float32) @ w1.T).astype(np.float16).astype(np.float32) + res
    total = total.astype(np.float16).astype(np.float32)
    rms = np.sqrt((total * total).mean(axis=1, keepdims=True) + EPS)
    h = (total / rms * (nw.astype(np.float32) + offset)).astype(np.float16).astype(np.float32)
    z = h @ w2.T
    reference = silu_mul(z.astype(np.float16), np.exp).astype(np.float32) if glu_mode else z
    scale = np.abs(reference).max()
    assert np.abs(got.astype(np.float32) - reference).max() / scale < 1e-2
    np.testing.assert_allclose(sums.astype(np.float32), total, atol=2e-3 * np.abs(total).max())
