"""Per-kernel decode breakdown (no graph) of each library given. argv: params lib..."""
import sys
from pathlib import Path
from benchmarks.kernels import kernel_breakdown
from mlcc.runtime_check.compiled import CompiledEngine
params = Path(sys.argv[1])
for lib in sys.argv[2:]:
    engine = CompiledEngine(Path(lib), params, device="cuda")
    rows = kernel_breakdown(engine, [1 + i for i in range(32)], steps=16)
    total = sum(r["us"] for r in rows)
    print(f"## {Path(lib).name}: {total:.1f} us of kernels a step")
    for r in rows:
        print(f"{r['kernel'][:40]:40s} {r.get('op', ''):22s} calls {r['calls']:3d}  {r['us']:8.1f} us  span {r['span_us']:8.1f}  {r.get('gb_s', 0):7.0f} GB/s")
    del engine
