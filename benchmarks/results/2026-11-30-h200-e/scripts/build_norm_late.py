"""Build the default 7B library (O2) with the one-row norms releasing the GEMV after them later
than after their own wait: after their loads have returned, before the block's sum of squares
(`mid`), or after that sum, before the normalized stores (`late`). The copies of the TMA GEMV
after them then start once the norm's reads are done, so those reads never queue behind them.

    python build_norm_late.py OUT.so mid|late
"""
import re
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, toolchain
from mlcc.interface.compile import compile_model

where = sys.argv[2]
assert where in ("mid", "late")
original = codegen.install_hooks
RELEASE = toolchain.EARLY_RELEASE


def install_hooks(device_source, archs, keep_source, pdl=False, self_waiting=frozenset(),
                  early=frozenset(), min_blocks=None, after_wait=frozenset()):
    norms = frozenset(f for f in after_wait if f.endswith("rms_norm_dev"))
    for f in sorted(norms):
        start = device_source.index(f"__device__ __forceinline__ int {f}(")
        end = device_source.index("\n}", start)
        body = device_source[start:end]
        line = re.search(r"\n( *)[^\n]*mlcc_block_sum\(", body)
        at = line.start() if where == "mid" else body.index("\n", line.end())
        body = body[:at] + f"\n{line.group(1)}{RELEASE}" + body[at:]
        device_source = device_source[:start] + body + device_source[end:]
        print(f"{f}: releases {where}")
    original(device_source, archs, keep_source, pdl, self_waiting, early, min_blocks,
             after_wait - norms)


codegen.install_hooks = install_hooks
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
