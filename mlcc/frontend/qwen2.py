"""Qwen2 (HF model_type "qwen2"): config, HF weight mapping and IR builder.

A Llama-shaped decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP) whose q, k and v
projections carry a bias while o_proj does not; the embedding is tied or not.

transformers gives Qwen2 a sliding window only when use_sliding_window is true, and then only on
the layers at index >= max_window_layers (or those that `layer_types` marks
"sliding_attention"). Our KV cache has one window for every layer: a config where every layer
slides gets that window, one where none does gets none. Where only some layers slide, a token
attends to itself and the window - 1 before it on those layers and to every earlier token on the
others; while the context window is at most the sliding window the two rules see the same
positions, so such a model runs exactly with no window, its context bounded by the window
(`layer_sliding_window` keeps that bound through overrides). A longer context is refused:
per-layer windows would need a window per attention call and a cache that keeps the full
context for some layers while masking others, which the KV layout does not express. An
MLC-style `sliding_window_size` in config.json sets the window of every layer as stated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.errors import MlccError
from mlcc.frontend.config import HFConfigReader, _fail
from mlcc.frontend.decoder import DecoderStyle, decoder_architecture
from mlcc.frontend.llama import SUPPORTED_ACTIVATIONS, RmsNormDecoderConfig


@dataclass(frozen=True, kw_only=True)
class Qwen2Config(RmsNormDecoderConfig):
    """A Qwen2 decoder: RMSNorm, rotary GQA attention with q/k/v biases, SwiGLU MLP."""

    hidden_act: str = "silu"
    # The window transformers applies to some layers only (-1: none); the context must fit in it.
    layer_sliding_window: int = -1

    model_type: ClassVar[str] = "qwen2"
    default_bos_token_id: ClassVar[int | None] = None
    default_eos_token_id: ClassVar[int | None] = None

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        r.check_unscaled_rope("qwen2")
        return {**super()._hf_fields(r), "hidden_act": r.str("hidden_act", "silu")}

    @classmethod
    def _hf_windows(cls, r: HFConfigReader) -> dict:
        fields = super()._hf_windows(r)
        window, sliding = _sliding_layers(r)
        layers = r.int("num_hidden_layers")
        if not sliding or r.has("sliding_window_size"):
            return fields  # an MLC-style sliding_window_size states the cache's window itself
        if len(sliding) == layers:
            fields.update(context_window_size=-1, sliding_window_size=window,
                          prefill_chunk_size=r.int("prefill_chunk_size", min(window, 2048)))
            return fields
        if not 0 < fields["context_window_size"] <= window:
            raise _partial_window_error(window, fields["context_window_size"], -1,
                                        f"layers {_ranges(sliding)} of {layers}")
        return {**fields, "layer_sliding_window": window}

    def validate(self) -> None:
        self._require_supported("hidden_act", SUPPORTED_ACTIVATIONS)
        super().validate()
        window, context = self.layer_sliding_window, self.context_window_size
        if window > 0 and not (0 < context <= window and self.sliding_window_size == -1):
            raise _partial_window_error(window, context, self.sliding_window_size,
                                        f"some of the {self.num_hidden_layers} layers")


def _sliding_layers(r: HFConfigReader) -> tuple[int, list[int]]:
    """(window, indices of the layers transformers gives it); no layers unless
    use_sliding_window is set, as transformers drops the window otherwise."""
    layers = r.int("num_hidden_layers")
    window = r.opt_int("sliding_window")
    if not r.bool("use_sliding_window", False) or not window:
        return -1, []
    types = r.hf.get("layer_types")
    if isinstance(types, list) and types:
        return window, [i for i, t in enumerate(types) if t == "sliding_attention"]
    first = r.int("max_window_layers", layers)
    return window, list(range(first, layers))


def _ranges(indices: list[int]) -> str:
    """Indices as runs: [0, 1, 2, 3, 8, 10, 11] -> "0-3, 8, 10-11"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _partial_window_error(window: int, context: int, sliding: int, which: str) -> MlccError:
    got = f"context_window_size={context}" + (
        f" with sliding_window_size={sliding}" if sliding > 0 else "")
    return _fail(
        f"config.json: use_sliding_window=true gives {which} a sliding window of {window} "
        f"(max_window_layers / layer_types) and the other layers the full context; mlcc's KV "
        f"cache applies one window to every layer, so such a model runs exactly only with no "
        f"window and a context of at most {window}, got {got}: add \"context_window_size\": "
        f"{window} (or less) to config.json, or set use_sliding_window=false to attend the full "
        f"context on every layer (which differs from transformers past {window} tokens)")


def qwen2_style(config: Qwen2Config) -> DecoderStyle:
    """Llama's decoder with biases on q, k and v (not on o_proj)."""
    return DecoderStyle(norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                        rotary_dim=config.head_dim, qkv_bias=True)


ARCHITECTURE = decoder_architecture("qwen2", Qwen2Config, qwen2_style)
