"""Build the 7B decode libraries that measure claimed GEMV tiles side by side on an H200.

    python benchmarks/cuda/claim_variants.py [FOLDER] [--only NAME ...]

Writes FOLDER/NAME.so (default .device/bench) for each variant below. `claims` makes every
decode GEMV the persistent kernel (the database's persistent record of its shape, also for the
shapes where the one-shot kernel won) with its tiles after the first claimed from a counter
(mlcc.backends.cuda.gemv, `dynamic`); the codegen then lets the kernel ahead of each such GEMV
release it at its start (mlcc.backends.cuda.codegen.early_release). `held` is the same kernels
with the shipped release rule, `static` the persistent kernels without claims and with the
shipped rule. Then, on the GPU machine, `SKIP_MICRO=1 bash benchmarks/cuda/device_run.sh`
measures every library of the folder; libraries of one arithmetic must print the same logits
md5 (run_h200.py's fingerprint).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from mlcc.backends.cuda import codegen, gemv, glu, tuning
from mlcc.interface.compile import compile_model

# name -> (every decode GEMV persistent, claimed tiles, release into claiming GEMVs)
VARIANTS = {
    "a_base": (False, False, True),
    "b_claims": (True, True, True),
    "c_claims_held": (True, True, False),
    "d_static": (True, False, True),
}


@contextmanager
def patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def variant(persistent: bool, claims: bool, release: bool) -> ExitStack:
    """The patches of one variant, undone when the stack closes."""
    stack = ExitStack()
    shipped_config = tuning.persistent_config

    def config(n: int, k: int) -> tuning.PersistentConfig:
        return dataclasses.replace(shipped_config(n, k), dynamic=claims)

    if persistent:
        stack.enter_context(patched(gemv, "selected_kind", lambda n, k: tuning.PERSISTENT))
    stack.enter_context(patched(gemv, "persistent_config", config))
    stack.enter_context(patched(glu, "persistent_config", config))
    if not release:
        stack.enter_context(patched(codegen.CudaKernel, "claims_tiles", lambda self: False))
    return stack


def build(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        with variant(*VARIANTS[name]):
            start = time.perf_counter()
            compile_model("llama2_7b", folder / f"{name}.so", quantization="q4f16_1",
                          device="cuda", opt="O2", overrides="max_batch_size=16")
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path(".device/bench"))
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    build(args.folder, args.only)


if __name__ == "__main__":
    main()
