"""Build the default 7B library (O2) with the down GEMV on the TMA GEMV, released as usual when
the GLU ends (not at its start), in a given configuration, to time its parts in the decode step
(a breakdown, no A/B): `stream` copies the weights and stops (wrong results: a timing probe).

    python build_down_probe.py OUT.so KS,TEAMS,CHUNK,DEPTH [stream]
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, gemv_tma, glu
from mlcc.interface.compile import compile_model

plain_light = gemv_tma.light
gemv_tma.light = lambda spec: spec.op == glu.OP or plain_light(spec)
ks, teams, chunk, depth = (int(v) for v in sys.argv[2].split(","))
down = gemv_tma.TmaConfig(ks, teams, chunk, depth=depth,
                          stream_only=len(sys.argv) > 3 and sys.argv[3] == "stream")
plain = gemv_tma.default_config
gemv_tma.default_config = lambda s, sms=gemv_tma.SMS: (
    down if (s.n, s.k) == (4096, 11008) else plain(s, sms))
original = codegen.early_release


def early_release(plans, built):
    glu_functions = {f for k in built if k.name.endswith("_linear_silu_mul")
                     for f in k.device_functions()}
    return original(plans, built) - glu_functions


codegen.early_release = early_release
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
