"""Build the default 7B library (O2) with the one-row norms ahead of a TMA GEMV releasing it at
their start instead of after their own wait, so that the GEMV's blocks take each SM as the
weight-streaming kernel two places ahead (down, o_proj) leaves it and start their copies there.

    python build_norm_start.py OUT.so [QKV_DEPTH GLU_DEPTH]
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, gemv_tma
from mlcc.interface.compile import compile_model

original = codegen.early_release


def early_release(plans, built):
    names = codegen.kernel_names(plans)
    single = {k.name for k in built if k.single_block()}
    ahead = set()
    for plan in plans:
        kernels = [names.get(call.spec) for call in plan.calls]
        for call, here, after in zip(plan.calls[1:], kernels, kernels[1:]):
            if here in single and gemv_tma.marked(call.spec):
                ahead.add(here)
    extra = frozenset(f for k in built if k.name in ahead for f in k.device_functions())
    print("released at their start too:", sorted(extra))
    return original(plans, built) | extra


codegen.early_release = early_release
if len(sys.argv) > 3:
    qkv_depth, glu_depth = int(sys.argv[2]), int(sys.argv[3])
    plain = gemv_tma.default_config

    def default_config(s, sms=gemv_tma.SMS):
        c = plain(s, sms)
        return c if c.depth == 2 else type(c)(c.ks, c.teams, c.chunk, depth=qkv_depth)

    gemv_tma.default_config = default_config
    gemv_tma.GLU_DEPTH = glu_depth
    gemv_tma.gemv_tma_glu_kernel.__defaults__ = (glu_depth,) + \
        gemv_tma.gemv_tma_glu_kernel.__defaults__[1:]
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
