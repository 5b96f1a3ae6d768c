"""Group quantization checked byte for byte against an independent NumPy reading of design.md §5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from group_reference import reference_quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcc.errors import MlccError
from mlcc.quant import SCHEMES, get_scheme

GROUP_SCHEMES = [name for name, scheme in SCHEMES.items() if scheme.kind == "group"]


@pytest.mark.parametrize(
    "scheme_name,shape",
    [("q4f16_1", (16, 256)), ("q4f16_1", (7, 100)), ("q4f32_1", (9, 64)), ("q8f16_1", (5, 96)),
     ("q8f16_1", (3, 33)), ("q3f16_1", (4, 4096)), ("q3f16_1", (6, 100)), ("q3f16_1", (2, 40))],
)
def test_bytes_match_reference(scheme_name: str, shape: tuple[int, int]) -> None:
    scheme = get_scheme(scheme_name)
    rng = np.random.default_rng(hash(shape) % 2**32)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    got = scheme.quantize(torch.from_numpy(w))
    words, scales, _ = reference_quantize(w, scheme.bits, scheme.group_size, scheme.model_dtype)
    assert got["q_weight"].dtype == np.uint32 and got["q_scale"].dtype == scheme.model_dtype
    assert got["q_weight"].tobytes() == words.tobytes()
    assert got["q_scale"].tobytes() == scales.tobytes()


def test_all_zero_and_mixed_groups_stay_finite() -> None:
    scheme = get_scheme("q3f16_1")
    w = np.zeros((3, 100), dtype=np.float32)
    w[1, 45:60] = np.linspace(-1, 1, 15)  # group 1 of row 1 non-zero, everything else zero
    got = scheme.quantize(torch.from_numpy(w))
    words, scales, _ = reference_quantize(w, 3, 40, "float16")
    assert got["q_weight"].tobytes() == words.tobytes()
    assert got["q_scale"].tobytes() == scales.tobytes()
    back = scheme.dequantize(got["q_weight"], got["q_scale"], 100)
    assert np.isfinite(back).all()
    assert np.count_nonzero(back[0]) == 0 and np.count_nonzero(back[2]) == 0
    assert back[1, 40:80].any() and not back[1, :40].any()


def test_round_half_to_even_on_exact_ties() -> None:
    # max |w| = 7 gives scale 1, so 0.5, 1.5, 2.5 and -2.5 sit exactly on ties.
    row = np.zeros(32, dtype=np.float32)
    row[:5] = [7.0, 0.5, 1.5, 2.5, -2.5]
    got = get_scheme("q4f16_1").quantize(torch.from_numpy(row[None]))
    codes = [(int(got["q_weight"][0, 0]) >> (4 * j)) & 0xF for j in range(5)]
    assert codes == [14, 7, 9, 9, 5]  # 7+7, 0+7, 2+7, 2+7, -2+7


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    scheme_name=st.sampled_from(GROUP_SCHEMES),
    n=st.integers(1, 6),
    k=st.integers(1, 130),
    scale=st.sampled_from([1e-3, 0.1, 3.0, 200.0]),
    seed=st.integers(0, 2**31),
)
def test_random_shapes_match_reference(
    scheme_name: str, n: int, k: int, scale: float, seed: int
) -> None:
    scheme = get_scheme(scheme_name)
    w = (np.random.default_rng(seed).standard_normal((n, k)) * scale).astype(np.float32)
    got = scheme.quantize(torch.from_numpy(w))
    words, scales, codes = reference_quantize(w, scheme.bits, scheme.group_size,
                                              scheme.model_dtype)
    assert got["q_weight"].tobytes() == words.tobytes()
    assert got["q_scale"].tobytes() == scales.tobytes()
    # The NumPy dequantizer is (code - max_int) * stored scale, element by element.
    max_int = 2 ** (scheme.bits - 1) - 1
    expected = (codes - max_int).astype(np.float32) * np.repeat(
        scales.astype(np.float32), scheme.group_size, axis=1)
    back = scheme.dequantize(got["q_weight"], got["q_scale"], k)
    assert back.dtype == np.float32 and back.shape == (n, k)
    np.testing.assert_array_equal(back, expected[:, :k])
    # Each value is the nearest point of its group's grid, except beyond the grid's end, where
    # the rounded (possibly float16-subnormal) scale made the code clamp.
    step = np.repeat(scales.astype(np.float32), scheme.group_size, axis=1)[:, :k]
    bound = np.maximum(step * 0.5, np.abs(w) - max_int * step)
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_quantizes_its_float32_value(dtype: torch.dtype) -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    scheme = get_scheme("q4f16_1")
    got = scheme.quantize(w)
    words, scales, _ = reference_quantize(w.float().numpy(), 4, 32, "float16")
    assert got["q_weight"].tobytes() == words.tobytes()
    assert got["q_scale"].tobytes() == scales.tobytes()


def test_scale_overflowing_float16_is_refused_with_the_name() -> None:
    w = torch.full((2, 32), 1e6)
    with pytest.raises(MlccError, match=r"\[quantize\] lm_head.weight: .*overflows float16"):
        get_scheme("q4f16_1").quantize(w, name="lm_head.weight")
    got = get_scheme("q4f32_1").quantize(w)  # float32 scales hold it
    assert np.isfinite(got["q_scale"]).all()


def test_large_matrix_is_quantized_in_row_blocks_identically() -> None:
    # 1100 rows x 4096 exceeds one row block (4M elements), exercising the block loop.
    w = torch.randn(1100, 4096, generator=torch.Generator().manual_seed(1))
    scheme = get_scheme("q4f16_1")
    whole = scheme.quantize(w)
    for lo, hi in [(0, 3), (1020, 1030), (1097, 1100)]:
        words, scales, _ = reference_quantize(w[lo:hi].numpy(), 4, 32, "float16")
        assert whole["q_weight"][lo:hi].tobytes() == words.tobytes()
        assert whole["q_scale"][lo:hi].tobytes() == scales.tobytes()
