"""GPT-BigCode: the real SantaCoder config, the preset's parameter count, and parity with
transformers.

The tiny models keep SantaCoder's structure: multi-query attention (6 query heads, one KV head),
learned position embeddings, LayerNorms and linear layers with bias, tanh GELU, tied lm_head;
plus the multi-head variant whose c_attn rows are per head [q_h, k_h, v_h], and one without
attention-weight scaling. Checkpoints are read as GPTBigCodeForCausalLM saves them
(`transformer.h.0...`) and with bare names (`h.0...`, as the base GPTBigCodeModel has them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from arch_parity import assert_reference_matches_transformers, randomize, save_tiny
from safetensors.torch import save_file

from mlcc.errors import MlccError
from mlcc.frontend import resolve_model

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).parents[2].parent / "shared"
TINY = {"vocab_size": 89, "n_embd": 48, "n_layer": 2, "n_head": 6, "n_inner": 72,
        "n_positions": 32, "activation_function": "gelu_pytorch_tanh", "multi_query": True}
CASES = {
    "santacoder_shape": {},
    "multi_head_untied": {"multi_query": False, "tie_word_embeddings": False},
    "unscaled_exact_gelu": {"scale_attn_weights": False, "activation_function": "gelu"},
}
SANTACODER = 1_124_886_528  # published parameter count


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gpt_bigcode_matches_transformers(tmp_path: Path, case: str) -> None:
    config = transformers.GPTBigCodeConfig(**{**TINY, **CASES[case]})
    model = randomize(transformers.GPTBigCodeForCausalLM(config), seed=sum(map(ord, case)))
    assert_reference_matches_transformers(model, save_tiny(model, tmp_path))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_checkpoint_without_prefix_matches_transformers(tmp_path: Path, fmt: str) -> None:
    config = transformers.GPTBigCodeConfig(**{**TINY, "multi_query": fmt == "bin"})
    model = randomize(transformers.GPTBigCodeForCausalLM(config), seed=len(fmt) + 1)
    save_tiny(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {name.removeprefix("transformer."): t.contiguous()
             for name, t in model.state_dict().items() if name != "lm_head.weight"}
    assert "h.0.attn.c_attn.weight" in state
    if fmt == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        save_file(state, str(tmp_path / "model.safetensors"))
    assert_reference_matches_transformers(model, tmp_path)


def test_preset_reads_santacoder() -> None:
    source = resolve_model("santacoder")
    config, mapping = source.config, source.arch.weight_mapping(source.config)
    assert sum(math.prod(p.shape) for p in mapping.params) == SANTACODER
    got = (config.num_key_value_heads, config.head_dim, config.n_positions,
           config.context_window_size, config.tie_word_embeddings, config.eos_token_id)
    assert got == (1, 128, 2048, 2048, True, 49152)
    c_attn = mapping.param("transformer.h.0.attn.c_attn.weight")
    assert (c_attn.shape, c_attn.combine) == ((2048 + 2 * 128, 2048), "identity")
    assert mapping.is_unused("transformer.h.3.attn.masked_bias")
    assert resolve_model(SHARED / "configs" / "bigcode--gpt_bigcode-santacoder").config == config


def test_context_is_bounded_by_the_learned_positions() -> None:
    config = resolve_model("santacoder").config
    assert config.with_overrides(context_window_size=1024).n_positions == 2048
    with pytest.raises(MlccError, match=r"learns 2048 position embeddings.*at most 2048"):
        config.with_overrides(context_window_size=4096)
    with pytest.raises(MlccError, match=r"not a sliding window"):
        config.with_overrides(sliding_window_size=512)


def test_bad_configs_name_the_value() -> None:
    path = SHARED / "configs" / "bigcode--gpt_bigcode-santacoder" / "config.json"
    hf = json.loads(path.read_text())
    arch = resolve_model("santacoder").arch
    with pytest.raises(MlccError, match=r"activation_function='relu' is not supported"):
        arch.config_cls.from_hf({**hf, "activation_function": "relu"})
    with pytest.raises(MlccError, match=r"n_head=3 does not divide n_embd=2048"):
        arch.config_cls.from_hf({**hf, "n_head": 3})
