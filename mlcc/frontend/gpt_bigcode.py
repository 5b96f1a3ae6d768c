"""GPT-BigCode (HF model_type "gpt_bigcode"): config, HF weight mapping and IR builder.

Covers SantaCoder, StarCoder and other GPTBigCodeForCausalLM models: learned position
embeddings, LayerNorm with bias, biases on every linear layer, no rotary embedding, a GELU MLP,
lm_head tied to `wte`, and multi-query attention (one KV head) or, with multi_query=false,
multi-head attention; the block is the shared one of `gpt_block`.

Parameters are named as GPTBigCodeForCausalLM saves them (`transformer.h.0...`); checkpoints of
the bare GPTBigCodeModel (`h.0...`) load as well. `c_attn` is an nn.Linear. With multi-query its
rows are all q, then k, then v, our `qkv` layout as it is; without, they are per head
[q_h, k_h, v_h] and are regrouped ("neox_qkv").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.frontend.config import HFConfigReader, _fail
from mlcc.frontend.gpt_block import GPTBlockStyle, LearnedPositionConfig, gpt_block_architecture


@dataclass(frozen=True, kw_only=True)
class GPTBigCodeConfig(LearnedPositionConfig):
    """A GPT-BigCode decoder; num_key_value_heads is 1 with multi-query attention."""

    activation_function: str = "gelu_pytorch_tanh"

    model_type: ClassVar[str] = "gpt_bigcode"
    default_activation: ClassVar[str] = "gelu_pytorch_tanh"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        fields = super()._hf_fields(r)
        if r.bool("multi_query", True):
            fields["num_key_value_heads"] = 1
        return fields

    def validate(self) -> None:
        super().validate()
        if self.num_key_value_heads not in (1, self.num_attention_heads):
            raise _fail(f"num_key_value_heads={self.num_key_value_heads} must be 1 (multi-query) "
                        f"or num_attention_heads={self.num_attention_heads} for gpt_bigcode")

    @property
    def multi_query(self) -> bool:
        return self.num_key_value_heads == 1 and self.num_attention_heads > 1


def gpt_bigcode_style(config: GPTBigCodeConfig) -> GPTBlockStyle:
    """`transformer.` names (also found without), nn.Linear weights, c_attn regrouped per head
    unless multi-query."""
    if config.multi_query:
        return GPTBlockStyle(prefix="transformer.", conv1d=False)
    return GPTBlockStyle(prefix="transformer.", conv1d=False, qkv_combine="neox_qkv",
                         qkv_heads=config.num_attention_heads)


ARCHITECTURE = gpt_block_architecture("gpt_bigcode", GPTBigCodeConfig, gpt_bigcode_style)
