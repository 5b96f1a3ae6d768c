"""A Llama decoder layer built with the IR builder matches an independent PyTorch layer.

The layer: RMSNorm, fused QKV projection, rotary embedding, grouped-query attention over a KV
cache, output projection, RMSNorm, SwiGLU MLP with fused gate/up. Prefill of 7 tokens, then 3
decode steps, in float32, to 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcc import ir

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 32, 4, 2, 8, 48
EPS, THETA = 1e-5, 10000.0


def build_layer_module() -> ir.Module:
    mb = ir.ModuleBuilder("llama_layer")
    ln1 = mb.add_param("input_layernorm.weight", (HIDDEN,), "float32", kind="norm")
    qkv_w = mb.add_param("self_attn.qkv_proj.weight",
                         ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "float32", kind="linear")
    o_w = mb.add_param("self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), "float32",
                       kind="linear")
    ln2 = mb.add_param("post_attention_layernorm.weight", (HIDDEN,), "float32", kind="norm")
    gate_up = mb.add_param("mlp.gate_up_proj.weight", (2 * INTER, HIDDEN), "float32",
                           kind="linear")
    down = mb.add_param("mlp.down_proj.weight", (HIDDEN, INTER), "float32", kind="linear")
    cache_type = ir.KVCacheType(1, KV_HEADS, HEAD_DIM, "float32", capacity=64)
    for fn_name, n in (("prefill", ir.Sym("seq_len")), ("decode", 1)):
        with mb.function(fn_name) as b:
            x = b.input("x", (n, HIDDEN), "float32")
            cache = b.kv_cache(cache_type)
            pos = b.positions(cache, n)
            h = b.rms_norm(x, ln1, EPS)
            q, k, v = b.split(b.linear(h, qkv_w),
                              [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM])
            q = b.rope(b.reshape(q, (n, HEADS, HEAD_DIM)), pos, THETA, HEAD_DIM)
            k = b.rope(b.reshape(k, (n, KV_HEADS, HEAD_DIM)), pos, THETA, HEAD_DIM)
            v = b.reshape(v, (n, KV_HEADS, HEAD_DIM))
            attn = b.reshape(b.attention(q, k, v, cache, layer=0), (n, HEADS * HEAD_DIM))
            x = x + b.linear(attn, o_w)
            h = b.rms_norm(x, ln2, EPS)
            x = x + b.linear(b.silu_mul(b.linear(h, gate_up)), down)
            b.output(x)
    return mb.finish()


class TorchLlamaLayer:
    """The same layer written directly in PyTorch, with separate q/k/v and gate/up weights."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        t = {k: torch.from_numpy(v) for k, v in weights.items()}
        q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        qkv = t["self_attn.qkv_proj.weight"]
        self.wq, self.wk, self.wv = qkv[:q_rows], qkv[q_rows:q_rows + kv_rows], qkv[q_rows + kv_rows:]
        self.wo = t["self_attn.o_proj.weight"]
        self.w_gate, self.w_up = t["mlp.gate_up_proj.weight"][:INTER], t["mlp.gate_up_proj.weight"][INTER:]
        self.w_down = t["mlp.down_proj.weight"]
        self.ln1, self.ln2 = t["input_layernorm.weight"], t["post_attention_layernorm.weight"]
        self.k_cache = torch.zeros(0, KV_HEADS, HEAD_DIM)
        self.v_cache = torch.zeros(0, KV_HEADS, HEAD_DIM)

    @staticmethod
    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    @staticmethod
    def rotary(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        ang = torch.cat([pos[:, None].float() * inv] * 2, dim=-1)[:, None, :]
        half = HEAD_DIM // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * ang.cos() + rotated * ang.sin()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, start = x.shape[0], self.k_cache.shape[0]
        pos = torch.arange(start, start + n)
        h = self.rms(x, self.ln1)
        q = self.rotary((h @ self.wq.T).view(n, HEADS, HEAD_DIM), pos)
        k = self.rotary((h @ self.wk.T).view(n, KV_HEADS, HEAD_DIM), pos)
        v = (h @ self.wv.T).view(n, KV_HEADS, HEAD_DIM)
        self.k_cache = torch.cat([self.k_cache, k])
        self.v_cache = torch.cat([self.v_cache, v])
        group = HEADS // KV_HEADS
        keys = self.k_cache.repeat_interleave(group, dim=1).transpose(0, 1)   # (H, T, d)
        vals = self.v_cache.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = q.transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(HEAD_DIM)  # (H, n, T)
        total = keys.shape[1]
        mask = torch.arange(total)[None, :] > pos[:, None]
        scores = scores.masked_fill(mask, float("-inf"))
        attn = (scores.softmax(-1) @ vals).transpose(0, 1).reshape(n, HEADS * HEAD_DIM)
        x = x + attn @ self.wo.T
        h = self.rms(x, self.ln2)
        mlp = torch.nn.functional.silu(h @ self.w_gate.T) * (h @ self.w_up.T)
        return x + mlp @ self.w_down.T


def random_weights(module: ir.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for p in module.params:
        scale = 1.0 if p.annotations.get("kind") == "norm" else 0.2
        base = 1.0 if p.annotations.get("kind") == "norm" else 0.0
        out[p.name] = (base + scale * rng.standard_normal(p.type.shape)).astype(np.float32)
    return out


def test_layer_prints_and_verifies():
    module = ir.verify(build_layer_module())
    text = ir.print_module(module)
    assert "func prefill(%x: f32[seq_len, 32], %kv_cache: kv_cache<layers=1" in text
    assert "attention(%" in text and "layer=0" in text
    assert "rope(" in text and "rotary_dim=8" in text
    assert "f32[seq_len, 4, 8]" in text
    assert text == ir.print_module(build_layer_module())  # stable


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_matches_torch_prefill_then_decode(seed):
    module = build_layer_module()
    weights = random_weights(module, seed)
    torch_layer = TorchLlamaLayer(weights)
    cache = ir.KVCacheState(module.function("prefill").inputs[1].type)
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((7, HIDDEN)).astype(np.float32)
    (ours,) = ir.interpret(module, "prefill", [x, cache], weights)
    ref = torch_layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert cache.length == 7
    for step in range(3):
        x = rng.standard_normal((1, HIDDEN)).astype(np.float32)
        (ours,) = ir.interpret(module, "decode", [x, cache], weights)
        ref = torch_layer(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5, err_msg=f"decode {step}")
    assert cache.length == 10
