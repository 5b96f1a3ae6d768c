"""StableLM (HF model_type "stablelm"): config, HF weight mapping and IR builder.

Covers StableLM-3B-4E1T / StableLM Zephyr 3B and StableLM 2: LayerNorm with bias, rotary
embeddings on the first `partial_rotary_factor` of each head, GQA, optional q/k/v biases
(StableLM 2), SwiGLU MLP without biases, and the sequential residual or the parallel one
(x + attn(ln(x)) + mlp(ln(x)), one norm). Per-head q/k LayerNorms (qk_layernorm, StableLM 2
12B) are not supported.
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


def rope_fields(r: HFConfigReader, model_type: str, default_factor: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from top-level keys or transformers 5's
    `rope_parameters`; scaled rotary embeddings are refused."""
    rope = r.rope_parameters()
    theta = r.float("rope_theta", None)
    theta = float(rope.get("rope_theta", 10000.0)) if theta is None else theta
    factor = r.float("partial_rotary_factor", None)
    if factor is None:
        factor = float(rope.get("partial_rotary_factor", default_factor))
    scaling = r.hf.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind != "default":
        raise _fail(f"config.json: rope scaling {kind!r} is not supported for {model_type}; "
                    "only unscaled rotary embeddings are")
    return theta, factor


def check_rotary(model_type: str, factor: float, head_dim: int, rotary_dim: int) -> None:
    if not 0.0 < factor <= 1.0:
        raise _fail(f"partial_rotary_factor={factor} must be in (0, 1]; fix config.json")
    if rotary_dim < 2 or rotary_dim % 2:
        raise _fail(f"partial_rotary_factor={factor} of head_dim={head_dim} gives rotary_dim="
                    f"{rotary_dim} for {model_type}; it must be even and at least 2")


@dataclass(frozen=True, kw_only=True)
class StableLmConfig(ModelConfig):
    """A StableLM decoder."""

    intermediate_size: int
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    use_qkv_bias: bool = False
    use_parallel_residual: bool = False
    hidden_act: str = "silu"

    model_type: ClassVar[str] = "stablelm"
    default_bos_token_id: ClassVar[int | None] = 0
    default_eos_token_id: ClassVar[int | None] = 0

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(f"config.json: num_attention_heads={heads} does not divide "
                        f"hidden_size={hidden}; fix num_attention_heads")
        if r.bool("qk_layernorm", False):
            raise _fail("config.json: qk_layernorm=true (per-head q/k LayerNorms) is not "
                        "supported for stablelm; only models without it are")
        theta, factor = rope_fields(r, "stablelm", 0.25)
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
            "use_qkv_bias": r.bool("use_qkv_bias", False),
            "use_parallel_residual": r.bool("use_parallel_residual", False),
            "hidden_act": r.str("hidden_act", "silu"),
        }

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise _fail(f"hidden_act={self.hidden_act!r} is not supported for stablelm; "
                        "supported: silu")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _fail(f"head_dim={self.head_dim} x num_attention_heads="
                        f"{self.num_attention_heads} must equal hidden_size={self.hidden_size}")
        check_rotary("stablelm", self.partial_rotary_factor, self.head_dim, self.rotary_dim)
        if self.intermediate_size <= 0 or not self.layer_norm_eps > 0 or not self.rope_theta > 0:
            raise _fail(f"intermediate_size={self.intermediate_size}, layer_norm_eps="
                        f"{self.layer_norm_eps} and rope_theta={self.rope_theta} must be positive")

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that are rotated (HF truncates the product)."""
        return int(self.head_dim * self.partial_rotary_factor)


def _layer_params(config: StableLmConfig, layer: int) -> list[ParamSource]:
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
        vector_param(p + "input_layernorm.bias", hidden, "norm"),
        fused_param(attn + "qkv_proj.weight", qkv("weight"), (hidden,), "linear"),
    ]
    if config.use_qkv_bias:
        params.append(fused_param(attn + "qkv_proj.bias", qkv("bias"), (), "bias"))
    params.append(linear_param(attn + "o_proj.weight", hidden, q_rows))
    if not config.use_parallel_residual:
        params += [vector_param(p + "post_attention_layernorm.weight", hidden, "norm"),
                   vector_param(p + "post_attention_layernorm.bias", hidden, "norm")]
    params += [fused_param(p + "mlp.gate_up_proj.weight", gate_up, (hidden,), "linear"),
               linear_param(p + "mlp.down_proj.weight", hidden, inter)]
    return params


def stablelm_weight_mapping(config: StableLmConfig) -> WeightMapping:
    """mlcc parameters of a StableLM model in load order, from HF `StableLmForCausalLM` names."""
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [ParamSource("model.embed_tokens.weight", (vocab, hidden),
                          ("model.embed_tokens.weight",), "identity", "embedding")]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params += [vector_param("model.norm.weight", hidden, "norm"),
               vector_param("model.norm.bias", hidden, "norm")]
    unused = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    return WeightMapping(tuple(params), tuple(unused))


def _attention(b: ir.FunctionBuilder, config: StableLmConfig, w: dict[str, ir.Value], p: str,
               h: ir.Value, pos: ir.Value, cache: ir.Value, n: ir.Dim, layer: int) -> ir.Value:
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    qkv = b.linear(h, w[p + "self_attn.qkv_proj.weight"], w.get(p + "self_attn.qkv_proj.bias"))
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    q = b.rope(b.reshape(q, (n, heads, d)), pos, config.rope_theta, config.rotary_dim)
    k = b.rope(b.reshape(k, (n, kv_heads, d)), pos, config.rope_theta, config.rotary_dim)
    attn = b.attention(q, k, b.reshape(v, (n, kv_heads, d)), cache, layer=layer)
    return b.linear(b.reshape(attn, (n, heads * d)), w[p + "self_attn.o_proj.weight"])


def _layer(b: ir.FunctionBuilder, config: StableLmConfig, w: dict[str, ir.Value], layer: int,
           x: ir.Value, pos: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"model.layers.{layer}."
    eps = config.layer_norm_eps
    h = b.layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
    attn = _attention(b, config, w, p, h, pos, cache, n, layer)
    if config.use_parallel_residual:
        # x + attn(ln(x)) + mlp(ln(x)), summed in transformers' order.
        mlp_in, x = h, x + attn
    else:
        x = x + attn
        mlp_in = b.layer_norm(x, w[p + "post_attention_layernorm.weight"],
                              w[p + "post_attention_layernorm.bias"], eps)
    gate_up = b.linear(mlp_in, w[p + "mlp.gate_up_proj.weight"])
    return x + b.linear(b.silu_mul(gate_up), w[p + "mlp.down_proj.weight"])


def build_stablelm(config: StableLmConfig) -> ir.Module:
    """The IR of a StableLM model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in stablelm_weight_mapping(config).params}
    head = w["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            x = b.embedding(w["model.embed_tokens.weight"], tokens)
            for layer in range(config.num_hidden_layers):
                x = _layer(b, config, w, layer, x, pos, cache, n)
            x = b.layer_norm(x, w["model.norm.weight"], w["model.norm.bias"],
                             config.layer_norm_eps)
            b.output(b.logits(b.linear(x, head)))
    return mb.finish()


ARCHITECTURE = Architecture(
    name="stablelm",
    config_cls=StableLmConfig,
    weight_mapping=stablelm_weight_mapping,
    build_module=build_stablelm,
)
