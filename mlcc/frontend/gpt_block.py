"""The learned-position GPT decoder that gpt2 and gpt_bigcode share.

Token (`wte`) plus learned position (`wpe`, read at the positions of the KV cache) embeddings,
pre-LayerNorm blocks (`h.N.ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`,
`mlp.c_proj`) with biases everywhere, attention without rotary embedding, a GELU MLP, a final
`ln_f` and lm_head tied to `wte` unless config.json unties it.

The two differ only in data, stated in a `GPTBlockStyle`: the name prefix (GPT-2's published
checkpoints have none, GPT-BigCode's have `transformer.`; either is also accepted spelled the
other way), whether weights are Conv1D (stored (in, out), transposed on load), how c_attn's
rows are laid out, and the attention score scale of each layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from mlcc import ir
from mlcc.frontend.architecture import (
    Architecture,
    Combine,
    ParamSource,
    WeightMapping,
    linear_param,
    styled_architecture,
    vector_param,
)
from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.entries import build_entries
from mlcc.frontend.gpt_neox import GELU_APPROXIMATION

HF_PREFIX = "transformer."


@dataclass(frozen=True, kw_only=True)
class LearnedPositionConfig(ModelConfig):
    """Fields of a GPT decoder with learned positions (GPT-2 style config.json names)."""

    intermediate_size: int
    n_positions: int
    layer_norm_eps: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True

    default_bos_token_id: ClassVar[int | None] = 50256
    default_eos_token_id: ClassVar[int | None] = 50256
    # What transformers assumes when config.json has no activation_function.
    default_activation: ClassVar[str] = "gelu_new"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = first_int(r, "n_embd", "hidden_size")
        heads = first_int(r, "n_head", "num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(f"config.json: n_head={heads} does not divide n_embd={hidden}; fix n_head")
        inner = r.opt_int("n_inner")
        return {
            "vocab_size": r.int("vocab_size"),
            "hidden_size": hidden,
            "num_hidden_layers": first_int(r, "n_layer", "num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": hidden // heads,
            "intermediate_size": inner if inner is not None else 4 * hidden,
            "n_positions": first_int(r, "n_positions", "max_position_embeddings"),
            "layer_norm_eps": r.float("layer_norm_epsilon", 1e-5),
            "activation_function": r.str("activation_function", cls.default_activation),
            "scale_attn_weights": r.bool("scale_attn_weights", True),
        }

    @classmethod
    def _hf_tokens(cls, r: HFConfigReader) -> dict:
        # transformers ties lm_head to wte unless config.json says otherwise.
        return {**super()._hf_tokens(r), "tie_word_embeddings": r.bool("tie_word_embeddings", True)}

    def validate(self) -> None:
        self._require_supported("activation_function", GELU_APPROXIMATION)
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _fail(f"head_dim={self.head_dim} x num_attention_heads="
                        f"{self.num_attention_heads} must equal hidden_size={self.hidden_size}")
        self._require_positive("intermediate_size", "layer_norm_eps")
        check_learned_positions(self.model_type, self)

    def attention_scale(self, layer: int) -> float | None:
        """The attention score scale of a layer (None: 1/sqrt(head_dim))."""
        return None if self.scale_attn_weights else 1.0


def first_int(r: HFConfigReader, *keys: str) -> int:
    """The first of `keys` that config.json sets (GPT-2 style names, then the generic ones)."""
    for key in keys:
        if r.hf.get(key) is not None:
            return r.int(key)
    raise _fail(f"config.json: missing required key '{keys[0]}' (or {', '.join(keys[1:])}); "
                "add it to config.json")


def check_learned_positions(model_type: str, config: Any) -> None:
    """Positions index the wpe table, so they must stay below its n_positions rows."""
    context, rows = config.context_window_size, config.n_positions
    if config.sliding_window_size > 0 or not 0 < context <= rows:
        raise _fail(
            f"context_window_size={context}, sliding_window_size={config.sliding_window_size}: "
            f"{model_type} learns {rows} position embeddings, so the context must be at most "
            f"{rows} positions and not a sliding window; set context_window_size <= {rows}")


@dataclass(frozen=True, kw_only=True)
class GPTBlockStyle:
    """How one learned-position architecture names and stores its weights."""

    prefix: str
    # Conv1D layers store (in_features, out_features); nn.Linear stores (out, in).
    conv1d: bool
    # How c_attn's rows become all q, all k, all v ("neox_qkv": per head [q_h, k_h, v_h]).
    qkv_combine: Combine = "identity"
    qkv_heads: int = 0


def _linear(style: GPTBlockStyle, name: str, out_features: int,
            in_features: int) -> ParamSource:
    if style.conv1d:
        return ParamSource(name, (out_features, in_features), (name,), "transpose", "linear")
    return linear_param(name, out_features, in_features)


def _layer_params(config: LearnedPositionConfig, style: GPTBlockStyle,
                  layer: int) -> list[ParamSource]:
    p = f"{style.prefix}h.{layer}."
    hidden, inter = config.hidden_size, config.intermediate_size
    qkv_rows = hidden + 2 * config.num_key_value_heads * config.head_dim
    c_attn = p + "attn.c_attn."
    if style.qkv_combine == "identity":
        qkv = [_linear(style, c_attn + "weight", qkv_rows, hidden),
               vector_param(c_attn + "bias", qkv_rows, "bias")]
    else:
        qkv = [ParamSource(c_attn + "weight", (qkv_rows, hidden), (c_attn + "weight",),
                           style.qkv_combine, "linear", heads=style.qkv_heads),
               ParamSource(c_attn + "bias", (qkv_rows,), (c_attn + "bias",), style.qkv_combine,
                           "bias", heads=style.qkv_heads)]
    return [
        vector_param(p + "ln_1.weight", hidden, "norm"),
        vector_param(p + "ln_1.bias", hidden, "norm"),
        *qkv,
        _linear(style, p + "attn.c_proj.weight", hidden, hidden),
        vector_param(p + "attn.c_proj.bias", hidden, "bias"),
        vector_param(p + "ln_2.weight", hidden, "norm"),
        vector_param(p + "ln_2.bias", hidden, "norm"),
        _linear(style, p + "mlp.c_fc.weight", inter, hidden),
        vector_param(p + "mlp.c_fc.bias", inter, "bias"),
        _linear(style, p + "mlp.c_proj.weight", hidden, inter),
        vector_param(p + "mlp.c_proj.bias", hidden, "bias"),
    ]


def gpt_block_weight_mapping(config: LearnedPositionConfig,
                             style: GPTBlockStyle) -> WeightMapping:
    """mlcc parameters in load order, named as the style's checkpoints name them."""
    vocab, hidden, pre = config.vocab_size, config.hidden_size, style.prefix
    params = [
        ParamSource(pre + "wte.weight", (vocab, hidden), (pre + "wte.weight",), "identity",
                    "embedding"),
        ParamSource(pre + "wpe.weight", (config.n_positions, hidden), (pre + "wpe.weight",),
                    "identity", "embedding"),
    ]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, style, layer)
    params += [vector_param(pre + "ln_f.weight", hidden, "norm"),
               vector_param(pre + "ln_f.bias", hidden, "norm")]
    # Older checkpoints store the causal-mask buffers; the cache rules replace them.
    unused = [pre.replace(".", r"\.") + r"h\.\d+\.attn\.(bias|masked_bias)"]
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    return WeightMapping(tuple(params), tuple(unused), hf_prefix=HF_PREFIX)


