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

from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.decoder import DecoderStyle, decoder_architecture
from mlcc.frontend.gpt_neox import GELU_APPROXIMATION
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


def phi_style(config: PhiConfig) -> DecoderStyle:
    """LayerNorms, partial rotary, biases everywhere, a GELU fc1/fc2 MLP, the parallel residual
    summed as transformers does (attn + mlp + x), `self_attn.dense`, `final_layernorm` and
    lm_head's bias."""
    return DecoderStyle(norm="layer", norm_eps=config.layer_norm_eps,
                        rope_theta=config.rope_theta, rotary_dim=config.rotary_dim,
                        qkv_bias=True, o_bias=True, o_proj="dense", mlp="gelu", mlp_bias=True,
                        gelu_approximate=GELU_APPROXIMATION[config.hidden_act],
                        parallel_sum=("attn", "mlp", "x"), final_norm="model.final_layernorm",
                        lm_head_bias=True)


ARCHITECTURE = decoder_architecture("phi", PhiConfig, phi_style)
