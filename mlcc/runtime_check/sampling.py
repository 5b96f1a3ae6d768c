"""Choosing the next token from a model's logits: repetition penalty, temperature, top-p.

The order and the formulas are those of Hugging Face transformers' logits processors, so that a
sampled stream can be checked against them: the repetition penalty divides the positive logits
and multiplies the negative logits of every token already in the sequence
(`RepetitionPenaltyLogitsProcessor`), the logits are then divided by the temperature, and top-p
keeps the smallest set of most likely tokens whose probability mass reaches `top_p`
(`TopPLogitsWarper`). Temperature 0 means greedy decoding: the argmax of the penalized logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mlcc.errors import MlccError


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a token; validated on construction."""

    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise MlccError(
                "chat", f"temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise MlccError("chat", f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise MlccError(
                "chat",
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(
    logits: np.ndarray, seen_ids: Iterable[int] | np.ndarray, penalty: float
) -> np.ndarray:
    """Return a copy of `logits` (vocab,) with the penalty applied to each token in `seen_ids`.

    `seen_ids` is a list of token ids or a boolean mask over the vocabulary. A token that occurs
    several times is penalized once, as in transformers.
    """
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0:
        return out
    seen = np.asarray(seen_ids)
    index = np.flatnonzero(seen) if seen.dtype == np.bool_ else np.unique(seen.astype(np.int64))
    picked = out[index]
    out[index] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (the sums over 100k-token vocabularies stay accurate)."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    weights = np.exp(shifted)
    return weights / weights.sum()


# Top-p first looks among this many most likely tokens and widens the search only when they
# hold less than top_p of the mass: a full sort of a 150k vocabulary costs ~10-40 ms a token.
_NUCLEUS_FIRST_K = 64


def nucleus(scaled_logits: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids kept by top-p, most likely first, and their probabilities (not renormalized).

    A token is kept when the mass of the tokens more likely than it is still below `top_p`:
    the smallest set of most likely tokens whose mass reaches top_p, never empty.
    """
    weights = np.exp(scaled_logits - np.max(scaled_logits))  # (vocab,)
    total = weights.sum(dtype=np.float64)
    vocab = weights.size
    if top_p >= 1.0:
        return np.arange(vocab), weights / total
    k = min(_NUCLEUS_FIRST_K, vocab)
    while True:
        ids = np.argpartition(-weights, k - 1)[:k] if k < vocab else np.arange(vocab)
        ids = ids[np.argsort(-weights[ids], kind="stable")]
        probs = weights[ids] / total
        mass_before = np.cumsum(probs) - probs
        # once the k most likely tokens reach top_p, every kept token is among them
        if k == vocab or mass_before[-1] + probs[-1] >= top_p:
            keep = mass_before < top_p
            return ids[keep], probs[keep]
        # widen 16x; past a quarter of the vocabulary a full sort is cheaper than partitions
        k = 16 * k if 16 * k <= vocab // 4 else vocab


def next_token_probs(
    logits: np.ndarray, seen_ids: np.ndarray, params: SamplingParams
) -> np.ndarray:
    """The distribution (vocab,) that `TokenSampler.sample` draws from (temperature > 0)."""
    ids, probs = _candidates(logits, seen_ids, params)
    out = np.zeros(np.shape(logits), dtype=np.float64)
    out[ids] = probs / probs.sum()
    return out


def _candidates(
    logits: np.ndarray, seen_ids: np.ndarray, params: SamplingParams
) -> tuple[np.ndarray, np.ndarray]:
    penalized = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    return nucleus(penalized / np.float32(params.temperature), params.top_p)


class TokenSampler:
    """Draws tokens for one sequence, remembering which tokens it holds for the penalty.

    `rng` is a NumPy Generator; a fixed seed makes a whole generation reproducible.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, rng: np.random.Generator) -> None:
        self.params = params
        self.rng = rng
        # (vocab,) True for every token in the sequence so far
        self.seen = np.zeros(vocab_size, dtype=bool)

    def observe(self, token_ids: Iterable[int]) -> None:
        """Record tokens of the sequence (prompt and generated) for the repetition penalty."""
        ids = np.fromiter(token_ids, dtype=np.int64)
        self.seen[ids[ids < self.seen.size]] = True

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from logits (vocab,) of the last position.

        Logits left on the GPU (mlcc.runtime_check.device_logits.DeviceLogits) are picked
        there when neither the repetition penalty nor top-p applies: greedy by the argmax
        kernel, a temperature draw by the sampling kernel with the same uniform number this
        method would draw, so a seeded run picks the same tokens either way.
        """
        if getattr(logits, "on_device", False) and self.params.repetition_penalty == 1.0:
            if self.params.greedy:
                return logits.argmax()
            if self.params.top_p >= 1.0:
                return logits.sample(self.params.temperature, self.rng.random())
        logits = np.asarray(logits)
        if self.params.greedy:
            if self.params.repetition_penalty == 1.0:
                return int(np.argmax(logits))
            penalized = apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
            return int(np.argmax(penalized))
        ids, probs = _candidates(logits, self.seen, self.params)
        cdf = np.cumsum(probs)
        # side="right" skips zero-probability tokens, whose cdf equals their predecessor's
        pick = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        # a draw that rounds up to the total mass lands past the end
        return int(ids[min(pick, ids.size - 1)])
