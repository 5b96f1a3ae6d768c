"""Build the default 7B library (O2) with other consumer warps on the TMA GEMVs: `light` for
the GEMVs behind a latency-bound kernel (qkv behind the norm, o_proj behind the attention),
`down` for the one behind the GLU; each KS,TEAMS,CHUNK (depth as the default's) or `-` for
the default. With `qkv` or `oproj` after them only that shape takes the light change.

    python build_warps.py OUT.so LIGHT DOWN [qkv|oproj]
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import gemv_tma
from mlcc.interface.compile import compile_model


def parse(text):
    return None if text == "-" else tuple(int(v) for v in text.split(","))


light, down = parse(sys.argv[2]), parse(sys.argv[3])
only = {"qkv": 12288, "oproj": 4096}.get(sys.argv[4]) if len(sys.argv) > 4 else None
plain = gemv_tma.config_of


def config_of(spec):
    cfg = plain(spec)
    s = gemv_tma.LinearShape(spec)
    where = dict(spec.attrs).get(gemv_tma.ATTR)
    pick = light if where == gemv_tma.BEHIND_LIGHT else down
    if pick is None or (where == gemv_tma.BEHIND_LIGHT and only not in (None, s.n)):
        return cfg
    ks, teams, chunk = pick
    return gemv_tma.TmaConfig(ks, teams, chunk, depth=cfg.depth)


gemv_tma.config_of = config_of
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
