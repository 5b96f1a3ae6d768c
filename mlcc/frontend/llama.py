"""Llama (HF model_type "llama"): config, HF weight mapping and IR builder.

Covers Llama 1/2/3, Code Llama and TinyLlama: grouped-query attention, tied or untied
embeddings, rope_theta and rope scaling ("linear", "llama3"), head_dim from config.json or
hidden_size / num_attention_heads, optional attention and MLP biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc import ir
from mlcc.frontend.architecture import Architecture, WeightMapping
from mlcc.frontend.config import HFConfigReader, ModelConfig, RopeScaling
from mlcc.frontend.decoder import DecoderStyle, build_decoder, decoder_weight_mapping
from mlcc.frontend.entries import kv_cache_type

# kv_cache_type stays importable from here for the architectures written against llama.py.
__all__ = ["ARCHITECTURE", "HEAD_DIM_FIX", "SUPPORTED_ACTIVATIONS", "LlamaConfig",
           "RmsNormDecoderConfig", "build_llama", "kv_cache_type", "llama_style",
           "llama_weight_mapping"]

SUPPORTED_ACTIVATIONS = ("silu",)
HEAD_DIM_FIX = "fix num_attention_heads or state head_dim in config.json"


@dataclass(frozen=True, kw_only=True)
class RmsNormDecoderConfig(ModelConfig):
    """Fields and checks of the RMSNorm decoders (llama, mistral, qwen2, gemma): the shared
    sizes, the norm epsilon and the rotary base; head_dim is read by `_hf_head_dim`."""

    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @classmethod
    def _hf_head_dim(cls, r: HFConfigReader) -> int | None:
        """config.json's head_dim; None (absent or 0): hidden_size / num_attention_heads."""
        return r.opt_int("head_dim") or None

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        return {**r.decoder_sizes(cls._hf_head_dim(r), fix=HEAD_DIM_FIX),
                "rms_norm_eps": r.float("rms_norm_eps", 1e-6), "rope_theta": r.rope_theta()}

    def validate(self) -> None:
        self._require_positive("intermediate_size", "rms_norm_eps", "rope_theta")
        self._require_even_head_dim()


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(RmsNormDecoderConfig):
    """A Llama decoder: RMSNorm, rotary attention with GQA, SwiGLU MLP."""

    rope_scaling: RopeScaling | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False

    model_type: ClassVar[str] = "llama"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        rope = r.rope_parameters()
        scaling = r.hf.get("rope_scaling") if r.has("rope_scaling") else (rope or None)
        return {
            **super()._hf_fields(r),
            "rope_scaling": RopeScaling.from_hf(scaling),
            "hidden_act": r.str("hidden_act", "silu"),
            "attention_bias": r.bool("attention_bias", False),
            "mlp_bias": r.bool("mlp_bias", False),
        }

    def validate(self) -> None:
        self._require_supported("hidden_act", SUPPORTED_ACTIVATIONS)
        super().validate()


def llama_style(config: LlamaConfig) -> DecoderStyle:
    """Llama's decoder: RMSNorm, full-head rotary with optional scaling, SwiGLU, optional
    attention and MLP biases."""
    return DecoderStyle(norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                        rotary_dim=config.head_dim, rope_scaling=config.rope_scaling,
                        qkv_bias=config.attention_bias, o_bias=config.attention_bias,
                        mlp_bias=config.mlp_bias)


def llama_weight_mapping(config: LlamaConfig) -> WeightMapping:
    """mlcc parameters of a Llama model in load order, from HF `LlamaForCausalLM` names."""
    return decoder_weight_mapping(config, llama_style(config))


def build_llama(config: LlamaConfig) -> ir.Module:
    """The IR of a Llama model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits.

    Mistral has the same decoder (`llama_style`): its sliding window and sinks live in the KV
    cache type.
    """
    return build_decoder(config, llama_style(config))


ARCHITECTURE = Architecture(
    name="llama",
    config_cls=LlamaConfig,
    weight_mapping=llama_weight_mapping,
    build_module=build_llama,
)
