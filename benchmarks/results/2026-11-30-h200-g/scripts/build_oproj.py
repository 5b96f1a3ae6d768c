"""Build the default 7B library (O2) with the o_proj TMA GEMV's copies DEPTH chunks in flight
(gemv_tma.TmaConfig.depth of the 4096-feature GEMV behind the decode attention; 0 for the
default's) and the decode attention's EARLY_ANGLES and WARP_MERGE set:

    python build_oproj.py OUT.so DEPTH EARLY WARP_MERGE
"""
import dataclasses
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import decode_attention, gemv_tma
from mlcc.interface.compile import compile_model

depth = int(sys.argv[2])
decode_attention.EARLY_ANGLES = int(sys.argv[3])
decode_attention.WARP_MERGE = bool(int(sys.argv[4]))
decode_attention.STAGED_ROUNDS = 0
plain = gemv_tma.config_of


def config_of(spec):
    cfg = plain(spec)
    s = gemv_tma.LinearShape(spec)
    if depth and dict(spec.attrs).get(gemv_tma.ATTR) == gemv_tma.BEHIND_LIGHT and s.n == 4096:
        return dataclasses.replace(cfg, depth=depth)
    return cfg


gemv_tma.config_of = config_of
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
