"""7B library whose decode GEMVs at the given K copy a pre-staged row instead of staging it
(timing only: the copy reads the fp16 row's bytes as if they were the integer-dot format, so
the results are wrong). argv: output.so K[,K...]"""
import sys, time
from pathlib import Path
from mlcc.backends.cuda import gemv, intdot, linear
skip = {int(k) for k in sys.argv[2].split(",")}
original = intdot.stage_dp2a
def stage_dp2a(k, warps, norm=None):
    if k not in skip:
        return original(k, warps, norm)
    print("copied staging at K =", k)
    words, groups = k // 8, k // 32
    return f"""    {{  // pre-staged row copied (timing experiment): K/8 uint4 words, then K/32 int2
      const uint4* src = reinterpret_cast<const uint4*>(x + r * {k}LL);
      uint4* dst = reinterpret_cast<uint4*>(xs);
      for (int i = threadIdx.x; i < {words}; i += {warps * 32}) dst[i] = src[i];
      const int2* gsrc = reinterpret_cast<const int2*>(x + r * {k}LL);
      for (int i = threadIdx.x; i < {groups}; i += {warps * 32}) xg[i] = gsrc[i];
    }}
"""
linear.stage_dp2a = gemv.stage_dp2a = stage_dp2a
from mlcc.interface.compile import compile_model
t = time.time()
compile_model('llama2_7b', Path(sys.argv[1]), quantization='q4f16_1', device='cuda', opt='O2', overrides='max_batch_size=16')
print(f"built in {time.time() - t:.1f} s")
