"""With scripts/tma_pre.patch applied (gemv_tma.TmaConfig.pre; `git apply` it first):
The step timeline probe of 2026-11-30-h200-g (build_gemv_timeline.py) on a library whose
down GEMV takes build_down.py's configuration (build_cfg.py --timeline does the build):

    python build_down_timeline.py OUT.so PRE DEPTH CHUNK
"""
import runpy
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
from build_down import cfg_args

sys.argv = [str(here / "build_cfg.py"), "--timeline"] + cfg_args(sys.argv[1:])
runpy.run_path(sys.argv[0], run_name="__main__")
