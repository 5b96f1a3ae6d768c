"""Independent references for IR ops, and a harness that runs one op through the interpreter.

The references share no code with mlcc.ir: rope written the HF way (rotate_half) and the Meta
way (complex numbers), llama3 frequency scaling one frequency at a time as Meta states it,
attention as torch SDPA under a position mask built element by element, and a bit-field
unpacker for group-quantized weights (design.md §5). Frequencies are computed in float64 and
rounded to float32 once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlcc import ir
from mlcc.ir import Sym

N = Sym("n")
SIZES = (1, 3, 8)
TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "float16": {"rtol": 4e-3, "atol": 4e-3}}
SHARED = Path(__file__).parents[2].parent / "shared"


# --- running one op through the interpreter -------------------------------------------------


def op_module(inputs: Sequence[tuple], body: Callable, params: Sequence[tuple] = ()) -> ir.Module:
    """Module `one_op` with function `f(inputs)` = body(b, *input values, *param values).

    An input is (name, shape, dtype), or (name, KVCacheType) for a cache.
    """
    mb = ir.ModuleBuilder("one_op")
    param_values = [mb.add_param(name, shape, dtype) for name, shape, dtype in params]
    with mb.function("f") as b:
        values = [b.kv_cache(spec[1], spec[0]) if len(spec) == 2 else b.input(*spec)
                  for spec in inputs]
        result = body(b, *values, *param_values)
        b.output(*(result if isinstance(result, tuple) else (result,)))
    return ir.verify(mb.finish())


def run(module: ir.Module, *args, params: dict | None = None) -> tuple[np.ndarray, ...]:
    return ir.interpret(module, "f", list(args), params or {})


def sized(shape: Sequence, n: int) -> tuple[int, ...]:
    return tuple(n if d == N else d for d in shape)


def rand(rng: np.random.Generator, shape: Sequence[int], dtype: str, scale: float = 1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def T(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def assert_close(ours: np.ndarray, ref: torch.Tensor, dtype: str, **tol) -> None:
    assert ours.dtype == np.dtype(dtype), (ours.dtype, dtype)
    assert ours.shape == tuple(ref.shape), (ours.shape, tuple(ref.shape))
    np.testing.assert_allclose(ours.astype(np.float32), ref.float().numpy(),
                               **(tol or TOL[dtype]))


# --- rope -----------------------------------------------------------------------------------


def torch_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """float64: the references round frequencies to float32 once, at the end."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / theta**exponents


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling, one frequency at a time as Meta's reference states it."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    scaled = []
    for freq in inv_freq.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:  # high frequency: kept
            scaled.append(freq)
        elif wavelen > old_len / low:  # low frequency: slowed down by the factor
            scaled.append(freq / factor)
        else:  # in between: interpolate
            smooth = (old_len / wavelen - low) / (high - low)
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(scaled, dtype=inv_freq.dtype)


def torch_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, style: str):
    """x (n, heads, rotary_dim): HF's rotate_half form, or Meta's complex-number form."""
    angles = pos.float()[:, None] * inv_freq[None, :]  # (n, rotary_dim / 2)
    if style == "rotate_half":
        emb = torch.cat([angles, angles], dim=-1)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * emb.cos() + rotated * emb.sin()
    turns = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * turns).flatten(-2)


def llama31_scaling() -> dict:
    config = json.loads((SHARED / "configs/meta-llama--Llama-3.1-8B/config.json").read_text())
    return config["rope_scaling"]


def exact_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """float64 frequencies, with linear or llama3 scaling."""
    inv = torch_inv_freq(rotary_dim, theta)
    if scaling is None:
        return inv
    if scaling["rope_type"] == "linear":
        return inv / scaling["factor"]
    return llama3_inv_freq(inv, scaling)


def reference_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    return exact_inv_freq(rotary_dim, theta, scaling).float()


# --- attention ------------------------------------------------------------------------------


def reference_attention(q, keys, values, start: int, window: int, sinks: int, scale):
    """q (n, heads, d) at positions start.., keys/values (total, kv_heads, d) at 0..total-1."""
    n, total = q.shape[0], keys.shape[0]
    visible = torch.zeros(n, total, dtype=torch.bool)
    for i in range(n):
        p = start + i
        for j in range(total):
            visible[i, j] = j <= p and (window < 0 or p - j < window or j < sinks)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1),
                                         values.transpose(0, 1), attn_mask=visible,
                                         scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


# --- group quantization (design.md §5) ------------------------------------------------------


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [rows, K_pad] -> u32 [rows, K_pad / (32 // bits)]; code j of a word at bit j*bits."""
    per_word = 32 // bits
    words = np.zeros((codes.shape[0], codes.shape[1] // per_word), dtype=np.uint64)
    for j in range(per_word):
        words |= codes[:, j::per_word].astype(np.uint64) << np.uint64(j * bits)
    return words.astype(np.uint32)


def unpack_dequantize(q_weight: np.ndarray, q_scale: np.ndarray, bits: int, group: int,
                      in_features: int) -> np.ndarray:
    """W [rows, in_features] in the scale dtype, read one column (bit field) at a time."""
    per_word, max_int = 32 // bits, 2 ** (bits - 1) - 1
    w = np.empty((q_weight.shape[0], in_features), dtype=q_scale.dtype)
    for col in range(in_features):
        word = q_weight[:, col // per_word].astype(np.int64)
        code = (word >> ((col % per_word) * bits)) & ((1 << bits) - 1)
        w[:, col] = (code - max_int).astype(q_scale.dtype) * q_scale[:, col // group]
    return w
