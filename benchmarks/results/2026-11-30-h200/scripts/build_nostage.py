"""7B library whose decode GEMVs skip staging their activation row (timing only: the results
are wrong). argv: output.so K[,K...] -- the K (row lengths) whose staging is skipped."""
import sys, time
from pathlib import Path
from mlcc.backends.cuda import gemv, intdot, linear
skip = {int(k) for k in sys.argv[2].split(",")}
original = intdot.stage_dp2a
def stage_dp2a(k, warps, norm=None):
    if k in skip:
        print("no staging at K =", k)
        return "    // staging skipped (timing experiment)\n"
    return original(k, warps, norm)
linear.stage_dp2a = gemv.stage_dp2a = stage_dp2a
from mlcc.interface.compile import compile_model
t = time.time()
compile_model('llama2_7b', Path(sys.argv[1]), quantization='q4f16_1', device='cuda', opt='O2', overrides='max_batch_size=16')
print(f"built in {time.time() - t:.1f} s")
