"""Decode tok/s of several 7B libraries as run_h200.py measures it (greedy through
engine.decode_greedy with the CUDA graph, the GPU a step ahead of the host; 128 steps after a
32-token prompt), the libraries taking turns round by round in one process, then each one's
per-kernel breakdown of a decode step (no graph, benchmarks.kernels.kernel_breakdown):

    python pipelined_ab.py PARAMS LIB [LIB ...] [--rounds 10] [--no-breakdown]
"""
import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.kernels import kernel_breakdown
from mlcc.runtime_check.compiled import CompiledEngine

parser = argparse.ArgumentParser()
parser.add_argument("params", type=Path)
parser.add_argument("libs", type=Path, nargs="+")
parser.add_argument("--rounds", type=int, default=10)
parser.add_argument("--no-breakdown", action="store_true")
args = parser.parse_args()
prompt = np.random.default_rng(0).integers(0, 32000, 32).tolist()
engines = {lib.name: CompiledEngine(lib, args.params, device="cuda") for lib in args.libs}
names = list(engines)
rates = {name: [] for name in names}


def decode_run(engine, steps=128):
    engine.reset()
    first = engine.append(prompt, on_device=True).argmax()
    start = time.perf_counter()
    engine.decode_greedy(first, steps)
    return steps / (time.perf_counter() - start)


for name in names:
    decode_run(engines[name])
for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
        rates[name].append(decode_run(engines[name]))
base = None
print("| library | decode tok/s (median of rounds) | range | ratio to first |")
print("|---|---:|---|---:|")
for name in names:
    v = np.array(rates[name])
    med = float(np.median(v))
    base = base or med
    print(f"| {name} | {med:.1f} | {v.min():.1f}-{v.max():.1f} | {med / base:.3f}x |")
for name in [] if args.no_breakdown else names:
    rows = kernel_breakdown(engines[name], [1 + i for i in range(32)], steps=16)
    total = sum(row["us"] for row in rows)
    print(f"\n## {name}: {total:.1f} us of kernels a step (no graph)")
    for row in rows[:8]:
        print(f"{row['kernel'][:40]:40s} {row.get('op', ''):22s} calls {row['calls']:3d} "
              f"{row['us']:8.1f} us  {row.get('gb_s', 0):7.0f} GB/s")
