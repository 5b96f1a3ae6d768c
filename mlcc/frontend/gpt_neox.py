"""GPT-NeoX (HF model_type "gpt_neox"): config, HF weight mapping and IR builder.

Covers Pythia, RedPajama-INCITE and GPT-NeoX-20B: LayerNorm with bias, biases on every linear
layer, rotary embeddings on the first `rotary_pct` of each head, and the parallel residual
(x + attn(ln1(x)) + mlp(ln2(x))) or the sequential one.

HF stores the fused `query_key_value` rows per head as [q_h, k_h, v_h]; the mapping regroups
them ("neox_qkv") into all q rows, then all k rows, then all v rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc import ir
from mlcc.frontend.architecture import (
    Architecture,
    ParamSource,
    WeightMapping,
    linear_param,
    vector_param,
)
from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.entries import build_entries

# HF activation name -> the tanh approximation flag of our gelu ("none" = exact erf form).
GELU_APPROXIMATION = {
    "gelu": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
}


@dataclass(frozen=True, kw_only=True)
class GPTNeoXConfig(ModelConfig):
    """A GPT-NeoX decoder; num_key_value_heads always equals num_attention_heads."""

    intermediate_size: int
    layer_norm_eps: float = 1e-5
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    attention_bias: bool = True

    model_type: ClassVar[str] = "gpt_neox"
    default_bos_token_id: ClassVar[int | None] = 0
    default_eos_token_id: ClassVar[int | None] = 2

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(
                f"config.json: num_attention_heads={heads} does not divide hidden_size={hidden}; "
                "fix num_attention_heads"
            )
        # transformers 5 moved rotary_pct / rotary_emb_base into `rope_parameters`.
        rope = r.rope_parameters()
        rotary_pct = r.float("rotary_pct", None)
        if rotary_pct is None:
            rotary_pct = float(rope.get("partial_rotary_factor", 0.25))
        if rope.get("rope_type", "default") != "default":
            raise _fail(
                f"config.json: rope_parameters.rope_type={rope['rope_type']!r} is not supported "
                "for gpt_neox; only unscaled rotary embeddings are"
            )
        return {
            "vocab_size": r.int("vocab_size"),
            "hidden_size": hidden,
            "num_hidden_layers": r.int("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": hidden // heads,
            "intermediate_size": r.int("intermediate_size"),
            "layer_norm_eps": r.float("layer_norm_eps", 1e-5),
            "rotary_pct": rotary_pct,
            "rotary_emb_base": r.rope_theta("rotary_emb_base"),
            "use_parallel_residual": r.bool("use_parallel_residual", True),
            "hidden_act": r.str("hidden_act", "gelu"),
            "attention_bias": r.bool("attention_bias", True),
        }

    def validate(self) -> None:
        self._require_supported("hidden_act", GELU_APPROXIMATION)
        if self.num_key_value_heads != self.num_attention_heads:
            raise _fail(
                f"num_key_value_heads={self.num_key_value_heads} must equal "
                f"num_attention_heads={self.num_attention_heads} for gpt_neox"
            )
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _fail(
                f"head_dim={self.head_dim} x num_attention_heads={self.num_attention_heads} must "
                f"equal hidden_size={self.hidden_size} for gpt_neox"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise _fail(f"rotary_pct={self.rotary_pct} must be in (0, 1]; fix config.json")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise _fail(
                f"rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives rotary_dim="
                f"{self.rotary_dim}; it must be even and at least 2"
            )
        self._require_positive("intermediate_size", "layer_norm_eps")

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that are rotated (HF truncates head_dim * rotary_pct)."""
        return int(self.head_dim * self.rotary_pct)


def _layer_params(config: GPTNeoXConfig, layer: int) -> list[ParamSource]:
    p = f"gpt_neox.layers.{layer}."
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    qkv = p + "attention.query_key_value."
    params = [
        vector_param(p + "input_layernorm.weight", hidden, "norm"),
        vector_param(p + "input_layernorm.bias", hidden, "norm"),
        ParamSource(qkv + "weight", (3 * hidden, hidden), (qkv + "weight",), "neox_qkv",
                    "linear", heads=heads),
    ]
    if config.attention_bias:
        params.append(ParamSource(qkv + "bias", (3 * hidden,), (qkv + "bias",), "neox_qkv",
                                  "bias", heads=heads))
    params.append(linear_param(p + "attention.dense.weight", hidden, hidden))
    if config.attention_bias:
        params.append(vector_param(p + "attention.dense.bias", hidden, "bias"))
    params += [
        vector_param(p + "post_attention_layernorm.weight", hidden, "norm"),
        vector_param(p + "post_attention_layernorm.bias", hidden, "norm"),
        linear_param(p + "mlp.dense_h_to_4h.weight", inter, hidden),
        vector_param(p + "mlp.dense_h_to_4h.bias", inter, "bias"),
        linear_param(p + "mlp.dense_4h_to_h.weight", hidden, inter),
        vector_param(p + "mlp.dense_4h_to_h.bias", hidden, "bias"),
    ]
    return params


