"""Sampling against Hugging Face transformers' logits processors, the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from mlcc.errors import MlccError
from mlcc.runtime_check.sampling import (
    SamplingParams,
    TokenSampler,
    apply_repetition_penalty,
    next_token_probs,
    nucleus,
    softmax,
)


def hf_processed(logits, seen, temperature, top_p, penalty):
    """Scores after transformers' penalty, temperature and top-p (-inf = removed)."""
    ids = torch.tensor([seen], dtype=torch.long)
    scores = torch.tensor(logits, dtype=torch.float32)[None]
    scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    return TopPLogitsWarper(top_p)(ids, scores)[0].numpy()


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, 100).astype(np.float32)
    seen = [5, 7, 7, 12, 40, 99, 0]
    assert (logits[seen] > 0).any() and (logits[seen] < 0).any()
    ours = apply_repetition_penalty(logits, seen, penalty)
    ids = torch.tensor([seen])
    ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, torch.tensor(logits)[None])[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # positive logits are divided, negative ones multiplied, each token once
    i_pos = next(i for i in seen if logits[i] > 0)
    i_neg = next(i for i in seen if logits[i] < 0)
    assert ours[i_pos] == pytest.approx(logits[i_pos] / penalty)
    assert ours[i_neg] == pytest.approx(logits[i_neg] * penalty)
    assert ours[7] == pytest.approx(logits[7] / penalty if logits[7] > 0 else logits[7] * penalty)
    untouched = np.setdiff1d(np.arange(100), seen)
    np.testing.assert_array_equal(ours[untouched], logits[untouched])


def test_repetition_penalty_accepts_a_mask():
    logits = np.array([2.0, -2.0, 1.0, -1.0], dtype=np.float32)
    mask = np.array([True, True, False, False])
    np.testing.assert_allclose(apply_repetition_penalty(logits, mask, 2.0), [1.0, -4.0, 1.0, -1.0])


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("vocab, spread", [(300, 2.0), (5000, 0.3)])
def test_top_p_keeps_the_same_tokens_as_transformers(top_p, seed, vocab, spread):
    # spread 0.3 over 5000 tokens is flat enough that the first 64 candidates fall short
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, spread, vocab).astype(np.float32)
    ids, mass = nucleus(logits, top_p)
    keep = np.zeros(vocab, dtype=bool)
    keep[ids] = True
    ref_keep = np.isfinite(hf_processed(logits, [], 1.0, top_p, 1.0))
    np.testing.assert_array_equal(keep, ref_keep)
    probs = softmax(logits)
    np.testing.assert_allclose(mass, probs[ids], rtol=1e-5)
    # most likely first; the kept mass reaches top_p, and without its last token it would not
    assert np.all(np.diff(mass) <= 0)
    assert probs[keep].sum() >= top_p - 1e-6
    assert probs[keep].sum() - probs[keep].min() < top_p
    # every kept token is more likely than every removed one
    if (~keep).any():
        assert probs[keep].min() >= probs[~keep].max()


def test_top_p_always_keeps_the_most_likely_token():
    ids, _ = nucleus(np.array([10.0, 0.0, 0.0], dtype=np.float32), 0.01)
    assert ids.tolist() == [0]


def test_distribution_matches_transformers_pipeline():
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 2, 64).astype(np.float32)
    seen = [1, 2, 3, 30]
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    mask = np.zeros(64, dtype=bool)
    mask[seen] = True
    ours = next_token_probs(logits, mask, params)
    ref = torch.softmax(torch.tensor(hf_processed(logits, seen, 0.7, 0.9, 1.2)), -1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_sampled_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.06, 0.04], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_p=0.85)
    sampler = TokenSampler(params, 5, np.random.default_rng(0))
    draws = np.array([sampler.sample(logits) for _ in range(20000)])
    freq = np.bincount(draws, minlength=5) / draws.size
    # top_p 0.85 keeps {0, 1, 2} (mass 0.9), renormalized
    expected = np.array([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert freq[3] == 0 and freq[4] == 0


def test_temperature_zero_is_argmax_of_penalized_logits():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 1, 50).astype(np.float32)
    best = int(np.argmax(logits))
    sampler = TokenSampler(SamplingParams(temperature=0.0), 50, np.random.default_rng(1))
    assert all(sampler.sample(logits) == best for _ in range(20))
    # with the best token already seen, a strong penalty moves the argmax elsewhere
    penalized = TokenSampler(
        SamplingParams(temperature=0.0, repetition_penalty=100.0), 50, np.random.default_rng(1)
    )
    penalized.observe([best])
    ref = hf_processed(logits, [best], 1.0, 1.0, 100.0)
    assert penalized.sample(logits) == int(np.argmax(ref)) != best


def test_seed_makes_sampling_reproducible():
    logits = np.zeros(1000, dtype=np.float32)
    params = SamplingParams(temperature=1.0)

    def draw(seed):
        sampler = TokenSampler(params, 1000, np.random.default_rng(seed))
        return [sampler.sample(logits) for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_observe_ignores_ids_outside_the_vocabulary():
    sampler = TokenSampler(SamplingParams(), 10, np.random.default_rng(0))
    sampler.observe([1, 3, 12])
    assert np.flatnonzero(sampler.seen).tolist() == [1, 3]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_params_are_one_line_errors(kwargs, word):
    with pytest.raises(MlccError) as info:
        SamplingParams(**kwargs)
    assert info.value.stage == "chat"
    assert str(info.value).startswith(f"[chat] {word}")
    assert "\n" not in str(info.value)
