"""7B library with folded norms whose GEMVs ahead (q_linear_residual) release the next GEMV at
their start (experiment; build-time patch only). argv: output.so"""
import sys, time
from pathlib import Path
from mlcc.backends.cuda import codegen
original = codegen.early_release
def early_release(plans, built):
    extra = {f"{k.name}_dev" for k in built if "q_linear_residual" in k.name}
    print("released at their start:", sorted(extra))
    return original(plans, built) | frozenset(extra)
codegen.early_release = early_release
from mlcc.interface.compile import compile_model
t = time.time()
compile_model('llama2_7b', Path(sys.argv[1]), quantization='q4f16_1', device='cuda', opt='O2;fold_norms=1', overrides='max_batch_size=16')
print(f"built in {time.time() - t:.1f} s")
