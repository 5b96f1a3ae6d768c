"""The GPU targets' schedules (dlight GEMV/Matmul, shared-memory norms, bound portable kernels)
run stories260K on a CUDA GPU like the interpreter, under the limits of webgpu, iphone, metal.

Cases come from MLCC_TARGET_CASES (a folder made by `python tests/gpu/target_cases.py OUT` on
the build machine) or are built here when nvcc and the TVM compiler are present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gpu_support import load_cases, require_gpus

pytestmark = pytest.mark.gpu
TOLERANCE = {"q4f32_1": 2e-3, "q4f16_1": 5e-2}


require_gpus(1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict]:
    return load_cases(tmp_path_factory, "MLCC_TARGET_CASES", "target_cases:build_cases")


@pytest.mark.parametrize("name", ["webgpu_q4f32_1", "iphone_q4f16_1", "metal_q4f16_1"])
def test_schedules_of_the_target_match_the_interpreter(cases, name):
    from mlcc.runtime_check.compiled import CompiledEngine

    root, manifest = cases
    case = manifest[name]
    params = dict(np.load(root / case["params"]))
    engine = CompiledEngine(root / case["library"], params, device="cuda", cudagraph=False)
    tolerance = TOLERANCE[case["quantization"]]
    for expected in case["cases"]:
        logits = engine.prefill_logits(expected["ids"])
        np.testing.assert_allclose(logits, np.array(expected["prefill_logits"], np.float32),
                                   atol=tolerance, rtol=0)
        tokens = engine.generate_greedy(expected["ids"], len(expected["greedy"]))
        assert tokens == expected["greedy"]


KERNEL_CASES = ["stories260K_q4f16_1_iphone", "stories260K_q4f16_1_metal",
                "gpt_neox_q4f16_1_iphone", "gpt_neox_q4f16_1_metal", "gpt_neox_q0f32_webgpu",
                "mistral_q4f32_1_webgpu"]


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_every_kernel_matches_its_serial_cpu_build(cases, name):
    """Random inputs through each scheduled kernel against the same kernel built serially."""
    import tvm

    from mlcc.runtime_check.compiled import _device

    root, _ = cases
    folder = root / "kernels"
    case = json.loads((folder / "manifest.json").read_text())[name]
    device = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / case["library"]))
    arrays = np.load(folder / case["arrays"])
    for kernel, count in case["kernels"].items():
        tensors = [tvm.runtime.tensor(arrays[f"{kernel}.in{j}"], device) for j in range(count)]
        lib[kernel](*tensors)
        for j, tensor in enumerate(tensors):
            got, want = tensor.numpy(), arrays[f"{kernel}.out{j}"]
            if got.dtype.kind != "f":
                np.testing.assert_array_equal(got, want, err_msg=f"{kernel} buffer {j}")
                continue
            tol = 2e-2 if got.dtype == np.float16 else 1e-4
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                       atol=tol, rtol=tol, err_msg=f"{kernel} buffer {j}")
