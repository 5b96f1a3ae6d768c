"""GPT-2 (HF model_type "gpt2"): config, HF weight mapping and IR builder.

Learned position embeddings (`wpe`, read at the positions of the KV cache), pre-LayerNorm
blocks with biases everywhere, multi-head attention without rotary embedding, a tanh GELU MLP
and lm_head tied to `wte`.

GPT-2's linear layers are Conv1D modules that store their weight as (in_features,
out_features); the mapping transposes them into our (out, in) layout, c_attn's rows then being
all q, all k, all v. Tensor names are those of the published checkpoints (openai-community/gpt2
and its larger siblings: `h.0.attn.c_attn.weight`, `wte.weight`, no `transformer.` prefix);
their `h.N.attn.bias` causal-mask buffers are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc import ir
from mlcc.frontend.architecture import Architecture, ParamSource, WeightMapping, vector_param
from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.entries import entry_points, module_attrs
from mlcc.frontend.gpt_bigcode import check_learned_positions, first_int
from mlcc.frontend.gpt_neox import GELU_APPROXIMATION
from mlcc.frontend.llama import kv_cache_type


@dataclass(frozen=True, kw_only=True)
class GPT2Config(ModelConfig):
    """A GPT-2 decoder (num_key_value_heads always equals num_attention_heads)."""

    intermediate_size: int
    n_positions: int
    layer_norm_eps: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    model_type: ClassVar[str] = "gpt2"
    default_bos_token_id: ClassVar[int | None] = 50256
    default_eos_token_id: ClassVar[int | None] = 50256

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = first_int(r, "n_embd", "hidden_size")
        heads = first_int(r, "n_head", "num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(f"config.json: n_head={heads} does not divide n_embd={hidden}; fix n_head")
        if r.bool("add_cross_attention", False):
            raise _fail("config.json: add_cross_attention=true (an encoder-decoder GPT-2) is not "
                        "supported; only the decoder-only language model is")
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
            "activation_function": r.str("activation_function", "gelu_new"),
            "scale_attn_weights": r.bool("scale_attn_weights", True),
            "scale_attn_by_inverse_layer_idx": r.bool("scale_attn_by_inverse_layer_idx", False),
        }

    @classmethod
    def _hf_tokens(cls, r: HFConfigReader) -> dict:
        # transformers ties lm_head to wte unless config.json says otherwise.
        return {**super()._hf_tokens(r), "tie_word_embeddings": r.bool("tie_word_embeddings", True)}

    def validate(self) -> None:
        if self.activation_function not in GELU_APPROXIMATION:
            raise _fail(f"activation_function={self.activation_function!r} is not supported for "
                        f"gpt2; supported: {', '.join(GELU_APPROXIMATION)}")
        if self.num_key_value_heads != self.num_attention_heads or (
                self.head_dim * self.num_attention_heads != self.hidden_size):
            raise _fail(f"gpt2 needs num_key_value_heads={self.num_key_value_heads} == "
                        f"num_attention_heads={self.num_attention_heads} and head_dim="
                        f"{self.head_dim} x heads == hidden_size={self.hidden_size}")
        if self.intermediate_size <= 0 or not self.layer_norm_eps > 0:
            raise _fail(f"intermediate_size={self.intermediate_size} and layer_norm_eps="
                        f"{self.layer_norm_eps} must be positive")
        check_learned_positions(self.model_type, self)

    def attention_scale(self, layer: int) -> float | None:
        """The attention score scale of a layer (None: 1/sqrt(head_dim))."""
        if not self.scale_attn_by_inverse_layer_idx:
            return None if self.scale_attn_weights else 1.0
        base = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
        return base / (layer + 1)


def conv1d_param(name: str, out_features: int, in_features: int) -> ParamSource:
    """A Conv1D weight: stored (in, out) in HF, used as (out, in)."""
    return ParamSource(name, (out_features, in_features), (name,), "transpose", "linear")


def _layer_params(config: GPT2Config, layer: int) -> list[ParamSource]:
    p = f"h.{layer}."
    hidden, inter = config.hidden_size, config.intermediate_size
    return [
        vector_param(p + "ln_1.weight", hidden, "norm"),
        vector_param(p + "ln_1.bias", hidden, "norm"),
        conv1d_param(p + "attn.c_attn.weight", 3 * hidden, hidden),
        vector_param(p + "attn.c_attn.bias", 3 * hidden, "bias"),
        conv1d_param(p + "attn.c_proj.weight", hidden, hidden),
        vector_param(p + "attn.c_proj.bias", hidden, "bias"),
        vector_param(p + "ln_2.weight", hidden, "norm"),
        vector_param(p + "ln_2.bias", hidden, "norm"),
        conv1d_param(p + "mlp.c_fc.weight", inter, hidden),
        vector_param(p + "mlp.c_fc.bias", inter, "bias"),
        conv1d_param(p + "mlp.c_proj.weight", hidden, inter),
        vector_param(p + "mlp.c_proj.bias", hidden, "bias"),
    ]


def gpt2_weight_mapping(config: GPT2Config) -> WeightMapping:
    """mlcc parameters of a GPT-2 model in load order, from the published checkpoints' names."""
    vocab, hidden = config.vocab_size, config.hidden_size
    params = [
        ParamSource("wte.weight", (vocab, hidden), ("wte.weight",), "identity", "embedding"),
        ParamSource("wpe.weight", (config.n_positions, hidden), ("wpe.weight",), "identity",
                    "embedding"),
    ]
    for layer in range(config.num_hidden_layers):
        params += _layer_params(config, layer)
    params += [vector_param("ln_f.weight", hidden, "norm"),
               vector_param("ln_f.bias", hidden, "norm")]
    unused = [r"h\.\d+\.attn\.(bias|masked_bias)"]
    if config.tie_word_embeddings:
        unused.append(r"lm_head\.weight")
    else:
        params.append(ParamSource("lm_head.weight", (vocab, hidden), ("lm_head.weight",),
                                  "identity", "linear"))
    return WeightMapping(tuple(params), tuple(unused))


