"""GPT-BigCode (HF model_type "gpt_bigcode"): config, HF weight mapping and IR builder.

Covers SantaCoder, StarCoder and other GPTBigCodeForCausalLM models: learned position
embeddings (`wpe`, read at the positions of the KV cache), LayerNorm with bias, biases on every
linear layer, no rotary embedding, a GELU MLP, lm_head tied to `wte`, and multi-query attention
(one KV head) or, with multi_query=false, multi-head attention.

`c_attn` is an nn.Linear. With multi-query its rows are all q, then k, then v, our `qkv` layout
as it is; without, they are per head [q_h, k_h, v_h] and are regrouped ("neox_qkv").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mlcc import ir
from mlcc.frontend.architecture import (
    Architecture,
    ParamSource,
    WeightMapping,
    linear_param,
    vector_param,
)
from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.entries import entry_points, module_attrs
from mlcc.frontend.gpt_neox import GELU_APPROXIMATION
from mlcc.frontend.llama import kv_cache_type


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
class GPTBigCodeConfig(ModelConfig):
    """A GPT-BigCode decoder; num_key_value_heads is 1 with multi-query attention."""

    intermediate_size: int
    n_positions: int
    layer_norm_eps: float = 1e-5
    activation_function: str = "gelu_pytorch_tanh"
    scale_attn_weights: bool = True

    model_type: ClassVar[str] = "gpt_bigcode"
    default_bos_token_id: ClassVar[int | None] = 50256
    default_eos_token_id: ClassVar[int | None] = 50256

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
            "num_key_value_heads": 1 if r.bool("multi_query", True) else heads,
            "head_dim": hidden // heads,
            "intermediate_size": inner if inner is not None else 4 * hidden,
            "n_positions": first_int(r, "n_positions", "max_position_embeddings"),
            "layer_norm_eps": r.float("layer_norm_epsilon", 1e-5),
            "activation_function": r.str("activation_function", "gelu_pytorch_tanh"),
            "scale_attn_weights": r.bool("scale_attn_weights", True),
        }

    @classmethod
    def _hf_tokens(cls, r: HFConfigReader) -> dict:
        # transformers ties lm_head to wte unless config.json says otherwise.
        return {**super()._hf_tokens(r), "tie_word_embeddings": r.bool("tie_word_embeddings", True)}

    def validate(self) -> None:
        if self.activation_function not in GELU_APPROXIMATION:
            raise _fail(f"activation_function={self.activation_function!r} is not supported for "
                        f"gpt_bigcode; supported: {', '.join(GELU_APPROXIMATION)}")
        if self.num_key_value_heads not in (1, self.num_attention_heads):
            raise _fail(f"num_key_value_heads={self.num_key_value_heads} must be 1 (multi-query) "
                        f"or num_attention_heads={self.num_attention_heads} for gpt_bigcode")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _fail(f"head_dim={self.head_dim} x num_attention_heads="
                        f"{self.num_attention_heads} must equal hidden_size={self.hidden_size}")
        if self.intermediate_size <= 0 or not self.layer_norm_eps > 0:
            raise _fail(f"intermediate_size={self.intermediate_size} and layer_norm_eps="
                        f"{self.layer_norm_eps} must be positive")
        check_learned_positions(self.model_type, self)

    @property
    def multi_query(self) -> bool:
        return self.num_key_value_heads == 1 and self.num_attention_heads > 1


def _layer_params(config: GPTBigCodeConfig, layer: int) -> list[ParamSource]:
    p = f"transformer.h.{layer}."
    hidden, inter = config.hidden_size, config.intermediate_size
    qkv_rows = hidden + 2 * config.num_key_value_heads * config.head_dim
    combine, heads = ("identity", 0) if config.multi_query else (
        "neox_qkv", config.num_attention_heads)
    c_attn = p + "attn.c_attn."
    return [
        vector_param(p + "ln_1.weight", hidden, "norm"),
        vector_param(p + "ln_1.bias", hidden, "norm"),
        ParamSource(c_attn + "weight", (qkv_rows, hidden), (c_attn + "weight",), combine,
                    "linear", heads=heads),
        ParamSource(c_attn + "bias", (qkv_rows,), (c_attn + "bias",), combine, "bias",
                    heads=heads),
        linear_param(p + "attn.c_proj.weight", hidden, hidden),
        vector_param(p + "attn.c_proj.bias", hidden, "bias"),
        vector_param(p + "ln_2.weight", hidden, "norm"),
        vector_param(p + "ln_2.bias", hidden, "norm"),
        linear_param(p + "mlp.c_fc.weight", inter, hidden),
        vector_param(p + "mlp.c_fc.bias", inter, "bias"),
        linear_param(p + "mlp.c_proj.weight", hidden, inter),
        vector_param(p + "mlp.c_proj.bias", hidden, "bias"),
    ]


def gpt_bigcode_weight_mapping(config: GPTBigCodeConfig) -> WeightMapping:
    """mlcc parameters of a GPT-BigCode model in load order, from HF `GPTBigCodeForCausalLM`
    names."""
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [
        ParamSource("transformer.wte.weight", (vocab, hidden), ("transformer.wte.weight",),
                    "identity", "embedding"),
        ParamSource("transformer.wpe.weight", (config.n_positions, hidden),
                    ("transformer.wpe.weight",), "identity", "embedding"),
    ]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params += [vector_param("transformer.ln_f.weight", hidden, "norm"),
               vector_param("transformer.ln_f.bias", hidden, "norm")]
    # Older checkpoints store the causal-mask buffers; the cache rules replace them.
    unused = [r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"]
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")
    else:
        params.append(linear_param("lm_head.weight", vocab, hidden))
    return WeightMapping(tuple(params), tuple(unused))


def _layer(b: ir.FunctionBuilder, config: GPTBigCodeConfig, w: dict[str, ir.Value], layer: int,
           x: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"transformer.h.{layer}."
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.layer_norm_eps
    h = b.layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
    qkv = b.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
    q, k, v = b.split(qkv, [heads * d, kv_heads * d, kv_heads * d])
    scale = None if config.scale_attn_weights else 1.0
    attn = b.attention(b.reshape(q, (n, heads, d)), b.reshape(k, (n, kv_heads, d)),
                       b.reshape(v, (n, kv_heads, d)), cache, layer=layer, scale=scale)
    x = x + b.linear(b.reshape(attn, (n, heads * d)), w[p + "attn.c_proj.weight"],
                     w[p + "attn.c_proj.bias"])
    h = b.layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
    up = b.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
    act = b.gelu(up, approximate=GELU_APPROXIMATION[config.activation_function])
    return x + b.linear(act, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])


def build_gpt_bigcode(config: GPTBigCodeConfig) -> ir.Module:
    """The IR of a GPT-BigCode model: one function per entry of `entry_points` (prefill,
    decode, batch_decode when max_batch_size > 1), each returning logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in gpt_bigcode_weight_mapping(config).params}
    head = w["transformer.wte.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            x = b.embedding(w["transformer.wte.weight"], tokens)
            x = x + b.embedding(w["transformer.wpe.weight"], pos)
            for layer in range(config.num_hidden_layers):
                x = _layer(b, config, w, layer, x, cache, n)
            x = b.layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"],
                             config.layer_norm_eps)
            b.output(b.logits(b.linear(x, head)))
    return mb.finish()


ARCHITECTURE = Architecture(
    name="gpt_bigcode",
    config_cls=GPTBigCodeConfig,
    weight_mapping=gpt_bigcode_weight_mapping,
    build_module=build_gpt_bigcode,
)
