"""The GPU targets' schedules (dlight GEMV/Matmul, shared-memory norms, bound portable kernels)
run stories260K on a CUDA GPU like the interpreter, under the limits of webgpu, iphone, metal.

Cases come from MLCC_TARGET_CASES (a folder made by `python tests/gpu/target_cases.py OUT` on
the build machine) or are built here when nvcc and the TVM compiler are present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
TOLERANCE = {"q4f32_1": 2e-3, "q4f16_1": 5e-2}


def _cuda_ready() -> bool:
    try:
        from mlcc.runtime_check.compiled import _device

        _device("cuda")
        return True
    except Exception:  # noqa: BLE001 - any failure means: no usable GPU here
        return False


if not _cuda_ready():
    pytest.skip("needs a CUDA GPU visible to the TVM runtime", allow_module_level=True)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict]:
    folder = os.environ.get("MLCC_TARGET_CASES")
    if folder:
        root = Path(folder)
        return root, json.loads((root / "manifest.json").read_text())
    from target_cases import build_cases

    root = tmp_path_factory.mktemp("target_cases")
    return root, build_cases(root)


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
