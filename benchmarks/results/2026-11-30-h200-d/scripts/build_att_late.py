"""Build the default 7B library (O2) with the decode attention releasing the o_proj GEMV after
its walk over the positions (before the merge) instead of at its start.

    python build_att_late.py OUT.so
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, decode_attention
from mlcc.interface.compile import compile_model

walk = decode_attention._walk


def walk_then_release(*args, **kwargs):
    return walk(*args, **kwargs) + "  mlcc_grid_launch();  // o_proj may be placed now\n"


original = codegen.early_release


def early_release(plans, built):
    return frozenset(f for f in original(plans, built) if not f.endswith("_decode"))


decode_attention._walk = walk_then_release
codegen.early_release = early_release
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
