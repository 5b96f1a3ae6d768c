"""Summaries of repeated timings: median with the spread around it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    """Median, smallest and largest of `count` samples."""

    median: float
    low: float
    high: float
    count: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Summary:
        return cls(**data)

    def spread_percent(self) -> float:
        """(high - low) / median in percent: how far apart the repeats were."""
        return 100.0 * (self.high - self.low) / self.median if self.median else 0.0


def summarize(samples: Sequence[float]) -> Summary:
    """The summary of at least one sample."""
    if not samples:
        raise ValueError("summarize needs at least one sample")
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


def rates(counts: Sequence[int] | int, seconds: Sequence[float]) -> list[float]:
    """Items per second for each timed run (`counts` may be one count for every run)."""
    if isinstance(counts, int):
        counts = [counts] * len(seconds)
    return [c / s for c, s in zip(counts, seconds) if s > 0]
