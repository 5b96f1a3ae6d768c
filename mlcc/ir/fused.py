"""Fused ops that passes create from patterns of core ops; backends lower each to one kernel.

- `qkv_attention`: split a fused QKV projection into heads, apply rotary embedding to q and k,
  append k and v to the KV cache and attend (the pattern split/reshape/rope/attention/reshape).
- `add_rms_norm` / `add_layer_norm`: residual add followed by normalization; returns both the
  normalized value and the sum (the next residual).
"""

from __future__ import annotations

import numpy as np

from mlcc.ir.kv import BATCHED, _attention_infer, _attention_ref, _rope_ref
from mlcc.ir.ops import _layer_norm_ref, _norm_infer, _rms_norm_ref, need, need_float, tensor
from mlcc.ir.registry import AttrSpec, EvalContext, OpDef, TypeRuleError, register
from mlcc.ir.types import KVCacheType, TensorType

ROPE_ATTRS = (
    AttrSpec("rope_theta", (float,)),
    AttrSpec("rotary_dim", (int,), doc="0 = no rotary embedding"),
    AttrSpec("rope_style", (str,), "rotate_half"),
    AttrSpec("rope_scaling", (tuple, type(None)), None),
)


def _qkv_heads(types, attrs) -> tuple[TensorType, KVCacheType, int, int, int]:
    qkv, pos = tensor(types, 0, "qkv"), tensor(types, 1, "positions")
    cache = types[2]
    if not isinstance(cache, KVCacheType):
        raise TypeRuleError(f"input 2 must be a KV cache, got {cache}")
    need_float(qkv, "qkv")
    hq, hkv, d = attrs["num_q_heads"], cache.num_kv_heads, cache.head_dim
    need(qkv.rank == 2 and qkv.shape[1] == (hq + 2 * hkv) * d,
         f"qkv must be [seq_len, {(hq + 2 * hkv) * d}] ((q {hq} + 2 * kv {hkv}) heads * {d}), "
         f"got {qkv}")
    need(pos.dtype == "int32" and pos.shape == (qkv.shape[0],),
         f"positions must be i32[{qkv.shape[0]}], got {pos}")
    need(0 <= attrs["rotary_dim"] <= d and attrs["rotary_dim"] % 2 == 0,
         f"rotary_dim must be even and in [0, {d}], got {attrs['rotary_dim']}")
    return qkv, cache, hq, hkv, d


def _qkv_attention_infer(types, attrs):
    qkv, cache, hq, hkv, d = _qkv_heads(types, attrs)
    n = qkv.shape[0]
    split_types = [TensorType(qkv.dtype, (n, h, d)) for h in (hq, hkv, hkv)] + [cache]
    _attention_infer(split_types, {"layer": attrs["layer"], "scale": attrs["scale"]})
    return (TensorType(qkv.dtype, (n, hq * d)),)


def _qkv_attention_ref(ctx: EvalContext, inputs, attrs):
    qkv, pos, state = inputs
    cache_type = state[0].type if attrs["batched"] else state.type
    hq, hkv, d = attrs["num_q_heads"], cache_type.num_kv_heads, cache_type.head_dim
    n = qkv.shape[0]
    q = qkv[:, : hq * d].reshape(n, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].reshape(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].reshape(n, hkv, d)
    if attrs["rotary_dim"]:
        rope = {"theta": attrs["rope_theta"], "rotary_dim": attrs["rotary_dim"],
                "style": attrs["rope_style"], "scaling": attrs["rope_scaling"]}
        (q,) = _rope_ref(ctx, [q, pos], rope)
        (k,) = _rope_ref(ctx, [k, pos], rope)
    (result,) = _attention_ref(ctx, [q, k, v, state], {"layer": attrs["layer"],
                                                        "scale": attrs["scale"],
                                                        "batched": attrs["batched"]})
    return (result.reshape(n, hq * d),)


register(OpDef(
    "qkv_attention",
    (AttrSpec("layer", (int,)), AttrSpec("num_q_heads", (int,)),
     AttrSpec("scale", (float, type(None)), None)) + ROPE_ATTRS + (BATCHED,),
    (3, 3), _qkv_attention_infer, _qkv_attention_ref, side_effect=True,
    doc="Rotary + KV-cache append + causal GQA attention on a fused QKV projection."))


def _add_norm_infer(types, attrs, with_bias: bool):
    x, r = tensor(types, 0, "x"), tensor(types, 1, "residual")
    need(x == r, f"x {x} and residual {r} must have the same type")
    (normed,) = _norm_infer([x] + list(types[2:]), attrs, with_bias)
    return (normed, x)


def _add_norm_ref(norm_ref):
    def reference(ctx, inputs, attrs):
        total = (inputs[0].astype(np.float32) + inputs[1].astype(np.float32)).astype(inputs[0].dtype)
        (normed,) = norm_ref(ctx, [total] + list(inputs[2:]), attrs)
        return normed, total
    return reference


register(OpDef(
    "add_rms_norm", (AttrSpec("eps", (float,)), AttrSpec("weight_offset", (float,), 0.0)),
    (3, 3), lambda t, a: _add_norm_infer(t, a, False), _add_norm_ref(_rms_norm_ref),
    doc="s = x + residual; returns (rms_norm(s), s)."))
register(OpDef(
    "add_layer_norm", (AttrSpec("eps", (float,)),), (4, 4),
    lambda t, a: _add_norm_infer(t, a, True), _add_norm_ref(_layer_norm_ref),
    doc="s = x + residual; returns (layer_norm(s), s)."))
