"""Qwen2: the real configs, the presets' parameter counts, and parity with transformers.

The tiny models keep Qwen2-0.5B's structure at small, odd sizes: 7 query heads sharing one KV
head (the real model has 14 sharing 2: groups of 7), q/k/v biases without an o_proj bias, an
intermediate size that is no multiple of 32, tied and untied embeddings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from arch_parity import assert_reference_matches_transformers, randomize, save_tiny

from mlcc.errors import MlccError
from mlcc.frontend import resolve_model

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).parents[2].parent / "shared"
TINY = {"vocab_size": 131, "hidden_size": 56, "num_hidden_layers": 2, "num_attention_heads": 7,
        "num_key_value_heads": 1, "intermediate_size": 72, "max_position_embeddings": 64,
        "rope_theta": 1000000.0}
# Published parameter counts (Qwen2 technical report / model cards).
PUBLISHED = {"qwen2_0_5b": 494_032_768, "qwen2_1_5b": 1_543_714_304}


CASES = {
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    # every layer slides (max_window_layers=0); the 17 tokens exceed the window of 8
    "window_8": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_qwen2_matches_transformers(tmp_path: Path, case: str) -> None:
    config = transformers.Qwen2Config(**TINY, **CASES[case])
    model = randomize(transformers.Qwen2ForCausalLM(config), seed=sum(map(ord, case)))
    assert_reference_matches_transformers(model, save_tiny(model, tmp_path))
    window = resolve_model(tmp_path).config.sliding_window_size
    assert window == CASES[case].get("sliding_window", -1)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_counts_equal_published(preset: str) -> None:
    source = resolve_model(preset)
    mapping = source.arch.weight_mapping(source.config)
    assert sum(math.prod(p.shape) for p in mapping.params) == PUBLISHED[preset]
    names = {p.name for p in mapping.params}
    assert "lm_head.weight" not in names and mapping.is_unused("lm_head.weight")
    assert "model.layers.0.self_attn.qkv_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_real_config_reads_as_published() -> None:
    config = resolve_model(SHARED / "configs" / "Qwen--Qwen2-0.5B").config
    got = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
           config.head_dim, config.rope_theta, config.tie_word_embeddings,
           config.context_window_size, config.sliding_window_size, config.eos_token_id)
    assert got == (896, 14, 2, 64, 1e6, True, 32768, -1, 151645)
    qkv = resolve_model("qwen2_0_5b").arch.weight_mapping(config).param(
        "model.layers.23.self_attn.qkv_proj.weight")
    assert qkv.shape == ((14 + 2 * 2) * 64, 896) and qkv.kind == "linear"


def _qwen2(**changes) -> dict:
    hf = json.loads((SHARED / "configs" / "Qwen--Qwen2-0.5B" / "config.json").read_text())
    return {**hf, **changes}


def test_sliding_window_on_every_layer_or_none() -> None:
    arch = resolve_model("qwen2_0_5b").arch
    everywhere = arch.config_cls.from_hf(_qwen2(use_sliding_window=True, max_window_layers=0,
                                                sliding_window=512))
    assert (everywhere.sliding_window_size, everywhere.context_window_size) == (512, -1)
    nowhere = arch.config_cls.from_hf(_qwen2(use_sliding_window=True, max_window_layers=24))
    assert nowhere.sliding_window_size == -1
    # transformers 5 writes layer_types; the window still needs use_sliding_window.
    types = {"layer_types": ["sliding_attention"] * 24, "sliding_window": 256}
    assert arch.config_cls.from_hf(_qwen2(**types)).sliding_window_size == -1
    assert arch.config_cls.from_hf(_qwen2(**types, use_sliding_window=True)) \
        .sliding_window_size == 256


def test_window_on_some_layers_runs_while_the_context_fits_in_it() -> None:
    arch = resolve_model("qwen2_0_5b").arch
    # The published config: window 32768 on layers 12-23 would equal the 32768-token context.
    some = arch.config_cls.from_hf(_qwen2(use_sliding_window=True, max_window_layers=12))
    got = (some.sliding_window_size, some.context_window_size, some.layer_sliding_window)
    assert got == (-1, 32768, 32768)
    assert arch.config_cls.from_json(some.to_json()) == some
    assert some.with_overrides(context_window_size=4096).context_window_size == 4096
    with pytest.raises(MlccError, match=r"some of the 24 layers a sliding window of 32768 .* "
                                        r"at most 32768, got context_window_size=65536:"):
        some.with_overrides(context_window_size=65536)
    with pytest.raises(MlccError, match=r"at most 32768, got context_window_size=-1 with "
                                        r"sliding_window_size=1024:"):
        some.with_overrides(sliding_window_size=1024)
    with pytest.raises(MlccError, match=r"gives layers 12-23 of 24 a sliding window of 512 .* "
                                        r"at most 512, got context_window_size=32768: "
                                        r"add \"context_window_size\": 512 \(or less\)"):
        arch.config_cls.from_hf(_qwen2(use_sliding_window=True, max_window_layers=12,
                                       sliding_window=512))
    types = ["full_attention", "sliding_attention"] * 12
    with pytest.raises(MlccError, match=r"gives layers 1, 3, 5, .*, 23 of 24 a sliding window"):
        arch.config_cls.from_hf(_qwen2(use_sliding_window=True, layer_types=types,
                                       sliding_window=512))
    fits = arch.config_cls.from_hf(_qwen2(use_sliding_window=True, layer_types=types,
                                          sliding_window=512, context_window_size=512))
    assert (fits.context_window_size, fits.layer_sliding_window) == (512, 512)
    # An MLC-style sliding_window_size states the cache's window for every layer itself.
    stated = arch.config_cls.from_hf(_qwen2(use_sliding_window=True, layer_types=types,
                                            sliding_window=512, sliding_window_size=1024))
    assert (stated.sliding_window_size, stated.layer_sliding_window) == (1024, -1)


def test_tiny_qwen2_window_on_some_layers_matches_transformers(tmp_path: Path) -> None:
    # Layer 1 slides with a window of 17, layer 0 does not; the 17 tokens of the schedule fill
    # the 17-token context, so the last one still sees the first on both layers.
    sizes = {**TINY, "max_position_embeddings": 17}
    config = transformers.Qwen2Config(**sizes, use_sliding_window=True, sliding_window=17,
                                      max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    model = randomize(transformers.Qwen2ForCausalLM(config), seed=23)
    assert_reference_matches_transformers(model, save_tiny(model, tmp_path))
    ours = resolve_model(tmp_path).config
    assert (ours.sliding_window_size, ours.context_window_size) == (-1, 17)


def test_bad_configs_name_the_value() -> None:
    arch = resolve_model("qwen2_0_5b").arch
    with pytest.raises(MlccError, match=r"hidden_act='gelu' is not supported for qwen2"):
        arch.config_cls.from_hf(_qwen2(hidden_act="gelu"))
    with pytest.raises(MlccError, match=r"rope scaling 'yarn' is not supported"):
        arch.config_cls.from_hf(_qwen2(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
