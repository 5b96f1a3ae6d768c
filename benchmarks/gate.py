"""The correctness gate: a level's speed is reported only if it computes what O0 computes.

Inputs per level: its N greedy tokens after a fixed prompt, and its logits at each of those
steps when fed the baseline's (O0's) tokens. The IR interpreter's logits along O0's tokens are
the reference for the first R <= N steps (the interpreter dequantizes every weight in NumPy at
every step, seconds per token for a 100M model, so R is usually smaller than N).

O0 passes when its logits are within `tolerance` of the interpreter's for the R steps and each
token it chose there is the interpreter's argmax or within `tolerance` of it (a near tie).

Another level passes when
1. its logits are within `tolerance` of the interpreter's for the R steps and of O0's for all
   N steps, and
2. its greedy tokens equal O0's, or first differ at a step where the two candidates are within
   `tolerance` of each other in the interpreter's logits (in O0's past step R): a near tie that
   rounding may break either way. After it the sequences continue from different prefixes, so
   later tokens say nothing.

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
    max_error: float  # largest logit difference to the references it was held to
    tolerance: float
    matching_tokens: int  # leading greedy tokens equal to the baseline's (or interpreter's)
    total_tokens: int
    note: str

    def to_json(self) -> dict:
        return asdict(self)


def logits_tolerance(reference: np.ndarray, model_dtype: str) -> float:
    """Absolute tolerance on logits for a model computing in `model_dtype`."""
    scale = max(1.0, float(np.abs(reference).max()))
    return RELATIVE_TOLERANCE.get(model_dtype, RELATIVE_TOLERANCE["float16"]) * scale


def _error(expected: np.ndarray, logits: np.ndarray) -> float | None:
    """Largest difference over the rows `expected` has; None if the rows do not line up."""
    rows = expected.shape[0]
    if logits.shape[0] < rows or logits.shape[1:] != expected.shape[1:]:
        return None
    if rows == 0:
        return 0.0
    return float(np.abs(logits[:rows].astype(np.float64) - expected).max())


def _leading_matches(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _shape_failure(reference, logits, tolerance, n) -> GateVerdict:
    return GateVerdict(False, float("nan"), tolerance, 0, n, f"logits shape {logits.shape} does "
                       f"not line up with the reference's {reference.shape}")


def check_baseline(reference: np.ndarray, logits: np.ndarray, tokens: list[int],
                   tolerance: float) -> GateVerdict:
    """O0 against the interpreter, both along O0's own tokens."""
    n, rows = len(tokens), reference.shape[0]
    error = _error(reference, logits)
    if error is None:
        return _shape_failure(reference, logits, tolerance, n)
    picks = [int(p) for p in reference.argmax(axis=1)]
    matches = _leading_matches(picks, tokens[:rows])
    for step in range(rows):
        margin = float(reference[step, picks[step]] - reference[step, tokens[step]])
        if margin > tolerance:
            return GateVerdict(False, error, tolerance, matches, n,
                               f"token {step}: chose {tokens[step]}, the interpreter prefers "
                               f"{picks[step]} by {margin:.3g} > {tolerance:.3g}")
    if error > tolerance:
        return GateVerdict(False, error, tolerance, matches, n, f"logits differ from the "
                           f"interpreter's by {error:.3g} > {tolerance:.3g}")
    note = (f"the interpreter's greedy choice for {rows} of {n} tokens" if matches == rows
            else f"near tie at token {matches} (within {tolerance:.3g})")
    return GateVerdict(True, error, tolerance, matches, n, note)


def check_level(reference: np.ndarray | None, baseline_logits: np.ndarray, logits: np.ndarray,
                tokens: list[int], baseline_tokens: list[int], tolerance: float) -> GateVerdict:
    """A level against the interpreter's (None: no interpreter run) and O0's logits and O0's
    greedy tokens."""
    if reference is None:
        reference = baseline_logits[:0]
    n, rows = len(baseline_tokens), reference.shape[0]
    matches = _leading_matches(tokens, baseline_tokens)
    to_reference, to_baseline = _error(reference, logits), _error(baseline_logits, logits)
    if to_reference is None or to_baseline is None:
        return _shape_failure(baseline_logits, logits, tolerance, n)
    error = max(to_reference, to_baseline)
    for what, value in (("the interpreter's", to_reference), ("O0's", to_baseline)):
        if value > tolerance:
            return GateVerdict(False, error, tolerance, matches, n, f"logits differ from "
                               f"{what} by {value:.3g} > {tolerance:.3g}")
    if matches >= min(len(tokens), n):
        return GateVerdict(True, error, tolerance, matches, n, "same tokens as O0")
    judge, name = (reference, "the interpreter's") if matches < rows else \
        (baseline_logits, "O0's")
    ours, theirs = tokens[matches], baseline_tokens[matches]
    margin = float(judge[matches, theirs] - judge[matches, ours])
    if abs(margin) > tolerance:
        return GateVerdict(False, error, tolerance, matches, n,
                           f"token {matches}: {ours} where O0 has {theirs}; {name} logits "
                           f"separate them by {margin:.3g} > {tolerance:.3g}")
    return GateVerdict(True, error, tolerance, matches, n,
                       f"near tie at token {matches}: {ours} vs O0's {theirs}, "
                       f"{abs(margin):.3g} apart in {name} logits")
