"""Timing probe of the default 7B library (O2): for 8 consecutive layers of one decode step,
thread 0 of every block of the TMA GEMVs (qkv, o_proj, down) and of the decode attention
records %globaltimer (ns) at points of its work into a device array; the kernel's launch 16
layers later prints them (so the recorded layers run undisturbed by printing). Results are
the default's.

    python build_gemv_timeline.py OUT.so [FIRST]

A kernel's launches are counted from the library's load (block 0 counts its launch at its
end); FIRST (default 32 * 60: the 61st decode step's first layer) is the first recorded. Lines:
`TG n k launch block start wait staged c0 .. c7 end` for a GEMV (chunks landed; unused 0),
`TA 0 0 launch block start wait staged walked merged end 0 .. 0` for the attention (blocks
with work).
"""
import dataclasses
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import decode_attention, gemv_tma
from mlcc.backends.cuda.kernels import GRID_WAIT
from mlcc.interface.compile import compile_model

FIRST = int(sys.argv[2]) if len(sys.argv) > 2 else 32 * 60
LAYERS, SLOTS, BLOCKS = 8, 14, 512
HELPER = """#ifndef MLCC_TL_HELPER
#define MLCC_TL_HELPER
__device__ __forceinline__ unsigned long long mlcc_gt() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif
"""


def _head(name: str, src: str, head: str) -> tuple[str, int]:
    """The source with the probe's globals before the device function `head` and its first
    lines (start stamp, launch number, stamp slots); returns it."""
    at = src.rindex("\n", 0, src.index(head)) + 1
    opening = src.index("{", src.index(")", src.index(head))) + 1
    return (src[:at] + HELPER + f"__device__ unsigned int {name}_tlc;\n"
            f"__device__ unsigned long long {name}_tls[{LAYERS * BLOCKS * SLOTS}];\n"
            + src[at:opening]
            + f"\n  unsigned long long ts[{SLOTS}] = {{0}};\n  ts[0] = mlcc_gt();\n"
            f"  const unsigned tn = *(volatile unsigned*)&{name}_tlc;\n" + src[opening:])


def _report(name: str, tag: str) -> str:
    """Keep the stamps of a recorded launch, print them all 16 launches later, count."""
    return (f"  if (threadIdx.x == 0) {{\n"
            f"    ts[{SLOTS - 1}] = mlcc_gt();\n"
            f"    if (tn >= {FIRST}u && tn < {FIRST + LAYERS}u && blockIdx.x < {BLOCKS})\n"
            f"      for (int q = 0; q < {SLOTS}; ++q)\n"
            f"        {name}_tls[((tn - {FIRST}u) * {BLOCKS} + blockIdx.x) * {SLOTS} + q] = ts[q];\n"
            f"    if (tn == {FIRST + 16}u && blockIdx.x == 0)\n"
            f"      for (int e = 0; e < {LAYERS * BLOCKS}; ++e) {{\n"
            f"        const unsigned long long* v = {name}_tls + e * {SLOTS};\n"
            f"        if (v[0]) printf(\"{tag} %d %d %llu %llu %llu %llu %llu %llu %llu %llu %llu "
            f"%llu %llu %llu %llu\\n\", {FIRST} + e / {BLOCKS}, e % {BLOCKS}, v[0], v[1], v[2], "
            f"v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[13]);\n"
            f"      }}\n"
            f"    if (blockIdx.x == 0) atomicAdd(&{name}_tlc, 1u);\n  }}\n")


plain_gemv = gemv_tma.gemv_tma_kernel


def gemv(s, name, cfg=None):
    k = plain_gemv(s, name, cfg)
    src = _head(name, k.device_source, f"int {name}_dev(")
    assert src.count(GRID_WAIT) == 1
    src = src.replace(GRID_WAIT, GRID_WAIT + " ts[1] = mlcc_gt();")
    loop = "  for (int c = 0; c < nchunks; ++c) {\n    mlcc_chain_wait(bars + 8 * c, 0u);\n"
    assert src.count(loop) == 1
    src = src.replace(loop, "  ts[2] = mlcc_gt();\n" + loop
                      + "    if (c < 8) ts[3 + c] = mlcc_gt();\n")
    end = src.rindex("  return 0;\n}")
    src = src[:end] + _report(name, f"TG {s.n} {s.k}") + src[end:]
    return dataclasses.replace(k, device_source=src)


plain_attn = decode_attention.gen_decode_attention


def attention(spec, name, *args, **kwargs):
    k = plain_attn(spec, name, *args, **kwargs)
    src = _head(name, k.device_source, f"int {name}_decode(")
    assert src.count(GRID_WAIT) == 1 and src.count("  float qr[") == 1
    src = src.replace(GRID_WAIT, GRID_WAIT + " ts[1] = mlcc_gt();")
    src = src.replace("  float qr[", "  ts[2] = mlcc_gt();\n  float qr[")
    src = src.replace("  __shared__ float part_m[", "  ts[3] = mlcc_gt();\n  __shared__ float part_m[")
    report = _report(name, "TA 0 0")
    for cond in ("active == 1", "!last_s"):
        old = f"if ({cond}) return 0;"
        assert src.count(old) == 1
        src = src.replace(old, f"if ({cond}) {{\n  ts[4] = mlcc_gt();\n{report}  return 0; }}")
    end = src.rindex("  return 0;\n}")
    src = src[:end] + "  ts[4] = mlcc_gt();\n" + report + src[end:]
    return dataclasses.replace(k, device_source=src)


gemv_tma.gemv_tma_kernel = gemv
decode_attention.gen_decode_attention = attention
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
