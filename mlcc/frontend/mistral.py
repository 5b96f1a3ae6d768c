"""Mistral (HF model_type "mistral"): a Llama decoder with a sliding attention window.

The window comes from config.json's `sliding_window` (null means none; a missing key means
4096, as transformers assumes). A token attends to itself and the previous window - 1 tokens,
exactly as transformers' Mistral. Attention sinks (the first `attention_sink_size` tokens stay
visible) are off by default, so results equal transformers'; they are enabled by an override
or by an MLC-style `attention_sink_size` in config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlcc.frontend.decoder import decoder_architecture
from mlcc.frontend.llama import LlamaConfig, llama_style


@dataclass(frozen=True, kw_only=True)
class MistralConfig(LlamaConfig):
    """Llama fields plus the sliding window (stored in the shared window fields)."""

    model_type: ClassVar[str] = "mistral"
    hf_sliding_window_key: ClassVar[str] = "sliding_window"
    hf_sliding_window_default: ClassVar[int] = 4096


ARCHITECTURE = decoder_architecture("mistral", MistralConfig, llama_style)
