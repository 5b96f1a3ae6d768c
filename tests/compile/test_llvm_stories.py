"""The real stories260K compiled for the CPU reproduces reference.json (issue: compile + runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlcc.errors import MlccError
from mlcc.runtime_check.compiled import CompiledEngine
from mlcc.runtime_check.reference import ReferenceModel

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
REFERENCE = json.loads((STORIES / "reference.json").read_text())
CASES = REFERENCE["cases"]


@pytest.fixture(scope="module")
def fp32_engine(libraries):
    lib = libraries.get(STORIES, "q0f32", "O2")
    return CompiledEngine(lib, ReferenceModel(STORIES, "q0f32").params)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["prompt"][:12])
def test_q0f32_greedy_and_first_logits(fp32_engine, case):
    logits = fp32_engine.prefill_logits(case["prompt_token_ids"])
    top5 = case["first_step_top5"]
    np.testing.assert_allclose(logits[top5["ids"]], top5["logits"], atol=1e-3)
    tokens = fp32_engine.generate_greedy(case["prompt_token_ids"], 64)
    assert tokens == case["greedy_token_ids"]


def test_q4f16_1_matches_its_reference_and_reports_agreement(libraries, capsys):
    reference = ReferenceModel(STORIES, "q4f16_1")
    engine = CompiledEngine(libraries.get(STORIES, "q4f16_1", "O2"), reference.params)
    agreement = []
    for case in CASES:
        ids = case["prompt_token_ids"]
        np.testing.assert_allclose(engine.prefill_logits(ids), reference.prefill_logits(ids),
                                   atol=5e-2, rtol=0)
        tokens = engine.generate_greedy(ids, 64)
        agreement.append(np.mean(np.array(tokens) == np.array(case["greedy_token_ids"])))
        assert tokens[0] == case["greedy_token_ids"][0]
    with capsys.disabled():
        print(f"\nq4f16_1 greedy agreement with fp32 over 64 tokens: "
              f"{', '.join(f'{a:.0%}' for a in agreement)}")


def test_q8f16_1_decode_follows_its_reference(libraries):
    """8-bit codes take the byte-code decode GEMV (GEMV-BYTES): every decode step's logits,
    teacher-forced along the float32 greedy tokens, match ReferenceModel's."""
    reference = ReferenceModel(STORIES, "q8f16_1")
    engine = CompiledEngine(libraries.get(STORIES, "q8f16_1", "O2"), reference.params)
    case = CASES[0]
    ids = case["prompt_token_ids"]
    np.testing.assert_allclose(engine.prefill_logits(ids), reference.prefill_logits(ids),
                               atol=5e-2, rtol=0)
    for step, token in enumerate(case["greedy_token_ids"][:16]):
        np.testing.assert_allclose(engine.decode(token), reference.decode(token), atol=5e-2,
                                   rtol=0, err_msg=f"decode step {step}")


def test_library_refuses_other_quantization(libraries):
    lib = libraries.get(STORIES, "q4f16_1", "O2")
    with pytest.raises(MlccError, match=r"q_weight \(uint32\[512, 8\]\) is missing.*q4f16_1") as err:
        CompiledEngine(lib, ReferenceModel(STORIES, "q0f32").params)
    assert "\n" not in str(err.value)
    with pytest.raises(MlccError, match="quantization 'q4f16_1' but the params folder says"):
        CompiledEngine(lib, ReferenceModel(STORIES, "q4f16_1").params,
                       {"model_type": "llama", "quantization": "q0f32"})


def test_runtime_only_subprocess(libraries, tmp_path):
    """The library runs with TVM_USE_RUNTIME_LIB=1 (libtvm_runtime only, no compiler)."""
    lib = libraries.get(STORIES, "q0f32", "O2")
    params = tmp_path / "params.npz"
    np.savez(params, **ReferenceModel(STORIES, "q0f32").params)
    case = CASES[0]
    script = (
        "import sys, numpy as np\n"
        "import tvm\n"
        "from mlcc.runtime_check.compiled import CompiledEngine\n"
        "assert 'compiler' not in tvm.base._LIB._name if hasattr(tvm.base, '_LIB') else True\n"
        f"params = dict(np.load({str(params)!r}))\n"
        f"e = CompiledEngine({str(lib)!r}, params)\n"
        f"print(e.generate_greedy({case['prompt_token_ids']}, 8))\n"
        "print(sorted(m for m in sys.modules if m.startswith('mlcc.backends')))\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         check=False,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(case["greedy_token_ids"][:8])
    assert lines[1] == "[]"  # the compiler side of mlcc was never imported


def test_overflow_is_refused(fp32_engine):
    fp32_engine.prefill_logits([1] * 500)
    with pytest.raises(MlccError, match="context window of 512"):
        fp32_engine.append([1] * 13)


def test_decode_greedy_is_the_decode_loop(fp32_engine):
    """On the CPU decode_greedy is the plain loop: the same tokens, stop ids included, and the
    same engine state (the next decode's logits) as decode + argmax by hand."""
    prompt = CASES[0]["prompt_token_ids"]
    fp32_engine.reset()
    first = int(np.argmax(fp32_engine.append(prompt)))
    by_hand, token = [], first
    for _ in range(6):
        token = int(np.argmax(fp32_engine.decode(token)))
        by_hand.append(token)
    after = fp32_engine.decode(by_hand[-1])

    fp32_engine.reset()
    fp32_engine.append(prompt)
    assert fp32_engine.decode_greedy(first, 6) == by_hand
    assert fp32_engine.total_tokens == len(prompt) + 6
    np.testing.assert_array_equal(fp32_engine.decode(by_hand[-1]), after)

    fp32_engine.reset()
    fp32_engine.append(prompt)
    kept = by_hand[:by_hand.index(by_hand[2]) + 1]
    assert fp32_engine.decode_greedy(first, 6, stop_ids={by_hand[2]}) == kept
    assert fp32_engine.total_tokens == len(prompt) + len(kept)
    assert fp32_engine.decode_greedy(first, 0) == []
    with pytest.raises(MlccError, match="outside"):
        fp32_engine.decode_greedy(-1, 3)
