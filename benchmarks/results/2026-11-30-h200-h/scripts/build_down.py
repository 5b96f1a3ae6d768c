"""With scripts/tma_pre.patch applied (gemv_tma.TmaConfig.pre; `git apply` it first):
Build the default 7B library (O2) with the down GEMV's TMA configuration changed
(gemv_tma.TmaConfig of the GEMV behind the gate_up + silu_mul GEMV): PRE chunks issued before
the row is staged ('-': all, the default), DEPTH chunks in flight, CHUNK features a chunk
('-' keeps the default's):

    python build_down.py OUT.so PRE DEPTH CHUNK
"""
import dataclasses
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import gemv_tma
from mlcc.interface.compile import compile_model


def arg(i):
    return None if sys.argv[i] == "-" else int(sys.argv[i])


pre, depth, chunk = arg(2), arg(3), arg(4)
plain = gemv_tma.config_of


def config_of(spec):
    cfg = plain(spec)
    if dict(spec.attrs).get(gemv_tma.ATTR) != gemv_tma.BEHIND_GLU:
        return cfg
    return dataclasses.replace(cfg, pre=pre, depth=depth or cfg.depth, chunk=chunk or cfg.chunk)


gemv_tma.config_of = config_of
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
