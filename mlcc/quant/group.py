"""Symmetric group quantization (q3f16_1, q4f16_1, q4f32_1, q8f16_1): torch quantizer, NumPy reference.

Layout of one weight W of shape (N, K) (HF layout: out_features x in_features), `bits` bits per
code, groups of `group_size` consecutive elements along K:

    max_int  = 2^(bits-1) - 1                       # 7 for 4-bit, 3 for 3-bit, 127 for 8-bit
    per_word = 32 // bits                           # codes in one uint32 word (10 for 3-bit)
    K_pad    = K rounded up to lcm(group_size, per_word); the padding is zeros
    scale    = max|W[n, group]| / max_int           # float32, then stored in model_dtype
    code     = clamp(round(W / stored_scale) + max_int, 0, 2 * max_int)
    q_weight[n, i] = sum_j code[n, i * per_word + j] << (j * bits)   # uint32, (N, K_pad / per_word)
    q_scale[n, g]  = stored_scale of group g                          # (N, K_pad / group_size)
    W ~ (code - max_int) * q_scale

Rounding is round-half-to-even in float32 (`torch.round`, `np.round`) and codes are computed with
the scale as stored, rounded to model_dtype: a dequantizer that reads q_scale recovers exactly the
values the codes were chosen for, and the same input gives the same bytes on CPU and CUDA, because
every step is an IEEE float32 operation without fused or reordered arithmetic. An all-zero group
has scale 0 and codes max_int, so it dequantizes to exact zeros instead of NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mlcc.errors import MlccError

# Rows quantized at once: keeps the temporaries of a large embedding near 10 MB, so that
# convert_weight's peak memory is set by the source files, not by quantization.
_ELEMENTS_PER_BLOCK = 1 << 20

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def codes_per_word(bits: int) -> int:
    """Number of `bits`-bit codes packed into one uint32 word (3-bit codes leave 2 bits unused)."""
    return 32 // bits


def padded_k(k: int, bits: int, group_size: int) -> int:
    """K rounded up so that it is a whole number of groups and of uint32 words."""
    unit = math.lcm(group_size, codes_per_word(bits))
    return -(-k // unit) * unit


def quantize_group(
    w: torch.Tensor, bits: int, group_size: int, model_dtype: str, name: str = "weight"
) -> dict[str, np.ndarray]:
    """Quantize a (N, K) weight on its own device; returns NumPy `q_weight` and `q_scale`."""
    if w.ndim != 2:
        raise MlccError("quantize", f"{name}: group quantization needs a 2-D weight, got shape "
                        f"{tuple(w.shape)}")
    n, k = w.shape
    k_pad = padded_k(k, bits, group_size)
    per_word = codes_per_word(bits)
    q_weight = np.empty((n, k_pad // per_word), dtype=np.uint32)
    q_scale = np.empty((n, k_pad // group_size), dtype=np.dtype(model_dtype))
    rows = max(1, _ELEMENTS_PER_BLOCK // k_pad)
    for start in range(0, n, rows):
        block = w[start:start + rows]
        words, scales = _quantize_rows(block, bits, group_size, k_pad, model_dtype, name)
        q_weight[start:start + rows] = words
        q_scale[start:start + rows] = scales
    return {"q_weight": q_weight, "q_scale": q_scale}


def _quantize_rows(
    w: torch.Tensor, bits: int, group_size: int, k_pad: int, model_dtype: str, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a block of rows; returns (uint32 words, scales in model_dtype) as NumPy arrays."""
    max_int = 2 ** (bits - 1) - 1
    rows, k = w.shape
    # A fresh zero-padded float32 buffer: the rest of the work happens in place inside it.
    padded = torch.zeros((rows, k_pad), dtype=torch.float32, device=w.device)
    padded[:, :k] = w
    groups = padded.view(rows, k_pad // group_size, group_size)
    amax = groups.abs().amax(dim=2)  # (rows, G) float32
    # Divide by a tensor, not a Python number: CUDA turns division by a scalar into a product
    # with its reciprocal, which differs from true division in the last bit.
    scale = amax / torch.full_like(amax, max_int)
    stored = scale.to(_TORCH_DTYPES[model_dtype])
    if not bool(torch.isfinite(stored).all()):
        raise MlccError("quantize", f"{name}: a group scale overflows {model_dtype} (max |w| = "
                        f"{float(groups.abs().max()):.6g}); use a float32 scheme such as q4f32_1 "
                        "or q0f32")
    divisor = stored.to(torch.float32)
    # A zero scale comes from an all-zero group (or one that underflows model_dtype): its codes
    # are max_int, which dequantize to exact zeros.
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    codes = groups.div_(divisor.unsqueeze(2)).round_().add_(max_int).clamp_(0, 2 * max_int)
    codes = codes.view(rows, -1, codes_per_word(bits))  # (rows, words, per_word) float32
    # Packing as a float64 product with the place values 2^(j * bits): every product and partial
    # sum is an integer below 2^32, so the result is exact in any summation order (CPU or GPU),
    # and one matmul is several times faster than shifting and OR-ing code by code.
    # Place values from Python integers: `2.0 ** tensor` on CUDA is not exact for every power.
    place = torch.tensor([float(1 << (j * bits)) for j in range(codes.shape[2])],
                         dtype=torch.float64, device=w.device)
    words = (codes.to(torch.float64) @ place).to(torch.int64)
    return words.cpu().numpy().astype(np.uint32), stored.cpu().numpy()


def unpack_codes(q_weight: np.ndarray, bits: int) -> np.ndarray:
    """Unpack uint32 words (N, W) into unsigned codes (N, W * 32 // bits), low bits first."""
    per_word = codes_per_word(bits)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    mask = np.uint32((1 << bits) - 1)
    codes = (q_weight.astype(np.uint32)[:, :, None] >> shifts) & mask
    return codes.reshape(q_weight.shape[0], -1)


def dequantize_group(
    q_weight: np.ndarray, q_scale: np.ndarray, k: int, bits: int, group_size: int
) -> np.ndarray:
    """NumPy reference dequantization: float32 (N, k) from the stored words and scales."""
    max_int = 2 ** (bits - 1) - 1
    codes = unpack_codes(q_weight, bits).astype(np.float32) - np.float32(max_int)
    scales = np.repeat(q_scale.astype(np.float32), group_size, axis=1)
    return (codes * scales)[:, :k]
