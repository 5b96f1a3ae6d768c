"""Per-kernel time of one decode step (or one prefill) of a CUDA library, from the profiler.

torch's profiler (CUPTI) records every kernel the TVM runtime launches; each kernel name is
matched to its KernelSpec in the library metadata, which gives the bytes a decode call must
move (weights once, activations once) and so the achieved bandwidth of weight-streaming
kernels. The CUDA graph is off while profiling, so every launch is seen as its own kernel.

A kernel's time is what it adds to the stream: from its start, or the end of the work ahead of
it if that is later, to its end. With programmatic dependent launch (the `pdl` knob) a kernel
starts before the one ahead has finished and waits inside; counting its whole span would charge
it with that wait (a one-row norm released early would show the GEMV before it). The span is
kept as `span_us`. Without pdl the two are equal.
"""

from __future__ import annotations

import numpy as np


def spec_bytes(spec: dict) -> int:
    """Bytes a kernel must move in one decode call (weights once, activations once)."""
    total = 0
    for shape, dtype in spec["inputs"] + spec["outputs"]:
        count = int(np.prod([d if isinstance(d, int) else 1 for d in shape]))
        total += count * np.dtype(dtype).itemsize
    if spec["op"] == "q_embedding":  # reads one row of the table, not the table
        total = sum(int(np.prod(s[1:])) * np.dtype(d).itemsize for s, d in spec["inputs"][:2])
    return total


def kernel_breakdown(engine, prompt: list[int], phase: str = "decode",
                     steps: int = 8) -> list[dict]:
    """Per kernel: calls and microseconds per decode step after `prompt` (or per prefill of
    `prompt`), with bytes and GB/s for decode; slowest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graph = engine.cudagraph
    engine.cudagraph = False
    logits = engine.prefill_logits(prompt)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            if phase == "prefill":
                engine.prefill_logits(prompt)
            else:
                logits = engine.decode(int(np.argmax(logits)))
        torch.cuda.synchronize()
    engine.cudagraph = graph
    events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA]
    return aggregate(events, steps, engine.metadata.get("kernel_specs", {}), phase)


def aggregate(events: list[tuple[str, float, float]], steps: int, specs: dict,
              phase: str = "decode") -> list[dict]:
    """Rows of kernel_breakdown from (name, start us, end us) of every GPU event of one stream
    over `steps` steps: calls and time per step (own time, see the module docstring), and for
    decode the bytes and GB/s of kernels with a spec; slowest first."""
    rows: dict[str, dict] = {}
    frontier = float("-inf")  # the latest end of any earlier event
    for name, start, end in sorted(events, key=lambda e: (e[1], e[2])):
        row = rows.setdefault(name, {"kernel": name, "calls": 0, "us": 0.0, "span_us": 0.0})
        row["calls"] += 1
        row["us"] += max(0.0, end - max(start, frontier)) / steps
        row["span_us"] += (end - start) / steps
        frontier = max(frontier, end)
    out = []
    for row in rows.values():
        row["calls"] //= steps
        base = row["kernel"].removesuffix("_kernel").rsplit("_kernel", 1)[0]
        spec = specs.get(base)
        if spec is not None:
            row["op"] = spec["op"]
            if phase == "decode" and row["calls"] and row["us"] > 0:
                per_call = spec_bytes(spec)
                row["bytes_per_call"] = per_call
                row["gb_s"] = per_call * row["calls"] / (row["us"] * 1e-6) / 1e9
        out.append(row)
    return sorted(out, key=lambda r: -r["us"])


def weight_bytes_per_token(metadata: dict) -> int:
    """Bytes of parameters one decode step reads (one embedding row, every other tensor)."""
    total = 0
    for p in metadata["params"]:
        nbytes = int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
        if "embed_tokens" in p["name"]:
            nbytes //= p["shape"][0]
        total += nbytes
    return total
