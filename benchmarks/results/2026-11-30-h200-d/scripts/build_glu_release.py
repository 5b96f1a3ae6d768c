"""Build the default 7B library (O2) with the GLU GEMV (the TMA GEMV's GLU mode, one block an
SM filling its shared memory) releasing the down GEMV at its start, so that down's blocks take
each SM as its GLU block leaves.

    python build_glu_release.py OUT.so
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen
from mlcc.interface.compile import compile_model

original = codegen.early_release


def early_release(plans, built):
    extra = frozenset(f for k in built if k.name.endswith("_linear_silu_mul")
                      for f in k.device_functions())
    print("released at their start too:", sorted(extra))
    return original(plans, built) | extra


codegen.early_release = early_release
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
