"""Build a 7B library with the tma_gemv knob, optionally letting named kernels ahead of a TMA
GEMV release it at their start (argv[3]: comma-separated ops, e.g. qkv_attention,linear_silu_mul)
and keeping the TMA GEMV to the output widths or N x K shapes named (argv[4], e.g. 12288 for
qkv alone, 4096x4096 for o_proj).
argv[5] lists the device-function suffixes the release names (default _dev; the decode
attention's device function is {name}_decode, so releasing it needs _dev,_decode).

    python build_tma.py OUT.so 'O2;tma_gemv=1' [OPS [WIDTHS [SUFFIXES]]]
"""
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, gemv_tma
from mlcc.interface.compile import compile_model

ops = set(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else set()
suffixes = sys.argv[5].split(",") if len(sys.argv) > 5 else ["_dev"]
original = codegen.early_release


def early_release(plans, built):
    names = codegen.kernel_names(plans)
    verdict: dict[str, bool] = {}
    for plan in plans:
        calls = plan.calls
        for here, after in zip(calls, list(calls[1:]) + [None]):
            name = names.get(here.spec)
            if name is None or here.spec.op not in ops:
                continue
            ok = after is not None and bool(dict(after.spec.attrs).get(gemv_tma.ATTR))
            verdict[name] = verdict.get(name, True) and ok
    extra = frozenset(f"{n}{suffix}" for n, ok in verdict.items() if ok for suffix in suffixes)
    print("released at their start:", sorted(extra))
    return original(plans, built) | extra


# output widths (12288) or shapes (4096x4096: N x K) that keep the TMA GEMV
widths = ({tuple(int(d) for d in w.split("x")) if "x" in w else int(w)
           for w in sys.argv[4].split(",")} if len(sys.argv) > 4 and sys.argv[4] else None)
marking = gemv_tma.mark


def mark(plan):
    plan = marking(plan)
    if widths is None:
        return plan
    calls = []
    for call in plan.calls:
        spec = call.spec
        marked = bool(dict(spec.attrs).get(gemv_tma.ATTR))
        n, k = (spec.outputs[0][0][1], spec.inputs[1][0][1] * 8) if marked else (0, 0)
        if marked and not ({n, (n, k)} & widths):
            spec = type(spec)(spec.op, spec.inputs, spec.outputs,
                              tuple(a for a in spec.attrs if a[0] != gemv_tma.ATTR), spec.kv)
            call = type(call)(spec, call.buffers)
        calls.append(call)
    return type(plan)(plan.name, plan.args, calls, plan.workspace_bytes, plan.symbols,
                      plan.bounds)


codegen.early_release = early_release
gemv_tma.mark = mark
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda",
              opt=sys.argv[2], overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
