"""Positions, rotary embedding and attention over a KV cache, with the interpreter's cache state.

The cache contract: when an entry function starts, the cache holds `length` positions. The
`positions` op yields `length + arange(n)`. `attention` for layer l writes the chunk's keys and
values at positions [length, length + n) of layer l and attends over [0, length + n) under the
causal, sliding-window and sink rules. When the function returns, the cache's length advances by
n (every layer must have written the same n).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlcc.ir.ops import need, need_float, out, tensor
from mlcc.ir.registry import AttrSpec, OpDef, TypeRuleError, as_f32, register
from mlcc.ir.types import Dim, KVCacheType, Sym, TensorType


class KVCacheState:
    """The interpreter's cache for one sequence: per layer, keys and values of every position."""

    def __init__(self, cache_type: KVCacheType) -> None:
        self.type = cache_type
        self.length = 0
        shape = (0, cache_type.num_kv_heads, cache_type.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(cache_type.num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(cache_type.num_layers)]
        self.pending: dict[int, int] = {}

    def reset(self) -> None:
        self.__init__(self.type)

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        n = k.shape[0]
        if self.type.sliding_window < 0 and self.length + n > self.type.capacity:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {n} new positions exceed the "
                f"capacity of {self.type.capacity}; reset the sequence or raise the context window")
        dtype = np.dtype(self.type.dtype)
        self.keys[layer] = np.concatenate([self.keys[layer][: self.length], k.astype(dtype)])
        self.values[layer] = np.concatenate([self.values[layer][: self.length], v.astype(dtype)])
        self.pending[layer] = n

    def commit(self) -> None:
        """Advance the length after a function call; all layers must have written alike."""
        counts = set(self.pending.values())
        if len(counts) > 1:
            raise ValueError(f"layers wrote different numbers of positions: {self.pending}")
        if counts:
            if len(self.pending) != self.type.num_layers:
                missing = sorted(set(range(self.type.num_layers)) - set(self.pending))
                raise ValueError(f"layers {missing} wrote nothing to the KV cache")
            self.length += counts.pop()
        self.pending = {}


def visible_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int, sinks: int) -> np.ndarray:
    """[n_q, n_k] bool: causal, within the sliding window (if any), or one of the sink positions."""
    causal = k_pos[None, :] <= q_pos[:, None]
    if window < 0:
        return causal
    in_window = k_pos[None, :] > q_pos[:, None] - window
    is_sink = (k_pos < sinks)[None, :]
    return causal & (in_window | is_sink)


# --- positions ------------------------------------------------------------------------------


def _kv(types, index: int) -> KVCacheType:
    t = types[index]
    if not isinstance(t, KVCacheType):
        raise TypeRuleError(f"input {index} must be a KV cache, got {t}")
    return t


def _positions_infer(types, attrs):
    _kv(types, 0)
    length = attrs["length"]
    need(isinstance(length, Sym) or (isinstance(length, int) and length > 0),
         f"length must be a symbol or positive int, got {length!r}")
    return (TensorType("int32", (length,)),)


def _positions_ref(ctx, inputs, attrs):
    length: Dim = attrs["length"]
    n = ctx.bindings[length.name] if isinstance(length, Sym) else length
    if attrs["batched"]:
        states = _batch_states(inputs[0], n)
        return (np.array([s.length for s in states], dtype=np.int32),)
    state: KVCacheState = inputs[0]
    return (np.arange(state.length, state.length + n, dtype=np.int32),)


def _batch_states(states, n: int) -> list[KVCacheState]:
    if not isinstance(states, (list, tuple)) or len(states) != n:
        raise ValueError(f"a batched KV cache needs one KVCacheState per row ({n}), got "
                         f"{type(states).__name__}")
    return list(states)


BATCHED = AttrSpec("batched", (bool,), False,
                   doc="row i is the next token of sequence i (batch decode); the cache input "
                       "then holds one sequence per row")

register(OpDef("positions", (AttrSpec("length", (int, Sym)), BATCHED), (1, 1), _positions_infer,
               _positions_ref, doc="Positions of the next `length` tokens of the sequence."))


# --- rotary embedding -----------------------------------------------------------------------


