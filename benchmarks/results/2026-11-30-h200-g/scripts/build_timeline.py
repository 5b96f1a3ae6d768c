"""Timing probe of the default 7B library (O2): the decode attention prints, from thread 0 of
every working block at a few positions, how long each of its phases took (clock64 cycles) and
when it started, passed its wait and ended (%globaltimer, ns). Results are the default's; the
prints delay only the steps at those positions.

    python build_timeline.py OUT.so [EARLY STAGED MERGE]

(EARLY, STAGED and MERGE set decode_attention.EARLY_ANGLES, STAGED_ROUNDS and WARP_MERGE, as
build_attn2.py, with scripts/attention_variants.patch applied; without them: the default.)

Each line: `TL exit pool block split active start>wait wait>staged staged>walked walked>exit
g_start g_wait g_exit`, exit 1 = the only split wrote the output, 2 = a split that handed its
state over, 3 = the split that merged.
"""
import dataclasses
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import decode_attention
from mlcc.backends.cuda.kernels import GRID_WAIT
from mlcc.interface.compile import compile_model

POSITIONS = (40, 100, 140, 1000)
HELPER = """#ifndef MLCC_TL_HELPER
#define MLCC_TL_HELPER
__device__ __forceinline__ unsigned long long mlcc_gt() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif
"""


def report(kind: int) -> str:
    hit = " || ".join(f"pos == {p}" for p in POSITIONS)
    return (f"{{ if (threadIdx.x == 0 && ({hit})) printf(\"TL {kind} %d %d %d %d %lld %lld %lld "
            "%lld %llu %llu %llu\\n\", (int)(((unsigned long long)pool >> 12) & 0xfffff), "
            "(int)blockIdx.x, split, active, tl1 - tl0, tl2 - tl1, tl3 - tl2, clock64() - tl3, "
            "g0, g1, mlcc_gt()); return 0; }")


plain_gen = decode_attention.gen_decode_attention


def gen(*args, **kwargs):
    k = plain_gen(*args, **kwargs)
    src = k.device_source
    assert src.count(GRID_WAIT) == 1 and src.count("  float qr[") == 1
    src = src.replace("  __shared__ float q_s[",
                      "  const long long tl0 = clock64(); const unsigned long long g0 = mlcc_gt();\n"
                      "  __shared__ float q_s[", 1)
    src = src.replace(GRID_WAIT, GRID_WAIT + " const long long tl1 = clock64();"
                      " const unsigned long long g1 = mlcc_gt();")
    src = src.replace("  float qr[", "  const long long tl2 = clock64();\n  float qr[")
    src = src.replace("  __shared__ float part_m[",
                      "  const long long tl3 = clock64();\n  __shared__ float part_m[")
    for cond, kind in (("active == 1", 1), ("!last_s", 2)):
        old = f"if ({cond}) return 0;"
        assert src.count(old) == 1
        src = src.replace(old, f"if ({cond}) {report(kind)}")
    at = src.rindex("  return 0;\n}")
    src = src[:at] + "  " + report(3) + "\n}" + src[at + len("  return 0;\n}"):]
    return dataclasses.replace(k, device_source=HELPER + src)


decode_attention.gen_decode_attention = gen
if len(sys.argv) > 2:
    decode_attention.EARLY_ANGLES, decode_attention.STAGED_ROUNDS = map(int, sys.argv[2:4])
    decode_attention.WARP_MERGE = bool(int(sys.argv[4]))
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
