"""The Llama-family decoder that llama, mistral, qwen2, gemma, stablelm and phi share.

Every one of them is a stack of pre-norm blocks over `model.layers.N` with rotary attention
(q, k, v fused into `self_attn.qkv_proj`) and an MLP, between the embedding `model.embed_tokens`
and a final norm, with lm_head tied to the embedding or not. What differs is data, stated per
architecture in a `DecoderStyle`:

- the norm: RMSNorm (weight, optionally applied as 1 + weight) or LayerNorm (weight and bias);
- biases on q/k/v, on the attention output, on the MLP and on lm_head;
- how much of each head rotates, with which theta and frequency scaling;
- the MLP: SwiGLU or GeGLU over a fused `mlp.gate_up_proj`, or a plain GELU `mlp.fc1`/`fc2`,
  or the architecture's own block (Mixtral's sparse experts) given as two functions;
- the residual: sequential (two norms), or parallel (one norm feeding attention and MLP), summed
  in the order transformers writes it;
- a constant scale on the embedding and the name of the final norm and attention output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mlcc import ir
from mlcc.frontend.architecture import (
    Architecture,
    ParamSource,
    WeightMapping,
    fused_param,
    linear_param,
    styled_architecture,
    vector_param,
)
from mlcc.frontend.config import ModelConfig, RopeScaling
from mlcc.frontend.entries import build_entries

# Rotary tables are recomputed from the config; older checkpoints still store them.
ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                  r"model\.rotary_emb\.inv_freq")
SUMMANDS = ("x", "attn", "mlp")


@dataclass(frozen=True, kw_only=True)
class DecoderStyle:
    """How one architecture's decoder departs from Llama's; defaults are Llama's."""

    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float
    # Gemma's RMSNorm scales by (1 + weight).
    norm_weight_offset: float = 0.0
    rope_theta: float
    rotary_dim: int
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    o_proj: str = "o_proj"
    # "swiglu" / "geglu": fused mlp.gate_up_proj and mlp.down_proj; "gelu": mlp.fc1, mlp.fc2.
    mlp: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    mlp_bias: bool = False
    gelu_approximate: str = "none"
    # One norm feeding attention and MLP; the three terms are added left to right in this order.
    parallel_sum: tuple[str, ...] = ()
    embed_scale: float | None = None
    final_norm: str = "model.norm"
    lm_head_bias: bool = False
    # An MLP of the architecture's own in place of the above: its parameters of layer N
    # (`custom_mlp_params(N)`, after the norms) and its IR on the normed input
    # (`custom_mlp(b, w, N, h) -> [n, hidden]`).
    custom_mlp_params: Callable[[int], list[ParamSource]] | None = None
    custom_mlp: Callable[[ir.FunctionBuilder, dict[str, ir.Value], int, ir.Value],
                         ir.Value] | None = None

    def __post_init__(self) -> None:
        if self.parallel_sum and sorted(self.parallel_sum) != sorted(SUMMANDS):
            raise ValueError(f"parallel_sum {self.parallel_sum} must order {SUMMANDS}")
        if self.norm_weight_offset and self.norm != "rms":
            raise ValueError("norm_weight_offset applies to RMSNorm only")

    @property
    def parallel(self) -> bool:
        return bool(self.parallel_sum)


# ----- weight mapping ---------------------------------------------------------------------


def _norm_params(style: DecoderStyle, prefix: str, hidden: int) -> list[ParamSource]:
    params = [vector_param(prefix + ".weight", hidden, "norm")]
    if style.norm == "layer":
        params.append(vector_param(prefix + ".bias", hidden, "norm"))
    return params


def _weight_and_bias(weight: ParamSource, bias: ParamSource, has_bias: bool) -> list[ParamSource]:
    return [weight, bias] if has_bias else [weight]


