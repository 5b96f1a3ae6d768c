"""The fused ops' NumPy references (mlcc/ir/fused.py, last_row) against PyTorch.

Like the core ops, each runs through `ir.interpret` inside a one-function module with the
symbolic dim `n`, bound to several sizes. `qkv_attention` is compared with torch doing the
unfused work itself: slicing the QKV projection into heads, rotary embedding (rotate_half or
interleaved, partial, llama3-scaled), and attention under an explicit position mask over the
whole history, chunk after chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ir_op_references import (
    SIZES,
    N,
    T,
    assert_close,
    op_module,
    rand,
    reference_attention,
    reference_inv_freq,
    run,
    sized,
    torch_rope,
)

from mlcc import ir


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_last_row_keeps_two_dims(dtype):
    module = op_module([("x", (N, 24), dtype)], lambda b, x: b.emit("last_row", x))
    rng = np.random.default_rng(30)
    for n in SIZES:
        x = rand(rng, (n, 24), dtype)
        (ours,) = run(module, x)
        assert_close(ours, T(x)[-1:], dtype, rtol=0, atol=0)


def torch_dtype(dtype: str) -> torch.dtype:
    return getattr(torch, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(N, 32), (2, N, 32)])
def test_add_rms_norm_returns_the_norm_and_the_sum(shape, offset, dtype):
    module = op_module(
        [("x", shape, dtype), ("residual", shape, dtype)],
        lambda b, x, r, w: b.emit_multi("add_rms_norm", x, r, w, eps=1e-5, weight_offset=offset),
        params=[("w", (32,), dtype)])
    rng = np.random.default_rng(31)
    w = rand(rng, (32,), dtype, 0.5)
    for n in SIZES:
        x, r = rand(rng, sized(shape, n), dtype, 2.0), rand(rng, sized(shape, n), dtype, 2.0)
        normed, total = run(module, x, r, params={"w": w})
        ref_total = T(x) + T(r)
        ref_normed = F.rms_norm(ref_total.float(), (32,), weight=T(w).float() + offset, eps=1e-5)
        assert_close(total, ref_total, dtype)
        assert_close(normed, ref_normed.to(torch_dtype(dtype)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_add_layer_norm_returns_the_norm_and_the_sum(dtype):
    module = op_module(
        [("x", (N, 24), dtype), ("residual", (N, 24), dtype)],
        lambda b, x, r, w, c: b.emit_multi("add_layer_norm", x, r, w, c, eps=1e-5),
        params=[("w", (24,), dtype), ("c", (24,), dtype)])
    rng = np.random.default_rng(32)
    w, c = rand(rng, (24,), dtype), rand(rng, (24,), dtype)
    for n in SIZES:
        x = (rand(rng, (n, 24), dtype) + 3).astype(dtype)
        r = rand(rng, (n, 24), dtype)
        normed, total = run(module, x, r, params={"w": w, "c": c})
        ref_total = T(x) + T(r)
        ref_normed = F.layer_norm(ref_total.float(), (24,), T(w).float(), T(c).float(), eps=1e-5)
        assert_close(total, ref_total, dtype)
        assert_close(normed, ref_normed.to(torch_dtype(dtype)), dtype)


LLAMA3_SMALL = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
QKV_CASES = {
    # name: (q heads, kv heads, head_dim, rotary_dim, style, scaling, window, sinks, scale, dtype)
    "gqa, rotate_half": (4, 2, 8, 8, "rotate_half", None, -1, 0, None, "float32"),
    "no rotary, explicit scale": (2, 2, 4, 0, "rotate_half", None, -1, 0, 0.3, "float32"),
    "partial interleaved, window and sinks": (4, 1, 8, 4, "interleaved", None, 4, 2, None,
                                              "float32"),
    "llama3 scaling, float16": (4, 2, 16, 16, "rotate_half", LLAMA3_SMALL, -1, 0, None,
                                "float16"),
}
CHUNKS = (5, 3, 1, 4)
LAYERS = 2


def torch_qkv_heads(qkv: torch.Tensor, hq: int, hkv: int, d: int):
    n = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.reshape(n, hq, d), k.reshape(n, hkv, d), v.reshape(n, hkv, d)


def torch_partial_rope(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, rotary_dim: int,
                       style: str) -> torch.Tensor:
    if rotary_dim == 0:
        return x
    rotated = torch_rope(x[..., :rotary_dim], pos, inv, style)
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


@pytest.mark.parametrize("name", list(QKV_CASES))
def test_qkv_attention_equals_split_rope_and_masked_attention(name):
    hq, hkv, d, rotary_dim, style, scaling, window, sinks, scale, dtype = QKV_CASES[name]
    capacity = window + sinks if window > 0 else sum(CHUNKS)
    cache_type = ir.KVCacheType(LAYERS, hkv, d, dtype, capacity, window, sinks)
    width = (hq + 2 * hkv) * d
    frozen_scaling = tuple(sorted(scaling.items())) if scaling else None

    def body(b, *values):
        *qkvs, cache = values
        pos = b.positions(cache, N)
        outs = [b.emit("qkv_attention", qkv, pos, cache, layer=layer, num_q_heads=hq,
                       scale=scale, rope_theta=10000.0, rotary_dim=rotary_dim,
                       rope_style=style, rope_scaling=frozen_scaling)
                for layer, qkv in enumerate(qkvs)]
        return tuple(outs)

    inputs = [(f"qkv{layer}", (N, width), dtype) for layer in range(LAYERS)]
    module = op_module(inputs + [("kv_cache", cache_type)], body)
    state = ir.KVCacheState(cache_type)
    inv = reference_inv_freq(rotary_dim, 10000.0, scaling) if rotary_dim else None
    keys, values = [[] for _ in range(LAYERS)], [[] for _ in range(LAYERS)]
    rng = np.random.default_rng(33)
    start = 0
    for n in CHUNKS:
        qkvs = [rand(rng, (n, width), dtype) for _ in range(LAYERS)]
        outs = run(module, *qkvs, state)
        pos = torch.arange(start, start + n)
        for layer, (qkv, ours) in enumerate(zip(qkvs, outs, strict=True)):
            q, k, v = torch_qkv_heads(T(qkv).float(), hq, hkv, d)
            q = torch_partial_rope(q, pos, inv, rotary_dim, style)
            # the cache stores keys and values in its own dtype
            keys[layer].append(torch_partial_rope(k, pos, inv, rotary_dim, style)
                               .to(torch_dtype(dtype)).float())
            values[layer].append(v.to(torch_dtype(dtype)).float())
            ref = reference_attention(q, torch.cat(keys[layer]), torch.cat(values[layer]),
                                      start, window, sinks, scale)
            assert_close(ours, ref.reshape(n, hq * d).to(torch_dtype(dtype)), dtype)
        start += n
        assert state.length == start


# Ops that this file and test_ir_ops_vs_torch.py compare with torch.
COMPARED_WITH_TORCH = frozenset({
    "add", "mul", "scale", "silu", "gelu", "silu_mul", "cast", "rms_norm", "layer_norm",
    "embedding", "linear", "matmul", "reshape", "split", "concat", "transpose", "softmax",
    "last_logits", "positions", "rope", "attention", "q_linear", "q_embedding",
    "last_row", "add_rms_norm", "add_layer_norm", "qkv_attention",
    # compared in test_ir_arch_ops_vs_torch.py
    "gelu_mul", "scale_in_dtype", "moe_route", "moe_combine",
    # compared in test_ir_moe_ops_vs_torch.py
    "moe_dispatch", "moe_linear", "q_moe_linear", "moe_reduce",
    "all_reduce",  # compared in test_ir_collective_vs_torch.py
})


def test_every_op_of_the_ir_is_compared_with_torch():
    # The interpreter is the oracle for passes and kernels, so no IR op may go unchecked.
    ir_ops = {name for name, op in ir.OPS.items() if op.reference.__module__.startswith("mlcc.ir.")}
    missing = sorted(ir_ops - COMPARED_WITH_TORCH)
    assert not missing, (f"ops {missing} have no torch comparison: add one to "
                         f"tests/unit/test_ir_ops_vs_torch.py or test_ir_fused_ops_vs_torch.py")
    assert COMPARED_WITH_TORCH <= set(ir.OPS), sorted(COMPARED_WITH_TORCH - set(ir.OPS))
