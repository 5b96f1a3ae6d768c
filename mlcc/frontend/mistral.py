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

from mlcc.frontend.architecture import Architecture
from mlcc.frontend.llama import LlamaConfig, build_llama, llama_weight_mapping


@dataclass(frozen=True, kw_only=True)
class MistralConfig(LlamaConfig):
    """Llama fields plus the sliding window (stored in the shared window fields)."""

    model_type: ClassVar[str] = "mistral"
    hf_sliding_window_key: ClassVar[str] = "sliding_window"
    hf_sliding_window_default: ClassVar[int] = 4096


ARCHITECTURE = Architecture(
    name="mistral",
    config_cls=MistralConfig,
    weight_mapping=llama_weight_mapping,
    build_module=build_llama,
)
