"""Compiled CPU libraries equal ReferenceModel (the IR interpreter) at every step.

Tiny random HF models of each architecture, a 13-token prompt fed in prefill chunks of 4, then
decode steps; float32 logits within 1e-4, at O0 and O2. The Mistral case has a sliding window of
8 that the sequence exceeds, so the ring layout of the paged cache is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlcc.runtime_check.compiled import CompiledEngine
from mlcc.runtime_check.reference import ReferenceModel

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 8, "intermediate_size": 96, "max_position_embeddings": 64,
          "initializer_range": 0.2}
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**COMMON, num_key_value_heads=2)),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=8)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**{**COMMON, "hidden_size": 128, "num_attention_heads": 4},
                                   rotary_pct=0.25, use_parallel_residual=True)),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for name, make in MODELS.items():
        torch.manual_seed(sum(map(ord, name)))
        path = tmp_path_factory.mktemp(name)
        make().save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.mark.parametrize("opt", ["O0", "O2"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_compiled_equals_reference(hf_dirs, libraries, arch, opt):
    reference = ReferenceModel(hf_dirs[arch], "q0f32")
    lib = libraries.get(hf_dirs[arch], "q0f32", opt, "prefill_chunk_size=4")
    engine = CompiledEngine(lib, reference.params)
    assert engine.prefill_chunk_size == 4
    ids = np.random.default_rng(3).integers(0, COMMON["vocab_size"], 21).tolist()
    expected = [reference.prefill_logits(ids[:13])] + [reference.decode(t) for t in ids[13:]]
    got = [engine.prefill_logits(ids[:13])] + [engine.decode(t) for t in ids[13:]]
    assert engine.total_tokens == reference.total_tokens == 21
    for step, (a, b) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0, err_msg=f"{arch} {opt} step {step}")
