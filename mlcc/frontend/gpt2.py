"""GPT-2 (HF model_type "gpt2"): config, HF weight mapping and IR builder.

Learned position embeddings (`wpe`, read at the positions of the KV cache), pre-LayerNorm
blocks with biases everywhere, multi-head attention without rotary embedding, a tanh GELU MLP
and lm_head tied to `wte`; the block is the shared one of `gpt_block`.

GPT-2's linear layers are Conv1D modules that store their weight as (in_features,
out_features); the mapping transposes them into our (out, in) layout, c_attn's rows then being
all q, all k, all v. Parameters are named as the published checkpoints name their tensors
(openai-community/gpt2 and its larger siblings: `h.0.attn.c_attn.weight`, `wte.weight`);
checkpoints saved by GPT2LMHeadModel, which write `transformer.h.0...`, load as well. Their
`h.N.attn.bias` causal-mask buffers are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.frontend.config import HFConfigReader, _fail
from mlcc.frontend.gpt_block import GPTBlockStyle, LearnedPositionConfig, gpt_block_architecture


@dataclass(frozen=True, kw_only=True)
class GPT2Config(LearnedPositionConfig):
    """A GPT-2 decoder (num_key_value_heads always equals num_attention_heads)."""

    scale_attn_by_inverse_layer_idx: bool = False

    model_type: ClassVar[str] = "gpt2"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        if r.bool("add_cross_attention", False):
            raise _fail("config.json: add_cross_attention=true (an encoder-decoder GPT-2) is not "
                        "supported; only the decoder-only language model is")
        return {**super()._hf_fields(r), "scale_attn_by_inverse_layer_idx":
                r.bool("scale_attn_by_inverse_layer_idx", False)}

    def validate(self) -> None:
        super().validate()
        if self.num_key_value_heads != self.num_attention_heads:
            raise _fail(f"gpt2 needs num_key_value_heads={self.num_key_value_heads} == "
                        f"num_attention_heads={self.num_attention_heads}")

    def attention_scale(self, layer: int) -> float | None:
        """The attention score scale of a layer (None: 1/sqrt(head_dim))."""
        if not self.scale_attn_by_inverse_layer_idx:
            return super().attention_scale(layer)
        base = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
        return base / (layer + 1)


def gpt2_style(config: GPT2Config) -> GPTBlockStyle:
    """Unprefixed names (also found with GPT2LMHeadModel's `transformer.`), Conv1D weights."""
    return GPTBlockStyle(prefix="", conv1d=True)


ARCHITECTURE = gpt_block_architecture("gpt2", GPT2Config, gpt2_style)
