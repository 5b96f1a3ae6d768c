"""Sharded CUDA libraries on 2 (and 4) GPUs: one worker process per GPU, NCCL all_reduce.

Skipped unless at least 2 GPUs are visible. The cases come from MLCC_GPU_TP_CASES (a folder made
by `python tests/gpu/tp_cases.py OUT` on the build machine) or are built here when the TVM
compiler is installed. A 11-token prompt (prefill chunks of 5) and 8 decode steps must give the
logits of the unsharded model in the IR interpreter (float32 within 1e-3, q4f16_1 within 2e-2,
of the logits' magnitude), with the decode step replayed from a CUDA graph that holds the
all_reduce and without it; two GPUs must pick the tokens one GPU picks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gpu_support import load_cases, require_gpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_cases import CASES

pytestmark = pytest.mark.gpu
TOLERANCE = {"q0f32": 1e-3, "q4f16_1": 2e-2}
PROMPT, DECODE = 11, 8
CLEAR_MARGIN = 0.1  # top-1 minus top-2 logit above which two GPUs must agree with one


GPUS = require_gpus(2)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict]:
    return load_cases(tmp_path_factory, "MLCC_GPU_TP_CASES", "tp_cases:build_cases")


def _case(cases, name: str):
    from mlcc.frontend.ndarray_cache import load_ndarray_cache

    root, manifest = cases
    case = manifest[name]
    if case["shards"] > GPUS:
        pytest.skip(f"{name} needs {case['shards']} GPUs, {GPUS} visible")
    params = root / case["params"]
    return case, root / case["lib"], params, load_ndarray_cache(params)


def _assert_close(actual, expected, tol: float, what: str) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[3] > 1])
def test_sharded_library_on_gpus_equals_the_interpreter(cases, name):
    from tp_models import oracle_logits, tiny_config

    from mlcc.runtime_check.tensor_parallel import TensorParallelEngine

    case, lib, params, arrays = _case(cases, name)
    arch, config = tiny_config(case["arch"], quantized=case["quantization"] != "q0f32")
    ids = np.random.default_rng(7).integers(0, config.vocab_size, PROMPT + DECODE)
    expected = oracle_logits(arch, config, case["quantization"], arrays, ids, PROMPT)
    tol = TOLERANCE[case["quantization"]]
    runs = {}
    with TensorParallelEngine(lib, params, device="cuda") as engine:
        for graph in (False, True):
            engine.set_cudagraph(graph)
            got = [engine.prefill_logits(ids[:PROMPT].tolist())]
            got += [engine.decode(int(t)) for t in ids[PROMPT:]]
            for step, (a, e) in enumerate(zip(got, expected)):
                _assert_close(a, e, tol, f"{name} step {step} cudagraph={graph}")
            runs[graph] = got
    for plain, replayed in zip(runs[False], runs[True]):
        np.testing.assert_allclose(replayed, plain, rtol=0, atol=1e-5)


def test_two_gpus_pick_the_tokens_of_one(cases):
    from mlcc.runtime_check.compiled import CompiledEngine
    from mlcc.runtime_check.tensor_parallel import TensorParallelEngine

    _, lib1, params, _ = _case(cases, "llama_q4f16_1_tp1")
    _, lib2, _, _ = _case(cases, "llama_q4f16_1_tp2")
    prompt = np.random.default_rng(8).integers(0, 48, PROMPT).tolist()
    one = CompiledEngine(lib1, params, device="cuda")
    logits, tokens, reference = one.prefill_logits(prompt), [], []
    for _ in range(16):
        tokens.append(int(np.argmax(logits)))
        reference.append(logits)
        logits = one.decode(tokens[-1])
    with TensorParallelEngine(lib2, params, device="cuda") as two:
        # teacher-forced with one GPU's tokens, so a near-tie cannot send the runs apart
        got = [two.prefill_logits(prompt)] + [two.decode(t) for t in tokens[:-1]]
        free = two.generate_greedy(prompt, 16)
    for step, (a, e) in enumerate(zip(got, reference)):
        _assert_close(a, e, TOLERANCE["q4f16_1"], f"step {step}")
        top2 = np.sort(e)[-2:]
        if top2[1] - top2[0] > CLEAR_MARGIN:
            assert int(np.argmax(a)) == tokens[step], f"step {step}"
    first_tie = next((i for i, e in enumerate(reference)
                      if np.diff(np.sort(e)[-2:])[0] <= CLEAR_MARGIN), len(tokens))
    assert free[:first_tie] == tokens[:first_tie]


def test_more_shards_than_gpus_fails_clearly(cases):
    from mlcc.errors import MlccError
    from mlcc.runtime_check.tensor_parallel import TensorParallelEngine

    root, manifest = cases
    if GPUS >= 4:
        pytest.skip("every case fits on this machine's GPUs")
    case = manifest["llama_q0f32_tp4"]
    with pytest.raises(MlccError, match=rf"\[runtime\] tensor_parallel_shards=4 starting at "
                                        rf"cuda:0 needs GPUs 0\.\.3, but {GPUS} are visible"):
        TensorParallelEngine(root / case["lib"], root / case["params"], device="cuda")
