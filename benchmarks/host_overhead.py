"""Per-token host overhead of a decode step: the time spent outside the library's kernels.

The kernels of an entry cannot be timed apart from the entry that calls them, so a decode call
is timed once as it is and once with the library's decode entry swapped for a compiled function
that takes exactly the same arguments (count, shapes, dtypes), checks them as an entry does, and
does nothing else. Each figure is the median of several batches of calls:

- `host_us`: `CompiledEngine.decode` with the no-op entry: everything a decode step costs besides
  the entry's body (the runtime's checks, the token and position tensors, passing and checking
  the arguments, copying the logits to NumPy). This is the per-token host overhead reported.
- `marshal_us`: a direct call of the no-op entry with prebuilt arguments: the part of `host_us`
  spent passing and checking the arguments.
- `ffi_call_us`: one call of the library's `mlcc_metadata_nbytes` (no arguments): the floor of
  any call into the library.
- `decode_step_us` and `direct_entry_us`: `CompiledEngine.decode` as it is, and the real decode
  entry called directly with prebuilt arguments; `host_percent` is host_us / decode_step_us.

Host code inside the entry (a few dozen direct kernel calls) counts as kernel time. The no-op is
built with the TVM compiler; a runtime-only install reports no host figures.
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

    def engine_step() -> None:
        engine.lengths[engine.sequence] = position  # every call at the same position
        engine.decode(token)

    entry = engine._decode
    result = {
        "ffi_call_us": per_call_seconds(engine.lib["mlcc_metadata_nbytes"], 2000) * 1e6,
        "direct_entry_us": per_call_seconds(lambda: entry(*args), step_calls,
                                            budget=budget / 2) * 1e6,
        "decode_step_us": per_call_seconds(engine_step, step_calls, budget=budget / 2) * 1e6,
        "arguments": len(args),
        "position": position,
        "marshal_us": None, "host_us": None, "host_percent": None,
    }
    noop = build_noop(args)
    if noop is None:
        return result
    result["marshal_us"] = per_call_seconds(lambda: noop(*args), 2000) * 1e6
    engine._decode = noop
    try:
        result["host_us"] = per_call_seconds(engine_step, 2000) * 1e6
    finally:
        engine._decode = entry
    result["host_percent"] = 100.0 * result["host_us"] / result["decode_step_us"]
    return result
