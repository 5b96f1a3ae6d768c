"""batch_decode: one call advances several sequences; each row equals that sequence decoded alone.

Checked in the interpreter (the batched IR against per-sequence decode) and in the compiled CPU
library (against ReferenceModel run once per sequence), for Llama and for Mistral with its
sliding window exceeded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcc import ir
from mlcc.runtime_check.compiled import CompiledEngine
from mlcc.runtime_check.reference import ReferenceModel

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 8, "intermediate_size": 96, "max_position_embeddings": 64,
          "initializer_range": 0.2, "num_key_value_heads": 2}
PROMPTS = [[5, 17, 3, 99, 42, 7, 1, 8, 64], [11, 2], [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43]]


@pytest.fixture(scope="module", params=["llama", "mistral"])
def hf_dir(request, tmp_path_factory):
    torch.manual_seed(11)
    if request.param == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON,
                                                                           sliding_window=8))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def per_sequence_reference(hf_dir, steps):
    refs, expected = [], []
    for prompt in PROMPTS:
        ref = ReferenceModel(hf_dir, "q0f32")
        logits = ref.prefill_logits(prompt)
        refs.append(ref)
        expected.append([logits])
    for step in steps:
        for i, ref in enumerate(refs):
            expected[i].append(ref.decode(step[i]))
    return refs, expected


def test_interpreter_batch_decode(hf_dir):
    steps = [[4, 9, 60], [1, 2, 3]]
    refs, expected = per_sequence_reference(hf_dir, steps)
    config = refs[0].config.with_overrides(max_batch_size=4)
    from mlcc.frontend import get_architecture

    module = get_architecture(config.model_type).build_module(config)
    assert "batch_decode" in [f.name for f in module.functions]
    cache_type = module.function("decode").inputs[1].type
    states = [ir.KVCacheState(cache_type) for _ in PROMPTS]
    for state, prompt in zip(states, PROMPTS):
        ir.interpret(module, "prefill", [np.array(prompt, np.int32), state], refs[0].params)
    for k, step in enumerate(steps):
        (logits,) = ir.interpret(module, "batch_decode", [np.array(step, np.int32), states],
                                 refs[0].params)
        assert logits.shape == (len(PROMPTS), COMMON["vocab_size"])
        for i in range(len(PROMPTS)):
            np.testing.assert_allclose(logits[i], expected[i][k + 1], atol=1e-5)


def test_compiled_batch_decode(hf_dir, libraries):
    steps = [[4, 9, 60], [1, 2, 3], [7, 7, 7]]
    refs, expected = per_sequence_reference(hf_dir, steps)
    lib = libraries.get(hf_dir, "q0f32", "O2", "prefill_chunk_size=4;max_batch_size=4")
    engine = CompiledEngine(lib, refs[0].params)
    assert engine.max_sequences == 4
    for i, prompt in enumerate(PROMPTS):
        engine.select_sequence(i)
        np.testing.assert_allclose(engine.prefill_logits(prompt), expected[i][0], atol=1e-4)
    for k, step in enumerate(steps):
        logits = engine.batch_decode(step)
        for i in range(len(PROMPTS)):
            np.testing.assert_allclose(logits[i], expected[i][k + 1], atol=1e-4,
                                       err_msg=f"sequence {i} step {k}")
    assert engine.lengths[:3] == [len(p) + len(steps) for p in PROMPTS]
    # single-sequence decode still works on its own sequence after batching
    engine.select_sequence(1)
    np.testing.assert_allclose(engine.decode(5), refs[1].decode(5), atol=1e-4)
