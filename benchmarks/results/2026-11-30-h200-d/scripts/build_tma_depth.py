"""Build a 7B library whose TMA GEMVs use the configurations named here, through build_tma.py
of 2026-11-30-h200-c (its arguments 1 to 5 as there; argv[6]: per K or per N x K, the TmaConfig
fields `KEY:ks,teams,chunk,depth`, ';'-separated, e.g. '4096:2,4,4,4;11008:4,2,4,4' or
'12288x4096:1,8,8,3;4096x4096:1,8,8,2').

    python build_tma_depth.py OUT.so 'O2;tma_gemv=1' '' 12288 _dev '4096:2,4,4,4'
"""
import runpy
import sys
from pathlib import Path

from mlcc.backends.cuda import gemv_tma

configs = {}
for item in sys.argv.pop(6).split(";"):
    key, fields = item.split(":")
    ks, teams, chunk, depth = (int(v) for v in fields.split(","))
    shape = tuple(int(d) for d in key.split("x"))
    configs[shape if len(shape) == 2 else shape[0]] = gemv_tma.TmaConfig(ks, teams, chunk,
                                                                        depth=depth)


def config(s):
    return configs.get((s.n, s.k)) or configs.get(s.k)


kernel, fits = gemv_tma.gemv_tma_kernel, gemv_tma.fits
gemv_tma.gemv_tma_kernel = lambda s, name, cfg=None: kernel(s, name, cfg or config(s))
gemv_tma.fits = lambda s, cfg=None: fits(s, cfg or config(s))
print("TMA configurations:", configs)
runpy.run_path(str(Path(__file__).parents[2] / "2026-11-30-h200-c/scripts/build_tma.py"),
               run_name="__main__")
