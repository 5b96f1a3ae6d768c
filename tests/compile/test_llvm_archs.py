"""Compiled CPU libraries of every added architecture equal ReferenceModel at every step.

Each architecture gets a tiny random HF model with its real structure (tests/unit/test_arch_*.py
check the same structures against transformers). The schedule is a 9-token prompt in prefill
chunks of 4, then 8 decode steps; the logits after each chunk and each step are compared.
q0f32 must agree within 1e-4. q4f16_1 and q0f16 compile and run, and agree with ReferenceModel
under the same quantization within a few float16 ulps of the largest logit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlcc.runtime_check.compiled import CompiledEngine
from mlcc.runtime_check.reference import ReferenceModel

transformers = pytest.importorskip("transformers")

PROMPT, DECODE, CHUNK = 9, 8, 4

# (model class, config class, config fields): small, with the real models' odd shapes.
MODELS = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {
        "vocab_size": 131, "hidden_size": 56, "num_hidden_layers": 2, "num_attention_heads": 7,
        "num_key_value_heads": 1, "intermediate_size": 72, "max_position_embeddings": 64,
        "tie_word_embeddings": True}),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", {
        "vocab_size": 97, "hidden_size": 72, "num_hidden_layers": 2, "num_attention_heads": 3,
        "num_key_value_heads": 3, "intermediate_size": 60, "max_position_embeddings": 64,
        "partial_rotary_factor": 0.25}),
    "phi": ("PhiForCausalLM", "PhiConfig", {
        "vocab_size": 101, "hidden_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 72, "max_position_embeddings": 64, "partial_rotary_factor": 0.4,
        "hidden_act": "gelu_new"}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {
        "vocab_size": 113, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 80,
        "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh"}),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", {
        "vocab_size": 89, "n_embd": 48, "n_layer": 2, "n_head": 6, "n_inner": 72,
        "n_positions": 32, "activation_function": "gelu_pytorch_tanh", "multi_query": True}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {
        "vocab_size": 97, "n_embd": 60, "n_layer": 2, "n_head": 5, "n_positions": 32,
        "activation_function": "gelu_new"}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {
        "vocab_size": 103, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 6,
        "num_key_value_heads": 2, "intermediate_size": 40, "max_position_embeddings": 64,
        "num_local_experts": 5, "num_experts_per_tok": 2}),
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = ("norm" in name or ".ln_" in name) and param.ndim == 1
            param.copy_(1.0 + 0.2 * noise if is_norm else 0.25 * noise)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for arch, (model_cls, config_cls, fields) in MODELS.items():
        config = getattr(transformers, config_cls)(**fields)
        model = _randomize(getattr(transformers, model_cls)(config), sum(map(ord, arch)))
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        if arch == "gpt2":
            _unprefix_gpt2(path)
        dirs[arch] = path
    return dirs


def _unprefix_gpt2(path: Path) -> None:
    """Tensor names as in the published GPT-2 checkpoints: no `transformer.` prefix."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()},
              str(path / "model.safetensors"))


def _schedule(engine, ids: list[int]) -> list[np.ndarray]:
    engine.reset()
    logits = [np.asarray(engine.append(ids[s:min(s + CHUNK, PROMPT)]), np.float32)
              for s in range(0, PROMPT, CHUNK)]
    logits += [np.asarray(engine.decode(t), np.float32) for t in ids[PROMPT:PROMPT + DECODE]]
    return logits


def _compare(hf_dirs, libraries, arch: str, quantization: str, atol: float,
             per_unit_logit: bool = False) -> None:
    """Logits agree within `atol`, times the largest logit (at least 1) when per_unit_logit."""
    reference = ReferenceModel(hf_dirs[arch], quantization)
    lib = libraries.get(hf_dirs[arch], quantization, "O2", f"prefill_chunk_size={CHUNK}")
    engine = CompiledEngine(lib, reference.params)
    assert engine.prefill_chunk_size == CHUNK
    ids = np.random.default_rng(5).integers(0, reference.vocab_size, PROMPT + DECODE).tolist()
    # Each append holds at most CHUNK tokens, so both engines see the same chunks.
    expected, got = _schedule(reference, ids), _schedule(engine, ids)
    assert engine.total_tokens == reference.total_tokens == PROMPT + DECODE
    for step, (want, have) in enumerate(zip(expected, got)):
        assert np.isfinite(have).all(), f"{arch} {quantization} step {step}"
        scale = max(1.0, float(np.abs(want).max())) if per_unit_logit else 1.0
        np.testing.assert_allclose(have, want, atol=atol * scale, rtol=0,
                                   err_msg=f"{arch} {quantization} step {step}")


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_q0f32_library_equals_reference(hf_dirs, libraries, arch):
    _compare(hf_dirs, libraries, arch, "q0f32", 1e-4)


@pytest.mark.parametrize("quantization", ["q4f16_1", "q0f16"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_float16_libraries_compile_and_run(hf_dirs, libraries, arch, quantization):
    # q0f16: a few float16 ulps of the largest logit (both round at the same places). q4f16_1:
    # the tuned GEMV/GEMM multiply each group's sum by its scale instead of rounding every
    # dequantized weight to float16 as the reference does, which moves logits by up to ~1%.
    atol = 2e-2 if quantization == "q4f16_1" else 4e-3
    _compare(hf_dirs, libraries, arch, quantization, atol, per_unit_logit=True)


def test_batch_decode_reads_each_sequences_position(hf_dirs, libraries):
    """Learned position embeddings in batch_decode: row i is looked up at sequence i's length."""
    arch = "gpt_bigcode"
    prompts = [[5, 17, 3, 9, 42, 7, 1], [11, 2], [33, 34, 35, 36, 37]]
    steps = [[4, 9, 60], [1, 2, 3]]
    refs = [ReferenceModel(hf_dirs[arch], "q0f32") for _ in prompts]
    overrides = f"prefill_chunk_size={CHUNK};max_batch_size=4"
    lib = libraries.get(hf_dirs[arch], "q0f32", "O2", overrides)
    engine = CompiledEngine(lib, refs[0].params)
    for i, (ref, prompt) in enumerate(zip(refs, prompts)):
        engine.select_sequence(i)
        np.testing.assert_allclose(engine.prefill_logits(prompt), ref.prefill_logits(prompt),
                                   atol=1e-4)
    for k, step in enumerate(steps):
        logits = engine.batch_decode(step)
        for i, ref in enumerate(refs):
            np.testing.assert_allclose(logits[i], ref.decode(step[i]), atol=1e-4,
                                       err_msg=f"sequence {i} step {k}")
