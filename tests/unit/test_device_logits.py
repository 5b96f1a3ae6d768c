"""Tokens picked on the GPU go through the same TokenSampler rules as on the host.

The device kernels (mlcc.backends.cuda.sampling) are modelled here in NumPy exactly as they
compute (segments of ceil(vocab / 1024) tokens, float32 weights, float64 segment sums and
scan); the GPU test (tests/gpu/test_cuda_sampling.py) checks the kernels themselves. These
tests check the plumbing: which cases stay on the device, that a seeded run draws the same
uniform numbers and so the same tokens, and that penalty and top-p fall back to the host row.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlcc.runtime_check.device_logits import DeviceLogits
from mlcc.runtime_check.sampling import SamplingParams, TokenSampler


class KernelModel:
    """NumPy model of mlcc_argmax / mlcc_sample, counting calls and downloads."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def argmax(self, logits) -> int:
        self.calls.append("argmax")
        return int(np.argmax(logits.values))

    def sample(self, logits, temperature: float, u: float) -> int:
        self.calls.append("sample")
        row = logits.values
        scaled = row / np.float32(temperature)
        weights = np.exp(scaled - scaled.max()).astype(np.float64)
        threshold = u * weights.sum()
        pick = int(np.searchsorted(np.cumsum(weights), threshold, side="right"))
        return min(pick, row.size - 1)


class FakeTensor:
    def __init__(self, values: np.ndarray, log: list[str]) -> None:
        self.values, self.log, self.shape = values, log, values.shape

    def numpy(self) -> np.ndarray:
        self.log.append("download")
        return self.values.copy()


def run(params: SamplingParams, rows: list[np.ndarray], seed: int, device: bool):
    model = KernelModel()
    sampler = TokenSampler(params, rows[0].size, np.random.default_rng(seed))
    sampler.observe([3, 5])
    tokens = []
    for row in rows:
        logits = DeviceLogits(FakeTensor(row, model.calls), model) if device else row
        tokens.append(sampler.sample(logits))
        sampler.observe(tokens[-1:])
    return tokens, model.calls


@pytest.mark.parametrize("params, on_device", [
    (SamplingParams(temperature=0.0), "argmax"),
    (SamplingParams(temperature=0.7), "sample"),
    (SamplingParams(temperature=1.3), "sample"),
    (SamplingParams(temperature=0.0, repetition_penalty=1.2), "download"),
    (SamplingParams(temperature=0.8, top_p=0.9), "download"),
])
def test_device_and_host_pick_the_same_tokens(params, on_device):
    rng = np.random.default_rng(7)
    rows = [rng.normal(0, 3, 1000).astype(np.float32) for _ in range(40)]
    rows[0][[10, 20]] = rows[0].max() + 1  # a tie: the first index wins, as np.argmax
    for seed in range(3):
        host, _ = run(params, rows, seed, device=False)
        device, calls = run(params, rows, seed, device=True)
        assert device == host
        assert set(calls) == {on_device} and len(calls) == len(rows)
    if params.greedy and params.repetition_penalty == 1.0:
        assert host[0] == 10


def test_device_logits_read_as_an_array_download_once():
    log: list[str] = []
    row = np.arange(6, dtype=np.float32)
    logits = DeviceLogits(FakeTensor(row, log), KernelModel())
    assert logits.shape == (6,)
    np.testing.assert_array_equal(np.asarray(logits), row)
    assert float(np.max(logits)) == 5.0 and np.asarray(logits, np.float64).dtype == np.float64
    assert log == ["download"]
