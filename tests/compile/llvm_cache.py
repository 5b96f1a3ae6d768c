"""Test support for the LLVM backend: compiled modules cached per session, NumPy references.

Test files import what they need; `kernel_cache` is a pytest fixture (import it by name into the
test module). The references here are written independently of mlcc's quantizer and IR
interpreter: they follow design.md directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import tvm

from mlcc.backends.build import make_target

TARGET = make_target("cpu")


class KernelCache:
    """tvm.compile results keyed by a name, so each test session builds a module once."""

    def __init__(self) -> None:
        self.built: dict[str, tvm.runtime.Executable] = {}

    def get(self, key: str, make: Callable[[], Sequence[tvm.tirx.PrimFunc] | tvm.IRModule]):
        if key not in self.built:
            funcs = make()
            module = funcs if isinstance(funcs, tvm.IRModule) else tvm.IRModule(
                {str(f.attrs["global_symbol"]): f for f in funcs})
            self.built[key] = tvm.compile(module, target=TARGET)
        return self.built[key]


_CACHE = KernelCache()


@pytest.fixture(scope="session")
def kernel_cache() -> KernelCache:
    return _CACHE


def tensors(*arrays: np.ndarray) -> list:
    """Aligned TVM copies (kernels assume 64-byte aligned data)."""
    return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]


def assert_close(actual, expected, dtype: str, scale: float = 1.0) -> None:
    """float32 results to ~1e-5; float16 storage to a few half-precision ulps of the magnitude."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    tol = 2e-5 if dtype == "float32" else 4e-3
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


# --- group quantization (design.md §5) -------------------------------------------------------


def quant_layout(bits: int, group: int, k: int) -> tuple[int, int, int, int]:
    """(per_word, max_int, k_pad, words)."""
    per_word = 32 // bits
    k_pad = -(-k // group) * group
    return per_word, (1 << (bits - 1)) - 1, k_pad, k_pad // per_word


def group_quantize(w: np.ndarray, bits: int, group: int, scale_dtype: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """q_weight uint32[N, words], q_scale[N, groups] from float W [N, K]."""
    n, k = w.shape
    per_word, max_int, k_pad, words = quant_layout(bits, group, k)
    padded = np.zeros((n, k_pad), np.float32)
    padded[:, :k] = w
    groups = padded.reshape(n, k_pad // group, group)
    scale = np.abs(groups).max(-1) / max_int
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype)
    codes = np.clip(np.round(groups / scale.astype(np.float32)[..., None]) + max_int, 0,
                    2 * max_int).astype(np.uint64).reshape(n, words, per_word)
    shifts = (np.arange(per_word, dtype=np.uint64) * bits)
    packed = (codes << shifts).sum(-1).astype(np.uint32)
    return packed, scale


def group_dequantize(q_weight: np.ndarray, q_scale: np.ndarray, bits: int, group: int,
                     k: int) -> np.ndarray:
    per_word, max_int, _, _ = quant_layout(bits, group, k)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    codes = (q_weight[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    codes = codes.reshape(q_weight.shape[0], -1).astype(np.float32) - max_int
    return (codes * np.repeat(q_scale.astype(np.float32), group, axis=1))[:, :k]


# --- rotary embedding and attention ----------------------------------------------------------


def inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if scaling and scaling["rope_type"] == "linear":
        inv = inv / scaling["factor"]
    elif scaling:  # llama3
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], \
            scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        inv = np.where((wavelen >= old / high) & (wavelen <= old / low), mid, scaled)
    return inv.astype(np.float32)


def rope_reference(qkv: np.ndarray, positions: np.ndarray, heads: int, head_dim: int,
                   rotary_dim: int, inv: np.ndarray, style: str) -> np.ndarray:
    """Rotate the first `heads` heads of qkv (float32 result)."""
    out = qkv.astype(np.float32).copy()
    n = qkv.shape[0]
    x = out[:, :heads * head_dim].reshape(n, heads, head_dim)
    angle = positions.astype(np.float32)[:, None] * inv[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    half = rotary_dim // 2
    if style == "rotate_half":
        a, b = x[..., :half].copy(), x[..., half:rotary_dim].copy()
        x[..., :half], x[..., half:rotary_dim] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[..., 0:rotary_dim:2].copy(), x[..., 1:rotary_dim:2].copy()
        x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2] = a * cos - b * sin, b * cos + a * sin
    out[:, :heads * head_dim] = x.reshape(n, -1)
    return out


def attention_reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int,
                        window: int, sinks: int, scale: float | None = None) -> np.ndarray:
    """q [n, hq, d] at positions start.., keys/values [total, hkv, d] -> [n, hq, d]."""
    n, hq, d = q.shape
    group = hq // keys.shape[1]
    out = np.zeros((n, hq, d), np.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    for i in range(n):
        p = start + i
        seen = [t for t in range(p + 1) if window < 0 or t > p - window or t < sinks]
        for h in range(hq):
            s = keys[seen, h // group].astype(np.float64) @ q[i, h] * scale
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ values[seen, h // group]
    return out


def ring_slot(pos: int, capacity: int, sinks: int, windowed: bool) -> int:
    if not windowed or pos < sinks:
        return pos
    return sinks + (pos - sinks) % (capacity - sinks)