def _mlp_params(style: DecoderStyle, p: str, hidden: int, inter: int) -> list[ParamSource]:
    if style.mlp == "gelu":
        return (_weight_and_bias(linear_param(p + "mlp.fc1.weight", inter, hidden),
                                 vector_param(p + "mlp.fc1.bias", inter, "bias"), style.mlp_bias)
                + _weight_and_bias(linear_param(p + "mlp.fc2.weight", hidden, inter),
                                   vector_param(p + "mlp.fc2.bias", hidden, "bias"),
                                   style.mlp_bias))

    def gate_up(what: str) -> tuple[tuple[str, int], ...]:
        return ((f"{p}mlp.gate_proj.{what}", inter), (f"{p}mlp.up_proj.{what}", inter))

    fused = p + "mlp.gate_up_proj."
    return (_weight_and_bias(fused_param(fused + "weight", gate_up("weight"), (hidden,), "linear"),
                             fused_param(fused + "bias", gate_up("bias"), (), "bias"),
                             style.mlp_bias)
            + _weight_and_bias(linear_param(p + "mlp.down_proj.weight", hidden, inter),
                               vector_param(p + "mlp.down_proj.bias", hidden, "bias"),
                               style.mlp_bias))


def decoder_layer_params(config: ModelConfig, style: DecoderStyle,
                         layer: int) -> list[ParamSource]:
    """The parameters of `model.layers.{layer}` in load order (each bias after its weight)."""
    p, hidden, d = f"model.layers.{layer}.", config.hidden_size, config.head_dim
    attn = p + "self_attn."
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d

    def qkv(what: str) -> tuple[tuple[str, int], ...]:
        return ((f"{attn}q_proj.{what}", q_rows), (f"{attn}k_proj.{what}", kv_rows),
                (f"{attn}v_proj.{what}", kv_rows))

    out = f"{attn}{style.o_proj}."
    params = _norm_params(style, p + "input_layernorm", hidden)
    params += _weight_and_bias(fused_param(attn + "qkv_proj.weight", qkv("weight"), (hidden,),
                                           "linear"),
                               fused_param(attn + "qkv_proj.bias", qkv("bias"), (), "bias"),
                               style.qkv_bias)
    params += _weight_and_bias(linear_param(out + "weight", hidden, q_rows),
                               vector_param(out + "bias", hidden, "bias"), style.o_bias)
    if not style.parallel:
        params += _norm_params(style, p + "post_attention_layernorm", hidden)
    if style.custom_mlp_params is not None:
        return params + style.custom_mlp_params(layer)
    return params + _mlp_params(style, p, hidden, config.intermediate_size)


def decoder_weight_mapping(config: ModelConfig, style: DecoderStyle) -> WeightMapping:
    """mlcc parameters of a Llama-family model in load order, from the HF `...ForCausalLM`
    names; with tied embeddings there is no lm_head weight (a saved copy is ignored)."""
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [ParamSource("model.embed_tokens.weight", (vocab, hidden),
                          ("model.embed_tokens.weight",), "identity", "embedding")]
    for layer in range(config.num_hidden_layers):
        params += decoder_layer_params(config, style, layer)
    params += _norm_params(style, style.final_norm, hidden)
    unused = list(ROTARY_BUFFERS)
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    if style.lm_head_bias:
        params.append(vector_param("lm_head.bias", vocab, "bias"))
    return WeightMapping(tuple(params), tuple(unused))


# ----- IR -----------------------------------------------------------------------------------


def _norm(b: ir.FunctionBuilder, style: DecoderStyle, w: dict[str, ir.Value], prefix: str,
          x: ir.Value) -> ir.Value:
    if style.norm == "layer":
        return b.layer_norm(x, w[prefix + ".weight"], w[prefix + ".bias"], style.norm_eps)
    return b.rms_norm(x, w[prefix + ".weight"], style.norm_eps,
                      weight_offset=style.norm_weight_offset)


