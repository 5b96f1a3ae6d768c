"""Sharded CUDA libraries and their weights for the multi-GPU tests, built where TVM compiles.

`python tests/gpu/tp_cases.py OUT` writes OUT/manifest.json, OUT/libs/*.so (tiny models of
tests/unit/tp_models.py compiled for CUDA with 1, 2 or 4 shards) and OUT/params/* (the same
random weights as convert_weight stores them, unsharded: every shard count reads the same
folder). The GPU machine needs only the TVM runtime to run them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for folder in ("tests/unit", "tests/compile"):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))

# (case name, architecture, quantization, shards)
CASES = [
    ("llama_q0f32_tp2", "llama", "q0f32", 2),
    ("mistral_q0f32_tp2", "mistral", "q0f32", 2),
    ("gpt_neox_q0f32_tp2", "gpt_neox", "q0f32", 2),
    ("llama_q4f16_1_tp1", "llama", "q4f16_1", 1),
    ("llama_q4f16_1_tp2", "llama", "q4f16_1", 2),
    ("llama_q0f32_tp4", "llama", "q0f32", 4),
    ("gpt_neox_q4f16_1_tp4", "gpt_neox", "q4f16_1", 4),
]
SEED = 4


def build_cases(out: Path, log=print) -> dict:
    """Build every case under `out` (skipping what exists); returns the manifest."""
    from tp_build import compile_sharded
    from tp_models import stored_weights, tiny_config, write_params

    manifest = {}
    for name, arch_name, quantization, shards in CASES:
        arch, config = tiny_config(arch_name, quantized=quantization != "q0f32")
        params = out / "params" / f"{arch_name}_{quantization}"
        if not (params / "ndarray-cache.json").is_file():
            write_params(params, stored_weights(arch, config, quantization, SEED))
        lib = out / "libs" / f"{name}.so"
        if not lib.is_file():
            log(f"building {name}")
            compile_sharded(arch, config, quantization, lib, shards, device="cuda")
        manifest[name] = {"arch": arch_name, "quantization": quantization, "shards": shards,
                          "lib": str(lib.relative_to(out)),
                          "params": str(params.relative_to(out)), "seed": SEED}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


if __name__ == "__main__":
    build_cases(Path(sys.argv[1]))
