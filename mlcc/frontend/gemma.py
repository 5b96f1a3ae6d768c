"""Gemma (HF model_type "gemma"): config, HF weight mapping and IR builder.

Gemma 1 (2B, 7B): the embedding is multiplied by sqrt(hidden_size) rounded to the model dtype
(transformers keeps the constant as a tensor of that dtype), RMSNorms scale by (1 + weight),
the MLP is GeGLU with the tanh GELU, head_dim is stated in config.json (256, independent of
hidden_size / heads), the 2B model has one KV head (multi-query), and lm_head is the tied
embedding unless config.json unties it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from mlcc.frontend.config import HFConfigReader, _fail
from mlcc.frontend.decoder import DecoderStyle, decoder_architecture
from mlcc.frontend.llama import RmsNormDecoderConfig

# HF activation name -> our gelu's `approximate`. transformers reads Gemma's legacy "gelu" as
# the tanh form, which the released checkpoints were trained with; `hidden_activation` (older
# configs) is taken as written.
GELU_OF_HIDDEN_ACT = {"gelu": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
                      "gelu_fast": "tanh"}
GELU_OF_HIDDEN_ACTIVATION = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
                             "gelu_fast": "tanh"}


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(RmsNormDecoderConfig):
    """A Gemma 1 decoder; `gelu_approximate` is "tanh" (or "none", the exact erf form)."""

    gelu_approximate: str = "tanh"
    attention_bias: bool = False

    model_type: ClassVar[str] = "gemma"
    default_bos_token_id: ClassVar[int | None] = 2
    default_eos_token_id: ClassVar[int | None] = 1

    @classmethod
    def _hf_head_dim(cls, r: HFConfigReader) -> int:
        return r.int("head_dim", 256)  # independent of hidden_size / heads

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        r.check_unscaled_rope("gemma")
        return {**super()._hf_fields(r), "gelu_approximate": _gelu_approximate(r),
                "attention_bias": r.bool("attention_bias", False)}

    @classmethod
    def _hf_tokens(cls, r: HFConfigReader) -> dict:
        # Gemma ties lm_head to the embedding unless config.json says otherwise.
        return {**super()._hf_tokens(r), "tie_word_embeddings": r.bool("tie_word_embeddings", True)}

    def validate(self) -> None:
        if self.gelu_approximate not in ("tanh", "none"):
            raise _fail(f"gelu_approximate={self.gelu_approximate!r} must be 'tanh' or 'none'")
        super().validate()


def _gelu_approximate(r: HFConfigReader) -> str:
    if r.hf.get("hidden_activation") is not None:
        key, table = "hidden_activation", GELU_OF_HIDDEN_ACTIVATION
    else:
        key, table = "hidden_act", GELU_OF_HIDDEN_ACT
    name = r.str(key, "gelu_pytorch_tanh")
    if name not in table:
        raise _fail(f"config.json: {key}={name!r} is not supported for gemma; supported: "
                    f"{', '.join(table)}")
    return table[name]


def gemma_style(config: GemmaConfig) -> DecoderStyle:
    """Llama's decoder with (1 + w) RMSNorms, a GeGLU MLP and the embedding scaled by
    sqrt(hidden_size) in the model dtype."""
    return DecoderStyle(norm_eps=config.rms_norm_eps, norm_weight_offset=1.0,
                        rope_theta=config.rope_theta, rotary_dim=config.head_dim,
                        qkv_bias=config.attention_bias, o_bias=config.attention_bias,
                        mlp="geglu", gelu_approximate=config.gelu_approximate,
                        embed_scale=math.sqrt(config.hidden_size))


ARCHITECTURE = decoder_architecture("gemma", GemmaConfig, gemma_style)
