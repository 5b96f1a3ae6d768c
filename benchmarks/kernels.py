"""Per-kernel time of one decode step (or one prefill) of a CUDA library, from the profiler.

torch's profiler (CUPTI) records every kernel the TVM runtime launches; each kernel name is
matched to its KernelSpec in the library metadata, which gives the bytes a decode call must
move (weights once, activations once) and so the achieved bandwidth of weight-streaming
kernels. The CUDA graph is off while profiling, so every launch is seen as its own kernel.
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

    specs = engine.metadata.get("kernel_specs", {})
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
    rows: dict[str, dict] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        row = rows.setdefault(event.name, {"kernel": event.name, "calls": 0, "us": 0.0})
        row["calls"] += 1
        row["us"] += event.time_range.elapsed_us() / steps
    out = []
    for row in rows.values():
        row["calls"] //= steps
        base = row["kernel"].removesuffix("_kernel").rsplit("_kernel", 1)[0]
        spec = specs.get(base)
        if spec is not None:
            row["op"] = spec["op"]
            if phase == "decode" and row["calls"]:
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
