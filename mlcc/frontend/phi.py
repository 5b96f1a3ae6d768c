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

from mlcc.frontend.config import HFConfigReader
from mlcc.frontend.decoder import DecoderStyle, decoder_architecture
from mlcc.frontend.gpt_neox import GELU_APPROXIMATION
from mlcc.frontend.stablelm import PartialRotaryConfig


@dataclass(frozen=True, kw_only=True)
class PhiConfig(PartialRotaryConfig):
    """A Phi decoder with the parallel residual."""

    partial_rotary_factor: float = 0.5
    hidden_act: str = "gelu_new"

    model_type: ClassVar[str] = "phi"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        return {**super()._hf_fields(r), "hidden_act": r.str("hidden_act", "gelu_new")}

    def validate(self) -> None:
        self._require_supported("hidden_act", GELU_APPROXIMATION)
        super().validate()


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
