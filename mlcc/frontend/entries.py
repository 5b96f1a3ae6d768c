"""The entry points every architecture's IR module provides, chosen from its config.

- `prefill(tokens[seq_len])`: feeds a chunk of one sequence, returns its last logits f32[vocab];
- `decode(token[1])`: one token of one sequence, returns f32[vocab];
- `batch_decode(tokens[batch])` when max_batch_size > 1: row i is the next token of sequence i,
  returns f32[batch, vocab].
"""

from __future__ import annotations

from typing import Any

from mlcc import ir


def entry_points(config) -> list[tuple[str, ir.Dim, dict[str, Any]]]:
    """(function name, token count, function attributes) for each entry of the model."""
    points: list[tuple[str, ir.Dim, dict[str, Any]]] = [
        ("prefill", ir.Sym("seq_len"), {}),
        ("decode", 1, {}),
    ]
    if config.max_batch_size > 1:
        points.append(("batch_decode", ir.Sym("batch"), {"batched_kv": True}))
    return points


def module_attrs(config) -> dict[str, Any]:
    return {"model_type": config.model_type, "max_batch_size": config.max_batch_size}
