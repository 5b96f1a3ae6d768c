"""Build the default 7B library (O2) with other block shapes of the decode attention
(mlcc.backends.cuda.decode_attention's module constants, read when its kernel is generated):

    python build_attn.py OUT.so WARPS UNROLL MAX_SPLITS SOLO
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import decode_attention
from mlcc.interface.compile import compile_model

warps, unroll, splits, solo = (int(v) for v in sys.argv[2:6])
decode_attention.WARPS, decode_attention.UNROLL = warps, unroll
decode_attention.MAX_SPLITS, decode_attention.SOLO = splits, solo
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
