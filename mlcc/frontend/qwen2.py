"""Qwen2 (HF model_type "qwen2"): config, HF weight mapping and IR builder.

A Llama-shaped decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP) whose q, k and v
projections carry a bias while o_proj does not; the embedding is tied or not.

transformers gives Qwen2 a sliding window only on the layers at index >= max_window_layers and
only when use_sliding_window is true. Our KV cache has one window for every layer, so a config
where every layer slides gets that window, one where none does gets none, and a mix is refused.
"""

from __future__ import annotations

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


@dataclass(frozen=True, kw_only=True)
class Qwen2Config(ModelConfig):
    """A Qwen2 decoder: RMSNorm, rotary GQA attention with q/k/v biases, SwiGLU MLP."""

    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    model_type: ClassVar[str] = "qwen2"
    default_bos_token_id: ClassVar[int | None] = None
    default_eos_token_id: ClassVar[int | None] = None

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(f"config.json: num_attention_heads={heads} does not divide "
                        f"hidden_size={hidden}; fix num_attention_heads or state head_dim")
        rope_theta = r.float("rope_theta", None)
        if rope_theta is None:
            rope_theta = float(r.rope_parameters().get("rope_theta", 10000.0))
        _check_rope_unscaled(r)
        return {
            "vocab_size": r.int("vocab_size"),
            "hidden_size": hidden,
            "num_hidden_layers": r.int("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": r.opt_int("num_key_value_heads") or heads,
            "head_dim": r.opt_int("head_dim") or hidden // heads,
            "intermediate_size": r.int("intermediate_size"),
            "rms_norm_eps": r.float("rms_norm_eps", 1e-6),
            "rope_theta": rope_theta,
            "hidden_act": r.str("hidden_act", "silu"),
        }

    @classmethod
    def _hf_windows(cls, r: HFConfigReader) -> dict:
        fields = super()._hf_windows(r)
        window = _sliding_window_of_all_layers(r)
        if window > 0 and not r.has("sliding_window_size"):
            fields.update(context_window_size=-1, sliding_window_size=window,
                          prefill_chunk_size=r.int("prefill_chunk_size", min(window, 2048)))
        return fields

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise _fail(f"hidden_act={self.hidden_act!r} is not supported for qwen2; "
                        "supported: silu")
        if self.intermediate_size <= 0 or not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise _fail(f"intermediate_size={self.intermediate_size}, rms_norm_eps="
                        f"{self.rms_norm_eps} and rope_theta={self.rope_theta} must be positive")
        if self.head_dim % 2:
            raise _fail(f"head_dim={self.head_dim} must be even for rotary embeddings")


def _check_rope_unscaled(r: HFConfigReader) -> None:
    rope = r.hf.get("rope_scaling") or r.rope_parameters()
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    if kind not in (None, "default"):
        raise _fail(f"config.json: rope scaling {kind!r} is not supported for qwen2; only "
                    "unscaled rotary embeddings are")


def _sliding_window_of_all_layers(r: HFConfigReader) -> int:
    """The window when every layer slides, -1 when none does; a mix is refused."""
    layers = r.int("num_hidden_layers")
    window = r.opt_int("sliding_window")
    if not r.bool("use_sliding_window", False) or not window:
        return -1  # transformers drops the window unless use_sliding_window is set
    types = r.hf.get("layer_types")
    if isinstance(types, list) and types:
        sliding = [t == "sliding_attention" for t in types]
    else:
        first = r.int("max_window_layers", layers)
        sliding = [i >= first for i in range(layers)]
    if not any(sliding):
        return -1
    if not all(sliding):
        raise _fail(
            f"config.json: only some of the {layers} layers use a sliding window "
            f"(use_sliding_window / max_window_layers / layer_types); mlcc supports one window "
            "for all layers or none: set use_sliding_window=false")
    return window


def _layer_params(config: Qwen2Config, layer: int) -> list[ParamSource]:
    p = f"model.layers.{layer}."
    attn = p + "self_attn."
    hidden, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d

    def qkv(what: str) -> tuple[tuple[str, int], ...]:
        return ((f"{attn}q_proj.{what}", q_rows), (f"{attn}k_proj.{what}", kv_rows),
                (f"{attn}v_proj.{what}", kv_rows))

    gate_up = ((p + "mlp.gate_proj.weight", inter), (p + "mlp.up_proj.weight", inter))
    return [
        vector_param(p + "input_layernorm.weight", hidden, "norm"),
        fused_param(attn + "qkv_proj.weight", qkv("weight"), (hidden,), "linear"),
        fused_param(attn + "qkv_proj.bias", qkv("bias"), (), "bias"),
        linear_param(attn + "o_proj.weight", hidden, q_rows),
        vector_param(p + "post_attention_layernorm.weight", hidden, "norm"),
        fused_param(p + "mlp.gate_up_proj.weight", gate_up, (hidden,), "linear"),
        linear_param(p + "mlp.down_proj.weight", hidden, inter),
    ]


def qwen2_weight_mapping(config: Qwen2Config) -> WeightMapping:
    """mlcc parameters of a Qwen2 model in load order, from HF `Qwen2ForCausalLM` names."""
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [ParamSource("model.embed_tokens.weight", (vocab, hidden),
                          ("model.embed_tokens.weight",), "identity", "embedding")]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params.append(vector_param("model.norm.weight", hidden, "norm"))
    unused = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")  # some saves keep a copy of the tied embedding
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    return WeightMapping(tuple(params), tuple(unused))


def _layer(b: ir.FunctionBuilder, config: Qwen2Config, w: dict[str, ir.Value], layer: int,
           x: ir.Value, pos: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"model.layers.{layer}."
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    h = b.rms_norm(x, w[p + "input_layernorm.weight"], config.rms_norm_eps)
    qkv = b.linear(h, w[p + "self_attn.qkv_proj.weight"], w[p + "self_attn.qkv_proj.bias"])
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    q = b.rope(b.reshape(q, (n, heads, d)), pos, config.rope_theta, d)
    k = b.rope(b.reshape(k, (n, kv_heads, d)), pos, config.rope_theta, d)
    attn = b.attention(q, k, b.reshape(v, (n, kv_heads, d)), cache, layer=layer)
    x = x + b.linear(b.reshape(attn, (n, heads * d)), w[p + "self_attn.o_proj.weight"])
    h = b.rms_norm(x, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    gate_up = b.linear(h, w[p + "mlp.gate_up_proj.weight"])
    return x + b.linear(b.silu_mul(gate_up), w[p + "mlp.down_proj.weight"])


def build_qwen2(config: Qwen2Config) -> ir.Module:
    """The IR of a Qwen2 model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in qwen2_weight_mapping(config).params}
    head = w["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            x = b.embedding(w["model.embed_tokens.weight"], tokens)
            for layer in range(config.num_hidden_layers):
                x = _layer(b, config, w, layer, x, pos, cache, n)
            x = b.rms_norm(x, w["model.norm.weight"], config.rms_norm_eps)
            b.output(b.logits(b.linear(x, head)))
    return mb.finish()


ARCHITECTURE = Architecture(
    name="qwen2",
    config_cls=Qwen2Config,
    weight_mapping=qwen2_weight_mapping,
    build_module=build_qwen2,
)
