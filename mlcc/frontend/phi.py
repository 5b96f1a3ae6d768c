"""Phi (HF model_type "phi", transformers' own PhiForCausalLM): config, weight mapping, IR.

Covers Phi-1, Phi-1.5 and Phi-2 as transformers ships them (not the older remote-code layout
with `transformer.h.N.mixer.Wqkv`): one LayerNorm per layer feeding attention and MLP in
parallel (x + attn(ln(x)) + mlp(ln(x))), biases on every linear layer, rotary embeddings on
the first `partial_rotary_factor` of each head, a GELU MLP (fc1, fc2), a final LayerNorm and an
lm_head with a bias (which stays untied even when the weight is tied).
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
from mlcc.frontend.gpt_neox import GELU_APPROXIMATION
from mlcc.frontend.llama import kv_cache_type
from mlcc.frontend.stablelm import check_rotary, rope_fields


@dataclass(frozen=True, kw_only=True)
class PhiConfig(ModelConfig):
    """A Phi decoder with the parallel residual."""

    intermediate_size: int
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    hidden_act: str = "gelu_new"

    model_type: ClassVar[str] = "phi"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(f"config.json: num_attention_heads={heads} does not divide "
                        f"hidden_size={hidden}; fix num_attention_heads")
        if r.bool("qk_layernorm", False):
            raise _fail("config.json: qk_layernorm=true (q/k LayerNorms) is not supported for "
                        "phi; only models without it are")
        theta, factor = rope_fields(r, "phi", 0.5)
        return {
            "vocab_size": r.int("vocab_size"),
            "hidden_size": hidden,
            "num_hidden_layers": r.int("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": r.opt_int("num_key_value_heads") or heads,
            "head_dim": hidden // heads,
            "intermediate_size": r.int("intermediate_size"),
            "layer_norm_eps": r.float("layer_norm_eps", 1e-5),
            "rope_theta": theta,
            "partial_rotary_factor": factor,
            "hidden_act": r.str("hidden_act", "gelu_new"),
        }

    def validate(self) -> None:
        if self.hidden_act not in GELU_APPROXIMATION:
            raise _fail(f"hidden_act={self.hidden_act!r} is not supported for phi; "
                        f"supported: {', '.join(GELU_APPROXIMATION)}")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _fail(f"head_dim={self.head_dim} x num_attention_heads="
                        f"{self.num_attention_heads} must equal hidden_size={self.hidden_size}")
        check_rotary("phi", self.partial_rotary_factor, self.head_dim, self.rotary_dim)
        if self.intermediate_size <= 0 or not self.layer_norm_eps > 0 or not self.rope_theta > 0:
            raise _fail(f"intermediate_size={self.intermediate_size}, layer_norm_eps="
                        f"{self.layer_norm_eps} and rope_theta={self.rope_theta} must be positive")

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that are rotated (HF truncates the product)."""
        return int(self.head_dim * self.partial_rotary_factor)


def _layer_params(config: PhiConfig, layer: int) -> list[ParamSource]:
    p = f"model.layers.{layer}."
    attn = p + "self_attn."
    hidden, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d

    def qkv(what: str) -> tuple[tuple[str, int], ...]:
        return ((f"{attn}q_proj.{what}", q_rows), (f"{attn}k_proj.{what}", kv_rows),
                (f"{attn}v_proj.{what}", kv_rows))

    return [
        vector_param(p + "input_layernorm.weight", hidden, "norm"),
        vector_param(p + "input_layernorm.bias", hidden, "norm"),
        fused_param(attn + "qkv_proj.weight", qkv("weight"), (hidden,), "linear"),
        fused_param(attn + "qkv_proj.bias", qkv("bias"), (), "bias"),
        linear_param(attn + "dense.weight", hidden, q_rows),
        vector_param(attn + "dense.bias", hidden, "bias"),
        linear_param(p + "mlp.fc1.weight", inter, hidden),
        vector_param(p + "mlp.fc1.bias", inter, "bias"),
        linear_param(p + "mlp.fc2.weight", hidden, inter),
        vector_param(p + "mlp.fc2.bias", hidden, "bias"),
    ]


def phi_weight_mapping(config: PhiConfig) -> WeightMapping:
    """mlcc parameters of a Phi model in load order, from HF `PhiForCausalLM` names."""
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [ParamSource("model.embed_tokens.weight", (vocab, hidden),
                          ("model.embed_tokens.weight",), "identity", "embedding")]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params += [vector_param("model.final_layernorm.weight", hidden, "norm"),
               vector_param("model.final_layernorm.bias", hidden, "norm")]
    unused = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    params.append(vector_param("lm_head.bias", vocab, "bias"))
    return WeightMapping(tuple(params), tuple(unused))


def _layer(b: ir.FunctionBuilder, config: PhiConfig, w: dict[str, ir.Value], layer: int,
           x: ir.Value, pos: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"model.layers.{layer}."
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    h = b.layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"],
                     config.layer_norm_eps)
    qkv = b.linear(h, w[p + "self_attn.qkv_proj.weight"], w[p + "self_attn.qkv_proj.bias"])
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    q = b.rope(b.reshape(q, (n, heads, d)), pos, config.rope_theta, config.rotary_dim)
    k = b.rope(b.reshape(k, (n, kv_heads, d)), pos, config.rope_theta, config.rotary_dim)
    attn = b.attention(q, k, b.reshape(v, (n, kv_heads, d)), cache, layer=layer)
    attn = b.linear(b.reshape(attn, (n, heads * d)), w[p + "self_attn.dense.weight"],
                    w[p + "self_attn.dense.bias"])
    up = b.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])
    act = b.gelu(up, approximate=GELU_APPROXIMATION[config.hidden_act])
    mlp = b.linear(act, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return attn + mlp + x  # transformers' order of the parallel sum


def build_phi(config: PhiConfig) -> ir.Module:
    """The IR of a Phi model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in phi_weight_mapping(config).params}
    head = w["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            x = b.embedding(w["model.embed_tokens.weight"], tokens)
            for layer in range(config.num_hidden_layers):
                x = _layer(b, config, w, layer, x, pos, cache, n)
            x = b.layer_norm(x, w["model.final_layernorm.weight"],
                             w["model.final_layernorm.bias"], config.layer_norm_eps)
            b.output(b.logits(b.linear(x, head, w["lm_head.bias"])))
    return mb.finish()


ARCHITECTURE = Architecture(
    name="phi",
    config_cls=PhiConfig,
    weight_mapping=phi_weight_mapping,
    build_module=build_phi,
)
