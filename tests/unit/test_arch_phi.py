"""Phi: the real Phi-2 config, the preset's parameter count, and parity with transformers.

The tiny models keep Phi-2's structure: parallel attention and MLP from one LayerNorm, biases
everywhere (lm_head included), rotary embeddings on 40% of each head (real: 32 of 80, tiny: 8
of 20), tanh GELU, untied embeddings; plus a tied variant whose lm_head keeps its own bias.
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
TINY = {"vocab_size": 101, "hidden_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 72, "max_position_embeddings": 64, "partial_rotary_factor": 0.4,
        "hidden_act": "gelu_new"}
CASES = {
    "phi_2_shape": {},
    "tied_exact_gelu_gqa": {"tie_word_embeddings": True, "hidden_act": "gelu",
                            "num_key_value_heads": 2},
}
PHI_2 = 2_779_683_840  # published parameter count


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_phi_matches_transformers(tmp_path: Path, case: str) -> None:
    config = transformers.PhiConfig(**{**TINY, **CASES[case]})
    model = randomize(transformers.PhiForCausalLM(config), seed=sum(map(ord, case)))
    path = save_tiny(model, tmp_path)
    assert_reference_matches_transformers(model, path)
    if CASES[case].get("tie_word_embeddings"):
        mapping = resolve_model(path).arch.weight_mapping(resolve_model(path).config)
        assert "lm_head.weight" not in {p.name for p in mapping.params}
        assert mapping.param("lm_head.bias").shape == (TINY["vocab_size"],)


def test_preset_reads_phi_2() -> None:
    source = resolve_model("phi_2")
    config, mapping = source.config, source.arch.weight_mapping(source.config)
    assert sum(math.prod(p.shape) for p in mapping.params) == PHI_2
    assert (config.head_dim, config.rotary_dim, config.context_window_size) == (80, 32, 2048)
    assert (config.bos_token_id, config.eos_token_id) == (50256, 50256)
    assert resolve_model(SHARED / "configs" / "microsoft--phi-2").config == config
    assert mapping.params[-1].name == "lm_head.bias"
    assert mapping.param("model.layers.0.self_attn.qkv_proj.bias").shape == (3 * 2560,)


def _phi2(**changes) -> dict:
    path = SHARED / "configs" / "microsoft--phi-2" / "config.json"
    return {**json.loads(path.read_text()), **changes}


@pytest.mark.parametrize(("change", "message"), [
    ({"qk_layernorm": True}, r"qk_layernorm=true .* not supported for phi"),
    ({"hidden_act": "relu"}, r"hidden_act='relu' is not supported for phi"),
    ({"partial_rotary_factor": 0.0125}, r"head_dim=80 gives rotary_dim=1 for phi"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope scaling 'dynamic'"),
])
def test_bad_configs_name_the_value(change: dict, message: str) -> None:
    arch = resolve_model("phi_2").arch
    with pytest.raises(MlccError, match=message):
        arch.config_cls.from_hf(_phi2(**change))
