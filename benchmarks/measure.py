"""Throughput, time to first token and greedy outputs of one runner, timed from Python.

A runner is anything with `prefill(ids) -> logits` (a fresh sequence) and `decode(token) ->
logits`: `CompiledRunner` wraps `CompiledEngine` (the TVM runtime only) and
`benchmarks.peer.TorchRunner` wraps HF transformers, so both are measured by the same code.
Each measurement repeats up to `repeats` timed runs after an untimed warm-up and stops early
once `budget` seconds are spent (always at least one run); the summaries record the count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from benchmarks.stats import rates, summarize


class Runner(Protocol):
    def prefill(self, ids: Sequence[int]) -> np.ndarray: ...

    def decode(self, token: int) -> np.ndarray: ...


def repeat_within(run: Callable[[], object], repeats: int, budget: float) -> list:
    """Results of `run()` repeated up to `repeats` times, stopping once `budget` s are spent."""
    results = []
    start = time.perf_counter()
    while len(results) < repeats:
        results.append(run())
        if time.perf_counter() - start >= budget:
            break
    return results


def measure_prefill(runner: Runner, prompt: Sequence[int], lengths: Sequence[int],
                    repeats: int, budget: float) -> dict[str, dict]:
    """Prefill tok/s and time to first token (prefill + choosing the token) per length."""
    runner.prefill(prompt[:max(lengths)])  # warm-up: first touches of weights and workspace
    out = {}
    for length in lengths:
        ids = list(prompt[:length])

        def run(ids: list[int] = ids) -> tuple[float, float]:
            # Logits left on a GPU (DeviceLogits, TorchLogits) are still being computed when
            # prefill returns: the pick waits for them, so both figures include it there.
            start = time.perf_counter()
            logits = runner.prefill(ids)
            on_device = getattr(logits, "on_device", False)
            prefilled = time.perf_counter()
            pick_greedy(logits)
            end = time.perf_counter()
            return (end if on_device else prefilled) - start, end - start

        times = repeat_within(run, repeats, budget / len(lengths))
        out[str(length)] = {
            "tokens_per_second": summarize(rates(length, [t[0] for t in times])).to_json(),
            "ttft_ms": summarize([t[1] * 1e3 for t in times]).to_json(),
        }
    return out


def pick_greedy(logits) -> int:
    """The argmax of a logits row: on the GPU when the row stayed there (DeviceLogits)."""
    return logits.argmax() if getattr(logits, "on_device", False) else int(np.argmax(logits))


def measure_decode(runner: Runner, prompt: Sequence[int], tokens: int, repeats: int,
                   budget: float) -> dict:
    """Greedy decode tok/s at batch 1 after `prompt`: one rate per run of `tokens` steps.

    A step is the decode call and the choice of the next token (what a chat loop waits for).
    """
    def run() -> list[float]:
        token = pick_greedy(runner.prefill(list(prompt)))
        steps = []
        for _ in range(tokens):
            start = time.perf_counter()
            token = pick_greedy(runner.decode(token))
            steps.append(time.perf_counter() - start)
        return steps

    warm_up(runner, prompt, min(tokens, 4))
    runs = repeat_within(run, repeats, budget)
    return {
        "tokens_per_second": summarize(rates(tokens, [sum(r) for r in runs])).to_json(),
        "step_ms": summarize([s * 1e3 for r in runs for s in r]).to_json(),
        "prompt_length": len(prompt),
        "tokens": tokens,
    }


def warm_up(runner: Runner, prompt: Sequence[int], tokens: int) -> None:
    """A short untimed greedy run: first touches of weights, cache and workspace."""
    token = pick_greedy(runner.prefill(list(prompt)))
    for _ in range(tokens):
        token = pick_greedy(runner.decode(token))


def greedy(runner: Runner, prompt: Sequence[int], tokens: int) -> tuple[list[int], np.ndarray]:
    """`tokens` greedy tokens after `prompt` and the logits each was chosen from."""
    logits = runner.prefill(list(prompt))
    chosen, rows = [], []
    for step in range(tokens):
        rows.append(np.asarray(logits, np.float32).copy())
        chosen.append(int(np.argmax(logits)))
        if step + 1 < tokens:
            logits = runner.decode(chosen[-1])
    return chosen, np.stack(rows)


def forced_logits(runner: Runner, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """The logits before each of `tokens` when they are fed one by one after `prompt`."""
    rows = [np.asarray(runner.prefill(list(prompt)), np.float32).copy()]
    for token in tokens[:-1]:
        rows.append(np.asarray(runner.decode(int(token)), np.float32).copy())
    return np.stack(rows)


class CompiledRunner:
    """A library built by `mlcc compile`, loaded with `CompiledEngine`."""

    def __init__(self, lib: str | Path, params: str | Path, device: str = "cpu") -> None:
        from mlcc.runtime_check.compiled import CompiledEngine

        chat = json.loads((Path(params) / "mlc-chat-config.json").read_text())
        self.engine = CompiledEngine(lib, params, chat_config=chat, device=device)

    # CUDA libraries keep the logits on the GPU (DeviceLogits): greedy picks run there, and
    # reading the row as an array downloads it.
    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.engine.reset()
        return self.engine.append(ids, on_device=True)

    def decode(self, token: int) -> np.ndarray:
        return self.engine.decode(token, on_device=True)


def measure_batch_decode(engine, prompt: Sequence[int], tokens: int, repeats: int,
                         budget: float) -> dict:
    """Aggregate tok/s of `batch_decode` over all sequences the library holds, if it has one."""
    if "batch_decode" not in engine.metadata["entries"] or engine.max_sequences < 2:
        return {"available": False,
                "reason": "the library decodes one sequence per call (compiled with "
                          "max_batch_size=1); pass --max-batch-size N to build batch_decode"}
    batch = engine.max_sequences

    def run() -> float:
        for seq in range(batch):
            engine.select_sequence(seq)
            engine.prefill_logits(list(prompt))
        ids = [int(prompt[-1])] * batch
        start = time.perf_counter()
        for _ in range(tokens):
            ids = np.argmax(engine.batch_decode(ids), axis=1).tolist()
        return time.perf_counter() - start

    run()  # warm-up
    seconds = repeat_within(run, repeats, budget)
    engine.select_sequence(0)
    return {"available": True, "batch": batch,
            "tokens_per_second": summarize(rates(batch * tokens, seconds)).to_json()}
