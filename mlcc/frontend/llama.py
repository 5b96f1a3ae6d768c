"""Llama (HF model_type "llama"): config, HF weight mapping and IR builder.

Covers Llama 1/2/3, Code Llama and TinyLlama: grouped-query attention, tied or untied
embeddings, rope_theta and rope scaling ("linear", "llama3"), head_dim from config.json or
hidden_size / num_attention_heads, optional attention and MLP biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc import ir
from mlcc.frontend.entries import entry_points, module_attrs
from mlcc.frontend.architecture import (
    Architecture,
    ParamSource,
    WeightMapping,
    fused_param,
    linear_param,
    vector_param,
)
from mlcc.frontend.config import HFConfigReader, ModelConfig, RopeScaling, _fail

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """A Llama decoder: RMSNorm, rotary attention with GQA, SwiGLU MLP."""

    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False

    model_type: ClassVar[str] = "llama"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        rope = r.rope_parameters()
        rope_theta = r.float("rope_theta", None)
        if rope_theta is None:
            rope_theta = float(rope.get("rope_theta", 10000.0))
        scaling = r.hf.get("rope_scaling") if r.has("rope_scaling") else (rope or None)
        return {
            "vocab_size": r.int("vocab_size"),
            "hidden_size": hidden,
            "num_hidden_layers": r.int("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": r.opt_int("num_key_value_heads") or heads,
            "head_dim": r.opt_int("head_dim") or _head_dim_from_hidden(hidden, heads),
            "intermediate_size": r.int("intermediate_size"),
            "rms_norm_eps": r.float("rms_norm_eps", 1e-6),
            "rope_theta": rope_theta,
            "rope_scaling": RopeScaling.from_hf(scaling),
            "hidden_act": r.str("hidden_act", "silu"),
            "attention_bias": r.bool("attention_bias", False),
            "mlp_bias": r.bool("mlp_bias", False),
        }

    def validate(self) -> None:
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise _fail(
                f"hidden_act={self.hidden_act!r} is not supported for {self.model_type}; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.intermediate_size <= 0:
            raise _fail(f"intermediate_size={self.intermediate_size} must be positive")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise _fail(
                f"rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} must be > 0"
            )
        if self.head_dim % 2:
            raise _fail(f"head_dim={self.head_dim} must be even for rotary embeddings")


def _head_dim_from_hidden(hidden: int, heads: int) -> int:
    if heads <= 0 or hidden % heads:
        raise _fail(
            f"config.json: num_attention_heads={heads} does not divide hidden_size={hidden}; "
            "fix num_attention_heads or state head_dim in config.json"
        )
    return hidden // heads


def _layer_params(config: LlamaConfig, layer: int) -> list[ParamSource]:
    p = f"model.layers.{layer}."
    hidden, head_dim = config.hidden_size, config.head_dim
    q_rows = config.num_attention_heads * head_dim
    kv_rows = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    attn = p + "self_attn."
    qkv_parts = ((attn + "q_proj.{}", q_rows), (attn + "k_proj.{}", kv_rows),
                 (attn + "v_proj.{}", kv_rows))
    gate_up_parts = ((p + "mlp.gate_proj.{}", inter), (p + "mlp.up_proj.{}", inter))

    def parts(template: tuple[tuple[str, int], ...], what: str) -> tuple[tuple[str, int], ...]:
        return tuple((name.format(what), rows) for name, rows in template)

    params = [
        vector_param(p + "input_layernorm.weight", hidden, "norm"),
        fused_param(attn + "qkv_proj.weight", parts(qkv_parts, "weight"), (hidden,), "linear"),
    ]
    if config.attention_bias:
        params.append(fused_param(attn + "qkv_proj.bias", parts(qkv_parts, "bias"), (), "bias"))
    params.append(linear_param(attn + "o_proj.weight", hidden, q_rows))
    if config.attention_bias:
        params.append(vector_param(attn + "o_proj.bias", hidden, "bias"))
    params += [
        vector_param(p + "post_attention_layernorm.weight", hidden, "norm"),
        fused_param(p + "mlp.gate_up_proj.weight", parts(gate_up_parts, "weight"), (hidden,),
                    "linear"),
    ]
    if config.mlp_bias:
        params.append(
            fused_param(p + "mlp.gate_up_proj.bias", parts(gate_up_parts, "bias"), (), "bias"))
    params.append(linear_param(p + "mlp.down_proj.weight", hidden, inter))
    if config.mlp_bias:
        params.append(vector_param(p + "mlp.down_proj.bias", hidden, "bias"))
    return params


def llama_weight_mapping(config: LlamaConfig) -> WeightMapping:
    """mlcc parameters of a Llama model in load order, from HF `LlamaForCausalLM` names."""
    vocab, hidden = config.vocab_size, config.hidden_size
    embed = ParamSource("model.embed_tokens.weight", (vocab, hidden),
                        ("model.embed_tokens.weight",), "identity", "embedding")
    params = [embed]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params.append(vector_param("model.norm.weight", hidden, "norm"))
    # Rotary tables are recomputed from the config; old checkpoints still store them.
    unused = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
              r"model\.rotary_emb\.inv_freq"]
    if config.tie_word_embeddings:
        # Tied models read the embedding for the output; some saves keep a copy as lm_head.
        unused.append(r"lm_head\.weight")
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    return WeightMapping(tuple(params), tuple(unused))


def kv_cache_type(config: ModelConfig, dtype: str = "float32") -> ir.KVCacheType:
    """The model's KV cache: the context window, or a sliding window with optional sinks."""
    window = config.sliding_window_size if config.sliding_window_size > 0 else -1
    capacity = config.context_window_size if config.context_window_size > 0 else (
        config.sliding_window_size + config.attention_sink_size)
    return ir.KVCacheType(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                          dtype, capacity, window, config.attention_sink_size if window > 0 else 0)


