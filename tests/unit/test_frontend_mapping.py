"""Weight mappings of the presets: parameter counts equal the published model sizes, fused shapes,
tied embeddings, and the HF tensors ignored on purpose."""

from __future__ import annotations

import math

import pytest

from mlcc.frontend import ParamSource, resolve_model

# Parameter counts published for these models (Pythia-2.8B's non-embedding count for
# RedPajama-3B, which shares its shape; RedPajama's embeddings have 50432 rows).
PUBLISHED = {
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "codellama_7b": 6_738_546_688,
    "tinyllama_1b_chat_v1.0": 1_100_048_384,
    "llama3_1_8b": 8_030_261_248,
    "mistral_7b": 7_241_732_096,
}
PYTHIA_2_8B_NON_EMBEDDING = 2_517_652_480


def mapping_of(preset: str):
    source = resolve_model(preset)
    return source.config, source.arch.weight_mapping(source.config)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_counts_equal_published_sizes(preset: str) -> None:
    _, mapping = mapping_of(preset)
    assert sum(math.prod(p.shape) for p in mapping.params) == PUBLISHED[preset]
    for p in mapping.params:
        # What the fused parameter holds is exactly what its HF parts hold.
        assert sum(math.prod(s) for s in p.hf_shapes) == math.prod(p.shape), p.name


def test_redpajama_non_embedding_count_equals_pythia() -> None:
    _, mapping = mapping_of("redpajama_3b_v1")
    embeddings = {"gpt_neox.embed_in.weight", "embed_out.weight"}
    body = sum(math.prod(p.shape) for p in mapping.params if p.name not in embeddings)
    assert body == PYTHIA_2_8B_NON_EMBEDDING
    qkv = mapping.param("gpt_neox.layers.0.attention.query_key_value.weight")
    assert (qkv.combine, qkv.heads, qkv.shape) == ("neox_qkv", 32, (7680, 2560))
    assert mapping.is_unused("gpt_neox.layers.3.attention.masked_bias")
    assert mapping.is_unused("gpt_neox.layers.3.attention.bias")
    assert mapping.is_unused("gpt_neox.layers.3.attention.rotary_emb.inv_freq")
    assert not mapping.is_unused("gpt_neox.layers.3.attention.dense.bias")


def test_llama2_70b_fuses_gqa_qkv_and_gate_up() -> None:
    _, mapping = mapping_of("llama2_70b")
    qkv = mapping.param("model.layers.79.self_attn.qkv_proj.weight")
    assert qkv.shape == (64 * 128 + 2 * 8 * 128, 8192) and qkv.combine == "concat0"
    assert qkv.hf_names == tuple(f"model.layers.79.self_attn.{x}_proj.weight" for x in "qkv")
    assert qkv.hf_shapes == ((8192, 8192), (1024, 8192), (1024, 8192))
    gate_up = mapping.param("model.layers.0.mlp.gate_up_proj.weight")
    assert gate_up.shape == (2 * 28672, 8192) and gate_up.kind == "linear"
    assert [p.name for p in mapping.params][:2] == ["model.embed_tokens.weight",
                                                   "model.layers.0.input_layernorm.weight"]
    assert mapping.params[-1].name == "lm_head.weight"
    assert mapping.is_unused("model.layers.5.self_attn.rotary_emb.inv_freq")
    assert not mapping.is_unused("lm_head.weight")


def test_tied_embeddings_have_no_lm_head() -> None:
    config, _ = mapping_of("llama2_7b")
    tied = config.with_overrides(tie_word_embeddings=True)
    mapping = resolve_model("llama2_7b").arch.weight_mapping(tied)
    assert "lm_head.weight" not in {p.name for p in mapping.params}
    assert mapping.is_unused("lm_head.weight")


def test_param_kinds_drive_quantization() -> None:
    _, mapping = mapping_of("mistral_7b")
    kinds = {p.name: p.kind for p in mapping.params}
    assert kinds["model.embed_tokens.weight"] == "embedding"
    assert kinds["lm_head.weight"] == "linear"
    assert kinds["model.norm.weight"] == "norm"
    assert kinds["model.layers.0.mlp.down_proj.weight"] == "linear"


def test_param_source_rules() -> None:
    p = ParamSource("w", (4, 2), ("w",), "identity", "linear")
    assert p.hf_shapes == ((4, 2),)
    with pytest.raises(ValueError, match="takes exactly one HF tensor"):
        ParamSource("w", (4, 2), ("a", "b"), "identity", "linear")
    with pytest.raises(ValueError, match="needs the head count"):
        ParamSource("w", (6, 2), ("w",), "neox_qkv", "linear")
    with pytest.raises(ValueError, match="hf_names and hf_shapes"):
        ParamSource("w", (4, 2), ("a", "b"), "concat0", "linear")
