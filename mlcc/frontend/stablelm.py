"""StableLM (HF model_type "stablelm"): config, HF weight mapping and IR builder.

Covers StableLM-3B-4E1T / StableLM Zephyr 3B and StableLM 2: LayerNorm with bias, rotary
embeddings on the first `partial_rotary_factor` of each head, GQA, optional q/k/v biases
(StableLM 2), SwiGLU MLP without biases, and the sequential residual or the parallel one
(x + attn(ln(x)) + mlp(ln(x)), one norm). Per-head q/k LayerNorms (qk_layernorm, StableLM 2
12B) are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.frontend.config import HFConfigReader, ModelConfig, _fail
from mlcc.frontend.decoder import DecoderStyle, decoder_architecture


def rope_fields(r: HFConfigReader, model_type: str, default_factor: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from top-level keys or transformers 5's
    `rope_parameters`; scaled rotary embeddings are refused."""
    rope = r.rope_parameters()
    theta = r.float("rope_theta", None)
    theta = float(rope.get("rope_theta", 10000.0)) if theta is None else theta
    factor = r.float("partial_rotary_factor", None)
    if factor is None:
        factor = float(rope.get("partial_rotary_factor", default_factor))
    scaling = r.hf.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind != "default":
        raise _fail(f"config.json: rope scaling {kind!r} is not supported for {model_type}; "
                    "only unscaled rotary embeddings are")
    return theta, factor


def check_rotary(model_type: str, factor: float, head_dim: int, rotary_dim: int) -> None:
    if not 0.0 < factor <= 1.0:
        raise _fail(f"partial_rotary_factor={factor} must be in (0, 1]; fix config.json")
    if rotary_dim < 2 or rotary_dim % 2:
        raise _fail(f"partial_rotary_factor={factor} of head_dim={head_dim} gives rotary_dim="
                    f"{rotary_dim} for {model_type}; it must be even and at least 2")


@dataclass(frozen=True, kw_only=True)
class StableLmConfig(ModelConfig):
    """A StableLM decoder."""

    intermediate_size: int
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    use_qkv_bias: bool = False
    use_parallel_residual: bool = False
    hidden_act: str = "silu"

    model_type: ClassVar[str] = "stablelm"
    default_bos_token_id: ClassVar[int | None] = 0
    default_eos_token_id: ClassVar[int | None] = 0

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        if heads <= 0 or hidden % heads:
            raise _fail(f"config.json: num_attention_heads={heads} does not divide "
                        f"hidden_size={hidden}; fix num_attention_heads")
        if r.bool("qk_layernorm", False):
            raise _fail("config.json: qk_layernorm=true (per-head q/k LayerNorms) is not "
                        "supported for stablelm; only models without it are")
        theta, factor = rope_fields(r, "stablelm", 0.25)
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
            "use_qkv_bias": r.bool("use_qkv_bias", False),
            "use_parallel_residual": r.bool("use_parallel_residual", False),
            "hidden_act": r.str("hidden_act", "silu"),
        }

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise _fail(f"hidden_act={self.hidden_act!r} is not supported for stablelm; "
                        "supported: silu")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise _fail(f"head_dim={self.head_dim} x num_attention_heads="
                        f"{self.num_attention_heads} must equal hidden_size={self.hidden_size}")
        check_rotary("stablelm", self.partial_rotary_factor, self.head_dim, self.rotary_dim)
        if self.intermediate_size <= 0 or not self.layer_norm_eps > 0 or not self.rope_theta > 0:
            raise _fail(f"intermediate_size={self.intermediate_size}, layer_norm_eps="
                        f"{self.layer_norm_eps} and rope_theta={self.rope_theta} must be positive")

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that are rotated (HF truncates the product)."""
        return int(self.head_dim * self.partial_rotary_factor)


def stablelm_style(config: StableLmConfig) -> DecoderStyle:
    """LayerNorms, partial rotary, optional q/k/v biases, SwiGLU, and with the parallel residual
    x + attn(ln(x)) + mlp(ln(x)) summed in transformers' order."""
    return DecoderStyle(norm="layer", norm_eps=config.layer_norm_eps,
                        rope_theta=config.rope_theta, rotary_dim=config.rotary_dim,
                        qkv_bias=config.use_qkv_bias,
                        parallel_sum=("x", "attn", "mlp") if config.use_parallel_residual else ())


ARCHITECTURE = decoder_architecture("stablelm", StableLmConfig, stablelm_style)
