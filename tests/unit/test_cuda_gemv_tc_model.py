"""NumPy models of the tensor-core GEMV (mlcc.backends.cuda.gemv_tc), checked without a GPU.

The kernel cannot run here, so its arithmetic and index maps are modelled with the formulas of
the generated CUDA: the nibble-pair dequantization (masked odd pairs, then the scale) against
q_linear's float16 rounding, the k permutation that lets lane (g, j) feed its own group's words
into the mma.m16n8k16 A fragments while B comes from the pair-ordered staging (one K step of a
tile equals W @ x.T), the padded shared layout (each 128-bit load phase hits eight distinct bank
quads) and the rule's use of the GEMV database.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from test_cuda_gemm_model import mma16816

from mlcc.backends.cuda import gemv_tc, tuning
from mlcc.backends.cuda.gemv_tc import TcConfig, fits, gemv_q4_tc_rule, layout, tc_config
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.ir.quant_ops import dequantize_group
from mlcc.ir.types import Sym

H = np.float16


def h2(bits: int) -> np.ndarray:
    return np.array([bits & 0xFFFFFFFF], np.uint32).view(np.float16)


def dequant(w: int, s: np.float16) -> np.ndarray:
    """mlcc_tcv_dequant: (4 pairs, 2 halves), pair p = ((c_p - 7) s, (c_{p+4} - 7) s)."""
    w8 = w >> 8
    t = [(w & 0x000F000F) | 0x64006400, (w & 0x00F000F0) | 0x64006400,
         (w8 & 0x000F000F) | 0x64006400, (w8 & 0x00F000F0) | 0x64006400]
    out = np.zeros((4, 2), np.float16)
    for p, bits in enumerate(t):
        v = h2(bits)
        if p % 2 == 0:
            d = (v - H(1031)).astype(np.float16)
        else:  # __hfma2(v, 1/16, -71): one rounding of the exact value
            d = (v.astype(np.float32) * np.float32(1 / 16) - 71).astype(np.float16)
        out[p] = (d * s).astype(np.float16)
    return out


def test_dequant_pairs_equal_q_linear_rounding_for_every_code_and_many_scales():
    rng = np.random.default_rng(0)
    scales = np.concatenate([rng.random(300).astype(np.float16) * H(0.05),
                             np.array([1e-7, 6e-5, 0.5, 3.0, -0.02, 8000], np.float16)])
    for word in [sum(c << (4 * i) for i in range(8)) for c in range(16)] + [
            int(v) for v in rng.integers(0, 2**32, 40, dtype=np.uint64)]:
        codes = np.array([(word >> (4 * i)) & 15 for i in range(8)], np.float32)
        for s in scales:
            expected = ((codes - 7) * np.float32(s)).astype(np.float16)
            got = dequant(word, H(s))
            assert np.array_equal(got[:, 0], expected[:4]) and np.array_equal(got[:, 1],
                                                                               expected[4:])


def pairs(v: np.ndarray) -> np.ndarray:
    """mlcc_tcv_pairs of eight halves: (h0, h4), (h1, h5), (h2, h6), (h3, h7)."""
    return np.stack([v[:4], v[4:]], axis=1)


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_one_k_step_of_lane_fragments_equals_the_tile_product(rows):
    """One step (4 groups, 128 k) of a 16-feature tile: lane (g, j) holds group j of features
    g and g + 8, word i feeds two mmas; B lane (g, j) reads row g's pairs of the same word."""
    rng = np.random.default_rng(rows)
    qw = rng.integers(0, 2**32, (16, 16), dtype=np.uint64).astype(np.uint32)
    qs = (rng.random((16, 4)) * 0.05 + 0.001).astype(np.float16)
    x = np.zeros((8, 128), np.float16)
    x[:rows] = rng.standard_normal((rows, 128)).astype(np.float16)
    acc = np.zeros((32, 4), np.float32)
    for i in range(4):
        a_lo, a_hi, b = (np.zeros((32, 4, 2), np.float16), np.zeros((32, 4, 2), np.float16),
                         np.zeros((32, 2, 2), np.float16))
        for lane in range(32):
            g, j = lane // 4, lane % 4
            word = j * 4 + i  # word i of group j
            d, d8 = (dequant(int(qw[f, word]), qs[f, j]) for f in (g, g + 8))
            # first mma: pairs 0, 1 (a0 = row g, a1 = row g + 8, a2, a3 the same at +8 in k)
            a_lo[lane] = [d[0], d8[0], d[1], d8[1]]
            a_hi[lane] = [d[2], d8[2], d[3], d8[3]]
            b[lane] = pairs(x[g, word * 8:word * 8 + 8])[0:2]
        mma16816(acc, a_lo, b)
        for lane in range(32):
            g, j = lane // 4, lane % 4
            b[lane] = pairs(x[g, (j * 4 + i) * 8:(j * 4 + i) * 8 + 8])[2:4]
        mma16816(acc, a_hi, b)
    got = np.zeros((16, 8), np.float32)  # (feature, row)
    for lane in range(32):
        g, q = lane // 4, 2 * (lane % 4)
        got[g, q], got[g, q + 1], got[g + 8, q], got[g + 8, q + 1] = acc[lane]
    w = dequantize_group(qw, qs, 4, 32, 128).astype(np.float16).astype(np.float32)
    expected = w @ x.astype(np.float32).T
    np.testing.assert_allclose(got[:, :rows], expected[:, :rows], rtol=1e-5, atol=1e-4)


