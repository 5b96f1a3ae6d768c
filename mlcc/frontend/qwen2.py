"""Qwen2 (HF model_type "qwen2"): config, HF weight mapping and IR builder.

A Llama-shaped decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP) whose q, k and v
projections carry a bias while o_proj does not; the embedding is tied or not.

transformers gives Qwen2 a sliding window only on the layers at index >= max_window_layers and
only when use_sliding_window is true. Our KV cache has one window for every layer, so a config
where every layer slides gets that window, one where none does gets none, and a mix is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc import ir
from mlcc.frontend.architecture import Architecture, WeightMapping
from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.decoder import DecoderStyle, build_decoder, decoder_weight_mapping


@dataclass(frozen=True, kw_only=True)
class Qwen2Config(ModelConfig):
    """A Qwen2 decoder: RMSNorm, rotary GQA attention with q/k/v biases, SwiGLU MLP."""

    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    model_type: ClassVar[str] = "qwen2"
    default_bos_token_id: ClassVar[int | None] = None
    default_eos_token_id: ClassVar[int | None] = None

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(f"config.json: num_attention_heads={heads} does not divide "
                        f"hidden_size={hidden}; fix num_attention_heads or state head_dim")
        rope_theta = r.float("rope_theta", None)
        if rope_theta is None:
            rope_theta = float(r.rope_parameters().get("rope_theta", 10000.0))
        _check_rope_unscaled(r)
        return {
            "vocab_size": r.int("vocab_size"),
            "hidden_size": hidden,
            "num_hidden_layers": r.int("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": r.opt_int("num_key_value_heads") or heads,
            "head_dim": r.opt_int("head_dim") or hidden // heads,
            "intermediate_size": r.int("intermediate_size"),
            "rms_norm_eps": r.float("rms_norm_eps", 1e-6),
            "rope_theta": rope_theta,
            "hidden_act": r.str("hidden_act", "silu"),
        }

    @classmethod
    def _hf_windows(cls, r: HFConfigReader) -> dict:
        fields = super()._hf_windows(r)
        window = _sliding_window_of_all_layers(r)
        if window > 0 and not r.has("sliding_window_size"):
            fields.update(context_window_size=-1, sliding_window_size=window,
                          prefill_chunk_size=r.int("prefill_chunk_size", min(window, 2048)))
        return fields

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise _fail(f"hidden_act={self.hidden_act!r} is not supported for qwen2; "
                        "supported: silu")
        if self.intermediate_size <= 0 or not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise _fail(f"intermediate_size={self.intermediate_size}, rms_norm_eps="
                        f"{self.rms_norm_eps} and rope_theta={self.rope_theta} must be positive")
        if self.head_dim % 2:
            raise _fail(f"head_dim={self.head_dim} must be even for rotary embeddings")


def _check_rope_unscaled(r: HFConfigReader) -> None:
    rope = r.hf.get("rope_scaling") or r.rope_parameters()
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    if kind not in (None, "default"):
        raise _fail(f"config.json: rope scaling {kind!r} is not supported for qwen2; only "
                    "unscaled rotary embeddings are")


def _sliding_window_of_all_layers(r: HFConfigReader) -> int:
    """The window when every layer slides, -1 when none does; a mix is refused."""
    layers = r.int("num_hidden_layers")
    window = r.opt_int("sliding_window")
    if not r.bool("use_sliding_window", False) or not window:
        return -1  # transformers drops the window unless use_sliding_window is set
    types = r.hf.get("layer_types")
    if isinstance(types, list) and types:
        sliding = [t == "sliding_attention" for t in types]
    else:
        first = r.int("max_window_layers", layers)
        sliding = [i >= first for i in range(layers)]
    if not any(sliding):
        return -1
    if not all(sliding):
        raise _fail(
            f"config.json: only some of the {layers} layers use a sliding window "
            f"(use_sliding_window / max_window_layers / layer_types); mlcc supports one window "
            "for all layers or none: set use_sliding_window=false")
    return window


def qwen2_style(config: Qwen2Config) -> DecoderStyle:
    """Llama's decoder with biases on q, k and v (not on o_proj)."""
    return DecoderStyle(norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                        rotary_dim=config.head_dim, qkv_bias=True)


def qwen2_weight_mapping(config: Qwen2Config) -> WeightMapping:
    """mlcc parameters of a Qwen2 model in load order, from HF `Qwen2ForCausalLM` names."""
    return decoder_weight_mapping(config, qwen2_style(config))


def build_qwen2(config: Qwen2Config) -> ir.Module:
    """The IR of a Qwen2 model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    return build_decoder(config, qwen2_style(config))


ARCHITECTURE = Architecture(
    name="qwen2",
    config_cls=Qwen2Config,
    weight_mapping=qwen2_weight_mapping,
    build_module=build_qwen2,
)