def decoder_attention(b: ir.FunctionBuilder, config: ModelConfig, style: DecoderStyle,
                      w: dict[str, ir.Value], layer: int, h: ir.Value, pos: ir.Value,
                      cache: ir.Value, n: ir.Dim) -> ir.Value:
    """Rotary GQA attention of layer `layer` on the normed input `h`, through its output
    projection: [n, hidden]."""
    p = f"model.layers.{layer}.self_attn."
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    scaling = style.rope_scaling.to_json() if style.rope_scaling else None
    qkv = b.linear(h, w[p + "qkv_proj.weight"], w.get(p + "qkv_proj.bias"))
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    q = b.rope(b.reshape(q, (n, heads, d)), pos, style.rope_theta, style.rotary_dim,
               scaling=scaling)
    k = b.rope(b.reshape(k, (n, kv_heads, d)), pos, style.rope_theta, style.rotary_dim,
               scaling=scaling)
    attn = b.attention(q, k, b.reshape(v, (n, kv_heads, d)), cache, layer=layer)
    out = f"{p}{style.o_proj}."
    return b.linear(b.reshape(attn, (n, heads * d)), w[out + "weight"], w.get(out + "bias"))


def decoder_mlp(b: ir.FunctionBuilder, style: DecoderStyle, w: dict[str, ir.Value], layer: int,
                h: ir.Value) -> ir.Value:
    """The MLP of layer `layer` on the normed input `h`: [n, hidden]."""
    if style.custom_mlp is not None:
        return style.custom_mlp(b, w, layer, h)
    p = f"model.layers.{layer}.mlp."
    if style.mlp == "gelu":
        up = b.linear(h, w[p + "fc1.weight"], w.get(p + "fc1.bias"))
        act = b.gelu(up, approximate=style.gelu_approximate)
        return b.linear(act, w[p + "fc2.weight"], w.get(p + "fc2.bias"))
    gate_up = b.linear(h, w[p + "gate_up_proj.weight"], w.get(p + "gate_up_proj.bias"))
    if style.mlp == "geglu":
        act = b.emit("gelu_mul", gate_up, approximate=style.gelu_approximate)
    else:
        act = b.silu_mul(gate_up)
    return b.linear(act, w[p + "down_proj.weight"], w.get(p + "down_proj.bias"))


def decoder_layer(b: ir.FunctionBuilder, config: ModelConfig, style: DecoderStyle,
                  w: dict[str, ir.Value], layer: int, x: ir.Value, pos: ir.Value,
                  cache: ir.Value, n: ir.Dim) -> ir.Value:
    """One block: x + attn(norm(x)), then + mlp(norm(.)); or in parallel, one norm feeding both."""
    p = f"model.layers.{layer}."
    h = _norm(b, style, w, p + "input_layernorm", x)
    attn = decoder_attention(b, config, style, w, layer, h, pos, cache, n)
    if not style.parallel:
        x = x + attn
        h = _norm(b, style, w, p + "post_attention_layernorm", x)
        return x + decoder_mlp(b, style, w, layer, h)
    terms = {"x": x, "attn": attn}
    first, second, third = style.parallel_sum
    if third == "mlp":
        # The first two terms do not need the MLP, so their sum is emitted before it.
        head = terms[first] + terms[second]
        return head + decoder_mlp(b, style, w, layer, h)
    terms["mlp"] = decoder_mlp(b, style, w, layer, h)
    return terms[first] + terms[second] + terms[third]


def build_decoder(config: ModelConfig, style: DecoderStyle) -> ir.Module:
    """The IR of a Llama-family model: one function per entry of `entry_points` (prefill,
    decode, batch_decode when max_batch_size > 1), each returning logits."""
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"

    def forward(b: ir.FunctionBuilder, w: dict[str, ir.Value], tokens: ir.Value, pos: ir.Value,
                cache: ir.Value, n: ir.Dim) -> ir.Value:
        x = b.embedding(w["model.embed_tokens.weight"], tokens)
        if style.embed_scale is not None:
            x = b.emit("scale_in_dtype", x, factor=style.embed_scale)
        for layer in range(config.num_hidden_layers):
            x = decoder_layer(b, config, style, w, layer, x, pos, cache, n)
        x = _norm(b, style, w, style.final_norm, x)
        return b.linear(x, w[head], w.get("lm_head.bias"))

    return build_entries(config, decoder_weight_mapping(config, style), forward)


def decoder_architecture(name: str, config_cls: type[ModelConfig],
                        style: Callable[[Any], DecoderStyle]) -> Architecture:
    """The registry entry of an architecture of this family whose differences `style(config)`
    states."""
    return styled_architecture(name, config_cls, style, decoder_weight_mapping, build_decoder)
