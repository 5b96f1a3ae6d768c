"""With scripts/tma_pre.patch applied (gemv_tma.TmaConfig.pre; `git apply` it first):
The step timeline probe of 2026-11-30-h200-g (build_gemv_timeline.py) on a library whose
down GEMV takes build_down.py's configuration:

    python build_down_timeline.py OUT.so PRE DEPTH CHUNK
"""
import dataclasses
import runpy
import sys
from pathlib import Path

from mlcc.backends.cuda import gemv_tma


def arg(i):
    return None if sys.argv[i] == "-" else int(sys.argv[i])


pre, depth, chunk = arg(2), arg(3), arg(4)
plain = gemv_tma.config_of


def config_of(spec):
    cfg = plain(spec)
    if dict(spec.attrs).get(gemv_tma.ATTR) != gemv_tma.BEHIND_GLU:
        return cfg
    return dataclasses.replace(cfg, pre=pre, depth=depth or cfg.depth, chunk=chunk or cfg.chunk)


gemv_tma.config_of = config_of
here = Path(__file__).resolve().parents[2] / "2026-11-30-h200-g" / "scripts"
sys.argv = [str(here / "build_gemv_timeline.py"), sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
