"""Build the default 7B library (O2) with the down GEMV behind the GLU GEMV on the TMA GEMV
too: gemv_tma.light also takes the gate_up + silu_mul call, so `mark` marks the down GEMV after
it, and codegen.early_release lets the GLU (a multi-block kernel ahead of a marked GEMV)
release it at its start. With the GLU's ring filling each SM's shared memory, down's blocks
take an SM as its GLU block leaves and copy their slice during the GLU's tail.

    python build_down_tma.py OUT.so [KS,TEAMS,CHUNK,DEPTH]     # default: default_config
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import glu, gemv_tma
from mlcc.interface.compile import compile_model

plain_light = gemv_tma.light
gemv_tma.light = lambda spec: spec.op == glu.OP or plain_light(spec)
if len(sys.argv) > 2:
    ks, teams, chunk, depth = (int(v) for v in sys.argv[2].split(","))
    down = gemv_tma.TmaConfig(ks, teams, chunk, depth=depth)
    plain = gemv_tma.default_config
    gemv_tma.default_config = lambda s, sms=gemv_tma.SMS: (
        down if (s.n, s.k) == (4096, 11008) else plain(s, sms))
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