def rope_inv_freq(rotary_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
    """Inverse frequencies (float32), with Llama-3 style frequency scaling when asked."""
    # Positions multiply these: a few float32 ulps of error here become 1e-3 radians at position
    # 10^4, so the formula runs in float64 and is rounded to float32 once.
    inv = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if not scaling:
        return inv.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv / scaling["factor"]).astype(np.float32)
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_mid, mid, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def _rope_infer(types, attrs):
    x, pos = tensor(types, 0, "x"), tensor(types, 1, "positions")
    need_float(x, "x")
    need(x.rank == 3, f"x must be [seq_len, heads, head_dim], got {x}")
    need(pos.dtype == "int32" and pos.rank == 1 and pos.shape[0] == x.shape[0],
         f"positions must be i32[{x.shape[0]}], got {pos}")
    d = x.shape[2]
    r = attrs["rotary_dim"]
    need(isinstance(d, int) and 0 < r <= d and r % 2 == 0,
         f"rotary_dim must be even and in (0, head_dim={d}], got {r}")
    need(attrs["style"] in ("rotate_half", "interleaved"),
         f"style must be 'rotate_half' or 'interleaved', got {attrs['style']!r}")
    need(attrs["theta"] > 0, f"theta must be > 0, got {attrs['theta']}")
    return (x,)


def _rope_ref(ctx, inputs, attrs):
    x, pos = as_f32(inputs[0]), inputs[1]
    r = attrs["rotary_dim"]
    scaling = dict(attrs["scaling"]) if attrs["scaling"] else None
    inv = rope_inv_freq(r, attrs["theta"], scaling)
    angles = pos.astype(np.float32)[:, None] * inv[None, :]  # (n, r/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    rot, rest = x[..., :r], x[..., r:]
    if attrs["style"] == "rotate_half":
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        rotated = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    return out([np.concatenate([rotated, rest], axis=-1)], [inputs[0].dtype.name])


register(OpDef(
    "rope",
    (AttrSpec("theta", (float,)), AttrSpec("rotary_dim", (int,)),
     AttrSpec("style", (str,), "rotate_half"), AttrSpec("scaling", (tuple, type(None)), None)),
    (2, 2), _rope_infer, _rope_ref,
    doc="Rotary position embedding on the first rotary_dim features of each head."))


# --- attention ------------------------------------------------------------------------------


def _attention_infer(types, attrs):
    q, k, v = tensor(types, 0, "q"), tensor(types, 1, "k"), tensor(types, 2, "v")
    cache = _kv(types, 3)
    for name, t in (("q", q), ("k", k), ("v", v)):
        need_float(t, name)
        need(t.rank == 3, f"{name} must be [seq_len, heads, head_dim], got {t}")
    need(k.shape == v.shape, f"k {k} and v {v} must have the same shape")
    need(q.shape[0] == k.shape[0], f"q {q} and k {k} must have the same seq_len")
    need(k.shape[1] == cache.num_kv_heads and k.shape[2] == cache.head_dim,
         f"k {k} does not match the cache ({cache.num_kv_heads} kv heads, "
         f"head_dim {cache.head_dim})")
    need(q.shape[2] == cache.head_dim, f"q {q} head_dim differs from the cache's {cache.head_dim}")
    need(isinstance(q.shape[1], int) and q.shape[1] % cache.num_kv_heads == 0,
         f"query heads {q.shape[1]} must be a multiple of kv heads {cache.num_kv_heads}")
    need(0 <= attrs["layer"] < cache.num_layers,
         f"layer {attrs['layer']} out of range [0, {cache.num_layers})")
    return (q,)


def _attention_ref(ctx, inputs, attrs):
    if attrs["batched"]:
        q, k, v, states = inputs
        rows = [_attention_one(q[i:i + 1], k[i:i + 1], v[i:i + 1], state, attrs)
                for i, state in enumerate(_batch_states(states, q.shape[0]))]
        return (np.concatenate(rows, axis=0),)
    return (_attention_one(*inputs, attrs),)


def _attention_one(q, k, v, state: KVCacheState, attrs) -> np.ndarray:
    layer = attrs["layer"]
    cache: KVCacheType = state.type
    state.write(layer, as_f32(k), as_f32(v))
    keys, values = as_f32(state.keys[layer]), as_f32(state.values[layer])
    n, hq, d = q.shape
    group = hq // cache.num_kv_heads
    q_pos = np.arange(state.length, state.length + n)
    k_pos = np.arange(keys.shape[0])
    mask = visible_mask(q_pos, k_pos, cache.sliding_window, cache.sink_size)
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    kh = np.repeat(keys.transpose(1, 0, 2), group, axis=0)  # (hq, total, d)
    vh = np.repeat(values.transpose(1, 0, 2), group, axis=0)
    scores = np.einsum("qhd,htd->hqt", as_f32(q), kh) * np.float32(scale)
    scores = np.where(mask[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    result = np.einsum("hqt,htd->qhd", probs, vh)
    return out([result], [q.dtype.name])[0]


register(OpDef(
    "attention", (AttrSpec("layer", (int,)), AttrSpec("scale", (float, type(None)), None),
                  BATCHED),
    (4, 4), _attention_infer, _attention_ref, side_effect=True,
    doc="Append k, v of this chunk to the cache's layer, then causal GQA attention of q over it."))
