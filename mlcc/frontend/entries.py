"""The entry points every architecture's IR module provides, chosen from its config.

- `prefill(tokens[seq_len])`: feeds a chunk of one sequence, returns its last logits f32[vocab];
- `decode(token[1])`: one token of one sequence, returns f32[vocab];
- `batch_decode(tokens[batch])` when max_batch_size > 1: row i is the next token of sequence i,
  returns f32[batch, vocab].

`build_entries` writes these functions around an architecture's forward pass, so every model
declares its parameters, cache and positions the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlcc import ir
from mlcc.frontend.architecture import WeightMapping

# forward(b, weights, tokens, positions, cache, n) -> the output projection [n, vocab]
Forward = Callable[[ir.FunctionBuilder, dict[str, ir.Value], ir.Value, ir.Value, ir.Value, ir.Dim],
                   ir.Value]


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


def kv_cache_type(config, dtype: str = "float32") -> ir.KVCacheType:
    """The model's KV cache: the context window, or a sliding window with optional sinks."""
    window = config.sliding_window_size if config.sliding_window_size > 0 else -1
    capacity = config.context_window_size if config.context_window_size > 0 else (
        config.sliding_window_size + config.attention_sink_size)
    return ir.KVCacheType(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                          dtype, capacity, window, config.attention_sink_size if window > 0 else 0)


def build_entries(config, mapping: WeightMapping, forward: Forward) -> ir.Module:
    """A module with the mapping's parameters (float32 until quantization) and one function per
    entry point; each feeds its tokens through `forward` and returns the logits."""
    mb = ir.ModuleBuilder(config.model_type, module_attrs(config))
    w = {p.name: mb.add_param(p.name, p.shape, "float32", kind=p.kind) for p in mapping.params}
    for fn_name, n, fn_attrs in entry_points(config):
        with mb.function(fn_name, **fn_attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(kv_cache_type(config))
            pos = b.positions(cache, n)
            b.output(b.logits(forward(b, w, tokens, pos, cache, n)))
    return mb.finish()
