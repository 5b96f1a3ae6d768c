"""What the CUDA microbenchmarks share: timing library kernels on the GPU machine, and loading
an earlier commit's version of a module to build its kernels beside today's.

`replay_us(torch, launch, calls, warm, repeats)`: `launch(i)` issues the i-th call (cycling
through input copies however the caller likes). The first `warm` calls run eagerly (modules
loaded, memory touched), then `calls` of them are captured as one CUDA graph through torch, so
no Python and no launch gaps sit between them, and the graph is replayed once unmeasured and
`repeats` times between CUDA events. The result is the median microseconds per call.

`module_at(commit, path, folder)`: the file `path` of `commit` (git show), written into `folder`
and imported as a module of its own.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


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


def module_at(commit: str, path: str, folder: Path) -> ModuleType:
    text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    name = Path(path).stem + "_baseline"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(text)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
