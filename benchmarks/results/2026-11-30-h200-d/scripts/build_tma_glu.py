"""Build the default 7B library (O2) with the gate_up + silu_mul GEMV behind the second norm on
the TMA GEMV's GLU mode (gemv_tma.TMA_GLU, on by default since call 10) at DEPTH chunks in
flight (call 9: glu3.so with 3, glu2.so with 2; 2 is now the default, GLU_DEPTH).

    python build_tma_glu.py OUT.so DEPTH
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import gemv_tma
from mlcc.interface.compile import compile_model

gemv_tma.TMA_GLU = True
kernel = gemv_tma.gemv_tma_glu_kernel
gemv_tma.gemv_tma_glu_kernel = lambda s, name, glu: kernel(s, name, glu, int(sys.argv[2]))
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
