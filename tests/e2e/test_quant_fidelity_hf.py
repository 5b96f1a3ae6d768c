"""ReferenceModel(quantization=Q) on stories260K against transformers on the same quantized weights.

The other side is transformers' LlamaForCausalLM whose linear and embedding weights were
quantized and dequantized by the independent NumPy quantizer of the byte-exact test
(tests/unit/group_reference.py), norms rounded through the mode's dtype. It runs in float32 for
every mode. torch float16 on CPU works, but it is a second float16 implementation with its own
rounding points (RMSNorm rounds the normalized row before the weight multiply, rope runs in
float16 element by element), not an oracle: against it the logits of q4f16_1 differ by up to
0.47% of their scale over 64 steps instead of 0.26%, and greedy runs part at gaps of one or two
float16 steps. Float32 transformers computes the exact function the scheme defines, so what
remains is the float16 rounding of the mode's activations, which is what is measured.

What holds on the four reference prompts (benchmarks/results/quant_fidelity.md has the numbers).
Float16 modes return the output projection's float32 sum as logits (out_dtype="float32"); every
other activation is float16.
- first-step logits within 1% of their scale (max |logit| of transformers): q4f16_1 0.14%,
  q3f16_1 0.29%; q4f32_1 computes in float32 and agrees to 8e-7 of the scale (checked at 1e-5).
- greedy tokens: q4f32_1 and q3f16_1 equal transformers' for all 64 tokens of every prompt;
  q4f16_1 for all 64 on three prompts, but "The dog" parts at token 22. There transformers'
  two best logits are 0.0041 apart, about half a float16 step (0.0078 at logits of 8 to 16);
  ReferenceModel's are 12.342852 and 12.343038, the other order by 0.000186. Float32 logits do
  not separate them because the float16 activations before the projection already moved them:
  rounding at any one kind of op alone keeps transformers' order, all of them together flip
  it, and the row's logits differ from transformers' by up to 0.018 at that step. So "greedy
  tokens equal" cannot hold for every prompt in a float16 mode. The check is the strongest form
  that does: teacher-forced along transformers' 64 greedy tokens, ReferenceModel picks the same
  token at every step except where transformers' top two are within one float16 step (float16
  modes only), and its free greedy run equals transformers' up to the first such step (all 64
  tokens when there is none).
- q0f16 against float32: the first-step logits recorded in reference.json (top 5 per prompt)
  are within 2e-2 (max 0.0174). Over all 512 logits the error reaches 0.0217 ("Tom and Mia";
  0.0204 on "Lily went to the park"), above 2e-2: the weights rounded to float16 alone give
  0.0086, float16 activations the rest, spread over every kind of op (any one kind alone gives
  at most 0.0152), and transformers' own float16 run errs by up to 0.043 on the same logits. All
  512 logits are held to 2.5e-2, and the 64 greedy tokens of every prompt equal the float32
  reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hf_dequantized import dequantized_weights, float16_step, transformers_greedy

from mlcc.runtime_check.reference import ReferenceModel

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
STEPS = 64

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")

# mode: largest first-step logit error allowed, as a fraction of the logits' scale
FIRST_STEP_TOLERANCE = {"q4f16_1": 0.01, "q4f32_1": 1e-5, "q3f16_1": 0.01}
FLOAT16_MODES = {"q4f16_1", "q3f16_1"}


def reference_cases() -> list[dict]:
    return json.loads((STORIES / "reference.json").read_text())["cases"]


def teacher_forced_logits(model: ReferenceModel, prompt: list[int],
                          tokens: list[int]) -> np.ndarray:
    """Logits before each of `tokens` when `tokens` are fed one by one after `prompt`."""
    rows = [model.prefill_logits(prompt)]
    rows += [model.decode(t) for t in tokens[:-1]]
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module", params=list(FIRST_STEP_TOLERANCE))
def runs(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    """Per prompt: transformers' greedy tokens and logits, ReferenceModel's along those tokens."""
    mode = request.param
    hf = dequantized_weights(STORIES, mode)
    ours = ReferenceModel(STORIES, quantization=mode)
    results = []
    for case in reference_cases():
        prompt = case["prompt_token_ids"]
        tokens, hf_logits = transformers_greedy(hf, prompt, STEPS)
        results.append({"prompt": case["prompt"], "tokens": tokens, "hf": hf_logits,
                        "ours": teacher_forced_logits(ours, prompt, tokens),
                        "greedy": ours.generate_greedy(prompt, STEPS)})
    return mode, results


def float16_ties(hf_logits: np.ndarray) -> list[int]:
    """Steps whose best two logits are closer than one float16 step at their magnitude."""
    ordered = np.sort(hf_logits, axis=1)
    gaps = ordered[:, -1] - ordered[:, -2]
    return [i for i, gap in enumerate(gaps) if gap < float16_step(ordered[i, -1])]


@pytest.mark.slow
def test_first_step_logits_within_tolerance_of_their_scale(runs) -> None:
    mode, results = runs
    for run in results:
        want, got = run["hf"][0], run["ours"][0]
        error = float(np.abs(got - want).max() / np.abs(want).max())
        assert error <= FIRST_STEP_TOLERANCE[mode], (mode, run["prompt"], error)


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(runs) -> None:
    mode, results = runs
    for run in results:
        ties = float16_ties(run["hf"]) if mode in FLOAT16_MODES else []
        picked = run["ours"].argmax(axis=1)
        differ = [i for i in range(STEPS) if picked[i] != run["tokens"][i]]
        assert set(differ) <= set(ties), (mode, run["prompt"], differ, ties)
        agreed = next((i for i in range(STEPS) if i in differ), STEPS)
        assert run["greedy"][:agreed] == run["tokens"][:agreed], (mode, run["prompt"])


def test_float16_weights_and_activations_stay_near_float32() -> None:
    model = ReferenceModel(STORIES, quantization="q0f16")
    hf = dequantized_weights(STORIES, "q0f32")
    for case in reference_cases():
        prompt, top = case["prompt_token_ids"], case["first_step_top5"]
        got = model.prefill_logits(prompt).astype(np.float32)
        np.testing.assert_allclose(got[top["ids"]], top["logits"], rtol=0, atol=2e-2)
        _, want = transformers_greedy(hf, prompt, 1)
        np.testing.assert_allclose(got, want[0], rtol=0, atol=2.5e-2)
        assert model.generate_greedy(prompt, STEPS) == case["greedy_token_ids"], case["prompt"]
