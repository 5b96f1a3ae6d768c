"""CUDA libraries on a GPU equal the IR interpreter (ReferenceModel) and reference.json.

Skipped without a CUDA GPU visible to the TVM runtime. The cases come from MLCC_GPU_CASES (a
folder made by `python tests/gpu/cuda_cases.py OUT` on the build machine, carried to the GPU
machine) or, when the TVM compiler is installed, are built here. Tiny random models of each
architecture run a 13-token prompt in prefill chunks of 4, then 8 decode steps (the Mistral
case's sliding window of 8 is exceeded, so the ring layout is exercised); float32 logits must
agree within 1e-3, float16 and q4f16_1 within 2e-2 (absolute, on logits of magnitude ~1-10).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cuda_cases import CASES, WIDE_CHUNK
from gpu_support import TOLERANCE, load_cases, open_case, require_gpus

pytestmark = pytest.mark.gpu

require_gpus(1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict]:
    return load_cases(tmp_path_factory, "MLCC_GPU_CASES", "cuda_cases:build_cases")


def _engine(cases, name: str, **kwargs):
    engine, reference, _ = open_case(cases, name, **kwargs)
    return engine, reference


def _stories_reference(cases) -> list[dict]:
    root, manifest = cases
    path = root / manifest["stories_q0f32"]["model"] / "reference.json"
    return json.loads(path.read_text())["cases"]


def test_stories_q0f32_greedy_tokens_equal_reference_json(cases):
    engine, _ = _engine(cases, "stories_q0f32")
    for case in _stories_reference(cases):
        logits = engine.prefill_logits(case["prompt_token_ids"])
        top5 = case["first_step_top5"]
        np.testing.assert_allclose(logits[top5["ids"]], top5["logits"], atol=1e-3)
        assert engine.generate_greedy(case["prompt_token_ids"], 64) == case["greedy_token_ids"]


def test_stories_q4f16_1_matches_its_reference(cases):
    engine, reference = _engine(cases, "stories_q4f16_1")
    for case in _stories_reference(cases)[:2]:
        ids = case["prompt_token_ids"]
        np.testing.assert_allclose(engine.prefill_logits(ids), reference.prefill_logits(ids),
                                   atol=5e-2, rtol=0)
        for token in case["greedy_token_ids"][:8]:
            np.testing.assert_allclose(engine.decode(token), reference.decode(token),
                                       atol=5e-2, rtol=0)


def test_chat_on_cuda_writes_the_reference_story(cases):
    """`mlcc chat --device cuda` on a library from `mlcc compile --device cuda` (subprocess)."""
    import subprocess
    import sys

    root, manifest = cases
    job = manifest["main_job"]
    case = _stories_reference(cases)[0]
    out = subprocess.run([sys.executable, "-m", "mlcc.cli", "chat", str(root / job["params"]),
                          "--model-lib-path", str(root / job["lib"]), "--device", "cuda",
                          "--prompt", case["prompt"], "--temperature", "0"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(case["continuation_text"])


TINY_CASES = [name for name, model, _, _ in CASES
              if model != "stories260K" and model not in WIDE_CHUNK]


@pytest.mark.parametrize("name", TINY_CASES)
def test_tiny_models_equal_reference(cases, name):
    engine, reference = _engine(cases, name)
    assert engine.prefill_chunk_size == 4
    ids = np.random.default_rng(3).integers(0, 120, 21).tolist()
    expected = [reference.prefill_logits(ids[:13])] + [reference.decode(t) for t in ids[13:]]
    got = [engine.prefill_logits(ids[:13])] + [engine.decode(t) for t in ids[13:]]
    tol = TOLERANCE[cases[1][name]["quantization"]]
    for step, (a, b) in enumerate(zip(expected, got)):
        assert np.isfinite(b).all(), f"{name} step {step}: non-finite logits"
        np.testing.assert_allclose(b, a, atol=tol, rtol=0, err_msg=f"{name} step {step}")


@pytest.mark.parametrize("name", ["llama64_q0f16", "mistral64_q4f16_1", "qwen64_q4f16_1"])
def test_long_prefill_on_tensor_cores_equals_reference(cases, name):
    """~200-token prompts over several chunks: the tensor-core prefill attention with many key
    tiles, a partial query tile and (mistral) a wrapped sliding-window ring."""
    engine, reference = _engine(cases, name)
    assert engine.prefill_chunk_size == WIDE_CHUNK[name.split("_")[0]]
    ids = np.random.default_rng(5).integers(0, 120, 209).tolist()
    expected = [reference.prefill_logits(ids[:201])] + [reference.decode(t) for t in ids[201:]]
    got = [engine.prefill_logits(ids[:201])] + [engine.decode(t) for t in ids[201:]]
    # Over 200 positions float16 activations summed in other orders drift further than over
    # the 13-token cases: the CPU library of the same case (no tensor cores) differs from
    # ReferenceModel by up to 0.072 (mistral64) and 0.017 (llama64) with logits of scale 9-11,
    # so the bound is 1% of the scale; a wrong mask or tile is off by whole units.
    for step, (a, b) in enumerate(zip(expected, got)):
        assert np.isfinite(b).all(), f"{name} step {step}: non-finite logits"
        tol = 1e-2 * float(np.abs(a).max())
        np.testing.assert_allclose(b, a, atol=tol, rtol=0, err_msg=f"{name} step {step}")


def _against_plain(cases, arch: str, knob_case: str, seed: int, same_prefill: bool,
                   plain_case: str | None = None) -> None:
    """The library of case `knob_case` (a knob on) against the same model's library without it
    (`plain_case`, by default the model's O2 case): prefill logits (the same bits with
    `same_prefill`, else within the decode bound) and 12 decode steps after a 37-token prompt
    (mistral's window of 40 wraps) within 1% of the logits' scale; then the same bits replayed
    from a CUDA graph."""
    pytest.importorskip("torch")
    engine, _ = _engine(cases, knob_case, cudagraph=False)
    graph, _ = _engine(cases, knob_case, cudagraph=True)
    plain, _ = _engine(cases, plain_case or f"{arch}_q4f16_1", cudagraph=False)
    ids = np.random.default_rng(seed).integers(0, 120, 49).tolist()
    got = [engine.prefill_logits(ids[:37])] + [engine.decode(t) for t in ids[37:]]
    expected = [plain.prefill_logits(ids[:37])] + [plain.decode(t) for t in ids[37:]]
    if same_prefill:
        np.testing.assert_array_equal(got[0], expected[0])
    for step, (a, b) in enumerate(zip(expected, got)):
        assert np.isfinite(b).all(), f"{knob_case} step {step}: non-finite logits"
        np.testing.assert_allclose(b, a, atol=1e-2 * float(np.abs(a).max()), rtol=0,
                                   err_msg=f"{knob_case} step {step}")
    np.testing.assert_array_equal(graph.prefill_logits(ids[:37]), got[0])
    for step, token in enumerate(ids[37:]):
        np.testing.assert_array_equal(graph.decode(token), got[step + 1])
    assert graph._graphs[0].graph is not None, "the decode step was not captured"


@pytest.mark.parametrize("arch", ["llama64", "mistral64"])
def test_decode_chain_equals_the_kernels_it_replaces(cases, arch):
    """The persistent decode chain (opt-in knob decode_chain) against the same model's library
    without it (which test_long_prefill_on_tensor_cores_equals_reference holds to
    ReferenceModel), by _against_plain: the same prefill logits (the chain runs in decode
    only), decode within 1% of the scale. The bound is the long prefill test's: at these sizes
    float16 drifts further than in the tiny models (the chain's exact integer dots against the
    library's float16 pair dots differ by up to 0.034 on logits of scale 6 on an H200; one
    mistral64 logit of the chain was 1.6% of the scale from ReferenceModel at step 5, within 1%
    of the library without the chain); a wrong row, norm or residual is off by whole units.
    The graph replays give the same bits (each launch leaves the grid barrier's counts at
    zero)."""
    _against_plain(cases, arch, f"{arch}_q4f16_1_chain", 13, same_prefill=True)


@pytest.mark.parametrize("arch", ["llama64", "mistral64", "qwen64"])
def test_tma_gemv_equals_the_gemvs_it_replaces(cases, arch):
    """The TMA GEMV (knob tma_gemv, on at O2: every one-row q4 GEMV of these models behind a
    norm or the decode attention, the logits of prefill's last row included) against the same
    model's library with the knob off, by _against_plain: prefill too within 1% of the scale
    (its exact integer dots against the library's float16 pair dots, the chain test's bound);
    the graph replays give the same bits (mbarriers and copies are set up anew by every
    launch, and the producer warp waits for no other kernel)."""
    _against_plain(cases, arch, f"{arch}_q4f16_1", 17, same_prefill=False,
                   plain_case=f"{arch}_q4f16_1_notma")


@pytest.mark.parametrize("arch", ["llama64", "mistral64", "qwen64"])
def test_lean_attention_equals_the_plain_attention(cases, arch):
    """The lean decode attention (knob lean_attention, on at O2: the first rotary angle before
    the wait, a warp's lane groups merged through shuffles, released by the qkv TMA GEMV at
    its start) against the same model built with lean_attention=0, by _against_plain: the
    same prefill logits (prefill keeps its attention), decode within 1% of the scale (the
    merge adds the partial states in another order); the graph replays give the same bits."""
    _against_plain(cases, arch, f"{arch}_q4f16_1", 19, same_prefill=True,
                   plain_case=f"{arch}_q4f16_1_plainattn")


@pytest.mark.parametrize("arch", ["llama64", "mistral64", "qwen64"])
def test_norms_folded_into_tma_gemvs_equal_the_norm_kernels(cases, arch):
    """Folded norms between TMA GEMVs (knob tma_fold, on at O2: o_proj and down add the
    residual and write each block's sum of squares, the GLU and qkv GEMVs normalize their row
    as they stage it) against the same model built with tma_fold=0, by _against_plain: the
    same prefill logits (prefill keeps its norms), decode within 1% of the scale (the sum of
    squares is added in another order); the graph replays give the same bits."""
    _against_plain(cases, arch, f"{arch}_q4f16_1", 23, same_prefill=True,
                   plain_case=f"{arch}_q4f16_1_nofold")


@pytest.mark.parametrize("name", ["llama_q0f16", "mistral_q4f16_1"])
def test_cuda_graph_decode_equals_plain_decode(cases, name):
    pytest.importorskip("torch")
    plain, _ = _engine(cases, name, cudagraph=False)
    graph, _ = _engine(cases, name, cudagraph=True)
    ids = np.random.default_rng(5).integers(0, 120, 20).tolist()
    np.testing.assert_array_equal(graph.prefill_logits(ids[:6]), plain.prefill_logits(ids[:6]))
    for token in ids[6:]:
        np.testing.assert_array_equal(graph.decode(token), plain.decode(token))
    assert graph._graphs[0].graph is not None, "the decode step was not captured"


@pytest.mark.parametrize("name", ["llama_q4f16_1", "mistral_q4f16_1"])
def test_greedy_graph_equals_the_host_loop(cases, name):
    """decode_greedy with the CUDA graph (the GPU a step ahead of the host) picks the tokens
    the plain loop picks, stops at a stop id, and leaves the engine where that loop does: the
    next decode's logits are the same bits. Mistral's window of 8 wraps during the run."""
    pytest.importorskip("torch")
    plain, _ = _engine(cases, name, cudagraph=False)
    graph, _ = _engine(cases, name, cudagraph=True)
    ids = np.random.default_rng(11).integers(0, 120, 7).tolist()
    first = int(np.argmax(plain.prefill_logits(ids)))
    by_hand, token = [], first
    for _ in range(12):
        token = int(np.argmax(plain.decode(token)))
        by_hand.append(token)
    after = plain.decode(by_hand[-1])

    graph.prefill_logits(ids)
    assert graph.decode_greedy(first, 12) == by_hand
    assert graph._greedy[0].graph is not None, "the greedy step was not captured"
    np.testing.assert_array_equal(graph.decode(by_hand[-1]), after)

    stop = by_hand[5]
    kept = by_hand[:by_hand.index(stop) + 1]
    graph.prefill_logits(ids)
    assert graph.decode_greedy(first, 12, stop_ids=[stop]) == kept
    assert graph.total_tokens == len(ids) + len(kept)
    plain.prefill_logits(ids)
    for token in [first] + kept[:-1]:
        plain.decode(token)
    np.testing.assert_array_equal(graph.decode(kept[-1]), plain.decode(kept[-1]))

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_l2_prefetch_changes_no_value(cases, arch):
    """Prefetching weights into L2 is a hint: the decode logits are bit for bit the same."""
    plain, _ = _engine(cases, f"{arch}_q4f16_1")
    prefetched, _ = _engine(cases, f"{arch}_q4f16_1_l2pf")
    ids = np.random.default_rng(9).integers(0, 120, 16).tolist()
    np.testing.assert_array_equal(prefetched.prefill_logits(ids[:5]), plain.prefill_logits(ids[:5]))
    for token in ids[5:]:
        np.testing.assert_array_equal(prefetched.decode(token), plain.decode(token))


PROMPTS = [[5, 17, 3, 99, 42, 7, 1, 8, 64], [11, 2], [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43]]


@pytest.mark.parametrize("name", ["llama_batch_q0f32", "mistral_batch_q4f16_1",
                                  "mistral_batch_q4f16_1_dp2a"])
def test_batch_decode_rows_equal_sequences_decoded_alone(cases, name):
    from mlcc.runtime_check.reference import ReferenceModel

    engine, _ = _engine(cases, name)
    root, manifest = cases
    case = manifest[name]
    tol = TOLERANCE[case["quantization"]]
    refs = [ReferenceModel(root / case["model"], case["quantization"]) for _ in PROMPTS]
    for i, (prompt, ref) in enumerate(zip(PROMPTS, refs)):
        engine.select_sequence(i)
        np.testing.assert_allclose(engine.prefill_logits(prompt), ref.prefill_logits(prompt),
                                   atol=tol, rtol=0)
    for k, step in enumerate([[4, 9, 60], [1, 2, 3], [7, 7, 7]]):
        logits = engine.batch_decode(step)
        for i, ref in enumerate(refs):
            np.testing.assert_allclose(logits[i], ref.decode(step[i]), atol=tol, rtol=0,
                                       err_msg=f"{name} sequence {i} step {k}")
