"""With scripts/tma_pre.patch applied (gemv_tma.TmaConfig.pre; `git apply` it first):
Build the default 7B library (O2) with TMA GEMV configurations changed per place: each
argument after OUT is PLACE:FIELD=VALUE[,FIELD=VALUE...] with PLACE one of qkv, oproj (the
GEMVs behind the norm and the attention) and down (behind the GLU GEMV) and FIELD a
gemv_tma.TmaConfig field (ks, teams, chunk, depth, pre); the rest keep the default's.

    python build_cfg.py OUT.so down:pre=1 qkv:teams=8,chunk=16

With --timeline first, the library carries the step timeline probe of 2026-11-30-h200-g
(build_gemv_timeline.py); with --norm-early first, the one-row norms release the kernel after
them at their start (codegen.early_release) rather than once their own wait returns.
"""
import dataclasses
import runpy
import sys
import time
from pathlib import Path

from mlcc.backends.cuda import codegen, gemv_tma
from mlcc.interface.compile import compile_model

norm_early = sys.argv[1] == "--norm-early"
if norm_early:
    del sys.argv[1]
timeline = sys.argv[1] == "--timeline"
if timeline:
    del sys.argv[1]
changes = {}
for arg in sys.argv[2:]:
    place, _, fields = arg.partition(":")
    assert place in ("qkv", "oproj", "down"), place
    changes[place] = {k: int(v) for k, v in (f.split("=") for f in fields.split(","))}
plain = gemv_tma.config_of


def place_of(spec):
    where = dict(spec.attrs).get(gemv_tma.ATTR)
    if where == gemv_tma.BEHIND_GLU:
        return "down"
    return "qkv" if gemv_tma.LinearShape(spec).n == 12288 else "oproj"


def config_of(spec):
    cfg = plain(spec)
    return dataclasses.replace(cfg, **changes.get(place_of(spec), {}))


gemv_tma.config_of = config_of
plain_early = codegen.early_release


def early_release(plans, built):
    norms = {f for k in built if k.single_block() and k.name.endswith("rms_norm")
             for f in k.device_functions()}
    return plain_early(plans, built) | frozenset(norms)


if norm_early:
    codegen.early_release = early_release
if timeline:
    probe = Path(__file__).resolve().parents[2] / "2026-11-30-h200-g/scripts/build_gemv_timeline.py"
    sys.argv = [str(probe), sys.argv[1]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)
start = time.time()
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda", opt="O2",
              overrides="max_batch_size=16")
print(f"built {sys.argv[1]} in {time.time() - start:.1f} s")
