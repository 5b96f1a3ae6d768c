"""The correctness gate: a level's speed is reported only if it computes what O0 computes.

Inputs per level: its greedy tokens after a fixed prompt, and its logits at each of those steps
when fed the baseline's (O0's) tokens; the IR interpreter's logits along the same tokens are
the reference. A level passes when
1. its logits are within `tolerance` of the interpreter's at every step, and
2. its greedy tokens equal the baseline's, or first differ at a step where the interpreter
   cannot tell the two candidates apart: their reference logits are within `tolerance`. After
   such a near tie the sequences continue from different prefixes, so later tokens say nothing.
The baseline itself is held to the interpreter: each token it chose must be the interpreter's
argmax or within `tolerance` of it.

The tolerance scales with the largest reference logit: 1e-3 of it for float32 models; for
float16 models 2e-2, since activations are rounded to 11 significant bits after every kernel
and kernels may sum in different orders or fuse roundings away (O1's residual add + norm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RELATIVE_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 2e-2}


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    max_error: float
    tolerance: float
    matching_tokens: int  # leading greedy tokens equal to the baseline's
    total_tokens: int
    note: str

    def to_json(self) -> dict:
        return asdict(self)


def logits_tolerance(reference: np.ndarray, model_dtype: str) -> float:
    """Absolute tolerance on logits for a model computing in `model_dtype`."""
    scale = max(1.0, float(np.abs(reference).max()))
    return RELATIVE_TOLERANCE.get(model_dtype, RELATIVE_TOLERANCE["float16"]) * scale


def _logit_error(reference: np.ndarray, logits: np.ndarray) -> float | None:
    if reference.shape != logits.shape:
        return None
    return float(np.abs(logits.astype(np.float64) - reference).max())


def _leading_matches(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def check_baseline(reference: np.ndarray, logits: np.ndarray, tokens: list[int],
                   tolerance: float) -> GateVerdict:
    """O0 against the interpreter (both along O0's own tokens)."""
    error = _logit_error(reference, logits)
    n = len(tokens)
    if error is None:
        return GateVerdict(False, float("nan"), tolerance, 0, n,
                           f"logits shape {logits.shape} differs from the reference's "
                           f"{reference.shape}")
    picks = reference.argmax(axis=1)
    matches = _leading_matches([int(p) for p in picks], tokens)
    for step, token in enumerate(tokens):
        margin = float(reference[step, picks[step]] - reference[step, token])
        if margin > tolerance:
            return GateVerdict(False, error, tolerance, matches, n,
                               f"token {step}: chose {token}, the interpreter prefers "
                               f"{int(picks[step])} by {margin:.3g} > {tolerance:.3g}")
    if error > tolerance:
        return GateVerdict(False, error, tolerance, matches, n,
                           f"logits differ from the interpreter's by {error:.3g} > "
                           f"{tolerance:.3g}")
    note = "equal to the interpreter's greedy choice" if matches == n else \
        f"near tie at token {matches} (within {tolerance:.3g})"
    return GateVerdict(True, error, tolerance, matches, n, note)


def check_level(reference: np.ndarray, logits: np.ndarray, tokens: list[int],
                baseline_tokens: list[int], tolerance: float) -> GateVerdict:
    """A level against the interpreter's logits and the baseline's greedy tokens."""
    error = _logit_error(reference, logits)
    n = len(baseline_tokens)
    matches = _leading_matches(tokens, baseline_tokens)
    if error is None:
        return GateVerdict(False, float("nan"), tolerance, matches, n,
                           f"logits shape {logits.shape} differs from the reference's "
                           f"{reference.shape}")
    if error > tolerance:
        return GateVerdict(False, error, tolerance, matches, n,
                           f"logits differ from the interpreter's by {error:.3g} > "
                           f"{tolerance:.3g}")
    if matches >= min(len(tokens), n):
        return GateVerdict(True, error, tolerance, matches, n, "same tokens as O0")
    ours, theirs = tokens[matches], baseline_tokens[matches]
    margin = float(reference[matches, theirs] - reference[matches, ours])
    if abs(margin) > tolerance:
        return GateVerdict(False, error, tolerance, matches, n,
                           f"token {matches}: {ours} where O0 has {theirs}; the interpreter "
                           f"separates them by {margin:.3g} > {tolerance:.3g}")
    return GateVerdict(True, error, tolerance, matches, n,
                       f"near tie at token {matches}: {ours} vs O0's {theirs}, "
                       f"{abs(margin):.3g} apart in the interpreter's logits")
