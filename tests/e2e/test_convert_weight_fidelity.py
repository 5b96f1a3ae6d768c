"""Fidelity per mode: stories260K converted by convert_weight, run by ReferenceModel (NumPy IR).

float32 must reproduce reference.json (transformers, cross-checked with llama2.c); the quantized
modes are compared with the float32 run by the correlation and error of the first-step logits,
which must degrade in the order of the bits kept, and by top-1 agreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlcc.interface.convert_weight import convert_weight
from mlcc.interface.gen_config import gen_config
from mlcc.runtime_check.reference import ReferenceModel

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")

# mode: (minimum correlation with float32 logits in every case, top-1 must agree in every case)
QUANTIZED = {"q0f16": (0.9999, True), "q8f16_1": (0.9999, True), "q4f32_1": (0.85, True),
             "q4f16_1": (0.85, True), "q3f16_1": (0.75, False)}


def reference_cases() -> list[dict]:
    return json.loads((STORIES / "reference.json").read_text())["cases"]


def converted_model(root: Path, mode: str) -> ReferenceModel:
    out = root / mode
    convert_weight(STORIES, mode, out, progress=False)
    gen_config(STORIES, mode, "llama-2", out)
    return ReferenceModel(out)


@pytest.fixture(scope="module")
def first_logits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("fidelity")
    logits = {}
    for mode in ("q0f32", *QUANTIZED):
        model = converted_model(root, mode)
        logits[mode] = [model.prefill_logits(c["prompt_token_ids"]) for c in reference_cases()]
    return logits


def test_float32_weights_reproduce_the_reference(tmp_path: Path) -> None:
    model = converted_model(tmp_path, "q0f32")
    for case in reference_cases():
        top = case["first_step_top5"]
        logits = model.prefill_logits(case["prompt_token_ids"])
        np.testing.assert_allclose(logits[top["ids"]], top["logits"], atol=1e-3)
        assert model.generate_greedy(case["prompt_token_ids"], 64) == case["greedy_token_ids"]


@pytest.mark.parametrize("mode", list(QUANTIZED))
def test_quantized_logits_follow_float32(first_logits, mode: str) -> None:
    min_corr, top1 = QUANTIZED[mode]
    for case, got, want in zip(reference_cases(), first_logits[mode], first_logits["q0f32"]):
        assert np.isfinite(got).all()
        assert np.corrcoef(got, want)[0, 1] >= min_corr, case["prompt"]
        if top1:
            assert int(np.argmax(got)) == case["first_step_top5"]["ids"][0], case["prompt"]


def test_error_grows_as_bits_shrink(first_logits) -> None:
    def mean_error(mode: str) -> float:
        return float(np.mean([np.abs(got - want).mean() for got, want
                              in zip(first_logits[mode], first_logits["q0f32"])]))

    errors = [mean_error(mode) for mode in ("q0f16", "q8f16_1", "q4f16_1", "q3f16_1")]
    assert errors == sorted(errors) and errors[0] < 0.01 < errors[-1], errors
