"""Build the default 7B library (O2) with the qkv TMA GEMV releasing the decode attention at
its start (codegen.early_release, with pdl: the attention's blocks may then be placed beside
the GEMV's, where its shared memory fits, and issue their first loads while it runs), and the
decode attention's EARLY_ANGLES and WARP_MERGE set (attention_variants.patch):

    python build_qkv_early.py OUT.so EARLY WARP_MERGE
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, decode_attention, gemv_tma
from mlcc.interface.compile import compile_model

decode_attention.EARLY_ANGLES = int(sys.argv[2])
decode_attention.WARP_MERGE = bool(int(sys.argv[3]))
decode_attention.STAGED_ROUNDS = 0
plain = codegen.early_release


def early_release(plans, built):
    names = codegen.kernel_names(plans)
    qkv = {name for spec, name in names.items() if spec.op == "q_linear"
           and gemv_tma.marked(spec) and gemv_tma.LinearShape(spec).n == 12288}
    assert len(qkv) == 1, qkv
    last = {k.name: k.device_functions()[-1] for k in built}
    return plain(plans, built) | {last[n] for n in qkv}


codegen.early_release = early_release
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
