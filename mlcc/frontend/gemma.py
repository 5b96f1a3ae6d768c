"""Gemma (HF model_type "gemma"): config, HF weight mapping and IR builder.

Gemma 1 (2B, 7B): the embedding is multiplied by sqrt(hidden_size) rounded to the model dtype
(transformers keeps the constant as a tensor of that dtype), RMSNorms scale by (1 + weight),
the MLP is GeGLU with the tanh GELU, head_dim is stated in config.json (256, independent of
hidden_size / heads), the 2B model has one KV head (multi-query), and lm_head is the tied
embedding unless config.json unties it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from mlcc import ir
from mlcc.frontend.architecture import (
    Architecture,
    ParamSource,
    WeightMapping,
    fused_param,
    linear_param,
    vector_param,
)
from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.entries import entry_points, module_attrs
from mlcc.frontend.llama import kv_cache_type

# HF activation name -> our gelu's `approximate`. transformers reads Gemma's legacy "gelu" as
# the tanh form, which the released checkpoints were trained with; `hidden_activation` (older
# configs) is taken as written.
GELU_OF_HIDDEN_ACT = {"gelu": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
                      "gelu_fast": "tanh"}
GELU_OF_HIDDEN_ACTIVATION = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
                             "gelu_fast": "tanh"}


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(ModelConfig):
    """A Gemma 1 decoder; `gelu_approximate` is "tanh" (or "none", the exact erf form)."""

    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    gelu_approximate: str = "tanh"
    attention_bias: bool = False

    model_type: ClassVar[str] = "gemma"
    default_bos_token_id: ClassVar[int | None] = 2
    default_eos_token_id: ClassVar[int | None] = 1

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        heads = r.int("num_attention_heads")
        rope = r.rope_parameters()
        theta = r.float("rope_theta", None)
        theta = float(rope.get("rope_theta", 10000.0)) if theta is None else theta
        scaling = r.hf.get("rope_scaling") or rope
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise _fail(f"config.json: rope scaling {scaling!r} is not supported for gemma; "
                        "only unscaled rotary embeddings are")
        return {
            "vocab_size": r.int("vocab_size"),
            "hidden_size": r.int("hidden_size"),
            "num_hidden_layers": r.int("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": r.opt_int("num_key_value_heads") or heads,
            "head_dim": r.int("head_dim", 256),
            "intermediate_size": r.int("intermediate_size"),
            "rms_norm_eps": r.float("rms_norm_eps", 1e-6),
            "rope_theta": theta,
            "gelu_approximate": _gelu_approximate(r),
            "attention_bias": r.bool("attention_bias", False),
        }

    @classmethod
    def _hf_tokens(cls, r: HFConfigReader) -> dict:
        # Gemma ties lm_head to the embedding unless config.json says otherwise.
        return {**super()._hf_tokens(r), "tie_word_embeddings": r.bool("tie_word_embeddings", True)}

    def validate(self) -> None:
        if self.gelu_approximate not in ("tanh", "none"):
            raise _fail(f"gelu_approximate={self.gelu_approximate!r} must be 'tanh' or 'none'")
        if self.intermediate_size <= 0 or not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise _fail(f"intermediate_size={self.intermediate_size}, rms_norm_eps="
                        f"{self.rms_norm_eps} and rope_theta={self.rope_theta} must be positive")
        if self.head_dim % 2:
            raise _fail(f"head_dim={self.head_dim} must be even for rotary embeddings")


def _gelu_approximate(r: HFConfigReader) -> str:
    if r.hf.get("hidden_activation") is not None:
        key, table = "hidden_activation", GELU_OF_HIDDEN_ACTIVATION
    else:
        key, table = "hidden_act", GELU_OF_HIDDEN_ACT
    name = r.str(key, "gelu_pytorch_tanh")
    if name not in table:
        raise _fail(f"config.json: {key}={name!r} is not supported for gemma; supported: "
                    f"{', '.join(table)}")
    return table[name]


def _layer_params(config: GemmaConfig, layer: int) -> list[ParamSource]:
    p = f"model.layers.{layer}."
    attn = p + "self_attn."
    hidden, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d

    def qkv(what: str) -> tuple[tuple[str, int], ...]:
        return ((f"{attn}q_proj.{what}", q_rows), (f"{attn}k_proj.{what}", kv_rows),
                (f"{attn}v_proj.{what}", kv_rows))

    gate_up = ((p + "mlp.gate_proj.weight", inter), (p + "mlp.up_proj.weight", inter))
    params = [
        vector_param(p + "input_layernorm.weight", hidden, "norm"),
        fused_param(attn + "qkv_proj.weight", qkv("weight"), (hidden,), "linear"),
    ]
    if config.attention_bias:
        params.append(fused_param(attn + "qkv_proj.bias", qkv("bias"), (), "bias"))
    params.append(linear_param(attn + "o_proj.weight", hidden, q_rows))
    if config.attention_bias:
        params.append(vector_param(attn + "o_proj.bias", hidden, "bias"))
    return params + [
        vector_param(p + "post_attention_layernorm.weight", hidden, "norm"),
        fused_param(p + "mlp.gate_up_proj.weight", gate_up, (hidden,), "linear"),
        linear_param(p + "mlp.down_proj.weight", hidden, inter),
    ]


def gemma_weight_mapping(config: GemmaConfig) -> WeightMapping:
    """mlcc parameters of a Gemma model in load order, from HF `GemmaForCausalLM` names."""
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [ParamSource("model.embed_tokens.weight", (vocab, hidden),
                          ("model.embed_tokens.weight",), "identity", "embedding")]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params.append(vector_param("model.norm.weight", hidden, "norm"))
    unused = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    return WeightMapping(tuple(params), tuple(unused))


def _layer(b: ir.FunctionBuilder, config: GemmaConfig, w: dict[str, ir.Value], layer: int,
           x: ir.Value, pos: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"model.layers.{layer}."
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps
    h = b.rms_norm(x, w[p + "input_layernorm.weight"], eps, weight_offset=1.0)
    qkv = b.linear(h, w[p + "self_attn.qkv_proj.weight"], w.get(p + "self_attn.qkv_proj.bias"))
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    q = b.rope(b.reshape(q, (n, heads, d)), pos, config.rope_theta, d)
    k = b.rope(b.reshape(k, (n, kv_heads, d)), pos, config.rope_theta, d)
    attn = b.attention(q, k, b.reshape(v, (n, kv_heads, d)), cache, layer=layer)
    x = x + b.linear(b.reshape(attn, (n, heads * d)), w[p + "self_attn.o_proj.weight"],
                     w.get(p + "self_attn.o_proj.bias"))
    h = b.rms_norm(x, w[p + "post_attention_layernorm.weight"], eps, weight_offset=1.0)
    gate_up = b.linear(h, w[p + "mlp.gate_up_proj.weight"])
    act = b.emit("gelu_mul", gate_up, approximate=config.gelu_approximate)
    return x + b.linear(act, w[p + "mlp.down_proj.weight"])


def build_gemma(config: GemmaConfig) -> ir.Module:
    """The IR of a Gemma model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in gemma_weight_mapping(config).params}
    head = w["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            x = b.embedding(w["model.embed_tokens.weight"], tokens)
            x = b.emit("scale_in_dtype", x, factor=math.sqrt(config.hidden_size))
            for layer in range(config.num_hidden_layers):
                x = _layer(b, config, w, layer, x, pos, cache, n)
            x = b.rms_norm(x, w["model.norm.weight"], config.rms_norm_eps, weight_offset=1.0)
            b.output(b.logits(b.linear(x, head)))
    return mb.finish()


ARCHITECTURE = Architecture(
    name="gemma",
    config_cls=GemmaConfig,
    weight_mapping=gemma_weight_mapping,
    build_module=build_gemma,
)
