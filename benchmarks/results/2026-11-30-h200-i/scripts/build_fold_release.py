"""Build the 7B O2 library with fold_norms=1 where the named folded consumers are released at
their producer's start instead of its end: `qkv` (rms_q_linear, behind down) and/or `glu`
(rms_linear_silu_mul, behind o_proj).

    python build_fold_release.py OUT.so qkv|glu|qkv,glu
"""
import sys
from pathlib import Path

from mlcc.backends.cuda import gemv_tma
from mlcc.interface.compile import compile_model

OPS = {"qkv": "rms_q_linear", "glu": "rms_linear_silu_mul"}
chosen = {OPS[w] for w in sys.argv[2].split(",")}
plain = gemv_tma.released_early


def released_early(spec):
    kind = dict(spec.attrs).get(gemv_tma.ATTR)
    return plain(spec) or (kind == gemv_tma.BEHIND_FOLD and spec.op in chosen)


gemv_tma.released_early = released_early
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda",
              opt="O2;fold_norms=1", overrides="max_batch_size=16")
