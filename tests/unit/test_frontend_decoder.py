"""The shared Llama-family decoder with its hooks combined as no released model combines them,
against a PyTorch forward pass written from the hooks' definitions.

The architecture tests compare each real combination with transformers; these check that the
hooks compose: (1 + w) RMSNorm or LayerNorm, biases everywhere, partial rotary, a GELU or GeGLU
MLP, each order of the parallel sum, a scaled embedding, `dense` / `final_layernorm` names and
an lm_head bias. A 6-token prefill then 3 decode steps run through the IR interpreter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcc import ir
from mlcc.frontend.decoder import (
    DecoderStyle,
    build_decoder,
    decoder_architecture,
    decoder_weight_mapping,
)
from mlcc.frontend.entries import kv_cache_type
from mlcc.frontend.llama import LlamaConfig

CONFIG = LlamaConfig(vocab_size=37, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, intermediate_size=20,
                     context_window_size=16, prefill_chunk_size=16, tie_word_embeddings=False)
PROMPT, DECODE = 6, 3
STYLES = {
    "rms_offset_parallel_gelu": DecoderStyle(
        norm_eps=1e-5, norm_weight_offset=1.0, rope_theta=500.0, rotary_dim=4, qkv_bias=True,
        o_bias=True, o_proj="dense", mlp="gelu", mlp_bias=True, gelu_approximate="tanh",
        parallel_sum=("mlp", "x", "attn"), embed_scale=math.sqrt(24),
        final_norm="model.final_layernorm", lm_head_bias=True),
    "layer_norm_parallel_mlp_last": DecoderStyle(
        norm="layer", norm_eps=1e-5, rope_theta=10000.0, rotary_dim=6, mlp="geglu",
        gelu_approximate="none", mlp_bias=True, parallel_sum=("attn", "x", "mlp")),
    "layer_norm_sequential_swiglu": DecoderStyle(
        norm="layer", norm_eps=1e-5, rope_theta=10000.0, rotary_dim=8, qkv_bias=True),
}


def random_params(style: DecoderStyle, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for p in decoder_weight_mapping(CONFIG, style).params:
        base = 1.0 if p.kind == "norm" and p.name.endswith("weight") else 0.0
        params[p.name] = (base + 0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    return params


def _norm(style: DecoderStyle, t: dict[str, torch.Tensor], prefix: str,
          x: torch.Tensor) -> torch.Tensor:
    if style.norm == "layer":
        return torch.nn.functional.layer_norm(x, x.shape[-1:], t[prefix + ".weight"],
                                              t[prefix + ".bias"], style.norm_eps)
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + style.norm_eps)
    return x * scale * (t[prefix + ".weight"] + style.norm_weight_offset)


def _rope(x: torch.Tensor, style: DecoderStyle) -> torch.Tensor:
    r = style.rotary_dim
    inv = 1.0 / style.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = (torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv).float()[:, None]
    a, b, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def _attention(style: DecoderStyle, t: dict[str, torch.Tensor], p: str,
               h: torch.Tensor) -> torch.Tensor:
    n, heads, kv_heads, d = h.shape[0], 4, 2, 8
    qkv = h @ t[p + "self_attn.qkv_proj.weight"].T + t.get(p + "self_attn.qkv_proj.bias", 0)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = _rope(q.view(n, heads, d), style), _rope(k.view(n, kv_heads, d), style)
    k, v = (z.view(n, kv_heads, d).repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d)
    o = p + f"self_attn.{style.o_proj}."
    return out @ t[o + "weight"].T + t.get(o + "bias", 0)


def _mlp(style: DecoderStyle, t: dict[str, torch.Tensor], p: str,
         h: torch.Tensor) -> torch.Tensor:
    gelu = torch.nn.functional.gelu
    if style.mlp == "gelu":
        up = h @ t[p + "mlp.fc1.weight"].T + t[p + "mlp.fc1.bias"]
        return gelu(up, approximate=style.gelu_approximate) @ t[p + "mlp.fc2.weight"].T + (
            t[p + "mlp.fc2.bias"])
    gate, up = (h @ t[p + "mlp.gate_up_proj.weight"].T
                + t.get(p + "mlp.gate_up_proj.bias", 0)).chunk(2, dim=-1)
    act = gelu(gate, approximate=style.gelu_approximate) if style.mlp == "geglu" else (
        torch.nn.functional.silu(gate))
    return (act * up) @ t[p + "mlp.down_proj.weight"].T + t.get(p + "mlp.down_proj.bias", 0)


def torch_logits(style: DecoderStyle, params: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits at every position of one causal forward pass (len(ids), vocab)."""
    t = {name: torch.from_numpy(value) for name, value in params.items()}
    x = t["model.embed_tokens.weight"][torch.tensor(ids)]
    if style.embed_scale is not None:
        x = x * torch.tensor(style.embed_scale, dtype=torch.float32)
    for layer in range(CONFIG.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = _norm(style, t, p + "input_layernorm", x)
        attn = _attention(style, t, p, h)
        if style.parallel_sum:
            terms = {"x": x, "attn": attn, "mlp": _mlp(style, t, p, h)}
            first, second, third = (terms[name] for name in style.parallel_sum)
            x = first + second + third
        else:
            x = x + attn
            x = x + _mlp(style, t, p, _norm(style, t, p + "post_attention_layernorm", x))
    x = _norm(style, t, style.final_norm, x)
    return (x @ t["lm_head.weight"].T + t.get("lm_head.bias", 0)).numpy()


@pytest.mark.parametrize("name", sorted(STYLES))
def test_decoder_hooks_compose_like_their_definitions(name: str) -> None:
    style = STYLES[name]
    module = build_decoder(CONFIG, style)
    params = random_params(style, seed=len(name))
    ids = np.random.default_rng(3).integers(0, CONFIG.vocab_size, PROMPT + DECODE).tolist()
    expected = torch_logits(style, params, ids)
    assert expected.std() > 0.3
    cache = ir.KVCacheState(kv_cache_type(CONFIG))
    (got,) = ir.interpret(module, "prefill", [np.array(ids[:PROMPT], np.int32), cache], params)
    np.testing.assert_allclose(got, expected[PROMPT - 1], atol=1e-4, rtol=0)
    for position in range(PROMPT, PROMPT + DECODE):
        (got,) = ir.interpret(module, "decode", [np.array([ids[position]], np.int32), cache],
                              params)
        np.testing.assert_allclose(got, expected[position], atol=1e-4, rtol=0,
                                   err_msg=f"{name}: position {position}")


def test_mapping_follows_the_style() -> None:
    style = STYLES["rms_offset_parallel_gelu"]
    names = [p.name for p in decoder_weight_mapping(CONFIG, style).params]
    layer = [n.removeprefix("model.layers.1.") for n in names if n.startswith("model.layers.1.")]
    assert layer == ["input_layernorm.weight", "self_attn.qkv_proj.weight",
                     "self_attn.qkv_proj.bias", "self_attn.dense.weight", "self_attn.dense.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert names[-3:] == ["model.final_layernorm.weight", "lm_head.weight", "lm_head.bias"]
    sequential = decoder_weight_mapping(CONFIG, STYLES["layer_norm_sequential_swiglu"])
    qkv = sequential.param("model.layers.0.self_attn.qkv_proj.bias")
    assert qkv.hf_names[1] == "model.layers.0.self_attn.k_proj.bias" and qkv.shape == (64,)
    assert sequential.param("model.layers.0.post_attention_layernorm.bias").kind == "norm"
    assert sequential.is_unused("model.rotary_emb.inv_freq")


def test_architecture_entry_and_bad_styles() -> None:
    style = STYLES["rms_offset_parallel_gelu"]
    arch = decoder_architecture("llama", LlamaConfig, lambda config: style)
    assert arch.weight_mapping(CONFIG).param("lm_head.bias").shape == (37,)
    assert ir.print_module(arch.build_module(CONFIG)) == ir.print_module(
        build_decoder(CONFIG, style))
    with pytest.raises(ValueError, match=r"parallel_sum \('x', 'x', 'mlp'\) must order"):
        DecoderStyle(norm_eps=1e-5, rope_theta=1.0, rotary_dim=8, parallel_sum=("x", "x", "mlp"))
    with pytest.raises(ValueError, match=r"norm_weight_offset applies to RMSNorm only"):
        DecoderStyle(norm="layer", norm_eps=1e-5, rope_theta=1.0, rotary_dim=8,
                     norm_weight_offset=1.0)