def gpt_neox_weight_mapping(config: GPTNeoXConfig) -> WeightMapping:
    """mlcc parameters of a GPT-NeoX model in load order, from HF `GPTNeoXForCausalLM` names.

    Names stay HF's; `query_key_value` is re-laid out as described in the module docstring.
    """
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [ParamSource("gpt_neox.embed_in.weight", (vocab, hidden),
                          ("gpt_neox.embed_in.weight",), "identity", "embedding")]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params += [
        vector_param("gpt_neox.final_layer_norm.weight", hidden, "norm"),
        vector_param("gpt_neox.final_layer_norm.bias", hidden, "norm"),
    ]
    # Older checkpoints store the causal-mask buffers and rotary tables; we rebuild both.
    unused = [
        r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
        r"gpt_neox\.rotary_emb\.inv_freq",
    ]
    if config.tie_word_embeddings:
        unused.append(r"embed_out\.weight")
    else:
        params.append(linear_param("embed_out.weight", vocab, hidden))
    return WeightMapping(tuple(params), tuple(unused))


def _mlp(b: ir.FunctionBuilder, config: GPTNeoXConfig, w: dict[str, ir.Value], p: str,
         h: ir.Value) -> ir.Value:
    up = b.linear(h, w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"])
    act = b.gelu(up, approximate=GELU_APPROXIMATION[config.hidden_act])
    return b.linear(act, w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"])


def _layer(b: ir.FunctionBuilder, config: GPTNeoXConfig, w: dict[str, ir.Value], layer: int,
           x: ir.Value, pos: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"gpt_neox.layers.{layer}."
    heads, d, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
    eps = config.layer_norm_eps
    h = b.layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
    qkv = b.linear(h, w[p + "attention.query_key_value.weight"],
                   w.get(p + "attention.query_key_value.bias"))
    q, k, v = b.split(qkv, [hidden, hidden, hidden])  # the mapping regrouped HF's per-head rows
    q = b.rope(b.reshape(q, (n, heads, d)), pos, config.rotary_emb_base, config.rotary_dim)
    k = b.rope(b.reshape(k, (n, heads, d)), pos, config.rotary_emb_base, config.rotary_dim)
    attn = b.attention(q, k, b.reshape(v, (n, heads, d)), cache, layer=layer)
    attn = b.linear(b.reshape(attn, (n, hidden)), w[p + "attention.dense.weight"],
                    w.get(p + "attention.dense.bias"))
    ln2_w, ln2_b = w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"]
    if config.use_parallel_residual:
        # x + attn(ln1(x)) + mlp(ln2(x)), summed in transformers' order.
        mlp = _mlp(b, config, w, p, b.layer_norm(x, ln2_w, ln2_b, eps))
        return mlp + attn + x
    x = attn + x
    return _mlp(b, config, w, p, b.layer_norm(x, ln2_w, ln2_b, eps)) + x


def build_gpt_neox(config: GPTNeoXConfig) -> ir.Module:
    """The IR of a GPT-NeoX model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    head = "gpt_neox.embed_in.weight" if config.tie_word_embeddings else "embed_out.weight"

    def forward(b: ir.FunctionBuilder, w: dict[str, ir.Value], tokens: ir.Value, pos: ir.Value,
                cache: ir.Value, n: ir.Dim) -> ir.Value:
        x = b.embedding(w["gpt_neox.embed_in.weight"], tokens)
        for layer in range(config.num_hidden_layers):
            x = _layer(b, config, w, layer, x, pos, cache, n)
        x = b.layer_norm(x, w["gpt_neox.final_layer_norm.weight"],
                         w["gpt_neox.final_layer_norm.bias"], config.layer_norm_eps)
        return b.linear(x, w[head])

    return build_entries(config, gpt_neox_weight_mapping(config), forward)


ARCHITECTURE = Architecture(
    name="gpt_neox",
    config_cls=GPTNeoXConfig,
    weight_mapping=gpt_neox_weight_mapping,
    build_module=build_gpt_neox,
)