def _layer(b: ir.FunctionBuilder, config: GPT2Config, w: dict[str, ir.Value], layer: int,
           x: ir.Value, cache: ir.Value, n: ir.Dim) -> ir.Value:
    p = f"h.{layer}."
    heads, d, eps = config.num_attention_heads, config.head_dim, config.layer_norm_eps
    h = b.layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
    qkv = b.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
    q, k, v = (b.reshape(t, (n, heads, d)) for t in b.split(qkv, [heads * d] * 3))
    attn = b.attention(q, k, v, cache, layer=layer, scale=config.attention_scale(layer))
    x = x + b.linear(b.reshape(attn, (n, heads * d)), w[p + "attn.c_proj.weight"],
                     w[p + "attn.c_proj.bias"])
    h = b.layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
    up = b.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
    act = b.gelu(up, approximate=GELU_APPROXIMATION[config.activation_function])
    return x + b.linear(act, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])


def build_gpt2(config: GPT2Config) -> ir.Module:
    """The IR of a GPT-2 model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind)
         for p in gpt2_weight_mapping(config).params}
    head = w["wte.weight" if config.tie_word_embeddings else "lm_head.weight"]
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            x = b.embedding(w["wte.weight"], tokens) + b.embedding(w["wpe.weight"], pos)
            for layer in range(config.num_hidden_layers):
                x = _layer(b, config, w, layer, x, cache, n)
            x = b.layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], config.layer_norm_eps)
            b.output(b.logits(b.linear(x, head)))
    return mb.finish()


ARCHITECTURE = Architecture(
    name="gpt2",
    config_cls=GPT2Config,
    weight_mapping=gpt2_weight_mapping,
    build_module=build_gpt2,
)
