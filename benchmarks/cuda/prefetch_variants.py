"""Build the 7B decode libraries that measure the l2_prefetch knob side by side on an H200.

    python benchmarks/cuda/prefetch_variants.py [FOLDER] [--only NAME ...]

Writes FOLDER/NAME.so (default .device/bench) for each variant below: the shipped O2 build
(twice, first and last, to bound the drift of one call), the knob with 8, 16 and 32 MB a GEMV,
and 16 MB issued by the attention kernels alone (the norms are one block each, so whether one
SM can issue a GEMV's prefetch in time is the open question). Then, on the GPU machine,
`SKIP_MICRO=1 bash benchmarks/cuda/device_run.sh` measures every library of the folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mlcc.backends.cuda import prefetch
from mlcc.interface.compile import compile_model

MB = 1 << 20
# name -> (--opt, keyword arguments of prefetch.attach_prefetch or None)
VARIANTS = {
    "a_base": ("O2", None),
    "b_pf16": ("O2;l2_prefetch=1", {"budget": 16 * MB}),
    "c_pf16_attention_only": ("O2;l2_prefetch=1",
                              {"budget": 16 * MB, "light_ops": ("qkv_attention",)}),
    "d_pf8": ("O2;l2_prefetch=1", {"budget": 8 * MB}),
    "e_pf32": ("O2;l2_prefetch=1", {"budget": 32 * MB}),
    "f_base_again": ("O2", None),
}


def build(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shipped = prefetch.attach_prefetch
    for name in names:
        opt, options = VARIANTS[name]
        if options:  # the codegen calls prefetch.attach_prefetch(plan, budget)
            prefetch.attach_prefetch = lambda plan, budget, o=options: shipped(plan, **o)
        try:
            start = time.perf_counter()
            compile_model("llama2_7b", folder / f"{name}.so", quantization="q4f16_1",
                          device="cuda", opt=opt, overrides="max_batch_size=16")
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        finally:
            prefetch.attach_prefetch = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path(".device/bench"))
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    build(args.folder, args.only)


if __name__ == "__main__":
    main()
