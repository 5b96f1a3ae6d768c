"""StableLM: the real config, the preset's parameter count, and parity with transformers.

The tiny models keep StableLM Zephyr 3B's structure: LayerNorms with bias, rotary embeddings on
a quarter of each head whose rotated part is no power of two (real: 20 of 80, tiny: 6 of 24),
untied embeddings, SwiGLU; plus StableLM 2's variant with q/k/v biases and GQA, and the
parallel residual.
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
TINY = {"vocab_size": 97, "hidden_size": 72, "num_hidden_layers": 2, "num_attention_heads": 3,
        "num_key_value_heads": 3, "intermediate_size": 60, "max_position_embeddings": 64,
        "partial_rotary_factor": 0.25}
CASES = {
    "zephyr_3b_shape": {},
    "qkv_bias_gqa": {"use_qkv_bias": True, "num_attention_heads": 6, "num_key_value_heads": 2,
                     "partial_rotary_factor": 0.5},
    "parallel_residual_tied": {"use_parallel_residual": True, "tie_word_embeddings": True},
}
STABLELM_ZEPHYR_3B = 2_795_443_200  # published parameter count


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_stablelm_matches_transformers(tmp_path: Path, case: str) -> None:
    config = transformers.StableLmConfig(**{**TINY, **CASES[case]})
    model = randomize(transformers.StableLmForCausalLM(config), seed=sum(map(ord, case)))
    assert_reference_matches_transformers(model, save_tiny(model, tmp_path))


def test_partial_rotary_dim_matters(tmp_path: Path) -> None:
    """The tiny model's rotary part (6 of 24 dims) is what makes it agree."""
    from arch_parity import hf_logits, token_ids

    from mlcc.runtime_check.reference import ReferenceModel

    model = randomize(transformers.StableLmForCausalLM(transformers.StableLmConfig(**TINY)), 3)
    save_tiny(model, tmp_path)
    ours = ReferenceModel(tmp_path)
    assert ours.config.rotary_dim == 6
    ids = token_ids(TINY["vocab_size"], 12)
    expected = hf_logits(model, ids)[-1]
    assert abs(ours.prefill_logits(ids) - expected).max() < 1e-4
    config = tmp_path / "config.json"
    hf = json.loads(config.read_text())
    hf["rope_parameters"]["partial_rotary_factor"] = 1.0
    config.write_text(json.dumps(hf))
    assert abs(ReferenceModel(tmp_path).prefill_logits(ids) - expected).max() > 1e-2


def test_preset_parameter_count_equals_published() -> None:
    source = resolve_model("stablelm_zephyr_3b")
    mapping = source.arch.weight_mapping(source.config)
    assert sum(math.prod(p.shape) for p in mapping.params) == STABLELM_ZEPHYR_3B
    assert source.config.rotary_dim == 20 and source.config.context_window_size == 4096
    names = {p.name for p in mapping.params}
    assert {"model.norm.bias", "lm_head.weight", "model.layers.31.input_layernorm.bias"} <= names
    assert "model.layers.0.self_attn.qkv_proj.bias" not in names


def _zephyr(**changes) -> dict:
    path = SHARED / "configs" / "stabilityai--stablelm-zephyr-3b" / "config.json"
    return {**json.loads(path.read_text()), **changes}


@pytest.mark.parametrize(("change", "message"), [
    ({"qk_layernorm": True}, r"qk_layernorm=true .* is not supported for stablelm"),
    ({"partial_rotary_factor": 0.0625}, r"head_dim=80 gives rotary_dim=5 .* must be even"),
    ({"partial_rotary_factor": 0.0}, r"partial_rotary_factor=0.0 must be in \(0, 1\]"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported for stablelm"),
])
def test_bad_configs_name_the_value(change: dict, message: str) -> None:
    arch = resolve_model("stablelm_zephyr_3b").arch
    with pytest.raises(MlccError, match=message):
        arch.config_cls.from_hf(_zephyr(**change))
