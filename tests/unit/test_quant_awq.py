"""q4f16_awq: AutoAWQ GEMM tensors repacked into mlcc's layout dequantize exactly as AutoAWQ does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mlcc.errors import MlccError
from mlcc.quant import StoredTensor, get_scheme

# AutoAWQ's unpacking (awq/utils/packing_utils.py): output column c of a block of eight
# sits in nibble REVERSE[c] of its word.
REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    kind: str


def autoawq_dequantize(qweight, qzeros, scales, group):
    """AutoAWQ's dequantize_gemm, element by element: float32 (K, N), input-major."""
    k, n = qweight.shape[0], scales.shape[1]
    out = np.zeros((k, n), dtype=np.float32)
    words = qweight.view(np.uint32)
    zwords = qzeros.view(np.uint32)
    for row in range(k):
        for col in range(n):
            shift = 4 * REVERSE[col % 8]
            code = (int(words[row, col // 8]) >> shift) & 0xF
            zero = (int(zwords[row // group, col // 8]) >> shift) & 0xF
            out[row, col] = np.float32(code - zero) * np.float32(scales[row // group, col])
    return out


@pytest.mark.parametrize("k,n", [(128, 8), (256, 24), (1152, 16)])
def test_repacked_awq_dequantizes_like_autoawq(k: int, n: int) -> None:
    scheme = get_scheme("q4f16_awq")
    rng = np.random.default_rng(k + n)
    group = scheme.group_size
    qweight = rng.integers(-2**31, 2**31, size=(k, n // 8), dtype=np.int64).astype(np.int32)
    qzeros = rng.integers(-2**31, 2**31, size=(k // group, n // 8), dtype=np.int64)
    qzeros = qzeros.astype(np.int32)
    scales = (rng.random((k // group, n)) * 0.02).astype(np.float16)

    parts = scheme.from_awq(qweight, qzeros, scales, "model.layers.0.mlp.down_proj")
    expected_layout = scheme.stored_tensors(Param("model.layers.0.mlp.down_proj.weight", (n, k),
                                                  "linear"))
    assert [(t.shape, t.dtype) for t in expected_layout] == [
        (parts[p].shape, parts[p].dtype.name) for p in ("q_weight", "q_scale", "q_zeros")]

    back = scheme.dequantize(parts["q_weight"], parts["q_scale"], k, q_zeros=parts["q_zeros"])
    np.testing.assert_array_equal(back, autoawq_dequantize(qweight, qzeros, scales, group).T)


def test_zero_points_are_packed_along_groups_low_bits_first() -> None:
    scheme = get_scheme("q4f16_awq")
    k, n = 128 * 9, 8  # nine groups: the second zero word holds one group and seven zero nibbles
    zeros = np.arange(9 * n).reshape(9, n) % 16  # (K / G, N) in column order
    packed = np.zeros((9, 1), dtype=np.uint32)
    for col in range(n):
        packed[:, 0] |= (zeros[:, col].astype(np.uint32) << np.uint32(4 * REVERSE[col]))
    parts = scheme.from_awq(np.zeros((k, 1), np.int32), packed.view(np.int32),
                            np.ones((9, n), np.float16), "x")
    assert parts["q_zeros"].shape == (n, 2)
    for col in range(n):
        for g in range(9):
            word = int(parts["q_zeros"][col, g // 8])
            assert (word >> (4 * (g % 8))) & 0xF == zeros[g, col]
        assert int(parts["q_zeros"][col, 1]) >> 4 == 0


def test_awq_only_takes_decoder_linears() -> None:
    scheme = get_scheme("q4f16_awq")
    assert scheme.applies_to(Param("model.layers.0.self_attn.qkv_proj.weight", (96, 128),
                                   "linear"))
    assert not scheme.applies_to(Param("lm_head.weight", (64, 128), "linear"))
    assert not scheme.applies_to(Param("model.embed_tokens.weight", (64, 128), "embedding"))
    assert not scheme.applies_to(Param("model.norm.weight", (128,), "norm"))
    assert scheme.stored_tensors(Param("lm_head.weight", (64, 128), "linear")) == (
        StoredTensor("lm_head.weight", (64, 128), "float16"),)
    with pytest.raises(MlccError, match="reads pre-quantized AutoAWQ tensors"):
        scheme.convert(Param("model.layers.0.mlp.down_proj.weight", (8, 128), "linear"),
                       torch.zeros(8, 128))


@pytest.mark.parametrize("bad,message", [
    ("qzeros", r"x\.qzeros: expected \(1, 2\) .* got \(2, 2\)"),
    ("scales", r"x\.scales: expected \(1, 16\) .* got \(1, 8\)"),
    ("k", r"x\.qweight: in_features 100 is not a multiple of the AWQ group size 128"),
])
def test_mismatched_awq_shapes_are_refused(bad: str, message: str) -> None:
    scheme = get_scheme("q4f16_awq")
    k = 100 if bad == "k" else 128
    qweight = np.zeros((k, 2), np.int32)
    qzeros = np.zeros((2 if bad == "qzeros" else 1, 2), np.int32)
    scales = np.zeros((1, 8 if bad == "scales" else 16), np.float16)
    with pytest.raises(MlccError, match=message):
        scheme.from_awq(qweight, qzeros, scales, "x")
