"""Build a 7B library whose one-shot decode GEMVs of the shapes named (argv[3], e.g.
4096x4096,4096x11008) load their activation row ahead of their weights (row_first).

    python build_row_first.py OUT.so 'O2' 4096x4096,4096x11008
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import linear
from mlcc.interface.compile import compile_model

shapes = {tuple(int(d) for d in item.split("x")) for item in sys.argv[3].split(",")}
original = linear.gemv_q4_kernel


def gemv_q4_kernel(s, name, *args, **kwargs):
    plain = (kwargs.get("staging") is None and kwargs.get("norm") is None
             and not kwargs.get("residual") and s.static_rows == 1)
    if plain and (s.n, s.k) in shapes and kwargs.get("dot") == linear.DP2A:
        print(f"{name}: {s.n} x {s.k}, row first")
        kwargs["row_first"] = True
    return original(s, name, *args, **kwargs)


linear.gemv_q4_kernel = gemv_q4_kernel
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda",
              opt=sys.argv[2], overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
