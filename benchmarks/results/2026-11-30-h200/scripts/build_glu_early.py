"""7B library whose decode GLU GEMV (persistent, gate_up + silu_mul) releases the down GEMV at
its start, optionally with B blocks an SM (experiment; build-time patch only).
argv: output.so [B]"""
import dataclasses, sys, time
from pathlib import Path
from mlcc.backends.cuda import codegen, glu
original = codegen.early_release
def early_release(plans, built):
    extra = {f"{k.name}_dev" for k in built if "linear_silu_mul" in k.name and "xs_rows" in k.device_source}
    print("released at their start:", sorted(extra))
    return original(plans, built) | frozenset(extra)
codegen.early_release = early_release
if len(sys.argv) > 2:
    config = glu.glu_gemv_config
    glu.glu_gemv_config = lambda n, k: dataclasses.replace(config(n, k), blocks_per_sm=int(sys.argv[2]))
    print("GLU blocks an SM:", sys.argv[2])
from mlcc.interface.compile import compile_model
t = time.time()
compile_model('llama2_7b', Path(sys.argv[1]), quantization='q4f16_1', device='cuda', opt='O2', overrides='max_batch_size=16')
print(f"built in {time.time() - t:.1f} s")
