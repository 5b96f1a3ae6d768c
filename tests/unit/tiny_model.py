"""A tiny Llama-style model built directly with the IR builder, for pass tests."""

from __future__ import annotations

import numpy as np

from mlcc import ir

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 40, 32, 4, 2, 8, 40, 2


def build_tiny_llama(window: int = -1, sinks: int = 0, capacity: int = 64) -> ir.Module:
    mb = ir.ModuleBuilder("tiny_llama", {"model_type": "llama"})
    embed = mb.add_param("model.embed_tokens.weight", (VOCAB, HIDDEN), "float32", kind="embedding")
    layers = []
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        layers.append((
            mb.add_param(pre + "input_layernorm.weight", (HIDDEN,), "float32", kind="norm"),
            mb.add_param(pre + "self_attn.qkv_proj.weight",
                         ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "float32", kind="linear"),
            mb.add_param(pre + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), "float32",
                         kind="linear"),
            mb.add_param(pre + "post_attention_layernorm.weight", (HIDDEN,), "float32",
                         kind="norm"),
            mb.add_param(pre + "mlp.gate_up_proj.weight", (2 * INTER, HIDDEN), "float32",
                         kind="linear"),
            mb.add_param(pre + "mlp.down_proj.weight", (HIDDEN, INTER), "float32", kind="linear"),
        ))
    norm = mb.add_param("model.norm.weight", (HIDDEN,), "float32", kind="norm")
    cache_type = ir.KVCacheType(LAYERS, KV_HEADS, HEAD_DIM, "float32", capacity, window, sinks)
    for fn_name, n in (("prefill", ir.Sym("seq_len")), ("decode", 1)):
        with mb.function(fn_name) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(cache_type)
            pos = b.positions(cache, n)
            x = b.embedding(embed, tokens)
            for i, (ln1, qkv_w, o_w, ln2, gate_up, down) in enumerate(layers):
                h = b.rms_norm(x, ln1, 1e-5)
                q, k, v = b.split(b.linear(h, qkv_w),
                                  [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM])
                q = b.rope(b.reshape(q, (n, HEADS, HEAD_DIM)), pos, 10000.0, HEAD_DIM)
                k = b.rope(b.reshape(k, (n, KV_HEADS, HEAD_DIM)), pos, 10000.0, HEAD_DIM)
                v = b.reshape(v, (n, KV_HEADS, HEAD_DIM))
                attn = b.attention(q, k, v, cache, layer=i)
                x = x + b.linear(b.reshape(attn, (n, HEADS * HEAD_DIM)), o_w)
                h = b.rms_norm(x, ln2, 1e-5)
                x = x + b.linear(b.silu_mul(b.linear(h, gate_up)), down)
            x = b.rms_norm(x, norm, 1e-5)
            b.output(b.last_logits(b.linear(x, embed)))
    return mb.finish()


def random_params(module: ir.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for p in module.params:
        if p.annotations.get("kind") == "norm":
            params[p.name] = (1 + 0.1 * rng.standard_normal(p.type.shape)).astype(np.float32)
        else:
            params[p.name] = (0.3 * rng.standard_normal(p.type.shape)).astype(np.float32)
    return params
