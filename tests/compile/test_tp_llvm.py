"""Compiled CPU libraries for 2 and 4 shards, run as N engines in N threads, against the oracle.

Each library is compiled once for N shards (one program for every rank, all_reduce lowered to a
call of "mlcc.ccl.all_reduce"); `TensorParallelEngine` loads the unsharded weights, slices them
per rank from the library's metadata and sums the ranks' buffers behind a barrier. The logits
of every prefill and decode step must equal the unsharded model run by the IR interpreter
within 1e-5 of their magnitude, for tiny Llama and Mistral (2 key/value heads, shared by two
ranks each at 4 shards; Mistral past its sliding window) and GPT-NeoX.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from tp_build import compile_sharded
from tp_models import oracle_logits, stored_weights, tiny_config, write_params

from mlcc.errors import MlccError
from mlcc.runtime_check.compiled import CompiledEngine
from mlcc.runtime_check.tensor_parallel import TensorParallelEngine

PROMPT, DECODE = 11, 6
ATOL = 1e-5
_BUILT: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def sharded_library(tmp_path_factory):
    def get(arch_name: str, quantization: str, shards: int):
        key = (arch_name, quantization, shards)
        if key not in _BUILT:
            arch, config = tiny_config(arch_name, quantized=quantization != "q0f32")
            out = tmp_path_factory.mktemp("tp") / f"{arch_name}_{quantization}_{shards}.so"
            compile_sharded(arch, config, quantization, out, shards)
            _BUILT[key] = out
        return _BUILT[key]
    return get


def oracle(arch, config, quantization: str, arrays, ids: np.ndarray) -> list[np.ndarray]:
    """Unsharded interpreter: the logits after the prompt, then after each decoded token."""
    return oracle_logits(arch, config, quantization, arrays, ids, PROMPT)


def assert_close(actual: np.ndarray, expected: np.ndarray, step: int) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL * scale,
                               err_msg=f"step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("arch_name", ["llama", "mistral", "gpt_neox"])
def test_sharded_library_in_threads_equals_the_unsharded_model(sharded_library, arch_name,
                                                                shards):
    arch, config = tiny_config(arch_name)
    arrays = stored_weights(arch, config, "q0f32")
    ids = np.random.default_rng(5).integers(0, config.vocab_size, PROMPT + DECODE)
    ids = ids.astype(np.int32)
    expected = oracle(arch, config, "q0f32", arrays, ids)
    with TensorParallelEngine(sharded_library(arch_name, "q0f32", shards), arrays) as engine:
        assert engine.prefill_chunk_size == config.prefill_chunk_size < PROMPT
        assert_close(engine.prefill_logits(ids[:PROMPT].tolist()), expected[0], 0)
        for step, token in enumerate(ids[PROMPT:], start=1):
            assert_close(engine.decode(int(token)), expected[step], step)
        assert engine.total_tokens == PROMPT + DECODE


@pytest.mark.slow
def test_q4_library_over_4_threads_generates_the_oracle_tokens(sharded_library):
    arch, config = tiny_config("llama", quantized=True)
    arrays = stored_weights(arch, config, "q4f32_1", seed=2)
    prompt = np.random.default_rng(6).integers(0, config.vocab_size, PROMPT).astype(np.int32)
    greedy = list(prompt)
    for _ in range(DECODE):  # the oracle's greedy tokens, each from a fresh run of the prefix
        ids = np.array(greedy + [0] * (PROMPT + DECODE - len(greedy)), np.int32)
        greedy.append(int(np.argmax(oracle(arch, config, "q4f32_1", arrays, ids)[
            len(greedy) - PROMPT])))
    with TensorParallelEngine(sharded_library("llama", "q4f32_1", 4), arrays) as engine:
        assert engine.generate_greedy(prompt.tolist(), DECODE) == greedy[PROMPT:]


@pytest.mark.slow
def test_sharded_library_refuses_to_run_alone_or_with_another_shard_count(sharded_library):
    arch, config = tiny_config("llama")
    arrays = stored_weights(arch, config, "q0f32")
    lib = sharded_library("llama", "q0f32", 2)
    with pytest.raises(MlccError, match=r"\[runtime\] .* is compiled for tensor_parallel_shards="
                                        r"2; open it with ChatModule\(\.\.\., "
                                        r"tensor_parallel_shards=2\)"):
        CompiledEngine(lib, arrays)
    with pytest.raises(MlccError, match=r"compiled for tensor_parallel_shards=2, not 4"):
        TensorParallelEngine(lib, arrays, shards=4)


@pytest.mark.slow
def test_worker_processes_run_like_threads_and_stay_in_step_after_an_error(sharded_library,
                                                                            tmp_path):
    # The GPU path's machinery (spawned workers, torch.distributed, pipes), here with gloo.
    arch, config = tiny_config("gpt_neox")
    arrays = stored_weights(arch, config, "q0f32")
    params = write_params(tmp_path / "params", arrays)
    lib = sharded_library("gpt_neox", "q0f32", 2)
    prompt = np.random.default_rng(9).integers(0, config.vocab_size, PROMPT).tolist()
    with TensorParallelEngine(lib, arrays) as threads:
        expected = threads.prefill_logits(prompt)
        greedy = threads.generate_greedy(prompt, DECODE)
    with TensorParallelEngine(lib, params, workers="processes") as processes:
        np.testing.assert_array_equal(processes.prefill_logits(prompt), expected)
        with pytest.raises(MlccError, match=r"\[runtime\] tensor-parallel rank 0: token id "
                                            r"999 is outside \[0, 48\)"):
            processes.decode(999)
        assert processes.generate_greedy(prompt, DECODE) == greedy
        assert processes.total_tokens == PROMPT + DECODE - 1
