"""Compiled tiny Mixtral on CUDA equals the IR interpreter (ReferenceModel, dense experts).

Skipped without a CUDA GPU visible to the TVM runtime. The cases come from MLCC_GPU_MOE_CASES
(a folder made by `python tests/gpu/moe_cases.py OUT` on the build machine) or are built here
when the TVM compiler is installed. The sparse kernels (routing, dispatch, grouped linears,
reduction) run on the device with no host synchronization, so this is where their routing
decisions are checked against the interpreter's: a 13-token prompt in chunks of 4 then 8 decode
steps; a 50-token prompt in one chunk of 64 (several row tiles per expert); a replayed CUDA
graph of the decode step; batch_decode rows. float32 logits agree within 1e-3, float16 and
q4f16_1 within 2e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gpu_support import TOLERANCE, load_cases, open_case, require_gpus
from moe_cases import CASES

pytestmark = pytest.mark.gpu
VOCAB = 120

require_gpus(1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict]:
    return load_cases(tmp_path_factory, "MLCC_GPU_MOE_CASES", "moe_cases:build_moe_cases")


def _engine(cases, name: str, **kwargs):
    engine, reference, case = open_case(cases, name, **kwargs)
    return engine, reference, TOLERANCE[case["quantization"]]


def _prompt_then_decode(engine, ids: list[int], prompt: int) -> list[np.ndarray]:
    """Logits after the prompt (chunked by the engine), then after each further token."""
    return [engine.prefill_logits(ids[:prompt])] + [engine.decode(t) for t in ids[prompt:]]


def _assert_steps(expected, got, tol: float, name: str) -> None:
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert np.isfinite(have).all(), f"{name} step {step}: non-finite logits"
        np.testing.assert_allclose(have, want, atol=tol, rtol=0, err_msg=f"{name} step {step}")


@pytest.mark.parametrize("name", [case[0] for case in CASES if case[3] == 4 and case[4] == 1])
def test_mixtral_equals_reference_in_chunks_of_4(cases, name):
    engine, reference, tol = _engine(cases, name)
    assert engine.prefill_chunk_size == 4
    ids = np.random.default_rng(3).integers(0, VOCAB, 21).tolist()
    _assert_steps(_prompt_then_decode(reference, ids, 13), _prompt_then_decode(engine, ids, 13),
                  tol, name)


def test_mixtral_long_chunk_equals_reference(cases):
    name = "mixtral_chunk64_q0f32"
    engine, reference, tol = _engine(cases, name)
    assert engine.prefill_chunk_size == 64
    ids = np.random.default_rng(4).integers(0, VOCAB, 54).tolist()
    _assert_steps(_prompt_then_decode(reference, ids, 50), _prompt_then_decode(engine, ids, 50),
                  tol, name)


def test_mixtral_cuda_graph_decode_equals_plain_decode(cases):
    pytest.importorskip("torch")
    name = "mixtral_q4f16_1"
    plain, _, _ = _engine(cases, name, cudagraph=False)
    graph, _, _ = _engine(cases, name, cudagraph=True)
    ids = np.random.default_rng(5).integers(0, VOCAB, 20).tolist()
    np.testing.assert_array_equal(graph.prefill_logits(ids[:6]), plain.prefill_logits(ids[:6]))
    for token in ids[6:]:  # each token routes differently: the graph holds no routing
        np.testing.assert_array_equal(graph.decode(token), plain.decode(token))
    assert graph._graphs[0].graph is not None, "the decode step was not captured"


def test_mixtral_batch_decode_rows_equal_sequences_decoded_alone(cases):
    from mlcc.runtime_check.reference import ReferenceModel

    name = "mixtral_batch_q4f16_1"
    engine, _, tol = _engine(cases, name)
    root, manifest = cases
    case = manifest[name]
    prompts = [[5, 17, 3, 99, 42, 7, 1, 8, 64], [11, 2], [33, 34, 35, 36, 37, 38, 39]]
    refs = [ReferenceModel(root / case["model"], case["quantization"]) for _ in prompts]
    for i, (prompt, ref) in enumerate(zip(prompts, refs)):
        engine.select_sequence(i)
        np.testing.assert_allclose(engine.prefill_logits(prompt), ref.prefill_logits(prompt),
                                   atol=tol, rtol=0)
    for k, step in enumerate([[4, 9, 60], [1, 2, 3], [7, 7, 7]]):
        logits = engine.batch_decode(step)
        for i, ref in enumerate(refs):
            np.testing.assert_allclose(logits[i], ref.decode(step[i]), atol=tol, rtol=0,
                                       err_msg=f"{name} sequence {i} step {k}")