def spec_for(n: int, k: int, rows, ydt: str = "float16") -> KernelSpec:
    return KernelSpec("q_linear", (((rows, k), "float16"), ((n, k // 8), "uint32"),
                                   ((n, k // 32), "float16")), (((rows, n), ydt),),
                      (("bits", 4), ("group_size", 32), ("in_features", k)))


@pytest.mark.parametrize("config", [TcConfig(8, 1, 1), TcConfig(4, 2, 2), TcConfig(2, 1, 4),
                                    TcConfig(8, 1, 2)], ids=lambda c: c.tag)
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_shared_layout_is_injective_and_load_phases_hit_eight_bank_quads(config, rows):
    s = LinearShape(spec_for(4096, 11008, rows))
    if not fits(s, config):
        return
    lay = layout(s, config)

    def unit(tok, wl):
        return tok * lay.row_units + (wl >> 2) * 5 + (wl & 3)

    span = lay.words * lay.chunk
    units = {unit(t, wl) for t in range(lay.tok_rows) for wl in range(span)}
    assert len(units) == lay.tok_rows * span
    assert max(units) < lay.tok_rows * lay.row_units
    for warp in range(config.warps):
        for u in range(config.unroll):
            for i in range(4):
                for phase in range(4):  # a 128-bit load serves eight lanes at a time
                    lanes = range(8 * phase, 8 * phase + 8)
                    toks = [min(lane // 4, rows - 1) for lane in lanes]
                    addr = [unit(t, ((u * config.warps + warp) * 4 + lane % 4) * 4 + i)
                            for t, lane in zip(toks, lanes)]
                    distinct = {a for a in addr}
                    quads = {a % 8 for a in distinct}
                    assert len(quads) == len(distinct), (warp, u, i, phase)


def test_a_round_too_big_for_shared_memory_is_one_clear_error():
    s = LinearShape(spec_for(4096, 4096, 16))
    with pytest.raises(MlccError, match=r"^\[compile\] tensor-core GEMV 4096x4096 at 16 rows"):
        layout(s, TcConfig(8, 1, 2))
    assert not fits(s, TcConfig(8, 1, 2)) and fits(s, TcConfig(4, 1, 2))


DATABASE = {
    "best": {"4096,4096": {"kind": "tc", "warps": 4, "tiles": 2, "unroll": 1, "us": 4.0},
             "22016,4096": {"kind": "block", "warps": 4, "rows_per_warp": 4, "us": 19.0}},
    "best_by_kind": {"tc": {"22016,4096": {"kind": "tc", "warps": 8, "tiles": 1, "unroll": 4,
                                           "us": 20.0}}},
    "best_at_rows": {"16": {"4096,4096": {"kind": "wmma", "us": 30.0},
                            "22016,4096": {"kind": "tc", "warps": 8, "tiles": 2, "unroll": 1,
                                           "us": 50.0}},
                     "batch": {"22016,4096": {"kind": "tc", "warps": 4, "tiles": 1,
                                              "unroll": 1, "us": 51.0}}}}


def test_rule_follows_the_database_and_declines_elsewhere():
    with mock.patch.object(tuning, "_database", lambda: DATABASE):
        assert gemv_q4_tc_rule(spec_for(4096, 4096, 1), "a") is not None  # tc measured best
        assert gemv_q4_tc_rule(spec_for(22016, 4096, 1), "b") is None  # block measured best
        assert gemv_q4_tc_rule(spec_for(12288, 4096, 2), "c") is None  # not measured
        assert gemv_q4_tc_rule(spec_for(4096, 4096, 16), "d") is None  # WMMA won at 16
        assert gemv_q4_tc_rule(spec_for(4096, 4096, Sym("batch")), "e") is None
        assert gemv_q4_tc_rule(spec_for(12288, 4096, 9), "f") is not None  # default above 4
        assert gemv_q4_tc_rule(spec_for(4096, 4096, 17), "g") is None
        assert gemv_q4_tc_rule(spec_for(4096, 4096, Sym("seq_len")), "h") is None
        assert tc_config(LinearShape(spec_for(4096, 4096, 1))) == TcConfig(4, 2, 1)
        assert tc_config(LinearShape(spec_for(22016, 4096, 1))) == TcConfig(8, 1, 4)
        assert tc_config(LinearShape(spec_for(22016, 4096, 16))) == TcConfig(8, 2, 1)
        assert tc_config(LinearShape(spec_for(22016, 4096, Sym("batch")))) == TcConfig(4, 1, 1)
        # not measured at 5 rows: the heuristic
        assert tc_config(LinearShape(spec_for(22016, 4096, 5))) == TcConfig(8, 1, 2)
    with mock.patch.object(tuning, "_database", dict):
        assert gemv_q4_tc_rule(spec_for(4096, 4096, 1), "a") is None
        assert tc_config(LinearShape(spec_for(4096, 4096, 16))) == TcConfig(4, 1, 1)
        assert tc_config(LinearShape(spec_for(4096, 4096, Sym("batch")))) == TcConfig(8, 1, 1)
        kernel = gemv_q4_tc_rule(spec_for(4096, 11008, Sym("batch"), "float32"), "lm")
        assert kernel is not None and "blockIdx.y" in kernel.launcher
        assert kernel.device_source.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 1


def test_rule_declines_what_the_kernel_does_not_handle():
    base = spec_for(4096, 4096, 2)
    group64 = KernelSpec("q_linear", base.inputs, base.outputs,
                         (("bits", 4), ("group_size", 64), ("in_features", 4096)))
    f32_x = KernelSpec("q_linear", (((2, 4096), "float32"),) + base.inputs[1:], base.outputs,
                       base.attrs)
    with mock.patch.object(gemv_tc, "measured", lambda *a: {"kind": "tc", "warps": 8,
                                                             "tiles": 1, "unroll": 1}):
        assert gemv_q4_tc_rule(base, "ok") is not None
        assert gemv_q4_tc_rule(group64, "g64") is None
        assert gemv_q4_tc_rule(f32_x, "x32") is None
