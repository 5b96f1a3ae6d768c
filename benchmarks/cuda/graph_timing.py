"""Timing of library kernels on the GPU machine, shared by the CUDA microbenchmarks.

`replay_us(torch, launch, calls, warm, repeats)`: `launch(i)` issues the i-th call (cycling
through input copies however the caller likes). The first `warm` calls run eagerly (modules
loaded, memory touched), then `calls` of them are captured as one CUDA graph through torch, so
no Python and no launch gaps sit between them, and the graph is replayed once unmeasured and
`repeats` times between CUDA events. The result is the median microseconds per call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def replay_us(torch, launch: Callable[[int], None], calls: int, warm: int = 1,
              repeats: int = 7) -> float:
    import tvm_ffi

    for i in range(warm):
        launch(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
        for i in range(calls):
            launch(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000 / calls)
    return float(np.median(times))
