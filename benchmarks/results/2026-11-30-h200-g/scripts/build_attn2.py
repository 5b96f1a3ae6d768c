"""Build the default 7B library (O2) with the decode attention's early rotary angles and
staged second round set (mlcc.backends.cuda.decode_attention.EARLY_ANGLES, STAGED_ROUNDS,
read when its kernel is generated):

    python build_attn2.py OUT.so EARLY(0|1|2) STAGED(0|1) [MERGE(0|1)]

(with scripts/attention_variants.patch applied; MERGE sets WARP_MERGE, the patch's value if
left out)
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import decode_attention
from mlcc.interface.compile import compile_model

decode_attention.EARLY_ANGLES = int(sys.argv[2])
decode_attention.STAGED_ROUNDS = int(sys.argv[3])
if len(sys.argv) > 4:
    decode_attention.WARP_MERGE = bool(int(sys.argv[4]))
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
