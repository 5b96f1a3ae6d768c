"""The GPU targets' kernel definitions, built with serial loops for this CPU, match the interpreter.

No Metal, OpenCL or WebGPU device is here, so the numbers of those libraries are checked on
what can run: the same kernels (tensor expressions of linear/q_linear before dlight schedules
them, the portable kernels with their nests unbound, WebGPU's int32 indexing) compiled for the
host CPU, run as a whole model (prefill in chunks, greedy generation, decode steps) through the
compiled-engine contract against the NumPy interpreter: stories260K on its reference prompts,
and tiny random GPT-NeoX (layer norm, partial rotary, parallel residual, GELU) and Mistral
(sliding window of 8, exceeded) and Mixtral (sparse experts: routing kernels in one thread)
models, also through batch_decode (three sequences a call).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mlcc.backends.gpu.codegen import library_module
from mlcc.backends.targets import resolve_build_target
from mlcc.interface.compile import build_metadata, load_model_config
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme
from mlcc.runtime_check.compiled import CompiledEngine
from mlcc.runtime_check.reference import ReferenceModel

pytestmark = pytest.mark.slow
STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
CASES = json.loads((STORIES / "reference.json").read_text())["cases"]
TINY = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
        "intermediate_size": 96, "max_position_embeddings": 64, "initializer_range": 0.2}
TOLERANCE = {"q4f16_1": 5e-2, "q0f16": 5e-2, "q4f32_1": 2e-3, "q0f32": 2e-3}


def serial_library(model: Path, device: str, quantization: str, out: Path,
                   chunk: int | None = None, batch: int = 1) -> Path:
    import tvm

    arch, config, quantization, _ = load_model_config(model, quantization, None)
    if chunk:
        config = config.with_overrides(prefill_chunk_size=chunk, max_batch_size=batch)
    scheme = get_scheme(quantization)
    opt = parse_opt("O2")
    passes = build_pipeline(opt, scheme.model_dtype, quantization, config.prefill_chunk_size)
    module = run_passes(arch.build_module(config), passes).module
    target = resolve_build_target(device, "x86_64-linux-gnu", out.with_suffix(".tar"),
                                  arch.name, quantization, scheme.model_dtype, None)
    target = replace(target, system_lib_prefix=None)  # loaded by name, not as a system library
    metadata = build_metadata(module, config, quantization, opt, device)
    mod, _ = library_module(module, metadata, target, bind=False)
    tvm.compile(mod, target=target.host_target()).export_library(str(out))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    import torch
    import transformers

    root = tmp_path_factory.mktemp("tiny_targets")
    makers = {
        "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **{**TINY, "hidden_size": 128, "num_attention_heads": 4}, rotary_pct=0.25,
            use_parallel_residual=True)),
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
            **TINY, num_key_value_heads=2, sliding_window=8)),
        "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    }
    folders = {}
    for name, make in makers.items():
        torch.manual_seed(sum(map(ord, name)))
        folders[name] = root / name
        make().save_pretrained(folders[name])
    return folders


def check_engine(engine, reference, prompts: list[list[int]], tolerance: float,
                 steps: int) -> None:
    for ids in prompts:
        np.testing.assert_allclose(engine.prefill_logits(ids), reference.prefill_logits(ids),
                                   atol=tolerance, rtol=0)
        expected = reference.generate_greedy(ids, steps)
        assert engine.generate_greedy(ids, steps) == expected
        for step, token in enumerate(expected[:4]):  # the decode entry, token by token
            np.testing.assert_allclose(engine.decode_logits(token),
                                       reference.decode_logits(token), atol=tolerance, rtol=0,
                                       err_msg=f"decode step {step}")


@pytest.mark.parametrize("device, quantization", [("opencl", "q4f16_1"), ("webgpu", "q4f32_1")])
def test_stories_kernels_of_the_target_run_like_the_interpreter(tmp_path, device,
                                                                 quantization):
    reference = ReferenceModel(STORIES, quantization)
    engine = CompiledEngine(serial_library(STORIES, device, quantization, tmp_path / "lib.so"),
                            reference.params)
    check_engine(engine, reference, [c["prompt_token_ids"] for c in CASES[:2]],
                 TOLERANCE[quantization], 12)


@pytest.mark.parametrize("model, device, quantization", [
    ("gpt_neox", "android", "q4f16_1"), ("gpt_neox", "webgpu", "q0f32"),
    ("mistral", "metal", "q0f16"), ("mistral", "webgpu", "q4f32_1"),
    ("mixtral", "opencl", "q4f16_1"), ("mixtral", "webgpu", "q0f32")])
def test_tiny_models_kernels_of_the_target_run_like_the_interpreter(tiny, tmp_path, model,
                                                                    device, quantization):
    reference = ReferenceModel(tiny[model], quantization)
    lib = serial_library(tiny[model], device, quantization, tmp_path / "lib.so", chunk=4)
    engine = CompiledEngine(lib, reference.params)
    prompt = [int(t) for t in np.random.default_rng(7).integers(1, 120, 13)]
    check_engine(engine, reference, [prompt], TOLERANCE[quantization], 10)


def test_batch_decode_of_the_target_kernels_equals_each_sequence_alone(tiny, tmp_path):
    prompts = [[5, 17, 3, 99, 42, 7, 1, 8, 64], [11, 2], [33, 34, 35, 36, 37, 38, 39, 40, 41]]
    steps = [[4, 9, 60], [1, 2, 3], [7, 7, 7]]
    refs = [ReferenceModel(tiny["mistral"], "q4f32_1") for _ in prompts]
    lib = serial_library(tiny["mistral"], "webgpu", "q4f32_1", tmp_path / "lib.so", chunk=4,
                         batch=4)
    engine = CompiledEngine(lib, refs[0].params)
    for i, (prompt, ref) in enumerate(zip(prompts, refs)):
        engine.select_sequence(i)
        np.testing.assert_allclose(engine.prefill_logits(prompt), ref.prefill_logits(prompt),
                                   atol=2e-3, rtol=0)
    for k, step in enumerate(steps):
        logits = engine.batch_decode(step)
        for i, ref in enumerate(refs):
            np.testing.assert_allclose(logits[i], ref.decode(step[i]), atol=2e-3, rtol=0,
                                       err_msg=f"sequence {i} step {k}")
