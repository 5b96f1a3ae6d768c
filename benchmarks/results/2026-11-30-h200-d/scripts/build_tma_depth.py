"""Build a 7B library whose TMA GEMVs use the configurations named here, through build_tma.py
of 2026-11-30-h200-c (its arguments 1 to 5 as there; argv[6]: per K, the TmaConfig fields
`K:ks,teams,chunk,depth`, ';'-separated, e.g. '4096:2,4,4,4;11008:4,2,4,4').

    python build_tma_depth.py OUT.so 'O2;tma_gemv=1' '' 12288 _dev '4096:2,4,4,4'
"""
import runpy
import sys
from pathlib import Path

from mlcc.backends.cuda import gemv_tma

configs = {}
for item in sys.argv.pop(6).split(";"):
    k, fields = item.split(":")
    ks, teams, chunk, depth = (int(v) for v in fields.split(","))
    configs[int(k)] = gemv_tma.TmaConfig(ks, teams, chunk, depth=depth)
original = gemv_tma.default_config
gemv_tma.default_config = lambda k: configs.get(k) or original(k)
print("TMA configurations:", configs)
runpy.run_path(str(Path(__file__).parents[2] / "2026-11-30-h200-c/scripts/build_tma.py"),
               run_name="__main__")
