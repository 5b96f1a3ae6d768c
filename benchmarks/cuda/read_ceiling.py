"""How fast the GEMV benchmark harness can read the decode GEMVs' bytes at all.

Three GEMV designs (block, persistent, tensor-core) stop at 2.7-2.9 TB/s on the large Llama-2-7B
shapes (benchmarks/results/2026-11-29-h200). This measures the ceiling the same harness allows:
a read-only kernel that streams exactly the packed weights and scales of each shape (128-bit
loads, four in flight per thread, a grid-stride loop over all SMs) and does nothing with them
but fold them into one word that is stored only if it matches an impossible value, timed by
gemv_sweep.time_variant (48 calls in a CUDA graph over weight copies beyond L2).

    python benchmarks/cuda/read_ceiling.py build .device/ceiling            # here
    python benchmarks/cuda/read_ceiling.py run .device/ceiling OUT.json     # GPU machine

If it reads near 4 TB/s, the GEMVs leave bandwidth on the table; if it also stops near
2.9 TB/s, the ceiling is the kernels' size (ramp up and down of a 20 us kernel), not their code.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import SHAPES, time_variant, weight_copies

BLOCKS_PER_SM = (4, 8)
SMS = 132


def kernel(n: int, k: int, blocks_per_sm: int):
    from mlcc.backends.cuda.kernels import CudaKernel, launcher, signature

    name = f"read_{n}_{k}_b{blocks_per_sm}"
    buffers = [("x", (1, k), "float16"), ("qw", (n, k // 8), "uint32"),
               ("qs", (n, k // 32), "float16"), ("y", (1, n), "float16")]
    words = n * k // 8 // 4  # 16-byte chunks of the packed weights
    scales = n * k // 32 * 2 // 16  # 16-byte chunks of the scales
    threads = 256
    grid = blocks_per_sm * SMS
    stride = grid * threads
    body = f"""{signature(name, buffers, ("y",), [])} {{
  const uint4* w = reinterpret_cast<const uint4*>(qw);
  const uint4* s = reinterpret_cast<const uint4*>(qs);
  unsigned int acc = 0u;
  long long i = (long long)blockIdx.x * {threads} + threadIdx.x;
  for (; i + {3 * stride} < {words}; i += {4 * stride}) {{
    const uint4 a = __ldg(w + i), b = __ldg(w + i + {stride});
    const uint4 c = __ldg(w + i + {2 * stride}), d = __ldg(w + i + {3 * stride});
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w
         ^ d.x ^ d.y ^ d.z ^ d.w;
  }}
  for (; i < {words}; i += {stride}) {{ const uint4 a = __ldg(w + i); acc ^= a.x ^ a.y ^ a.z ^ a.w; }}
  for (long long j = (long long)blockIdx.x * {threads} + threadIdx.x; j < {scales}; j += {stride}) {{
    const uint4 a = __ldg(s + j);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }}
  if (acc == 0x9E3779B9u) y[threadIdx.x % {n}] = __float2half(1.f);  // keeps the loads alive
  return 0;
}}
"""
    return CudaKernel(name, body, launcher(name, buffers, (f"T.int64({grid})",), threads, []))


def build(folder: Path) -> None:
    from mlcc.backends.cuda.codegen import compile_library

    folder.mkdir(parents=True, exist_ok=True)
    chosen = [{"n": n, "k": k, "blocks_per_sm": b, "name": f"read_{n}_{k}_b{b}"}
              for n, k in SHAPES for b in BLOCKS_PER_SM]
    start = time.perf_counter()
    compile_library([kernel(v["n"], v["k"], v["blocks_per_sm"]) for v in chosen], "", "",
                    folder / "read_ceiling.so")
    (folder / "variants.json").write_text(json.dumps(chosen, indent=1))
    print(f"built {len(chosen)} kernels in {time.perf_counter() - start:.1f} s")


def run(folder: Path, out: Path) -> None:
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    dev = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / "read_ceiling.so"))
    chosen = json.loads((folder / "variants.json").read_text())
    rng = np.random.default_rng(0)
    rows = []
    for n, k in sorted({(v["n"], v["k"]) for v in chosen}):
        copies = weight_copies(n, k, rng, dev)
        x = tvm.runtime.tensor(np.zeros((1, k), np.float16), dev)
        y = tvm.runtime.empty((1, n), "float16", dev)
        for v in [v for v in chosen if (v["n"], v["k"]) == (n, k)]:
            us = time_variant(torch, lib[v["name"]], [x], copies, y)
            gb_s = (n * k // 2 + n * k // 16) / (us * 1e-6) / 1e9
            rows.append(dict(v, us=us, gb_s=gb_s))
            print(f"{v['name']:32s} {us:7.2f} us {gb_s:6.0f} GB/s")
        del copies
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "command": "python " + " ".join(sys.argv), "results": rows},
                              indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
