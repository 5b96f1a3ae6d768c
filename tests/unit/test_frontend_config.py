"""Model configs: presets, the real configs in ../shared/configs, JSON round trips, overrides,
rope scaling against transformers, and the errors that bad configs give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlcc.errors import MlccError
from mlcc.frontend import (
    ARCHITECTURES,
    get_architecture,
    get_preset,
    preset_names,
    resolve_model,
    rope_inv_freq,
)
from mlcc.frontend.config import RopeScaling
from mlcc.frontend.presets import PRESETS

SHARED = Path(__file__).parents[2].parent / "shared"
CONFIGS = SHARED / "configs"

# Facts of each supported shared config: (model_type, hidden, layers, heads, kv_heads, head_dim,
# vocab, context_window_size, sliding_window_size).
SHARED_FACTS = {
    "meta-llama--Llama-2-7b-chat-hf": ("llama", 4096, 32, 32, 32, 128, 32000, 4096, -1),
    "meta-llama--Llama-2-13b-hf": ("llama", 5120, 40, 40, 40, 128, 32000, 2048, -1),
    "meta-llama--Llama-2-70b-hf": ("llama", 8192, 80, 64, 8, 128, 32000, 2048, -1),
    "meta-llama--Llama-3.1-8B": ("llama", 4096, 32, 32, 8, 128, 128256, 131072, -1),
    "codellama--CodeLlama-7b-hf": ("llama", 4096, 32, 32, 32, 128, 32016, 2048, -1),
    "TinyLlama--TinyLlama-1.1B-Chat-v1.0": ("llama", 2048, 22, 32, 4, 64, 32000, 2048, -1),
    "mistralai--Mistral-7B-v0.1": ("mistral", 4096, 32, 32, 8, 128, 32000, -1, 4096),
    "togethercomputer--RedPajama-INCITE-Chat-3B-v1":
        ("gpt_neox", 2560, 32, 32, 32, 80, 50432, 2048, -1),
    "Qwen--Qwen2-0.5B": ("qwen2", 896, 24, 14, 2, 64, 151936, 32768, -1),
    "Qwen--Qwen2-1.5B": ("qwen2", 1536, 28, 12, 2, 128, 151936, 32768, -1),
    "google--gemma-2b": ("gemma", 2048, 18, 8, 1, 256, 256000, 8192, -1),
    "microsoft--phi-2": ("phi", 2560, 32, 32, 32, 80, 51200, 2048, -1),
    "stabilityai--stablelm-zephyr-3b": ("stablelm", 2560, 32, 32, 32, 80, 50304, 4096, -1),
    "openai-community--gpt2": ("gpt2", 768, 12, 12, 12, 64, 50257, 1024, -1),
    "bigcode--gpt_bigcode-santacoder": ("gpt_bigcode", 2048, 24, 16, 1, 128, 49280, 2048, -1),
    "mistralai--Mixtral-8x7B-v0.1": ("mixtral", 4096, 32, 32, 8, 128, 32000, 32768, -1),
}


def shared_config(folder: str) -> dict:
    return json.loads((CONFIGS / folder / "config.json").read_text())


def test_every_shared_config_of_our_architectures_is_covered() -> None:
    ours = {
        d.name for d in CONFIGS.iterdir()
        if (d / "config.json").is_file() and shared_config(d.name)["model_type"] in ARCHITECTURES
    }
    assert ours == set(SHARED_FACTS)


@pytest.mark.parametrize("folder", sorted(SHARED_FACTS))
def test_shared_configs_resolve_to_the_published_shapes(folder: str) -> None:
    model_type, hidden, layers, heads, kv, head_dim, vocab, context, sliding = SHARED_FACTS[folder]
    src = resolve_model(CONFIGS / folder / "config.json")
    c = src.config
    assert src.arch.name == model_type and src.hf_dir == CONFIGS / folder
    got = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
           c.head_dim, c.vocab_size, c.context_window_size, c.sliding_window_size)
    assert got == (hidden, layers, heads, kv, head_dim, vocab, context, sliding)
    assert c.prefill_chunk_size <= 2048
    # Folder and file name the same model.
    assert resolve_model(CONFIGS / folder).config == c


def test_llama_specifics() -> None:
    llama2_70b = resolve_model("llama2_70b").config
    assert (llama2_70b.num_key_value_heads, llama2_70b.tie_word_embeddings) == (8, False)
    codellama = resolve_model("codellama_7b").config
    assert codellama.rope_theta == 1_000_000.0 and codellama.vocab_size == 32016
    # MLC-style explicit context window wins over max_position_embeddings (16384).
    assert codellama.context_window_size == 2048
    llama3 = resolve_model("llama3_1_8b").config
    assert llama3.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert llama3.eos_token_id == (128001, 128008, 128009) and llama3.rope_theta == 500000.0
    stories = resolve_model(SHARED / "models" / "stories260K")
    assert stories.config.tie_word_embeddings and stories.config.head_dim == 8
    assert stories.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "use_cache": True}


def test_mistral_window_and_sinks() -> None:
    hf = {**shared_config("mistralai--Mistral-7B-v0.1")}
    for key in ("sliding_window_size", "prefill_chunk_size", "attention_sink_size"):
        hf.pop(key)
    cls = get_architecture("mistral").config_cls
    plain = cls.from_hf({**hf, "sliding_window": 4096})
    assert (plain.sliding_window_size, plain.context_window_size) == (4096, -1)
    assert plain.attention_sink_size == 0 and plain.prefill_chunk_size == 2048
    # A missing key means transformers' default window of 4096; null means no window.
    assert cls.from_hf(hf).sliding_window_size == 4096
    none = cls.from_hf({**hf, "sliding_window": None})
    assert (none.sliding_window_size, none.context_window_size) == (-1, 32768)
    # A window alone bounds the cache, so the trained length is not needed.
    no_length = {k: v for k, v in hf.items() if k != "max_position_embeddings"}
    assert cls.from_hf({**no_length, "sliding_window": 4096}).context_window_size == -1
    sinks = plain.with_overrides(attention_sink_size=4)
    assert sinks.attention_sink_size == 4 and sinks.sliding_window_size == 4096
    # The preset carries MLC's explicit settings.
    preset = resolve_model("mistral_7b").config
    assert (preset.sliding_window_size, preset.attention_sink_size) == (4096, 4)
    assert preset.prefill_chunk_size == 128


def test_gpt_neox_specifics() -> None:
    c = resolve_model("redpajama_3b_v1").config
    assert (c.rotary_pct, c.rotary_emb_base, c.use_parallel_residual) == (1.0, 10000.0, False)
    assert (c.layer_norm_eps, c.attention_bias, c.bos_token_id, c.eos_token_id) == (
        1e-5, True, 0, 0)
    pythia_like = get_architecture("gpt_neox").config_cls.from_hf(
        {**get_preset("redpajama_3b_v1"), "rotary_pct": 0.4})
    assert pythia_like.rotary_pct == 0.4 and pythia_like.rotary_dim == 32


def test_transformers5_style_configs() -> None:
    """transformers 5 writes rope settings into `rope_parameters`; both spellings read alike."""
    transformers = pytest.importorskip("transformers")
    neox = transformers.GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        vocab_size=100, rotary_pct=0.5, rotary_emb_base=500.0, use_parallel_residual=False)
    c = resolve_model_dict(neox.to_dict())
    assert (c.rotary_pct, c.rotary_emb_base, c.rotary_dim) == (0.5, 500.0, 8)
    llama = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        vocab_size=100, rope_theta=123.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})
    c = resolve_model_dict(llama.to_dict())
    assert c.rope_theta == 123.0 and c.rope_scaling == RopeScaling("linear", 2.0)


def resolve_model_dict(hf: dict):
    return get_architecture(hf["model_type"]).config_cls.from_hf(hf)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_equal_the_shared_configs_and_round_trip(name: str) -> None:
    repo, hf = PRESETS[name]
    # `_name_or_path` records where the config was saved from; presets may leave it out.
    shared = {k: v for k, v in shared_config(repo.replace("/", "--")).items()
              if k != "_name_or_path" or k in hf}
    assert hf == shared
    config = resolve_model(name).config
    assert resolve_model(name).preset == name and resolve_model(name).hf_dir is None
    as_json = config.to_json()
    assert json.loads(json.dumps(as_json)) == as_json
    assert type(config).from_json(json.loads(json.dumps(as_json))) == config


def test_preset_names_include_the_required_ones() -> None:
    required = {"llama2_7b", "llama2_13b", "llama2_70b", "codellama_7b",
                "tinyllama_1b_chat_v1.0", "mistral_7b", "redpajama_3b_v1"}
    assert required <= set(preset_names())


def test_to_json_has_every_contract_field() -> None:
    fields = resolve_model("llama2_7b").config.to_json()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "context_window_size", "sliding_window_size",
                "attention_sink_size", "prefill_chunk_size", "tensor_parallel_shards",
                "max_batch_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id"):
        assert key in fields


def test_overrides_are_validated_and_adjust_windows() -> None:
    c = resolve_model("llama2_7b").config
    small = c.with_overrides(context_window_size=512)
    assert (small.context_window_size, small.prefill_chunk_size) == (512, 512)
    windowed = c.with_overrides(sliding_window_size=1024)
    assert (windowed.context_window_size, windowed.prefill_chunk_size) == (-1, 1024)
    assert c.with_overrides(tensor_parallel_shards=4).tensor_parallel_shards == 4
    with pytest.raises(MlccError, match=r"tensor_parallel_shards=3 must divide"):
        c.with_overrides(tensor_parallel_shards=3)
    # a key/value head may be shared by a whole group of ranks (MQA/GQA with many shards)
    assert resolve_model("gemma_2b").config.with_overrides(
        tensor_parallel_shards=2).tensor_parallel_shards == 2
    mistral = resolve_model("mistral_7b").config  # 32 query heads, 8 key/value heads
    assert mistral.with_overrides(tensor_parallel_shards=16).tensor_parallel_shards == 16
    with pytest.raises(MlccError, match=r"tensor_parallel_shards=12 must divide "
                       r"num_attention_heads=32 and divide or be a multiple of "
                       r"num_key_value_heads=8"):
        mistral.with_overrides(tensor_parallel_shards=12)
    with pytest.raises(MlccError, match=r"unknown fields \['context_window'\]"):
        c.with_overrides(context_window=10)
    with pytest.raises(MlccError, match=r"attention_sink_size=4 needs a sliding window"):
        c.with_overrides(attention_sink_size=4)
    with pytest.raises(MlccError, match=r"prefill_chunk_size=True \(bool\) must be of type int"):
        c.with_overrides(prefill_chunk_size=True)


LLAMA_BASE = {
    "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 96,
    "max_position_embeddings": 128,
}


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, r"'hidden_size' must be an integer, got None"),
    ({"num_attention_heads": "8"}, r"'num_attention_heads' must be an integer, got '8' \(str\)"),
    ({"num_attention_heads": 12}, r"num_attention_heads=12 does not divide hidden_size=64"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3 must divide num_attention_heads=8"),
    ({"rms_norm_eps": "tiny"}, r"'rms_norm_eps' must be a number"),
    ({"tie_word_embeddings": 1}, r"'tie_word_embeddings' must be true or false, got 1"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported for llama; supported: silu"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"rope_scaling.rope_type='yarn' is not supported"),
    ({"max_position_embeddings": 0}, r"context_window_size=0 must be positive"),
    ({"eos_token_id": [2, "x"]}, r"'eos_token_id' must be a token id or a non-empty list"),
])
def test_bad_llama_configs_name_the_key_and_value(change: dict, message: str) -> None:
    hf = {**LLAMA_BASE, **change}
    with pytest.raises(MlccError, match=message) as info:
        resolve_model_dict(hf)
    assert info.value.stage == "config" and "\n" not in str(info.value)


def test_missing_keys_are_named(tmp_path: Path) -> None:
    hf = dict(LLAMA_BASE)
    del hf["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(MlccError, match=r"^\[config\] config.json: missing required key "
                                        r"'intermediate_size'"):
        resolve_model(tmp_path)
    del hf["max_position_embeddings"]
    hf["intermediate_size"] = 96
    with pytest.raises(MlccError, match=r"none of max_position_embeddings, max_sequence_length, "
                                        r"n_positions is set"):
        resolve_model_dict(hf)
    # Other spellings of the trained context length.
    assert resolve_model_dict({**hf, "n_positions": 77}).context_window_size == 77
    assert resolve_model_dict({**hf, "max_sequence_length": 99}).context_window_size == 99


def test_gpt_neox_bad_configs() -> None:
    base = get_preset("redpajama_3b_v1")
    with pytest.raises(MlccError, match=r"num_attention_heads=48 does not divide hidden_size"):
        resolve_model_dict({**base, "num_attention_heads": 48})
    with pytest.raises(MlccError, match=r"rotary_pct=0.0 must be in \(0, 1\]"):
        resolve_model_dict({**base, "rotary_pct": 0.0})
    with pytest.raises(MlccError, match=r"hidden_act='relu' is not supported for gpt_neox"):
        resolve_model_dict({**base, "hidden_act": "relu"})


def test_unknown_model_types_and_sources(tmp_path: Path) -> None:
    unknown = tmp_path / "bloom"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({**LLAMA_BASE, "model_type": "bloom"}))
    with pytest.raises(MlccError, match=r"model_type 'bloom' is not supported; known: gemma, "
                                        r"gpt2, gpt_bigcode, gpt_neox, llama, mistral, mixtral"):
        resolve_model(unknown)
    with pytest.raises(MlccError, match=r"no such folder or file, and not a preset; known "
                                        r"presets: codellama_7b"):
        resolve_model("llama9_1t")
    with pytest.raises(MlccError, match=r"no config.json in this folder"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MlccError, match=r"config.json is not valid JSON"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_BASE, "model_type": None}))
    with pytest.raises(MlccError, match=r"no usable 'model_type'.*pass --model-type"):
        resolve_model(tmp_path)
    # An explicit --model-type reads a config whose own model_type is missing or different.
    assert resolve_model(tmp_path, model_type="mistral").arch.name == "mistral"


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_inv_freq_matches_transformers(scaling: dict | None) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_theta=500000.0,
                                  rope_scaling=scaling, max_position_embeddings=131072)
    if scaling is None:
        expected = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    else:
        inv, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
        expected = inv.double().numpy()
    got = rope_inv_freq(128, 500000.0, RopeScaling.from_hf(scaling))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
