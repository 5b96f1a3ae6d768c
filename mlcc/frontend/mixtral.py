"""Mixtral (HF model_type "mixtral"): config, HF weight mapping and IR builder.

A Mistral/Llama decoder whose MLP is a sparse mixture of experts: a router (a linear layer
without bias, kept unquantized in every mode because its logits pick the experts) scores the
experts per token, the `num_experts_per_tok` best are kept and weighted by a softmax over their
logits, and each chosen expert (a SwiGLU MLP, w1 = gate, w3 = up, w2 = down) adds its output
times its weight.

In the IR every expert is an ordinary pair of linear layers, so quantization and the NumPy
interpreter treat experts like any MLP; `moe_route` gives the dense weights (0 for experts not
chosen) and `moe_combine` adds the weighted outputs, skipping experts of weight 0. This dense
form is the model's definition; the compiler's `sparse_moe` pass (mlcc/passes/moe.py) turns it
into grouped linears over the routed rows only, and the experts stay separate parameters.
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
from mlcc.frontend.config import HFConfigReader, _fail
from mlcc.frontend.entries import entry_points, module_attrs
from mlcc.frontend.llama import LlamaConfig, kv_cache_type


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(LlamaConfig):
    """Llama fields, a sliding window (null or absent: none) and the experts."""

    num_local_experts: int
    num_experts_per_tok: int = 2

    model_type: ClassVar[str] = "mixtral"
    hf_sliding_window_key: ClassVar[str] = "sliding_window"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        return {**super()._hf_fields(r), "num_local_experts": r.int("num_local_experts"),
                "num_experts_per_tok": r.int("num_experts_per_tok", 2)}

    def validate(self) -> None:
        super().validate()
        if self.attention_bias or self.mlp_bias:
            raise _fail(f"attention_bias={self.attention_bias}, mlp_bias={self.mlp_bias}: "
                        "mixtral has no biases; fix config.json")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise _fail(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, "
                        f"num_local_experts={self.num_local_experts}]; fix config.json")


def _layer_params(config: MixtralConfig, layer: int) -> list[ParamSource]:
    p = f"model.layers.{layer}."
    attn, moe = p + "self_attn.", p + "block_sparse_moe."
    hidden, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
    qkv = ((attn + "q_proj.weight", q_rows), (attn + "k_proj.weight", kv_rows),
           (attn + "v_proj.weight", kv_rows))
    params = [
        vector_param(p + "input_layernorm.weight", hidden, "norm"),
        fused_param(attn + "qkv_proj.weight", qkv, (hidden,), "linear"),
        linear_param(attn + "o_proj.weight", hidden, q_rows),
        vector_param(p + "post_attention_layernorm.weight", hidden, "norm"),
        # kind "other": the router is never quantized.
        ParamSource(moe + "gate.weight", (config.num_local_experts, hidden),
                    (moe + "gate.weight",), "identity", "other"),
    ]
    for e in range(config.num_local_experts):
        expert = f"{moe}experts.{e}."
        gate_up = ((expert + "w1.weight", inter), (expert + "w3.weight", inter))
        params += [fused_param(expert + "gate_up_proj.weight", gate_up, (hidden,), "linear"),
                   linear_param(expert + "w2.weight", hidden, inter)]
    return params


def mixtral_weight_mapping(config: MixtralConfig) -> WeightMapping:
    """mlcc parameters of a Mixtral model in load order, from the checkpoints' names
    (`block_sparse_moe.experts.E.w1/w2/w3`, also what transformers' save_pretrained writes)."""
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


def _sparse_moe(b: ir.FunctionBuilder, config: MixtralConfig, w: dict[str, ir.Value], p: str,
                h: ir.Value) -> ir.Value:
    moe = p + "block_sparse_moe."
    weights = b.emit("moe_route", b.linear(h, w[moe + "gate.weight"]),
                     top_k=config.num_experts_per_tok)  # f32[n, experts]
    outs = []
    for e in range(config.num_local_experts):
        expert = f"{moe}experts.{e}."
        gate_up = b.linear(h, w[expert + "gate_up_proj.weight"])
        outs.append(b.linear(b.silu_mul(gate_up), w[expert + "w2.weight"]))
    return b.emit("moe_combine", weights, *outs)


def _layer(b: ir.FunctionBuilder, config: MixtralConfig, w: dict[str, ir.Value], layer: int,
           x: ir.Value, pos: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"model.layers.{layer}."
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    scaling = config.rope_scaling.to_json() if config.rope_scaling else None
    h = b.rms_norm(x, w[p + "input_layernorm.weight"], config.rms_norm_eps)
    qkv = b.linear(h, w[p + "self_attn.qkv_proj.weight"])
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    q = b.rope(b.reshape(q, (n, heads, d)), pos, config.rope_theta, d, scaling=scaling)
    k = b.rope(b.reshape(k, (n, kv_heads, d)), pos, config.rope_theta, d, scaling=scaling)
    attn = b.attention(q, k, b.reshape(v, (n, kv_heads, d)), cache, layer=layer)
    x = x + b.linear(b.reshape(attn, (n, heads * d)), w[p + "self_attn.o_proj.weight"])
    h = b.rms_norm(x, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    return x + _sparse_moe(b, config, w, p, h)


def build_mixtral(config: MixtralConfig) -> ir.Module:
    """The IR of a Mixtral model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in mixtral_weight_mapping(config).params}
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
    name="mixtral",
    config_cls=MixtralConfig,
    weight_mapping=mixtral_weight_mapping,
    build_module=build_mixtral,
)
