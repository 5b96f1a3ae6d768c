"""The GPU sampling kernels pick what the host sampler picks (on an H200; skipped elsewhere).

mlcc_argmax against np.argmax (ties: the first index), mlcc_sample against TokenSampler's
inverse-CDF draw for the same uniform numbers, for the cases' 512-token vocabulary and for
32000 and 151936 tokens (several tokens per thread); then a whole greedy and a seeded
temperature generation through CompiledEngine with the logits kept on the GPU equal the same
run with the logits downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_support import load_cases, open_case, require_gpus

pytestmark = pytest.mark.gpu
require_gpus()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return load_cases(tmp_path_factory, "MLCC_GPU_CASES", "cuda_cases:build_cases")


def host_pick(row: np.ndarray, temperature: float, u: float) -> tuple[int, float]:
    """TokenSampler's draw for top_p = 1, and how far u * total lies from the nearest edge."""
    scaled = row / np.float32(temperature)
    weights = np.exp(scaled - scaled.max())
    cdf = np.cumsum(weights / weights.sum(dtype=np.float64))
    threshold = u * cdf[-1]
    pick = min(int(np.searchsorted(cdf, threshold, side="right")), row.size - 1)
    return pick, float(np.min(np.abs(cdf - threshold)))


def kernels(cases, vocab: int):
    import tvm

    from mlcc.runtime_check.compiled import _device
    from mlcc.runtime_check.device_logits import DeviceSampler

    root, manifest = cases
    device = _device("cuda")
    if vocab == 512:
        lib = tvm.runtime.load_module(str(root / manifest["stories_q4f16_1"]["lib"]))
    else:
        lib = tvm.runtime.load_module(str(root / manifest["sampling"][str(vocab)]))
    return DeviceSampler(lib, device), device


@pytest.mark.parametrize("vocab", [512, 32000, 151936])
def test_kernels_pick_what_the_host_picks(cases, vocab):
    import tvm

    sampler, device = kernels(cases, vocab)
    rng = np.random.default_rng(vocab)
    close = draws = 0
    for trial in range(20):
        row = rng.normal(0, 2 + trial % 4, vocab).astype(np.float32)
        if trial % 5 == 0:
            row[[vocab // 3, vocab - 1]] = row.max() + 0.5  # a tie for the largest
        logits = tvm.runtime.tensor(row, device)
        assert sampler.argmax(logits) == int(np.argmax(row))
        for temperature in (0.3, 1.0, 1.7):
            # the two ends: the first token with mass, and the last (the clamp)
            assert sampler.sample(logits, temperature, 0.0) == host_pick(row, temperature, 0.0)[0]
            last = sampler.sample(logits, temperature, 1.0 - 1e-12)
            assert last >= host_pick(row, temperature, 1.0 - 1e-6)[0]
            for u in rng.random(8).tolist():
                want, margin = host_pick(row, temperature, u)
                got = sampler.sample(logits, temperature, u)
                draws += 1
                if margin < 1e-9:  # float rounding may fall either side of an edge
                    close += 1
                    assert abs(got - want) <= 1 or row[got] == row[want]
                else:
                    assert got == want, (trial, temperature, u)
    assert close <= draws // 20


def test_generation_with_logits_on_the_gpu_equals_the_downloaded_run(cases):
    from mlcc.runtime_check.sampling import SamplingParams, TokenSampler

    engine, _, _ = open_case(cases, "stories_q4f16_1")
    assert engine.device_sampler is not None
    prompt = [1, 403, 407, 261, 316]
    greedy = None
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.9)):
        runs = []
        for on_device in (False, True):
            sampler = TokenSampler(params, engine.vocab_size, np.random.default_rng(11))
            engine.reset()
            logits = engine.append(prompt, on_device=on_device)
            tokens = []
            for _ in range(24):
                tokens.append(sampler.sample(logits))
                logits = engine.decode(tokens[-1], on_device=on_device)
            runs.append(tokens)
        assert runs[0] == runs[1], params
        greedy = runs[0] if params.greedy else greedy
    # generate_greedy takes the argmax kernel path
    assert engine.generate_greedy(prompt, 16) == greedy[:16]
