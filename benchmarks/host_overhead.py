"""Per-token host overhead of a decode step: the time spent outside the library's kernels.

The kernels of an entry cannot be timed apart from the entry that calls them, so the overhead is
put together from three timings, each the median of several batches of calls:

- `ffi_call_us`: one call of the library's `mlcc_metadata_nbytes` (no arguments, returns an
  int): the floor of any Python -> library call.
- `marshal_us`: one call of a compiled function that does nothing but takes exactly the decode
  entry's arguments (same count, shapes and dtypes) and checks them as an entry does: the cost of
  passing and checking ~N tensors.
- `python_us`: `CompiledEngine.decode` minus a direct call of the decode entry with prebuilt
  arguments at the same position: the runtime's own Python work per token (checks, the token and
  position tensors, copying the logits to NumPy).

`host_us = marshal_us + python_us` is reported as the per-token host overhead; the host code
inside the compiled entry (argument unpacking aside, a few dozen direct kernel calls) is counted
with the kernels, since it cannot be separated without timing inside the library.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from benchmarks.stats import summarize

BATCHES = 5


def per_call_seconds(call: Callable[[], object], calls: int, batches: int = BATCHES,
                     budget: float | None = None) -> float:
    """Median over `batches` of the mean time of one call in a batch of `calls`; with a
    `budget` in seconds, fewer calls per batch when one call is slow."""
    start = time.perf_counter()
    call()  # first call: lazy loading, caches
    first = time.perf_counter() - start
    if budget is not None:
        calls = max(1, min(calls, int(budget / batches / max(first, 1e-9))))
    means = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        means.append((time.perf_counter() - start) / calls)
    return summarize(means).median


def build_noop(args: list) -> Callable | None:
    """A compiled function taking `args` (TVM tensors) that does nothing; None without the TVM
    compiler (a runtime-only install)."""
    try:
        import tvm
        from tvm import tirx
    except ImportError:
        return None
    if not hasattr(tvm, "compile"):
        return None
    params = [tirx.decl_buffer(tuple(a.shape), str(a.dtype), name=f"arg{i}")
              for i, a in enumerate(args)]
    func = tirx.PrimFunc(params, tirx.Evaluate(0)).with_attr("global_symbol", "noop")
    return tvm.compile(tvm.IRModule({"noop": func}), target="llvm")["noop"]


def decode_args(engine, token: int, position: int) -> list:
    """The arguments `CompiledEngine` passes to the decode entry, prebuilt once."""
    import tvm

    tokens = tvm.runtime.tensor(np.array([token], np.int32), engine.device)
    seq_info = tvm.runtime.tensor(np.array([position, 0], np.int32), engine.device)
    return [tokens, seq_info, engine._tables[engine.sequence], engine.kv_pool, *engine.params,
            engine.logits, engine.workspace]


def measure_host_overhead(engine, prompt: list[int], budget: float, step_calls: int = 20) -> dict:
    """The timings of the module docstring for decode steps right after `prompt`."""
    engine.prefill_logits(prompt)
    position = len(prompt)
    token = int(prompt[-1])
    args = decode_args(engine, token, position)
    metadata_size = engine.lib["mlcc_metadata_nbytes"]
    ffi = per_call_seconds(metadata_size, 2000)
    noop = build_noop(args)
    marshal = per_call_seconds(lambda: noop(*args), 2000) if noop is not None else None
    entry = engine.lib["decode"]
    direct = per_call_seconds(lambda: entry(*args), step_calls, budget=budget / 2)

    def engine_step() -> None:
        engine.lengths[engine.sequence] = position  # same position as the direct call
        engine.decode(token)

    through_engine = per_call_seconds(engine_step, step_calls, budget=budget / 2)
    python = max(0.0, through_engine - direct)
    result = {
        "decode_step_us": through_engine * 1e6,
        "direct_entry_us": direct * 1e6,
        "ffi_call_us": ffi * 1e6,
        "marshal_us": None if marshal is None else marshal * 1e6,
        "python_us": python * 1e6,
        "arguments": len(args),
        "position": position,
    }
    host = python + (marshal or 0.0)
    result["host_us"] = host * 1e6
    result["host_percent"] = 100.0 * host / through_engine if through_engine else None
    return result
