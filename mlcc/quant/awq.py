"""AutoAWQ checkpoints (GEMM version) read as they are and rewritten into mlcc's q4f16_awq layout.

AutoAWQ stores a linear layer of HF weight shape (N, K) (out x in) quantized asymmetrically in
groups of G input elements, transposed and packed along the OUTPUT dimension:

    qweight: int32 (K, N / 8)    eight 4-bit codes per word, nibble i holds column 8c + ORDER[i]
    qzeros:  int32 (K / G, N / 8) zero points, packed the same way
    scales:  float16 (K / G, N)
    W[n, k] = (code[k, n] - zero[k / G, n]) * scale[k / G, n]      with ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

mlcc keeps the same numbers but lays them out like the group schemes, row-major over output rows
and packed along K, low bits first, so that one kernel family reads both:

    q_weight: uint32 (N, K / 8)                 code of W[n, 8i + j] at bits 4j of word i
    q_scale:  float16 (N, K / G)
    q_zeros:  uint32 (N, ceil(K / G / 8))       zero of group g at bits 4(g % 8) of word g / 8,
                                                unused trailing nibbles are 0
    W[n, k] = (code - zero) * scale             (no offset: AutoAWQ GEMM stores zeros as is)
"""

from __future__ import annotations

import numpy as np

from mlcc.errors import MlccError
from mlcc.quant.group import unpack_codes

AWQ_BITS = 4
# Nibble i of an AutoAWQ word holds output column AWQ_ORDER[i] of its block of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq_columns(packed: np.ndarray) -> np.ndarray:
    """AutoAWQ int32 (R, C / 8) packed along columns -> uint8 codes (R, C) in column order."""
    words = packed.astype(np.int64) & 0xFFFFFFFF  # int32 sign bit is just the top nibble
    nibbles = np.stack([(words >> (4 * i)) & 0xF for i in range(8)], axis=2)  # (R, C/8, 8)
    columns = np.empty_like(nibbles)
    columns[:, :, list(AWQ_ORDER)] = nibbles
    return columns.reshape(packed.shape[0], -1).astype(np.uint8)


def pack_rows(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes (R, C) into uint32 (R, ceil(C / 8)) along C, low bits first, zero-padded."""
    rows, cols = codes.shape
    pad = -cols % 8
    padded = np.pad(codes.astype(np.uint32), ((0, 0), (0, pad))).reshape(rows, -1, 8)
    shifts = np.arange(8, dtype=np.uint32) * AWQ_BITS
    return np.bitwise_or.reduce(padded << shifts, axis=2).astype(np.uint32)


def awq_to_mlcc(
    qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int, name: str
) -> dict[str, np.ndarray]:
    """Convert one AutoAWQ GEMM layer into mlcc's `q_weight`, `q_scale` and `q_zeros` arrays."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    expected = {"qweight": (k, n // 8), "qzeros": (k // group_size, n // 8),
                "scales": (k // group_size, n)}
    found = {"qweight": qweight.shape, "qzeros": qzeros.shape, "scales": scales.shape}
    if k % group_size:
        raise MlccError("convert_weight", f"{name}.qweight: in_features {k} is not a multiple of "
                        f"the AWQ group size {group_size}; only group {group_size} is supported")
    for part, shape in expected.items():
        if tuple(found[part]) != shape:
            raise MlccError("convert_weight", f"{name}.{part}: expected {shape} for an AutoAWQ GEMM "
                            f"layer with in_features {k}, group {group_size}, got "
                            f"{tuple(found[part])}; only AutoAWQ version 'gemm' with group "
                            f"{group_size} is supported")
    codes = unpack_awq_columns(qweight)  # (K, N)
    zeros = unpack_awq_columns(qzeros)  # (K / G, N)
    return {
        "q_weight": pack_rows(np.ascontiguousarray(codes.T)),
        "q_scale": np.ascontiguousarray(scales.T).astype(np.float16),
        "q_zeros": pack_rows(np.ascontiguousarray(zeros.T)),
    }


def dequantize_awq(
    q_weight: np.ndarray, q_scale: np.ndarray, q_zeros: np.ndarray, k: int, group_size: int
) -> np.ndarray:
    """NumPy reference: float32 (N, k) from mlcc's q4f16_awq arrays."""
    groups = q_scale.shape[1]
    codes = unpack_codes(q_weight, AWQ_BITS).astype(np.float32)
    zeros = unpack_codes(q_zeros, AWQ_BITS)[:, :groups].astype(np.float32)
    scales = q_scale.astype(np.float32)
    w = (codes - np.repeat(zeros, group_size, axis=1)) * np.repeat(scales, group_size, axis=1)
    return w[:, :k]
