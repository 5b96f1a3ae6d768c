"""With scripts/tma_pre.patch applied (gemv_tma.TmaConfig.pre; `git apply` it first):
Build the default 7B library (O2) with the down GEMV's TMA configuration changed
(gemv_tma.TmaConfig of the GEMV behind the gate_up + silu_mul GEMV): PRE chunks issued before
the row is staged ('-': all, the default), DEPTH chunks in flight, CHUNK features a chunk
('-' keeps the default's). build_cfg.py does the build:

    python build_down.py OUT.so PRE DEPTH CHUNK
"""
import runpy
import sys
from pathlib import Path


def cfg_args(argv: list[str]) -> list[str]:
    """build_cfg.py's arguments for OUT PRE DEPTH CHUNK."""
    fields = [f"{k}={v}" for k, v in zip(("pre", "depth", "chunk"), argv[1:4]) if v != "-"]
    return [argv[0]] + ([f"down:{','.join(fields)}"] if fields else [])


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.argv = [str(here / "build_cfg.py")] + cfg_args(sys.argv[1:])
    runpy.run_path(sys.argv[0], run_name="__main__")
