"""StableLM (HF model_type "stablelm"): config, HF weight mapping and IR builder.

Covers StableLM-3B-4E1T / StableLM Zephyr 3B and StableLM 2: LayerNorm with bias, rotary
embeddings on the first `partial_rotary_factor` of each head, GQA, optional q/k/v biases
(StableLM 2), SwiGLU MLP without biases, and the sequential residual or the parallel one
(x + attn(ln(x)) + mlp(ln(x)), one norm). Per-head q/k LayerNorms (qk_layernorm, StableLM 2
12B) are not supported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.decoder import DecoderStyle, decoder_architecture


@dataclass(frozen=True, kw_only=True)
class PartialRotaryConfig(ModelConfig):
    """A LayerNorm decoder that rotates the first `partial_rotary_factor` of each head (StableLM,
    Phi); head_dim is hidden_size / num_attention_heads, and q/k LayerNorms are refused."""

    intermediate_size: int
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        sizes = r.decoder_sizes()
        if r.bool("qk_layernorm", False):
            raise _fail(f"config.json: qk_layernorm=true (LayerNorms on q and k) is not supported "
                        f"for {cls.model_type}; only models without it are")
        r.check_unscaled_rope(cls.model_type)
        factor = r.float("partial_rotary_factor", None)
        if factor is None:
            default = {f.name: f.default for f in dataclasses.fields(cls)}["partial_rotary_factor"]
            factor = float(r.rope_parameters().get("partial_rotary_factor", default))
        return {**sizes, "layer_norm_eps": r.float("layer_norm_eps", 1e-5),
                "rope_theta": r.rope_theta(), "partial_rotary_factor": factor}

    def validate(self) -> None:
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _fail(f"head_dim={self.head_dim} x num_attention_heads="
                        f"{self.num_attention_heads} must equal hidden_size={self.hidden_size}")
        factor, rotary_dim = self.partial_rotary_factor, self.rotary_dim
        if not 0.0 < factor <= 1.0:
            raise _fail(f"partial_rotary_factor={factor} must be in (0, 1]; fix config.json")
        if rotary_dim < 2 or rotary_dim % 2:
            raise _fail(f"partial_rotary_factor={factor} of head_dim={self.head_dim} gives "
                        f"rotary_dim={rotary_dim} for {self.model_type}; it must be even and at "
                        "least 2")
        self._require_positive("intermediate_size", "layer_norm_eps", "rope_theta")

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that are rotated (HF truncates the product)."""
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True, kw_only=True)
class StableLmConfig(PartialRotaryConfig):
    """A StableLM decoder."""

    use_qkv_bias: bool = False
    use_parallel_residual: bool = False
    hidden_act: str = "silu"

    model_type: ClassVar[str] = "stablelm"
    default_bos_token_id: ClassVar[int | None] = 0
    default_eos_token_id: ClassVar[int | None] = 0

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        return {**super()._hf_fields(r), "use_qkv_bias": r.bool("use_qkv_bias", False),
                "use_parallel_residual": r.bool("use_parallel_residual", False),
                "hidden_act": r.str("hidden_act", "silu")}

    def validate(self) -> None:
        self._require_supported("hidden_act", ("silu",))
        super().validate()


def stablelm_style(config: StableLmConfig) -> DecoderStyle:
    """LayerNorms, partial rotary, optional q/k/v biases, SwiGLU, and with the parallel residual
    x + attn(ln(x)) + mlp(ln(x)) summed in transformers' order."""
    return DecoderStyle(norm="layer", norm_eps=config.layer_norm_eps,
                        rope_theta=config.rope_theta, rotary_dim=config.rotary_dim,
                        qkv_bias=config.use_qkv_bias,
                        parallel_sum=("x", "attn", "mlp") if config.use_parallel_residual else ())


ARCHITECTURE = decoder_architecture("stablelm", StableLmConfig, stablelm_style)
