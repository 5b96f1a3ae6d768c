"""The IR of each architecture, run by ReferenceModel, equals transformers at every step.

Tiny random HF models (fixed seeds) are saved with save_pretrained and loaded back through
resolve_model + iter_params; our prefill of the first tokens and each decode step after it must
give the logits transformers computes for the same positions in one full causal forward pass,
within 1e-4 in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlcc import ir
from mlcc.frontend import get_architecture
from mlcc.runtime_check.reference import ReferenceModel

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
COMMON = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 8, "intermediate_size": 96, "max_position_embeddings": 64,
          "initializer_range": 0.2}


def llama(**kw):
    cfg = transformers.LlamaConfig(**{**COMMON, "num_key_value_heads": 2, **kw})
    return transformers.LlamaForCausalLM(cfg)


def mistral(**kw):
    cfg = transformers.MistralConfig(**{**COMMON, "num_key_value_heads": 2, **kw})
    return transformers.MistralForCausalLM(cfg)


def gpt_neox(**kw):
    cfg = transformers.GPTNeoXConfig(**{**COMMON, "hidden_size": 128, "num_attention_heads": 4,
                                        **kw})
    return transformers.GPTNeoXForCausalLM(cfg)


CASES = {
    "llama_gqa_untied": (llama, {}),
    "llama_gqa_tied": (llama, {"tie_word_embeddings": True}),
    "llama_bias_llama3_rope": (llama, {
        "attention_bias": True, "mlp_bias": True, "rope_theta": 5000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral_window_8": (mistral, {"sliding_window": 8}),
    "gpt_neox_parallel": (gpt_neox, {"rotary_pct": 0.25, "use_parallel_residual": True}),
    "gpt_neox_sequential": (gpt_neox, {"rotary_pct": 0.25, "use_parallel_residual": False}),
    "gpt_neox_tanh_gelu_tied": (gpt_neox, {"rotary_pct": 0.5, "hidden_act": "gelu_new",
                                           "tie_word_embeddings": True}),
}


def save_model(tmp_path: Path, case: str):
    make, kw = CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    model = make(**kw, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """Logits at every position of one causal forward pass: (len(ids), vocab)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def token_ids(n: int, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, COMMON["vocab_size"], size=n).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_then_decode_matches_transformers(tmp_path: Path, case: str) -> None:
    model = save_model(tmp_path, case)
    ids = token_ids(20)
    expected = hf_logits(model, ids)
    assert expected.std() > 0.1  # logits large enough for the tolerance to mean something
    ours = ReferenceModel(tmp_path)
    got = [ours.prefill_logits(ids[:4])]
    for token in ids[4:]:
        got.append(ours.decode_logits(token))
    assert ours.total_tokens == 20
    for step, logits in enumerate(got):
        position = 3 + step
        np.testing.assert_allclose(logits, expected[position], atol=ATOL, rtol=0,
                                   err_msg=f"{case}: position {position}")


def test_mistral_window_is_exceeded_and_matters(tmp_path: Path) -> None:
    """The window really bounds attention: without it the logits past position 8 differ."""
    model = save_model(tmp_path, "mistral_window_8")
    ids = token_ids(20)
    windowed = hf_logits(model, ids)
    model.config.sliding_window = None
    full = hf_logits(model, ids)
    np.testing.assert_allclose(windowed[:8], full[:8], atol=1e-5)
    assert np.abs(windowed[8:] - full[8:]).max() > 1e-2
    ours = ReferenceModel(tmp_path)
    assert (ours.sliding_window_size, ours.context_window_size) == (8, -1)
    # One append of 20 tokens goes in chunks of prefill_chunk_size (8) across the window.
    assert ours.prefill_chunk_size == 8
    np.testing.assert_allclose(ours.prefill_logits(ids), windowed[-1], atol=ATOL, rtol=0)


def run_prefill(config, params: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    module = get_architecture(config.model_type).build_module(config)
    cache = ir.KVCacheState(module.function("prefill").inputs[1].type)
    (logits,) = ir.interpret(module, "prefill", [np.array(ids, np.int32), cache], params)
    return logits


def test_gpt_neox_partial_rotary_and_qkv_layout_matter(tmp_path: Path) -> None:
    """Our GPT-NeoX agrees only when rotary_pct and the per-head qkv regrouping are right."""
    model = save_model(tmp_path, "gpt_neox_sequential")
    ids = token_ids(12)
    expected = hf_logits(model, ids)[-1]
    ours = ReferenceModel(tmp_path)
    assert ours.config.rotary_dim == 8
    np.testing.assert_allclose(run_prefill(ours.config, ours.params, ids), expected, atol=ATOL,
                               rtol=0)
    full_rotary = run_prefill(ours.config.with_overrides(rotary_pct=1.0), ours.params, ids)
    assert np.abs(full_rotary - expected).max() > 1e-2
    hf_layout = dict(ours.params)
    for name, tensor in model.state_dict().items():
        if "query_key_value" in name:
            hf_layout[name] = tensor.numpy()
    assert np.abs(run_prefill(ours.config, hf_layout, ids) - expected).max() > 1e-2


def test_mistral_attention_sinks_match_a_sink_mask(tmp_path: Path) -> None:
    """With attention_sink_size=2 a token also sees positions 0 and 1 beyond the window; the
    reference is transformers' Mistral given that visibility as an explicit 4-D mask."""
    model = save_model(tmp_path, "mistral_window_8")
    config_path = tmp_path / "config.json"
    config_path.write_text(config_path.read_text().replace(
        '"sliding_window": 8', '"sliding_window": 8, "attention_sink_size": 2'))
    ids = token_ids(20)
    q, k = torch.arange(20)[:, None], torch.arange(20)[None, :]
    visible = (k <= q) & ((k > q - 8) | (k < 2))
    mask = torch.where(visible, 0.0, float("-inf"))[None, None]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), attention_mask=mask,
                         use_cache=False).logits[0].numpy()
    assert np.abs(expected[10:] - hf_logits(model, ids)[10:]).max() > 1e-2  # sinks matter
    ours = ReferenceModel(tmp_path)
    assert ours.config.attention_sink_size == 2
    got = [ours.prefill_logits(ids[:4])] + [ours.decode_logits(t) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(got), expected[3:], atol=ATOL, rtol=0)
