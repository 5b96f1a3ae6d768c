"""The GPU targets' kernel definitions, built with serial loops for this CPU, match the interpreter.

No Metal, OpenCL or WebGPU device is here, so the numbers of those libraries are checked on
what can run: the same kernels (tensor expressions of linear/q_linear before dlight schedules
them, the portable kernels with their nests unbound, WebGPU's int32 indexing) compiled for the
host CPU, run as a whole model (prefill, greedy generation, decode steps) through the
compiled-engine contract against the NumPy interpreter on stories260K's reference prompts.
"""

from __future__ import annotations

import json
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


def serial_library(device: str, quantization: str, out: Path) -> Path:
    import tvm

    arch, config, quantization, _ = load_model_config(STORIES, quantization, None)
    scheme = get_scheme(quantization)
    opt = parse_opt("O2")
    passes = build_pipeline(opt, scheme.model_dtype, quantization, config.prefill_chunk_size)
    module = run_passes(arch.build_module(config), passes).module
    target = resolve_build_target(device, "x86_64-linux-gnu", out.with_suffix(".tar"),
                                  arch.name, quantization, scheme.model_dtype, None)
    metadata = build_metadata(module, config, quantization, opt, device)
    mod, _ = library_module(module, metadata, target, bind=False)
    tvm.compile(mod, target=target.host_target()).export_library(str(out))
    return out


@pytest.mark.parametrize("device, quantization", [("opencl", "q4f16_1"), ("webgpu", "q4f32_1")])
def test_kernels_of_the_target_run_the_model_like_the_interpreter(tmp_path, device,
                                                                   quantization):
    reference = ReferenceModel(STORIES, quantization)
    engine = CompiledEngine(serial_library(device, quantization, tmp_path / "lib.so"),
                            reference.params)
    for case in CASES[:2]:
        ids = case["prompt_token_ids"]
        np.testing.assert_allclose(engine.prefill_logits(ids), reference.prefill_logits(ids),
                                   atol=5e-2 if quantization == "q4f16_1" else 2e-3, rtol=0)
        expected = reference.generate_greedy(ids, 12)
        assert engine.generate_greedy(ids, 12) == expected
        for step, token in enumerate(expected[:4]):  # decode entry, token by token
            reference_logits = reference.decode_logits(token)
            np.testing.assert_allclose(engine.decode_logits(token), reference_logits,
                                       atol=5e-2 if quantization == "q4f16_1" else 2e-3,
                                       rtol=0, err_msg=f"decode step {step}")
