"""Timing probes of the default 7B library (O2), wrong results, to bound what removing work
between the GEMVs could give:

- `nonorm`: the 64 add_rms_norm calls of the decode step are dropped after the TMA GEMVs are
  marked, so the GEMVs behind them keep their kernels; no GEMV releases the next one early
  (each is released when the one ahead ends, as a fused norm epilogue would release it);
- `noattn`: the decode attention returns right after its wait (its launch, its early loads
  and its release of o_proj stay);
- `both`: the two together.

    python build_probe.py OUT.so nonorm|noattn|both
"""
import dataclasses
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, decode_attention, gemv_tma
from mlcc.backends.cuda.kernels import GRID_WAIT
from mlcc.backends.plan import EntryPlan
from mlcc.interface.compile import compile_model

mode = sys.argv[2]
if mode in ("nonorm", "both"):
    plain_mark = gemv_tma.mark

    def mark(plan):
        plan = plain_mark(plan)
        if plan.name != "decode":
            return plan
        calls = [c for c in plan.calls if c.spec.op != "add_rms_norm"]
        return EntryPlan(plan.name, plan.args, calls, plan.workspace_bytes, plan.symbols,
                         plan.bounds)

    gemv_tma.mark = mark
    plain_early = codegen.early_release
    codegen.early_release = lambda plans, built: frozenset(
        f for f in plain_early(plans, built) if "q_linear" not in f)
if mode in ("noattn", "both"):
    plain_gen = decode_attention.gen_decode_attention

    def gen(*args, **kwargs):
        k = plain_gen(*args, **kwargs)
        assert k.device_source.count(GRID_WAIT) == 1
        return dataclasses.replace(
            k, device_source=k.device_source.replace(GRID_WAIT, GRID_WAIT + " return 0;"))

    decode_attention.gen_decode_attention = gen
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