def _block(b: ir.FunctionBuilder, config: LearnedPositionConfig, w: dict[str, ir.Value],
           p: str, layer: int, x: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.layer_norm_eps
    h = b.layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
    qkv = b.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    attn = b.attention(b.reshape(q, (n, heads, d)), b.reshape(k, (n, kv_heads, d)),
                       b.reshape(v, (n, kv_heads, d)), cache, layer=layer,
                       scale=config.attention_scale(layer))
    x = x + b.linear(b.reshape(attn, (n, heads * d)), w[p + "attn.c_proj.weight"],
                     w[p + "attn.c_proj.bias"])
    h = b.layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
    up = b.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
    act = b.gelu(up, approximate=GELU_APPROXIMATION[config.activation_function])
    return x + b.linear(act, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])


def build_gpt_block_model(config: LearnedPositionConfig, style: GPTBlockStyle) -> ir.Module:
    """The IR: one function per entry of `entry_points` (prefill, decode, batch_decode when
    max_batch_size > 1), each returning logits."""
    pre = style.prefix
    head = pre + "wte.weight" if config.tie_word_embeddings else "lm_head.weight"

    def forward(b: ir.FunctionBuilder, w: dict[str, ir.Value], tokens: ir.Value, pos: ir.Value,
                cache: ir.Value, n: ir.Dim) -> ir.Value:
        x = b.embedding(w[pre + "wte.weight"], tokens) + b.embedding(w[pre + "wpe.weight"], pos)
        for layer in range(config.num_hidden_layers):
            x = _block(b, config, w, f"{pre}h.{layer}.", layer, x, cache, n)
        x = b.layer_norm(x, w[pre + "ln_f.weight"], w[pre + "ln_f.bias"], config.layer_norm_eps)
        return b.linear(x, w[head])

    return build_entries(config, gpt_block_weight_mapping(config, style), forward)


def gpt_block_architecture(name: str, config_cls: type[LearnedPositionConfig],
                          style: Callable[[Any], GPTBlockStyle]) -> Architecture:
    """The registry entry of an architecture of this family whose differences `style(config)`
    states."""
    return styled_architecture(name, config_cls, style, gpt_block_weight_mapping,
                               build_gpt_block_model)
