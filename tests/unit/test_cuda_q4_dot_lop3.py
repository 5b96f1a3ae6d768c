"""mlcc_q4_dot8_lop3 (kernels.py): the bit tricks it relies on, and its float16 arithmetic.

The helper runs only on a GPU; here its steps are replayed in NumPy from the constants in the
CUDA source: one lop3 with LUT 0xEA per nibble pair ((w & mask) | 0x64006400), the subtraction
of 1031 for the even pairs and the fused (t * 1/16 - 71) for the odd ones, then the four
products of a lane summed in float16 and the two lanes added in float32.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlcc.backends.cuda.kernels import COMMON_SOURCE

MAGIC = 0x64006400


def dot_source() -> str:
    """The dequantization both lop3 dots share (mlcc_q4_pairs_lop3)."""
    start = COMMON_SOURCE.index("void mlcc_q4_pairs_lop3(")
    return COMMON_SOURCE[start:COMMON_SOURCE.index("\n}", start)]


def test_lut_0xea_is_and_then_or():
    macro = re.search(r'lop3\.b32 %0, %1, " #mask ", (0x[0-9A-Fa-f]+), (0x[0-9A-Fa-f]+);',
                      COMMON_SOURCE)
    assert macro is not None and int(macro.group(1), 16) == MAGIC
    # PTX lop3: the LUT is the function applied to the operand patterns 0xF0, 0xCC, 0xAA
    assert int(macro.group(2), 16) == (0xF0 & 0xCC) | 0xAA


def as_half2(words: np.ndarray) -> np.ndarray:
    return words.astype(np.uint32).view(np.float16).reshape(-1, 2).astype(np.float64)


def dequantized_pairs(w: np.ndarray) -> list[np.ndarray]:
    """(c_j - 7, c_{j+4} - 7) for j = 0..3, as the helper computes them (exact in float16)."""
    source = dot_source()
    assert "0x000F000F" in source and "0x00F000F0" in source and "w >> 8" in source
    w2 = w >> np.uint32(8)
    even = [(v & np.uint32(0x000F000F)) | np.uint32(MAGIC) for v in (w, w2)]
    odd = [(v & np.uint32(0x00F000F0)) | np.uint32(MAGIC) for v in (w, w2)]
    sixteenth, magic_hi = np.float16(1 / 16), np.float16(-71)
    assert (sixteenth.view(np.uint16), magic_hi.view(np.uint16)) == (0x2C00, 0xD470)
    d = [as_half2(even[0]) - 1031, as_half2(odd[0]) * (1 / 16) - 71,
         as_half2(even[1]) - 1031, as_half2(odd[1]) * (1 / 16) - 71]
    return [v.astype(np.float16) for v in d]  # every value is exact: no rounding happens


def test_every_code_decodes_to_code_minus_seven_in_its_pair():
    codes = np.arange(16, dtype=np.uint32)
    for j in range(8):
        words = codes << np.uint32(4 * j)
        d = dequantized_pairs(words)
        got = d[j % 4][:, j // 4]
        np.testing.assert_array_equal(got.astype(np.float64), codes.astype(np.float64) - 7)
        others = [d[i][:, h] for i in range(4) for h in range(2) if (i, h) != (j % 4, j // 4)]
        assert all((o == -7).all() for o in others)  # the other nibbles are zero codes


def emulated_dot(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x: (n, 8) float16 activations of each word; the helper's float16 sums, then float32."""
    d = dequantized_pairs(w)
    xp = [np.stack([x[:, j], x[:, j + 4]], axis=1).astype(np.float64) for j in range(4)]
    acc = (d[0].astype(np.float64) * xp[0]).astype(np.float16)  # __hmul2
    for j in (1, 2, 3):  # __hfma2: one rounding of the exact d * x + acc
        acc = (d[j].astype(np.float64) * xp[j] + acc.astype(np.float64)).astype(np.float16)
    return acc[:, 0].astype(np.float32) + acc[:, 1].astype(np.float32)


@pytest.mark.parametrize("scale", [1.0, 100.0, 2047.0])
def test_word_sums_stay_close_to_exact_and_finite(scale):
    """Activations up to the documented limit |x| <= 2047."""
    rng = np.random.default_rng(int(scale))
    n = 20000
    w = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    x = rng.uniform(-scale, scale, (n, 8)).astype(np.float16)
    codes = ((w[:, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15).astype(np.float64) - 7
    exact = (codes * x.astype(np.float64)).sum(axis=1)
    got = emulated_dot(w, x)
    assert np.isfinite(got).all()
    # four float16 roundings of partial sums of at most 32 |x|: a few float16 ulps of |x|
    bound = 4 * 2.0 ** -11 * 32 * np.abs(x.astype(np.float64)).max(axis=1)
    assert (np.abs(got - exact) <= bound).all()
    assert np.abs(got - exact).mean() < 0.05 * bound.mean()


def test_worst_case_word_at_the_documented_limit_does_not_overflow():
    w = np.array([0x00000000], np.uint32)  # every code 0: every weight -7
    x = np.full((1, 8), 2047, np.float16)
    assert np.isfinite(emulated_dot(w, x)).all()
    w = np.array([0xFFFFFFFF], np.uint32)  # every code 15: every weight +8
    assert np.isfinite(emulated_dot(w, x)).all()
    with np.errstate(over="ignore"):  # twice the limit does overflow: the limit is real
        assert not np.isfinite(emulated_dot(w, np.full((1, 8), 4096, np.float16))).all()