def _decoder_layer(b: ir.FunctionBuilder, config: LlamaConfig, w: dict[str, ir.Value],
                   layer: int, x: ir.Value, pos: ir.Value, cache: ir.Value,
                   n: ir.Dim) -> ir.Value:
    p = f"model.layers.{layer}."
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    scaling = config.rope_scaling.to_json() if config.rope_scaling else None
    h = b.rms_norm(x, w[p + "input_layernorm.weight"], config.rms_norm_eps)
    qkv = b.linear(h, w[p + "self_attn.qkv_proj.weight"], w.get(p + "self_attn.qkv_proj.bias"))
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    q = b.rope(b.reshape(q, (n, heads, d)), pos, config.rope_theta, d, scaling=scaling)
    k = b.rope(b.reshape(k, (n, kv_heads, d)), pos, config.rope_theta, d, scaling=scaling)
    attn = b.attention(q, k, b.reshape(v, (n, kv_heads, d)), cache, layer=layer)
    x = x + b.linear(b.reshape(attn, (n, heads * d)), w[p + "self_attn.o_proj.weight"],
                     w.get(p + "self_attn.o_proj.bias"))
    h = b.rms_norm(x, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    gate_up = b.linear(h, w[p + "mlp.gate_up_proj.weight"], w.get(p + "mlp.gate_up_proj.bias"))
    return x + b.linear(b.silu_mul(gate_up), w[p + "mlp.down_proj.weight"],
                        w.get(p + "mlp.down_proj.bias"))


def build_llama(config: LlamaConfig) -> ir.Module:
    """The IR of a Llama model: `prefill(tokens[seq_len])` and `decode(token[1])` -> logits.

    Mistral uses it too: its sliding window and sinks live in the KV cache type.
    """
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in llama_weight_mapping(config).params}
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            x = b.embedding(w["model.embed_tokens.weight"], tokens)
            for layer in range(config.num_hidden_layers):
                x = _decoder_layer(b, config, w, layer, x, pos, cache, n)
            x = b.rms_norm(x, w["model.norm.weight"], config.rms_norm_eps)
            head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            b.output(b.logits(b.linear(x, w[head])))
    return mb.finish()


ARCHITECTURE = Architecture(
    name="llama",
    config_cls=LlamaConfig,
    weight_mapping=llama_weight_mapping,
    build_module=build_llama,
)
