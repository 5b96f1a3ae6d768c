"""ReferenceModel on the real stories260K model reproduces reference.json (llama2.c-checked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlcc.errors import MlccError
from mlcc.runtime_check.reference import ReferenceModel

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MODEL = SHARED / "models" / "stories260K"
REFERENCE = json.loads((MODEL / "reference.json").read_text())


@pytest.fixture(scope="module", params=["stories260K", "stories260K-pytorch"])
def model(request):
    return ReferenceModel(SHARED / "models" / request.param)


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["prompt"][:12])
def test_greedy_and_first_logits_match_reference(model, case):
    logits = model.prefill_logits(case["prompt_token_ids"])
    top5 = case["first_step_top5"]
    np.testing.assert_allclose(logits[top5["ids"]], top5["logits"], atol=1e-3)
    assert list(np.argsort(-logits)[:5]) == top5["ids"]
    tokens = model.generate_greedy(case["prompt_token_ids"], len(case["greedy_token_ids"]))
    assert tokens == case["greedy_token_ids"]


def test_chunked_prefill_equals_one_shot(model):
    ids = REFERENCE["cases"][3]["prompt_token_ids"]
    whole = model.prefill_logits(ids)
    model.reset()
    for token in ids[:-1]:
        model.append([token])
    np.testing.assert_allclose(model.append([ids[-1]]), whole, atol=1e-5)
    assert model.total_tokens == len(ids)


def test_context_window_overflow_is_refused():
    model = ReferenceModel(MODEL)
    model.prefill_logits([1] * 500)
    with pytest.raises(MlccError, match="context window of 512"):
        model.append([1] * 13)
